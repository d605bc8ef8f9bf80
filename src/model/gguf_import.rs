//! Import of Llama weights from GGUF (llama.cpp's format) into a Hugging Face-layout directory:
//! dequantisation (F32, F16, BF16, Q4_0, Q4_1, Q8_0), llama.cpp → transformers tensor names, and
//! the un-permutation of Q and K, which llama.cpp stores interleaved for its RoPE kernel
//! (without it the model babbles).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::gguf::{Gguf, TensorInfo, Value};
use crate::model::config::{LlamaConfig, ModelShape, TokenIds};

/// Bytes per block and values per block of a ggml type, when supported.
fn block_layout(ggml_type: u32) -> Option<(usize, usize)> {
    Some(match ggml_type {
        0 => (4, 1),   // F32
        1 => (2, 1),   // F16
        30 => (2, 1),  // BF16
        2 => (18, 32), // Q4_0: f16 d, 16 bytes of nibbles
        3 => (20, 32), // Q4_1: f16 d, f16 m, 16 bytes of nibbles
        8 => (34, 32), // Q8_0: f16 d, 32 i8
        _ => return None,
    })
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantises `n` values of a ggml type to f32.
pub fn dequantize(ggml_type: u32, bytes: &[u8], n: usize) -> Result<Vec<f32>> {
    let (bsize, bvals) = block_layout(ggml_type)
        .ok_or_else(|| Error::Invalid(format!("ggml type {ggml_type} is not supported")))?;
    let needed = (n / bvals).checked_mul(bsize);
    if !n.is_multiple_of(bvals) || needed.is_none_or(|b| bytes.len() < b) {
        return Err(Error::Invalid(format!(
            "{n} values of ggml type {ggml_type} do not fit {} bytes",
            bytes.len()
        )));
    }
    let mut out = Vec::with_capacity(n);
    match ggml_type {
        0 => out.extend(
            bytes[..4 * n]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        1 => out.extend(
            bytes[..2 * n]
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        30 => out.extend(
            bytes[..2 * n]
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        2 | 3 => {
            let with_min = ggml_type == 3;
            for blk in bytes[..n / 32 * bsize].chunks_exact(bsize) {
                let d = f16_at(blk, 0);
                let (m, qs) = if with_min {
                    (f16_at(blk, 2), &blk[4..20])
                } else {
                    (0.0, &blk[2..18])
                };
                let off = if with_min { 0.0 } else { -8.0 };
                let mut vals = [0f32; 32];
                for (j, q) in qs.iter().enumerate() {
                    vals[j] = (f32::from(q & 0x0f) + off) * d + m;
                    vals[j + 16] = (f32::from(q >> 4) + off) * d + m;
                }
                out.extend_from_slice(&vals);
            }
        }
        8 => {
            for blk in bytes[..n / 32 * bsize].chunks_exact(bsize) {
                let d = f16_at(blk, 0);
                out.extend(blk[2..34].iter().map(|&q| f32::from(q as i8) * d));
            }
        }
        _ => unreachable!("checked by block_layout"),
    }
    Ok(out)
}

/// Undoes llama.cpp's Q/K permutation of an (out, in) row-major matrix:
/// `reshape(heads, out/heads/2, 2, in).transpose(1, 2).reshape(out, in)`.
pub fn unpermute_qk(w: &[f32], out_f: usize, in_f: usize, heads: usize) -> Vec<f32> {
    let half = out_f / heads / 2;
    let mut res = vec![0f32; w.len()];
    for h in 0..heads {
        for i in 0..half {
            for two in 0..2 {
                // source row (h, i, two) in the GGUF layout -> destination row (h, two, i)
                let src = ((h * half + i) * 2 + two) * in_f;
                let dst = ((h * 2 + two) * half + i) * in_f;
                res[dst..dst + in_f].copy_from_slice(&w[src..src + in_f]);
            }
        }
    }
    res
}

/// The inverse of [`unpermute_qk`]: what llama.cpp's converter does to transformers' weights.
pub fn permute_qk(w: &[f32], out_f: usize, in_f: usize, heads: usize) -> Vec<f32> {
    let half = out_f / heads / 2;
    let mut res = vec![0f32; w.len()];
    for h in 0..heads {
        for i in 0..half {
            for two in 0..2 {
                let gguf_row = ((h * half + i) * 2 + two) * in_f;
                let hf_row = ((h * 2 + two) * half + i) * in_f;
                res[gguf_row..gguf_row + in_f].copy_from_slice(&w[hf_row..hf_row + in_f]);
            }
        }
    }
    res
}

fn meta_usize(g: &Gguf, key: &str) -> Result<usize> {
    g.get(key)?
        .as_u64()
        .map(|v| v as usize)
        .ok_or_else(|| Error::Invalid(format!("{}: `{key}` is not an integer", g.path.display())))
}

/// The transformers config.json a GGUF Llama's metadata describes.
pub fn config_from_gguf(g: &Gguf) -> Result<LlamaConfig> {
    let arch = g
        .get("general.architecture")?
        .as_str()
        .unwrap_or_default()
        .to_string();
    if arch != "llama" {
        return Err(Error::Invalid(format!(
            "{}: architecture `{arch}` is not a Llama",
            g.path.display()
        )));
    }
    let k = |s: &str| format!("llama.{s}");
    let vocab = match g.metadata.get(&k("vocab_size")).and_then(Value::as_u64) {
        Some(v) => v as usize,
        None => g
            .get("tokenizer.ggml.tokens")?
            .as_array()
            .map_or(0, <[Value]>::len),
    };
    let id = |key: &str| {
        g.metadata
            .get(key)
            .and_then(Value::as_u64)
            .map(|v| TokenIds::One(v as u32))
    };
    let heads = meta_usize(g, &k("attention.head_count"))?;
    Ok(LlamaConfig {
        hidden_size: meta_usize(g, &k("embedding_length"))?,
        intermediate_size: meta_usize(g, &k("feed_forward_length"))?,
        num_hidden_layers: meta_usize(g, &k("block_count"))?,
        num_attention_heads: heads,
        num_key_value_heads: Some(meta_usize(g, &k("attention.head_count_kv")).unwrap_or(heads)),
        head_dim: None,
        rope_theta: Some(
            g.metadata
                .get(&k("rope.freq_base"))
                .and_then(Value::as_f64)
                .unwrap_or(10000.0),
        ),
        rope_parameters: None,
        rope_scaling: None,
        // GGUF stores epsilon as f32; round-trip through f32 gives back the value the model used.
        rms_norm_eps: f64::from(
            g.get(&k("attention.layer_norm_rms_epsilon"))?
                .as_f64()
                .unwrap_or(1e-5) as f32,
        ),
        vocab_size: vocab,
        tie_word_embeddings: !g.tensors.iter().any(|t| t.name == "output.weight"),
        max_position_embeddings: meta_usize(g, &k("context_length"))?,
        bos_token_id: id("tokenizer.ggml.bos_token_id"),
        eos_token_id: id("tokenizer.ggml.eos_token_id"),
        pad_token_id: g
            .metadata
            .get("tokenizer.ggml.padding_token_id")
            .and_then(Value::as_u64)
            .map(|v| v as u32),
        hidden_act: "silu".into(),
        attention_bias: false,
        mlp_bias: false,
        torch_dtype: Some("float32".into()),
        model_type: Some("llama".into()),
        architectures: Some(vec!["LlamaForCausalLM".into()]),
    })
}

/// llama.cpp names of the model-wide tensors and their transformers names.
const FIXED_NAMES: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// llama.cpp names of a block's tensors (after `blk.{i}.`) and their transformers names
/// (after `model.layers.{i}.`).
const LAYER_NAMES: [(&str, &str); 9] = [
    ("attn_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
];

/// The transformers name of a llama.cpp tensor name.
pub fn hf_name(gguf_name: &str) -> Option<String> {
    if let Some((_, hf)) = FIXED_NAMES.iter().find(|(g, _)| *g == gguf_name) {
        return Some(hf.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, hf) = LAYER_NAMES.iter().find(|(g, _)| *g == part)?;
    Some(format!("model.layers.{layer}.{hf}"))
}

/// The llama.cpp name of a transformers tensor name (the inverse of [`hf_name`]).
pub fn gguf_name(hf: &str) -> Option<String> {
    if let Some((g, _)) = FIXED_NAMES.iter().find(|(_, h)| *h == hf) {
        return Some(g.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (g, _) = LAYER_NAMES.iter().find(|(_, h)| *h == part)?;
    Some(format!("blk.{layer}.{g}"))
}

fn tensor_f32(g: &Gguf, t: &TensorInfo) -> Result<(Vec<f32>, Vec<usize>)> {
    let bad =
        |msg: String| Error::Invalid(format!("{}: tensor `{}` {msg}", g.path.display(), t.name));
    let (bsize, bvals) = block_layout(t.ggml_type)
        .ok_or_else(|| bad(format!("has unsupported ggml type {}", t.ggml_type)))?;
    let n = t
        .elements()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| {
            bad(format!(
                "dimensions {:?} overflow the element count",
                t.dims
            ))
        })?;
    let len = (n / bvals)
        .checked_mul(bsize)
        .ok_or_else(|| bad(format!("dimensions {:?} overflow the byte count", t.dims)))?;
    // The bytes are checked to lie in the file before anything is allocated for the values.
    let bytes = g.tensor_bytes(t, len)?;
    let vals = dequantize(t.ggml_type, bytes, n).map_err(|e| bad(e.to_string()))?;
    // GGUF lists dims fastest-first; transformers' shape is the reverse.
    let shape: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
    Ok((vals, shape))
}

/// The GGUF tensors by transformers name, checked against the shape the metadata describe:
/// every tensor a Llama needs is present (the first missing one is named) with the expected
/// dimensions, and no tensor is left over. Nothing is read or allocated before this passes.
fn tensor_directory<'g>(g: &'g Gguf, shape: &ModelShape) -> Result<Vec<(String, &'g TensorInfo)>> {
    let mut by_name = HashMap::new();
    for t in &g.tensors {
        let name = hf_name(&t.name).ok_or_else(|| {
            Error::Invalid(format!(
                "{}: tensor `{}` has no transformers counterpart",
                g.path.display(),
                t.name
            ))
        })?;
        by_name.insert(name, t);
    }
    let mut out = Vec::new();
    for (name, expected) in shape.tensor_specs() {
        let gname = gguf_name(&name).unwrap_or_else(|| name.clone());
        let t = by_name.remove(&name).ok_or_else(|| Error::MissingTensor {
            path: g.path.clone(),
            name: gname.clone(),
            expected: expected.clone(),
        })?;
        let found: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
        if found != expected {
            return Err(Error::ShapeMismatch {
                path: g.path.clone(),
                name: gname,
                expected,
                found,
            });
        }
        out.push((name, t));
    }
    if let Some(extra) = by_name.values().map(|t| &t.name).min() {
        return Err(Error::Invalid(format!(
            "{}: tensor `{extra}` is not part of the Llama its metadata describe",
            g.path.display()
        )));
    }
    Ok(out)
}

/// Reads every tensor of a GGUF Llama as transformers-named f32 tensors, Q/K un-permuted.
/// The metadata must describe a valid Llama and the tensors must be exactly its tensors.
pub fn import_tensors(g: &Gguf) -> Result<(LlamaConfig, HashMap<String, Tensor>)> {
    let cfg = config_from_gguf(g)?;
    let shape = cfg.shape().map_err(|msg| {
        Error::Invalid(format!(
            "{}: the llama.* metadata describe an invalid model: {msg}",
            g.path.display()
        ))
    })?;
    let mut out = HashMap::new();
    for (name, t) in tensor_directory(g, &shape)? {
        let (mut vals, dims) = tensor_f32(g, t)?;
        let heads = if name.ends_with("q_proj.weight") {
            Some(shape.heads)
        } else if name.ends_with("k_proj.weight") {
            Some(shape.kv_heads)
        } else {
            None
        };
        if let Some(h) = heads {
            vals = unpermute_qk(&vals, dims[0], dims[1], h);
        }
        out.insert(name, Tensor::from_vec(vals, dims, &Device::Cpu)?);
    }
    Ok((cfg, out))
}

/// Imports a GGUF Llama into `out`: config.json, model.safetensors (f32), and the converted
/// tokenizer.json + tokenizer_config.json, so the directory is a complete model.
///
/// Everything is read and checked before `out` is created; if writing fails after that, an
/// `out` this call created is removed again, so a refused import leaves no directory behind.
pub fn import(gguf: &Path, out: &Path) -> Result<LlamaConfig> {
    let g = Gguf::read(gguf)?;
    let (cfg, tensors) = import_tensors(&g)?;
    let existed = out.exists();
    let written = write_import(&g, &cfg, &tensors, gguf, out);
    if written.is_err() && !existed {
        // Best effort: the write error is the one worth reporting.
        let _ = std::fs::remove_dir_all(out);
    }
    written.map(|()| cfg)
}

fn write_import(
    g: &Gguf,
    cfg: &LlamaConfig,
    tensors: &HashMap<String, Tensor>,
    gguf: &Path,
    out: &Path,
) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let cfg_path = out.join("config.json");
    let json = serde_json::to_string_pretty(cfg).map_err(|e| Error::Invalid(e.to_string()))?;
    std::fs::write(&cfg_path, json + "\n").map_err(|e| Error::io(&cfg_path, e))?;
    candle_core::safetensors::save(tensors, out.join("model.safetensors"))?;
    if g.metadata.contains_key("tokenizer.ggml.model") {
        crate::tokenizer::from_gguf::convert(gguf, &out.join("tokenizer.json"))?;
    }
    Ok(())
}
