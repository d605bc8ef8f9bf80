//! `lorasft export-gguf`: a Llama (optionally with a LoRA adapter merged in) written as a GGUF
//! file llama.cpp can load: llama.cpp's tensor names, Q and K permuted back into llama.cpp's
//! interleaved RoPE layout, its `llama.*` / `general.*` metadata keys, and the tokenizer as
//! `tokenizer.ggml.*`. Tensors are quantized by candle (`QTensor::quantize`) and the file is
//! written by candle's `gguf_file::write`.
//!
//! Types per tensor (norms are always F32):
//!
//! | `--type` | token_embd | output | attn_v, ffn_down | other linears |
//! |---|---|---|---|---|
//! | f32, f16, q8_0, q4_0, q6_k | the type | the type | the type | the type |
//! | q4_k_m | Q4_K | Q6_K | Q6_K on "more bits" layers, else Q4_K | Q4_K |
//! | q5_k_m | Q5_K | Q6_K | Q6_K on "more bits" layers, else Q5_K | Q5_K |
//!
//! "More bits" layers are llama.cpp's choice for its `_M` mixes: the first and last eighth of
//! the layers, and every third layer in between. A model with tied embeddings has no
//! `output.weight`; llama.cpp then treats `token_embd` as the output and gives it Q6_K, and so
//! does this module.
//!
//! K-quants pack 256 values per block, so a row whose length is not a multiple of 256 falls
//! back as llama.cpp falls back: Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0. A row that is not a
//! multiple of 32 either (no Llama has one) falls back to F16.

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value as GValue};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::config::LlamaConfig;
use crate::model::gguf_import::{gguf_name, permute_qk};
use crate::model::{Llama, ModelShape};
use crate::progress::Mode;
use crate::tokenizer::to_gguf::GgufMeta;

/// The file types `export-gguf` writes (`--type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportType {
    /// Every tensor F32 (lossless).
    F32,
    /// Linears and embeddings F16, norms F32.
    F16,
    /// Q8_0 (8-bit, 32 per block).
    #[value(name = "q8_0")]
    Q8_0,
    /// Q4_0 (4-bit, 32 per block).
    #[value(name = "q4_0")]
    Q4_0,
    /// llama.cpp's Q4_K_M mix (see the module doc).
    #[value(name = "q4_k_m")]
    Q4KM,
    /// llama.cpp's Q5_K_M mix (see the module doc).
    #[value(name = "q5_k_m")]
    Q5KM,
    /// Q6_K everywhere but the norms.
    #[value(name = "q6_k")]
    Q6K,
}

impl ExportType {
    /// llama.cpp's `general.file_type` code for this mix (`LLAMA_FTYPE_*`).
    pub fn file_type(self) -> u32 {
        match self {
            ExportType::F32 => 0,
            ExportType::F16 => 1,
            ExportType::Q4_0 => 2,
            ExportType::Q8_0 => 7,
            ExportType::Q4KM => 15,
            ExportType::Q5KM => 17,
            ExportType::Q6K => 18,
        }
    }
}

/// llama.cpp's "more bits" layers of its `_M` mixes: the first and last eighth, and every
/// third layer in between.
pub fn use_more_bits(layer: usize, layers: usize) -> bool {
    let eighth = layers / 8;
    layer < eighth || layer >= 7 * layers / 8 || (layer - eighth) % 3 == 2
}

/// The type a K-quant falls back to for rows that are not a whole number of 256-blocks.
fn fallback(t: GgmlDType) -> GgmlDType {
    match t {
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        other => other,
    }
}

/// The type tensor `name` (llama.cpp naming) of shape `dims` (transformers order) gets under
/// `ty` in a model of `layers` layers with tied embeddings or not.
pub fn tensor_type(
    ty: ExportType,
    name: &str,
    dims: &[usize],
    layers: usize,
    tied: bool,
) -> GgmlDType {
    if dims.len() < 2 || ty == ExportType::F32 {
        return GgmlDType::F32;
    }
    let layer = name
        .strip_prefix("blk.")
        .and_then(|r| r.split('.').next())
        .and_then(|l| l.parse::<usize>().ok());
    let more_bits = (name.ends_with("attn_v.weight") || name.ends_with("ffn_down.weight"))
        && layer.is_some_and(|l| use_more_bits(l, layers));
    let output = name == "output.weight" || (tied && name == "token_embd.weight");
    let mix = |base: GgmlDType| {
        if output || more_bits {
            GgmlDType::Q6K
        } else {
            base
        }
    };
    let want = match ty {
        ExportType::F32 => GgmlDType::F32,
        ExportType::F16 => GgmlDType::F16,
        ExportType::Q8_0 => GgmlDType::Q8_0,
        ExportType::Q4_0 => GgmlDType::Q4_0,
        ExportType::Q6K => GgmlDType::Q6K,
        ExportType::Q4KM => mix(GgmlDType::Q4K),
        ExportType::Q5KM => mix(GgmlDType::Q5K),
    };
    let row = dims[dims.len() - 1];
    let want = if row.is_multiple_of(want.block_size()) {
        want
    } else {
        fallback(want)
    };
    if row.is_multiple_of(want.block_size()) {
        want
    } else {
        GgmlDType::F16
    }
}

