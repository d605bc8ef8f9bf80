//! The `lorasft` command line: parses arguments, calls the library for each subcommand,
//! prints, and picks the exit code (0 on success, 1 on any error, 130 on a second Ctrl-C).

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{CommandFactory, Parser, Subcommand};
use lorasft::cli::args::{
    BenchArgs, ChatRenderArgs, DataEncodeArgs, DataShowArgs, DeviceArgs, EvalArgs, ExportGgufArgs,
    GenerateArgs, InspectArgs, MergeArgs, OutputArgs, StatsArgs, TinyLlamaArgs, TokenizerCommand,
    TrainArgs,
};
use lorasft::cli::commands::{self, TrainOutcome};
use lorasft::cli::conversation;
use lorasft::cli::introspect::path_args;
use lorasft::data::show::Style;
use lorasft::world::{Single, World};

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
    /// Chat templates: render a conversation exactly as the model's template does.
    #[command(subcommand)]
    Chat(ChatCommand),
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
    /// Write a model (with an adapter merged in, if given) as a GGUF file for llama.cpp.
    ExportGguf(ExportGgufArgs),
    /// Import a GGUF Llama (dequantised, Q/K un-permuted) as a Hugging Face model directory.
    ImportGguf {
        /// The GGUF file.
        file: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Print a shell completion script for lorasft (bash, zsh, fish, elvish or powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Every argument that takes a path, one per line (for the hostile-input tests).
    #[command(hide = true)]
    PathArgs,
}

#[derive(Subcommand)]
enum FixtureCommand {
    /// Write a random Llama (config.json + model.safetensors), byte-identical per seed and shape.
    TinyLlama(TinyLlamaArgs),
}

#[derive(Subcommand)]
enum DataCommand {
    /// Record counts, token lengths, truncation and label statistics under an encoding.
    Stats(StatsArgs),
    /// Write each example's text, input_ids and labels (no padding) as JSONL.
    Encode(DataEncodeArgs),
    /// Print examples as the model reads them, trained tokens highlighted (colour on a
    /// terminal unless NO_COLOR is set, `[[ ]]` otherwise).
    Show(DataShowArgs),
}

#[derive(Subcommand)]
enum ChatCommand {
    /// Print a conversation rendered by a chat template, exactly (no newline added).
    Render(ChatRenderArgs),
}

fn main() {
    // SAFETY: first thing in main; no other thread exists yet.
    unsafe { lorasft::thread_tuning::park_idle_workers() };
    lorasft::alloc_tuning::keep_freed_memory();
    let cli = Cli::parse();
    // SAFETY: still before any thread (MPI's start begins some).
    let world = unsafe { lorasft::world::init() };
    let world = world.unwrap_or_else(|e| commands::fail(&Single, &e.to_string()));
    // A panic on one rank must end the job too: unwinding into MPI_Finalize would wait forever.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(cli, world.as_ref()))) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => commands::fail(world.as_ref(), &format!("{e:#}")),
        Err(_) => commands::fail(world.as_ref(), "panicked (the message is above)"),
    }
}

