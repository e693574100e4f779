//! Learning-rate schedule: linear warmup from 0, then cosine or linear decay to 0 (the
//! `transformers` `get_cosine_schedule_with_warmup` / `get_linear_schedule_with_warmup` shapes).

/// What follows warmup: cosine or linear decay to 0, or a constant rate (lathe-core's type, so
/// the API's value reaches the loop without a string in between).
pub use lathe_core::spec::LrScheduler as Decay;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub peak_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub decay: Decay,
}

impl Schedule {
    /// The learning rate of optimizer step `step` (1-based, as reported in events). Step s uses
    /// the schedule's value after s-1 scheduler ticks, exactly as `LambdaLR` does.
    pub fn lr_at(&self, step: u64) -> f64 {
        let tick = step.saturating_sub(1);
        if tick < self.warmup_steps {
            return self.peak_lr * tick as f64 / self.warmup_steps.max(1) as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = (tick - self.warmup_steps) as f64 / decay_steps;
        let factor = match self.decay {
            Decay::Constant => 1.0,
            Decay::Linear => (1.0 - progress).max(0.0),
            Decay::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
        };
        self.peak_lr * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(decay: Decay) -> Schedule {
        Schedule { peak_lr: 1e-3, warmup_steps: 10, total_steps: 110, decay }
    }

    #[test]
    fn warmup_rises_linearly_from_zero() {
        let s = schedule(Decay::Cosine);
        assert_eq!(s.lr_at(1), 0.0);
        assert!((s.lr_at(6) - 5e-4).abs() < 1e-15);
        assert!((s.lr_at(11) - 1e-3).abs() < 1e-15);
    }

    #[test]
    fn cosine_reaches_half_at_midpoint_and_zero_at_the_end() {
        let s = schedule(Decay::Cosine);
        assert!((s.lr_at(61) - 5e-4).abs() < 1e-12);
        assert!(s.lr_at(111).abs() < 1e-15);
    }

    #[test]
    fn linear_decay_is_a_straight_line() {
        let s = schedule(Decay::Linear);
        assert!((s.lr_at(36) - 7.5e-4).abs() < 1e-12);
        assert!((s.lr_at(86) - 2.5e-4).abs() < 1e-12);
    }

    #[test]
    fn without_warmup_the_first_step_uses_the_peak() {
        let s = Schedule { warmup_steps: 0, ..schedule(Decay::Cosine) };
        assert_eq!(s.lr_at(1), 1e-3);
    }
}
