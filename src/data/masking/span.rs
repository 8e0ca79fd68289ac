//! Span masking (SpanBERT): spans of whole words whose lengths follow a geometric law
//! (p = 0.2) clipped at 10 words, with uniformly random starting words, until the budget is
//! spent. The length engine is shared with n-gram masking.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{
    default_probability, random_order, unit_weight, words, MaskingStrategy, Replacement, Row,
    Selection, Selector,
};
use crate::data::error::{DataError, Result};
use crate::data::tokenizer::Tok;

/// `{strategy: span, probability: 0.15, p: 0.2, max_len: 10}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpanMasking {
    /// Fraction of non-special tokens selected.
    #[serde(default = "default_probability")]
    pub probability: f64,
    /// How selected tokens are replaced (80/10/10 by default).
    #[serde(default)]
    pub replace: Replacement,
    /// Frequency smoothing exponent, applied to the choice of the span's first word.
    #[serde(default)]
    pub smoothing: Option<f64>,
    /// Parameter of the geometric length law, P(len = k) ∝ p (1-p)^(k-1).
    #[serde(default = "default_p")]
    pub p: f64,
    /// Shortest span, in words.
    #[serde(default = "one")]
    pub min_len: usize,
    /// Longest span, in words (the law is clipped and renormalised).
    #[serde(default = "ten")]
    pub max_len: usize,
}

fn default_p() -> f64 {
    0.2
}
fn one() -> usize {
    1
}
fn ten() -> usize {
    10
}

impl Default for SpanMasking {
    fn default() -> Self {
        SpanMasking {
            probability: default_probability(),
            replace: Replacement::default(),
            smoothing: None,
            p: default_p(),
            min_len: 1,
            max_len: 10,
        }
    }
}

impl SpanMasking {
    /// The clipped geometric law: `P(len)` for `len` in `min_len..=max_len`.
    pub fn length_law(&self) -> Vec<(usize, f64)> {
        let raw: Vec<(usize, f64)> = (self.min_len..=self.max_len)
            .map(|k| (k, self.p * (1.0 - self.p).powi((k - self.min_len) as i32)))
            .collect();
        let z: f64 = raw.iter().map(|x| x.1).sum();
        raw.into_iter().map(|(k, w)| (k, w / z)).collect()
    }
}

impl MaskingStrategy for SpanMasking {
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
        if !(self.p > 0.0 && self.p < 1.0) {
            return Err(DataError::config(
                "masking.p",
                format!("{} is not in (0, 1)", self.p),
            ));
        }
        if self.min_len == 0 || self.max_len < self.min_len {
            return Err(DataError::config(
                "masking.max_len",
                format!(
                    "need 1 <= min_len <= max_len, got min_len {} and max_len {}",
                    self.min_len, self.max_len
                ),
            ));
        }
        Ok(Box::new(SpanSelector::new(self.length_law())))
    }
}

/// Masks spans of whole words with lengths drawn from a discrete law.
pub(crate) struct SpanSelector {
    lens: Vec<usize>,
    cdf: Vec<f64>,
}

impl SpanSelector {
    /// `law`: (length in words, probability) pairs.
    pub(crate) fn new(law: Vec<(usize, f64)>) -> Self {
        let mut acc = 0.0;
        let mut lens = Vec::new();
        let mut cdf = Vec::new();
        for (k, p) in law {
            acc += p;
            lens.push(k);
            cdf.push(acc);
        }
        SpanSelector { lens, cdf }
    }

    fn sample_len(&self, rng: &mut ChaCha8Rng) -> usize {
        let total = self.cdf.last().copied().unwrap_or(1.0);
        let u = rng.random::<f64>() * total;
        let i = self
            .cdf
            .partition_point(|&c| c <= u)
            .min(self.lens.len() - 1);
        self.lens[i]
    }
}

impl Selector for SpanSelector {
    /// Anchors are visited in random order; each unmasked anchor gets a span of a freshly
    /// drawn length, extended over following words while they are adjacent, unmasked and fit
    /// in the remaining budget.
    fn select(&self, row: &Row<'_>, budget: usize, rng: &mut ChaCha8Rng, sel: &mut Selection) {
        let ws = words(row);
        let nw = ws.len();
        let order = if row.weights.is_some() {
            random_order(nw, Some(&|i| unit_weight(row, ws[i].0, ws[i].1)), rng)
        } else {
            random_order(nw, None, rng)
        };
        let mut masked = vec![false; nw];
        let mut remaining = budget;
        for &a in &order {
            if remaining == 0 {
                break;
            }
            if masked[a] {
                continue;
            }
            let want = self.sample_len(rng);
            let mut end = a;
            let mut toks = 0;
            while end < nw && end - a < want && !masked[end] {
                if end > a && ws[end].0 != ws[end - 1].1 {
                    break; // a special token lies between: spans do not cross it
                }
                let wt = ws[end].1 - ws[end].0;
                if toks + wt > remaining {
                    break;
                }
                toks += wt;
                end += 1;
            }
            if end == a {
                continue;
            }
            for m in &mut masked[a..end] {
                *m = true;
            }
            sel.take(ws[a].0, ws[end - 1].1, (end - a) as u32, want as u32);
            remaining -= toks;
        }
    }
}
