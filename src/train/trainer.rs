//! The training loop. One step reads like llm.c's: next batch, forward + backward, clip,
//! update; logging, evaluation and checkpoints are plain calls from the loop.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::adapter;
use crate::bench::BenchShape;
use crate::data::batch::Batch;
use crate::data::dataset::{self, Dataset, Split};
use crate::data::encode::{Encoder, Example};
use crate::data::prompt;
use crate::data::stats::{self, DataStats};
use crate::error::{Error, Result};
use crate::generate::{self, Generation};
use crate::model::config::LlamaConfig;
use crate::model::fixture::FixtureSpec;
use crate::model::load::{self, ModelSource};
use crate::model::{Llama, Mode};
use crate::report::{DataRecord, Manifest, RunChecks};
use crate::rng::Rng;
use crate::train::checkpoint::{self, LoopState};
use crate::train::config::TrainConfig;
use crate::train::loss_scale::{LossScaler, ScaleDecision};
use crate::train::optim::{AdamW, clip_grad_norm, collect_grads, grad_norm};
use crate::train::schedule::lambda;
use crate::verify::Fingerprint;

/// A base model resolved from a config's `model.source`.
pub struct ResolvedModel {
    /// The model, in the dtype and on the device asked for.
    pub model: Llama,
    /// Its config.json contents.
    pub config: LlamaConfig,
    /// The directory holding config.json, weights and (usually) tokenizer.json.
    pub dir: Option<PathBuf>,
    /// How to name the base model in adapters and reports (hub id or path).
    pub label: String,
}

/// Loads `fixture:SEED` (the test fixture's shape), `fixture:SHAPE:SEED` (a benchmark shape:
/// tiny, smollm2, tinyllama), `gguf:PATH` (imported once into `PATH.hf/`), a directory or a
/// hub id, in `dtype` on `dev`.
pub fn resolve_model(source: &str, dev: &Device, dtype: DType) -> Result<ResolvedModel> {
    if let Some(rest) = source.strip_prefix("fixture:") {
        let (spec, seed) = match rest.split_once(':') {
            None => (FixtureSpec::default(), rest),
            Some((shape, seed)) => {
                let shape =
                    <BenchShape as clap::ValueEnum>::from_str(shape, true).map_err(|_| {
                        Error::Invalid(format!(
                            "model source {source:?}: the shape must be tiny, smollm2 or tinyllama"
                        ))
                    })?;
                (shape.spec(), seed)
            }
        };
        let seed: u64 = seed.parse().map_err(|_| {
            Error::Invalid(format!(
                "model source {source:?}: the seed must be an integer"
            ))
        })?;
        return Ok(ResolvedModel {
            model: spec.build(seed, dtype, dev)?,
            config: spec.config(),
            dir: None,
            label: source.to_string(),
        });
    }
    let source = if let Some(path) = source.strip_prefix("gguf:") {
        let gguf = PathBuf::from(path);
        let dir = gguf.with_extension("hf");
        if !["config.json", "model.safetensors", "tokenizer.json"]
            .iter()
            .all(|f| dir.join(f).exists())
        {
            eprintln!("importing {} into {} ...", gguf.display(), dir.display());
            crate::model::gguf_import::import(&gguf, &dir)?;
        }
        ModelSource::Dir(dir)
    } else {
        ModelSource::parse(source)
    };
    let (config, model, _) = load::load_model(&source, dtype, dev)?;
    let (dir, label) = match &source {
        ModelSource::Dir(d) => (Some(d.clone()), d.display().to_string()),
        ModelSource::Hub(id) => (
            load::resolve_config(&source)?
                .parent()
                .map(Path::to_path_buf),
            id.clone(),
        ),
    };
    Ok(ResolvedModel {
        model,
        config,
        dir,
        label,
    })
}

