//! The verification table of a report: each check the run made on itself, what it measured,
//! and one of three outcomes. A check the run could not measure (a single-step run has no
//! "after the first update"; a run without evaluations has no validation curve) says so: it
//! never passes by default.

use crate::records::RunRecords;

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Measured, and it held.
    Pass,
    /// Measured, and it did not hold.
    Fail,
    /// The run did not measure it.
    NotMeasured,
}

impl Outcome {
    /// Pass or fail from a measured condition.
    pub fn of(ok: bool) -> Self {
        if ok { Outcome::Pass } else { Outcome::Fail }
    }

    /// How the report's table writes it.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail => "FAIL",
            Outcome::NotMeasured => "not measured",
        }
    }
}

/// One row of the verification table.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckRow {
    /// What was checked.
    pub name: String,
    /// What was measured.
    pub measured: String,
    /// The outcome.
    pub outcome: Outcome,
}

/// The training loss at the start and end of a run: means of the first and last quarter of
/// the logged steps (per-step losses are noisy with small batches).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossTrend {
    /// Mean of the first `window` logged losses.
    pub head: f64,
    /// Mean of the last `window` logged losses.
    pub tail: f64,
    /// Steps in each mean.
    pub window: usize,
    /// Logged training steps in all.
    pub logged: usize,
}

impl LossTrend {
    /// The trend of a run's logged training losses.
    pub fn of(run: &RunRecords) -> Self {
        let train: Vec<f64> = run
            .metrics
            .iter()
            .filter(|m| m.is_train())
            .map(|m| m.loss)
            .collect();
        let window = (train.len() / 4).max(1);
        let mean = |xs: &[f64]| {
            if xs.is_empty() {
                f64::NAN
            } else {
                xs.iter().sum::<f64>() / xs.len() as f64
            }
        };
        Self {
            head: mean(&train[..window.min(train.len())]),
            tail: mean(&train[train.len().saturating_sub(window)..]),
            window,
            logged: train.len(),
        }
    }
}

/// (first, last) validation loss when the run evaluated at least twice.
pub fn validation_trend(run: &RunRecords) -> Option<(f64, f64)> {
    let evals = &run.checks.eval_losses;
    match (evals.first(), evals.last()) {
        (Some(a), Some(b)) if evals.len() > 1 => Some((a.1, b.1)),
        _ => None,
    }
}

fn opt(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |x| format!("{x:.4}"))
}

/// Every row of the verification table, in the report's order.
pub fn rows(run: &RunRecords) -> Vec<CheckRow> {
    let k = &run.checks;
    let n_b = k.adapter_tensors / 2;
    let row = |name: String, measured: String, outcome| CheckRow {
        name,
        measured,
        outcome,
    };
    let coverage = |seen: Option<usize>| match seen {
        Some(n) => (format!("{n}/{n_b}"), Outcome::of(n == n_b && n_b > 0)),
        None => (
            "none: the run made no such backward".into(),
            Outcome::NotMeasured,
        ),
    };
    let (b_measured, b_outcome) = coverage(k.lora_b_with_grad_first_step);
    let (a_measured, a_outcome) = coverage(k.lora_a_with_grad_after_first_update);
    let fp_equal =
        k.base_fingerprint_before == k.base_fingerprint_after && k.changed_base_tensors.is_empty();
    let changed = if k.changed_base_tensors.is_empty() {
        String::new()
    } else {
        format!(", changed: {}", k.changed_base_tensors.join(", "))
    };
    let short = |s: &str| s[..16.min(s.len())].to_string();
    let s = &run.summary;
    let updated = s.steps - s.skipped_steps - s.overflow_steps;
    [
        row(
            "The adapter was updated (steps that applied an update)".into(),
            format!("{updated} of {}", s.steps),
            Outcome::of(updated > 0),
        ),
        row(
            "Trainable parameters (PEFT's format)".into(),
            format!("`{}`", k.trainable_params),
            Outcome::of(k.adapter_tensors > 0),
        ),
        row(
            format!(
                "Base weights unchanged (SHA-256 of {} tensors before vs after)",
                k.base_tensors
            ),
            format!(
                "`{}…` vs `{}…`{changed}",
                short(&k.base_fingerprint_before),
                short(&k.base_fingerprint_after)
            ),
            Outcome::of(fp_equal),
        ),
        row(
            "Every lora_B has a gradient on the first backward".into(),
            b_measured,
            b_outcome,
        ),
        row(
            "Every lora_A has a gradient after the first update".into(),
            a_measured,
            a_outcome,
        ),
        row(
            "Loss finite at every step".into(),
            if k.all_losses_finite {
                "all finite"
            } else {
                "non-finite value seen"
            }
            .into(),
            Outcome::of(k.all_losses_finite),
        ),
        training_loss_row(run),
    ]
    .into_iter()
    // A run with no validation set has no validation rows: the report says so instead.
    .chain(
        run.data
            .has_validation()
            .then(|| [validation_falls_row(run), validation_row(run)])
            .into_iter()
            .flatten(),
    )
    .collect()
}

