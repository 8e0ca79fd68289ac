//! Batches for the trainer: seeded shuffling, optional length grouping, dynamic padding, fresh
//! masks for every epoch, and a resumable position.

use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::error::{DataError, Result};
use super::masking::{MaskStats, Masker};
use super::sequences::SequenceSet;
use super::tokenizer::Tok;

/// One batch, row-major, as the trainer consumes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Number of rows.
    pub batch_size: usize,
    /// Padded length of every row.
    pub seq_len: usize,
    /// `batch_size * seq_len` ids, padded with the pad id.
    pub input_ids: Vec<u32>,
    /// 1 = real token, 0 = padding.
    pub attention_mask: Vec<u32>,
    /// Segment ids (zeros when there are no pairs).
    pub token_type_ids: Vec<u32>,
    /// Original id at masked positions, -100 elsewhere.
    pub labels: Vec<i64>,
    /// NSP / SOP label per row, when the sequences are pairs.
    pub sentence_labels: Option<Vec<u32>>,
}

impl Batch {
    /// Real (non-padding) tokens in the batch.
    pub fn real_tokens(&self) -> usize {
        self.attention_mask.iter().filter(|&&m| m == 1).count()
    }

    /// Positions with a label.
    pub fn masked_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != -100).count()
    }
}

/// Where a batch stream is: `index` is the batch within `epoch`. Saved with checkpoints so a
/// resumed run continues with exactly the batch it would have seen.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Position {
    /// Epoch, from 0.
    pub epoch: u64,
    /// Batch index within the epoch, from 0.
    pub index: u64,
}

/// How sequences are grouped into batches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Rows per batch.
    pub batch_size: usize,
    /// Shuffle the sequences every epoch (seeded).
    #[serde(default = "yes")]
    pub shuffle: bool,
    /// Sort sequences by length within groups of `group_size` batches, so rows of a batch have
    /// similar lengths and padding is cut (the batch order is then shuffled).
    #[serde(default)]
    pub group_by_length: bool,
    /// Batches per length group.
    #[serde(default = "fifty")]
    pub group_size: usize,
    /// Round the padded length up to a multiple of this (capped at the block size).
    #[serde(default)]
    pub pad_to_multiple_of: Option<usize>,
    /// Pad every batch to the block size (fixed shapes).
    #[serde(default)]
    pub fixed_length: bool,
    /// Drop the last incomplete batch of an epoch.
    #[serde(default)]
    pub drop_last: bool,
}

fn yes() -> bool {
    true
}
fn fifty() -> usize {
    50
}

impl BatchConfig {
    /// Defaults with `batch_size` rows.
    pub fn new(batch_size: usize) -> Self {
        BatchConfig {
            batch_size,
            shuffle: true,
            group_by_length: false,
            group_size: 50,
            pad_to_multiple_of: None,
            fixed_length: false,
            drop_last: false,
        }
    }
}

const SALT_SHUFFLE: u64 = 0x5348_5546;
const SALT_MASK: u64 = 0x4d41_534b;

