//! `lorasft bench --memory`: the peak resident memory and the time of one training step on a
//! fixture model (TinyLlama's shape by default, batch 1 × 256), with the base in f32 and with
//! it kept quantized (`model.keep_quantized`) from the same weights exported to Q4_K_M, each
//! with activations kept and recomputed (`train.gradient_checkpointing`). Each (threads,
//! activations, base) triple runs in a fresh child process. After the model is loaded the
//! child resets the kernel's peak (`5` into `/proc/self/clear_refs`), runs the steps, and
//! reads `VmHWM` from `/proc/self/status`: the figure is the step's peak, not the load's.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::bench::StepBench;
use crate::error::{Error, Result};
use crate::export::{ExportType, write_gguf};
use crate::gguf::Gguf;
use crate::model::fixture::BenchShape;
use crate::model::gguf_import::load_quantized;
use crate::sys;

/// The (batch, seq) of the memory figure.
pub const BATCH_SEQ: (usize, usize) = (1, 256);

/// One child's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryRow {
    /// The fixture's shape.
    pub shape: String,
    /// `f32`, or the GGUF file type kept quantized.
    pub base: String,
    /// Whether activations were recomputed in the backward (gradient checkpointing).
    pub recompute: bool,
    /// Worker threads (RAYON_NUM_THREADS).
    pub threads: usize,
    /// Resident memory right after loading, MiB.
    pub rss_loaded_mib: f64,
    /// Peak resident memory over the steps (VmHWM after a reset at load), MiB.
    pub step_peak_mib: f64,
    /// Median step time, ms.
    pub step_ms: f64,
}

/// A /proc/self/status figure, or an error saying it is missing (Linux only).
fn measured(figure: Option<f64>, key: &str) -> Result<f64> {
    figure.ok_or_else(|| Error::Invalid(format!("/proc/self/status gives no {key} here")))
}

/// What one child measures.
#[derive(Debug, Clone, Copy)]
pub struct MemoryCase<'a> {
    /// The fixture's shape.
    pub shape: BenchShape,
    /// `None`: the f32 fixture; `Some(file)`: the shape's Q4_K_M GGUF kept quantized.
    pub gguf: Option<&'a Path>,
    /// Recompute activations in the backward.
    pub recompute: bool,
}

/// Runs in the child: loads the base, resets the peak, runs one warm-up and `steps` timed
/// steps.
pub fn run_here(case: MemoryCase<'_>, steps: usize, seed: u64) -> Result<MemoryRow> {
    let (mut model, base) = match case.gguf {
        None => (
            case.shape.spec().build(seed, DType::F32, &Device::Cpu)?,
            "f32".to_string(),
        ),
        Some(file) => {
            let (_, m) = load_quantized(&Gguf::read(file)?)?;
            (m, "q4_k_m kept quantized".to_string())
        }
    };
    model.set_recompute(case.recompute);
    let mut bench = StepBench::from_model(model, BATCH_SEQ, seed)?;
    let rss_loaded_mib = measured(sys::rss_mib(), "VmRSS")?;
    sys::reset_peak_rss().map_err(|e| Error::io(Path::new("/proc/self/clear_refs"), e))?;
    bench.step()?;
    let mut times = Vec::new();
    for _ in 0..steps.max(1) {
        let t = Instant::now();
        let loss = bench.step()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        if !loss.is_finite() {
            return Err(Error::Invalid(format!("bench step loss is {loss}")));
        }
    }
    Ok(MemoryRow {
        shape: case.shape.name().into(),
        base,
        recompute: case.recompute,
        threads: candle_core::utils::get_num_threads(),
        rss_loaded_mib,
        step_peak_mib: measured(sys::peak_rss_mib(), "VmHWM")?,
        step_ms: crate::bench::table::median(&mut times),
    })
}

/// Where the shape's Q4_K_M GGUF goes unless `--memory-gguf` says.
pub fn default_gguf(shape: BenchShape) -> std::path::PathBuf {
    Path::new(".cache/bench").join(format!("{}-fixture-q4_k_m.gguf", shape.name()))
}

/// Writes the fixture of `shape` (seed `seed`) as a Q4_K_M GGUF at `file` unless present.
pub fn ensure_gguf(shape: BenchShape, file: &Path, seed: u64) -> Result<()> {
    if file.exists() {
        return Ok(());
    }
    let spec = shape.spec();
    let model = spec.build(seed, DType::F32, &Device::Cpu)?;
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let tmp = file.with_extension("partial");
    let name = format!("lorasft-bench-{}", shape.name());
    write_gguf(
        &model,
        &spec.config(),
        &name,
        Vec::new(),
        ExportType::Q4KM,
        &tmp,
        crate::progress::Mode::Quiet,
    )?;
    std::fs::rename(&tmp, file).map_err(|e| Error::io(file, e))
}

/// The shape as `--memory-shape` takes it.
fn cli_name(shape: BenchShape) -> String {
    clap::ValueEnum::to_possible_value(&shape)
        .map(|v| v.get_name().to_string())
        .unwrap_or_else(|| shape.name().to_string())
}

/// Spawns one child per (threads, activations, base) triple and collects their rows.
pub fn run(
    shape: BenchShape,
    gguf: &Path,
    threads: &[usize],
    steps: usize,
    seed: u64,
) -> Result<Vec<MemoryRow>> {
    ensure_gguf(shape, gguf, seed)?;
    let mut rows = Vec::new();
    for &t in threads {
        for recompute in [false, true] {
            for quantized in [false, true] {
                let mut args: Vec<std::ffi::OsString> =
                    ["--memory", "--one", "--steps"].map(Into::into).to_vec();
                args.extend([
                    steps.to_string().into(),
                    "--seed".into(),
                    seed.to_string().into(),
                    "--memory-shape".into(),
                    cli_name(shape).into(),
                ]);
                args.extend(["--memory-gguf".into(), gguf.as_os_str().to_owned()]);
                if quantized {
                    args.push("--memory-quantized".into());
                }
                if recompute {
                    args.push("--memory-recompute".into());
                }
                rows.extend(crate::bench::child_rows::<MemoryRow>(&args, t)?);
            }
        }
    }
    Ok(rows)
}

/// The rows as a Markdown table, with each quantized row's peak and time against the f32 row
/// of the same threads and activations (the row before it).
pub fn render(rows: &[MemoryRow]) -> String {
    let mut s = format!(
        "{}-shape fixture, batch {} x {}, one training step (LoRA r 8 on q,v)\n\n\
         | base | activations | threads | RSS after load (MiB) | step peak RSS (MiB) | ms/step | peak vs f32 | time vs f32 |\n\
         |---|---|---|---|---|---|---|---|\n",
        rows.first().map_or("fixture", |r| r.shape.as_str()),
        BATCH_SEQ.0,
        BATCH_SEQ.1
    );
    let mut f32_row: Option<&MemoryRow> = None;
    for r in rows {
        let (peak, time) = match (r.base.as_str(), f32_row) {
            ("f32", _) => {
                f32_row = Some(r);
                ("1".to_string(), "1".to_string())
            }
            (_, Some(f)) if f.threads == r.threads && f.recompute == r.recompute => (
                format!("{:.3}", r.step_peak_mib / f.step_peak_mib),
                format!("{:.3}", r.step_ms / f.step_ms),
            ),
            _ => ("n/a".to_string(), "n/a".to_string()),
        };
        s += &format!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {peak} | {time} |\n",
            r.base,
            if r.recompute { "recomputed" } else { "kept" },
            r.threads,
            r.rss_loaded_mib,
            r.step_peak_mib,
            r.step_ms
        );
    }
    s
}
