//! Cutting the token cache into model sequences: line by line, packed blocks (RoBERTa's
//! FULL-SENTENCES), or sentence pairs for NSP / SOP; with a deterministic held-out split.
//!
//! A sequence is stored as a list of [`Piece`]s (token ranges of the cache) and is read as
//! `[CLS]` followed by each piece's tokens, each piece optionally followed by `[SEP]`. The index
//! (pieces, offsets, lengths, labels) is written next to the token cache under a key of the
//! cutting options, atomically, and memory-mapped.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::cache::{Mapped, TokenCache};
use super::error::{DataError, Result};
use super::tokenizer::{write_atomic, Tok};
use crate::util::splitmix64;

/// How units become sequences.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SequenceMode {
    /// One unit (line), one sequence: `[CLS] line [SEP]`.
    LineByLine,
    /// Units concatenated with `[SEP]` between them and cut into full `block_size` blocks:
    /// `[CLS] …` (RoBERTa FULL-SENTENCES; crosses document boundaries).
    #[default]
    Packed,
}

/// What line-by-line mode does with a unit longer than the block.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LongLines {
    /// Keep the first `block_size - 2` tokens (counted in [`CutStats::truncated_units`]).
    #[default]
    Truncate,
    /// Cut it into several sequences (counted in [`CutStats::split_units`]).
    Split,
}

/// Sentence-pair tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SentencePairs {
    /// Next-sentence prediction (BERT): label 0 = B follows A, 1 = B is a random segment from
    /// another document (50%).
    Nsp,
    /// Sentence-order prediction (ALBERT): label 0 = A then B as in the text, 1 = swapped (50%).
    Sop,
}

/// What counts as a document (for pairs and for the held-out split).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Documents {
    /// `lines` when the text files have no blank line at all (one document per file), else
    /// `blank_lines`.
    #[default]
    Auto,
    /// Documents are separated by blank lines (`.jsonl`: one record each).
    BlankLines,
    /// Every line is a document (e.g. one article per line).
    Lines,
}

/// Options for cutting sequences.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SequenceConfig {
    /// Line by line or packed (ignored when `pairs` is set).
    #[serde(default)]
    pub mode: SequenceMode,
    /// Maximum sequence length, special tokens included.
    #[serde(default = "default_block")]
    pub block_size: usize,
    /// Line-by-line handling of long lines.
    #[serde(default)]
    pub long_lines: LongLines,
    /// Build sentence pairs for NSP or SOP.
    #[serde(default)]
    pub pairs: Option<SentencePairs>,
    /// What a document is.
    #[serde(default)]
    pub documents: Documents,
    /// Fraction of documents held out for evaluation (0 = none).
    #[serde(default)]
    pub eval_fraction: f64,
    /// Seed of the held-out split and of the pair construction.
    #[serde(default = "default_seed")]
    pub seed: u64,
}

fn default_block() -> usize {
    128
}

fn default_seed() -> u64 {
    42
}

impl Default for SequenceConfig {
    fn default() -> Self {
        SequenceConfig {
            mode: SequenceMode::default(),
            block_size: default_block(),
            long_lines: LongLines::default(),
            pairs: None,
            documents: Documents::default(),
            eval_fraction: 0.0,
            seed: default_seed(),
        }
    }
}

impl SequenceConfig {
    /// Checks the values, naming the key that is wrong.
    pub fn validate(&self) -> Result<()> {
        let min = if self.pairs.is_some() { 5 } else { 3 };
        if self.block_size < min || self.block_size > u32::MAX as usize {
            return Err(DataError::config(
                "data.block_size",
                format!(
                    "{} is out of range: at least {min} (special tokens included)",
                    self.block_size
                ),
            ));
        }
        if !(0.0..1.0).contains(&self.eval_fraction) {
            return Err(DataError::config(
                "data.eval_fraction",
                format!("{} is not in [0, 1)", self.eval_fraction),
            ));
        }
        Ok(())
    }
}

/// Piece flag: the piece belongs to segment B (token type 1).
pub const PIECE_SEGMENT_B: u32 = 1;
/// Piece flag: a `[SEP]` follows the piece.
pub const PIECE_SEP_AFTER: u32 = 2;

/// A token range of the cache that is part of a sequence.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// First token (index into [`TokenCache::tokens`]).
    pub start: u64,
    /// Number of tokens.
    pub len: u32,
    /// [`PIECE_SEGMENT_B`] | [`PIECE_SEP_AFTER`].
    pub flags: u32,
}

