//! Dynamic loss scaling for f16 training, as torch.amp.GradScaler does it: the loss is
//! multiplied by `scale` before the backward so small gradients survive f16's range; the
//! gradients are divided by it before clipping; a step whose gradients hold an inf or NaN is
//! skipped and the scale halved; after `growth_interval` clean steps in a row it doubles.

use serde::{Deserialize, Serialize};

/// The scaler's state (saved in checkpoints so a resumed run scales the same).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    /// Current multiplier of the loss (1 and fixed when disabled).
    pub scale: f64,
    /// Clean steps since the last change of scale.
    pub clean_steps: usize,
    /// Clean steps after which the scale doubles.
    pub growth_interval: usize,
    /// Whether scaling is on (f16 only).
    pub enabled: bool,
}

/// What the scaler decided for one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleDecision {
    /// Gradients are finite: apply the step.
    Step,
    /// Gradients overflowed: skip the step (the scale was halved).
    Skip,
}

impl LossScaler {
    /// torch's defaults: initial scale 2^16, growth every 2000 clean steps.
    pub fn enabled() -> Self {
        Self {
            scale: 65536.0,
            clean_steps: 0,
            growth_interval: 2000,
            enabled: true,
        }
    }

    /// The scaler a precision needs: enabled for f16, disabled otherwise.
    pub fn for_precision(p: crate::device::Precision) -> Self {
        if p.needs_loss_scaling() {
            Self::enabled()
        } else {
            Self::disabled()
        }
    }

    /// A scaler that never scales (fp32, bf16).
    pub fn disabled() -> Self {
        Self {
            scale: 1.0,
            clean_steps: 0,
            growth_interval: 2000,
            enabled: false,
        }
    }

    /// Records whether this step's unscaled gradients were all finite and decides.
    pub fn update(&mut self, grads_finite: bool) -> ScaleDecision {
        if !self.enabled {
            return if grads_finite {
                ScaleDecision::Step
            } else {
                ScaleDecision::Skip
            };
        }
        if grads_finite {
            self.clean_steps += 1;
            if self.clean_steps >= self.growth_interval {
                self.scale *= 2.0;
                self.clean_steps = 0;
            }
            ScaleDecision::Step
        } else {
            // Never below 1: a scale under 1 would only lose more gradient.
            self.scale = (self.scale / 2.0).max(1.0);
            self.clean_steps = 0;
            ScaleDecision::Skip
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_skips_and_halves_then_clean_steps_grow_it() {
        let mut s = LossScaler {
            growth_interval: 3,
            ..LossScaler::enabled()
        };
        assert_eq!(s.update(false), ScaleDecision::Skip);
        assert_eq!(s.scale, 32768.0);
        assert_eq!(s.update(true), ScaleDecision::Step);
        assert_eq!(s.update(true), ScaleDecision::Step);
        assert_eq!(s.scale, 32768.0, "two clean steps are not enough");
        assert_eq!(s.update(true), ScaleDecision::Step);
        assert_eq!(s.scale, 65536.0, "the third clean step doubles");
        assert_eq!(s.clean_steps, 0);
        // An overflow resets the clean count.
        s.update(true);
        s.update(false);
        assert_eq!((s.scale, s.clean_steps), (32768.0, 0));
    }

    #[test]
    fn scale_never_drops_below_one() {
        let mut s = LossScaler::enabled();
        for _ in 0..40 {
            s.update(false);
        }
        assert_eq!(s.scale, 1.0);
    }

    #[test]
    fn disabled_scaler_keeps_scale_one_and_still_skips_non_finite_steps() {
        let mut s = LossScaler::disabled();
        assert_eq!(s.update(true), ScaleDecision::Step);
        assert_eq!(s.update(false), ScaleDecision::Skip);
        assert_eq!(s.scale, 1.0);
    }
}
