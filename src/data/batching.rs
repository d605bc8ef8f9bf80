//! How examples become micro-batches (`encode.batching`): the seeded orders and the packing
//! behind each mode, and the collation of a planned micro-batch into rows.
//!
//! - **padded** (the reference): the epoch's order (seeded shuffle, or file order) in chunks of
//!   `batch_size` examples, one example per row.
//! - **group_by_length**: transformers' `LengthGroupedSampler`. The epoch's shuffled order is cut
//!   into mega-batches of `batch_size * min(n / (4 * batch_size), 50)` examples (at least one
//!   batch), each sorted longest first, and the example that is longest overall is swapped to
//!   the front so the largest batch comes first. Chunks of `batch_size` then share a length, so
//!   dynamic padding has little to pad.
//! - **packed**: whole examples are packed into rows of at most `capacity` (= `max_len`)
//!   tokens, once per run, by first-fit-decreasing within windows of [`PACK_WINDOW`] examples of
//!   the seeded order. Each epoch shuffles the rows; a micro-batch is `batch_size` rows. The
//!   model sees where each example starts (`Row::segments`): positions restart at 0 and
//!   attention is block-diagonal, so packing changes no example's loss or gradient.
//!
//! Every order is a pure function of (lengths, settings, seed, epoch), so a resumed run
//! rebuilds exactly the micro-batches it would have seen.

use serde::{Deserialize, Serialize};

use crate::data::encode::{Encoder, Example, Row};
use crate::rng::Rng;

/// How examples are grouped into rows and micro-batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Batching {
    /// One example per row, batches in epoch order (the reference run).
    #[default]
    Padded,
    /// One example per row, batches of similar length (transformers' `group_by_length`).
    #[value(alias = "group_by_length")]
    GroupByLength,
    /// Several whole examples per row, each attending only to itself.
    Packed,
}

impl Batching {
    /// Every mode, in the order reports list them.
    pub const ALL: [Batching; 3] = [Batching::Padded, Batching::GroupByLength, Batching::Packed];

    /// The config spelling (`padded`, `group_by_length`, `packed`).
    pub fn name(self) -> &'static str {
        match self {
            Batching::Padded => "padded",
            Batching::GroupByLength => "group_by_length",
            Batching::Packed => "packed",
        }
    }
}

/// Examples per first-fit-decreasing window. Within a window the longest examples open rows
/// and the short ones fill their tails; across windows the seeded order is kept. 1,024 is
/// large enough that rows come out nearly full (the tail of a window's last rows is the only
/// loss), and small enough that packing stays local to the shuffled order and costs
/// O(window × open rows) per window, which is nothing beside one training step.
pub const PACK_WINDOW: usize = 1024;

/// Most mega-batches' size in batches for `group_by_length` (transformers' default).
const MEGA_BATCH_MULT: usize = 50;

/// Token slots of a plan's rows once collated, and the real tokens among them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PlanTokens {
    /// Rows over every micro-batch.
    pub rows: usize,
    /// Token slots the rows take, padding included (the compute spent).
    pub slots: usize,
    /// Real tokens among them.
    pub real: usize,
}

impl PlanTokens {
    /// Counts `plan`'s rows and tokens as `encoder` pads them (`lengths` per example).
    pub fn of(plan: &[MicroBatch], lengths: &[usize], encoder: &Encoder) -> Self {
        let mut t = PlanTokens::default();
        for micro in plan {
            let tokens: Vec<usize> = micro
                .rows
                .iter()
                .map(|r| r.iter().map(|&i| lengths[i]).sum())
                .collect();
            let longest = tokens.iter().copied().max().unwrap_or(0);
            t.rows += tokens.len();
            t.slots += tokens.len() * encoder.row_len(longest);
            t.real += tokens.iter().sum::<usize>();
        }
        t
    }

    /// Share of the slots that are padding.
    pub fn padding_share(&self) -> f64 {
        1.0 - self.real as f64 / self.slots.max(1) as f64
    }
}

/// One micro-batch: example indices per row (one each unless packed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MicroBatch {
    /// Example indices of each row, in row order.
    pub rows: Vec<Vec<usize>>,
}

impl MicroBatch {
    /// Examples in the micro-batch.
    pub fn examples(&self) -> usize {
        self.rows.iter().map(Vec::len).sum()
    }
}

/// Builds each epoch's micro-batches for one batching mode over fixed example lengths.
#[derive(Debug, Clone)]
pub struct Planner {
    batching: Batching,
    lengths: Vec<usize>,
    batch_size: usize,
    seed: u64,
    shuffle: bool,
    /// The run's packed rows (packed mode only), fixed for the whole run.
    packed: Vec<Vec<usize>>,
}