// SAFETY: `Piece` is `repr(C)`, 16 bytes with no padding, and every bit pattern is valid.
unsafe impl bytemuck::Zeroable for Piece {}
// SAFETY: see above.
unsafe impl bytemuck::Pod for Piece {}

/// What cutting did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CutStats {
    /// Training sequences.
    pub train_sequences: u64,
    /// Held-out sequences.
    pub eval_sequences: u64,
    /// Documents in the training split.
    pub train_docs: u64,
    /// Documents in the held-out split.
    pub eval_docs: u64,
    /// Units longer than the block that were truncated (line by line).
    pub truncated_units: u64,
    /// Units longer than the block that were split into several sequences (line by line).
    pub split_units: u64,
    /// Tokens dropped by truncation (line by line and pairs).
    pub dropped_tokens: u64,
    /// Pairs whose label is 1 (NSP: random next; SOP: swapped).
    pub positive_pairs: u64,
    /// Chunks too short to make a pair (fewer than 2 tokens), skipped.
    pub skipped_chunks: u64,
}

/// One split's sequences, memory-mapped.
pub struct SequenceSet {
    cache: Arc<TokenCache>,
    pieces: Mapped<Piece>,
    offsets: Mapped<u64>,
    lens: Mapped<u32>,
    labels: Option<Mapped<u8>>,
    cls: u32,
    sep: u32,
    block_size: usize,
}

impl std::fmt::Debug for SequenceSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SequenceSet")
            .field("len", &self.len())
            .field("block_size", &self.block_size)
            .finish()
    }
}

/// The result of [`cut_sequences`].
#[derive(Debug)]
pub struct Splits {
    /// Training sequences.
    pub train: Arc<SequenceSet>,
    /// Held-out sequences (when `eval_fraction > 0`).
    pub eval: Option<Arc<SequenceSet>>,
    /// What cutting counted.
    pub stats: CutStats,
    /// True when the index was reused from disk.
    pub reused: bool,
}

impl SequenceSet {
    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.lens.as_slice().len()
    }

    /// True when there is no sequence.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Maximum length of a sequence.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Lengths of all sequences, special tokens included.
    pub fn lengths(&self) -> &[u32] {
        self.lens.as_slice()
    }

    /// Total tokens over all sequences, special tokens included.
    pub fn total_tokens(&self) -> u64 {
        self.lengths().iter().map(|&l| l as u64).sum()
    }

    /// The NSP/SOP label of sequence `i`, when the set has pairs.
    pub fn sentence_label(&self, i: usize) -> Option<u32> {
        self.labels.as_ref().map(|l| l.as_slice()[i] as u32)
    }

    /// True when sequences are sentence pairs with labels.
    pub fn has_pairs(&self) -> bool {
        self.labels.is_some()
    }

    /// The token cache the sequences point into.
    pub fn cache(&self) -> &Arc<TokenCache> {
        &self.cache
    }

    /// The pieces of sequence `i`.
    pub fn pieces(&self, i: usize) -> &[Piece] {
        let o = self.offsets.as_slice();
        &self.pieces.as_slice()[o[i] as usize..o[i + 1] as usize]
    }

    /// Appends sequence `i` to `ids`, its token types to `types` and its word-start flags to
    /// `flags` (special tokens get flag [`super::cache::FLAG_WORD_START`]).
    pub fn append_row(
        &self,
        i: usize,
        ids: &mut Vec<u32>,
        types: &mut Vec<u32>,
        flags: &mut Vec<u8>,
    ) {
        let tokens = self.cache.tokens();
        let tflags = self.cache.flags();
        let ws = super::cache::FLAG_WORD_START | super::cache::FLAG_SUBWORD_START;
        ids.push(self.cls);
        types.push(0);
        flags.push(ws);
        for p in self.pieces(i) {
            let s = p.start as usize;
            let e = s + p.len as usize;
            let t = (p.flags & PIECE_SEGMENT_B != 0) as u32;
            ids.extend_from_slice(&tokens[s..e]);
            types.extend(std::iter::repeat_n(t, e - s));
            flags.extend_from_slice(&tflags[s..e]);
            if e > s {
                // the first token of a piece starts a word within this sequence
                let first = flags.len() - (e - s);
                flags[first] |= ws;
            }
            if p.flags & PIECE_SEP_AFTER != 0 {
                ids.push(self.sep);
                types.push(t);
                flags.push(ws);
            }
        }
    }
}

