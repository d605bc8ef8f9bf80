//! Progress wherever lorasft runs: the binary with stderr redirected prints one line per
//! logged step and evaluation (text, or JSON lines with the documented keys), nothing with
//! `--quiet`, a bounded number of lines for GGUF import and export, and on a terminal the bar,
//! without colour under `NO_COLOR`.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Output;

use common::lorasft;
use serde_json::Value;

/// The smoke preset (60 steps, log_every 5, eval_every 20) into `out` with `extra` flags;
/// stderr is a pipe.
fn smoke(out: &Path, extra: &[&str]) -> Output {
    let out = lorasft()
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["train", "--preset", "smoke", "--out-dir"])
        .arg(out)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "train failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).unwrap()
}

/// The steps a smoke run logs: the first, every fifth, the last.
fn logged_steps() -> Vec<u64> {
    let mut v = vec![1];
    v.extend((5..=60).step_by(5));
    v
}

/// The steps a smoke run evaluates at: before the first update, every 20th.
const EVAL_STEPS: [u64; 4] = [0, 20, 40, 60];

#[test]
fn train_off_a_terminal_prints_a_line_per_logged_step_and_per_evaluation() {
    let tmp = tempfile::tempdir().unwrap();
    let err = stderr(&smoke(tmp.path(), &[]));
    assert!(
        !err.contains('\x1b'),
        "no escape codes off a terminal:\n{err}"
    );
    let train = regex::Regex::new(
        r"^step (\d+)/60 \| loss \d+\.\d{4} \| lr \d\.\d{2}e-?\d+ \| grad norm \d+\.\d{3} \| \d+ tok/s \| elapsed \d\d:\d\d \| eta (\d\d:\d\d|\?)$",
    )
    .unwrap();
    let eval = regex::Regex::new(
        r"^step (\d+)/60 \| eval loss \d+\.\d{4} \| ppl \d+\.\d{2} \| elapsed \d\d:\d\d \| eta (\d\d:\d\d|\?)$",
    )
    .unwrap();
    let step_of = |re: &regex::Regex, l: &str| re.captures(l).map(|c| c[1].parse::<u64>().unwrap());
    let progress: Vec<&str> = err.lines().filter(|l| l.starts_with("step ")).collect();
    let trained: Vec<u64> = progress.iter().filter_map(|l| step_of(&train, l)).collect();
    let evaluated: Vec<u64> = progress.iter().filter_map(|l| step_of(&eval, l)).collect();
    assert_eq!(trained, logged_steps(), "{err}");
    assert_eq!(evaluated, EVAL_STEPS, "{err}");
    assert_eq!(
        progress.len(),
        13 + 4,
        "every step line matches a format:\n{err}"
    );
    // In order: the baseline first, each evaluation after its step's line, the last one last.
    assert!(eval.is_match(progress[0]) && progress[0].starts_with("step 0/60"));
    let at_20 = progress
        .iter()
        .position(|l| l.starts_with("step 20/60 | loss"));
    assert_eq!(
        progress
            .iter()
            .position(|l| l.starts_with("step 20/60 | eval")),
        at_20.map(|i| i + 1)
    );
    assert!(progress[16].starts_with("step 60/60 | eval") && progress[16].ends_with("eta 00:00"));
    // Nothing else on stderr but the two startup lines.
    assert_eq!(err.lines().count(), 17 + 2, "{err}");
}

#[test]
fn quiet_prints_no_progress() {
    let tmp = tempfile::tempdir().unwrap();
    let err = stderr(&smoke(tmp.path(), &["--quiet", "--log-format", "json"]));
    assert!(
        err.lines()
            .all(|l| !l.starts_with("step ") && !l.starts_with('{')),
        "{err}"
    );
    assert_eq!(err.lines().count(), 2, "only the startup lines:\n{err}");
    assert!(err.starts_with("model fixture:0 |"), "{err}");
}

/// The keys of each JSON event, as docs/training.md lists them.
fn keys(event: &str) -> BTreeSet<&'static str> {
    let k: &[&str] = match event {
        "train" => &[
            "event",
            "step",
            "total_steps",
            "loss",
            "lr",
            "grad_norm",
            "tokens_per_s",
            "elapsed_s",
            "eta_s",
        ],
        "eval" => &[
            "event",
            "step",
            "total_steps",
            "loss",
            "ppl",
            "elapsed_s",
            "eta_s",
        ],
        "message" => &["event", "text"],
        "progress" => &[
            "event",
            "task",
            "done",
            "total",
            "unit",
            "elapsed_s",
            "eta_s",
        ],
        other => panic!("undocumented event {other:?}"),
    };
    k.iter().copied().collect()
}

