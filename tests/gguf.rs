//! GGUF import: dequantisation, llama.cpp names, the Q/K un-permutation, a synthetic round
//! trip, the real SmolLM2-135M-Instruct weights, and the KV cache used for generation.

mod common;

use std::path::Path;

use candle_core::{DType, Device};
use common::gguf_writer::{Meta, fixture_meta, fixture_tensors, write_gguf};
use common::{bits, ids, max_abs_diff};
use lorasft::model::Mode;
use lorasft::model::fixture::FixtureSpec;
use lorasft::model::gguf_import::{self, dequantize, permute_qk, unpermute_qk};
use lorasft::model::llama::KvCache;

#[test]
fn synthetic_gguf_imports_back_to_the_original_model_bit_for_bit() {
    let spec = FixtureSpec::default();
    let tensors = fixture_tensors(4);
    let meta = fixture_meta();
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("tiny.gguf");
    write_gguf(&file, &meta, &tensors);
    let out = tmp.path().join("hf");
    let cfg = gguf_import::import(&file, &out).unwrap();
    assert_eq!(
        (
            cfg.hidden_size,
            cfg.num_key_value_heads,
            cfg.tie_word_embeddings
        ),
        (64, Some(2), false)
    );
    let src = lorasft::model::load::ModelSource::Dir(out);
    let imported = lorasft::model::load::load_model(&src, DType::F32, &Device::Cpu)
        .unwrap()
        .1;
    let original = spec.build(4, DType::F32, &Device::Cpu).unwrap();
    for ((n, a), (_, b)) in imported
        .base_tensors()
        .unwrap()
        .iter()
        .zip(original.base_tensors().unwrap())
    {
        assert_eq!(bits(a), bits(&b), "{n} differs after import");
    }
}

#[test]
fn unpermute_inverts_llama_cpp_permutation() {
    let w: Vec<f32> = (0..8 * 3).map(|i| i as f32).collect();
    assert_eq!(unpermute_qk(&permute_qk(&w, 8, 3, 2), 8, 3, 2), w);
    // Per head, llama.cpp interleaves the two rotary halves: rows (0,2,1,3) of a head of 4.
    assert_eq!(
        &permute_qk(&w, 8, 3, 2)[..12],
        &[0., 1., 2., 6., 7., 8., 3., 4., 5., 9., 10., 11.]
    );
}

#[test]
fn q8_0_and_q4_1_blocks_dequantize_by_their_formulas() {
    // Q8_0: f16 scale d, then 32 signed bytes; value = d * q.
    let mut q8 = half::f16::from_f32(0.5).to_le_bytes().to_vec();
    q8.extend((0..32).map(|i| (i as i8 - 16) as u8));
    let v = dequantize(8, &q8, 32).unwrap();
    assert_eq!(v[0], -8.0);
    assert_eq!(v[31], 7.5);
    // Q4_1: f16 d, f16 min, 16 bytes of nibbles (low nibbles first, then high); value = d*q + m.
    let mut q4 = half::f16::from_f32(0.25).to_le_bytes().to_vec();
    q4.extend(half::f16::from_f32(-1.0).to_le_bytes());
    q4.extend((0..16).map(|i| (i as u8) | (15 - i as u8) << 4));
    let v = dequantize(3, &q4, 32).unwrap();
    assert_eq!(v[0], -1.0);
    assert_eq!(v[15], -1.0 + 0.25 * 15.0);
    assert_eq!(v[16], -1.0 + 0.25 * 15.0);
    assert_eq!(v[31], -1.0);
    assert!(
        dequantize(99, &q4, 32)
            .unwrap_err()
            .to_string()
            .contains("99")
    );
}

