//! Learning-rate schedules: linear warmup, then linear, cosine or constant decay.
//! The same curve drives teacher annealing and temperature schedules.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    /// Linear decay to zero at the last step (Hugging Face's default).
    #[default]
    Linear,
    /// Half-cosine decay to zero.
    Cosine,
    /// Constant after warmup.
    Constant,
}

/// A warmup-then-decay multiplier in `[0, 1]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub decay: Decay,
}

impl Schedule {
    /// The multiplier applied at update number `step` (0-based), as Hugging Face's
    /// `get_linear_schedule_with_warmup` / `get_cosine_schedule_with_warmup` compute it.
    pub fn factor(&self, step: u64) -> f64 {
        let (w, t) = (self.warmup_steps as f64, self.total_steps as f64);
        let s = step as f64;
        if s < w {
            return s / w.max(1.0);
        }
        let progress = ((s - w) / (t - w).max(1.0)).clamp(0.0, 1.0);
        match self.decay {
            Decay::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            Decay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            Decay::Constant => 1.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_warmup_then_decay() {
        let s = Schedule {
            warmup_steps: 10,
            total_steps: 110,
            decay: Decay::Linear,
        };
        assert_eq!(s.factor(0), 0.0);
        assert_eq!(s.factor(5), 0.5);
        assert_eq!(s.factor(10), 1.0);
        assert!((s.factor(60) - 0.5).abs() < 1e-12);
        assert_eq!(s.factor(110), 0.0);
        assert_eq!(s.factor(200), 0.0);
    }

    #[test]
    fn cosine_and_constant() {
        let c = Schedule {
            warmup_steps: 0,
            total_steps: 100,
            decay: Decay::Cosine,
        };
        assert_eq!(c.factor(0), 1.0);
        assert!((c.factor(50) - 0.5).abs() < 1e-12);
        assert!(c.factor(100).abs() < 1e-12);
        let k = Schedule {
            warmup_steps: 4,
            total_steps: 100,
            decay: Decay::Constant,
        };
        assert_eq!(k.factor(2), 0.5);
        assert_eq!(k.factor(99), 1.0);
    }
}
