//! `lorasft selftest`: the verification suite on any device and precision, so that users can
//! trust a GPU (or a build) before a long run. On the test fixture's shape: logits and adapter
//! gradients against the CPU in f64, gradient coverage of every adapter tensor, the frozen
//! base bitwise unchanged by training, no base tensor in the gradient store, and one short
//! training whose loss falls (with f16's loss scaler where it applies).

use candle_core::{DType, Device, Tensor};

use crate::data::batch::Batch;
use crate::device::Precision;
use crate::error::Result;
use crate::model::fixture::FixtureSpec;
use crate::model::{Llama, LoraConfig, Mode, Projection};
use crate::rng::Rng;
use crate::train::loss_scale::LossScaler;
use crate::train::optim::{AdamWParams, collect_grads};
use crate::train::step::{Updater, nonzero_grads};
use crate::verify::{Fingerprint, base_tensors_with_grad};

/// One line of the selftest table.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// What was checked.
    pub name: &'static str,
    /// Whether it held.
    pub passed: bool,
    /// The measured figure against its bound.
    pub detail: String,
}

/// Relative tolerances of device logits and adapter gradients against the CPU in f64, per
/// precision (measured on CPU: fp32 3e-7 / 1.3e-6, bf16 5.5e-3 / 1.8e-2, f16 8.6e-4 / 2.2e-3).
pub fn tolerance(p: Precision) -> (f64, f64) {
    match p {
        Precision::Fp32 => (1e-4, 1e-4),
        Precision::Bf16 => (3e-2, 6e-2),
        Precision::F16 => (5e-3, 1e-2),
    }
}

/// The fixture model with adapters on every linear and non-zero adapters (so A and B both
/// carry gradient), in `dtype` on `dev`; the same values for every device and dtype.
fn model(dtype: DType, dev: &Device) -> Result<Llama> {
    let mut m = FixtureSpec::default().build(0, dtype, dev)?;
    let cfg = LoraConfig {
        targets: Projection::ALL.into_iter().collect(),
        dropout: 0.0,
        ..LoraConfig::default()
    };
    m.add_lora(&cfg, 1)?;
    let mut rng = Rng::new(2);
    for (_, v) in m.lora_vars() {
        let vals: Vec<f64> = (0..v.elem_count()).map(|_| 0.05 * rng.normal()).collect();
        let t = Tensor::from_vec(vals, v.shape(), &Device::Cpu)?
            .to_dtype(v.dtype())?
            .to_device(dev)?;
        v.set(&t)?;
    }
    Ok(m)
}

/// A fixed batch of token ids (b, s) and labels = ids.
fn batch(dev: &Device) -> Result<(Tensor, Tensor)> {
    let b = fixed_batch(dev)?;
    Ok((b.input_ids, b.labels))
}

/// The selftest's batch: 4 unpadded rows of 32 ids from a fixed seed.
fn fixed_batch(dev: &Device) -> Result<Batch> {
    let spec = FixtureSpec::default();
    let mut rng = Rng::new(3);
    let ids: Vec<u32> = (0..4 * 32)
        .map(|_| rng.below(spec.vocab as u64) as u32)
        .collect();
    Batch::unpadded(Tensor::from_vec(ids, (4, 32), dev)?)
}

/// Largest |a - b| over largest |b|, both moved to the CPU in f64.
fn rel_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let diff = (a - &b)?.abs()?.max_all()?.to_scalar::<f64>()?;
    let scale = b.abs()?.max_all()?.to_scalar::<f64>()?.max(1e-12);
    Ok(diff / scale)
}

/// Mean loss and the adapter gradients (in `lora_vars` order) of the fixed batch.
fn loss_and_grads(m: &Llama, ids: &Tensor, labels: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
    let loss = m.loss_sum(ids, None, labels, &mut Mode::Eval)?.mean()?;
    let grads = collect_grads(&m.lora_vars(), &loss.backward()?)?;
    Ok((loss, grads))
}

/// Runs `steps` optimizer steps on the fixed batch through the trainer's own step
/// (`train::step`, with f16's loss scaler where the precision needs it), clipping to 1 and
/// AdamW; returns the losses. Used by the selftest and by the precision tests.
pub fn train_fixed_batch(
    m: &Llama,
    precision: Precision,
    steps: usize,
    lr: f64,
) -> Result<Vec<f64>> {
    let batch = fixed_batch(m.device())?;
    let mut updater = Updater::new(m, AdamWParams::default(), 1.0)?;
    let mut scaler = LossScaler::for_precision(precision);
    let mut rng = Rng::new(4);
    let mut losses = Vec::with_capacity(steps);
    for _ in 0..steps {
        let report = updater.step(m, std::slice::from_ref(&batch), &mut scaler, &mut rng, lr)?;
        losses.push(report.loss());
    }
    Ok(losses)
}