#[test]
fn kv_cache_logits_equal_the_full_forward() {
    let model = common::tiny(12, DType::F64);
    let x = ids(1, 9, 512, 12);
    let full = model.forward(&x, None, &mut Mode::Eval).unwrap();
    let mut cache = KvCache::new();
    let first = model
        .forward_cached(&x.narrow(1, 0, 6).unwrap(), &mut cache)
        .unwrap();
    let d = max_abs_diff(&first, &full.narrow(1, 5, 1).unwrap().squeeze(1).unwrap());
    assert!(d < 1e-10, "prefill differs by {d:e}");
    for t in 6..9 {
        let step = model
            .forward_cached(&x.narrow(1, t, 1).unwrap(), &mut cache)
            .unwrap();
        let d = max_abs_diff(&step, &full.narrow(1, t, 1).unwrap().squeeze(1).unwrap());
        assert!(d < 1e-10, "position {t} differs by {d:e}");
    }
    assert_eq!(cache.len(), 9);
}

#[test]
fn real_smollm2_weights_import_and_answer_sensibly() {
    let Some(assets) = common::assets() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("smollm2");
    let file = assets.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let cfg = gguf_import::import(&file, &out).unwrap();
    assert_eq!(
        common::import_provenance(&out),
        (
            "SmolLM2-135M-Instruct.Q4_1.gguf".to_string(),
            std::path::absolute(&file).unwrap().display().to_string(),
            common::sha256_hex(&file)
        ),
        "the import records the GGUF's name, absolute path and SHA-256"
    );
    assert_eq!(
        (
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.vocab_size,
            cfg.tie_word_embeddings
        ),
        (30, 576, 49152, true)
    );
    let src = lorasft::model::load::ModelSource::Dir(out.clone());
    let model = lorasft::model::load::load_model(&src, DType::F32, &Device::Cpu)
        .unwrap()
        .1;
    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let prompt =
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let g = lorasft::generate::generate(
        &model,
        &tok,
        prompt,
        &[2],
        &lorasft::generate::GenerateConfig {
            max_new_tokens: 12,
            ..Default::default()
        },
    )
    .unwrap();
    println!("SmolLM2 answers: {:?}", g.text);
    assert!(
        g.text.contains("Paris"),
        "un-permuted weights should answer Paris, got {:?}",
        g.text
    );
}

/// The "done when": an adapter trained on the imported SmolLM2 names, as
/// `base_model_name_or_path`, the import's directory (config.json and the weights), so PEFT's
/// `AutoPeftModelForCausalLM` loads it by reference; its card names no display name.
#[test]
fn an_adapter_trained_on_imported_smollm2_names_the_import_directory() {
    let Some(assets) = common::assets() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    std::fs::copy(
        assets.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        &gguf,
    )
    .unwrap();
    let runs = tmp.path().join("runs");
    common::output_ok(
        common::lorasft()
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["train", "--preset", "smoke", "--max-steps", "1", "--quiet"])
            .arg("--set")
            .arg(format!("model.source=\"gguf:{}\"", gguf.display()))
            .args(["--set", "encode.max_len=32", "--set", "train.batch_size=1"])
            .args([
                "--set",
                "train.grad_accum=1",
                "--set",
                "generate.max_new_tokens=1",
            ])
            .arg("--out-dir")
            .arg(&runs),
    );
    let adapter = runs.join("smoke/adapter");
    let import = tmp.path().join("SmolLM2-135M-Instruct.Q4_1.hf");
    assert_eq!(common::loadable_base(&adapter), import);
    assert_eq!(
        common::import_provenance(&import).2,
        common::sha256_hex(&gguf)
    );
    let card = std::fs::read_to_string(adapter.join("README.md")).unwrap();
    // The front matter names no display name as a hub id; the prose below it may.
    let front = card.split("\n---\n").next().unwrap();
    assert!(
        !front.contains("base_model") && !front.contains("Smollm2"),
        "{card}"
    );
}

/// The bytes of a GGUF v3 header holding `n_tensors`/`n_kv` as given, followed by `rest`.
fn raw_gguf(n_tensors: u64, n_kv: u64, rest: &[u8]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(n_tensors.to_le_bytes());
    b.extend(n_kv.to_le_bytes());
    b.extend(rest);
    b
}

/// `gguf::Gguf::parse`'s error on `bytes`, as text; panics if the bytes parse.
fn parse_err(bytes: Vec<u8>) -> String {
    let r = lorasft::gguf::Gguf::parse(Path::new("crafted.gguf"), bytes);
    r.expect_err("crafted GGUF parsed").to_string()
}

