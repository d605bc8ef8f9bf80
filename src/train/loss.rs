//! Shifted causal-LM cross-entropy: logits[:, :-1] against labels[:, 1:], ignoring -100.
//!
//! The sum and the count of non-ignored tokens are returned separately so that gradient
//! accumulation can normalise by the tokens of the whole optimizer step.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::model::ops::log_softmax;

/// Label value that contributes nothing to the loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

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

/// Sum of next-token NLL for logits (b, s, v) and labels (b, s) (i64, -100 = ignore).
/// Only rows with a real target go through the log-softmax, so masked padding costs nothing.
pub fn causal_lm_loss_sum(logits: &Tensor, labels: &Tensor) -> Result<LossSum> {
    let (b, s, v) = logits.dims3()?;
    let (lb, ls) = labels.dims2()?;
    if (lb, ls) != (b, s) {
        return Err(Error::Invalid(format!(
            "labels ({lb}, {ls}) do not match logits ({b}, {s}, {v})"
        )));
    }
    let zero = || Tensor::zeros((), logits.dtype(), logits.device());
    if s < 2 {
        return Ok(LossSum {
            sum: zero()?,
            tokens: 0,
        });
    }
    // Target of position t is the label at t + 1.
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
    if rows.is_empty() {
        return Ok(LossSum {
            sum: zero()?,
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

/// Mean next-token NLL over the non-ignored tokens of one batch.
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    causal_lm_loss_sum(logits, labels)?.mean()
}
