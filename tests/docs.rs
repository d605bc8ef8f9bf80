//! Every command in the README and the guides is run here, so none goes stale.
//!
//! The fenced `sh` blocks of `README.md` and `docs/*.md` are extracted and run in order, one
//! temporary directory per document (so a block may use what an earlier block of the same
//! document made), with the built `lorasft` first on `PATH`. A block that cannot run here (a
//! GPU, mpirun, PyTorch, the network, minutes of training, the test suite itself) carries a
//! marker on the line directly above it, `<!-- docs-test: skip (REASON) -->`. An unmarked
//! block that fails, times out or calls `cargo` (other than `cargo run --release --`, which
//! becomes the built binary) fails the test with its file, line and stderr; so does a marker
//! without a reason or without an `sh` block under it, and a shell block labelled other than
//! `sh`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The marker's prefix; the rest of the comment is `skip (REASON) -->`.
const MARKER: &str = "<!-- docs-test:";
/// A block that takes longer than this is hung (the cheap ones take seconds).
const BLOCK_TIMEOUT: Duration = Duration::from_secs(120);
/// The README is a front page, read in five minutes.
const README_MAX_LINES: usize = 200;

/// Whether a block runs or why it does not.
#[derive(Debug, PartialEq)]
enum Plan {
    Run,
    Skip(String),
}

/// One fenced `sh` block: where it starts (1-based line of the opening fence) and its text.
#[derive(Debug)]
struct Block {
    line: usize,
    text: String,
    plan: Plan,
}

/// The reason of a marker line, or an error naming what is wrong with it.
fn marker_reason(line: &str) -> Result<String, String> {
    let rest = line.trim().strip_prefix(MARKER).unwrap_or_default().trim();
    let inner = rest
        .strip_suffix("-->")
        .map(str::trim)
        .and_then(|r| r.strip_prefix("skip"))
        .map(str::trim)
        .and_then(|r| r.strip_prefix('('))
        .and_then(|r| r.strip_suffix(')'))
        .map(str::trim);
    match inner {
        Some(reason) if !reason.is_empty() => Ok(reason.to_string()),
        Some(_) => Err("skip marker without a reason".into()),
        None => Err(format!(
            "malformed marker (want `{MARKER} skip (REASON) -->`)"
        )),
    }
}

/// Every `sh` block of a Markdown text with its plan. Errors (with the line): a stale marker
/// (not directly above an `sh` block), a marker without a reason, an unclosed fence, a fence
/// labelled as a shell other than `sh`, or a fence with no label.
fn extract(text: &str) -> Result<Vec<Block>, String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut blocks = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        if trimmed.starts_with(MARKER) {
            if let Some((at, _)) = pending {
                return Err(format!("line {}: stale docs-test marker", at + 1));
            }
            let reason = marker_reason(trimmed).map_err(|e| format!("line {}: {e}", i + 1))?;
            pending = Some((i, reason));
            i += 1;
            continue;
        }
        let Some(label) = trimmed.strip_prefix("```") else {
            if let Some((at, _)) = pending.take() {
                return Err(format!(
                    "line {}: stale docs-test marker (no ```sh block on the next line)",
                    at + 1
                ));
            }
            i += 1;
            continue;
        };
        let label = label.trim();
        let close = (i + 1..lines.len())
            .find(|&j| lines[j].trim() == "```")
            .ok_or_else(|| format!("line {}: unclosed ``` fence", i + 1))?;
        match label {
            "" => {
                return Err(format!(
                    "line {}: fence without a language (sh, text, toml…)",
                    i + 1
                ));
            }
            "bash" | "shell" | "console" | "zsh" | "shell-session" => {
                return Err(format!(
                    "line {}: label shell commands `sh`, not `{label}`",
                    i + 1
                ));
            }
            _ => {}
        }
        let marker = pending.take();
        if label == "sh" {
            blocks.push(Block {
                line: i + 1,
                text: lines[i + 1..close].join("\n"),
                plan: marker.map_or(Plan::Run, |(_, reason)| Plan::Skip(reason)),
            });
        } else if let Some((at, _)) = marker {
            return Err(format!(
                "line {}: docs-test marker above a ```{label} block (only sh blocks run)",
                at + 1
            ));
        }
        i = close + 1;
    }
    if let Some((at, _)) = pending {
        return Err(format!(
            "line {}: stale docs-test marker at the end",
            at + 1
        ));
    }
    Ok(blocks)
}

