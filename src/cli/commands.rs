//! What each subcommand computes, returning values for `main` to print. Errors are the
//! library's, each naming the file or flag at fault.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::adapter;
use crate::bench::{self, suite};
use crate::chat::{Conversation, Message, Role};
use crate::cli::args::{
    BenchArgs, DeviceArgs, EvalArgs, ExportGgufArgs, GenerateArgs, InspectArgs, MergeArgs,
    ModelArgs, StatsArgs, TrainArgs,
};
use crate::data::dataset;
use crate::data::encode::{EncodeConfig, Encoder};
use crate::data::prompt;
use crate::data::stats::{self, DataStats};
use crate::error::{Error, Result};
use crate::generate::{self, GenerateConfig, Generation, Sampling};
use crate::inspect;
use crate::model::Llama;
use crate::model::load::{self, ModelSource};
use crate::model::source::{ResolvedModel, resolve_model};
use crate::records::Summary;
use crate::train::eval::{batch_loss_sums, mean_loss};
use crate::train::prepare::Prepared;
use crate::train::prepare::prepare;
use crate::train::reproduce::Reproduction;
use crate::train::run::{RunOptions, train_on};
use crate::train::run_dir::{Claim, RunDir};
use crate::verify::trainable_params_line;
use crate::world::{self, World};

/// A model as a command runs it: with the adapter attached (if any), the base beside it, and
/// the tokenizer to use.
pub struct Loaded {
    /// The model with the adapter attached (the base when there is none).
    pub adapted: Llama,
    /// The base model as resolved.
    pub base: ResolvedModel,
    /// tokenizer.json.
    pub tokenizer: PathBuf,
}

/// Resolves `--model`, `--adapter` and `--tokenizer` on the chosen device and precision.
pub fn load(a: &ModelArgs) -> Result<Loaded> {
    let base = resolve_model(&a.model, &a.dev.open()?, a.dev.precision.dtype())?;
    let tokenizer = base.tokenizer_path(a.tokenizer.as_deref())?;
    let mut adapted = base.model.clone();
    if let Some(dir) = &a.adapter {
        adapter::load_onto(&mut adapted, dir, &a.model)?;
    }
    Ok(Loaded {
        adapted,
        base,
        tokenizer,
    })
}

/// What `eval` measured.
pub struct EvalOutput {
    /// Records evaluated.
    pub records: usize,
    /// Loss targets over all of them.
    pub targets: usize,
    /// Mean loss per target.
    pub loss: f64,
}

/// What `eval` prints: the totals, and where the per-record losses went.
pub fn eval_text(a: &EvalArgs, e: &EvalOutput) -> String {
    let mut text = format!(
        "records: {}, loss targets: {}, mean loss: {:.6}, perplexity: {:.4}\n",
        e.records,
        e.targets,
        e.loss,
        e.loss.exp()
    );
    if let Some(path) = &a.per_record {
        text.push_str(&format!("per-record losses: {}\n", path.display()));
    }
    text
}

/// Mean loss over a dataset; with `--per-record`, every record is its own batch and its loss
/// is written there (the totals are summed from those same losses).
pub fn eval(a: &EvalArgs) -> Result<EvalOutput> {
    let cfg = a.encode.config()?;
    // The output is checked before the evaluation, not after it.
    let per_record = a
        .per_record
        .as_deref()
        .map(crate::output::Staged::file)
        .transpose()?;
    let m = load(&a.m)?;
    let enc = Encoder::from_file(&m.tokenizer, cfg)?;
    enc.check_vocab(&m.tokenizer, &a.m.model, m.base.model.shape().vocab)?;
    let ds = dataset::load(&a.data)?;
    let examples = ds
        .records
        .iter()
        .map(|r| enc.encode(r))
        .collect::<Result<Vec<_>>>()?;
    let batch = if a.per_record.is_some() {
        1
    } else {
        a.batch_size
    };
    let sums = batch_loss_sums(&m.adapted, &enc, &examples, batch, a.output.mode())?;
    let (loss, targets) = mean_loss(&sums);
    if targets == 0 {
        return Err(Error::Invalid(format!(
            "{}: no loss target in {} records under labels {:?} with max length {}: nothing to evaluate",
            a.data.display(),
            examples.len(),
            a.encode.labels,
            a.encode.max_len
        )));
    }
    if let Some(staged) = per_record {
        let per: Vec<serde_json::Value> = examples
            .iter()
            .zip(&sums)
            .enumerate()
            .map(|(i, (e, &(sum, t)))| {
                serde_json::json!({"record": i, "line": ds.lines[i], "loss": (t > 0).then(|| sum / t as f64), "targets": t, "truncated": e.truncated()})
            })
            .collect();
        let text = serde_json::to_string_pretty(&per).map_err(|e| Error::Invalid(e.to_string()))?;
        std::fs::write(staged.path(), text).map_err(|e| Error::io(staged.path(), e))?;
        staged.commit()?;
    }
    Ok(EvalOutput {
        records: examples.len(),
        targets,
        loss,
    })
}

