//! YAML recipes: what to train, on what, and how.
//!
//! Unknown keys are rejected; every error names the file, the line and column, the key path,
//! what was expected, and (for a misspelt key) the nearest valid one. Training keys follow
//! Hugging Face's `TrainingArguments` where one exists.

mod locate;

use crate::data::DataConfig;
use crate::model::{Activation, EncoderConfig, Layout};
use crate::train::schedule::Decay;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub use locate::locate_key;

/// What a run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Masked-LM pretraining (from scratch or continued).
    Pretrain,
    /// Distillation from a frozen teacher.
    Distill,
}

/// A whole recipe.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub task: Task,
    /// The model trained (in distillation: the student; may be left out to derive it from
    /// the teacher and `distill.student`).
    #[serde(default)]
    pub model: ModelSection,
    #[serde(default)]
    pub tokenizer: TokenizerSection,
    pub data: DataConfig,
    pub training: TrainingArgs,
    /// Distillation settings (`task: distill`).
    #[serde(default)]
    pub distill: Option<crate::distill::DistillSection>,
}

/// The model: start from a checkpoint (`from`), or build one from `config`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A checkpoint directory or hub id to start from.
    #[serde(default)]
    pub from: Option<String>,
    /// The shape of a model built fresh.
    #[serde(default)]
    pub config: Option<ModelShape>,
}

/// A model's shape in a recipe (BERT's names).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelShape {
    #[serde(default = "default_layout")]
    pub layout: Layout,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    /// Defaults to the tokenizer's vocabulary size.
    #[serde(default)]
    pub vocab_size: Option<usize>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// 0 for none (DistilBERT); default 2 (0 for the DistilBERT layout).
    #[serde(default)]
    pub type_vocab_size: Option<usize>,
    #[serde(default)]
    pub hidden_act: Option<Activation>,
    /// ALBERT's factorised embedding size.
    #[serde(default)]
    pub embedding_size: Option<usize>,
    /// ALBERT's number of shared layer groups.
    #[serde(default)]
    pub num_hidden_groups: Option<usize>,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f32,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f32,
    #[serde(default = "default_init_range")]
    pub initializer_range: f64,
}

fn default_layout() -> Layout {
    Layout::Bert
}
fn default_max_pos() -> usize {
    512
}
fn default_dropout() -> f32 {
    0.1
}
fn default_init_range() -> f64 {
    0.02
}

impl ModelShape {
    /// The encoder config for a vocabulary of `vocab_size` (used when the recipe gives none)
    /// whose padding id is `pad`.
    pub fn to_config(&self, vocab_size: usize, pad: u32) -> EncoderConfig {
        let mut c = EncoderConfig::bert(
            self.vocab_size.unwrap_or(vocab_size),
            self.hidden_size,
            self.num_hidden_layers,
            self.num_attention_heads,
            self.intermediate_size,
        );
        c.layout = self.layout;
        c.max_position_embeddings = self.max_position_embeddings;
        c.type_vocab_size = self.type_vocab_size.unwrap_or(match self.layout {
            Layout::DistilBert => 0,
            Layout::Roberta => 1,
            _ => 2,
        });
        c.pad_token_id = pad;
        if self.layout == Layout::Albert {
            c.shared_layers = true;
            c.embedding_size = self.embedding_size.unwrap_or(128);
            c.num_groups = self.num_hidden_groups.unwrap_or(1);
            c.hidden_act = Activation::GeluTanh;
        } else if let Some(e) = self.embedding_size {
            c.embedding_size = e;
        }
        if let Some(a) = self.hidden_act {
            c.hidden_act = a;
        }
        c.hidden_dropout = self.hidden_dropout_prob;
        c.attention_dropout = self.attention_probs_dropout_prob;
        c.initializer_range = self.initializer_range;
        c
    }
}

/// Where the tokenizer comes from: `load` a file or directory, `train` one on the corpus, or
/// (neither) the model checkpoint's own.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerSection {
    #[serde(default)]
    pub load: Option<String>,
    #[serde(default)]
    pub train: Option<TokenizerTraining>,
    /// For a `vocab.txt`: lower-case the text (BERT uncased).
    #[serde(default)]
    pub lowercase: Option<bool>,
}

/// Training a tokenizer on the recipe's corpus.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerTraining {
    /// `wordpiece` (BERT) or `bpe` (byte-level BPE, RoBERTa).
    #[serde(default = "default_tok_kind")]
    pub kind: TokenizerKind,
    pub vocab_size: usize,
    #[serde(default = "default_min_frequency")]
    pub min_frequency: u64,
    #[serde(default = "yes")]
    pub lowercase: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenizerKind {
    Wordpiece,
    Bpe,
}

fn default_tok_kind() -> TokenizerKind {
    TokenizerKind::Wordpiece
}
fn default_min_frequency() -> u64 {
    2
}
fn yes() -> bool {
    true
}