/// The block as the test runs it: `cargo run --release --` is the built binary (on `PATH`).
/// Any other `cargo` command cannot run inside a test and is an error asking for a marker.
fn script(block: &str) -> Result<String, String> {
    let script = block.replace("cargo run --release -- ", "lorasft ");
    for line in script.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let calls_cargo = words.iter().enumerate().any(|(k, w)| {
            let before = k.checked_sub(1).map(|j| words[j]);
            *w == "cargo"
                && before.is_none_or(|b| {
                    matches!(b, "&&" | "||" | ";" | "|" | "time" | "then" | "do")
                        || b.split_once('=').is_some_and(|(v, _)| {
                            !v.is_empty()
                                && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                        })
                })
        });
        if calls_cargo && !line.trim_start().starts_with('#') {
            return Err(format!(
                "`{}` runs cargo, which cannot run inside the test: mark the block \
                 `{MARKER} skip (REASON) -->`",
                line.trim()
            ));
        }
    }
    Ok(script)
}

/// The real-asset cache, when a block needs it (it names `.cache/assets`): present, absent
/// and skipped locally, or absent and a failure under `LORASFT_REQUIRE_ASSETS=1` (CI).
fn assets_ready(repo: &Path) -> bool {
    let dir = repo.join(".cache/assets");
    let ready = [
        "vocab/.done",
        "smollm2/.done",
        "chat/.done",
        "data/alpaca_en_demo.json",
    ]
    .iter()
    .all(|f| dir.join(f).exists());
    if !ready && std::env::var("LORASFT_REQUIRE_ASSETS").is_ok_and(|v| v == "1") {
        panic!(
            "real assets missing in {} and LORASFT_REQUIRE_ASSETS=1: run scripts/fetch-assets.sh",
            dir.display()
        );
    }
    ready
}

/// A working directory that looks like the checkout to relative paths (`fixtures/`,
/// `.cache/`, `scripts/`, `tests/`) but keeps whatever the blocks write (`runs/`, models)
/// out of it.
fn workdir(repo: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in ["fixtures", ".cache", "scripts", "tests"] {
        let target = repo.join(entry);
        if target.exists() {
            std::os::unix::fs::symlink(&target, dir.path().join(entry)).unwrap();
        }
    }
    dir
}

/// The last `n` lines of a text.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs one script with `sh -e` in `cwd`, the binary's directory first on `PATH` and `HOME`
/// a fresh temporary directory; `Err`
/// with the exit status (or the timeout) and the tail of stderr and stdout.
fn run_script(script: &str, cwd: &Path, timeout: Duration) -> Result<Duration, String> {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_lorasft")).parent().unwrap();
    let path = std::env::join_paths(std::iter::once(bin_dir.to_path_buf()).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))
    .unwrap();
    let log = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (log.path().join("stdout"), log.path().join("stderr"));
    // A home of its own: nothing a block writes under `~` (caches, shell setup) escapes.
    let home = log.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let start = Instant::now();
    let mut child = {
        use std::os::unix::process::CommandExt;
        Command::new("sh")
            .args(["-e", "-c", script])
            .current_dir(cwd)
            .env("PATH", path)
            .env("NO_COLOR", "1")
            .env("HOME", &home)
            .env("XDG_CACHE_HOME", home.join(".cache"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out_path).unwrap())
            .stderr(std::fs::File::create(&err_path).unwrap())
            .process_group(0)
            .spawn()
            .unwrap()
    };
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if start.elapsed() > timeout {
            // The whole group: the shell and the lorasft it started.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            child.wait().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let what = match status {
        Some(s) if s.success() => return Ok(start.elapsed()),
        Some(s) => format!("exited with {s}"),
        None => format!("timed out after {} s", timeout.as_secs()),
    };
    Err(format!(
        "{what}\n--- stderr (tail) ---\n{}\n--- stdout (tail) ---\n{}",
        tail(&read(&err_path), 30),
        tail(&read(&out_path), 10)
    ))
}

