//! Hostile run configs: seeded mutations of every preset's TOML (huge, negative and zero
//! integers, NaN and infinite floats, wrong types, unknown keys, deep nesting, truncation)
//! through `TrainConfig::from_toml` + `validate`, and hostile `--set` values through
//! `ConfigSource::resolve`. Each must end in `Ok` with a config inside every limit, or in an
//! error naming the file or the key, and never in a panic.
//!
//! The case count is 300 per test unless `LORASFT_FUZZ_CASES` says otherwise.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use lorasft::data::encode::{Encoder, MAX_LEN_LIMIT, Padding};
use lorasft::error::Result;
use lorasft::generate::MAX_NEW_TOKENS_LIMIT;
use lorasft::train::config::{
    ConfigSource, MAX_BATCH, MAX_COUNT, MAX_LORA_R, PRESETS, TrainConfig,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

mod common;

/// Cases per fuzz test: `LORASFT_FUZZ_CASES`, default 300.
fn cases() -> u32 {
    common::fuzz_cases(300)
}

/// A runner with a fixed seed: the same cases on every machine.
fn runner() -> TestRunner {
    let config = Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    };
    TestRunner::new_with_rng(config, TestRng::deterministic_rng(RngAlgorithm::ChaCha))
}

/// Values that break counts, floats, strings and enums.
const HOSTILE: &[&str] = &[
    "0",
    "1",
    "-1",
    "-9223372036854775808",
    "4611686018427387904",
    "1152921504606846976",
    "9223372036854775807",
    "18446744073709551615",
    "99999999999999999999999",
    "1048577",
    "65537",
    "1000000001",
    "nan",
    "+inf",
    "-inf",
    "-0.0",
    "1e308",
    "5e-324",
    "0.0",
    "1.0",
    "2.5",
    "true",
    "\"\"",
    "\"bogus\"",
    "\"..\"",
    "\"a/b\"",
    "\"\\u0000\"",
    "[]",
    "[1, \"a\"]",
    "{}",
    "{ mode = \"bogus\" }",
    "{ count = 0 }",
    "{ fraction = 1.0 }",
    "{ fraction = nan }",
    "{ ratio = -1 }",
    "{ steps = 18446744073709551615 }",
    "1979-05-27T07:32:00Z",
];

/// Keys worth hitting directly with `--set`.
const KEYS: &[&str] = &[
    "run.name",
    "run.out_dir",
    "run.seed",
    "run.device",
    "run.precision",
    "model.source",
    "model.tokenizer",
    "model.init_adapter",
    "data.path",
    "data.validation",
    "data.validation.count",
    "data.validation.fraction",
    "data.shuffle",
    "data.max_records",
    "encode.max_len",
    "encode.padding",
    "encode.padding.mode",
    "encode.padding.multiple_of",
    "encode.padding_side",
    "encode.labels",
    "encode.eos",
    "lora.r",
    "lora.alpha",
    "lora.dropout",
    "lora.targets",
    "lora.use_rslora",
    "optim.lr",
    "optim.schedule",
    "optim.warmup",
    "optim.warmup.steps",
    "optim.warmup.ratio",
    "optim.max_grad_norm",
    "optim.adamw.beta1",
    "optim.adamw.beta2",
    "optim.adamw.eps",
    "optim.adamw.weight_decay",
    "train.batch_size",
    "train.grad_accum",
    "train.max_steps",
    "train.epochs",
    "train.log_every",
    "train.eval_every",
    "train.save_every",
    "generate.max_new_tokens",
    "generate.sampling",
    "generate.sampling.temperature",
    "generate.sampling.top_p",
    "generate.seed",
    "prompts",
    "bogus",
    "train.bogus",
    "",
    ".",
    "train..batch_size",
];

/// The error names the file or a config key (the top-level tables, `--set`, or an override).
fn names_what_is_wrong(msg: &str, path: &str) -> bool {
    const NAMES: &[&str] = &[
        "run.",
        "model.",
        "data.",
        "encode.",
        "lora.",
        "optim.",
        "train.",
        "generate.",
        "--set",
        "override",
        "preset",
    ];
    msg.contains(path) || NAMES.iter().any(|n| msg.contains(n))
}

