//! The error type of the data pipeline.
//!
//! Every variant that comes from user input names the file (and the line, or the key) it is
//! about, so a message can be acted on without a debugger. Nothing in `distil::data` panics on
//! bad input: it returns one of these.

use std::path::{Path, PathBuf};

/// Errors raised while loading tokenizers, reading corpora, building caches or batching.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// An I/O operation on a named path failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A path given as part of a corpus does not exist.
    #[error("corpus path {path} does not exist")]
    MissingPath {
        /// The path as the user gave it.
        path: PathBuf,
    },
    /// A glob pattern matched no file.
    #[error("corpus pattern `{pattern}` matched no file")]
    NoMatch {
        /// The pattern as the user gave it.
        pattern: String,
    },
    /// A glob pattern is malformed.
    #[error("corpus pattern `{pattern}` is not a valid glob: {message}")]
    BadPattern {
        /// The pattern as the user gave it.
        pattern: String,
        /// What is wrong with it.
        message: String,
    },
    /// The corpus contains no text at all.
    #[error("the corpus is empty: {what}")]
    EmptyCorpus {
        /// Which paths were read and what was found there.
        what: String,
    },
    /// A line is not valid UTF-8 (and the policy is to fail).
    #[error("{path}:{line}: invalid UTF-8 at byte {byte} of the line (set `on_invalid_utf8: skip` to skip such lines)")]
    InvalidUtf8 {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// 0-based byte offset of the first invalid byte within the line.
        byte: usize,
    },
    /// A `.jsonl` line is not valid JSON, or not a JSON object.
    #[error("{path}:{line}: invalid JSON: {message}")]
    InvalidJson {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// What the parser said.
        message: String,
    },
    /// A `.jsonl` record lacks the configured text field, or it is not a string.
    #[error("{path}:{line}: {message}")]
    BadField {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// What is wrong (names the field and the keys that are there).
        message: String,
    },
    /// A tokenizer could not be loaded, trained, saved or run.
    #[error("tokenizer {source_name}: {message}")]
    Tokenizer {
        /// The tokenizer file or directory (or a description of it).
        source_name: String,
        /// What went wrong.
        message: String,
    },
    /// The tokenizer's vocabulary does not match the model's embedding table.
    #[error("tokenizer {source_name} has {tokenizer} entries but the model's vocab_size is {model}: use the tokenizer the model was trained with, or set vocab_size to {tokenizer}")]
    VocabMismatch {
        /// The tokenizer's origin.
        source_name: String,
        /// Vocabulary size of the tokenizer.
        tokenizer: usize,
        /// Vocabulary size the model expects.
        model: usize,
    },
    /// A configuration value is invalid.
    #[error("data config `{key}`: {message}")]
    Config {
        /// The key (dotted path) of the offending value.
        key: String,
        /// What is wrong and what was expected.
        message: String,
    },
    /// A cache directory is corrupt or was written by an incompatible version.
    #[error("cache {path}: {message} (delete the directory to rebuild it)")]
    Cache {
        /// The cache directory or file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl DataError {
    /// An [`DataError::Io`] for `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// A [`DataError::Config`] for `key`.
    pub fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        DataError::Config {
            key: key.into(),
            message: message.into(),
        }
    }

    /// A [`DataError::Tokenizer`] about `source_name`.
    pub fn tokenizer(source_name: impl Into<String>, message: impl ToString) -> Self {
        DataError::Tokenizer {
            source_name: source_name.into(),
            message: message.to_string(),
        }
    }
}

/// Result alias of the data pipeline.
pub type Result<T, E = DataError> = std::result::Result<T, E>;
