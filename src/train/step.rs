//! One optimizer step, the only one in the project: the trainer, the benchmark, the selftest
//! and the tests all call [`Updater::step`], so what is timed and verified is what trains.
//!
//! A step is: forward and backward over the micro-batches with each loss divided by the
//! targets of the whole step (accumulating k micro-batches equals one batch k times larger),
//! the loss scaled for f16 and the gradients unscaled, the overflow check, clipping to the
//! global norm, and the AdamW update.

use candle_core::{DType, Tensor, Var};

use crate::data::batch::Batch;
use crate::error::{Error, Result};
use crate::model::{Llama, Mode};
use crate::rng::Rng;
use crate::train::exchange;
use crate::train::loss_scale::{LossScaler, ScaleDecision};
use crate::train::optim::{AdamW, AdamWParams, clip_grad_norm, collect_grads, grad_norm};
use crate::world::{Single, World};

/// One micro-batch's integer counts. Every rank knows every micro-batch's counts before the
/// forward (they are gathered as integers): the loss of each is divided by the targets of the
/// whole step, and its dropout masks start after the draws of the micro-batches before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MicroCounts {
    /// Loss targets.
    pub targets: u64,
    /// Real (non-pad) tokens.
    pub real: u64,
    /// Token positions, padding included.
    pub padded: u64,
    /// Values the dropout masks of its forward draw from the seeded generator.
    pub draws: u64,
}

impl MicroCounts {
    /// The counts of `b` for `model`.
    pub fn of(model: &Llama, b: &Batch) -> Self {
        let padded = b.input_ids.elem_count();
        Self {
            targets: b.targets as u64,
            real: b.real_tokens as u64,
            padded: padded as u64,
            draws: model.dropout_draws(padded),
        }
    }

    fn words(&self) -> [u64; 4] {
        [self.targets, self.real, self.padded, self.draws]
    }
}

/// The micro-batches of one optimizer step as one rank holds them: its own, a contiguous
/// block of the step's global micro-batches, and every micro-batch's counts.
pub struct StepBatches {
    /// The global index of this rank's first micro-batch.
    pub first: usize,
    /// This rank's micro-batches, global indices `first..first + owned.len()`.
    pub owned: Vec<Batch>,
    /// Every micro-batch's counts, in global order.
    pub counts: Vec<MicroCounts>,
}

impl StepBatches {
    /// One process's step: it owns every micro-batch.
    pub fn whole(model: &Llama, micro: &[Batch]) -> Self {
        Self {
            first: 0,
            counts: micro.iter().map(|b| MicroCounts::of(model, b)).collect(),
            owned: micro.to_vec(),
        }
    }

    /// This rank's share of a step of `n` micro-batches (`owned` are the ones
    /// [`crate::world::owned`] gives it); the counts of all are gathered from the ranks.
    pub fn shard(world: &dyn World, model: &Llama, n: usize, owned: Vec<Batch>) -> Result<Self> {
        let mine = crate::world::owned(world.rank(), world.size(), n);
        let local: Vec<u64> = owned
            .iter()
            .flat_map(|b| MicroCounts::of(model, b).words())
            .collect();
        let all = crate::world::gather_items(world, n, 4, &local)?;
        let counts = all
            .chunks_exact(4)
            .map(|w| MicroCounts {
                targets: w[0],
                real: w[1],
                padded: w[2],
                draws: w[3],
            })
            .collect();
        Ok(Self {
            first: mine.start,
            owned,
            counts,
        })
    }

    /// Loss targets of the whole step.
    pub fn targets(&self) -> usize {
        self.counts.iter().map(|c| c.targets as usize).sum()
    }

    /// Real tokens of the whole step.
    pub fn real_tokens(&self) -> usize {
        self.counts.iter().map(|c| c.real as usize).sum()
    }

    /// Token positions of the whole step, padding included.
    pub fn padded_tokens(&self) -> usize {
        self.counts.iter().map(|c| c.padded as usize).sum()
    }

    /// Dropout draws of the whole step.
    pub fn draws(&self) -> u64 {
        self.counts.iter().map(|c| c.draws).sum()
    }
}

/// Forward and backward over the micro-batches of one optimizer step, each loss divided by
/// `targets` (the loss targets of the whole step). The backward runs on the loss times
/// `loss_scale` (f16 loss scaling; 1 otherwise) and the gradients are divided by it again.
/// Dropout masks continue from `rng`, which ends where the step's draws leave it. Returns the
/// summed loss, the summed gradients (in `vars` order) and the real tokens seen.
pub fn forward_backward(
    model: &Llama,
    vars: &[(String, Var)],
    micro: &[Batch],
    targets: usize,
    loss_scale: f64,
    rng: &mut Rng,
) -> Result<(f64, Vec<Tensor>, usize)> {
    let batches = StepBatches::whole(model, micro);
    let out = forward_backward_on(&Single, model, vars, &batches, targets, loss_scale, rng)?;
    *rng = rng.jumped(batches.draws());
    Ok(out)
}

