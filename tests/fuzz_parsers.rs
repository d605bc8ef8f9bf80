//! Mutation fuzzing of every file parser (issue 13: hostile inputs never crash lorasft).
//!
//! One proptest per parser: GGUF (`gguf::Gguf::parse`, `gguf_import::import_tensors`,
//! `tokenizer::from_gguf`), safetensors headers (`model::load::load_model`, `adapter::load`),
//! `config.json` (`LlamaConfig::from_file`), `adapter_config.json` (`adapter::read_config`),
//! `tokenizer.json` (`tokenizer::load`, `Encoder::from_file`), datasets in JSON and JSONL
//! (`data::dataset::load`) and chat templates (`chat::ChatTemplate`, compiled, rendered and
//! spanned under their fuel bound). Each starts from real and fixture inputs (for GGUF, also a Q4_K_M
//! file `export-gguf` writes) and applies seeded
//! truncations, bit flips, byte insertions, huge length and size fields and deep nesting.
//! Every call runs under `catch_unwind`: a panic fails the test, and a stack overflow would
//! abort the whole binary, so a passing run also shows there is none. Each parser may return
//! `Ok` or `Err`, never anything else.
//!
//! Allocation bounds are not measured in-process: a mutated length or count field must give
//! an error, and that it does so before allocating (more than a few MiB, far under 64 MiB)
//! rests on the parsers' explicit checks against the bytes the file holds (`gguf/mod.rs`, and
//! `gguf/tensor.rs` before candle reads tensor data), on the
//! safetensors crate's header checks, and on `config.json`'s size limits. An allocation that
//! slipped past them would abort the binary, which fails the run as well.
//!
//! Each test runs `LORASFT_FUZZ_CASES` cases (200 by default) from the seed
//! `LORASFT_FUZZ_SEED` (a fixed one by default), and prints how many it ran.

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

use common::gguf_writer::{Meta, fixture_meta, fixture_tensors, gguf_bytes};
use lorasft::model::fixture::FixtureSpec;
use lorasft::model::load::ModelSource;

/// Cases per parser: `LORASFT_FUZZ_CASES`, else 200.
fn cases() -> u32 {
    common::fuzz_cases(200)
}

/// The runner's seed: `LORASFT_FUZZ_SEED`, else a fixed one, so CI runs the same cases.
fn rng() -> TestRng {
    let seed: u64 = std::env::var("LORASFT_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(13);
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    TestRng::from_seed(RngAlgorithm::ChaCha, &bytes)
}

/// One change to an input.
#[derive(Debug, Clone)]
enum Mutation {
    /// Cut the input at a position.
    Truncate(Index),
    /// Flip one bit in the structural prefix.
    FlipBit(Index, u8),
    /// Insert random bytes in the structural prefix.
    Insert(Index, Vec<u8>),
    /// Overwrite bytes in the structural prefix with a dictionary token (a huge length or
    /// count for binary formats, an extreme number or odd token for JSON).
    Token(Index, Index),
    /// Insert the format's nesting unit this many times.
    Nest(Index, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        2 => any::<Index>().prop_map(Mutation::Truncate),
        4 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        2 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(i, v)| Mutation::Insert(i, v)),
        4 => (any::<Index>(), any::<Index>()).prop_map(|(i, t)| Mutation::Token(i, t)),
        1 => (any::<Index>(), prop::sample::select(vec![9usize, 200, 100_000]))
            .prop_map(|(i, d)| Mutation::Nest(i, d)),
    ]
}

/// Huge and boundary values as little-endian u64 and u32, for length and count fields.
fn binary_tokens() -> Vec<Vec<u8>> {
    let mut t: Vec<Vec<u8>> = [
        u64::MAX,
        1 << 63,
        1 << 62,
        1 << 40,
        1 << 32,
        1 << 31,
        0,
        1,
        9,
    ]
    .iter()
    .map(|v: &u64| v.to_le_bytes().to_vec())
    .collect();
    t.extend(
        [u32::MAX, 1 << 31, 0x7fff_ffff, 0, 9]
            .iter()
            .map(|v: &u32| v.to_le_bytes().to_vec()),
    );
    t
}

