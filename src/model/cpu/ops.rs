//! The fused CPU f32 kernels of [`super::kernels`] as candle ops with their backward.
//!
//! Each op computes its forward straight into its output (no detached copy to re-attach) and
//! its backward with one kernel pass whose result carries no graph. A candle graph node costs a
//! zero-filled gradient buffer and an add on top of its own pass, so one node instead of 5 to
//! 12 per op is most of the saving. `model::ops` picks these for contiguous f32 tensors on the CPU
//! and the composed forms everywhere else.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Result, Shape, Storage, Tensor, bail,
};

use crate::model::cpu::kernels::{
    self, HeadsLayout, Rotation, rms_norm_bwd, rms_norm_fwd, swiglu_bwd, swiglu_fwd,
};
use crate::model::cpu::matmul::gemm_rows_f32_new;
use crate::model::cpu::quant::gemm_rows_quant;
use crate::model::frozen::Frozen;

/// Whether `t` can take the fused host path: an f32 tensor on the CPU.
pub fn on_host_f32(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32
}

/// The f32 elements of a contiguous CPU storage region.
pub(crate) fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        (CpuStorage::F32(_), None) => bail!("fused op: input must be contiguous"),
        (other, _) => bail!("fused op: expected f32, got {:?}", other.dtype()),
    }
}

/// Runs `f` on the f32 elements of a CPU tensor, made contiguous first if it is not.
pub(crate) fn read<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => Ok(f(slice(c, l)?)),
        _ => bail!("fused op: expected a CPU tensor"),
    }
}

/// A new CPU tensor with no graph, for gradients.
pub(crate) fn host(v: Vec<f32>, shape: &Shape) -> Result<Tensor> {
    Tensor::from_vec(v, shape.clone(), &Device::Cpu)
}

/// `x @ w^T` with a frozen `w` (out, in), dense f32 or kept quantized; the backward is
/// dX = g w only. A quantized weight is dequantized one column slice at a time
/// ([`gemm_rows_quant`]), bit-identical to the dense product on its f32 values.
pub struct FrozenLinear {
    /// The frozen weight, (out, in).
    pub w: Frozen,
}

impl FrozenLinear {
    /// `x (rows, in) @ w^T` into a new (rows, out) vector when `transpose`, else
    /// `x (rows, out) @ w` into a new (rows, in) one.
    fn product(&self, x: &[f32], rows: usize, transpose: bool) -> Result<Vec<f32>> {
        let (out_f, in_f) = self.dims()?;
        let (n, k) = if transpose {
            (out_f, in_f)
        } else {
            (in_f, out_f)
        };
        match &self.w {
            Frozen::Dense(w) => read(w, |w| gemm_rows_f32_new(x, w, rows, n, k, transpose)),
            Frozen::Quant(q) => {
                let mut dst = vec![0f32; rows * n];
                gemm_rows_quant(&mut dst, x, q, rows, transpose);
                Ok(dst)
            }
        }
    }

    /// (out, in).
    fn dims(&self) -> Result<(usize, usize)> {
        self.w.dims().map_err(candle_core::Error::wrap)
    }
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (out_f, in_f) = self.dims()?;
        let x = slice(s, l)?;
        if x.len() % in_f != 0 {
            bail!(
                "frozen-linear: input {:?} against a weight ({out_f}, {in_f})",
                l.dims()
            );
        }
        let rows = x.len() / in_f;
        let y = self.product(x, rows, true)?;
        let mut dims = l.shape().dims().to_vec();
        *dims.last_mut().expect("rank >= 1") = out_f;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (out_f, _) = self.dims()?;
        let rows = g.elem_count() / out_f;
        let dx = read(g, |g| self.product(g, rows, false))??;
        Ok(Some(host(dx, x.shape())?))
    }
}

/// RMSNorm with a frozen weight over the last dim.
pub struct RmsNorm {
    /// The frozen weight, (h,).
    pub w: Tensor,
    /// Added to the mean square.
    pub eps: f32,
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let mut y = vec![0f32; x.len()];
        read(&self.w, |w| rms_norm_fwd(x, w, self.eps, &mut y))?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let mut dx = vec![0f32; x.elem_count()];
        read(x, |x| {
            read(&self.w, |w| {
                read(g, |g| rms_norm_bwd(x, w, self.eps, g, &mut dx))
            })
        })???;
        Ok(Some(host(dx, x.shape())?))
    }
}

/// Projection output (b, s, n*d) to attention's head-major (b, n, s, d), with the rotary
/// embedding applied on the way when `rotation` is given (queries and keys; values take the
/// transpose alone).
pub struct RopeHeads {
    /// Heads in the projection output.
    pub heads: usize,
    /// cos and sin tables, (s, d) or (b, s, d) per batch row.
    pub rotation: Option<(Tensor, Tensor)>,
}

impl RopeHeads {
    fn layout(&self, dims: &[usize]) -> Result<HeadsLayout> {
        let &[b, s, nd] = dims else {
            bail!("rope-heads: expected (b, s, n*d), got {dims:?}")
        };
        if self.heads == 0 || nd % self.heads != 0 {
            bail!(
                "rope-heads: {nd} features do not split into {} heads",
                self.heads
            );
        }
        Ok(HeadsLayout {
            batch: b,
            seq: s,
            heads: self.heads,
            head_dim: nd / self.heads,
        })
    }

    /// Runs the kernel in the given direction over `src`.
    fn apply(&self, src: &[f32], l: HeadsLayout, to_heads: bool) -> Result<Vec<f32>> {
        let mut out = vec![0f32; src.len()];
        match &self.rotation {
            None => kernels::rope_heads(src, l, None, to_heads, &mut out),
            Some((cos, sin)) => {
                let table = l.seq * l.head_dim;
                let per_batch = cos.elem_count() == l.batch * table && l.batch > 1;
                if !per_batch && cos.elem_count() != table || sin.elem_count() != cos.elem_count() {
                    bail!("rope-heads: cos/sin {:?} do not match {l:?}", cos.shape());
                }
                read(cos, |c| {
                    read(sin, |s| {
                        let rot = Rotation {
                            cos: c,
                            sin: s,
                            per_batch,
                        };
                        kernels::rope_heads(src, l, Some(rot), to_heads, &mut out)
                    })
                })??;
            }
        }
        Ok(out)
    }
}

impl CustomOp1 for RopeHeads {
    fn name(&self) -> &'static str {
        "rope-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let hl = self.layout(l.dims())?;
        let y = self.apply(slice(s, l)?, hl, true)?;
        let shape = Shape::from((hl.batch, hl.heads, hl.seq, hl.head_dim));
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let hl = self.layout(x.dims())?;
        let dx = read(g, |g| self.apply(g, hl, false))??;
        Ok(Some(host(dx, x.shape())?))
    }
}

/// `silu(gate) * up`, elementwise, with gradients to both.
pub struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            bail!(
                "swiglu: gate {:?} and up {:?} differ",
                l1.shape(),
                l2.shape()
            );
        }
        let (gate, up) = (slice(s1, l1)?, slice(s2, l2)?);
        let mut m = vec![0f32; gate.len()];
        swiglu_fwd(gate, up, &mut m);
        Ok((CpuStorage::F32(m), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _m: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let mut dgate = read(g, <[f32]>::to_vec)?;
        let mut dup = vec![0f32; dgate.len()];
        read(gate, |gt| {
            read(up, |u| swiglu_bwd(gt, u, &mut dgate, &mut dup))
        })??;
        Ok((
            Some(host(dgate, gate.shape())?),
            Some(host(dup, up.shape())?),
        ))
    }
}
