//! A reader for GGUF files (llama.cpp's model format): metadata, tensor directory and raw
//! tensor bytes. Used to convert vocabularies into tokenizer.json and to import weights.
//!
//! The reader trusts nothing in the file: every length and count is checked against the bytes
//! that are left before anything is allocated for it, arrays nest at most [`MAX_NESTING`]
//! deep, tensors have at most [`MAX_DIMS`] dimensions whose product must fit a `u64`, and
//! `general.alignment` must be a power of two.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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
fn data_start(c: &Cursor<'_>, metadata: &BTreeMap<String, Value>) -> Result<usize> {
    let align = match metadata.get("general.alignment") {
        None => 32,
        Some(v) => v
            .as_u64()
            .and_then(|a| usize::try_from(a).ok())
            .filter(|a| a.is_power_of_two())
            .ok_or_else(|| {
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

/// A parsed GGUF file held in memory.
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
    data: Vec<u8>,
    data_start: usize,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, msg: impl Into<String>) -> Error {
        Error::Invalid(format!(
            "{}: byte {}: {}",
            self.path.display(),
            self.pos,
            msg.into()
        ))
    }

    /// Bytes left after the cursor.
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// A count read from the file, refused unless `count` items of at least `min_size` bytes
    /// each fit in the bytes that are left: checked before anything is allocated for them.
    fn count(&mut self, count: u64, min_size: usize, what: &str) -> Result<usize> {
        match usize::try_from(count) {
            Ok(n)
                if n.checked_mul(min_size)
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

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.remaining() < n {
            return Err(self.err(format!("unexpected end of file (wanted {n} more bytes)")));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn string(&mut self) -> Result<String> {
        let n = self.u64()?;
        let n = self.count(n, 1, "string byte")?;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }

    /// A metadata value of type `ty`, inside `depth` enclosing arrays.
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U64(u64::from(self.take(1)?[0])),
            1 => Value::I64(i64::from(self.take(1)?[0] as i8)),
            2 => Value::U64(u64::from(u16::from_le_bytes(
                self.take(2)?.try_into().expect("2"),
            ))),
            3 => Value::I64(i64::from(i16::from_le_bytes(
                self.take(2)?.try_into().expect("2"),
            ))),
            4 => Value::U64(u64::from(self.u32()?)),
            5 => Value::I64(i64::from(self.u32()? as i32)),
            6 => Value::F64(f64::from(f32::from_bits(self.u32()?))),
            7 => Value::Bool(self.take(1)?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => self.array(depth)?,
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_bits(self.u64()?)),
            other => return Err(self.err(format!("unknown metadata value type {other}"))),
        })
    }

    /// An array value (its element type, count and elements), refused past [`MAX_NESTING`].
    fn array(&mut self, depth: usize) -> Result<Value> {
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

impl Cursor<'_> {
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
}

impl Gguf {
    /// Reads and parses a GGUF file (versions 2 and 3).
    pub fn read(path: &Path) -> Result<Self> {
        let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::parse(path, data)
    }

    /// Parses GGUF bytes; `path` is used in error messages.
    pub fn parse(path: &Path, data: Vec<u8>) -> Result<Self> {
        let mut c = Cursor {
            buf: &data,
            pos: 0,
            path,
        };
        if c.take(4)? != b"GGUF" {
            return Err(c.err("not a GGUF file (bad magic)"));
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(c.err(format!("unsupported GGUF version {version}")));
        }
        let n_tensors = c.u64()?;
        let n_tensors = c.count(n_tensors, 24, "tensor")?;
        let n_kv = c.u64()?;
        let n_kv = c.count(n_kv, 13, "metadata key")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string()?;
            let ty = c.u32()?;
            let v = c.value(ty, 0)?;
            metadata.insert(key, v);
        }
        let tensors = (0..n_tensors)
            .map(|_| c.tensor_info())
            .collect::<Result<Vec<_>>>()?;
        let data_start = data_start(&c, &metadata)?;
        Ok(Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            data,
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
        self.data_start
    }

    /// The raw bytes of a tensor (`len` bytes from its offset).
    pub fn tensor_bytes(&self, info: &TensorInfo, len: usize) -> Result<&[u8]> {
        let start = usize::try_from(info.offset)
            .ok()
            .and_then(|o| o.checked_add(self.data_start));
        let range = start.and_then(|s| Some(s..s.checked_add(len)?));
        range.and_then(|r| self.data.get(r)).ok_or_else(|| {
            Error::Invalid(format!(
                "{}: tensor `{}` data runs past the end of the file",
                self.path.display(),
                info.name
            ))
        })
    }
}