/// Cuts (or reloads) the sequences of `cache` as `cfg` says.
pub fn cut_sequences(cache: Arc<TokenCache>, tok: &Tok, cfg: &SequenceConfig) -> Result<Splits> {
    cfg.validate()?;
    let sp = tok.special_ids();
    let (cls, sep) = (sp.cls, sp.sep);
    let cfg_json =
        serde_json::to_string(cfg).map_err(|e| DataError::config("data", e.to_string()))?;
    let mut h = blake3::Hasher::new();
    h.update(b"distil-cut-v1\0");
    h.update(cfg_json.as_bytes());
    h.update(&cls.to_le_bytes());
    h.update(&sep.to_le_bytes());
    let key = h.finalize().to_hex()[..16].to_string();
    let dir = cache.dir().join(format!("seqs-{key}"));
    let stats_path = dir.join("cut.json");
    let reused = stats_path.is_file();
    if !reused {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let tmp = cache
            .dir()
            .join(format!(".tmp-seqs-{key}-{}-{nanos}", std::process::id()));
        let res = build(&cache, cfg, &tmp);
        match res {
            Ok(stats) => {
                let json = serde_json::to_string_pretty(&stats).map_err(|e| DataError::Cache {
                    path: tmp.clone(),
                    message: e.to_string(),
                })?;
                write_atomic(&tmp.join("cut.json"), json.as_bytes())?;
                if let Err(e) = fs::rename(&tmp, &dir) {
                    let _ = fs::remove_dir_all(&tmp);
                    if !stats_path.is_file() {
                        return Err(DataError::io(&dir, e));
                    }
                }
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                return Err(e);
            }
        }
    }
    let text = fs::read_to_string(&stats_path).map_err(|e| DataError::io(&stats_path, e))?;
    let stats: CutStats = serde_json::from_str(&text).map_err(|e| DataError::Cache {
        path: stats_path.clone(),
        message: e.to_string(),
    })?;
    let pairs = cfg.pairs.is_some();
    let open = |name: &str, n: u64| -> Result<Arc<SequenceSet>> {
        let d = dir.join(name);
        let lens = Mapped::<u32>::open(&d.join("lens.u32"), Some(n))?;
        let offsets = Mapped::<u64>::open(&d.join("seqs.u64"), Some(n + 1))?;
        let pieces = Mapped::<Piece>::open(&d.join("pieces.bin"), None)?;
        let np = pieces.as_slice().len() as u64;
        if offsets.as_slice().last() != Some(&np) {
            return Err(DataError::Cache {
                path: d,
                message: "sequence offsets do not match the pieces".into(),
            });
        }
        let n_tok = cache.tokens().len() as u64;
        if pieces
            .as_slice()
            .iter()
            .any(|p| p.start + p.len as u64 > n_tok)
        {
            return Err(DataError::Cache {
                path: d,
                message: "a piece points past the end of the token cache".into(),
            });
        }
        let labels = if pairs {
            Some(Mapped::<u8>::open(&d.join("labels.u8"), Some(n))?)
        } else {
            None
        };
        Ok(Arc::new(SequenceSet {
            cache: cache.clone(),
            pieces,
            offsets,
            lens,
            labels,
            cls,
            sep,
            block_size: cfg.block_size,
        }))
    };
    let train = open("train", stats.train_sequences)?;
    if train.is_empty() {
        return Err(DataError::EmptyCorpus {
            what: format!(
                "no training sequence could be cut from {} ({} units)",
                cache.meta().corpus,
                cache.n_units()
            ),
        });
    }
    let eval = if cfg.eval_fraction > 0.0 {
        Some(open("eval", stats.eval_sequences)?)
    } else {
        None
    };
    Ok(Splits {
        train,
        eval,
        stats,
        reused,
    })
}

struct SplitWriter {
    dir: PathBuf,
    pieces: BufWriter<File>,
    seqs: BufWriter<File>,
    lens: BufWriter<File>,
    labels: Option<BufWriter<File>>,
    n_pieces: u64,
    n_seqs: u64,
}

