//! Shifted causal-LM cross-entropy: logits[:, :-1] against labels[:, 1:], ignoring -100.
//!
//! The sum and the count of non-ignored tokens are returned separately so that gradient
//! accumulation can normalise by the tokens of the whole optimizer step.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::model::cpu::linear_ce::linear_cross_entropy_sum;
use crate::model::frozen::Frozen;
use crate::model::ops::log_softmax;

pub use crate::data::encode::IGNORE_INDEX;

/// The summed loss of a batch and the number of tokens it was summed over.
#[derive(Debug, Clone)]
pub struct LossSum {
    /// Sum of per-token negative log-likelihoods (a scalar in the logits' dtype, or f32 zero).
    pub sum: Tensor,
    /// Number of non-ignored target tokens.
    pub tokens: usize,
}

impl LossSum {
    /// The mean over the batch's own tokens; 0 (never NaN) when every label is ignored.
    pub fn mean(&self) -> Result<Tensor> {
        Ok((&self.sum / self.tokens.max(1) as f64)?)
    }
}

/// Flat row indices (into `b * s`) of positions with a real next-token target, and the targets.
/// Target of position t is the label at t + 1; labels must be -100 or a token id below `v`.
pub fn target_rows(labels: &Tensor, v: usize) -> Result<(Vec<u32>, Vec<u32>)> {
    let (_, s) = labels.dims2()?;
    if s < 2 {
        return Ok((Vec::new(), Vec::new()));
    }
    let targets = labels
        .narrow(1, 1, s - 1)?
        .to_dtype(DType::I64)?
        .flatten_all()?
        .to_vec1::<i64>()?;
    let mut rows = Vec::new();
    let mut ids = Vec::new();
    for (i, &t) in targets.iter().enumerate() {
        if t == IGNORE_INDEX {
            continue;
        }
        if t < 0 || t as usize >= v {
            return Err(Error::Invalid(format!(
                "label {t} is neither -100 nor a token id below {v}"
            )));
        }
        let (bi, ti) = (i / (s - 1), i % (s - 1));
        rows.push((bi * s + ti) as u32);
        ids.push(t as u32);
    }
    Ok((rows, ids))
}

fn check_labels(labels: &Tensor, b: usize, s: usize, what: &str) -> Result<()> {
    let (lb, ls) = labels.dims2()?;
    if (lb, ls) != (b, s) {
        return Err(Error::Invalid(format!(
            "labels ({lb}, {ls}) do not match {what} ({b}, {s}, ..)"
        )));
    }
    Ok(())
}

/// Sum of next-token NLL for logits (b, s, v) and labels (b, s) (i64, -100 = ignore), from
/// primitive ops: the reference form of [`lm_head_loss_sum`], and the loss of given logits.
/// Only rows with a real target go through the log-softmax, so masked padding costs nothing.
pub fn causal_lm_loss_sum(logits: &Tensor, labels: &Tensor) -> Result<LossSum> {
    let (b, s, v) = logits.dims3()?;
    check_labels(labels, b, s, "logits")?;
    let (rows, ids) = target_rows(labels, v)?;
    if rows.is_empty() {
        return Ok(LossSum {
            sum: Tensor::zeros((), logits.dtype(), logits.device())?,
            tokens: 0,
        });
    }
    let n = rows.len();
    let dev = logits.device();
    let rows = Tensor::from_vec(rows, n, dev)?;
    let ids = Tensor::from_vec(ids, (n, 1), dev)?;
    let picked = logits.reshape((b * s, v))?.index_select(&rows, 0)?; // (n, v)
    let logp = log_softmax(&picked)?.gather(&ids, 1)?; // (n, 1)
    Ok(LossSum {
        sum: logp.sum_all()?.neg()?,
        tokens: n,
    })
}

/// Sum of next-token NLL for final hidden states (b, s, h), the frozen lm_head weight (v, h),
/// dense or kept quantized,
/// and labels (b, s): [`causal_lm_loss_sum`] of `hidden @ w^T` without materialising the
/// logits (the fused, chunked [`linear_cross_entropy_sum`]). The sum is f32 (f64 for f64).
pub fn lm_head_loss_sum(hidden: &Tensor, w: &Frozen, labels: &Tensor) -> Result<LossSum> {
    let (b, s, h) = hidden.dims3()?;
    check_labels(labels, b, s, "hidden states")?;
    let (rows, ids) = target_rows(labels, w.dims()?.0)?;
    let n = rows.len();
    if n == 0 {
        let dtype = if hidden.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        return Ok(LossSum {
            sum: Tensor::zeros((), dtype, hidden.device())?,
            tokens: 0,
        });
    }
    let rows = Tensor::from_vec(rows, n, hidden.device())?;
    let picked = hidden.reshape((b * s, h))?.index_select(&rows, 0)?; // (n, h)
    Ok(LossSum {
        sum: linear_cross_entropy_sum(&picked, w, &ids)?,
        tokens: n,
    })
}

/// Mean next-token NLL over the non-ignored tokens of one batch.
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    causal_lm_loss_sum(logits, labels)?.mean()
}
