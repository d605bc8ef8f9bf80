//! Fused grouped-query attention for the CPU f32 training path: one candle node from rotated
//! queries, keys and values to the attention output in the projection layout, with a written
//! backward.
//!
//! The composed form costs eight graph nodes per layer, two of them over the (b, heads, s, t)
//! scores, and each node's gradient is a zero-filled buffer plus an add. Here each (batch row,
//! head) runs its products with `gemm` on strided views and the softmax in place; the output
//! is written straight into (b, s, heads * d), so no transpose copy follows. The
//! probabilities are not kept: the backward recomputes each block's scores and softmax with
//! the same calls, so it sees the forward's probabilities bit for bit while the graph holds
//! none of the (b, heads, s, t) of them (32 MiB per layer at TinyLlama's 32 heads, batch 1
//! × 512). Tested against the composed form in `tests/ops.rs`.
//!
//! Which keys a query sees comes either as per-query key ranges ([`KeyRanges`]: causal over
//! right-padded or packed rows, no dense mask anywhere) or as a dense additive bias (left
//! padding, generation). Each block of query rows runs its products over the keys from the
//! first any of its rows may see to the last: the causal upper triangle, and with packed rows
//! every other example's keys, are skipped.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use crate::model::cpu::kernels::{softmax_row, softmax_row_bwd, softmax_row_range};
use crate::model::cpu::matmul::{SendPtr, View, gemm_view};
use crate::model::cpu::ops::{host, read, slice};
use crate::model::cpu::simd;
use crate::model::visibility::KeyRanges;

/// Which keys each query may see.
#[derive(Debug, Clone)]
pub enum Mask {
    /// A dense additive bias (b or 1, 1, s, t): 0 where allowed, a huge negative elsewhere.
    Bias(Tensor),
    /// Per-query key ranges for every batch row (t = s).
    Ranges(Arc<KeyRanges>),
}

/// Attention over q (b, heads, s, d), k and v (b, kv_heads, t, d) under a [`Mask`]:
/// `softmax(q k^T * scale + bias) v`, as (b, s, heads * d).
pub struct Attention {
    /// Which keys each query sees.
    pub mask: Mask,
    /// 1 / sqrt(d).
    pub scale: f32,
}

impl Attention {
    /// The op for one layer's call.
    pub fn new(mask: Mask, scale: f32) -> Self {
        Self { mask, scale }
    }
}

/// Sizes of one call.
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    heads: usize,
    kv_heads: usize,
    s: usize,
    t: usize,
    d: usize,
}

impl Dims {
    fn of(q: &[usize], k: &[usize], v: &[usize]) -> Result<Self> {
        let (&[b, heads, s, d], &[kb, kv_heads, t, kd]) = (q, k) else {
            bail!("attention: expected rank-4 q and k, got {q:?} and {k:?}")
        };
        if kb != b || kd != d || v != k || kv_heads == 0 || heads % kv_heads != 0 {
            bail!("attention: q {q:?}, k {k:?} and v {v:?} do not fit");
        }
        Ok(Self {
            b,
            heads,
            kv_heads,
            s,
            t,
            d,
        })
    }

    /// Query heads per kv head.
    fn rep(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// Offset of the (s or t, d) block of head `h` (query-head numbering) of batch row `bi`,
    /// in q (`kv = false`) or in k / v (`kv = true`).
    fn block(&self, bi: usize, h: usize, kv: bool) -> usize {
        if kv {
            (bi * self.kv_heads + h / self.rep()) * self.t * self.d
        } else {
            (bi * self.heads + h) * self.s * self.d
        }
    }

    /// Mask blocks (s, t): one per batch row, or one shared bias.
    fn mask_blocks(&self, mask: &Mask) -> Result<usize> {
        match mask {
            Mask::Bias(bias) => match bias.dims() {
                &[bb, 1, bs, bt] if bs == self.s && bt == self.t && (bb == self.b || bb == 1) => {
                    Ok(bb)
                }
                other => bail!("attention: bias {other:?} does not fit {self:?}"),
            },
            Mask::Ranges(r) if r.rows() == self.b && r.len() == self.s && self.t == self.s => {
                Ok(self.b)
            }
            Mask::Ranges(r) => bail!(
                "attention: key ranges ({}, {}) do not fit {self:?}",
                r.rows(),
                r.len()
            ),
        }
    }

    /// Query row blocks: (first row, end row) pairs of at most [`ROW_BLOCK`] rows.
    fn row_blocks(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.s)
            .step_by(ROW_BLOCK)
            .map(|i0| (i0, (i0 + ROW_BLOCK).min(self.s)))
    }
}

