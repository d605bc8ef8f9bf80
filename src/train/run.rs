//! The training run, read top to bottom like nanoGPT's `train.py`:
//!
//! ```text
//! open or resume -> baseline evaluation -> loop { next batch -> step -> log -> evaluate
//! -> checkpoint -> stop? } -> finish (adapter, generations, checks, summary)
//! ```
//!
//! [`train`] is that sequence; each phase is one method of [`Run`]. The run writes its records
//! (`crate::records`) into the run directory and never renders the report: the command that
//! trains asks for it afterwards.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::adapter;
use crate::data::batch::Batch;
use crate::data::batching::{self, MicroBatch, Planner};
use crate::data::encode::Example;
use crate::error::{Error, Result};
use crate::generate::Generation;
use crate::model::Llama;
use crate::progress::{Mode, StepLine, Steps};
use crate::records::{self, Metric, MetricKind, RunChecks, Summary, files};
use crate::train::checkpoint::{self, KEEP_CHECKPOINTS, LoopState};
use crate::train::config::TrainConfig;
use crate::train::continuation;
use crate::train::eval::evaluate_on;
use crate::train::prepare::Prepared;
use crate::train::run_dir::{Claim, RunDir};
use crate::train::schedule::lambda;
use crate::train::step::{StepBatches, StepOutcome, Updater, nonzero_grads};
use crate::train::tensorboard::EventLog;
use crate::verify::{Fingerprint, trainable_params_line};
use crate::world::{self, Single, World};

/// How a run is started.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Continue from the run directory's latest checkpoint (a directory without one starts
    /// fresh).
    pub resume: bool,
    /// Replace another run's files in the run directory (cleared first) instead of refusing.
    pub overwrite: bool,
    /// How progress shows on stderr: a bar, text or JSON lines, or nothing (the default).
    pub progress: Mode,
    /// Set (by Ctrl-C) to stop after the current step with a checkpoint.
    pub stop: Option<Arc<AtomicBool>>,
    /// Stop after this step exactly as Ctrl-C would (checkpoint, then return): for chunked runs
    /// on time-limited machines, and for the resume tests.
    pub stop_at_step: Option<usize>,
    /// Let a resume change settings that break equality with an uninterrupted run (the
    /// report then says the run is not a straight continuation).
    pub allow_config_change: bool,
}

/// The run directory of a config.
pub fn run_dir(cfg: &TrainConfig) -> PathBuf {
    cfg.run.out_dir.join(&cfg.run.name)
}

/// Total optimizer steps of a run with `micro_per_epoch` micro-batches per epoch.
pub fn total_steps(cfg: &TrainConfig, micro_per_epoch: usize) -> usize {
    cfg.train
        .max_steps
        .unwrap_or_else(|| cfg.train.epochs * (micro_per_epoch / cfg.train.grad_accum).max(1))
}

/// The planner of a run's training micro-batches (batching mode, seed, shuffle).
pub fn planner(cfg: &TrainConfig, train: &[Example]) -> Planner {
    Planner::new(
        cfg.encode.batching,
        train.iter().map(|e| e.ids.len()).collect(),
        cfg.encode.max_len,
        cfg.train.batch_size,
        cfg.run.seed,
        cfg.data.shuffle,
    )
}

/// The index of the micro-batch that starts after `cursor` examples of an epoch's plan.
fn micro_at(plan: &[MicroBatch], cursor: usize) -> Result<usize> {
    let mut seen = 0;
    for (i, m) in plan.iter().enumerate() {
        if seen == cursor {
            return Ok(i);
        }
        seen += m.examples();
    }
    if seen == cursor {
        return Ok(plan.len());
    }
    Err(Error::Invalid(format!(
        "the checkpoint stopped {cursor} examples into an epoch, which is not a micro-batch \
         boundary of this run's batching; resume with the settings it was trained with"
    )))
}

/// Runs training for a prepared run; writes metrics, checkpoints, the adapter, generations,
/// checks and the summary into the run directory.
pub fn train(p: Prepared, opts: &RunOptions) -> Result<Summary> {
    train_on(&Single, p, opts)
}

