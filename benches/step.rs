//! Criterion benches of the training step, f32 on CPU, LoRA r 8 on q_proj,v_proj, random
//! weights from a seed, at the issues' two shapes: "tiny" (hidden 256, 4 layers, 8/2 heads,
//! intermediate 688, vocab 32000, batch 4 × 128) and SmolLM2-135M (batch 1 × 256).
//! Per shape: one optimizer step (the trainer's forward_backward + clip + AdamW), the forward
//! alone, and generation with the KV cache. Then the loss with its backward alone over the
//! vocabulary-sized logits (fused against composed), and encoding the 999 alpaca_en_demo
//! records when scripts/fetch-assets.sh has fetched them. `lorasft bench` prints the table.
//! With `--features cuda`, the TinyLlama-1.1B-shape step on the GPU comes first.

use std::path::Path;
use std::time::Duration;

use candle_core::{DType, Device, Tensor, Var};
use criterion::{Criterion, criterion_group, criterion_main};
use lorasft::bench::{StepBench, time_encoding};
use lorasft::model::cpu::linear_ce::linear_cross_entropy_sum;
use lorasft::model::fixture::BenchShape;
use lorasft::model::ops::log_softmax;
use lorasft::rng::Rng;

fn bench_shape(c: &mut Criterion, shape: BenchShape) {
    // SAFETY: benchmarks run one after another on this thread, and nothing in this process
    // reads the environment concurrently (candle reads it when its pool starts, here).
    unsafe { lorasft::thread_tuning::park_idle_workers() };
    lorasft::alloc_tuning::keep_freed_memory();
    let mut bench = StepBench::new(shape, DType::F32, &Device::Cpu, 0).unwrap();
    let mut group = c.benchmark_group(shape.name());
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(if shape == BenchShape::Tiny {
        8
    } else {
        40
    }));
    group.bench_function("step", |b| b.iter(|| bench.step().unwrap()));
    group.bench_function("forward", |b| b.iter(|| bench.forward().unwrap()));
    group.bench_function("generate_16_tokens", |b| {
        b.iter(|| bench.generate(16, 16).unwrap())
    });
    group.finish();
}

fn shapes(c: &mut Criterion) {
    bench_shape(c, BenchShape::Tiny);
    bench_shape(c, BenchShape::Smollm2);
}

/// The loss and its backward over (512, 32000) logits from (512, 256) hidden rows: the fused
/// chunked op against the composed matmul + log_softmax + gather.
fn loss(c: &mut Criterion) {
    lorasft::alloc_tuning::keep_freed_memory();
    let (n, d, v) = (512, 256, 32000);
    let mut rng = Rng::new(3);
    let mut randn = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.normal() as f32).collect() };
    let h = Var::from_vec(randn(n * d), (n, d), &Device::Cpu).unwrap();
    let w = (Tensor::from_vec(randn(v * d), (v, d), &Device::Cpu).unwrap() * 0.0625).unwrap();
    let ids: Vec<u32> = (0..n).map(|i| (i * 7919 % v) as u32).collect();
    let frozen = lorasft::model::frozen::Frozen::Dense(w.clone());
    let idx = Tensor::from_vec(ids.clone(), (n, 1), &Device::Cpu).unwrap();
    let mut group = c.benchmark_group("loss_backward_512x32000");
    group.sample_size(10);
    group.bench_function("fused", |b| {
        b.iter(|| {
            linear_cross_entropy_sum(h.as_tensor(), &frozen, &ids)
                .unwrap()
                .backward()
                .unwrap()
        })
    });
    group.bench_function("composed", |b| {
        b.iter(|| {
            let logits = h.as_tensor().matmul(&w.t().unwrap()).unwrap();
            let loss = log_softmax(&logits).unwrap().gather(&idx, 1).unwrap();
            loss.sum_all().unwrap().neg().unwrap().backward().unwrap()
        })
    });
    group.finish();
}

fn encoding(c: &mut Criterion) {
    let data = Path::new(".cache/assets/data/alpaca_en_demo.json");
    let tok = Path::new(".cache/assets/tok/llama-spm/tokenizer.json");
    if !data.exists() || !tok.exists() {
        eprintln!("encoding bench skipped: run scripts/fetch-assets.sh first");
        return;
    }
    let mut group = c.benchmark_group("encode");
    group.sample_size(10);
    group.bench_function("alpaca_en_demo_999_records", |b| {
        b.iter(|| time_encoding(data, tok).unwrap())
    });
    group.finish();
}

/// `cargo bench --features cuda`: one optimizer step at the TinyLlama-1.1B shape (batch 4 × 512)
/// on CUDA device 0, in fp32 and bf16.
#[cfg(feature = "cuda")]
fn cuda(c: &mut Criterion) {
    let dev = Device::new_cuda(0).expect("a CUDA device");
    let mut group = c.benchmark_group("tinyllama-1.1b-cuda");
    group.sample_size(10);
    for (name, dtype) in [("fp32", DType::F32), ("bf16", DType::BF16)] {
        let mut bench = StepBench::new(BenchShape::Tinyllama, dtype, &dev, 0).unwrap();
        group.bench_function(format!("step_{name}"), |b| b.iter(|| bench.step().unwrap()));
    }
    group.finish();
}

#[cfg(feature = "cuda")]
criterion_group!(benches, cuda, shapes, loss, encoding);
#[cfg(not(feature = "cuda"))]
criterion_group!(benches, shapes, loss, encoding);
criterion_main!(benches);
