//! Argument types of the subcommands, each turned into the typed library config it stands for.

use std::path::PathBuf;

use candle_core::Device;
use clap::{Args, Subcommand};

use crate::bench::batching::BatchingBench;
use crate::bench::suite::Suite;
use crate::data::batching::Batching;
use crate::data::encode::{
    EncodeConfig, EosPolicy, LabelPolicy, Padding, PaddingSide, PromptTemplate,
};
use crate::device::{DeviceSpec, Precision};
use crate::error::{Error, Result};
use crate::model::fixture::{BenchShape, FixtureDtype, FixtureSpec};
use crate::model::load::DEFAULT_HUB_ID;
use crate::model::lora::LoraConfig;
use crate::progress::{LogFormat, Mode};
use crate::train::config::ConfigSource;

/// A clap value parser for a count in `LO..=HI`: the error states the allowed range, and clap
/// names the flag and exits with status 2 before anything runs.
pub fn count<const LO: usize, const HI: usize>(s: &str) -> std::result::Result<usize, String> {
    let n: usize = s
        .trim()
        .parse()
        .map_err(|e| format!("{e}: expected an integer in {LO}..={HI}"))?;
    if (LO..=HI).contains(&n) {
        Ok(n)
    } else {
        Err(format!("must be in {LO}..={HI}, got {n}"))
    }
}

/// A clap value parser for a finite number > 0.
pub fn positive(s: &str) -> std::result::Result<f64, String> {
    let x: f64 = s
        .trim()
        .parse()
        .map_err(|e| format!("{e}: expected a number"))?;
    if x.is_finite() && x > 0.0 {
        Ok(x)
    } else {
        Err(format!("must be a finite number > 0, got {x}"))
    }
}

/// A clap value parser for a share in (0, 1].
pub fn share(s: &str) -> std::result::Result<f64, String> {
    let x: f64 = s
        .trim()
        .parse()
        .map_err(|e| format!("{e}: expected a number"))?;
    if x > 0.0 && x <= 1.0 {
        Ok(x)
    } else {
        Err(format!("must be in (0, 1], got {x}"))
    }
}

/// The most steps `--max-steps` and `--steps` accept (10^9).
const MAX_STEPS: usize = 1_000_000_000;
/// The most rows per batch `--batch-size` accepts.
const MAX_BATCH: usize = 65_536;
/// The longest lengths `--max-len`, `--pad-to-multiple-of`, `--max-new-tokens`,
/// `--gen-tokens` and `--max-positions` accept (1 Mi).
const MAX_LEN: usize = crate::data::encode::MAX_LEN_LIMIT;
/// The most elements a generated fixture model may hold (2^30, 4 GiB in f32).
const MAX_FIXTURE_PARAMS: u64 = 1 << 30;

/// `lorasft train`.
#[derive(Args)]
pub struct TrainArgs {
    /// TOML config; keys not given keep the preset's values.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Preset the config starts from: day2, smoke, smollm2-demo.
    #[arg(long, default_value = "day2")]
    pub preset: String,
    /// Override any key, e.g. `--set optim.lr=1e-4 --set train.max_steps=20`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Sets `train.max_steps`.
    #[arg(long, value_parser = count::<1, MAX_STEPS>)]
    pub max_steps: Option<usize>,
    /// Sets `run.name`.
    #[arg(long)]
    pub name: Option<String>,
    /// Sets `run.out_dir`.
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Sets `run.seed`.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Sets `run.device`: auto, cpu, cuda or cuda:N.
    #[arg(long)]
    pub device: Option<DeviceSpec>,
    /// Sets `run.precision`.
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
    /// Sets `model.init_adapter`: start from a saved adapter (its r, alpha, dropout and
    /// targets are adopted).
    #[arg(long)]
    pub init_adapter: Option<PathBuf>,
    /// Sets `model.keep_quantized`: keep a `gguf:` base's projections quantized in memory.
    #[arg(long)]
    pub keep_quantized: bool,
    /// Sets `encode.batching`: padded, group-by-length or packed.
    #[arg(long, value_enum)]
    pub batching: Option<Batching>,
    /// Sets `train.gradient_checkpointing`: recompute activations in the backward (same
    /// results, far less memory, about a third more time per step).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Sets `report.tensorboard`: write TensorBoard event files into `RUN/tensorboard/`.
    #[arg(long)]
    pub tensorboard: bool,
    /// Continue from the run directory's latest checkpoint.
    #[arg(long, conflicts_with = "overwrite")]
    pub resume: bool,
    /// With --resume: continue even though settings that break equality with an
    /// uninterrupted run changed (learning rate, batch, seed, data, …); the report lists them.
    #[arg(long, requires = "resume")]
    pub allow_config_change: bool,
    /// Clear a run directory that holds another run's files and start over (without it, a
    /// fresh run refuses such a directory).
    #[arg(long)]
    pub overwrite: bool,
    /// Sets `data.validation = "none"`: train on every record, with no evaluation and no
    /// best-adapter choice.
    #[arg(long)]
    pub no_validation: bool,
    /// Print the resolved config and exit.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    /// Progress output.
    pub output: OutputArgs,
}

