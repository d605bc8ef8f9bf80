//! `model.keep_quantized`: a GGUF base whose projections stay `QTensor`s in memory gives the
//! same logits, loss and adapter gradients, bit for bit, as the same file imported to f32;
//! Q/K rows are un-permuted as raw blocks; `lorasft train --keep-quantized` trains; and the
//! key is refused without a `gguf:` source.

mod common;

use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use common::{bits, ids, randomise_adapters};
use lorasft::gguf::Gguf;
use lorasft::model::cpu::quant::QuantWeight;
use lorasft::model::fixture::FixtureSpec;
use lorasft::model::gguf_import::{self, unpermute_qk};
use lorasft::model::load::{ModelSource, load_model};
use lorasft::model::lora::Frozen;
use lorasft::model::{Llama, LoraConfig, Mode, Projection};
use lorasft::rng::Rng;

/// A fixture whose rows are whole K-quant blocks (widths multiples of 256).
fn kquant_spec() -> FixtureSpec {
    FixtureSpec {
        hidden: 256,
        intermediate: 512,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        ..FixtureSpec::default()
    }
}

/// The fixture (seed 5) exported by `lorasft export-gguf --type ty` into `tmp`.
fn exported(tmp: &Path, ty: &str) -> PathBuf {
    let dir = tmp.join("m");
    if !dir.join("config.json").exists() {
        kquant_spec().write(5, &dir).unwrap();
        std::fs::copy(common::fixture_tokenizer(), dir.join("tokenizer.json")).unwrap();
    }
    let file = tmp.join(format!("{ty}.gguf"));
    common::output_ok(
        common::lorasft()
            .args(["export-gguf", "--model"])
            .arg(&dir)
            .args(["--type", ty, "--out"])
            .arg(&file),
    );
    file
}

/// The same GGUF as lorasft imports it to f32, and kept quantized.
fn both(file: &Path) -> (Llama, Llama) {
    let dir = file.with_extension("hf");
    gguf_import::import(file, &dir).unwrap();
    let f32_model = load_model(&ModelSource::Dir(dir), DType::F32, &Device::Cpu)
        .unwrap()
        .1;
    let (_, quant) = gguf_import::load_quantized(&Gguf::read(file).unwrap()).unwrap();
    (f32_model, quant)
}

/// The projections' storage types, layer by layer.
fn quant_types(m: &Llama) -> Vec<GgmlDType> {
    (0..m.shape().layers)
        .flat_map(|l| Projection::ALL.map(|p| (l, p)))
        .map(|(l, p)| match m.linear(l, p).unwrap().weight() {
            Frozen::Quant(q) => q.dtype(),
            Frozen::Dense(t) => panic!("layer {l} {p:?} is dense {:?}", t.dtype()),
        })
        .collect()
}

/// Logits, then the training loss (dropout on) and every adapter gradient, of both models
/// with the same adapters, compared bit for bit.
fn assert_bit_identical(f32_model: &mut Llama, quant: &mut Llama, what: &str) {
    let cfg = LoraConfig {
        targets: Projection::ALL.into_iter().collect(),
        ..LoraConfig::default()
    };
    for m in [&mut *f32_model, &mut *quant] {
        m.add_lora(&cfg, 11).unwrap();
        randomise_adapters(m, 12);
    }
    let x = ids(2, 24, 512, 7);
    let labels = x.to_dtype(DType::I64).unwrap();
    let logits = |m: &Llama| bits(&m.forward(&x, None, &mut Mode::Eval).unwrap());
    assert_eq!(logits(f32_model), logits(quant), "{what}: logits differ");
    let loss = |m: &Llama| {
        let mut rng = Rng::derive(3, "dropout");
        m.loss_sum(&x, None, &labels, &mut Mode::Train(&mut rng))
            .unwrap()
            .mean()
            .unwrap()
    };
    let (lf, lq) = (loss(f32_model), loss(quant));
    assert_eq!(bits(&lf), bits(&lq), "{what}: loss differs");
    let (gf, gq) = (lf.backward().unwrap(), lq.backward().unwrap());
    let (vf, vq) = (f32_model.lora_vars(), quant.lora_vars());
    assert_eq!(vf.len(), 2 * 7 * kquant_spec().layers);
    for ((name, a), (_, b)) in vf.iter().zip(&vq) {
        let (ga, gb) = (gf.get(a.as_tensor()), gq.get(b.as_tensor()));
        let (ga, gb) = (
            ga.unwrap(),
            gb.unwrap_or_else(|| panic!("{name}: no gradient")),
        );
        assert!(
            common::max_abs(ga) > 0.0,
            "{what}: {name} has a zero gradient"
        );
        assert_eq!(bits(ga), bits(gb), "{what}: gradient of {name} differs");
    }
}

