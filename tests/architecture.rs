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
            "input",
            "output",
            "embedded",
            "cache",
            "thread_tuning",
            "world",
            "alloc_tuning",
            "progress",
        ],
    ),
    ("data", &["data", "chat", "tokenizer", "gguf"]),
    (
        "model",
        &[
            "model", "adapter", "verify", "generate", "inspect", "export",
        ],
    ),
    ("run records", &["records"]),
    ("training", &["train"]),
    ("tools", &["report", "bench", "selftest"]),
    ("command line", &["cli", "assets", "main"]),
];

/// Sub-layers inside `model`, lowest first.
const MODEL_LAYERS: &[&[&str]] = &[
    &["autograd", "cpu", "config", "visibility", "frozen"],
    &["ops", "loss"],
    &["lora", "recompute"],
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

/// `line` without its `//` comment (a `//` inside a string literal is kept).
fn code_of(line: &str) -> &str {
    let mut in_str = false;
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        match c {
            '"' if prev != '\\' => in_str = !in_str,
            '/' if !in_str && prev == '/' => return &line[..i - 1],
            _ => {}
        }
        prev = c;
    }
    line
}

fn ident(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// The items of a `{...}` group at the start of `s` (nested groups kept whole), split at the
/// top-level commas.
fn group_items(s: &str) -> Vec<String> {
    let mut depth = 0;
    let mut items = vec![String::new()];
    for c in s.chars() {
        match c {
            '{' => {
                depth += 1;
                if depth == 1 {
                    continue;
                }
            }
            '}' => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            ',' if depth == 1 => {
                items.push(String::new());
                continue;
            }
            _ => {}
        }
        items.last_mut().unwrap().push(c);
    }
    items
        .into_iter()
        .map(|i| i.trim().to_string())
        .filter(|i| !i.is_empty())
        .collect()
}

/// Every crate path a source text names, as (line, segments): the segments after `crate::`,
/// or what `super::` resolves to from `module`, up to three; a `{...}` group yields one path
/// per item. Comments are skipped.
fn crate_paths_in(text: &str, module: &[String]) -> Vec<(usize, Vec<String>)> {
    let code: String = text.lines().map(|l| format!("{}\n", code_of(l))).collect();
    let line_of = |at: usize| code[..at].matches('\n').count() + 1;
    let mut out = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        paths_from(&code[at + "crate::".len()..], Vec::new(), &mut |p| {
            out.push((line_of(at), p))
        });
    }
    let mut at = 0;
    while let Some(i) = code[at..].find("super::") {
        let start = at + i;
        let before = code[..start].chars().last().unwrap_or(' ');
        let mut rest = &code[start..];
        let mut ups = 0;
        while let Some(r) = rest.strip_prefix("super::") {
            ups += 1;
            rest = r;
        }
        at = code.len() - rest.len();
        if before.is_alphanumeric() || before == '_' || before == ':' || ups > module.len() {
            continue;
        }
        // A file `a/b.rs` is module [a, b]: `super` is [a]; `a/mod.rs` is [a]: `super` is the root.
        let head = module[..module.len() - ups].to_vec();
        paths_from(rest, head, &mut |p| out.push((line_of(start), p)));
    }
    out
}

/// Reads `a::b::{c, d::e}` after a path prefix `head`, calling `f` with each full path (the
/// prefix and segments, up to three).
fn paths_from(s: &str, head: Vec<String>, f: &mut dyn FnMut(Vec<String>)) {
    let s = s.trim_start();
    if s.starts_with('{') {
        for item in group_items(s) {
            paths_from(&item, head.clone(), f);
        }
        return;
    }
    let first = ident(s);
    if first.is_empty() {
        if !head.is_empty() {
            f(head);
        }
        return;
    }
    let mut path = head;
    path.push(first.clone());
    let rest = &s[first.len()..];
    match rest.strip_prefix("::") {
        Some(more) if path.len() < 3 => paths_from(more, path, f),
        _ => f(path),
    }
}

/// What `model/mod.rs` re-exports: name -> the sub-module it comes from.
fn model_reexports(src: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(src.join("model/mod.rs")).unwrap_or_default();
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub use "))
    {
        let sub = ident(line);
        let rest = line[sub.len()..].trim_start_matches("::");
        let names = if rest.starts_with('{') {
            group_items(rest)
        } else {
            vec![rest.trim_end_matches(';').to_string()]
        };
        for n in names {
            out.push((ident(&n), sub.clone()));
        }
    }
    out
}

