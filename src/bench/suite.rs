//! `lorasft bench`: every (shape, thread count) in a fresh lorasft process (`bench --one`), so
//! peak memory and thread pools are per measurement; optionally another implementation's bench
//! command back to back with each, the order alternating per round, so a machine whose speed
//! drifts moves both sides of a ratio alike.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::bench::table::{self, BenchRow, PairedRatio};
use crate::error::{Error, Result};
use crate::model::fixture::BenchShape;

/// What to measure.
#[derive(Debug, Clone)]
pub struct Suite {
    /// Shapes to run.
    pub shapes: Vec<BenchShape>,
    /// Thread counts; each (shape, threads) pair runs in a fresh process.
    pub threads: Vec<usize>,
    /// Timed steps per shape (after one warm-up step).
    pub steps: usize,
    /// New tokens for the generation figure.
    pub gen_tokens: usize,
    /// Seed of the weights and the batch.
    pub seed: u64,
    /// Another implementation's bench command, given `--shapes S --threads T --steps N --seed X`
    /// and printing bench rows as JSON lines.
    pub against: Option<String>,
    /// Rounds of the whole run.
    pub rounds: usize,
    /// JSON-lines files of rows measured elsewhere, shown beside.
    pub compare: Vec<PathBuf>,
    /// Dataset and tokenizer for the encoding figure (skipped when either is absent).
    pub encoding: (PathBuf, PathBuf),
}

/// What a suite measured.
#[derive(Debug, Clone)]
pub struct SuiteResult {
    /// Rows merged over rounds (and rows read from `compare` files), sorted for the table.
    pub rows: Vec<BenchRow>,
    /// lorasft's step time over each other implementation's, per round.
    pub paired: Vec<PairedRatio>,
    /// Records encoded and seconds, when the encoding figure ran.
    pub encoding: Option<(usize, f64)>,
}

impl Suite {
    /// Runs every round and reads the comparison files.
    pub fn run(&self) -> Result<SuiteResult> {
        // Inputs first: a bad one is refused before minutes of timing.
        let (data, tokenizer) = &self.encoding;
        if data.exists() && tokenizer.exists() {
            crate::input::open(data)?;
            crate::input::open(tokenizer)?;
        }
        let compared = self
            .compare
            .iter()
            .map(|path| read_rows(path))
            .collect::<Result<Vec<_>>>()?;
        let rounds = (0..self.rounds.max(1))
            .map(|round| self.round(round))
            .collect::<Result<Vec<_>>>()?;
        let paired = table::paired_ratios(&rounds);
        let mut rows = table::merge_rounds(&rounds);
        rows.extend(compared.into_iter().flatten());
        rows.sort_by(|x, y| {
            let key = |r: &BenchRow| (r.shape.clone(), r.threads, r.impl_name != "lorasft");
            key(x).cmp(&key(y))
        });
        let (data, tokenizer) = &self.encoding;
        let encoding = if data.exists() && tokenizer.exists() {
            Some(super::time_encoding(data, tokenizer)?)
        } else {
            None
        };
        Ok(SuiteResult {
            rows,
            paired,
            encoding,
        })
    }

    /// One round: every shape and thread count, lorasft and the other side in alternating order.
    fn round(&self, round: usize) -> Result<Vec<BenchRow>> {
        let mut rows = Vec::new();
        for &shape in &self.shapes {
            for &threads in &self.threads {
                eprintln!(
                    "bench round {}: {} with {threads} thread(s)...",
                    round + 1,
                    shape.name()
                );
                let name = format!("{shape:?}").to_lowercase();
                let theirs = || match &self.against {
                    Some(cmd) => self.other_rows(cmd, &name, threads),
                    None => Ok(Vec::new()),
                };
                if round.is_multiple_of(2) {
                    rows.push(self.lorasft_row(&name, threads)?);
                    rows.extend(theirs()?);
                } else {
                    rows.extend(theirs()?);
                    rows.push(self.lorasft_row(&name, threads)?);
                }
            }
        }
        Ok(rows)
    }

    /// One lorasft row from a fresh process (`bench --one`) with `threads` threads.
    fn lorasft_row(&self, shape: &str, threads: usize) -> Result<BenchRow> {
        let args = [
            "--one",
            "--shapes",
            shape,
            "--steps",
            &self.steps.to_string(),
            "--gen-tokens",
            &self.gen_tokens.to_string(),
            "--seed",
            &self.seed.to_string(),
        ]
        .map(Into::into);
        let mut rows = crate::bench::child_rows::<BenchRow>(&args, threads)?;
        match (rows.pop(), rows.is_empty()) {
            (Some(row), true) => Ok(row),
            _ => Err(Error::Invalid(format!(
                "bench {shape} with {threads} thread(s) printed {} rows, not one",
                rows.len() + 1
            ))),
        }
    }

