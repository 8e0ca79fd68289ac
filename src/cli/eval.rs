//! `distil eval CHECKPOINT… --data …`: held-out MLM loss, perplexity and masked-token accuracy
//! of one or more checkpoints on the same masked tokens.

use crate::data::masking::{TokenMasking, WholeWordMasking};
use crate::data::sequences::SequenceMode;
use crate::data::{
    prepare, BatchConfig, Batcher, BertVocabOptions, CorpusConfig, DataConfig, DataError, Masker,
    Masking, SequenceConfig, Tok,
};
use crate::model::hub::{resolve, resolve_offline, Resolved};
use crate::model::{load_encoder, Encoder, LoadOptions};
use crate::recipe::parse_device;
use crate::train::eval::{evaluate, EvalResult};
use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// The salt the trainer mixes into `training.seed` for its held-out batches
/// (`src/train/setup.rs`): the same salt here gives the same masks as a run's evaluations.
const EVAL_SEED_SALT: u64 = 0x6576_616c;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Lines concatenated and cut into full blocks (RoBERTa FULL-SENTENCES).
    Packed,
    /// One line, one sequence.
    #[value(name = "line_by_line", alias = "line-by-line")]
    LineByLine,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MaskKind {
    /// Independent tokens (BERT, RoBERTa).
    Token,
    /// All the pieces of a word together.
    #[value(name = "whole_word", alias = "whole-word")]
    WholeWord,
}

#[derive(Args)]
pub struct EvalArgs {
    /// Checkpoint directories (or hub ids) with an MLM head; the first one's tokenizer is used.
    #[arg(required = true, value_name = "CHECKPOINT")]
    pub checkpoints: Vec<String>,
    /// Corpus files, directories or glob patterns.
    #[arg(long, required = true, num_args = 1.., value_name = "PATH")]
    pub data: Vec<String>,
    /// Field holding the text in `.jsonl` files.
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// Sequence length, special tokens included (a recipe's data.sequences.block_size).
    #[arg(long, default_value_t = 128)]
    pub block_size: usize,
    #[arg(long, value_enum, default_value = "packed")]
    pub mode: Mode,
    #[arg(long, value_enum, default_value = "token")]
    pub masking: MaskKind,
    /// Fraction of tokens masked.
    #[arg(long, default_value_t = 0.15)]
    pub probability: f64,
    /// Sequences per batch (a recipe's training.per_device_eval_batch_size; it fixes the masks).
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Evaluate on the first N batches only.
    #[arg(long)]
    pub max_batches: Option<usize>,
    /// Seed of the masks (a recipe's training.seed) and, unless --split-seed is given, of the
    /// held-out split.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Seed of the held-out split (a recipe's data.sequences.seed; default: --seed).
    #[arg(long)]
    pub split_seed: Option<u64>,
    /// Evaluate only on the held-out split cut with this fraction (a recipe's
    /// data.sequences.eval_fraction); without it, all of the text is evaluated.
    #[arg(long)]
    pub eval_fraction: Option<f64>,
    /// Where the token cache lives.
    #[arg(long, default_value = ".distil-cache")]
    pub cache_dir: PathBuf,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Also write the table as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelRow {
    /// The checkpoint as given on the command line.
    pub model: String,
    pub path: PathBuf,
    pub layers: usize,
    pub parameters: usize,
    pub loss: f64,
    pub perplexity: f64,
    pub accuracy: f64,
    pub masked_tokens: u64,
    pub batches: usize,
    pub eval_tokens: u64,
    pub tokens_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub data: Vec<String>,
    pub split: String,
    pub sequences: usize,
    pub block_size: usize,
    pub mode: String,
    pub masking: String,
    pub probability: f64,
    pub batch_size: usize,
    pub seed: u64,
    pub split_seed: u64,
    pub eval_fraction: Option<f64>,
    pub tokenizer: String,
    pub models: Vec<ModelRow>,
}

/// A checkpoint reference resolved to a directory (a hub id is looked up in the cache, and
/// downloaded only when it is not there).
fn checkpoint_dir(reference: &str) -> Result<PathBuf> {
    let p = Path::new(reference);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    if p.exists() {
        bail!(
            "checkpoint {reference}: is a file; expected a directory with config.json and weights"
        );
    }
    match resolve_offline(reference) {
        Ok(Resolved::Dir(d)) => Ok(d),
        Ok(Resolved::ToDownload(_)) => resolve(reference).with_context(|| {
            format!("checkpoint {reference}: no such directory, and not found on the hub")
        }),
        Err(_) => bail!("checkpoint {reference}: no such directory"),
    }
}

fn bert_options(dir: &Path) -> BertVocabOptions {
    // A vocab.txt-only checkpoint: follow its tokenizer_config.json when it says.
    let lowercase = std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("do_lower_case").and_then(|b| b.as_bool()))
        .unwrap_or(true);
    BertVocabOptions {
        lowercase,
        ..Default::default()
    }
}