/// [`forward_backward`] over one rank's share of a step. Micro-batch k's dropout masks start
/// at `rng` moved on by the draws of micro-batches 0..k, and the gradients are summed as one
/// process sums them, ((g0 + g1) + g2) + …, over the global micro-batches, whichever rank
/// computed each (`InOrder`): the result is bit-identical for any number of ranks.
pub fn forward_backward_on(
    world: &dyn World,
    model: &Llama,
    vars: &[(String, Var)],
    batches: &StepBatches,
    targets: usize,
    loss_scale: f64,
    rng: &Rng,
) -> Result<(f64, Vec<Tensor>, usize)> {
    // One process folds each micro-batch as soon as its backward is done (one gradient set in
    // memory beside the sum); several ranks gather theirs first. The fold is the same.
    let streaming = world.size() == 1;
    let mut fold = InOrder::default();
    let mut local = Vec::with_capacity(batches.owned.len());
    for (i, b) in batches.owned.iter().enumerate() {
        let k = batches.first + i;
        let before: u64 = batches.counts[..k].iter().map(|c| c.draws).sum();
        let mut r = rng.jumped(before);
        // On the CPU the forward and backward run inside candle's thread pool: from the main
        // thread each kernel's parallel loop would wake the workers and put the caller to sleep
        // until they finish (144,824 context switches in a run of 8 SmolLM2 steps at 2 threads;
        // 35,449 inside the pool). Kernels split work by index, not by thread: same bits.
        let (l, grads) = model.device().with_context(|| -> Result<_> {
            let l = model.batch_loss_sum(b, &mut Mode::Train(&mut r))?;
            if l.tokens == 0 {
                return Ok((l, None));
            }
            let scaled = (&l.sum * (loss_scale / targets.max(1) as f64))?;
            Ok((l, Some(collect_grads(vars, &scaled.backward()?)?)))
        })?;
        if r != rng.jumped(before + batches.counts[k].draws) {
            return Err(Error::Invalid(format!(
                "micro-batch {k}: its forward drew a different number of dropout values than the {} the model's adapters account for",
                batches.counts[k].draws
            )));
        }
        let Some(grads) = grads else {
            local.push(None);
            continue;
        };
        let loss = l.sum.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        match streaming {
            true => fold.add(loss, grads)?,
            false => local.push(Some((loss, grads))),
        }
    }
    if !streaming {
        for (loss, g) in exchange::gather(world, vars, batches.counts.len(), local)?
            .into_iter()
            .flatten()
        {
            fold.add(loss, g)?;
        }
    }
    let loss_sum = fold.loss_sum;
    let mut grads = fold
        .grads
        .ok_or_else(|| Error::Invalid("no micro-batch had a loss target".into()))?;
    if loss_scale != 1.0 {
        grads = grads
            .iter()
            .map(|g| g / loss_scale)
            .collect::<candle_core::Result<Vec<_>>>()?;
    }
    Ok((loss_sum, grads, batches.real_tokens()))
}

/// The left fold of the micro-batches' losses and gradients, fed in global micro-batch order
/// (those without a loss target left out): ((g0 + g1) + g2) + …, the one reduction for one
/// process and for many.
#[derive(Default)]
struct InOrder {
    loss_sum: f64,
    grads: Option<Vec<Tensor>>,
}

impl InOrder {
    /// Adds the next micro-batch.
    fn add(&mut self, loss: f64, g: Vec<Tensor>) -> Result<()> {
        self.loss_sum += loss;
        self.grads = Some(match self.grads.take() {
            None => g,
            Some(acc) => acc
                .iter()
                .zip(&g)
                .map(|(a, b)| a + b)
                .collect::<candle_core::Result<Vec<_>>>()?,
        });
        Ok(())
    }
}

/// How one step ended.
#[derive(Debug, Clone)]
pub enum StepOutcome {
    /// No micro-batch had a loss target: nothing was computed and nothing changed.
    NoTargets,
    /// A non-finite value. For "loss" and "gradient norm" no update was applied; for "updated
    /// adapter" the update made the adapter non-finite (the run must stop: it holds no good
    /// state in memory any more).
    Diverged {
        /// What was not finite ("loss", "gradient norm" or "updated adapter").
        what: &'static str,
        /// Its value.
        value: f64,
    },
    /// f16 gradients overflowed: no update, and the loss scale was halved.
    Overflowed,
    /// The update was applied.
    Updated {
        /// The global gradient norm before clipping.
        grad_norm: f64,
        /// Whether clipping scaled the gradients down.
        clipped: bool,
        /// The gradients the update used (after clipping), in `vars` order.
        grads: Vec<Tensor>,
    },
}

/// What one step measured and how it ended.
#[derive(Debug, Clone)]
pub struct StepReport {
    /// Summed loss over the step's targets (0 when nothing was computed).
    pub loss_sum: f64,
    /// Loss targets in the step.
    pub targets: usize,
    /// Real (non-pad) tokens the forward saw.
    pub real_tokens: usize,
    /// How it ended.
    pub outcome: StepOutcome,
}

