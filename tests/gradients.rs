//! The frozen base and the adapters' gradients, proven: fingerprints, gradient coverage,
//! finite differences, the B = 0 identity, merge/unmerge and determinism.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{bits, ids, max_abs_diff, randomise_adapters, tiny};
use lorasft::data::batch::Batch;
use lorasft::model::loss::causal_lm_loss;
use lorasft::model::{Llama, LoraConfig, Mode, Projection};
use lorasft::rng::Rng;
use lorasft::train::loss_scale::LossScaler;
use lorasft::train::optim::{AdamW, AdamWParams, collect_grads};
use lorasft::train::step::Updater;
use lorasft::verify::{
    Fingerprint, adapter_grad_norms, base_tensors_with_grad, weight_shaped_gradients,
};

fn batch(s: usize) -> (Tensor, Tensor) {
    let x = ids(2, s, 512, 3);
    let labels = x.to_dtype(DType::I64).unwrap();
    (x, labels)
}

/// The training path's loss (fused lm_head + cross-entropy), mean over the batch's targets.
fn loss_of(model: &Llama, mode: &mut Mode<'_>) -> Tensor {
    let (x, labels) = batch(10);
    model
        .loss_sum(&x, None, &labels, mode)
        .unwrap()
        .mean()
        .unwrap()
}

#[test]
fn fused_loss_equals_logits_loss_with_the_same_adapter_gradients() {
    let mut model = tiny(3, DType::F64);
    model.add_lora(&LoraConfig::default(), 4).unwrap();
    randomise_adapters(&model, 5);
    let composed = {
        let (x, labels) = batch(10);
        causal_lm_loss(&model.forward(&x, None, &mut Mode::Eval).unwrap(), &labels).unwrap()
    };
    let fused = loss_of(&model, &mut Mode::Eval);
    let d = (fused.to_scalar::<f64>().unwrap() - composed.to_scalar::<f64>().unwrap()).abs();
    assert!(d < 1e-12, "fused loss differs by {d:e}");
    let (gf, gc) = (fused.backward().unwrap(), composed.backward().unwrap());
    for (name, v) in model.lora_vars() {
        let (a, b) = (
            gf.get(v.as_tensor()).unwrap(),
            gc.get(v.as_tensor()).unwrap(),
        );
        let d = max_abs_diff(a, b);
        assert!(d < 1e-12, "{name}: gradient differs by {d:e}");
    }
}

/// Runs `steps` optimizer steps of the trainer's own step (`train::step`: dropout on,
/// clipping to 1, AdamW at 1e-2) on the fixed batch; returns the losses.
fn train(model: &Llama, steps: usize, seed: u64) -> Vec<f32> {
    let fixed = Batch::unpadded(batch(10).0).unwrap();
    let mut updater = Updater::new(model, AdamWParams::default(), 1.0).unwrap();
    let mut scaler = LossScaler::disabled();
    let mut rng = Rng::derive(seed, "dropout");
    (0..steps)
        .map(|_| {
            let report = updater
                .step(
                    model,
                    std::slice::from_ref(&fixed),
                    &mut scaler,
                    &mut rng,
                    1e-2,
                )
                .unwrap();
            report.loss() as f32
        })
        .collect()
}

#[test]
fn base_fingerprint_is_bitwise_identical_after_several_optimizer_steps() {
    let mut model = tiny(1, DType::F32);
    model
        .add_lora(
            &LoraConfig {
                targets: LoraConfig::parse_targets("all-linear").unwrap(),
                ..Default::default()
            },
            1,
        )
        .unwrap();
    let before = Fingerprint::of(&model).unwrap();
    let adapters_before: Vec<Vec<u64>> = model
        .lora_vars()
        .iter()
        .map(|(_, v)| bits(v.as_tensor()))
        .collect();
    let losses = train(&model, 5, 1);
    let after = Fingerprint::of(&model).unwrap();
    assert_eq!(before.0.len(), model.shape().tensor_specs().len());
    assert!(
        before.changed(&after).is_empty(),
        "base tensors changed: {:?}",
        before.changed(&after)
    );
    let adapters_after: Vec<Vec<u64>> = model
        .lora_vars()
        .iter()
        .map(|(_, v)| bits(v.as_tensor()))
        .collect();
    let moved = adapters_before
        .iter()
        .zip(&adapters_after)
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(
        moved,
        adapters_before.len(),
        "every adapter tensor must have moved"
    );
    assert!(losses.iter().all(|l| l.is_finite()));
}