/// Everything a run needs, resolved before the first step.
pub struct Prepared {
    /// The configuration as resolved.
    pub cfg: TrainConfig,
    /// The base model (adapters attached by [`train`]).
    pub base: ResolvedModel,
    /// The encoder.
    pub encoder: Encoder,
    /// tokenizer.json used.
    pub tokenizer_path: PathBuf,
    /// The dataset.
    pub dataset: Dataset,
    /// Its split.
    pub split: Split,
    /// Encoded training examples (split order).
    pub train: Vec<Example>,
    /// Encoded validation examples.
    pub val: Vec<Example>,
    /// Statistics of the training subset under the encoding.
    pub train_stats: DataStats,
    /// Token ids that end generation.
    pub eos_ids: Vec<u32>,
}

/// Loads model, tokenizer and data; encodes and splits.
pub fn prepare(cfg: TrainConfig) -> Result<Prepared> {
    cfg.validate()?;
    let dev = cfg.run.device.open()?;
    if !dev.is_cpu() {
        // Dropout masks are drawn on accelerators: seed their generator from the run.
        dev.set_seed(cfg.run.seed)?;
    }
    let base = resolve_model(&cfg.model.source, &dev, cfg.run.precision.dtype())?;
    let tokenizer_path = match (&cfg.model.tokenizer, &base.dir) {
        (Some(t), _) => t.clone(),
        (None, Some(d)) => d.join("tokenizer.json"),
        (None, None) => {
            return Err(Error::Invalid(format!(
                "model {} has no directory: set model.tokenizer",
                cfg.model.source
            )));
        }
    };
    let encoder = Encoder::from_file(&tokenizer_path, cfg.encode.clone())?;
    let vocab = encoder.tokenizer().get_vocab_size(true);
    if vocab > base.model.shape().vocab {
        return Err(Error::Invalid(format!(
            "tokenizer {} has {vocab} tokens but the model's vocabulary is {}",
            tokenizer_path.display(),
            base.model.shape().vocab
        )));
    }
    if cfg.encode.max_len > base.model.shape().max_positions {
        return Err(Error::Invalid(format!(
            "encode.max_len {} exceeds the model's max_position_embeddings {}",
            cfg.encode.max_len,
            base.model.shape().max_positions
        )));
    }
    let mut dataset = dataset::load(&cfg.data.path)?;
    if let Some(n) = cfg.data.max_records {
        dataset.records.truncate(n);
        dataset.lines.truncate(n);
    }
    let split = dataset::split(dataset.records.len(), cfg.data.validation, cfg.run.seed)?;
    let pick = |idx: &[usize]| {
        idx.iter()
            .map(|&i| dataset.records[i].clone())
            .collect::<Vec<_>>()
    };
    let (train_records, val_records) = (pick(&split.train), pick(&split.validation));
    let (train_stats, train) = stats::compute(&train_records, &encoder, cfg.train.batch_size)?;
    let val = val_records
        .iter()
        .map(|r| encoder.encode(r))
        .collect::<Result<Vec<_>>>()?;
    let mut eos_ids = vec![encoder.special_ids().eos];
    if let Some(ids) = &base.config.eos_token_id {
        eos_ids.extend(ids.to_vec());
    }
    eos_ids.sort_unstable();
    eos_ids.dedup();
    Ok(Prepared {
        cfg,
        base,
        encoder,
        tokenizer_path,
        dataset,
        split,
        train,
        val,
        train_stats,
        eos_ids,
    })
}

/// How a run is started.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Continue from the run directory's latest checkpoint.
    pub resume: bool,
    /// Start from a saved adapter instead of a fresh one.
    pub init_adapter: Option<PathBuf>,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// Set (by Ctrl-C) to stop after the current step with a checkpoint.
    pub stop: Option<Arc<AtomicBool>>,
    /// Stop after this step exactly as Ctrl-C would (checkpoint, then return): for chunked runs
    /// on time-limited machines, and for the resume tests.
    pub stop_at_step: Option<usize>,
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    /// Optimizer step (after the update).
    pub step: usize,
    /// "train" or "eval".
    pub kind: String,
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
    /// Seconds since the run (or resume) started.
    pub elapsed_s: f64,
}