impl StepReport {
    /// Mean loss per target token (NaN without targets).
    pub fn loss(&self) -> f64 {
        self.loss_sum / self.targets as f64
    }
}

/// What a step updates: the adapter variables, their AdamW state and the clipping threshold.
pub struct Updater {
    /// The trainable variables, named, in a fixed order.
    pub vars: Vec<(String, Var)>,
    /// Their optimizer.
    pub opt: AdamW,
    /// Global-norm clipping threshold; `<= 0` disables clipping (as in transformers).
    pub max_grad_norm: f64,
}

impl Updater {
    /// An updater for every adapter variable of `model`.
    pub fn new(model: &Llama, params: AdamWParams, max_grad_norm: f64) -> Result<Self> {
        let vars = model.lora_vars();
        let opt = AdamW::new(vars.iter().map(|(_, v)| v.clone()).collect(), params)?;
        Ok(Self {
            vars,
            opt,
            max_grad_norm,
        })
    }

    /// One optimizer step over `micro` at learning rate `lr`. `scaler` is the f16 loss scaler
    /// (disabled otherwise); dropout masks come from `rng`. A non-finite loss or gradient norm
    /// leaves the adapter untouched; an update that makes the adapter non-finite has changed
    /// it. Both are reported, not raised: the caller decides.
    pub fn step(
        &mut self,
        model: &Llama,
        micro: &[Batch],
        scaler: &mut LossScaler,
        rng: &mut Rng,
        lr: f64,
    ) -> Result<StepReport> {
        let batches = StepBatches::whole(model, micro);
        self.step_on(&Single, model, &batches, scaler, rng, lr)
    }

    /// [`Updater::step`] over one rank's share of the step: every rank computes the same
    /// update from the same gathered gradients, so the adapters stay equal.
    pub fn step_on(
        &mut self,
        world: &dyn World,
        model: &Llama,
        batches: &StepBatches,
        scaler: &mut LossScaler,
        rng: &mut Rng,
        lr: f64,
    ) -> Result<StepReport> {
        let targets = batches.targets();
        let mut report = StepReport {
            loss_sum: 0.0,
            targets,
            real_tokens: 0,
            outcome: StepOutcome::NoTargets,
        };
        if targets == 0 {
            return Ok(report);
        }
        let (loss_sum, mut grads, real) = forward_backward_on(
            world,
            model,
            &self.vars,
            batches,
            targets,
            scaler.scale,
            rng,
        )?;
        *rng = rng.jumped(batches.draws());
        (report.loss_sum, report.real_tokens) = (loss_sum, real);
        report.outcome = self.update(&mut grads, scaler, report.loss(), lr)?;
        if let StepOutcome::Updated { grads: kept, .. } = &mut report.outcome {
            *kept = grads;
        }
        Ok(report)
    }

    /// The checks, clipping and update of a step whose gradients are computed.
    fn update(
        &mut self,
        grads: &mut [Tensor],
        scaler: &mut LossScaler,
        loss: f64,
        lr: f64,
    ) -> Result<StepOutcome> {
        if !loss.is_finite() {
            return Ok(StepOutcome::Diverged {
                what: "loss",
                value: loss,
            });
        }
        if scaler.enabled && scaler.update(grad_norm(grads)?.is_finite()) == ScaleDecision::Skip {
            return Ok(StepOutcome::Overflowed);
        }
        let clip = self.max_grad_norm > 0.0;
        let norm = if clip {
            clip_grad_norm(grads, self.max_grad_norm)?
        } else {
            grad_norm(grads)?
        };
        if !norm.is_finite() {
            return Ok(StepOutcome::Diverged {
                what: "gradient norm",
                value: norm,
            });
        }
        self.opt.step(grads, lr)?;
        if let Some(value) = first_non_finite(&self.vars)? {
            return Ok(StepOutcome::Diverged {
                what: "updated adapter",
                value,
            });
        }
        Ok(StepOutcome::Updated {
            grad_norm: norm,
            clipped: clip && norm > self.max_grad_norm,
            grads: Vec::new(),
        })
    }
}

/// The sum of every adapter value when it is NaN or infinite (some value is), or `None` when
/// the sum is finite. One reduction per tensor on the device and a single read back, so a GPU
/// syncs once per step for it.
fn first_non_finite(vars: &[(String, Var)]) -> Result<Option<f64>> {
    let sums = vars
        .iter()
        .map(|(_, v)| v.as_tensor().sum_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    if sums.is_empty() {
        return Ok(None);
    }
    let total = Tensor::stack(&sums, 0)?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    Ok((!total.is_finite()).then_some(total))
}

/// How many of the tensors whose name contains `part` have a non-zero gradient, of how many.
pub fn nonzero_grads(
    vars: &[(String, Var)],
    grads: &[Tensor],
    part: &str,
) -> Result<(usize, usize)> {
    let mut n = (0, 0);
    for ((name, _), g) in vars.iter().zip(grads) {
        if name.contains(part) {
            n.1 += 1;
            let max = g
                .abs()?
                .max_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            n.0 += usize::from(max > 0.0);
        }
    }
    Ok(n)
}
