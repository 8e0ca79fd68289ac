//! Dynamic masking for masked-language-model training.
//!
//! A [`Masking`] (deserialised from the recipe, e.g. `{strategy: whole_word, probability:
//! 0.15}`) names a strategy that *selects* positions to predict; the [`Masker`] then replaces
//! them the BERT way (80% `[MASK]`, 10% a random token, 10% unchanged, configurable) and writes
//! the labels. Special tokens and padding are never selected, and random replacements are never
//! special tokens. Masks are drawn fresh for every batch from a seeded `ChaCha8Rng`.
//!
//! Adding a strategy: a new file with its config struct implementing [`MaskingStrategy`], and a
//! variant in [`Masking`].

mod chinese_whole_word;
mod ngram;
mod phrase;
mod span;
mod token;
mod whole_word;

pub use chinese_whole_word::ChineseWholeWordMasking;
pub use ngram::NgramMasking;
pub use phrase::PhraseMasking;
pub use span::SpanMasking;
pub use token::TokenMasking;
pub use whole_word::WholeWordMasking;

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::cache::{WordSegmentation, FLAG_WORD_START};
use super::error::{DataError, Result};
use super::tokenizer::Tok;

/// How selected positions are replaced. What is left (`1 - mask - random`) stays unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Replacement {
    /// Share replaced by the mask token (BERT: 0.8).
    #[serde(default = "default_mask_share")]
    pub mask: f64,
    /// Share replaced by a random non-special token (BERT: 0.1).
    #[serde(default = "default_random_share")]
    pub random: f64,
}

fn default_mask_share() -> f64 {
    0.8
}

fn default_random_share() -> f64 {
    0.1
}

pub(crate) fn default_probability() -> f64 {
    0.15
}

impl Default for Replacement {
    fn default() -> Self {
        Replacement {
            mask: 0.8,
            random: 0.1,
        }
    }
}

/// The masking strategy and its options (`strategy:` selects the variant).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "strategy", rename_all = "snake_case")]
pub enum Masking {
    /// Independent tokens (BERT, RoBERTa).
    Token(TokenMasking),
    /// All the pieces of a word together (WordPiece `##`, byte-level BPE `Ġ`).
    WholeWord(WholeWordMasking),
    /// All the characters of a Jieba-segmented Chinese word together (Chinese-BERT-wwm).
    ChineseWholeWord(ChineseWholeWordMasking),
    /// Contiguous spans of whole words with geometric lengths (SpanBERT).
    Span(SpanMasking),
    /// Whole-word n-grams, n ≤ `max_n`, P(n) ∝ 1/n (ALBERT / ERNIE-style n-gram masking).
    Ngram(NgramMasking),
    /// Phrases and entities from a user list masked as units (ERNIE).
    Phrase(PhraseMasking),
}

impl Default for Masking {
    fn default() -> Self {
        Masking::Token(TokenMasking::default())
    }
}

/// What every strategy config provides.
pub trait MaskingStrategy {
    /// Fraction of the candidate (non-special) tokens to select.
    fn probability(&self) -> f64;
    /// How selected tokens are replaced.
    fn replacement(&self) -> Replacement;
    /// DistilBERT's `mlm_smoothing`: when set, a token is chosen with probability ∝
    /// `count(token)^-smoothing` (0.7 in DistilBERT) instead of uniformly.
    fn smoothing(&self) -> Option<f64>;
    /// Word boundaries the strategy needs in the token cache.
    fn segmentation(&self) -> WordSegmentation {
        WordSegmentation::Tokenizer
    }
    /// Builds the position selector.
    fn selector(&self, tok: &Tok) -> Result<Box<dyn Selector>>;
}

impl Masking {
    fn strategy(&self) -> &dyn MaskingStrategy {
        match self {
            Masking::Token(m) => m,
            Masking::WholeWord(m) => m,
            Masking::ChineseWholeWord(m) => m,
            Masking::Span(m) => m,
            Masking::Ngram(m) => m,
            Masking::Phrase(m) => m,
        }
    }

    /// The strategy's name as written in recipes.
    pub fn name(&self) -> &'static str {
        match self {
            Masking::Token(_) => "token",
            Masking::WholeWord(_) => "whole_word",
            Masking::ChineseWholeWord(_) => "chinese_whole_word",
            Masking::Span(_) => "span",
            Masking::Ngram(_) => "ngram",
            Masking::Phrase(_) => "phrase",
        }
    }

    /// Fraction of candidate tokens selected.
    pub fn probability(&self) -> f64 {
        self.strategy().probability()
    }

    /// Word segmentation the token cache must be built with.
    pub fn segmentation(&self) -> WordSegmentation {
        self.strategy().segmentation()
    }

    /// Checks the common values, naming the key that is wrong.
    pub fn validate(&self) -> Result<()> {
        let s = self.strategy();
        let p = s.probability();
        if !(p > 0.0 && p <= 1.0) {
            return Err(DataError::config(
                "masking.probability",
                format!("{p} is not in (0, 1]"),
            ));
        }
        let r = s.replacement();
        if !(0.0..=1.0).contains(&r.mask)
            || !(0.0..=1.0).contains(&r.random)
            || r.mask + r.random > 1.0 + 1e-9
        {
            return Err(DataError::config(
                "masking.replace",
                format!(
                    "mask {} + random {} must be shares in [0, 1] adding up to at most 1",
                    r.mask, r.random
                ),
            ));
        }
        if let Some(sm) = s.smoothing() {
            if !(sm.is_finite() && sm >= 0.0) {
                return Err(DataError::config(
                    "masking.smoothing",
                    format!("{sm} must be a non-negative number (DistilBERT uses 0.7)"),
                ));
            }
        }
        Ok(())
    }
}

