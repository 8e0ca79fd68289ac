//! The on-disk token cache: a corpus is tokenised once into flat, memory-mapped arrays that
//! later runs reuse.
//!
//! Layout of a cache directory `<root>/<key>/`:
//! - `tokens.u32`: every unit's token ids, concatenated (little-endian `u32`, no special tokens);
//! - `flags.u8`: one byte per token, [`FLAG_WORD_START`] and [`FLAG_SUBWORD_START`];
//! - `units.u64`: `n_units + 1` offsets into `tokens.u32` (unit `i` is `units[i]..units[i+1]`);
//! - `docs.u64`: `n_docs + 1` offsets into the units;
//! - `counts.u64`: how often each id occurs (for frequency-smoothed masking);
//! - `meta.json`: sizes, reading statistics and what the key was made of.
//!
//! The key hashes the corpus files' contents, the tokenizer's JSON and the word segmentation,
//! so a changed file or tokenizer gives a new key. The directory is built under a temporary name
//! and renamed into place when complete: an interrupted build never leaves a cache that looks
//! valid. Text is streamed in chunks, so a corpus larger than memory works; the arrays are
//! memory-mapped, so they need not fit in memory either.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use memmap2::Mmap;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::corpus::{Corpus, ReadStats};
use super::error::{DataError, Result};
use super::tokenizer::{write_atomic, Tok};

#[cfg(target_endian = "big")]
compile_error!("the token cache stores little-endian arrays and is mapped as is");

/// Flag bit: the token starts a word for whole-word masking (with Jieba segmentation, a
/// Chinese word's later characters do not have it).
pub const FLAG_WORD_START: u8 = 1;
/// Flag bit: the token starts a word according to the tokenizer alone (not a `##`
/// continuation; a `Ġ` token for byte-level BPE).
pub const FLAG_SUBWORD_START: u8 = 2;

const CACHE_VERSION: u32 = 1;
const CHUNK_UNITS: usize = 8192;
const CHUNK_BYTES: usize = 8 << 20;

/// How word boundaries for whole-word masking are found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WordSegmentation {
    /// From the tokens themselves (`##` continuations, `Ġ` word starts).
    #[default]
    Tokenizer,
    /// Segment the original text with Jieba: all the tokens of one Chinese word form one word
    /// (Chinese-BERT-wwm).
    Jieba,
}

/// Sizes and provenance stored in `meta.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheMeta {
    /// Format version.
    pub version: u32,
    /// The cache key (hex).
    pub key: String,
    /// Where the tokenizer came from.
    pub tokenizer: String,
    /// Vocabulary size of the tokenizer.
    pub vocab_size: usize,
    /// The corpus paths and file count.
    pub corpus: String,
    /// Word segmentation used for the word-start flags.
    pub segmentation: WordSegmentation,
    /// Number of tokens.
    pub n_tokens: u64,
    /// Number of units (non-empty lines).
    pub n_units: u64,
    /// Number of documents.
    pub n_docs: u64,
    /// What the corpus reader counted.
    pub read: ReadStats,
    /// Units that produced no token at all (dropped).
    pub empty_units: u64,
}

/// What [`TokenCache::build_or_load`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheReport {
    /// True when an existing cache was reused (nothing tokenised).
    pub reused: bool,
    /// Units tokenised by this call (0 when reused).
    pub tokenized_units: u64,
    /// Tokens produced by this call (0 when reused).
    pub tokenized_tokens: u64,
    /// The cache directory.
    pub dir: PathBuf,
}

/// A read-only memory-mapped array of plain values.
pub struct Mapped<T> {
    map: Option<Mmap>,
    _t: std::marker::PhantomData<T>,
}

impl<T: bytemuck::Pod> Mapped<T> {
    /// Maps `path`, checking that its size is a multiple of `size_of::<T>()` (and equals
    /// `expect_len` elements when given).
    pub fn open(path: &Path, expect_len: Option<u64>) -> Result<Self> {
        let f = File::open(path).map_err(|e| DataError::io(path, e))?;
        let len = f.metadata().map_err(|e| DataError::io(path, e))?.len();
        let sz = std::mem::size_of::<T>() as u64;
        if len % sz != 0 || expect_len.is_some_and(|n| n * sz != len) {
            return Err(DataError::Cache {
                path: path.into(),
                message: format!(
                    "size {len} bytes does not match the expected {} elements of {sz} bytes",
                    expect_len.map_or("whole".to_string(), |n| n.to_string())
                ),
            });
        }
        let map = if len == 0 {
            None
        } else {
            // SAFETY: the file is opened read-only and cache files are never modified in
            // place (they are written under a temporary name and renamed).
            Some(unsafe { Mmap::map(&f) }.map_err(|e| DataError::io(path, e))?)
        };
        if let Some(m) = &map {
            if bytemuck::try_cast_slice::<u8, T>(&m[..]).is_err() {
                return Err(DataError::Cache {
                    path: path.into(),
                    message: "mapping is not aligned".into(),
                });
            }
        }
        Ok(Mapped {
            map,
            _t: std::marker::PhantomData,
        })
    }

