//! The data pipeline: tokenizers, corpora on disk, the token cache, sequence cutting, masking
//! strategies and batches.
//!
//! The usual path, in order:
//! 1. [`Tok::load`] (or [`Tok::train_wordpiece`]) a tokenizer;
//! 2. [`prepare`] a [`DataConfig`]: the corpus is tokenised once into a [`TokenCache`] and cut
//!    into training and held-out [`SequenceSet`]s;
//! 3. build a [`Masker`] and a [`Batcher`], then stream [`Batch`]es with
//!    [`Batcher::iter_from`] from a saved [`Position`].

pub mod batch;
pub mod cache;
pub mod corpus;
pub mod error;
pub mod masking;
pub mod sequences;
pub mod subword_trainer;
pub mod tokenizer;

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use batch::{Batch, BatchConfig, BatchIter, Batcher, Position};
pub use cache::{CacheReport, TokenCache, WordSegmentation};
pub use corpus::{Corpus, CorpusConfig, Utf8Policy};
pub use error::{DataError, Result};
pub use masking::{MaskStats, Masker, Masking};
pub use sequences::{cut_sequences, SequenceConfig, SequenceSet, Splits};
pub use tokenizer::{BertVocabOptions, SpecialIds, Tok};

/// Everything the pipeline needs to know about the text, as a recipe's `data:` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// The corpus.
    pub corpus: CorpusConfig,
    /// How sequences are cut.
    #[serde(default)]
    pub sequences: SequenceConfig,
    /// The masking strategy.
    #[serde(default)]
    pub masking: Masking,
    /// Where token caches live (default `.distil-cache` in the working directory).
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
}

/// The prepared data: the cache and its training / held-out sequences.
#[derive(Debug)]
pub struct Prepared {
    /// The token cache.
    pub cache: Arc<TokenCache>,
    /// Whether the cache was reused, and what was tokenised.
    pub cache_report: CacheReport,
    /// Training and held-out sequences.
    pub splits: Splits,
}

impl Prepared {
    /// A batcher over the training sequences: shuffled every epoch with `seed`, masked with
    /// `cfg.masking` (frequency smoothing uses the cache's token counts).
    pub fn train_batcher(
        &self,
        cfg: &DataConfig,
        batch: BatchConfig,
        seed: u64,
        tok: &Tok,
    ) -> Result<Batcher> {
        let masker = Masker::new(&cfg.masking, tok, Some(self.cache.counts()))?;
        Batcher::new(
            self.splits.train.clone(),
            Arc::new(masker),
            batch,
            seed,
            tok,
        )
    }

    /// A batcher over the held-out sequences (`None` without a held-out split): never
    /// shuffled, and with the same masks every time it is read from epoch 0, so evaluations
    /// are comparable across a run.
    pub fn eval_batcher(
        &self,
        cfg: &DataConfig,
        batch_size: usize,
        seed: u64,
        tok: &Tok,
    ) -> Result<Option<Batcher>> {
        let Some(eval) = &self.splits.eval else {
            return Ok(None);
        };
        let masker = Masker::new(&cfg.masking, tok, Some(self.cache.counts()))?;
        let batch = BatchConfig {
            shuffle: false,
            ..BatchConfig::new(batch_size)
        };
        Batcher::new(eval.clone(), Arc::new(masker), batch, seed, tok).map(Some)
    }
}

/// Opens the corpus, builds or reuses its token cache (with the word segmentation the masking
/// strategy needs) and cuts the sequences.
pub fn prepare(cfg: &DataConfig, tok: &Tok) -> Result<Prepared> {
    cfg.masking.validate()?;
    cfg.sequences.validate()?;
    let corpus = Corpus::open(&cfg.corpus)?;
    let root = cfg
        .cache_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(".distil-cache"));
    let (cache, cache_report) =
        TokenCache::build_or_load(&corpus, tok, cfg.masking.segmentation(), &root)?;
    let cache = Arc::new(cache);
    let splits = cut_sequences(cache.clone(), tok, &cfg.sequences)?;
    Ok(Prepared {
        cache,
        cache_report,
        splits,
    })
}
