//! Runs the benchmark step in a loop, for profilers: `perf record -D <setup ms>`.
use candle_core::{DType, Device};
use lorasft::bench::StepBench;
use lorasft::model::fixture::BenchShape;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    // SAFETY: first thing in main; no other thread exists yet.
    unsafe { lorasft::thread_tuning::park_idle_workers() };
    lorasft::alloc_tuning::keep_freed_memory();
    let shape = match std::env::args().nth(1).as_deref() {
        Some("tiny") => BenchShape::Tiny,
        _ => BenchShape::Smollm2,
    };
    let steps: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let t = Instant::now();
    let mut bench = StepBench::new(shape, DType::F32, &Device::Cpu, 0)?;
    bench.step()?;
    eprintln!("setup + warm-up: {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
    for _ in 0..steps {
        let t = Instant::now();
        bench.step()?;
        eprintln!("step {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(())
}