/// [`train`] as one rank of a data-parallel job: every rank runs this loop on its share of
/// each step's micro-batches and of each evaluation, and rank 0 alone writes (it returns the
/// summary it wrote; the others return theirs unwritten). The result is bit-identical to one
/// process for any number of ranks that divides `train.grad_accum`.
pub fn train_on(world: &dyn World, p: Prepared, opts: &RunOptions) -> Result<Summary> {
    let mut run = Run::open(world, p, opts)?;
    run.evaluate_baseline()?;
    while !run.finished() {
        let micro = run.next_batch()?;
        let trained = run.step(&micro)?;
        run.log(trained)?;
        let stop = run.stop_requested()?;
        run.evaluate_if_due()?;
        run.checkpoint_if_due(stop)?;
        if stop && !run.finished() {
            run.interrupt();
            break;
        }
    }
    run.finish()
}

/// What an applied update measured, for the log.
#[derive(Debug, Clone, Copy)]
pub struct Trained {
    /// Mean loss per target token.
    pub loss: f64,
    /// Learning rate of the update.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Loss targets in the step.
    pub targets: usize,
}

/// A run in progress: the prepared inputs, the model with its adapter, the optimizer and
/// everything the loop tracks between phases.
pub struct Run<'o> {
    p: Prepared,
    opts: &'o RunOptions,
    /// The job's ranks; rank 0 writes.
    world: &'o dyn World,
    dir: PathBuf,
    /// The directory's lock, held by the writing rank.
    _owned: Option<RunDir>,
    model: Llama,
    updater: Updater,
    state: LoopState,
    total: usize,
    warmup: usize,
    planner: Planner,
    /// The current epoch's micro-batches, and the next one to train on.
    plan: Vec<MicroBatch>,
    next_micro: usize,
    checks: RunChecks,
    fingerprint_before: Fingerprint,
    before: Vec<Generation>,
    progress: Steps,
    /// The TensorBoard event file, when `report.tensorboard` asks for one.
    tensorboard: Option<EventLog>,
    start: Instant,
    /// (real, padded) tokens seen when this process started the run.
    tokens_at_start: (u64, u64),
    first_loss: Option<f64>,
    last_loss: Option<f64>,
    last_eval: Option<(usize, f64)>,
    b_moved: bool,
    resumed: bool,
    interrupted: bool,
}

impl<'o> Run<'o> {
    /// Opens the run directory, then resumes from its latest checkpoint or starts fresh
    /// (a new adapter, or the configured starting adapter); writes the manifest and data
    /// records and the generations with the starting adapter.
    pub fn open(world: &'o dyn World, p: Prepared, opts: &'o RunOptions) -> Result<Self> {
        let dir = run_dir(&p.cfg);
        let writer = world::is_writer(world);
        check_world(world, &p.cfg)?;
        let planner = planner(&p.cfg, &p.train);
        let total = total_steps(&p.cfg, planner.micro_per_epoch());
        let mut model = p.base.model.clone();
        model.set_recompute(p.cfg.train.gradient_checkpointing);
        // Base tensors only: the adapter attached below does not enter it.
        let fingerprint_before = Fingerprint::of(&model)?;
        // The writer decides, claims and records; the other ranks learn what it found.
        let opened = match writer {
            true => Some(open_as_writer(
                world,
                &p,
                opts,
                &dir,
                &fingerprint_before,
                &mut model,
            )?),
            false => None,
        };
        let resume_from = share_path(world, opened.as_ref().and_then(|o| o.resume_from.clone()))?;
        if !writer && resume_from.is_none() {
            start_adapter(&p.cfg, &mut model)?;
        }
        let (mut state, opt_state) =
            restore_or_start(&p.cfg, &dir, resume_from.as_deref(), &mut model, writer)?;
        let tensorboard = match writer {
            true => open_tensorboard(&p.cfg, &dir, &mut state)?,
            false => None,
        };
        let updater = updater(&p.cfg, &model, opt_state)?;
        let owned = opened
            .map(|o| write_open_records(&p, &dir, o, state.step))
            .transpose()?;
        world::agree(world, "config, data and starting adapter", || {
            start_digest(&p, &model, &state)
        })?;
        let checks = initial_checks(&model, &fingerprint_before);
        let before = match writer {
            true => generations_before(&p, &model, &dir, resume_from.is_some())?,
            false => Vec::new(),
        };
        let shown = if writer { opts.progress } else { Mode::Quiet };
        let progress = Steps::new(shown, total, state.step);
        let plan = planner.epoch(state.epoch);
        let next_micro = micro_at(&plan, state.cursor)?;
        Ok(Self {
            warmup: p.cfg.optim.warmup.steps(total),
            b_moved: resume_from.is_some() || p.cfg.model.init_adapter.is_some(),
            resumed: resume_from.is_some(),
            tokens_at_start: (state.tokens_seen, state.padded_tokens_seen),
            p,
            opts,
            world,
            dir,
            _owned: owned,
            model,
            updater,
            state,
            total,
            planner,
            plan,
            next_micro,
            checks,
            fingerprint_before,
            before,
            progress,
            tensorboard,
            start: Instant::now(),
            first_loss: None,
            last_loss: None,
            last_eval: None,
            interrupted: false,
        })
    }