/// A config that validated lies inside every limit, round-trips through TOML, and builds an
/// encoder.
fn assert_sane(cfg: &TrainConfig) {
    let t = &cfg.train;
    assert!((1..=MAX_BATCH).contains(&t.batch_size), "{t:?}");
    assert!((1..=MAX_BATCH).contains(&t.grad_accum), "{t:?}");
    assert!(t.max_steps.is_none_or(|n| (1..=MAX_COUNT).contains(&n)));
    assert!((1..=MAX_COUNT).contains(&t.epochs));
    assert!(cfg.data.max_records != Some(0));
    assert!((2..=MAX_LEN_LIMIT).contains(&cfg.encode.max_len));
    if let Padding::Longest {
        multiple_of: Some(m),
    } = cfg.encode.padding
    {
        assert!((1..=cfg.encode.max_len).contains(&m));
    }
    assert!((1..=MAX_LORA_R).contains(&cfg.lora.r));
    assert!(cfg.lora.alpha.is_finite() && cfg.lora.alpha > 0.0);
    assert!(cfg.optim.lr.is_finite() && cfg.optim.max_grad_norm.is_finite());
    assert!(cfg.generate.max_new_tokens <= MAX_NEW_TOKENS_LIMIT);
    let text = cfg.to_toml().expect("a valid config writes as TOML");
    let back: TrainConfig = toml::from_str(&text).expect("and reads back");
    assert_eq!(&back, cfg);
    Encoder::from_file(&common::fixture_tokenizer(), cfg.encode.clone())
        .expect("a validated encoding builds an encoder");
}

/// Runs `f` and turns a panic into a test failure that shows the input.
fn no_panic<T>(input: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let what = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let shown: String = input.chars().take(2000).collect();
            panic!("panicked ({what}) on input:\n{shown}");
        }
    }
}

/// One mutation of a TOML text.
#[derive(Debug, Clone)]
enum Mutation {
    /// Replace the value of the n-th `key = value` line.
    Value(usize, &'static str),
    /// Cut the text at a share of its length.
    Truncate(f64),
    /// Add a line (unknown key, duplicate or deep table) after the n-th line.
    Insert(usize, String),
    /// Delete the n-th line.
    Delete(usize),
}

fn deep(n: usize, open: &str, close: &str, inner: &str) -> String {
    format!("{}{inner}{}", open.repeat(n), close.repeat(n))
}

fn inserted_line() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("bogus = 1".to_string()),
        Just("[bogus]".to_string()),
        Just("[train]".to_string()),
        Just("batch_size = 0".to_string()),
        (1usize..3000).prop_map(|n| format!("x = {}", deep(n, "[", "]", ""))),
        (1usize..3000).prop_map(|n| format!("x = {}", deep(n, "{a=", "}", "1"))),
        (1usize..3000).prop_map(|n| format!("[{}]", vec!["a"; n].join("."))),
        (1usize..3000).prop_map(|n| format!("{} = 1", vec!["train"; n].join("."))),
        Just(format!("name = \"{}\"", "x".repeat(100_000))),
        Just("\u{0}\u{feff}\u{fffd} = 1".to_string()),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        6 => (0usize..200, prop::sample::select(HOSTILE)).prop_map(|(i, v)| Mutation::Value(i, v)),
        1 => (0.0f64..1.0).prop_map(Mutation::Truncate),
        2 => (0usize..200, inserted_line()).prop_map(|(i, l)| Mutation::Insert(i, l)),
        1 => (0usize..200).prop_map(Mutation::Delete),
    ]
}

