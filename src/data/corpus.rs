//! Corpora on disk: plain text files, directories, glob patterns and `.jsonl` files with a named
//! text field, read as a stream of text units (never held whole in memory).
//!
//! A *unit* is one non-blank line of a text file, or one non-blank line of a `.jsonl` record's
//! text field. A *document* is a run of units: in text files, documents are separated by blank
//! lines (and by file ends); in `.jsonl` files each record is one document.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{DataError, Result};

/// What to do with a line that is not valid UTF-8.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Utf8Policy {
    /// Stop with an error naming the file and line (the default).
    #[default]
    Error,
    /// Skip the line and count it ([`ReadStats::skipped_invalid_utf8`]).
    Skip,
}

/// Where the text comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorpusConfig {
    /// Files, directories (read recursively, hidden files skipped) and glob patterns.
    pub paths: Vec<String>,
    /// Field holding the text in `.jsonl` / `.ndjson` files.
    #[serde(default = "default_text_field")]
    pub text_field: String,
    /// What to do with lines that are not UTF-8.
    #[serde(default)]
    pub on_invalid_utf8: Utf8Policy,
}

fn default_text_field() -> String {
    "text".into()
}

impl CorpusConfig {
    /// A config reading `paths` with the defaults (`text` field, fail on invalid UTF-8).
    pub fn new<S: Into<String>>(paths: impl IntoIterator<Item = S>) -> Self {
        CorpusConfig {
            paths: paths.into_iter().map(Into::into).collect(),
            text_field: default_text_field(),
            on_invalid_utf8: Utf8Policy::Error,
        }
    }
}

/// How a file is parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum FileFormat {
    /// One unit per non-blank line; blank lines separate documents.
    Text,
    /// One JSON object per line; the text field is one document.
    Jsonl,
}

/// A resolved corpus: the files to read, in a fixed (sorted) order.
#[derive(Debug, Clone)]
pub struct Corpus {
    files: Vec<(PathBuf, FileFormat)>,
    config: CorpusConfig,
}

impl Corpus {
    /// Resolves the paths of `config`: each must exist (a file or a directory) or be a glob
    /// pattern matching at least one file.
    pub fn open(config: &CorpusConfig) -> Result<Corpus> {
        if config.paths.is_empty() {
            return Err(DataError::config(
                "data.paths",
                "no corpus path given (expected a list of files, directories or globs)",
            ));
        }
        let mut files = Vec::new();
        for spec in &config.paths {
            let p = Path::new(spec);
            if p.is_file() {
                files.push(p.to_path_buf());
            } else if p.is_dir() {
                let before = files.len();
                walk_dir(p, &mut files)?;
                if files.len() == before {
                    return Err(DataError::EmptyCorpus {
                        what: format!("directory {} holds no file", p.display()),
                    });
                }
            } else if spec.contains(['*', '?', '[']) {
                let paths = glob::glob(spec).map_err(|e| DataError::BadPattern {
                    pattern: spec.clone(),
                    message: e.to_string(),
                })?;
                let mut matched: Vec<PathBuf> = Vec::new();
                for entry in paths {
                    let path = entry.map_err(|e| {
                        let msg = e.to_string();
                        DataError::io(e.path(), std::io::Error::other(msg))
                    })?;
                    if path.is_file() {
                        matched.push(path);
                    }
                }
                if matched.is_empty() {
                    return Err(DataError::NoMatch {
                        pattern: spec.clone(),
                    });
                }
                matched.sort();
                files.extend(matched);
            } else {
                return Err(DataError::MissingPath { path: p.into() });
            }
        }
        let mut seen = std::collections::HashSet::new();
        files.retain(|f| seen.insert(f.clone()));
        let files = files
            .into_iter()
            .map(|f| {
                let fmt = match f.extension().and_then(|e| e.to_str()) {
                    Some("jsonl") | Some("ndjson") => FileFormat::Jsonl,
                    _ => FileFormat::Text,
                };
                (f, fmt)
            })
            .collect();
        Ok(Corpus {
            files,
            config: config.clone(),
        })
    }

