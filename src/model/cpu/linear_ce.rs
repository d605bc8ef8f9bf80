//! Fused lm_head + cross-entropy: the summed next-token loss of hidden rows against a frozen
//! vocabulary projection, chunked over rows so the (rows, vocab) logits never exist at once.
//!
//! The gradient of the hidden rows is computed in the same pass (`softmax - onehot` times the
//! projection, chunk by chunk) and kept for the backward, so neither the logits nor a softmax
//! copy outlive their chunk: peak memory is one chunk of logits instead of four full copies,
//! and no FLOP is spent on the frozen projection's weight gradient. The composed primitive form
//! (`matmul`, `log_softmax`, `gather`) is the reference it is tested against in `tests/ops.rs`.

use candle_core::{D, DType, Device, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::autograd::attach_backward;
use crate::model::cpu::matmul::{cpu_f32, gemm_rows_f32};
use crate::model::cpu::quant::gemm_rows_quant;
use crate::model::cpu::simd;
pub use crate::model::cpu::simd::exp_f32;
use crate::model::frozen::Frozen;

/// The most logit elements in one chunk (32 MiB of f32): bounds peak memory and keeps a chunk
/// in cache range for the row kernel. Each chunk packs the whole vocabulary weight twice (once
/// per product), so fewer, larger chunks pack it less often: alternated against 16 MiB chunks
/// (`examples/profile_step`, 3 rounds of 8 steps), the step took 0.95× (SmolLM2) and 0.93×
/// (tiny) the time with 1 thread, 0.98× and 0.94× with 2.
const CHUNK_ELEMS: usize = 1 << 23;

/// Sum over rows `i` of `-log softmax(h_i W^T)[targets_i]`, for `h` (n, d), `w` (v, d) dense
/// or kept quantized. The result is a scalar in f32 (f64 when `h` is f64); when `h` tracks
/// gradients, its backward returns `dL/dh` and `w` gets none (it is frozen by contract).
pub fn linear_cross_entropy_sum(h: &Tensor, w: &Frozen, targets: &[u32]) -> Result<Tensor> {
    let (n, d) = h.dims2()?;
    let (v, wd) = w.dims()?;
    if wd != d || targets.len() != n {
        return Err(Error::Invalid(format!(
            "linear cross-entropy: hidden ({n}, {d}), weight ({v}, {wd}), {} targets",
            targets.len()
        )));
    }
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= v) {
        return Err(Error::Invalid(format!(
            "target {t} is outside the vocabulary of {v}"
        )));
    }
    let loss_dtype = if h.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let need_grad = h.track_op();
    let hd = h.detach();
    let host = h.device().is_cpu() && h.dtype() == DType::F32;
    let (total, dh) = match w {
        Frozen::Dense(w) if host && w.dtype() == DType::F32 => {
            let w = w.contiguous()?;
            let (store, layout) = w.storage_and_layout();
            let ws = cpu_f32(&store, layout)?;
            host_f32(&hd, v, targets, need_grad, |dst, x, m, transpose| {
                let (n, k) = if transpose { (v, d) } else { (d, v) };
                gemm_rows_f32(dst, x, ws, m, n, k, transpose);
            })?
        }
        Frozen::Quant(q) if host => host_f32(&hd, v, targets, need_grad, |dst, x, m, t| {
            gemm_rows_quant(dst, x, q, m, t)
        })?,
        other => chunked(
            &hd,
            &other.dense()?.to_dtype(h.dtype())?,
            targets,
            need_grad,
        )?,
    };
    let value = Tensor::new(total, &Device::Cpu)?
        .to_dtype(loss_dtype)?
        .to_device(h.device())?;
    let Some(dh) = dh else {
        return Ok(value);
    };
    Ok(attach_backward(
        "linear-cross-entropy",
        h,
        value,
        move |_h, _y, g| dh.broadcast_mul(&g.to_dtype(dh.dtype())?),
    )?)
}

/// Rows per chunk for `n` rows and a vocabulary of `v`: as few chunks as [`CHUNK_ELEMS`]
/// allows, of equal size (256 rows at 85 per chunk would leave a 1-row chunk, a whole pass over
/// the weight in gemm's matrix-vector path for one row).
fn rows_per_chunk(n: usize, v: usize) -> usize {
    let n = n.max(1);
    let most = (CHUNK_ELEMS / v.max(1)).clamp(1, n);
    n.div_ceil(n.div_ceil(most))
}