fn apply(text: &str, m: &Mutation) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let n = lines.len().max(1);
    match m {
        Mutation::Value(i, v) => {
            let keyed: Vec<usize> = (0..lines.len())
                .filter(|&j| lines[j].contains(" = "))
                .collect();
            if let Some(&j) = keyed.get(i % keyed.len().max(1)) {
                let key = lines[j].split(" = ").next().unwrap_or("").to_string();
                lines[j] = format!("{key} = {v}");
            }
        }
        Mutation::Truncate(f) => {
            let mut cut = (text.len() as f64 * f) as usize;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            return text[..cut].to_string();
        }
        Mutation::Insert(i, l) => lines.insert((i % n).min(lines.len()), l.clone()),
        Mutation::Delete(i) => {
            if !lines.is_empty() {
                lines.remove(i % n);
            }
        }
    }
    lines.join("\n") + "\n"
}

#[test]
fn mutated_preset_toml_validates_or_names_the_file_or_key_and_never_panics() {
    let path = Path::new("fuzz/config.toml");
    let strategy = (
        prop::sample::select(PRESETS.to_vec()),
        prop::sample::select(PRESETS.to_vec()),
        prop::collection::vec(mutation(), 1..4),
    );
    let (ok, refused) = (Cell::new(0usize), Cell::new(0usize));
    runner()
        .run(&strategy, |(text_preset, base_preset, mutations)| {
            let mut text = TrainConfig::preset(text_preset).unwrap().to_toml().unwrap();
            for m in &mutations {
                text = apply(&text, m);
            }
            let base = TrainConfig::preset(base_preset).unwrap();
            let result = no_panic(&text, || {
                let cfg = TrainConfig::from_toml(&text, base, path)?;
                cfg.validate()?;
                Ok(cfg)
            });
            match result {
                Ok(cfg) => {
                    assert_sane(&cfg);
                    ok.set(ok.get() + 1);
                }
                Err(e) => {
                    let msg = e.to_string();
                    prop_assert!(
                        names_what_is_wrong(&msg, "fuzz/config.toml"),
                        "the error names neither the file nor a key: {msg}\n{mutations:?}"
                    );
                    refused.set(refused.get() + 1);
                }
            }
            Ok(())
        })
        .unwrap();
    let (ok, refused) = (ok.get(), refused.get());
    eprintln!("{} TOML cases: {ok} valid, {refused} refused", ok + refused);
    assert!(
        refused > 0,
        "no mutation was refused: the fuzzer is not biting"
    );
}

#[test]
fn hostile_set_values_validate_or_name_the_key_and_never_panic() {
    let value = prop_oneof![
        4 => prop::sample::select(HOSTILE).prop_map(str::to_string),
        1 => (1usize..2000).prop_map(|n| deep(n, "[", "]", "")),
        1 => (1usize..2000).prop_map(|n| deep(n, "{a=", "}", "1")),
        1 => "\\PC{0,40}",
    ];
    let key = prop_oneof![
        6 => prop::sample::select(KEYS).prop_map(str::to_string),
        1 => (1usize..3000).prop_map(|n| vec!["train"; n].join(".")),
        1 => "[a-z_.]{0,30}",
    ];
    let strategy = (
        prop::sample::select(PRESETS.to_vec()),
        prop::collection::vec((key, value), 1..4),
        any::<bool>(),
    );
    let (ok, refused) = (Cell::new(0usize), Cell::new(0usize));
    runner()
        .run(&strategy, |(preset, sets, no_equals)| {
            let mut set: Vec<String> = sets.iter().map(|(k, v)| format!("{k}={v}")).collect();
            if no_equals {
                set.push(sets[0].0.clone());
            }
            let src = ConfigSource {
                preset: preset.to_string(),
                set: set.clone(),
                ..ConfigSource::default()
            };
            match no_panic(&set.join("\n"), || src.resolve()) {
                Ok(cfg) => {
                    assert_sane(&cfg);
                    ok.set(ok.get() + 1);
                }
                Err(e) => {
                    let msg = e.to_string();
                    prop_assert!(
                        names_what_is_wrong(&msg, "--set"),
                        "the error names no key: {msg}"
                    );
                    refused.set(refused.get() + 1);
                }
            }
            Ok(())
        })
        .unwrap();
    let (ok, refused) = (ok.get(), refused.get());
    eprintln!(
        "{} --set cases: {ok} valid, {refused} refused",
        ok + refused
    );
    assert!(refused > 0 && ok > 0, "{ok} valid, {refused} refused");
}

