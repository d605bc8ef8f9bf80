//! LoRA with PEFT's semantics: `y = x W^T + dropout(x) A^T B^T * scaling`.
//!
//! A is (r, in), initialised Kaiming-uniform with a = sqrt(5), i.e. U(±1/sqrt(in)); B is
//! (out, r), zeros, so a fresh adapter reproduces the base model exactly. scaling is alpha / r,
//! or alpha / sqrt(r) with rsLoRA. Dropout acts on the LoRA branch only, in training only.
//! The adapters' A and B are the model's only `Var`s.

use std::collections::BTreeSet;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::config::Projection;
pub use crate::model::frozen::Frozen;
use crate::model::ops::{frozen_linear, frozen_product};
use crate::rng::Rng;

/// LoRA hyper-parameters; `Default` is the reference run (r 8, alpha 16, dropout 0.05, q+v).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Rank of the update.
    pub r: usize,
    /// Scale numerator.
    pub alpha: f64,
    /// Dropout probability on the LoRA branch's input, in [0, 1).
    pub dropout: f64,
    /// Which linear layers get an adapter.
    pub targets: BTreeSet<Projection>,
    /// rsLoRA: scale by alpha / sqrt(r) instead of alpha / r.
    pub use_rslora: bool,
}

/// The largest rank accepted: far above any useful LoRA rank, and small enough that adapter
/// shapes and parameter counts cannot overflow.
pub const MAX_R: usize = 65_536;

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.05,
            targets: [Projection::QProj, Projection::VProj].into_iter().collect(),
            use_rslora: false,
        }
    }
}

impl LoraConfig {
    /// Rejects values PEFT would reject, quoting the value given.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 || self.r > MAX_R {
            return Err(Error::LoraConfig(format!(
                "r must be an integer in 1..={MAX_R}, got {}",
                self.r
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::LoraConfig(format!(
                "dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        if !self.alpha.is_finite() {
            return Err(Error::LoraConfig(format!(
                "alpha must be finite, got {}",
                self.alpha
            )));
        }
        if self.targets.is_empty() {
            return Err(Error::LoraConfig("no target modules given".into()));
        }
        Ok(())
    }

    /// The factor applied to `B A x`.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Parses a comma-separated target list such as `q_proj,v_proj` (or `all-linear`).
    pub fn parse_targets(list: &str) -> Result<BTreeSet<Projection>> {
        if list.trim() == "all-linear" {
            return Ok(Projection::ALL.into_iter().collect());
        }
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                Projection::parse(s).ok_or_else(|| {
                    Error::LoraConfig(format!(
                        "unknown target module {s:?}; expected some of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
                    ))
                })
            })
            .collect()
    }

    /// Trainable parameters added to one linear of shape (out, in).
    pub fn params_for(&self, out_f: usize, in_f: usize) -> u64 {
        (self.r * (in_f + out_f)) as u64
    }
}

/// The trainable pair of one adapted linear.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// Down projection, (r, in).
    pub a: Var,
    /// Up projection, (out, r).
    pub b: Var,
    /// alpha / r (or alpha / sqrt r).
    pub scaling: f64,
    /// Dropout probability on the branch input.
    pub dropout: f64,
}

impl LoraAdapter {
    /// PEFT's initialisation: A ~ U(±1/sqrt(in)) (kaiming_uniform, a = sqrt 5), B = 0.
    pub fn init(
        cfg: &LoraConfig,
        out_f: usize,
        in_f: usize,
        rng: &mut Rng,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        let bound = 1.0 / (in_f as f64).sqrt();
        let a: Vec<f64> = (0..cfg.r * in_f)
            .map(|_| rng.uniform(-bound, bound))
            .collect();
        let a = Tensor::from_vec(a, (cfg.r, in_f), dev)?.to_dtype(dtype)?;
        let b = Tensor::zeros((out_f, cfg.r), dtype, dev)?;
        Ok(Self {
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            scaling: cfg.scaling(),
            dropout: cfg.dropout,
        })
    }

