//! Hostile inputs to every command of the `lorasft` binary (issue 13): missing, empty and
//! truncated files, directories where files belong, non-UTF-8 bytes, wrong types, absurd
//! numbers, unknown keys and bad enum values, crafted GGUF headers, broken config.json and
//! adapter_config.json files. The corpus is generated at test time into a temporary folder.
//!
//! Every case must end in a clean refusal: exit status 1 (a library error) or 2 (clap), no
//! "panicked" on stderr, stderr naming the file, key or flag at fault and the problem, and
//! no output left behind (the output path given does not exist, and the temporary folder
//! holds only what the test made).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

mod common;

/// One hostile invocation.
struct Case {
    name: String,
    args: Vec<String>,
    expect: Vec<String>,
}

/// Builds cases with paths under the corpus folder spelled `T/...` in arguments.
struct Corpus {
    dir: tempfile::TempDir,
    cases: Vec<Case>,
}

impl Corpus {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let c = Self {
            dir,
            cases: Vec::new(),
        };
        c.write_files();
        c
    }

    fn p(&self, rel: &str) -> String {
        self.dir.path().join(rel).to_str().unwrap().to_string()
    }

    fn write(&self, rel: &str, bytes: impl AsRef<[u8]>) {
        let path = self.dir.path().join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    /// Adds a case; `T/` in an argument or an expected string is the corpus folder.
    fn case(&mut self, name: &str, args: &[&str], expect: &[&str]) -> &mut Case {
        let t = self.p("");
        let sub = |s: &str| corpus_path(s, &t);
        self.cases.push(Case {
            name: name.to_string(),
            args: args.iter().map(|a| sub(a)).collect(),
            expect: expect.iter().map(|e| sub(e)).collect(),
        });
        self.cases.last_mut().unwrap()
    }

    fn write_files(&self) {
        let record = r#"{"instruction": "Say hi.", "input": "", "output": "Hi."}"#;
        self.write("data/empty.json", "");
        self.write(
            "data/not-utf8.json",
            b"[{\"instruction\": \"\xff\xfe\", \"output\": \"x\"}]",
        );
        self.write(
            "data/truncated.json",
            format!("[{record}, {{\"instruction\": \"a\", \"out"),
        );
        self.write(
            "data/truncated.jsonl",
            format!("{record}\n{{\"instruction\": \"b\""),
        );
        self.write(
            "data/wrong-type.json",
            r#"[{"instruction": 7, "output": "x"}]"#,
        );
        self.write("data/no-output.json", r#"[{"instruction": "x"}]"#);
        self.write("data/object.json", r#"{"rows": [1, 2]}"#);
        self.write("data/null.json", "null");
        self.write("data/empty-array.json", "[]");
        self.write("data/deep.json", "[".repeat(100_000));
        self.write("data/one.json", format!("[{record}]"));
        std::fs::create_dir_all(self.dir.path().join("dir")).unwrap();
        self.write("tok/empty.json", "");
        self.write("tok/not-utf8.json", b"\xff\xfe\x00{");
        self.write(
            "tok/truncated.json",
            r#"{"version": "1.0", "model": {"type": "BPE", "vocab": {"a"#,
        );
        self.write("tok/object.json", "{}");
        self.write(
            "tok/bad-config/tokenizer.json",
            std::fs::read(common::fixture_tokenizer()).unwrap(),
        );
        self.write(
            "tok/bad-config/tokenizer_config.json",
            r#"{"eos_token": "<no-such-token>"}"#,
        );
        self.write(
            "tok/trunc-config/tokenizer.json",
            std::fs::read(common::fixture_tokenizer()).unwrap(),
        );
        self.write(
            "tok/trunc-config/tokenizer_config.json",
            r#"{"eos_token": "#,
        );
        self.write_configs();
        self.write_models();
        self.write_ggufs();
    }

    fn write_configs(&self) {
        let toml = [
            ("empty-table", "[train]\nbatch_size = {}\n"),
            ("not-toml", "this is = = not toml\n"),
            ("truncated", "[train\nbatch_size = 4"),
            ("wrong-type", "[train]\nbatch_size = \"four\"\n"),
            ("unknown-key", "[train]\nbogus = 1\n"),
            ("unknown-table", "[bogus]\nx = 1\n"),
            ("bad-enum", "[encode]\nlabels = \"bogus\"\n"),
            ("huge", "[train]\ngrad_accum = 1152921504606846976\n"),
            ("u64-max", "[train]\nbatch_size = 18446744073709551615\n"),
            ("negative", "[train]\nepochs = -1\n"),
            ("zero", "[train]\nbatch_size = 0\n"),
            ("nan", "[optim]\nlr = nan\n"),
            ("inf", "[optim]\nmax_grad_norm = inf\n"),
            ("dropout-one", "[lora]\ndropout = 1.0\n"),
            (
                "deep",
                &format!("x = {}{}\n", "[".repeat(5000), "]".repeat(5000)),
            ),
            ("deep-keys", &format!("[{}]\n", vec!["a"; 5000].join("."))),
        ];
        for (name, text) in toml {
            self.write(&format!("cfg/{name}.toml"), text);
        }
        self.write("cfg/not-utf8.toml", b"[train]\nbatch_size = \xff\n");
    }

    fn write_models(&self) {
        let base: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("fixtures/tinyllama-1.1b-chat/config.json"),
            )
            .unwrap(),
        )
        .unwrap();
        let edits: [(&str, &str, serde_json::Value); 7] = [
            ("zero-hidden", "hidden_size", 0.into()),
            ("zero-heads", "num_attention_heads", 0.into()),
            ("zero-vocab", "vocab_size", 0.into()),
            (
                "huge-hidden",
                "hidden_size",
                4_611_686_018_427_387_904u64.into(),
            ),
            (
                "huge-layers",
                "num_hidden_layers",
                1_152_921_504_606_846_976u64.into(),
            ),
            ("string-hidden", "hidden_size", "big".into()),
            ("negative-heads", "num_attention_heads", (-4).into()),
        ];
        for (name, key, value) in edits {
            let mut v = base.clone();
            v[key] = value;
            self.write(&format!("model/{name}/config.json"), v.to_string());
        }
        self.write("model/empty/config.json", "");
        self.write("model/truncated/config.json", r#"{"hidden_size": 64, "#);
        self.write("model/not-utf8/config.json", b"{\"hidden_size\": \xff}");
        std::fs::create_dir_all(self.dir.path().join("model/no-config")).unwrap();
        // A consistent config with no weights beside it.
        self.write("model/no-weights/config.json", base.to_string());
        let adapter: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/peft-adapter_config.json"),
            )
            .unwrap(),
        )
        .unwrap();
        let edits: [(&str, &str, serde_json::Value); 6] = [
            ("r-zero", "r", 0.into()),
            ("r-huge", "r", 4_611_686_018_427_387_904u64.into()),
            (
                "unknown-target",
                "target_modules",
                serde_json::json!(["bogus_proj"]),
            ),
            ("alpha-string", "lora_alpha", "sixteen".into()),
            ("dropout-one", "lora_dropout", 1.0.into()),
            ("no-targets", "target_modules", serde_json::json!([])),
        ];
        for (name, key, value) in edits {
            let mut v = adapter.clone();
            v[key] = value;
            self.write(
                &format!("adapter/{name}/adapter_config.json"),
                v.to_string(),
            );
        }
        self.write("adapter/empty/adapter_config.json", "");
        self.write(
            "adapter/truncated/adapter_config.json",
            r#"{"r": 8, "lora_al"#,
        );
        self.write(
            "adapter/no-weights/adapter_config.json",
            adapter.to_string(),
        );
        self.write(
            "adapter/bad-weights/adapter_config.json",
            adapter.to_string(),
        );
        self.write(
            "adapter/bad-weights/adapter_model.safetensors",
            b"\x08\x00\x00\x00\x00\x00\x00\x00{}",
        );
        std::fs::create_dir_all(self.dir.path().join("adapter/nothing")).unwrap();
        // Run directories for report and reproduce.
        std::fs::create_dir_all(self.dir.path().join("run/empty")).unwrap();
        self.write("run/bad-config/config.toml", "[train\n");
        self.write("run/bad-config/metrics.jsonl", "{\"step\": 1,");
        self.write("run/not-utf8/config.toml", b"\xff\xfe");
    }

    fn write_ggufs(&self) {
        self.write("gguf/empty.gguf", "");
        self.write("gguf/magic-only.gguf", "GGUF");
        self.write("gguf/wrong-magic.gguf", gguf_header(b"GGML", 3, 0, 0));
        self.write("gguf/version-99.gguf", gguf_header(b"GGUF", 99, 0, 0));
        self.write(
            "gguf/huge-tensor-count.gguf",
            gguf_header(b"GGUF", 3, 1 << 62, 0),
        );
        self.write(
            "gguf/huge-kv-count.gguf",
            gguf_header(b"GGUF", 3, 0, 1 << 62),
        );
        let mut b = gguf_header(b"GGUF", 3, 0, 1);
        b.extend(gguf_str("general.name"));
        b.extend(8u32.to_le_bytes());
        b.extend((1u64 << 62).to_le_bytes());
        self.write("gguf/huge-string.gguf", b);
        let mut b = gguf_header(b"GGUF", 3, 0, 1);
        b.extend(gguf_str("general.alignment"));
        b.extend(4u32.to_le_bytes());
        b.extend(0u32.to_le_bytes());
        self.write("gguf/alignment-0.gguf", b);
        let mut b = gguf_header(b"GGUF", 3, 0, 1);
        b.extend(gguf_str("deep"));
        for _ in 0..100_000 {
            b.extend(9u32.to_le_bytes());
            b.extend(9u32.to_le_bytes());
            b.extend(1u64.to_le_bytes());
        }
        self.write("gguf/deep-arrays.gguf", b);
        let mut b = gguf_header(b"GGUF", 3, 0, 1);
        b.extend(gguf_str("tokenizer.ggml.tokens"));
        b.extend(9u32.to_le_bytes());
        b.extend(8u32.to_le_bytes());
        b.extend((1u64 << 62).to_le_bytes());
        self.write("gguf/huge-array.gguf", b);
        let kvs: [(&str, u32); 6] = [
            ("llama.block_count", 1),
            ("llama.embedding_length", 64),
            ("llama.feed_forward_length", 128),
            ("llama.attention.head_count", 0),
            ("llama.attention.head_count_kv", 0),
            ("llama.context_length", 64),
        ];
        let mut b = gguf_header(b"GGUF", 3, 0, kvs.len() as u64 + 1);
        b.extend(gguf_str("general.architecture"));
        b.extend(8u32.to_le_bytes());
        b.extend(gguf_str("llama"));
        for (k, v) in kvs {
            b.extend(gguf_str(k));
            b.extend(4u32.to_le_bytes());
            b.extend(v.to_le_bytes());
        }
        self.write("gguf/head-count-0.gguf", b);
        self.write_tensor_ggufs();
    }

    /// A valid fixture Llama with one thing wrong in its tensor directory or metadata: the
    /// checks lorasft makes before candle reads tensor data.
    fn write_tensor_ggufs(&self) {
        use common::gguf_writer::{Meta, fixture_meta, fixture_tensors, gguf_bytes};
        let valid = || gguf_bytes(&fixture_meta(), &fixture_tensors(1));
        // Q8_1 exists in ggml only as a matmul scratch type; 99 is no type at all.
        for (file, ty) in [("type-q8-1", 9u32), ("type-99", 99)] {
            let mut b = valid();
            patch_tensor(&mut b, "token_embd.weight", |_, t, _| *t = ty);
            self.write(&format!("gguf/{file}.gguf"), b);
        }
        // Q4_K blocks hold 256 values; the fixture's rows hold 64.
        let mut b = valid();
        patch_tensor(&mut b, "blk.0.attn_q.weight", |_, t, _| *t = 12);
        self.write("gguf/q4k-partial-block.gguf", b);
        let mut b = valid();
        patch_tensor(&mut b, "blk.0.ffn_down.weight", |_, t, _| *t = 14);
        self.write("gguf/q6k-partial-block.gguf", b);
        let mut b = valid();
        patch_tensor(&mut b, "output.weight", |_, _, off| *off = 1 << 40);
        self.write("gguf/tensor-past-eof.gguf", b);
        // 2^64 - 32 Q8_0 values fit a u64, their bytes (2^59 - 1 blocks of 34) do not.
        let mut b = valid();
        patch_tensor(&mut b, "output.weight", |dims, t, _| {
            *t = 8;
            dims[0] = 32;
            dims[1] = (1 << 59) - 1;
        });
        self.write("gguf/tensor-bytes-overflow.gguf", b);
        // general.alignment as a u64: candle reads only 8 to 32-bit integers there, so it
        // would place the data elsewhere than the header says.
        let mut meta = fixture_meta();
        meta.push(("general.alignment", Meta::U64(4096)));
        self.write(
            "gguf/alignment-u64.gguf",
            gguf_bytes(&meta, &fixture_tensors(1)),
        );
        let mut meta = fixture_meta();
        meta.push(("tokenizer.ggml.add_bos_token", Meta::Bool(true)));
        let mut b = gguf_bytes(&meta, &fixture_tensors(1));
        let key = gguf_str("tokenizer.ggml.add_bos_token");
        let at = find(&b, &key).unwrap() + key.len() + 4;
        b[at] = 2;
        self.write("gguf/bool-2.gguf", b);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Edits the directory entry of tensor `name` (2-D): its dims, ggml type and offset.
fn patch_tensor(b: &mut [u8], name: &str, f: impl FnOnce(&mut [u64; 2], &mut u32, &mut u64)) {
    let key = gguf_str(name);
    let mut at = find(b, &key).unwrap() + key.len();
    assert_eq!(u32::from_le_bytes(b[at..at + 4].try_into().unwrap()), 2);
    at += 4;
    let rd = |b: &[u8], i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    let mut dims = [rd(b, at), rd(b, at + 8)];
    let mut ty = u32::from_le_bytes(b[at + 16..at + 20].try_into().unwrap());
    let mut off = rd(b, at + 20);
    f(&mut dims, &mut ty, &mut off);
    b[at..at + 8].copy_from_slice(&dims[0].to_le_bytes());
    b[at + 8..at + 16].copy_from_slice(&dims[1].to_le_bytes());
    b[at + 16..at + 20].copy_from_slice(&ty.to_le_bytes());
    b[at + 20..at + 28].copy_from_slice(&off.to_le_bytes());
}

fn gguf_header(magic: &[u8; 4], version: u32, tensors: u64, kvs: u64) -> Vec<u8> {
    let mut b = magic.to_vec();
    b.extend(version.to_le_bytes());
    b.extend(tensors.to_le_bytes());
    b.extend(kvs.to_le_bytes());
    b
}

fn gguf_str(s: &str) -> Vec<u8> {
    let mut b = (s.len() as u64).to_le_bytes().to_vec();
    b.extend(s.as_bytes());
    b
}

/// Every path under `dir`, relative.
fn listing(dir: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.insert(p.strip_prefix(dir).unwrap().to_path_buf());
        }
    }
    out
}

