//! Step-time benchmarks at fixed shapes with weights from a seed: the figures `lorasft bench`
//! prints and the README quotes. The step is the trainer's own (`forward_backward`, clipping,
//! AdamW), so what is timed is what trains. Timing lives here and in `benches/`, never in tests.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::data::batch::Batch;
use crate::error::{Error, Result};
use crate::generate::{Sampling, pick};
use crate::model::fixture::FixtureSpec;
use crate::model::{KvCache, Llama, LoraConfig, Mode};
use crate::rng::Rng;
use crate::train::optim::{AdamW, AdamWParams, clip_grad_norm};
use crate::train::trainer::forward_backward;

/// The benchmark shapes of the issues, each with its batch and sequence length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BenchShape {
    /// hidden 256, 4 layers, 8/2 heads, intermediate 688, vocab 32000, untied; batch 4 × 128.
    Tiny,
    /// SmolLM2-135M (hidden 576, 30 layers, 9/3 heads, vocab 49152, tied); batch 1 × 256.
    Smollm2,
    /// TinyLlama-1.1B-Chat (hidden 2048, 22 layers, 32/4 heads, vocab 32000); batch 4 × 512.
    Tinyllama,
}

impl BenchShape {
    /// The model shape.
    pub fn spec(self) -> FixtureSpec {
        match self {
            BenchShape::Tiny => FixtureSpec::tiny_bench(),
            BenchShape::Smollm2 => FixtureSpec::smollm2_135m(),
            BenchShape::Tinyllama => FixtureSpec::tinyllama_1_1b(),
        }
    }

    /// (batch, sequence length) of one step.
    pub fn batch_seq(self) -> (usize, usize) {
        match self {
            BenchShape::Tiny => (4, 128),
            BenchShape::Smollm2 => (1, 256),
            BenchShape::Tinyllama => (4, 512),
        }
    }

    /// The name used on the command line and in tables.
    pub fn name(self) -> &'static str {
        match self {
            BenchShape::Tiny => "tiny",
            BenchShape::Smollm2 => "smollm2-135m",
            BenchShape::Tinyllama => "tinyllama-1.1b",
        }
    }
}

/// A model with LoRA r 8 on q,v (the reference config), a fixed random batch with labels =
/// input_ids and no padding, and the trainer's optimizer: one training step on demand.
pub struct StepBench {
    model: Llama,
    named: Vec<(String, Var)>,
    opt: AdamW,
    batch: Batch,
    rng: Rng,
}

impl StepBench {
    /// Builds the model from `seed` in `dtype` on `dev` and draws the batch.
    pub fn new(shape: BenchShape, dtype: DType, dev: &Device, seed: u64) -> Result<Self> {
        let spec = shape.spec();
        let mut model = spec.build(seed, dtype, dev)?;
        model.add_lora(&LoraConfig::default(), seed)?;
        let (b, s) = shape.batch_seq();
        let mut rng = Rng::derive(seed, "bench-batch");
        let ids: Vec<u32> = (0..b * s)
            .map(|_| rng.below(spec.vocab as u64) as u32)
            .collect();
        let batch = Batch::unpadded(Tensor::from_vec(ids, (b, s), dev)?)?;
        let named = model.lora_vars();
        let vars = named.iter().map(|(_, v)| v.clone()).collect();
        let opt = AdamW::new(vars, AdamWParams::default())?;
        Ok(Self {
            model,
            named,
            opt,
            batch,
            rng: Rng::derive(seed, "bench-dropout"),
        })
    }

    /// The model under test.
    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// One optimizer step: forward + backward (dropout on), clip to 1.0, AdamW; the mean loss.
    pub fn step(&mut self) -> Result<f64> {
        let targets = self.batch.targets;
        let (loss, mut grads, _) = forward_backward(
            &self.model,
            &self.named,
            std::slice::from_ref(&self.batch),
            targets,
            1.0,
            &mut self.rng,
        )?;
        clip_grad_norm(&mut grads, 1.0)?;
        self.opt.step(&grads, 1e-4)?;
        Ok(loss / targets as f64)
    }