fn run(cli: Cli, world: &dyn World) -> Result<()> {
    commands::only_train_on_ranks(world, matches!(cli.command, Command::Train(_)))?;
    match cli.command {
        Command::PathArgs => print!("{}", path_args(&<Cli as clap::CommandFactory>::command())),
        Command::Fixture(FixtureCommand::TinyLlama(a)) => {
            a.spec()?.write(a.seed, &a.out)?;
            println!("wrote {} (seed {})", a.out.display(), a.seed);
        }
        Command::Inspect(a) => commands::inspect(&a, &mut std::io::stdout())?,
        Command::Tokenizer(TokenizerCommand::FromGguf { file, out }) => {
            let n = lorasft::tokenizer::from_gguf::convert(&file, &out)?;
            println!(
                "wrote {} ({n} tokens) and tokenizer_config.json beside it",
                out.display()
            );
        }
        Command::Tokenizer(TokenizerCommand::TrainFixture { data, vocab, out }) => {
            let n = commands::train_fixture_tokenizer(&data, vocab, &out)?;
            println!("wrote {} ({n} tokens)", out.display());
        }
        Command::Data(d) => data_cmd(d)?,
        Command::Chat(ChatCommand::Render(a)) => {
            use std::io::Write;
            let text = conversation::chat_render(&a)?;
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())?;
            out.flush()?;
        }
        Command::Train(a) => train_cmd(&a, world)?,
        Command::Eval(a) => print!("{}", commands::eval_text(&a, &commands::eval(&a)?)),
        Command::Generate(a) => generate_cmd(&a)?,
        Command::Merge(a) => {
            commands::merge(&a)?;
            println!("wrote merged model to {}", a.out.display());
        }
        Command::Bench(a) => print!("{}", commands::bench(&a)?),
        Command::Selftest { dev } => selftest_cmd(dev)?,
        Command::Report { run, out } => {
            let out = out.unwrap_or_else(|| run.join("REPORT.md"));
            lorasft::report::write_to(&run, &out, false)?;
            println!("wrote {}", out.display());
        }
        Command::Reproduce { run } => reproduce_cmd(&run)?,
        Command::ExportGguf(a) => {
            let types = commands::export_gguf(&a)?;
            let mut counts = std::collections::BTreeMap::new();
            for (_, t) in &types {
                *counts.entry(format!("{t:?}")).or_insert(0usize) += 1;
            }
            println!(
                "wrote {} ({} tensors: {counts:?})",
                a.out.display(),
                types.len()
            );
        }
        Command::Completions { shell } => completions_cmd(shell)?,
        Command::ImportGguf { file, out, output } => import_gguf_cmd(&file, &out, &output)?,
    }
    Ok(())
}

fn import_gguf_cmd(
    file: &std::path::Path,
    out: &std::path::Path,
    output: &OutputArgs,
) -> Result<()> {
    let cfg = lorasft::model::gguf_import::import_with(file, out, output.mode())?;
    println!(
        "imported {} into {} ({} layers, hidden {}, vocab {})",
        file.display(),
        out.display(),
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.vocab_size
    );
    Ok(())
}

/// The completion script for `shell`, from the same clap definition as the flags. It is
/// generated in memory first: clap_complete panics on a failed write, and a closed pipe or a
/// full disk must be an error instead.
fn completions_cmd(shell: clap_complete::Shell) -> Result<()> {
    use std::io::Write;
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "lorasft", &mut script);
    let mut out = std::io::stdout().lock();
    out.write_all(&script)?;
    out.flush()?;
    Ok(())
}

fn data_cmd(d: DataCommand) -> Result<()> {
    match d {
        DataCommand::Stats(a) => print!("{}", commands::stats_text(&a)?),
        DataCommand::Encode(a) => {
            let (n, skipped) = conversation::data_encode(&a)?;
            a.output.mode().message(&format!(
                "wrote {n} examples to {}{}",
                a.out.display(),
                if skipped > 0 {
                    format!("; skipped, with no trained turn: {skipped}")
                } else {
                    String::new()
                }
            ));
        }
        DataCommand::Show(a) => print!("{}", conversation::data_show(&a, Style::for_stdout())?),
    }
    Ok(())
}

fn train_cmd(a: &TrainArgs, world: &dyn World) -> Result<()> {
    match commands::train(a, world, &mut std::io::stderr())? {
        TrainOutcome::DryRun(toml) => print!("{toml}"),
        TrainOutcome::Trained(summary, report) => {
            print!("{}", commands::summary_text(&summary, &report))
        }
        TrainOutcome::Shared => {}
    }
    Ok(())
}

fn generate_cmd(a: &GenerateArgs) -> Result<()> {
    for answer in commands::generate(a)? {
        let g = &answer.adapted;
        println!("=== prompt ({} tokens)\n{}", g.prompt_tokens, answer.prompt);
        match &answer.base {
            Some(b) => println!("--- base\n{}\n--- adapted\n{}", b.text, g.text),
            None => println!(
                "--- output{}\n{}",
                if g.stopped_at_eos { " (EOS)" } else { "" },
                g.text
            ),
        }
    }
    Ok(())
}

fn selftest_cmd(dev: DeviceArgs) -> Result<()> {
    let (table, failed, total) = commands::selftest(dev)?;
    print!("{table}");
    if failed > 0 {
        bail!("{failed} of {total} selftest checks failed");
    }
    Ok(())
}

fn reproduce_cmd(run: &std::path::Path) -> Result<()> {
    let (r, text) = commands::reproduce(run)?;
    print!("{text}");
    if !r.matched() {
        bail!("the run did not reproduce");
    }
    Ok(())
}
