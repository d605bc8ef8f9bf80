//! `lorasft inspect`: a model's shape and PEFT's trainable-parameter line, from config.json
//! alone or from the loaded weights.

use std::fmt::Write;

use candle_core::{DType, Device};

use crate::error::{Error, Result};
use crate::model::config::{LlamaConfig, ModelShape};
use crate::model::load::{self, ModelSource};
use crate::model::lora::LoraConfig;
use crate::verify::trainable_params_line;

/// Trainable (LoRA) parameters a config adds to a model shape.
pub fn lora_params(shape: &ModelShape, lora: &LoraConfig) -> u64 {
    lora.targets
        .iter()
        .map(|p| {
            let (out_f, in_f) = p.dims(shape);
            lora.params_for(out_f, in_f)
        })
        .sum::<u64>()
        * shape.layers as u64
}

/// The human-readable summary `inspect` prints: shape, then the trainable-parameter line.
pub fn summary(source: &str, shape: &ModelShape, lora: &LoraConfig) -> String {
    let trainable = lora_params(shape, lora);
    let all = shape.base_params() + trainable;
    let mut s = String::new();
    let _ = writeln!(s, "model: {source}");
    let _ = writeln!(
        s,
        "shape: {} layers, hidden {}, intermediate {}, heads {} (kv {}), head dim {}, vocab {}, max positions {}, rope theta {}, {} lm_head",
        shape.layers,
        shape.hidden,
        shape.intermediate,
        shape.heads,
        shape.kv_heads,
        shape.head_dim,
        shape.vocab,
        shape.max_positions,
        shape.rope_theta,
        if shape.tied { "tied" } else { "untied" }
    );
    let targets: Vec<&str> = lora.targets.iter().map(|p| p.name()).collect();
    let _ = writeln!(
        s,
        "lora: r {}, alpha {}, dropout {}, targets {}{}",
        lora.r,
        lora.alpha,
        lora.dropout,
        targets.join(","),
        if lora.use_rslora { ", rsLoRA" } else { "" }
    );
    let _ = writeln!(s, "{}", trainable_params_line(trainable, all));
    s
}

/// Loads the weights, attaches the adapters and counts again: the line `inspect` prints after
/// the summary. Refuses a count that disagrees with [`lora_params`] of the config.
pub fn from_weights(
    source: &ModelSource,
    cfg: &LlamaConfig,
    shape: &ModelShape,
    lora: &LoraConfig,
) -> Result<String> {
    let files = load::resolve(source)?;
    let (mut model, report) = load::load_weights(cfg, &files, DType::F32, &Device::Cpu)?;
    model.add_lora(lora, 0)?;
    let (trainable, all) = (model.trainable_params(), model.all_params());
    let from_config = lora_params(shape, lora);
    if trainable != from_config {
        return Err(Error::Invalid(format!(
            "{}: loaded adapters hold {trainable} parameters, the config implies {from_config}",
            source
        )));
    }
    let dtypes: Vec<String> = report
        .file_dtypes
        .iter()
        .map(|(d, n)| format!("{n} {d}"))
        .collect();
    Ok(format!(
        "weights: {} files, {} tensors ({}), {} unused; counted from loaded tensors: {}",
        files.weights.len(),
        report.file_dtypes.values().sum::<usize>(),
        dtypes.join(", "),
        report.unused.len(),
        trainable_params_line(trainable, all)
    ))
}
