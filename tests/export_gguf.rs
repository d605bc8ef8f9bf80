//! `lorasft export-gguf` round trips: tensors come back as written (bit for bit for f32 and
//! f16, candle's own dequantization of what was written for the quantized types), the
//! q4_k_m / q5_k_m mixes give each tensor llama.cpp's type, tokenizers re-import to the same
//! ids on alpaca_en_demo, a merged SmolLM2 + adapter keeps its eval loss through q8_0, and
//! K-quant files train.

mod common;

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use common::{bits, lorasft};
use lorasft::export::{self, ExportType};
use lorasft::model::fixture::FixtureSpec;
use lorasft::model::gguf_import::{self, unpermute_qk};
use lorasft::model::load::{ModelSource, load_model};

/// A fixture whose rows are whole K-quant blocks (hidden and MLP widths multiples of 256),
/// small enough to train in a test.
fn kquant_spec() -> FixtureSpec {
    FixtureSpec {
        hidden: 256,
        intermediate: 512,
        layers: 8,
        heads: 4,
        kv_heads: 2,
        ..FixtureSpec::default()
    }
}

/// Writes `spec` (seed `seed`) with the committed fixture tokenizer into `dir`.
fn model_dir(spec: &FixtureSpec, seed: u64, dir: &Path) -> PathBuf {
    spec.write(seed, dir).unwrap();
    std::fs::copy(common::fixture_tokenizer(), dir.join("tokenizer.json")).unwrap();
    dir.to_path_buf()
}

fn export_cli(model: &str, adapter: Option<&Path>, ty: &str, out: &Path) -> String {
    let mut c = lorasft();
    c.args(["export-gguf", "--model", model, "--type", ty, "--out"])
        .arg(out);
    if let Some(a) = adapter {
        c.arg("--adapter").arg(a);
    }
    common::output_ok(&mut c)
}

fn load_dir(dir: &Path) -> lorasft::model::Llama {
    load_model(
        &ModelSource::Dir(dir.to_path_buf()),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
    .1
}

/// Imports `gguf` and returns the model's base tensors by name.
fn imported(gguf: &Path) -> Vec<(String, Tensor)> {
    let out = gguf.with_extension("hf");
    gguf_import::import(gguf, &out).unwrap();
    load_dir(&out).base_tensors().unwrap()
}

#[test]
fn f32_and_f16_exports_import_back_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_dir(&FixtureSpec::default(), 3, &tmp.path().join("m"));
    let original = load_dir(&dir).base_tensors().unwrap();
    for (ty, dtype) in [("f32", DType::F32), ("f16", DType::F16)] {
        let file = tmp.path().join(format!("{ty}.gguf"));
        export_cli(dir.to_str().unwrap(), None, ty, &file);
        for ((n, a), (_, b)) in imported(&file).iter().zip(&original) {
            // Norms stay f32 in every export; the rest is stored in the file's type.
            let want = if b.rank() == 1 {
                b.clone()
            } else {
                b.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap()
            };
            assert_eq!(
                bits(a),
                bits(&want),
                "{ty}: {n} differs after the round trip"
            );
        }
    }
}

/// The tensors `export` writes for `ty`, dequantized by candle and Q/K un-permuted: what an
/// import of the file must give back exactly.
fn as_written(model: &lorasft::model::Llama, ty: ExportType) -> Vec<(String, GgmlDType, Vec<f32>)> {
    let shape = model.shape().clone();
    export::gguf_tensors(model, ty)
        .unwrap()
        .into_iter()
        .map(|(name, q)| {
            let dims = q.shape().dims().to_vec();
            let mut v = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            if name.ends_with("attn_q.weight") {
                v = unpermute_qk(&v, dims[0], dims[1], shape.heads);
            } else if name.ends_with("attn_k.weight") {
                v = unpermute_qk(&v, dims[0], dims[1], shape.kv_heads);
            }
            (name, q.dtype(), v)
        })
        .collect()
}

