//! Data-parallel training under a real MPI launcher (`--features mpi`): the harness starts
//! `mpirun` with the built binary on the tiny fixture model, dropout on, padded and packed.
//! Without `mpirun` on PATH these tests fail (CI installs Open MPI), they never skip.
//!
//! Every process runs one thread (`RAYON_NUM_THREADS=1`): bit-identity is claimed for the
//! same threads per process.
#![cfg(feature = "mpi")]

mod common;

use common::run_bits as result;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A launch of `ranks` processes of the built lorasft with `args` (one process: no launcher).
fn launch(ranks: usize, args: &[String]) -> Command {
    let mut c = if ranks == 1 {
        common::lorasft()
    } else {
        let mut c = Command::new("mpirun");
        c.args(["--oversubscribe", "-np", &ranks.to_string()])
            .arg(env!("CARGO_BIN_EXE_lorasft"));
        c
    };
    c.args(args);
    with_test_env(c)
}

/// One thread per process, and Open MPI as CI containers need it: root, and no cross-memory
/// attach.
fn with_test_env(mut c: Command) -> Command {
    c.env("RAYON_NUM_THREADS", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .stdin(Stdio::null());
    c
}

/// Runs a launch to its end within `limit`, or fails naming what hung.
fn finish(mut c: Command, limit: Duration) -> Output {
    let child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {c:?} (is Open MPI installed? `apt-get install openmpi-bin libopenmpi-dev`): {e}"));
    let pid = child.id();
    let start = Instant::now();
    let waiter = std::thread::spawn(move || child.wait_with_output().unwrap());
    while !waiter.is_finished() {
        if start.elapsed() > limit {
            // SAFETY: kill(2) on the launcher's pid; it ends its ranks.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("{c:?} did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    waiter.join().unwrap()
}

/// The smoke preset with 4 micro-batches of 2 rows per step, evaluated and checkpointed every
/// 3 steps, into `out`.
fn train_args(out: &Path, steps: usize, batching: &str) -> Vec<String> {
    let mut a: Vec<String> = ["train", "--preset", "smoke", "--quiet", "--max-steps"]
        .map(String::from)
        .to_vec();
    a.push(steps.to_string());
    for set in [
        format!("run.out_dir={:?}", out.display().to_string()),
        "train.grad_accum=4".into(),
        "train.batch_size=2".into(),
        "train.eval_every=3".into(),
        "train.save_every=3".into(),
        format!("encode.batching={batching:?}"),
    ] {
        a.push("--set".into());
        a.push(set);
    }
    a
}

fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn run_dir(out: &Path) -> PathBuf {
    out.join("smoke")
}

#[test]
fn one_two_and_four_ranks_give_the_same_bits_and_the_report_states_the_ranks() {
    for batching in ["padded", "packed"] {
        let tmp = tempfile::tempdir().unwrap();
        let mut want = None;
        for ranks in [1, 2, 4] {
            let out = tmp.path().join(format!("w{ranks}"));
            let o = finish(
                launch(ranks, &train_args(&out, 7, batching)),
                Duration::from_secs(300),
            );
            ok(&o, &format!("{batching}, {ranks} ranks"));
            let got = result(&run_dir(&out));
            match &want {
                None => want = Some(got),
                Some(w) => {
                    assert_eq!(got.0, w.0, "{batching}, {ranks} ranks: metrics differ");
                    assert!(
                        got.1 == w.1,
                        "{batching}, {ranks} ranks: adapter bytes differ"
                    );
                }
            }
            let report = std::fs::read_to_string(run_dir(&out).join("REPORT.md")).unwrap();
            if ranks > 1 {
                assert!(
                    report.contains(&format!("Processes: {ranks} ranks, MPI")),
                    "the report does not state its {ranks} ranks"
                );
            }
        }
    }
}

#[test]
fn sigterm_checkpoints_every_rank_and_a_resume_on_another_world_size_is_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let steps = 150;
    let whole = tmp.path().join("whole");
    ok(
        &finish(
            launch(1, &train_args(&whole, steps, "padded")),
            Duration::from_secs(600),
        ),
        "uninterrupted",
    );
    let parts = tmp.path().join("parts");
    let mut child = launch(2, &train_args(&parts, steps, "padded"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun");
    // Once training has logged, SIGTERM the ranks themselves, as Slurm's preemption does.
    let metrics = run_dir(&parts).join("metrics.jsonl");
    let start = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 3 {
        assert!(start.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    let ranks = String::from_utf8(
        Command::new("pgrep")
            .args(["-P", &child.id().to_string()])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let pids: Vec<i32> = ranks
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 2, "rank processes: {ranks:?}");
    for pid in pids {
        // SAFETY: kill(2) on a rank process this test started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "a SIGTERMed job ends cleanly: {status:?}");
    let summary: lorasft::records::Summary = serde_json::from_str(
        &std::fs::read_to_string(run_dir(&parts).join("summary.json")).unwrap(),
    )
    .unwrap();
    assert!(
        summary.interrupted && summary.steps < steps,
        "{}",
        summary.steps
    );
    let mut resume = train_args(&parts, steps, "padded");
    resume.push("--resume".into());
    ok(
        &finish(launch(4, &resume), Duration::from_secs(600)),
        "resume on 4 ranks",
    );
    let (a, b) = (result(&run_dir(&whole)), result(&run_dir(&parts)));
    assert_eq!(
        a.0, b.0,
        "metrics differ after a SIGTERM at step {}",
        summary.steps
    );
    assert!(a.1 == b.1, "adapter bytes differ after the resume");
}

#[test]
fn a_killed_rank_ends_the_job_and_the_run_resumes_from_its_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let whole = tmp.path().join("whole");
    ok(
        &finish(
            launch(1, &train_args(&whole, 7, "padded")),
            Duration::from_secs(300),
        ),
        "whole",
    );
    let out = tmp.path().join("killed");
    let mut c = launch(2, &train_args(&out, 7, "padded"));
    // Rank 1 dies (abort, as kill -9 would leave it) at its first checkpoint, step 3.
    c.env("LORASFT_CRASH_AT", "rank1-checkpoint");
    let start = Instant::now();
    let o = finish(c, Duration::from_secs(120));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "the job went on without rank 1");
    assert!(
        err.contains("rank 1"),
        "the launcher's message names no rank: {err}"
    );
    println!("killed rank ended the job in {:?}", start.elapsed());
    let mut resume = train_args(&out, 7, "padded");
    resume.push("--resume".into());
    ok(
        &finish(launch(1, &resume), Duration::from_secs(300)),
        "resume in one process",
    );
    let (a, b) = (result(&run_dir(&whole)), result(&run_dir(&out)));
    assert_eq!(a.0, b.0);
    assert!(a.1 == b.1);
}

#[test]
fn a_rank_that_differs_stops_the_job_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let args = train_args(&tmp.path().join("differ"), 7, "padded");
    // MPMD: rank 1 starts from another seed.
    let mut c = Command::new("mpirun");
    c.args(["--oversubscribe", "-np", "1", env!("CARGO_BIN_EXE_lorasft")])
        .args(&args)
        .args([":", "-np", "1", env!("CARGO_BIN_EXE_lorasft")])
        .args(&args)
        .args(["--set", "run.seed=99"]);
    let o = finish(with_test_env(c), Duration::from_secs(120));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("rank 1's config, data and starting adapter differs from rank 0's"),
        "{err}"
    );
}

#[test]
fn reproduce_repeats_a_two_rank_run_in_one_process_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("two");
    ok(
        &finish(
            launch(2, &train_args(&out, 7, "packed")),
            Duration::from_secs(300),
        ),
        "2 ranks",
    );
    let o = finish(
        launch(
            1,
            &["reproduce".into(), run_dir(&out).display().to_string()],
        ),
        Duration::from_secs(300),
    );
    ok(&o, "reproduce");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("identical bit for bit"), "{text}");
}

#[test]
fn other_commands_refuse_to_run_on_several_ranks() {
    let o = finish(
        launch(
            2,
            &[
                "fixture".into(),
                "tiny-llama".into(),
                "--out".into(),
                "/nonexistent/x".into(),
            ],
        ),
        Duration::from_secs(120),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("only `lorasft train` runs on several ranks"),
        "{err}"
    );
}

#[test]
fn launched_ranks_share_the_cores_unless_told_otherwise() {
    let tmp = tempfile::tempdir().unwrap();
    for (set, want) in [(None, 1), (Some("2"), 2)] {
        let out = tmp.path().join(format!("t{want}"));
        let mut c = launch(2, &train_args(&out, 1, "padded"));
        // candle would count both cores for each of the 2 ranks.
        c.env_remove("RAYON_NUM_THREADS");
        if let Some(n) = set {
            c.env("RAYON_NUM_THREADS", n);
        }
        ok(&finish(c, Duration::from_secs(300)), "threads");
        let m: lorasft::records::Manifest = serde_json::from_str(
            &std::fs::read_to_string(run_dir(&out).join("manifest.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(m.threads, want, "RAYON_NUM_THREADS {set:?}");
        assert_eq!(m.parallelism.ranks, 2);
    }
}
