//! `lorasft bench --batching`: what each batching mode buys in real (non-padding) tokens per
//! second, on a preset's own data, model and settings (smollm2-demo by default).
//!
//! Four variants train the same training split (the preset's seeded order, no evaluation)
//! with the trainer's own step: the reference run's padding (every row padded to 512), dynamic
//! padding (the preset's own: longest in the batch), `group_by_length` and `packed`. Each
//! variant runs its epoch's first `skip` steps untimed, then `steps` timed ones spread evenly
//! over the rest of the epoch: the first steps are not typical (`group_by_length` puts the
//! longest batch first, and packing opens rows longest first). The padding share is given
//! for the timed steps and for the whole epoch. The variants take turns within a round and
//! the order rotates from round to round, so a machine whose speed drifts moves every side
//! alike.
//! Each thread count runs in a fresh process (`bench --batching --one`). CPU busy is user +
//! system CPU time over wall time: how many cores the step kept busy.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::bench::table::median;
use crate::data::batch::Batch;
use crate::data::batching::{self, Batching, PlanTokens, Planner};
use crate::data::encode::{EncodeConfig, Encoder, Example, Padding};
use crate::error::{Error, Result};
use crate::model::Llama;
use crate::train::config::TrainConfig;
use crate::train::loss_scale::LossScaler;
use crate::train::prepare::{Prepared, prepare};
use crate::train::step::Updater;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BatchingBench {
    /// The preset whose data, model and settings run.
    pub preset: String,
    /// Thread counts; each runs in a fresh process.
    pub threads: Vec<usize>,
    /// Untimed steps first (the "steps 2–4" skip one).
    pub skip: usize,
    /// Timed steps per variant and round.
    pub steps: usize,
    /// Rounds; the variants' order rotates per round.
    pub rounds: usize,
}

/// One variant's figures at one thread count (medians over rounds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModeRow {
    /// Variant name.
    pub variant: String,
    /// Threads.
    pub threads: usize,
    /// Examples per timed step.
    pub examples_per_step: f64,
    /// Share of the timed steps' token slots that were padding.
    pub padding_share: f64,
    /// Share of the whole epoch's token slots that are padding.
    pub epoch_padding_share: f64,
    /// Milliseconds per step (median over rounds).
    pub step_ms: f64,
    /// Real tokens per second (median over rounds).
    pub real_tokens_per_s: f64,
    /// All token slots per second, padding included.
    pub all_tokens_per_s: f64,
    /// User + system CPU seconds over wall seconds while stepping (median over rounds).
    pub cpu_busy: f64,
}

/// One variant: its name, the micro-batches of every step it runs, and its epoch's padding.
struct Variant {
    name: String,
    steps: Vec<Vec<Batch>>,
    epoch_padding_share: f64,
}

impl BatchingBench {
    /// Runs every thread count in a fresh process; rows in variant order per thread count.
    pub fn run(&self) -> Result<Vec<ModeRow>> {
        let mut rows = Vec::new();
        for &threads in &self.threads {
            eprintln!(
                "bench --batching: {} with {threads} thread(s)...",
                self.preset
            );
            let args = [
                "--batching",
                "--one",
                "--preset",
                &self.preset,
                "--skip",
                &self.skip.to_string(),
                "--steps",
                &self.steps.to_string(),
                "--rounds",
                &self.rounds.to_string(),
            ]
            .map(Into::into);
            rows.extend(crate::bench::child_rows::<ModeRow>(&args, threads)?);
        }
        Ok(rows)
    }

