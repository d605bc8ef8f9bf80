//! The `lorasft` binary: fixtures and `inspect`.

use std::process::Command;

mod common;

use common::lorasft;

#[test]
fn inspect_config_only_prints_peft_line_for_tinyllama() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/tinyllama-1.1b-chat");
    let out = common::stdout_ok(lorasft().args(["inspect", "--model", dir, "--config-only"]));
    assert!(
        out.lines().any(|l| l
            == "trainable params: 1,126,400 || all params: 1,101,174,784 || trainable%: 0.1023"),
        "{out}"
    );
    assert!(
        out.contains("22 layers, hidden 2048, intermediate 5632, heads 32 (kv 4)"),
        "{out}"
    );
}

#[test]
fn fixture_is_byte_identical_for_a_seed_and_differs_across_seeds() {
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, seed: &str| {
        let out = tmp.path().join(name);
        common::stdout_ok(
            lorasft()
                .args([
                    "fixture",
                    "tiny-llama",
                    "--seed",
                    seed,
                    "--layers",
                    "1",
                    "--out",
                ])
                .arg(&out),
        );
        (
            std::fs::read(out.join("config.json")).unwrap(),
            std::fs::read(out.join("model.safetensors")).unwrap(),
        )
    };
    let a = write("a", "3");
    let b = write("b", "3");
    let c = write("c", "4");
    assert_eq!(a, b);
    assert_eq!(a.0, c.0);
    assert_ne!(a.1, c.1);
}

#[test]
fn inspect_loads_weights_and_counts_the_same_parameters() {
    let tmp = tempfile::tempdir().unwrap();
    common::stdout_ok(
        lorasft()
            .args(["fixture", "tiny-llama", "--seed", "1", "--tied", "--out"])
            .arg(tmp.path()),
    );
    let m = tmp.path().to_str().unwrap();
    let config_only = common::stdout_ok(lorasft().args([
        "inspect",
        "--model",
        m,
        "--config-only",
        "--targets",
        "all-linear",
    ]));
    let loaded =
        common::stdout_ok(lorasft().args(["inspect", "--model", m, "--targets", "all-linear"]));
    let line = config_only
        .lines()
        .find(|l| l.starts_with("trainable params"))
        .unwrap();
    assert!(
        loaded.contains(&format!("counted from loaded tensors: {line}")),
        "{loaded}"
    );
}

#[test]
fn hub_id_not_cached_offline_names_the_file_and_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let out = lorasft()
        .args(["inspect", "--config-only"])
        .env("HF_HOME", tmp.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("TinyLlama/TinyLlama-1.1B-Chat-v1.0") && err.contains("config.json"),
        "{err}"
    );
    assert!(err.contains(tmp.path().to_str().unwrap()), "{err}");
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
}

#[test]
fn hub_id_found_in_the_cache_is_used_offline() {
    let tmp = tempfile::tempdir().unwrap();
    // The hf-hub cache layout: models--{org}--{name}/refs/main + snapshots/{rev}/file.
    let repo = tmp
        .path()
        .join("hub")
        .join("models--TinyLlama--TinyLlama-1.1B-Chat-v1.0");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "abc123").unwrap();
    std::fs::create_dir_all(repo.join("snapshots/abc123")).unwrap();
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/tinyllama-1.1b-chat/config.json"
        ),
        repo.join("snapshots/abc123/config.json"),
    )
    .unwrap();
    let out = common::stdout_ok(
        lorasft()
            .args(["inspect", "--config-only"])
            .env("HF_HOME", tmp.path())
            .env("HF_HUB_OFFLINE", "1"),
    );
    assert!(out.contains("trainable params: 1,126,400"), "{out}");
}

#[test]
fn fixture_tokenizer_is_reproduced_byte_for_byte_by_train_fixture() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("tokenizer.json");
    let root = env!("CARGO_MANIFEST_DIR");
    common::stdout_ok(
        lorasft()
            .args([
                "tokenizer",
                "train-fixture",
                "--data",
                &format!("{root}/fixtures/instructions.json"),
                "--vocab",
                "512",
                "--out",
            ])
            .arg(&out),
    );
    let committed = std::fs::read(format!("{root}/fixtures/tokenizer.json")).unwrap();
    assert_eq!(
        std::fs::read(&out).unwrap(),
        committed,
        "fixtures/tokenizer.json is stale: regenerate it with `lorasft tokenizer train-fixture`"
    );
}

