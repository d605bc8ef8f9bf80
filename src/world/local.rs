//! Ranks as threads of one process: the multi-rank code paths (ordered gathers, the exact
//! gradient fold, the single writer) run and are tested in the default build, without MPI.

use std::sync::{Arc, Barrier, Mutex};

use super::World;
use crate::error::Result;

/// One rank of a [`Local`] group: its collectives meet the other threads' at a barrier.
pub struct Local {
    rank: usize,
    shared: Arc<Shared>,
}

struct Shared {
    size: usize,
    barrier: Barrier,
    slots: Mutex<Vec<Vec<u8>>>,
}

impl Local {
    /// Runs `f` on `size` ranks, one thread each, and returns their results in rank order. A
    /// panic on one rank is re-raised here (the others may be left waiting: tests only).
    pub fn run<T: Send>(size: usize, f: impl Fn(&dyn World) -> T + Sync) -> Vec<T> {
        let shared = Arc::new(Shared {
            size,
            barrier: Barrier::new(size),
            slots: Mutex::new(vec![Vec::new(); size]),
        });
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..size)
                .map(|rank| {
                    let world = Local {
                        rank,
                        shared: shared.clone(),
                    };
                    let f = &f;
                    s.spawn(move || f(&world))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        })
    }

    /// Puts `bytes` in this rank's slot, waits for all, and reads every slot.
    fn exchange(&self, bytes: &[u8]) -> Vec<Vec<u8>> {
        self.shared.slots.lock().expect("slots")[self.rank] = bytes.to_vec();
        self.shared.barrier.wait();
        let all = self.shared.slots.lock().expect("slots").clone();
        // Nobody overwrites a slot before everyone has read it.
        self.shared.barrier.wait();
        all
    }
}

impl World for Local {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.shared.size
    }
    fn all_gather(&self, local: &[u8]) -> Result<Vec<u8>> {
        Ok(self.exchange(local).concat())
    }
    fn broadcast(&self, bytes: Vec<u8>) -> Result<Vec<u8>> {
        Ok(self.exchange(&bytes).swap_remove(0))
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
    fn transport(&self) -> String {
        "threads of one process".into()
    }
}
