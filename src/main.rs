//! The `lorasft` command line: parses arguments, calls one library function per subcommand,
//! prints, and picks the exit code.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand};
use lorasft::data::encode::{EncodeConfig, Encoder, EosPolicy, LabelPolicy, Padding, PaddingSide};
use lorasft::inspect;
use lorasft::model::config::LlamaConfig;
use lorasft::model::fixture::{FixtureDtype, FixtureSpec};
use lorasft::model::load::{self, DEFAULT_HUB_ID, ModelSource};
use lorasft::model::lora::LoraConfig;

#[derive(Parser)]
#[command(
    name = "lorasft",
    version,
    about = "LoRA fine-tuning for Llama-family models, verified"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate test fixtures.
    #[command(subcommand)]
    Fixture(FixtureCommand),
    /// Print a model's shape and PEFT's trainable-parameter line for a LoRA config.
    Inspect(InspectArgs),
    /// Build tokenizer.json files with the project's own code.
    #[command(subcommand)]
    Tokenizer(TokenizerCommand),
    /// Inspect datasets.
    #[command(subcommand)]
    Data(DataCommand),
}

#[derive(Subcommand)]
enum TokenizerCommand {
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
        #[arg(long, default_value_t = 512)]
        vocab: usize,
        /// Output tokenizer.json path.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Record counts, token lengths, truncation and label statistics under an encoding.
    Stats(StatsArgs),
}

#[derive(Args)]
struct StatsArgs {
    /// Dataset (JSON array or JSONL of {instruction, input?, output}).
    #[arg(long)]
    data: PathBuf,
    /// tokenizer.json (tokenizer_config.json beside it is read for EOS/pad).
    #[arg(long)]
    tokenizer: PathBuf,
    #[command(flatten)]
    encode: EncodeArgs,
    /// Rows per batch when padding to the longest (batches in file order).
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Encoding flags shared by the data commands.
#[derive(Args)]
struct EncodeArgs {
    /// Longest row in tokens.
    #[arg(long, default_value_t = 512)]
    max_len: usize,
    /// Label policy.
    #[arg(long, value_enum, default_value_t = LabelPolicy::InputIds)]
    labels: LabelPolicy,
    /// Padding: `max-length` or `longest`.
    #[arg(long, default_value = "max-length", value_parser = ["max-length", "longest"])]
    padding: String,
    /// With `--padding longest`, round the length up to a multiple of this.
    #[arg(long)]
    pad_to_multiple_of: Option<usize>,
    /// Padding side.
    #[arg(long, value_enum, default_value_t = PaddingSide::Right)]
    padding_side: PaddingSide,
    /// Append EOS after the response.
    #[arg(long, value_enum, default_value_t = EosPolicy::Omit)]
    eos: EosPolicy,
}

impl EncodeArgs {
    fn config(&self) -> EncodeConfig {
        EncodeConfig {
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
        }
    }
}

#[derive(Subcommand)]
enum FixtureCommand {
    /// Write a random Llama (config.json + model.safetensors), byte-identical per seed and shape.
    TinyLlama(TinyLlamaArgs),
}

#[derive(Args)]
struct TinyLlamaArgs {
    /// Seed of the weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Residual width.
    #[arg(long, default_value_t = FixtureSpec::default().hidden)]
    hidden: usize,
    /// MLP width.
    #[arg(long, default_value_t = FixtureSpec::default().intermediate)]
    intermediate: usize,
    /// Decoder layers.
    #[arg(long, default_value_t = FixtureSpec::default().layers)]
    layers: usize,
    /// Query heads.
    #[arg(long, default_value_t = FixtureSpec::default().heads)]
    heads: usize,
    /// Key/value heads.
    #[arg(long, default_value_t = FixtureSpec::default().kv_heads)]
    kv_heads: usize,
    /// Vocabulary size.
    #[arg(long, default_value_t = FixtureSpec::default().vocab)]
    vocab: usize,
    /// Longest position.
    #[arg(long, default_value_t = FixtureSpec::default().max_positions)]
    max_positions: usize,
    /// Tie lm_head to the embedding.
    #[arg(long)]
    tied: bool,
    /// Storage dtype of model.safetensors.
    #[arg(long, value_enum, default_value_t = FixtureDtype::F32)]
    dtype: FixtureDtype,
}

#[derive(Args)]
struct InspectArgs {
    /// A model directory (Hugging Face layout) or a hub id.
    #[arg(long, default_value = DEFAULT_HUB_ID)]
    model: String,
    /// Read config.json only; do not load weights.
    #[arg(long)]
    config_only: bool,
    /// LoRA rank.
    #[arg(long, default_value_t = LoraConfig::default().r)]
    r: usize,
    /// LoRA alpha.
    #[arg(long, default_value_t = LoraConfig::default().alpha)]
    alpha: f64,
    /// Comma-separated target modules, or `all-linear`.
    #[arg(long, default_value = "q_proj,v_proj")]
    targets: String,
    /// Use rsLoRA scaling (alpha / sqrt r).
    #[arg(long)]
    rslora: bool,
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Fixture(FixtureCommand::TinyLlama(a)) => {
            let spec = FixtureSpec {
                hidden: a.hidden,
                intermediate: a.intermediate,
                layers: a.layers,
                heads: a.heads,
                kv_heads: a.kv_heads,
                vocab: a.vocab,
                max_positions: a.max_positions,
                tied: a.tied,
                dtype: a.dtype,
                ..FixtureSpec::default()
            };
            spec.write(a.seed, &a.out)
                .with_context(|| format!("writing fixture to {}", a.out.display()))?;
            println!("wrote {} (seed {})", a.out.display(), a.seed);
        }
        Command::Inspect(a) => inspect_cmd(a)?,
        Command::Tokenizer(TokenizerCommand::FromGguf { file, out }) => {
            let n = lorasft::tokenizer::from_gguf::convert(&file, &out)?;
            println!(
                "wrote {} ({n} tokens) and tokenizer_config.json beside it",
                out.display()
            );
        }
        Command::Tokenizer(TokenizerCommand::TrainFixture { data, vocab, out }) => {
            let ds = lorasft::data::dataset::load(&data)?;
            let texts: Vec<String> = ds
                .records
                .iter()
                .map(|r| lorasft::data::prompt::format(r).text)
                .collect();
            let spm = lorasft::tokenizer::train::train_spm_bpe(&texts, vocab)?;
            let json = serde_json::to_string_pretty(&spm.to_json()?)?;
            std::fs::write(&out, json + "\n")
                .with_context(|| format!("writing {}", out.display()))?;
            println!("wrote {} ({} tokens)", out.display(), spm.tokens.len());
        }
        Command::Data(DataCommand::Stats(a)) => {
            let ds = lorasft::data::dataset::load(&a.data)?;
            let enc = Encoder::from_file(&a.tokenizer, a.encode.config())?;
            let start = std::time::Instant::now();
            let (stats, _) = lorasft::data::stats::compute(&ds.records, &enc, a.batch_size)?;
            let secs = start.elapsed().as_secs_f64();
            if a.json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                print!(
                    "{}",
                    lorasft::data::stats::render(&stats, &enc, &a.data, &a.tokenizer)
                );
                println!(
                    "encoding time: {:.3} s ({:.0} records/s)",
                    secs,
                    stats.records as f64 / secs
                );
            }
        }
    }
    Ok(())
}