impl TrainArgs {
    /// Where the run's config comes from: the flags, typed.
    pub fn config_source(&self) -> ConfigSource {
        ConfigSource {
            preset: self.preset.clone(),
            file: self.config.clone(),
            set: self.overrides.clone(),
            max_steps: self.max_steps,
            name: self.name.clone(),
            out_dir: self.out_dir.clone(),
            seed: self.seed,
            device: self.device,
            precision: self.precision,
            init_adapter: self.init_adapter.clone(),
            keep_quantized: self.keep_quantized,
            batching: self.batching,
            gradient_checkpointing: self.gradient_checkpointing,
            no_validation: self.no_validation,
            tensorboard: self.tensorboard,
        }
    }
}

/// How a long command shows its progress on stderr (`train`, `eval`, `data encode`,
/// `import-gguf`, `export-gguf`).
#[derive(Args, Clone, Copy)]
pub struct OutputArgs {
    /// No progress output (results, warnings and errors still print).
    #[arg(long)]
    pub quiet: bool,
    /// Progress as plain text or JSON lines (default: a bar on a terminal, text lines
    /// elsewhere). `--quiet` wins.
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
}

impl OutputArgs {
    /// The progress mode for this process's stderr (terminal or not, `NO_COLOR`).
    pub fn mode(self) -> Mode {
        Mode::for_stderr(self.quiet, self.log_format)
    }
}

/// Where to compute and in what precision (every command that runs the model).
#[derive(Args, Clone, Copy)]
pub struct DeviceArgs {
    /// auto (CUDA when built with it and present, else CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
    /// Precision of the frozen base and activations; adapters, AdamW and the loss stay f32.
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    pub precision: Precision,
}

impl DeviceArgs {
    /// Opens the device.
    pub fn open(self) -> Result<Device> {
        self.device.open()
    }
}