    /// Whether every step of the run is done.
    pub fn finished(&self) -> bool {
        self.state.step >= self.total
    }

    /// A validation loss before the first update, so the curve starts where the base model is
    /// (fresh runs with step-based evaluation only).
    pub fn evaluate_baseline(&mut self) -> Result<()> {
        if self.resumed || self.p.cfg.train.eval_every == 0 || !self.validating() {
            return Ok(());
        }
        let (loss, targets) = self.evaluate()?;
        if !loss.is_finite() {
            return Err(self.diverged("validation loss", loss, 0, 0));
        }
        self.append(&Metric::eval(0, loss, targets, 0.0))?;
        let elapsed = self.start.elapsed().as_secs_f64();
        self.progress.eval(0, loss, elapsed);
        self.checks.eval_losses.push((0, loss));
        Ok(())
    }

    /// The next `grad_accum` micro-batches, continuing across epochs: every rank walks the
    /// same plan, collates only the block it owns and learns every micro-batch's counts.
    pub fn next_batch(&mut self) -> Result<StepBatches> {
        let n = self.p.cfg.train.grad_accum;
        let mine = world::owned(self.world.rank(), self.world.size(), n);
        let mut owned = Vec::with_capacity(mine.len());
        for k in 0..n {
            if self.next_micro >= self.plan.len() {
                self.state.epoch += 1;
                self.state.cursor = 0;
                self.plan = self.planner.epoch(self.state.epoch);
                self.next_micro = 0;
            }
            let planned = &self.plan[self.next_micro];
            self.next_micro += 1;
            self.state.cursor += planned.examples();
            if mine.contains(&k) {
                let rows = batching::collate(&self.p.encoder, planned, &self.p.train);
                owned.push(Batch::from_rows(&rows, self.model.device())?);
            }
        }
        StepBatches::shard(self.world, &self.model, n, owned)
    }

    /// One optimizer step (`train::step`). A step without loss targets or with overflowed f16
    /// gradients is skipped and counted; a non-finite loss or gradient norm ends the run,
    /// naming the last checkpoint.
    pub fn step(&mut self, micro: &StepBatches) -> Result<Option<Trained>> {
        let cfg = &self.p.cfg;
        let lr =
            cfg.optim.lr * lambda(cfg.optim.schedule, self.state.step, self.warmup, self.total);
        let report = self.updater.step_on(
            self.world,
            &self.model,
            micro,
            &mut self.state.loss_scaler,
            &mut self.state.dropout_rng,
            lr,
        )?;
        self.state.tokens_seen += report.real_tokens as u64;
        self.state.padded_tokens_seen += micro.padded_tokens() as u64;
        let (loss, targets) = (report.loss(), report.targets);
        let next = self.state.step + 1;
        let trained = match report.outcome {
            StepOutcome::NoTargets => {
                self.state.skipped_steps += 1;
                self.progress.message(&format!(
                    "step {next}: no trainable token in the batch; update skipped"
                ));
                None
            }
            StepOutcome::Diverged { what, value } => {
                // A non-finite loss or gradient at step n comes from the adapter in memory: the
                // one after update n - 1, which a checkpoint of step n - 1 holds. It is kept
                // only if it still evaluates to a finite validation loss. A non-finite update
                // at step n leaves every checkpoint before step n good.
                let bad_from = if what == "updated adapter" || self.evaluate()?.0.is_finite() {
                    next
                } else {
                    next - 1
                };
                return Err(self.diverged(what, value, next, bad_from));
            }
            StepOutcome::Overflowed => {
                self.state.overflow_steps += 1;
                self.progress.message(&format!(
                    "step {next}: gradients overflowed in f16; update skipped, loss scale now {}",
                    self.state.loss_scaler.scale
                ));
                None
            }
            StepOutcome::Updated {
                grad_norm,
                clipped,
                grads,
            } => {
                self.record_coverage(&grads)?;
                self.state.clipped_steps += usize::from(clipped);
                // Under warmup the first update has lr 0 and leaves B at zero; A's gradient is
                // checked on the step after the first update that actually moved B.
                self.b_moved |= lr > 0.0;
                self.first_loss.get_or_insert(loss);
                self.last_loss = Some(loss);
                Some(Trained {
                    loss,
                    lr,
                    grad_norm,
                    targets,
                })
            }
        };
        self.state.step = next;
        Ok(trained)
    }