    /// Measures every variant in this process (candle's thread count).
    pub fn run_here(&self) -> Result<Vec<ModeRow>> {
        let mut cfg = TrainConfig::preset(&self.preset)?;
        cfg.train.eval_every = 0;
        let p = prepare(cfg)?;
        let variants = variants(&p, self.skip, self.steps.max(1))?;
        let mut model = p.base.model.clone();
        model.add_lora(&p.cfg.lora, p.cfg.run.seed)?;
        let mut measured: Vec<Vec<Measured>> = vec![Vec::new(); variants.len()];
        for round in 0..self.rounds.max(1) {
            for k in 0..variants.len() {
                let i = (k + round) % variants.len();
                eprintln!("  round {}: {}", round + 1, variants[i].name);
                measured[i].push(self.time_variant(&p, &model, &variants[i])?);
            }
        }
        Ok(variants
            .iter()
            .zip(&measured)
            .map(|(v, m)| self.row(v, m))
            .collect())
    }

    /// Runs a variant's steps with a fresh optimizer; what its timed steps measured.
    fn time_variant(&self, p: &Prepared, model: &Llama, v: &Variant) -> Result<Measured> {
        let mut updater =
            Updater::new(model, p.cfg.optim.adamw.clone(), p.cfg.optim.max_grad_norm)?;
        let (mut scaler, mut rng) = (LossScaler::disabled(), crate::rng::Rng::new(0));
        let mut m = Measured::default();
        for (n, micro) in v.steps.iter().enumerate() {
            let (t0, c0) = (Instant::now(), crate::sys::cpu_seconds());
            updater.step(model, micro, &mut scaler, &mut rng, 1e-4)?;
            if n < self.skip {
                continue;
            }
            m.wall += t0.elapsed().as_secs_f64();
            m.cpu += crate::sys::cpu_seconds() - c0;
            for b in micro {
                m.real += b.real_tokens;
                m.slots += b.input_ids.elem_count();
                m.examples += b
                    .segments
                    .as_ref()
                    .map_or(b.input_ids.dims()[0], |s| s.iter().map(Vec::len).sum());
            }
        }
        Ok(m)
    }

    /// A variant's row from what its rounds measured (the same steps in every round).
    fn row(&self, v: &Variant, rounds: &[Measured]) -> ModeRow {
        let per = |f: &dyn Fn(&Measured) -> f64| {
            let mut v: Vec<f64> = rounds.iter().map(f).collect();
            median(&mut v)
        };
        let steps = self.steps.max(1) as f64;
        let first = rounds[0];
        ModeRow {
            variant: v.name.clone(),
            threads: candle_core::utils::get_num_threads(),
            examples_per_step: first.examples as f64 / steps,
            padding_share: 1.0 - first.real as f64 / first.slots.max(1) as f64,
            epoch_padding_share: v.epoch_padding_share,
            step_ms: per(&|r| r.wall / steps * 1e3),
            real_tokens_per_s: per(&|r| r.real as f64 / r.wall),
            all_tokens_per_s: per(&|r| r.slots as f64 / r.wall),
            cpu_busy: per(&|r| r.cpu / r.wall),
        }
    }
}

/// What one variant's timed steps of one round measured.
#[derive(Debug, Clone, Copy, Default)]
struct Measured {
    wall: f64,
    cpu: f64,
    real: usize,
    slots: usize,
    examples: usize,
}

/// The reference run's padded length.
const REFERENCE_LEN: usize = 512;

/// The four variants over the prepared run's training records: `skip` + `steps` steps each.
fn variants(p: &Prepared, skip: usize, steps: usize) -> Result<Vec<Variant>> {
    let records: Vec<_> = p
        .split
        .train
        .iter()
        .map(|&i| p.dataset.records[i].clone())
        .collect();
    // The reference pads every row to 512, or to the model's last position when that is
    // shorter (the smoke preset's fixture has 256).
    let ref_len = REFERENCE_LEN.min(p.base.model.shape().max_positions);
    let reference = EncodeConfig {
        max_len: ref_len,
        padding: Padding::MaxLength,
        batching: Batching::Padded,
        ..p.cfg.encode.clone()
    };
    let with = |batching| EncodeConfig {
        batching,
        ..p.cfg.encode.clone()
    };
    [
        (
            format!("padded, max_length {ref_len} (the reference's padding)"),
            reference,
        ),
        (
            "padded, dynamic (the preset's padding)".into(),
            with(Batching::Padded),
        ),
        ("group_by_length".into(), with(Batching::GroupByLength)),
        ("packed".into(), with(Batching::Packed)),
    ]
    .into_iter()
    .map(|(name, cfg)| {
        let enc = Encoder::new(p.encoder.tokenizer().clone(), cfg, p.encoder.special_ids())?;
        let examples = records
            .iter()
            .map(|r| enc.encode(r))
            .collect::<Result<Vec<Example>>>()?;
        let (steps, epoch_padding_share) = variant_steps(p, &enc, &examples, skip, steps)?;
        Ok(Variant {
            name,
            steps,
            epoch_padding_share,
        })
    })
    .collect()
}