fn load(reference: &str, device: &candle_core::Device) -> Result<(Encoder, PathBuf)> {
    let dir = checkpoint_dir(reference)?;
    let (enc, _) = load_encoder(
        &dir,
        device,
        &LoadOptions {
            trainable: false,
            want_mlm_head: false,
            ..Default::default()
        },
    )
    .with_context(|| format!("checkpoint {reference}: cannot load the model"))?;
    if !enc.has_mlm_head() {
        bail!(
            "checkpoint {reference}: has no MLM head (cls.predictions / lm_head), so it cannot be evaluated on masked tokens; \
             continue its pretraining with `distil run` to train a head first"
        );
    }
    Ok((enc, dir))
}

pub fn run(a: &EvalArgs) -> Result<EvalReport> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if a.max_batches == Some(0) {
        bail!("--max-batches must be at least 1");
    }
    if !(a.probability > 0.0 && a.probability < 1.0) {
        bail!(
            "--probability must be between 0 and 1 (exclusive), got {}",
            a.probability
        );
    }
    if let Some(f) = a.eval_fraction {
        if !(f > 0.0 && f < 1.0) {
            bail!("--eval-fraction must be between 0 and 1 (exclusive), got {f}");
        }
    }
    let device = parse_device(&a.device)
        .map_err(|e| anyhow!("--device: {e}"))?
        .device()?;
    let mut models: Vec<(&String, Encoder, PathBuf)> = Vec::new();
    for reference in &a.checkpoints {
        let (enc, dir) = load(reference, &device)?;
        models.push((reference, enc, dir));
    }
    let (first_ref, first, first_dir) = &models[0];
    let tok = Tok::load(first_dir, &bert_options(first_dir)).with_context(|| {
        format!("checkpoint {first_ref}: no usable tokenizer in {} (the first checkpoint's tokenizer is used for all)", first_dir.display())
    })?;
    for (reference, enc, _) in &models {
        if enc.cfg.vocab_size != first.cfg.vocab_size {
            bail!(
                "checkpoint {reference}: vocabulary size {} differs from {first_ref}'s {}; models compared on the same masked tokens must share a tokenizer",
                enc.cfg.vocab_size,
                first.cfg.vocab_size
            );
        }
        tok.check_model_vocab(enc.cfg.vocab_size)
            .with_context(|| format!("checkpoint {reference}"))?;
        let max_len = enc
            .cfg
            .max_position_embeddings
            .saturating_sub(enc.cfg.position_offset());
        if a.block_size > max_len {
            bail!(
                "--block-size {} is longer than checkpoint {reference} accepts ({max_len} positions)",
                a.block_size
            );
        }
    }

    let hints = flags_to_match_run(first_dir, a);
    if !hints.is_empty() {
        eprintln!(
            "note: {first_ref} was trained with other data settings; to reproduce its held-out numbers (on the same --data) add: {}",
            hints.join(" ")
        );
    }

    let split_seed = a.split_seed.unwrap_or(a.seed);
    let masking = match a.masking {
        MaskKind::Token => Masking::Token(TokenMasking {
            probability: a.probability,
            ..Default::default()
        }),
        MaskKind::WholeWord => Masking::WholeWord(WholeWordMasking {
            probability: a.probability,
            ..Default::default()
        }),
    };
    let cfg = DataConfig {
        corpus: CorpusConfig {
            text_field: a.text_field.clone(),
            ..CorpusConfig::new(a.data.iter().cloned())
        },
        sequences: SequenceConfig {
            mode: match a.mode {
                Mode::Packed => SequenceMode::Packed,
                Mode::LineByLine => SequenceMode::LineByLine,
            },
            block_size: a.block_size,
            eval_fraction: a.eval_fraction.unwrap_or(0.0),
            seed: split_seed,
            ..Default::default()
        },
        masking,
        cache_dir: Some(a.cache_dir.clone()),
    };
    let prepared = prepare(&cfg, &tok).map_err(|e| match e {
        // The pipeline names recipe keys; here the values came from these flags.
        DataError::Config { key, message } => {
            let flag = match key.as_str() {
                "data.paths" => "--data",
                "data.block_size" => "--block-size",
                "data.eval_fraction" => "--eval-fraction",
                k if k.contains("probability") => "--probability",
                _ => key.as_str(),
            };
            anyhow!("{flag}: {message}")
        }
        e => anyhow!("--data {}: {e}", a.data.join(" ")),
    })?;
    let (seqs, split) = match a.eval_fraction {
        Some(f) => match &prepared.splits.eval {
            Some(e) if !e.is_empty() => (e.clone(), format!("held-out {f} (split seed {split_seed})")),
            _ => bail!(
                "--eval-fraction {f}: the held-out split of --data {} is empty (the corpus is too small; raise the fraction)",
                a.data.join(" ")
            ),
        },
        None => (prepared.splits.train.clone(), "all of the text".to_string()),
    };
    if seqs.is_empty() {
        bail!(
            "--data {}: no sequence to evaluate (the corpus holds no text)",
            a.data.join(" ")
        );
    }
    let masker = Arc::new(Masker::new(
        &cfg.masking,
        &tok,
        Some(prepared.cache.counts()),
    )?);
    let mut bc = BatchConfig::new(a.batch_size);
    bc.shuffle = false;
    let batcher = Batcher::new(seqs.clone(), masker, bc, a.seed ^ EVAL_SEED_SALT, &tok)?;
    // Tokens the evaluation reads (the same for every model).
    let lens = seqs.lengths();
    let plan = batcher.epoch_plan(0);
    let eval_tokens: u64 = plan
        .iter()
        .take(a.max_batches.unwrap_or(usize::MAX))
        .flatten()
        .map(|&i| lens[i as usize] as u64)
        .sum();

    let mut rows = Vec::new();
    for (reference, enc, dir) in &models {
        let start = Instant::now();
        let r: EvalResult = crate::util::threads::run_hot_on(enc.device(), || {
            evaluate(enc, &batcher, a.max_batches)
        })
        .with_context(|| format!("checkpoint {reference}: evaluation failed"))?;
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        rows.push(ModelRow {
            model: reference.to_string(),
            path: dir.clone(),
            layers: enc.cfg.num_layers,
            parameters: enc.params.num_parameters(),
            loss: r.loss,
            perplexity: r.perplexity,
            accuracy: r.accuracy,
            masked_tokens: r.masked_tokens,
            batches: r.batches,
            eval_tokens,
            tokens_per_s: eval_tokens as f64 / secs,
        });
    }
    let report = EvalReport {
        data: a.data.clone(),
        split,
        sequences: seqs.len(),
        block_size: a.block_size,
        mode: value_name(a.mode),
        masking: value_name(a.masking),
        probability: a.probability,
        batch_size: a.batch_size,
        seed: a.seed,
        split_seed,
        eval_fraction: a.eval_fraction,
        tokenizer: first_dir.display().to_string(),
        models: rows,
    };
    if let Some(path) = &a.json {
        crate::util::atomic_write(path, serde_json::to_string_pretty(&report)?.as_bytes())
            .with_context(|| format!("--json {}: cannot write", path.display()))?;
    }
    Ok(report)
}