/// Query rows per block: each block's products stop at the last key any of its rows may see,
/// which skips the causal upper triangle (3/8 of the attention FLOPs at 256 positions).
const ROW_BLOCK: usize = 64;

/// A bias entry at or below this is a mask: its probability underflows to exactly 0.
const MASKED: f32 = -1e30;

/// Where one (batch row, head) task reads: its query, key and value blocks, its mask block
/// and batch row, and the dense bias when the mask is one.
#[derive(Clone, Copy)]
struct Task<'a> {
    qh: *const f32,
    kh: *const f32,
    vh: *const f32,
    bi: usize,
    bb: usize,
    bias: Option<&'a [f32]>,
}

impl<'a> Task<'a> {
    /// Task `task`: batch row `task / heads`, head `task % heads`.
    ///
    /// # Safety
    /// `q`, `k` and `v` must hold the blocks [`Dims::block`] addresses (shapes checked in
    /// `Dims::of`).
    unsafe fn new(
        n: &Dims,
        (q, k, v): (&[f32], &[f32], &[f32]),
        task: usize,
        blocks: usize,
        bias: Option<&'a [f32]>,
    ) -> Self {
        let (bi, h) = (task / n.heads, task % n.heads);
        // SAFETY: as the caller guarantees.
        unsafe {
            Task {
                qh: q.as_ptr().add(n.block(bi, h, false)),
                kh: k.as_ptr().add(n.block(bi, h, true)),
                vh: v.as_ptr().add(n.block(bi, h, true)),
                bi,
                bb: if blocks > 1 { bi } else { 0 },
                bias,
            }
        }
    }
}

impl Attention {
    /// Fills `p` with the probabilities of query rows `i0..i1` over keys `k0..k1` for one
    /// task: row `i` at `p[(i - i0) * t + k0..(i - i0) * t + k1]`. The raw scores come from
    /// `gemm`, then each row's masked softmax. The forward and the backward both call this,
    /// so the backward's probabilities are the forward's bit for bit.
    ///
    /// # Safety
    /// `p` must hold `(i1 - i0) * t` writable values; the task's pointers must address the
    /// blocks `Dims::block` gives, with `i1 <= s` and `k0 <= k1 <= t`.
    unsafe fn block_probs(
        &self,
        n: &Dims,
        task: Task<'_>,
        p: *mut f32,
        (i0, i1): (usize, usize),
        (k0, k1): (usize, usize),
    ) {
        let (rows_b, kw, st) = (i1 - i0, k1 - k0, n.s * n.t);
        // SAFETY: as the caller guarantees; every view stays inside the blocks.
        unsafe {
            // raw scores (rows, kw) = q_h[i0..i1] k_h[k0..k1]^T
            gemm_view(
                (rows_b, kw, n.d),
                (p.add(k0), n.t as isize, 1),
                rows(task.qh.add(i0 * n.d), n.d),
                cols(task.kh.add(k0 * n.d), n.d),
                false,
            );
            simd::run(|| {
                for i in i0..i1 {
                    let row = std::slice::from_raw_parts_mut(p.add((i - i0) * n.t + k0), kw);
                    match (&self.mask, task.bias) {
                        (Mask::Ranges(r), _) => {
                            let (lo, hi) = r.range(task.bi, i);
                            softmax_row_range(row, lo - k0, hi - k0, self.scale);
                        }
                        (Mask::Bias(_), Some(bias)) => {
                            let b0 = task.bb * st + i * n.t;
                            softmax_row(row, &bias[b0 + k0..b0 + k1], self.scale);
                        }
                        (Mask::Bias(_), None) => unreachable!("bias is read"),
                    }
                }
            });
        }
    }