/// One prompt's answers: the adapted model's, and the base model's with `--compare`.
pub struct Answer {
    /// The prompt as given to the model.
    pub prompt: String,
    /// The adapted model's generation.
    pub adapted: Generation,
    /// The base model's, side by side.
    pub base: Option<Generation>,
}

/// Generates for each `--prompt`, or each `--instruction` in the reference template.
pub fn generate(a: &GenerateArgs) -> Result<Vec<Answer>> {
    if a.chat {
        return generate_chat(a);
    }
    let prompts: Vec<String> = if a.instruction.is_empty() {
        a.prompt.clone()
    } else {
        a.instruction
            .iter()
            .map(|i| prompt::prompt(i, a.input.as_deref()))
            .collect()
    };
    if prompts.is_empty() {
        return Err(Error::Invalid(
            "give --prompt TEXT or --instruction TEXT".into(),
        ));
    }
    let cfg = generate_config(a)?;
    let m = load(&a.m)?;
    let enc = Encoder::from_file(&m.tokenizer, EncodeConfig::default())?;
    enc.check_vocab(&m.tokenizer, &a.m.model, m.base.model.shape().vocab)?;
    let eos = m.base.eos_ids(enc.special_ids().eos);
    let compare = a.compare && a.m.adapter.is_some();
    prompts
        .into_iter()
        .map(|p| {
            let adapted = generate::generate(&m.adapted, enc.tokenizer(), &p, &eos, &cfg)?;
            let base = compare
                .then(|| generate::generate(&m.base.model, enc.tokenizer(), &p, &eos, &cfg))
                .transpose()?;
            Ok(Answer {
                prompt: p,
                adapted,
                base,
            })
        })
        .collect()
}

