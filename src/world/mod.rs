//! The processes of one training job and the few collectives data-parallel training needs.
//!
//! One small trait, [`World`]: rank, size, an all-gather, a broadcast from rank 0 and an abort.
//! Three implementations: [`Single`] (one process, the default), [`Local`] (ranks as threads
//! of one process, so the default build tests the multi-rank code paths) and, with the `mpi`
//! feature, `Mpi` (ranks started by `mpirun` or `srun`). Everything built on them — the
//! ordered gather of per-item values, the check that the ranks agree, the stop vote — is
//! written once here, over the trait, so one process runs the same code as many.
//!
//! There is deliberately no all-reduce: `MPI_Allreduce`'s summation order depends on the
//! algorithm and message size, so the trainer gathers each micro-batch's gradient and folds
//! them in one fixed order on every rank (`train::step`).

pub mod launch;
mod local;
#[cfg(feature = "mpi")]
mod mpi;

use std::ops::Range;

use crate::error::{Error, Result};

pub use launch::{Launch, init};
pub use local::Local;
#[cfg(feature = "mpi")]
pub use mpi::Mpi;

/// The ranks of one job and the collectives between them. Every rank must call the same
/// collectives in the same order with the same lengths; a rank that cannot (an error) calls
/// [`World::abort`], which ends every rank instead of leaving them waiting.
pub trait World {
    /// This process's rank, 0-based.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// Every rank's `local` bytes, concatenated in rank order. Every rank passes the same
    /// number of bytes.
    fn all_gather(&self, local: &[u8]) -> Result<Vec<u8>>;
    /// Rank 0's `bytes` on every rank (the other ranks' are ignored; lengths may differ).
    fn broadcast(&self, bytes: Vec<u8>) -> Result<Vec<u8>>;
    /// Ends the whole job now with exit status `code`: a rank that failed calls it so that no
    /// other rank waits forever in a collective.
    fn abort(&self, code: i32) -> !;
    /// What carries the collectives, for the manifest and the report.
    fn transport(&self) -> String;
}

/// Whether this rank is the one that writes (rank 0): it holds the run directory's lock and
/// writes every record, checkpoint and report, while the others write nothing.
pub fn is_writer(world: &dyn World) -> bool {
    world.rank() == 0
}

/// One process: the default build. Its collectives return what they were given.
#[derive(Debug, Clone, Copy, Default)]
pub struct Single;

impl World for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_gather(&self, local: &[u8]) -> Result<Vec<u8>> {
        Ok(local.to_vec())
    }
    fn broadcast(&self, bytes: Vec<u8>) -> Result<Vec<u8>> {
        Ok(bytes)
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
    fn transport(&self) -> String {
        "single process".into()
    }
}

/// The items of `0..n` a rank owns: a contiguous block, the blocks in rank order and their
/// sizes differing by at most one. With `n` a multiple of the size, item k belongs to rank
/// ⌊k / (n / size)⌋ (the trainer's rule for micro-batches).
pub fn owned(rank: usize, size: usize, n: usize) -> Range<usize> {
    (rank * n / size)..((rank + 1) * n / size)
}

/// Every rank's `local` words (its owned items, `width` words each, in order), gathered into
/// one list in global item order on every rank. `n` is the number of items of all ranks.
pub fn gather_items(world: &dyn World, n: usize, width: usize, local: &[u64]) -> Result<Vec<u64>> {
    let size = world.size();
    let most = n.div_ceil(size.max(1));
    let mine = owned(world.rank(), size, n);
    if local.len() != mine.len() * width {
        return Err(Error::Invalid(format!(
            "rank {}: {} words for {} items of width {width}",
            world.rank(),
            local.len(),
            mine.len()
        )));
    }
    // Each rank sends a block of the largest size, padded with zeros.
    let mut block = vec![0u8; most * width * 8];
    for (chunk, w) in block.chunks_exact_mut(8).zip(local) {
        chunk.copy_from_slice(&w.to_le_bytes());
    }
    let all = world.all_gather(&block)?;
    let mut out = Vec::with_capacity(n * width);
    for r in 0..size {
        let from = r * most * width * 8;
        let len = owned(r, size, n).len() * width;
        out.extend(
            all[from..from + len * 8]
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))),
        );
    }
    Ok(out)
}

/// Whether any rank's `flag` is set: how the ranks agree to stop after the same step when
/// Ctrl-C or SIGTERM reaches them at different moments.
pub fn any(world: &dyn World, flag: bool) -> Result<bool> {
    Ok(world.all_gather(&[u8::from(flag)])?.iter().any(|&b| b != 0))
}

/// Checks that every rank holds the same digest of `what` (the adapter, the config): the
/// first rank whose digest differs from rank 0's is named in the error, on every rank. One
/// process has nothing to compare and never computes the digest.
pub fn agree(
    world: &dyn World,
    what: &str,
    digest: impl FnOnce() -> Result<[u8; 32]>,
) -> Result<()> {
    if world.size() == 1 {
        return Ok(());
    }
    let all = world.all_gather(&digest()?)?;
    let ranks: Vec<&[u8]> = all.chunks_exact(32).collect();
    match ranks.iter().position(|d| *d != ranks[0]) {
        None => Ok(()),
        Some(r) => Err(Error::RanksDisagree {
            rank: r,
            what: what.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ownership_is_contiguous_in_rank_order_and_covers_every_item() {
        for size in 1..=5 {
            for n in 0..23 {
                let mut next = 0;
                for r in 0..size {
                    let o = owned(r, size, n);
                    assert_eq!(o.start, next);
                    assert!(o.len() == n / size || o.len() == n / size + 1);
                    next = o.end;
                }
                assert_eq!(next, n);
            }
        }
        // The trainer's rule: micro-batch k of 8 on 4 ranks belongs to rank k / 2.
        for k in 0..8 {
            assert!(owned(k / 2, 4, 8).contains(&k));
        }
    }

    #[test]
    fn items_gather_in_global_order_on_every_rank() {
        for size in [1, 2, 3, 4] {
            let n = 7;
            let got = Local::run(size, |w| {
                let mine: Vec<u64> = owned(w.rank(), w.size(), n)
                    .flat_map(|k| [k as u64, 100 + k as u64])
                    .collect();
                gather_items(w, n, 2, &mine).unwrap()
            });
            let want: Vec<u64> = (0..n as u64).flat_map(|k| [k, 100 + k]).collect();
            for g in got {
                assert_eq!(g, want, "size {size}");
            }
        }
    }

    #[test]
    fn a_disagreeing_rank_is_named_and_a_stop_vote_reaches_all() {
        let got = Local::run(3, |w| {
            let mut d = [7u8; 32];
            if w.rank() == 2 {
                d[5] = 8;
            }
            (
                agree(w, "adapter", || Ok(d)).unwrap_err().to_string(),
                agree(w, "adapter", || Ok([1; 32])).is_ok(),
                any(w, w.rank() == 1).unwrap(),
                any(w, false).unwrap(),
            )
        });
        for (err, same, one, none) in got {
            assert!(err.contains("rank 2") && err.contains("adapter"), "{err}");
            assert!(same && one && !none);
        }
    }
}