fn value_name(v: impl ValueEnum) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_string())
        .unwrap_or_default()
}

/// Flags that would make `distil eval` see the held-out split and masks of the run that wrote
/// `dir` (its `recipe.yaml`, or that of the run directory above a `checkpoint-N`). Empty when
/// the flags already match, or when there is no recipe to compare with.
pub fn flags_to_match_run(dir: &Path, a: &EvalArgs) -> Vec<String> {
    let recipe = [dir.join("recipe.yaml"), dir.join("../recipe.yaml")]
        .into_iter()
        .find(|p| p.is_file());
    let Some(v) = recipe
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| serde_yaml::from_str::<serde_yaml::Value>(&t).ok())
    else {
        return Vec::new();
    };
    let get = |path: &[&str]| {
        let mut x = &v;
        for k in path {
            x = x.get(k)?;
        }
        Some(x.clone())
    };
    let int = |path: &[&str], default: u64| get(path).and_then(|x| x.as_u64()).unwrap_or(default);
    let float = |path: &[&str], default: f64| get(path).and_then(|x| x.as_f64()).unwrap_or(default);
    let text = |path: &[&str], default: &str| {
        get(path)
            .and_then(|x| x.as_str().map(String::from))
            .unwrap_or_else(|| default.to_string())
    };
    let mut out = Vec::new();
    let fraction = float(&["data", "sequences", "eval_fraction"], 0.0);
    if fraction > 0.0 && a.eval_fraction != Some(fraction) {
        out.push(format!("--eval-fraction {fraction}"));
    }
    let block = int(&["data", "sequences", "block_size"], 128);
    if block as usize != a.block_size {
        out.push(format!("--block-size {block}"));
    }
    let mode = text(&["data", "sequences", "mode"], "packed");
    if mode != value_name(a.mode) {
        out.push(format!("--mode {mode}"));
    }
    let strategy = text(&["data", "masking", "strategy"], "token");
    if strategy != value_name(a.masking) {
        out.push(format!("--masking {strategy}"));
    }
    let p = float(&["data", "masking", "probability"], 0.15);
    if (p - a.probability).abs() > 1e-12 {
        out.push(format!("--probability {p}"));
    }
    let batch = int(&["training", "per_device_eval_batch_size"], 16);
    if batch as usize != a.batch_size {
        out.push(format!("--batch-size {batch}"));
    }
    let seed = int(&["training", "seed"], 42);
    if seed != a.seed {
        out.push(format!("--seed {seed}"));
    }
    let split_seed = int(&["data", "sequences", "seed"], 42);
    if split_seed != a.split_seed.unwrap_or(seed) {
        out.push(format!("--split-seed {split_seed}"));
    }
    if let Some(m) = get(&["training", "max_eval_batches"]).and_then(|x| x.as_u64()) {
        if a.max_batches != Some(m as usize) {
            out.push(format!("--max-batches {m}"));
        }
    }
    out
}