    /// The forward alone: logits (b, s, v) in evaluation mode, synchronised to the host.
    pub fn forward(&self) -> Result<()> {
        let b = &self.batch;
        let logits = self
            .model
            .forward(&b.input_ids, Some(&b.attention_mask), &mut Mode::Eval)?;
        sync(&logits)
    }

    /// Greedy generation with the KV cache: a `prompt`-token prompt, then `new` tokens one by
    /// one. Returns the seconds spent on the new tokens.
    pub fn generate(&self, prompt: usize, new: usize) -> Result<f64> {
        let ids = self.batch.input_ids.narrow(0, 0, 1)?.narrow(1, 0, prompt)?;
        let mut cache = KvCache::new();
        let logits = self.model.forward_cached(&ids, &mut cache)?;
        let mut next = greedy(&logits)?;
        let start = Instant::now();
        for _ in 0..new {
            let input = Tensor::from_vec(vec![next], (1, 1), self.model.device())?;
            next = greedy(&self.model.forward_cached(&input, &mut cache)?)?;
        }
        Ok(start.elapsed().as_secs_f64())
    }
}

fn greedy(logits: &Tensor) -> Result<u32> {
    let v = logits
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    pick(&v, Sampling::Greedy, &mut Rng::new(0))
}

/// Waits for a device's queued work by reading one value back.
fn sync(t: &Tensor) -> Result<()> {
    t.flatten_all()?
        .narrow(0, 0, 1)?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?;
    Ok(())
}

/// One line of the benchmark table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchRow {
    /// What was run ("lorasft", or the comparison's name).
    pub impl_name: String,
    /// Shape name.
    pub shape: String,
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Compute threads.
    pub threads: usize,
    /// Median optimizer step, milliseconds.
    pub step_ms: f64,
    /// Fastest and slowest timed step, milliseconds.
    pub step_range_ms: (f64, f64),
    /// Training tokens per second at the median step.
    pub tokens_per_s: f64,
    /// Median forward (logits), milliseconds.
    pub forward_ms: f64,
    /// Generation with the KV cache, new tokens per second (batch 1).
    pub gen_tokens_per_s: f64,
    /// Peak resident memory of the process, MiB.
    pub peak_rss_mib: f64,
}

/// How a shape is measured.
#[derive(Debug, Clone)]
pub struct BenchPlan {
    /// Shape to run.
    pub shape: BenchShape,
    /// Steps timed after one untimed warm-up step.
    pub steps: usize,
    /// New tokens generated for the generation figure.
    pub gen_tokens: usize,
    /// Weight and batch seed.
    pub seed: u64,
}

/// Runs one shape in this process: warm-up, timed steps, timed forwards, generation; the
/// thread count is candle's (RAYON_NUM_THREADS).
pub fn run_shape(plan: &BenchPlan) -> Result<BenchRow> {
    let dev = Device::Cpu;
    let mut bench = StepBench::new(plan.shape, DType::F32, &dev, plan.seed)?;
    let steps = plan.steps.max(1);
    bench.step()?;
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps {
        let t = Instant::now();
        let loss = bench.step()?;
        times.push(t.elapsed().as_secs_f64());
        if !loss.is_finite() {
            return Err(Error::Invalid(format!("bench loss is {loss}")));
        }
    }
    let mut fwd = Vec::with_capacity(steps);
    for _ in 0..steps {
        let t = Instant::now();
        bench.forward()?;
        fwd.push(t.elapsed().as_secs_f64());
    }
    let gen_secs = bench.generate(16, plan.gen_tokens)?;
    let (b, s) = plan.shape.batch_seq();
    let step = median(&mut times);
    Ok(BenchRow {
        impl_name: "lorasft".into(),
        shape: plan.shape.name().into(),
        batch: b,
        seq: s,
        threads: candle_core::utils::get_num_threads(),
        step_ms: step * 1e3,
        step_range_ms: (times[0] * 1e3, times[times.len() - 1] * 1e3),
        tokens_per_s: (b * s) as f64 / step,
        forward_ms: median(&mut fwd) * 1e3,
        gen_tokens_per_s: plan.gen_tokens as f64 / gen_secs,
        peak_rss_mib: peak_rss_bytes().unwrap_or(0) as f64 / (1024.0 * 1024.0),
    })
}