    /// The backward of one (batch row, head) task: each row block's probabilities recomputed
    /// by [`Attention::block_probs`], then dq for the task's rows and the task's own dk and
    /// dv parts. `limits` starts at the task's mask block.
    ///
    /// # Safety
    /// Task `task` alone writes dq's (s, d) block of its (batch row, head) and its own (t, d)
    /// blocks of dk_h and dv_h; `g` is (b, s, heads * d); every read stays inside q, k, v and
    /// g (rows < s, first <= keys < end <= t).
    unsafe fn head_bwd(
        &self,
        n: &Dims,
        t: Task<'_>,
        g: &[f32],
        (dq, dkh, dvh): (SendPtr, SendPtr, SendPtr),
        task: usize,
        limits: &[(usize, usize)],
    ) {
        let (hd, td, h) = (n.heads * n.d, n.t * n.d, task % n.heads);
        let rows_max = ROW_BLOCK.min(n.s);
        let mut probs = vec![0f32; rows_max * n.t];
        let mut dp = vec![0f32; rows_max * n.t];
        let mut draw = vec![0f32; rows_max * n.t];
        // SAFETY: as the caller guarantees.
        unsafe {
            let g0 = g.as_ptr().add(t.bi * n.s * hd + h * n.d);
            for (blk, (i0, i1)) in n.row_blocks().enumerate() {
                let (k0, k1) = limits[blk];
                let (rows_b, kw) = (i1 - i0, k1 - k0);
                self.block_probs(n, t, probs.as_mut_ptr(), (i0, i1), (k0, k1));
                let p = probs.as_ptr();
                // dO rows: (rows, d) at column h*d of g's (s, heads*d)
                let go = View {
                    ptr: g0.add(i0 * hd),
                    rs: hd as isize,
                    cs: 1,
                };
                // dP (rows, kw) = dO v_h[k0..k1]^T, stride kw
                gemm_view(
                    (rows_b, kw, n.d),
                    (dp.as_mut_ptr(), kw as isize, 1),
                    go,
                    cols(t.vh.add(k0 * n.d), n.d),
                    false,
                );
                simd::run(|| {
                    for r in 0..rows_b {
                        let pr = std::slice::from_raw_parts(p.add(r * n.t + k0), kw);
                        let at = r * kw..(r + 1) * kw;
                        softmax_row_bwd(pr, &dp[at.clone()], self.scale, &mut draw[at]);
                    }
                });
                let dr = rows(draw.as_ptr(), kw);
                // dq rows (rows, d) = d raw k_h[k0..k1]
                gemm_view(
                    (rows_b, n.d, kw),
                    (
                        dq.0.add(n.block(t.bi, h, false) + i0 * n.d),
                        n.d as isize,
                        1,
                    ),
                    dr,
                    rows(t.kh.add(k0 * n.d), n.d),
                    false,
                );
                // dk_h[k0..k1] += d raw^T q_h[i0..i1]
                gemm_view(
                    (kw, n.d, rows_b),
                    (dkh.0.add(task * td + k0 * n.d), n.d as isize, 1),
                    cols(draw.as_ptr(), kw),
                    rows(t.qh.add(i0 * n.d), n.d),
                    true,
                );
                // dv_h[k0..k1] += P[i0..i1, k0..k1]^T dO
                gemm_view(
                    (kw, n.d, rows_b),
                    (dvh.0.add(task * td + k0 * n.d), n.d as isize, 1),
                    cols(p.add(k0), n.t),
                    go,
                    true,
                );
            }
        }
    }
}