/// The epoch's first `skip` steps (`grad_accum` micro-batches each), then `steps` steps spread
/// evenly over the rest of epoch 0, in the run's seeded order; and the epoch's padding share.
fn variant_steps(
    p: &Prepared,
    enc: &Encoder,
    examples: &[Example],
    skip: usize,
    steps: usize,
) -> Result<(Vec<Vec<Batch>>, f64)> {
    let (t, cfg) = (&p.cfg.train, enc.config());
    let lengths: Vec<usize> = examples.iter().map(|e| e.ids.len()).collect();
    let planner = Planner::new(
        cfg.batching,
        lengths.clone(),
        cfg.max_len,
        t.batch_size,
        p.cfg.run.seed,
        p.cfg.data.shuffle,
    );
    let plan = planner.epoch(0);
    let tokens = PlanTokens::of(&plan, &lengths, enc);
    let total = plan.len() / t.grad_accum;
    if total < skip + steps {
        return Err(Error::Invalid(format!(
            "{} batching gives {total} steps per epoch, fewer than the {} the bench needs",
            cfg.batching.name(),
            skip + steps
        )));
    }
    let picked = (0..skip).chain((0..steps).map(|j| skip + j * (total - skip) / steps));
    let batches = picked
        .map(|step| {
            plan[step * t.grad_accum..(step + 1) * t.grad_accum]
                .iter()
                .map(|m| {
                    Batch::from_rows(&batching::collate(enc, m, examples), p.base.model.device())
                })
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((batches, tokens.padding_share()))
}

/// The table: each variant's figures and its real tokens/s over dynamic padding's and over
/// the reference padding's, per thread count.
pub fn render(bench: &BatchingBench, rows: &[ModeRow]) -> String {
    let mut out = format!(
        "{} preset, its seeded order, no evaluation; {} untimed step(s), then {} timed step(s) spread over epoch 0; median of {} round(s)\n\n\
         | variant | threads | examples/step | padding share (timed steps) | padding share (epoch) | ms/step | real tok/s | all tok/s | CPU busy (cores) | real tok/s vs dynamic | vs max_length padding |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        bench.preset,
        bench.skip,
        bench.steps,
        bench.rounds.max(1),
    );
    for &threads in &bench.threads {
        let here: Vec<&ModeRow> = rows.iter().filter(|r| r.threads == threads).collect();
        let base = |prefix: &str| {
            here.iter()
                .find(|r| r.variant.starts_with(prefix))
                .map(|r| r.real_tokens_per_s)
        };
        let (reference, dynamic) = (base("padded, max_length"), base("padded, dynamic"));
        for r in &here {
            let ratio = |b: Option<f64>| {
                b.map_or("".into(), |b| format!("{:.2}×", r.real_tokens_per_s / b))
            };
            out.push_str(&format!(
                "| {} | {} | {:.1} | {:.1}% | {:.1}% | {:.0} | {:.0} | {:.0} | {:.2} | {} | {} |\n",
                r.variant,
                r.threads,
                r.examples_per_step,
                100.0 * r.padding_share,
                100.0 * r.epoch_padding_share,
                r.step_ms,
                r.real_tokens_per_s,
                r.all_tokens_per_s,
                r.cpu_busy,
                ratio(dynamic),
                ratio(reference),
            ));
        }
    }
    out
}
