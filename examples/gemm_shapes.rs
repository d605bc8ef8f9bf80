//! The frozen products of a SmolLM2-135M step on their own, split over the threads as the step
//! splits them: what `gemm` reaches at the step's shapes, as a share of threads × one core's
//! FMA peak (`lorasft bench`'s loop). It bounds the step: the step can run no closer to the
//! peak, and gain no more from a second thread, than its products do.
//!
//! `RAYON_NUM_THREADS=1 cargo run --release --example gemm_shapes` (and `=2`)
//!
//! Each product cycles through 30 distinct weights (one per layer, as the model holds them), so
//! the weights come from memory as they do in the step, not from a warm cache.

use std::time::Instant;

use lorasft::bench::fma_peak;
use lorasft::model::cpu::matmul::gemm_rows_f32;
use lorasft::rng::Rng;

/// Best seconds of 5 timed runs of `f`, after one untimed.
fn best_of(mut f: impl FnMut()) -> f64 {
    f();
    (0..5)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// `n` values in [0, 1) from the project's seeded generator.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.next_f64() as f32).collect()
}

fn main() {
    let peak = fma_peak();
    let threads = candle_core::utils::get_num_threads();
    let widest = peak.widest().unwrap_or(f64::NAN) * threads as f64;
    println!("threads: {threads}");
    println!(
        "one core's FMA peak: {:.1} GFLOP/s at 256 bits, {:.1} at 512 bits",
        peak.avx2.unwrap_or(f64::NAN),
        peak.avx512.unwrap_or(f64::NAN)
    );
    println!(
        "| product | rows | out × in | ms per weight | GFLOP/s | share of threads × the widest peak |"
    );
    println!("|---|---:|---|---:|---:|---:|");
    let layers = 30;
    let shapes = [
        ("q_proj, o_proj", 256, 576, 576, layers),
        ("k_proj, v_proj", 256, 192, 576, layers),
        ("gate_proj, up_proj", 256, 1536, 576, layers),
        ("down_proj", 256, 576, 1536, layers),
        // One lm_head chunk at the sizes the chunk bound gives 256 rows: 8M logits (128 rows),
        // the former 4M (85 rows), and the whole batch.
        ("lm_head (one chunk)", 85, 49152, 576, 1),
        ("lm_head (one chunk)", 128, 49152, 576, 1),
        ("lm_head (one chunk)", 256, 49152, 576, 1),
    ];
    for (name, rows, out_f, in_f, copies) in shapes {
        let weights: Vec<Vec<f32>> = (0..copies as u64)
            .map(|s| values(out_f * in_f, s))
            .collect();
        let x = values(rows * in_f, 99);
        let g = values(rows * out_f, 98);
        let mut y = vec![0f32; rows * out_f];
        let mut dx = vec![0f32; rows * in_f];
        let flop = 2.0 * (rows * out_f * in_f) as f64 * copies as f64;
        let fwd = best_of(|| {
            for w in &weights {
                gemm_rows_f32(&mut y, &x, w, rows, out_f, in_f, true);
            }
        });
        let bwd = best_of(|| {
            for w in &weights {
                gemm_rows_f32(&mut dx, &g, w, rows, in_f, out_f, false);
            }
        });
        for (dir, secs) in [("x Wᵀ", fwd), ("g W", bwd)] {
            let gflops = flop / secs / 1e9;
            println!(
                "| {name}: {dir} | {rows} | {out_f} × {in_f} | {:.2} | {gflops:.1} | {:.0}% |",
                secs * 1e3 / copies as f64,
                100.0 * gflops / widest
            );
        }
    }
}
