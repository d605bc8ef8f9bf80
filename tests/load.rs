//! Loading models from Hugging Face-layout directories: single and sharded files, dtype
//! upcasts, and errors that name the tensor, the file and the shapes.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{bits, ids};
use lorasft::model::Mode;
use lorasft::model::fixture::{FixtureDtype, FixtureSpec};
use lorasft::model::load::{ModelSource, load_model};

fn load(dir: &Path) -> lorasft::Result<lorasft::model::Llama> {
    load_model(
        &ModelSource::Dir(dir.to_path_buf()),
        DType::F32,
        &Device::Cpu,
    )
    .map(|(_, m, _)| m)
}

fn logits(model: &lorasft::model::Llama) -> Vec<u64> {
    bits(
        &model
            .forward(&ids(1, 6, 512, 0), None, &mut Mode::Eval)
            .unwrap(),
    )
}

#[test]
fn written_fixture_loads_to_the_same_model_as_built_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let spec = FixtureSpec::default();
    spec.write(3, dir.path()).unwrap();
    let loaded = load(dir.path()).unwrap();
    let built = spec.build(3, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(logits(&loaded), logits(&built));
}

#[test]
fn sharded_checkpoint_loads_identically() {
    let dir = tempfile::tempdir().unwrap();
    let spec = FixtureSpec::default();
    spec.write(4, dir.path()).unwrap();
    let single = load(dir.path()).unwrap();

    let sharded = tempfile::tempdir().unwrap();
    std::fs::copy(
        dir.path().join("config.json"),
        sharded.path().join("config.json"),
    )
    .unwrap();
    let tensors = spec.tensors(4).unwrap();
    let (first, second) = tensors.split_at(tensors.len() / 2);
    let mut map = BTreeMap::new();
    for (part, file) in [
        (first, "model-00001-of-00002.safetensors"),
        (second, "model-00002-of-00002.safetensors"),
    ] {
        let h: HashMap<String, Tensor> = part.iter().cloned().collect();
        candle_core::safetensors::save(&h, sharded.path().join(file)).unwrap();
        for (n, _) in part {
            map.insert(n.clone(), file.to_string());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        sharded.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    assert_eq!(logits(&load(sharded.path()).unwrap()), logits(&single));
}

#[test]
fn bf16_and_f16_files_are_upcast_to_f32() {
    for dtype in [FixtureDtype::Bf16, FixtureDtype::F16] {
        let dir = tempfile::tempdir().unwrap();
        let spec = FixtureSpec {
            dtype,
            ..FixtureSpec::default()
        };
        spec.write(5, dir.path()).unwrap();
        let (_, model, report) = load_model(
            &ModelSource::Dir(dir.path().into()),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(model.dtype(), DType::F32);
        assert_eq!(report.file_dtypes.len(), 1, "{:?}", report.file_dtypes);
        let (name, t) = &model.base_tensors()[1];
        let stored = spec
            .tensors(5)
            .unwrap()
            .into_iter()
            .find(|(n, _)| n == name)
            .unwrap()
            .1;
        assert_eq!(
            bits(t),
            bits(&stored.to_dtype(DType::F32).unwrap()),
            "{dtype:?} upcast changed values"
        );
    }
}

#[test]
fn shape_mismatch_names_tensor_file_and_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    FixtureSpec::default().write(6, dir.path()).unwrap();
    // A config that disagrees with the weights: intermediate 160 in the file, 128 claimed.
    let cfg = FixtureSpec {
        intermediate: 128,
        ..FixtureSpec::default()
    }
    .config();
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::to_string(&cfg).unwrap(),
    )
    .unwrap();
    let err = load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("model.layers.0.mlp.gate_proj.weight"), "{err}");
    assert!(
        err.contains("[160, 64]") && err.contains("[128, 64]"),
        "{err}"
    );
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn missing_tensor_and_missing_file_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let spec = FixtureSpec::default();
    spec.write(7, dir.path()).unwrap();
    let h: HashMap<String, Tensor> = spec
        .tensors(7)
        .unwrap()
        .into_iter()
        .filter(|(n, _)| n != "model.norm.weight")
        .collect();
    candle_core::safetensors::save(&h, dir.path().join("model.safetensors")).unwrap();
    let err = load(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("missing tensor `model.norm.weight`") && err.contains("[64]"),
        "{err}"
    );
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let err = load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn corrupt_weights_and_configs_give_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    FixtureSpec::default().write(8, dir.path()).unwrap();
    std::fs::write(
        dir.path().join("model.safetensors"),
        b"not a safetensors file",
    )
    .unwrap();
    let err = load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("not a valid safetensors file"), "{err}");

    let cfg_path = dir.path().join("config.json");
    std::fs::write(&cfg_path, "{\"hidden_size\": 64,").unwrap();
    let err = load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("config.json") && err.contains("line"), "{err}");
}

#[test]
fn rope_theta_is_read_from_either_place_and_never_guessed() {
    let mut v = serde_json::to_value(FixtureSpec::default().config()).unwrap();
    let obj = v.as_object_mut().unwrap();
    obj.remove("rope_theta");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, v.to_string()).unwrap();
    let err = lorasft::model::LlamaConfig::from_file(&path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("rope_theta"), "{err}");
    v.as_object_mut().unwrap().insert(
        "rope_parameters".into(),
        serde_json::json!({"rope_theta": 500000.0, "rope_type": "default"}),
    );
    std::fs::write(&path, v.to_string()).unwrap();
    let cfg = lorasft::model::LlamaConfig::from_file(&path).unwrap();
    assert_eq!(cfg.shape().unwrap().rope_theta, 500000.0);
}