    /// Gradient coverage as this run sees it: every lora_B on the first backward, every lora_A
    /// after the first update (B = 0 before it, so dL/dA = 0).
    fn record_coverage(&mut self, grads: &[candle_core::Tensor]) -> Result<()> {
        let vars = &self.updater.vars;
        if self.checks.lora_b_with_grad_first_step.is_none() {
            self.checks.lora_b_with_grad_first_step = Some(nonzero_grads(vars, grads, "lora_B")?.0);
        } else if self.b_moved && self.checks.lora_a_with_grad_after_first_update.is_none() {
            self.checks.lora_a_with_grad_after_first_update =
                Some(nonzero_grads(vars, grads, "lora_A")?.0);
        }
        Ok(())
    }

    /// Progress, and a metrics line (and progress line) every `log_every` steps, on the first
    /// and on the last.
    pub fn log(&mut self, trained: Option<Trained>) -> Result<()> {
        let elapsed = self.start.elapsed().as_secs_f64();
        let tps = (self.state.tokens_seen - self.tokens_at_start.0) as f64 / elapsed.max(1e-9);
        let padded_tps =
            (self.state.padded_tokens_seen - self.tokens_at_start.1) as f64 / elapsed.max(1e-9);
        self.progress.set_position(self.state.step);
        let Some(t) = trained else {
            return Ok(());
        };
        let step = self.state.step;
        let line = StepLine {
            step,
            loss: t.loss,
            lr: t.lr,
            grad_norm: t.grad_norm,
            tokens_per_s: tps,
            elapsed_s: elapsed,
        };
        self.progress.update(&line);
        if step.is_multiple_of(self.p.cfg.train.log_every.max(1)) || self.finished() || step == 1 {
            self.progress.log(&line);
            self.append(&Metric {
                step,
                kind: MetricKind::Train,
                loss: t.loss,
                ppl: None,
                lr: Some(t.lr),
                grad_norm: Some(t.grad_norm),
                targets: t.targets,
                tokens_seen: Some(self.state.tokens_seen),
                tokens_per_s: Some(tps),
                padded_tokens_seen: Some(self.state.padded_tokens_seen),
                padded_tokens_per_s: Some(padded_tps),
                elapsed_s: elapsed,
            })?;
        }
        Ok(())
    }

    /// Whether Ctrl-C or SIGTERM (or `stop_at_step`) asks the run to stop after this step, on
    /// any rank: the ranks vote, so all stop after the same step.
    pub fn stop_requested(&self) -> Result<bool> {
        let here = self
            .opts
            .stop
            .as_ref()
            .is_some_and(|s| s.load(Ordering::SeqCst))
            || self.opts.stop_at_step == Some(self.state.step);
        world::any(self.world, here)
    }

    /// The validation loss every `eval_every` steps and at the end; a new best is saved as
    /// the `best` adapter.
    pub fn evaluate_if_due(&mut self) -> Result<()> {
        let every = self.p.cfg.train.eval_every;
        if !self.validating() {
            return Ok(());
        }
        if !((every > 0 && self.state.step.is_multiple_of(every)) || self.finished()) {
            return Ok(());
        }
        let step = self.state.step;
        let (loss, targets) = self.evaluate()?;
        if !loss.is_finite() {
            return Err(self.diverged("validation loss", loss, step, step));
        }
        let elapsed = self.start.elapsed().as_secs_f64();
        self.append(&Metric::eval(step, loss, targets, elapsed))?;
        self.checks.eval_losses.push((step, loss));
        self.last_eval = Some((step, loss));
        self.progress.eval(step, loss, elapsed);
        if targets > 0 && self.state.best_eval.is_none_or(|b| loss < b) {
            self.state.best_eval = Some(loss);
            if !world::is_writer(self.world) {
                return Ok(());
            }
            let card = self.p.card_body(step, Some(loss));
            adapter::save(
                &self.model,
                &self.dir.join("best"),
                &self.p.base.base_ref,
                &card,
            )?;
            self.p.write_tokenizer_files(&self.dir.join("best"))?;
        }
        Ok(())
    }