#[test]
fn quantized_exports_import_as_candle_dequantizes_what_was_written() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = kquant_spec();
    let dir = model_dir(&spec, 5, &tmp.path().join("m"));
    let model = load_dir(&dir);
    let original = model.base_tensors().unwrap();
    for (flag, ty, tol) in [
        ("q8_0", ExportType::Q8_0, 0.01),
        ("q4_0", ExportType::Q4_0, 0.15),
        ("q6_k", ExportType::Q6K, 0.05),
        ("q4_k_m", ExportType::Q4KM, 0.15),
        ("q5_k_m", ExportType::Q5KM, 0.08),
    ] {
        let file = tmp.path().join(format!("{flag}.gguf"));
        export_cli(dir.to_str().unwrap(), None, flag, &file);
        let back = imported(&file);
        let written = as_written(&model, ty);
        for (((n, got), (gname, t, want)), (_, orig)) in back.iter().zip(&written).zip(&original) {
            let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{flag}: {n} ({gname}, {t:?}) is not what was written"
            );
            // And what was written is the model, to the type's precision.
            let rel = common::rel_diff(
                &Tensor::new(got.as_slice(), &Device::Cpu).unwrap(),
                &orig.flatten_all().unwrap(),
            );
            assert!(rel < tol, "{flag}: {n} ({t:?}) is {rel:e} off the original");
        }
    }
}

#[test]
fn q4_k_m_and_q5_k_m_give_each_tensor_llama_cpp_s_type() {
    // 8 layers: the first and last eighth (0, 7) and every third in between (3, 6) get Q6_K.
    let more: Vec<usize> = (0..8).filter(|&l| export::use_more_bits(l, 8)).collect();
    assert_eq!(more, vec![0, 3, 6, 7]);
    let more32: Vec<usize> = (0..32).filter(|&l| export::use_more_bits(l, 32)).collect();
    assert_eq!(
        more32,
        vec![0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    );
    let spec = kquant_spec();
    let model = spec.build(1, DType::F32, &Device::Cpu).unwrap();
    for (ty, base) in [
        (ExportType::Q4KM, GgmlDType::Q4K),
        (ExportType::Q5KM, GgmlDType::Q5K),
    ] {
        for (name, q) in export::gguf_tensors(&model, ty).unwrap() {
            let layer = name
                .strip_prefix("blk.")
                .and_then(|r| r.split('.').next())
                .and_then(|l| l.parse::<usize>().ok());
            let want = if name.ends_with("norm.weight") {
                GgmlDType::F32
            } else if name == "output.weight"
                || ((name.ends_with("attn_v.weight") || name.ends_with("ffn_down.weight"))
                    && more.contains(&layer.unwrap()))
            {
                GgmlDType::Q6K
            } else {
                base
            };
            assert_eq!(q.dtype(), want, "{ty:?}: {name}");
        }
    }
    // Rows that are not whole 256-blocks fall back as llama.cpp does; tied embeddings are the
    // output, so Q6_K.
    let t = |name: &str, dims: &[usize], tied| {
        export::tensor_type(ExportType::Q4KM, name, dims, 8, tied)
    };
    assert_eq!(t("blk.1.attn_q.weight", &[64, 64], false), GgmlDType::Q5_0);
    assert_eq!(t("blk.0.attn_v.weight", &[64, 64], false), GgmlDType::Q8_0);
    assert_eq!(t("token_embd.weight", &[512, 256], true), GgmlDType::Q6K);
    assert_eq!(t("token_embd.weight", &[512, 256], false), GgmlDType::Q4K);
    assert_eq!(t("blk.1.attn_q.weight", &[48, 48], false), GgmlDType::F16);
}

#[test]
fn exported_files_carry_llama_cpp_metadata_and_the_hub_name() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_dir(&FixtureSpec::default(), 2, &tmp.path().join("m"));
    // A config.json that names its hub model: the export records it where llama.cpp does.
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["_name_or_path"] = "example-org/tiny-llama".into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let file = tmp.path().join("m.gguf");
    export_cli(dir.to_str().unwrap(), None, "q8_0", &file);
    let g = lorasft::gguf::Gguf::read(&file).unwrap();
    let u = |k: &str| g.get(k).unwrap().as_u64().unwrap();
    assert_eq!(
        g.get("general.architecture").unwrap().as_str(),
        Some("llama")
    );
    assert_eq!(
        (
            u("llama.embedding_length"),
            u("llama.block_count"),
            u("llama.feed_forward_length"),
            u("llama.attention.head_count"),
            u("llama.attention.head_count_kv"),
            u("llama.rope.dimension_count"),
            u("llama.vocab_size"),
            u("llama.context_length"),
            u("general.file_type"),
        ),
        (64, 2, 160, 4, 2, 16, 512, 256, 7)
    );
    assert_eq!(
        g.get("llama.rope.freq_base").unwrap().as_f64(),
        Some(10000.0)
    );
    assert_eq!(
        gguf_import::model_name(&g),
        "example-org/tiny-llama",
        "the hub id is recorded as general.source.huggingface.repository"
    );
    assert_eq!(
        g.get("tokenizer.ggml.model").unwrap().as_str(),
        Some("llama")
    );
    let out = tmp.path().join("back");
    let back = gguf_import::import(&file, &out).unwrap();
    assert_eq!(back.name_or_path.as_deref(), Some("example-org/tiny-llama"));
}