/// The `general.*` and `llama.*` metadata of a model.
pub fn model_metadata(
    cfg: &LlamaConfig,
    shape: &ModelShape,
    name: &str,
    ty: ExportType,
) -> GgufMeta {
    let u = |v: usize| GValue::U32(v as u32);
    let mut m: GgufMeta = vec![
        (
            "general.architecture".into(),
            GValue::String("llama".into()),
        ),
        ("general.name".into(), GValue::String(name.into())),
        ("general.file_type".into(), GValue::U32(ty.file_type())),
        ("general.quantization_version".into(), GValue::U32(2)),
        (
            "llama.context_length".into(),
            u(cfg.max_position_embeddings),
        ),
        ("llama.embedding_length".into(), u(shape.hidden)),
        ("llama.block_count".into(), u(shape.layers)),
        ("llama.feed_forward_length".into(), u(shape.intermediate)),
        ("llama.attention.head_count".into(), u(shape.heads)),
        ("llama.attention.head_count_kv".into(), u(shape.kv_heads)),
        (
            "llama.rope.freq_base".into(),
            GValue::F32(shape.rope_theta as f32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            GValue::F32(shape.rms_norm_eps as f32),
        ),
        ("llama.rope.dimension_count".into(), u(shape.head_dim)),
        ("llama.vocab_size".into(), u(shape.vocab)),
    ];
    // A hub id (`org/name`) is recorded where llama.cpp's converter records it, so an import
    // of the file names the same base model.
    if name.split('/').count() == 2 && !name.contains(char::is_whitespace) && !name.starts_with('.')
    {
        m.push((
            "general.source.huggingface.repository".into(),
            GValue::String(name.into()),
        ));
    }
    m
}

/// The model's tensors as llama.cpp names and lays them out, quantized per [`tensor_type`].
pub fn gguf_tensors(model: &Llama, ty: ExportType) -> Result<Vec<(String, QTensor)>> {
    quantized_tensors(model, ty, Mode::Quiet)
}

/// [`gguf_tensors`], counting each tensor on an `export-gguf quantize` progress task.
fn quantized_tensors(
    model: &Llama,
    ty: ExportType,
    progress: Mode,
) -> Result<Vec<(String, QTensor)>> {
    let shape = model.shape().clone();
    let tied = shape.tied;
    let merged = model.merged_tensors()?;
    let mut task = progress.task("export-gguf quantize", merged.len() as u64, "tensors");
    let mut out = Vec::new();
    for (hf, t) in merged {
        let name = gguf_name(&hf)
            .ok_or_else(|| Error::Invalid(format!("tensor `{hf}` has no llama.cpp name")))?;
        let t = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let dims = t.dims().to_vec();
        let heads = if hf.ends_with("q_proj.weight") {
            Some(shape.heads)
        } else if hf.ends_with("k_proj.weight") {
            Some(shape.kv_heads)
        } else {
            None
        };
        let t = match heads {
            Some(h) => {
                let w = t.flatten_all()?.to_vec1::<f32>()?;
                Tensor::from_vec(
                    permute_qk(&w, dims[0], dims[1], h),
                    dims.clone(),
                    &Device::Cpu,
                )?
            }
            None => t,
        };
        let q = QTensor::quantize(&t, tensor_type(ty, &name, &dims, shape.layers, tied))?;
        out.push((name, q));
        task.advance(1);
    }
    task.finish();
    Ok(out)
}

/// Writes `model` (adapters already merged or absent) to `out` as a GGUF file of type `ty`,
/// named `name`, with `tokenizer` metadata, showing progress per tensor quantized; returns
/// the tensors' types in file order.
pub fn write_gguf(
    model: &Llama,
    cfg: &LlamaConfig,
    name: &str,
    tokenizer: GgufMeta,
    ty: ExportType,
    out: &Path,
    progress: Mode,
) -> Result<Vec<(String, GgmlDType)>> {
    let mut meta = model_metadata(cfg, model.shape(), name, ty);
    meta.extend(tokenizer);
    let tensors = quantized_tensors(model, ty, progress)?;
    let meta_refs: Vec<(&str, &GValue)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    // Written under a temporary name and renamed when complete: a kill leaves no truncated
    // GGUF under the final name.
    let staged = crate::output::Staged::file(out)?;
    let file = std::fs::File::create(staged.path()).map_err(|e| Error::io(staged.path(), e))?;
    let mut task = progress.task("export-gguf write", 1, "files");
    let mut w = std::io::BufWriter::new(file);
    gguf_file::write(&mut w, &meta_refs, &t_refs)?;
    std::io::Write::flush(&mut w).map_err(|e| Error::io(staged.path(), e))?;
    drop(w);
    staged.commit()?;
    task.advance(1);
    task.finish();
    Ok(tensors.into_iter().map(|(n, q)| (n, q.dtype())).collect())
}
