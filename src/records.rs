//! The run directory's records: the typed files a training run writes and the report reads.
//!
//! The trainer writes these files and the report reads them; neither imports the other. Each
//! record is one file: `manifest.json`, `data.json`, `checks.json`, `summary.json`,
//! `metrics.jsonl` and `generations.json` (the run's `config.toml` is the config's own TOML).
//! Whole-file writes are atomic and durable (a temporary file fsync'd and renamed into place,
//! then its directory fsync'd), so a killed run never leaves a half-written record; metrics
//! lines are appended, and a resume cuts the file back to the lines its checkpoint counted.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::dataset::{Split, SplitSpec};
use crate::data::stats::DataStats;
use crate::error::{Error, Result};
use crate::generate::Generation;

/// File names inside a run directory.
pub mod files {
    /// The resolved config.
    pub const CONFIG: &str = "config.toml";
    /// [`super::Manifest`].
    pub const MANIFEST: &str = "manifest.json";
    /// [`super::DataRecord`].
    pub const DATA: &str = "data.json";
    /// [`super::RunChecks`].
    pub const CHECKS: &str = "checks.json";
    /// [`super::Summary`].
    pub const SUMMARY: &str = "summary.json";
    /// One [`super::Metric`] per line.
    pub const METRICS: &str = "metrics.jsonl";
    /// Generations with the starting adapter.
    pub const GENERATIONS_BEFORE: &str = "generations_before.json";
    /// (before, after) generation pairs.
    pub const GENERATIONS: &str = "generations.json";
    /// Resumes that changed settings (`crate::train::continuation`).
    pub const RESUMES: &str = "resumes.json";
}

/// What a metrics line measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricKind {
    /// One optimizer step's training loss.
    Train,
    /// The validation set's loss.
    Eval,
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    /// Optimizer step (after the update).
    pub step: usize,
    /// Training step or evaluation.
    pub kind: MetricKind,
    /// Token-weighted mean loss of the step (train) or of the validation set (eval).
    pub loss: f64,
    /// Perplexity, exp(loss) (eval lines).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ppl: Option<f64>,
    /// Learning rate used by the update (train lines).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// Gradient norm before clipping (train lines).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    /// Loss targets in the step or evaluation.
    pub targets: usize,
    /// Real tokens trained on so far (train lines).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_seen: Option<u64>,
    /// Throughput over the run so far, real tokens per second (train lines).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    /// All token slots trained on so far, padding included (train lines).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub padded_tokens_seen: Option<u64>,
    /// Throughput over the run so far, all token slots (padding included) per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub padded_tokens_per_s: Option<f64>,
    /// Seconds since the run (or resume) started.
    pub elapsed_s: f64,
}

impl Metric {
    /// An evaluation line: validation loss, its perplexity and target count at `step`.
    pub fn eval(step: usize, loss: f64, targets: usize, elapsed_s: f64) -> Self {
        Self {
            step,
            kind: MetricKind::Eval,
            loss,
            ppl: Some(loss.exp()),
            lr: None,
            grad_norm: None,
            targets,
            tokens_seen: None,
            tokens_per_s: None,
            padded_tokens_seen: None,
            padded_tokens_per_s: None,
            elapsed_s,
        }
    }

    /// Whether this is a training-step line.
    pub fn is_train(&self) -> bool {
        self.kind == MetricKind::Train
    }

    /// Whether this is an evaluation line.
    pub fn is_eval(&self) -> bool {
        self.kind == MetricKind::Eval
    }
}

/// What a finished (or interrupted) run reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    /// The run directory.
    pub run_dir: PathBuf,
    /// The final adapter directory.
    pub adapter_dir: PathBuf,
    /// Optimizer steps done.
    pub steps: usize,
    /// Loss of the first logged step of this run.
    pub first_loss: Option<f64>,
    /// Loss of the last step.
    pub last_loss: Option<f64>,
    /// Validation loss at the end.
    pub eval_loss: Option<f64>,
    /// Best validation loss seen.
    pub best_eval_loss: Option<f64>,
    /// Real tokens per second over the run.
    pub tokens_per_s: f64,
    /// Wall time of the loop in seconds.
    pub wall_s: f64,
    /// Peak resident memory in MiB (VmHWM), when the OS reports it.
    pub peak_rss_mib: Option<f64>,
    /// Steps skipped for lack of trainable tokens.
    pub skipped_steps: usize,
    /// Steps whose gradient was clipped.
    pub clipped_steps: usize,
    /// Steps skipped because f16 gradients overflowed (the loss scale was halved).
    #[serde(default)]
    pub overflow_steps: usize,
    /// Whether Ctrl-C stopped the run early.
    pub interrupted: bool,
    /// Generations before and after training, per prompt.
    pub generations: Vec<(Generation, Generation)>,
}

