//! Training ops whose gradients candle does not provide, or provides wastefully.
//!
//! candle 0.11's fused `rms_norm`, `rope` and `softmax_last_dim` have no backward and cut the
//! gradient silently; a plain `matmul` against a frozen weight computes a weight gradient that
//! is thrown away. Every op here computes its forward on a *detached* input (so the forward can
//! use any kernel) and re-attaches a hand-written backward with [`attach_backward`]. Each
//! backward sits right under its forward and is pinned to the composed primitive form and to
//! finite differences in `tests/ops.rs`.

use crate::model::autograd::attach_backward;
use crate::model::cpu::attention::{Attention, Mask};
use crate::model::cpu::matmul::matmul_frozen;
use crate::model::cpu::ops::{self as cpu_ops, FrozenLinear, RmsNorm, RopeHeads, SwiGlu};
use crate::model::cpu::quant::QuantWeight;
use crate::model::frozen::Frozen;
use crate::model::visibility::mask_value;
use candle_core::{D, DType, Result, Tensor};

/// `x @ w^T` for a frozen weight `w` (out, in): the backward computes dX only, never dW.
/// `x` is (..., in); the result is (..., out).
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    frozen_product(x, &Frozen::Dense(w.clone()))
}

/// `x @ w^T` for a frozen weight kept quantized: [`frozen_linear`] on `w`'s dequantized
/// values, bit for bit, without ever holding all of the base dense.
pub fn frozen_linear_quant(x: &Tensor, w: &std::sync::Arc<QuantWeight>) -> Result<Tensor> {
    frozen_product(x, &Frozen::Quant(std::sync::Arc::clone(w)))
}

/// `x @ w^T` for a frozen weight, dense or kept quantized. On the CPU in f32 it is one fused
/// op (a quantized weight dequantized slice by slice inside the `gemm` calls); elsewhere (an
/// accelerator, or another dtype) the weight is taken dense where the model computes, for
/// the forward and again for the backward: a quantized one is dequantized each time and
/// dropped after.
pub fn frozen_product(x: &Tensor, w: &Frozen) -> Result<Tensor> {
    let (out_f, in_f) = w.dims().map_err(candle_core::Error::wrap)?;
    check_linear_input(x, out_f, in_f)?;
    let fused = match w {
        Frozen::Dense(t) => t.dtype() == DType::F32,
        Frozen::Quant(_) => true,
    };
    if fused && cpu_ops::on_host_f32(x) {
        return x.contiguous()?.apply_op1(FrozenLinear { w: w.clone() });
    }
    let (w, dtype) = (w.clone(), x.dtype());
    composed_linear(x, (out_f, in_f), move || match &w {
        Frozen::Dense(t) => Ok(t.clone()),
        Frozen::Quant(q) => q
            .dense_for_product()
            .and_then(|d| Ok(d.to_dtype(dtype)?))
            .map_err(candle_core::Error::wrap),
    })
}

/// Refuses an input whose last dim is not the weight's `in_f`.
fn check_linear_input(x: &Tensor, out_f: usize, in_f: usize) -> Result<()> {
    if x.dims().last() != Some(&in_f) {
        candle_core::bail!(
            "frozen_linear: input {:?} does not match weight ({out_f}, {in_f})",
            x.shape()
        );
    }
    Ok(())
}

/// `x @ w^T` with the weight from `weight()` (called for the forward and for the backward)
/// and a written backward that computes dX only.
fn composed_linear(
    x: &Tensor,
    (out_f, in_f): (usize, usize),
    weight: impl Fn() -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    let rows = x.elem_count() / in_f;
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("rank >= 1") = out_f;
    let y = matmul_frozen(&x.detach().reshape((rows, in_f))?, &weight()?, true)
        .map_err(candle_core::Error::wrap)?
        .reshape(out_dims)?; // (..., out)
    attach_backward("frozen-linear", x, y, move |x, _y, g| {
        // y = x w^T  =>  dx = g w
        let rows = g.elem_count() / out_f;
        matmul_frozen(&g.reshape((rows, out_f))?, &weight()?, false)
            .map_err(candle_core::Error::wrap)?
            .reshape(x.shape())
    })
}

/// RMSNorm with a frozen weight: `y = x / sqrt(mean(x^2) + eps) * w` over the last dim.
/// The weight gets no gradient; dX is the written backward below.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if matches!(x.dtype(), DType::BF16 | DType::F16) {
        // Half precision: normalise in f32 and cast back, as transformers' LlamaRMSNorm does.
        let y = rms_norm(&x.to_dtype(DType::F32)?, &w.to_dtype(DType::F32)?, eps)?;
        return y.to_dtype(x.dtype());
    }
    if cpu_ops::on_host_f32(x) && w.dtype() == DType::F32 {
        let w = w.contiguous()?;
        return x.contiguous()?.apply_op1(RmsNorm { w, eps: eps as f32 });
    }
    let xd = x.detach();
    let rstd = rms_rstd(&xd, eps)?; // (..., 1)
    let y = xd.broadcast_mul(&rstd)?.broadcast_mul(w)?;
    let w = w.clone();
    attach_backward("rms-norm", x, y, move |x, _y, g| {
        // y = xhat * w with xhat = x * rstd, rstd = (mean(x^2) + eps)^-1/2
        // dx = rstd * (g w - xhat * mean(g w xhat))
        let rstd = rms_rstd(x, eps)?;
        let xhat = x.broadcast_mul(&rstd)?;
        let gw = g.broadcast_mul(&w)?;
        let dot = (&gw * &xhat)?.mean_keepdim(D::Minus1)?;
        gw.sub(&xhat.broadcast_mul(&dot)?)?.broadcast_mul(&rstd)
    })
}

