//! A frozen weight kept quantized in memory: a candle `QTensor` (out, in) in the GGUF file's
//! type, whose rows are dequantized a range at a time into the caller's buffer. On an
//! accelerator the blocks are also copied there and a product dequantizes its one weight
//! there with candle's kernels ([`QuantWeight::dense_for_product`]).
//!
//! Every ggml type stores a row of `in` values as `in / block` whole blocks, so row `r` is
//! the byte range `r * row_bytes .. (r + 1) * row_bytes` and is independent of every other
//! row. Reordering rows is therefore a reordering of those byte ranges, with no
//! requantization: [`QuantWeight::from_rows`] applies the Q/K un-permutation that way.
//! Dequantizing a row range runs the same per-block `to_float` that `QTensor::dequantize`
//! runs over the whole tensor, so the values are bit-identical to a whole-tensor import.

use std::borrow::Cow;
use std::ops::Range;

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0, BlockQ5_1, BlockQ5K, BlockQ6K,
    BlockQ8_0, BlockQ8_1, BlockQ8K,
};
use candle_core::quantized::{GgmlDType, GgmlType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};

use crate::error::{Error, Result};

/// A frozen (out, in) weight held as a `QTensor` in its file's type on the host, and, for a
/// model on an accelerator, as a second copy of the same blocks there.
pub struct QuantWeight {
    q: QTensor,
    out_f: usize,
    in_f: usize,
    row_bytes: usize,
    /// The blocks on the model's accelerator, with the dtype its products run in.
    on_device: Option<(QTensor, DType)>,
}

impl std::fmt::Debug for QuantWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QuantWeight({:?}, {} x {})",
            self.q.dtype(),
            self.out_f,
            self.in_f
        )
    }
}

impl QuantWeight {
    /// Wraps a 2-D CPU `QTensor` (out, in) whose rows are whole blocks.
    pub fn new(q: QTensor) -> Result<Self> {
        Self::from_rows(q, None)
    }

    /// Wraps `q`, with row `r` of the result taken from row `order[r]` of `q` when an order is
    /// given (raw block bytes moved, no requantization). `order` must be a permutation.
    pub fn from_rows(q: QTensor, order: Option<&[usize]>) -> Result<Self> {
        let &[out_f, in_f] = q.shape().dims() else {
            return Err(Error::Invalid(format!(
                "model.keep_quantized: a frozen linear must be 2-D, got {:?}",
                q.shape().dims()
            )));
        };
        let ty = q.dtype();
        if !in_f.is_multiple_of(ty.block_size()) || !q.device().is_cpu() {
            return Err(Error::Invalid(format!(
                "model.keep_quantized: a {ty:?} weight ({out_f}, {in_f}) on {:?} does not hold \
                 whole {}-value blocks per row on the CPU",
                q.device().location(),
                ty.block_size()
            )));
        }
        let row_bytes = in_f / ty.block_size() * ty.type_size();
        let q = match order {
            None => q,
            Some(order) => {
                let mut seen = vec![false; out_f];
                let ok = order.len() == out_f
                    && order
                        .iter()
                        .all(|&r| r < out_f && !std::mem::replace(&mut seen[r], true));
                if !ok {
                    return Err(Error::Invalid(format!(
                        "row order for a ({out_f}, {in_f}) weight is not a permutation"
                    )));
                }
                let src = q.data()?;
                let mut bytes = Vec::with_capacity(src.len());
                for &r in order {
                    bytes.extend_from_slice(&src[r * row_bytes..(r + 1) * row_bytes]);
                }
                drop(src);
                let storage = QStorage::from_data(Cow::Owned(bytes), &Device::Cpu, ty)?;
                QTensor::new(storage, (out_f, in_f))?
            }
        };
        let w = Self {
            q,
            out_f,
            in_f,
            row_bytes,
            on_device: None,
        };
        if w.q.data()?.len() != out_f * row_bytes {
            return Err(Error::Invalid(format!(
                "a {ty:?} weight ({out_f}, {in_f}) holds the wrong number of bytes"
            )));
        }
        Ok(w)
    }