impl Metric {
    /// An evaluation line: validation loss, its perplexity and target count at `step`.
    pub fn eval(step: usize, loss: f64, targets: usize, elapsed_s: f64) -> Self {
        Self {
            step,
            kind: "eval".into(),
            loss,
            ppl: Some(loss.exp()),
            lr: None,
            grad_norm: None,
            targets,
            tokens_seen: None,
            tokens_per_s: None,
            elapsed_s,
        }
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

/// Peak resident set size of this process in MiB, from /proc (Linux).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The run directory of a config.
pub fn run_dir(cfg: &TrainConfig) -> PathBuf {
    cfg.run.out_dir.join(&cfg.run.name)
}

/// Total optimizer steps of a run over `n` training examples.
pub fn total_steps(cfg: &TrainConfig, n: usize) -> usize {
    cfg.train.max_steps.unwrap_or_else(|| {
        let micro_per_epoch = n.div_ceil(cfg.train.batch_size);
        cfg.train.epochs * (micro_per_epoch / cfg.train.grad_accum).max(1)
    })
}

/// The order of training examples in an epoch: seeded shuffle, or file order.
fn epoch_order(n: usize, epoch: usize, seed: u64, shuffle: bool) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    if shuffle {
        Rng::derive(seed, &format!("shuffle-epoch-{epoch}")).shuffle(&mut v);
    }
    v
}

/// Summed loss and target count of each batch of `batch_size` examples (no dropout).
pub fn batch_loss_sums(
    model: &Llama,
    encoder: &Encoder,
    examples: &[Example],
    batch_size: usize,
) -> Result<Vec<(f64, usize)>> {
    examples
        .chunks(batch_size.max(1))
        .map(|chunk| {
            let rows = encoder.collate(&chunk.iter().collect::<Vec<_>>());
            let b = Batch::from_rows(&rows, model.device())?;
            let l = model.loss_sum(
                &b.input_ids,
                Some(&b.attention_mask),
                &b.labels,
                &mut Mode::Eval,
            )?;
            Ok((l.sum.to_dtype(DType::F64)?.to_scalar::<f64>()?, l.tokens))
        })
        .collect()
}

/// Mean loss per target token and target count over (loss sum, targets) pairs; 0 without targets.
pub fn mean_loss(sums: &[(f64, usize)]) -> (f64, usize) {
    let (sum, targets) = sums
        .iter()
        .fold((0.0, 0), |(s, t), (ls, lt)| (s + ls, t + lt));
    (
        if targets == 0 {
            0.0
        } else {
            sum / targets as f64
        },
        targets,
    )
}

/// Mean loss and target count over examples, in batches (no dropout).
pub fn evaluate(
    model: &Llama,
    encoder: &Encoder,
    examples: &[Example],
    batch_size: usize,
) -> Result<(f64, usize)> {
    Ok(mean_loss(&batch_loss_sums(
        model, encoder, examples, batch_size,
    )?))
}

/// Generates an answer for each instruction prompt (the reference template, no input).
pub fn generate_all(p: &Prepared, model: &Llama) -> Result<Vec<Generation>> {
    p.cfg
        .prompts
        .iter()
        .map(|instr| {
            generate::generate(
                model,
                p.encoder.tokenizer(),
                &prompt::prompt(instr, None),
                &p.eos_ids,
                &p.cfg.generate,
            )
        })
        .collect()
}

/// Reads every line of a metrics.jsonl.
pub fn metrics_from(path: &Path) -> Result<Vec<Metric>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
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

fn append_metric(path: &Path, m: &Metric) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let line = serde_json::to_string(m).map_err(|e| Error::Invalid(e.to_string()))?;
    writeln!(f, "{line}").map_err(|e| Error::io(path, e))
}

/// Keeps the first `lines` lines of a metrics file (a resumed run rewrites what follows).
fn truncate_metrics(path: &Path, lines: usize) -> Result<()> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let kept: String = text.lines().take(lines).map(|l| format!("{l}\n")).collect();
    std::fs::write(path, kept).map_err(|e| Error::io(path, e))
}