fn rms_rstd(x: &Tensor, eps: f64) -> Result<Tensor> {
    (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()
}

/// Rotates the two halves of the last dim: `[x1, x2] -> [-x2, x1]` (Hugging Face layout).
pub fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// Rotary position embedding in the Hugging Face (non-interleaved) layout:
/// `y = x cos + rotate_half(x) sin`, with `x` (b, n, s, d) and `cos`, `sin` (s, d).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let y = rope_apply(&x.detach(), cos, sin)?;
    let (cos, sin) = (cos.clone(), sin.neg()?);
    attach_backward("rope", x, y, move |_x, _y, g| {
        // y = R(theta) x is a rotation per frequency pair, so dx = R(-theta) g.
        rope_apply(g, &cos, &sin)
    })
}

fn rope_apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(cos)?
        .add(&rotate_half(x)?.broadcast_mul(sin)?)
}

/// A projection's output (b, s, heads*d) in attention's head-major layout (b, heads, s, d),
/// rotated by `rotation` = (cos, sin) when given (queries and keys) and only transposed when
/// not (values). One fused pass each way on the CPU in f32.
pub fn to_heads(x: &Tensor, heads: usize, rotation: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
    if cpu_ops::on_host_f32(x)
        && rotation.is_none_or(|(c, s)| cpu_ops::on_host_f32(c) && cpu_ops::on_host_f32(s))
    {
        let rotation = rotation.map(|(c, s)| (c.clone(), s.clone()));
        return x.contiguous()?.apply_op1(RopeHeads { heads, rotation });
    }
    let (b, s, nd) = x.dims3()?;
    let x = x
        .reshape((b, s, heads, nd / heads))?
        .transpose(1, 2)?
        .contiguous()?;
    match rotation {
        Some((cos, sin)) => rope(&x, cos, sin),
        None => Ok(x),
    }
}

/// Attention probabilities `softmax(raw * scale + bias)` over keys, for raw scores
/// (b, heads, s, t) and a constant bias (b or 1, 1, s, t). Mask and softmax run in the bias's
/// dtype (f32 under a half-precision base, as transformers does); the result is in `raw`'s.
fn attention_probs(raw: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let scores = (raw * scale)?.to_dtype(bias.dtype())?.broadcast_add(bias)?;
    softmax_last_dim(&scores)?.to_dtype(raw.dtype())
}

/// Grouped-query attention `softmax(q k^T * scale + bias) v` for q (b, heads, s, d), k and v
/// (b, kv_heads, t, d) under a [`Mask`] (key ranges, or a constant bias (b or 1, 1, s, t)),
/// returned as (b, s, heads * d). One fused node with a written backward on the CPU in f32;
/// composed elsewhere, where key ranges become the dense bias they stand for.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Mask, scale: f64) -> Result<Tensor> {
    let fused_mask = match mask {
        Mask::Bias(bias) => cpu_ops::on_host_f32(bias),
        Mask::Ranges(_) => true,
    };
    if fused_mask && [q, k, v].into_iter().all(cpu_ops::on_host_f32) {
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let mask = match mask {
            Mask::Bias(bias) => Mask::Bias(bias.contiguous()?),
            ranges => ranges.clone(),
        };
        return q.apply_op3(&k, &v, Attention::new(mask, scale as f32));
    }
    let bias = match mask {
        Mask::Bias(bias) => bias.clone(),
        Mask::Ranges(r) => {
            // Masks and softmax run in f32 at least, as with a half-precision base.
            let dtype = match q.dtype() {
                DType::F64 => DType::F64,
                _ => DType::F32,
            };
            r.to_bias(mask_value(dtype), dtype, q.device())
                .map_err(candle_core::Error::wrap)?
        }
    };
    let bias = &bias;
    let (b, nh, s, d) = q.dims4()?;
    let (_, nkv, t, _) = k.dims4()?;
    let rep = nh / nkv;
    // The `rep` query heads that share a kv head are folded into the row dimension, so K and
    // V are never copied per query head.
    let qg = q.reshape((b, nkv, rep * s, d))?; // (b, nkv, rep*s, d)
    let raw = qg.matmul(&k.t()?)?.reshape((b, nh, s, t))?; // (b, nh, s, t)
    let probs = attention_probs(&raw, bias, scale)?;
    let o = probs.reshape((b, nkv, rep * s, t))?.matmul(v)?; // (b, nkv, rep*s, d)
    o.reshape((b, nh, s, d))?
        .transpose(1, 2)?
        .reshape((b, s, nh * d))
}

/// SwiGLU, `silu(gate) * up`: one fused pass each way on the CPU in f32.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if cpu_ops::on_host_f32(gate) && cpu_ops::on_host_f32(up) {
        return gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu);
    }
    gate.silu()? * up
}

/// Softmax over the last dim, with a written backward.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let xd = x.detach();
    let y = match xd.dtype() {
        // candle's kernel accumulates f64 in f64; for the rest it is also exact enough.
        DType::F32 | DType::F64 => candle_nn::ops::softmax_last_dim(&xd)?,
        _ => softmax_composed(&xd)?,
    };
    attach_backward("softmax", x, y, |_x, y, g| {
        // y = softmax(x)  =>  dx = y * (g - sum(g y))
        let dot = (g * y)?.sum_keepdim(D::Minus1)?;
        y * g.broadcast_sub(&dot)?
    })
}

/// Softmax built from primitive ops (the max is detached: it cancels in the derivative).
pub fn softmax_composed(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Log-softmax over the last dim built from primitives (differentiable; max detached).
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}