/// The chunk loop on tensors (any device and dtype): the loss sum and, when asked, dL/dh.
fn chunked(
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    need_grad: bool,
) -> Result<(f64, Option<Tensor>)> {
    let n = h.dim(0)?;
    let rows = rows_per_chunk(n, w.dim(0)?);
    let mut total = 0f64;
    let mut grads = Vec::new();
    for start in (0..n).step_by(rows) {
        let len = rows.min(n - start);
        let logits = h.narrow(0, start, len)?.matmul(&w.t()?)?; // (len, v)
        let (loss, dlogits) = chunk_loss(&logits, &targets[start..start + len], need_grad)?;
        total += loss;
        if let Some(dl) = dlogits {
            // dL/dh = (softmax - onehot) W, in the hidden rows' dtype.
            grads.push(dl.to_dtype(w.dtype())?.matmul(w)?.to_dtype(h.dtype())?);
        }
    }
    let dh = need_grad.then(|| Tensor::cat(&grads, 0)).transpose()?;
    Ok((total, dh))
}

/// The f32 CPU path: one reused logits buffer, the products by `gemm` straight into it, the row
/// kernel in place. No per-chunk allocation, no copy of the logits. `product(dst, x, m,
/// transpose)` is `x (m, d) @ W^T` into (m, v) when `transpose`, else `x (m, v) @ W` into
/// (m, d): the dense weight's `gemm`, or the quantized one's, which is bit-identical to it.
fn host_f32(
    h: &Tensor,
    v: usize,
    targets: &[u32],
    need_grad: bool,
    product: impl Fn(&mut [f32], &[f32], usize, bool),
) -> Result<(f64, Option<Tensor>)> {
    let (n, d) = h.dims2()?;
    let h = h.contiguous()?;
    let (h_store, h_layout) = h.storage_and_layout();
    let hs = cpu_f32(&h_store, h_layout)?;
    let rows = rows_per_chunk(n, v);
    let mut buf = vec![0f32; rows * v];
    let mut dh = vec![0f32; if need_grad { n * d } else { 0 }];
    let mut total = 0f64;
    for start in (0..n).step_by(rows) {
        let len = rows.min(n - start);
        let logits = &mut buf[..len * v];
        // logits (len, v) = h_chunk (len, d) @ W^T
        product(logits, &hs[start * d..(start + len) * d], len, true);
        let ids = &targets[start..start + len];
        total += rows_kernel(logits, v, ids, need_grad, F32_OPS);
        if need_grad {
            // dh_chunk (len, d) = (softmax - onehot) (len, v) @ W (v, d)
            product(&mut dh[start * d..(start + len) * d], logits, len, false);
        }
    }
    drop(h_store);
    let dh = need_grad
        .then(|| Tensor::from_vec(dh, (n, d), &Device::Cpu))
        .transpose()?;
    Ok((total, dh))
}

/// The summed loss of one chunk of logits and, when asked, `softmax - onehot` (len, v). CPU f32
/// never comes here (it takes [`host_f32`]); CPU f64 runs the row kernel exactly, the rest the
/// composed form.
fn chunk_loss(logits: &Tensor, ids: &[u32], need_grad: bool) -> Result<(f64, Option<Tensor>)> {
    if !(logits.device().is_cpu() && logits.dtype() == DType::F64) {
        return chunk_loss_composed(logits, ids, need_grad);
    }
    let (len, v) = logits.dims2()?;
    let mut buf = logits.flatten_all()?.to_vec1::<f64>()?;
    let loss = rows_kernel(&mut buf, v, ids, need_grad, F64_OPS);
    let grad = need_grad
        .then(|| Tensor::from_vec(buf, (len, v), logits.device()))
        .transpose()?;
    Ok((loss, grad))
}

