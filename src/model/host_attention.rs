//! Fused grouped-query attention for the CPU f32 training path: one candle node from rotated
//! queries, keys and values to the attention output in the projection layout, with a written
//! backward.
//!
//! The composed form costs eight graph nodes per layer, two of them over the (b, heads, s, t)
//! scores, and each node's gradient is a zero-filled buffer plus an add. Here each (batch row,
//! head) runs its products with `gemm` on strided views and the softmax in place; the output
//! is written straight into (b, s, heads * d), so no transpose copy follows. The probabilities
//! are kept for the backward. Tested against the composed form in `tests/ops.rs`.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use crate::model::host_kernels::{ScoresLayout, attn_softmax_bwd, attn_softmax_in_place};
use crate::model::matmul::{SendPtr, View, gemm_view};

/// Attention over q (b, heads, s, d), k and v (b, kv_heads, t, d) with a constant bias
/// (b or 1, 1, s, t): `softmax(q k^T * scale + bias) v`, as (b, s, heads * d).
pub struct Attention {
    /// The causal + padding bias.
    pub bias: Tensor,
    /// 1 / sqrt(d).
    pub scale: f32,
    /// The probabilities (b, heads, s, t) of the forward, for the backward.
    probs: OnceLock<Vec<f32>>,
}

impl Attention {
    /// The op for one layer's call.
    pub fn new(bias: Tensor, scale: f32) -> Self {
        Self {
            bias,
            scale,
            probs: OnceLock::new(),
        }
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

    fn scores(&self, bias: &Tensor) -> Result<ScoresLayout> {
        let per_batch = match bias.dims() {
            &[bb, 1, bs, bt] if bs == self.s && bt == self.t && (bb == self.b || bb == 1) => bb > 1,
            other => bail!("attention: bias {other:?} does not fit {self:?}"),
        };
        Ok(ScoresLayout {
            heads: 1,
            queries: self.s,
            keys: self.t,
            bias_per_batch: per_batch,
        })
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

/// The f32 slice of a contiguous CPU storage.
fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => bail!("attention: expected contiguous f32 inputs"),
    }
}

/// Runs `f` on a CPU f32 tensor's elements (made contiguous first).
fn read<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    match &*s {
        candle_core::Storage::Cpu(c) => Ok(f(slice(c, l)?)),
        _ => bail!("attention: expected a CPU tensor"),
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
        let sl = n.scores(&self.bias)?;
        let (q, k, v) = (slice(sq, lq)?, slice(sk, lk)?, slice(sv, lv)?);
        let (st, hd) = (n.s * n.t, n.heads * n.d);
        let mut probs = vec![0f32; n.b * n.heads * st];
        let mut out = vec![0f32; n.b * n.s * hd];
        let out_ptr = SendPtr(out.as_mut_ptr());
        let probs_ptr = SendPtr(probs.as_mut_ptr());
        read(&self.bias, |bias| {
            for_heads(n.b * n.heads, |task| {
                let (bi, h) = (task / n.heads, task % n.heads);
                let (out_ptr, probs_ptr) = (out_ptr, probs_ptr);
                // SAFETY: task `task` alone writes probs[task*st..][..st] and the columns
                // h*d..(h+1)*d of batch row bi's (s, heads*d) output block; q, k and v hold
                // the blocks `Dims::block` addresses (shapes checked in `Dims::of`).
                unsafe {
                    let p = probs_ptr.0.add(task * st);
                    let qh = q.as_ptr().add(n.block(bi, h, false));
                    let kh = k.as_ptr().add(n.block(bi, h, true));
                    let vh = v.as_ptr().add(n.block(bi, h, true));
                    // raw scores (s, t) = q_h k_h^T
                    gemm_view(
                        (n.s, n.t, n.d),
                        (p, n.t as isize, 1),
                        rows(qh, n.d),
                        cols(kh, n.d),
                        false,
                    );
                    let pr = std::slice::from_raw_parts_mut(p, st);
                    let bias_b = if sl.bias_per_batch {
                        &bias[bi * st..(bi + 1) * st]
                    } else {
                        &bias[..st]
                    };
                    let one = ScoresLayout {
                        bias_per_batch: false,
                        ..sl
                    };
                    attn_softmax_in_place(pr, bias_b, one, self.scale);
                    // out (s, d) at column h*d of (s, heads*d) = probs v_h
                    gemm_view(
                        (n.s, n.d, n.t),
                        (out_ptr.0.add(bi * n.s * hd + h * n.d), hd as isize, 1),
                        rows(p, n.t),
                        rows(vh, n.d),
                        false,
                    );
                }
            })
        })?;
        // A second forward of the same op value would be a bug in the caller; keep the first.
        let _ = self.probs.set(probs);
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
        let Some(probs) = self.probs.get() else {
            bail!("attention: backward before forward")
        };
        let (st, hd, td) = (n.s * n.t, n.heads * n.d, n.t * n.d);
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
                        for_heads(tasks, |task| {
                            let (bi, h) = (task / n.heads, task % n.heads);
                            let (dq, dkh, dvh) = ptrs;
                            // SAFETY: task `task` alone writes dq's (s, d) block of (bi, h) and
                            // its own (t, d) blocks of dk_h and dv_h; the reads stay inside q,
                            // k, v, g and probs (shapes checked in `Dims::of`).
                            unsafe {
                                let p = probs.as_ptr().add(task * st);
                                let qh = q.as_ptr().add(n.block(bi, h, false));
                                let kh = k.as_ptr().add(n.block(bi, h, true));
                                let vh = v.as_ptr().add(n.block(bi, h, true));
                                // dO_h: (s, d) at column h*d of g's (s, heads*d) block
                                let go = View {
                                    ptr: g.as_ptr().add(bi * n.s * hd + h * n.d),
                                    rs: hd as isize,
                                    cs: 1,
                                };
                                // dP (s, t) = dO_h v_h^T, then d raw in place
                                let mut dp = vec![0f32; st];
                                gemm_view(
                                    (n.s, n.t, n.d),
                                    (dp.as_mut_ptr(), n.t as isize, 1),
                                    go,
                                    cols(vh, n.d),
                                    false,
                                );
                                let pr = std::slice::from_raw_parts(p, st);
                                let mut draw = vec![0f32; st];
                                attn_softmax_bwd(pr, &dp, n.t, self.scale, &mut draw);
                                // dq_h (s, d) = d raw k_h
                                gemm_view(
                                    (n.s, n.d, n.t),
                                    (dq.0.add(n.block(bi, h, false)), n.d as isize, 1),
                                    rows(draw.as_ptr(), n.t),
                                    rows(kh, n.d),
                                    false,
                                );
                                // dk_h (t, d) = d raw^T q_h
                                gemm_view(
                                    (n.t, n.d, n.s),
                                    (dkh.0.add(task * td), n.d as isize, 1),
                                    cols(draw.as_ptr(), n.t),
                                    rows(qh, n.d),
                                    false,
                                );
                                // dv_h (t, d) = P^T dO_h
                                gemm_view(
                                    (n.t, n.d, n.s),
                                    (dvh.0.add(task * td), n.d as isize, 1),
                                    cols(p, n.t),
                                    go,
                                    false,
                                );
                            }
                        })
                    })
                })
            })
        })????;
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
        let host = |v: Vec<f32>, t: &Tensor| {
            Tensor::from_vec(v, t.shape().clone(), &candle_core::Device::Cpu)
        };
        Ok((
            Some(host(dq, q)?),
            Some(host(reduce(&dk_h), k)?),
            Some(host(reduce(&dv_h), v)?),
        ))
    }
}