/// Runs every check on `dev` in `precision`.
pub fn run(dev: &Device, precision: Precision) -> Result<Vec<Check>> {
    let mut out = agreement(dev, precision)?;
    out.extend(coverage_and_frozen_base(dev, precision)?);
    out.push(learning(dev, precision)?);
    Ok(out)
}

/// Logits and adapter gradients against the CPU in f64.
fn agreement(dev: &Device, precision: Precision) -> Result<Vec<Check>> {
    let (tol, grad_tol) = tolerance(precision);
    let reference = model(DType::F64, &Device::Cpu)?;
    let tested = model(precision.dtype(), dev)?;
    let (ids_cpu, labels_cpu) = batch(&Device::Cpu)?;
    let (ids, labels) = batch(dev)?;
    let logits_ref = reference.forward(&ids_cpu, None, &mut Mode::Eval)?;
    let logits = tested.forward(&ids, None, &mut Mode::Eval)?;
    let d = rel_diff(&logits, &logits_ref)?;
    let (_, g_ref) = loss_and_grads(&reference, &ids_cpu, &labels_cpu)?;
    let (_, g) = loss_and_grads(&tested, &ids, &labels)?;
    let mut worst = 0f64;
    for (a, b) in g.iter().zip(&g_ref) {
        worst = worst.max(rel_diff(a, b)?);
    }
    Ok(vec![
        Check {
            name: "logits match the CPU in f64",
            passed: d <= tol,
            detail: format!("max rel diff {d:.2e} <= {tol:.0e}"),
        },
        Check {
            name: "adapter gradients match the CPU in f64",
            passed: worst <= grad_tol,
            detail: format!(
                "worst rel diff {worst:.2e} <= {grad_tol:.0e} over {} tensors",
                g.len()
            ),
        },
    ])
}

/// Coverage, leaks and the frozen base, on a fresh adapter as training starts.
fn coverage_and_frozen_base(dev: &Device, precision: Precision) -> Result<Vec<Check>> {
    let (ids, labels) = batch(dev)?;
    let mut fresh = FixtureSpec::default().build(0, precision.dtype(), dev)?;
    fresh.add_lora(&LoraConfig::default(), 5)?;
    let before = Fingerprint::of(&fresh)?;
    let named = fresh.lora_vars();
    let loss = |m: &Llama| m.loss_sum(&ids, None, &labels, &mut Mode::Eval)?.mean();
    let store = loss(&fresh)?.backward()?;
    let leaked = base_tensors_with_grad(&fresh, &store);
    let (b_ok, b_all) = nonzero_grads(&named, &collect_grads(&named, &store)?, "lora_B")?;
    let losses = train_fixed_batch(&fresh, precision, 1, 1e-2)?;
    let after_one = collect_grads(&named, &loss(&fresh)?.backward()?)?;
    let (a_ok, a_all) = nonzero_grads(&named, &after_one, "lora_A")?;
    let more = train_fixed_batch(&fresh, precision, 4, 1e-2)?;
    let changed = before.changed(&Fingerprint::of(&fresh)?);
    Ok(vec![
        Check {
            name: "no base tensor in the gradient store",
            passed: leaked.is_empty(),
            detail: format!("{} base tensors with a gradient", leaked.len()),
        },
        Check {
            name: "every adapter tensor receives gradient",
            passed: b_ok == b_all && a_ok == a_all && b_all > 0,
            detail: format!(
                "lora_B {b_ok}/{b_all} first backward, lora_A {a_ok}/{a_all} after one update"
            ),
        },
        Check {
            name: "base weights bitwise unchanged by training",
            passed: changed.is_empty(),
            detail: format!(
                "{} of {} base tensors changed after {} steps",
                changed.len(),
                before.0.len(),
                losses.len() + more.len()
            ),
        },
    ])
}

/// A short training on the fixed batch whose loss falls.
fn learning(dev: &Device, precision: Precision) -> Result<Check> {
    let mut learner = FixtureSpec::default().build(0, precision.dtype(), dev)?;
    learner.add_lora(
        &LoraConfig {
            r: 16,
            alpha: 32.0,
            targets: Projection::ALL.into_iter().collect(),
            ..LoraConfig::default()
        },
        6,
    )?;
    let curve = train_fixed_batch(&learner, precision, 30, 1e-2)?;
    let (first, last) = (curve[0], curve[curve.len() - 1]);
    Ok(Check {
        name: "30 steps on a fixed batch lower the loss",
        passed: last.is_finite() && last < first - 0.5,
        detail: format!("{first:.4} -> {last:.4} (must fall by > 0.5)"),
    })
}

/// The checks as a Markdown table.
pub fn render(checks: &[Check], device: &str, precision: Precision) -> String {
    let mut s = format!(
        "lorasft selftest on {device}, {precision}\n\n| check | result | measured |\n|---|---|---|\n"
    );
    for c in checks {
        s.push_str(&format!(
            "| {} | {} | {} |\n",
            c.name,
            if c.passed { "pass" } else { "FAIL" },
            c.detail
        ));
    }
    s
}
