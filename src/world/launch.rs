//! How this process was started: alone, or as one of several ranks by an MPI launcher, and the
//! [`World`] that goes with it.
//!
//! A build without the `mpi` feature started as one of several ranks refuses to run: N
//! independent copies of one run would write one directory. The launchers announce themselves
//! through the environment, which is what is read here.

use super::{Single, World};
use crate::error::{Error, Result};

/// The variables launchers set to the number of processes they started, checked in order:
/// Open MPI's `mpirun`, MPICH/Intel MPI's Hydra (PMI), and Slurm: `srun` sets the step's
/// task count, which wins over the allocation's (`SLURM_NTASKS`, also set in a batch
/// script's own shell, where `srun -n 1 lorasft ...` is then one process).
pub const SIZE_VARS: [&str; 4] = [
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_NTASKS",
];

/// A launch by an MPI launcher, as the environment tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// The variable that told (one of [`SIZE_VARS`]).
    pub var: &'static str,
    /// The number of processes it says were started.
    pub size: usize,
}

impl Launch {
    /// The launch `get` (an environment lookup) describes: the first of [`SIZE_VARS`] that is
    /// set to a number, or `None` for a plain start.
    pub fn detect(get: impl Fn(&str) -> Option<String>) -> Option<Self> {
        SIZE_VARS.iter().find_map(|&var| {
            let size = get(var)?.trim().parse().ok()?;
            Some(Self { var, size })
        })
    }

    /// The launch of this process.
    pub fn of_process() -> Option<Self> {
        Self::detect(|v| std::env::var(v).ok())
    }
}

/// The error of a multi-process launch that this build cannot join.
pub fn refusal(launch: &Launch) -> Error {
    Error::Invalid(format!(
        "started as one of {} processes ({}={}), but this lorasft is built without MPI: each \
         process would train alone and all would write one run directory. Build it with the \
         `mpi` feature (`cargo install --path . --features mpi`, which needs Open MPI: \
         `apt-get install openmpi-bin libopenmpi-dev libclang-dev`), or start one process",
        launch.size, launch.var, launch.size
    ))
}

/// The world of this process: MPI's when the `mpi` feature is built and a launcher started it,
/// one process otherwise. A launch of several processes without the feature is refused. A
/// launched rank's threads are set first
/// ([`crate::thread_tuning::share_cores_between_ranks`]).
///
/// # Safety
/// May write the process environment: call it in `main` before any thread starts.
pub unsafe fn init() -> Result<Box<dyn World>> {
    let launch = Launch::of_process();
    let ranks = launch.as_ref().map_or(1, |l| l.size);
    // SAFETY: the caller guarantees no other thread exists yet.
    unsafe { crate::thread_tuning::share_cores_between_ranks(ranks) };
    #[cfg(feature = "mpi")]
    if launch.is_some() {
        return Ok(Box::new(super::Mpi::init()?));
    }
    match launch {
        Some(l) if l.size > 1 => Err(refusal(&l)),
        _ => Ok(Box::new(Single)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn launchers_are_read_in_order_and_a_plain_start_is_none() {
        assert_eq!(Launch::detect(env(&[])), None);
        assert_eq!(Launch::detect(env(&[("PMI_SIZE", "x")])), None);
        assert_eq!(
            Launch::detect(env(&[("SLURM_NTASKS", "4"), ("OMPI_COMM_WORLD_SIZE", "2")])),
            Some(Launch {
                var: "OMPI_COMM_WORLD_SIZE",
                size: 2
            })
        );
        let one = Launch::detect(env(&[("SLURM_NTASKS", "4"), ("SLURM_STEP_NUM_TASKS", "1")]));
        assert_eq!(
            one.map(|l| l.size),
            Some(1),
            "srun -n 1 inside a 4-task allocation"
        );
        let l = Launch::detect(env(&[("SLURM_NTASKS", " 8 ")])).unwrap();
        assert_eq!(l.size, 8);
        let msg = refusal(&l).to_string();
        assert!(
            msg.contains("SLURM_NTASKS=8") && msg.contains("--features mpi"),
            "{msg}"
        );
    }
}