#[test]
fn kept_quantized_logits_loss_and_gradients_equal_the_f32_import_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    for (ty, expect) in [
        ("q4_k_m", [GgmlDType::Q4K, GgmlDType::Q6K].as_slice()),
        ("q6_k", [GgmlDType::Q6K].as_slice()),
    ] {
        let file = exported(tmp.path(), ty);
        let (mut f32_model, mut quant) = both(&file);
        let types = quant_types(&quant);
        for t in expect {
            assert!(types.contains(t), "{ty}: no {t:?} projection in {types:?}");
        }
        assert_bit_identical(&mut f32_model, &mut quant, ty);
    }
}

#[test]
fn row_permutation_of_quantized_blocks_equals_unpermuting_the_dequantized_weight() {
    let (out_f, in_f, heads) = (16, 512, 4);
    let mut r = Rng::new(1);
    let vals: Vec<f32> = (0..out_f * in_f).map(|_| r.normal() as f32).collect();
    let w = Tensor::from_vec(vals, (out_f, in_f), &Device::Cpu).unwrap();
    for ty in [
        GgmlDType::Q4K,
        GgmlDType::Q6K,
        GgmlDType::Q8_0,
        GgmlDType::Q4_1,
    ] {
        let q = QTensor::quantize(&w, ty).unwrap();
        let deq: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want = unpermute_qk(&deq, out_f, in_f, heads);
        let order = gguf_import::unpermuted_row_sources(out_f, heads);
        let kept = QuantWeight::from_rows(q, Some(&order)).unwrap();
        let mut rows = vec![0f32; out_f * in_f];
        kept.dequantize_rows(0..out_f, &mut rows);
        assert_eq!(rows, want, "{ty:?}: rows");
        // Columns that start and end inside blocks come from the same values.
        let cols = 37..300;
        let mut got = vec![0f32; out_f * cols.len()];
        kept.dequantize_cols(cols.clone(), &mut got, &mut Vec::new());
        let want_cols: Vec<f32> = want
            .chunks(in_f)
            .flat_map(|row| row[cols.clone()].to_vec())
            .collect();
        assert_eq!(got, want_cols, "{ty:?}: columns {cols:?}");
    }
    let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
    let err = QuantWeight::from_rows(q, Some(&[0; 16])).unwrap_err();
    assert!(err.to_string().contains("not a permutation"), "{err}");
}

#[test]
fn keep_quantized_needs_a_gguf_source_and_names_the_key() {
    let mut cfg = lorasft::train::config::TrainConfig::smoke();
    cfg.model.keep_quantized = true;
    let err = cfg.validate().unwrap_err().to_string();
    assert!(
        err.contains("model.keep_quantized") && err.contains("gguf:"),
        "{err}"
    );
    let err =
        lorasft::model::source::resolve_model_with("fixture:1", &Device::Cpu, DType::F32, true)
            .err()
            .unwrap()
            .to_string();
    assert!(err.contains("model.keep_quantized"), "{err}");
}

fn summary(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap()
}