/// The four panics issue 13 measured, each refused by name now.
#[test]
fn measured_panics_are_refused_naming_the_key_and_range() {
    for (set, expect) in [
        ("data.max_records=0", "data.max_records must be at least 1"),
        (
            "train.grad_accum=1152921504606846976",
            "train.grad_accum must be in 1..=65536",
        ),
        (
            "encode.padding.multiple_of=4611686018427387904",
            "encode.padding.multiple_of (--pad-to-multiple-of) must be in 1..=128",
        ),
        (
            "train.batch_size=4611686018427387904",
            "train.batch_size must be in 1..=65536",
        ),
        (
            "encode.max_len=4611686018427387904",
            "encode.max_len (--max-len) must be in 2..=1048576",
        ),
        (
            "generate.max_new_tokens=4611686018427387904",
            "generate.max_new_tokens",
        ),
        ("lora.r=5000", "lora.r must be in 1..=4096"),
        ("train.epochs=0", "train.epochs must be in 1..=1000000000"),
        ("optim.lr=nan", "optim.lr must be a finite number"),
    ] {
        let src = ConfigSource {
            preset: "smoke".into(),
            set: vec![set.into()],
            ..ConfigSource::default()
        };
        let err = no_panic(set, || src.resolve()).expect_err(set).to_string();
        assert!(err.contains(expect), "{set}: {err}");
    }
}

/// An encoder built directly (not through a config) still refuses a multiple that would
/// overflow the padded length, instead of panicking on a capacity overflow in `collate`.
#[test]
fn an_encoder_refuses_a_huge_pad_multiple_instead_of_panicking_in_collate() {
    let records = common::fixture_records();
    for m in [1usize << 62, usize::MAX] {
        let cfg = lorasft::data::encode::EncodeConfig {
            max_len: 64,
            padding: Padding::Longest {
                multiple_of: Some(m),
            },
            ..Default::default()
        };
        let result = no_panic("multiple_of", || {
            let enc = Encoder::from_file(&common::fixture_tokenizer(), cfg)?;
            let ex = enc.encode_record(&records[0])?;
            Ok(enc.collate(&[&ex]).len())
        });
        let err = result.expect_err("refused").to_string();
        assert!(err.contains("encode.padding.multiple_of"), "{err}");
    }
}

/// Each preset's printed config, as `--dry-run` prints it and a run records it.
fn printed(preset: &str) -> String {
    TrainConfig::preset(preset).unwrap().to_toml().unwrap()
}

/// `text` written to a file and resolved over `preset` (with `set` on top), as
/// `lorasft train --preset PRESET --config FILE --set ...` does.
fn resolve_file(text: &str, preset: &str, set: &[&str]) -> Result<TrainConfig> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.toml");
    std::fs::write(&path, text).unwrap();
    ConfigSource {
        preset: preset.into(),
        file: Some(path),
        set: set.iter().map(|s| s.to_string()).collect(),
        ..ConfigSource::default()
    }
    .resolve()
}

#[test]
fn every_printed_preset_laid_over_every_preset_resolves_to_itself() {
    for p in PRESETS {
        let want = TrainConfig::preset(p).unwrap();
        for q in PRESETS {
            let got = resolve_file(&printed(p), q, &[]).unwrap();
            assert_eq!(got, want, "{p}'s printed config over preset {q}");
            assert_eq!(got.to_toml().unwrap(), printed(p), "{p} over {q}, as TOML");
        }
    }
}