    /// The mapped values.
    pub fn as_slice(&self) -> &[T] {
        match &self.map {
            Some(m) => bytemuck::cast_slice(&m[..]),
            None => &[],
        }
    }
}

/// A tokenised corpus on disk, memory-mapped.
pub struct TokenCache {
    dir: PathBuf,
    tokens: Mapped<u32>,
    flags: Mapped<u8>,
    units: Mapped<u64>,
    docs: Mapped<u64>,
    counts: Vec<u64>,
    meta: CacheMeta,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("dir", &self.dir)
            .field("meta", &self.meta)
            .finish()
    }
}

/// Computes the cache key of a corpus + tokenizer + segmentation (hex string). Reads every
/// corpus file once (streamed).
pub fn cache_key(corpus: &Corpus, tok: &Tok, seg: WordSegmentation) -> Result<String> {
    let mut h = blake3::Hasher::new();
    h.update(format!("distil-token-cache-v{CACHE_VERSION}\0").as_bytes());
    h.update(corpus.content_hash()?.as_bytes());
    h.update(tok.json().as_bytes());
    h.update(&[0, seg as u8]);
    Ok(h.finalize().to_hex()[..32].to_string())
}

impl TokenCache {
    /// Opens the cache of `corpus` tokenised by `tok` under `root`, building it first if it
    /// does not exist (or if the corpus or tokenizer changed, which changes the key).
    pub fn build_or_load(
        corpus: &Corpus,
        tok: &Tok,
        seg: WordSegmentation,
        root: impl AsRef<Path>,
    ) -> Result<(TokenCache, CacheReport)> {
        let root = root.as_ref();
        let key = cache_key(corpus, tok, seg)?;
        let dir = root.join(&key);
        if dir.join("meta.json").is_file() {
            let cache = TokenCache::open(&dir)?;
            let report = CacheReport {
                reused: true,
                tokenized_units: 0,
                tokenized_tokens: 0,
                dir,
            };
            return Ok((cache, report));
        }
        fs::create_dir_all(root).map_err(|e| DataError::io(root, e))?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let tmp = root.join(format!(".tmp-{key}-{}-{nanos}", std::process::id()));
        let built = build_into(&tmp, &key, corpus, tok, seg);
        let meta = match built {
            Ok(m) => m,
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        if let Err(e) = fs::rename(&tmp, &dir) {
            // Another process may have finished the same cache first: use theirs.
            let _ = fs::remove_dir_all(&tmp);
            if !dir.join("meta.json").is_file() {
                return Err(DataError::io(&dir, e));
            }
        }
        let cache = TokenCache::open(&dir)?;
        let report = CacheReport {
            reused: false,
            tokenized_units: meta.n_units + meta.empty_units,
            tokenized_tokens: meta.n_tokens,
            dir,
        };
        Ok((cache, report))
    }

    /// Opens an existing cache directory, checking its files against `meta.json`.
    pub fn open(dir: impl AsRef<Path>) -> Result<TokenCache> {
        let dir = dir.as_ref().to_path_buf();
        let mp = dir.join("meta.json");
        let text = fs::read_to_string(&mp).map_err(|e| DataError::io(&mp, e))?;
        let meta: CacheMeta = serde_json::from_str(&text).map_err(|e| DataError::Cache {
            path: mp.clone(),
            message: format!("unreadable meta.json: {e}"),
        })?;
        if meta.version != CACHE_VERSION {
            return Err(DataError::Cache {
                path: mp,
                message: format!(
                    "format version {} (this build reads {CACHE_VERSION})",
                    meta.version
                ),
            });
        }
        let tokens = Mapped::open(&dir.join("tokens.u32"), Some(meta.n_tokens))?;
        let flags = Mapped::open(&dir.join("flags.u8"), Some(meta.n_tokens))?;
        let units = Mapped::<u64>::open(&dir.join("units.u64"), Some(meta.n_units + 1))?;
        let docs = Mapped::<u64>::open(&dir.join("docs.u64"), Some(meta.n_docs + 1))?;
        let counts_map =
            Mapped::<u64>::open(&dir.join("counts.u64"), Some(meta.vocab_size as u64))?;
        let counts = counts_map.as_slice().to_vec();
        let u = units.as_slice();
        let d = docs.as_slice();
        if u.last() != Some(&meta.n_tokens)
            || d.last() != Some(&meta.n_units)
            || u.windows(2).any(|w| w[0] > w[1])
            || d.windows(2).any(|w| w[0] > w[1])
        {
            return Err(DataError::Cache {
                path: dir,
                message: "inconsistent unit or document offsets".into(),
            });
        }
        Ok(TokenCache {
            dir,
            tokens,
            flags,
            units,
            docs,
            counts,
            meta,
        })
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Sizes and provenance.
    pub fn meta(&self) -> &CacheMeta {
        &self.meta
    }

    /// The cache key.
    pub fn key(&self) -> &str {
        &self.meta.key
    }

    /// All token ids.
    pub fn tokens(&self) -> &[u32] {
        self.tokens.as_slice()
    }

    /// Per-token flags ([`FLAG_WORD_START`], [`FLAG_SUBWORD_START`]).
    pub fn flags(&self) -> &[u8] {
        self.flags.as_slice()
    }

    /// Unit offsets into [`TokenCache::tokens`] (`n_units + 1` entries).
    pub fn unit_offsets(&self) -> &[u64] {
        self.units.as_slice()
    }

    /// Document offsets into the units (`n_docs + 1` entries).
    pub fn doc_offsets(&self) -> &[u64] {
        self.docs.as_slice()
    }

    /// Number of units.
    pub fn n_units(&self) -> usize {
        self.meta.n_units as usize
    }

    /// Number of documents.
    pub fn n_docs(&self) -> usize {
        self.meta.n_docs as usize
    }

    /// Token range of unit `i`.
    pub fn unit_range(&self, i: usize) -> std::ops::Range<u64> {
        let u = self.unit_offsets();
        u[i]..u[i + 1]
    }

    /// Unit range of document `d`.
    pub fn doc_units(&self, d: usize) -> std::ops::Range<usize> {
        let o = self.doc_offsets();
        o[d] as usize..o[d + 1] as usize
    }

    /// Occurrences of each id in the corpus.
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }
}

fn jieba() -> &'static jieba_rs::Jieba {
    static J: OnceLock<jieba_rs::Jieba> = OnceLock::new();
    J.get_or_init(jieba_rs::Jieba::new)
}