impl Planner {
    /// A planner over examples of `lengths` tokens (after truncation). Packed mode packs here,
    /// into rows of at most `capacity` tokens; `shuffle` false keeps file order throughout.
    pub fn new(
        batching: Batching,
        lengths: Vec<usize>,
        capacity: usize,
        batch_size: usize,
        seed: u64,
        shuffle: bool,
    ) -> Self {
        let packed = if batching == Batching::Packed {
            let order = seeded_order(lengths.len(), shuffle, seed, "pack-order");
            pack_ffd(&lengths, &order, capacity, PACK_WINDOW)
        } else {
            Vec::new()
        };
        Self {
            batching,
            lengths,
            batch_size: batch_size.max(1),
            seed,
            shuffle,
            packed,
        }
    }

    /// Micro-batches per epoch (the same in every epoch).
    pub fn micro_per_epoch(&self) -> usize {
        match self.batching {
            Batching::Packed => self.packed.len(),
            _ => self.lengths.len(),
        }
        .div_ceil(self.batch_size)
    }

    /// Rows per epoch (examples, unless packed).
    pub fn rows_per_epoch(&self) -> usize {
        match self.batching {
            Batching::Packed => self.packed.len(),
            _ => self.lengths.len(),
        }
    }

    /// The micro-batches of epoch `epoch`, in training order.
    pub fn epoch(&self, epoch: usize) -> Vec<MicroBatch> {
        let stream = format!("shuffle-epoch-{epoch}");
        let rows: Vec<Vec<usize>> = match self.batching {
            Batching::Padded => seeded_order(self.lengths.len(), self.shuffle, self.seed, &stream)
                .into_iter()
                .map(|i| vec![i])
                .collect(),
            Batching::GroupByLength => {
                let order = seeded_order(self.lengths.len(), self.shuffle, self.seed, &stream);
                group_by_length(order, &self.lengths, self.batch_size)
                    .into_iter()
                    .map(|i| vec![i])
                    .collect()
            }
            Batching::Packed => {
                let stream = format!("pack-epoch-{epoch}");
                seeded_order(self.packed.len(), self.shuffle, self.seed, &stream)
                    .into_iter()
                    .map(|r| self.packed[r].clone())
                    .collect()
            }
        };
        rows.chunks(self.batch_size)
            .map(|c| MicroBatch { rows: c.to_vec() })
            .collect()
    }
}

/// `0..n`, shuffled by the named seeded stream when `shuffle` is set.
fn seeded_order(n: usize, shuffle: bool, seed: u64, stream: &str) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    if shuffle {
        Rng::derive(seed, stream).shuffle(&mut v);
    }
    v
}

/// Reorders `order` as transformers' `get_length_grouped_indices` does: mega-batches sorted
/// longest first (ties keep their order), and the overall longest example moved to the front.
pub fn group_by_length(order: Vec<usize>, lengths: &[usize], batch_size: usize) -> Vec<usize> {
    let batch_size = batch_size.max(1);
    let mult = (order.len() / (4 * batch_size)).clamp(1, MEGA_BATCH_MULT);
    let mut megas: Vec<Vec<usize>> = order
        .chunks(mult * batch_size)
        .map(|c| {
            let mut m = c.to_vec();
            m.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
            m
        })
        .collect();
    // The longest example heads its mega-batch; the first such mega-batch wins a tie.
    let longest = megas
        .iter()
        .enumerate()
        .max_by(|(ia, a), (ib, b)| lengths[a[0]].cmp(&lengths[b[0]]).then(ib.cmp(ia)))
        .map(|(i, _)| i);
    if let Some(k) = longest.filter(|&k| k > 0) {
        let (first, rest) = megas.split_at_mut(k);
        std::mem::swap(&mut first[0][0], &mut rest[0][0]);
    }
    megas.concat()
}

/// First-fit-decreasing packing of the examples in `order` into rows of at most `capacity`
/// tokens, one window of `window` examples at a time. Within a window, examples go longest
/// first (ties in `order`'s order) into the first open row with room, else a new row; rows
/// keep the order they were opened in and examples the order they were placed in. An example
/// longer than `capacity` gets a row of its own (the encoder has already truncated it).
pub fn pack_ffd(
    lengths: &[usize],
    order: &[usize],
    capacity: usize,
    window: usize,
) -> Vec<Vec<usize>> {
    let mut rows: Vec<Vec<usize>> = Vec::new();
    for chunk in order.chunks(window.max(1)) {
        let mut sorted = chunk.to_vec();
        sorted.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        let (mut open, mut used): (Vec<Vec<usize>>, Vec<usize>) = (Vec::new(), Vec::new());
        for i in sorted {
            let len = lengths[i];
            match used.iter().position(|&u| u + len <= capacity) {
                Some(r) => {
                    open[r].push(i);
                    used[r] += len;
                }
                None => {
                    open.push(vec![i]);
                    used.push(len);
                }
            }
        }
        rows.extend(open);
    }
    rows
}

