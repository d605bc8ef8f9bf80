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

/// The variables launchers set to the number of ranks on this node: Open MPI's, and
/// MPICH/Hydra's.
pub const LOCAL_SIZE_VARS: [&str; 2] = ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"];

/// The worker threads for one of `local_ranks` processes on a node whose `cores` physical cores
/// (candle's default thread count) it shares, when the process may run on `allowed` of the
/// machine's `online` CPUs: its share of the cores (at least one), and no more than the CPUs a
/// launcher or Slurm bound it to (ranks bound to one socket each share that socket).
pub fn threads_per_rank(allowed: usize, online: usize, cores: usize, local_ranks: usize) -> usize {
    let share = (cores / local_ranks.max(1)).max(1);
    if allowed < online {
        return share.min(allowed).max(1);
    }
    share
}

/// For a process started by an MPI launcher as one of several: sets `RAYON_NUM_THREADS` (which
/// candle's thread count and rayon's pool both read) to [`threads_per_rank`] unless the user
/// set it. candle counts the machine's physical cores and ignores CPU binding, so without this
/// two ranks on two cores would each run two threads. Returns the count set.
///
/// # Safety
/// Writes the process environment: call it first thing in `main`, before any thread starts
/// (MPI's initialisation starts some).
pub unsafe fn share_cores_between_ranks(launched_ranks: usize) -> Option<usize> {
    let set = |v: &str| std::env::var_os(v).is_some_and(|x| !x.is_empty());
    if launched_ranks <= 1 || set("RAYON_NUM_THREADS") {
        return None;
    }
    let local = LOCAL_SIZE_VARS
        .iter()
        .find_map(|v| std::env::var(v).ok()?.trim().parse().ok())
        .unwrap_or(1);
    let n = threads_per_rank(
        crate::sys::allowed_cpus(),
        crate::sys::online_cpus(),
        candle_core::utils::get_num_threads(),
        local,
    );
    // SAFETY: the caller guarantees no concurrent access to the environment.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_rank_uses_its_cpus_and_an_unbound_one_its_share_of_the_cores() {
        // mpirun -np 2 binds each rank to one core of two.
        assert_eq!(threads_per_rank(1, 2, 2, 2), 1);
        // srun --cpus-per-task=4 on a 16-CPU node.
        assert_eq!(threads_per_rank(4, 16, 16, 4), 4);
        // 4 ranks bound to the same 8-core socket of a 16-core node: 4 each, not 8.
        assert_eq!(threads_per_rank(8, 16, 16, 4), 4);
        // srun sets no local-rank count: the binding decides.
        assert_eq!(threads_per_rank(4, 16, 16, 1), 4);
        // --oversubscribe (no binding): 4 ranks share 2 cores, one thread each at least.
        assert_eq!(threads_per_rank(2, 2, 2, 4), 1);
        // Unbound, 2 ranks on 16 cores.
        assert_eq!(threads_per_rank(16, 16, 16, 2), 8);
        // An empty affinity read (0) still gives one thread.
        assert_eq!(threads_per_rank(0, 8, 8, 1), 1);
    }

    #[test]
    fn a_user_setting_stands_and_an_absent_or_empty_one_gets_ours() {
        assert_eq!(spin_limit_to_set(None), Some(SPIN_LIMIT));
        assert_eq!(spin_limit_to_set(Some(OsStr::new(""))), Some(SPIN_LIMIT));
        assert_eq!(spin_limit_to_set(Some(OsStr::new("25000"))), None);
    }
}