/// Sorts `xs` and returns its median.
pub fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// The process's peak resident set (VmHWM from /proc/self/status), where Linux provides it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// lorasft's step time over another implementation's at one shape and thread count, one ratio
/// per round: each pair was measured back to back, so a machine whose speed drifts between
/// rounds (shared CPUs do, by ±20 % here) moves both sides of a ratio alike.
#[derive(Debug, Clone, PartialEq)]
pub struct PairedRatio {
    /// The other implementation.
    pub impl_name: String,
    /// Shape name.
    pub shape: String,
    /// Compute threads.
    pub threads: usize,
    /// lorasft ms/step over the other's, in round order.
    pub ratios: Vec<f64>,
}

impl PairedRatio {
    /// The median over rounds: the figure the table quotes.
    pub fn median(&self) -> f64 {
        median(&mut self.ratios.clone())
    }
}

/// The paired ratios of every (other implementation, shape, threads) that has a lorasft row in
/// the same round.
pub fn paired_ratios(rounds: &[Vec<BenchRow>]) -> Vec<PairedRatio> {
    let mut out: Vec<PairedRatio> = Vec::new();
    for round in rounds {
        for r in round.iter().filter(|r| r.impl_name != "lorasft") {
            let Some(ours) = round
                .iter()
                .find(|o| o.impl_name == "lorasft" && o.shape == r.shape && o.threads == r.threads)
            else {
                continue;
            };
            let ratio = ours.step_ms / r.step_ms;
            match out.iter_mut().find(|p| {
                p.impl_name == r.impl_name && p.shape == r.shape && p.threads == r.threads
            }) {
                Some(p) => p.ratios.push(ratio),
                None => out.push(PairedRatio {
                    impl_name: r.impl_name.clone(),
                    shape: r.shape.clone(),
                    threads: r.threads,
                    ratios: vec![ratio],
                }),
            }
        }
    }
    out
}

/// One row per (implementation, shape, threads) over all rounds: median step, forward and
/// generation figures, the fastest and slowest step seen, the highest peak RSS.
pub fn merge_rounds(rounds: &[Vec<BenchRow>]) -> Vec<BenchRow> {
    let mut groups: Vec<Vec<&BenchRow>> = Vec::new();
    for r in rounds.iter().flatten() {
        match groups.iter_mut().find(|g| {
            g[0].impl_name == r.impl_name && g[0].shape == r.shape && g[0].threads == r.threads
        }) {
            Some(g) => g.push(r),
            None => groups.push(vec![r]),
        }
    }
    groups
        .into_iter()
        .map(|g| {
            let pick =
                |f: fn(&BenchRow) -> f64| median(&mut g.iter().map(|r| f(r)).collect::<Vec<_>>());
            let step_ms = pick(|r| r.step_ms);
            let lo = g
                .iter()
                .map(|r| r.step_range_ms.0)
                .fold(f64::INFINITY, f64::min);
            let hi = g.iter().map(|r| r.step_range_ms.1).fold(0.0, f64::max);
            BenchRow {
                step_ms,
                step_range_ms: (lo, hi),
                tokens_per_s: (g[0].batch * g[0].seq) as f64 / (step_ms / 1e3),
                forward_ms: pick(|r| r.forward_ms),
                gen_tokens_per_s: pick(|r| r.gen_tokens_per_s),
                peak_rss_mib: g.iter().map(|r| r.peak_rss_mib).fold(0.0, f64::max),
                ..g[0].clone()
            }
        })
        .collect()
}

