//! A reader for GGUF files (llama.cpp's model format): metadata, tensor directory and raw
//! tensor bytes. Used to convert vocabularies into tokenizer.json and to import weights.
//!
//! The reader trusts nothing in the file: every length and count is checked against the bytes
//! that are left before anything is allocated for it, arrays nest at most [`MAX_NESTING`]
//! deep, tensors have at most [`MAX_DIMS`] dimensions whose product must fit a `u64`, and
//! `general.alignment` must be a power of two.

pub mod tensor;

use std::collections::BTreeMap;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Any unsigned integer type.
    U64(u64),
    /// Any signed integer type.
    I64(i64),
    /// f32 or f64.
    F64(f64),
    /// A boolean.
    Bool(bool),
    /// A UTF-8 string (invalid bytes replaced).
    Str(String),
    /// An array of values.
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::U64(v) => Some(*v),
            Value::I64(v) if *v >= 0 => Some(*v as u64),
            _ => None,
        }
    }

    /// The value as a float, if numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::F64(v) => Some(*v),
            Value::U64(v) => Some(*v as f64),
            Value::I64(v) => Some(*v as f64),
            _ => None,
        }
    }

    /// The value as a string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a boolean, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The value as an array, if it is one.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor's directory entry.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Tensor name (llama.cpp naming, e.g. `blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions in GGUF order (fastest-varying first).
    pub dims: Vec<u64>,
    /// ggml type id (0 f32, 1 f16, 2 q4_0, 3 q4_1, 8 q8_0, 14 q6_k, 30 bf16, ...).
    pub ggml_type: u32,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
}

/// The most dimensions a tensor may have (ggml's own limit is 4).
pub const MAX_DIMS: usize = 8;

impl TensorInfo {
    /// The number of elements (the product of the dimensions), or `None` if it overflows.
    pub fn elements(&self) -> Option<u64> {
        self.dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d))
    }
}

/// Where the data section starts: after the directory, rounded up to `general.alignment`
/// (32 when absent), which must be a power of two.
fn data_start<R: Read>(c: &Cursor<'_, R>, metadata: &BTreeMap<String, Value>) -> Result<u64> {
    let align = match metadata.get("general.alignment") {
        None => 32,
        Some(v) => v.as_u64().filter(|a| a.is_power_of_two()).ok_or_else(|| {
            c.err(format!(
                "general.alignment {v:?} is not a positive power of two"
            ))
        })?,
    };
    c.pos.checked_next_multiple_of(align).ok_or_else(|| {
        c.err(format!(
            "general.alignment {align} overflows the data offset"
        ))
    })
}

/// Where a parsed GGUF file's bytes live: tensor data is read from here lazily, one tensor at
/// a time, so an import never holds the whole file in memory.
#[derive(Debug, Clone)]
pub enum Source {
    /// A file on disk, reopened when tensors are read.
    File(PathBuf),
    /// Bytes already in memory (tests and fuzzing).
    Bytes(Arc<[u8]>),
}

/// A parsed GGUF header: metadata and tensor directory, plus where the tensor data lives.
/// The tensor data itself is not read until asked for (see [`tensor::TensorReader`]).
#[derive(Debug)]
pub struct Gguf {
    /// The file read.
    pub path: PathBuf,
    /// Format version.
    pub version: u32,
    /// Metadata key/values.
    pub metadata: BTreeMap<String, Value>,
    /// Tensor directory, in file order.
    pub tensors: Vec<TensorInfo>,
    source: Source,
    file_len: u64,
    data_start: u64,
}

/// A bounded reader over the header: every read is checked against the bytes left in the
/// file before anything is allocated for it.
struct Cursor<'a, R> {
    r: R,
    pos: u64,
    len: u64,
    path: &'a Path,
}

impl<R: Read> Cursor<'_, R> {
    fn err(&self, msg: impl Into<String>) -> Error {
        Error::Invalid(format!(
            "{}: byte {}: {}",
            self.path.display(),
            self.pos,
            msg.into()
        ))
    }

    /// Bytes left after the cursor.
    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    /// A count read from the file, refused unless `count` items of at least `min_size` bytes
    /// each fit in the bytes that are left: checked before anything is allocated for them.
    fn count(&mut self, count: u64, min_size: usize, what: &str) -> Result<usize> {
        match usize::try_from(count) {
            Ok(n)
                if count
                    .checked_mul(min_size as u64)
                    .is_some_and(|b| b <= self.remaining()) =>
            {
                Ok(n)
            }
            _ => Err(self.err(format!(
                "{what} count {count} is more than the {} bytes left in the file allow",
                self.remaining()
            ))),
        }
    }

    fn fill(&mut self, buf: &mut [u8]) -> Result<()> {
        let n = buf.len() as u64;
        if self.remaining() < n {
            return Err(self.err(format!("unexpected end of file (wanted {n} more bytes)")));
        }
        self.r
            .read_exact(buf)
            .map_err(|e| self.err(format!("read failed: {e}")))?;
        self.pos += n;
        Ok(())
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.fill(&mut b)?;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<Vec<u8>> {
        if self.remaining() < n as u64 {
            return Err(self.err(format!("unexpected end of file (wanted {n} more bytes)")));
        }
        let mut v = vec![0u8; n];
        self.fill(&mut v)?;
        Ok(v)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Result<String> {
        let n = self.u64()?;
        let n = self.count(n, 1, "string byte")?;
        Ok(String::from_utf8_lossy(&self.take(n)?).into_owned())
    }

    /// A metadata value of type `ty`, inside `depth` enclosing arrays.
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U64(u64::from(self.u8()?)),
            1 => Value::I64(i64::from(self.u8()? as i8)),
            2 => Value::U64(u64::from(u16::from_le_bytes(self.array()?))),
            3 => Value::I64(i64::from(i16::from_le_bytes(self.array()?))),
            4 => Value::U64(u64::from(self.u32()?)),
            5 => Value::I64(i64::from(self.u32()? as i32)),
            6 => Value::F64(f64::from(f32::from_bits(self.u32()?))),
            7 => match self.u8()? {
                b @ (0 | 1) => Value::Bool(b == 1),
                b => return Err(self.err(format!("boolean byte {b} is neither 0 nor 1"))),
            },
            8 => Value::Str(self.string()?),
            9 => self.array_value(depth)?,
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_bits(self.u64()?)),
            other => return Err(self.err(format!("unknown metadata value type {other}"))),
        })
    }

    /// An array value (its element type, count and elements), refused past [`MAX_NESTING`].
    fn array_value(&mut self, depth: usize) -> Result<Value> {
        if depth >= MAX_NESTING {
            return Err(self.err(format!(
                "arrays nested more than {MAX_NESTING} deep are not supported"
            )));
        }
        let ety = self.u32()?;
        let n = self.u64()?;
        let n = self.count(n, min_value_size(ety), "array element")?;
        let mut items = Vec::with_capacity(n);
        for _ in 0..n {
            items.push(self.value(ety, depth + 1)?);
        }
        Ok(Value::Array(items))
    }
}

