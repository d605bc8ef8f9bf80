//! Ranks started by an MPI launcher (`mpirun`, `srun`), over rsmpi and the system's MPI.
//!
//! Only the main thread calls MPI (candle's worker threads never do), so MPI is initialised
//! with `MPI_THREAD_FUNNELED`. MPI's default error handler aborts the job on any failure, and a
//! rank that dies is reported by the launcher, which ends the others: no collective waits
//! forever.

use mpi::collective::{CommunicatorCollectives, Root};
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};

use super::World;
use crate::error::{Error, Result};

/// This rank of an MPI job. Dropping it finalises MPI.
pub struct Mpi {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    // Last: MPI_Finalize runs after the communicator is dropped.
    _universe: Universe,
}

impl Mpi {
    /// Initialises MPI and joins its world.
    pub fn init() -> Result<Self> {
        let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled)
            .ok_or_else(|| Error::Invalid("MPI was already initialised in this process".into()))?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok(Self {
            world,
            rank,
            size,
            _universe: universe,
        })
    }
}

/// `n` as an MPI count, or an error for a message past MPI's 2^31 - 1 elements.
fn count(n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| {
        Error::Invalid(format!(
            "a message of {n} bytes is past MPI's 2 GiB limit on one collective"
        ))
    })
}

impl World for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_gather(&self, local: &[u8]) -> Result<Vec<u8>> {
        count(local.len() * self.size)?;
        if local.is_empty() {
            // Every rank passes the same length: nothing to move (and MPI refuses an empty
            // slice's dangling pointer).
            return Ok(Vec::new());
        }
        let mut all = vec![0u8; local.len() * self.size];
        self.world.all_gather_into(local, &mut all[..]);
        Ok(all)
    }
    fn broadcast(&self, bytes: Vec<u8>) -> Result<Vec<u8>> {
        let root = self.world.process_at_rank(0);
        let mut len = bytes.len() as u64;
        root.broadcast_into(&mut len);
        let mut buf = if self.rank == 0 {
            bytes
        } else {
            vec![0u8; len as usize]
        };
        count(buf.len())?;
        if !buf.is_empty() {
            root.broadcast_into(&mut buf[..]);
        }
        Ok(buf)
    }
    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
    fn transport(&self) -> String {
        let version = mpi::environment::library_version().unwrap_or_default();
        let first = version.split([',', '\n']).next().unwrap_or("").trim();
        format!("MPI ({first})")
    }
}