fn rng_for(seed: u64, epoch: u64, index: u64, salt: u64) -> ChaCha8Rng {
    let mut s = [0u8; 32];
    for (i, v) in [seed, epoch, index, salt].iter().enumerate() {
        s[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    ChaCha8Rng::from_seed(s)
}

/// Turns a [`SequenceSet`] into masked [`Batch`]es. Cheap to clone.
#[derive(Clone)]
pub struct Batcher {
    seqs: Arc<SequenceSet>,
    masker: Arc<Masker>,
    cfg: BatchConfig,
    seed: u64,
    pad_id: u32,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("sequences", &self.seqs.len())
            .field("cfg", &self.cfg)
            .field("seed", &self.seed)
            .finish()
    }
}

impl Batcher {
    /// Checks that the pieces fit together (tokenizer, cache, masking) and builds the batcher.
    pub fn new(
        seqs: Arc<SequenceSet>,
        masker: Arc<Masker>,
        cfg: BatchConfig,
        seed: u64,
        tok: &Tok,
    ) -> Result<Batcher> {
        if cfg.batch_size == 0 {
            return Err(DataError::config("batch_size", "must be at least 1"));
        }
        if cfg.group_by_length && cfg.group_size == 0 {
            return Err(DataError::config("data.group_size", "must be at least 1"));
        }
        if cfg.pad_to_multiple_of == Some(0) {
            return Err(DataError::config(
                "data.pad_to_multiple_of",
                "must be at least 1",
            ));
        }
        let meta = seqs.cache().meta();
        if meta.vocab_size != tok.vocab_size() {
            return Err(DataError::config(
                "tokenizer",
                format!(
                    "the token cache {} was built with a tokenizer of {} entries, this one has {}",
                    seqs.cache().dir().display(),
                    meta.vocab_size,
                    tok.vocab_size()
                ),
            ));
        }
        let need = masker.config().segmentation();
        if meta.segmentation != need {
            return Err(DataError::config(
                "masking.strategy",
                format!(
                    "`{}` needs a token cache with {:?} word segmentation, this one has {:?}",
                    masker.config().name(),
                    need,
                    meta.segmentation
                ),
            ));
        }
        Ok(Batcher {
            seqs,
            masker,
            cfg,
            seed,
            pad_id: tok.special_ids().pad,
        })
    }

    /// The sequences.
    pub fn sequences(&self) -> &Arc<SequenceSet> {
        &self.seqs
    }

    /// Batches in one epoch.
    pub fn batches_per_epoch(&self) -> usize {
        let n = self.seqs.len();
        let b = self.cfg.batch_size;
        if self.cfg.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The rows (sequence indices) of every batch of `epoch`, in order.
    pub fn epoch_plan(&self, epoch: u64) -> Vec<Vec<u32>> {
        let n = self.seqs.len();
        let b = self.cfg.batch_size;
        let mut order: Vec<u32> = (0..n as u32).collect();
        let mut rng = rng_for(self.seed, epoch, u64::MAX, SALT_SHUFFLE);
        if self.cfg.shuffle {
            for i in (1..n).rev() {
                let j = rng.random_range(0..=i);
                order.swap(i, j);
            }
        }
        let mut batches: Vec<Vec<u32>> = if self.cfg.group_by_length {
            let lens = self.seqs.lengths();
            let mut out = Vec::new();
            for group in order.chunks(b * self.cfg.group_size) {
                let mut g = group.to_vec();
                g.sort_by_key(|&i| std::cmp::Reverse(lens[i as usize]));
                out.extend(g.chunks(b).map(<[u32]>::to_vec));
            }
            // keep an incomplete batch last; shuffle the complete ones
            let tail = if out.last().is_some_and(|x| x.len() < b) {
                out.pop()
            } else {
                None
            };
            if self.cfg.shuffle {
                for i in (1..out.len()).rev() {
                    let j = rng.random_range(0..=i);
                    out.swap(i, j);
                }
            }
            out.extend(tail);
            out
        } else {
            order.chunks(b).map(<[u32]>::to_vec).collect()
        };
        if self.cfg.drop_last && batches.last().is_some_and(|x| x.len() < b) {
            batches.pop();
        }
        batches
    }

    /// Builds the batch of `rows` at `pos` (the position seeds its masks).
    pub fn make_batch(&self, rows: &[u32], pos: Position, stats: Option<&mut MaskStats>) -> Batch {
        let mut rng = rng_for(self.seed, pos.epoch, pos.index, SALT_MASK);
        let bs = rows.len();
        let mut ids: Vec<Vec<u32>> = Vec::with_capacity(bs);
        let mut types: Vec<Vec<u32>> = Vec::with_capacity(bs);
        let mut flags: Vec<u8> = Vec::new();
        let mut labels_rows: Vec<Vec<i64>> = Vec::with_capacity(bs);
        let mut stats = stats;
        for &r in rows {
            let mut row = Vec::with_capacity(self.seqs.block_size());
            let mut ty = Vec::with_capacity(self.seqs.block_size());
            flags.clear();
            self.seqs
                .append_row(r as usize, &mut row, &mut ty, &mut flags);
            let mut labels = vec![-100i64; row.len()];
            self.masker.mask_row(
                &mut row,
                &flags,
                &mut labels,
                &mut rng,
                stats.as_deref_mut(),
            );
            ids.push(row);
            types.push(ty);
            labels_rows.push(labels);
        }
        let block = self.seqs.block_size();
        let longest = ids.iter().map(Vec::len).max().unwrap_or(0);
        let seq_len = if self.cfg.fixed_length {
            block.max(longest)
        } else {
            match self.cfg.pad_to_multiple_of {
                Some(m) => longest
                    .div_ceil(m)
                    .saturating_mul(m)
                    .min(block.max(longest)),
                None => longest,
            }
        };
        let total = bs * seq_len;
        let mut batch = Batch {
            batch_size: bs,
            seq_len,
            input_ids: vec![self.pad_id; total],
            attention_mask: vec![0; total],
            token_type_ids: vec![0; total],
            labels: vec![-100; total],
            sentence_labels: if self.seqs.has_pairs() {
                Some(
                    rows.iter()
                        .map(|&r| self.seqs.sentence_label(r as usize).unwrap_or(0))
                        .collect(),
                )
            } else {
                None
            },
        };
        for (i, ((row, ty), lab)) in ids.iter().zip(&types).zip(&labels_rows).enumerate() {
            let o = i * seq_len;
            let n = row.len();
            batch.input_ids[o..o + n].copy_from_slice(row);
            batch.token_type_ids[o..o + n].copy_from_slice(ty);
            batch.labels[o..o + n].copy_from_slice(lab);
            for m in &mut batch.attention_mask[o..o + n] {
                *m = 1;
            }
        }
        batch
    }

    /// The batch at `pos` (recomputes the epoch plan: use [`Batcher::iter_from`] to stream).
    pub fn batch_at(&self, pos: Position) -> Option<Batch> {
        let plan = self.epoch_plan(pos.epoch);
        plan.get(pos.index as usize)
            .map(|rows| self.make_batch(rows, pos, None))
    }

    /// An endless stream of batches starting at `pos`, epoch after epoch.
    pub fn iter_from(&self, pos: Position) -> BatchIter {
        BatchIter {
            batcher: self.clone(),
            plan: None,
            pos,
        }
    }

    /// The batches of one epoch, from its start.
    pub fn epoch(&self, epoch: u64) -> impl Iterator<Item = Batch> + '_ {
        let plan = self.epoch_plan(epoch);
        plan.into_iter().enumerate().map(move |(i, rows)| {
            self.make_batch(
                &rows,
                Position {
                    epoch,
                    index: i as u64,
                },
                None,
            )
        })
    }
}

/// The stream returned by [`Batcher::iter_from`]; yields each batch with its position.
pub struct BatchIter {
    batcher: Batcher,
    plan: Option<(u64, Vec<Vec<u32>>)>,
    pos: Position,
}

impl BatchIter {
    /// The position of the next batch (save this to resume).
    pub fn position(&self) -> Position {
        self.pos
    }
}

impl BatchIter {
    /// Steps over the next batch without building it (its masks are not drawn); returns its
    /// position. Data-parallel ranks step over the batches other ranks take.
    pub fn advance(&mut self) -> Option<Position> {
        if self.batcher.batches_per_epoch() == 0 {
            return None;
        }
        loop {
            if self.plan.as_ref().map(|p| p.0) != Some(self.pos.epoch) {
                self.plan = Some((self.pos.epoch, self.batcher.epoch_plan(self.pos.epoch)));
            }
            let (_, plan) = self.plan.as_ref()?;
            if (self.pos.index as usize) < plan.len() {
                let pos = self.pos;
                self.pos.index += 1;
                return Some(pos);
            }
            self.pos = Position {
                epoch: self.pos.epoch + 1,
                index: 0,
            };
        }
    }
}

impl Iterator for BatchIter {
    type Item = (Position, Batch);

    fn next(&mut self) -> Option<Self::Item> {
        if self.batcher.batches_per_epoch() == 0 {
            return None;
        }
        loop {
            if self.plan.as_ref().map(|p| p.0) != Some(self.pos.epoch) {
                self.plan = Some((self.pos.epoch, self.batcher.epoch_plan(self.pos.epoch)));
            }
            let (_, plan) = self.plan.as_ref()?;
            if let Some(rows) = plan.get(self.pos.index as usize) {
                let pos = self.pos;
                let b = self.batcher.make_batch(rows, pos, None);
                self.pos.index += 1;
                return Some((pos, b));
            }
            self.pos = Position {
                epoch: self.pos.epoch + 1,
                index: 0,
            };
        }
    }
}
