//! `distil tokenizer train`: trains a WordPiece or byte-level BPE tokenizer on a corpus and
//! saves it in Hugging Face layout.

use crate::data::tokenizer::{BpeTrainOptions, WordPieceTrainOptions};
use crate::data::{BertVocabOptions, Corpus, CorpusConfig, DataError, Tok};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use std::fmt::Write as _;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum TokenizerCommand {
    /// Train a tokenizer on a corpus and save it (tokenizer.json, vocab files, configs).
    Train(TrainArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// BERT WordPiece (`[PAD]`, `[unused*]`, `[UNK]`, `[CLS]`, `[SEP]`, `[MASK]`).
    Wordpiece,
    /// RoBERTa byte-level BPE (`<s>`, `<pad>`, `</s>`, `<unk>`, `<mask>`).
    Bpe,
}

#[derive(Args)]
pub struct TrainArgs {
    /// Corpus files, directories or glob patterns (`.jsonl` files are read by --text-field).
    #[arg(long, required = true, num_args = 1.., value_name = "PATH")]
    pub data: Vec<String>,
    /// Field holding the text in `.jsonl` files.
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// Target vocabulary size, special tokens included.
    #[arg(long)]
    pub vocab_size: usize,
    #[arg(long, value_enum, default_value = "wordpiece")]
    pub kind: Kind,
    /// Lower-case the text (WordPiece; the default).
    #[arg(long, overrides_with = "no_lowercase")]
    pub lowercase: bool,
    /// Keep the case (WordPiece).
    #[arg(long, overrides_with = "lowercase")]
    pub no_lowercase: bool,
    /// Minimum pair frequency for a merge.
    #[arg(long, default_value_t = 2)]
    pub min_frequency: u64,
    /// Output directory (created if needed).
    #[arg(long)]
    pub out: PathBuf,
}

/// What a training produced, for printing and for tests.
pub struct Trained {
    pub tok: Tok,
    pub files: Vec<PathBuf>,
    pub corpus: String,
    pub sample: Option<String>,
}

pub fn run(cmd: TokenizerCommand) -> Result<()> {
    match cmd {
        TokenizerCommand::Train(a) => {
            let t = train(&a)?;
            print!("{}", describe(&a, &t)?);
        }
    }
    Ok(())
}

pub fn train(a: &TrainArgs) -> Result<Trained> {
    if a.vocab_size == 0 {
        bail!("--vocab-size must be at least 1");
    }
    if a.kind == Kind::Bpe && a.lowercase {
        bail!(
            "--lowercase is not available with --kind bpe: byte-level BPE keeps the text as it is"
        );
    }
    if a.out.is_file() {
        bail!("--out {}: is a file, expected a directory", a.out.display());
    }
    let cfg = CorpusConfig {
        text_field: a.text_field.clone(),
        ..CorpusConfig::new(a.data.iter().cloned())
    };
    let corpus = Corpus::open(&cfg).context("--data")?;
    let sample = first_unit(&corpus).context("--data")?;
    if sample.is_none() {
        bail!(
            "--data: {} holds no text (every line is blank)",
            corpus.describe()
        );
    }
    let lowercase = !a.no_lowercase;
    eprintln!(
        "training a {:?} tokenizer (vocabulary {}) on {}",
        a.kind,
        a.vocab_size,
        corpus.describe()
    );
    let tok = match a.kind {
        Kind::Wordpiece => Tok::train_wordpiece(
            &corpus,
            &WordPieceTrainOptions {
                vocab_size: a.vocab_size,
                min_frequency: a.min_frequency,
                limit_alphabet: Some(1000),
                normalizer: BertVocabOptions {
                    lowercase,
                    ..Default::default()
                },
                extra_special_tokens: vec![],
            },
        ),
        Kind::Bpe => Tok::train_byte_level_bpe(
            &corpus,
            &BpeTrainOptions {
                vocab_size: a.vocab_size,
                min_frequency: a.min_frequency,
                add_prefix_space: true,
                extra_special_tokens: vec![],
            },
        ),
    }
    .map_err(|e| match e {
        // The trainer names the recipe key; here the value came from the command line.
        DataError::Config { key, message } if key == "tokenizer.vocab_size" => {
            anyhow::anyhow!("--vocab-size: {message}")
        }
        e => anyhow::Error::from(e).context("cannot train the tokenizer"),
    })?;
    let files = tok
        .save(&a.out)
        .with_context(|| format!("cannot save the tokenizer into {}", a.out.display()))?;
    // Read it back, as a run would, so what is printed is what was saved.
    let tok = Tok::load(
        &a.out,
        &BertVocabOptions {
            lowercase,
            ..Default::default()
        },
    )
    .with_context(|| format!("cannot load the saved tokenizer from {}", a.out.display()))?;
    Ok(Trained {
        tok,
        files,
        corpus: corpus.describe(),
        sample,
    })
}

/// The sample to encode: the first line of the corpus with at least six words (among its
/// first thousand lines), else its first non-blank line; `None` when it holds no text.
fn first_unit(corpus: &Corpus) -> Result<Option<String>> {
    let mut r = corpus.reader();
    let mut first = None;
    let mut seen = 0;
    while let Some(u) = r.next_unit()? {
        if u.text.trim().is_empty() {
            continue;
        }
        if u.text.split_whitespace().count() >= 6 {
            return Ok(Some(u.text));
        }
        first.get_or_insert(u.text);
        seen += 1;
        if seen >= 1000 {
            break;
        }
    }
    Ok(first)
}

fn describe(a: &TrainArgs, t: &Trained) -> Result<String> {
    let mut s = String::new();
    let tok = &t.tok;
    let sp = tok.special_ids();
    writeln!(
        s,
        "trained a {:?} tokenizer on {}; saved to {}",
        a.kind,
        t.corpus,
        a.out.display()
    )?;
    for f in &t.files {
        writeln!(s, "  {}", f.display())?;
    }
    writeln!(s, "vocab size: {}", tok.vocab_size())?;
    let name = |id: u32| tok.id_to_token(id).unwrap_or_else(|| "?".into());
    let mut specials = vec![
        ("pad", Some(sp.pad)),
        ("unk", sp.unk),
        ("cls", Some(sp.cls)),
        ("sep", Some(sp.sep)),
        ("mask", Some(sp.mask)),
    ];
    if sp.bos.is_some_and(|b| b != sp.cls) {
        specials.push(("bos", sp.bos));
    }
    if sp.eos.is_some_and(|e| e != sp.sep) {
        specials.push(("eos", sp.eos));
    }
    let line: Vec<String> = specials
        .iter()
        .filter_map(|(k, id)| id.map(|id| format!("{k}={id} {}", name(id))))
        .collect();
    writeln!(s, "special ids: {}", line.join(", "))?;
    if let Some(text) = &t.sample {
        let text: String = text.chars().take(120).collect();
        let (ids, _) = tok.encode_with_specials(&text, None)?;
        let tokens: Vec<String> = ids.iter().map(|&i| name(i)).collect();
        writeln!(s, "sample: {text}")?;
        writeln!(s, "tokens: {}", tokens.join(" "))?;
        writeln!(
            s,
            "ids:    {}",
            ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
        )?;
    }
    Ok(s)
}