/// The checks a run performed on itself, with their measured results (`None`: not measured).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunChecks {
    /// PEFT's trainable-parameter line for the adapted model.
    pub trainable_params: String,
    /// Number of base tensors fingerprinted.
    pub base_tensors: usize,
    /// Digest of all base-tensor SHA-256s before training.
    pub base_fingerprint_before: String,
    /// The same after training.
    pub base_fingerprint_after: String,
    /// Base tensors whose bytes changed (must be empty).
    pub changed_base_tensors: Vec<String>,
    /// Adapter tensors (A and B) in the model.
    pub adapter_tensors: usize,
    /// lora_B tensors with a non-zero gradient on the run's first backward.
    pub lora_b_with_grad_first_step: Option<usize>,
    /// lora_A tensors with a non-zero gradient on the backward after the first update.
    pub lora_a_with_grad_after_first_update: Option<usize>,
    /// Loss of the run's first step.
    pub first_loss: Option<f64>,
    /// Loss of its last step.
    pub last_loss: Option<f64>,
    /// Whether every logged loss was finite.
    pub all_losses_finite: bool,
    /// (step, validation loss) of every evaluation.
    pub eval_losses: Vec<(usize, f64)>,
}

/// Everything needed to repeat a run and to know what produced it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// lorasft's version.
    pub lorasft_version: String,
    /// Git commit the binary was built from.
    pub git_commit: String,
    /// candle-core's version.
    pub candle_version: String,
    /// tokenizers' version.
    pub tokenizers_version: String,
    /// safetensors' version.
    pub safetensors_version: String,
    /// The command line that started the run.
    pub command: Vec<String>,
    /// The run's seed.
    pub seed: u64,
    /// SHA-256 of the resolved config (config.toml).
    pub config_sha256: String,
    /// The dataset file.
    pub data_path: PathBuf,
    /// Its SHA-256.
    pub data_sha256: String,
    /// The tokenizer file.
    pub tokenizer_path: PathBuf,
    /// Its SHA-256.
    pub tokenizer_sha256: String,
    /// The base model as named by the config.
    pub base_model: String,
    /// The base's hub repository id, when one is known: the model card's `base_model`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model_hub_id: Option<String>,
    /// Its shape, as `lorasft inspect` prints it.
    pub model_shape: String,
    /// Digest of the SHA-256 of every base tensor.
    pub base_weights_digest: String,
    /// How the base was held in memory ([`crate::model::Llama::base_format`]).
    #[serde(default)]
    pub base_format: String,
    /// The device the run computed on, as opened ("cpu", "cuda:0").
    pub device: String,
    /// The precision of the frozen base and activations ("fp32", "bf16", "f16").
    #[serde(default = "default_precision")]
    pub precision: String,
    /// CPU model name.
    pub cpu: String,
    /// Worker threads candle uses.
    pub threads: usize,
    /// The instruction set of the CPU kernels ([`crate::device::cpu_kernels`]); empty in runs
    /// recorded before lorasft wrote it.
    #[serde(default)]
    pub cpu_kernels: String,
    /// Operating system.
    pub os: String,
    /// Host name.
    pub host: String,
    /// Start time, seconds since the Unix epoch.
    pub started_at: u64,
    /// How the run was spread over processes (one, for runs recorded before lorasft trained
    /// on several).
    #[serde(default)]
    pub parallelism: Parallelism,
}

/// How a run was spread over processes, and what that means for its numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Parallelism {
    /// Processes (MPI ranks) that trained it; `threads` in the manifest is per rank.
    pub ranks: usize,
    /// What carried the collectives ("single process", "MPI (Open MPI v4.1.4)").
    pub transport: String,
    /// How the micro-batch gradients of a step were summed.
    pub reduction: String,
    /// Whether the losses and adapter are bit-identical to one process with the same config
    /// and threads per process.
    pub bit_identical_to_one_process: bool,
}

impl Default for Parallelism {
    fn default() -> Self {
        Self {
            ranks: 1,
            transport: "single process".into(),
            reduction: REDUCTION.into(),
            bit_identical_to_one_process: true,
        }
    }
}

/// The one reduction lorasft does, on one process or many.
pub const REDUCTION: &str = "exact: every micro-batch's gradients summed in global micro-batch order (a left fold), whichever rank computed them";

impl Parallelism {
    /// The parallelism of a run on `world`. `device_dropout` says that dropout masks come
    /// from an accelerator's own generator (dropout on, off the CPU): each rank then draws its
    /// own, and several ranks are not one process bit for bit.
    pub fn of(world: &dyn crate::world::World, device_dropout: bool) -> Self {
        Self {
            ranks: world.size(),
            transport: world.transport(),
            bit_identical_to_one_process: world.size() == 1 || !device_dropout,
            ..Self::default()
        }
    }
}

/// Runs recorded before the manifest named its precision were all fp32.
fn default_precision() -> String {
    "fp32".into()
}

