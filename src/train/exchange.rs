//! The losses and LoRA gradients of a data-parallel step, moved between ranks: every rank ends
//! with every micro-batch's loss and gradients, in global micro-batch order, to fold them in
//! that order itself (`train::step`). This is what makes W ranks bit-identical to one
//! process, which a rank-local partial sum followed by `MPI_Allreduce` (whose order depends
//! on the algorithm and message size) is not.
//!
//! LoRA gradients are small (a few MB per micro-batch), so each is sent whole. The transfer is
//! staged through host memory as f32, which holds every adapter dtype (f32, f16, bf16)
//! exactly, so it works on any device.

use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};
use crate::world::{World, gather_items};

/// One micro-batch's summed loss and gradients (in `vars` order), or `None` when it has no
/// loss target (no backward ran).
pub type MicroGrads = Option<(f64, Vec<Tensor>)>;

/// Every rank's `local` micro-batch results (its owned block of the step's `n`), gathered in
/// global order on every rank. One process returns `local` as it is.
pub fn gather(
    world: &dyn World,
    vars: &[(String, Var)],
    n: usize,
    local: Vec<MicroGrads>,
) -> Result<Vec<MicroGrads>> {
    let size = world.size();
    if size == 1 {
        return Ok(local);
    }
    if !n.is_multiple_of(size) || local.len() != n / size {
        return Err(Error::Invalid(format!(
            "rank {}: {} of {n} micro-batches on {size} ranks; each rank must own {n}/{size}",
            world.rank(),
            local.len()
        )));
    }
    let meta: Vec<u64> = local
        .iter()
        .flat_map(|m| match m {
            None => [0, 0],
            Some((loss, _)) => [1, loss.to_bits()],
        })
        .collect();
    let meta = gather_items(world, n, 2, &meta)?;
    let elems: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let mut bytes = Vec::with_capacity(local.len() * elems * 4);
    for m in &local {
        match m {
            Some((_, grads)) => {
                for g in grads {
                    for x in g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()? {
                        bytes.extend_from_slice(&x.to_le_bytes());
                    }
                }
            }
            None => bytes.resize(bytes.len() + elems * 4, 0),
        }
    }
    let all = world.all_gather(&bytes)?;
    (0..n)
        .map(|k| {
            if meta[2 * k] == 0 {
                return Ok(None);
            }
            let mut at = k * elems * 4;
            let grads = vars
                .iter()
                .map(|(_, v)| {
                    let len = v.elem_count();
                    let xs: Vec<f32> = all[at..at + len * 4]
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                        .collect();
                    at += len * 4;
                    Tensor::from_vec(xs, v.shape(), v.device())?.to_dtype(v.dtype())
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok(Some((f64::from_bits(meta[2 * k + 1]), grads)))
        })
        .collect()
}
