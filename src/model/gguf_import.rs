//! Import of Llama weights from GGUF (llama.cpp's format) into a Hugging Face-layout directory:
//! dequantisation through candle (every type `gguf::tensor::ggml_dtype` knows, K-quants
//! included, one tensor at a time), llama.cpp → transformers tensor names, and
//! the un-permutation of Q and K, which llama.cpp stores interleaved for its RoPE kernel
//! (without it the model babbles).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::gguf::tensor::ggml_dtype;
use crate::gguf::{Gguf, TensorInfo, Value};
use crate::model::Llama;
use crate::model::config::{LlamaConfig, ModelShape, TokenIds};
use crate::model::cpu::quant::QuantWeight;
use crate::model::lora::Frozen;
use crate::progress;

/// Dequantises `n` values of ggml type `ggml_type` to f32 with candle's dequantizers (every
/// type [`ggml_dtype`] knows); `bytes` must hold exactly whole blocks for `n` values.
pub fn dequantize(ggml_type: u32, bytes: &[u8], n: usize) -> Result<Vec<f32>> {
    let info = TensorInfo {
        name: "values".into(),
        dims: vec![n as u64],
        ggml_type,
        offset: 0,
    };
    let len = info
        .byte_len()
        .map_err(|m| Error::Invalid(format!("{n} values {m}")))?;
    if (bytes.len() as u64) < len {
        return Err(Error::Invalid(format!(
            "{n} values of ggml type {ggml_type} do not fit {} bytes",
            bytes.len()
        )));
    }
    let t = ggml_dtype(ggml_type).expect("checked by byte_len");
    let q = qtensor_from_ggml(t, &bytes[..len as usize], vec![n], &Device::Cpu)?;
    Ok(q.dequantize(&Device::Cpu)?.to_vec1()?)
}

/// For each row of the un-permuted (transformers) Q or K weight, the row of the GGUF weight
/// it comes from: the permutation moves whole rows, so it applies to quantized rows as well.
pub fn unpermuted_row_sources(out_f: usize, heads: usize) -> Vec<usize> {
    let half = out_f / heads / 2;
    let mut src = vec![0; out_f];
    for h in 0..heads {
        for i in 0..half {
            for two in 0..2 {
                // source row (h, i, two) in the GGUF layout -> destination row (h, two, i)
                src[(h * 2 + two) * half + i] = (h * half + i) * 2 + two;
            }
        }
    }
    src
}

/// Undoes llama.cpp's Q/K permutation of an (out, in) row-major matrix:
/// `reshape(heads, out/heads/2, 2, in).transpose(1, 2).reshape(out, in)`.
pub fn unpermute_qk(w: &[f32], out_f: usize, in_f: usize, heads: usize) -> Vec<f32> {
    let mut res = vec![0f32; w.len()];
    for (dst, src) in unpermuted_row_sources(out_f, heads).into_iter().enumerate() {
        res[dst * in_f..(dst + 1) * in_f].copy_from_slice(&w[src * in_f..(src + 1) * in_f]);
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
        name_or_path: Some(model_name(g)),
    })
}

