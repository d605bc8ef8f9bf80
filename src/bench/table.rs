//! The benchmark table: rows from lorasft and from other implementations, merged over rounds,
//! paired per round into ratios, and rendered as Markdown.

use serde::{Deserialize, Serialize};

/// One line of the benchmark table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchRow {
    /// What was run ("lorasft", or the comparison's name).
    pub impl_name: String,
    /// Shape name.
    pub shape: String,
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Compute threads.
    pub threads: usize,
    /// Median optimizer step, milliseconds.
    pub step_ms: f64,
    /// Fastest and slowest timed step, milliseconds.
    pub step_range_ms: (f64, f64),
    /// Training tokens per second at the median step.
    pub tokens_per_s: f64,
    /// Median forward (logits), milliseconds.
    pub forward_ms: f64,
    /// Generation with the KV cache, new tokens per second (batch 1).
    pub gen_tokens_per_s: f64,
    /// Peak resident memory of the process, MiB.
    pub peak_rss_mib: f64,
}

/// Sorts `xs` and returns its median.
pub fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// lorasft's step time over another implementation's at one shape and thread count, one ratio
/// per round: each pair was measured back to back, so a machine whose speed drifts between
/// rounds (shared CPUs do, by ±20 % here) moves both sides of a ratio alike.
#[derive(Debug, Clone, PartialEq)]
pub struct PairedRatio {
    /// The other implementation.
    pub impl_name: String,
    /// Shape name.
    pub shape: String,
    /// Compute threads.
    pub threads: usize,
    /// lorasft ms/step over the other's, in round order.
    pub ratios: Vec<f64>,
}

impl PairedRatio {
    /// The median over rounds: the figure the table quotes.
    pub fn median(&self) -> f64 {
        median(&mut self.ratios.clone())
    }
}

/// The paired ratios of every (other implementation, shape, threads) that has a lorasft row in
/// the same round.
pub fn paired_ratios(rounds: &[Vec<BenchRow>]) -> Vec<PairedRatio> {
    let mut out: Vec<PairedRatio> = Vec::new();
    for round in rounds {
        for r in round.iter().filter(|r| r.impl_name != "lorasft") {
            let Some(ours) = round
                .iter()
                .find(|o| o.impl_name == "lorasft" && o.shape == r.shape && o.threads == r.threads)
            else {
                continue;
            };
            let ratio = ours.step_ms / r.step_ms;
            match out.iter_mut().find(|p| {
                p.impl_name == r.impl_name && p.shape == r.shape && p.threads == r.threads
            }) {
                Some(p) => p.ratios.push(ratio),
                None => out.push(PairedRatio {
                    impl_name: r.impl_name.clone(),
                    shape: r.shape.clone(),
                    threads: r.threads,
                    ratios: vec![ratio],
                }),
            }
        }
    }
    out
}

/// One row per (implementation, shape, threads) over all rounds: median step, forward and
/// generation figures, the fastest and slowest step seen, the highest peak RSS.
pub fn merge_rounds(rounds: &[Vec<BenchRow>]) -> Vec<BenchRow> {
    let mut groups: Vec<Vec<&BenchRow>> = Vec::new();
    for r in rounds.iter().flatten() {
        match groups.iter_mut().find(|g| {
            g[0].impl_name == r.impl_name && g[0].shape == r.shape && g[0].threads == r.threads
        }) {
            Some(g) => g.push(r),
            None => groups.push(vec![r]),
        }
    }
    groups
        .into_iter()
        .map(|g| {
            let pick =
                |f: fn(&BenchRow) -> f64| median(&mut g.iter().map(|r| f(r)).collect::<Vec<_>>());
            let step_ms = pick(|r| r.step_ms);
            let lo = g
                .iter()
                .map(|r| r.step_range_ms.0)
                .fold(f64::INFINITY, f64::min);
            let hi = g.iter().map(|r| r.step_range_ms.1).fold(0.0, f64::max);
            BenchRow {
                step_ms,
                step_range_ms: (lo, hi),
                tokens_per_s: (g[0].batch * g[0].seq) as f64 / (step_ms / 1e3),
                forward_ms: pick(|r| r.forward_ms),
                gen_tokens_per_s: pick(|r| r.gen_tokens_per_s),
                peak_rss_mib: g.iter().map(|r| r.peak_rss_mib).fold(0.0, f64::max),
                ..g[0].clone()
            }
        })
        .collect()
}

