//! Tensor data of a parsed GGUF file, read lazily through candle's own reader
//! (`candle_core::quantized::gguf_file`) as `QTensor`s in the file's types: F32/F16/BF16,
//! Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 and the K-quants Q2_K–Q6_K.
//!
//! candle's reader trusts more of the file than lorasft may: a dimension product that
//! overflows, or a byte count that wraps, can make it panic or allocate without bound. So the
//! project's bounded parser ([`super::Gguf`]) checks every tensor first (known type, rows a
//! whole number of blocks, sizes that fit a `u64`, data inside the file), candle reads only a
//! file that passed, and each candle call runs under [`crate::sys::catch_silently`] so that a
//! panic the checks missed still comes back as an error naming the file.

use std::io::{BufReader, Read, Seek};

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::{Gguf, Source, TensorInfo};
use crate::error::{Error, Result};

/// The candle type of a ggml type id, for the types lorasft reads (Q8_1 and Q8_K, which
/// exist only as matmul scratch types in ggml, are refused).
pub fn ggml_dtype(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// The type's name as llama.cpp writes it (`Q4_K`, `Q8_0`, `F32`).
pub fn ggml_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// The ggml type id of a candle type (the inverse of [`ggml_dtype`]).
pub fn ggml_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

impl TensorInfo {
    /// The tensor's size in bytes in the file, after checking that its type is one lorasft
    /// reads, that its rows (the first GGUF dimension) are a whole number of blocks, and that
    /// the count fits a `u64` and a `usize`.
    pub fn byte_len(&self) -> std::result::Result<u64, String> {
        let t = ggml_dtype(self.ggml_type).ok_or_else(|| {
            format!(
                "has ggml type {}, which lorasft does not read (F32, F16, BF16, Q4_0, Q4_1, \
                 Q5_0, Q5_1, Q8_0, Q2_K..Q6_K)",
                self.ggml_type
            )
        })?;
        let block = t.block_size() as u64;
        let row = self.dims.first().copied().unwrap_or(1);
        if !row.is_multiple_of(block) {
            return Err(format!(
                "rows of {row} values are not a whole number of {t:?} blocks of {block}"
            ));
        }
        let n = self
            .elements()
            .ok_or_else(|| format!("dimensions {:?} overflow the element count", self.dims))?;
        (n / block)
            .checked_mul(t.type_size() as u64)
            .filter(|b| usize::try_from(*b).is_ok())
            .ok_or_else(|| format!("dimensions {:?} overflow the byte count", self.dims))
    }
}

impl Gguf {
    /// An error about tensor `name` of this file.
    fn tensor_err(&self, name: &str, msg: impl std::fmt::Display) -> Error {
        Error::Invalid(format!("{}: tensor `{name}` {msg}", self.path.display()))
    }

    /// Checks every tensor of the directory: a type lorasft reads, whole blocks per row,
    /// byte counts that fit; returns each tensor's size in bytes.
    fn tensor_lens(&self) -> Result<Vec<u64>> {
        self.tensors
            .iter()
            .map(|t| t.byte_len().map_err(|m| self.tensor_err(&t.name, m)))
            .collect()
    }

    /// Checks that every tensor's data (`lens` bytes at its offset) lies inside the file.
    fn check_bounds(&self, lens: &[u64]) -> Result<()> {
        for (t, &len) in self.tensors.iter().zip(lens) {
            let end = self
                .data_start
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(len));
            if end.is_none_or(|e| e > self.file_len) {
                return Err(self.tensor_err(
                    &t.name,
                    format!(
                        "data ({len} bytes at offset {}) runs past the end of the file ({} bytes)",
                        t.offset, self.file_len
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checks every tensor of the directory before candle reads tensor data: a type lorasft
    /// reads, whole blocks per row, byte counts that fit, and data inside the file.
    pub fn check_tensors(&self) -> Result<()> {
        self.check_bounds(&self.tensor_lens()?)
    }

    /// A reader of this file's tensors. Checks the directory's types and sizes, has candle
    /// read the header (which this parser has already bounded) and confirms candle places the
    /// data where this parser does, then checks every tensor lies inside the file.
    pub fn tensor_reader(&self) -> Result<TensorReader<'_>> {
        let lens = self.tensor_lens()?;
        let mut reader: Box<dyn ReadSeek> = match &self.source {
            Source::File(p) => Box::new(BufReader::new(crate::input::open(p)?)),
            Source::Bytes(b) => Box::new(std::io::Cursor::new(std::sync::Arc::clone(b))),
        };
        let content = crate::sys::catch_silently(|| Content::read(&mut reader))
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(|e| {
                Error::Invalid(format!(
                    "{}: candle cannot read the GGUF header: {e}",
                    self.path.display()
                ))
            })?;
        if content.tensor_data_offset != self.data_start {
            return Err(Error::Invalid(format!(
                "{}: candle places the tensor data at byte {} but the header says {} \
                 (general.alignment of an integer type candle does not read?)",
                self.path.display(),
                content.tensor_data_offset,
                self.data_start
            )));
        }
        self.check_bounds(&lens)?;
        Ok(TensorReader {
            g: self,
            content,
            reader,
        })
    }
}

/// Anything a GGUF file can be read from.
trait ReadSeek: Read + Seek {}
impl<T: Read + Seek> ReadSeek for T {}

/// Reads one tensor at a time from a GGUF file through candle; made by [`Gguf::tensor_reader`].
pub struct TensorReader<'g> {
    g: &'g Gguf,
    content: Content,
    reader: Box<dyn ReadSeek>,
}

impl TensorReader<'_> {
    /// The tensor `t` as a `QTensor` in the file's type (shape in transformers order).
    pub fn qtensor(&mut self, t: &TensorInfo) -> Result<QTensor> {
        let Self {
            g, content, reader, ..
        } = self;
        let q = crate::sys::catch_silently(|| content.tensor(reader, &t.name, &Device::Cpu))
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(|e| g.tensor_err(&t.name, format!("cannot be read: {e}")))?;
        let want: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
        if q.shape().dims() != want.as_slice() || ggml_id(q.dtype()) != t.ggml_type {
            return Err(g.tensor_err(
                &t.name,
                format!(
                    "reads back as {:?} {:?}, not the directory's type {} {:?}",
                    q.dtype(),
                    q.shape().dims(),
                    t.ggml_type,
                    want
                ),
            ));
        }
        Ok(q)
    }

    /// The tensor `t` dequantized to f32 on the CPU (shape in transformers order).
    pub fn f32(&mut self, t: &TensorInfo) -> Result<Tensor> {
        let q = self.qtensor(t)?;
        crate::sys::catch_silently(|| q.dequantize(&Device::Cpu))
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(|e| {
                self.g
                    .tensor_err(&t.name, format!("cannot be dequantized: {e}"))
            })
    }
}