    /// The weight with a copy of its blocks on `dev`, whose products dequantize there into
    /// `dtype` (one linear at a time, inside the product); on the CPU, the weight unchanged.
    /// The host blocks stay for fingerprints, merges and export.
    pub fn with_device_copy(mut self, dev: &Device, dtype: DType) -> Result<Self> {
        if dev.is_cpu() {
            return Ok(self);
        }
        let storage = QStorage::from_data(Cow::Borrowed(&self.q.data()?), dev, self.dtype())?;
        self.on_device = Some((QTensor::new(storage, (self.out_f, self.in_f))?, dtype));
        Ok(self)
    }

    /// The whole weight dense where its products run: dequantized on the accelerator in the
    /// model's dtype when there is a device copy, else on the host in f32. Callers hold it
    /// for one product only, so at most one linear of the base is ever dense.
    pub fn dense_for_product(&self) -> Result<Tensor> {
        match &self.on_device {
            Some((q, dtype)) => Ok(q.dequantize(&q.device())?.to_dtype(*dtype)?),
            None => self.dequantize(),
        }
    }

    /// (out, in).
    pub fn dims(&self) -> (usize, usize) {
        (self.out_f, self.in_f)
    }

    /// The ggml type the rows are stored in.
    pub fn dtype(&self) -> GgmlDType {
        self.q.dtype()
    }

    /// The quantized tensor itself.
    pub fn qtensor(&self) -> &QTensor {
        &self.q
    }

    /// Bytes held by the quantized rows.
    pub fn size_in_bytes(&self) -> usize {
        self.out_f * self.row_bytes
    }

    /// The raw block bytes, borrowed from the host storage: what fingerprints hash.
    pub fn raw_bytes(&self) -> Cow<'_, [u8]> {
        self.q.data().expect("CPU storage, checked at construction")
    }

    /// The whole weight as f32 (merge and export only; training never calls this).
    pub fn dequantize(&self) -> Result<Tensor> {
        Ok(self.q.dequantize(&Device::Cpu)?)
    }

    /// Rows `rows` as f32 into `dst` (rows.len() × in, row-major).
    pub fn dequantize_rows(&self, rows: Range<usize>, dst: &mut [f32]) {
        assert!(rows.end <= self.out_f && dst.len() == rows.len() * self.in_f);
        let data = self.q.data().expect("CPU storage, checked at construction");
        let bytes = &data[rows.start * self.row_bytes..rows.end * self.row_bytes];
        to_f32(self.dtype(), bytes, dst);
    }

    /// Columns `cols` of every row as f32 into `dst` (out × cols.len(), row-major); the blocks
    /// that hold those columns are dequantized through `tmp`.
    pub fn dequantize_cols(&self, cols: Range<usize>, dst: &mut [f32], tmp: &mut Vec<f32>) {
        let w = cols.len();
        assert!(cols.end <= self.in_f && dst.len() == self.out_f * w);
        let bs = self.dtype().block_size();
        let (b0, b1) = (cols.start / bs, cols.end.div_ceil(bs));
        let ts = self.dtype().type_size();
        tmp.resize((b1 - b0) * bs, 0.0);
        let skip = cols.start - b0 * bs;
        let data = self.q.data().expect("CPU storage, checked at construction");
        for (r, out) in dst.chunks_exact_mut(w.max(1)).enumerate().take(self.out_f) {
            let row = &data[r * self.row_bytes..(r + 1) * self.row_bytes];
            to_f32(self.dtype(), &row[b0 * ts..b1 * ts], tmp);
            out.copy_from_slice(&tmp[skip..skip + w]);
        }
    }
}

/// Blocks of type `T` in `bytes` to f32 in `dst`.
fn blocks_to_f32<T: GgmlType>(bytes: &[u8], dst: &mut [f32]) {
    let size = std::mem::size_of::<T>();
    assert!(bytes.len().is_multiple_of(size) && dst.len() == bytes.len() / size * T::BLCK_SIZE);
    if bytes.as_ptr().align_offset(std::mem::align_of::<T>()) == 0 {
        // SAFETY: the pointer is aligned for T, the length is a whole number of T, and every
        // ggml block type is plain data (integers, f16, f32) valid for any bit pattern.
        let blocks =
            unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / size) };
        T::to_float(blocks, dst);
    } else {
        // Never expected (storage rows start at multiples of the block size), but stay sound.
        let blocks: Vec<T> = bytes
            .chunks_exact(size)
            // SAFETY: as above; read_unaligned copies the bytes out.
            .map(|c| unsafe { std::ptr::read_unaligned(c.as_ptr().cast::<T>()) })
            .collect();
        T::to_float(&blocks, dst);
    }
}