/// Writes pretty JSON atomically (temp file + rename).
pub fn write_json(path: &Path, v: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::Invalid(e.to_string()))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text + "\n").map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// The model-card body of an adapter: a short summary of the run.
fn card_body(p: &Prepared, steps: usize, eval: Option<f64>) -> String {
    let c = &p.cfg;
    format!(
        "# LoRA adapter for {base}\n\nTrained by lorasft (run `{name}`): LoRA r {r}, alpha {alpha}, dropout {dropout} on {targets}; \
         {steps} optimizer steps of {bs}×{acc} examples at lr {lr} ({sched:?}), max length {max_len}, labels {labels:?}, seed {seed}. \
         Data: {data} ({n_train} train / {n_val} validation records). Final validation loss: {eval}.\n",
        base = p.base.label,
        name = c.run.name,
        r = c.lora.r,
        alpha = c.lora.alpha,
        dropout = c.lora.dropout,
        targets = adapter::target_names(&c.lora),
        bs = c.train.batch_size,
        acc = c.train.grad_accum,
        lr = c.optim.lr,
        sched = c.optim.schedule,
        max_len = c.encode.max_len,
        labels = c.encode.labels,
        seed = c.run.seed,
        data = c.data.path.display(),
        n_train = p.train.len(),
        n_val = p.val.len(),
        eval = eval.map_or("not measured".to_string(), |e| format!("{e:.4}")),
    )
}

/// Forward and backward over the micro-batches of one optimizer step, each loss divided by
/// `targets` (the loss targets of the whole step), so accumulating k micro-batches equals one
/// batch k times larger. The backward runs on the loss times `loss_scale` (f16 loss scaling;
/// 1 otherwise) and the gradients are divided by it again. Returns the summed loss, the
/// summed gradients (in `named` order) and the real tokens processed.
pub fn forward_backward(
    model: &Llama,
    named: &[(String, candle_core::Var)],
    micro: &[Batch],
    targets: usize,
    loss_scale: f64,
    rng: &mut Rng,
) -> Result<(f64, Vec<Tensor>, usize)> {
    let mut loss_sum = 0.0;
    let mut real = 0;
    let mut grads: Option<Vec<Tensor>> = None;
    for b in micro {
        let l = model.loss_sum(
            &b.input_ids,
            Some(&b.attention_mask),
            &b.labels,
            &mut Mode::Train(rng),
        )?;
        real += b.real_tokens;
        if l.tokens == 0 {
            continue;
        }
        loss_sum += l.sum.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let scaled = (l.sum * (loss_scale / targets.max(1) as f64))?;
        let g = collect_grads(named, &scaled.backward()?)?;
        grads = Some(match grads {
            None => g,
            Some(acc) => acc
                .iter()
                .zip(&g)
                .map(|(a, b)| a + b)
                .collect::<candle_core::Result<Vec<_>>>()?,
        });
    }
    let mut grads =
        grads.ok_or_else(|| Error::Invalid("no micro-batch had a loss target".into()))?;
    if loss_scale != 1.0 {
        grads = grads
            .iter()
            .map(|g| g / loss_scale)
            .collect::<candle_core::Result<Vec<_>>>()?;
    }
    Ok((loss_sum, grads, real))
}