#[test]
fn gradient_store_holds_no_base_tensor() {
    let mut model = tiny(2, DType::F32);
    model
        .add_lora(
            &LoraConfig {
                targets: LoraConfig::parse_targets("all-linear").unwrap(),
                ..Default::default()
            },
            2,
        )
        .unwrap();
    let mut rng = Rng::new(0);
    let grads = loss_of(&model, &mut Mode::Train(&mut rng))
        .backward()
        .unwrap();
    let leaked = base_tensors_with_grad(&model, &grads);
    assert!(
        leaked.is_empty(),
        "base tensors in the gradient store: {leaked:?}"
    );
    let shaped = weight_shaped_gradients(&model, &grads);
    assert!(
        shaped.is_empty(),
        "weight-shaped gradients computed: {shaped:?}"
    );
    // Negative control: a plain matmul against a base weight is caught.
    let (name, w) = model
        .base_tensors()
        .unwrap()
        .into_iter()
        .find(|(n, _)| n.ends_with("q_proj.weight"))
        .unwrap();
    let x = candle_core::Var::from_tensor(
        &Tensor::ones((3, w.dim(1).unwrap()), DType::F32, &Device::Cpu).unwrap(),
    )
    .unwrap();
    let plain = x
        .as_tensor()
        .matmul(&w.t().unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(
        !weight_shaped_gradients(&model, &plain).is_empty(),
        "{name}: plain matmul gradient not detected"
    );
}

#[test]
fn every_lora_b_has_gradient_first_and_every_lora_a_after_first_update() {
    for targets in ["q_proj,v_proj", "all-linear"] {
        let mut model = tiny(3, DType::F32);
        let cfg = LoraConfig {
            targets: LoraConfig::parse_targets(targets).unwrap(),
            ..Default::default()
        };
        model.add_lora(&cfg, 3).unwrap();
        let vars: Vec<_> = model.lora_vars().into_iter().map(|(_, v)| v).collect();
        let grads = loss_of(&model, &mut Mode::Eval).backward().unwrap();
        let norms = adapter_grad_norms(&model, &grads).unwrap();
        assert_eq!(norms.len(), 2 * cfg.targets.len() * model.shape().layers);
        for (name, norm) in &norms {
            let n = norm.unwrap_or_else(|| panic!("{name}: no gradient at all"));
            if name.contains("lora_B") {
                assert!(n > 0.0, "{name}: zero gradient on the first backward");
            } else {
                // B = 0 at init, so dL/dA = B^T (...) = 0 exactly.
                assert_eq!(n, 0.0, "{name}: A must have zero gradient while B = 0");
            }
        }
        let mut opt = AdamW::new(vars, AdamWParams::default()).unwrap();
        opt.step(&collect_grads(&model.lora_vars(), &grads).unwrap(), 1e-3)
            .unwrap();
        let grads = loss_of(&model, &mut Mode::Eval).backward().unwrap();
        for (name, norm) in adapter_grad_norms(&model, &grads).unwrap() {
            assert!(
                norm.unwrap() > 0.0,
                "{targets}: {name} has zero gradient after the first update"
            );
        }
    }
}

#[test]
fn fresh_adapter_leaves_logits_bitwise_equal_to_the_base_model() {
    for dtype in [DType::F32, DType::F64] {
        let base = tiny(4, dtype);
        let mut adapted = base.clone();
        adapted
            .add_lora(
                &LoraConfig {
                    targets: LoraConfig::parse_targets("all-linear").unwrap(),
                    ..Default::default()
                },
                4,
            )
            .unwrap();
        let x = ids(2, 12, 512, 4);
        let a = base.forward(&x, None, &mut Mode::Eval).unwrap();
        let b = adapted.forward(&x, None, &mut Mode::Eval).unwrap();
        assert_eq!(
            bits(&a),
            bits(&b),
            "{dtype:?}: B = 0 adapter changed the logits"
        );
    }
}

#[test]
fn adapter_gradients_equal_central_finite_differences_in_f64() {
    // Bound: |autograd - fd| <= 1e-6 * |fd|, relative with no floor. Central differences with
    // eps 1e-5 in f64 have truncation error ~eps^2 and rounding error ~1e-16 |L| / eps, about
    // 1e-10 absolute; the probes are each tensor's four largest gradients, so that error is
    // small against every probed value and the bound is truly relative.
    let mut model = tiny(5, DType::F64);
    let cfg = LoraConfig {
        dropout: 0.0,
        targets: LoraConfig::parse_targets("q_proj,v_proj,down_proj").unwrap(),
        ..Default::default()
    };
    model.add_lora(&cfg, 5).unwrap();
    randomise_adapters(&model, 5);
    let grads = loss_of(&model, &mut Mode::Eval).backward().unwrap();
    let eps = 1e-5;
    let mut worst = 0.0f64;
    for (name, var) in model.lora_vars() {
        let g = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let orig = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let mut order: Vec<usize> = (0..g.len()).collect();
        order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
        assert!(g[order[0]].abs() > 1e-6, "{name}: no gradient to probe");
        for &i in &order[..4] {
            let at = |delta: f64| {
                let mut v = orig.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                loss_of(&model, &mut Mode::Eval).to_scalar::<f64>().unwrap()
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            var.set(&Tensor::from_vec(orig.clone(), var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let err = (g[i] - fd).abs() / fd.abs();
            worst = worst.max(err);
            assert!(
                common::close(g[i], fd, 1e-6),
                "{name}[{i}]: autograd {} vs finite differences {fd} (rel err {err:e})",
                g[i]
            );
        }
    }
    println!("worst relative error over all adapter tensors: {worst:e}");
}

#[test]
fn merged_logits_match_unmerged_and_unmerge_restores_bits() {
    let mut model = tiny(6, DType::F32);
    model
        .add_lora(
            &LoraConfig {
                targets: LoraConfig::parse_targets("all-linear").unwrap(),
                ..Default::default()
            },
            6,
        )
        .unwrap();
    randomise_adapters(&model, 6);
    let x = ids(2, 10, 512, 6);
    let unmerged = model.forward(&x, None, &mut Mode::Eval).unwrap();
    let before = Fingerprint::of(&model).unwrap();
    model.merge_lora().unwrap();
    let merged = model.forward(&x, None, &mut Mode::Eval).unwrap();
    let diff = max_abs_diff(&unmerged, &merged);
    assert!(diff < 1e-5, "merged logits differ by {diff:e}");
    model.unmerge_lora();
    let again = model.forward(&x, None, &mut Mode::Eval).unwrap();
    assert_eq!(
        bits(&again),
        bits(&unmerged),
        "unmerge did not restore the unmerged forward"
    );
    assert!(before.changed(&Fingerprint::of(&model).unwrap()).is_empty());
}

#[test]
fn same_seed_gives_bitwise_identical_losses_and_adapters() {
    let run = || {
        let mut model = tiny(7, DType::F32);
        model.add_lora(&LoraConfig::default(), 7).unwrap();
        let losses = train(&model, 4, 7);
        let adapters: Vec<Vec<u64>> = model
            .lora_vars()
            .iter()
            .map(|(_, v)| bits(v.as_tensor()))
            .collect();
        (losses, adapters)
    };
    let (l1, a1) = run();
    let (l2, a2) = run();
    assert_eq!(
        l1.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        l2.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    assert_eq!(a1, a2);
}

#[test]
fn training_lowers_the_loss_on_a_fixed_batch() {
    let mut model = tiny(8, DType::F32);
    model
        .add_lora(
            &LoraConfig {
                targets: LoraConfig::parse_targets("all-linear").unwrap(),
                ..Default::default()
            },
            8,
        )
        .unwrap();
    let losses = train(&model, 12, 8);
    println!("losses: {losses:?}");
    assert!(
        losses[11] < losses[0] - 0.1,
        "loss did not fall: {losses:?}"
    );
}

#[test]
fn dropout_acts_in_training_only() {
    let mut model = tiny(9, DType::F32);
    model
        .add_lora(
            &LoraConfig {
                dropout: 0.5,
                ..Default::default()
            },
            9,
        )
        .unwrap();
    randomise_adapters(&model, 9);
    let x = ids(1, 8, 512, 9);
    let e1 = model.forward(&x, None, &mut Mode::Eval).unwrap();
    let e2 = model.forward(&x, None, &mut Mode::Eval).unwrap();
    assert_eq!(bits(&e1), bits(&e2));
    let mut rng = Rng::new(1);
    let t = model.forward(&x, None, &mut Mode::Train(&mut rng)).unwrap();
    assert!(
        max_abs_diff(&t, &e1) > 0.0,
        "dropout had no effect in training"
    );
    // Dropout is on the LoRA branch only: with B = 0 training and eval agree exactly.
    let mut fresh = tiny(9, DType::F32);
    fresh
        .add_lora(
            &LoraConfig {
                dropout: 0.5,
                ..Default::default()
            },
            9,
        )
        .unwrap();
    let a = fresh.forward(&x, None, &mut Mode::Train(&mut rng)).unwrap();
    let b = fresh.forward(&x, None, &mut Mode::Eval).unwrap();
    assert_eq!(bits(&a), bits(&b));
}

#[test]
fn lora_init_follows_peft() {
    let mut model = tiny(10, DType::F64);
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        use_rslora: true,
        ..Default::default()
    };
    model.add_lora(&cfg, 10).unwrap();
    let lin = model.linear(0, Projection::QProj).unwrap();
    let l = lin.lora().unwrap();
    assert_eq!(l.a.dims(), &[4, 64]);
    assert_eq!(l.b.dims(), &[64, 4]);
    assert_eq!(l.scaling, 8.0 / 2.0, "rsLoRA scales by alpha / sqrt(r)");
    let a =
        l.a.as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
    let bound = 1.0 / 64f64.sqrt();
    assert!(a.iter().all(|v| v.abs() <= bound));
    assert!(
        a.iter().any(|v| v.abs() > 0.8 * bound),
        "A should fill U(±1/sqrt(in))"
    );
    assert!(
        l.b.as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .all(|v| *v == 0.0)
    );
    assert!(model.linear(0, Projection::KProj).unwrap().lora().is_none());
    let err = LoraConfig {
        r: 0,
        ..Default::default()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(err.contains("got 0"), "{err}");
    assert!(
        LoraConfig::parse_targets("q_proj,qkv")
            .unwrap_err()
            .to_string()
            .contains("qkv")
    );
}

#[test]
fn fused_f32_cpu_path_matches_the_composed_f64_path_in_loss_and_every_adapter_gradient() {
    // f32 on the CPU runs the fused ops (norm, rope + heads, attention, SwiGLU, frozen linear);
    // f64 runs their composed primitive forms. Same fixture weights and adapters, left-padded
    // rows (per-row positions and padding bias), adapters on every linear.
    let cfg = LoraConfig {
        dropout: 0.0,
        targets: LoraConfig::parse_targets("all-linear").unwrap(),
        ..Default::default()
    };
    let run = |dtype: DType| {
        let mut model = tiny(11, dtype);
        model.add_lora(&cfg, 12).unwrap();
        randomise_adapters(&model, 13);
        let (x, labels) = batch(9);
        let mask = Tensor::from_vec(
            [vec![0u32, 0, 0], vec![1; 15]].concat(),
            (2, 9),
            &Device::Cpu,
        )
        .unwrap();
        let loss = model
            .loss_sum(&x, Some(&mask), &labels, &mut Mode::Eval)
            .unwrap()
            .mean()
            .unwrap();
        let grads = loss.backward().unwrap();
        let named: Vec<(String, Tensor)> = model
            .lora_vars()
            .into_iter()
            .map(|(n, v)| (n, grads.get(v.as_tensor()).unwrap().clone()))
            .collect();
        (
            loss.to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap(),
            named,
        )
    };
    let (l32, g32) = run(DType::F32);
    let (l64, g64) = run(DType::F64);
    let dl = (l32 - l64).abs() / l64.abs();
    assert!(
        common::close(l32, l64, 1e-6),
        "loss {l32} (f32) vs {l64} (f64): {dl:e} relative"
    );
    assert_eq!(g32.len(), g64.len());
    let mut worst = 0.0f64;
    for ((name, a), (_, b)) in g32.iter().zip(&g64) {
        let scale = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(scale > 0.0, "{name}: no gradient");
        let rel = max_abs_diff(a, b) / scale;
        worst = worst.max(rel);
        assert!(
            rel < 1e-5,
            "{name}: f32 fused gradient differs by {rel:e} (relative to max)"
        );
    }
    println!("loss {dl:e}, worst adapter gradient {worst:e} (relative)");
}