struct Writers {
    tokens: BufWriter<File>,
    flags: BufWriter<File>,
    units: BufWriter<File>,
    docs: BufWriter<File>,
}

fn create(path: &Path) -> Result<BufWriter<File>> {
    Ok(BufWriter::with_capacity(
        1 << 20,
        File::create(path).map_err(|e| DataError::io(path, e))?,
    ))
}

fn build_into(
    tmp: &Path,
    key: &str,
    corpus: &Corpus,
    tok: &Tok,
    seg: WordSegmentation,
) -> Result<CacheMeta> {
    fs::create_dir_all(tmp).map_err(|e| DataError::io(tmp, e))?;
    let mut w = Writers {
        tokens: create(&tmp.join("tokens.u32"))?,
        flags: create(&tmp.join("flags.u8"))?,
        units: create(&tmp.join("units.u64"))?,
        docs: create(&tmp.join("docs.u64"))?,
    };
    let mut st = BuildState {
        counts: vec![0u64; tok.vocab_size()],
        n_tokens: 0,
        n_units: 0,
        n_docs: 0,
        empty_units: 0,
        pending_doc: true,
    };
    let put = |w: &mut BufWriter<File>, path: &str, bytes: &[u8]| {
        w.write_all(bytes)
            .map_err(|e| DataError::io(tmp.join(path), e))
    };
    put(&mut w.units, "units.u64", &0u64.to_le_bytes())?;

    let mut reader = corpus.reader();
    let mut chunk: Vec<(String, bool)> = Vec::with_capacity(CHUNK_UNITS);
    let mut chunk_bytes = 0usize;
    loop {
        let unit = reader.next_unit()?;
        let end = unit.is_none();
        if let Some(u) = unit {
            chunk_bytes += u.text.len();
            chunk.push((u.text, u.new_doc));
        }
        if (end && !chunk.is_empty()) || chunk.len() >= CHUNK_UNITS || chunk_bytes >= CHUNK_BYTES {
            process_chunk(&chunk, tok, seg, &mut w, &mut st, tmp)?;
            chunk.clear();
            chunk_bytes = 0;
        }
        if end {
            break;
        }
    }
    let read = reader.stats().clone();
    if st.n_units == 0 {
        let mut why = format!("{} lines read", read.lines);
        if read.skipped_invalid_utf8 > 0 {
            why.push_str(&format!(
                ", {} skipped as invalid UTF-8",
                read.skipped_invalid_utf8
            ));
        }
        if read.empty_records > 0 {
            why.push_str(&format!(", {} empty records", read.empty_records));
        }
        if st.empty_units > 0 {
            why.push_str(&format!(", {} lines gave no token", st.empty_units));
        }
        return Err(DataError::EmptyCorpus {
            what: format!("{}: {why}, no token", corpus.describe()),
        });
    }
    put(&mut w.docs, "docs.u64", &st.n_units.to_le_bytes())?;
    let counts_path = tmp.join("counts.u64");
    let mut cw = create(&counts_path)?;
    cw.write_all(bytemuck::cast_slice(&st.counts))
        .map_err(|e| DataError::io(&counts_path, e))?;
    for (mut bw, name) in [
        (w.tokens, "tokens.u32"),
        (w.flags, "flags.u8"),
        (w.units, "units.u64"),
        (w.docs, "docs.u64"),
        (cw, "counts.u64"),
    ] {
        let p = tmp.join(name);
        bw.flush().map_err(|e| DataError::io(&p, e))?;
        let f = bw
            .into_inner()
            .map_err(|e| DataError::io(&p, e.into_error()))?;
        f.sync_all().map_err(|e| DataError::io(&p, e))?;
    }
    let meta = CacheMeta {
        version: CACHE_VERSION,
        key: key.to_string(),
        tokenizer: tok.source().to_string(),
        vocab_size: tok.vocab_size(),
        corpus: corpus.describe(),
        segmentation: seg,
        n_tokens: st.n_tokens,
        n_units: st.n_units,
        n_docs: st.n_docs,
        read,
        empty_units: st.empty_units,
    };
    let json = serde_json::to_string_pretty(&meta).map_err(|e| DataError::Cache {
        path: tmp.into(),
        message: e.to_string(),
    })?;
    write_atomic(&tmp.join("meta.json"), json.as_bytes())?;
    Ok(meta)
}

