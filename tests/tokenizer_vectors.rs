//! Tokenizers converted from GGUF vocabularies by lorasft's own code, checked against every
//! llama.cpp test vector (`.gguf.inp` / `.gguf.out`) shipped beside the vocabularies.

mod common;

use std::path::Path;

/// Runs every vector of `name`; returns (passed, failures as text).
fn run_vectors(assets: &Path, name: &str) -> (usize, Vec<String>) {
    let (_tmp, tok_path) = common::converted_tokenizer(assets, &format!("vocab/{name}"));
    let tok = tokenizers::Tokenizer::from_file(&tok_path).unwrap();
    let inp = std::fs::read_to_string(assets.join(format!("vocab/{name}.inp"))).unwrap();
    let out = std::fs::read_to_string(assets.join(format!("vocab/{name}.out"))).unwrap();
    let mut texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    if texts.last() == Some(&"") {
        texts.pop();
    }
    let expected: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    assert_eq!(
        texts.len(),
        expected.len(),
        "{name}: vector files disagree on the number of cases"
    );
    let mut failures = Vec::new();
    for (text, want) in texts.iter().zip(&expected) {
        let got = tok.encode(*text, false).unwrap().get_ids().to_vec();
        if &got != want {
            failures.push(format!("{text:?}: got {got:?}, want {want:?}"));
        }
    }
    (texts.len() - failures.len(), failures)
}

fn check_all(name: &str) {
    let Some(assets) = common::assets() else {
        return;
    };
    let (passed, failures) = run_vectors(&assets, name);
    println!("{name}: {passed} vectors passed, {} failed", failures.len());
    assert!(
        failures.is_empty(),
        "{name}: {} vectors failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn llama_spm_conversion_passes_every_llama_cpp_vector() {
    check_all("ggml-vocab-llama-spm.gguf");
}

#[test]
fn starcoder_conversion_passes_every_llama_cpp_vector() {
    // The same pre-tokenizer as SmolLM2's (digits split, then GPT-2's regex).
    check_all("ggml-vocab-starcoder.gguf");
}

#[test]
fn gpt2_conversion_passes_every_llama_cpp_vector() {
    check_all("ggml-vocab-gpt-2.gguf");
}

#[test]
fn smollm2_vocabulary_converts_and_round_trips_text() {
    let Some(assets) = common::assets() else {
        return;
    };
    let (_tmp, path) =
        common::converted_tokenizer(&assets, "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let tok = tokenizers::Tokenizer::from_file(&path).unwrap();
    assert_eq!(tok.get_vocab_size(true), 49152);
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(path.with_file_name("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    println!("smollm2 tokenizer_config: {cfg}");
    for text in [
        "### Instruction:\nGive three tips for staying healthy.\n\n### Response:\n1. Eat well 2024!",
        "  leading spaces\tand tabs",
        "émoji 🦙 and 中文",
    ] {
        let enc = tok.encode(text, false).unwrap();
        assert_eq!(
            tok.decode(enc.get_ids(), false).unwrap(),
            text,
            "round trip failed"
        );
        // Digits are split one by one (the StarCoder/SmolLM pre-tokenizer).
        if text.contains("2024") {
            let toks = enc.get_tokens();
            assert!(
                toks.iter().any(|t| t == "2") && toks.iter().any(|t| t == "0"),
                "{toks:?}"
            );
        }
    }
}

#[test]
fn llama_spm_round_trips_and_adds_bos() {
    let Some(assets) = common::assets() else {
        return;
    };
    let (_tmp, path) = common::converted_tokenizer(&assets, "vocab/ggml-vocab-llama-spm.gguf");
    let tok = tokenizers::Tokenizer::from_file(&path).unwrap();
    let text = "### Instruction:\nSay hi.\n\n### Response:\nHi — ünïcödé 🦙";
    let enc = tok.encode(text, true).unwrap();
    assert_eq!(enc.get_ids()[0], 1, "BOS first");
    assert_eq!(tok.decode(enc.get_ids(), true).unwrap(), text);
}

#[test]
fn llama3_bpe_conversion_passes_every_llama_cpp_vector() {
    check_all("ggml-vocab-llama-bpe.gguf");
}
