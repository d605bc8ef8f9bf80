//! Crash safety under `kill -9`: a smoke run with a checkpoint every step is killed with SIGKILL
//! at ten seeded random moments, two of them inside a checkpoint write (through the
//! `LORASFT_CRASH_AT` fault points, which abort the process exactly there), and resumed each
//! time. The finished run must equal an uninterrupted one bit for bit: every metrics line's
//! step, kind and loss, the adapter's bytes, and the TensorBoard file's scalars, each step once.

mod common;

use std::path::Path;
use std::process::{Command, ExitStatus};
use std::time::Duration;

use common::lorasft;
use lorasft::rng::Rng;

const STEPS: &str = "30";

fn train(out: &Path) -> Command {
    let mut c = lorasft();
    c.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "train",
            "--preset",
            "smoke",
            "--max-steps",
            STEPS,
            "--quiet",
            "--resume",
            "--tensorboard",
        ])
        .args([
            "--set",
            "train.save_every=1",
            "--set",
            "train.eval_every=10",
        ])
        .arg("--out-dir")
        .arg(out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    c
}

/// (step, kind, loss bits) of every metrics line.
fn losses(dir: &Path) -> Vec<(usize, String, u64)> {
    lorasft::records::read_metrics(&dir.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .map(|m| (m.step, format!("{:?}", m.kind), m.loss.to_bits()))
        .collect()
}

/// Starts a run and kills it after `ms` milliseconds; its exit status, or `None` when it was
/// killed (a run that finished first is returned as it finished).
fn run_and_kill(out: &Path, ms: u64) -> Option<ExitStatus> {
    let mut child = train(out).spawn().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_millis(ms);
    while std::time::Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    None
}

#[test]
fn ten_kills_at_random_moments_resume_bit_identically() {
    let reference = tempfile::tempdir().unwrap();
    assert!(train(reference.path()).status().unwrap().success());
    let reference = reference.path().join("smoke");

    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(20261202);
    let mut kills = 0;
    let mut finished_early = 0;
    while kills < 10 {
        if kills == 4 || kills == 7 {
            // A kill inside a checkpoint write: after its files, before the rename (4), and
            // after the rename, before `latest` moves (7).
            let point = if kills == 4 {
                "checkpoint-before-rename"
            } else {
                "checkpoint-before-latest"
            };
            let status = train(tmp.path())
                .env("LORASFT_CRASH_AT", point)
                .status()
                .unwrap();
            if status.success() {
                // No checkpoint was left to write (an earlier kill landed after the last one):
                // start over so that the crash point is reached.
                finished_early += 1;
                std::fs::remove_dir_all(tmp.path().join("smoke")).unwrap();
                continue;
            }
            assert!(
                status.code().is_none(),
                "{point}: the run must die there, got {status}"
            );
            kills += 1;
            continue;
        }
        match run_and_kill(tmp.path(), 150 + rng.below(1200)) {
            None => kills += 1,
            Some(status) => {
                assert!(status.success(), "a resumed run failed: {status}");
                finished_early += 1;
                assert!(
                    finished_early < 20,
                    "the run keeps finishing before the kill"
                );
                // Start over so that every kill lands inside a run.
                std::fs::remove_dir_all(tmp.path().join("smoke")).unwrap();
            }
        }
    }
    assert!(train(tmp.path()).status().unwrap().success());
    let resumed = tmp.path().join("smoke");
    assert_eq!(losses(&resumed), losses(&reference));
    let bytes = |d: &Path| std::fs::read(d.join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(bytes(&resumed), bytes(&reference), "adapter bytes differ");
    // The TensorBoard file: every (tag, step) once (`scalars` refuses a repeat) and, but for
    // the timing, the uninterrupted run's values.
    let curves = |d: &Path| {
        let mut s = common::tfevents::scalars(&common::tfevents::run_records(d).1);
        s.retain(|(tag, _), _| tag != "train/tokens_per_s");
        s.into_iter()
            .map(|(k, v)| (k, v.to_bits()))
            .collect::<Vec<_>>()
    };
    assert_eq!(curves(&resumed), curves(&reference));
    println!(
        "10 of 10 kills resumed bit-identically ({finished_early} runs finished before their kill)"
    );
}
