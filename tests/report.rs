//! The run's own REPORT.md: its shape pinned by a snapshot of a smoke run (volatile values
//! redacted), every section in the reference's order, and `lorasft reproduce` on a smoke run.

mod common;

use common::smoke;

use lorasft::train::run::RunOptions;

/// The reference's section headings, in order.
const SECTIONS: [&str; 14] = [
    "Objective",
    "Base Model Details",
    "Fine-Tuning Strategy",
    "LoRA Configuration",
    "Dataset Structure",
    "Prompt Formatting",
    "Tokenization & Preprocessing",
    "Training Framework Decision",
    "Training Configuration",
    "Hardware & Environment",
    "Verification & Validation",
    "Issues Faced & Resolutions",
    "Model Card Alignment",
    "Conclusion",
];

#[test]
fn smoke_report_has_the_reference_sections_and_a_stable_shape() {
    let tmp = tempfile::tempdir().unwrap();
    let s = common::train_run(smoke(tmp.path(), 12), &RunOptions::default());
    let report = std::fs::read_to_string(s.run_dir.join("REPORT.md")).unwrap();
    let mut at = 0;
    for sec in SECTIONS {
        let pos = report
            .find(&format!("\n## {sec}\n"))
            .unwrap_or_else(|| panic!("section {sec} missing"));
        assert!(pos > at, "section {sec} out of order");
        at = pos;
    }
    assert!(report.starts_with("---\nlibrary_name: peft\npipeline_tag: text-generation\n"));
    assert!(
        report.contains("Status: Completed Successfully"),
        "a smoke run passes every check"
    );
    for svg in ["REPORT-loss.svg", "REPORT-lr.svg"] {
        let text = std::fs::read_to_string(s.run_dir.join(svg)).unwrap();
        assert!(
            text.starts_with("<svg") && text.contains("<polyline"),
            "{svg} has no curve"
        );
    }
    // Every number in the results table is a line of metrics.jsonl.
    let metrics = lorasft::records::read_metrics(&s.run_dir.join("metrics.jsonl")).unwrap();
    for m in metrics.iter().filter(|m| m.is_train()) {
        assert!(
            report.contains(&format!("| {} | {:.4} |", m.step, m.loss)),
            "step {} missing from the report",
            m.step
        );
    }

    // The shape, with volatile values redacted: times, hosts, paths, and every measured float
    // (they may differ in the last bits on another CPU).
    let out = tmp.path().join("redacted.md");
    lorasft::report::write_to(&s.run_dir, &out, true).unwrap();
    let text = std::fs::read_to_string(&out).unwrap();
    let text = text
        .replace(tmp.path().to_str().unwrap(), "<tmp>")
        .replace(env!("CARGO_MANIFEST_DIR"), "<repo>");
    let floats = regex::Regex::new(r"\d+\.\d+(e-?\d+)?").unwrap();
    let text = floats.replace_all(&text, "<f>");
    insta::with_settings!({snapshot_path => "../golden", prepend_module_to_snapshot => false, omit_expression => true}, {
        insta::assert_snapshot!("report_smoke", text);
    });
}

#[test]
fn reproduce_repeats_a_smoke_run_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let s = common::train_run(smoke(tmp.path(), 6), &RunOptions::default());
    let r = lorasft::train::reproduce::reproduce(&s.run_dir).unwrap();
    assert!(
        r.matched(),
        "first mismatch {:?}, adapter identical {}",
        r.first_mismatch,
        r.adapter_identical
    );
    let lines = std::fs::read_to_string(s.run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert_eq!(r.compared, lines);
    assert!(lines >= 5, "step 0 eval, steps 1, 5, 6 and the final eval");
    assert!(r.run_dir.ends_with("smoke-reproduce"));
}

#[test]
fn report_command_writes_the_report_and_its_curves_where_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let s = common::train_run(smoke(tmp.path(), 3), &RunOptions::default());
    let out = tmp.path().join("docs/R.md");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_lorasft"))
        .args(["report", "--run"])
        .arg(&s.run_dir)
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        out.exists()
            && tmp.path().join("docs/R-loss.svg").exists()
            && tmp.path().join("docs/R-lr.svg").exists()
    );
    assert!(
        std::fs::read_to_string(&out)
            .unwrap()
            .contains("![loss](R-loss.svg)")
    );
}
