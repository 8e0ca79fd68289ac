//! N-gram masking (ALBERT, ERNIE-style): whole-word n-grams with n ≤ `max_n`, drawn with
//! P(n) ∝ 1/n by default (or user weights), until the budget is spent.

use serde::{Deserialize, Serialize};

use super::span::SpanSelector;
use super::{default_probability, MaskingStrategy, Replacement, Selector};
use crate::data::error::{DataError, Result};
use crate::data::tokenizer::Tok;

/// `{strategy: ngram, probability: 0.15, max_n: 3}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NgramMasking {
    /// Fraction of non-special tokens selected.
    #[serde(default = "default_probability")]
    pub probability: f64,
    /// How selected tokens are replaced (80/10/10 by default).
    #[serde(default)]
    pub replace: Replacement,
    /// Frequency smoothing exponent, applied to the choice of the n-gram's first word.
    #[serde(default)]
    pub smoothing: Option<f64>,
    /// Longest n-gram, in words (ALBERT: 3).
    #[serde(default = "three")]
    pub max_n: usize,
    /// Relative weights of n = 1, 2, …, max_n (default 1/n, as ALBERT).
    #[serde(default)]
    pub weights: Option<Vec<f64>>,
}

fn three() -> usize {
    3
}

impl Default for NgramMasking {
    fn default() -> Self {
        NgramMasking {
            probability: default_probability(),
            replace: Replacement::default(),
            smoothing: None,
            max_n: 3,
            weights: None,
        }
    }
}

impl NgramMasking {
    /// The law of n: `(n, P(n))` for n in `1..=max_n`.
    pub fn length_law(&self) -> Result<Vec<(usize, f64)>> {
        if self.max_n == 0 {
            return Err(DataError::config("masking.max_n", "must be at least 1"));
        }
        let w: Vec<f64> = match &self.weights {
            Some(w) => {
                if w.len() != self.max_n || w.iter().any(|x| !(x.is_finite() && *x >= 0.0)) {
                    return Err(DataError::config(
                        "masking.weights",
                        format!(
                            "expected {} non-negative weights (one per n = 1..={}), got {:?}",
                            self.max_n, self.max_n, w
                        ),
                    ));
                }
                w.clone()
            }
            None => (1..=self.max_n).map(|n| 1.0 / n as f64).collect(),
        };
        let z: f64 = w.iter().sum();
        if z <= 0.0 {
            return Err(DataError::config("masking.weights", "all weights are zero"));
        }
        Ok(w.into_iter()
            .enumerate()
            .map(|(i, x)| (i + 1, x / z))
            .collect())
    }
}

impl MaskingStrategy for NgramMasking {
    fn probability(&self) -> f64 {
        self.probability
    }
    fn replacement(&self) -> Replacement {
        self.replace
    }
    fn smoothing(&self) -> Option<f64> {
        self.smoothing
    }
    fn selector(&self, _tok: &Tok) -> Result<Box<dyn Selector>> {
        Ok(Box::new(SpanSelector::new(self.length_law()?)))
    }
}
