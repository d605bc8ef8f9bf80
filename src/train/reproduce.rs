//! `lorasft reproduce RUN_DIR`: repeat a run from its recorded config and check that every
//! logged loss and the adapter bytes come out identical.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::records::{self, Manifest, Metric, files};
use crate::train::config::TrainConfig;
use crate::train::prepare::prepare;
use crate::train::run::{RunOptions, train};

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
    let mut cfg = TrainConfig::read(&dir.join(files::CONFIG))?;
    let manifest: Manifest = records::read_json(&dir.join(files::MANIFEST))?;
    cfg.run.name = format!("{}-reproduce", cfg.run.name);
    cfg.run.out_dir = dir
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    // The reproduction's own directory: a repeated `reproduce` replaces it.
    let opts = RunOptions {
        overwrite: true,
        ..RunOptions::default()
    };
    let new = train(prepare(cfg)?, &opts)?;
    let new_manifest: Manifest = records::read_json(&new.run_dir.join(files::MANIFEST))?;
    same_inputs(&manifest, &new_manifest)?;
    let old = records::read_metrics(&dir.join(files::METRICS))?;
    let fresh = records::read_metrics(&new.run_dir.join(files::METRICS))?;
    let read = |d: &Path| {
        let p = d.join("adapter").join("adapter_model.safetensors");
        std::fs::read(&p).map_err(|e| Error::io(&p, e))
    };
    let adapter_identical = read(dir)? == read(&new.run_dir)?;
    Ok(Reproduction {
        run_dir: new.run_dir,
        compared: old.len().min(fresh.len()),
        first_mismatch: first_mismatch(&old, &fresh),
        adapter_identical,
    })
}

/// Refuses a comparison whose data, tokenizer or base weights differ from the recorded run's.
fn same_inputs(recorded: &Manifest, new: &Manifest) -> Result<()> {
    for (what, a, b) in [
        ("data", &recorded.data_sha256, &new.data_sha256),
        (
            "tokenizer",
            &recorded.tokenizer_sha256,
            &new.tokenizer_sha256,
        ),
        (
            "base weights",
            &recorded.base_weights_digest,
            &new.base_weights_digest,
        ),
    ] {
        if a != b {
            return Err(Error::Invalid(format!(
                "{what} differ from the recorded run ({a} vs {b}): not a reproduction"
            )));
        }
    }
    Ok(())
}

/// The first metrics line whose step, kind or loss bits differ (step, kind, old, new), or a
/// length mismatch.
fn first_mismatch(old: &[Metric], fresh: &[Metric]) -> Option<(usize, String, f64, f64)> {
    for (a, b) in old.iter().zip(fresh) {
        if a.step != b.step || a.kind != b.kind || a.loss.to_bits() != b.loss.to_bits() {
            return Some((
                a.step,
                format!("{:?}", a.kind).to_lowercase(),
                a.loss,
                b.loss,
            ));
        }
    }
    (old.len() != fresh.len()).then(|| {
        (
            old.len().min(fresh.len()),
            "length".into(),
            old.len() as f64,
            fresh.len() as f64,
        )
    })
}