impl SplitWriter {
    fn new(dir: PathBuf, pairs: bool) -> Result<Self> {
        fs::create_dir_all(&dir).map_err(|e| DataError::io(&dir, e))?;
        let c = |n: &str| -> Result<BufWriter<File>> {
            let p = dir.join(n);
            Ok(BufWriter::with_capacity(
                1 << 20,
                File::create(&p).map_err(|e| DataError::io(&p, e))?,
            ))
        };
        let mut w = SplitWriter {
            pieces: c("pieces.bin")?,
            seqs: c("seqs.u64")?,
            lens: c("lens.u32")?,
            labels: if pairs { Some(c("labels.u8")?) } else { None },
            dir: dir.clone(),
            n_pieces: 0,
            n_seqs: 0,
        };
        w.seqs
            .write_all(&0u64.to_le_bytes())
            .map_err(|e| DataError::io(dir.join("seqs.u64"), e))?;
        Ok(w)
    }

    fn push(&mut self, pieces: &[Piece], label: Option<u8>) -> Result<()> {
        let len: u64 = 1 + pieces
            .iter()
            .map(|p| p.len as u64 + u64::from(p.flags & PIECE_SEP_AFTER != 0))
            .sum::<u64>();
        let io = |n: &str, e| DataError::io(self.dir.join(n), e);
        self.pieces
            .write_all(bytemuck::cast_slice(pieces))
            .map_err(|e| io("pieces.bin", e))?;
        self.n_pieces += pieces.len() as u64;
        self.seqs
            .write_all(&self.n_pieces.to_le_bytes())
            .map_err(|e| io("seqs.u64", e))?;
        self.lens
            .write_all(&(len as u32).to_le_bytes())
            .map_err(|e| io("lens.u32", e))?;
        if let (Some(w), Some(l)) = (self.labels.as_mut(), label) {
            w.write_all(&[l]).map_err(|e| io("labels.u8", e))?;
        }
        self.n_seqs += 1;
        Ok(())
    }

    fn finish(self) -> Result<u64> {
        let dir = self.dir;
        let mut all = vec![
            (self.pieces, "pieces.bin"),
            (self.seqs, "seqs.u64"),
            (self.lens, "lens.u32"),
        ];
        if let Some(l) = self.labels {
            all.push((l, "labels.u8"));
        }
        for (mut w, n) in all {
            let p = dir.join(n);
            w.flush().map_err(|e| DataError::io(&p, e))?;
            let f = w
                .into_inner()
                .map_err(|e| DataError::io(&p, e.into_error()))?;
            f.sync_all().map_err(|e| DataError::io(&p, e))?;
        }
        Ok(self.n_seqs)
    }
}

/// Whether document `d` belongs to the held-out split for this seed and fraction.
pub fn is_held_out(seed: u64, d: u64, fraction: f64) -> bool {
    fraction > 0.0
        && (splitmix64(splitmix64(seed) ^ d) >> 11) as f64 / (1u64 << 53) as f64 <= fraction
}

/// Documents as unit ranges, following [`Documents`], without materialising them (a corpus
/// may have hundreds of millions of lines).
struct Docs<'a> {
    cache: &'a TokenCache,
    lines: bool,
}

impl<'a> Docs<'a> {
    fn new(cache: &'a TokenCache, mode: Documents) -> Self {
        let meta = cache.meta();
        let lines = match mode {
            Documents::Lines => true,
            Documents::BlankLines => false,
            Documents::Auto => meta.n_docs <= meta.read.files && meta.n_units > meta.n_docs,
        };
        Docs { cache, lines }
    }

    fn len(&self) -> usize {
        if self.lines {
            self.cache.n_units()
        } else {
            self.cache.n_docs()
        }
    }

    fn get(&self, d: usize) -> std::ops::Range<usize> {
        if self.lines {
            d..d + 1
        } else {
            self.cache.doc_units(d)
        }
    }
}