/// One row handed to a [`Selector`].
pub struct Row<'a> {
    /// Token ids (unpadded).
    pub ids: &'a [u32],
    /// Cache flags per token ([`FLAG_WORD_START`], `FLAG_SUBWORD_START`).
    pub flags: &'a [u8],
    /// Whether each position may be selected (not a special token).
    pub candidate: &'a [bool],
    /// Per-position selection weight (frequency smoothing), when enabled.
    pub weights: Option<&'a [f32]>,
}

/// A masked unit (for statistics and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitRecord {
    /// First position.
    pub start: u32,
    /// Number of tokens.
    pub tokens: u32,
    /// Number of words.
    pub words: u32,
    /// The length (in words) the strategy drew, before any truncation (span / n-gram); equals
    /// `words` for other strategies.
    pub sampled_words: u32,
}

/// The positions a selector chose in one row.
#[derive(Debug, Default)]
pub struct Selection {
    /// One flag per position.
    pub chosen: Vec<bool>,
    /// Units chosen (only filled when `record` is true).
    pub units: Vec<UnitRecord>,
    /// Whether to fill `units`.
    pub record: bool,
}

impl Selection {
    /// Marks `start..end` as one unit.
    pub fn take(&mut self, start: usize, end: usize, words: u32, sampled_words: u32) {
        for c in &mut self.chosen[start..end] {
            *c = true;
        }
        if self.record {
            self.units.push(UnitRecord {
                start: start as u32,
                tokens: (end - start) as u32,
                words,
                sampled_words,
            });
        }
    }
}

/// Chooses which positions of a row to predict.
pub trait Selector: Send + Sync {
    /// Selects about `budget` tokens among the candidates of `row` into `sel.chosen` (already
    /// sized and cleared). Must never select a non-candidate position.
    fn select(&self, row: &Row<'_>, budget: usize, rng: &mut ChaCha8Rng, sel: &mut Selection);
}

/// Words of a row as `[start, end)` ranges over candidate positions: a word starts at a
/// [`FLAG_WORD_START`] token or after a non-candidate.
pub fn words(row: &Row<'_>) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    let mut open = false;
    for i in 0..row.ids.len() {
        if !row.candidate[i] {
            open = false;
            continue;
        }
        if open && row.flags[i] & FLAG_WORD_START == 0 {
            if let Some(w) = out.last_mut() {
                w.1 = i + 1;
            }
        } else {
            out.push((i, i + 1));
            open = true;
        }
    }
    out
}

/// A random order of `n` items: uniform, or, with weights, a weighted sample without
/// replacement (Efraimidis–Spirakis keys `u^(1/w)`).
pub fn random_order(
    n: usize,
    weight: Option<&dyn Fn(usize) -> f32>,
    rng: &mut ChaCha8Rng,
) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    match weight {
        None => {
            for i in (1..n).rev() {
                let j = rng.random_range(0..=i);
                idx.swap(i, j);
            }
        }
        Some(w) => {
            let keys: Vec<f64> = (0..n)
                .map(|i| {
                    let wi = w(i).max(1e-30) as f64;
                    let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
                    u.ln() / wi
                })
                .collect();
            idx.sort_by(|&a, &b| keys[b].total_cmp(&keys[a]));
        }
    }
    idx
}

/// Takes units in `order` while they fit in `budget` tokens (a unit that does not fit is
/// skipped, as in Hugging Face's whole-word collator). Returns the tokens taken.
pub fn take_units_in_order(
    units: &[(usize, usize)],
    order: &[usize],
    budget: usize,
    sel: &mut Selection,
) -> usize {
    let mut taken = 0;
    for &u in order {
        if taken >= budget {
            break;
        }
        let (s, e) = units[u];
        if taken + (e - s) > budget {
            continue;
        }
        sel.take(s, e, 1, 1);
        taken += e - s;
    }
    taken
}

/// Mean of the row weights over `s..e` (for unit-level smoothing).
pub(crate) fn unit_weight(row: &Row<'_>, s: usize, e: usize) -> f32 {
    match row.weights {
        Some(w) => w[s..e].iter().sum::<f32>() / (e - s).max(1) as f32,
        None => 1.0,
    }
}