    /// A checkpoint every `save_every` steps, at the end, and when stopping.
    pub fn checkpoint_if_due(&mut self, stop: bool) -> Result<()> {
        let every = self.p.cfg.train.save_every;
        if (every > 0 && self.state.step.is_multiple_of(every)) || self.finished() || stop {
            self.check_ranks_agree()?;
            crate::sys::crash_point(&format!("rank{}-checkpoint", self.world.rank()));
            if !world::is_writer(self.world) {
                return Ok(());
            }
            // The metrics a checkpoint counts are on disk before the checkpoint is.
            let metrics = self.dir.join(files::METRICS);
            if metrics.exists() {
                crate::sys::sync_file(&metrics).map_err(|e| Error::io(&metrics, e))?;
            }
            if let Some(tb) = &self.tensorboard {
                tb.sync()?;
            }
            checkpoint::save(
                &self.dir,
                &self.model,
                &self.updater.opt,
                &self.state,
                &self.p.base.base_ref,
                KEEP_CHECKPOINTS,
            )?;
        }
        Ok(())
    }

    /// Marks the run as stopped early (its checkpoint is written).
    pub fn interrupt(&mut self) {
        self.interrupted = true;
        self.progress.message(&format!(
            "interrupted: checkpoint written at step {}; continue with --resume",
            self.state.step
        ));
    }

    /// Saves the final adapter, generates with it, checks the base against its fingerprint,
    /// and writes generations, checks and the summary.
    pub fn finish(mut self) -> Result<Summary> {
        self.progress.finish();
        let wall_s = self.start.elapsed().as_secs_f64();
        let eval_loss = match self.last_eval {
            _ if !self.validating() => None,
            Some((step, loss)) if step == self.state.step => Some(loss),
            _ => Some(self.evaluate()?.0),
        };
        if let Some(loss) = eval_loss.filter(|l| !l.is_finite()) {
            let step = self.state.step;
            return Err(self.diverged("validation loss", loss, step, step));
        }
        let adapter_dir = self.dir.join("adapter");
        self.check_ranks_agree()?;
        if !world::is_writer(self.world) {
            return Ok(self.summary(adapter_dir, eval_loss, wall_s, Vec::new()));
        }
        let card = self.p.card_body(self.state.step, eval_loss);
        adapter::save(&self.model, &adapter_dir, &self.p.base.base_ref, &card)?;
        self.p.write_tokenizer_files(&adapter_dir)?;
        let after = self.p.generate_all(&self.model)?;
        let generations: Vec<(Generation, Generation)> = std::mem::take(&mut self.before)
            .into_iter()
            .zip(after)
            .collect();
        records::write_json(&self.dir.join(files::GENERATIONS), &generations)?;
        self.final_checks()?;
        let summary = self.summary(adapter_dir, eval_loss, wall_s, generations);
        records::write_json(&self.dir.join(files::SUMMARY), &summary)?;
        let updates = summary.steps - summary.skipped_steps - summary.overflow_steps;
        if updates == 0 && !summary.interrupted {
            return Err(Error::Invalid(format!(
                "{}: nothing was trained: none of the {} steps applied an update ({} had no loss target, {} overflowed); check encode.labels and encode.max_len against the data (the run's records are written: `lorasft report --run` shows them)",
                self.dir.display(),
                summary.steps,
                summary.skipped_steps,
                summary.overflow_steps
            )));
        }
        Ok(summary)
    }

    /// The run's summary as it stands.
    fn summary(
        &self,
        adapter_dir: PathBuf,
        eval_loss: Option<f64>,
        wall_s: f64,
        generations: Vec<(Generation, Generation)>,
    ) -> Summary {
        Summary {
            run_dir: self.dir.clone(),
            adapter_dir,
            steps: self.state.step,
            first_loss: self.first_loss,
            last_loss: self.last_loss,
            eval_loss,
            best_eval_loss: self.state.best_eval,
            tokens_per_s: (self.state.tokens_seen - self.tokens_at_start.0) as f64
                / wall_s.max(1e-9),
            wall_s,
            peak_rss_mib: crate::sys::peak_rss_mib(),
            skipped_steps: self.state.skipped_steps,
            overflow_steps: self.state.overflow_steps,
            clipped_steps: self.state.clipped_steps,
            interrupted: self.interrupted,
            generations,
        }
    }

    /// Stops the job when some rank's adapter differs from rank 0's (one process: nothing to
    /// compare, and nothing is hashed).
    fn check_ranks_agree(&self) -> Result<()> {
        let what = format!("adapter after step {}", self.state.step);
        world::agree(self.world, &what, || adapter_digest(&self.model))
    }