/// Raw blocks of ggml type `ty` to f32.
fn to_f32(ty: GgmlDType, bytes: &[u8], dst: &mut [f32]) {
    match ty {
        GgmlDType::F32 => blocks_to_f32::<f32>(bytes, dst),
        GgmlDType::F16 => blocks_to_f32::<f16>(bytes, dst),
        GgmlDType::BF16 => blocks_to_f32::<bf16>(bytes, dst),
        GgmlDType::Q4_0 => blocks_to_f32::<BlockQ4_0>(bytes, dst),
        GgmlDType::Q4_1 => blocks_to_f32::<BlockQ4_1>(bytes, dst),
        GgmlDType::Q5_0 => blocks_to_f32::<BlockQ5_0>(bytes, dst),
        GgmlDType::Q5_1 => blocks_to_f32::<BlockQ5_1>(bytes, dst),
        GgmlDType::Q8_0 => blocks_to_f32::<BlockQ8_0>(bytes, dst),
        GgmlDType::Q8_1 => blocks_to_f32::<BlockQ8_1>(bytes, dst),
        GgmlDType::Q2K => blocks_to_f32::<BlockQ2K>(bytes, dst),
        GgmlDType::Q3K => blocks_to_f32::<BlockQ3K>(bytes, dst),
        GgmlDType::Q4K => blocks_to_f32::<BlockQ4K>(bytes, dst),
        GgmlDType::Q5K => blocks_to_f32::<BlockQ5K>(bytes, dst),
        GgmlDType::Q6K => blocks_to_f32::<BlockQ6K>(bytes, dst),
        GgmlDType::Q8K => blocks_to_f32::<BlockQ8K>(bytes, dst),
    }
}

thread_local! {
    /// Each worker's dequantized tile and block buffer, kept between calls so a step
    /// allocates them once.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// `dst (m, out) = x (m, in) @ w^T` when `transpose_w`, else `dst (m, in) = x (m, out) @ w`,
/// with the column slices of [`gemm_rows_f32`](super::matmul::gemm_rows_f32): each slice of
/// `w` (rows of `w` for `x w^T`, columns for `x w`) is dequantized into the worker's reused
/// scratch and multiplied by the same `gemm` call the f32 path makes for that slice, so the
/// result is bit-identical to the f32 weight's. A slice holds at most
/// [`SLICE_VALUES`](super::matmul::SLICE_VALUES) values unless 256 columns need more, so a
/// worker never holds more than one slice of the weight dense.
pub fn gemm_rows_quant(dst: &mut [f32], x: &[f32], w: &QuantWeight, m: usize, transpose_w: bool) {
    use super::matmul::{SendPtr, for_col_slices, gemm_cols};
    let (out_f, in_f) = w.dims();
    let (n, k) = if transpose_w {
        (out_f, in_f)
    } else {
        (in_f, out_f)
    };
    assert!(dst.len() == m * n && x.len() == m * k);
    if m == 0 || n == 0 {
        return;
    }
    let out = SendPtr(dst.as_mut_ptr());
    for_col_slices(n, k, |j0, j1| {
        let width = j1 - j0;
        SCRATCH.with_borrow_mut(|(tile, tmp)| {
            tile.resize(width * k, 0.0);
            let rhs = if transpose_w {
                w.dequantize_rows(j0..j1, tile);
                (tile.as_ptr(), k as isize, 1)
            } else {
                w.dequantize_cols(j0..j1, tile, tmp);
                (tile.as_ptr(), 1, width as isize)
            };
            // SAFETY: `dst` holds m*n elements and this call writes only columns j0..j1,
            // disjoint across slices; `x` holds m*k elements (asserted) and `tile` the
            // (k, width) slice that `rhs`'s strides describe.
            unsafe { gemm_cols(out, x, rhs, (m, n, k), j0..j1) }
        });
    });
}
