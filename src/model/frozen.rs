//! A frozen base weight, dense or kept quantized (`model.keep_quantized`): what the
//! projections, the embedding and lm_head hold, and what every product with the base reads.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::cpu::quant::QuantWeight;

/// A frozen (rows, cols) base weight: a dense tensor, or a `QTensor` in its file's type.
#[derive(Debug, Clone)]
pub enum Frozen {
    /// A tensor in the model's dtype.
    Dense(Tensor),
    /// A `QTensor` in the GGUF file's type, dequantized block by block as products need it.
    Quant(Arc<QuantWeight>),
}

impl Frozen {
    /// The weight as a dense tensor: itself, or (quantized) all of it dequantized where the
    /// model computes, for merge and export only.
    pub fn dense(&self) -> Result<Tensor> {
        match self {
            Self::Dense(t) => Ok(t.clone()),
            Self::Quant(q) => q.dense_for_product(),
        }
    }

    /// The weight's logical shape (a quantized weight's values, not its bytes).
    pub fn shape(&self) -> Vec<usize> {
        match self {
            Self::Dense(t) => t.dims().to_vec(),
            Self::Quant(q) => vec![q.dims().0, q.dims().1],
        }
    }

    /// (rows, cols).
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Self::Dense(t) => Ok(t.dims2()?),
            Self::Quant(q) => Ok(q.dims()),
        }
    }

    /// Rows `ids` (an embedding lookup) as a (ids.len(), cols) tensor in `dtype` on `dev`. A
    /// quantized table dequantizes only those rows, on the host, by the same per-block
    /// conversion as a whole-table import, so the values are the import's bit for bit.
    pub fn rows(&self, ids: &Tensor, dtype: DType, dev: &Device) -> Result<Tensor> {
        match self {
            Self::Dense(t) => Ok(t.index_select(ids, 0)?),
            Self::Quant(q) => {
                let (n_rows, cols) = q.dims();
                let ids = ids.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                let mut out = vec![0f32; ids.len() * cols];
                for (&id, dst) in ids.iter().zip(out.chunks_exact_mut(cols.max(1))) {
                    let id = id as usize;
                    if id >= n_rows {
                        return Err(Error::Invalid(format!(
                            "row {id} is outside a table of {n_rows}"
                        )));
                    }
                    q.dequantize_rows(id..id + 1, dst);
                }
                let t = Tensor::from_vec(out, (ids.len(), cols), &Device::Cpu)?;
                Ok(t.to_device(dev)?.to_dtype(dtype)?)
            }
        }
    }
}