#[test]
fn data_stats_reports_truncation_no_label_records_and_padding_share() {
    let root = env!("CARGO_MANIFEST_DIR");
    let data = format!("{root}/fixtures/instructions.json");
    let tok = format!("{root}/fixtures/tokenizer.json");
    // `data stats` on the fixture records with these flags; its stdout.
    let stats = |flags: &[&str]| {
        common::stdout_ok(
            lorasft()
                .args(["data", "stats", "--data", &data, "--tokenizer", &tok])
                .args(flags),
        )
    };
    let text = stats(&["--labels", "completion-only"]);
    assert!(
        text.contains("records: 44 (21 with input, 23 without; 2 with empty output)"),
        "{text}"
    );
    assert!(
        text.contains("records with no trainable label: 3"),
        "{text}"
    );
    let json = stats(&["--labels", "input-ids", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["records"], 44);
    assert_eq!(
        v["no_trainable_label"], 0,
        "input-ids labels every position"
    );
    assert!(
        v["padding_label_tokens"].as_u64().unwrap() > 0,
        "max_length padding under input-ids trains on padding"
    );
    let masked = stats(&["--labels", "mask-padding", "--json"]);
    let m: serde_json::Value = serde_json::from_str(&masked).unwrap();
    assert_eq!(m["padding_label_tokens"], 0);
    // Every batching mode's rows, micro-batches and padding share, whichever is chosen.
    let modes = stats(&[
        "--max-len",
        "128",
        "--padding",
        "longest",
        "--batch-size",
        "4",
        "--grad-accum",
        "2",
        "--batching",
        "packed",
    ]);
    for mode in ["padded |", "group_by_length |", "packed (chosen) |"] {
        assert!(modes.contains(mode), "{mode}: {modes}");
    }
    assert!(modes.contains("| 44 | 11 | 5 |"), "44 rows padded: {modes}");
    let json = stats(&[
        "--max-len",
        "128",
        "--padding",
        "longest",
        "--batch-size",
        "4",
        // The config's spelling is accepted as well as clap's.
        "--batching",
        "group_by_length",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let b = v["batching"].as_array().unwrap();
    let share = |i: usize| {
        1.0 - b[i]["real_tokens"].as_f64().unwrap() / b[i]["padded_tokens"].as_f64().unwrap()
    };
    assert_eq!(
        b[0]["padded_tokens"], v["padded_tokens"],
        "padded = the file-order batches"
    );
    assert!(b[2]["rows"].as_u64().unwrap() < 44, "packing fills rows");
    assert!(share(2) < share(1) && share(1) <= share(0), "{b:?}");
    let bad = lorasft()
        .args([
            "data",
            "stats",
            "--data",
            &format!("{root}/Cargo.toml"),
            "--tokenizer",
            &tok,
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("Cargo.toml:1:2: expected value"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

#[test]
fn bench_prints_one_row_per_shape_and_thread_count_and_merges_comparison_rows() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("rows.jsonl");
    // A comparison row in the format scripts/bench_pytorch.py writes.
    let other = dir.path().join("other.jsonl");
    std::fs::write(
        &other,
        r#"{"impl_name": "other", "shape": "tiny", "batch": 4, "seq": 128, "threads": 1, "step_ms": 1000.0, "step_range_ms": [990.0, 1010.0], "tokens_per_s": 512.0, "forward_ms": 300.0, "gen_tokens_per_s": 50.0, "peak_rss_mib": 900.0}"#,
    )
    .unwrap();
    let out = common::stdout_ok(
        lorasft()
            .args(["bench", "--shapes", "tiny", "--threads", "1"])
            .args([
                "--steps",
                "1",
                "--gen-tokens",
                "2",
                "--compare",
                other.to_str().unwrap(),
                "--json",
                json.to_str().unwrap(),
            ]),
    );
    let rows: Vec<&str> = out.lines().filter(|l| l.starts_with("| ")).collect();
    assert_eq!(rows.len(), 3, "header + lorasft + comparison:\n{out}");
    assert!(
        rows[1].starts_with("| lorasft | tiny | 4 × 128 | 1 |"),
        "{out}"
    );
    assert!(rows[2].starts_with("| other | tiny |"), "{out}");
    // The ratio column is lorasft's median step over the other's 1000 ms (both printed rounded:
    // the step to 1 ms, the ratio to 0.01).
    let ours: f64 = rows[1].split('|').nth(5).unwrap().trim().parse().unwrap();
    let ratio: f64 = rows[2]
        .split('|')
        .nth(11)
        .unwrap()
        .trim()
        .trim_end_matches('×')
        .parse()
        .unwrap();
    assert!(
        (ratio - ours / 1000.0).abs() <= 0.0051,
        "ratio {ratio} for a step of {ours} ms: {out}"
    );
    let written = std::fs::read_to_string(&json).unwrap();
    let row: lorasft::bench::table::BenchRow =
        serde_json::from_str(written.lines().next().unwrap()).unwrap();
    assert!(row.step_ms > 0.0 && row.tokens_per_s > 0.0 && row.peak_rss_mib > 0.0);
    assert_eq!((row.batch, row.seq, row.threads), (4, 128, 1));
}

/// `bench --batching` on the smoke preset: the four variants, the reference padding clamped
/// to the fixture's 256 positions, and packing carrying more examples per step.
#[test]
fn bench_batching_runs_on_the_smoke_preset_with_the_reference_length_clamped() {
    let out = common::stdout_ok(
        lorasft()
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["bench", "--batching", "--preset", "smoke", "--threads", "1"])
            .args(["--steps", "1", "--skip", "0"]),
    );
    let rows: Vec<&str> = out.lines().filter(|l| l.starts_with("| ")).collect();
    assert_eq!(rows.len(), 5, "header + 4 variants:\n{out}");
    assert!(
        rows[1].starts_with("| padded, max_length 256 (the reference's padding) | 1 |"),
        "{out}"
    );
    let per_step = |row: &str| -> f64 { row.split('|').nth(3).unwrap().trim().parse().unwrap() };
    assert!(
        per_step(rows[4]) > per_step(rows[2]),
        "packing carries more examples:\n{out}"
    );
}

/// `bench --memory` on the tiny shape: four children (f32 and kept quantized, activations
/// kept and recomputed), each row with its load and step-peak RSS, and the ratios against the
/// f32 row of the same setting; the Q4_K_M file is written where `--memory-gguf` says.
#[test]
fn bench_memory_measures_both_bases_under_both_activation_settings() {
    let dir = tempfile::tempdir().unwrap();
    let (gguf, json) = (dir.path().join("tiny.gguf"), dir.path().join("rows.jsonl"));
    let out = common::stdout_ok(
        lorasft()
            .args([
                "bench",
                "--memory",
                "--memory-shape",
                "tiny",
                "--threads",
                "1",
            ])
            .args(["--steps", "1", "--memory-gguf"])
            .arg(&gguf)
            .arg("--json")
            .arg(&json),
    );
    assert!(gguf.exists(), "no GGUF written");
    let rows: Vec<&str> = out.lines().filter(|l| l.starts_with("| ")).collect();
    assert_eq!(rows.len(), 5, "header + 4 rows:\n{out}");
    for (row, start) in rows[1..].iter().zip([
        "| f32 | kept | 1 |",
        "| q4_k_m kept quantized | kept | 1 |",
        "| f32 | recomputed | 1 |",
        "| q4_k_m kept quantized | recomputed | 1 |",
    ]) {
        assert!(row.starts_with(start), "{row} (want {start}):\n{out}");
    }
    let written: Vec<lorasft::bench::memory::MemoryRow> = std::fs::read_to_string(&json)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(written.len(), 4);
    for r in &written {
        assert_eq!((r.shape.as_str(), r.threads), ("tiny", 1));
        assert!(
            r.rss_loaded_mib > 0.0 && r.step_peak_mib > 0.0 && r.step_ms > 0.0,
            "{r:?}"
        );
    }
    // The ratio columns are the quantized row's figures over the f32 row's above it.
    let cell =
        |row: &str, i: usize| -> f64 { row.split('|').nth(i).unwrap().trim().parse().unwrap() };
    for (f, q) in [(&written[0], rows[2]), (&written[2], rows[4])] {
        let want = written
            .iter()
            .find(|r| r.base != "f32" && r.recompute == f.recompute)
            .unwrap();
        assert!(
            (cell(q, 7) - want.step_peak_mib / f.step_peak_mib).abs() < 0.0006,
            "{q}"
        );
    }
}

#[test]
fn bench_against_a_command_pairs_rows_round_by_round() {
    // The other implementation's command: prints one row (the appended arguments are
    // commented out by the trailing '#').
    let row = r#"{"impl_name": "other", "shape": "tiny", "batch": 4, "seq": 128, "threads": 1, "step_ms": 2000.0, "step_range_ms": [1990.0, 2010.0], "tokens_per_s": 256.0, "forward_ms": 600.0, "gen_tokens_per_s": 40.0, "peak_rss_mib": 900.0}"#;
    let cmd = format!("echo '{row}' #");
    let out = common::stdout_ok(
        lorasft()
            .args(["bench", "--shapes", "tiny", "--threads", "1"])
            .args(["--steps", "1", "--gen-tokens", "2", "--rounds", "2"])
            .args(["--against", &cmd]),
    );
    let rows: Vec<&str> = out.lines().filter(|l| l.starts_with("| ")).collect();
    assert_eq!(
        rows.len(),
        3,
        "header + lorasft + other, merged over rounds:\n{out}"
    );
    assert!(
        rows[2].starts_with("| other | tiny | 4 × 128 | 1 | 2000 |"),
        "{out}"
    );
    let line = out
        .lines()
        .find(|l| l.starts_with("tiny 1 thread(s), lorasft / other per round: "))
        .unwrap_or_else(|| panic!("no per-round ratios:\n{out}"));
    let ratios: Vec<f64> = line
        .rsplit(": ")
        .next()
        .unwrap()
        .split(", ")
        .map(|r| r.parse().unwrap())
        .collect();
    assert_eq!(ratios.len(), 2, "{line}");
    assert!(ratios.iter().all(|&r| r > 0.0 && r < 10.0), "{line}");
}

#[test]
fn bench_against_a_failing_command_is_an_error_naming_it() {
    let out = lorasft()
        .args([
            "bench",
            "--shapes",
            "tiny",
            "--threads",
            "1",
            "--steps",
            "1",
        ])
        .args(["--against", "false"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("false --shapes tiny --threads 1"), "{err}");
}

/// The stderr of a `lorasft` run that must fail.
fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "succeeded unexpectedly");
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn a_missing_file_prints_its_os_error_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing.gguf");
    let os_text = std::fs::read(&missing).unwrap_err().to_string();
    let out = tmp.path().join("t.json");
    let err = run_err(
        lorasft()
            .arg("tokenizer")
            .arg("from-gguf")
            .arg(&missing)
            .arg("--out")
            .arg(&out),
    );
    assert_eq!(err.matches(&os_text).count(), 1, "{err}");
    assert!(err.contains("missing.gguf"), "{err}");
}

#[test]
fn a_missing_model_directory_is_named_not_looked_up_on_the_hub() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("no-such-model");
    let err = run_err(
        lorasft()
            .args(["inspect", "--config-only", "--model"])
            .arg(&dir)
            .env("HF_HOME", tmp.path())
            .env("HF_HUB_OFFLINE", "1"),
    );
    assert!(
        err.contains(&format!("no such model directory: {}", dir.display())),
        "{err}"
    );
    assert!(!err.contains("Hugging Face"), "{err}");
}

#[test]
fn import_gguf_of_a_file_without_tensors_fails_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("empty.gguf");
    common::gguf_writer::write_gguf(&file, &common::gguf_writer::fixture_meta(), &[]);
    let out = tmp.path().join("hf");
    let err = run_err(
        lorasft()
            .arg("import-gguf")
            .arg(&file)
            .arg("--out")
            .arg(&out),
    );
    assert!(err.contains("missing tensor `token_embd.weight`"), "{err}");
    assert!(!out.exists());
}

/// A FIFO with no writer, a device and a directory given as a dataset or tokenizer are refused
/// at once, naming the path and what it is (a FIFO used to block `open` forever, and
/// `/dev/zero` read until memory ran out). The child is waited on with a guard against a hang.
#[test]
fn special_files_as_inputs_are_refused_without_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("data.fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo only creates the node.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let tok = common::fixture_tokenizer();
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/instructions.json");
    let cases: [(&std::path::Path, &std::path::Path, &str); 4] = [
        (&fifo, &tok, "a FIFO"),
        (std::path::Path::new("/dev/urandom"), &tok, "a device"),
        (&data, std::path::Path::new("/dev/zero"), "a device"),
        (dir.path(), &tok, "a directory"),
    ];
    for (data, tok, what) in cases {
        let mut child = common::lorasft()
            .args(["data", "stats", "--data"])
            .arg(data)
            .arg("--tokenizer")
            .arg(tok)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > std::time::Duration::from_secs(120) {
                child.kill().unwrap();
                panic!("{} as input hung", data.display());
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert_eq!(status.code(), Some(1), "{err}");
        assert!(
            err.contains(what) && err.contains("not a regular file"),
            "{err}"
        );
    }
}

#[test]
fn completions_name_the_subcommands_and_flags_in_every_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let out = common::stdout_ok(lorasft().args(["completions", shell]));
        // fish spells a long flag `-l preset`, the others `--preset`.
        let flag = |f: &str| match shell {
            "fish" => format!("-l {f}"),
            _ => format!("--{f}"),
        };
        let words = ["train", "import-gguf", "completions"].map(String::from);
        let flags = ["preset", "config", "set", "dry-run"].map(flag);
        for word in words.iter().chain(&flags) {
            assert!(
                out.contains(word.as_str()),
                "{shell} completions lack {word}:\n{out}"
            );
        }
    }
    let err = run_err(lorasft().args(["completions", "tcsh"]));
    assert!(err.contains("tcsh") && err.contains("bash"), "{err}");
}
