//! Fused f32 kernels for the CPU training path, on plain slices: RMSNorm, rotary embedding with
//! the heads transpose, the attention softmax with its scale and mask, and SwiGLU, each with
//! its backward.
//!
//! Each one replaces a chain of 5 to 12 candle ops (one pass and one allocation each) with one
//! pass per direction. Rows are independent and summed lane-wise in a fixed order, so results
//! do not depend on the thread count. `ops.rs` wraps them as candle ops; `tests/ops.rs` pins
//! each against the composed primitive form in f64.

use rayon::prelude::*;

use crate::model::cpu::simd::{self, exp_f32};

/// Below this many elements per block a thread split costs more than it gains.
const MIN_BLOCK_ELEMS: usize = 1 << 14;

/// Calls `f(i, row_i)` for every row of `out` (rows of `len` elements), in contiguous blocks
/// of rows across candle's threads, each block inside an AVX2 frame when the CPU has it.
fn for_rows(out: &mut [f32], len: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if len == 0 || out.is_empty() {
        return;
    }
    let rows = out.len() / len;
    let threads = candle_core::utils::get_num_threads().max(1);
    let block = rows
        .div_ceil(threads)
        .max(MIN_BLOCK_ELEMS.div_ceil(len))
        .max(1);
    let run_block = |first: usize, chunk: &mut [f32]| {
        simd::run(|| {
            for (j, row) in chunk.chunks_mut(len).enumerate() {
                f(first + j, row);
            }
        })
    };
    if threads == 1 || block >= rows {
        run_block(0, out);
    } else {
        out.par_chunks_mut(block * len)
            .enumerate()
            .for_each(|(bi, chunk)| run_block(bi * block, chunk));
    }
}

/// Lane-wise dot product (fixed combination order).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 8;
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ta.iter().zip(tb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// `1 / sqrt(mean(x^2) + eps)` of one row.
#[inline(always)]
fn rstd(x: &[f32], eps: f32) -> f32 {
    (dot(x, x) / x.len() as f32 + eps).sqrt().recip()
}

/// RMSNorm forward: `y = x * rstd(x) * w` per row of `w.len()` elements.
pub fn rms_norm_fwd(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    assert_eq!(x.len(), y.len());
    let h = w.len();
    for_rows(y, h, |i, yr| {
        let xr = &x[i * h..(i + 1) * h];
        let r = rstd(xr, eps);
        for ((o, &a), &b) in yr.iter_mut().zip(xr).zip(w) {
            *o = a * r * b;
        }
    });
}

/// RMSNorm backward for a frozen weight: `dx = rstd * (g w - xhat * mean(g w xhat))` with
/// `xhat = x * rstd`.
pub fn rms_norm_bwd(x: &[f32], w: &[f32], eps: f32, g: &[f32], dx: &mut [f32]) {
    assert!(x.len() == dx.len() && g.len() == dx.len());
    let h = w.len();
    for_rows(dx, h, |i, dr| {
        let (xr, gr) = (&x[i * h..(i + 1) * h], &g[i * h..(i + 1) * h]);
        let r = rstd(xr, eps);
        // dr holds g w for the dot product, then becomes dx.
        for ((o, &a), &b) in dr.iter_mut().zip(gr).zip(w) {
            *o = a * b;
        }
        let m = dot(dr, xr) * r / h as f32;
        for (o, &a) in dr.iter_mut().zip(xr) {
            *o = r * (*o - a * r * m);
        }
    });
}

/// Where the rotary kernel reads and writes: rows of `d` in the sequence-major (b, s, n, d)
/// layout of a projection's output, or the head-major (b, n, s, d) layout attention uses.
#[derive(Debug, Clone, Copy)]
pub struct HeadsLayout {
    /// Batch rows.
    pub batch: usize,
    /// Positions per row.
    pub seq: usize,
    /// Heads.
    pub heads: usize,
    /// Head size (even when rotated).
    pub head_dim: usize,
}

/// The rotation of one head row: cos and sin rows of `head_dim`, from `(s, d)` tables or
/// `(b, s, d)` ones when rows are numbered per batch row (left padding).
#[derive(Debug, Clone, Copy)]
pub struct Rotation<'a> {
    /// cos per position.
    pub cos: &'a [f32],
    /// sin per position.
    pub sin: &'a [f32],
    /// Tables hold one block per batch row.
    pub per_batch: bool,
}