/// How deep metadata arrays may nest (an array of arrays is depth 2). Deeper files are
/// refused, so a hostile file cannot exhaust the stack through the recursive reader.
pub const MAX_NESTING: usize = 8;

/// The fewest bytes a value of type `ty` takes in the file (1 for an unknown type, which the
/// reader refuses when it meets it).
fn min_value_size(ty: u32) -> usize {
    match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => 1,
    }
}

impl<R: Read> Cursor<'_, R> {
    /// One tensor directory entry: name, dimensions, type and offset. The element count
    /// must fit a `u64`.
    fn tensor_info(&mut self) -> Result<TensorInfo> {
        let name = self.string()?;
        let nd = self.u32()?;
        if nd as usize > MAX_DIMS {
            return Err(self.err(format!(
                "tensor `{name}` has {nd} dimensions (at most {MAX_DIMS} are supported)"
            )));
        }
        let dims = (0..nd).map(|_| self.u64()).collect::<Result<Vec<_>>>()?;
        let info = TensorInfo {
            name,
            dims,
            ggml_type: self.u32()?,
            offset: self.u64()?,
        };
        if info.elements().is_none() {
            return Err(self.err(format!(
                "tensor `{}` dimensions {:?} overflow the element count",
                info.name, info.dims
            )));
        }
        Ok(info)
    }

    /// The whole header: magic, version, metadata and tensor directory.
    fn header(&mut self) -> Result<(u32, BTreeMap<String, Value>, Vec<TensorInfo>)> {
        if &self.array::<4>()? != b"GGUF" {
            return Err(self.err("not a GGUF file (bad magic)"));
        }
        let version = self.u32()?;
        if !(2..=3).contains(&version) {
            return Err(self.err(format!("unsupported GGUF version {version}")));
        }
        let n_tensors = self.u64()?;
        let n_tensors = self.count(n_tensors, 24, "tensor")?;
        let n_kv = self.u64()?;
        let n_kv = self.count(n_kv, 13, "metadata key")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = self.string()?;
            let ty = self.u32()?;
            let v = self.value(ty, 0)?;
            metadata.insert(key, v);
        }
        let tensors = (0..n_tensors)
            .map(|_| self.tensor_info())
            .collect::<Result<Vec<_>>>()?;
        Ok((version, metadata, tensors))
    }
}

impl Gguf {
    /// SHA-256 of the whole file (or of the bytes parsed), in hex: what an import records of
    /// its source, so the weights can be traced to the exact file. Streams the file.
    pub fn sha256(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        match &self.source {
            Source::File(p) => crate::input::sha256(p),
            Source::Bytes(b) => Ok(format!("{:x}", Sha256::digest(b))),
        }
    }

    /// Reads and parses a GGUF file's header (versions 2 and 3). Only the metadata and the
    /// tensor directory are read; tensor data stays on disk until a tensor is asked for.
    pub fn read(path: &Path) -> Result<Self> {
        let file = crate::input::open(path)?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let r = BufReader::with_capacity(1 << 16, file);
        Self::parse_from(path, r, len, Source::File(path.to_path_buf()))
    }

    /// Parses GGUF bytes held in memory; `path` is used in error messages.
    pub fn parse(path: &Path, data: Vec<u8>) -> Result<Self> {
        let bytes: Arc<[u8]> = data.into();
        let len = bytes.len() as u64;
        let r = std::io::Cursor::new(Arc::clone(&bytes));
        Self::parse_from(path, r, len, Source::Bytes(bytes))
    }

    fn parse_from(path: &Path, r: impl Read, len: u64, source: Source) -> Result<Self> {
        let mut c = Cursor {
            r,
            pos: 0,
            len,
            path,
        };
        let (version, metadata, tensors) = c.header()?;
        let data_start = data_start(&c, &metadata)?;
        Ok(Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            source,
            file_len: len,
            data_start,
        })
    }

    /// A metadata value, or an error naming the missing key.
    pub fn get(&self, key: &str) -> Result<&Value> {
        self.metadata.get(key).ok_or_else(|| {
            Error::Invalid(format!(
                "{}: metadata key `{key}` is missing",
                self.path.display()
            ))
        })
    }

    /// The byte offset in the file where the data section (the tensors' bytes) starts.
    pub fn data_offset(&self) -> usize {
        self.data_start as usize
    }

    /// The file's length in bytes.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Where the file's bytes live (for reading tensor data).
    pub fn source(&self) -> &Source {
        &self.source
    }
}
