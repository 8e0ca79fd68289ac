//! Whole-word masking: all the pieces of a word are selected together (WordPiece `##`
//! continuations, byte-level BPE `Ġ` word starts), as Hugging Face's
//! `DataCollatorForWholeWordMask` and Google's `wwm` BERT models do.

use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{
    default_probability, random_order, take_units_in_order, unit_weight, words, MaskingStrategy,
    Replacement, Row, Selection, Selector,
};
use crate::data::error::Result;
use crate::data::tokenizer::Tok;

/// `{strategy: whole_word, probability: 0.15}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WholeWordMasking {
    /// Fraction of non-special tokens selected.
    #[serde(default = "default_probability")]
    pub probability: f64,
    /// How selected tokens are replaced (80/10/10 by default).
    #[serde(default)]
    pub replace: Replacement,
    /// Frequency smoothing exponent; a word's weight is the mean of its tokens' weights.
    #[serde(default)]
    pub smoothing: Option<f64>,
}

impl Default for WholeWordMasking {
    fn default() -> Self {
        WholeWordMasking {
            probability: default_probability(),
            replace: Replacement::default(),
            smoothing: None,
        }
    }
}

impl MaskingStrategy for WholeWordMasking {
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
        Ok(Box::new(WordSelector))
    }
}

/// Selects whole words (the unit boundaries come from the cache flags, so the same selector
/// serves Chinese whole-word masking).
pub(crate) struct WordSelector;

impl Selector for WordSelector {
    fn select(&self, row: &Row<'_>, budget: usize, rng: &mut ChaCha8Rng, sel: &mut Selection) {
        let ws = words(row);
        let order = if row.weights.is_some() {
            random_order(ws.len(), Some(&|i| unit_weight(row, ws[i].0, ws[i].1)), rng)
        } else {
            random_order(ws.len(), None, rng)
        };
        take_units_in_order(&ws, &order, budget, sel);
    }
}
