//! Loading datasets: every malformed input is an error naming file, line, record and field.

mod common;

use std::path::{Path, PathBuf};

use lorasft::data::dataset::{FileFormat, SplitSpec, load, split};

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn err_of(bytes: &[u8], name: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    load(&write(dir.path(), name, bytes))
        .unwrap_err()
        .to_string()
}

#[test]
fn fixture_dataset_loads_with_all_its_edge_cases() {
    let ds = load(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/instructions.json"
    )))
    .unwrap();
    assert_eq!(ds.file_format, FileFormat::JsonArray);
    assert!(ds.records.len() >= 40);
    let records: Vec<_> = ds
        .records
        .iter()
        .filter_map(|s| s.as_instruction())
        .collect();
    assert_eq!(
        records.len(),
        ds.records.len(),
        "every fixture record is Alpaca"
    );
    assert!(
        records.iter().any(|r| r.input.is_none()),
        "a record without input"
    );
    assert!(
        records.iter().any(|r| r
            .input
            .as_deref()
            .is_some_and(|s| !s.is_empty() && s.trim().is_empty())),
        "whitespace-only input"
    );
    assert!(
        records.iter().any(|r| r.output.is_empty()),
        "an empty output"
    );
    assert!(records.iter().any(|r| !r.instruction.is_ascii()), "unicode");
    assert!(
        records.iter().any(|r| r.output.len() > 5000),
        "an output far beyond 512 tokens"
    );
    assert_eq!(ds.lines[0], 2);
    assert_eq!(ds.lines.len(), ds.records.len());
}

#[test]
fn jsonl_and_json_array_give_the_same_records() {
    let dir = tempfile::tempdir().unwrap();
    let a = write(dir.path(), "a.json", br#"[{"instruction": "x", "output": "y"}, {"instruction": "p", "input": "q", "output": "r"}]"#);
    let b = write(dir.path(), "b.jsonl", b"{\"instruction\": \"x\", \"output\": \"y\"}\n\n{\"instruction\": \"p\", \"input\": \"q\", \"output\": \"r\"}\n");
    let (a, b) = (load(&a).unwrap(), load(&b).unwrap());
    assert_eq!(a.records, b.records);
    assert_eq!(b.file_format, FileFormat::JsonLines);
    assert_eq!(b.lines, vec![1, 3]);
}

#[test]
fn missing_field_names_file_line_record_and_field() {
    let e = err_of(
        b"{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"c\"}\n",
        "d.jsonl",
    );
    assert!(
        e.contains("d.jsonl:2: record 1, field `output`: missing"),
        "{e}"
    );
    let e = err_of(
        b"[\n  {\"instruction\": \"a\", \"output\": \"b\"},\n  {\n    \"output\": \"c\"\n  }\n]",
        "d.json",
    );
    assert!(
        e.contains("d.json:3: record 1, field `instruction`: missing"),
        "{e}"
    );
}

#[test]
fn mistyped_fields_name_the_type_found() {
    let e = err_of(
        br#"[{"instruction": "a", "input": 3, "output": "b"}]"#,
        "t.json",
    );
    assert!(
        e.contains("t.json:1: record 0, field `input`: expected a string, found number 3"),
        "{e}"
    );
    let e = err_of(
        b"{\"instruction\": [\"a\"], \"output\": \"b\"}\n",
        "t.jsonl",
    );
    assert!(
        e.contains("field `instruction`: expected a string, found array"),
        "{e}"
    );
    let e = err_of(br#"[{"instruction": "a", "output": null}]"#, "n.json");
    assert!(
        e.contains("field `output`: expected a string, found null"),
        "{e}"
    );
    let e = err_of(br#"[["not", "an", "object"]]"#, "o.json");
    assert!(e.contains("record 0: expected an object"), "{e}");
}

#[test]
fn malformed_json_gives_line_and_column() {
    let e = err_of(b"{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"a\" \"output\": \"b\"}\n", "m.jsonl");
    assert!(e.contains("m.jsonl:2:"), "{e}");
    let e = err_of(
        b"[\n{\"instruction\": \"a\", \"output\": \"b\"},\n{\"instruction\": \"a\",\n",
        "m.json",
    );
    assert!(e.contains("m.json:4:"), "{e}");
    let e = err_of(b"instruction,output\n", "c.csv");
    assert!(e.contains("expected a JSON array"), "{e}");
}

#[test]
fn empty_files_and_arrays_are_errors() {
    for (bytes, name) in [
        (&b""[..], "e.json"),
        (b"  \n\n", "w.jsonl"),
        (b"[]", "a.json"),
    ] {
        let e = err_of(bytes, name);
        assert!(e.contains(name) && e.contains("no records"), "{e}");
    }
}

#[test]
fn non_utf8_bytes_name_the_line_and_offset() {
    let e = err_of(b"{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"\xff\", \"output\": \"b\"}\n", "u.jsonl");
    assert!(
        e.contains("u.jsonl:2: invalid UTF-8 at byte offset 53"),
        "{e}"
    );
}

#[test]
fn split_is_seeded_deterministic_and_covers_every_record_once() {
    let a = split(100, SplitSpec::Fraction(0.1), 42).unwrap();
    assert_eq!(a, split(100, SplitSpec::Fraction(0.1), 42).unwrap());
    assert_ne!(a, split(100, SplitSpec::Fraction(0.1), 43).unwrap());
    assert_eq!(a.validation.len(), 10);
    let mut all: Vec<usize> = a.train.iter().chain(&a.validation).copied().collect();
    all.sort_unstable();
    assert_eq!(all, (0..100).collect::<Vec<_>>());
    assert_eq!(
        split(999, SplitSpec::Fraction(0.05), 0)
            .unwrap()
            .validation
            .len(),
        50,
        "fractions round up"
    );
    assert_eq!(
        split(10, SplitSpec::Count(3), 0).unwrap().validation.len(),
        3
    );
    assert!(split(10, SplitSpec::Count(10), 0).is_err());
    assert!(
        split(10, SplitSpec::Fraction(1.5), 0)
            .unwrap_err()
            .to_string()
            .contains("1.5")
    );
}

#[test]
fn alpaca_en_demo_loads_cleanly() {
    let Some(assets) = common::assets() else {
        return;
    };
    let ds = load(&assets.join("data/alpaca_en_demo.json")).unwrap();
    assert_eq!(ds.records.len(), 999);
    assert_eq!(ds.records.iter().filter(|r| r.has_input()).count(), 412);
}
