//! Gradients attached by hand: [`attach_backward`] returns a value computed without autograd
//! (any kernel, detached input) as a tensor whose backward is a closure. The model's ops and
//! the fused CPU kernels both build on it, so it sits below both.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

type BackwardFn = dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync;

/// A custom op whose forward returns a precomputed value and whose backward is a closure.
struct AttachBackward {
    name: &'static str,
    /// `bwd(input, output, grad_output) -> grad_input`.
    bwd: Box<BackwardFn>,
}

/// Copies the contiguous region of a CPU storage described by `layout`.
fn copy_contiguous(s: &CpuStorage, layout: &Layout) -> Result<CpuStorage> {
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("attach_backward: value must be contiguous".into())
    })?;
    Ok(match s {
        CpuStorage::F32(v) => CpuStorage::F32(v[start..end].to_vec()),
        CpuStorage::F64(v) => CpuStorage::F64(v[start..end].to_vec()),
        CpuStorage::BF16(v) => CpuStorage::BF16(v[start..end].to_vec()),
        CpuStorage::F16(v) => CpuStorage::F16(v[start..end].to_vec()),
        other => candle_core::bail!("attach_backward: unsupported dtype {:?}", other.dtype()),
    })
}

impl CustomOp2 for AttachBackward {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        value: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((copy_contiguous(value, vl)?, vl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        value: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendDevice;
        let dev = value.device();
        // SAFETY: every element of the fresh buffer is written by the copy just below.
        let mut out = unsafe { dev.alloc_uninit(vl.shape(), value.dtype())? };
        value.copy_strided_src(&mut out, 0, vl)?;
        Ok((out, vl.shape().clone()))
    }

    fn bwd(
        &self,
        input: &Tensor,
        _value: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some((self.bwd)(input, res, grad)?), None))
    }
}

/// Returns `value` (computed from `input.detach()`) as a tensor whose gradient with respect to
/// `input` is `bwd(input, value, grad_value)`. When `input` needs no gradient, `value` is
/// returned as is, at no cost.
pub fn attach_backward(
    name: &'static str,
    input: &Tensor,
    value: Tensor,
    bwd: impl Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !input.track_op() {
        return Ok(value);
    }
    let value = value.contiguous()?;
    input.apply_op2(
        &value,
        AttachBackward {
            name,
            bwd: Box::new(bwd),
        },
    )
}
