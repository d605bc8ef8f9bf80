//! glibc malloc settings for training: keep freed memory for reuse instead of handing it back
//! to the kernel. Every candle op allocates its output; with glibc's defaults a buffer above
//! the (dynamic) mmap threshold is a fresh mapping, so each step page-faults its activations in
//! anew, which costs most in virtual machines. Measured on the tiny step
//! (`cargo bench --bench step -- tiny/step`, with and without `LORASFT_GLIBC_DEFAULTS=1`):
//! 650 → 566 ms with 1 thread, 506 → 408 ms with 2.
//!
//! With one compute thread, every thread also shares glibc's main arena. The forward and
//! backward run on a worker of candle's pool, and a worker's own arena hands big freed buffers
//! back to the kernel whatever the trim threshold says: 73,909 page faults in 16 tiny steps at
//! 1 thread, 2 with one arena (`RAYON_NUM_THREADS=1 perf stat -e page-faults -D 3000 --
//! target/release/examples/profile_step tiny 16`). This build against its parent,
//! alternated with `examples/profile_step` (3 rounds, 1 thread): 0.98× the tiny step, 0.97× the
//! SmolLM2 step. `MALLOC_ARENA_MAX=1` at 2 threads measured 1.04× (tiny) and 0.99× (SmolLM2):
//! several threads keep their arenas, which spare them a shared lock.

/// Raises the mmap threshold to glibc's maximum (32 MiB) and stops heap trimming, and with one
/// compute thread (candle's count) keeps every thread on the main arena. Returns whether the
/// settings took; a no-op returning false off glibc or when the environment sets
/// `LORASFT_GLIBC_DEFAULTS=1` (to measure the difference). Call it before any thread starts.
pub fn keep_freed_memory() -> bool {
    if std::env::var_os("LORASFT_GLIBC_DEFAULTS").is_some_and(|v| v == "1") {
        return false;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_THRESHOLD: i32 = -3;
        const M_ARENA_MAX: i32 = -8;
        let one_thread = candle_core::utils::get_num_threads() == 1;
        // SAFETY: mallopt only changes allocator parameters; every value is in range.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1
                && mallopt(M_TRIM_THRESHOLD, i32::MAX) == 1
                && (!one_thread || mallopt(M_ARENA_MAX, 1) == 1)
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
