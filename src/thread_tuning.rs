//! candle's CPU thread-pool setting for machines with few cores.
//!
//! candle 0.11's barrier-pool workers spin 25,000 times after each parallel op before they
//! park. On 2 cores that spinning takes its share from the threads running gemm: perf puts
//! `candle-bp-0` at 13% of the CPU samples of a 2-thread SmolLM2 step, nearly all of it in the
//! spin loop. With a spin limit of 200, measured with `examples/profile_step` (alternated with
//! the default, 12 steps each, 2 threads), the median step went from 2,147 to 2,010 ms (SmolLM2)
//! and from 355 to 320 ms (tiny). One thread never starts the pool.

use std::ffi::OsStr;

/// The variable candle reads once, when its pool starts.
pub const SPIN_LIMIT_VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

/// The spin limit lorasft uses when the environment sets none.
pub const SPIN_LIMIT: &str = "200";

/// The value to give [`SPIN_LIMIT_VAR`] when it currently holds `current`: none when the user
/// chose one (their choice stands).
pub fn spin_limit_to_set(current: Option<&OsStr>) -> Option<&'static str> {
    match current {
        Some(v) if !v.is_empty() => None,
        _ => Some(SPIN_LIMIT),
    }
}

/// Sets candle's barrier-pool spin limit to [`SPIN_LIMIT`] unless the environment has one.
///
/// # Safety
/// Writes the process environment: no other thread may read or write it meanwhile. Call it
/// first thing in `main` (or a benchmark's setup), before any thread starts.
pub unsafe fn park_idle_workers() {
    if let Some(v) = spin_limit_to_set(std::env::var_os(SPIN_LIMIT_VAR).as_deref()) {
        // SAFETY: the caller guarantees no concurrent access to the environment.
        unsafe { std::env::set_var(SPIN_LIMIT_VAR, v) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_setting_stands_and_an_absent_or_empty_one_gets_ours() {
        assert_eq!(spin_limit_to_set(None), Some(SPIN_LIMIT));
        assert_eq!(spin_limit_to_set(Some(OsStr::new(""))), Some(SPIN_LIMIT));
        assert_eq!(spin_limit_to_set(Some(OsStr::new("25000"))), None);
    }
}