    /// The error of a run that met a non-finite `what` at `step`: checkpoints from `bad_from` on
    /// are removed, `latest` points at the newest good one, and the error names it. When the
    /// roll-back itself fails, the error says both.
    fn diverged(&self, what: &'static str, value: f64, step: usize, bad_from: usize) -> Error {
        let rolled_back = match world::is_writer(self.world) {
            true => checkpoint::roll_back(&self.dir, bad_from),
            false => checkpoint::latest(&self.dir),
        };
        match rolled_back {
            Ok(good) => Error::Diverged {
                what,
                value,
                step,
                checkpoint: good.map_or("none".to_string(), |c| c.display().to_string()),
            },
            Err(e) => Error::Invalid(format!(
                "non-finite {what} ({value}) at step {step}: training stopped, and rolling the checkpoints back failed: {e}"
            )),
        }
    }

    /// The checks measured at the end: the base fingerprint after training, losses, finiteness.
    fn final_checks(&mut self) -> Result<()> {
        let after = Fingerprint::of(&self.model)?;
        self.checks.base_fingerprint_after = after.digest();
        self.checks.changed_base_tensors = self.fingerprint_before.changed(&after);
        self.checks.first_loss = self.first_loss;
        self.checks.last_loss = self.last_loss;
        self.checks.all_losses_finite = records::read_metrics(&self.dir.join(files::METRICS))?
            .iter()
            .all(|m| m.loss.is_finite());
        records::write_json(&self.dir.join(files::CHECKS), &self.checks)
    }

    /// Whether the run has a validation set (`data.validation = "none"` has none; nor has a
    /// split whose conversations all lack a trained turn): without one nothing is evaluated and
    /// no best adapter is chosen.
    fn validating(&self) -> bool {
        !self.p.val.is_empty()
    }

    /// Mean validation loss and its target count with the current adapter.
    fn evaluate(&self) -> Result<(f64, usize)> {
        evaluate_on(
            self.world,
            &self.model,
            &self.p.encoder,
            &self.p.val,
            self.p.cfg.train.batch_size,
        )
    }

    /// Appends a metrics line and counts it (a resume truncates to the count).
    fn append(&mut self, m: &Metric) -> Result<()> {
        self.state.metrics_lines += 1;
        if !world::is_writer(self.world) {
            return Ok(());
        }
        records::append_metric(&self.dir.join(files::METRICS), m)?;
        if let Some(tb) = &mut self.tensorboard {
            tb.metric(m)?;
            self.state.tensorboard = Some(tb.mark().clone());
        }
        Ok(())
    }
}

/// The writing rank's part of opening a run: finds the checkpoint to resume from (or attaches
/// the starting adapter), claims the directory, checks a resume's settings, and writes the
/// config, manifest, data record and continuation record.
fn open_as_writer(
    world: &dyn World,
    p: &Prepared,
    opts: &RunOptions,
    dir: &Path,
    fingerprint: &Fingerprint,
    model: &mut Llama,
) -> Result<Opened> {
    let resume_from = if opts.resume {
        checkpoint::latest(dir)?
    } else {
        None
    };
    // The starting adapter is attached before the directory is touched, so a bad one leaves
    // nothing behind; the claim then locks the directory for this run alone.
    if resume_from.is_none() {
        start_adapter(&p.cfg, model)?;
    }
    let owned = RunDir::claim(dir, claim(&p.cfg, dir, opts, resume_from.is_some())?)?;
    // Built once: it hashes the data and tokenizer files, which may be gigabytes.
    let mut manifest = p.manifest(fingerprint)?;
    let device_dropout = !model.device().is_cpu() && p.cfg.lora.dropout > 0.0;
    manifest.parallelism = records::Parallelism::of(world, device_dropout);
    let changes = match resume_from {
        Some(_) => continuation::check(dir, &p.cfg, &manifest, opts.allow_config_change)?,
        None => Vec::new(),
    };
    let config_path = dir.join(files::CONFIG);
    crate::sys::write_atomic(&config_path, p.cfg.to_toml()?.as_bytes())
        .map_err(|(path, e)| Error::io(path, e))?;
    Ok(Opened {
        owned,
        resume_from,
        changes,
        manifest,
    })
}

/// What the writing rank found and holds after [`open_as_writer`].
struct Opened {
    owned: RunDir,
    resume_from: Option<PathBuf>,
    changes: Vec<continuation::Change>,
    manifest: records::Manifest,
}

