//! AdamW with Hugging Face / PyTorch defaults and global-norm gradient clipping.
//!
//! candle_nn's AdamW defaults weight decay to 0.01 and has no clipping; this one defaults to
//! transformers' `TrainingArguments` (betas 0.9/0.999, eps 1e-8, weight decay 0) and follows
//! `torch.optim.AdamW`'s update order so runs can be compared step for step.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// AdamW hyper-parameters; `Default` is transformers' `TrainingArguments`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamWParams {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW over a fixed list of variables, with its moment state.
pub struct AdamW {
    params: AdamWParams,
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: u64,
}

impl AdamW {
    /// An optimizer with zeroed moments for `vars`.
    pub fn new(vars: Vec<Var>, params: AdamWParams) -> Result<Self> {
        let m = vars
            .iter()
            .map(|v| v.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(Self {
            params,
            vars,
            m,
            v,
            step: 0,
        })
    }

    /// Number of updates applied so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Applies one update at learning rate `lr` with the (already clipped) gradients, given in
    /// the order of the variables.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        if grads.len() != self.vars.len() {
            return Err(Error::Invalid(format!(
                "{} gradients for {} variables",
                grads.len(),
                self.vars.len()
            )));
        }
        self.step += 1;
        let AdamWParams {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.params;
        let bc1 = 1.0 - beta1.powi(self.step as i32);
        let bc2 = 1.0 - beta2.powi(self.step as i32);
        for (((var, m), v), g) in self
            .vars
            .iter()
            .zip(&mut self.m)
            .zip(&mut self.v)
            .zip(grads)
        {
            let theta = if weight_decay != 0.0 {
                (var.as_tensor() * (1.0 - lr * weight_decay))?
            } else {
                var.as_tensor().clone()
            };
            *m = ((&*m * beta1)? + (g * (1.0 - beta1))?)?;
            *v = ((&*v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            // torch: denom = sqrt(v) / sqrt(bc2) + eps; p -= lr / bc1 * m / denom
            let denom = ((v.sqrt()? / bc2.sqrt())? + eps)?;
            let update = (m.div(&denom)? * (lr / bc1))?;
            var.set(&(theta - update)?)?;
        }
        Ok(())
    }

    /// The moment tensors and step count, for checkpoints.
    pub fn state(&self) -> (u64, &[Tensor], &[Tensor]) {
        (self.step, &self.m, &self.v)
    }

    /// Restores moments and step count saved by [`AdamW::state`].
    pub fn restore(&mut self, step: u64, m: Vec<Tensor>, v: Vec<Tensor>) -> Result<()> {
        if m.len() != self.vars.len() || v.len() != self.vars.len() {
            return Err(Error::Invalid(format!(
                "optimizer state holds {} / {} moments for {} variables",
                m.len(),
                v.len(),
                self.vars.len()
            )));
        }
        for ((var, a), b) in self.vars.iter().zip(&m).zip(&v) {
            if a.dims() != var.dims() || b.dims() != var.dims() {
                return Err(Error::Invalid(format!(
                    "optimizer moment of shape {:?} for a variable of shape {:?}",
                    a.dims(),
                    var.dims()
                )));
            }
        }
        self.step = step;
        self.m = m;
        self.v = v;
        Ok(())
    }
}

/// The gradient of every variable from a backward pass, in order; a variable without one is an
/// error naming it (every adapter tensor must be reached).
pub fn collect_grads(vars: &[(String, Var)], grads: &GradStore) -> Result<Vec<Tensor>> {
    vars.iter()
        .map(|(name, v)| {
            grads.get(v.as_tensor()).cloned().ok_or_else(|| {
                Error::Invalid(format!("adapter tensor {name} received no gradient"))
            })
        })
        .collect()
}

/// The global L2 norm of a list of gradients.
pub fn grad_norm(grads: &[Tensor]) -> Result<f64> {
    let mut total = 0.0;
    for g in grads {
        total += g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    Ok(total.sqrt())
}

/// Scales the gradients so their global norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_` does; returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads)?;
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}
