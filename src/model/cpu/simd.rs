//! Row loops written for the auto-vectoriser and compiled twice, baseline and AVX2, with the
//! AVX2 copy chosen at run time. Reductions keep one partial result per lane and combine them
//! in a fixed order, so both copies give the same bits and no result depends on the CPU.

/// Lanes of the reductions: partial results per lane, combined in a fixed order.
const LANES: usize = 8;

/// Runs `f` on the row, inside an AVX2-enabled frame when the CPU supports it.
#[inline(always)]
pub fn dispatch<R>(row: &[f32], f: impl Fn(&[f32]) -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { avx2(|| f(row)) };
    }
    f(row)
}

/// [`dispatch`] for passes that write the row.
#[inline(always)]
pub fn dispatch_mut(row: &mut [f32], f: impl Fn(&mut [f32])) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { avx2(|| f(row)) };
    }
    f(row)
}

/// Runs `f` inside an AVX2-enabled frame when the CPU supports it: the `#[inline(always)]`
/// loops that `f` calls are then compiled for AVX2 (without FMA, so the bits do not change).
#[inline(always)]
pub fn run<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { avx2(f) };
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[inline(always)]
pub fn max_f32(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    tail.iter()
        .chain(&acc)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

#[inline(always)]
pub fn sum_f32(row: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().chain(tail).sum()
}

#[inline(always)]
pub fn exp_sub_f32(row: &mut [f32], max: f32) {
    for x in row.iter_mut() {
        *x = exp_f32(*x - max);
    }
}

#[inline(always)]
pub fn scale_f32(row: &mut [f32], s: f32) {
    for x in row.iter_mut() {
        *x *= s;
    }
}

/// `exp(x)` for `x <= 0` in f32 within 2 ulp (Cephes' range reduction and polynomial),
/// written branch-free with integer-only exponent assembly so the compiler vectorises it;
/// 0 below the normal range.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const ROUND_BITS: u32 = 0x4B40_0000;
    let underflow = x < -87.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * C1 - n * C2;
    let z = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * z + r + 1.0;
    // 2^n from n's bits: (n + 127) << 23, in wrapping integer arithmetic.
    let scale = f32::from_bits(t.to_bits().wrapping_sub(ROUND_BITS).wrapping_add(127) << 23);
    if underflow { 0.0 } else { y * scale }
}