/// The writing rank's records of a run that is open and restored: the continuation record
/// (at the step the run continues from), the manifest and the data record.
fn write_open_records(p: &Prepared, dir: &Path, opened: Opened, step: usize) -> Result<RunDir> {
    continuation::record(dir, step, opened.changes)?;
    records::write_json(&dir.join(files::MANIFEST), &opened.manifest)?;
    records::write_json(&dir.join(files::DATA), &p.data_record())?;
    Ok(opened.owned)
}

/// The optimizer of the adapter on `model`, with a checkpoint's moments when resuming.
fn updater(
    cfg: &TrainConfig,
    model: &Llama,
    opt_state: Option<checkpoint::OptimState>,
) -> Result<Updater> {
    let mut updater = Updater::new(model, cfg.optim.adamw.clone(), cfg.optim.max_grad_norm)?;
    if let Some((step, m, v)) = opt_state {
        updater.opt.restore(step, m, v)?;
    }
    Ok(updater)
}

/// Refuses a world the run cannot be split over: `train.grad_accum` micro-batches per step must
/// divide among the ranks.
fn check_world(world: &dyn World, cfg: &TrainConfig) -> Result<()> {
    let (n, size) = (cfg.train.grad_accum, world.size());
    if n.is_multiple_of(size) {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "train.grad_accum = {n} micro-batches per step cannot be shared by {size} ranks: it must be a multiple of the number of ranks (it stays the global count, so the run is the same run on any number of ranks)"
    )))
}

/// Rank 0's checkpoint path (or `None`) on every rank.
fn share_path(world: &dyn World, path: Option<PathBuf>) -> Result<Option<PathBuf>> {
    if world.size() == 1 {
        return Ok(path);
    }
    let bytes = path
        .map(|p| {
            use std::os::unix::ffi::OsStringExt;
            p.into_os_string().into_vec()
        })
        .unwrap_or_default();
    let got = world.broadcast(bytes)?;
    Ok((!got.is_empty()).then(|| {
        use std::os::unix::ffi::OsStringExt;
        PathBuf::from(std::ffi::OsString::from_vec(got))
    }))
}

/// SHA-256 of the adapter: each tensor's name and `verify::tensor_sha256`, in order.
fn adapter_digest(model: &Llama) -> Result<[u8; 32]> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (name, v) in model.lora_vars() {
        h.update(name.as_bytes());
        h.update(crate::verify::tensor_sha256(v.as_tensor())?);
    }
    Ok(h.finalize().into())
}

/// What every rank must start from alike: the resolved config, the training and validation
/// examples, the adapter and the loop state. Ranks that differ stop before the first step.
fn start_digest(p: &Prepared, model: &Llama, state: &LoopState) -> Result<[u8; 32]> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(p.cfg.to_toml()?.as_bytes());
    for e in p.train.iter().chain(&p.val) {
        for id in &e.ids {
            h.update(id.to_le_bytes());
        }
        h.update(format!(";{};{:?};", e.prompt_tokens, e.trained));
    }
    h.update(adapter_digest(model)?);
    // The TensorBoard mark is the writer's alone (only rank 0 writes events).
    let state = LoopState {
        tensorboard: None,
        ..state.clone()
    };
    h.update(serde_json::to_vec(&state).map_err(|e| Error::Invalid(e.to_string()))?);
    Ok(h.finalize().into())
}

/// How this run claims its directory. A resume with no checkpoint to continue restarts the run
/// in place (its partial files are replaced), which lets a script always pass `--resume`. The
/// run name must be one plain path component, and `--overwrite` must not clear the starting
/// adapter away.
fn claim(cfg: &TrainConfig, dir: &Path, opts: &RunOptions, resumable: bool) -> Result<Claim> {
    let name = Path::new(&cfg.run.name);
    let plain = matches!(
        name.components().collect::<Vec<_>>().as_slice(),
        [std::path::Component::Normal(_)]
    );
    if !plain {
        return Err(Error::Invalid(format!(
            "run.name {:?} must be a plain directory name (no `/`, `.` or `..`)",
            cfg.run.name
        )));
    }
    if opts.resume && resumable {
        return Ok(Claim::Resume);
    }
    let overwrite = opts.overwrite || opts.resume;
    if let Some(a) = &cfg.model.init_adapter
        && overwrite
        && a.starts_with(dir)
    {
        return Err(Error::Invalid(format!(
            "model.init_adapter {} lies inside the run directory that would be cleared; copy it elsewhere first",
            a.display()
        )));
    }
    Ok(Claim::Fresh { overwrite })
}

