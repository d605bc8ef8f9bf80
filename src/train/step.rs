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
use crate::train::loss_scale::{LossScaler, ScaleDecision};
use crate::train::optim::{AdamW, AdamWParams, clip_grad_norm, collect_grads, grad_norm};

/// Forward and backward over the micro-batches of one optimizer step, each loss divided by
/// `targets` (the loss targets of the whole step). The backward runs on the loss times
/// `loss_scale` (f16 loss scaling; 1 otherwise) and the gradients are divided by it again.
/// Returns the summed loss, the summed gradients (in `vars` order) and the real tokens seen.
pub fn forward_backward(
    model: &Llama,
    vars: &[(String, Var)],
    micro: &[Batch],
    targets: usize,
    loss_scale: f64,
    rng: &mut Rng,
) -> Result<(f64, Vec<Tensor>, usize)> {
    let mut loss_sum = 0.0;
    let mut real = 0;
    let mut grads: Option<Vec<Tensor>> = None;
    for b in micro {
        let l = model.batch_loss_sum(b, &mut Mode::Train(rng))?;
        real += b.real_tokens;
        if l.tokens == 0 {
            continue;
        }
        loss_sum += l.sum.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let scaled = (l.sum * (loss_scale / targets.max(1) as f64))?;
        let g = collect_grads(vars, &scaled.backward()?)?;
        grads = Some(match grads {
            None => g,
            Some(acc) => acc
                .iter()
                .zip(&g)
                .map(|(a, b)| a + b)
                .collect::<candle_core::Result<Vec<_>>>()?,
        });
    }
    let mut grads =
        grads.ok_or_else(|| Error::Invalid("no micro-batch had a loss target".into()))?;
    if loss_scale != 1.0 {
        grads = grads
            .iter()
            .map(|g| g / loss_scale)
            .collect::<candle_core::Result<Vec<_>>>()?;
    }
    Ok((loss_sum, grads, real))
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
        let targets: usize = micro.iter().map(|b| b.targets).sum();
        let mut report = StepReport {
            loss_sum: 0.0,
            targets,
            real_tokens: 0,
            outcome: StepOutcome::NoTargets,
        };
        if targets == 0 {
            return Ok(report);
        }
        let (loss_sum, mut grads, real) =
            forward_backward(model, &self.vars, micro, targets, scaler.scale, rng)?;
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