/// Upward imports, as messages.
fn violations(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let reexports = model_reexports(src);
    let mut bad = Vec::new();
    for file in files {
        let path = module_path(src, &file);
        let text = std::fs::read_to_string(&file).unwrap();
        if path.is_empty() {
            bad.extend(root_reexports(&file, &text));
            continue;
        }
        let top = &path[0];
        let Some(own) = layer_of(top) else {
            bad.push(format!(
                "{}: module `{top}` has no layer in this test",
                file.display()
            ));
            continue;
        };
        for (line, target) in crate_paths_in(&text, &path) {
            let Some(theirs) = layer_of(&target[0]) else {
                continue;
            };
            if theirs > own {
                bad.push(format!(
                    "{}:{line}: `{top}` ({}) imports `{}` ({})",
                    file.display(),
                    LAYERS[own].0,
                    target[0],
                    LAYERS[theirs].0
                ));
            }
            if top == "model" && target[0] == "model" && path.len() > 1 && target.len() > 1 {
                let sub = reexports
                    .iter()
                    .find(|(name, _)| *name == target[1])
                    .map_or(target[1].clone(), |(_, s)| s.clone());
                let (Some(a), Some(b)) = (model_layer_of(&path[1]), model_layer_of(&sub)) else {
                    continue;
                };
                if b > a {
                    bad.push(format!(
                        "{}:{line}: model::{} imports model::{sub}, a layer above it",
                        file.display(),
                        path[1]
                    ));
                }
            }
        }
    }
    bad
}

/// `lib.rs` may re-export only from the foundation layer: a re-export of anything higher would
/// let a lower layer name it as `crate::X` unseen.
fn root_reexports(file: &Path, text: &str) -> Vec<String> {
    text.lines()
        .enumerate()
        .filter_map(|(n, l)| l.trim().strip_prefix("pub use ").map(|r| (n, ident(r))))
        .filter(|(_, m)| layer_of(m).is_none_or(|l| l > 0))
        .map(|(n, m)| {
            format!(
                "{}:{}: the crate root re-exports `{m}`",
                file.display(),
                n + 1
            )
        })
        .collect()
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
    std::fs::write(model.join("mod.rs"), "pub use llama::Llama;\n").unwrap();
    std::fs::write(
        model.join("llama.rs"),
        "use crate::{\n    data::Record,\n    train::step::Updater,\n};\n",
    )
    .unwrap();
    std::fs::write(
        model.join("cpu/ops.rs"),
        "use super::super::llama::Llama;\n",
    )
    .unwrap();
    std::fs::write(
        model.join("cpu/kernels.rs"),
        "use crate::model::Llama; // re-exported\n",
    )
    .unwrap();
    std::fs::write(
        tmp.path().join("records.rs"),
        "// crate::train in a comment is fine\nconst S: &str = \"// text\"; use super::train;\n",
    )
    .unwrap();
    std::fs::write(tmp.path().join("lib.rs"), "pub use train::run::train;\n").unwrap();
    let bad = violations(tmp.path());
    assert_eq!(bad.len(), 5, "{bad:#?}");
    assert!(
        bad.iter()
            .any(|b| b.contains("`model` (model) imports `train` (training)"))
    );
    let cpu = bad
        .iter()
        .filter(|b| b.contains("model::cpu imports model::llama"));
    assert_eq!(cpu.count(), 2, "{bad:#?}");
    assert!(
        bad.iter()
            .any(|b| b.contains("`records` (run records) imports `train`"))
    );
    assert!(bad.iter().any(|b| b.contains("re-exports `train`")));
}

/// Lengths of the functions in a file: (name, first line, lines). A function ends at the first
/// line that closes it at its own indentation.
fn function_lengths(text: &str) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let mut rest = trimmed;
        if let Some(r) = rest.strip_prefix("pub") {
            rest = r.trim_start();
            if rest.starts_with('(') {
                rest = rest.split_once(')').map_or("", |(_, r)| r.trim_start());
            }
        }
        for q in ["const ", "async ", "unsafe ", "extern \"C\" "] {
            rest = rest.strip_prefix(q).unwrap_or(rest);
        }
        if !rest.starts_with("fn ") || trimmed.ends_with(';') {
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
        let end = lines[i..]
            .iter()
            .position(|l| l.trim_end() == close)
            .map_or(usize::MAX, |e| e + 1);
        out.push((name, i + 1, end));
    }
    out
}

#[test]
fn no_function_in_the_shell_is_longer_than_80_lines() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![
        root.join("src/main.rs"),
        root.join("src/selftest.rs"),
        root.join("src/assets.rs"),
    ];
    for dir in ["src/train", "src/report", "src/bench", "src/cli"] {
        rust_files(&root.join(dir), &mut files);
    }
    let mut long = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        for (name, line, len) in function_lengths(&text) {
            if len == usize::MAX {
                long.push(format!(
                    "{}:{line}: fn {name}: no closing brace at its indentation",
                    f.display()
                ));
            } else if len > 80 {
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
        main.lines().count() <= 300,
        "src/main.rs is {} lines",
        main.lines().count()
    );
}

#[test]
fn function_lengths_count_to_the_closing_brace() {
    let text = "fn a() {\n    x();\n}\n\n    pub(crate) const fn b(&self) -> u8 {\n        1\n    }  \npub fn c() {\n";
    assert_eq!(
        function_lengths(text),
        vec![
            ("a".into(), 1, 3),
            ("b".into(), 5, 3),
            ("c".into(), 8, usize::MAX)
        ]
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
