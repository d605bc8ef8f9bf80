//! Activation recomputation, which transformers calls gradient checkpointing
//! (`train.gradient_checkpointing`).
//!
//! candle's autograd keeps every intermediate of the forward alive until the backward ends.
//! For a decoder layer at 256 tokens that is about 50 MiB at TinyLlama's width, more than a
//! gigabyte over 22 layers. [`recompute`] runs a block on its detached input and keeps only
//! three things: the input, the output, and the block's dropout masks. The backward runs the
//! block again on the saved input, replays the same masks, and backpropagates through that
//! fresh graph alone. So one layer's intermediates are alive at a time. The price is one more
//! forward per step.
//!
//! The block's trainable tensors (its LoRA `Var`s) are not inputs of the candle op. They are
//! flattened and concatenated into one tensor that is. The concatenation is differentiable, so
//! the op's gradient for it flows back into each `Var`. The recomputed forward is the first
//! one bit for bit: same kernels, same input, same masks.

use std::collections::VecDeque;

use candle_core::{Result, Tensor, Var};

use crate::model::autograd::attach_backward2;
use crate::model::lora::Mode;

/// A block `f(x, mode)` whose intermediates are recomputed in the backward instead of kept.
/// `vars` are the trainable tensors `f` reads, in any fixed order. Outside training, and for a
/// block with no trainable tensor, this is `f(x, mode)`.
pub fn recompute<F>(x: &Tensor, vars: Vec<Var>, mode: &mut Mode<'_>, f: F) -> Result<Tensor>
where
    F: Fn(&Tensor, &mut Mode<'_>) -> crate::error::Result<Tensor> + Send + Sync + 'static,
{
    let rng = match mode {
        Mode::Train(rng) if !vars.is_empty() => &mut **rng,
        other => return f(x, other).map_err(candle_core::Error::wrap),
    };
    let mut tape = Vec::new();
    // The graph built here (through the Vars) is dropped with the detach: only the value stays.
    let value = f(&x.detach(), &mut Mode::Record(rng, &mut tape))
        .map_err(candle_core::Error::wrap)?
        .detach();
    let flat = vars
        .iter()
        .map(|v| v.as_tensor().flatten_all())
        .collect::<Result<Vec<_>>>()?;
    let params = Tensor::cat(&flat, 0)?;
    attach_backward2("recompute", x, &params, value, move |x, _params, _y, g| {
        let input = Var::from_tensor(&x.detach())?;
        let mut masks: VecDeque<Tensor> = tape.iter().cloned().collect();
        let y = f(input.as_tensor(), &mut Mode::Replay(&mut masks))
            .map_err(candle_core::Error::wrap)?;
        if !masks.is_empty() {
            candle_core::bail!("recompute: the recomputed forward drew fewer dropout masks");
        }
        // d(sum(y * g))/dy = g exactly, so this backward is the outer one restricted to `f`.
        let grads = (y * g)?.sum_all()?.backward()?;
        let grad_of = |t: &Tensor| match grads.get(t) {
            Some(d) => Ok(d.clone()),
            None => t.zeros_like(),
        };
        let dx = grad_of(input.as_tensor())?;
        let dparams = vars
            .iter()
            .map(|v| grad_of(v.as_tensor())?.flatten_all())
            .collect::<Result<Vec<_>>>()?;
        Ok((dx, Tensor::cat(&dparams, 0)?))
    })
}