    /// The weight update this adapter stands for: `B A * scaling`, (out, in).
    pub fn delta_weight(&self) -> Result<Tensor> {
        Ok((self.b.as_tensor().matmul(self.a.as_tensor())? * self.scaling)?)
    }
}

/// Whether a forward is for training (dropout drawn from the given RNG) or evaluation, and,
/// under activation recomputation, whether its dropout masks are recorded or replayed.
pub enum Mode<'a> {
    /// Evaluation: no dropout.
    Eval,
    /// Training: dropout masks drawn from this generator.
    Train(&'a mut Rng),
    /// Training whose forward will run again in the backward: masks are drawn as in `Train`
    /// and each is also pushed onto the tape.
    Record(&'a mut Rng, &'a mut Vec<Tensor>),
    /// That second run: masks come off the tape, in the order they were recorded, so the
    /// recomputed forward is the first one bit for bit on every device.
    Replay(&'a mut std::collections::VecDeque<Tensor>),
}

impl Mode<'_> {
    /// Whether this forward trains (dropout on, gradients wanted).
    pub fn is_training(&self) -> bool {
        !matches!(self, Mode::Eval)
    }

    /// Inverted dropout with probability `p` in training, `x` itself otherwise.
    pub fn dropout(&mut self, x: &Tensor, p: f64) -> Result<Tensor> {
        if p <= 0.0 {
            return Ok(x.clone());
        }
        let keep = match self {
            Mode::Eval => return Ok(x.clone()),
            // The common case, in one pass: the scaled mask drawn straight as f32.
            Mode::Train(rng) if x.device().is_cpu() && x.dtype() == DType::F32 => {
                let scale = (1.0 / (1.0 - p)) as f32;
                let mask = draw(
                    x.elem_count(),
                    p,
                    rng,
                    |keep| if keep { scale } else { 0.0 },
                );
                return Ok((x * Tensor::from_vec(mask, x.shape(), x.device())?)?);
            }
            Mode::Train(rng) => keep_mask(x, p, rng)?,
            Mode::Record(rng, tape) => {
                let keep = keep_mask(x, p, rng)?;
                tape.push(keep.clone());
                keep
            }
            Mode::Replay(tape) => tape.pop_front().ok_or_else(|| {
                Error::Invalid(
                    "recomputed forward asked for more dropout masks than it drew".into(),
                )
            })?,
        };
        apply_keep(x, &keep, p)
    }
}

/// A linear layer with a frozen weight and an optional LoRA adapter.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Frozen base weight, (out, in). Never a `Var`, never changed by training.
    weight: Frozen,
    /// The adapter, when this module is a target.
    lora: Option<LoraAdapter>,
    /// `W + delta` while merged; `weight` itself is kept so that unmerge restores it exactly.
    merged: Option<Tensor>,
}

impl Linear {
    /// A frozen linear with no adapter.
    pub fn new(weight: Tensor) -> Self {
        Self::from_frozen(Frozen::Dense(weight))
    }

    /// A frozen linear, dense or quantized, with no adapter.
    pub fn from_frozen(weight: Frozen) -> Self {
        Self {
            weight,
            lora: None,
            merged: None,
        }
    }

    /// The frozen base weight.
    pub fn weight(&self) -> &Frozen {
        &self.weight
    }

    /// The adapter, if any.
    pub fn lora(&self) -> Option<&LoraAdapter> {
        self.lora.as_ref()
    }

    /// Attaches (or replaces) the adapter.
    pub fn set_lora(&mut self, lora: Option<LoraAdapter>) {
        self.merged = None;
        self.lora = lora;
    }

    /// Whether the adapter is folded into the weight.
    pub fn is_merged(&self) -> bool {
        self.merged.is_some()
    }

    /// Folds the adapter into a merged weight `W + B A s`; refuses non-finite results.
    pub fn merge(&mut self) -> Result<()> {
        if let Some(lora) = &self.lora {
            let weight = self.weight.dense()?;
            let delta = lora.delta_weight()?.to_dtype(weight.dtype())?;
            let merged = (&weight + delta)?;
            let total = merged.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
            if !total.is_finite() {
                return Err(Error::Invalid(
                    "merging the adapter gives non-finite weights".into(),
                ));
            }
            self.merged = Some(merged);
        }
        Ok(())
    }

