//! `lorasft reproduce RUN_DIR`: repeat a run from its recorded config and check that every
//! logged loss and the adapter bytes come out identical.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::report::Manifest;
use crate::train::config::TrainConfig;
use crate::train::trainer::{self, RunOptions, metrics_from};

/// The outcome of a reproduction.
#[derive(Debug, Clone)]
pub struct Reproduction {
    /// The new run's directory.
    pub run_dir: PathBuf,
    /// Metric lines compared.
    pub compared: usize,
    /// The first differing line (step, kind, original loss, new loss), if any.
    pub first_mismatch: Option<(usize, String, f64, f64)>,
    /// Whether the adapter files are byte-identical.
    pub adapter_identical: bool,
}

impl Reproduction {
    /// Whether the run reproduced exactly.
    pub fn matched(&self) -> bool {
        self.first_mismatch.is_none() && self.adapter_identical
    }
}

/// Repeats the run in `dir` into `dir`'s sibling `<name>-reproduce` and compares.
pub fn reproduce(dir: &Path) -> Result<Reproduction> {
    let cfg_path = dir.join("config.toml");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let mut cfg: TrainConfig = toml::from_str(&text).map_err(|e| Error::Json {
        path: cfg_path.clone(),
        msg: e.to_string(),
    })?;
    let manifest_path = dir.join("manifest.json");
    let manifest: Manifest = serde_json::from_str(
        &std::fs::read_to_string(&manifest_path).map_err(|e| Error::io(&manifest_path, e))?,
    )
    .map_err(|e| Error::Json {
        path: manifest_path.clone(),
        msg: e.to_string(),
    })?;
    let name = format!("{}-reproduce", cfg.run.name);
    cfg.run.name = name.clone();
    cfg.run.out_dir = dir
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let prepared = trainer::prepare(cfg)?;
    let new = trainer::train(prepared, &RunOptions::default())?;
    let new_manifest: Manifest = serde_json::from_str(
        &std::fs::read_to_string(new.run_dir.join("manifest.json"))
            .map_err(|e| Error::io(&new.run_dir, e))?,
    )
    .map_err(|e| Error::Json {
        path: new.run_dir.join("manifest.json"),
        msg: e.to_string(),
    })?;
    for (what, a, b) in [
        ("data", &manifest.data_sha256, &new_manifest.data_sha256),
        (
            "tokenizer",
            &manifest.tokenizer_sha256,
            &new_manifest.tokenizer_sha256,
        ),
        (
            "base weights",
            &manifest.base_weights_digest,
            &new_manifest.base_weights_digest,
        ),
    ] {
        if a != b {
            return Err(Error::Invalid(format!(
                "{what} differ from the recorded run ({a} vs {b}): not a reproduction"
            )));
        }
    }
    let old = metrics_from(&dir.join("metrics.jsonl"))?;
    let fresh = metrics_from(&new.run_dir.join("metrics.jsonl"))?;
    let mut first_mismatch = None;
    for (a, b) in old.iter().zip(&fresh) {
        if a.step != b.step || a.kind != b.kind || a.loss.to_bits() != b.loss.to_bits() {
            first_mismatch = Some((a.step, a.kind.clone(), a.loss, b.loss));
            break;
        }
    }
    if first_mismatch.is_none() && old.len() != fresh.len() {
        first_mismatch = Some((
            old.len().min(fresh.len()),
            "length".into(),
            old.len() as f64,
            fresh.len() as f64,
        ));
    }
    let read = |d: &Path| {
        std::fs::read(d.join("adapter/adapter_model.safetensors")).map_err(|e| Error::io(d, e))
    };
    let adapter_identical = read(dir)? == read(&new.run_dir)?;
    Ok(Reproduction {
        run_dir: new.run_dir,
        compared: old.len().min(fresh.len()),
        first_mismatch,
        adapter_identical,
    })
}