/// The sampling settings of `generate`'s flags.
fn generate_config(a: &GenerateArgs) -> Result<GenerateConfig> {
    let cfg = GenerateConfig {
        max_new_tokens: a.max_new_tokens,
        sampling: match a.temperature {
            Some(temperature) => Sampling::TopP {
                temperature,
                top_p: a.top_p,
            },
            None => Sampling::Greedy,
        },
        seed: a.seed,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// `generate --chat`: each instruction as a user turn (or the `--messages` conversation) in the
/// model's chat template with the generation prompt; stops at the end-of-turn token or EOS.
fn generate_chat(a: &GenerateArgs) -> Result<Vec<Answer>> {
    let convs: Vec<Conversation> = match &a.messages {
        Some(path) => vec![crate::cli::conversation::read_conversation(path)?],
        None => a
            .instruction
            .iter()
            .chain(&a.prompt)
            .map(|i| Conversation::new(vec![Message::text(Role::User, i.clone())]))
            .collect(),
    };
    if convs.is_empty() {
        return Err(Error::Invalid(
            "generate --chat needs --instruction TEXT or --messages FILE".into(),
        ));
    }
    let cfg = generate_config(a)?;
    let m = load(&a.m)?;
    let enc =
        crate::cli::conversation::generation_template(&m.tokenizer, a.chat_template.as_deref())?;
    let chat = enc.require_chat()?;
    let eos = enc.stop_ids(m.base.eos_ids(enc.special_ids().eos));
    let compare = a.compare && a.m.adapter.is_some();
    convs
        .iter()
        .map(|conv| {
            let (text, ids) = chat.prompt(conv)?;
            let run = |model: &crate::model::Llama| {
                generate::generate_ids(model, chat.tokenizer(), &text, ids.clone(), &eos, &cfg)
            };
            Ok(Answer {
                prompt: text.clone(),
                adapted: run(&m.adapted)?,
                base: compare.then(|| run(&m.base.model)).transpose()?,
            })
        })
        .collect()
}

/// Folds the adapter into the base and writes a Hugging Face model directory.
pub fn merge(a: &MergeArgs) -> Result<()> {
    let resolved = resolve_model(&a.model, &a.dev.open()?, a.dev.precision.dtype())?;
    let dir = resolved.dir.clone().ok_or_else(|| {
        Error::Invalid(format!(
            "merge needs a model directory or hub id, not {}",
            a.model
        ))
    })?;
    let mut model = resolved.model;
    adapter::load_onto(&mut model, &a.adapter, &a.model)?;
    model.merge_lora()?;
    adapter::export_merged(&model, &dir.join("config.json"), &a.out)
}

/// `lorasft export-gguf`: loads the base in f32 on the CPU, merges the adapter when one is
/// given, and writes the GGUF; returns each tensor's name and type.
pub fn export_gguf(a: &ExportGgufArgs) -> Result<Vec<(String, candle_core::quantized::GgmlDType)>> {
    let resolved = resolve_model(&a.model, &candle_core::Device::Cpu, candle_core::DType::F32)?;
    let tokenizer = resolved.tokenizer_path(a.tokenizer.as_deref())?;
    let meta = crate::tokenizer::to_gguf::gguf_metadata(&tokenizer)?;
    let mut model = resolved.model;
    if let Some(dir) = &a.adapter {
        adapter::load_onto(&mut model, dir, &a.model)?;
        model.merge_lora()?;
    }
    crate::export::write_gguf(
        &model,
        &resolved.config,
        &resolved.label,
        meta,
        a.ty,
        &a.out,
        a.output.mode(),
    )
}

/// Writes the shape and PEFT's trainable-parameter line from config.json to `out`; without
/// `--config-only`, then also the count from the loaded weights (refusing one that disagrees
/// with the config's), so the summary is out before a slow or failing weight load.
pub fn inspect(a: &InspectArgs, out: &mut dyn std::io::Write) -> Result<()> {
    let lora = a.lora()?;
    let source = ModelSource::parse(&a.model);
    let config_path = load::resolve_config(&source)?;
    let cfg = crate::model::LlamaConfig::from_file(&config_path)?;
    let shape = cfg.shape().map_err(|msg| Error::Config {
        path: config_path.clone(),
        msg,
    })?;
    let stdout = |e| Error::io("standard output", e);
    write!(
        out,
        "{}",
        inspect::summary(&source.to_string(), &shape, &lora)
    )
    .map_err(stdout)?;
    if !a.config_only {
        out.flush().map_err(stdout)?;
        let weights = inspect::from_weights(&source, &cfg, &shape, &lora)?;
        writeln!(out, "{weights}").map_err(stdout)?;
    }
    Ok(())
}

/// Statistics of a dataset under an encoding, and the seconds encoding took.
pub fn stats(a: &StatsArgs) -> Result<(DataStats, Encoder, f64)> {
    let cfg = a.encode.config()?;
    let ds = dataset::load(&a.data)?;
    let enc = Encoder::from_file(&a.tokenizer, cfg)?;
    let start = std::time::Instant::now();
    let (stats, _) = stats::compute(&ds.records, &enc, a.batch_size)?;
    Ok((stats, enc, start.elapsed().as_secs_f64()))
}

/// Trains the fixture tokenizer on a dataset's formatted text and writes it; its size.
pub fn train_fixture_tokenizer(data: &Path, vocab: usize, out: &Path) -> Result<usize> {
    let ds = dataset::load(data)?;
    let texts: Vec<String> = ds
        .records
        .iter()
        .filter_map(|r| r.as_instruction())
        .map(|r| prompt::format(r).text)
        .collect();
    let spm = crate::tokenizer::train::train_spm_bpe(&texts, vocab)?;
    let json =
        serde_json::to_string_pretty(&spm.to_json()?).map_err(|e| Error::Invalid(e.to_string()))?;
    crate::output::write(out, (json + "\n").as_bytes())?;
    Ok(spm.tokens.len())
}

/// The line `train` prints before the first step: model, split, encoding problems and the
/// trainable-parameter count of the LoRA settings the run trains (adopted ones included).
pub fn startup_line(p: &Prepared) -> String {
    let s = &p.train_stats;
    let shape = p.base.model.shape();
    let trainable = inspect::lora_params(shape, &p.cfg.lora);
    let mut line = format!(
        "model {} | {} train / {} validation records | {} truncated, {} with no trainable label | {}",
        p.base.label,
        p.train.len(),
        p.val.len(),
        s.truncated,
        s.no_trainable_label,
        trainable_params_line(trainable, shape.base_params() + trainable)
    );
    match p.encoder.chat().filter(|_| p.uses_chat()) {
        None => line.push_str(&format!(
            "\ndata format {} | the Alpaca prompt | labels {:?}",
            p.dataset.format, p.cfg.encode.labels
        )),
        Some(chat) => {
            let template = chat.template();
            line.push_str(&format!(
            "\ndata format {} | template {} ({}) | labels {:?} | conversations skipped with no trained turn: {} train, {} validation | trailing messages cut to fit: {}",
            p.dataset.format,
            template.source(),
            crate::chat::spans::method_for(template),
            p.cfg.encode.labels,
            s.skipped_no_trained_turn,
            p.val_skipped,
            s.turns_cut,
        ));
        }
    }
    if let Some((was, now)) = &p.adopted_lora {
        line.push_str(&format!(
            "\nLoRA settings adopted from {}: r {}, alpha {}, dropout {}, targets {} (the config said r {}, alpha {}, dropout {}, targets {})",
            p.cfg.model.init_adapter.as_deref().unwrap_or(Path::new("?")).display(),
            now.r,
            now.alpha,
            now.dropout,
            adapter::target_names(now),
            was.r,
            was.alpha,
            was.dropout,
            adapter::target_names(was),
        ));
    }
    line
}

/// A flag Ctrl-C and SIGTERM (Slurm's preemption signal) set: the run stops after its
/// current step with a checkpoint. A second signal exits at once with status 130.
pub fn stop_on_ctrl_c() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!(
            "\nCtrl-C or SIGTERM: finishing the current step and writing a checkpoint (press again to abort)"
        );
    })
    .map_err(|e| Error::Invalid(format!("cannot install the Ctrl-C handler: {e}")))?;
    Ok(stop)
}

