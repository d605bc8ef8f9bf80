//! Data parallelism without MPI: W ranks as threads of one process (`world::Local`) run the
//! trainer's multi-rank paths (sharded micro-batches, the gathered counts, the exact gradient
//! fold, sharded evaluation, rank 0 the one writer) and must give one process's numbers bit
//! for bit. The same runs under `mpirun` are in tests/mpi.rs (`--features mpi`).

mod common;

use std::path::Path;

use common::{run_bits as result, smoke};
use lorasft::data::batching::Batching;
use lorasft::records::Summary;
use lorasft::train::config::TrainConfig;
use lorasft::train::prepare::prepare;
use lorasft::train::run::{RunOptions, train_on};
use lorasft::world::{Local, Single};

/// A short smoke run with 4 micro-batches of 2 rows per step, dropout on, evaluated and
/// checkpointed every 3 steps, TensorBoard events on.
fn config(out: &Path, batching: Batching) -> TrainConfig {
    let mut c = smoke(out, 7);
    c.train.grad_accum = 4;
    c.train.batch_size = 2;
    c.train.eval_every = 3;
    c.train.save_every = 3;
    c.encode.batching = batching;
    c.prompts.truncate(1);
    // Rank 0 alone writes events; the ranks must still agree on where they start.
    c.report.tensorboard = true;
    assert!(c.lora.dropout > 0.0);
    c
}

/// Trains `cfg` on `ranks` threads-as-ranks; returns rank 0's summary (every rank must succeed).
fn train_ranks(ranks: usize, cfg: &TrainConfig, opts: &RunOptions) -> Summary {
    let mut all = Local::run(ranks, |w| train_on(w, prepare(cfg.clone()).unwrap(), opts));
    for (r, s) in all.iter().enumerate() {
        assert!(s.is_ok(), "rank {r}: {:?}", s.as_ref().err());
    }
    all.swap_remove(0).unwrap()
}

#[test]
fn one_two_and_four_ranks_give_one_process_bits_padded_and_packed() {
    for batching in [Batching::Padded, Batching::Packed] {
        let tmp = tempfile::tempdir().unwrap();
        let one = {
            let cfg = config(&tmp.path().join("w1"), batching);
            let s = lorasft::train::run::train(prepare(cfg).unwrap(), &RunOptions::default());
            result(&s.unwrap().run_dir)
        };
        assert!(one.0.len() > 4, "{batching:?}: too few metrics lines");
        for ranks in [1, 2, 4] {
            let cfg = config(&tmp.path().join(format!("w{ranks}-local")), batching);
            let s = train_ranks(ranks, &cfg, &RunOptions::default());
            let got = result(&s.run_dir);
            assert_eq!(got.0, one.0, "{batching:?}, {ranks} ranks: metrics differ");
            assert!(
                got.1 == one.1,
                "{batching:?}, {ranks} ranks: adapter bytes differ"
            );
            let manifest: lorasft::records::Manifest = serde_json::from_str(
                &std::fs::read_to_string(s.run_dir.join("manifest.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(manifest.parallelism.ranks, ranks);
            assert!(manifest.parallelism.bit_identical_to_one_process);
        }
    }
}

#[test]
fn a_run_stopped_on_two_ranks_resumes_on_four_as_if_never_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let whole = {
        let cfg = config(&tmp.path().join("whole"), Batching::Padded);
        result(&train_ranks(1, &cfg, &RunOptions::default()).run_dir)
    };
    let cfg = config(&tmp.path().join("parts"), Batching::Padded);
    let part = train_ranks(
        2,
        &cfg,
        &RunOptions {
            stop_at_step: Some(3),
            ..RunOptions::default()
        },
    );
    assert!(part.interrupted && part.steps == 3);
    let rest = train_ranks(
        4,
        &cfg,
        &RunOptions {
            resume: true,
            ..RunOptions::default()
        },
    );
    assert_eq!(rest.steps, 7);
    let got = result(&rest.run_dir);
    assert_eq!(got.0, whole.0, "metrics differ after the resume");
    assert!(got.1 == whole.1, "adapter bytes differ after the resume");
    let resumes = std::fs::read_to_string(rest.run_dir.join("resumes.json")).unwrap();
    assert!(
        resumes.contains("\"ranks\"") && resumes.contains("\"2\"") && resumes.contains("\"4\""),
        "the change of world size is not recorded: {resumes}"
    );
}

#[test]
fn a_step_that_cannot_be_shared_and_ranks_that_differ_are_refused_on_every_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(&tmp.path().join("odd"), Batching::Padded);
    cfg.train.grad_accum = 3;
    let errs = Local::run(2, |w| {
        train_on(w, prepare(cfg.clone()).unwrap(), &RunOptions::default()).unwrap_err()
    });
    for e in errs {
        let msg = e.to_string();
        assert!(
            msg.contains("grad_accum = 3") && msg.contains("2 ranks"),
            "{msg}"
        );
    }
    // Rank 1 started from another seed: its config and adapter differ from rank 0's.
    let cfg = config(&tmp.path().join("differ"), Batching::Padded);
    let errs = Local::run(2, |w| {
        let mut mine = cfg.clone();
        if w.rank() == 1 {
            mine.run.seed = 99;
        }
        train_on(w, prepare(mine).unwrap(), &RunOptions::default()).unwrap_err()
    });
    for e in errs {
        let msg = e.to_string();
        assert!(
            msg.contains("rank 1's config, data and starting adapter differs"),
            "{msg}"
        );
    }
}

#[test]
fn the_single_world_is_the_plain_trainer() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(&tmp.path().join("a"), Batching::GroupByLength);
    let a = result(
        &lorasft::train::run::train(prepare(cfg).unwrap(), &RunOptions::default())
            .unwrap()
            .run_dir,
    );
    let cfg = config(&tmp.path().join("b"), Batching::GroupByLength);
    let b = result(
        &train_on(&Single, prepare(cfg).unwrap(), &RunOptions::default())
            .unwrap()
            .run_dir,
    );
    assert_eq!(a.0, b.0);
    assert!(a.1 == b.1);
}

/// A build without the `mpi` feature started by a launcher as several processes refuses to
/// run (N copies would write one run directory); one process is fine.
#[cfg(not(feature = "mpi"))]
#[test]
fn a_launch_of_several_processes_without_the_feature_is_refused() {
    for (var, n) in [
        ("OMPI_COMM_WORLD_SIZE", "2"),
        ("PMI_SIZE", "4"),
        ("SLURM_NTASKS", "3"),
    ] {
        let out = common::lorasft()
            .args(["train", "--preset", "smoke", "--dry-run"])
            .env(var, n)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{var}={n}: {err}");
        assert!(
            err.contains(&format!("{var}={n}")) && err.contains("--features mpi"),
            "{var}={n}: {err}"
        );
    }
    let out = common::lorasft()
        .args(["train", "--preset", "smoke", "--dry-run"])
        .env("OMPI_COMM_WORLD_SIZE", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
