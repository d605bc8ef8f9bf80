//! Padded or packed rows as tensors ready for the model.

use candle_core::{DType, Device, Tensor};

use crate::data::encode::Row;
use crate::error::{Error, Result};

/// A batch: `input_ids` (b, s) u32, `attention_mask` (b, s) u32, `labels` (b, s) i64.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Token ids.
    pub input_ids: Tensor,
    /// 1 on real tokens.
    pub attention_mask: Tensor,
    /// Labels, -100 ignored.
    pub labels: Tensor,
    /// Loss targets in the batch (non-ignored labels[1..]).
    pub targets: usize,
    /// Real (non-padding) tokens in the batch.
    pub real_tokens: usize,
    /// Packed batches only: each row's example lengths from position 0 (the rest is
    /// padding). Each example attends to itself alone and its positions start at 0.
    pub segments: Option<Vec<Vec<usize>>>,
}

impl Batch {
    /// A batch of unpadded rows `input_ids` (b, s) with labels = input_ids: every position is
    /// real and every next token a target (benchmarks and the selftest).
    pub fn unpadded(input_ids: Tensor) -> Result<Self> {
        let (b, s) = input_ids.dims2()?;
        Ok(Self {
            labels: input_ids.to_dtype(DType::I64)?,
            attention_mask: Tensor::ones((b, s), DType::U32, input_ids.device())?,
            input_ids,
            targets: b * s.saturating_sub(1),
            real_tokens: b * s,
            segments: None,
        })
    }

    /// Stacks rows of equal length into tensors on `dev`.
    pub fn from_rows(rows: &[Row], dev: &Device) -> Result<Self> {
        let b = rows.len();
        let s = rows.first().map_or(0, |r| r.input_ids.len());
        if b == 0
            || rows.iter().any(|r| {
                r.input_ids.len() != s || r.attention_mask.len() != s || r.labels.len() != s
            })
        {
            return Err(Error::Invalid(format!(
                "cannot batch {b} rows of unequal or zero length"
            )));
        }
        let packed = rows.iter().filter(|r| r.segments.is_some()).count();
        if packed != 0 && packed != b {
            return Err(Error::Invalid(format!(
                "cannot batch {packed} packed rows with {} unpacked ones",
                b - packed
            )));
        }
        let segments: Option<Vec<Vec<usize>>> = rows.iter().map(|r| r.segments.clone()).collect();
        if let Some(segs) = &segments
            && segs
                .iter()
                .any(|g| g.contains(&0) || g.iter().sum::<usize>() > s)
        {
            return Err(Error::Invalid(format!(
                "packed rows of {s} tokens hold empty or overlong examples"
            )));
        }
        let ids: Vec<u32> = rows
            .iter()
            .flat_map(|r| r.input_ids.iter().copied())
            .collect();
        let mask: Vec<u32> = rows
            .iter()
            .flat_map(|r| r.attention_mask.iter().copied())
            .collect();
        let labels: Vec<i64> = rows.iter().flat_map(|r| r.labels.iter().copied()).collect();
        let real_tokens = mask.iter().filter(|&&m| m == 1).count();
        Ok(Self {
            input_ids: Tensor::from_vec(ids, (b, s), dev)?,
            attention_mask: Tensor::from_vec(mask, (b, s), dev)?,
            labels: Tensor::from_vec(labels, (b, s), dev)?,
            targets: rows.iter().map(Row::targets).sum(),
            real_tokens,
            segments,
        })
    }
}