    /// The files, in reading order, with their format.
    pub fn files(&self) -> &[(PathBuf, FileFormat)] {
        &self.files
    }

    /// The configuration this corpus was opened with.
    pub fn config(&self) -> &CorpusConfig {
        &self.config
    }

    /// A short description for messages: the paths as given and the number of files.
    pub fn describe(&self) -> String {
        format!(
            "{} ({} file{})",
            self.config.paths.join(", "),
            self.files.len(),
            if self.files.len() == 1 { "" } else { "s" }
        )
    }

    /// Total size in bytes of the files.
    pub fn total_bytes(&self) -> Result<u64> {
        let mut n = 0;
        for (f, _) in &self.files {
            n += std::fs::metadata(f).map_err(|e| DataError::io(f, e))?.len();
        }
        Ok(n)
    }

    /// Hashes the files' contents (streamed) together with the reading options: two corpora
    /// with the same hash produce the same units.
    pub fn content_hash(&self) -> Result<blake3::Hash> {
        let mut h = blake3::Hasher::new();
        h.update(b"distil-corpus-v1\0");
        h.update(self.config.text_field.as_bytes());
        h.update(&[0, self.config.on_invalid_utf8 as u8]);
        for (f, fmt) in &self.files {
            let file = File::open(f).map_err(|e| DataError::io(f, e))?;
            let len = file.metadata().map_err(|e| DataError::io(f, e))?.len();
            h.update(&[*fmt as u8]);
            h.update(&len.to_le_bytes());
            let mut r = BufReader::with_capacity(1 << 20, file);
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = r.read(&mut buf).map_err(|e| DataError::io(f, e))?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
        }
        Ok(h.finalize())
    }

    /// A streaming reader over the corpus's units.
    pub fn reader(&self) -> CorpusReader<'_> {
        CorpusReader {
            corpus: self,
            file_idx: 0,
            current: None,
            line_no: 0,
            buf: Vec::new(),
            pending: std::collections::VecDeque::new(),
            doc_break: true,
            stats: ReadStats::default(),
        }
    }
}

fn walk_dir(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| DataError::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|e| DataError::io(dir, e)))
        .collect::<Result<_>>()?;
    entries.sort();
    for p in entries {
        let hidden = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        if p.is_dir() {
            walk_dir(&p, out)?;
        } else if p.is_file() {
            out.push(p);
        }
    }
    Ok(())
}

/// One unit of text read from the corpus.
#[derive(Debug, Clone, PartialEq)]
pub struct Unit {
    /// The text (one line, without its line ending).
    pub text: String,
    /// True when this unit starts a new document.
    pub new_doc: bool,
    /// Index of the file in [`Corpus::files`].
    pub file: usize,
    /// 1-based line number in that file.
    pub line: u64,
}

/// What a reader has seen so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadStats {
    /// Files opened.
    pub files: u64,
    /// Lines read (all of them, blank ones included).
    pub lines: u64,
    /// Units produced.
    pub units: u64,
    /// Documents started.
    pub docs: u64,
    /// Bytes of unit text produced.
    pub bytes: u64,
    /// Lines skipped because they were not UTF-8 (with `on_invalid_utf8: skip`).
    pub skipped_invalid_utf8: u64,
    /// `.jsonl` records whose text field was empty or blank.
    pub empty_records: u64,
}

/// Streams [`Unit`]s out of a [`Corpus`], one file at a time, one line at a time.
pub struct CorpusReader<'a> {
    corpus: &'a Corpus,
    file_idx: usize,
    current: Option<BufReader<File>>,
    line_no: u64,
    buf: Vec<u8>,
    pending: std::collections::VecDeque<Unit>,
    doc_break: bool,
    stats: ReadStats,
}