/// `s` with each `T/` that starts a path (at the start, or after a character that cannot be
/// part of a file name's stem) replaced by the corpus folder `t`. A `T/` inside a path already
/// substituted (a temporary folder whose random name ends in `T`) is left alone, so building a
/// case from a full path never rewrites it twice.
fn corpus_path(s: &str, t: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut prev: Option<char> = None;
    let mut rest = s;
    while let Some(c) = rest.chars().next() {
        let boundary =
            prev.is_none_or(|p| !(p.is_alphanumeric() || p == '.' || p == '_' || p == '-'));
        if boundary && rest.starts_with("T/") {
            out.push_str(t);
            rest = &rest[2..];
            prev = Some('/');
        } else {
            out.push(c);
            rest = &rest[c.len_utf8()..];
            prev = Some(c);
        }
    }
    out
}

#[test]
fn corpus_paths_substitute_once_even_when_the_folder_name_ends_in_t() {
    let t = "/tmp/.tmpabcT/";
    assert_eq!(corpus_path("T/model/x", t), "/tmp/.tmpabcT/model/x");
    assert_eq!(
        corpus_path("/tmp/.tmpabcT/model/x", t),
        "/tmp/.tmpabcT/model/x"
    );
    assert_eq!(
        corpus_path("data.path=\"T/d.json\"", t),
        "data.path=\"/tmp/.tmpabcT/d.json\""
    );
}