/// Runs training for a prepared run; writes metrics, checkpoints, the adapter and generations.
pub fn train(p: Prepared, opts: &RunOptions) -> Result<Summary> {
    let dir = run_dir(&p.cfg);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    std::fs::write(dir.join("config.toml"), p.cfg.to_toml()?)
        .map_err(|e| Error::io(dir.join("config.toml"), e))?;
    let metrics_path = dir.join("metrics.jsonl");
    let cfg = p.cfg.clone();
    let total = total_steps(&cfg, p.train.len());
    let warmup = cfg.optim.warmup.steps(total);
    let mut model = p.base.model.clone();

    let resume_from = if opts.resume {
        checkpoint::latest(&dir)?
    } else {
        None
    };
    let (mut state, opt_state) = match &resume_from {
        Some(ckpt) => {
            let (state, opt) = checkpoint::load(ckpt, &mut model)?;
            truncate_metrics(&metrics_path, state.metrics_lines)?;
            (state, Some(opt))
        }
        None => {
            match &opts.init_adapter {
                Some(a) => {
                    adapter::load(&mut model, a)?;
                }
                None => model.add_lora(&cfg.lora, cfg.run.seed)?,
            }
            let _ = std::fs::remove_file(&metrics_path);
            let state = LoopState {
                step: 0,
                epoch: 0,
                cursor: 0,
                dropout_rng: Rng::derive(cfg.run.seed, "dropout"),
                best_eval: None,
                tokens_seen: 0,
                metrics_lines: 0,
                skipped_steps: 0,
                clipped_steps: 0,
                loss_scaler: LossScaler::for_precision(cfg.run.precision),
                overflow_steps: 0,
            };
            (state, None)
        }
    };
    let named = model.lora_vars();
    let fingerprint_before = Fingerprint::of(&model)?;
    let manifest = Manifest::for_run(&p, &fingerprint_before)?;
    write_json(&dir.join("manifest.json"), &manifest)?;
    write_json(&dir.join("data.json"), &DataRecord::of(&p))?;
    let mut checks = RunChecks {
        trainable_params: crate::verify::trainable_params_line(
            model.trainable_params(),
            model.all_params(),
        ),
        base_tensors: fingerprint_before.0.len(),
        base_fingerprint_before: fingerprint_before.digest(),
        base_fingerprint_after: String::new(),
        changed_base_tensors: Vec::new(),
        adapter_tensors: named.len(),
        lora_b_with_grad_first_step: None,
        lora_a_with_grad_after_first_update: None,
        first_loss: None,
        last_loss: None,
        all_losses_finite: true,
        eval_losses: Vec::new(),
    };
    let mut b_moved = resume_from.is_some() || opts.init_adapter.is_some();
    let mut opt = AdamW::new(
        named.iter().map(|(_, v)| v.clone()).collect(),
        cfg.optim.adamw.clone(),
    )?;
    if let Some((step, m, v)) = opt_state {
        opt.restore(step, m, v)?;
    }

    // Generations with the starting adapter (B = 0 for a fresh run: the base model's answers).
    let before_path = dir.join("generations_before.json");
    let before: Vec<Generation> = match std::fs::read_to_string(&before_path) {
        Ok(t) if resume_from.is_some() => serde_json::from_str(&t).map_err(|e| Error::Json {
            path: before_path.clone(),
            msg: e.to_string(),
        })?,
        _ => {
            let g = generate_all(&p, &model)?;
            write_json(&before_path, &g)?;
            g
        }
    };

    let bar = if opts.progress {
        indicatif::ProgressBar::new(total as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(state.step as u64);
    let start = Instant::now();
    let tokens_at_start = state.tokens_seen;
    let mut first_loss = None;
    let mut last_loss = None;
    let mut last_ckpt: Option<PathBuf> = resume_from.clone();
    let mut interrupted = false;
    let mut order = epoch_order(p.train.len(), state.epoch, cfg.run.seed, cfg.data.shuffle);

    // A baseline before the first update, so the validation curve starts where the base model is.
    if resume_from.is_none() && cfg.train.eval_every > 0 {
        let (eval_loss, eval_targets) = evaluate(&model, &p.encoder, &p.val, cfg.train.batch_size)?;
        let m = Metric::eval(0, eval_loss, eval_targets, 0.0);
        append_metric(&metrics_path, &m)?;
        state.metrics_lines += 1;
        checks.eval_losses.push((0, eval_loss));
    }

    while state.step < total {
        // Next batch: `grad_accum` micro-batches, continuing across epochs.
        let mut micro = Vec::with_capacity(cfg.train.grad_accum);
        for _ in 0..cfg.train.grad_accum {
            if state.cursor >= order.len() {
                state.epoch += 1;
                state.cursor = 0;
                order = epoch_order(p.train.len(), state.epoch, cfg.run.seed, cfg.data.shuffle);
            }
            let end = (state.cursor + cfg.train.batch_size).min(order.len());
            let exs: Vec<&Example> = order[state.cursor..end]
                .iter()
                .map(|&i| &p.train[i])
                .collect();
            state.cursor = end;
            micro.push(Batch::from_rows(&p.encoder.collate(&exs), model.device())?);
        }
        let targets: usize = micro.iter().map(|b| b.targets).sum();
        // A step with no loss target is skipped (counted), but still logged as skipped,
        // evaluated, checkpointed and checked for a stop like any other.
        let trained = if targets == 0 {
            state.skipped_steps += 1;
            bar.println(format!(
                "step {}: no trainable token in the batch; update skipped",
                state.step + 1
            ));
            None
        } else {
            // Forward + backward, the loss normalised by the targets of the whole step.
            let (loss_sum, mut grads, real) = forward_backward(
                &model,
                &named,
                &micro,
                targets,
                state.loss_scaler.scale,
                &mut state.dropout_rng,
            )?;
            state.tokens_seen += real as u64;
            let loss = loss_sum / targets as f64;
            let ckpt_name = || {
                last_ckpt
                    .as_ref()
                    .map_or("none".to_string(), |c| c.display().to_string())
            };
            if !loss.is_finite() {
                return Err(Error::Diverged {
                    what: "loss",
                    value: loss,
                    step: state.step + 1,
                    checkpoint: ckpt_name(),
                });
            }

            // Gradient coverage, as this run sees it: every lora_B on the first backward, every
            // lora_A after the first update (B = 0 before it, so dL/dA = 0).
            let nonzero = |part: &str| -> Result<usize> {
                let mut n = 0;
                for ((name, _), g) in named.iter().zip(&grads) {
                    if name.contains(part)
                        && g.abs()?
                            .max_all()?
                            .to_dtype(DType::F64)?
                            .to_scalar::<f64>()?
                            > 0.0
                    {
                        n += 1;
                    }
                }
                Ok(n)
            };
            // f16: an overflow in the scaled gradients skips the step and halves the scale.
            let overflowed = state.loss_scaler.enabled
                && state.loss_scaler.update(grad_norm(&grads)?.is_finite()) == ScaleDecision::Skip;
            if overflowed {
                state.overflow_steps += 1;
                bar.println(format!(
                    "step {}: gradients overflowed in f16; update skipped, loss scale now {}",
                    state.step + 1,
                    state.loss_scaler.scale
                ));
            }
            if overflowed {
                None
            } else {
                if checks.lora_b_with_grad_first_step.is_none() {
                    checks.lora_b_with_grad_first_step = Some(nonzero("lora_B")?);
                } else if b_moved && checks.lora_a_with_grad_after_first_update.is_none() {
                    checks.lora_a_with_grad_after_first_update = Some(nonzero("lora_A")?);
                }

                // Clip (max_grad_norm <= 0 disables clipping, as in transformers) and update.
                let norm = if cfg.optim.max_grad_norm > 0.0 {
                    clip_grad_norm(&mut grads, cfg.optim.max_grad_norm)?
                } else {
                    grad_norm(&grads)?
                };
                state.clipped_steps +=
                    usize::from(cfg.optim.max_grad_norm > 0.0 && norm > cfg.optim.max_grad_norm);
                if !norm.is_finite() {
                    return Err(Error::Diverged {
                        what: "gradient norm",
                        value: norm,
                        step: state.step + 1,
                        checkpoint: ckpt_name(),
                    });
                }
                let lr = cfg.optim.lr * lambda(cfg.optim.schedule, state.step, warmup, total);
                opt.step(&grads, lr)?;
                // Under warmup the first update has lr 0 and leaves B at zero; A's gradient is checked
                // on the step after the first update that actually moved B.
                b_moved |= lr > 0.0;
                first_loss.get_or_insert(loss);
                last_loss = Some(loss);
                Some((loss, lr, norm))
            }
        };
        state.step += 1;

        // Log, evaluate, checkpoint.
        let elapsed = start.elapsed().as_secs_f64();
        let tps = (state.tokens_seen - tokens_at_start) as f64 / elapsed.max(1e-9);
        bar.set_position(state.step as u64);
        let last = state.step == total;
        if let Some((loss, lr, norm)) = trained {
            bar.set_message(format!(
                "loss {loss:.4} lr {lr:.2e} gn {norm:.3} {tps:.0} tok/s"
            ));
            if state.step % cfg.train.log_every.max(1) == 0 || last || state.step == 1 {
                let m = Metric {
                    step: state.step,
                    kind: "train".into(),
                    loss,
                    ppl: None,
                    lr: Some(lr),
                    grad_norm: Some(norm),
                    targets,
                    tokens_seen: Some(state.tokens_seen),
                    tokens_per_s: Some(tps),
                    elapsed_s: elapsed,
                };
                append_metric(&metrics_path, &m)?;
                state.metrics_lines += 1;
            }
        }
        let stop = opts.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst))
            || opts.stop_at_step == Some(state.step);
        if (cfg.train.eval_every > 0 && state.step % cfg.train.eval_every == 0) || last {
            let (eval_loss, eval_targets) =
                evaluate(&model, &p.encoder, &p.val, cfg.train.batch_size)?;
            let m = Metric::eval(
                state.step,
                eval_loss,
                eval_targets,
                start.elapsed().as_secs_f64(),
            );
            append_metric(&metrics_path, &m)?;
            state.metrics_lines += 1;
            checks.eval_losses.push((state.step, eval_loss));
            bar.println(format!(
                "step {}: eval loss {eval_loss:.4} (ppl {:.2})",
                state.step,
                eval_loss.exp()
            ));
            if eval_targets > 0 && state.best_eval.is_none_or(|b| eval_loss < b) {
                state.best_eval = Some(eval_loss);
                adapter::save(
                    &model,
                    &dir.join("best"),
                    &p.base.label,
                    &card_body(&p, state.step, Some(eval_loss)),
                )?;
            }
        }
        if (cfg.train.save_every > 0 && state.step % cfg.train.save_every == 0) || last || stop {
            last_ckpt = Some(checkpoint::save(
                &dir,
                &model,
                &opt,
                &state,
                &p.base.label,
                2,
            )?);
        }
        if stop && !last {
            interrupted = true;
            bar.println(format!(
                "interrupted: checkpoint written at step {}; continue with --resume",
                state.step
            ));
            break;
        }
    }
    bar.finish_and_clear();
    let wall_s = start.elapsed().as_secs_f64();
    let (eval_loss, _) = evaluate(&model, &p.encoder, &p.val, cfg.train.batch_size)?;
    let adapter_dir = dir.join("adapter");
    adapter::save(
        &model,
        &adapter_dir,
        &p.base.label,
        &card_body(&p, state.step, Some(eval_loss)),
    )?;
    let after = generate_all(&p, &model)?;
    let generations: Vec<(Generation, Generation)> = before.into_iter().zip(after).collect();
    write_json(&dir.join("generations.json"), &generations)?;
    let fingerprint_after = Fingerprint::of(&model)?;
    checks.base_fingerprint_after = fingerprint_after.digest();
    checks.changed_base_tensors = fingerprint_before.changed(&fingerprint_after);
    checks.first_loss = first_loss;
    checks.last_loss = last_loss;
    checks.all_losses_finite = metrics_from(&metrics_path)?
        .iter()
        .all(|m| m.loss.is_finite());
    write_json(&dir.join("checks.json"), &checks)?;
    let summary = Summary {
        run_dir: dir.clone(),
        adapter_dir,
        steps: state.step,
        first_loss,
        last_loss,
        eval_loss: Some(eval_loss),
        best_eval_loss: state.best_eval,
        tokens_per_s: (state.tokens_seen - tokens_at_start) as f64 / wall_s.max(1e-9),
        wall_s,
        peak_rss_mib: peak_rss_mib(),
        skipped_steps: state.skipped_steps,
        overflow_steps: state.overflow_steps,
        clipped_steps: state.clipped_steps,
        interrupted,
        generations,
    };
    write_json(&dir.join("summary.json"), &summary)?;
    crate::report::write(&dir)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_order_is_seeded_per_epoch_and_file_order_when_shuffle_is_off() {
        assert_eq!(epoch_order(5, 3, 1, false), vec![0, 1, 2, 3, 4]);
        let (a, b) = (epoch_order(50, 0, 1, true), epoch_order(50, 1, 1, true));
        assert_ne!(a, b, "each epoch gets its own order");
        assert_eq!(
            a,
            epoch_order(50, 0, 1, true),
            "the same seed and epoch give the same order"
        );
        let mut s = a.clone();
        s.sort_unstable();
        assert_eq!(s, (0..50).collect::<Vec<_>>());
    }
}