/// Ends the process after `message`: one process exits with status 1. A rank of a
/// data-parallel job names itself and ends the whole job (`MPI_Abort`), so no rank waits
/// forever; a rank other than 0 first gives rank 0 a few seconds to finish what it is writing
/// (rolling back a checkpoint after a non-finite loss, which every rank meets at once).
pub fn fail(world: &dyn World, message: &str) -> ! {
    if world.size() == 1 {
        eprintln!("error: {message}");
        std::process::exit(1);
    }
    eprintln!(
        "error: rank {} of {}: {message}",
        world.rank(),
        world.size()
    );
    if !world::is_writer(world) {
        std::thread::sleep(std::time::Duration::from_secs(5));
    }
    world.abort(1)
}

/// Refuses every command but `train` on several ranks: nothing else is data-parallel, and N
/// copies of it would do the same work N times (or write one file N times).
pub fn only_train_on_ranks(world: &dyn World, is_train: bool) -> Result<()> {
    if world.size() == 1 || is_train {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "this command runs in one process; only `lorasft train` runs on several ranks \
         (this is rank {} of {})",
        world.rank(),
        world.size()
    )))
}

/// Writes REPORT.md of a finished run while holding the run directory's lock, as the run
/// itself did, so no concurrent `--overwrite` run can clear the directory mid-report.
pub fn write_report_locked(dir: &Path) -> Result<PathBuf> {
    let _held = RunDir::claim(dir, Claim::Resume)?;
    crate::report::write(dir)
}