/// The rows as a Markdown table. Where a row of another implementation has the same shape and
/// thread count as a lorasft row, the last column gives lorasft's step time as a ratio of it:
/// the median paired ratio when `paired` has one, else the ratio of the two rows.
pub fn render_table(rows: &[BenchRow], paired: &[PairedRatio]) -> String {
    let mut out = String::from(
        "| impl | shape | batch × seq | threads | ms/step (median) | range | tokens/s | forward ms | gen tok/s | peak RSS MiB | lorasft / this |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let ours = rows
            .iter()
            .find(|o| o.impl_name == "lorasft" && o.shape == r.shape && o.threads == r.threads);
        let pair = paired
            .iter()
            .find(|p| p.impl_name == r.impl_name && p.shape == r.shape && p.threads == r.threads);
        let ratio = match (ours, pair) {
            (_, Some(p)) => format!("{:.2}×", p.median()),
            (Some(o), None) if r.impl_name != "lorasft" => format!("{:.2}×", o.step_ms / r.step_ms),
            _ => "".into(),
        };
        out.push_str(&format!(
            "| {} | {} | {} × {} | {} | {:.0} | {:.0}–{:.0} | {:.0} | {:.0} | {:.1} | {:.0} | {} |\n",
            r.impl_name,
            r.shape,
            r.batch,
            r.seq,
            r.threads,
            r.step_ms,
            r.step_range_ms.0,
            r.step_range_ms.1,
            r.tokens_per_s,
            r.forward_ms,
            r.gen_tokens_per_s,
            r.peak_rss_mib,
            ratio
        ));
    }
    out
}

/// Encoding a dataset with the reference encoder (template, tokenizer, max length 512):
/// records encoded and the seconds it took (loading the tokenizer and file excluded).
pub fn time_encoding(data: &std::path::Path, tokenizer: &std::path::Path) -> Result<(usize, f64)> {
    use crate::data::encode::{EncodeConfig, Encoder};
    let dataset = crate::data::dataset::load(data)?;
    let encoder = Encoder::from_file(tokenizer, EncodeConfig::default())?;
    let start = Instant::now();
    for r in &dataset.records {
        encoder.encode(r)?;
    }
    Ok((dataset.records.len(), start.elapsed().as_secs_f64()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(impl_name: &str, threads: usize, step_ms: f64, rss: f64) -> BenchRow {
        BenchRow {
            impl_name: impl_name.into(),
            shape: "tiny".into(),
            batch: 4,
            seq: 128,
            threads,
            step_ms,
            step_range_ms: (step_ms - 1.0, step_ms + 1.0),
            tokens_per_s: 512.0 / (step_ms / 1e3),
            forward_ms: step_ms / 2.0,
            gen_tokens_per_s: 10.0,
            peak_rss_mib: rss,
        }
    }

    #[test]
    fn ratios_pair_rows_of_the_same_round_and_the_median_is_over_rounds() {
        let rounds = vec![
            vec![row("lorasft", 1, 400.0, 10.0), row("pt", 1, 800.0, 90.0)],
            vec![row("pt", 1, 1000.0, 95.0), row("lorasft", 1, 600.0, 12.0)],
            vec![row("lorasft", 1, 500.0, 11.0), row("pt", 1, 500.0, 91.0)],
            // No lorasft row at 2 threads: nothing to pair.
            vec![row("pt", 2, 300.0, 91.0)],
        ];
        let paired = paired_ratios(&rounds);
        assert_eq!(paired.len(), 1);
        assert_eq!(paired[0].ratios, vec![0.5, 0.6, 1.0]);
        assert_eq!(paired[0].median(), 0.6);
        // The ratio of the medians (500 / 800) would differ from the paired median (0.6).
        let merged = merge_rounds(&rounds);
        let ours = merged.iter().find(|r| r.impl_name == "lorasft").unwrap();
        assert_eq!(ours.step_ms, 500.0);
        assert_eq!(ours.step_range_ms, (399.0, 601.0));
        assert_eq!(ours.peak_rss_mib, 12.0);
        assert_eq!(merged.len(), 3);
        let table = render_table(&merged, &paired);
        let pt1 = table
            .lines()
            .find(|l| l.starts_with("| pt | tiny | 4 × 128 | 1 |"))
            .unwrap();
        assert!(pt1.ends_with("| 0.60× |"), "{pt1}");
        let pt2 = table
            .lines()
            .find(|l| l.starts_with("| pt | tiny | 4 × 128 | 2 |"))
            .unwrap();
        assert!(
            pt2.ends_with("|  |"),
            "no lorasft row to compare with: {pt2}"
        );
    }
}