/// The dataset side of a run: sizes, split and encoding statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataRecord {
    /// The dataset file.
    pub path: PathBuf,
    /// Records in the file (after max_records).
    pub records: usize,
    /// The split rule.
    pub validation: SplitSpec,
    /// The split itself.
    pub split: Split,
    /// Statistics of the training subset under the encoding.
    pub train_stats: DataStats,
    /// Records with a non-blank input, over the whole file.
    pub with_input: usize,
    /// Vocabulary size of the tokenizer.
    pub vocab: usize,
    /// EOS token.
    pub eos: String,
    /// Pad token.
    pub pad: String,
    /// The first training record as the model sees it (prompt + response).
    pub example: String,
    /// The records' format (`alpaca`, `messages`, `sharegpt`, `prompt_completion`).
    #[serde(default = "default_format")]
    pub format: String,
    /// Where the template came from: the chat template's source, or the Alpaca prompt.
    #[serde(default = "default_template")]
    pub template: String,
    /// SHA-256 of the chat template's text, when one is used.
    #[serde(default)]
    pub template_sha256: Option<String>,
    /// How assistant spans were found, when a chat template is used.
    #[serde(default)]
    pub span_method: Option<String>,
    /// The first training example with its trained tokens in `[[ ]]`.
    #[serde(default)]
    pub marked_example: Option<String>,
    /// Validation conversations skipped for having no trained turn.
    #[serde(default)]
    pub val_skipped: usize,
}

impl DataRecord {
    /// Whether the run had validation examples to evaluate (`data.validation = "none"` has
    /// none, nor has a split whose conversations all lack a trained turn).
    pub fn has_validation(&self) -> bool {
        self.split.validation.len() > self.val_skipped
    }
}

/// Runs recorded before formats existed read Alpaca records.
fn default_format() -> String {
    "alpaca".into()
}

/// ... with the reference prompt.
fn default_template() -> String {
    "alpaca (the reference prompt)".into()
}

/// Every record of a finished run directory, as the report reads them.
#[derive(Debug, Clone)]
pub struct RunRecords {
    /// manifest.json.
    pub manifest: Manifest,
    /// data.json.
    pub data: DataRecord,
    /// checks.json.
    pub checks: RunChecks,
    /// summary.json.
    pub summary: Summary,
    /// metrics.jsonl.
    pub metrics: Vec<Metric>,
    /// generations.json: (before, after) per prompt.
    pub generations: Vec<(Generation, Generation)>,
}

impl RunRecords {
    /// Reads the records of a finished run directory.
    pub fn read(dir: &Path) -> Result<Self> {
        Ok(Self {
            manifest: read_json(&dir.join(files::MANIFEST))?,
            data: read_json(&dir.join(files::DATA))?,
            checks: read_json(&dir.join(files::CHECKS))?,
            summary: read_json(&dir.join(files::SUMMARY))?,
            metrics: read_metrics(&dir.join(files::METRICS))?,
            generations: read_json(&dir.join(files::GENERATIONS))?,
        })
    }
}

/// Reads and parses a JSON file, with errors naming it.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = crate::input::read_text(path, crate::input::DOCUMENT_CEILING, "a run record")?;
    serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

/// Writes pretty JSON atomically and durably (see [`crate::sys::write_atomic`]).
pub fn write_json(path: &Path, v: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::Invalid(e.to_string()))?;
    crate::sys::write_atomic(path, (text + "\n").as_bytes()).map_err(|(p, e)| Error::io(p, e))
}

/// Reads every line of a metrics.jsonl, with errors naming the file and line.
pub fn read_metrics(path: &Path) -> Result<Vec<Metric>> {
    let text = crate::input::read_text(path, crate::input::DATASET_CEILING, "a metrics.jsonl")?;
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| Error::Json {
                path: path.to_path_buf(),
                msg: format!("line {}: {e}", i + 1),
            })
        })
        .collect()
}

/// Appends one line to a metrics.jsonl.
pub fn append_metric(path: &Path, m: &Metric) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let line = serde_json::to_string(m).map_err(|e| Error::Invalid(e.to_string()))?;
    writeln!(f, "{line}").map_err(|e| Error::io(path, e))
}

/// Keeps the first `lines` lines of a metrics file (a resumed run rewrites what follows),
/// replacing the file atomically so a kill midway loses nothing.
pub fn truncate_metrics(path: &Path, lines: usize) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(Error::io(path, e)),
    };
    let kept: String = text.lines().take(lines).map(|l| format!("{l}\n")).collect();
    crate::sys::write_atomic(path, kept.as_bytes()).map_err(|(p, e)| Error::io(p, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_kind_is_written_as_the_lowercase_word_older_runs_used() {
        let m = Metric::eval(3, 1.5, 10, 0.0);
        let line = serde_json::to_string(&m).unwrap();
        assert!(line.contains(r#""kind":"eval""#), "{line}");
        let back: Metric = serde_json::from_str(&line).unwrap();
        assert_eq!(back, m);
        assert!(back.is_eval() && !back.is_train());
    }

    #[test]
    fn metrics_append_truncate_and_read_back_naming_a_bad_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(files::METRICS);
        for step in 0..3 {
            append_metric(&path, &Metric::eval(step, 1.0, 1, 0.0)).unwrap();
        }
        truncate_metrics(&path, 2).unwrap();
        assert_eq!(read_metrics(&path).unwrap().len(), 2);
        std::fs::write(&path, "{\"step\": 1}\n").unwrap();
        let err = read_metrics(&path).unwrap_err().to_string();
        assert!(
            err.contains("metrics.jsonl") && err.contains("line 1"),
            "{err}"
        );
    }
}
