//! What lorasft asks of the operating system: facts about the machine a run is on (peak memory,
//! the CPU model, the operating system and the host name, from Linux's /proc and /etc; `None`
//! or a plain fallback where the OS does not say, so run records read "n/a" instead of
//! failing), durable writes (fsync of files and directories, atomic replacement), and the named
//! crash points the fault-injection tests stop a run at.

/// User + system CPU seconds this process has used so far, all threads (getrusage), or 0
/// when the call fails.
pub fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes one rusage struct into the zeroed value it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    secs(u.ru_utime) + secs(u.ru_stime)
}

/// Peak resident set size of this process in MiB (VmHWM from /proc/self/status).
pub fn peak_rss_mib() -> Option<f64> {
    status_mib("VmHWM:")
}

/// Resident set size of this process now, in MiB (VmRSS from /proc/self/status).
pub fn rss_mib() -> Option<f64> {
    status_mib("VmRSS:")
}

/// Resets this process's peak resident set size to its current size (Linux: `5` into
/// /proc/self/clear_refs), so [`peak_rss_mib`] then measures from here on.
pub fn reset_peak_rss() -> std::io::Result<()> {
    std::fs::write("/proc/self/clear_refs", "5")
}

/// A `key:   N kB` line of /proc/self/status, in MiB.
fn status_mib(key: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The value of the first line of a `key: value` or `key=value` file that starts with `key`.
fn first_value(path: &str, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_once([':', '=']))
        .map(|(_, v)| v.trim().trim_matches('"').to_string())
}

/// The CPUs this process may run on (its affinity mask), or the online CPUs where the mask
/// cannot be read.
pub fn allowed_cpus() -> usize {
    #[cfg(target_os = "linux")]
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills it for pid 0
    // (this thread) and CPU_COUNT only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
            return libc::CPU_COUNT(&set) as usize;
        }
    }
    online_cpus()
}

/// The machine's online CPUs (logical).
pub fn online_cpus() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}

/// The CPU model name, or the architecture where /proc/cpuinfo does not say.
pub fn cpu_name() -> String {
    first_value("/proc/cpuinfo", "model name").unwrap_or_else(|| std::env::consts::ARCH.into())
}

/// The operating system's pretty name, or its family.
pub fn os_name() -> String {
    first_value("/etc/os-release", "PRETTY_NAME").unwrap_or_else(|| std::env::consts::OS.into())
}

/// The host name, or an empty string.
pub fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// Seconds since the Unix epoch.
pub fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// fsyncs a file's data and metadata.
pub fn sync_file(path: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// fsyncs a directory, so the entries created or renamed in it survive a power loss.
pub fn sync_dir(path: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// Replaces `path` with `bytes` atomically and durably: a temporary file beside it, fsync'd,
/// renamed into place, then the directory fsync'd. A crash leaves the old file or the new one,
/// never a torn one. On failure, the path involved and the OS error.
pub fn write_atomic(
    path: &std::path::Path,
    bytes: &[u8],
) -> Result<(), (std::path::PathBuf, std::io::Error)> {
    fn at(
        p: &std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> (std::path::PathBuf, std::io::Error) {
        let p = p.to_path_buf();
        move |e| (p, e)
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).map_err(at(&tmp))?;
    sync_file(&tmp).map_err(at(&tmp))?;
    std::fs::rename(&tmp, path).map_err(at(path))?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    sync_dir(dir).map_err(at(dir))
}

/// A named point where fault-injection tests stop the process as `kill -9` would: it aborts
/// (no destructors, no flushing) when the environment variable `LORASFT_CRASH_AT` equals
/// `name`, and does nothing otherwise. The crash-safety tests use it to kill a run in the
/// middle of a checkpoint write, a moment a timed kill hits only by chance.
pub fn crash_point(name: &str) {
    if std::env::var_os("LORASFT_CRASH_AT").is_some_and(|v| v == name) {
        std::process::abort();
    }
}

thread_local! {
    /// Set while [`catch_silently`] runs on this thread: the panic hook stays quiet.
    static SILENT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, turning a panic into `Err(message)` without printing it. Used around calls into
/// third-party parsers (candle's GGUF reader) as a last resort behind lorasft's own checks.
///
/// The panic hook is replaced once, by one that stays quiet only on a thread inside this
/// function and defers to the previous hook everywhere else, so concurrent threads (tests)
/// still report their own panics.
pub fn catch_silently<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !SILENT.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
    let was = SILENT.with(|s| s.replace(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    SILENT.with(|s| s.set(was));
    r.map_err(|p| {
        p.downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .map_or_else(|| "panicked".into(), |m| format!("panicked: {m}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_rss_is_positive_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(peak_rss_mib().is_some_and(|m| m > 0.0));
        }
    }

    #[test]
    fn catch_silently_turns_a_panic_into_its_message_and_passes_values_through() {
        assert_eq!(catch_silently(|| 7), Ok(7));
        let e = catch_silently(|| -> u8 { panic!("bad block {}", 3) }).unwrap_err();
        assert_eq!(e, "panicked: bad block 3");
        // Nested and repeated calls leave the thread able to report its own panics again.
        assert_eq!(catch_silently(|| catch_silently(|| 1)), Ok(Ok(1)));
        assert!(!SILENT.with(std::cell::Cell::get));
    }
}
