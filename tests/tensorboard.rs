//! TensorBoard event files, read back by a reader of the tests' own that shares nothing with
//! lorasft's writer (`common::tfevents`: its own CRC32C, TFRecord framing and protobuf wire
//! decoder). The reader must first read a golden file that tensorboardX wrote
//! (`scripts/tensorboardx_golden.py`), and lorasft's records must have that file's structure
//! (the same fields, of the same wire types, for a scalar and for the text summary). Then a smoke
//! run's scalars must equal its metrics.jsonl, and after a kill and a resume every step must be
//! there exactly once, with the uninterrupted run's values.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::smoke;
use common::tfevents::{decode, records, run_records, scalars, shape};
use lorasft::records::{Metric, MetricKind};
use lorasft::train::checkpoint;
use lorasft::train::run::{RunOptions, train};

const GOLDEN: &str = "tests/data/tensorboard/events.out.tfevents.golden";

/// The scalars a metrics.jsonl says the event file must hold.
fn expected(metrics: &[Metric]) -> BTreeMap<(String, i64), f32> {
    let mut out = BTreeMap::new();
    for m in metrics {
        let step = m.step as i64;
        let mut put = |tag: &str, v: f64| out.insert((tag.to_string(), step), v as f32);
        match m.kind {
            MetricKind::Eval => {
                put("eval/loss", m.loss);
            }
            MetricKind::Train => {
                put("train/loss", m.loss);
                put("train/learning_rate", m.lr.unwrap());
                put("train/grad_norm", m.grad_norm.unwrap());
                put("train/tokens_per_s", m.tokens_per_s.unwrap());
            }
        }
    }
    out
}

#[test]
fn the_reader_reads_tensorboardx_golden_file() {
    let bytes = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(GOLDEN)).unwrap();
    let recs = records(&bytes);
    let first = decode(&recs[0]);
    assert_eq!(first.file_version.as_deref(), Some("brain.Event:2"));
    let text = decode(&recs[1]);
    assert_eq!(
        (text.tag.as_str(), text.plugin.as_deref(), text.step),
        ("config/text_summary", Some("text"), 0)
    );
    assert_eq!(
        text.text.as_deref(),
        Some("[run]\nname = \"golden\"\nseed = 0\n")
    );
    // The values scripts/tensorboardx_golden.py wrote.
    let want: BTreeMap<(String, i64), f32> = [
        ("eval/loss", 0, 3.0),
        ("eval/loss", 10, 1.5),
        ("train/loss", 1, 2.5),
        ("train/learning_rate", 1, 0.003_906_25),
        ("train/grad_norm", 1, 1.25),
        ("train/tokens_per_s", 1, 1024.0),
        ("train/loss", 5, 1.75),
        ("train/learning_rate", 5, 0.01),
        ("train/grad_norm", 5, 0.5),
        ("train/tokens_per_s", 5, 2048.0),
        ("train/loss", 10, 1.125),
        ("train/learning_rate", 10, 0.007_812_5),
        ("train/grad_norm", 10, 0.375),
        ("train/tokens_per_s", 10, 4096.0),
    ]
    .into_iter()
    .map(|(t, s, v)| ((t.to_string(), s), v))
    .collect();
    assert_eq!(scalars(&recs), want);
}

