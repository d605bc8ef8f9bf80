//! TensorBoard event files, read back by a reader of this file's own that shares nothing with
//! lorasft's writer: its own CRC32C (bit by bit), its own TFRecord framing and a plain protobuf
//! wire decoder. The reader must first read a golden file that tensorboardX wrote
//! (`scripts/tensorboardx_golden.py`), and lorasft's records must have that file's structure
//! (the same fields, of the same wire types, for a scalar and for the text summary). Then a smoke
//! run's scalars must equal its metrics.jsonl, and after a kill and a resume every step must be
//! there exactly once, with the uninterrupted run's values.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::smoke;
use lorasft::records::{Metric, MetricKind};
use lorasft::train::checkpoint;
use lorasft::train::run::{RunOptions, train};

const GOLDEN: &str = "tests/data/tensorboard/events.out.tfevents.golden";

/// CRC32C (Castagnoli, reflected polynomial 0x82F63B78), one bit at a time.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// TFRecord's mask of a CRC.
fn masked(data: &[u8]) -> u32 {
    let c = crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// Every record of an event file, each of its two CRCs checked; the file must end on a record.
fn records(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        assert!(bytes.len() >= at + 12, "a torn header at byte {at}");
        let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
        assert_eq!(
            u32_at(bytes, at + 8),
            masked(&bytes[at..at + 8]),
            "length CRC at byte {at}"
        );
        let data = &bytes[at + 12..at + 12 + len];
        assert_eq!(
            u32_at(bytes, at + 12 + len),
            masked(data),
            "data CRC of the record at byte {at}"
        );
        out.push(data.to_vec());
        at += 16 + len;
    }
    assert_eq!(at, bytes.len());
    out
}

/// One protobuf field's value, by wire type.
#[derive(Debug, Clone, PartialEq)]
enum Wire {
    Varint(u64),
    I64(u64),
    Len(Vec<u8>),
    I32(u32),
}

fn varint(b: &[u8], at: &mut usize) -> u64 {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = b[*at];
        *at += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return v;
        }
    }
    panic!("a varint longer than 10 bytes");
}

/// A message's fields in wire order.
fn fields(b: &[u8]) -> Vec<(u64, Wire)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < b.len() {
        let key = varint(b, &mut at);
        let value = match key & 7 {
            0 => Wire::Varint(varint(b, &mut at)),
            1 => {
                at += 8;
                Wire::I64(u64::from_le_bytes(b[at - 8..at].try_into().unwrap()))
            }
            2 => {
                let len = varint(b, &mut at) as usize;
                at += len;
                Wire::Len(b[at - len..at].to_vec())
            }
            5 => {
                at += 4;
                Wire::I32(u32_at(b, at - 4))
            }
            t => panic!("wire type {t}"),
        };
        out.push((key >> 3, value));
    }
    out
}

fn first(f: &[(u64, Wire)], n: u64) -> Option<&Wire> {
    f.iter().find(|(k, _)| *k == n).map(|(_, w)| w)
}

fn bytes_of(w: Option<&Wire>) -> &[u8] {
    match w {
        Some(Wire::Len(b)) => b,
        None => &[],
        w => panic!("not a length-delimited field: {w:?}"),
    }
}

fn string_of(w: Option<&Wire>) -> String {
    String::from_utf8(bytes_of(w).to_vec()).unwrap()
}

/// What a reader needs of an Event: its step and one summary value (lorasft and tensorboardX
/// write one value per event).
#[derive(Debug, Clone, PartialEq)]
struct Decoded {
    step: i64,
    file_version: Option<String>,
    tag: String,
    simple_value: Option<f32>,
    plugin: Option<String>,
    text: Option<String>,
}

/// Decodes an Event (tensorflow/core/util/event.proto) and its Summary.Value.
fn decode(record: &[u8]) -> Decoded {
    let e = fields(record);
    let step = match first(&e, 2) {
        Some(Wire::Varint(v)) => *v as i64,
        None => 0,
        w => panic!("step: {w:?}"),
    };
    assert!(matches!(first(&e, 1), Some(Wire::I64(_))), "wall_time");
    let summary = fields(bytes_of(first(&e, 5)));
    assert!(summary.len() <= 1, "one value per event");
    let value = fields(bytes_of(first(&summary, 1)));
    let simple_value = match first(&value, 2) {
        Some(Wire::I32(bits)) => Some(f32::from_bits(*bits)),
        None => None,
        w => panic!("simple_value: {w:?}"),
    };
    let metadata = fields(bytes_of(first(&value, 9)));
    let plugin = first(&metadata, 1).map(|p| string_of(first(&fields(bytes_of(Some(p))), 1)));
    let text = first(&value, 8).map(|t| {
        let tensor = fields(bytes_of(Some(t)));
        assert_eq!(first(&tensor, 1), Some(&Wire::Varint(7)), "dtype DT_STRING");
        string_of(first(&tensor, 8))
    });
    Decoded {
        step,
        file_version: first(&e, 3).map(|w| string_of(Some(w))),
        tag: string_of(first(&value, 1)),
        simple_value,
        plugin,
        text,
    }
}

/// A record's structure: each field's number and wire type, and the fields of the messages
/// inside it, following the schema's message fields (Event.summary, Summary.value,
/// Value.tensor, Value.metadata, SummaryMetadata.plugin_data, TensorProto.tensor_shape,
/// TensorShapeProto.dim); field order ignored.
fn shape(b: &[u8], message: &str) -> Vec<String> {
    let mut out: Vec<String> = fields(b)
        .into_iter()
        .map(|(n, w)| {
            let inner = match (message, n) {
                ("Event", 5) => Some("Summary"),
                ("Summary", 1) => Some("Value"),
                ("Value", 8) => Some("Tensor"),
                ("Value", 9) => Some("Metadata"),
                ("Metadata", 1) => Some("PluginData"),
                ("Tensor", 2) => Some("Shape"),
                ("Shape", 2) => Some("Dim"),
                _ => None,
            };
            match (&w, inner) {
                (Wire::Len(b), Some(m)) => format!("{n}:{m}{{{}}}", shape(b, m).join(",")),
                (Wire::Varint(_), _) => format!("{n}:varint"),
                (Wire::I64(_), _) => format!("{n}:i64"),
                (Wire::I32(_), _) => format!("{n}:i32"),
                (Wire::Len(_), None) => format!("{n}:len"),
            }
        })
        .collect();
    out.sort();
    out
}

/// The records of the one event file in a run's `tensorboard/`.
fn run_records(run: &Path) -> (PathBuf, Vec<Vec<u8>>) {
    let dir = run.join("tensorboard");
    let files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let bytes = std::fs::read(&files[0]).unwrap();
    (files[0].clone(), records(&bytes))
}

/// (tag, step) -> value of every scalar, each pair at most once.
fn scalars(records: &[Vec<u8>]) -> BTreeMap<(String, i64), f32> {
    let mut out = BTreeMap::new();
    for r in records {
        let d = decode(r);
        if let Some(v) = d.simple_value {
            let key = (d.tag.clone(), d.step);
            assert!(out.insert(key.clone(), v).is_none(), "{key:?} twice");
        }
    }
    out
}

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