/// What to do when the loss is not finite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnNan {
    /// Stop with an error naming the step; the last good checkpoint stays.
    #[default]
    Stop,
    /// Skip the update and go on (counted in the metrics).
    Skip,
}

/// Training, evaluation and checkpointing (Hugging Face `TrainingArguments` names).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingArgs {
    pub output_dir: PathBuf,
    #[serde(default)]
    pub overwrite_output_dir: bool,
    #[serde(default = "default_batch")]
    pub per_device_train_batch_size: usize,
    #[serde(default = "default_eval_batch")]
    pub per_device_eval_batch_size: usize,
    #[serde(default = "one")]
    pub gradient_accumulation_steps: usize,
    #[serde(default = "default_lr")]
    pub learning_rate: f64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "default_beta1")]
    pub adam_beta1: f64,
    #[serde(default = "default_beta2")]
    pub adam_beta2: f64,
    #[serde(default = "default_eps")]
    pub adam_epsilon: f64,
    #[serde(default)]
    pub warmup_ratio: f64,
    /// Overrides `warmup_ratio` when set.
    #[serde(default)]
    pub warmup_steps: Option<u64>,
    #[serde(default)]
    pub lr_scheduler_type: Decay,
    /// Global-norm gradient clipping (`null` or 0 turns it off).
    #[serde(default = "default_clip")]
    pub max_grad_norm: Option<f64>,
    /// Total optimiser steps; overrides `num_train_epochs` when set.
    #[serde(default)]
    pub max_steps: Option<u64>,
    #[serde(default = "default_epochs")]
    pub num_train_epochs: f64,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// `cpu`, `cuda` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    #[serde(default = "default_logging")]
    pub logging_steps: u64,
    /// Evaluate on the held-out split every N steps (0: only at the end).
    #[serde(default)]
    pub eval_steps: u64,
    /// Cap on held-out batches per evaluation.
    #[serde(default)]
    pub max_eval_batches: Option<usize>,
    /// Write a checkpoint every N steps (0: only at the end).
    #[serde(default)]
    pub save_steps: u64,
    /// Keep at most this many checkpoints (oldest deleted first).
    #[serde(default)]
    pub save_total_limit: Option<usize>,
    #[serde(default)]
    pub group_by_length: bool,
    #[serde(default)]
    pub on_nan: OnNan,
    /// Mixed precision: the forward/backward matmuls in bfloat16; f32 master weights,
    /// optimiser state, losses and softmax (CUDA only).
    #[serde(default, skip_serializing_if = "is_false")]
    pub bf16: bool,
    /// Mixed precision in float16, with dynamic loss scaling (CUDA only).
    #[serde(default, skip_serializing_if = "is_false")]
    pub fp16: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl TrainingArgs {
    /// The dtype of the forward/backward matmuls: `bf16` / `fp16`, else f32.
    pub fn compute_dtype(&self) -> candle_core::DType {
        if self.bf16 {
            candle_core::DType::BF16
        } else if self.fp16 {
            candle_core::DType::F16
        } else {
            candle_core::DType::F32
        }
    }
}

fn default_batch() -> usize {
    8
}
fn default_eval_batch() -> usize {
    16
}
fn one() -> usize {
    1
}
fn default_lr() -> f64 {
    5e-5
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-8
}
fn default_clip() -> Option<f64> {
    Some(1.0)
}
fn default_epochs() -> f64 {
    3.0
}
fn default_seed() -> u64 {
    42
}
fn default_device() -> String {
    "cpu".into()
}
fn default_logging() -> u64 {
    10
}

/// A recipe with its source, for error messages that point into the file.
#[derive(Debug, Clone)]
pub struct LoadedRecipe {
    pub recipe: Recipe,
    pub path: PathBuf,
    pub text: String,
}

impl LoadedRecipe {
    /// Formats a validation error about `key` (a dotted path) with the key's line and column.
    pub fn error_at(&self, key: &str, msg: impl std::fmt::Display) -> anyhow::Error {
        match locate_key(&self.text, key) {
            Some((line, col)) => {
                anyhow::anyhow!("{}:{line}:{col}: {key}: {msg}", self.path.display())
            }
            None => anyhow::anyhow!("{}: {key}: {msg}", self.path.display()),
        }
    }
}

/// Reads a recipe, applies `--set key.path=value` overrides, and validates it.
pub fn load(path: &Path, overrides: &[String]) -> Result<LoadedRecipe> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read recipe {}", path.display()))?;
    parse(&text, path, overrides)
}