/// Device-generic chunk loss from primitive ops, computed in f32 (any device, any dtype).
fn chunk_loss_composed(
    logits: &Tensor,
    ids: &[u32],
    need_grad: bool,
) -> Result<(f64, Option<Tensor>)> {
    let x = logits.to_dtype(DType::F32)?;
    let len = ids.len();
    let idx = Tensor::from_vec(ids.to_vec(), (len, 1), x.device())?;
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    let picked = x.gather(&idx, 1)?;
    // loss_i = log(sum_i) + max_i - x_i[t_i]
    let loss = (sum.log()? + max)?.sub(&picked)?.sum_all()?;
    let loss = f64::from(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
    let grad = if need_grad {
        let p = e.broadcast_div(&sum)?;
        let minus_one = Tensor::full(-1f32, (len, 1), x.device())?;
        Some(p.scatter_add(&idx, &minus_one, 1)?)
    } else {
        None
    };
    Ok((loss, grad))
}

/// Floats the row kernel runs on.
trait RowFloat: Copy + Send + Sync + Into<f64> {
    fn one() -> Self;
    fn sub(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
}

macro_rules! row_float {
    ($t:ty) => {
        impl RowFloat for $t {
            fn one() -> Self {
                1.0
            }
            fn sub(self, o: Self) -> Self {
                self - o
            }
            fn div(self, o: Self) -> Self {
                self / o
            }
        }
    };
}
row_float!(f32);
row_float!(f64);

/// Per row: `loss = log(sum(exp(x - max))) + max - x[t]`; the row is overwritten by
/// `exp(x - max)` (it is scratch), and with `grad` then by `softmax(x) - onehot(t)`. Rows run
/// in parallel; the sum is taken in row order, so the result does not depend on the threads.
fn rows_kernel<T: RowFloat>(buf: &mut [T], v: usize, ids: &[u32], grad: bool, k: RowOps<T>) -> f64 {
    let losses: Vec<f64> = buf
        .par_chunks_mut(v)
        .zip(ids.par_iter())
        .map(|(row, &t)| {
            let t = t as usize;
            let target = row[t];
            let max = (k.max)(row);
            let sum = (k.exp_sum)(row, max);
            let loss = sum.into().ln() + max.into() - target.into();
            if grad {
                (k.scale)(row, T::one().div(sum));
                row[t] = row[t].sub(T::one());
            }
            loss
        })
        .collect();
    losses.iter().sum()
}

/// The three row passes of the kernel for one float type.
#[derive(Clone, Copy)]
struct RowOps<T> {
    /// The row's maximum.
    max: fn(&[T]) -> T,
    /// `x = exp(x - max)` in place; returns the sum.
    exp_sum: fn(&mut [T], T) -> T,
    /// `x *= s` in place.
    scale: fn(&mut [T], T),
}

/// Plain f64 passes (the exactness reference).
const F64_OPS: RowOps<f64> = RowOps {
    max: |row| row.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    exp_sum: |row, max| {
        let mut sum = 0.0;
        for x in row.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        sum
    },
    scale: |row, s| row.iter_mut().for_each(|x| *x *= s),
};

/// Vectorised f32 passes: AVX2 when the CPU has it, with the same results either way
/// (lane-wise partial sums in a fixed order, no fused multiply-add).
const F32_OPS: RowOps<f32> = RowOps {
    max: |row| simd::dispatch(row, simd::max_f32),
    exp_sum: |row, max| {
        simd::dispatch_mut(row, |r| simd::exp_sub_f32(r, max));
        simd::dispatch(row, simd::sum_f32)
    },
    scale: |row, s| simd::dispatch_mut(row, |r| simd::scale_f32(r, s)),
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_as_few_as_the_bound_allows_and_of_equal_size() {
        for (n, v) in [
            (256, 49152),
            (512, 32000),
            (601, 1 << 15),
            (1, 1 << 30),
            (7, 3),
        ] {
            let rows = rows_per_chunk(n, v);
            let most = (CHUNK_ELEMS / v).clamp(1, n);
            let chunks = n.div_ceil(rows);
            assert!(rows <= most, "{n} rows, vocabulary {v}: {rows} > {most}");
            assert_eq!(chunks, n.div_ceil(most), "{n} rows, vocabulary {v}");
            assert!(
                n - (chunks - 1) * rows + chunks > rows,
                "{n}, {v}: a short tail"
            );
        }
        assert_eq!(rows_per_chunk(256, 49152), 128);
        assert_eq!(rows_per_chunk(512, 32000), 256);
    }
}
