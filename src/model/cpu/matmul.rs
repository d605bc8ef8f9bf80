//! Products with frozen weights on the CPU in f32: `gemm` (candle's own kernels) called on the
//! tensors' storage, with the output columns split across threads. candle's matmul leaves gemm
//! to decide its parallelism, and gemm keeps a product of a few hundred rows on one core
//! (measured: the same 60 GFLOP/s with 1 or 2 threads at 256 × 576 × 1536); splitting the
//! columns runs every core, and each thread packs only its share of the weight.
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
/// `rhs_is_nk`, else (k, n). With several threads (candle's count) the columns are split into
/// one block per thread, so each thread packs only its share of `rhs` (the weight, the larger
/// operand); a split by rows would pack all of it once per thread.
pub fn gemm_rows_f32(
    dst: &mut [f32],
    lhs: &[f32],
    rhs: &[f32],
    m: usize,
    n: usize,
    k: usize,
    rhs_is_nk: bool,
) {
    assert!(dst.len() == m * n);
    // SAFETY: `dst` is m*n writable elements, borrowed for the call.
    unsafe { gemm_rows_into(SendPtr(dst.as_mut_ptr()), lhs, rhs, (m, n, k), rhs_is_nk) }
}

/// [`gemm_rows_f32`] into a new vector that is never zero-filled first. `gemm` called with
/// `read_dst` off writes every output element without reading it (its microkernels and its
/// matrix-vector paths alike), so the fill was wasted: a third of the memset samples of a
/// one-thread SmolLM2 step (perf) were these outputs' fills. Alternated against the filled
/// form: 0.95× the step with 1 thread, level with 2.
pub fn gemm_rows_f32_new(
    lhs: &[f32],
    rhs: &[f32],
    m: usize,
    n: usize,
    k: usize,
    rhs_is_nk: bool,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(m * n);
    // SAFETY: the capacity holds m*n elements and the product writes every one of them before
    // the length is set; nothing reads them before.
    unsafe {
        gemm_rows_into(SendPtr(out.as_mut_ptr()), lhs, rhs, (m, n, k), rhs_is_nk);
        out.set_len(m * n);
    }
    out
}

/// The body of [`gemm_rows_f32`] on a raw output.
///
/// # Safety
/// `dst` must point to m*n writable f32 slots (initialised or not) that no one else touches
/// during the call.
unsafe fn gemm_rows_into(
    dst: SendPtr,
    lhs: &[f32],
    rhs: &[f32],
    (m, n, k): (usize, usize, usize),
    rhs_is_nk: bool,
) {
    assert!(lhs.len() == m * k && rhs.len() == n * k);
    if m == 0 || n == 0 {
        return;
    }
    let run = |j0: usize, j1: usize| {
        // rhs (k, n) view of the block: transposed (n, k) rows j0.., or columns j0.. of (k, n).
        let (rhs_ptr, rhs_cs, rhs_rs) = if rhs_is_nk {
            (rhs[j0 * k..].as_ptr(), k as isize, 1)
        } else {
            (rhs[j0..].as_ptr(), 1, n as isize)
        };
        // SAFETY: `dst` holds m*n slots and each call writes only columns j0..j1 of it,
        // disjoint across calls; `lhs` and `rhs` are read-only and sized as asserted above.
        unsafe { gemm_cols(dst, lhs, (rhs_ptr, rhs_cs, rhs_rs), (m, n, k), j0..j1) }
    };
    for_col_slices(n, k, run);
}

/// The most values of the right-hand side one `gemm` call covers (4M, 16 MiB of f32), unless
/// 256 columns need more. It bounds what a quantized product dequantizes per worker (at
/// TinyLlama's vocabulary, `g @ lm_head` would otherwise hold 125 MiB per worker at 2 threads). The dense
/// product is sliced the same way because `gemm`'s rounding depends on the width of the call:
/// only the same slices give the same bits.
pub const SLICE_VALUES: usize = 1 << 22;

/// The column slices of an (m, n) product with inner dimension `k` as [`gemm_rows_f32`]
/// splits it: one block per thread (candle's count), of at least 32 columns, in multiples of
/// 16 (the kernel's width); each block cut into slices of at most
/// `max(256, SLICE_VALUES / k)` columns (multiples of 16). Runs `run(j0, j1)` for each slice:
/// the blocks in parallel when there are several, a block's slices in order.
pub(crate) fn for_col_slices(n: usize, k: usize, run: impl Fn(usize, usize) + Sync) {
    let threads = candle_core::utils::get_num_threads().max(1);
    let block = n.div_ceil(threads).max(32).next_multiple_of(16);
    let slice = (SLICE_VALUES / k.max(1)).max(256) / 16 * 16;
    let sliced = |j0: usize, j1: usize| {
        for c0 in (j0..j1).step_by(slice) {
            run(c0, (c0 + slice).min(j1));
        }
    };
    if threads == 1 || block >= n {
        sliced(0, n);
    } else {
        (0..n.div_ceil(block))
            .into_par_iter()
            .for_each(|b| sliced(b * block, (b * block + block).min(n)));
    }
}

/// A raw output pointer shared by threads that write disjoint parts of it.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: every user has its threads write disjoint parts (documented where it is made).
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

/// Columns `cols` of `dst (m, n) = lhs @ rhs` (see [`gemm_rows_f32`]) in one single-threaded
/// `gemm` call; `rhs` = (pointer to the block's first element, column stride, row stride) of
/// the (k, cols.len()) block.
///
/// # Safety
/// `dst` must point to m*n writable elements that no one else touches in columns `cols`,
/// `lhs` must hold m*k elements, `rhs` must address a live (k, cols.len()) matrix with its
/// strides, and `cols` must lie within 0..n.
pub(crate) unsafe fn gemm_cols(
    dst: SendPtr,
    lhs: &[f32],
    (rhs_ptr, rhs_cs, rhs_rs): (*const f32, isize, isize),
    (m, n, k): (usize, usize, usize),
    cols: std::ops::Range<usize>,
) {
    let (j0, w) = (cols.start, cols.len());
    // SAFETY: per the contract; the strides describe row-major matrices inside the slices.
    unsafe {
        gemm::gemm(
            m,
            w,
            k,
            dst.0.add(j0),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs_ptr,
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

/// A strided view of an f32 matrix for [`gemm_view`]: element (i, j) at `ptr + i*rs + j*cs`.
#[derive(Clone, Copy)]
pub(crate) struct View {
    /// First element.
    pub ptr: *const f32,
    /// Row stride, elements.
    pub rs: isize,
    /// Column stride, elements.
    pub cs: isize,
}

/// `dst (m, n) = lhs (m, k) @ rhs (k, n)` (or `+=` when `accumulate`) on strided views, one
/// thread: the per-head products of the fused attention.
///
/// # Safety
/// Every element the views address for these sizes must lie in live allocations, `dst`'s
/// elements must be writable and touched by no one else during the call, and `dst` must not
/// overlap `lhs` or `rhs`.
pub(crate) unsafe fn gemm_view(
    (m, n, k): (usize, usize, usize),
    dst: (*mut f32, isize, isize),
    lhs: View,
    rhs: View,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: per the contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.0,
            dst.2,
            dst.1,
            accumulate,
            lhs.ptr,
            lhs.cs,
            lhs.rs,
            rhs.ptr,
            rhs.cs,
            rhs.rs,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}