#[test]
fn train_with_keep_quantized_learns_and_matches_the_f32_import_step_for_step() {
    let tmp = tempfile::tempdir().unwrap();
    let file = exported(tmp.path(), "q4_k_m");
    let train = |keep: bool| {
        let runs = tmp.path().join(format!("runs-{keep}"));
        let mut c = common::lorasft();
        c.current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["train", "--preset", "smoke", "--max-steps", "12", "--quiet"])
            .arg("--set")
            .arg(format!("model.source=\"gguf:{}\"", file.display()))
            .arg("--out-dir")
            .arg(&runs);
        if keep {
            // The quantized run also recomputes its activations: neither changes a number.
            c.args(["--keep-quantized", "--gradient-checkpointing"]);
        }
        common::output_ok(&mut c);
        let run = runs.join("smoke");
        let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
        assert_eq!(config.contains("keep_quantized = true"), keep, "{config}");
        let report = std::fs::read_to_string(run.join("REPORT.md")).unwrap();
        let line = report
            .lines()
            .find(|l| l.starts_with("- Base weights in memory: "))
            .unwrap_or_else(|| panic!("no base format line in\n{report}"));
        if keep {
            assert!(
                line.contains("kept quantized (projections Q4_K × ")
                    && line.contains("; embedding Q4_K; lm_head Q6_K)")
                    && line.contains("the rest F32"),
                "{line}"
            );
        } else {
            assert_eq!(line, "- Base weights in memory: F32, every tensor dense");
        }
        summary(&run)
    };
    let quant = train(true);
    let first = quant["first_loss"].as_f64().unwrap();
    let last = quant["last_loss"].as_f64().unwrap();
    assert!(last < first, "no learning: {first} -> {last}");
    let dense = train(false);
    for key in ["first_loss", "last_loss", "eval_loss"] {
        assert_eq!(quant[key], dense[key], "{key}: {quant} vs {dense}");
    }
}

/// The composed path an accelerator takes (the one weight dequantized for the forward and
/// again for the backward, then `composed_linear`), run on the CPU in f64, where it is also
/// taken: output and input gradient equal `frozen_linear` on the dequantized weight, bit for
/// bit. This pins the composition, not the device's dequantization kernel, which only a GPU
/// runs. On the CPU the device copy is no copy, and the CPU refuses a quantized base outside
/// f32.
#[test]
fn composed_quantized_product_equals_the_dense_one_and_cpu_needs_f32() {
    use lorasft::model::ops::{frozen_linear, frozen_linear_quant};
    let w = Tensor::randn(0f32, 0.1, (48, 256), &Device::Cpu).unwrap();
    for ty in [GgmlDType::Q4K, GgmlDType::Q6K, GgmlDType::Q8_0] {
        let kept = QuantWeight::new(QTensor::quantize(&w, ty).unwrap())
            .unwrap()
            .with_device_copy(&Device::Cpu, DType::F64)
            .unwrap();
        let dense = kept.dequantize().unwrap().to_dtype(DType::F64).unwrap();
        let kept = std::sync::Arc::new(kept);
        let x = candle_core::Var::from_tensor(
            &Tensor::randn(0f64, 1.0, (2, 5, 256), &Device::Cpu).unwrap(),
        )
        .unwrap();
        let g = Tensor::randn(0f64, 1.0, (2, 5, 48), &Device::Cpu).unwrap();
        let run = |y: Tensor| {
            let dx = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            (bits(&y), bits(dx.get(x.as_tensor()).unwrap()))
        };
        let quant = run(frozen_linear_quant(x.as_tensor(), &kept).unwrap());
        let reference = run(frozen_linear(x.as_tensor(), &dense).unwrap());
        assert_eq!(quant, reference, "{ty:?}");
    }
    let tmp = tempfile::tempdir().unwrap();
    let file = exported(tmp.path(), "q8_0");
    let err =
        gguf_import::load_quantized_on(&Gguf::read(&file).unwrap(), &Device::Cpu, DType::BF16)
            .err()
            .unwrap()
            .to_string();
    assert!(err.contains("f32 only"), "{err}");
}

