//! Tokenizers: loading (`tokenizer.json`, BERT `vocab.txt`, RoBERTa `vocab.json` +
//! `merges.txt`), training (WordPiece with BERT's id layout, byte-level BPE with RoBERTa's),
//! saving, and the [`Tok`] wrapper the rest of the pipeline uses.
//!
//! Everything is built on the Hugging Face `tokenizers` crate, so a tokenizer saved here loads
//! unchanged in Python's `transformers`.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::models::ModelWrapper;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Encoding, Model, Tokenizer, Trainer};

use super::corpus::Corpus;
use super::error::{DataError, Result};
use super::subword_trainer::SubwordTrainer;

/// Number of `[unusedN]` tokens between `[PAD]` and `[UNK]` in a freshly trained WordPiece
/// vocabulary, so that `[UNK]`=100, `[CLS]`=101, `[SEP]`=102, `[MASK]`=103 as in bert-base.
pub const BERT_UNUSED_BEFORE_UNK: usize = 99;

/// How word boundaries are read off token strings (for whole-word masking).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WordBoundary {
    /// WordPiece-style: a token starting with this prefix (`##`) continues the previous word.
    ContinuationPrefix(String),
    /// Byte-level BPE / SentencePiece style: a token starting with this marker (`Ġ`, `▁`) starts
    /// a word; others continue the previous one (except at the start of a text).
    SpacePrefix(char),
    /// Every token is a word of its own (word-level vocabularies).
    EveryToken,
}

/// The special token ids of a tokenizer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SpecialIds {
    /// Padding (`[PAD]` / `<pad>`).
    pub pad: u32,
    /// Unknown (`[UNK]` / `<unk>`), if the vocabulary has one.
    pub unk: Option<u32>,
    /// Sequence start (`[CLS]` / `<s>`).
    pub cls: u32,
    /// Separator (`[SEP]` / `</s>`).
    pub sep: u32,
    /// Mask (`[MASK]` / `<mask>`).
    pub mask: u32,
    /// Beginning of sequence, where the vocabulary has a distinct one (`<s>`).
    pub bos: Option<u32>,
    /// End of sequence, where the vocabulary has a distinct one (`</s>`).
    pub eos: Option<u32>,
}

/// Options of a BERT `vocab.txt` tokenizer (those of `BertTokenizerFast`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BertVocabOptions {
    /// Lower-case the text (uncased models).
    #[serde(default = "yes")]
    pub lowercase: bool,
    /// Strip accents; `None` follows `lowercase`, as BERT does.
    #[serde(default)]
    pub strip_accents: Option<bool>,
    /// Put spaces around CJK characters so each becomes its own token.
    #[serde(default = "yes")]
    pub handle_chinese_chars: bool,
}

fn yes() -> bool {
    true
}

impl Default for BertVocabOptions {
    fn default() -> Self {
        BertVocabOptions {
            lowercase: true,
            strip_accents: None,
            handle_chinese_chars: true,
        }
    }
}

/// Options for training a WordPiece tokenizer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WordPieceTrainOptions {
    /// Target vocabulary size, special and `[unused]` tokens included.
    pub vocab_size: usize,
    /// Minimum pair frequency for a merge.
    #[serde(default = "two")]
    pub min_frequency: u64,
    /// Maximum number of distinct initial characters kept.
    #[serde(default = "thousand")]
    pub limit_alphabet: Option<usize>,
    /// Normaliser options of the tokenizer being trained.
    #[serde(default)]
    pub normalizer: BertVocabOptions,
    /// Extra special tokens, appended after `[MASK]` (ids 104, 105, …).
    #[serde(default)]
    pub extra_special_tokens: Vec<String>,
}

/// Options for training a byte-level BPE tokenizer (RoBERTa layout: `<s>`=0, `<pad>`=1,
/// `</s>`=2, `<unk>`=3, `<mask>`=4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BpeTrainOptions {
    /// Target vocabulary size, special tokens and the 256 byte symbols included.
    pub vocab_size: usize,
    /// Minimum pair frequency for a merge.
    #[serde(default = "two")]
    pub min_frequency: u64,
    /// Add a space before the first word (RoBERTa: false).
    #[serde(default)]
    pub add_prefix_space: bool,
    /// Extra special tokens, appended after `<mask>`.
    #[serde(default)]
    pub extra_special_tokens: Vec<String>,
}