/// Every alpaca_en_demo record's text encoded by the tokenizer at `path`.
fn encode_alpaca(assets: &Path, path: &Path) -> Vec<Vec<u32>> {
    let tok = lorasft::tokenizer::load(path).unwrap();
    let records = lorasft::data::dataset::load(&assets.join("data/alpaca_en_demo.json"))
        .unwrap()
        .records;
    records
        .iter()
        .filter_map(|s| s.as_instruction())
        .map(|r| {
            let input = r.input.as_deref().unwrap_or_default();
            let text = format!("{}\n{input}\n{}", r.instruction, r.output);
            tok.encode(text, true).unwrap().get_ids().to_vec()
        })
        .collect()
}

/// Converts `gguf`'s vocabulary to tokenizer.json, writes that back as GGUF metadata, converts
/// again, and checks both tokenizers encode alpaca_en_demo to the same ids.
fn tokenizer_round_trip(assets: &Path, gguf: &str) {
    let (tmp, first) = common::converted_tokenizer(assets, gguf);
    let meta = lorasft::tokenizer::to_gguf::gguf_metadata(&first).unwrap();
    let refs: Vec<(&str, &candle_core::quantized::gguf_file::Value)> =
        meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let file = tmp.path().join("vocab-only.gguf");
    let mut w = std::fs::File::create(&file).unwrap();
    candle_core::quantized::gguf_file::write(&mut w, &refs, &[]).unwrap();
    drop(w);
    let second = tmp.path().join("again/tokenizer.json");
    lorasft::tokenizer::from_gguf::convert(&file, &second).unwrap();
    let (a, b) = (
        encode_alpaca(assets, &first),
        encode_alpaca(assets, &second),
    );
    assert!(
        a.iter().map(Vec::len).sum::<usize>() > 10_000,
        "{gguf}: too little text"
    );
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert_eq!(
            x, y,
            "{gguf}: record {i} encodes differently after the round trip"
        );
    }
}

#[test]
fn tokenizers_written_to_gguf_encode_alpaca_identically() {
    let Some(assets) = common::assets() else {
        return;
    };
    tokenizer_round_trip(&assets, "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    tokenizer_round_trip(&assets, "vocab/ggml-vocab-llama-spm.gguf");
}

/// Sets `_name_or_path` in `dir`'s config.json.
fn name_model(dir: &Path, name: &str) {
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["_name_or_path"] = name.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
}

/// The `base_model:` line of a model card's front matter.
fn card_base(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("base_model: "))
        .unwrap_or_else(|| panic!("{} has no base_model", path.display()))
        .to_string()
}