/// Every stderr line as a JSON object with exactly its event's documented keys.
fn json_events(err: &str) -> Vec<Value> {
    err.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            let event = v["event"]
                .as_str()
                .unwrap_or_else(|| panic!("no event: {l}"));
            let got: BTreeSet<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
            assert_eq!(got, keys(event), "{l}");
            v
        })
        .collect()
}

#[test]
fn log_format_json_prints_json_lines_with_the_documented_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let err = stderr(&smoke(tmp.path(), &["--log-format", "json"]));
    let events = json_events(&err);
    let of = |kind: &str| -> Vec<&Value> { events.iter().filter(|v| v["event"] == kind).collect() };
    assert_eq!(of("message").len(), 1, "the startup summary:\n{err}");
    assert!(
        of("message")[0]["text"]
            .as_str()
            .unwrap()
            .starts_with("model fixture:0")
    );
    let steps = |kind: &str| -> Vec<u64> {
        of(kind)
            .iter()
            .map(|v| v["step"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(steps("train"), logged_steps());
    assert_eq!(steps("eval"), EVAL_STEPS);
    assert_eq!(events.len(), 1 + 13 + 4);
    // The losses are the ones metrics.jsonl holds, to the bit.
    let metrics: Vec<Value> = std::fs::read_to_string(tmp.path().join("smoke/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for kind in ["train", "eval"] {
        let logged: Vec<(u64, f64)> = metrics
            .iter()
            .filter(|m| m["kind"] == kind)
            .map(|m| (m["step"].as_u64().unwrap(), m["loss"].as_f64().unwrap()))
            .collect();
        let shown: Vec<(u64, f64)> = of(kind)
            .iter()
            .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
            .collect();
        assert_eq!(shown, logged, "{kind}");
    }
    for v in of("train") {
        assert_eq!(v["total_steps"], 60);
        assert!(v["tokens_per_s"].as_f64().unwrap() > 0.0, "{v}");
        assert!(v["eta_s"].as_f64().unwrap() >= 0.0, "{v}");
    }
    assert!(
        of("eval")[0]["eta_s"].is_null(),
        "no pace before the first step"
    );
    let last = of("train").last().unwrap()["eta_s"].as_f64().unwrap();
    assert_eq!(last, 0.0);
}

/// Runs the binary with `args`; it must succeed. Its stderr.
fn stderr_ok(args: &[&str]) -> String {
    let out = lorasft().args(args).output().unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{args:?} failed:\n{err}");
    err
}

#[test]
fn gguf_export_and_import_report_progress_a_bounded_number_of_times() {
    let tmp = tempfile::tempdir().unwrap();
    let path = |p: &str| tmp.path().join(p).to_str().unwrap().to_string();
    let (model, gguf, back) = (path("m"), path("m.gguf"), path("back"));
    common::stdout_ok(lorasft().args(["fixture", "tiny-llama", "--layers", "12", "--out", &model]));
    let tok = common::fixture_tokenizer();
    let export = [
        "export-gguf",
        "--model",
        &model,
        "--tokenizer",
        tok.to_str().unwrap(),
        "--type",
        "q8_0",
        "--out",
        &gguf,
    ];
    // 12 layers of 9 tensors, the embedding, the final norm and lm_head.
    let tensors = 12 * 9 + 3;
    let err = stderr_ok(&export);
    assert!(!err.contains('\x1b'), "{err}");
    let quantize: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("export-gguf quantize: "))
        .collect();
    assert!((2..=12).contains(&quantize.len()), "{err}");
    assert_eq!(
        quantize[0],
        format!("export-gguf quantize: 0/{tensors} tensors")
    );
    let end = format!("export-gguf quantize: {tensors}/{tensors} tensors (100%) | elapsed ");
    assert!(quantize.last().unwrap().starts_with(&end), "{err}");
    let write: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("export-gguf write: "))
        .collect();
    assert_eq!(write.len(), 2, "{err}");
    assert_eq!(write[0], "export-gguf write: 0/1 files");

    let err = stderr_ok(&["import-gguf", &gguf, "--out", &back, "--log-format", "json"]);
    let events = json_events(&err);
    let read: Vec<&Value> = events
        .iter()
        .filter(|v| v["task"] == "import-gguf read")
        .collect();
    assert!((2..=12).contains(&read.len()), "{err}");
    let done: Vec<u64> = read.iter().map(|v| v["done"].as_u64().unwrap()).collect();
    assert_eq!(done[0], 0);
    assert_eq!(*done.last().unwrap(), tensors);
    assert!(done.windows(2).all(|w| w[0] < w[1]), "{done:?}");
    assert!(
        read.iter()
            .all(|v| v["total"] == tensors && v["unit"] == "tensors")
    );
    let write = events
        .iter()
        .filter(|v| v["task"] == "import-gguf write")
        .count();
    assert_eq!(write, 2, "{err}");
    assert_eq!(events.len(), read.len() + 2, "{err}");

    let quiet = stderr_ok(&["import-gguf", &gguf, "--out", &path("quiet"), "--quiet"]);
    assert_eq!(quiet, "", "--quiet import prints nothing on stderr");
}

#[test]
fn data_encode_and_eval_report_their_records() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = common::fixture_tokenizer();
    let tok = tok.to_str().unwrap();
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/instructions.json");
    let out = tmp.path().join("e.jsonl");
    let err = stderr_ok(&[
        "data",
        "encode",
        "--tokenizer",
        tok,
        "--data",
        data,
        "--out",
        out.to_str().unwrap(),
    ]);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("data encode: "))
        .collect();
    assert_eq!(lines.first(), Some(&"data encode: 0/44 records"), "{err}");
    assert!(
        lines
            .last()
            .unwrap()
            .starts_with("data encode: 44/44 records (100%)"),
        "{err}"
    );
    assert!(lines.len() <= 12, "{err}");
    assert_eq!(err.lines().count(), lines.len() + 1, "{err}");
    assert!(
        err.lines()
            .last()
            .unwrap()
            .starts_with("wrote 44 examples to "),
        "{err}"
    );
    let eval = [
        "eval",
        "--model",
        "fixture:0",
        "--tokenizer",
        tok,
        "--data",
        data,
        "--max-len",
        "128",
        "--log-format",
        "json",
    ];
    let out = lorasft().args(eval).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let events = json_events(&stderr(&out));
    assert!(events.len() >= 2 && events.iter().all(|v| v["task"] == "eval"));
    assert_eq!(events.last().unwrap()["done"], 44);
    assert_eq!(events.last().unwrap()["unit"], "examples");
}