fn two() -> u64 {
    2
}

fn thousand() -> Option<usize> {
    Some(1000)
}

/// A loaded tokenizer plus the tables the data pipeline needs (special ids, word starts).
#[derive(Clone)]
pub struct Tok {
    inner: Arc<Tokenizer>,
    source: String,
    special: SpecialIds,
    vocab_size: usize,
    special_table: Vec<bool>,
    word_start_table: Vec<bool>,
    boundary: WordBoundary,
    json: String,
}

impl std::fmt::Debug for Tok {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tok")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size)
            .field("special", &self.special)
            .field("boundary", &self.boundary)
            .finish()
    }
}

impl Tok {
    /// Loads a tokenizer from a file or a directory.
    ///
    /// A directory is searched for `tokenizer.json`, then `vocab.txt` (BERT, with `bert`
    /// options), then `vocab.json` + `merges.txt` (byte-level BPE). A file is read according to
    /// its name (`*.json` as `tokenizer.json`, `*.txt` as a BERT vocabulary).
    pub fn load(path: impl AsRef<Path>, bert: &BertVocabOptions) -> Result<Tok> {
        let path = path.as_ref();
        if path.is_dir() {
            let tj = path.join("tokenizer.json");
            let vt = path.join("vocab.txt");
            let vj = path.join("vocab.json");
            let mt = path.join("merges.txt");
            if tj.is_file() {
                Tok::from_tokenizer_json(&tj)
            } else if vt.is_file() {
                Tok::from_bert_vocab(&vt, bert)
            } else if vj.is_file() && mt.is_file() {
                Tok::from_bpe_files(&vj, &mt, false)
            } else {
                Err(DataError::tokenizer(
                    path.display().to_string(),
                    "the directory has no tokenizer.json, vocab.txt, or vocab.json + merges.txt",
                ))
            }
        } else if !path.exists() {
            Err(DataError::tokenizer(
                path.display().to_string(),
                "no such file or directory",
            ))
        } else if path.extension().is_some_and(|e| e == "txt") {
            Tok::from_bert_vocab(path, bert)
        } else {
            Tok::from_tokenizer_json(path)
        }
    }

    /// Loads a `tokenizer.json`. Padding and truncation configured in the file are turned off:
    /// the pipeline cuts and pads sequences itself.
    pub fn from_tokenizer_json(path: impl AsRef<Path>) -> Result<Tok> {
        let path = path.as_ref();
        let name = path.display().to_string();
        if !path.is_file() {
            return Err(DataError::tokenizer(name, "no such file"));
        }
        let mut tk = Tokenizer::from_file(path).map_err(|e| DataError::tokenizer(&name, e))?;
        tk.with_padding(None);
        tk.with_truncation(None)
            .map_err(|e| DataError::tokenizer(&name, e))?;
        Tok::from_tokenizer(tk, name)
    }

