//! Special files and oversized files at every argument that takes a path. The arguments come
//! from the binary's own command tree (`lorasft path-args`), so a path flag added later fails
//! this test until it has a case here.
//!
//! Each argument gets, in place of a good path: a FIFO with no writer (whose plain `open`
//! would block forever), a socket, a directory where a file belongs (or a file where a
//! directory belongs), and, for inputs, `/dev/zero` (a device that never ends). Every case
//! runs in a child process: it must end within a generous guard timeout with exit status 1
//! or 2, no panic, and an error naming the path, and the child's peak RSS (from `wait4`'s
//! rusage) must stay under a bound far below what an unbounded read would reach. Outputs must
//! never be replaced when they are special files. Oversized inputs (sparse files one byte past
//! each ceiling) are refused before they are read, naming the size and the ceiling.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::lorasft;

/// The most memory any case's child may touch: the legitimate work here (a tiny model, a
/// 44-record dataset) peaks near 150 MiB; an unbounded read of `/dev/zero` passes this bound
/// within a second.
const PEAK_RSS_BOUND_KIB: i64 = 1 << 20;
/// A guard against hangs, not a timing assertion.
const GUARD: Duration = Duration::from_secs(90);

/// What an argument names.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    /// A file read.
    File,
    /// A directory read (a model, an adapter, a run).
    Dir,
    /// A file written.
    OutFile,
    /// A directory written (or created below).
    OutDir,
}

/// The fixtures every invocation draws on.
struct Fx {
    t: tempfile::TempDir,
}

impl Fx {
    fn p(&self, rel: &str) -> String {
        self.t.path().join(rel).to_str().unwrap().to_string()
    }

    fn root(rel: &str) -> String {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(rel)
            .to_str()
            .unwrap()
            .to_string()
    }

    /// A fixture model with the fixture tokenizer, its GGUF, a one-step smoke run (its adapter
    /// and run directory), a template and a conversation.
    fn new() -> Self {
        let fx = Self {
            t: tempfile::tempdir().unwrap(),
        };
        let model = fx.p("model");
        common::output_ok(lorasft().args(["fixture", "tiny-llama", "--out", &model]));
        std::fs::copy(
            common::fixture_tokenizer(),
            Path::new(&model).join("tokenizer.json"),
        )
        .unwrap();
        common::output_ok(lorasft().args([
            "export-gguf",
            "--model",
            &model,
            "--type",
            "f32",
            "--out",
            &fx.p("model.gguf"),
        ]));
        common::output_ok(
            lorasft()
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .args(["train", "--preset", "smoke", "--max-steps", "1", "--quiet"])
                .args(["--out-dir", &fx.p("runs")]),
        );
        std::fs::write(
            fx.p("chat.jinja"),
            "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}",
        )
        .unwrap();
        std::fs::write(
            fx.p("messages.json"),
            r#"[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]"#,
        )
        .unwrap();
        std::fs::create_dir(fx.p("out")).unwrap();
        std::fs::create_dir(fx.p("hostile")).unwrap();
        fx
    }