/// The rows of a planned micro-batch: one padded row per example, or packed rows when the
/// encoder's batching is `packed`. Rows share one length, chosen by the padding mode.
pub fn collate(encoder: &Encoder, micro: &MicroBatch, examples: &[Example]) -> Vec<Row> {
    let rows: Vec<Vec<&Example>> = micro
        .rows
        .iter()
        .map(|r| r.iter().map(|&i| &examples[i]).collect())
        .collect();
    if encoder.config().batching == Batching::Packed {
        encoder.collate_packed(&rows)
    } else {
        let flat: Vec<&Example> = rows.into_iter().flatten().collect();
        encoder.collate(&flat)
    }
}

/// Token slots a micro-batch's rows take (padding included) and the real tokens among them.
pub fn slots_and_real(
    encoder: &Encoder,
    micro: &MicroBatch,
    examples: &[Example],
) -> (usize, usize) {
    let rows = collate(encoder, micro, examples);
    let slots = rows.iter().map(|r| r.input_ids.len()).sum();
    let real = rows
        .iter()
        .map(|r| r.attention_mask.iter().filter(|&&m| m == 1).count())
        .sum();
    (slots, real)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ffd_fills_rows_longest_first_within_capacity_and_keeps_every_example_once() {
        let lengths = [5, 3, 8, 2, 7, 1, 4];
        let order: Vec<usize> = (0..lengths.len()).collect();
        let rows = pack_ffd(&lengths, &order, 10, 100);
        // Longest first: 8 opens row 0, 7 row 1, 5 row 2, 4 joins 5, 3 joins 7, 2 joins 8,
        // 1 joins 5+4.
        assert_eq!(rows, vec![vec![2, 3], vec![4, 1], vec![0, 6, 5]]);
        for r in &rows {
            assert!(r.iter().map(|&i| lengths[i]).sum::<usize>() <= 10);
        }
        let mut all: Vec<usize> = rows.concat();
        all.sort_unstable();
        assert_eq!(all, order);
    }

    #[test]
    fn ffd_windows_pack_separately_in_order() {
        let lengths = [6, 6, 4, 4];
        // Window 2: {6, 6} then {4, 4}; one window would pair each 6 with a 4.
        assert_eq!(
            pack_ffd(&lengths, &[0, 1, 2, 3], 10, 2),
            vec![vec![0], vec![1], vec![2, 3]]
        );
        assert_eq!(
            pack_ffd(&lengths, &[0, 1, 2, 3], 10, 4),
            vec![vec![0, 2], vec![1, 3]]
        );
    }

    #[test]
    fn group_by_length_sorts_mega_batches_and_puts_the_longest_first() {
        // 16 examples, batch 2: mult = 16 / 8 = 2, mega-batches of 4.
        let lengths: Vec<usize> = vec![3, 9, 1, 4, 2, 8, 7, 30, 5, 6, 10, 11, 12, 13, 14, 0];
        let order: Vec<usize> = (0..16).collect();
        let g = group_by_length(order, &lengths, 2);
        assert_eq!(g[0], 7, "the longest example leads");
        let mut sorted = g.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..16).collect::<Vec<_>>());
        // Mega-batches 2..4 are untouched by the swap and sorted longest first.
        for m in g.chunks(4).skip(2) {
            assert!(m.windows(2).all(|w| lengths[w[0]] >= lengths[w[1]]));
        }
    }

    #[test]
    fn plans_are_seeded_per_epoch_and_cover_every_example_once() {
        let lengths: Vec<usize> = (0..37).map(|i| 3 + (i * 7) % 20).collect();
        for batching in Batching::ALL {
            let p = Planner::new(batching, lengths.clone(), 32, 4, 9, true);
            let (e0, e1) = (p.epoch(0), p.epoch(1));
            assert_eq!(
                e0,
                Planner::new(batching, lengths.clone(), 32, 4, 9, true).epoch(0)
            );
            assert_ne!(e0, e1, "{batching:?}: each epoch has its own order");
            assert_eq!(e0.len(), p.micro_per_epoch());
            for plan in [&e0, &e1] {
                let mut all: Vec<usize> = plan.iter().flat_map(|m| m.rows.concat()).collect();
                all.sort_unstable();
                assert_eq!(all, (0..37).collect::<Vec<_>>(), "{batching:?}");
            }
        }
        let file_order = Planner::new(Batching::Padded, lengths, 32, 4, 9, false).epoch(3);
        assert_eq!(file_order[0].rows, vec![vec![0], vec![1], vec![2], vec![3]]);
    }
}
