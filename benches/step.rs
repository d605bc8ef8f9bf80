//! One optimizer step (forward + backward + clip + AdamW) and the forward alone, f32 on CPU,
//! LoRA r 8 on q_proj,v_proj, random weights from a seed. The "tiny" shape of the issues:
//! hidden 256, 4 layers, 8 heads / 2 kv heads, intermediate 688, vocab 32000, batch 4, seq 128.

use candle_core::{DType, Device, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use lorasft::model::fixture::FixtureSpec;
use lorasft::model::{Llama, LoraConfig, Mode};
use lorasft::rng::Rng;
use lorasft::train::loss::causal_lm_loss;
use lorasft::train::optim::{AdamW, AdamWParams, clip_grad_norm, collect_grads};

fn setup(spec: &FixtureSpec, b: usize, s: usize) -> (Llama, Tensor, Tensor) {
    let mut model = spec.build(0, DType::F32, &Device::Cpu).unwrap();
    model.add_lora(&LoraConfig::default(), 0).unwrap();
    let mut rng = Rng::new(1);
    let ids: Vec<u32> = (0..b * s)
        .map(|_| rng.below(spec.vocab as u64) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (b, s), &Device::Cpu).unwrap();
    let labels = ids.to_dtype(DType::I64).unwrap();
    (model, ids, labels)
}

fn bench_step(c: &mut Criterion) {
    let spec = FixtureSpec::tiny_bench();
    let (model, ids, labels) = setup(&spec, 4, 128);
    let named = model.lora_vars();
    let vars: Vec<_> = named.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(vars, AdamWParams::default()).unwrap();
    let mut rng = Rng::new(2);
    let mut group = c.benchmark_group("tiny_b4_s128");
    group.sample_size(10);
    group.bench_function("step", |bch| {
        bch.iter(|| {
            let logits = model
                .forward(&ids, None, &mut Mode::Train(&mut rng))
                .unwrap();
            let loss = causal_lm_loss(&logits, &labels).unwrap();
            let grads = loss.backward().unwrap();
            let mut grads = collect_grads(&named, &grads).unwrap();
            clip_grad_norm(&mut grads, 1.0).unwrap();
            opt.step(&grads, 1e-4).unwrap();
        })
    });
    group.bench_function("forward", |bch| {
        bch.iter(|| model.forward(&ids, None, &mut Mode::Eval).unwrap())
    });
    group.finish();
}

criterion_group!(benches, bench_step);
criterion_main!(benches);