#[test]
fn k_quant_exports_import_and_train_and_cards_name_the_hub_model() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_dir(&kquant_spec(), 9, &tmp.path().join("m"));
    name_model(&dir, "example-org/kquant-tiny");
    for ty in ["q4_k_m", "q6_k"] {
        let file = tmp.path().join(format!("{ty}.gguf"));
        let printed = export_cli(dir.to_str().unwrap(), None, ty, &file);
        assert!(
            printed.contains(if ty == "q6_k" { "Q6K" } else { "Q4K" }),
            "{printed}"
        );
        let runs = tmp.path().join(format!("runs-{ty}"));
        let out = common::output_ok(
            lorasft()
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .args(["train", "--preset", "smoke", "--max-steps", "3", "--quiet"])
                .arg("--set")
                .arg(format!("model.source=\"gguf:{}\"", file.display()))
                .arg("--out-dir")
                .arg(&runs),
        );
        let run = runs.join("smoke");
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap())
                .unwrap();
        let loss = summary["last_loss"].as_f64();
        assert!(loss.is_some_and(f64::is_finite), "{ty}: {summary}\n{out}");
        // The model card and the report name the hub model the GGUF records, not the
        // `.hf` directory it was imported into.
        assert_eq!(
            card_base(&run.join("adapter/README.md")),
            "example-org/kquant-tiny"
        );
        assert_eq!(card_base(&run.join("REPORT.md")), "example-org/kquant-tiny");
        // adapter_config.json names what PEFT can load: the import's directory, absolute.
        let import = file.with_extension("hf");
        assert_eq!(common::loadable_base(&run.join("adapter")), import);
        assert_eq!(
            common::import_provenance(&import),
            (
                format!("{ty}.gguf"),
                file.display().to_string(),
                common::sha256_hex(&file)
            ),
            "the import records the GGUF's file name, absolute path and SHA-256"
        );
    }
}

#[test]
fn sources_are_named_by_their_published_name_never_by_a_cache_path() {
    use common::gguf_writer::{Meta, fixture_meta, fixture_tensors, write_gguf};
    use lorasft::model::source::resolve_model;
    let tmp = tempfile::tempdir().unwrap();
    let label = |source: &str| {
        resolve_model(source, &Device::Cpu, DType::F32)
            .unwrap()
            .label
    };
    // A GGUF without a repository key: general.name.
    let mut meta = fixture_meta();
    meta.push(("general.name", Meta::Str("Tiny Fixture 1M".into())));
    let file = tmp.path().join("named.gguf");
    write_gguf(&file, &meta, &fixture_tensors(2));
    assert_eq!(
        label(&format!("gguf:{}", file.display())),
        "Tiny Fixture 1M"
    );
    // A huggingface.co source URL: the repository in it.
    let mut meta = fixture_meta();
    meta.push((
        "general.source.url",
        Meta::Str("https://huggingface.co/example-org/from-url".into()),
    ));
    let file = tmp.path().join("url.gguf");
    write_gguf(&file, &meta, &fixture_tensors(2));
    assert_eq!(
        label(&format!("gguf:{}", file.display())),
        "example-org/from-url"
    );
    // Nothing recorded: the file's stem, not the `.hf` import directory.
    let bare = tmp.path().join("bare.gguf");
    write_gguf(&bare, &fixture_meta(), &fixture_tensors(2));
    assert_eq!(label(&format!("gguf:{}", bare.display())), "bare");
    // A directory: config.json's `_name_or_path`, else the path.
    let dir = model_dir(&FixtureSpec::default(), 1, &tmp.path().join("d"));
    assert_eq!(label(dir.to_str().unwrap()), dir.display().to_string());
    name_model(&dir, "example-org/dir-model");
    assert_eq!(label(dir.to_str().unwrap()), "example-org/dir-model");
}

