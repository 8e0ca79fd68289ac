//! A deterministic WordPiece vocabulary trainer: the algorithm of `tokenizers`'
//! `WordPieceTrainer` (BPE merges over the corpus's words, pieces inside a word prefixed with
//! `##`, the most frequent pair merged first, down to `min_frequency`, up to `vocab_size`),
//! with every choice made in a fixed order.
//!
//! Why our own: `tokenizers` (0.23) numbers the `##` pieces in the iteration order of a
//! randomly seeded hash map of the corpus's words, and breaks ties between equally frequent
//! pairs by those numbers, so the same corpus gave a different vocabulary in some processes
//! (huggingface/tokenizers#1794) — and the quickstart different losses from run to run. Here
//! every piece is numbered in an order fixed by the corpus (alphabet by character, `##` pieces
//! by character, merges in the order they are made), ties go to the lower numbers, and the
//! alphabet limit keeps the most frequent characters, ties by character. It plugs into
//! `Tokenizer::train` as a [`Trainer`], so words are normalised and pre-tokenised by the
//! tokenizer's own pipeline.

use rayon::iter::{ParallelBridge, ParallelIterator};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::models::ModelWrapper;
use tokenizers::{AddedToken, Trainer};

const PREFIX: &str = "##";

/// The trainer's settings; feed it through `Tokenizer::train`.
#[derive(Debug, Clone, Default)]
pub struct WordPieceVocabTrainer {
    /// The vocabulary's size, special tokens included.
    pub vocab_size: usize,
    /// Pairs seen fewer times are not merged.
    pub min_frequency: u64,
    /// The most distinct characters kept in the alphabet (the most frequent ones).
    pub limit_alphabet: Option<usize>,
    /// Special tokens, first in the vocabulary in this order.
    pub special_tokens: Vec<String>,
    /// The unknown token (must be one of the special tokens).
    pub unk_token: String,
    /// Word counts fed so far.
    words: HashMap<String, u64>,
}

impl WordPieceVocabTrainer {
    pub fn new(
        vocab_size: usize,
        min_frequency: u64,
        limit_alphabet: Option<usize>,
        special_tokens: Vec<String>,
        unk_token: &str,
    ) -> Self {
        WordPieceVocabTrainer {
            vocab_size,
            min_frequency,
            limit_alphabet,
            special_tokens,
            unk_token: unk_token.to_string(),
            words: HashMap::new(),
        }
    }

    /// Adds `count` occurrences of `word` (as `feed` does for each pre-tokenised word).
    pub fn add_word(&mut self, word: &str, count: u64) {
        *self.words.entry(word.to_string()).or_default() += count;
    }