    /// The rows another implementation's bench command prints for one shape and thread count.
    fn other_rows(&self, cmd: &str, shape: &str, threads: usize) -> Result<Vec<BenchRow>> {
        let full = format!(
            "{cmd} --shapes {shape} --threads {threads} --steps {} --seed {}",
            self.steps, self.seed
        );
        let out = Command::new("sh")
            .args(["-c", &full])
            .output()
            .map_err(|e| Error::Invalid(format!("running {full:?}: {e}")))?;
        if !out.status.success() {
            return Err(Error::Invalid(format!(
                "{full:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let rows: Vec<BenchRow> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l.trim()).ok())
            .collect();
        if rows.is_empty() {
            return Err(Error::Invalid(format!("{full:?} printed no bench rows")));
        }
        Ok(rows)
    }
}

/// Bench rows from a JSON-lines file, with errors naming the file and line.
pub fn read_rows(path: &Path) -> Result<Vec<BenchRow>> {
    let text = crate::input::read_text(path, crate::input::DATASET_CEILING, "bench rows")?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| Error::Json {
                path: path.to_path_buf(),
                msg: format!("line {}: not a bench row: {e}", i + 1),
            })
        })
        .collect()
}

/// The printed result: the table, per-round ratios (with several rounds), the encoding figure
/// and a footer naming what was measured where.
pub fn render(suite: &Suite, result: &SuiteResult) -> String {
    let mut out = table::render_table(&result.rows, &result.paired);
    if suite.rounds > 1 {
        for p in &result.paired {
            let each: Vec<String> = p.ratios.iter().map(|r| format!("{r:.2}")).collect();
            out.push_str(&format!(
                "\n{} {} thread(s), lorasft / {} per round: {}\n",
                p.shape,
                p.threads,
                p.impl_name,
                each.join(", ")
            ));
        }
    }
    if let Some((n, secs)) = result.encoding {
        out.push_str(&format!(
            "\nencoding {n} records of {} (max length 512): {secs:.3} s, {:.0} records/s\n",
            suite.encoding.0.display(),
            n as f64 / secs
        ));
    }
    out.push_str(&efficiency(&result.rows));
    out.push_str(&format!(
        "\nf32, LoRA r 8 on q_proj,v_proj, labels = input_ids, weights from seed {}; {} on {}\n",
        suite.seed,
        env!("CARGO_PKG_VERSION"),
        crate::sys::cpu_name()
    ));
    out
}

/// Each lorasft row's step efficiency: GFLOP per step over the median step time, as a share
/// of `threads` × one core's FMA peak, measured here and now.
fn efficiency(rows: &[BenchRow]) -> String {
    let peaks = super::fma_peak();
    let Some(peak) = peaks.widest() else {
        return String::new();
    };
    let show = |p: Option<f64>| p.map_or("none".to_string(), |g| format!("{g:.1} GFLOP/s"));
    let mut out = format!(
        "\none core's FMA peak measured now: 256-bit {}, 512-bit {}\nstep efficiency (GFLOP per step counted as 4 N + 12 L s h per token; against the widest peak, {peak:.1} GFLOP/s):\n",
        show(peaks.avx2),
        show(peaks.avx512)
    );
    for r in rows.iter().filter(|r| r.impl_name == "lorasft") {
        let Some(gflop) = BenchShape::ALL
            .iter()
            .find(|s| s.name() == r.shape)
            .and_then(|&s| super::step_gflop(s).ok())
        else {
            continue;
        };
        let rate = gflop / (r.step_ms / 1e3);
        out.push_str(&format!(
            "- {} with {} thread(s): {gflop:.1} GFLOP in {:.0} ms = {rate:.1} GFLOP/s, {:.0}% of {} × peak\n",
            r.shape,
            r.threads,
            r.step_ms,
            100.0 * rate / (peak * r.threads as f64),
            r.threads
        ));
    }
    out
}

/// Every row as JSON lines.
pub fn json_lines(rows: &[BenchRow]) -> Result<String> {
    rows.iter()
        .map(|r| {
            serde_json::to_string(r)
                .map(|l| l + "\n")
                .map_err(|e| Error::Invalid(e.to_string()))
        })
        .collect()
}