/// Rotary embedding (Hugging Face's half-split layout) fused with the heads transpose.
/// Forward (`to_heads`): `x` (b, s, n, d) -> `y` (b, n, s, d), `y = x cos + rotate_half(x) sin`.
/// Backward (`!to_heads`): `g` (b, n, s, d) -> `dx` (b, s, n, d), the exact transpose
/// `dx = g cos - rotate_half(g sin)`. Without a rotation it is the transpose alone.
pub fn rope_heads(
    src: &[f32],
    l: HeadsLayout,
    rot: Option<Rotation<'_>>,
    to_heads: bool,
    out: &mut [f32],
) {
    let HeadsLayout {
        batch: b,
        seq: s,
        heads: n,
        head_dim: d,
    } = l;
    assert!(src.len() == b * s * n * d && out.len() == src.len());
    let half = d / 2;
    for_rows(out, d, |r, o| {
        // The output row's batch row and position, and the source row in the other layout.
        let (bi, si, from) = if to_heads {
            let (bi, hi, si) = (r / (n * s), r / s % n, r % s);
            (bi, si, (bi * s + si) * n + hi)
        } else {
            let (bi, si, hi) = (r / (s * n), r / n % s, r % n);
            (bi, si, (bi * n + hi) * s + si)
        };
        let x = &src[from * d..(from + 1) * d];
        let Some(rot) = rot else {
            o.copy_from_slice(x);
            return;
        };
        let p = if rot.per_batch { bi * s + si } else { si };
        let (c, sn) = (&rot.cos[p * d..(p + 1) * d], &rot.sin[p * d..(p + 1) * d]);
        let (o1, o2) = o.split_at_mut(half);
        let (x1, x2) = x.split_at(half);
        let (c1, c2) = c.split_at(half);
        let (s1, s2) = sn.split_at(half);
        if to_heads {
            // y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2
            for j in 0..half {
                o1[j] = x1[j] * c1[j] - x2[j] * s1[j];
                o2[j] = x2[j] * c2[j] + x1[j] * s2[j];
            }
        } else {
            // dx1 = g1 c1 + g2 s2, dx2 = g2 c2 - g1 s1
            for j in 0..half {
                o1[j] = x1[j] * c1[j] + x2[j] * s2[j];
                o2[j] = x2[j] * c2[j] - x1[j] * s1[j];
            }
        }
    });
}

/// One row of the attention softmax in place: `y = softmax(y * scale + bias)` (the caller
/// provides the AVX2 frame, see [`simd::run`]).
#[inline(always)]
pub fn softmax_row(y: &mut [f32], bias: &[f32], scale: f32) {
    for (o, &b) in y.iter_mut().zip(bias) {
        *o = *o * scale + b;
    }
    let max = simd::max_f32(y);
    simd::exp_sub_f32(y, max);
    let inv = simd::sum_f32(y).recip();
    simd::scale_f32(y, inv);
}

/// One row of the attention softmax with the keys outside `[lo, hi)` masked: the same
/// arithmetic as [`softmax_row`] with a bias of 0 inside the range and `f32::MIN` outside, so
/// both forms give the same bits (masked entries come out exactly 0).
#[inline(always)]
pub fn softmax_row_range(y: &mut [f32], lo: usize, hi: usize, scale: f32) {
    for (j, o) in y.iter_mut().enumerate() {
        *o = if (lo..hi).contains(&j) {
            *o * scale + 0.0
        } else {
            *o * scale + f32::MIN
        };
    }
    let max = simd::max_f32(y);
    simd::exp_sub_f32(y, max);
    let inv = simd::sum_f32(y).recip();
    simd::scale_f32(y, inv);
}

/// One row of the attention softmax's backward: `dx = scale * y * (g - sum(g y))`.
#[inline(always)]
pub fn softmax_row_bwd(y: &[f32], g: &[f32], scale: f32, dx: &mut [f32]) {
    let s = dot(g, y);
    for ((o, &a), &b) in dx.iter_mut().zip(y).zip(g) {
        *o = scale * a * (b - s);
    }
}

/// The logistic function through `exp` of a non-positive argument only (no overflow).
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    let e = exp_f32(-x.abs());
    let r = (1.0 + e).recip();
    if x >= 0.0 { r } else { e * r }
}

/// Granule of the elementwise kernels' thread split.
const ELEMWISE_ROW: usize = 1024;

/// SwiGLU forward: `m = silu(gate) * up`, elementwise.
pub fn swiglu_fwd(gate: &[f32], up: &[f32], m: &mut [f32]) {
    assert!(gate.len() == m.len() && up.len() == m.len());
    for_parts(m, |off, o| {
        let (gr, ur) = (&gate[off..off + o.len()], &up[off..off + o.len()]);
        for ((o, &a), &u) in o.iter_mut().zip(gr).zip(ur) {
            *o = a * sigmoid(a) * u;
        }
    });
}

