//! Phrase / entity masking (ERNIE): occurrences of user-listed phrases are units masked as a
//! whole; the other tokens form whole-word units.

use std::collections::HashMap;
use std::path::PathBuf;

use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{
    default_probability, random_order, take_units_in_order, unit_weight, MaskingStrategy,
    Replacement, Row, Selection, Selector,
};
use crate::data::cache::{FLAG_SUBWORD_START, FLAG_WORD_START};
use crate::data::error::{DataError, Result};
use crate::data::tokenizer::Tok;

/// `{strategy: phrase, probability: 0.15, phrases: [...], phrases_file: entities.txt}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhraseMasking {
    /// Fraction of non-special tokens selected.
    #[serde(default = "default_probability")]
    pub probability: f64,
    /// How selected tokens are replaced (80/10/10 by default).
    #[serde(default)]
    pub replace: Replacement,
    /// Frequency smoothing exponent; a unit's weight is the mean of its tokens' weights.
    #[serde(default)]
    pub smoothing: Option<f64>,
    /// Phrases and entities, as text.
    #[serde(default)]
    pub phrases: Vec<String>,
    /// A UTF-8 file with one phrase per line (blank lines and lines starting with `#` are
    /// ignored).
    #[serde(default)]
    pub phrases_file: Option<PathBuf>,
    /// Mask phrase occurrences before any other word (entity-level masking); otherwise phrases
    /// and words are drawn in one random order.
    #[serde(default)]
    pub phrases_first: bool,
}

impl Default for PhraseMasking {
    fn default() -> Self {
        PhraseMasking {
            probability: default_probability(),
            replace: Replacement::default(),
            smoothing: None,
            phrases: Vec::new(),
            phrases_file: None,
            phrases_first: false,
        }
    }
}

impl PhraseMasking {
    /// The phrase list: `phrases` followed by the lines of `phrases_file`.
    pub fn all_phrases(&self) -> Result<Vec<String>> {
        let mut out: Vec<String> = self.phrases.clone();
        if let Some(p) = &self.phrases_file {
            let bytes = std::fs::read(p).map_err(|e| DataError::io(p, e))?;
            for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
                let line = std::str::from_utf8(line).map_err(|e| DataError::InvalidUtf8 {
                    path: p.clone(),
                    line: i as u64 + 1,
                    byte: e.valid_up_to(),
                })?;
                let t = line.trim();
                if !t.is_empty() && !t.starts_with('#') {
                    out.push(t.to_string());
                }
            }
        }
        Ok(out)
    }
}

impl MaskingStrategy for PhraseMasking {
    fn probability(&self) -> f64 {
        self.probability
    }
    fn replacement(&self) -> Replacement {
        self.replace
    }
    fn smoothing(&self) -> Option<f64> {
        self.smoothing
    }
    fn selector(&self, tok: &Tok) -> Result<Box<dyn Selector>> {
        let phrases = self.all_phrases()?;
        if phrases.is_empty() {
            return Err(DataError::config(
                "masking.phrases",
                "phrase masking needs `phrases` or `phrases_file` with at least one phrase",
            ));
        }
        // Tokenise each phrase as at the start of a text and after a space (byte-level BPE
        // marks the latter with `Ġ`).
        let spaced: Vec<String> = phrases.iter().map(|p| format!(" {p}")).collect();
        let mut texts: Vec<&str> = phrases.iter().map(String::as_str).collect();
        texts.extend(spaced.iter().map(String::as_str));
        let mut by_first: HashMap<u32, Vec<Vec<u32>>> = HashMap::new();
        for ids in tok.encode_batch(&texts)? {
            if ids.is_empty() || ids.iter().any(|&i| tok.is_special(i)) {
                continue;
            }
            let v = by_first.entry(ids[0]).or_default();
            if !v.contains(&ids) {
                v.push(ids);
            }
        }
        for v in by_first.values_mut() {
            v.sort_by_key(|p| std::cmp::Reverse(p.len()));
        }
        Ok(Box::new(PhraseSelector {
            by_first,
            phrases_first: self.phrases_first,
        }))
    }
}

struct PhraseSelector {
    by_first: HashMap<u32, Vec<Vec<u32>>>,
    phrases_first: bool,
}

impl PhraseSelector {
    /// Leftmost-longest, non-overlapping phrase matches that begin and end on word boundaries.
    fn matches(&self, row: &Row<'_>) -> Vec<(usize, usize)> {
        let n = row.ids.len();
        let mut out = Vec::new();
        let mut i = 0;
        while i < n {
            let starts = row.candidate[i] && row.flags[i] & FLAG_SUBWORD_START != 0;
            let found = if starts {
                self.by_first.get(&row.ids[i]).and_then(|cands| {
                    cands.iter().find(|p| {
                        let e = i + p.len();
                        e <= n
                            && row.ids[i..e] == p[..]
                            && row.candidate[i..e].iter().all(|&c| c)
                            && (e == n
                                || !row.candidate[e]
                                || row.flags[e] & FLAG_SUBWORD_START != 0)
                    })
                })
            } else {
                None
            };
            match found {
                Some(p) => {
                    out.push((i, i + p.len()));
                    i += p.len();
                }
                None => i += 1,
            }
        }
        out
    }
}

impl Selector for PhraseSelector {
    fn select(&self, row: &Row<'_>, budget: usize, rng: &mut ChaCha8Rng, sel: &mut Selection) {
        let phrases = self.matches(row);
        let n = row.ids.len();
        let mut in_phrase = vec![false; n];
        for &(s, e) in &phrases {
            for f in &mut in_phrase[s..e] {
                *f = true;
            }
        }
        // the remaining candidates, grouped into whole words
        let mut ws: Vec<(usize, usize)> = Vec::new();
        let mut open = false;
        for (i, (&cand, &inp)) in row.candidate.iter().zip(&in_phrase).enumerate() {
            if !cand || inp {
                open = false;
                continue;
            }
            if open && row.flags[i] & FLAG_WORD_START == 0 {
                if let Some(w) = ws.last_mut() {
                    w.1 = i + 1;
                }
            } else {
                ws.push((i, i + 1));
                open = true;
            }
        }
        let np = phrases.len();
        let mut units = phrases;
        units.extend(ws);
        let weight = |i: usize| unit_weight(row, units[i].0, units[i].1);
        let w: Option<&dyn Fn(usize) -> f32> = if row.weights.is_some() {
            Some(&weight)
        } else {
            None
        };
        let order: Vec<usize> = if self.phrases_first {
            let p = random_order(np, w.map(|_| &weight as &dyn Fn(usize) -> f32), rng);
            let rest_w = |i: usize| weight(np + i);
            let r = random_order(
                units.len() - np,
                w.map(|_| &rest_w as &dyn Fn(usize) -> f32),
                rng,
            );
            p.into_iter().chain(r.into_iter().map(|i| np + i)).collect()
        } else {
            random_order(units.len(), w, rng)
        };
        take_units_in_order(&units, &order, budget, sel);
    }
}
