//! Evaluation without dropout: summed loss and target count per batch, and their mean. The
//! trainer's step-based evaluation and `lorasft eval` share these, so with the same batch size
//! and encoding the validation loss in a run's metrics is the number `eval` prints for the same
//! adapter.

use candle_core::DType;

use crate::data::batch::Batch;
use crate::data::encode::{Encoder, Example};
use crate::error::Result;
use crate::model::{Llama, Mode};

/// Summed loss and target count of each batch of `batch_size` examples (no dropout).
pub fn batch_loss_sums(
    model: &Llama,
    encoder: &Encoder,
    examples: &[Example],
    batch_size: usize,
) -> Result<Vec<(f64, usize)>> {
    examples
        .chunks(batch_size.max(1))
        .map(|chunk| {
            let rows = encoder.collate(&chunk.iter().collect::<Vec<_>>());
            let b = Batch::from_rows(&rows, model.device())?;
            let l = model.loss_sum(
                &b.input_ids,
                Some(&b.attention_mask),
                &b.labels,
                &mut Mode::Eval,
            )?;
            Ok((l.sum.to_dtype(DType::F64)?.to_scalar::<f64>()?, l.tokens))
        })
        .collect()
}

/// Mean loss per target token and target count over (loss sum, targets) pairs; 0 without targets.
pub fn mean_loss(sums: &[(f64, usize)]) -> (f64, usize) {
    let (sum, targets) = sums
        .iter()
        .fold((0.0, 0), |(s, t), (ls, lt)| (s + ls, t + lt));
    (
        if targets == 0 {
            0.0
        } else {
            sum / targets as f64
        },
        targets,
    )
}

/// Mean loss and target count over examples, in batches (no dropout).
pub fn evaluate(
    model: &Llama,
    encoder: &Encoder,
    examples: &[Example],
    batch_size: usize,
) -> Result<(f64, usize)> {
    Ok(mean_loss(&batch_loss_sums(
        model, encoder, examples, batch_size,
    )?))
}