/// SwiGLU backward: `dgate = g up sig (1 + gate (1 - sig))`, `dup = g silu(gate)`, with
/// `sig = sigmoid(gate)`. `dgate` arrives holding `g` and is overwritten.
pub fn swiglu_bwd(gate: &[f32], up: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
    assert!(gate.len() == dgate.len() && up.len() == dgate.len() && dup.len() == dgate.len());
    let run = |off: usize, dg: &mut [f32], du: &mut [f32]| {
        simd::run(|| {
            let (gr, ur) = (&gate[off..off + dg.len()], &up[off..off + dg.len()]);
            for (((dg, du), &a), &u) in dg.iter_mut().zip(du.iter_mut()).zip(gr).zip(ur) {
                let sg = sigmoid(a);
                let silu = a * sg;
                let g = *dg;
                *du = g * silu;
                *dg = g * u * sg * (1.0 + a * (1.0 - sg));
            }
        })
    };
    let block = elementwise_block(dgate.len());
    if block >= dgate.len() {
        run(0, dgate, dup);
    } else {
        dgate
            .par_chunks_mut(block)
            .zip(dup.par_chunks_mut(block))
            .enumerate()
            .for_each(|(i, (dg, du))| run(i * block, dg, du));
    }
}

/// Elements per thread of an elementwise kernel over `n` elements: a multiple of
/// [`ELEMWISE_ROW`], at least [`MIN_BLOCK_ELEMS`]; `n` or more means one block on this thread.
fn elementwise_block(n: usize) -> usize {
    let threads = candle_core::utils::get_num_threads().max(1);
    if threads == 1 {
        return n;
    }
    n.div_ceil(threads)
        .max(MIN_BLOCK_ELEMS)
        .next_multiple_of(ELEMWISE_ROW)
}

/// Runs an elementwise kernel `f(offset, part)` over consecutive parts of `out`, one per
/// thread, each inside an AVX2 frame when the CPU has it.
fn for_parts(out: &mut [f32], f: impl Fn(usize, &mut [f32]) + Sync) {
    let block = elementwise_block(out.len());
    let run = |off: usize, chunk: &mut [f32]| simd::run(|| f(off, chunk));
    if block >= out.len() {
        run(0, out);
    } else {
        out.par_chunks_mut(block)
            .enumerate()
            .for_each(|(i, chunk)| run(i * block, chunk));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_heads_backward_is_the_transpose_of_the_forward() {
        // <y, R x> == <R^T y, x> for random x, y with unequal cos/sin halves.
        let l = HeadsLayout {
            batch: 2,
            seq: 3,
            heads: 2,
            head_dim: 4,
        };
        let n = 2 * 3 * 2 * 4;
        let v = |k: usize| ((k * 2654435761) % 1000) as f32 / 500.0 - 1.0;
        let x: Vec<f32> = (0..n).map(v).collect();
        let g: Vec<f32> = (0..n).map(|k| v(k + 7)).collect();
        let cos: Vec<f32> = (0..12).map(|k| v(k + 3)).collect();
        let sin: Vec<f32> = (0..12).map(|k| v(k + 5)).collect();
        let rot = Rotation {
            cos: &cos,
            sin: &sin,
            per_batch: false,
        };
        let (mut y, mut dx) = (vec![0.0; n], vec![0.0; n]);
        rope_heads(&x, l, Some(rot), true, &mut y);
        rope_heads(&g, l, Some(rot), false, &mut dx);
        let lhs: f64 = g.iter().zip(&y).map(|(a, b)| f64::from(a * b)).sum();
        let rhs: f64 = dx.iter().zip(&x).map(|(a, b)| f64::from(a * b)).sum();
        assert!((lhs - rhs).abs() < 1e-5, "{lhs} vs {rhs}");
    }

    #[test]
    fn sigmoid_is_stable_at_both_ends() {
        assert_eq!(sigmoid(-200.0), 0.0);
        assert_eq!(sigmoid(200.0), 1.0);
        assert!((sigmoid(0.0) - 0.5).abs() < 1e-7);
        for x in [-3.0f32, -0.5, 0.25, 4.0] {
            let exact = 1.0 / (1.0 + (-f64::from(x)).exp());
            assert!((f64::from(sigmoid(x)) - exact).abs() < 1e-7, "{x}");
        }
    }
}