#[test]
fn a_smoke_run_writes_its_metrics_and_config_with_tensorboardx_structure() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = smoke(tmp.path(), 12);
    cfg.train.eval_every = 4;
    cfg.report.tensorboard = true;
    let s = common::train_run(cfg, &RunOptions::default());
    let (path, recs) = run_records(&s.run_dir);
    let name = path.file_name().unwrap().to_str().unwrap();
    let stamp = name.strip_prefix("events.out.tfevents.").unwrap();
    let (secs, host) = stamp.split_once('.').unwrap();
    assert!(
        secs.parse::<u64>().unwrap() > 1_600_000_000 && !host.is_empty(),
        "{name}"
    );

    let metrics = lorasft::records::read_metrics(&s.run_dir.join("metrics.jsonl")).unwrap();
    assert!(metrics.iter().filter(|m| m.is_eval()).count() >= 3);
    assert_eq!(scalars(&recs), expected(&metrics));
    let config = decode(&recs[1]);
    assert_eq!(
        (config.tag.as_str(), config.plugin.as_deref(), config.step),
        ("config/text_summary", Some("text"), 0)
    );
    let toml = std::fs::read_to_string(s.run_dir.join("config.toml")).unwrap();
    assert_eq!(config.text.as_deref(), Some(toml.as_str()));
    assert!(toml.contains("[report]\ntensorboard = true\n"), "{toml}");

    // The structure of each kind of record equals tensorboardX's.
    let golden =
        records(&std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(GOLDEN)).unwrap());
    let by_tag = |recs: &[Vec<u8>]| -> BTreeMap<String, Vec<String>> {
        let mut m = BTreeMap::new();
        for r in recs {
            let d = decode(r);
            let key = d.file_version.clone().unwrap_or(d.tag);
            m.entry(format!("{key} at step {}", d.step.min(1)))
                .or_insert_with(|| shape(r, "Event"));
        }
        m
    };
    let (ours, theirs) = (by_tag(&recs), by_tag(&golden));
    assert_eq!(ours.len(), 8, "{:?}", ours.keys());
    assert_eq!(ours, theirs);
    assert!(
        theirs["config/text_summary at step 0"]
            .iter()
            .any(|f| f.contains("9:Metadata{1:PluginData{1:len}}")),
        "{theirs:?}"
    );
}

#[test]
fn after_a_kill_and_a_resume_each_step_is_there_once_with_the_uninterrupted_values() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut cfg = smoke(a.path(), 12);
    cfg.train.log_every = 1;
    cfg.train.save_every = 4;
    cfg.train.eval_every = 4;
    cfg.report.tensorboard = true;
    let full = common::train_run(cfg.clone(), &RunOptions::default());
    cfg.run.out_dir = b.path().to_path_buf();
    let run = |resume, stop_at_step| {
        let p = lorasft::train::prepare::prepare(cfg.clone()).unwrap();
        let opts = RunOptions {
            resume,
            stop_at_step,
            ..RunOptions::default()
        };
        train(p, &opts).unwrap()
    };
    let part = run(false, Some(6));
    assert!(part.interrupted && part.steps == 6);
    // As if killed after step 6's records were written and before its checkpoint was: the
    // newest checkpoint left is step 4's.
    checkpoint::roll_back(&part.run_dir, 5).unwrap();
    let (_, before) = run_records(&part.run_dir);
    assert!(scalars(&before).contains_key(&("train/loss".into(), 6)));

    let resumed = run(true, None);
    assert_eq!(resumed.steps, 12);
    let (_, recs) = run_records(&resumed.run_dir);
    let got = scalars(&recs);
    let (_, full_recs) = run_records(&full.run_dir);
    let want = scalars(&full_recs);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "every step once"
    );
    for (key, v) in &want {
        if key.0 != "train/tokens_per_s" {
            assert_eq!(got[key].to_bits(), v.to_bits(), "{key:?}");
        }
    }
    let metrics = lorasft::records::read_metrics(&resumed.run_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(got, expected(&metrics));
    // The config as text where each part started: step 0, and step 4 where it resumed.
    let texts: Vec<i64> = recs
        .iter()
        .map(|r| decode(r))
        .filter(|d| d.text.is_some())
        .map(|d| d.step)
        .collect();
    assert_eq!(texts, [0, 4]);
}

#[test]
fn the_tensorboard_flag_writes_an_event_file_and_without_it_there_is_none() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, flag) in [("with", true), ("without", false)] {
        let mut c = common::lorasft();
        c.current_dir(env!("CARGO_MANIFEST_DIR")).args([
            "train",
            "--preset",
            "smoke",
            "--max-steps",
            "2",
            "--quiet",
            "--name",
            name,
        ]);
        c.arg("--out-dir").arg(tmp.path());
        if flag {
            c.arg("--tensorboard");
        }
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (_, recs) = run_records(&tmp.path().join("with"));
    let s = scalars(&recs);
    for tag in [
        "train/loss",
        "train/learning_rate",
        "train/grad_norm",
        "train/tokens_per_s",
    ] {
        assert!(s.contains_key(&(tag.to_string(), 2)), "{tag}");
    }
    assert!(s.contains_key(&("eval/loss".to_string(), 2)));
    assert!(!tmp.path().join("without/tensorboard").exists());
}
