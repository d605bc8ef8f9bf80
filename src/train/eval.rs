//! Evaluation without dropout: summed loss and target count per batch, and their mean. The
//! trainer's step-based evaluation and `lorasft eval` share these, so with the same batch size
//! and encoding the validation loss in a run's metrics is the number `eval` prints for the same
//! adapter.

use candle_core::DType;

use crate::data::batch::Batch;
use crate::data::batching::{self, Planner};
use crate::data::encode::{Encoder, Example};
use crate::error::Result;
use crate::model::{Llama, Mode};
use crate::progress;
use crate::world::{Single, World};

/// Summed loss and target count of each micro-batch of `batch_size` rows, planned in file
/// order by the encoder's batching mode (no dropout); progress is counted in examples.
pub fn batch_loss_sums(
    model: &Llama,
    encoder: &Encoder,
    examples: &[Example],
    batch_size: usize,
    progress: progress::Mode,
) -> Result<Vec<(f64, usize)>> {
    batch_loss_sums_on(&Single, model, encoder, examples, batch_size, progress)
}

/// [`batch_loss_sums`] sharded over the ranks: each computes its block of the batches, and every
/// rank gets every batch's pair, in batch order (so the mean folds as one process folds it).
pub fn batch_loss_sums_on(
    world: &dyn World,
    model: &Llama,
    encoder: &Encoder,
    examples: &[Example],
    batch_size: usize,
    progress: progress::Mode,
) -> Result<Vec<(f64, usize)>> {
    let lengths = examples.iter().map(|e| e.ids.len()).collect();
    let cfg = encoder.config();
    let plan = Planner::new(cfg.batching, lengths, cfg.max_len, batch_size, 0, false).epoch(0);
    let mine = crate::world::owned(world.rank(), world.size(), plan.len());
    let mut task = progress.task("eval", examples.len() as u64, "examples");
    let sums: Result<Vec<(f64, usize)>> = plan[mine]
        .iter()
        .map(|micro| {
            let rows = batching::collate(encoder, micro, examples);
            let b = Batch::from_rows(&rows, model.device())?;
            let pair = model.device().with_context(|| -> Result<_> {
                let l = model.batch_loss_sum(&b, &mut Mode::Eval)?;
                Ok((l.sum.to_dtype(DType::F64)?.to_scalar::<f64>()?, l.tokens))
            })?;
            task.advance(micro.examples() as u64);
            Ok(pair)
        })
        .collect();
    task.finish();
    let local: Vec<u64> = sums?
        .into_iter()
        .flat_map(|(sum, targets)| [sum.to_bits(), targets as u64])
        .collect();
    let all = crate::world::gather_items(world, plan.len(), 2, &local)?;
    Ok(all
        .chunks_exact(2)
        .map(|w| (f64::from_bits(w[0]), w[1] as usize))
        .collect())
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
    evaluate_on(&Single, model, encoder, examples, batch_size)
}

/// [`evaluate`] sharded over the ranks.
pub fn evaluate_on(
    world: &dyn World,
    model: &Llama,
    encoder: &Encoder,
    examples: &[Example],
    batch_size: usize,
) -> Result<(f64, usize)> {
    Ok(mean_loss(&batch_loss_sums_on(
        world,
        model,
        encoder,
        examples,
        batch_size,
        progress::Mode::Quiet,
    )?))
}