    /// Builds a BERT tokenizer from a `vocab.txt` (one token a line, id = line number - 1):
    /// BertNormalizer, BertPreTokenizer, WordPiece (`##`), and the `[CLS] A [SEP] B [SEP]`
    /// post-processor with type ids.
    pub fn from_bert_vocab(path: impl AsRef<Path>, opts: &BertVocabOptions) -> Result<Tok> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let text = fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
        let mut vocab: HashMap<String, u32> = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let tok = line.trim_end_matches('\r');
            if tok.is_empty() {
                return Err(DataError::tokenizer(
                    format!("{name}:{}", i + 1),
                    "empty vocabulary entry",
                ));
            }
            if vocab.insert(tok.to_string(), i as u32).is_some() {
                return Err(DataError::tokenizer(
                    format!("{name}:{}", i + 1),
                    format!("duplicate vocabulary entry `{tok}`"),
                ));
            }
        }
        for t in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] {
            if !vocab.contains_key(t) {
                return Err(DataError::tokenizer(
                    &name,
                    format!("the vocabulary has no `{t}` entry (a BERT vocab.txt needs [PAD] [UNK] [CLS] [SEP] [MASK])"),
                ));
            }
        }
        drop(vocab);
        let wp = WordPiece::from_file(&path.to_string_lossy())
            .unk_token("[UNK]".into())
            .continuing_subword_prefix("##".into())
            .build()
            .map_err(|e| DataError::tokenizer(&name, e))?;
        let tk = bert_pipeline(wp, opts, &name)?;
        Tok::from_tokenizer(tk, name)
    }

    /// Builds a byte-level BPE tokenizer from RoBERTa/GPT-2 `vocab.json` + `merges.txt`, with
    /// RoBERTa's `<s> A </s></s> B </s>` post-processor.
    pub fn from_bpe_files(
        vocab_json: impl AsRef<Path>,
        merges_txt: impl AsRef<Path>,
        add_prefix_space: bool,
    ) -> Result<Tok> {
        let (vj, mt) = (vocab_json.as_ref(), merges_txt.as_ref());
        let name = vj.display().to_string();
        for p in [vj, mt] {
            if !p.is_file() {
                return Err(DataError::tokenizer(
                    p.display().to_string(),
                    "no such file",
                ));
            }
        }
        let bpe = BPE::from_file(&vj.to_string_lossy(), &mt.to_string_lossy())
            .build()
            .map_err(|e| DataError::tokenizer(&name, e))?;
        let tk = roberta_pipeline(bpe, add_prefix_space, &name)?;
        Tok::from_tokenizer(tk, name)
    }

    /// Trains a WordPiece tokenizer on `corpus`, laying the vocabulary out like bert-base:
    /// `[PAD]`=0, `[unused0]`..`[unused98]`, `[UNK]`=100, `[CLS]`=101, `[SEP]`=102,
    /// `[MASK]`=103, then any extra special tokens, then the learned pieces.
    pub fn train_wordpiece(corpus: &Corpus, opts: &WordPieceTrainOptions) -> Result<Tok> {
        let mut specials = vec!["[PAD]".to_string()];
        specials.extend((0..BERT_UNUSED_BEFORE_UNK).map(|i| format!("[unused{i}]")));
        specials.extend(["[UNK]", "[CLS]", "[SEP]", "[MASK]"].map(String::from));
        specials.extend(opts.extra_special_tokens.iter().cloned());
        if opts.vocab_size < specials.len() + 100 {
            return Err(DataError::config(
                "tokenizer.vocab_size",
                format!(
                    "{} is too small: the WordPiece layout alone takes {} ids (set at least a few thousand)",
                    opts.vocab_size,
                    specials.len()
                ),
            ));
        }
        let name = "(trained WordPiece)".to_string();
        let wp = WordPiece::builder()
            .unk_token("[UNK]".into())
            .continuing_subword_prefix("##".into())
            .build()
            .map_err(|e| DataError::tokenizer(&name, e))?;
        let mut tk = bert_pipeline(wp, &opts.normalizer, &name)?;
        // Our own trainer: tokenizers' breaks ties in a random order (see subword_trainer).
        let mut trainer = SubwordTrainer::wordpiece(
            opts.vocab_size,
            opts.min_frequency,
            opts.limit_alphabet,
            specials.clone(),
            "[UNK]",
        );
        train_on_corpus(&mut tk, &mut trainer, corpus, &name)?;
        let tk = canonical_wordpiece_ids(tk, &specials, &name)?;
        // The post-processor needs the final ids.
        let tk = bert_pipeline_on(tk, &name)?;
        let tok = Tok::from_tokenizer(tk, name.clone())?;
        for (t, want) in [
            ("[PAD]", 0),
            ("[UNK]", 100),
            ("[CLS]", 101),
            ("[SEP]", 102),
            ("[MASK]", 103),
        ] {
            if tok.inner.token_to_id(t) != Some(want) {
                return Err(DataError::tokenizer(
                    name,
                    format!("training did not keep `{t}` at id {want}"),
                ));
            }
        }
        Ok(tok)
    }

    /// Trains a byte-level BPE tokenizer on `corpus` with RoBERTa's special tokens and ids.
    pub fn train_byte_level_bpe(corpus: &Corpus, opts: &BpeTrainOptions) -> Result<Tok> {
        let mut specials: Vec<String> = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
            .map(String::from)
            .to_vec();
        specials.extend(opts.extra_special_tokens.iter().cloned());
        if opts.vocab_size < specials.len() + 256 + 16 {
            return Err(DataError::config(
                "tokenizer.vocab_size",
                format!(
                    "{} is too small for byte-level BPE: {} special tokens + 256 byte symbols",
                    opts.vocab_size,
                    specials.len()
                ),
            ));
        }
        let name = "(trained byte-level BPE)".to_string();
        let mut tk = roberta_pipeline(BPE::default(), opts.add_prefix_space, &name)?;
        let mut trainer = SubwordTrainer::byte_level_bpe(
            opts.vocab_size,
            opts.min_frequency,
            ByteLevel::alphabet().into_iter().collect(),
            specials.clone(),
        );
        train_on_corpus(&mut tk, &mut trainer, corpus, &name)?;
        let tk = roberta_pipeline_on(tk, &name)?;
        Tok::from_tokenizer(tk, name)
    }

    /// Wraps an already built `tokenizers::Tokenizer`. `source` names it in error messages.
    pub fn from_tokenizer(mut tk: Tokenizer, source: String) -> Result<Tok> {
        tk.with_padding(None);
        tk.with_truncation(None)
            .map_err(|e| DataError::tokenizer(&source, e))?;
        let vocab = tk.get_vocab(true);
        let size = vocab.values().map(|&i| i as usize + 1).max().unwrap_or(0);
        if size == 0 {
            return Err(DataError::tokenizer(&source, "the vocabulary is empty"));
        }
        let mut by_id: Vec<Option<&str>> = vec![None; size];
        for (t, &i) in &vocab {
            by_id[i as usize] = Some(t.as_str());
        }
        let find = |names: &[&str]| names.iter().find_map(|n| vocab.get(*n).copied());
        let need = |names: &[&str], what: &str| {
            find(names).ok_or_else(|| {
                DataError::tokenizer(
                    &source,
                    format!("no {what} token (looked for {})", names.join(", ")),
                )
            })
        };
        let pad = need(&["[PAD]", "<pad>"], "padding")?;
        let cls = need(&["[CLS]", "<s>"], "classification/start")?;
        let sep = need(&["[SEP]", "</s>"], "separator")?;
        let mask = need(&["[MASK]", "<mask>"], "mask")?;
        let unk = find(&["[UNK]", "<unk>"]);
        let bos = find(&["<s>"]);
        let eos = find(&["</s>"]);
        let special = SpecialIds {
            pad,
            unk,
            cls,
            sep,
            mask,
            bos,
            eos,
        };

        let mut special_table = vec![false; size];
        for (id, t) in tk.get_added_tokens_decoder() {
            if t.special && (id as usize) < size {
                special_table[id as usize] = true;
            }
        }
        for id in [Some(pad), unk, Some(cls), Some(sep), Some(mask), bos, eos]
            .into_iter()
            .flatten()
        {
            special_table[id as usize] = true;
        }
        for (i, t) in by_id.iter().enumerate() {
            match t {
                None => special_table[i] = true, // holes in the id space never occur in text
                Some(t) if is_unused_token(t) => special_table[i] = true,
                _ => {}
            }
        }

        let boundary = match tk.get_model() {
            ModelWrapper::WordPiece(wp) => {
                WordBoundary::ContinuationPrefix(wp.continuing_subword_prefix.clone())
            }
            ModelWrapper::WordLevel(_) => WordBoundary::EveryToken,
            ModelWrapper::Unigram(_) => WordBoundary::SpacePrefix('▁'),
            ModelWrapper::BPE(bpe) => {
                let g = by_id
                    .iter()
                    .flatten()
                    .filter(|t| t.starts_with('Ġ'))
                    .count();
                let s = by_id
                    .iter()
                    .flatten()
                    .filter(|t| t.starts_with('▁'))
                    .count();
                if g > 0 && g >= s {
                    WordBoundary::SpacePrefix('Ġ')
                } else if s > 0 {
                    WordBoundary::SpacePrefix('▁')
                } else if let Some(p) = &bpe.continuing_subword_prefix {
                    WordBoundary::ContinuationPrefix(p.clone())
                } else {
                    WordBoundary::EveryToken
                }
            }
        };
        let word_start_table = by_id
            .iter()
            .map(|t| match (t, &boundary) {
                (None, _) => true,
                (Some(t), WordBoundary::ContinuationPrefix(p)) => !t.starts_with(p.as_str()),
                (Some(t), WordBoundary::SpacePrefix(c)) => t.starts_with(*c),
                (Some(_), WordBoundary::EveryToken) => true,
            })
            .collect();
        let json = tk
            .to_string(false)
            .map_err(|e| DataError::tokenizer(&source, e))?;
        Ok(Tok {
            inner: Arc::new(tk),
            source,
            special,
            vocab_size: size,
            special_table,
            word_start_table,
            boundary,
            json,
        })
    }

    /// Saves the tokenizer into `dir` (created if needed): always `tokenizer.json`; for a
    /// WordPiece model also `vocab.txt`; for a BPE model also `vocab.json` + `merges.txt`.
    /// Each file is written to a temporary name and renamed, so readers never see half a file.
    /// Returns the paths written.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<Vec<PathBuf>> {
        let dir = dir.as_ref();
        fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        let mut written = Vec::new();
        let pretty = self
            .inner
            .to_string(true)
            .map_err(|e| DataError::tokenizer(&self.source, e))?;
        let p = dir.join("tokenizer.json");
        write_atomic(&p, pretty.as_bytes())?;
        written.push(p);
        match self.inner.get_model() {
            ModelWrapper::WordPiece(_) => {
                let mut lines = String::new();
                for id in 0..self.vocab_size as u32 {
                    let t = self.inner.id_to_token(id).ok_or_else(|| {
                        DataError::tokenizer(
                            &self.source,
                            format!("id {id} has no token: vocab.txt cannot have holes"),
                        )
                    })?;
                    lines.push_str(&t);
                    lines.push('\n');
                }
                let p = dir.join("vocab.txt");
                write_atomic(&p, lines.as_bytes())?;
                written.push(p);
            }
            ModelWrapper::BPE(bpe) => {
                let files = bpe
                    .save(dir, None)
                    .map_err(|e| DataError::tokenizer(&self.source, e))?;
                written.extend(files);
            }
            _ => {}
        }
        // So that `AutoTokenizer.from_pretrained(dir)` picks the right class and specials.
        let tok_name = |id: Option<u32>| id.and_then(|i| self.inner.id_to_token(i));
        let sp = &self.special;
        let mut specials = serde_json::Map::new();
        for (k, id) in [
            ("pad_token", Some(sp.pad)),
            ("unk_token", sp.unk),
            ("cls_token", Some(sp.cls)),
            ("sep_token", Some(sp.sep)),
            ("mask_token", Some(sp.mask)),
            ("bos_token", sp.bos),
            ("eos_token", sp.eos),
        ] {
            if let Some(t) = tok_name(id) {
                specials.insert(k.into(), serde_json::Value::String(t));
            }
        }
        let class = match self.boundary {
            WordBoundary::ContinuationPrefix(_) => "BertTokenizer",
            WordBoundary::SpacePrefix('Ġ') => "RobertaTokenizer",
            _ => "PreTrainedTokenizerFast",
        };
        let mut config = specials.clone();
        config.insert("tokenizer_class".into(), class.into());
        if let Some(n) = self.lowercase() {
            config.insert("do_lower_case".into(), n.into());
        }
        for (name, value) in [
            ("special_tokens_map.json", specials),
            ("tokenizer_config.json", config),
        ] {
            let p = dir.join(name);
            let text = serde_json::to_string_pretty(&serde_json::Value::Object(value))
                .map_err(|e| DataError::tokenizer(&self.source, e))?;
            write_atomic(&p, text.as_bytes())?;
            written.push(p);
        }
        Ok(written)
    }

    /// Whether the normaliser lower-cases (BERT normaliser or a `Lowercase` step), when known.
    fn lowercase(&self) -> Option<bool> {
        let v: serde_json::Value = serde_json::from_str(&self.json).ok()?;
        let n = v.get("normalizer")?;
        if n.is_null() {
            return Some(false);
        }
        match n.get("type")?.as_str()? {
            "BertNormalizer" => n.get("lowercase")?.as_bool(),
            "Lowercase" => Some(true),
            _ => None,
        }
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Where the tokenizer came from (a path or a description), for messages.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Number of ids (largest id + 1), added tokens included: the embedding table size needed.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The special token ids.
    pub fn special_ids(&self) -> &SpecialIds {
        &self.special
    }

    /// How word boundaries are recognised.
    pub fn word_boundary(&self) -> &WordBoundary {
        &self.boundary
    }

    /// True for special tokens (never masked, never used as random replacements), `[unusedN]`
    /// entries, and ids outside the vocabulary.
    pub fn is_special(&self, id: u32) -> bool {
        self.special_table.get(id as usize).copied().unwrap_or(true)
    }

    /// The special-token table indexed by id (see [`Tok::is_special`]).
    pub fn special_table(&self) -> &[bool] {
        &self.special_table
    }

    /// Whether token `id` can start a word by itself (not a `##` continuation; has the `Ġ`
    /// marker for byte-level BPE). The first token of a text is a word start regardless.
    pub fn is_word_start(&self, id: u32) -> bool {
        self.word_start_table
            .get(id as usize)
            .copied()
            .unwrap_or(true)
    }

    /// The tokenizer serialised as compact JSON (used to key caches).
    pub fn json(&self) -> &str {
        &self.json
    }

    /// Id of a token string, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Token string of an id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Encodes texts in parallel, without special tokens.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        let encs = self
            .inner
            .encode_batch_fast(texts.to_vec(), false)
            .map_err(|e| DataError::tokenizer(&self.source, e))?;
        Ok(encs.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// Encodes texts in parallel, without special tokens, keeping byte offsets into each text.
    pub fn encode_batch_with_offsets(&self, texts: &[&str]) -> Result<Vec<Encoding>> {
        self.inner
            .encode_batch(texts.to_vec(), false)
            .map_err(|e| DataError::tokenizer(&self.source, e))
    }

    /// Encodes one text (or a pair) with the post-processor's special tokens, as a model sees
    /// it at inference: returns (ids, type ids).
    pub fn encode_with_specials(&self, a: &str, b: Option<&str>) -> Result<(Vec<u32>, Vec<u32>)> {
        let enc = match b {
            Some(b) => self.inner.encode((a, b), true),
            None => self.inner.encode(a, true),
        }
        .map_err(|e| DataError::tokenizer(&self.source, e))?;
        Ok((enc.get_ids().to_vec(), enc.get_type_ids().to_vec()))
    }

    /// Per-token word-start flags of one text's ids (1 = starts a word): the first token is
    /// always a start, then [`Tok::is_word_start`] decides.
    pub fn word_starts(&self, ids: &[u32], out: &mut Vec<u8>) {
        out.clear();
        out.extend(
            ids.iter()
                .enumerate()
                .map(|(i, &id)| u8::from(i == 0 || self.is_word_start(id))),
        );
    }

    /// Checks that a model with `model_vocab_size` embeddings can use this tokenizer: the
    /// sizes must be equal, except that the model may be larger by less than 128 entries (a
    /// vocabulary padded up to a multiple of 8/64/128).
    pub fn check_model_vocab(&self, model_vocab_size: usize) -> Result<()> {
        let t = self.vocab_size;
        if model_vocab_size < t || model_vocab_size - t >= 128 {
            return Err(DataError::VocabMismatch {
                source_name: self.source.clone(),
                tokenizer: t,
                model: model_vocab_size,
            });
        }
        Ok(())
    }
}

fn is_unused_token(t: &str) -> bool {
    t.strip_prefix("[unused")
        .and_then(|r| r.strip_suffix(']'))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn bert_pipeline(wp: WordPiece, opts: &BertVocabOptions, name: &str) -> Result<Tokenizer> {
    let mut tk = Tokenizer::new(wp);
    tk.with_normalizer(Some(BertNormalizer::new(
        true,
        opts.handle_chinese_chars,
        opts.strip_accents,
        opts.lowercase,
    )))
    .map_err(|e| DataError::tokenizer(name, e))?;
    tk.with_pre_tokenizer(Some(BertPreTokenizer));
    tk.with_decoder(Some(WordPieceDecoder::default()));
    let specials: Vec<AddedToken> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .into_iter()
        .filter(|t| tk.token_to_id(t).is_some())
        .map(|t| AddedToken::from(t, true))
        .collect();
    tk.add_special_tokens(specials.iter().cloned())
        .map_err(|e| DataError::tokenizer(name, e))?;
    bert_pipeline_on(tk, name)
}

/// Renumbers a trained WordPiece vocabulary: the special tokens keep their ids, every other
/// piece gets the next id in byte order of its text. The trainer breaks ties between pieces
/// in hash-map order, which changes from process to process, so the same corpus and recipe
/// gave some pieces different ids on every run (and a seeded run different numbers). A
/// WordPiece model only looks pieces up by text, so the renumbering changes no tokenisation.
fn canonical_wordpiece_ids(tk: Tokenizer, specials: &[String], name: &str) -> Result<Tokenizer> {
    let vocab = tk.get_model().get_vocab();
    let mut rest: Vec<&String> = vocab.keys().filter(|k| !specials.contains(k)).collect();
    rest.sort();
    let canonical: ahash::AHashMap<String, u32> = specials
        .iter()
        .chain(rest)
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let wp = WordPiece::builder()
        .vocab(canonical)
        .unk_token("[UNK]".into())
        .continuing_subword_prefix("##".into())
        .build()
        .map_err(|e| DataError::tokenizer(name, e))?;
    let mut tk = tk;
    tk.with_model(wp);
    Ok(tk)
}

fn bert_pipeline_on(mut tk: Tokenizer, name: &str) -> Result<Tokenizer> {
    let (Some(cls), Some(sep)) = (tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")) else {
        // Before training the vocabulary is empty: the post-processor is added afterwards.
        return Ok(tk);
    };
    let pp = TemplateProcessing::builder()
        .try_single("[CLS] $A [SEP]")
        .and_then(|b| b.try_pair("[CLS] $A [SEP] $B:1 [SEP]:1"))
        .map_err(|e| DataError::tokenizer(name, e))?
        .special_tokens(vec![("[CLS]", cls), ("[SEP]", sep)])
        .build()
        .map_err(|e| DataError::tokenizer(name, e))?;
    tk.with_post_processor(Some(pp));
    Ok(tk)
}

fn roberta_pipeline(bpe: BPE, add_prefix_space: bool, name: &str) -> Result<Tokenizer> {
    let mut tk = Tokenizer::new(bpe);
    tk.with_pre_tokenizer(Some(
        ByteLevel::default().add_prefix_space(add_prefix_space),
    ));
    tk.with_decoder(Some(ByteLevelDecoder::default()));
    let specials: Vec<AddedToken> = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        .into_iter()
        .filter(|t| tk.token_to_id(t).is_some())
        .map(|t| AddedToken::from(t, true))
        .collect();
    tk.add_special_tokens(specials.iter().cloned())
        .map_err(|e| DataError::tokenizer(name, e))?;
    roberta_pipeline_on(tk, name)
}

fn roberta_pipeline_on(mut tk: Tokenizer, _name: &str) -> Result<Tokenizer> {
    let (Some(cls), Some(sep)) = (tk.token_to_id("<s>"), tk.token_to_id("</s>")) else {
        return Ok(tk);
    };
    tk.with_post_processor(Some(
        RobertaProcessing::new(("</s>".into(), sep), ("<s>".into(), cls))
            .trim_offsets(true)
            .add_prefix_space(false),
    ));
    Ok(tk)
}

/// Feeds the corpus (streamed, never held whole) to a `tokenizers` trainer. A read error
/// stops the feed and is returned.
fn train_on_corpus<T: Trainer<Model = ModelWrapper> + Sync>(
    tk: &mut Tokenizer,
    trainer: &mut T,
    corpus: &Corpus,
    name: &str,
) -> Result<()> {
    let failure: Arc<Mutex<Option<DataError>>> = Arc::new(Mutex::new(None));
    let slot = failure.clone();
    let mut reader = corpus.reader();
    let mut units = 0u64;
    let iter = std::iter::from_fn(|| match reader.next_unit() {
        Ok(Some(u)) => {
            units += 1;
            Some(u.text)
        }
        Ok(None) => None,
        Err(e) => {
            if let Ok(mut s) = slot.lock() {
                *s = Some(e);
            }
            None
        }
    });
    let res = tk.train(trainer, iter);
    if let Some(e) = failure.lock().ok().and_then(|mut s| s.take()) {
        return Err(e);
    }
    res.map_err(|e| DataError::tokenizer(name, e))?;
    if units == 0 {
        return Err(DataError::EmptyCorpus {
            what: format!("{} (no non-blank text to train on)", corpus.describe()),
        });
    }
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_sibling(path);
    fs::write(&tmp, bytes).map_err(|e| DataError::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| DataError::io(path, e))
}

/// A unique temporary name next to `path`.
pub(crate) fn tmp_sibling(path: &Path) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}-{nanos}", std::process::id()))
}
