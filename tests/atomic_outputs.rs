//! Outputs that cannot lie: `export-gguf`, `merge` and `import-gguf` are killed with SIGKILL
//! at seeded moments while they write, and once exactly between writing and renaming (the
//! `output-commit` fault point). After each kill the target must be absent or byte-identical
//! to an uninterrupted run's output, never truncated or half-filled; the next run removes the
//! dead writer's temporary and says so.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::lorasft;
use lorasft::rng::Rng;

/// A model big enough that writing it takes a measurable time (about 64 MB in f32).
fn base(dir: &Path) -> PathBuf {
    let out = dir.join("base");
    common::output_ok(
        lorasft()
            .args(["fixture", "tiny-llama", "--seed", "3", "--hidden", "256"])
            .args(["--intermediate", "1024", "--layers", "16", "--heads", "4"])
            .args(["--kv-heads", "2", "--out"])
            .arg(&out),
    );
    std::fs::copy(common::fixture_tokenizer(), out.join("tokenizer.json")).unwrap();
    out
}

/// Every file under `p` (or `p` itself) by relative path, with its bytes.
fn contents(p: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    if p.is_file() {
        out.insert(PathBuf::new(), std::fs::read(p).unwrap());
        return out;
    }
    for e in std::fs::read_dir(p).unwrap() {
        let e = e.unwrap().path();
        for (k, v) in contents(&e) {
            out.insert(Path::new(e.file_name().unwrap()).join(k), v);
        }
    }
    out
}

/// Entries of `dir` other than the ones named.
fn others(dir: &Path, keep: &[&Path]) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !keep.iter().any(|k| k == p))
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

/// Runs `cmd` and kills it after `ms` milliseconds unless it finished; whether it was killed.
fn run_and_kill(cmd: &mut Command, ms: u64) -> bool {
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    true
}

/// Kills `make(out)` at seeded moments across an uninterrupted run's duration and at the
/// commit fault point; after each, `out` is absent or equal to the reference.
fn kill_test(name: &str, root: &Path, make: &dyn Fn(&Path) -> Command) {
    let work = &root.join(name);
    std::fs::create_dir(work).unwrap();
    let reference = work.join(format!("{name}-reference"));
    let start = Instant::now();
    common::output_ok(&mut make(&reference));
    let full_ms = start.elapsed().as_millis() as u64;
    let want = contents(&reference);
    let out = work.join(format!("{name}-out"));
    let mut rng = Rng::derive(7, name);
    let (mut killed, mut absent, mut complete) = (0, 0, 0);
    for _ in 0..8 {
        let _ = std::fs::remove_dir_all(&out).or_else(|_| std::fs::remove_file(&out));
        let ms = 1 + rng.uniform(0.0, full_ms as f64 * 1.2) as u64;
        killed += usize::from(run_and_kill(&mut make(&out), ms));
        if out.exists() {
            assert!(
                contents(&out) == want,
                "{name}: killed at {ms} ms: {} is incomplete",
                out.display()
            );
            complete += 1;
        } else {
            absent += 1;
        }
    }
    eprintln!(
        "{name}: full run {full_ms} ms; {killed} of 8 killed; {absent} absent, {complete} complete"
    );
    assert!(
        killed > 0,
        "{name}: no run was killed (full run {full_ms} ms)"
    );
    // Killed between writing and renaming: nothing under the final name, a temporary beside.
    let _ = std::fs::remove_dir_all(&out).or_else(|_| std::fs::remove_file(&out));
    let status = make(&out)
        .env("LORASFT_CRASH_AT", "output-commit")
        .output()
        .unwrap()
        .status;
    assert!(
        !status.success(),
        "{name}: the fault point did not stop the run"
    );
    assert!(
        !out.exists(),
        "{name}: a run killed before its rename left {}",
        out.display()
    );
    let stale = others(out.parent().unwrap(), &[&reference]);
    assert!(
        stale.iter().any(|s| s.contains(".lorasft-partial-")),
        "{name}: no temporary after the fault: {stale:?}"
    );
    // The next run finishes, removes the dead writer's temporary and says so.
    let text = common::output_ok(&mut make(&out));
    assert!(
        text.contains("a partial output left by a killed lorasft"),
        "{name}: {text}"
    );
    assert!(contents(&out) == want, "{name}: the rerun's output differs");
    let left = others(out.parent().unwrap(), &[&reference, &out]);
    assert!(left.is_empty(), "{name}: left behind: {left:?}");
}

#[test]
fn killed_exports_merges_and_imports_leave_no_partial_output() {
    let tmp = tempfile::tempdir().unwrap();
    let model = base(tmp.path());
    // Outputs go to their own folder, so the test sees exactly what each run leaves.
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let m = model.to_str().unwrap().to_string();
    let gguf = |out: &Path| {
        let mut c = lorasft();
        c.args(["export-gguf", "--model", &m, "--type", "f32", "--out"])
            .arg(out);
        c
    };
    kill_test("export", &work, &gguf);
    // An adapter to merge: a short smoke-shaped run is not needed, a saved random one will do.
    let adapter = tmp.path().join("adapter");
    let mut llama = lorasft::model::load::load_model(
        &lorasft::model::load::ModelSource::Dir(model.clone()),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap()
    .1;
    llama
        .add_lora(&lorasft::model::LoraConfig::default(), 1)
        .unwrap();
    common::randomise_adapters(&llama, 2);
    lorasft::adapter::save(
        &llama,
        &adapter,
        &lorasft::adapter::BaseRef::Unloadable { hub_id: None },
        "test adapter",
    )
    .unwrap();
    let a = adapter.to_str().unwrap().to_string();
    kill_test("merge", &work, &|out: &Path| {
        let mut c = lorasft();
        c.args(["merge", "--model", &m, "--adapter", &a, "--out"])
            .arg(out);
        c
    });
    let source = tmp.path().join("model.gguf");
    common::output_ok(&mut gguf(&source));
    let s = source.to_str().unwrap().to_string();
    kill_test("import", &work, &|out: &Path| {
        let mut c = lorasft();
        c.args(["import-gguf", &s, "--out"]).arg(out);
        c
    });
}