    /// A working invocation for `arg` with its path at `X`, and what the path names; `None`
    /// for an argument this table does not know (the test then fails, naming it).
    fn invocation(&self, arg: &str) -> Option<(Vec<String>, Role)> {
        let (model, data, tok) = (
            self.p("model"),
            Self::root("fixtures/instructions.json"),
            Self::root("fixtures/tokenizer.json"),
        );
        let (adapter, run) = (self.p("runs/smoke/adapter"), self.p("runs/smoke"));
        let o = |n: &str| self.p(&format!("out/{n}"));
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        use Role::*;
        let (args, role) = match arg {
            "fixture tiny-llama --out" => (s(&["fixture", "tiny-llama", "--out", "X"]), OutDir),
            "inspect --model" => (s(&["inspect", "--model", "X"]), Dir),
            "tokenizer from-gguf <FILE>" => (
                s(&["tokenizer", "from-gguf", "X", "--out", &o("t.json")]),
                File,
            ),
            "tokenizer from-gguf --out" => (
                s(&[
                    "tokenizer",
                    "from-gguf",
                    &self.p("model.gguf"),
                    "--out",
                    "X",
                ]),
                OutFile,
            ),
            "tokenizer train-fixture --data" => (
                s(&[
                    "tokenizer",
                    "train-fixture",
                    "--data",
                    "X",
                    "--out",
                    &o("t.json"),
                ]),
                File,
            ),
            "tokenizer train-fixture --out" => (
                s(&["tokenizer", "train-fixture", "--data", &data, "--out", "X"]),
                OutFile,
            ),
            "chat render --template" => (
                s(&[
                    "chat",
                    "render",
                    "--template",
                    "X",
                    "--messages",
                    &self.p("messages.json"),
                ]),
                File,
            ),
            "chat render --messages" => (
                s(&[
                    "chat",
                    "render",
                    "--template",
                    &self.p("chat.jinja"),
                    "--messages",
                    "X",
                ]),
                File,
            ),
            "train --config" => (
                s(&[
                    "train",
                    "--preset",
                    "smoke",
                    "--max-steps",
                    "1",
                    "--quiet",
                    "--config",
                    "X",
                ])
                .into_iter()
                .chain(s(&["--out-dir", &o("runs")]))
                .collect(),
                File,
            ),
            "train --out-dir" => (
                s(&[
                    "train",
                    "--preset",
                    "smoke",
                    "--max-steps",
                    "1",
                    "--quiet",
                    "--out-dir",
                    "X",
                ]),
                OutDir,
            ),
            "train --init-adapter" => (
                s(&["train", "--preset", "smoke", "--max-steps", "1", "--quiet"])
                    .into_iter()
                    .chain(s(&["--out-dir", &o("runs"), "--init-adapter", "X"]))
                    .collect(),
                Dir,
            ),
            "merge --model" | "merge --adapter" | "merge --out" => {
                let mut v = s(&["merge", "--model", &model, "--adapter", &adapter]);
                v.extend(s(&["--out", &o("merged")]));
                return Some(substitute(v, arg));
            }
            "report --run" => (s(&["report", "--run", "X", "--out", &o("R.md")]), Dir),
            "report --out" => (s(&["report", "--run", &run, "--out", "X"]), OutFile),
            "reproduce <RUN>" => (s(&["reproduce", "X"]), Dir),
            "import-gguf <FILE>" => (s(&["import-gguf", "X", "--out", &o("imported")]), File),
            "import-gguf --out" => (
                s(&["import-gguf", &self.p("model.gguf"), "--out", "X"]),
                OutDir,
            ),
            a if a.starts_with("data ") => {
                let sub = a.split(' ').nth(1).unwrap();
                let mut v = s(&["data", sub, "--data", &data, "--tokenizer", &tok]);
                if sub == "encode" {
                    v.extend(s(&["--out", &o("enc.jsonl")]));
                }
                if a.ends_with("--chat-template") {
                    v.extend(s(&[
                        "--template",
                        "chat",
                        "--chat-template",
                        &self.p("chat.jinja"),
                    ]));
                }
                if a.ends_with("--model") {
                    v.retain(|x| x != "--tokenizer" && x != &tok);
                    v.extend(s(&["--model", &model]));
                }
                return Some(substitute(v, a));
            }
            a if a.starts_with("eval ") => {
                let mut v = s(&["eval", "--model", &model, "--adapter", &adapter]);
                v.extend(s(&[
                    "--tokenizer",
                    &tok,
                    "--data",
                    &data,
                    "--per-record",
                    &o("p.json"),
                ]));
                if a.ends_with("--chat-template") {
                    v.extend(s(&[
                        "--template",
                        "chat",
                        "--chat-template",
                        &self.p("chat.jinja"),
                    ]));
                }
                return Some(substitute(v, a));
            }
            a if a.starts_with("generate ") => {
                let mut v = s(&["generate", "--model", &model, "--adapter", &adapter]);
                v.extend(s(&["--tokenizer", &tok, "--max-new-tokens", "2"]));
                if a.ends_with("--messages") || a.ends_with("--chat-template") {
                    v.extend(s(&["--chat", "--messages", &self.p("messages.json")]));
                    v.extend(s(&["--chat-template", &self.p("chat.jinja")]));
                } else {
                    v.extend(s(&["--prompt", "hi"]));
                }
                return Some(substitute(v, a));
            }
            a if a.starts_with("export-gguf ") => {
                let mut v = s(&["export-gguf", "--model", &model, "--adapter", &adapter]);
                v.extend(s(&[
                    "--tokenizer",
                    &tok,
                    "--type",
                    "f32",
                    "--out",
                    &o("e.gguf"),
                ]));
                return Some(substitute(v, a));
            }
            "bench --compare" => (
                s(&[
                    "bench",
                    "--shapes",
                    "tiny",
                    "--steps",
                    "1",
                    "--threads",
                    "1",
                    "--compare",
                    "X",
                ]),
                File,
            ),
            "bench --json" => (
                s(&[
                    "bench",
                    "--shapes",
                    "tiny",
                    "--steps",
                    "1",
                    "--threads",
                    "1",
                    "--json",
                    "X",
                ]),
                OutFile,
            ),
            "bench --data" | "bench --tokenizer" => {
                let mut v = s(&[
                    "bench",
                    "--shapes",
                    "tiny",
                    "--steps",
                    "1",
                    "--threads",
                    "1",
                ]);
                v.extend(s(&["--data", &data, "--tokenizer", &tok]));
                return Some(substitute(v, arg));
            }
            "bench --memory-gguf" => (s(&["bench", "--memory", "--memory-gguf", "X"]), File),
            _ => return None,
        };
        Some((args, role))
    }
}

