//! Chinese whole-word masking (Chinese-BERT-wwm): the text is segmented with Jieba when the
//! token cache is built, and all the characters of a word are selected together.

use serde::{Deserialize, Serialize};

use super::whole_word::WordSelector;
use super::{default_probability, MaskingStrategy, Replacement, Selector};
use crate::data::cache::WordSegmentation;
use crate::data::error::Result;
use crate::data::tokenizer::Tok;

/// `{strategy: chinese_whole_word, probability: 0.15}`: needs a token cache built with
/// [`WordSegmentation::Jieba`] (the pipeline builds it so when this strategy is chosen).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChineseWholeWordMasking {
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

impl Default for ChineseWholeWordMasking {
    fn default() -> Self {
        ChineseWholeWordMasking {
            probability: default_probability(),
            replace: Replacement::default(),
            smoothing: None,
        }
    }
}

impl MaskingStrategy for ChineseWholeWordMasking {
    fn probability(&self) -> f64 {
        self.probability
    }
    fn replacement(&self) -> Replacement {
        self.replace
    }
    fn smoothing(&self) -> Option<f64> {
        self.smoothing
    }
    fn segmentation(&self) -> WordSegmentation {
        WordSegmentation::Jieba
    }
    fn selector(&self, _tok: &Tok) -> Result<Box<dyn Selector>> {
        Ok(Box::new(WordSelector))
    }
}