/// The table `distil eval` prints.
pub fn table(r: &EvalReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "evaluated on {} ({}): {} {} sequences of up to {} tokens, {} masking p={}, batch {}, seed {}",
        r.data.join(" "),
        r.split,
        r.sequences,
        r.mode,
        r.block_size,
        r.masking,
        r.probability,
        r.batch_size,
        r.seed
    );
    if let Some(m) = r.models.first() {
        let _ = writeln!(
            s,
            "{} masked tokens in {} batches ({} tokens); tokenizer from {}",
            m.masked_tokens, m.batches, m.eval_tokens, r.tokenizer
        );
    }
    let header = [
        "model",
        "layers",
        "parameters",
        "held-out MLM loss",
        "perplexity",
        "masked-token accuracy",
        "eval tokens/s",
    ];
    let cells: Vec<[String; 7]> = r
        .models
        .iter()
        .map(|m| {
            [
                m.model.clone(),
                m.layers.to_string(),
                m.parameters.to_string(),
                format!("{:.4}", m.loss),
                format!("{:.2}", m.perplexity),
                format!("{:.2}%", 100.0 * m.accuracy),
                format!("{:.0}", m.tokens_per_s),
            ]
        })
        .collect();
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &cells {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |s: &mut String, row: &[String]| {
        let parts: Vec<String> = row
            .iter()
            .zip(&width)
            .enumerate()
            .map(|(i, (c, w))| {
                if i == 0 {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect();
        let _ = writeln!(s, "| {} |", parts.join(" | "));
    };
    line(&mut s, &header.map(String::from));
    let _ = writeln!(
        s,
        "|{}|",
        width
            .iter()
            .enumerate()
            .map(|(i, w)| if i == 0 {
                format!(":{}", "-".repeat(w + 1))
            } else {
                format!("{}:", "-".repeat(w + 1))
            })
            .collect::<Vec<_>>()
            .join("|")
    );
    for row in &cells {
        line(&mut s, row);
    }
    s
}