/// Keys a block of query rows needs: one past the last unmasked key of any row, or all keys
/// when a row is masked throughout (its softmax is uniform over every key, as transformers
/// computes it). Entries past the limit are masked in every row, so their probability is 0.
fn key_limit(bias_rows: &[f32], t: usize) -> usize {
    let mut limit = 0;
    for row in bias_rows.chunks(t) {
        match row.iter().rposition(|&b| b > MASKED) {
            Some(j) => limit = limit.max(j + 1),
            None => return t,
        }
    }
    limit
}

/// Key spans `[first, end)` per (mask block, row block): every key any row of the block may
/// see lies inside, and every entry outside has probability exactly 0.
fn key_spans(mask: &Mask, n: &Dims, blocks: usize) -> Result<Vec<(usize, usize)>> {
    let st = n.s * n.t;
    match mask {
        Mask::Bias(bias) => read(bias, |bias| {
            (0..blocks)
                .flat_map(|bb| {
                    n.row_blocks().map(move |(i0, i1)| {
                        (
                            0,
                            key_limit(&bias[bb * st + i0 * n.t..bb * st + i1 * n.t], n.t),
                        )
                    })
                })
                .collect()
        }),
        Mask::Ranges(r) => Ok((0..blocks)
            .flat_map(|bi| {
                n.row_blocks().map(move |(i0, i1)| {
                    (i0..i1)
                        .map(|i| r.range(bi, i))
                        .fold((usize::MAX, 0), |(first, end), (lo, hi)| {
                            (first.min(lo), end.max(hi))
                        })
                })
            })
            .collect()),
    }
}

/// Row-major view of a contiguous (rows, cols) block.
fn rows(ptr: *const f32, cols: usize) -> View {
    View {
        ptr,
        rs: cols as isize,
        cs: 1,
    }
}

/// The transpose of [`rows`].
fn cols(ptr: *const f32, cols: usize) -> View {
    View {
        ptr,
        rs: 1,
        cs: cols as isize,
    }
}