    /// Undoes [`Linear::merge`]: the original weight is restored bit for bit.
    pub fn unmerge(&mut self) {
        self.merged = None;
    }

    /// The weight the forward uses: merged if merged, else the base weight.
    pub fn effective_weight(&self) -> Result<Tensor> {
        match (&self.merged, &self.lora) {
            (Some(m), _) => Ok(m.clone()),
            (None, Some(l)) => {
                let weight = self.weight.dense()?;
                Ok((&weight + l.delta_weight()?.to_dtype(weight.dtype())?)?)
            }
            (None, None) => self.weight.dense(),
        }
    }

    /// `x W^T + dropout(x) A^T B^T * scaling`; x is (b, s, in), the result (b, s, out).
    pub fn forward(&self, x: &Tensor, mode: &mut Mode<'_>) -> Result<Tensor> {
        if let Some(m) = &self.merged {
            return Ok(frozen_linear(x, m)?);
        }
        let base = frozen_product(x, &self.weight)?;
        let Some(lora) = &self.lora else {
            return Ok(base);
        };
        let xd = mode.dropout(x, lora.dropout)?;
        // The branch runs in the adapters' (master) dtype, f32 under a half-precision base.
        let xd = xd.to_dtype(lora.a.dtype())?;
        let down = xd.broadcast_matmul(&lora.a.as_tensor().t()?)?; // (b, s, r)
        let up = down.broadcast_matmul(&lora.b.as_tensor().t()?)?; // (b, s, out)
        Ok((base + (up * lora.scaling)?.to_dtype(x.dtype())?)?)
    }
}

/// Inverted dropout with a mask from the project's seeded RNG: keeps each element with
/// probability 1 - p and scales the kept ones by 1 / (1 - p).
/// On the CPU the mask comes from `rng` (bitwise reproducible); on an accelerator it is drawn
/// there, from the device's generator (seeded by the trainer), to keep the host out of the loop.
pub fn dropout(x: &Tensor, p: f64, rng: &mut Rng) -> Result<Tensor> {
    apply_keep(x, &keep_mask(x, p, rng)?, p)
}

/// The 0/1 keep mask (u8, `x`'s shape) of [`dropout`].
fn keep_mask(x: &Tensor, p: f64, rng: &mut Rng) -> Result<Tensor> {
    Ok(if x.device().is_cpu() {
        let keep = draw(x.elem_count(), p, rng, u8::from);
        Tensor::from_vec(keep, x.shape(), x.device())?
    } else {
        Tensor::rand(0f32, 1f32, x.shape(), x.device())?.ge(p)?
    })
}

/// `n` mask values: element i is `value(keep)` with keep when the i-th draw of `rng` is at
/// least `p`; `rng` ends past the n draws. The draws are made in chunks across candle's
/// threads, each chunk starting where a serial walk would be (`Rng::jumped`), so the mask is
/// the same on any number of threads, the one serial stream's.
pub fn draw<T: Send + Default + Clone>(
    n: usize,
    p: f64,
    rng: &mut Rng,
    value: impl Fn(bool) -> T + Sync,
) -> Vec<T> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 15;
    let start = rng.clone();
    let mut out = vec![T::default(); n];
    let fill = |(c, chunk): (usize, &mut [T])| {
        let mut r = start.jumped((c * CHUNK) as u64);
        for v in chunk {
            *v = value(r.next_f64() >= p);
        }
    };
    if n > CHUNK && candle_core::utils::get_num_threads() > 1 {
        out.par_chunks_mut(CHUNK).enumerate().for_each(fill);
    } else {
        out.chunks_mut(CHUNK).enumerate().for_each(fill);
    }
    *rng = start.jumped(n as u64);
    out
}

/// `x` times `keep / (1 - p)`.
fn apply_keep(x: &Tensor, keep: &Tensor, p: f64) -> Result<Tensor> {
    let mask = (keep.to_dtype(x.dtype())? * (1.0 / (1.0 - p)))?;
    Ok((x * mask)?)
}
