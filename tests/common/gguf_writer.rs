//! A minimal GGUF v3 writer for tests: scalar, string and (nested) array metadata, F32 tensors.

use std::path::Path;

/// A metadata value to write.
pub enum Meta {
    /// GGUF type 4.
    U32(u32),
    /// GGUF type 10.
    U64(u64),
    /// GGUF type 5.
    I32(i32),
    /// GGUF type 6.
    F32(f32),
    /// GGUF type 8.
    Str(String),
    /// GGUF type 7.
    Bool(bool),
    /// GGUF type 9: the element type is the first element's (u32 when empty).
    Array(Vec<Meta>),
}

impl Meta {
    /// The GGUF type id.
    pub fn type_id(&self) -> u32 {
        match self {
            Meta::U32(_) => 4,
            Meta::I32(_) => 5,
            Meta::F32(_) => 6,
            Meta::Bool(_) => 7,
            Meta::Str(_) => 8,
            Meta::Array(_) => 9,
            Meta::U64(_) => 10,
        }
    }

    /// The value's bytes, without its type id.
    pub fn write(&self, b: &mut Vec<u8>) {
        match self {
            Meta::U32(x) => b.extend(x.to_le_bytes()),
            Meta::I32(x) => b.extend(x.to_le_bytes()),
            Meta::U64(x) => b.extend(x.to_le_bytes()),
            Meta::F32(x) => b.extend(x.to_le_bytes()),
            Meta::Bool(x) => b.push(u8::from(*x)),
            Meta::Str(x) => string(b, x),
            Meta::Array(items) => {
                b.extend(items.first().map_or(4, Meta::type_id).to_le_bytes());
                b.extend((items.len() as u64).to_le_bytes());
                for i in items {
                    i.write(b);
                }
            }
        }
    }
}

/// A GGUF string: u64 length, then the bytes.
pub fn string(b: &mut Vec<u8>, x: &str) {
    b.extend((x.len() as u64).to_le_bytes());
    b.extend(x.as_bytes());
}

/// A tensor to write: name, shape (transformers order, slowest first), f32 values.
pub type F32Tensor = (String, Vec<usize>, Vec<f32>);

/// The bytes of a GGUF v3 file with `meta` and F32 `tensors`, aligned to 32 bytes.
pub fn gguf_bytes(meta: &[(&str, Meta)], tensors: &[F32Tensor]) -> Vec<u8> {
    let mut b: Vec<u8> = Vec::new();
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        string(&mut b, k);
        b.extend(v.type_id().to_le_bytes());
        v.write(&mut b);
    }
    let mut offset = 0u64;
    for (name, shape, _) in tensors {
        string(&mut b, name);
        b.extend((shape.len() as u32).to_le_bytes());
        for d in shape.iter().rev() {
            b.extend((*d as u64).to_le_bytes());
        }
        b.extend(0u32.to_le_bytes()); // F32
        b.extend(offset.to_le_bytes());
        offset += (shape.iter().product::<usize>() * 4).div_ceil(32) as u64 * 32;
    }
    while !b.len().is_multiple_of(32) {
        b.push(0);
    }
    for (_, _, vals) in tensors {
        let start = b.len();
        for v in vals {
            b.extend(v.to_le_bytes());
        }
        while !(b.len() - start).is_multiple_of(32) {
            b.push(0);
        }
    }
    b
}

/// Writes [`gguf_bytes`] to `path`.
pub fn write_gguf(path: &Path, meta: &[(&str, Meta)], tensors: &[F32Tensor]) {
    std::fs::write(path, gguf_bytes(meta, tensors)).unwrap();
}

/// The llama.cpp name of a transformers tensor name.
pub fn gguf_name(hf: &str) -> String {
    lorasft::model::gguf_import::gguf_name(hf).unwrap_or_else(|| panic!("{hf}"))
}

/// The metadata of the default fixture (`FixtureSpec::default()`) as a GGUF Llama.
pub fn fixture_meta() -> Vec<(&'static str, Meta)> {
    vec![
        ("general.architecture", Meta::Str("llama".into())),
        ("llama.embedding_length", Meta::U32(64)),
        ("llama.feed_forward_length", Meta::U32(160)),
        ("llama.block_count", Meta::U32(2)),
        ("llama.attention.head_count", Meta::U32(4)),
        ("llama.attention.head_count_kv", Meta::U32(2)),
        ("llama.attention.layer_norm_rms_epsilon", Meta::F32(1e-5)),
        ("llama.rope.freq_base", Meta::F32(10000.0)),
        ("llama.context_length", Meta::U32(256)),
        ("llama.vocab_size", Meta::U32(512)),
        ("tokenizer.ggml.eos_token_id", Meta::U32(2)),
        ("tokenizer.ggml.add_bos_token", Meta::Bool(true)),
    ]
}

/// The default fixture's tensors (seed `seed`) in llama.cpp's names and Q/K layout.
pub fn fixture_tensors(seed: u64) -> Vec<F32Tensor> {
    use lorasft::model::gguf_import::permute_qk;
    let spec = lorasft::model::fixture::FixtureSpec::default();
    spec.tensors(seed)
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            let shape = t.dims().to_vec();
            let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            // llama.cpp's converter permutes Q and K for its interleaved RoPE.
            if n.ends_with("q_proj.weight") {
                v = permute_qk(&v, shape[0], shape[1], spec.heads);
            } else if n.ends_with("k_proj.weight") {
                v = permute_qk(&v, shape[0], shape[1], spec.kv_heads);
            }
            (gguf_name(&n), shape, v)
        })
        .collect()
}