/// Extreme numbers and odd tokens for JSON.
fn json_tokens() -> Vec<Vec<u8>> {
    [
        "1000000000000",
        "18446744073709551615",
        "18446744073709551616",
        "-1",
        "0",
        "1e400",
        "null",
        "true",
        "\"\"",
        "[]",
        "{}",
        "\"qkv\"",
        "\"\\ud800\"",
        "\u{feff}",
        "\u{0}",
        "\n",
        ",",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .chain([vec![0xff, 0xfe]])
    .collect()
}

/// An input to mutate.
struct Seed {
    /// For messages.
    name: String,
    /// The bytes.
    bytes: Vec<u8>,
    /// How many leading bytes hold structure (a header) rather than bulk data.
    hot: usize,
    /// Tokens for [`Mutation::Token`].
    tokens: Vec<Vec<u8>>,
    /// The unit [`Mutation::Nest`] repeats.
    nest: Vec<u8>,
}

impl Seed {
    fn binary(name: &str, bytes: Vec<u8>, hot: usize, nest: Vec<u8>) -> Self {
        Seed {
            name: name.into(),
            hot: hot.min(bytes.len()),
            bytes,
            tokens: binary_tokens(),
            nest,
        }
    }

    fn json(name: &str, bytes: Vec<u8>) -> Self {
        Seed {
            name: name.into(),
            hot: bytes.len(),
            bytes,
            tokens: json_tokens(),
            nest: b"[".to_vec(),
        }
    }

    /// The seed's bytes with `muts` applied in order.
    fn mutate(&self, muts: &[Mutation]) -> Vec<u8> {
        let mut b = self.bytes.clone();
        for m in muts {
            let hot = self.hot.min(b.len()).max(1);
            match m {
                Mutation::Truncate(i) => b.truncate(i.index(b.len() + 1)),
                Mutation::FlipBit(i, bit) if !b.is_empty() => b[i.index(hot)] ^= 1 << bit,
                Mutation::FlipBit(..) => {}
                Mutation::Insert(i, v) => {
                    let at = i.index(hot + 1).min(b.len());
                    b.splice(at..at, v.iter().copied());
                }
                Mutation::Token(i, t) => {
                    let tok = &self.tokens[t.index(self.tokens.len())];
                    let at = i.index(hot + 1).min(b.len());
                    let end = (at + tok.len()).min(b.len());
                    b.splice(at..end, tok.iter().copied());
                }
                Mutation::Nest(i, depth) => {
                    let at = i.index(hot + 1).min(b.len());
                    b.splice(at..at, self.nest.repeat(*depth));
                }
            }
        }
        b
    }
}

/// The text of a caught panic.
fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(non-text panic)".into())
}