    /// The vocabulary, in id order: the special tokens, the alphabet, the `##` pieces, then
    /// the merged pieces in the order they were made.
    pub fn vocabulary(&self) -> Vec<String> {
        // Words in a fixed order (their text), so that everything below is too.
        let words: BTreeMap<&str, u64> = self.words.iter().map(|(w, &c)| (w.as_str(), c)).collect();
        let mut pieces: Vec<String> = Vec::new();
        let mut ids: HashMap<String, u32> = HashMap::new();
        // The id of piece `s`, numbered next if new.
        fn add(s: String, pieces: &mut Vec<String>, ids: &mut HashMap<String, u32>) -> u32 {
            *ids.entry(s.clone()).or_insert_with(|| {
                pieces.push(s);
                (pieces.len() - 1) as u32
            })
        }
        for s in &self.special_tokens {
            add(s.clone(), &mut pieces, &mut ids);
        }

        // The alphabet: every character, or the `limit_alphabet` most frequent ones.
        let mut chars: BTreeMap<char, u64> = BTreeMap::new();
        for (w, &c) in &words {
            for ch in w.chars() {
                *chars.entry(ch).or_default() += c;
            }
        }
        let mut kept: Vec<(char, u64)> = chars.into_iter().collect();
        if let Some(limit) = self.limit_alphabet {
            if kept.len() > limit {
                kept.sort_by_key(|&(ch, n)| (Reverse(n), ch));
                kept.truncate(limit);
                kept.sort_by_key(|&(ch, _)| ch);
            }
        }
        let alphabet: HashSet<char> = kept.iter().map(|&(ch, _)| ch).collect();
        for &(ch, _) in &kept {
            add(ch.to_string(), &mut pieces, &mut ids);
        }
        // The `##` pieces of the characters that continue a word, by character.
        let mut continuing: Vec<char> = words
            .keys()
            .flat_map(|w| w.chars().skip(1))
            .filter(|ch| alphabet.contains(ch))
            .collect::<HashSet<char>>()
            .into_iter()
            .collect();
        continuing.sort_unstable();
        for ch in continuing {
            add(format!("{PREFIX}{ch}"), &mut pieces, &mut ids);
        }

        // Each word as piece ids (characters outside the alphabet left out, as tokenizers does).
        let mut seqs: Vec<Vec<u32>> = Vec::with_capacity(words.len());
        let mut counts: Vec<i64> = Vec::with_capacity(words.len());
        for (w, &c) in &words {
            let seq = w
                .chars()
                .enumerate()
                .filter(|(_, ch)| alphabet.contains(ch))
                .map(|(i, ch)| {
                    let s = if i == 0 {
                        ch.to_string()
                    } else {
                        format!("{PREFIX}{ch}")
                    };
                    ids[&s]
                })
                .collect();
            seqs.push(seq);
            counts.push(c as i64);
        }

        // Pair counts and where each pair occurs.
        let mut pair_counts: HashMap<(u32, u32), i64> = HashMap::new();
        let mut where_: HashMap<(u32, u32), HashSet<usize>> = HashMap::new();
        for (i, seq) in seqs.iter().enumerate() {
            for p in seq.windows(2) {
                let pair = (p[0], p[1]);
                *pair_counts.entry(pair).or_default() += counts[i];
                where_.entry(pair).or_default().insert(i);
            }
        }
        // The most frequent pair first; ties to the lower ids.
        let mut queue: BinaryHeap<(i64, Reverse<(u32, u32)>)> = pair_counts
            .iter()
            .filter(|&(_, &n)| n > 0)
            .map(|(&p, &n)| (n, Reverse(p)))
            .collect();
        while pieces.len() < self.vocab_size {
            let Some((n, Reverse(pair))) = queue.pop() else {
                break;
            };
            let current = pair_counts.get(&pair).copied().unwrap_or(0);
            if n != current {
                // A stale entry: the pair's count changed since it was queued.
                if current > 0 {
                    queue.push((current, Reverse(pair)));
                }
                continue;
            }
            if (n as u64) < self.min_frequency.max(1) {
                break;
            }
            let right = &pieces[pair.1 as usize];
            let merged = format!(
                "{}{}",
                pieces[pair.0 as usize],
                right.strip_prefix(PREFIX).unwrap_or(right)
            );
            let new_id = add(merged, &mut pieces, &mut ids);
            // Re-count the words holding the pair: their old pairs out, the merged word's in.
            let mut touched: Vec<usize> = where_
                .remove(&pair)
                .unwrap_or_default()
                .into_iter()
                .collect();
            touched.sort_unstable();
            let mut changed: HashSet<(u32, u32)> = HashSet::new();
            for i in touched {
                let seq = &mut seqs[i];
                for p in seq.windows(2) {
                    *pair_counts.entry((p[0], p[1])).or_default() -= counts[i];
                }
                let mut out = Vec::with_capacity(seq.len());
                let mut j = 0;
                while j < seq.len() {
                    if j + 1 < seq.len() && (seq[j], seq[j + 1]) == pair {
                        out.push(new_id);
                        j += 2;
                    } else {
                        out.push(seq[j]);
                        j += 1;
                    }
                }
                *seq = out;
                for p in seq.windows(2) {
                    let q = (p[0], p[1]);
                    *pair_counts.entry(q).or_default() += counts[i];
                    where_.entry(q).or_default().insert(i);
                    changed.insert(q);
                }
            }
            pair_counts.remove(&pair);
            let mut changed: Vec<(u32, u32)> = changed.into_iter().collect();
            changed.sort_unstable();
            for q in changed {
                if let Some(&n) = pair_counts.get(&q) {
                    if n > 0 && q != pair {
                        queue.push((n, Reverse(q)));
                    }
                }
            }
        }
        pieces
    }
}

impl Trainer for WordPieceVocabTrainer {
    type Model = ModelWrapper;

    fn should_show_progress(&self) -> bool {
        false
    }

    fn train(&self, model: &mut ModelWrapper) -> tokenizers::Result<Vec<AddedToken>> {
        let vocab: ahash::AHashMap<String, u32> = self
            .vocabulary()
            .into_iter()
            .enumerate()
            .map(|(i, s)| (s, i as u32))
            .collect();
        let wp = WordPiece::builder()
            .vocab(vocab)
            .unk_token(self.unk_token.clone())
            .continuing_subword_prefix(PREFIX.into())
            .build()?;
        *model = wp.into();
        Ok(self
            .special_tokens
            .iter()
            .map(|s| AddedToken::from(s.clone(), true))
            .collect())
    }

    fn feed<I, S, F>(&mut self, iterator: I, process: F) -> tokenizers::Result<()>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
        F: Fn(&str) -> tokenizers::Result<Vec<String>> + Sync,
    {
        // Counting is order-free, so it may run in parallel.
        let counts = iterator
            .par_bridge()
            .map(|seq| -> tokenizers::Result<HashMap<String, u64>> {
                let mut m = HashMap::new();
                for w in process(seq.as_ref())? {
                    *m.entry(w).or_default() += 1;
                }
                Ok(m)
            })
            .try_reduce(HashMap::new, |mut a, b| {
                for (w, c) in b {
                    *a.entry(w).or_default() += c;
                }
                Ok(a)
            })?;
        for (w, c) in counts {
            self.add_word(&w, c);
        }
        Ok(())
    }
}
