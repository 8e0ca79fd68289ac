//! Deterministic subword vocabulary training: the algorithm of `tokenizers`' `BpeTrainer` and
//! `WordPieceTrainer` (BPE merges over the corpus's words, the most frequent pair merged first,
//! down to `min_frequency`, up to `vocab_size`; for WordPiece the pieces inside a word prefixed
//! with `##`), with every choice made in a fixed order.
//!
//! Why our own: `tokenizers` (0.23) numbers the pieces in the iteration order of a randomly
//! seeded hash map of the corpus's words, and breaks ties between equally frequent pairs by
//! those numbers, so the same corpus gave a different vocabulary in some processes
//! (huggingface/tokenizers#1794) — and the quickstart different losses from run to run. Here
//! every piece is numbered in an order fixed by the corpus (alphabet by character, `##` pieces
//! by character, merges in the order they are made), ties go to the lower numbers, and the
//! alphabet limit keeps the most frequent characters, ties by character. It plugs into
//! `Tokenizer::train` as a [`Trainer`], so words are normalised and pre-tokenised by the
//! tokenizer's own pipeline (for byte-level BPE, mapped to its 256-symbol alphabet).

use rayon::iter::{ParallelBridge, ParallelIterator};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use tokenizers::models::bpe::BPE;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::models::ModelWrapper;
use tokenizers::{AddedToken, Trainer};

/// WordPiece's prefix of the pieces that continue a word.
const PREFIX: &str = "##";

/// What is trained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubwordKind {
    /// WordPiece (BERT): `##` pieces, unknown token `unk`.
    WordPiece { unk: String },
    /// Byte-level BPE (RoBERTa): merges kept, every byte in the alphabet.
    Bpe,
}

/// The trainer's settings and the word counts fed so far; feed it through `Tokenizer::train`.
#[derive(Debug, Clone)]
pub struct SubwordTrainer {
    pub kind: SubwordKind,
    /// The vocabulary's size, special tokens included.
    pub vocab_size: usize,
    /// Pairs seen fewer times are not merged.
    pub min_frequency: u64,
    /// The most distinct characters kept in the alphabet (the most frequent ones).
    pub limit_alphabet: Option<usize>,
    /// Characters always in the alphabet (byte-level BPE: its 256 symbols).
    pub initial_alphabet: Vec<char>,
    /// Special tokens, first in the vocabulary in this order.
    pub special_tokens: Vec<String>,
    words: HashMap<String, u64>,
}

/// A trained vocabulary: the pieces in id order (special tokens, the alphabet, the `##`
/// pieces, then the merged pieces in the order they were made), and the merges made.
#[derive(Debug, Clone, PartialEq)]
pub struct Learned {
    pub pieces: Vec<String>,
    pub merges: Vec<(String, String)>,
}

impl SubwordTrainer {
    /// A WordPiece trainer (tokenizers' `WordPieceTrainer`'s settings).
    pub fn wordpiece(
        vocab_size: usize,
        min_frequency: u64,
        limit_alphabet: Option<usize>,
        special_tokens: Vec<String>,
        unk_token: &str,
    ) -> Self {
        SubwordTrainer {
            kind: SubwordKind::WordPiece {
                unk: unk_token.to_string(),
            },
            vocab_size,
            min_frequency,
            limit_alphabet,
            initial_alphabet: Vec::new(),
            special_tokens,
            words: HashMap::new(),
        }
    }

    /// A byte-level BPE trainer over `alphabet` (the byte-level pre-tokenizer's symbols).
    pub fn byte_level_bpe(
        vocab_size: usize,
        min_frequency: u64,
        alphabet: Vec<char>,
        special_tokens: Vec<String>,
    ) -> Self {
        SubwordTrainer {
            kind: SubwordKind::Bpe,
            vocab_size,
            min_frequency,
            limit_alphabet: None,
            initial_alphabet: alphabet,
            special_tokens,
            words: HashMap::new(),
        }
    }

