//! glibc malloc settings for training: keep freed memory for reuse instead of handing it back
//! to the kernel. Every candle op allocates its output; with glibc's defaults a buffer above
//! the (dynamic) mmap threshold is a fresh mapping, so each step page-faults its activations in
//! anew, which costs most in virtual machines. Measured on the tiny step
//! (`cargo bench --bench step -- tiny/step`, with and without `LORASFT_GLIBC_DEFAULTS=1`):
//! 650 → 566 ms with 1 thread, 506 → 408 ms with 2.

/// Raises the mmap threshold to glibc's maximum (32 MiB) and stops heap trimming. Returns
/// whether both settings took; a no-op returning false off glibc or when the environment sets
/// `LORASFT_GLIBC_DEFAULTS=1` (to measure the difference).
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
        // SAFETY: mallopt only changes allocator parameters; both values are in range.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 && mallopt(M_TRIM_THRESHOLD, i32::MAX) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