/// README.md and every guide, in a fixed order.
fn documents(repo: &Path) -> Vec<PathBuf> {
    let mut docs: Vec<PathBuf> = std::fs::read_dir(repo.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    docs.insert(0, repo.join("README.md"));
    docs
}

#[test]
fn every_sh_block_runs_or_says_why_not() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let started = Instant::now();
    let (mut ran, mut skipped, mut failures) = (0, 0, Vec::new());
    for doc in documents(repo) {
        let name = doc.strip_prefix(repo).unwrap().display().to_string();
        let text = std::fs::read_to_string(&doc).unwrap();
        let blocks = match extract(&text) {
            Ok(b) => b,
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        let dir = workdir(repo);
        for block in blocks {
            let at = format!("{name}:{}", block.line);
            if let Plan::Skip(reason) = &block.plan {
                eprintln!("skip {at} ({reason})");
                skipped += 1;
                continue;
            }
            if block.text.contains(".cache/assets") && !assets_ready(repo) {
                eprintln!("SKIPPED: {at} needs the real assets (scripts/fetch-assets.sh)");
                skipped += 1;
                continue;
            }
            let result = script(&block.text)
                .and_then(|s| run_script(&s, dir.path(), BLOCK_TIMEOUT).map_err(|e| e + "\n"));
            match result {
                Ok(took) => {
                    eprintln!("ran  {at} in {:.1} s", took.as_secs_f64());
                    ran += 1;
                }
                Err(e) => failures.push(format!("{at}: {e}\n--- the block ---\n{}", block.text)),
            }
        }
    }
    eprintln!(
        "{ran} blocks ran, {skipped} skipped, {} failed, in {:.0} s",
        failures.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "\n{}", failures.join("\n\n"));
    assert!(ran > 0, "no block ran: the extractor found nothing");
}

#[test]
fn readme_is_a_front_page() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let n = readme.lines().count();
    assert!(
        n <= README_MAX_LINES,
        "README.md has {n} lines, over {README_MAX_LINES}: move detail into docs/"
    );
}

#[test]
fn extractor_plans_marked_and_unmarked_blocks() {
    let md = "# t\n\n<!-- docs-test: skip (needs a GPU) -->\n```sh\nnvidia-smi\n```\n\
              text\n```sh\necho hi\necho there\n```\n```toml\n[a]\n```\n```text\nout\n```\n";
    let blocks = extract(md).unwrap();
    assert_eq!(blocks.len(), 2, "{blocks:?}");
    assert_eq!(blocks[0].plan, Plan::Skip("needs a GPU".into()));
    assert_eq!((blocks[0].line, blocks[0].text.as_str()), (4, "nvidia-smi"));
    assert_eq!(blocks[1].plan, Plan::Run);
    assert_eq!(
        (blocks[1].line, blocks[1].text.as_str()),
        (8, "echo hi\necho there")
    );
}

#[test]
fn extractor_refuses_stale_and_bad_markers() {
    let cases = [
        ("<!-- docs-test: skip (x) -->\n\n```sh\nls\n```\n", "stale"),
        ("<!-- docs-test: skip (x) -->\ntext\n", "stale"),
        ("```sh\nls\n```\n<!-- docs-test: skip (x) -->\n", "stale"),
        (
            "<!-- docs-test: skip (x) -->\n```toml\n[a]\n```\n",
            "only sh blocks run",
        ),
        (
            "<!-- docs-test: skip () -->\n```sh\nls\n```\n",
            "without a reason",
        ),
        ("<!-- docs-test: skip -->\n```sh\nls\n```\n", "malformed"),
        (
            "<!-- docs-test: skip (a) -->\n<!-- docs-test: skip (b) -->\n```sh\nls\n```\n",
            "stale",
        ),
        ("```bash\nls\n```\n", "label shell commands `sh`"),
        ("```\nls\n```\n", "without a language"),
        ("```sh\nls\n", "unclosed"),
    ];
    for (md, want) in cases {
        let err = extract(md).expect_err(md);
        assert!(err.contains(want), "{md:?}: {err}");
    }
}

#[test]
fn runner_runs_unmarked_blocks_and_catches_failures() {
    let dir = tempfile::tempdir().unwrap();
    let ok = "echo made > made.txt\necho \"$HOME\" > home.txt\nlorasft --version";
    run_script(&script(ok).unwrap(), dir.path(), BLOCK_TIMEOUT).unwrap();
    assert!(
        dir.path().join("made.txt").exists(),
        "the block did not run"
    );
    let home = std::fs::read_to_string(dir.path().join("home.txt")).unwrap();
    assert_ne!(
        home.trim(),
        std::env::var("HOME").unwrap_or_default(),
        "blocks must not write into the real home"
    );
    let err = run_script(
        "echo oops >&2\nfalse\necho after",
        dir.path(),
        BLOCK_TIMEOUT,
    )
    .unwrap_err();
    assert!(err.contains("oops") && !err.contains("after"), "{err}");
    let err = run_script("sleep 30", dir.path(), Duration::from_secs(1)).unwrap_err();
    assert!(err.contains("timed out"), "{err}");
    assert_eq!(
        script("cargo run --release -- train --preset smoke").unwrap(),
        "lorasft train --preset smoke"
    );
    for s in [
        "cargo test --release",
        "LORASFT_FUZZ_CASES=5 cargo test",
        "true && cargo fmt",
    ] {
        assert!(script(s).is_err(), "{s}");
    }
    assert!(script("lorasft generate --instruction \"use cargo\"").is_ok());
}