fn build(cache: &TokenCache, cfg: &SequenceConfig, tmp: &Path) -> Result<CutStats> {
    let pairs = cfg.pairs.is_some();
    let docs = Docs::new(cache, cfg.documents);
    let n = docs.len();
    let held = |d: usize| is_held_out(cfg.seed, d as u64, cfg.eval_fraction);
    // A tiny corpus with nothing held out by chance: hold out its last document.
    let forced = (cfg.eval_fraction > 0.0 && n > 1 && !(0..n).any(held)).then(|| n - 1);
    let in_eval = |d: usize| held(d) || forced == Some(d);
    let n_eval = (0..n).filter(|&d| in_eval(d)).count() as u64;
    let mut stats = CutStats {
        train_docs: n as u64 - n_eval,
        eval_docs: n_eval,
        ..CutStats::default()
    };
    for (name, eval) in [("train", false), ("eval", true)] {
        if eval && cfg.eval_fraction <= 0.0 {
            continue;
        }
        let mut w = SplitWriter::new(tmp.join(name), pairs)?;
        let split = (0..n).filter(|&d| in_eval(d) == eval).map(|d| docs.get(d));
        match cfg.pairs {
            Some(task) => {
                let ids: Vec<u64> = (0..n)
                    .filter(|&d| in_eval(d) == eval)
                    .map(|d| d as u64)
                    .collect();
                cut_pairs(cache, cfg, task, &docs, &ids, &mut w, &mut stats)?
            }
            None => match cfg.mode {
                SequenceMode::LineByLine => cut_lines(cache, cfg, split, &mut w, &mut stats)?,
                SequenceMode::Packed => cut_packed(cache, cfg, split, &mut w)?,
            },
        }
        let n = w.finish()?;
        if eval {
            stats.eval_sequences = n;
        } else {
            stats.train_sequences = n;
        }
    }
    Ok(stats)
}