/// Parses recipe text (see [`load`]).
pub fn parse(text: &str, path: &Path, overrides: &[String]) -> Result<LoadedRecipe> {
    let file = path.display();
    let mut value: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| match e.location() {
            Some(l) => anyhow::anyhow!("{file}:{}:{}: invalid YAML: {e}", l.line(), l.column()),
            None => anyhow::anyhow!("{file}: invalid YAML: {e}"),
        })?;
    for o in overrides {
        apply_override(&mut value, o)?;
    }
    let recipe: Recipe = serde_path_to_error::deserialize(value).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.inner().to_string();
        let hint = suggestion(&inner)
            .map(|s| format!("; did you mean `{s}`?"))
            .unwrap_or_default();
        let unknown = unknown_field(&inner);
        // For an unknown key, point at the key itself.
        let at = match &unknown {
            Some(u) if key == "." || key.is_empty() => u.clone(),
            _ => key.clone(),
        };
        match locate_key(text, &at) {
            Some((line, col)) => anyhow::anyhow!("{file}:{line}:{col}: {at}: {inner}{hint}"),
            None => anyhow::anyhow!("{file}: {at}: {inner}{hint}"),
        }
    })?;
    let loaded = LoadedRecipe {
        recipe,
        path: path.to_path_buf(),
        text: text.to_string(),
    };
    validate(&loaded)?;
    Ok(loaded)
}

/// `key.path=value`: sets a value, parsed as YAML, creating mappings as needed.
fn apply_override(root: &mut serde_yaml::Value, o: &str) -> Result<()> {
    let (key, raw) = o
        .split_once('=')
        .with_context(|| format!("--set {o}: expected key.path=value"))?;
    let v: serde_yaml::Value = serde_yaml::from_str(raw)
        .with_context(|| format!("--set {o}: the value is not valid YAML"))?;
    let mut cur = root;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        if part.is_empty() {
            bail!("--set {o}: empty key segment");
        }
        if !cur.is_mapping() {
            if cur.is_null() {
                *cur = serde_yaml::Value::Mapping(Default::default());
            } else {
                bail!("--set {o}: `{}` is not a mapping", parts[..i].join("."));
            }
        }
        let map = cur.as_mapping_mut().unwrap();
        let k = serde_yaml::Value::String(part.to_string());
        if i + 1 == parts.len() {
            map.insert(k, v);
            return Ok(());
        }
        if !map.contains_key(&k) {
            map.insert(k.clone(), serde_yaml::Value::Null);
        }
        cur = map.get_mut(&k).unwrap();
    }
    Ok(())
}

fn unknown_field(msg: &str) -> Option<String> {
    let rest = msg
        .strip_prefix("unknown field `")
        .or_else(|| msg.strip_prefix("unknown variant `"))?;
    Some(rest.split('`').next()?.to_string())
}

/// For serde's "unknown field `x`, expected one of `a`, `b`": the nearest expected name.
fn suggestion(msg: &str) -> Option<String> {
    let bad = unknown_field(msg)?;
    let expected = msg.split_once("expected")?.1;
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|cand| (strsim::damerau_levenshtein(&bad, cand), cand))
        .filter(|(d, c)| *d <= (c.len() / 2).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.to_string())
}