fn inspect_cmd(a: InspectArgs) -> Result<()> {
    let lora = LoraConfig {
        r: a.r,
        alpha: a.alpha,
        targets: LoraConfig::parse_targets(&a.targets)?,
        use_rslora: a.rslora,
        ..LoraConfig::default()
    };
    lora.validate()?;
    let source = ModelSource::parse(&a.model);
    let config_path = load::resolve_config(&source)?;
    let cfg = LlamaConfig::from_file(&config_path)?;
    let shape = cfg
        .shape()
        .map_err(|m| anyhow::anyhow!("{}: {m}", config_path.display()))?;
    print!("{}", inspect::summary(&source.to_string(), &shape, &lora));
    if a.config_only {
        return Ok(());
    }
    let files = load::resolve(&source)?;
    let (mut model, report) = load::load_weights(&cfg, &files, DType::F32, &Device::Cpu)?;
    model.add_lora(&lora, 0)?;
    let counted = (model.trainable_params(), model.all_params());
    let from_config = inspect::lora_params(&shape, &lora);
    if counted.0 != from_config {
        bail!(
            "loaded adapters hold {} parameters, the config implies {from_config}",
            counted.0
        );
    }
    let dtypes: Vec<String> = report
        .file_dtypes
        .iter()
        .map(|(d, n)| format!("{n} {d}"))
        .collect();
    println!(
        "weights: {} files, {} tensors ({}), {} unused; counted from loaded tensors: {}",
        files.weights.len(),
        report.file_dtypes.values().sum::<usize>(),
        dtypes.join(", "),
        report.unused.len(),
        lorasft::verify::trainable_params_line(counted.0, counted.1)
    );
    Ok(())
}