/// stderr and stdout as a terminal: the child writes into a pseudo-terminal read here.
#[cfg(target_os = "linux")]
fn on_a_terminal(mut cmd: std::process::Command) -> String {
    use std::io::Read;
    use std::os::fd::{FromRawFd, OwnedFd};
    let (mut master, mut slave) = (0, 0);
    let size = libc::winsize {
        ws_row: 40,
        ws_col: 160,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two descriptors into the given integers; `size` outlives the call.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(rc, 0, "openpty failed");
    // SAFETY: both descriptors were just opened and are owned here alone.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    // stdout too: indicatif colours the bar by what console says of stdout.
    let out = slave.try_clone().unwrap();
    let mut child = cmd.stderr(slave).stdout(out).spawn().unwrap();
    // The command holds this process's copy of the terminal's far end: once it is dropped,
    // reading sees the end (EIO) when the child is done.
    drop(cmd);
    let mut reader = std::fs::File::from(master);
    let read = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            bytes.extend_from_slice(&buf[..n]);
        }
        bytes
    });
    let status = child.wait().unwrap();
    assert!(status.success());
    String::from_utf8_lossy(&read.join().unwrap()).into_owned()
}

#[cfg(target_os = "linux")]
#[test]
fn a_terminal_gets_the_bar_and_no_colour_under_no_color() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |no_color: Option<&str>| {
        let mut cmd = lorasft();
        cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
            .args([
                "train",
                "--preset",
                "smoke",
                "--max-steps",
                "10",
                "--overwrite",
                "--out-dir",
            ])
            .arg(tmp.path())
            .env_remove("NO_COLOR")
            .env("TERM", "xterm-256color");
        if let Some(v) = no_color {
            cmd.env("NO_COLOR", v);
        }
        on_a_terminal(cmd)
    };
    let colour = regex::Regex::new("\x1b\\[[0-9;]*m").unwrap();
    let plain = run(Some("1"));
    assert!(plain.contains("10/10"), "the bar counts steps:\n{plain}");
    assert!(
        !plain.contains("step 5/10 | loss"),
        "a terminal gets the bar, not lines"
    );
    assert!(
        plain.contains("step 10/10 | eval loss"),
        "evaluations print above the bar"
    );
    assert!(
        !colour.is_match(&plain),
        "NO_COLOR: no colour codes:\n{plain:?}"
    );
    let coloured = run(None);
    assert!(
        colour.is_match(&coloured),
        "the bar is coloured without NO_COLOR:\n{coloured:?}"
    );
}
