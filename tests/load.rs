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

    // A shard name that leaves the model directory is refused, naming the index and entry,
    // even when the file it names exists and would load (here: the whole single file).
    let name = map.keys().next().unwrap().clone();
    for escaping in [
        format!(
            "../{}/model.safetensors",
            dir.path().file_name().unwrap().to_string_lossy()
        ),
        dir.path().join("model.safetensors").display().to_string(),
    ] {
        let mut bad = map.clone();
        bad.insert(name.clone(), escaping.clone());
        let index = serde_json::json!({"metadata": {}, "weight_map": bad});
        std::fs::write(
            sharded.path().join("model.safetensors.index.json"),
            index.to_string(),
        )
        .unwrap();
        let err = load(sharded.path()).unwrap_err().to_string();
        assert!(
            err.contains("model.safetensors.index.json") && err.contains(&name),
            "{escaping}: {err}"
        );
    }
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
        let (name, t) = &model.base_tensors().unwrap()[1];
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

/// The default fixture's config.json with `key` set to `value`, written into `dir`.
fn config_with(dir: &Path, key: &str, value: serde_json::Value) {
    let mut v = serde_json::to_value(FixtureSpec::default().config()).unwrap();
    v.as_object_mut().unwrap().insert(key.into(), value);
    std::fs::write(dir.join("config.json"), v.to_string()).unwrap();
}

#[test]
fn config_sizes_are_refused_before_any_allocation_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    FixtureSpec::default().write(3, dir.path()).unwrap();
    let cases: [(&str, serde_json::Value, &str); 10] = [
        (
            "num_hidden_layers",
            1_000_000_000_000u64.into(),
            "limit of 4096",
        ),
        (
            "max_position_embeddings",
            1_000_000_000_000u64.into(),
            "limit of 16777216",
        ),
        ("max_position_embeddings", 0.into(), "must be positive"),
        ("hidden_size", 1_000_000_000_000u64.into(), "2^40"),
        ("intermediate_size", (1u64 << 62).into(), "2^40"),
        ("vocab_size", (1u64 << 62).into(), "2^40"),
        ("head_dim", 0.into(), "must be positive"),
        ("head_dim", (1u64 << 40).into(), "2^40"),
        ("num_attention_heads", 6.into(), "not divisible"),
        (
            "num_key_value_heads",
            3.into(),
            "multiple of num_key_value_heads",
        ),
    ];
    for (key, value, why) in cases {
        config_with(dir.path(), key, value.clone());
        // The whole load path, so a config that slipped through would allocate (and abort).
        let err = match load(dir.path()) {
            Ok(_) => panic!("{key} = {value} loaded"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("config.json") && err.contains(key) && err.contains(why),
            "{key} = {value}: {err}"
        );
    }
}

#[test]
fn a_path_like_model_spec_is_a_directory_and_a_hub_id_is_not() {
    for spec in [
        "./no-such-model",
        "/no/such/model",
        "~/models/x",
        "a/b/c",
        "src/no-such",
    ] {
        assert_eq!(
            ModelSource::parse(spec),
            ModelSource::Dir(spec.into()),
            "{spec} looks like a path"
        );
        let err = lorasft::model::load::resolve_config(&ModelSource::parse(spec))
            .unwrap_err()
            .to_string();
        assert_eq!(err, format!("no such model directory: {spec}"));
    }
    for spec in [
        "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
        "gpt2",
        "HuggingFaceTB/SmolLM2-135M",
    ] {
        assert_eq!(
            ModelSource::parse(spec),
            ModelSource::Hub(spec.into()),
            "{spec}"
        );
    }
    // An existing file is a path too, and not a directory.
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let err = lorasft::model::load::resolve_config(&ModelSource::parse(file))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("no such model directory") && err.contains("it is a file"),
        "{err}"
    );
}

#[test]
fn adapter_config_errors_name_the_file() {
    use lorasft::adapter::{AdapterConfig, TargetModules};
    let lora = lorasft::model::LoraConfig::default();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("adapter_config.json");
    let write =
        |c: &AdapterConfig| std::fs::write(&path, serde_json::to_string(c).unwrap()).unwrap();
    let mut c = AdapterConfig::from_lora(&lora, Some("base"));
    c.r = 0;
    write(&c);
    let err = lorasft::adapter::read_config(dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(path.to_str().unwrap()) && err.contains("r must be"),
        "{err}"
    );
    let mut c = AdapterConfig::from_lora(&lora, Some("base"));
    c.target_modules = TargetModules::List(vec!["q_proj".into(), "qkv".into()]);
    write(&c);
    let err = lorasft::adapter::read_config(dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(path.to_str().unwrap()) && err.contains("\"qkv\""),
        "{err}"
    );
}
