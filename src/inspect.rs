//! `lorasft inspect`: a model's shape and PEFT's trainable-parameter line, from config.json
//! alone or from the loaded weights.

use std::fmt::Write;

use crate::model::config::ModelShape;
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