impl CorpusReader<'_> {
    /// Counters so far.
    pub fn stats(&self) -> &ReadStats {
        &self.stats
    }

    /// The next unit, `Ok(None)` at the end of the corpus, or an error naming file and line.
    pub fn next_unit(&mut self) -> Result<Option<Unit>> {
        loop {
            if let Some(u) = self.pending.pop_front() {
                return Ok(Some(self.emit(u)));
            }
            if self.current.is_none() {
                let Some((path, _)) = self.corpus.files.get(self.file_idx) else {
                    return Ok(None);
                };
                let f = File::open(path).map_err(|e| DataError::io(path, e))?;
                self.current = Some(BufReader::with_capacity(1 << 20, f));
                self.line_no = 0;
                self.doc_break = true;
                self.stats.files += 1;
            }
            let (path, fmt) = &self.corpus.files[self.file_idx];
            self.buf.clear();
            let reader = self.current.as_mut().expect("file opened above");
            let n = reader
                .read_until(b'\n', &mut self.buf)
                .map_err(|e| DataError::io(path, e))?;
            if n == 0 {
                self.current = None;
                self.file_idx += 1;
                continue;
            }
            self.line_no += 1;
            self.stats.lines += 1;
            while matches!(self.buf.last(), Some(b'\n' | b'\r')) {
                self.buf.pop();
            }
            let line = match std::str::from_utf8(&self.buf) {
                Ok(s) => s,
                Err(e) => match self.corpus.config.on_invalid_utf8 {
                    Utf8Policy::Error => {
                        return Err(DataError::InvalidUtf8 {
                            path: path.clone(),
                            line: self.line_no,
                            byte: e.valid_up_to(),
                        })
                    }
                    Utf8Policy::Skip => {
                        self.stats.skipped_invalid_utf8 += 1;
                        continue;
                    }
                },
            };
            match fmt {
                FileFormat::Text => {
                    if line.trim().is_empty() {
                        self.doc_break = true;
                        continue;
                    }
                    let u = Unit {
                        text: line.to_string(),
                        new_doc: self.doc_break,
                        file: self.file_idx,
                        line: self.line_no,
                    };
                    self.doc_break = false;
                    return Ok(Some(self.emit(u)));
                }
                FileFormat::Jsonl => {
                    if line.trim().is_empty() {
                        continue;
                    }
                    let text = self.json_text(line, path)?;
                    let mut first = true;
                    for part in text.split('\n') {
                        let part = part.trim_end_matches('\r');
                        if part.trim().is_empty() {
                            continue;
                        }
                        self.pending.push_back(Unit {
                            text: part.to_string(),
                            new_doc: first,
                            file: self.file_idx,
                            line: self.line_no,
                        });
                        first = false;
                    }
                    if first {
                        self.stats.empty_records += 1;
                    }
                }
            }
        }
    }

    fn emit(&mut self, u: Unit) -> Unit {
        self.stats.units += 1;
        self.stats.bytes += u.text.len() as u64;
        if u.new_doc {
            self.stats.docs += 1;
        }
        u
    }

    fn json_text(&self, line: &str, path: &Path) -> Result<String> {
        let field = &self.corpus.config.text_field;
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| DataError::InvalidJson {
                path: path.to_path_buf(),
                line: self.line_no,
                message: e.to_string(),
            })?;
        let serde_json::Value::Object(mut map) = v else {
            return Err(DataError::InvalidJson {
                path: path.to_path_buf(),
                line: self.line_no,
                message: "expected a JSON object".into(),
            });
        };
        match map.remove(field) {
            Some(serde_json::Value::String(s)) => Ok(s),
            Some(other) => Err(DataError::BadField {
                path: path.to_path_buf(),
                line: self.line_no,
                message: format!(
                    "field `{field}` is {}, expected a string",
                    json_kind(&other)
                ),
            }),
            None => {
                let keys: Vec<&str> = map.keys().map(String::as_str).collect();
                Err(DataError::BadField {
                    path: path.to_path_buf(),
                    line: self.line_no,
                    message: format!(
                        "record has no field `{field}` (its keys: {}); set `text_field` to the field holding the text",
                        if keys.is_empty() { "none".to_string() } else { keys.join(", ") }
                    ),
                })
            }
        }
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}
