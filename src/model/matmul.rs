//! Products with frozen weights on the CPU in f32: `gemm` (candle's own kernels) called on the
//! tensors' storage, with the rows split across threads. candle's matmul leaves gemm to decide
//! its parallelism, and gemm keeps a product of a few hundred rows on one core (measured: the
//! same 60 GFLOP/s with 1 or 2 threads at 256 × 576 × 1536); splitting rows runs every core.
//! Other devices and dtypes go through candle's matmul.

use candle_core::{CpuStorage, DType, Device, Layout, Storage, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// `x (m, k) @ w^T` for `w` (n, k) when `transpose_w`, else `x @ w` for `w` (k, n).
pub fn matmul_frozen(x: &Tensor, w: &Tensor, transpose_w: bool) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    let (wr, wc) = w.dims2()?;
    let n = if transpose_w { wr } else { wc };
    let wk = if transpose_w { wc } else { wr };
    if wk != k {
        return Err(Error::Invalid(format!(
            "matmul: ({m}, {k}) against a weight {:?} (transposed: {transpose_w})",
            w.dims()
        )));
    }
    let host = matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32;
    if !host || w.dtype() != DType::F32 {
        let wt = if transpose_w { w.t()? } else { w.clone() };
        return Ok(x.matmul(&wt)?);
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let mut out = vec![0f32; m * n];
    {
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        gemm_rows_f32(
            &mut out,
            cpu_f32(&xs, xl)?,
            cpu_f32(&ws, wl)?,
            m,
            n,
            k,
            transpose_w,
        );
    }
    Ok(Tensor::from_vec(out, (m, n), &Device::Cpu)?)
}

/// The f32 slice of a contiguous CPU tensor's storage.
pub fn cpu_f32<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((start, end))) => Ok(&v[start..end]),
        _ => Err(Error::Invalid(
            "expected a contiguous f32 CPU tensor".into(),
        )),
    }
}

/// `dst (m, n) = lhs (m, k) @ rhs`, all row-major, `rhs` being (n, k) read transposed when
/// `rhs_is_nk`, else (k, n); rows are split into one block per thread (candle's thread count).
pub fn gemm_rows_f32(
    dst: &mut [f32],
    lhs: &[f32],
    rhs: &[f32],
    m: usize,
    n: usize,
    k: usize,
    rhs_is_nk: bool,
) {
    assert!(dst.len() == m * n && lhs.len() == m * k && rhs.len() == n * k);
    let threads = candle_core::utils::get_num_threads().max(1);
    // Blocks of at least 16 rows: below that a split costs more than it gains.
    let block = m.div_ceil(threads).max(16);
    if threads == 1 || m <= block || n == 0 {
        gemm_f32(dst, lhs, rhs, m, n, k, rhs_is_nk);
        return;
    }
    dst.par_chunks_mut(block * n)
        .zip(lhs.par_chunks(block * k))
        .for_each(|(d, l)| gemm_f32(d, l, rhs, l.len() / k.max(1), n, k, rhs_is_nk));
}

/// One single-threaded `gemm` call on row-major slices (see [`gemm_rows_f32`]).
fn gemm_f32(
    dst: &mut [f32],
    lhs: &[f32],
    rhs: &[f32],
    m: usize,
    n: usize,
    k: usize,
    rhs_is_nk: bool,
) {
    assert!(dst.len() == m * n && lhs.len() == m * k && rhs.len() == n * k);
    if m == 0 || n == 0 {
        return;
    }
    let (rhs_cs, rhs_rs) = if rhs_is_nk {
        (k as isize, 1)
    } else {
        (1, n as isize)
    };
    // SAFETY: the slices hold exactly m*n, m*k and k*n elements (asserted above), the strides
    // describe row-major matrices inside them, and dst does not alias the inputs (a &mut).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            rhs_cs,
            rhs_rs,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}
