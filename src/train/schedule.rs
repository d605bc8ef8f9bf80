//! Learning-rate schedules as transformers defines them (`get_*_schedule_with_warmup`), so a
//! run can be compared step for step with HF Trainer: update `t` (0-based) uses
//! `lr * lambda(t)`, and under warmup the first update uses lr 0.

use serde::{Deserialize, Serialize};

/// The decay after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Constant after warmup.
    Constant,
    /// Linear decay to 0 at the last step (transformers' default).
    #[default]
    Linear,
    /// Half-cosine decay to 0.
    Cosine,
}

/// Warmup length, in steps or as a share of all steps (rounded up, as transformers does).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Warmup {
    /// A number of optimizer steps.
    Steps(usize),
    /// A fraction of the total steps.
    Ratio(f64),
}

impl Default for Warmup {
    fn default() -> Self {
        Warmup::Steps(0)
    }
}

impl Warmup {
    /// Warmup steps for a run of `total` steps.
    pub fn steps(self, total: usize) -> usize {
        match self {
            Warmup::Steps(n) => n,
            Warmup::Ratio(r) => (r * total as f64).ceil() as usize,
        }
    }
}

/// The multiplier of the base learning rate at update `t` of `total`, with `warmup` steps.
pub fn lambda(schedule: Schedule, t: usize, warmup: usize, total: usize) -> f64 {
    if t < warmup {
        return t as f64 / warmup.max(1) as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1) as f64;
    let progress = (t - warmup) as f64 / decay_steps;
    match schedule {
        Schedule::Constant => 1.0,
        Schedule::Linear => ((total.saturating_sub(t)) as f64 / decay_steps).max(0.0),
        Schedule::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_transformers_definitions() {
        // get_linear_schedule_with_warmup(warmup=2, total=10)
        let lin: Vec<f64> = (0..10)
            .map(|t| lambda(Schedule::Linear, t, 2, 10))
            .collect();
        assert_eq!(
            lin,
            vec![0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
        );
        // get_cosine_schedule_with_warmup: halfway through the decay is 0.5
        assert!((lambda(Schedule::Cosine, 6, 2, 10) - 0.5).abs() < 1e-12);
        assert_eq!(lambda(Schedule::Cosine, 2, 2, 10), 1.0);
        assert_eq!(lambda(Schedule::Constant, 0, 0, 10), 1.0);
        assert_eq!(lambda(Schedule::Constant, 1, 4, 10), 0.25);
        assert_eq!(Warmup::Ratio(0.03).steps(100), 3);
        assert_eq!(Warmup::Ratio(0.1).steps(15), 2);
    }
}