fn cut_lines(
    cache: &TokenCache,
    cfg: &SequenceConfig,
    docs: impl Iterator<Item = std::ops::Range<usize>>,
    w: &mut SplitWriter,
    stats: &mut CutStats,
) -> Result<()> {
    let cap = (cfg.block_size - 2) as u64;
    for d in docs {
        for u in d {
            let r = cache.unit_range(u);
            let n = r.end - r.start;
            if n <= cap {
                w.push(&[piece(r.start, n, PIECE_SEP_AFTER)], None)?;
            } else {
                match cfg.long_lines {
                    LongLines::Truncate => {
                        stats.truncated_units += 1;
                        stats.dropped_tokens += n - cap;
                        w.push(&[piece(r.start, cap, PIECE_SEP_AFTER)], None)?;
                    }
                    LongLines::Split => {
                        stats.split_units += 1;
                        let mut s = r.start;
                        while s < r.end {
                            let take = cap.min(r.end - s);
                            w.push(&[piece(s, take, PIECE_SEP_AFTER)], None)?;
                            s += take;
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

fn piece(start: u64, len: u64, flags: u32) -> Piece {
    Piece {
        start,
        len: len as u32,
        flags,
    }
}

fn cut_packed(
    cache: &TokenCache,
    cfg: &SequenceConfig,
    docs: impl Iterator<Item = std::ops::Range<usize>>,
    w: &mut SplitWriter,
) -> Result<()> {
    let cap = (cfg.block_size - 1) as u64;
    let mut cur: Vec<Piece> = Vec::new();
    let mut used = 0u64;
    for d in docs {
        for u in d {
            let r = cache.unit_range(u);
            let mut pos = r.start;
            while pos < r.end {
                let take = (r.end - pos).min(cap - used);
                cur.push(piece(pos, take, 0));
                used += take;
                pos += take;
                if used == cap {
                    w.push(&cur, None)?;
                    cur.clear();
                    used = 0;
                }
            }
            if used > 0 {
                if let Some(last) = cur.last_mut() {
                    last.flags |= PIECE_SEP_AFTER;
                }
                used += 1;
                if used == cap {
                    w.push(&cur, None)?;
                    cur.clear();
                    used = 0;
                }
            }
        }
    }
    if used > 0 {
        w.push(&cur, None)?;
    }
    Ok(())
}

/// A range of tokens and the unit it came from.
#[derive(Clone, Copy)]
struct Span {
    unit: usize,
    start: u64,
    end: u64,
}

fn total(spans: &[Span]) -> u64 {
    spans.iter().map(|s| s.end - s.start).sum()
}

fn trim_to(spans: &mut Vec<Span>, n: u64) -> u64 {
    let mut dropped = 0;
    while total(spans) > n {
        let excess = total(spans) - n;
        let Some(last) = spans.last_mut() else { break };
        let len = last.end - last.start;
        if len <= excess {
            dropped += len;
            spans.pop();
        } else {
            last.end -= excess;
            dropped += excess;
        }
    }
    dropped
}

fn cut_pairs(
    cache: &TokenCache,
    cfg: &SequenceConfig,
    task: SentencePairs,
    all_docs: &Docs<'_>,
    doc_ids: &[u64],
    w: &mut SplitWriter,
    stats: &mut CutStats,
) -> Result<()> {
    let max = (cfg.block_size - 3) as u64;
    let mut rng = ChaCha8Rng::seed_from_u64(splitmix64(cfg.seed ^ 0x5041_4952));
    if task == SentencePairs::Nsp && doc_ids.len() < 2 && !doc_ids.is_empty() {
        return Err(DataError::config(
            "data.pairs",
            format!(
                "next-sentence prediction needs at least 2 documents in each split, found {} (set `documents: lines` for one document per line)",
                doc_ids.len()
            ),
        ));
    }
    let mut pieces = Vec::new();
    for (di, &doc) in doc_ids.iter().enumerate() {
        let d = &all_docs.get(doc as usize);
        // cursor: unit index and token position within it
        let mut unit = d.start;
        let mut pos = if unit < d.end {
            cache.unit_range(unit).start
        } else {
            0
        };
        while unit < d.end {
            let mut chunk: Vec<Span> = Vec::new();
            let mut got = 0u64;
            while got < max && unit < d.end {
                let r = cache.unit_range(unit);
                let take = (r.end - pos).min(max - got);
                chunk.push(Span {
                    unit,
                    start: pos,
                    end: pos + take,
                });
                got += take;
                pos += take;
                if pos == r.end {
                    unit += 1;
                    if unit < d.end {
                        pos = cache.unit_range(unit).start;
                    }
                }
            }
            if got < 2 {
                stats.skipped_chunks += 1;
                continue;
            }
            let (mut a, b_rest): (Vec<Span>, Vec<Span>) = if chunk.len() >= 2 {
                let k = rng.random_range(1..chunk.len());
                (chunk[..k].to_vec(), chunk[k..].to_vec())
            } else {
                let c = chunk[0];
                let m = rng.random_range(1..c.end - c.start);
                (
                    vec![Span {
                        end: c.start + m,
                        ..c
                    }],
                    vec![Span {
                        start: c.start + m,
                        ..c
                    }],
                )
            };
            let mut label = 0u8;
            let mut b = b_rest.clone();
            match task {
                SentencePairs::Nsp => {
                    if rng.random::<f64>() < 0.5 {
                        label = 1;
                        let want = max.saturating_sub(total(&a)).max(1);
                        b = random_segment(cache, all_docs, doc_ids, di, want, &mut rng);
                        // Put the unused second part back, as BERT does.
                        let first = b_rest[0];
                        unit = first.unit;
                        pos = first.start;
                    }
                }
                SentencePairs::Sop => {
                    if rng.random::<f64>() < 0.5 {
                        label = 1;
                        std::mem::swap(&mut a, &mut b);
                    }
                }
            }
            // Truncate the longer segment until the pair fits.
            while total(&a) + total(&b) > max {
                let excess = total(&a) + total(&b) - max;
                if total(&a) >= total(&b) {
                    let keep = total(&a) - excess.min(total(&a) - 1);
                    stats.dropped_tokens += trim_to(&mut a, keep);
                } else {
                    let keep = total(&b) - excess.min(total(&b) - 1);
                    stats.dropped_tokens += trim_to(&mut b, keep);
                }
            }
            pieces.clear();
            for (seg, flag) in [(&a, 0u32), (&b, PIECE_SEGMENT_B)] {
                let n = seg.len();
                for (i, s) in seg.iter().enumerate() {
                    let sep = if i + 1 == n { PIECE_SEP_AFTER } else { 0 };
                    pieces.push(piece(s.start, s.end - s.start, flag | sep));
                }
            }
            stats.positive_pairs += label as u64;
            w.push(&pieces, Some(label))?;
        }
    }
    Ok(())
}

fn random_segment(
    cache: &TokenCache,
    all_docs: &Docs<'_>,
    doc_ids: &[u64],
    this: usize,
    want: u64,
    rng: &mut ChaCha8Rng,
) -> Vec<Span> {
    let mut other = this;
    for _ in 0..16 {
        other = rng.random_range(0..doc_ids.len());
        if other != this && !all_docs.get(doc_ids[other] as usize).is_empty() {
            break;
        }
    }
    let d = &all_docs.get(doc_ids[other] as usize);
    let mut out = Vec::new();
    if d.is_empty() {
        return out;
    }
    let mut unit = rng.random_range(d.clone());
    let mut got = 0;
    while got < want && unit < d.end {
        let r = cache.unit_range(unit);
        let take = (r.end - r.start).min(want - got);
        out.push(Span {
            unit,
            start: r.start,
            end: r.start + take,
        });
        got += take;
        unit += 1;
    }
    out
}