    /// The prefix of pieces that continue a word.
    fn prefix(&self) -> &'static str {
        match self.kind {
            SubwordKind::WordPiece { .. } => PREFIX,
            SubwordKind::Bpe => "",
        }
    }

    /// Adds `count` occurrences of `word` (as `feed` does for each pre-tokenised word).
    pub fn add_word(&mut self, word: &str, count: u64) {
        *self.words.entry(word.to_string()).or_default() += count;
    }

    /// The vocabulary's pieces in id order (see [`Learned`]).
    pub fn vocabulary(&self) -> Vec<String> {
        self.learn().pieces
    }

    /// Trains on the words fed so far.
    pub fn learn(&self) -> Learned {
        let prefix = self.prefix();
        // The order words are visited in changes no count, and every piece is numbered in an
        // order of its own (specials, alphabet, `##` pieces, merges): no sorting of words.
        let words = &self.words;
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
        for (w, &c) in words {
            for ch in w.chars() {
                *chars.entry(ch).or_default() += c;
            }
        }
        for &ch in &self.initial_alphabet {
            chars.insert(ch, u64::MAX);
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
        if !prefix.is_empty() {
            let mut continuing: Vec<char> = words
                .keys()
                .flat_map(|w| w.chars().skip(1))
                .filter(|ch| alphabet.contains(ch))
                .collect::<HashSet<char>>()
                .into_iter()
                .collect();
            continuing.sort_unstable();
            for ch in continuing {
                add(format!("{prefix}{ch}"), &mut pieces, &mut ids);
            }
        }

        // Each word as piece ids (characters outside the alphabet left out, as tokenizers does).
        let mut seqs: Vec<Vec<u32>> = Vec::with_capacity(words.len());
        let mut counts: Vec<i64> = Vec::with_capacity(words.len());
        for (w, &c) in words {
            let seq = w
                .chars()
                .enumerate()
                .filter(|(_, ch)| alphabet.contains(ch))
                .map(|(i, ch)| {
                    let s = if i == 0 {
                        ch.to_string()
                    } else {
                        format!("{prefix}{ch}")
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
        let mut merges: Vec<(String, String)> = Vec::new();
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
            let (left, right) = (&pieces[pair.0 as usize], &pieces[pair.1 as usize]);
            let tail = if prefix.is_empty() {
                right
            } else {
                right.strip_prefix(prefix).unwrap_or(right)
            };
            let merged = format!("{left}{tail}");
            merges.push((left.clone(), right.clone()));
            let new_id = add(merged, &mut pieces, &mut ids);
            // Re-count the words holding the pair: their old pairs out, the merged word's in.
            let mut changed: HashSet<(u32, u32)> = HashSet::new();
            for i in where_.remove(&pair).unwrap_or_default() {
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
            // The queue orders (count, pair) totally: the order of these pushes changes nothing.
            for q in changed {
                if let Some(&n) = pair_counts.get(&q) {
                    if n > 0 && q != pair {
                        queue.push((n, Reverse(q)));
                    }
                }
            }
        }
        Learned { pieces, merges }
    }
}

impl Trainer for SubwordTrainer {
    type Model = ModelWrapper;

    fn should_show_progress(&self) -> bool {
        false
    }

    fn train(&self, model: &mut ModelWrapper) -> tokenizers::Result<Vec<AddedToken>> {
        let learned = self.learn();
        let vocab: ahash::AHashMap<String, u32> = learned
            .pieces
            .into_iter()
            .enumerate()
            .map(|(i, s)| (s, i as u32))
            .collect();
        *model = match &self.kind {
            SubwordKind::WordPiece { unk } => WordPiece::builder()
                .vocab(vocab)
                .unk_token(unk.clone())
                .continuing_subword_prefix(PREFIX.into())
                .build()?
                .into(),
            SubwordKind::Bpe => BPE::builder()
                .vocab_and_merges(vocab, learned.merges)
                .build()?
                .into(),
        };
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