#[test]
fn adapters_name_their_base_by_hub_id_or_directory_and_cards_only_by_hub_id() {
    use common::gguf_writer::{Meta, fixture_meta, fixture_tensors, write_gguf};
    use lorasft::adapter::{BaseRef, owned_hub_id};
    use lorasft::model::source::resolve_model;
    let tmp = tempfile::tempdir().unwrap();
    let base_ref = |source: &str| {
        resolve_model(source, &Device::Cpu, DType::F32)
            .unwrap()
            .base_ref
    };
    let gguf = |name: &str, key: &'static str, value: &str| {
        let mut meta = fixture_meta();
        meta.push((key, Meta::Str(value.into())));
        let file = tmp.path().join(name);
        write_gguf(&file, &meta, &fixture_tensors(2));
        file
    };
    // A display name is no hub id: the card leaves base_model out; PEFT gets the directory.
    let named = gguf(
        "named.gguf",
        "general.name",
        "Smollm2 135M 8k Lc100K Mix1 Ep2",
    );
    let want = BaseRef::Dir {
        path: tmp.path().join("named.hf"),
        hub_id: None,
    };
    assert_eq!(base_ref(&format!("gguf:{}", named.display())), want);
    assert_eq!(
        want.name_or_path().unwrap(),
        tmp.path().join("named.hf").display().to_string()
    );
    let repo = "general.source.huggingface.repository";
    let from_repo = gguf("repo.gguf", repo, "example-org/tiny");
    assert_eq!(
        base_ref(&format!("gguf:{}", from_repo.display())),
        BaseRef::Dir {
            path: tmp.path().join("repo.hf"),
            hub_id: Some("example-org/tiny".into()),
        }
    );
    let fixture = base_ref("fixture:0");
    assert_eq!(fixture, BaseRef::Unloadable { hub_id: None });
    assert_eq!(fixture.name_or_path(), None);
    let dir = model_dir(&FixtureSpec::default(), 1, &tmp.path().join("d"));
    assert_eq!(
        base_ref(dir.to_str().unwrap()),
        BaseRef::Dir {
            path: dir.clone(),
            hub_id: None
        },
        "a directory's own path is no hub id"
    );
    for (name, ok) in [
        ("example-org/model-1.5B", true),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", true),
        ("gpt2", false),
        ("Tiny Fixture 1M", false),
        ("/abs/dir", false),
        ("./rel/dir", false),
        ("a/b/c", false),
        ("org/-bad", false),
        ("org/a..b", false),
    ] {
        assert_eq!(owned_hub_id(name).is_some(), ok, "{name}");
    }
}

/// `lorasft eval`'s mean loss of `model` on `data`.
fn eval_loss(model: &str, tokenizer: &Path, data: &Path) -> f64 {
    let out = common::output_ok(
        lorasft()
            .args(["eval", "--model", model, "--max-len", "256", "--tokenizer"])
            .arg(tokenizer)
            .arg("--data")
            .arg(data),
    );
    let at = out.find("mean loss: ").expect("eval prints the mean loss") + 11;
    out[at..].split(',').next().unwrap().trim().parse().unwrap()
}

#[test]
fn merged_smollm2_keeps_its_eval_loss_through_q8_0() {
    let Some(assets) = common::assets() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("smollm2.hf");
    gguf_import::import(
        &assets.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        &base,
    )
    .unwrap();
    // A random, non-zero adapter on every projection.
    let mut model = load_dir(&base);
    let lora = lorasft::model::LoraConfig {
        targets: lorasft::model::Projection::ALL.into_iter().collect(),
        ..Default::default()
    };
    model.add_lora(&lora, 1).unwrap();
    common::randomise_adapters(&model, 2);
    let adapter = tmp.path().join("adapter");
    let base_ref = lorasft::adapter::BaseRef::Dir {
        path: base.clone(),
        hub_id: None,
    };
    lorasft::adapter::save(&model, &adapter, &base_ref, "test adapter").unwrap();
    // The first 24 alpaca_en_demo records.
    let text = std::fs::read_to_string(assets.join("data/alpaca_en_demo.json")).unwrap();
    let all: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let data = tmp.path().join("alpaca24.json");
    std::fs::write(&data, serde_json::to_string(&all[..24]).unwrap()).unwrap();
    let merged = tmp.path().join("merged");
    common::output_ok(
        lorasft()
            .args(["merge", "--model", base.to_str().unwrap(), "--adapter"])
            .arg(&adapter)
            .arg("--out")
            .arg(&merged),
    );
    let q8 = tmp.path().join("merged-q8_0.gguf");
    export_cli(base.to_str().unwrap(), Some(&adapter), "q8_0", &q8);
    let tok = base.join("tokenizer.json");
    let exact = eval_loss(merged.to_str().unwrap(), &tok, &data);
    let quant = eval_loss(&format!("gguf:{}", q8.display()), &tok, &data);
    let base_loss = eval_loss(base.to_str().unwrap(), &tok, &data);
    let rel = (quant - exact).abs() / exact;
    println!(
        "eval loss: base {base_loss:.6}, merged {exact:.6}, merged q8_0 {quant:.6} ({rel:.2e} relative)"
    );
    // The adapter must matter, or the comparison would not test the merge.
    assert!(
        (exact - base_loss).abs() > 0.05,
        "{exact} vs base {base_loss}"
    );
    assert!(
        rel < 0.01,
        "q8_0 loss {quant} is {rel:e} off the merge's {exact}"
    );
}