/// Runs `f(task)` for every (batch row, head) pair, across candle's threads.
fn for_heads(n: usize, f: impl Fn(usize) + Sync + Send) {
    if candle_core::utils::get_num_threads() <= 1 {
        (0..n).for_each(f);
    } else {
        (0..n).into_par_iter().for_each(f);
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = Dims::of(lq.dims(), lk.dims(), lv.dims())?;
        let blocks = n.mask_blocks(&self.mask)?;
        let (q, k, v) = (slice(sq, lq)?, slice(sk, lk)?, slice(sv, lv)?);
        let hd = n.heads * n.d;
        let per_block = n.s.div_ceil(ROW_BLOCK);
        let mut out = vec![0f32; n.b * n.s * hd];
        let out_ptr = SendPtr(out.as_mut_ptr());
        let limits = key_spans(&self.mask, &n, blocks)?;
        with_bias(&self.mask, |bias| {
            for_heads(n.b * n.heads, |task| {
                let (bi, h) = (task / n.heads, task % n.heads);
                let dst = out_ptr;
                let mut probs = vec![0f32; ROW_BLOCK.min(n.s) * n.t];
                // SAFETY: task `task` alone writes the columns h*d..(h+1)*d of batch row bi's
                // (s, heads*d) output block; q, k and v hold the blocks `Dims::block`
                // addresses (shapes checked in `Dims::of`), `probs` holds a row block of t
                // keys, and every view below stays inside them (rows < s, first <= keys <
                // end <= t).
                unsafe {
                    let t = Task::new(&n, (q, k, v), task, blocks, bias);
                    for (blk, (i0, i1)) in n.row_blocks().enumerate() {
                        let (k0, k1) = limits[t.bb * per_block + blk];
                        let (rows_b, kw) = (i1 - i0, k1 - k0);
                        self.block_probs(&n, t, probs.as_mut_ptr(), (i0, i1), (k0, k1));
                        // out rows (rows, d) at column h*d of (s, heads*d) = probs v_h[k0..k1]
                        gemm_view(
                            (rows_b, n.d, kw),
                            (dst.0.add((bi * n.s + i0) * hd + h * n.d), hd as isize, 1),
                            rows(probs.as_ptr().add(k0), n.t),
                            rows(t.vh.add(k0 * n.d), n.d),
                            false,
                        );
                    }
                }
            });
        })?;
        Ok((CpuStorage::F32(out), Shape::from((n.b, n.s, hd))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = Dims::of(q.dims(), k.dims(), v.dims())?;
        let blocks = n.mask_blocks(&self.mask)?;
        // The key spans are a function of the mask and the sizes: derived again, not kept.
        let limits = key_spans(&self.mask, &n, blocks)?;
        let td = n.t * n.d;
        let per_block = n.s.div_ceil(ROW_BLOCK);
        let tasks = n.b * n.heads;
        let mut dq = vec![0f32; q.elem_count()];
        // Per-head key and value gradients, summed per kv head below in a fixed order.
        let mut dk_h = vec![0f32; tasks * td];
        let mut dv_h = vec![0f32; tasks * td];
        let ptrs = (
            SendPtr(dq.as_mut_ptr()),
            SendPtr(dk_h.as_mut_ptr()),
            SendPtr(dv_h.as_mut_ptr()),
        );
        read(q, |q| {
            read(k, |k| {
                read(v, |v| {
                    read(g, |g| {
                        with_bias(&self.mask, |bias| {
                            for_heads(tasks, |task| {
                                // SAFETY: q, k and v are the shapes `Dims::of` checked; task
                                // `task` alone writes its parts of dq, dk_h and dv_h.
                                unsafe {
                                    let t = Task::new(&n, (q, k, v), task, blocks, bias);
                                    let limits = &limits[t.bb * per_block..];
                                    self.head_bwd(&n, t, g, ptrs, task, limits)
                                };
                            })
                        })
                    })
                })
            })
        })?????;
        // Sum the query heads of each kv head, in head order (deterministic).
        let reduce = |parts: &[f32]| {
            let mut out = vec![0f32; k.elem_count()];
            for (task, part) in parts.chunks(td).enumerate() {
                let (bi, h) = (task / n.heads, task % n.heads);
                let at = n.block(bi, h, true);
                for (o, &x) in out[at..at + td].iter_mut().zip(part) {
                    *o += x;
                }
            }
            out
        };
        Ok((
            Some(host(dq, q.shape())?),
            Some(host(reduce(&dk_h), k.shape())?),
            Some(host(reduce(&dv_h), v.shape())?),
        ))
    }
}

/// Runs `f` with the mask's dense bias on the host, or with `None` for key ranges.
fn with_bias<R>(mask: &Mask, f: impl FnOnce(Option<&[f32]>) -> R) -> Result<R> {
    match mask {
        Mask::Bias(bias) => read(bias, |b| f(Some(b))),
        Mask::Ranges(_) => Ok(f(None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_limit_stops_after_the_last_key_any_row_sees_and_keeps_all_for_a_masked_row() {
        let m = f32::MIN;
        // Causal rows 0..2 of 5 keys: the block needs keys 0..3.
        let causal = [0., m, m, m, m, 0., 0., m, m, m, 0., 0., 0., m, m];
        assert_eq!(key_limit(&causal, 5), 3);
        // A row with no visible key (left padding) needs every key: its softmax is uniform.
        let padded = [m, m, m, m, m, 0., 0., m, m, m];
        assert_eq!(key_limit(&padded, 5), 5);
        // An unmasked bias (generation) needs every key.
        assert_eq!(key_limit(&[0.0; 10], 5), 5);
    }
}