/// `v` with the value of the flag `arg` names replaced by `X`, and that flag's role.
fn substitute(mut v: Vec<String>, arg: &str) -> (Vec<String>, Role) {
    let flag = arg.rsplit(' ').next().unwrap();
    let i = v
        .iter()
        .position(|x| x == flag)
        .unwrap_or_else(|| panic!("{arg}: the base invocation lacks {flag}"));
    v[i + 1] = "X".into();
    let role = match flag {
        "--model" | "--adapter" => Role::Dir,
        "--out" if arg.starts_with("merge") => Role::OutDir,
        "--out" | "--per-record" | "--json" => Role::OutFile,
        _ => Role::File,
    };
    (v, role)
}

/// A special file of each kind in `dir`, by name.
fn specials(dir: &Path) -> Vec<(&'static str, PathBuf)> {
    let fifo = dir.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo only creates the node.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let socket = dir.join("socket");
    // The listener is leaked: the socket file stays a socket for the test's life.
    std::mem::forget(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let sub = dir.join("a-directory");
    std::fs::create_dir(&sub).unwrap();
    let file = dir.join("a-file");
    std::fs::write(&file, "not what it should be\n").unwrap();
    vec![
        ("a FIFO", fifo),
        ("a socket", socket),
        ("a directory", sub),
        ("a regular file", file),
        ("a device", PathBuf::from("/dev/zero")),
    ]
}

/// How a child ended: exit code (or signal), stderr, and peak RSS in KiB.
struct Ended {
    code: Option<i32>,
    stderr: String,
    peak_kib: i64,
    timed_out: bool,
}

/// Runs `args` in a child with the guard timeout; its status, stderr and peak RSS.
// The child is reaped by `wait4`, which also gives its rusage, not by `Child::wait`.
#[allow(clippy::zombie_processes)]
fn run_child(args: &[String]) -> Ended {
    let errfile = tempfile::NamedTempFile::new().unwrap();
    let mut child = lorasft()
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(errfile.reopen().unwrap())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let start = Instant::now();
    let (status, usage, timed_out) = loop {
        let mut status = 0;
        // SAFETY: rusage is plain data that wait4 fills in.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: waits only for our own child, without blocking.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            break (status, usage, false);
        }
        if start.elapsed() > GUARD {
            let _ = child.kill();
            // SAFETY: as above, now blocking until the killed child is reaped.
            unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
            break (status, usage, true);
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let code = std::process::ExitStatus::from_raw(status).code();
    Ended {
        code,
        stderr: std::fs::read_to_string(errfile.path()).unwrap_or_default(),
        peak_kib: usage.ru_maxrss,
        timed_out,
    }
}

/// Whether `kind` is hostile where `role` is expected (a regular file is fine where a file
/// belongs, a directory where a directory belongs); devices are never offered as outputs.
fn hostile(kind: &str, role: Role) -> bool {
    !matches!(
        (kind, role),
        ("a regular file", Role::File | Role::OutFile)
            | ("a directory", Role::Dir | Role::OutDir)
            | ("a device", Role::OutFile | Role::OutDir)
    )
}

#[test]
fn every_path_argument_refuses_special_files_without_hanging_or_reading_without_bound() {
    let fx = Fx::new();
    let args = common::stdout_ok(lorasft().arg("path-args"));
    let kinds = specials(&PathBuf::from(fx.p("hostile")));
    let (mut failures, mut ran) = (Vec::new(), 0);
    for arg in args.lines() {
        let Some((base, role)) = fx.invocation(arg) else {
            failures.push(format!("{arg}: no case in tests/hostile_paths.rs: add one"));
            continue;
        };
        for (kind, path) in kinds.iter().filter(|(k, _)| hostile(k, role)) {
            let p = path.to_str().unwrap();
            let argv: Vec<String> = base
                .iter()
                .map(|a| if a == "X" { p.to_string() } else { a.clone() })
                .collect();
            ran += 1;
            let e = run_child(&argv);
            let mut problems = Vec::new();
            if e.timed_out {
                problems.push(format!("still running after {GUARD:?} (a hang)"));
            }
            if !matches!(e.code, Some(1 | 2)) {
                problems.push(format!("exit {:?}, not a refusal", e.code));
            }
            if e.stderr.contains("panicked") {
                problems.push("panicked".into());
            }
            if !e.stderr.contains(p) {
                problems.push("stderr does not name the path".into());
            }
            if e.peak_kib > PEAK_RSS_BOUND_KIB {
                problems.push(format!("peak RSS {} MiB", e.peak_kib >> 10));
            }
            // A special file given as an output is never replaced.
            if kind != &"a regular file" && kind != &"a directory" && !special(path) {
                problems.push(format!("{kind} was replaced"));
            }
            if !problems.is_empty() {
                let tail: String = e.stderr.chars().take(400).collect();
                failures.push(format!(
                    "{arg} = {kind}: {}\n    stderr: {tail}",
                    problems.join("; ")
                ));
            }
        }
    }
    eprintln!("{} path arguments, {ran} cases", args.lines().count());
    assert!(ran > 150, "only {ran} cases ran");
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Whether `p` is still a FIFO, socket or device.
fn special(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(p).is_ok_and(|m| {
        let t = m.file_type();
        t.is_fifo() || t.is_socket() || t.is_char_device()
    })
}

#[test]
fn inputs_one_byte_past_their_ceiling_are_refused_before_they_are_read() {
    let t = tempfile::tempdir().unwrap();
    // Sparse files: their size is real to fstat, their bytes cost nothing on disk.
    let sparse = |name: &str, len: u64| {
        let p = t.path().join(name);
        std::fs::File::create(&p).unwrap().set_len(len).unwrap();
        p.to_str().unwrap().to_string()
    };
    let data = sparse("huge.json", lorasft::input::DATASET_CEILING + 1);
    let tok = sparse("tokenizer.json", lorasft::input::TOKENIZER_CEILING + 1);
    let cfg = sparse("run.toml", lorasft::input::CONFIG_CEILING + 1);
    let model = t.path().join("model");
    std::fs::create_dir(&model).unwrap();
    let config = model.join("config.json");
    std::fs::File::create(&config)
        .unwrap()
        .set_len(lorasft::input::CONFIG_CEILING + 1)
        .unwrap();
    let fixtures = |rel: &str| Fx::root(rel);
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let cases = [
        (
            s(&[
                "data",
                "stats",
                "--data",
                &data,
                "--tokenizer",
                &fixtures("fixtures/tokenizer.json"),
            ]),
            data.clone(),
            "4096 MiB",
        ),
        (
            s(&[
                "data",
                "stats",
                "--data",
                &fixtures("fixtures/instructions.json"),
                "--tokenizer",
                &tok,
            ]),
            tok.clone(),
            "1024 MiB",
        ),
        (
            s(&["train", "--preset", "smoke", "--config", &cfg, "--dry-run"]),
            cfg.clone(),
            "16 MiB",
        ),
        (
            s(&["inspect", "--model", model.to_str().unwrap()]),
            config.to_str().unwrap().to_string(),
            "16 MiB",
        ),
    ];
    for (argv, path, ceiling) in cases {
        let e = run_child(&argv);
        assert!(
            e.code == Some(1)
                && e.stderr.contains(&path)
                && e.stderr.contains(ceiling)
                && e.stderr.contains("ceiling")
                && e.peak_kib < PEAK_RSS_BOUND_KIB,
            "{argv:?}: exit {:?}, peak {} KiB, stderr {}",
            e.code,
            e.peak_kib,
            e.stderr
        );
    }
}

#[test]
fn set_values_carry_one_value_and_two_input_mismatches_name_both_inputs() {
    let fx = Fx::new();
    let dry = |set: &str| s_vec(&["train", "--preset", "smoke", "--dry-run", "--set", set]);
    for (set, expect) in [
        ("run.name=\"x\"\n[optim]\nlr=5", "--set"),
        ("optim.lr=0.5\noptim.schedule=\"constant\"", "left over"),
        ("optim.lr=0.5 7", "--set"),
        ("lora.targets=[\"q_proj\"] [\"v_proj\"]", "--set"),
        ("train.max_steps={a=1}\nb=2", "--set"),
    ] {
        let e = run_child(&dry(set));
        assert!(
            e.code == Some(1) && e.stderr.contains(expect) && !e.stderr.contains("panicked"),
            "--set {set:?}: exit {:?}: {}",
            e.code,
            e.stderr
        );
    }
    // A model whose vocabulary is smaller than the tokenizer's.
    let small = fx.p("small-vocab");
    common::output_ok(lorasft().args(["fixture", "tiny-llama", "--vocab", "16", "--out", &small]));
    let tok = Fx::root("fixtures/tokenizer.json");
    let data = Fx::root("fixtures/instructions.json");
    refused_naming(
        &[
            "eval",
            "--model",
            &small,
            "--tokenizer",
            &tok,
            "--data",
            &data,
        ],
        &[&tok, &small],
    );
    // An adapter trained on another shape.
    let wide = fx.p("wide");
    common::output_ok(lorasft().args(["fixture", "tiny-llama", "--hidden", "96", "--out", &wide]));
    let adapter = fx.p("runs/smoke/adapter");
    refused_naming(
        &[
            "eval",
            "--model",
            &wide,
            "--adapter",
            &adapter,
            "--tokenizer",
            &tok,
            "--data",
            &data,
        ],
        &[&adapter, &wide],
    );
    // Weights that disagree with their config.json.
    let cfg_path = Path::new(&wide).join("config.json");
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(
        &cfg_path,
        text.replace("\"hidden_size\": 96", "\"hidden_size\": 64"),
    )
    .unwrap();
    refused_naming(
        &["inspect", "--model", &wide],
        &["model.safetensors", cfg_path.to_str().unwrap()],
    );
}

/// Runs `args`, which must fail with status 1 and an error naming every one of `names`.
fn refused_naming(args: &[&str], names: &[&str]) {
    let e = run_child(&s_vec(args));
    assert!(
        e.code == Some(1) && names.iter().all(|n| e.stderr.contains(n)),
        "{args:?} should fail naming {names:?}: {}",
        e.stderr
    );
}

fn s_vec(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[test]
fn a_hub_cache_whose_snapshot_files_are_symlinks_into_blobs_still_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    common::output_ok(
        lorasft()
            .args(["fixture", "tiny-llama", "--seed", "2", "--out"])
            .arg(&model),
    );
    // The hf-hub layout: snapshots/REV/FILE -> ../../blobs/HASH.
    let repo = tmp.path().join("hub/models--org--tiny");
    let (blobs, snap) = (repo.join("blobs"), repo.join("snapshots/rev1"));
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "rev1").unwrap();
    for (i, f) in ["config.json", "model.safetensors"].iter().enumerate() {
        let blob = format!("blob{i}");
        std::fs::copy(model.join(f), blobs.join(&blob)).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snap.join(f)).unwrap();
    }
    let out = common::stdout_ok(
        lorasft()
            .args(["inspect", "--model", "org/tiny"])
            .env("HF_HOME", tmp.path())
            .env("HF_HUB_OFFLINE", "1"),
    );
    assert!(out.contains("counted from loaded tensors"), "{out}");
}
