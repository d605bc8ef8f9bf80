//! Step-time benchmarks at fixed shapes with weights from a seed: the figures `lorasft bench`
//! prints and the README quotes. The step is the trainer's own (`train::step`: forward and
//! backward, clipping, AdamW), so what is timed is what trains. Timing lives here and in `benches/`, never in tests.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

pub mod batching;
pub mod memory;
pub mod suite;
pub mod table;

use crate::bench::table::{BenchRow, median};
use crate::data::batch::Batch;
use crate::error::{Error, Result};
use crate::generate::{Sampling, pick};
use crate::model::fixture::BenchShape;
use crate::model::{KvCache, Llama, LoraConfig, Mode};
use crate::rng::Rng;
use crate::train::loss_scale::LossScaler;
use crate::train::optim::AdamWParams;
use crate::train::step::Updater;

/// A model with LoRA r 8 on q,v (the reference config), a fixed random batch with labels =
/// input_ids and no padding, and the trainer's optimizer: one training step on demand.
pub struct StepBench {
    model: Llama,
    updater: Updater,
    scaler: LossScaler,
    batch: Batch,
    rng: Rng,
}

impl StepBench {
    /// Builds the model from `seed` in `dtype` on `dev` and draws the batch.
    pub fn new(shape: BenchShape, dtype: DType, dev: &Device, seed: u64) -> Result<Self> {
        let model = shape.spec().build(seed, dtype, dev)?;
        Self::from_model(model, shape.batch_seq(), seed)
    }

    /// [`StepBench::new`] on a model already built (adapters are added here), with a
    /// (batch, seq) batch of random ids.
    pub fn from_model(mut model: Llama, (b, s): (usize, usize), seed: u64) -> Result<Self> {
        let dev = model.device().clone();
        let vocab = model.shape().vocab;
        model.add_lora(&LoraConfig::default(), seed)?;
        let mut rng = Rng::derive(seed, "bench-batch");
        let ids: Vec<u32> = (0..b * s).map(|_| rng.below(vocab as u64) as u32).collect();
        let batch = Batch::unpadded(Tensor::from_vec(ids, (b, s), &dev)?)?;
        let updater = Updater::new(&model, AdamWParams::default(), 1.0)?;
        Ok(Self {
            model,
            updater,
            scaler: LossScaler::disabled(),
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
        let report = self.updater.step(
            &self.model,
            std::slice::from_ref(&self.batch),
            &mut self.scaler,
            &mut self.rng,
            1e-4,
        )?;
        Ok(report.loss())
    }

    /// The forward alone: logits (b, s, v) in evaluation mode, synchronised to the host.
    /// Runs where evaluation runs it (`Device::with_context`).
    pub fn forward(&self) -> Result<()> {
        let b = &self.batch;
        self.model.device().with_context(|| {
            let logits =
                self.model
                    .forward(&b.input_ids, Some(&b.attention_mask), &mut Mode::Eval)?;
            sync(&logits)
        })
    }

    /// Greedy generation with the KV cache: a `prompt`-token prompt, then `new` tokens one by
    /// one. Returns the seconds spent on the new tokens.
    /// Runs where `generate` runs it (`Device::with_context`).
    pub fn generate(&self, prompt: usize, new: usize) -> Result<f64> {
        self.model
            .device()
            .with_context(|| self.generate_here(prompt, new))
    }

    fn generate_here(&self, prompt: usize, new: usize) -> Result<f64> {
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
        peak_rss_mib: crate::sys::peak_rss_mib().unwrap_or(0.0),
    })
}

/// Training FLOPs of one step at `shape`, in GFLOP, counted as the README's Performance section
/// counts them: per token 4 N for the products (forward 2 N, backward 2 N for dX only: the
/// frozen base gets no weight gradient) plus 12 L s h for attention (forward 4, backward 8),
/// with N the parameters of every product: the base's, less an untied input embedding (a
/// lookup, not a product; a tied one is counted once, as lm_head).
pub fn step_gflop(shape: BenchShape) -> Result<f64> {
    let cfg = shape.spec().config();
    let m = cfg.shape().map_err(Error::Invalid)?;
    let (b, s) = shape.batch_seq();
    let lookup = if m.tied { 0 } else { m.vocab * m.hidden } as u64;
    let n = m.base_params() - lookup;
    let per_token = 4.0 * n as f64 + 12.0 * (m.layers * s * m.hidden) as f64;
    Ok(per_token * (b * s) as f64 / 1e9)
}

/// One core's peak f32 FMA rates in GFLOP/s, measured at each vector width the CPU has.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FmaPeak {
    /// With 256-bit FMAs (AVX2 + FMA); `None` without them.
    pub avx2: Option<f64>,
    /// With 512-bit FMAs (AVX-512F); `None` without them. A core with one 512-bit FMA port
    /// (or 512-bit FMAs split in two, as Zen 4 does) gets about the 256-bit rate; one with two
    /// ports, about twice it.
    pub avx512: Option<f64>,
}