/// Counters of what a [`Masker`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MaskStats {
    /// Candidate (non-special) positions seen.
    pub candidates: u64,
    /// Positions selected for prediction.
    pub selected: u64,
    /// Selected positions replaced by the mask token.
    pub replaced_mask: u64,
    /// Selected positions replaced by a random token.
    pub replaced_random: u64,
    /// Selected positions left unchanged.
    pub kept: u64,
    /// When true, `units` collects every masked unit.
    pub record_units: bool,
    /// The masked units (when `record_units`).
    pub units: Vec<UnitRecord>,
}

/// Applies a [`Masking`] to rows of token ids.
pub struct Masker {
    config: Masking,
    selector: Box<dyn Selector>,
    probability: f64,
    replace: Replacement,
    mask_id: u32,
    special: Vec<bool>,
    random_pool: Vec<u32>,
    token_weight: Option<Vec<f32>>,
}

impl std::fmt::Debug for Masker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Masker")
            .field("config", &self.config)
            .finish()
    }
}

impl Masker {
    /// Builds a masker for `tok`'s vocabulary. `counts` (token frequencies, e.g.
    /// [`super::cache::TokenCache::counts`]) is required when the config asks for smoothing.
    pub fn new(config: &Masking, tok: &Tok, counts: Option<&[u64]>) -> Result<Masker> {
        config.validate()?;
        let s = config.strategy();
        let special = tok.special_table().to_vec();
        let random_pool: Vec<u32> = (0..tok.vocab_size() as u32)
            .filter(|&i| !tok.is_special(i))
            .collect();
        if random_pool.is_empty() {
            return Err(DataError::tokenizer(
                tok.source(),
                "the vocabulary has no non-special token to mask",
            ));
        }
        let token_weight = match s.smoothing() {
            None => None,
            Some(sm) => {
                let counts = counts.ok_or_else(|| {
                    DataError::config(
                        "masking.smoothing",
                        "frequency smoothing needs token counts (from the token cache)",
                    )
                })?;
                Some(
                    (0..tok.vocab_size())
                        .map(|i| {
                            let c = counts.get(i).copied().unwrap_or(0).max(1) as f64;
                            c.powf(-sm) as f32
                        })
                        .collect(),
                )
            }
        };
        Ok(Masker {
            selector: s.selector(tok)?,
            probability: s.probability(),
            replace: s.replacement(),
            mask_id: tok.special_ids().mask,
            special,
            random_pool,
            token_weight,
            config: config.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Masking {
        &self.config
    }

    /// Masks one unpadded row in place: selects positions, writes `labels` (original id at
    /// selected positions, -100 elsewhere) and replaces the selected ids.
    pub fn mask_row(
        &self,
        ids: &mut [u32],
        flags: &[u8],
        labels: &mut [i64],
        rng: &mut ChaCha8Rng,
        stats: Option<&mut MaskStats>,
    ) {
        let n = ids.len();
        let candidate: Vec<bool> = ids
            .iter()
            .map(|&id| !self.special.get(id as usize).copied().unwrap_or(true))
            .collect();
        let n_cand = candidate.iter().filter(|&&c| c).count();
        let weights: Option<Vec<f32>> = self.token_weight.as_ref().map(|tw| {
            ids.iter()
                .map(|&id| tw.get(id as usize).copied().unwrap_or(0.0))
                .collect()
        });
        let x = self.probability * n_cand as f64;
        let budget = x.floor() as usize + usize::from(rng.random::<f64>() < x.fract());
        let record = stats.as_ref().is_some_and(|s| s.record_units);
        let mut sel = Selection {
            chosen: vec![false; n],
            units: Vec::new(),
            record,
        };
        if budget > 0 {
            let row = Row {
                ids,
                flags,
                candidate: &candidate,
                weights: weights.as_deref(),
            };
            self.selector.select(&row, budget, rng, &mut sel);
        }
        let (mut nm, mut nr, mut nk, mut ns) = (0u64, 0u64, 0u64, 0u64);
        for i in 0..n {
            if !sel.chosen[i] || !candidate[i] {
                labels[i] = -100;
                continue;
            }
            ns += 1;
            labels[i] = ids[i] as i64;
            let r: f64 = rng.random();
            if r < self.replace.mask {
                ids[i] = self.mask_id;
                nm += 1;
            } else if r < self.replace.mask + self.replace.random {
                ids[i] = self.random_pool[rng.random_range(0..self.random_pool.len())];
                nr += 1;
            } else {
                nk += 1;
            }
        }
        if let Some(st) = stats {
            st.candidates += n_cand as u64;
            st.selected += ns;
            st.replaced_mask += nm;
            st.replaced_random += nr;
            st.kept += nk;
            if st.record_units {
                st.units.extend(sel.units);
            }
        }
    }
}