fn training_loss_row(run: &RunRecords) -> CheckRow {
    let t = LossTrend::of(run);
    let k = &run.checks;
    CheckRow {
        name: format!(
            "Training loss falls (mean of the first vs the last {} logged steps)",
            t.window
        ),
        measured: if t.logged < 2 {
            format!("{} logged step(s): no trend to measure", t.logged)
        } else {
            format!(
                "{:.4} → {:.4} (single steps: {} → {})",
                t.head,
                t.tail,
                opt(k.first_loss),
                opt(k.last_loss)
            )
        },
        outcome: if t.logged < 2 {
            Outcome::NotMeasured
        } else {
            Outcome::of(t.tail < t.head)
        },
    }
}

fn validation_falls_row(run: &RunRecords) -> CheckRow {
    let trend = validation_trend(run);
    CheckRow {
        name: "Validation loss falls (first → last evaluation)".into(),
        measured: trend.map_or_else(
            || {
                format!(
                    "{} evaluation(s): no trend to measure",
                    run.checks.eval_losses.len()
                )
            },
            |(a, b)| format!("{a:.4} → {b:.4}"),
        ),
        outcome: trend.map_or(Outcome::NotMeasured, |(a, b)| Outcome::of(b < a)),
    }
}

fn validation_row(run: &RunRecords) -> CheckRow {
    let evals = &run.checks.eval_losses;
    let text: Vec<String> = evals
        .iter()
        .map(|(st, l)| format!("step {st}: {l:.4} (ppl {:.2})", l.exp()))
        .collect();
    CheckRow {
        name: "Validation loss".into(),
        measured: if evals.is_empty() {
            "no evaluation".into()
        } else {
            text.join("; ")
        },
        outcome: if evals.is_empty() {
            Outcome::NotMeasured
        } else {
            Outcome::of(evals.iter().all(|(_, l)| l.is_finite()))
        },
    }
}

/// The run's standing over all rows: any failure (or an interruption) needs attention; a
/// check not measured is said, never counted as a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Every check measured and passed.
    AllPassed,
    /// No failure, but some checks were not measured.
    Incomplete {
        /// How many were not measured.
        not_measured: usize,
    },
    /// A check failed or the run was interrupted.
    NeedsAttention,
}

/// The standing of a run given its rows.
pub fn standing(run: &RunRecords, rows: &[CheckRow]) -> Standing {
    let not_measured = rows
        .iter()
        .filter(|r| r.outcome == Outcome::NotMeasured)
        .count();
    if run.summary.interrupted || rows.iter().any(|r| r.outcome == Outcome::Fail) {
        Standing::NeedsAttention
    } else if not_measured > 0 {
        Standing::Incomplete { not_measured }
    } else {
        Standing::AllPassed
    }
}