/// Attaches a fresh run's starting adapter: the configured one, or a new one from the seed.
fn start_adapter(cfg: &TrainConfig, model: &mut Llama) -> Result<()> {
    match &cfg.model.init_adapter {
        Some(a) => adapter::load_onto(model, a, &cfg.model.source).map(|_| ()),
        None => model.add_lora(&cfg.lora, cfg.run.seed),
    }
}

/// The loop state and optimizer moments to continue from: a checkpoint's (its adapter loaded
/// into `model`), or a fresh start (adapter already attached) with no metrics.
fn restore_or_start(
    cfg: &TrainConfig,
    dir: &Path,
    resume_from: Option<&Path>,
    model: &mut Llama,
    writer: bool,
) -> Result<(LoopState, Option<checkpoint::OptimState>)> {
    let metrics = dir.join(files::METRICS);
    if let Some(ckpt) = resume_from {
        let (state, opt) = checkpoint::load(ckpt, model)?;
        if writer {
            records::truncate_metrics(&metrics, state.metrics_lines)?;
        }
        return Ok((state, Some(opt)));
    }
    if writer {
        let _ = std::fs::remove_file(&metrics);
    }
    Ok((LoopState::start(cfg.run.seed, cfg.run.precision), None))
}

/// The run's TensorBoard event file when the config asks for one: the checkpoint's, cut back to
/// where it stood, or a new one; the config goes in as text at the step the run starts from.
fn open_tensorboard(
    cfg: &TrainConfig,
    dir: &Path,
    state: &mut LoopState,
) -> Result<Option<EventLog>> {
    if !cfg.report.tensorboard {
        return Ok(None);
    }
    let mut tb = EventLog::open(dir, state.tensorboard.as_ref())?;
    tb.text("config", &cfg.to_toml()?, state.step)?;
    state.tensorboard = Some(tb.mark().clone());
    Ok(Some(tb))
}

/// The checks as known before the first step; the rest is measured as the run goes.
fn initial_checks(model: &Llama, base: &Fingerprint) -> RunChecks {
    RunChecks {
        trainable_params: trainable_params_line(model.trainable_params(), model.all_params()),
        base_tensors: base.0.len(),
        base_fingerprint_before: base.digest(),
        base_fingerprint_after: String::new(),
        changed_base_tensors: Vec::new(),
        adapter_tensors: model.lora_vars().len(),
        lora_b_with_grad_first_step: None,
        lora_a_with_grad_after_first_update: None,
        first_loss: None,
        last_loss: None,
        all_losses_finite: true,
        eval_losses: Vec::new(),
    }
}

/// Generations with the starting adapter (B = 0 for a fresh run: the base model's answers);
/// a resumed run reads the ones its first part wrote.
fn generations_before(
    p: &Prepared,
    model: &Llama,
    dir: &Path,
    resumed: bool,
) -> Result<Vec<Generation>> {
    let path = dir.join(files::GENERATIONS_BEFORE);
    if resumed && path.exists() {
        return records::read_json(&path);
    }
    let g = p.generate_all(model)?;
    records::write_json(&path, &g)?;
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::batching::Batching;
    use crate::rng::Rng;

    #[test]
    fn padded_plans_keep_the_seeded_epoch_order_of_earlier_runs() {
        // Runs made before batching modes existed shuffled 0..n by this stream, per epoch.
        let old = |n: usize, epoch: usize| {
            let mut v: Vec<usize> = (0..n).collect();
            Rng::derive(1, &format!("shuffle-epoch-{epoch}")).shuffle(&mut v);
            v
        };
        let p = Planner::new(Batching::Padded, vec![4; 50], 8, 3, 1, true);
        for epoch in 0..3 {
            let got: Vec<usize> = p
                .epoch(epoch)
                .iter()
                .flat_map(|m| m.rows.concat())
                .collect();
            assert_eq!(got, old(50, epoch));
        }
    }

    #[test]
    fn a_cursor_maps_to_its_micro_batch_and_a_mid_batch_cursor_is_refused() {
        let p = Planner::new(Batching::Packed, vec![3, 5, 2, 6, 1, 4], 8, 2, 7, true);
        let plan = p.epoch(0);
        let mut seen = 0;
        for (i, m) in plan.iter().enumerate() {
            assert_eq!(micro_at(&plan, seen).unwrap(), i);
            seen += m.examples();
        }
        assert_eq!(micro_at(&plan, seen).unwrap(), plan.len());
        let first = plan[0].examples();
        assert!(first > 1, "packed micro-batches hold several examples");
        assert!(micro_at(&plan, first - 1).is_err());
    }
}