/// Runs every case; fails with one line per case that misbehaved.
fn run(corpus: &Corpus, group: &str) {
    let root = env!("CARGO_MANIFEST_DIR");
    let before = listing(corpus.dir.path());
    let (mut failures, mut ran) = (Vec::new(), 0);
    let mut names = BTreeSet::new();
    for case in &corpus.cases {
        assert!(names.insert(&case.name), "duplicate case {}", case.name);
        ran += 1;
        let out = common::lorasft()
            .args(&case.args)
            .current_dir(root)
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let mut problems = Vec::new();
        match out.status.code() {
            Some(1 | 2) => {}
            other => problems.push(format!("exit {other:?} (a crash or a success)")),
        }
        if stderr.contains("panicked") {
            problems.push("panicked".into());
        }
        for e in &case.expect {
            if !stderr.contains(e.as_str()) {
                problems.push(format!("stderr lacks {e:?}"));
            }
        }
        let after = listing(corpus.dir.path());
        if after != before {
            let stray: Vec<_> = after.symmetric_difference(&before).collect();
            problems.push(format!("left files behind: {stray:?}"));
            for p in stray {
                let p = corpus.dir.path().join(p);
                let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
            }
        }
        if !problems.is_empty() {
            let shown: String = stderr.chars().take(600).collect();
            failures.push(format!(
                "{}: {}\n    args: {:?}\n    stderr: {shown}",
                case.name,
                problems.join("; "),
                case.args
            ));
        }
    }
    eprintln!(
        "{group}: {} cases, {ran} ran, {} passed",
        corpus.cases.len(),
        ran - failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {ran} {group} cases misbehaved:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// `data stats` and `tokenizer train-fixture`: dataset and tokenizer files, encoding flags.
#[test]
fn data_commands_refuse_hostile_datasets_tokenizers_and_flags() {
    let mut c = Corpus::new();
    let tok = "fixtures/tokenizer.json";
    let data = "fixtures/instructions.json";
    for (file, expect) in [
        ("T/data/empty.json", "no records"),
        ("T/data/not-utf8.json", "invalid UTF-8"),
        ("T/data/truncated.json", "EOF"),
        ("T/data/truncated.jsonl", "EOF"),
        ("T/data/wrong-type.json", "instruction"),
        ("T/data/no-output.json", "output"),
        ("T/data/null.json", "null.json"),
        ("T/data/empty-array.json", "no records"),
        ("T/data/deep.json", "recursion"),
        ("T/missing.json", "No such file"),
        ("T/dir", "directory"),
    ] {
        let name = file.trim_start_matches("T/");
        c.case(
            &format!("stats data {name}"),
            &["data", "stats", "--data", file, "--tokenizer", tok],
            &[file, expect],
        );
        c.case(
            &format!("train-fixture data {name}"),
            &[
                "tokenizer",
                "train-fixture",
                "--data",
                file,
                "--out",
                "T/out/tok.json",
            ],
            &[file, expect],
        );
    }
    c.case(
        "stats data object",
        &[
            "data",
            "stats",
            "--data",
            "T/data/object.json",
            "--tokenizer",
            tok,
        ],
        &["T/data/object.json"],
    );
    for (file, expect) in [
        ("T/tok/empty.json", "T/tok/empty.json"),
        ("T/tok/not-utf8.json", "T/tok/not-utf8.json"),
        ("T/tok/truncated.json", "T/tok/truncated.json"),
        ("T/tok/object.json", "T/tok/object.json"),
        ("T/missing.json", "No such file"),
        ("T/dir", "T/dir"),
        ("T/tok/bad-config/tokenizer.json", "<no-such-token>"),
        ("T/tok/trunc-config/tokenizer.json", "tokenizer_config.json"),
    ] {
        let name = file.trim_start_matches("T/");
        c.case(
            &format!("stats tokenizer {name}"),
            &["data", "stats", "--data", data, "--tokenizer", file],
            &[expect],
        );
    }
    let two62 = "4611686018427387904";
    for (flags, expect) in [
        (
            vec!["--padding", "longest", "--pad-to-multiple-of", two62],
            "--pad-to-multiple-of",
        ),
        (vec!["--pad-to-multiple-of", two62], "--pad-to-multiple-of"),
        (
            vec!["--padding", "longest", "--pad-to-multiple-of", "0"],
            "--pad-to-multiple-of",
        ),
        (
            vec!["--padding", "longest", "--pad-to-multiple-of", "1024"],
            "encode.padding.multiple_of",
        ),
        (vec!["--pad-to-multiple-of", "8"], "--padding longest"),
        (vec!["--max-len", "0"], "--max-len"),
        (vec!["--max-len", "1"], "--max-len"),
        (vec!["--max-len", two62], "--max-len"),
        (vec!["--max-len", "18446744073709551616"], "--max-len"),
        (vec!["--max-len=-1"], "--max-len"),
        (vec!["--max-len", "ten"], "--max-len"),
        (vec!["--batch-size", "0"], "--batch-size"),
        (vec!["--batch-size", two62], "--batch-size"),
        (vec!["--padding", "bogus"], "--padding"),
        (vec!["--labels", "bogus"], "--labels"),
        (vec!["--eos", "bogus"], "--eos"),
        (vec!["--padding-side", "middle"], "--padding-side"),
        (vec!["--bogus-flag"], "--bogus-flag"),
    ] {
        let mut args = vec!["data", "stats", "--data", data, "--tokenizer", tok];
        args.extend(&flags);
        c.case(
            &format!("stats flags {}", flags.join(" ")),
            &args,
            &[expect],
        );
    }
    for (vocab, expect) in [
        ("0", "--vocab"),
        ("259", "--vocab"),
        ("4611686018427387904", "--vocab"),
        ("x", "--vocab"),
    ] {
        c.case(
            &format!("train-fixture vocab {vocab}"),
            &[
                "tokenizer",
                "train-fixture",
                "--data",
                data,
                "--vocab",
                vocab,
                "--out",
                "T/out/tok.json",
            ],
            &[expect],
        );
    }
    c.case(
        "train-fixture out in a missing folder",
        &[
            "tokenizer",
            "train-fixture",
            "--data",
            "T/data/one.json",
            "--vocab",
            "300",
            "--out",
            "T/no/such/dir/tok.json",
        ],
        &["T/no/such/dir/tok.json"],
    );
    run(&c, "data");
}

/// `train`: presets, config files and `--set` values, and hostile files the config points at.
#[test]
fn train_refuses_hostile_configs_sets_and_files() {
    let mut c = Corpus::new();
    let train = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "train",
            "--preset",
            "smoke",
            "--max-steps",
            "1",
            "--quiet",
            "--out-dir",
            "T/runs",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let add = |c: &mut Corpus, name: &str, extra: &[&str], expect: &[&str]| {
        let args = train(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        c.case(name, &args, expect);
    };
    for (cfg, expect) in [
        ("empty-table", "batch_size"),
        ("not-toml", "TOML parse error"),
        ("truncated", "TOML parse error"),
        ("wrong-type", "train.batch_size"),
        ("unknown-key", "unknown field `bogus`"),
        ("unknown-table", "unknown field `bogus`"),
        ("bad-enum", "encode.labels"),
        ("huge", "train.grad_accum must be in 1..=65536"),
        ("u64-max", "too large"),
        ("negative", "train.epochs"),
        ("zero", "train.batch_size must be in 1..=65536"),
        ("nan", "optim.lr must be a finite number"),
        ("inf", "optim.max_grad_norm"),
        ("dropout-one", "lora.dropout must be in [0, 1)"),
        ("deep", "TOML parse error"),
        ("deep-keys", "TOML parse error"),
        ("not-utf8", "UTF-8"),
    ] {
        let file = format!("T/cfg/{cfg}.toml");
        let expect_file = if ["huge", "zero", "nan", "inf", "dropout-one"].contains(&cfg) {
            expect.to_string()
        } else {
            file.clone()
        };
        add(
            &mut c,
            &format!("train config {cfg}"),
            &["--config", &file],
            &[&expect_file, expect],
        );
    }
    add(
        &mut c,
        "train config missing",
        &["--config", "T/missing.toml"],
        &["T/missing.toml", "No such file"],
    );
    add(
        &mut c,
        "train config directory",
        &["--config", "T/dir"],
        &["T/dir"],
    );
    let two62 = "4611686018427387904";
    for (set, expect) in [
        ("data.max_records=0", "data.max_records must be at least 1"),
        (
            "train.grad_accum=1152921504606846976",
            "train.grad_accum must be in 1..=65536",
        ),
        (
            "encode.padding.multiple_of=4611686018427387904",
            "encode.padding.multiple_of",
        ),
        ("train.batch_size=0", "train.batch_size"),
        (
            "train.batch_size=4611686018427387904",
            "train.batch_size must be in 1..=65536",
        ),
        ("train.batch_size=-1", "train.batch_size"),
        ("train.batch_size=18446744073709551616", "train.batch_size"),
        ("train.epochs=0", "train.epochs"),
        ("train.log_every=0", "train.log_every"),
        ("train.eval_every=4611686018427387904", "train.eval_every"),
        ("train.save_every=-5", "train.save_every"),
        ("encode.max_len=0", "encode.max_len"),
        ("encode.max_len=4611686018427387904", "encode.max_len"),
        ("encode.labels=\"bogus\"", "encode.labels"),
        ("encode.padding={mode=\"bogus\"}", "encode.padding"),
        ("lora.r=0", "lora.r must be in 1..=4096"),
        ("lora.r=4097", "lora.r must be in 1..=4096"),
        ("lora.alpha=0", "lora.alpha"),
        ("lora.alpha=nan", "lora.alpha"),
        ("lora.dropout=-0.5", "lora.dropout"),
        ("lora.targets=[\"bogus_proj\"]", "lora.targets"),
        ("lora.targets=[]", "lora.targets"),
        ("optim.lr=inf", "optim.lr"),
        ("optim.lr=-1", "optim.lr"),
        ("optim.max_grad_norm=nan", "optim.max_grad_norm"),
        ("optim.warmup={ratio=2.0}", "optim.warmup.ratio"),
        (
            "optim.warmup={steps=4611686018427387904}",
            "optim.warmup.steps",
        ),
        ("optim.adamw.beta1=1.0", "optim.adamw.beta1"),
        ("optim.adamw.eps=0", "optim.adamw.eps"),
        ("optim.schedule=\"bogus\"", "optim.schedule"),
        ("data.validation={fraction=0.0}", "data.validation.fraction"),
        ("data.validation={fraction=nan}", "data.validation.fraction"),
        ("data.validation={count=0}", "data.validation.count"),
        (
            "data.validation={count=4611686018427387904}",
            "leaving none to train on",
        ),
        (
            "generate.max_new_tokens=4611686018427387904",
            "generate.max_new_tokens",
        ),
        (
            "generate.sampling={mode=\"top_p\", temperature=0.0, top_p=0.9}",
            "generate.sampling.temperature",
        ),
        (
            "generate.sampling={mode=\"top_p\", temperature=1.0, top_p=nan}",
            "generate.sampling.top_p",
        ),
        ("run.name=\"\"", "run.name"),
        ("run.name=\"../escape\"", "run.name"),
        ("run.seed=-1", "run.seed"),
        ("run.device=\"tpu\"", "tpu"),
        ("run.precision=\"fp8\"", "run.precision"),
        ("bogus=1", "unknown field `bogus`"),
        ("train.bogus=1", "unknown field `bogus`"),
        ("no-equals-sign", "not key=value"),
        ("a.b.c.d.e.f.g.h.i.j=1", "at most 8"),
        ("model.source=\"bogus:thing\"", "bogus:thing"),
        ("model.source=\"fixture:notanumber\"", "fixture:notanumber"),
    ] {
        add(
            &mut c,
            &format!("train set {set}"),
            &["--set", set],
            &[expect],
        );
    }
    for (file, expect) in [
        ("T/data/empty.json", "no records"),
        ("T/data/not-utf8.json", "invalid UTF-8"),
        ("T/data/truncated.jsonl", "EOF"),
        ("T/data/wrong-type.json", "instruction"),
        ("T/missing.json", "No such file"),
        ("T/dir", "directory"),
    ] {
        let set = format!("data.path=\"{file}\"");
        add(
            &mut c,
            &format!("train data {file}"),
            &["--set", &set],
            &[file, expect],
        );
    }
    for file in [
        "T/tok/empty.json",
        "T/tok/truncated.json",
        "T/missing.json",
        "T/dir",
    ] {
        let set = format!("model.tokenizer=\"{file}\"");
        add(
            &mut c,
            &format!("train tokenizer {file}"),
            &["--set", &set],
            &[file],
        );
    }
    for (dir, expect) in [
        ("T/adapter/empty", "adapter_config.json"),
        ("T/adapter/truncated", "adapter_config.json"),
        ("T/adapter/alpha-string", "invalid type"),
        ("T/adapter/nothing", "adapter_config.json"),
        ("T/missing", "T/missing"),
    ] {
        add(
            &mut c,
            &format!("train init-adapter {dir}"),
            &["--init-adapter", dir],
            &[expect],
        );
    }
    for (dir, expect) in [
        ("T/adapter/r-zero", "r"),
        ("T/adapter/r-huge", "r"),
        ("T/adapter/unknown-target", "bogus_proj"),
        ("T/adapter/dropout-one", "dropout"),
        ("T/adapter/no-targets", "target"),
    ] {
        let args = train(&["--init-adapter", dir]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        c.case(
            &format!("train init-adapter {dir}"),
            &args,
            &["adapter_config.json", expect],
        );
    }
    c.case(
        "train preset bogus",
        &["train", "--preset", "bogus", "--out-dir", "T/runs"],
        &["bogus", "presets"],
    );
    c.case(
        "train max-steps 0",
        &[
            "train",
            "--preset",
            "smoke",
            "--max-steps",
            "0",
            "--out-dir",
            "T/runs",
        ],
        &["--max-steps"],
    );
    c.case(
        "train max-steps huge",
        &[
            "train",
            "--preset",
            "smoke",
            "--max-steps",
            two62,
            "--out-dir",
            "T/runs",
        ],
        &["--max-steps"],
    );
    c.case(
        "train device bogus",
        &[
            "train",
            "--preset",
            "smoke",
            "--device",
            "tpu",
            "--out-dir",
            "T/runs",
        ],
        &["--device"],
    );
    c.case(
        "train precision bogus",
        &[
            "train",
            "--preset",
            "smoke",
            "--precision",
            "fp8",
            "--out-dir",
            "T/runs",
        ],
        &["--precision"],
    );
    c.case(
        "train set train.max_steps=0",
        &[
            "train",
            "--preset",
            "smoke",
            "--out-dir",
            "T/runs",
            "--set",
            "train.max_steps=0",
        ],
        &["train.max_steps must be in 1..=1000000000"],
    );
    // The split's error names neither data.path nor data.validation (data::dataset::split,
    // called from train::prepare): waiting on the parser work or a wrap in prepare.
    c.case(
        "train data one record under a validation count of 4",
        &[
            "train",
            "--preset",
            "smoke",
            "--max-steps",
            "1",
            "--out-dir",
            "T/runs",
            "--set",
            "data.path=\"T/data/one.json\"",
        ],
        &["T/data/one.json", "leaving none to train on"],
    );
    c.case(
        "train seed negative",
        &[
            "train",
            "--preset",
            "smoke",
            "--seed=-1",
            "--out-dir",
            "T/runs",
        ],
        &["--seed"],
    );
    run(&c, "train");
}

/// `eval`, `generate`, `merge` and `inspect`: model directories, adapters and flags.
#[test]
fn model_commands_refuse_hostile_models_adapters_and_flags() {
    let mut c = Corpus::new();
    let tok = "fixtures/tokenizer.json";
    let data = "fixtures/instructions.json";
    let fx = ["--model", "fixture:0", "--tokenizer", tok];
    let with = |head: &[&str], tail: &[&str]| -> Vec<String> {
        head.iter()
            .chain(&fx)
            .chain(tail)
            .map(|s| s.to_string())
            .collect()
    };
    // The last column marked the cases that waited on the parser hardening; all run now.
    let add = |c: &mut Corpus, name: &str, args: Vec<String>, expect: &[&str], _parsers: bool| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        c.case(name, &args, expect);
    };
    let two62 = "4611686018427387904";
    for (flags, expect) in [
        (vec!["--max-new-tokens", two62], "--max-new-tokens"),
        (vec!["--max-new-tokens", "0"], "--max-new-tokens"),
        (vec!["--temperature", "nan"], "--temperature"),
        (vec!["--temperature", "0"], "--temperature"),
        (vec!["--temperature=-1"], "--temperature"),
        (vec!["--temperature", "inf"], "--temperature"),
        (vec!["--temperature", "1", "--top-p", "0"], "--top-p"),
        (vec!["--temperature", "1", "--top-p", "nan"], "--top-p"),
        (vec!["--temperature", "1", "--top-p", "1.5"], "--top-p"),
        (vec!["--seed=-1"], "--seed"),
        (vec!["--device", "tpu"], "--device"),
        (vec!["--precision", "fp8"], "--precision"),
    ] {
        let mut tail = vec!["--prompt", "hi"];
        tail.extend(&flags);
        add(
            &mut c,
            &format!("generate {}", flags.join(" ")),
            with(&["generate"], &tail),
            &[expect],
            false,
        );
    }
    add(
        &mut c,
        "generate no prompt",
        with(&["generate"], &[]),
        &["--prompt"],
        false,
    );
    for (flags, expect) in [
        (vec!["--batch-size", "0"], "--batch-size"),
        (vec!["--batch-size", two62], "--batch-size"),
        (vec!["--max-len", "1"], "--max-len"),
        (vec!["--max-len", two62], "--max-len"),
        (
            vec!["--padding", "longest", "--pad-to-multiple-of", two62],
            "--pad-to-multiple-of",
        ),
        (
            vec![
                "--padding",
                "longest",
                "--max-len",
                "16",
                "--pad-to-multiple-of",
                "32",
            ],
            "encode.padding.multiple_of",
        ),
        (vec!["--max-len", "512"], "max_position"),
        (
            vec![
                "--max-len",
                "16",
                "--per-record",
                "T/no/such/dir/losses.json",
            ],
            "T/no/such/dir/losses.json",
        ),
    ] {
        let mut tail = vec!["--data", data];
        tail.extend(&flags);
        add(
            &mut c,
            &format!("eval {}", flags.join(" ")),
            with(&["eval"], &tail),
            &[expect],
            false,
        );
    }
    for (file, expect) in [
        ("T/data/empty.json", "no records"),
        ("T/data/truncated.json", "EOF"),
        ("T/missing.json", "No such file"),
        ("T/dir", "directory"),
    ] {
        add(
            &mut c,
            &format!("eval data {file}"),
            with(&["eval"], &["--data", file, "--max-len", "16"]),
            &[file, expect],
            false,
        );
    }
    for (dir, expect, parsers) in [
        ("T/adapter/empty", "adapter_config.json", false),
        ("T/adapter/truncated", "adapter_config.json", false),
        ("T/adapter/alpha-string", "invalid type", false),
        ("T/adapter/no-weights", "adapter_model.safetensors", false),
        ("T/adapter/bad-weights", "adapter_model.safetensors", false),
        ("T/adapter/nothing", "adapter_config.json", false),
        ("T/missing", "T/missing", false),
        ("T/adapter/r-zero", "r", false),
        ("T/adapter/r-huge", "r", false),
        ("T/adapter/unknown-target", "bogus_proj", false),
        ("T/adapter/dropout-one", "dropout", false),
        ("T/adapter/no-targets", "target", false),
    ] {
        let name = dir.trim_start_matches("T/");
        add(
            &mut c,
            &format!("generate adapter {name}"),
            with(&["generate"], &["--adapter", dir, "--prompt", "hi"]),
            &[expect],
            parsers,
        );
        add(
            &mut c,
            &format!("eval adapter {name}"),
            with(
                &["eval"],
                &["--adapter", dir, "--data", data, "--max-len", "16"],
            ),
            &[expect],
            parsers,
        );
    }
    for (dir, expect, parsers) in [
        ("zero-hidden", "hidden_size", false),
        ("zero-heads", "num_attention_heads", false),
        ("zero-vocab", "vocab_size", false),
        ("huge-hidden", "hidden_size", true),
        ("huge-layers", "num_hidden_layers", true),
        ("string-hidden", "invalid type", false),
        ("negative-heads", "invalid value", false),
        ("empty", "config.json", false),
        ("truncated", "config.json", false),
        ("not-utf8", "config.json", false),
        ("no-config", "config.json", false),
    ] {
        let m = format!("T/model/{dir}");
        let ex = [expect];
        let inspect = vec![
            "inspect".to_string(),
            "--model".into(),
            c.p(&format!("model/{dir}")),
            "--config-only".into(),
        ];
        add(
            &mut c,
            &format!("inspect config-only {dir}"),
            inspect,
            &ex,
            parsers,
        );
        let eval: Vec<String> = ["eval", "--model", &m, "--data", data]
            .iter()
            .map(|s| s.to_string())
            .collect();
        // Without weights, eval and merge may stop at either file: the folder is named.
        let at_dir = [m.as_str()];
        add(&mut c, &format!("eval model {dir}"), eval, &at_dir, false);
        let merge: Vec<String> = [
            "merge",
            "--model",
            &m,
            "--adapter",
            "T/adapter/nothing",
            "--out",
            "T/out/merged",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        add(&mut c, &format!("merge model {dir}"), merge, &at_dir, false);
    }
    c.case(
        "inspect no weights",
        &["inspect", "--model", "T/model/no-weights"],
        &["T/model/no-weights"],
    );
    c.case(
        "generate model no weights",
        &[
            "generate",
            "--model",
            "T/model/no-weights",
            "--prompt",
            "hi",
        ],
        &["T/model/no-weights"],
    );
    for (flags, expect) in [
        (vec!["--r", "0"], "--r"),
        (vec!["--r", two62], "--r"),
        (vec!["--alpha", "nan"], "--alpha"),
        (vec!["--alpha", "0"], "--alpha"),
        (vec!["--targets", "bogus_proj"], "bogus_proj"),
        (vec!["--targets", ""], "target"),
    ] {
        let mut args = vec![
            "inspect",
            "--model",
            "fixtures/tinyllama-1.1b-chat",
            "--config-only",
        ];
        args.extend(&flags);
        c.case(&format!("inspect {}", flags.join(" ")), &args, &[expect]);
    }
    c.case(
        "merge fixture model",
        &[
            "merge",
            "--model",
            "fixture:0",
            "--adapter",
            "T/adapter/nothing",
            "--out",
            "T/out/merged",
        ],
        &["fixture:0"],
    );
    c.case(
        "merge missing adapter",
        &[
            "merge",
            "--model",
            "T/model/no-weights",
            "--adapter",
            "T/missing",
            "--out",
            "T/out/merged",
        ],
        &["T/model/no-weights"],
    );
    run(&c, "model");
}

/// `fixture`, `import-gguf`, `tokenizer from-gguf`, `report`, `reproduce`, `bench`, `selftest`.
#[test]
fn file_and_tool_commands_refuse_hostile_inputs() {
    let mut c = Corpus::new();
    let two62 = "4611686018427387904";
    for (flag, value) in [
        ("--hidden", two62),
        ("--hidden", "0"),
        ("--intermediate", two62),
        ("--layers", "0"),
        ("--layers", "100000000"),
        ("--heads", "0"),
        ("--kv-heads", "3"),
        ("--vocab", "0"),
        ("--vocab", two62),
        ("--max-positions", "0"),
        ("--seed", "-1"),
        ("--dtype", "fp8"),
    ] {
        let expect = if value == "3" {
            "num_key_value_heads"
        } else {
            flag
        };
        // `--flag=value`, so that clap reads a negative number as the flag's value.
        let arg = format!("{flag}={value}");
        c.case(
            &format!("fixture {arg}"),
            &["fixture", "tiny-llama", &arg, "--out", "T/out/fixture"],
            &[expect],
        );
    }
    c.case(
        "fixture too many parameters",
        &[
            "fixture",
            "tiny-llama",
            "--hidden",
            "65536",
            "--vocab",
            "100000",
            "--out",
            "T/out/fixture",
        ],
        &["parameters", "over the limit"],
    );
    for (file, expect, parsers) in [
        ("empty", "empty.gguf", false),
        ("magic-only", "magic-only.gguf", false),
        ("wrong-magic", "wrong-magic.gguf", false),
        ("version-99", "version-99.gguf", false),
        ("huge-tensor-count", "huge-tensor-count.gguf", false),
        ("huge-kv-count", "huge-kv-count.gguf", false),
        ("huge-string", "huge-string.gguf", false),
        ("alignment-0", "alignment", true),
        ("deep-arrays", "deep-arrays.gguf", false),
        ("huge-array", "huge-array.gguf", false),
        // The divide by zero itself is pinned in tests/gguf.rs; this file also lacks a
        // vocabulary, which both commands name first.
        ("head-count-0", "head-count-0.gguf", true),
        ("bool-2", "boolean byte 2", true),
    ] {
        let path = format!("T/gguf/{file}.gguf");
        let import = ["import-gguf", &path, "--out", "T/out/imported"];
        let tok = ["tokenizer", "from-gguf", &path, "--out", "T/out/tok.json"];
        let _waited_on_parsers = parsers;
        c.case(&format!("import-gguf {file}"), &import, &[expect]);
        c.case(&format!("tokenizer from-gguf {file}"), &tok, &[expect]);
    }
    // Tensor-directory cases: the fixture files carry no vocabulary, so only the import
    // reaches the tensor checks.
    for (file, expect) in [
        ("type-q8-1", "ggml type 9"),
        ("type-99", "ggml type 99"),
        ("q4k-partial-block", "not a whole number of Q4K blocks"),
        ("q6k-partial-block", "not a whole number of Q6K blocks"),
        ("tensor-past-eof", "runs past the end of the file"),
        ("tensor-bytes-overflow", "overflow the byte count"),
        ("alignment-u64", "candle places the tensor data"),
    ] {
        let path = format!("T/gguf/{file}.gguf");
        c.case(
            &format!("import-gguf {file}"),
            &["import-gguf", &path, "--out", "T/out/imported"],
            &[expect, &path],
        );
    }
    for (path, expect) in [("T/missing.gguf", "No such file"), ("T/dir", "T/dir")] {
        c.case(
            &format!("import-gguf {path}"),
            &["import-gguf", path, "--out", "T/out/imported"],
            &[expect],
        );
        c.case(
            &format!("tokenizer from-gguf {path}"),
            &["tokenizer", "from-gguf", path, "--out", "T/out/tok.json"],
            &[expect],
        );
    }
    for (run, expect) in [
        ("T/missing", "T/missing"),
        ("T/run/empty", "T/run/empty"),
        ("T/run/bad-config", "T/run/bad-config"),
        ("T/run/not-utf8", "T/run/not-utf8"),
        ("T/data/one.json", "T/data/one.json"),
    ] {
        c.case(
            &format!("report {run}"),
            &["report", "--run", run, "--out", "T/out/REPORT.md"],
            &[expect],
        );
        c.case(&format!("reproduce {run}"), &["reproduce", run], &[expect]);
    }
    for (flags, expect) in [
        (vec!["--one", "--shapes", "bogus"], "--shapes"),
        (vec!["--shapes", "tiny", "--threads", "0"], "--threads"),
        (vec!["--shapes", "tiny", "--threads", two62], "--threads"),
        (vec!["--shapes", "tiny", "--steps", "0"], "--steps"),
        (vec!["--shapes", "tiny", "--rounds", "0"], "--rounds"),
        (
            vec!["--shapes", "tiny", "--gen-tokens", two62],
            "--gen-tokens",
        ),
        (vec!["--one", "--shapes", "tiny", "--steps=-1"], "--steps"),
        (vec!["--bogus"], "--bogus"),
    ] {
        c.case(
            &format!("bench {}", flags.join(" ")),
            &[&["bench"][..], &flags[..]].concat(),
            &[expect],
        );
    }
    for (flags, expect) in [
        (vec!["--device", "tpu"], "--device"),
        (vec!["--device", "cuda:x"], "--device"),
        (vec!["--precision", "fp8"], "--precision"),
        (vec!["--bogus"], "--bogus"),
    ] {
        c.case(
            &format!("selftest {}", flags.join(" ")),
            &[&["selftest"][..], &flags[..]].concat(),
            &[expect],
        );
    }
    c.case("no subcommand", &[], &["Usage"]);
    c.case("unknown subcommand", &["bogus"], &["bogus"]);
    run(&c, "tools");
}