/// Imports `meta` and `tensors` as a GGUF into a temp dir; the error and whether `out` exists.
fn import_err(meta: &[(&str, Meta)], tensors: &[common::gguf_writer::F32Tensor]) -> (String, bool) {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("crafted.gguf");
    write_gguf(&file, meta, tensors);
    let out = tmp.path().join("hf");
    let e = gguf_import::import(&file, &out).expect_err("crafted GGUF imported");
    (e.to_string(), out.exists())
}

fn with_meta(key: &'static str, v: Meta) -> Vec<(&'static str, Meta)> {
    let mut m: Vec<_> = fixture_meta()
        .into_iter()
        .filter(|(k, _)| *k != key)
        .collect();
    m.push((key, v));
    m
}

#[test]
fn alignment_zero_is_an_error_in_both_gguf_commands() {
    let mut meta = with_meta("general.alignment", Meta::U32(0));
    meta.push(("tokenizer.ggml.model", Meta::Str("gpt2".into())));
    let (e, out_exists) = import_err(&meta, &fixture_tensors(1));
    assert!(e.contains("general.alignment"), "{e}");
    assert!(!out_exists);
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a.gguf");
    write_gguf(&file, &meta, &[]);
    let e = lorasft::tokenizer::from_gguf::convert(&file, &tmp.path().join("t.json"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("general.alignment") && e.contains("a.gguf"),
        "{e}"
    );
}

#[test]
fn arrays_nested_a_million_deep_are_refused_without_overflowing_the_stack() {
    let nested = |depth: usize| {
        let mut rest = Vec::new();
        common::gguf_writer::string(&mut rest, "deep");
        rest.extend(9u32.to_le_bytes());
        for _ in 0..depth - 1 {
            rest.extend(9u32.to_le_bytes()); // element type: array
            rest.extend(1u64.to_le_bytes()); // one element
        }
        rest.extend(4u32.to_le_bytes()); // innermost: u32
        rest.extend(1u64.to_le_bytes());
        rest.extend(7u32.to_le_bytes());
        raw_gguf(0, 1, &rest)
    };
    let max = lorasft::gguf::MAX_NESTING;
    let g = lorasft::gguf::Gguf::parse(Path::new("ok.gguf"), nested(max)).unwrap();
    assert!(g.metadata["deep"].as_array().is_some());
    for depth in [max + 1, 1_000_000] {
        let e = parse_err(nested(depth));
        assert!(e.contains("nested more than 8 deep"), "{e}");
    }
}

#[test]
fn head_count_zero_is_an_error_not_a_division_by_zero() {
    let meta: Vec<_> = with_meta("llama.attention.head_count", Meta::U32(0))
        .into_iter()
        .filter(|(k, _)| *k != "llama.attention.head_count_kv")
        .collect();
    let (e, out_exists) = import_err(&meta, &fixture_tensors(1));
    assert!(
        e.contains("crafted.gguf") && e.contains("num_attention_heads"),
        "{e}"
    );
    assert!(!out_exists);
}

#[test]
fn one_dimensional_attn_q_is_a_shape_error_not_a_panic() {
    let mut tensors = fixture_tensors(1);
    let q = tensors
        .iter_mut()
        .find(|t| t.0 == "blk.0.attn_q.weight")
        .unwrap();
    q.1 = vec![q.2.len()];
    let (e, _) = import_err(&fixture_meta(), &tensors);
    assert!(
        e.contains("blk.0.attn_q.weight") && e.contains("requires [64, 64]"),
        "{e}"
    );
}

#[test]
fn a_dimension_product_that_overflows_is_an_error() {
    let mut rest = Vec::new();
    common::gguf_writer::string(&mut rest, "token_embd.weight");
    rest.extend(3u32.to_le_bytes());
    for d in [1u64 << 32, 1 << 32, 2] {
        rest.extend(d.to_le_bytes());
    }
    rest.extend(0u32.to_le_bytes());
    rest.extend(0u64.to_le_bytes());
    let e = parse_err(raw_gguf(1, 0, &rest));
    assert!(
        e.contains("token_embd.weight") && e.contains("overflow"),
        "{e}"
    );
}

#[test]
fn lengths_and_counts_beyond_the_file_are_refused_before_allocating() {
    // Each count is checked against the bytes left, so the error is at the count itself.
    let huge = u64::MAX / 2;
    let e = parse_err(raw_gguf(0, huge, &[0; 64]));
    assert!(e.contains("metadata key count"), "{e}");
    let e = parse_err(raw_gguf(huge, 0, &[0; 64]));
    assert!(e.contains("tensor count"), "{e}");
    let mut rest = huge.to_le_bytes().to_vec(); // key length
    rest.extend([b'k'; 64]);
    let e = parse_err(raw_gguf(0, 1, &rest));
    assert!(e.contains("string byte count"), "{e}");
    let mut rest = Vec::new();
    common::gguf_writer::string(&mut rest, "k");
    rest.extend(9u32.to_le_bytes());
    rest.extend(8u32.to_le_bytes()); // array of strings: at least 8 bytes each
    rest.extend(8u64.to_le_bytes()); // 8 strings in 64 bytes: too many
    rest.extend([0; 63]);
    let e = parse_err(raw_gguf(0, 1, &rest));
    assert!(e.contains("array element count 8"), "{e}");
    let mut rest = Vec::new();
    common::gguf_writer::string(&mut rest, "t");
    rest.extend(u32::MAX.to_le_bytes()); // dimensions
    rest.extend([0; 64]);
    let e = parse_err(raw_gguf(1, 0, &rest));
    assert!(e.contains("dimensions (at most 8"), "{e}");
}

#[test]
fn gguf_without_the_llama_tensors_is_refused_and_writes_nothing() {
    let (e, out_exists) = import_err(&fixture_meta(), &[]);
    assert!(e.contains("missing tensor `token_embd.weight`"), "{e}");
    assert!(!out_exists, "a refused import must not leave a directory");
    let mut tensors = fixture_tensors(1);
    tensors.retain(|t| t.0 != "blk.1.ffn_up.weight");
    let (e, out_exists) = import_err(&fixture_meta(), &tensors);
    assert!(e.contains("missing tensor `blk.1.ffn_up.weight`"), "{e}");
    assert!(!out_exists);
}

#[test]
fn vocabulary_errors_name_the_gguf_file_and_never_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let strs = |v: &[&str]| Meta::Array(v.iter().map(|s| Meta::Str(s.to_string())).collect());
    let cases = [
        // SentencePiece vocabulary with fewer scores than tokens.
        vec![
            ("tokenizer.ggml.model", Meta::Str("llama".into())),
            ("tokenizer.ggml.tokens", strs(&["<unk>", "<s>", "</s>"])),
            ("tokenizer.ggml.scores", Meta::Array(vec![Meta::F32(0.0)])),
        ],
        // Byte-level vocabulary with more token types than tokens (used to index past the end).
        vec![
            ("tokenizer.ggml.model", Meta::Str("gpt2".into())),
            ("tokenizer.ggml.tokens", strs(&["a"])),
            ("tokenizer.ggml.merges", strs(&[])),
            (
                "tokenizer.ggml.token_type",
                Meta::Array(vec![Meta::I32(3), Meta::I32(3), Meta::I32(3)]),
            ),
        ],
        // A merge that is not two tokens.
        vec![
            ("tokenizer.ggml.model", Meta::Str("gpt2".into())),
            ("tokenizer.ggml.tokens", strs(&["a", "b"])),
            ("tokenizer.ggml.merges", strs(&["ab"])),
        ],
    ];
    for (i, meta) in cases.into_iter().enumerate() {
        let file = tmp.path().join(format!("vocab{i}.gguf"));
        write_gguf(&file, &meta, &[]);
        let e = lorasft::tokenizer::from_gguf::convert(&file, &tmp.path().join("t.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("vocab{i}.gguf")), "case {i}: {e}");
    }
}