/// A whole file is the config: an optional key it leaves out is unset, whatever the preset
/// under it sets (here `train.max_steps` and `data.format`).
#[test]
fn a_whole_file_without_an_optional_key_leaves_it_unset() {
    let text: String = printed("smoke")
        .lines()
        .filter(|l| !l.starts_with("max_steps ="))
        .map(|l| format!("{l}\n"))
        .collect();
    let got = resolve_file(&text, "smollm2-chat", &[]).unwrap();
    let mut want = TrainConfig::smoke();
    want.train.max_steps = None;
    assert_eq!(got, want);
    assert_eq!(
        got.data.format, None,
        "smollm2-chat's sharegpt does not show through"
    );
}

#[test]
fn a_partial_file_replaces_variant_tables_whole_and_merges_sections_key_by_key() {
    let fraction = "[data.validation]\nfraction = 0.1\n";
    for preset in PRESETS {
        let got = resolve_file(fraction, preset, &[]).unwrap();
        let mut want = TrainConfig::preset(preset).unwrap();
        want.data.validation = lorasft::data::dataset::SplitSpec::Fraction(0.1);
        assert_eq!(got, want, "a fraction over {preset}");
    }
    let count = resolve_file("[data.validation]\ncount = 7\n", "day2", &[]).unwrap();
    assert_eq!(
        count.data.validation,
        lorasft::data::dataset::SplitSpec::Count(7),
        "a count over day2's fraction"
    );
    // smoke pads to the longest row rounded to 8; a file naming `longest` alone means no
    // multiple, not smoke's 8 kept underneath.
    let longest = resolve_file("[encode.padding]\nmode = \"longest\"\n", "smoke", &[]).unwrap();
    assert_eq!(
        longest.encode.padding,
        Padding::Longest { multiple_of: None }
    );
    let text = "[train]\nmax_steps = 5\n[optim.adamw]\nweight_decay = 0.1\n";
    let got = resolve_file(text, "smoke", &[]).unwrap();
    let mut want = TrainConfig::smoke();
    want.train.max_steps = Some(5);
    want.optim.adamw.weight_decay = 0.1;
    assert_eq!(got, want, "sections keep the keys the file does not give");
}

#[test]
fn set_and_typed_flags_still_apply_on_top_of_a_config_file() {
    let got = resolve_file(
        &printed("smollm2-demo"),
        "smoke",
        &["optim.lr=5e-4", "data.validation={fraction=0.2}"],
    )
    .unwrap();
    let mut want = TrainConfig::smollm2_demo();
    want.optim.lr = 5e-4;
    want.data.validation = lorasft::data::dataset::SplitSpec::Fraction(0.2);
    assert_eq!(got, want);
    let partial = resolve_file("[optim]\nlr = 0.5\n", "smoke", &["optim.lr=0.25"]).unwrap();
    assert_eq!(partial.optim.lr, 0.25, "--set wins over the file");
}

/// Every table a preset prints is either a section (merged key by key) or a value that a
/// partial file replaces whole; a new table must be put on one side on purpose.
#[test]
fn every_printed_table_is_a_section_or_a_known_value_table() {
    use lorasft::train::config::SECTIONS;
    const VALUE_TABLES: [&str; 5] = [
        "data.validation",
        "data.columns",
        "encode.padding",
        "optim.warmup",
        "generate.sampling",
    ];
    fn walk(t: &toml::Table, at: &str, out: &mut Vec<String>) {
        for (k, v) in t {
            if let toml::Value::Table(inner) = v {
                let path = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                walk(inner, &path, out);
                out.push(path);
            }
        }
    }
    for p in PRESETS {
        let mut tables = Vec::new();
        let mut cfg = TrainConfig::preset(p).unwrap();
        cfg.data
            .columns
            .insert("instruction".into(), "question".into());
        walk(&toml::Table::try_from(&cfg).unwrap(), "", &mut tables);
        for t in &tables {
            assert!(
                SECTIONS.contains(&t.as_str()) ^ VALUE_TABLES.contains(&t.as_str()),
                "preset {p}: table `{t}` must be in exactly one of SECTIONS and VALUE_TABLES"
            );
        }
        for s in SECTIONS {
            assert!(
                tables.iter().any(|t| t == s),
                "SECTIONS names `{s}`, which {p} lacks"
            );
        }
    }
}