/// Runs `cases()` mutated inputs through `check`, failing on any panic; returns the count.
fn fuzz(parser: &str, seeds: &[Seed], check: impl Fn(&Seed, &[u8])) -> u32 {
    let config = Config {
        cases: cases(),
        failure_persistence: None,
        max_shrink_iters: 256,
        ..Config::default()
    };
    let mut runner = TestRunner::new_with_rng(config, rng());
    let ran = std::cell::Cell::new(0u32);
    let strategy = (0..seeds.len(), prop::collection::vec(mutation(), 1..=4));
    let result = runner.run(&strategy, |(i, muts)| {
        ran.set(ran.get() + 1);
        let seed = &seeds[i];
        let bytes = seed.mutate(&muts);
        catch_unwind(AssertUnwindSafe(|| check(seed, &bytes))).map_err(|p| {
            TestCaseError::fail(format!(
                "{parser} panicked on a mutated `{}` ({muts:?}): {}",
                seed.name,
                panic_text(p)
            ))
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    eprintln!("fuzz {parser}: {} cases ({} seeds)", ran.get(), seeds.len());
    ran.get()
}

/// A temp dir and the path of `name` in it.
fn scratch(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join(name);
    (tmp, p)
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}

fn root(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// GGUF's nesting unit: an array (type 9) of one element, whose type is the next unit's.
fn gguf_nest() -> Vec<u8> {
    let mut u = 9u32.to_le_bytes().to_vec();
    u.extend(1u64.to_le_bytes());
    u
}

/// The GGUF seeds: a synthetic Llama with a small SentencePiece vocabulary and a nested
/// array; and, when the real assets are present, the real SmolLM2 header and two llama.cpp
/// vocabulary files.
fn gguf_seeds() -> Vec<Seed> {
    let strs = |v: Vec<String>| Meta::Array(v.into_iter().map(Meta::Str).collect());
    let tokens: Vec<String> = ["<unk>", "<s>", "</s>", "▁", "a", "b", "ab", "▁ab"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let n = tokens.len();
    let mut meta = fixture_meta();
    meta.extend([
        ("tokenizer.ggml.model", Meta::Str("llama".into())),
        ("tokenizer.ggml.tokens", strs(tokens)),
        (
            "tokenizer.ggml.scores",
            Meta::Array((0..n).map(|i| Meta::F32(-(i as f32))).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            Meta::Array(
                (0..n)
                    .map(|i| Meta::I32(if i < 3 { 3 } else { 1 }))
                    .collect(),
            ),
        ),
        (
            "nested",
            (0..6).fold(Meta::Array(vec![Meta::U32(1)]), |m, _| Meta::Array(vec![m])),
        ),
    ]);
    let synthetic = gguf_bytes(&meta, &fixture_tensors(5));
    let header = header_len(&synthetic);
    let mut seeds = vec![Seed::binary(
        "synthetic.gguf",
        synthetic,
        header,
        gguf_nest(),
    )];
    let kquant = kquant_seed();
    let header = header_len(&kquant);
    seeds.push(Seed::binary("kquant.gguf", kquant, header, gguf_nest()));
    if let Some(assets) = common::assets() {
        for rel in [
            "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "vocab/ggml-vocab-llama-spm.gguf",
            "vocab/ggml-vocab-gpt-2.gguf",
        ] {
            let bytes = header_prefix(&assets.join(rel));
            let hot = bytes.len();
            seeds.push(Seed::binary(rel, bytes, hot, gguf_nest()));
        }
    }
    seeds
}

/// A Q4_K_M file as `export-gguf` writes it (K-quant, Q6_K and F32 tensors), from a one-layer
/// fixture whose rows are whole 256-blocks: seeds the tensor-type and block checks.
fn kquant_seed() -> Vec<u8> {
    use lorasft::export::{ExportType, write_gguf};
    let spec = lorasft::model::fixture::FixtureSpec {
        hidden: 256,
        intermediate: 256,
        layers: 1,
        heads: 2,
        kv_heads: 1,
        vocab: 256,
        ..Default::default()
    };
    let model = spec
        .build(2, candle_core::DType::F32, &candle_core::Device::Cpu)
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("kquant.gguf");
    write_gguf(
        &model,
        &spec.config(),
        "seed",
        Vec::new(),
        ExportType::Q4KM,
        &path,
        lorasft::progress::Mode::Quiet,
    )
    .unwrap();
    std::fs::read(&path).unwrap()
}

/// Where a GGUF's data section starts.
fn header_len(bytes: &[u8]) -> usize {
    let g = lorasft::gguf::Gguf::parse(Path::new("seed.gguf"), bytes.to_vec()).unwrap();
    g.data_offset()
}

/// The header of a real GGUF file (metadata and tensor directory, without tensor data).
fn header_prefix(path: &Path) -> Vec<u8> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .unwrap()
        .take(8 << 20)
        .read_to_end(&mut bytes)
        .unwrap();
    let keep = header_len(&bytes).min(bytes.len());
    bytes.truncate(keep);
    bytes
}

#[test]
fn fuzz_gguf_reader_import_and_vocabulary() {
    let seeds = gguf_seeds();
    let (_tmp, dir) = scratch("gguf");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("mutated.gguf");
    let out = dir.join("hf");
    let n = fuzz("gguf", &seeds, |seed, bytes| {
        let Ok(g) = lorasft::gguf::Gguf::parse(Path::new(&seed.name), bytes.to_vec()) else {
            return;
        };
        let _ = lorasft::model::gguf_import::import_tensors(&g);
        let _ = lorasft::tokenizer::from_gguf::tokenizer_json(&g);
        let _ = lorasft::tokenizer::from_gguf::tokenizer_config(&g);
        if seed.name == "synthetic.gguf" || seed.name == "kquant.gguf" {
            // The whole command, writing files and loading the tokenizer it converts.
            write(&file, bytes);
            let _ = lorasft::model::gguf_import::import(&file, &out);
            let _ = std::fs::remove_dir_all(&out);
        }
    });
    assert_eq!(n, cases());
}

/// Safetensors headers hold JSON after a u64 length: both kinds of tokens apply.
fn safetensors_seed(name: &str, bytes: Vec<u8>) -> Seed {
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut seed = Seed::binary(name, bytes, 8 + header, b"[".to_vec());
    seed.tokens.extend(json_tokens());
    seed
}

#[test]
fn fuzz_safetensors_headers_of_models_and_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let (model_dir, adapter_dir) = (tmp.path().join("model"), tmp.path().join("adapter"));
    let spec = FixtureSpec::default();
    spec.write(6, &model_dir).unwrap();
    let mut model = spec.build(6, DType::F32, &Device::Cpu).unwrap();
    model
        .add_lora(&lorasft::model::LoraConfig::default(), 0)
        .unwrap();
    lorasft::adapter::save(&model, &adapter_dir, "base", "").unwrap();
    let read = |p: PathBuf| std::fs::read(p).unwrap();
    let seeds = [
        safetensors_seed(
            "model.safetensors",
            read(model_dir.join("model.safetensors")),
        ),
        safetensors_seed(
            "adapter_model.safetensors",
            read(adapter_dir.join("adapter_model.safetensors")),
        ),
    ];
    let model = std::cell::RefCell::new(model);
    let n = fuzz("safetensors", &seeds, |seed, bytes| {
        if seed.name == "model.safetensors" {
            write(&model_dir.join(&seed.name), bytes);
            let src = ModelSource::Dir(model_dir.clone());
            let _ = lorasft::model::load::load_model(&src, DType::F32, &Device::Cpu);
        } else {
            write(&adapter_dir.join(&seed.name), bytes);
            let _ = lorasft::adapter::load(&mut model.borrow_mut(), &adapter_dir);
        }
    });
    assert_eq!(n, cases());
}

#[test]
fn fuzz_model_config_json() {
    let fixture = serde_json::to_vec_pretty(&FixtureSpec::default().config()).unwrap();
    let seeds = [
        Seed::json("fixture config.json", fixture),
        Seed::json(
            "tinyllama config.json",
            std::fs::read(root("fixtures/tinyllama-1.1b-chat/config.json")).unwrap(),
        ),
    ];
    let (_tmp, path) = scratch("config.json");
    let n = fuzz("config.json", &seeds, |_, bytes| {
        write(&path, bytes);
        if let Ok(cfg) = lorasft::model::LlamaConfig::from_file(&path) {
            let shape = cfg.shape().expect("a config that loads has a shape");
            let _ = shape.base_params();
        }
    });
    assert_eq!(n, cases());
}

#[test]
fn fuzz_adapter_config_json() {
    let ours = lorasft::adapter::AdapterConfig::from_lora(&Default::default(), "base");
    let seeds = [
        Seed::json(
            "lorasft adapter_config.json",
            serde_json::to_vec_pretty(&ours).unwrap(),
        ),
        Seed::json(
            "peft adapter_config.json",
            std::fs::read(root("fixtures/peft-adapter_config.json")).unwrap(),
        ),
    ];
    let (tmp, path) = scratch("adapter_config.json");
    let n = fuzz("adapter_config.json", &seeds, |_, bytes| {
        write(&path, bytes);
        let _ = lorasft::adapter::read_config(tmp.path());
    });
    assert_eq!(n, cases());
}

#[test]
fn fuzz_tokenizer_json() {
    let seeds = [Seed::json(
        "fixtures/tokenizer.json",
        std::fs::read(common::fixture_tokenizer()).unwrap(),
    )];
    let record = common::fixture_records().swap_remove(0);
    let (_tmp, path) = scratch("tokenizer.json");
    let n = fuzz("tokenizer.json", &seeds, |_, bytes| {
        write(&path, bytes);
        let _ = lorasft::tokenizer::load(&path);
        let cfg = lorasft::data::EncodeConfig::default();
        if let Ok(enc) = lorasft::data::Encoder::from_file(&path, cfg) {
            let _ = enc.encode_record(&record);
        }
    });
    assert_eq!(n, cases());
}

#[test]
fn fuzz_dataset_json_and_jsonl() {
    let json = std::fs::read(root("fixtures/instructions.json")).unwrap();
    let records: Vec<serde_json::Value> = serde_json::from_slice(&json).unwrap();
    let jsonl: String = records.iter().map(|r| format!("{r}\n")).collect();
    let seeds = [
        Seed::json("instructions.json", json),
        Seed::json("instructions.jsonl", jsonl.into_bytes()),
    ];
    let tmp = tempfile::tempdir().unwrap();
    let n = fuzz("dataset", &seeds, |seed, bytes| {
        let path = tmp.path().join(&seed.name);
        write(&path, bytes);
        let _ = lorasft::data::dataset::load(&path);
    });
    assert_eq!(n, cases());
}

/// Jinja pieces for [`Mutation::Token`] on chat templates: tags, loops, filters and the
/// `{% generation %}` markers, placed where a mutation lands.
fn jinja_tokens() -> Vec<Vec<u8>> {
    [
        "{%",
        "%}",
        "{{",
        "}}",
        "{#",
        "#}",
        "{%-",
        "-%}",
        "{% generation %}",
        "{% endgeneration %}",
        "{% for m in messages %}",
        "{% endfor %}",
        "{% if tools %}",
        "{% endif %}",
        "{{ tools|tojson(indent=2) }}",
        "{{ messages|map(attribute='role')|list }}",
        "{{ raise_exception('x') }}",
        "{% set ns = namespace(a=1) %}",
        "{{ ns.a }}",
        "{{ m.content.strip().split('x') }}",
        "{% break %}",
        "{{ 'x' * 100000 }}",
        "\u{10FFFD}",
        "{{ strftime_now('%Y') }}",
        "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    ]
    .iter()
    .map(|t| t.as_bytes().to_vec())
    .collect()
}

#[test]
fn fuzz_chat_templates() {
    const CHATML: &str = "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
    let seed = |name: &str, text: String| Seed {
        name: name.into(),
        hot: text.len(),
        bytes: text.into_bytes(),
        tokens: jinja_tokens(),
        nest: b"{% if true %}{% for x in messages %}".to_vec(),
    };
    let mut seeds = vec![seed("chatml", CHATML.into())];
    if let Some(assets) = common::assets() {
        for f in [
            "meta-llama-Llama-3.1-8B-Instruct.jinja",
            "Qwen-Qwen3-0.6B.jinja",
            "LFM2.5-8B-A1B.jinja",
            "google-gemma-2-2b-it.jinja",
        ] {
            let text = std::fs::read_to_string(assets.join("chat/templates").join(f)).unwrap();
            seeds.push(seed(f, text));
        }
    }
    let conv: lorasft::chat::Conversation = serde_json::from_value(serde_json::json!({
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi {{ x }} <|im_end|>"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"type": "function", "function": {"name": "get", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."}
        ],
        "tools": [{"type": "function", "function": {"name": "get", "parameters": {}}}]
    }))
    .unwrap();
    let opts = lorasft::chat::RenderOptions::new("<s>", "</s>");
    let n = fuzz("chat template", &seeds, |seed, bytes| {
        let Ok(text) = std::str::from_utf8(bytes) else {
            return;
        };
        if let Ok(t) = lorasft::chat::ChatTemplate::new(seed.name.as_str(), text) {
            let _ = t.render(&conv, &opts.with_generation_prompt(true));
            let _ = lorasft::chat::spans::spanned_render(&t, &conv, &opts);
        }
    });
    assert_eq!(n, cases());
}