impl FmaPeak {
    /// The peak at the widest width the CPU has: what a step's efficiency is measured against.
    pub fn widest(&self) -> Option<f64> {
        self.avx512.or(self.avx2)
    }
}

/// One core's peak f32 FMA rates, measured: 12 independent chains of FMAs (enough to cover
/// the FMA units' latency), best of 5 runs of 20 M rounds, at 256 and 512 bits where the CPU
/// has them.
pub fn fma_peak() -> FmaPeak {
    #[cfg(target_arch = "x86_64")]
    {
        const ITERS: u64 = 20_000_000;
        let best = |lanes: u64, run: &dyn Fn() -> f32| {
            let secs = (0..5)
                .map(|_| {
                    let t = Instant::now();
                    std::hint::black_box(run());
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min);
            // 12 chains × lanes × 2 FLOPs per FMA.
            (ITERS * 12 * lanes * 2) as f64 / secs / 1e9
        };
        let avx2 =
            (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")).then(|| {
                // SAFETY: AVX2 and FMA were detected.
                best(8, &|| unsafe {
                    fma_chains_256(std::hint::black_box(ITERS))
                })
            });
        let avx512 = is_x86_feature_detected!("avx512f").then(|| {
            // SAFETY: AVX-512F was detected.
            best(16, &|| unsafe {
                fma_chains_512(std::hint::black_box(ITERS))
            })
        });
        FmaPeak { avx2, avx512 }
    }
    #[cfg(not(target_arch = "x86_64"))]
    FmaPeak {
        avx2: None,
        avx512: None,
    }
}

/// `iters` rounds of one FMA on each of 12 independent 8-lane accumulators; their sum.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_chains_256(iters: u64) -> f32 {
    use std::arch::x86_64::{
        _mm256_add_ps, _mm256_fmadd_ps, _mm256_set1_ps, _mm256_setzero_ps, _mm256_storeu_ps,
    };
    let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
    let mut acc = [_mm256_setzero_ps(); 12];
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = _mm256_fmadd_ps(*x, a, b);
        }
    }
    let mut sum = _mm256_setzero_ps();
    for x in acc {
        sum = _mm256_add_ps(sum, x);
    }
    let mut out = [0f32; 8];
    // SAFETY: `out` holds the 8 lanes the store writes.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), sum) };
    out.iter().sum()
}

/// `iters` rounds of one FMA on each of 12 independent 16-lane accumulators; their sum.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_chains_512(iters: u64) -> f32 {
    use std::arch::x86_64::{
        _mm512_add_ps, _mm512_fmadd_ps, _mm512_reduce_add_ps, _mm512_set1_ps, _mm512_setzero_ps,
    };
    let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
    let mut acc = [_mm512_setzero_ps(); 12];
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = _mm512_fmadd_ps(*x, a, b);
        }
    }
    let mut sum = _mm512_setzero_ps();
    for x in acc {
        sum = _mm512_add_ps(sum, x);
    }
    _mm512_reduce_add_ps(sum)
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

/// Runs `lorasft bench <args>` in a fresh process with `threads` worker threads (so each
/// thread count gets its own candle pool and a clean heap) and reads the JSON row it prints
/// per line; a failing child is an error quoting its stderr.
pub fn child_rows<T: serde::de::DeserializeOwned>(
    args: &[std::ffi::OsString],
    threads: usize,
) -> Result<Vec<T>> {
    let exe = std::env::current_exe().map_err(|e| Error::io("lorasft executable", e))?;
    let out = std::process::Command::new(&exe)
        .arg("bench")
        .args(args)
        .env("RAYON_NUM_THREADS", threads.to_string())
        .output()
        .map_err(|e| Error::io(&exe, e))?;
    if !out.status.success() {
        return Err(Error::Invalid(format!(
            "bench {args:?} with {threads} thread(s) failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            serde_json::from_str(line)
                .map_err(|e| Error::Invalid(format!("reading the bench row {line:?}: {e}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_flops_are_the_readmes_count() {
        // README, Performance: tiny 23.2 GFLOP per step (16.8 of them lm_head), SmolLM2 151.
        let tiny = step_gflop(BenchShape::Tiny).unwrap();
        let smol = step_gflop(BenchShape::Smollm2).unwrap();
        assert!(
            (tiny - 23.2).abs() < 0.1 && (smol - 151.0).abs() < 0.5,
            "{tiny} {smol}"
        );
    }
}
