//! What a `--resume` continues: a checkpoint is trusted only when it belongs to this run.
//!
//! Before a run resumes, the run directory's records of the session that wrote its
//! checkpoints (`manifest.json`, `config.toml`) are compared with the run about to start:
//!
//! - **Identity**, always refused on a mismatch: the base model's shape and weights digest, and
//!   the tokenizer's SHA-256. A checkpoint trained on another base or tokenizer is not this
//!   run's, whatever the flags say. (The adapter's shapes and targets are settings, `lora.*`,
//!   and cannot change either: the checkpoint's tensors would not fit.)
//! - **Settings**, key by key over the resolved configs, plus the dataset's SHA-256. A change
//!   that keeps the arithmetic of every step (`train.max_steps`, `train.epochs`, logging,
//!   evaluation and checkpoint intervals, gradient checkpointing, which is proven exact,
//!   generation and report settings) is allowed and recorded. Any other change (learning rate
//!   and schedule, batch and accumulation, seed, data, label policy, precision, LoRA settings,
//!   …) breaks the claim that the run equals an uninterrupted one, and is refused unless
//!   `--allow-config-change`; then the report says the run is not a straight continuation
//!   and lists the changes.
//!
//! Extending `train.max_steps` recomputes the schedule over the new total from the resume
//! step on: the steps already taken keep their rates, and a decaying schedule rises to where
//! the longer run would be (as the Trainer does when resumed with a larger `max_steps`).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::records::{self, Manifest, files};
use crate::train::config::TrainConfig;

/// One setting that differs between the checkpoint's session and this one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The TOML key (`optim.lr`), or `data (file contents)` for the dataset's hash.
    pub key: String,
    /// The value the checkpoint was trained with.
    pub before: String,
    /// The value this session uses.
    pub after: String,
    /// Whether the change breaks equality with an uninterrupted run.
    pub breaks_continuity: bool,
}

/// One resume that changed settings: recorded in `resumes.json` for the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    /// The step the run continued from.
    pub at_step: usize,
    /// What changed.
    pub changes: Vec<Change>,
}

/// Keys whose change keeps every step's arithmetic: a resume may change them freely.
const KEEPS_ARITHMETIC: &[&str] = &[
    "train.max_steps",
    "train.epochs",
    "train.log_every",
    "train.eval_every",
    "train.save_every",
    "train.gradient_checkpointing",
    "generate.",
    "prompts",
    "report.",
];

/// Compares the run about to resume (`cfg`, and `now`, its manifest) with the session that
/// wrote the checkpoints in `dir`. Identity mismatches are refused; changed settings that
/// break continuity are refused unless `allow`. Returns every change, allowed ones included.
pub fn check(dir: &Path, cfg: &TrainConfig, now: &Manifest, allow: bool) -> Result<Vec<Change>> {
    let before: Manifest = records::read_json(&dir.join(files::MANIFEST))?;
    let old_cfg = TrainConfig::read(&dir.join(files::CONFIG))?;
    let mut changes = setting_changes(&old_cfg, cfg)?;
    if before.data_sha256 != now.data_sha256 {
        changes.push(Change {
            key: "data (file contents, SHA-256)".into(),
            before: before.data_sha256.clone(),
            after: now.data_sha256.clone(),
            breaks_continuity: true,
        });
    }
    if before.parallelism.ranks != now.parallelism.ranks {
        // The same run on another number of ranks: bit-identical, so not a break.
        changes.push(Change {
            key: "ranks".into(),
            before: before.parallelism.ranks.to_string(),
            after: now.parallelism.ranks.to_string(),
            breaks_continuity: false,
        });
    }
    check_identity(dir, &before, now, &changes)?;
    let breaking: Vec<&Change> = changes.iter().filter(|c| c.breaks_continuity).collect();
    if !breaking.is_empty() && !allow {
        return Err(Error::Invalid(format!(
            "{}: --resume with changed settings would not continue the run it checkpointed:\n{}\n\
             Resume with the run's own settings, or pass --allow-config-change to continue \
             anyway (the report then says the run is not a straight continuation).",
            dir.display(),
            breaking
                .iter()
                .map(|c| describe(c))
                .collect::<Vec<_>>()
                .join("\n")
        )));
    }
    Ok(changes)
}

/// Refuses a checkpoint made on another base model or tokenizer, naming both values.
fn check_identity(dir: &Path, before: &Manifest, now: &Manifest, changes: &[Change]) -> Result<()> {
    // A changed precision or quantization holds the same base differently: its digest differs
    // for that reason, and the change itself is a setting (listed, and refused without the flag).
    let held_differently = changes
        .iter()
        .any(|c| c.key == "run.precision" || c.key == "model.keep_quantized");
    let mut mismatches = Vec::new();
    let mut compare = |what: &str, a: &str, b: &str| {
        if a != b {
            mismatches.push(format!("  {what}: checkpoint {a:?}, now {b:?}"));
        }
    };
    compare("base model", &before.base_model, &now.base_model);
    compare("model shape", &before.model_shape, &now.model_shape);
    if !held_differently {
        compare(
            "base weights digest",
            &before.base_weights_digest,
            &now.base_weights_digest,
        );
    }
    compare(
        "tokenizer SHA-256",
        &before.tokenizer_sha256,
        &now.tokenizer_sha256,
    );
    if mismatches.is_empty() {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "{}: the checkpoints belong to another run, not this one:\n{}\n\
         A run resumes only on the base model and tokenizer it was trained on; start a new run \
         (another run.name, or --overwrite) instead.",
        dir.display(),
        mismatches.join("\n")
    )))
}

/// The settings that differ, key by key, over the two configs as the run directory records
/// them.
fn setting_changes(old: &TrainConfig, new: &TrainConfig) -> Result<Vec<Change>> {
    let (a, b) = (flatten(old)?, flatten(new)?);
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let none = "(unset)".to_string();
    Ok(keys
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| Change {
            key: k.clone(),
            before: a.get(k).unwrap_or(&none).clone(),
            after: b.get(k).unwrap_or(&none).clone(),
            breaks_continuity: !KEEPS_ARITHMETIC
                .iter()
                .any(|p| k == p || (p.ends_with('.') && k.starts_with(p))),
        })
        .collect())
}

/// Every leaf of the config's TOML by dotted key (a count that became a fraction shows as the
/// one key unset and the other set).
fn flatten(cfg: &TrainConfig) -> Result<BTreeMap<String, String>> {
    let v = toml::Value::try_from(cfg).map_err(|e| Error::Invalid(e.to_string()))?;
    let mut out = BTreeMap::new();
    fn walk(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.to_string());
            }
        }
    }
    walk("", &v, &mut out);
    Ok(out)
}

/// A change as one line of an error or the report.
pub fn describe(c: &Change) -> String {
    format!("  {}: {} → {}", c.key, c.before, c.after)
}

/// Appends a resume with changes to the run directory's `resumes.json`.
pub fn record(dir: &Path, at_step: usize, changes: Vec<Change>) -> Result<()> {
    if changes.is_empty() {
        return Ok(());
    }
    let mut all = read(dir)?;
    all.push(Resume { at_step, changes });
    records::write_json(&dir.join(files::RESUMES), &all)
}

/// The resumes with changed settings a run directory records (none when the file is absent).
pub fn read(dir: &Path) -> Result<Vec<Resume>> {
    let path = dir.join(files::RESUMES);
    if !path.exists() {
        return Ok(Vec::new());
    }
    records::read_json(&path)
}