/// What a GGUF file says its model is called, for model cards: the Hugging Face repository
/// (`general.source.huggingface.repository`, or a `huggingface.co` `general.source.url`) when
/// the converter recorded one, else `general.name`, else `general.basename`, else the file's
/// stem. Never a directory path.
pub fn model_name(g: &Gguf) -> String {
    let s = |k: &str| {
        g.metadata
            .get(k)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    let from_url = s("general.source.url").and_then(|u| {
        let rest = u
            .strip_prefix("https://huggingface.co/")
            .or_else(|| u.strip_prefix("http://huggingface.co/"))?;
        let mut parts = rest.split('/').filter(|p| !p.is_empty());
        Some(format!("{}/{}", parts.next()?, parts.next()?))
    });
    s("general.source.huggingface.repository")
        .map(str::to_string)
        .or(from_url)
        .or_else(|| s("general.name").map(str::to_string))
        .or_else(|| s("general.basename").map(str::to_string))
        .unwrap_or_else(|| {
            g.path
                .file_stem()
                .map_or_else(|| "gguf".into(), |f| f.to_string_lossy().into_owned())
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
            against: "the file's own llama.* metadata".into(),
        })?;
        let found: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
        if found != expected {
            return Err(Error::ShapeMismatch {
                path: g.path.clone(),
                name: gname,
                expected,
                found,
                against: "the file's own llama.* metadata".into(),
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

/// The config the GGUF's metadata describe, and its validated shape.
fn config_and_shape(g: &Gguf) -> Result<(LlamaConfig, ModelShape)> {
    let cfg = config_from_gguf(g)?;
    let shape = cfg.shape().map_err(|msg| {
        Error::Invalid(format!(
            "{}: the llama.* metadata describe an invalid model: {msg}",
            g.path.display()
        ))
    })?;
    Ok((cfg, shape))
}

/// Reads every tensor of a GGUF Llama as transformers-named f32 tensors, Q/K un-permuted.
/// The metadata must describe a valid Llama and the tensors must be exactly its tensors.
pub fn import_tensors(g: &Gguf) -> Result<(LlamaConfig, HashMap<String, Tensor>)> {
    read_tensors(g, progress::Mode::Quiet)
}

/// [`import_tensors`], counting each tensor read on an `import-gguf read` progress task once
/// the file has passed its checks.
fn read_tensors(
    g: &Gguf,
    progress: progress::Mode,
) -> Result<(LlamaConfig, HashMap<String, Tensor>)> {
    let (cfg, shape) = config_and_shape(g)?;
    let mut reader = g.tensor_reader()?;
    let mut out = HashMap::new();
    let directory = tensor_directory(g, &shape)?;
    let mut task = progress.task("import-gguf read", directory.len() as u64, "tensors");
    for (name, t) in directory {
        let w = reader.f32(t)?;
        let dims = w.dims().to_vec();
        let mut vals = w.flatten_all()?.to_vec1::<f32>()?;
        if let Some(h) = permuted_heads(&name, &shape) {
            vals = unpermute_qk(&vals, dims[0], dims[1], h);
        }
        out.insert(name, Tensor::from_vec(vals, dims, &Device::Cpu)?);
        task.advance(1);
    }
    task.finish();
    Ok((cfg, out))
}

/// The head count llama.cpp permuted a tensor's rows by: Q and K only.
fn permuted_heads(name: &str, shape: &ModelShape) -> Option<usize> {
    if name.ends_with("q_proj.weight") {
        Some(shape.heads)
    } else if name.ends_with("k_proj.weight") {
        Some(shape.kv_heads)
    } else {
        None
    }
}

/// Loads a GGUF Llama for training with `model.keep_quantized` on the CPU in f32: the seven
/// projections of every layer, the embedding and lm_head stay `QTensor`s in the file's types
/// (Q and K rows un-permuted as raw blocks), and only the norms are dequantized to f32.
/// Tensors are read one at a time, so the file is never held twice.
pub fn load_quantized(g: &Gguf) -> Result<(LlamaConfig, Llama)> {
    load_quantized_on(g, &Device::Cpu, DType::F32)
}

/// [`load_quantized`] for a model on `dev` in `dtype`: on an accelerator each projection's
/// blocks are also copied there (and dequantized there, one product at a time), and the
/// dense tensors are moved there in `dtype`. On the CPU only f32 is accepted.
pub fn load_quantized_on(g: &Gguf, dev: &Device, dtype: DType) -> Result<(LlamaConfig, Llama)> {
    if dev.is_cpu() && dtype != DType::F32 {
        return Err(Error::Invalid(format!(
            "model.keep_quantized (--keep-quantized) runs on the CPU in f32 only, got {dtype:?}"
        )));
    }
    let (cfg, shape) = config_and_shape(g)?;
    let mut reader = g.tensor_reader()?;
    let mut dir = tensor_directory(g, &shape)?.into_iter();
    let model = Llama::from_frozen(shape.clone(), |name, _| {
        let (hf, t) = dir.next().expect("the directory follows tensor_specs");
        debug_assert_eq!(hf, name);
        if name.ends_with("norm.weight") {
            return Ok(Frozen::Dense(
                reader.f32(t)?.to_device(dev)?.to_dtype(dtype)?,
            ));
        }
        let q = reader.qtensor(t)?;
        let order =
            permuted_heads(name, &shape).map(|h| unpermuted_row_sources(q.shape().dims()[0], h));
        // An untied embedding is only looked up, on the host: no device copy.
        let lookup_only = name == "model.embed_tokens.weight" && !shape.tied;
        let w = QuantWeight::from_rows(q, order.as_deref())
            .and_then(|w| match lookup_only {
                true => Ok(w),
                false => w.with_device_copy(dev, dtype),
            })
            .map_err(|e| Error::Invalid(format!("{}: `{}`: {e}", g.path.display(), t.name)))?;
        Ok(Frozen::Quant(Arc::new(w)))
    })?;
    Ok((cfg, model))
}

/// Writes config.json and (when the file has a vocabulary) tokenizer.json for a GGUF Llama
/// into `out`, without the weights: what a `keep_quantized` run needs from the import.
pub fn write_config_and_tokenizer(g: &Gguf, cfg: &LlamaConfig, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let cfg_path = out.join("config.json");
    let json = serde_json::to_string_pretty(cfg).map_err(|e| Error::Invalid(e.to_string()))?;
    crate::output::write(&cfg_path, (json + "\n").as_bytes())?;
    if g.metadata.contains_key("tokenizer.ggml.model") {
        crate::tokenizer::from_gguf::convert_parsed(g, &out.join("tokenizer.json"))?;
    }
    Ok(())
}

/// Brings an earlier import's `tokenizer_config.json` up to date with the GGUF it came from:
/// an import made before lorasft copied the chat template has none, and reusing it would
/// silently train Alpaca-style or fail to find the template. Rewrites the tokenizer files (not
/// the weights) when the GGUF carries a template the config lacks, and says so.
pub fn refresh_tokenizer_config(g: &Gguf, dir: &Path) -> Result<()> {
    if g.metadata
        .get(crate::chat::locate::GGUF_KEY)
        .and_then(|v| v.as_str())
        .is_none()
    {
        return Ok(());
    }
    let cfg_path = dir.join("tokenizer_config.json");
    // Only a config that lacks a template is stale: one that holds any (the GGUF's, or one the
    // user edited in) is left as it is.
    let has_template = crate::data::encode::tokenizer_config(&dir.join("tokenizer.json"))
        .is_ok_and(|v| v.get("chat_template").is_some_and(|t| !t.is_null()));
    if has_template {
        return Ok(());
    }
    eprintln!(
        "refreshing {}: the import predates its chat template",
        cfg_path.display()
    );
    crate::tokenizer::from_gguf::convert_parsed(g, &dir.join("tokenizer.json"))?;
    Ok(())
}

/// Imports a GGUF Llama into `out`: config.json, model.safetensors (f32), and the converted
/// tokenizer.json + tokenizer_config.json, so the directory is a complete model.
///
/// Everything is read and checked before anything is written, and the directory appears
/// under `out` only when complete: a refused or killed import leaves no directory behind.
pub fn import(gguf: &Path, out: &Path) -> Result<LlamaConfig> {
    import_with(gguf, out, progress::Mode::Quiet)
}

/// [`import`], showing progress per tensor read in the given mode (`lorasft import-gguf`).
pub fn import_with(gguf: &Path, out: &Path, progress: progress::Mode) -> Result<LlamaConfig> {
    let g = Gguf::read(gguf)?;
    let (cfg, tensors) = read_tensors(&g, progress)?;
    // Built under a temporary name and renamed into place when complete: a kill or a failed
    // write leaves no partial import under `out`.
    let staged = crate::output::Staged::dir(out)?;
    write_import(&g, &cfg, &tensors, staged.path(), progress)?;
    staged.commit()?;
    Ok(cfg)
}

fn write_import(
    g: &Gguf,
    cfg: &LlamaConfig,
    tensors: &HashMap<String, Tensor>,
    out: &Path,
    progress: progress::Mode,
) -> Result<()> {
    write_config_and_tokenizer(g, cfg, out)?;
    let mut task = progress.task("import-gguf write", 1, "files");
    candle_core::safetensors::save(tensors, out.join("model.safetensors"))?;
    task.advance(1);
    task.finish();
    Ok(())
}