/// Products whose inner dimension forces several column slices per block (as `g @ lm_head`
/// does at a real vocabulary) equal the dense product bit for bit, both ways round.
#[test]
fn sliced_quantized_products_equal_the_dense_gemm_bit_for_bit() {
    use lorasft::model::cpu::matmul::{SLICE_VALUES, gemm_rows_f32};
    use lorasft::model::cpu::quant::gemm_rows_quant;
    let mut r = Rng::new(4);
    // (out, in, transpose): k = 20224 or 20000 makes 256-column slices; n = 768 or 512 of them.
    for (out_f, in_f, transpose) in [(768, 20224, true), (20000, 512, false)] {
        let (n, k) = if transpose {
            (out_f, in_f)
        } else {
            (in_f, out_f)
        };
        assert!(
            n * k > 2 * SLICE_VALUES,
            "the product must take several slices"
        );
        let w = Tensor::randn(0f32, 0.1, (out_f, in_f), &Device::Cpu).unwrap();
        let q = QuantWeight::new(QTensor::quantize(&w, GgmlDType::Q6K).unwrap()).unwrap();
        let dense = q
            .dequantize()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let m = 9;
        let x: Vec<f32> = (0..m * k).map(|_| r.normal() as f32).collect();
        let (mut want, mut got) = (vec![0f32; m * n], vec![0f32; m * n]);
        gemm_rows_f32(&mut want, &x, &dense, m, n, k, transpose);
        gemm_rows_quant(&mut got, &x, &q, m, transpose);
        // Both share the slicing, so check every column against a plain f64 product too.
        let at = |r: usize, c: usize| {
            if transpose {
                dense[c * k + r]
            } else {
                dense[r * n + c]
            }
        };
        for i in 0..m {
            for j in 0..n {
                let exact: f64 = (0..k)
                    .map(|l| f64::from(x[i * k + l]) * f64::from(at(l, j)))
                    .sum();
                let got = f64::from(want[i * n + j]);
                assert!(
                    (got - exact).abs() <= 1e-4 * (1.0 + exact.abs()),
                    "({i}, {j}): {got} vs {exact}"
                );
            }
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(bits(&got) == bits(&want), "transpose {transpose}");
    }
}

/// The gradient checks see a kept-quantized weight by its logical shape: a weight gradient
/// computed against a dequantized q_proj is caught. Its fingerprint is the SHA-256 of its raw
/// blocks, read where they lie.
#[test]
fn gradient_checks_and_fingerprints_see_kept_quantized_weights() {
    use lorasft::verify::{Fingerprint, weight_shaped_gradients};
    use sha2::Digest;
    let tmp = tempfile::tempdir().unwrap();
    let file = exported(tmp.path(), "q4_k_m");
    let (_, quant) = gguf_import::load_quantized(&Gguf::read(&file).unwrap()).unwrap();
    let name = "model.layers.0.self_attn.q_proj.weight";
    let Frozen::Quant(q) = quant.linear(0, Projection::QProj).unwrap().weight() else {
        panic!("q_proj is dense");
    };
    let fp = Fingerprint::of(&quant).unwrap();
    assert_eq!(
        fp.0[name],
        format!("{:x}", sha2::Sha256::digest(q.raw_bytes()))
    );
    let w = candle_core::Var::from_tensor(&q.dequantize().unwrap()).unwrap();
    let x = Tensor::ones((3, q.dims().1), DType::F32, &Device::Cpu).unwrap();
    let grads = x
        .matmul(&w.as_tensor().t().unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let (out_f, in_f) = q.dims();
    assert!(weight_shaped_gradients(&quant, &grads).contains(&vec![out_f, in_f]));
}