/// The rows as a Markdown table. Where a row of another implementation has the same shape and
/// thread count as a lorasft row, the last column gives lorasft's step time as a ratio of it:
/// the median paired ratio when `paired` has one, else the ratio of the two rows.
pub fn render_table(rows: &[BenchRow], paired: &[PairedRatio]) -> String {
    let mut out = String::from(
        "| impl | shape | batch × seq | threads | ms/step (median) | range | tokens/s | forward ms | gen tok/s | peak RSS MiB | lorasft / this |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let ours = rows
            .iter()
            .find(|o| o.impl_name == "lorasft" && o.shape == r.shape && o.threads == r.threads);
        let pair = paired
            .iter()
            .find(|p| p.impl_name == r.impl_name && p.shape == r.shape && p.threads == r.threads);
        let ratio = match (ours, pair) {
            (_, Some(p)) => format!("{:.2}×", p.median()),
            (Some(o), None) if r.impl_name != "lorasft" => format!("{:.2}×", o.step_ms / r.step_ms),
            _ => "".into(),
        };
        out.push_str(&format!(
            "| {} | {} | {} × {} | {} | {:.0} | {:.0}–{:.0} | {:.0} | {:.0} | {:.1} | {:.0} | {} |\n",
            r.impl_name,
            r.shape,
            r.batch,
            r.seq,
            r.threads,
            r.step_ms,
            r.step_range_ms.0,
            r.step_range_ms.1,
            r.tokens_per_s,
            r.forward_ms,
            r.gen_tokens_per_s,
            r.peak_rss_mib,
            ratio
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(impl_name: &str, threads: usize, step_ms: f64, rss: f64) -> BenchRow {
        BenchRow {
            impl_name: impl_name.into(),
            shape: "tiny".into(),
            batch: 4,
            seq: 128,
            threads,
            step_ms,
            step_range_ms: (step_ms - 1.0, step_ms + 1.0),
            tokens_per_s: 512.0 / (step_ms / 1e3),
            forward_ms: step_ms / 2.0,
            gen_tokens_per_s: 10.0,
            peak_rss_mib: rss,
        }
    }

    #[test]
    fn ratios_pair_rows_of_the_same_round_and_the_median_is_over_rounds() {
        let rounds = vec![
            vec![row("lorasft", 1, 400.0, 10.0), row("pt", 1, 800.0, 90.0)],
            vec![row("pt", 1, 1000.0, 95.0), row("lorasft", 1, 600.0, 12.0)],
            vec![row("lorasft", 1, 500.0, 11.0), row("pt", 1, 500.0, 91.0)],
            // No lorasft row at 2 threads: nothing to pair.
            vec![row("pt", 2, 300.0, 91.0)],
        ];
        let paired = paired_ratios(&rounds);
        assert_eq!(paired.len(), 1);
        assert_eq!(paired[0].ratios, vec![0.5, 0.6, 1.0]);
        assert_eq!(paired[0].median(), 0.6);
        // The ratio of the medians (500 / 800) would differ from the paired median (0.6).
        let merged = merge_rounds(&rounds);
        let ours = merged.iter().find(|r| r.impl_name == "lorasft").unwrap();
        assert_eq!(ours.step_ms, 500.0);
        assert_eq!(ours.step_range_ms, (399.0, 601.0));
        assert_eq!(ours.peak_rss_mib, 12.0);
        assert_eq!(merged.len(), 3);
        let table = render_table(&merged, &paired);
        let pt1 = table
            .lines()
            .find(|l| l.starts_with("| pt | tiny | 4 × 128 | 1 |"))
            .unwrap();
        assert!(pt1.ends_with("| 0.60× |"), "{pt1}");
        let pt2 = table
            .lines()
            .find(|l| l.starts_with("| pt | tiny | 4 × 128 | 2 |"))
            .unwrap();
        assert!(
            pt2.ends_with("|  |"),
            "no lorasft row to compare with: {pt2}"
        );
    }
}
