//! Token-level masking (BERT, RoBERTa): each non-special token is a unit of its own.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{default_probability, MaskingStrategy, Replacement, Row, Selection, Selector};
use crate::data::error::Result;
use crate::data::tokenizer::Tok;

/// `{strategy: token, probability: 0.15}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenMasking {
    /// Fraction of non-special tokens selected.
    #[serde(default = "default_probability")]
    pub probability: f64,
    /// How selected tokens are replaced (80/10/10 by default).
    #[serde(default)]
    pub replace: Replacement,
    /// DistilBERT `mlm_smoothing` exponent (selection ∝ count^-smoothing).
    #[serde(default)]
    pub smoothing: Option<f64>,
}

impl Default for TokenMasking {
    fn default() -> Self {
        TokenMasking {
            probability: default_probability(),
            replace: Replacement::default(),
            smoothing: None,
        }
    }
}

impl MaskingStrategy for TokenMasking {
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
        Ok(Box::new(TokenSelector))
    }
}

struct TokenSelector;

impl Selector for TokenSelector {
    fn select(&self, row: &Row<'_>, budget: usize, rng: &mut ChaCha8Rng, sel: &mut Selection) {
        let mut cand: Vec<usize> = (0..row.ids.len()).filter(|&i| row.candidate[i]).collect();
        let k = budget.min(cand.len());
        match row.weights {
            None => {
                // partial Fisher-Yates: the first k entries become a uniform sample
                for i in 0..k {
                    let j = rng.random_range(i..cand.len());
                    cand.swap(i, j);
                }
            }
            Some(w) => {
                let order = super::random_order(cand.len(), Some(&|i| w[cand[i]]), rng);
                cand = order.into_iter().map(|i| cand[i]).collect();
            }
        }
        for &p in &cand[..k] {
            sel.take(p, p + 1, 1, 1);
        }
    }
}