struct BuildState {
    counts: Vec<u64>,
    n_tokens: u64,
    n_units: u64,
    n_docs: u64,
    empty_units: u64,
    pending_doc: bool,
}

fn process_chunk(
    chunk: &[(String, bool)],
    tok: &Tok,
    seg: WordSegmentation,
    w: &mut Writers,
    st: &mut BuildState,
    tmp: &Path,
) -> Result<()> {
    let texts: Vec<&str> = chunk.iter().map(|(t, _)| t.as_str()).collect();
    // (ids, flags) per unit
    let encoded: Vec<(Vec<u32>, Vec<u8>)> = match seg {
        WordSegmentation::Tokenizer => tok
            .encode_batch(&texts)?
            .into_iter()
            .map(|ids| {
                let flags = ids
                    .iter()
                    .enumerate()
                    .map(|(i, &id)| {
                        if i == 0 || tok.is_word_start(id) {
                            FLAG_WORD_START | FLAG_SUBWORD_START
                        } else {
                            0
                        }
                    })
                    .collect();
                (ids, flags)
            })
            .collect(),
        WordSegmentation::Jieba => {
            let encs = tok.encode_batch_with_offsets(&texts)?;
            let j = jieba();
            texts
                .par_iter()
                .zip(encs.par_iter())
                .map(|(text, enc)| {
                    // byte offsets at which a Jieba word starts
                    let starts: Vec<usize> =
                        j.cut(text, true).iter().map(|w| w.byte_start).collect();
                    let ids = enc.get_ids().to_vec();
                    let flags = ids
                        .iter()
                        .zip(enc.get_offsets())
                        .enumerate()
                        .map(|(i, (&id, &(s, _)))| {
                            let sub = i == 0 || tok.is_word_start(id);
                            let word = sub && starts.binary_search(&s).is_ok();
                            u8::from(i == 0 || word) * FLAG_WORD_START
                                + u8::from(sub) * FLAG_SUBWORD_START
                        })
                        .collect();
                    (ids, flags)
                })
                .collect()
        }
    };
    for ((ids, flags), (_, new_doc)) in encoded.iter().zip(chunk) {
        st.pending_doc |= *new_doc;
        if ids.is_empty() {
            st.empty_units += 1;
            continue;
        }
        if st.pending_doc {
            w.docs
                .write_all(&st.n_units.to_le_bytes())
                .map_err(|e| DataError::io(tmp.join("docs.u64"), e))?;
            st.n_docs += 1;
            st.pending_doc = false;
        }
        for &id in ids {
            if let Some(c) = st.counts.get_mut(id as usize) {
                *c += 1;
            }
        }
        w.tokens
            .write_all(bytemuck::cast_slice(ids))
            .map_err(|e| DataError::io(tmp.join("tokens.u32"), e))?;
        w.flags
            .write_all(flags)
            .map_err(|e| DataError::io(tmp.join("flags.u8"), e))?;
        st.n_tokens += ids.len() as u64;
        st.n_units += 1;
        w.units
            .write_all(&st.n_tokens.to_le_bytes())
            .map_err(|e| DataError::io(tmp.join("units.u64"), e))?;
    }
    Ok(())
}
