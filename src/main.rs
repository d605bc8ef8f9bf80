//! The `lorasft` command line: parses arguments, calls one library function per subcommand,
//! prints, and picks the exit code.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand};
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
