//! Half precision on the CPU: the selftest passes in every precision, and a short bf16 or f16
//! training (f16 with dynamic loss scaling) follows the fp32 loss curve within a stated bound.

mod common;

use candle_core::Device;
use lorasft::device::Precision;
use lorasft::model::LoraConfig;
use lorasft::model::fixture::FixtureSpec;
use lorasft::selftest;

#[test]
fn selftest_passes_on_cpu_in_every_precision() {
    for p in [Precision::Fp32, Precision::Bf16, Precision::F16] {
        let checks = selftest::run(&Device::Cpu, p).unwrap();
        let table = selftest::render(&checks, "cpu", p);
        println!("{table}");
        assert_eq!(checks.len(), 6);
        assert!(checks.iter().all(|c| c.passed), "{table}");
    }
}

#[test]
fn half_precision_training_follows_the_fp32_loss_curve() {
    let curve = |p: Precision| {
        let mut m = FixtureSpec::default()
            .build(7, p.dtype(), &Device::Cpu)
            .unwrap();
        m.add_lora(&LoraConfig::default(), 8).unwrap();
        assert_eq!(
            m.lora_vars()[0].1.dtype(),
            candle_core::DType::F32,
            "f32 master weights"
        );
        selftest::train_fixed_batch(&m, p, 12, 1e-2).unwrap()
    };
    let fp32 = curve(Precision::Fp32);
    assert!(fp32[11] < fp32[0], "fp32 learns: {fp32:?}");
    // Bounds: bf16 keeps 8 mantissa bits, f16 11; measured worst gaps are printed below.
    for (p, bound) in [(Precision::Bf16, 1e-2), (Precision::F16, 1e-3)] {
        let half = curve(p);
        let worst = fp32
            .iter()
            .zip(&half)
            .map(|(a, b)| (a - b).abs())
            .fold(0f64, f64::max);
        println!("{p}: worst |loss - fp32 loss| over 12 steps {worst:.2e} (bound {bound})");
        assert!(worst < bound, "{p}: {half:?} vs {fp32:?}");
    }
}

#[test]
fn the_trainer_runs_in_bf16_and_f16_with_f32_adapters_and_a_falling_loss() {
    use lorasft::train::run::RunOptions;
    for p in [Precision::Bf16, Precision::F16] {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = common::smoke(tmp.path(), 20);
        cfg.run.precision = p;
        cfg.run.device = lorasft::device::DeviceSpec::Cpu;
        let s = common::train_run(cfg, &RunOptions::default());
        let manifest: lorasft::records::Manifest =
            lorasft::records::read_json(&s.run_dir.join("manifest.json")).unwrap();
        assert_eq!(
            manifest.precision,
            p.to_string(),
            "the manifest records the precision used"
        );
        let report = std::fs::read_to_string(s.run_dir.join("REPORT.md")).unwrap();
        assert!(report.contains(&format!("- Precision: {}", p.to_string().to_uppercase())));
        let (first, last) = (s.first_loss.unwrap(), s.last_loss.unwrap());
        println!("{p}: loss {first:.4} -> {last:.4}");
        assert!(last < first - 0.5, "{p}: {first} -> {last}");
        // The adapter is saved in f32, as PEFT's master weights are.
        let st = std::fs::read(s.adapter_dir.join("adapter_model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&st).unwrap();
        assert!(
            st.tensors()
                .iter()
                .all(|(_, t)| t.dtype() == safetensors::Dtype::F32)
        );
    }
}