/// What `train` did: printed the resolved config (`--dry-run`), or trained.
pub enum TrainOutcome {
    /// The resolved config as TOML, adopted LoRA settings included.
    DryRun(String),
    /// The run's summary and its report.
    Trained(Box<Summary>, PathBuf),
    /// A rank other than 0 of a data-parallel job trained its share; rank 0 reports.
    Shared,
}

/// `lorasft train`: resolves the config, fetches missing demo assets, prepares, says what it
/// prepared on `progress` (before the long part), trains and writes the report.
///
/// On several ranks, rank 0 fetches and prepares first (importing a GGUF base, say) while the
/// others wait, then they prepare from what it left; only rank 0 prints and writes.
pub fn train(
    a: &TrainArgs,
    world: &dyn World,
    progress: &mut dyn std::io::Write,
) -> Result<TrainOutcome> {
    let writer = world::is_writer(world);
    let mut cfg = a.config_source().resolve()?;
    if a.dry_run {
        crate::train::prepare::adopt_init_adapter(&mut cfg)?;
        return Ok(TrainOutcome::DryRun(cfg.to_toml()?));
    }
    if writer {
        crate::assets::ensure(&cfg)?;
    }
    let opts = RunOptions {
        resume: a.resume,
        overwrite: a.overwrite,
        progress: a.output.mode(),
        stop: Some(stop_on_ctrl_c()?),
        stop_at_step: None,
        allow_config_change: a.allow_config_change,
    };
    let prepared = match writer {
        true => prepare(cfg).and_then(|p| world.broadcast(Vec::new()).map(|_| p))?,
        false => world.broadcast(Vec::new()).and_then(|_| prepare(cfg))?,
    };
    if !writer {
        train_on(world, prepared, &opts)?;
        return Ok(TrainOutcome::Shared);
    }
    let startup = opts.progress.message_line(&startup_line(&prepared));
    writeln!(progress, "{startup}").map_err(|e| Error::io("standard error", e))?;
    let summary = train_on(world, prepared, &opts)?;
    let report = write_report_locked(&summary.run_dir)?;
    Ok(TrainOutcome::Trained(Box::new(summary), report))
}

/// What `train` prints after a run: the figures, the adapter and report paths, and the
/// generations before and after.
pub fn summary_text(s: &Summary, report: &Path) -> String {
    let mut text = format!(
        "{} steps in {:.1} s: loss {:.4} -> {:.4}, validation loss {:.4}, {:.0} tokens/s, peak RSS {:.0} MiB{}\nadapter: {}\nreport: {}\n",
        s.steps,
        s.wall_s,
        s.first_loss.unwrap_or(f64::NAN),
        s.last_loss.unwrap_or(f64::NAN),
        s.eval_loss.unwrap_or(f64::NAN),
        s.tokens_per_s,
        s.peak_rss_mib.unwrap_or(f64::NAN),
        if s.interrupted { " (interrupted)" } else { "" },
        s.adapter_dir.display(),
        report.display()
    );
    for (before, after) in &s.generations {
        text.push_str(&format!(
            "\n### {}\n  before: {:?}\n  after:  {:?}\n",
            before.heading(),
            before.text,
            after.text
        ));
    }
    text
}

/// `lorasft reproduce`: repeats the run, writes its report, and returns the comparison with
/// the text `main` prints.
pub fn reproduce(run: &Path) -> Result<(Reproduction, String)> {
    let r = crate::train::reproduce::reproduce(run)?;
    let mut text = format!(
        "reproduction in {}: {} metric lines compared\n",
        r.run_dir.display(),
        r.compared
    );
    text.push_str(&match &r.first_mismatch {
        None => "losses: identical bit for bit\n".to_string(),
        Some((step, kind, a, b)) => {
            format!("losses: FIRST MISMATCH at step {step} ({kind}): {a} vs {b}\n")
        }
    });
    let same = if r.adapter_identical {
        "identical"
    } else {
        "DIFFERENT"
    };
    text.push_str(&format!("adapter bytes: {same}\n"));
    write_report_locked(&r.run_dir)?;
    Ok((r, text))
}