fn validate(r: &LoadedRecipe) -> Result<()> {
    let t = &r.recipe.training;
    let err = |k: &str, m: &str| Err(r.error_at(k, m));
    if !(t.learning_rate > 0.0 && t.learning_rate.is_finite()) {
        return err(
            "training.learning_rate",
            &format!("must be a positive number, got {}", t.learning_rate),
        );
    }
    if t.per_device_train_batch_size == 0 {
        return err(
            "training.per_device_train_batch_size",
            "must be at least 1, got 0",
        );
    }
    if t.per_device_eval_batch_size == 0 {
        return err(
            "training.per_device_eval_batch_size",
            "must be at least 1, got 0",
        );
    }
    if t.gradient_accumulation_steps == 0 {
        return err(
            "training.gradient_accumulation_steps",
            "must be at least 1, got 0",
        );
    }
    if !(0.0..1.0).contains(&t.warmup_ratio) {
        return err(
            "training.warmup_ratio",
            &format!("must be in [0, 1), got {}", t.warmup_ratio),
        );
    }
    if t.weight_decay < 0.0 {
        return err(
            "training.weight_decay",
            &format!("must be ≥ 0, got {}", t.weight_decay),
        );
    }
    if !(0.0..1.0).contains(&t.adam_beta1) || !(0.0..1.0).contains(&t.adam_beta2) {
        return err(
            "training.adam_beta1",
            "adam_beta1 and adam_beta2 must be in [0, 1)",
        );
    }
    if t.max_steps == Some(0) {
        return err("training.max_steps", "must be at least 1");
    }
    if t.max_steps.is_none() && t.num_train_epochs <= 0.0 {
        return err(
            "training.num_train_epochs",
            &format!("must be positive, got {}", t.num_train_epochs),
        );
    }
    if t.save_total_limit == Some(0) {
        return err(
            "training.save_total_limit",
            "must be at least 1 (or left out to keep every checkpoint)",
        );
    }
    if let Some(c) = t.max_grad_norm {
        if c < 0.0 {
            return err("training.max_grad_norm", &format!("must be ≥ 0, got {c}"));
        }
    }
    let device = parse_device(&t.device).map_err(|e| r.error_at("training.device", e))?;
    if t.bf16 && t.fp16 {
        return err(
            "training.fp16",
            "give either bf16 or fp16, not both (bf16 needs no loss scaling where the GPU has it)",
        );
    }
    for (on, key) in [(t.bf16, "training.bf16"), (t.fp16, "training.fp16")] {
        if on && device == DeviceSpec::Cpu {
            return err(
                key,
                &format!(
                    "mixed precision needs a CUDA device (device: {}); the CPU trains in f32",
                    t.device
                ),
            );
        }
    }
    let m = &r.recipe.model;
    match (&m.from, &m.config) {
        (None, None) if r.recipe.task == Task::Pretrain => {
            return err(
                "model",
                "give `from` (a checkpoint or hub id) or `config` (a shape)",
            )
        }
        (Some(_), Some(_)) => return err("model", "give either `from` or `config`, not both"),
        _ => {}
    }
    if let Some(shape) = &m.config {
        if shape.num_attention_heads == 0
            || shape.hidden_size % shape.num_attention_heads.max(1) != 0
        {
            return err(
                "model.config.num_attention_heads",
                &format!(
                    "hidden_size {} must be a multiple of num_attention_heads {}",
                    shape.hidden_size, shape.num_attention_heads
                ),
            );
        }
        if shape.num_hidden_layers == 0 {
            return err("model.config.num_hidden_layers", "must be at least 1");
        }
    }
    let tk = &r.recipe.tokenizer;
    if tk.load.is_some() && tk.train.is_some() {
        return err("tokenizer", "give either `load` or `train`, not both");
    }
    if tk.load.is_none()
        && tk.train.is_none()
        && m.from.is_none()
        && r.recipe.task == Task::Pretrain
    {
        return err(
            "tokenizer",
            "a model built from `config` needs a tokenizer: `load` one or `train` one",
        );
    }
    if let Some(tt) = &tk.train {
        if tt.vocab_size < 200 {
            return err(
                "tokenizer.train.vocab_size",
                &format!("must be at least 200, got {}", tt.vocab_size),
            );
        }
    }
    if r.recipe.data.corpus.paths.is_empty() {
        return err("data.corpus.paths", "lists no file");
    }
    match (r.recipe.task, &r.recipe.distill) {
        (Task::Distill, None) => {
            return err(
                "distill",
                "a `task: distill` recipe needs a `distill:` section (teacher, losses)",
            )
        }
        (Task::Pretrain, Some(_)) => {
            return err(
                "distill",
                "only `task: distill` recipes take a `distill:` section",
            )
        }
        _ => {}
    }
    if let Some(d) = &r.recipe.distill {
        d.validate(r)?;
    }
    Ok(())
}

/// `cpu`, `cuda`, `cuda:N`.
pub fn parse_device(s: &str) -> std::result::Result<DeviceSpec, String> {
    match s {
        "cpu" => Ok(DeviceSpec::Cpu),
        "cuda" => Ok(DeviceSpec::Cuda(0)),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(DeviceSpec::Cuda(n)),
            _ => Err(format!("expected cpu, cuda or cuda:N, got \"{s}\"")),
        },
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl DeviceSpec {
    /// The candle device; a clear error on a build without the `cuda` feature.
    pub fn device(self) -> Result<candle_core::Device> {
        match self {
            DeviceSpec::Cpu => Ok(candle_core::Device::Cpu),
            DeviceSpec::Cuda(n) => {
                if !candle_core::utils::cuda_is_available() {
                    bail!("device cuda:{n} requested, but this distil was built without the `cuda` feature (cargo build --release --features cuda)");
                }
                // One candle device per GPU in the process: tensors made on two `Device`s of
                // the same GPU would not mix (candle tells devices apart by instance).
                static OPEN: std::sync::Mutex<Vec<(usize, candle_core::Device)>> =
                    std::sync::Mutex::new(Vec::new());
                let mut open = OPEN.lock().unwrap();
                if let Some((_, d)) = open.iter().find(|(k, _)| *k == n) {
                    return Ok(d.clone());
                }
                let d = candle_core::Device::new_cuda(n)
                    .with_context(|| format!("cannot open CUDA device {n}"))?;
                crate::model::cuda::keep_freed_memory(&d)
                    .with_context(|| format!("configuring CUDA device {n}'s memory pool"))?;
                open.push((n, d.clone()));
                Ok(d)
            }
        }
    }
}
