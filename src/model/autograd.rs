//! Gradients attached by hand: [`attach_backward`] returns a value computed without autograd
//! (any kernel, detached input) as a tensor whose backward is a closure, and
//! [`attach_backward2`] does the same for a value of two inputs. The model's ops, the fused
//! CPU kernels and activation recomputation build on them, so they sit below all three.
//!
//! candle's custom ops must return fresh storage, so the value is copied once into the result.
//! The op holds the value only until that copy (it is taken out of a `Mutex`), so the graph
//! keeps the result alone, not the result and its source.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Storage, Tensor};

type BackwardFn = dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor> + Send + Sync;
type BackwardFn2 =
    dyn Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Result<(Tensor, Tensor)> + Send + Sync;

/// A custom op whose forward returns a precomputed value and whose backward is `bwd`.
struct Attached<B: ?Sized> {
    name: &'static str,
    /// The value, until the forward copies it out.
    value: Mutex<Option<Tensor>>,
    bwd: Box<B>,
}

impl<B: ?Sized> Attached<B> {
    /// The value, taken out of the op: the forward runs once.
    fn take(&self) -> Result<Tensor> {
        self.value
            .lock()
            .map_err(|_| candle_core::Error::Msg("attach_backward: poisoned value".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("attach_backward: forward ran twice".into()))
    }

    /// The value's contiguous copy on the host.
    fn cpu_value(&self) -> Result<(CpuStorage, Shape)> {
        let value = self.take()?;
        let (storage, layout) = value.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((copy_contiguous(s, layout)?, layout.shape().clone())),
            _ => candle_core::bail!("attach_backward: value not on the host"),
        }
    }

    /// The value's copy on its CUDA device.
    #[cfg(feature = "cuda")]
    fn cuda_value(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendDevice;
        let value = self.take()?;
        let (storage, layout) = value.storage_and_layout();
        let Storage::Cuda(s) = &*storage else {
            candle_core::bail!("attach_backward: value not on a CUDA device")
        };
        // SAFETY: every element of the fresh buffer is written by the copy just below.
        let mut out = unsafe { s.device().alloc_uninit(layout.shape(), s.dtype())? };
        s.copy_strided_src(&mut out, 0, layout)?;
        Ok((out, layout.shape().clone()))
    }
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

impl CustomOp1 for Attached<BackwardFn> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu_value()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_value()
    }

    fn bwd(&self, input: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some((self.bwd)(input, res, grad)?))
    }
}

impl CustomOp2 for Attached<BackwardFn2> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu_value()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_value()
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (da, db) = (self.bwd)(a, b, res, grad)?;
        Ok((Some(da), Some(db)))
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
    input.apply_op1(Attached::<BackwardFn> {
        name,
        value: Mutex::new(Some(value.contiguous()?)),
        bwd: Box::new(bwd),
    })
}

/// [`attach_backward`] for a value of two inputs: `bwd(a, b, value, grad_value)` returns the
/// gradients with respect to `a` and `b`. When neither needs one, `value` is returned as is.
pub fn attach_backward2(
    name: &'static str,
    a: &Tensor,
    b: &Tensor,
    value: Tensor,
    bwd: impl Fn(&Tensor, &Tensor, &Tensor, &Tensor) -> Result<(Tensor, Tensor)> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !a.track_op() && !b.track_op() {
        return Ok(value);
    }
    a.apply_op2(
        b,
        Attached::<BackwardFn2> {
            name,
            value: Mutex::new(Some(value.contiguous()?)),
            bwd: Box::new(bwd),
        },
    )
}