/// `lorasft bench`: one shape in this process as a JSON row (`--one`, what the suite spawns),
/// or the whole suite as a table (and JSON lines with `--json`).
pub fn bench(a: &BenchArgs) -> Result<String> {
    if a.memory {
        return bench_memory(a);
    }
    if a.batching {
        let b = a.batching_bench();
        // The preset's assets are fetched here, once, not by each measuring child.
        crate::assets::ensure(&crate::train::config::TrainConfig::preset(&b.preset)?)?;
        if a.one {
            return b.run_here()?.iter().map(json_line).collect();
        }
        let rows = b.run()?;
        if let Some(path) = &a.json {
            let lines = rows.iter().map(json_line).collect::<Result<String>>()?;
            crate::output::write(path, lines.as_bytes())?;
        }
        return Ok(bench::batching::render(&b, &rows));
    }
    if a.one {
        let shape = *a
            .shapes
            .first()
            .ok_or_else(|| Error::Invalid("bench --one needs a shape".into()))?;
        let row = bench::run_shape(&bench::BenchPlan {
            shape,
            steps: a.steps,
            gen_tokens: a.gen_tokens,
            seed: a.seed,
        })?;
        return serde_json::to_string(&row)
            .map(|l| l + "\n")
            .map_err(|e| Error::Invalid(e.to_string()));
    }
    let suite = a.suite();
    let result = suite.run()?;
    if let Some(path) = &a.json {
        crate::output::write(path, suite::json_lines(&result.rows)?.as_bytes())?;
    }
    Ok(suite::render(&suite, &result))
}

/// `lorasft bench --memory`: one child's row (`--one`; the quantized base with
/// `--memory-quantized`, recomputed activations with `--memory-recompute`), or the table.
fn bench_memory(a: &BenchArgs) -> Result<String> {
    use crate::bench::memory;
    let gguf = a
        .memory_gguf
        .clone()
        .unwrap_or_else(|| memory::default_gguf(a.memory_shape));
    if a.one {
        let case = memory::MemoryCase {
            shape: a.memory_shape,
            gguf: a.memory_quantized.then_some(gguf.as_path()),
            recompute: a.memory_recompute,
        };
        return json_line(&memory::run_here(case, a.steps, a.seed)?);
    }
    let rows = memory::run(a.memory_shape, &gguf, &a.threads, a.steps, a.seed)?;
    if let Some(path) = &a.json {
        let lines = rows.iter().map(json_line).collect::<Result<String>>()?;
        crate::output::write(path, lines.as_bytes())?;
    }
    Ok(memory::render(&rows))
}

/// A value as one line of JSON.
fn json_line(v: &impl serde::Serialize) -> Result<String> {
    serde_json::to_string(v)
        .map(|l| l + "\n")
        .map_err(|e| Error::Invalid(e.to_string()))
}

/// `lorasft selftest`: the table, and how many of how many checks failed.
pub fn selftest(dev: DeviceArgs) -> Result<(String, usize, usize)> {
    let device = dev.open()?;
    let checks = crate::selftest::run(&device, dev.precision)?;
    let name = crate::device::describe(&device);
    let failed = checks.iter().filter(|c| !c.passed).count();
    Ok((
        crate::selftest::render(&checks, &name, dev.precision),
        failed,
        checks.len(),
    ))
}

/// `lorasft data stats` as text (or JSON with `--json`), with the encoding time.
pub fn stats_text(a: &StatsArgs) -> Result<String> {
    let (stats, enc, secs) = self::stats(a)?;
    if a.json {
        return serde_json::to_string_pretty(&stats)
            .map(|t| t + "\n")
            .map_err(|e| Error::Invalid(e.to_string()));
    }
    Ok(format!(
        "{}encoding time: {secs:.3} s ({:.0} records/s)\n",
        crate::data::stats::render(&stats, &enc, &a.data, &a.tokenizer, a.grad_accum),
        stats.records as f64 / secs
    ))
}
