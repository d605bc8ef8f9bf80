//! The layering of `src/` stays one-way, and the shell around the core stays readable.
//!
//! Each top-level module has a layer (the list in `src/lib.rs` and `docs/ARCHITECTURE.md`);
//! a module may name `crate::X` only when X's layer is at or below its own. Inside `model`,
//! the fast path and the autograd helper sit below the ops, which sit below the layers and the
//! model, which sit below what builds models. The test reads the sources, so a new upward
//! import fails here with the file, line and the two layers named.

use std::path::{Path, PathBuf};

/// Top-level modules, lowest layer first.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "foundation",
        &[
            "error",
            "rng",
            "device",
            "sys",
            "thread_tuning",
            "alloc_tuning",
        ],
    ),
    ("data", &["data", "tokenizer", "gguf"]),
    (
        "model",
        &["model", "adapter", "verify", "generate", "inspect"],
    ),
    ("run records", &["records"]),
    ("training", &["train"]),
    ("tools", &["report", "bench", "selftest"]),
    ("command line", &["cli", "assets", "main"]),
];

/// Sub-layers inside `model`, lowest first.
const MODEL_LAYERS: &[&[&str]] = &[
    &["autograd", "cpu", "config"],
    &["ops", "loss"],
    &["lora"],
    &["llama"],
    &["load", "fixture", "gguf_import", "source"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, mods)| mods.contains(&module))
}

fn model_layer_of(sub: &str) -> Option<usize> {
    MODEL_LAYERS.iter().position(|mods| mods.contains(&sub))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module path of a file under `src/`: `src/model/cpu/ops.rs` -> ["model", "cpu", "ops"].
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|l| l == "mod" || l == "lib") {
        parts.pop();
    }
    parts
}

/// Every `crate::a::b` named on a line (outside comments): (a, b).
fn crate_paths(line: &str) -> Vec<(String, String)> {
    let code = line.split("//").next().unwrap_or("");
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let tail = &rest[i + "crate::".len()..];
        let ident = |s: &str| -> String {
            s.chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect()
        };
        let first = ident(tail);
        let second = tail[first.len()..]
            .strip_prefix("::")
            .map(ident)
            .unwrap_or_default();
        out.push((first.clone(), second));
        rest = &tail[first.len()..];
    }
    out
}

/// Upward imports, as messages.
fn violations(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut bad = Vec::new();
    for file in files {
        let path = module_path(src, &file);
        let Some(top) = path.first() else { continue };
        let Some(own) = layer_of(top) else {
            bad.push(format!(
                "{}: module `{top}` has no layer in this test",
                file.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in text.lines().enumerate() {
            for (target, sub) in crate_paths(line) {
                let Some(theirs) = layer_of(&target) else {
                    continue;
                };
                if theirs > own {
                    bad.push(format!(
                        "{}:{}: `{top}` ({}) imports `{target}` ({})",
                        file.display(),
                        n + 1,
                        LAYERS[own].0,
                        LAYERS[theirs].0
                    ));
                }
                if top == "model" && target == "model" && path.len() > 1 {
                    let (Some(a), Some(b)) = (model_layer_of(&path[1]), model_layer_of(&sub))
                    else {
                        continue;
                    };
                    if b > a {
                        bad.push(format!(
                            "{}:{}: model::{} imports model::{sub}, a layer above it",
                            file.display(),
                            n + 1,
                            path[1]
                        ));
                    }
                }
            }
        }
    }
    bad
}

#[test]
fn no_module_imports_from_a_layer_above_its_own() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let bad = violations(&src);
    assert!(bad.is_empty(), "upward imports:\n{}", bad.join("\n"));
}

#[test]
fn the_check_catches_an_upward_import() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    std::fs::create_dir_all(model.join("cpu")).unwrap();
    std::fs::write(model.join("llama.rs"), "use crate::train::step::Updater;\n").unwrap();
    std::fs::write(
        model.join("cpu/ops.rs"),
        "use crate::model::llama::Llama;\n",
    )
    .unwrap();
    std::fs::write(
        tmp.path().join("records.rs"),
        "// crate::train in a comment is fine\n",
    )
    .unwrap();
    let bad = violations(tmp.path());
    assert_eq!(bad.len(), 2, "{bad:#?}");
    assert!(
        bad[0].contains("`model` (model) imports `train` (training)")
            || bad[1].contains("`model` (model) imports `train` (training)")
    );
    assert!(
        bad.iter()
            .any(|b| b.contains("model::cpu imports model::llama"))
    );
}

/// Lengths of the functions in a file: (name, first line, lines). A function ends at the first
/// line that closes it at its own indentation.
fn function_lengths(text: &str) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let is_fn = [
            "fn ",
            "pub fn ",
            "pub(crate) fn ",
            "unsafe fn ",
            "pub unsafe fn ",
        ]
        .iter()
        .any(|p| trimmed.starts_with(p));
        if !is_fn || trimmed.ends_with(';') {
            continue;
        }
        let name: String = trimmed
            .split("fn ")
            .nth(1)
            .unwrap_or("")
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let close = format!("{}}}", " ".repeat(indent));
        if let Some(end) = lines[i..].iter().position(|l| *l == close) {
            out.push((name, i + 1, end + 1));
        }
    }
    out
}

#[test]
fn no_function_in_the_shell_is_longer_than_80_lines() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("src/main.rs")];
    for dir in ["src/train", "src/report", "src/bench", "src/cli"] {
        rust_files(&root.join(dir), &mut files);
    }
    let mut long = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        for (name, line, len) in function_lengths(&text) {
            if len > 80 {
                long.push(format!("{}:{line}: fn {name} is {len} lines", f.display()));
            }
        }
    }
    assert!(
        long.is_empty(),
        "functions over 80 lines:\n{}",
        long.join("\n")
    );
    let main = std::fs::read_to_string(root.join("src/main.rs")).unwrap();
    assert!(
        main.lines().count() <= 320,
        "src/main.rs is {} lines",
        main.lines().count()
    );
}

#[test]
fn function_lengths_count_to_the_closing_brace() {
    let text = "fn a() {\n    x();\n}\n\n    pub fn b(&self) -> u8 {\n        1\n    }\n";
    assert_eq!(
        function_lengths(text),
        vec![("a".into(), 1, 3), ("b".into(), 5, 3)]
    );
}

#[test]
fn the_repository_stands_alone() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    rust_files(&root.join("src"), &mut files);
    for dir in ["docs"] {
        for e in std::fs::read_dir(root.join(dir)).unwrap() {
            files.push(e.unwrap().path());
        }
    }
    let outside: Vec<String> = files
        .iter()
        .filter(|f| {
            std::fs::read_to_string(f)
                .unwrap_or_default()
                .contains("../shared")
        })
        .map(|f| f.display().to_string())
        .collect();
    assert!(outside.is_empty(), "files citing ../shared: {outside:?}");
}