/// The model a command runs: where, in what precision, with which adapter and tokenizer.
#[derive(Args)]
pub struct ModelArgs {
    #[command(flatten)]
    /// Device and precision.
    pub dev: DeviceArgs,
    /// Model directory, hub id, `gguf:PATH` or `fixture:SEED`.
    #[arg(long, value_hint = clap::ValueHint::AnyPath)]
    pub model: String,
    /// Adapter directory (PEFT format).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// tokenizer.json (default: the model directory's).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

/// Encoding flags shared by the data commands.
#[derive(Args)]
pub struct EncodeArgs {
    /// Longest row in tokens.
    #[arg(long, default_value_t = 512, value_parser = count::<2, MAX_LEN>)]
    pub max_len: usize,
    /// Label policy.
    #[arg(long, value_enum, default_value_t = LabelPolicy::InputIds)]
    pub labels: LabelPolicy,
    /// Padding: `max-length` or `longest`.
    #[arg(long, default_value = "max-length", value_parser = ["max-length", "longest"])]
    pub padding: String,
    /// With `--padding longest`, round the length up to a multiple of this (at most --max-len).
    #[arg(long, value_parser = count::<1, MAX_LEN>)]
    pub pad_to_multiple_of: Option<usize>,
    /// Padding side.
    #[arg(long, value_enum, default_value_t = PaddingSide::Right)]
    pub padding_side: PaddingSide,
    /// Append EOS after the response.
    #[arg(long, value_enum, default_value_t = EosPolicy::Omit)]
    pub eos: EosPolicy,
    /// How examples become rows: padded (one per row), group-by-length, or packed.
    #[arg(long, value_enum, default_value_t = Batching::Padded)]
    pub batching: Batching,
    /// How Alpaca records become text: the reference prompt, or the model's chat template.
    #[arg(long, value_enum, default_value_t = PromptTemplate::Alpaca)]
    pub template: PromptTemplate,
    /// A chat template overriding the model's (.jinja, tokenizer_config.json, model dir, GGUF).
    #[arg(long)]
    pub chat_template: Option<std::path::PathBuf>,
}

impl EncodeArgs {
    /// The encoding these flags describe, validated (`EncodeConfig::validate`).
    pub fn config(&self) -> Result<EncodeConfig> {
        if self.pad_to_multiple_of.is_some() && self.padding != "longest" {
            return Err(Error::Invalid(
                "--pad-to-multiple-of applies only with --padding longest".into(),
            ));
        }
        let cfg = EncodeConfig {
            max_len: self.max_len,
            padding: if self.padding == "longest" {
                Padding::Longest {
                    multiple_of: self.pad_to_multiple_of,
                }
            } else {
                Padding::MaxLength
            },
            padding_side: self.padding_side,
            labels: self.labels,
            eos: self.eos,
            batching: self.batching,
            template: self.template,
            chat_template: self.chat_template.clone(),
            chat_template_name: None,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// `lorasft eval`.
#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    /// The model.
    pub m: ModelArgs,
    /// Dataset.
    #[arg(long)]
    pub data: PathBuf,
    #[command(flatten)]
    /// Encoding.
    pub encode: EncodeArgs,
    /// Rows per batch.
    #[arg(long, default_value_t = 4, value_parser = count::<1, MAX_BATCH>)]
    pub batch_size: usize,
    /// Write per-record losses as JSON to this file.
    #[arg(long)]
    pub per_record: Option<PathBuf>,
    #[command(flatten)]
    /// Progress output.
    pub output: OutputArgs,
}

/// `lorasft generate`.
#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    /// The model.
    pub m: ModelArgs,
    /// Raw prompt text.
    #[arg(long, conflicts_with = "instruction")]
    pub prompt: Vec<String>,
    /// Instruction, formatted with the reference template (repeatable).
    #[arg(long)]
    pub instruction: Vec<String>,
    /// Input for the (single) instruction.
    #[arg(long)]
    pub input: Option<String>,
    /// Most new tokens.
    #[arg(long, default_value_t = 64, value_parser = count::<1, MAX_LEN>)]
    pub max_new_tokens: usize,
    /// Sample with this temperature (greedy when absent).
    #[arg(long, value_parser = positive)]
    pub temperature: Option<f64>,
    /// Nucleus mass for sampling.
    #[arg(long, default_value_t = 0.9, value_parser = share)]
    pub top_p: f64,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// With --adapter, also answer with the base model, side by side.
    #[arg(long)]
    pub compare: bool,
    /// Prompt in the model's chat template: each --instruction is a user turn (or give
    /// --messages); generation stops at the template's end-of-turn token or EOS.
    #[arg(long)]
    pub chat: bool,
    /// With --chat: a conversation to continue (JSON: messages, or {messages, tools}).
    #[arg(long, requires = "chat", conflicts_with = "instruction")]
    pub messages: Option<PathBuf>,
    /// With --chat: a template overriding the model's.
    #[arg(long, requires = "chat")]
    pub chat_template: Option<PathBuf>,
}

/// `lorasft chat render`.
#[derive(Args)]
pub struct ChatRenderArgs {
    /// The template: a .jinja file, a tokenizer_config.json, a model directory or a GGUF.
    #[arg(long)]
    pub template: PathBuf,
    /// Which of several named templates (a tokenizer_config.json list, a GGUF's named ones).
    #[arg(long)]
    pub template_name: Option<String>,
    /// JSON: an array of messages, or an object with `messages` (and `tools`).
    #[arg(long)]
    pub messages: PathBuf,
    /// End with the header of a new assistant turn, as for generation.
    #[arg(long)]
    pub add_generation_prompt: bool,
    /// `bos_token` (default: the tokenizer config's, when the template comes from one).
    #[arg(long)]
    pub bos_token: Option<String>,
    /// `eos_token` (default: as for --bos-token).
    #[arg(long)]
    pub eos_token: Option<String>,
}

/// A dataset and the tokenizer it is encoded with, for the data commands.
#[derive(Args)]
pub struct DataSourceArgs {
    /// Dataset: JSON array or JSONL of Alpaca records, `messages`, ShareGPT `conversations`,
    /// or `prompt`/`completion`.
    #[arg(long)]
    pub data: PathBuf,
    /// The records' format (detected from the first record when absent).
    #[arg(long, value_enum)]
    pub format: Option<crate::data::formats::DataFormat>,
    /// Field name mapping, CANONICAL=NAME (repeatable): `--column messages=dialog`.
    #[arg(long = "column", value_name = "CANONICAL=NAME")]
    pub columns: Vec<String>,
    /// Model whose tokenizer (and chat template) to use: a directory, hub id or `gguf:PATH`.
    #[arg(long, required_unless_present = "tokenizer", value_hint = clap::ValueHint::AnyPath)]
    pub model: Option<String>,
    /// tokenizer.json (tokenizer_config.json beside it gives EOS/pad and the chat template).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

impl DataSourceArgs {
    /// The `--column` mappings as a map, each checked to be `CANONICAL=NAME`.
    pub fn columns(&self) -> Result<crate::data::formats::Columns> {
        self.columns
            .iter()
            .map(|c| match c.split_once('=') {
                Some((k, v)) if !k.is_empty() && !v.is_empty() => {
                    Ok((k.to_string(), v.to_string()))
                }
                _ => Err(Error::Invalid(format!(
                    "--column {c:?}: expected CANONICAL=NAME, e.g. messages=dialog"
                ))),
            })
            .collect()
    }
}

/// `lorasft data encode`.
#[derive(Args)]
pub struct DataEncodeArgs {
    #[command(flatten)]
    /// Dataset and tokenizer.
    pub source: DataSourceArgs,
    #[command(flatten)]
    /// Encoding.
    pub encode: EncodeArgs,
    /// Output JSONL: one `{"text", "input_ids", "labels"}` line per example.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    /// Progress output.
    pub output: OutputArgs,
}

/// `lorasft data show`.
#[derive(Args)]
pub struct DataShowArgs {
    #[command(flatten)]
    /// Dataset and tokenizer.
    pub source: DataSourceArgs,
    #[command(flatten)]
    /// Encoding.
    pub encode: EncodeArgs,
    /// How many records to show.
    #[arg(long, default_value_t = 3, value_parser = count::<1, MAX_BATCH>)]
    pub records: usize,
    /// The first record shown (0-based).
    #[arg(long, default_value_t = 0)]
    pub start: usize,
}

/// `lorasft merge`.
#[derive(Args)]
pub struct MergeArgs {
    #[command(flatten)]
    /// Device and precision.
    pub dev: DeviceArgs,
    /// Base model directory or hub id.
    #[arg(long, value_hint = clap::ValueHint::AnyPath)]
    pub model: String,
    /// Adapter directory.
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
}

/// `lorasft export-gguf`.
#[derive(Args)]
pub struct ExportGgufArgs {
    /// Base model: directory, hub id, `gguf:PATH` or `fixture:...`.
    #[arg(long, value_hint = clap::ValueHint::AnyPath)]
    pub model: String,
    /// Adapter directory to merge into the base first.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Tensor types (q4_k_m and q5_k_m are llama.cpp's mixes).
    #[arg(long = "type", value_enum)]
    pub ty: crate::export::ExportType,
    /// tokenizer.json to embed (default: the model directory's).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// The GGUF file to write.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    /// Progress output.
    pub output: OutputArgs,
}

/// `lorasft tokenizer ...`.
#[derive(Subcommand)]
pub enum TokenizerCommand {
    /// Convert the vocabulary of a GGUF file into tokenizer.json (+ tokenizer_config.json beside it).
    FromGguf {
        /// The GGUF file.
        file: PathBuf,
        /// Output tokenizer.json path.
        #[arg(long)]
        out: PathBuf,
    },
    /// Train the small Llama-shaped fixture tokenizer on a dataset's formatted text.
    TrainFixture {
        /// Dataset (JSON array or JSONL).
        #[arg(long)]
        data: PathBuf,
        /// Vocabulary size.
        #[arg(long, default_value_t = 512, value_parser = count::<260, MAX_LEN>)]
        vocab: usize,
        /// Output tokenizer.json path.
        #[arg(long)]
        out: PathBuf,
    },
}

/// `lorasft data stats`.
#[derive(Args)]
pub struct StatsArgs {
    /// Dataset (JSON array or JSONL of {instruction, input?, output}).
    #[arg(long)]
    pub data: PathBuf,
    /// tokenizer.json (tokenizer_config.json beside it is read for EOS/pad).
    #[arg(long)]
    pub tokenizer: PathBuf,
    #[command(flatten)]
    /// Encoding.
    pub encode: EncodeArgs,
    /// Rows per micro-batch (batches in file order).
    #[arg(long, default_value_t = 1, value_parser = count::<1, MAX_BATCH>)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step, for the steps-per-epoch column.
    #[arg(long, default_value_t = 1, value_parser = count::<1, MAX_BATCH>)]
    pub grad_accum: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `lorasft fixture tiny-llama`.
#[derive(Args)]
pub struct TinyLlamaArgs {
    /// Seed of the weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Residual width.
    #[arg(long, default_value_t = FixtureSpec::default().hidden, value_parser = count::<1, 65_536>)]
    pub hidden: usize,
    /// MLP width.
    #[arg(long, default_value_t = FixtureSpec::default().intermediate, value_parser = count::<1, 262_144>)]
    pub intermediate: usize,
    /// Decoder layers.
    #[arg(long, default_value_t = FixtureSpec::default().layers, value_parser = count::<1, 1024>)]
    pub layers: usize,
    /// Query heads.
    #[arg(long, default_value_t = FixtureSpec::default().heads, value_parser = count::<1, 1024>)]
    pub heads: usize,
    /// Key/value heads.
    #[arg(long, default_value_t = FixtureSpec::default().kv_heads, value_parser = count::<1, 1024>)]
    pub kv_heads: usize,
    /// Vocabulary size.
    #[arg(long, default_value_t = FixtureSpec::default().vocab, value_parser = count::<1, MAX_LEN>)]
    pub vocab: usize,
    /// Longest position.
    #[arg(long, default_value_t = FixtureSpec::default().max_positions, value_parser = count::<1, MAX_LEN>)]
    pub max_positions: usize,
    /// Tie lm_head to the embedding.
    #[arg(long)]
    pub tied: bool,
    /// Storage dtype of model.safetensors.
    #[arg(long, value_enum, default_value_t = FixtureDtype::F32)]
    pub dtype: FixtureDtype,
}

impl TinyLlamaArgs {
    /// The fixture shape these flags describe, validated before anything is written: a
    /// consistent shape of at most 2^30 parameters.
    pub fn spec(&self) -> Result<FixtureSpec> {
        let spec = FixtureSpec {
            hidden: self.hidden,
            intermediate: self.intermediate,
            layers: self.layers,
            heads: self.heads,
            kv_heads: self.kv_heads,
            vocab: self.vocab,
            max_positions: self.max_positions,
            tied: self.tied,
            dtype: self.dtype,
            ..FixtureSpec::default()
        };
        let shape = spec.config().shape().map_err(Error::Invalid)?;
        if shape.base_params() > MAX_FIXTURE_PARAMS {
            return Err(Error::Invalid(format!(
                "a fixture of {} parameters is over the limit of {MAX_FIXTURE_PARAMS}: \
                 lower --hidden, --intermediate, --layers or --vocab",
                shape.base_params()
            )));
        }
        Ok(spec)
    }
}

/// `lorasft inspect`.
#[derive(Args)]
pub struct InspectArgs {
    /// A model directory (Hugging Face layout) or a hub id.
    #[arg(long, default_value = DEFAULT_HUB_ID, value_hint = clap::ValueHint::AnyPath)]
    pub model: String,
    /// Read config.json only; do not load weights.
    #[arg(long)]
    pub config_only: bool,
    /// LoRA rank.
    #[arg(long, default_value_t = LoraConfig::default().r, value_parser = count::<1, 4096>)]
    pub r: usize,
    /// LoRA alpha.
    #[arg(long, default_value_t = LoraConfig::default().alpha, value_parser = positive)]
    pub alpha: f64,
    /// Comma-separated target modules, or `all-linear`.
    #[arg(long, default_value = "q_proj,v_proj")]
    pub targets: String,
    /// Use rsLoRA scaling (alpha / sqrt r).
    #[arg(long)]
    pub rslora: bool,
}

impl InspectArgs {
    /// The LoRA config these flags describe, validated.
    pub fn lora(&self) -> Result<LoraConfig> {
        let lora = LoraConfig {
            r: self.r,
            alpha: self.alpha,
            targets: LoraConfig::parse_targets(&self.targets)?,
            use_rslora: self.rslora,
            ..LoraConfig::default()
        };
        lora.validate()?;
        Ok(lora)
    }
}

/// `lorasft bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// Shapes to run.
    #[arg(long, value_delimiter = ',', default_values = ["tiny", "smollm2"])]
    pub shapes: Vec<BenchShape>,
    /// Thread counts; each (shape, threads) pair runs in a fresh process.
    #[arg(long, value_delimiter = ',', default_values = ["1", "2"], value_parser = count::<1, 1024>)]
    pub threads: Vec<usize>,
    /// Timed steps per shape (after one warm-up step); the table gives the median.
    #[arg(long, default_value_t = 5, value_parser = count::<1, MAX_STEPS>)]
    pub steps: usize,
    /// New tokens for the generation figure.
    #[arg(long, default_value_t = 32, value_parser = count::<0, MAX_LEN>)]
    pub gen_tokens: usize,
    /// Seed of the weights and the batch.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// JSON-lines rows of another implementation (scripts/bench_pytorch.py) to show beside.
    #[arg(long)]
    pub compare: Vec<PathBuf>,
    /// A command that benchmarks another implementation, run back to back with each lorasft
    /// process and given `--shapes S --threads T --steps N --seed X`; it prints bench rows as
    /// JSON lines (e.g. "python scripts/bench_pytorch.py"). The ratio column is then paired.
    #[arg(long)]
    pub against: Option<String>,
    /// Rounds of the whole run; with --against, the order of the pair alternates per round
    /// and the table gives medians over rounds.
    #[arg(long, default_value_t = 1, value_parser = count::<1, 1000>)]
    pub rounds: usize,
    /// Also write every row as JSON lines here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Dataset for the encoding figure.
    #[arg(long, default_value = ".cache/assets/data/alpaca_en_demo.json")]
    pub data: PathBuf,
    /// Tokenizer for the encoding figure.
    #[arg(long, default_value = ".cache/assets/tok/llama-spm/tokenizer.json")]
    pub tokenizer: PathBuf,
    /// Run one shape in this process and print its row as JSON (what the table spawns).
    #[arg(long, hide = true)]
    pub one: bool,
    /// Measure real tokens/s of each batching mode on a preset's data and settings instead
    /// (`--preset`, `--threads`, `--skip`, `--steps`, `--rounds` apply).
    #[arg(long)]
    pub batching: bool,
    /// With --batching: the preset whose data, model and settings run.
    #[arg(long, default_value = "smollm2-demo")]
    pub preset: String,
    /// Measure the peak RSS and ms/step of a training step (batch 1 × 256) with the base in
    /// f32 and kept quantized (Q4_K_M), activations kept and recomputed, each in a child
    /// process (`--memory-shape`, `--threads`, `--steps`, `--seed` apply).
    #[arg(long)]
    pub memory: bool,
    /// With --memory: the fixture's shape.
    #[arg(long, value_enum, default_value = "tinyllama")]
    pub memory_shape: BenchShape,
    /// With --memory: the Q4_K_M GGUF of the fixture, written there first when absent
    /// (default: .cache/bench/SHAPE-fixture-q4_k_m.gguf).
    #[arg(long)]
    pub memory_gguf: Option<PathBuf>,
    /// With --memory --one: load the GGUF kept quantized instead of the f32 fixture.
    #[arg(long, hide = true)]
    pub memory_quantized: bool,
    /// With --memory --one: recompute activations in the backward.
    #[arg(long, hide = true)]
    pub memory_recompute: bool,
    /// With --batching: untimed steps before the timed ones.
    #[arg(long, default_value_t = 1, value_parser = count::<0, MAX_STEPS>)]
    pub skip: usize,
}

impl BenchArgs {
    /// The batching bench these flags describe.
    pub fn batching_bench(&self) -> BatchingBench {
        BatchingBench {
            preset: self.preset.clone(),
            threads: self.threads.clone(),
            skip: self.skip,
            steps: self.steps,
            rounds: self.rounds,
        }
    }

    /// The suite these flags describe.
    pub fn suite(&self) -> Suite {
        Suite {
            shapes: self.shapes.clone(),
            threads: self.threads.clone(),
            steps: self.steps,
            gen_tokens: self.gen_tokens,
            seed: self.seed,
            against: self.against.clone(),
            rounds: self.rounds,
            compare: self.compare.clone(),
            encoding: (self.data.clone(), self.tokenizer.clone()),
        }
    }
}
