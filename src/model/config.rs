//! The encoder's configuration, read from (and written to) Hugging Face `config.json` files.
//!
//! One [`EncoderConfig`] covers the BERT, RoBERTa, DistilBERT and ALBERT layouts: they differ
//! only in their embeddings (token types, position offset, factorised size), in whether layers
//! are shared, and in the names their checkpoints give the tensors (see [`super::names`]).

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};
use std::path::Path;

/// The checkpoint family: decides tensor names and a few architectural details.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    Bert,
    Roberta,
    DistilBert,
    Albert,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::Bert => "bert",
            Layout::Roberta => "roberta",
            Layout::DistilBert => "distilbert",
            Layout::Albert => "albert",
        }
    }

    pub fn from_model_type(s: &str) -> Option<Layout> {
        match s {
            "bert" => Some(Layout::Bert),
            "roberta" => Some(Layout::Roberta),
            "distilbert" => Some(Layout::DistilBert),
            "albert" => Some(Layout::Albert),
            _ => None,
        }
    }
}

/// The feed-forward activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Activation {
    /// The exact form, `x·Φ(x)` with the error function (`"gelu"` in Hugging Face configs).
    #[serde(rename = "gelu")]
    GeluErf,
    /// The tanh approximation (`"gelu_new"`, `"gelu_pytorch_tanh"`, `"gelu_fast"`).
    #[serde(rename = "gelu_new")]
    GeluTanh,
    #[serde(rename = "relu")]
    Relu,
}

impl Activation {
    pub fn parse(s: &str) -> Option<Activation> {
        match s {
            "gelu" | "gelu_python" => Some(Activation::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" | "gelu_accurate" => {
                Some(Activation::GeluTanh)
            }
            "relu" => Some(Activation::Relu),
            _ => None,
        }
    }

    pub fn hf_name(self) -> &'static str {
        match self {
            Activation::GeluErf => "gelu",
            Activation::GeluTanh => "gelu_new",
            Activation::Relu => "relu",
        }
    }
}

/// Everything the encoder needs to know about its shape.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderConfig {
    pub layout: Layout,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    /// Width of the token embeddings: equal to `hidden_size` except in ALBERT, where a
    /// projection maps them up to the hidden size.
    pub embedding_size: usize,
    /// ALBERT's layer sharing: `num_layers` layers drawn from `num_groups` groups of
    /// `inner_group_num` parameter sets each. `1 / 1` with `shared_layers == false` for BERT.
    pub shared_layers: bool,
    pub num_groups: usize,
    pub inner_group_num: usize,
    pub hidden_act: Activation,
    pub max_position_embeddings: usize,
    /// 0 when the model has no token-type (segment) embeddings (DistilBERT).
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub pad_token_id: u32,
    pub hidden_dropout: f32,
    pub attention_dropout: f32,
    pub initializer_range: f64,
    /// Whether the MLM decoder shares the word-embedding matrix.
    pub tie_word_embeddings: bool,
}

impl EncoderConfig {
    /// A BERT-layout config with BERT's defaults for everything not given.
    pub fn bert(vocab_size: usize, hidden: usize, layers: usize, heads: usize, ffn: usize) -> Self {
        EncoderConfig {
            layout: Layout::Bert,
            vocab_size,
            hidden_size: hidden,
            num_layers: layers,
            num_heads: heads,
            intermediate_size: ffn,
            embedding_size: hidden,
            shared_layers: false,
            num_groups: 1,
            inner_group_num: 1,
            hidden_act: Activation::GeluErf,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
            hidden_dropout: 0.1,
            attention_dropout: 0.1,
            initializer_range: 0.02,
            tie_word_embeddings: true,
        }
    }

    /// Number of distinct parameter sets for transformer layers.
    pub fn num_blocks(&self) -> usize {
        if self.shared_layers {
            self.num_groups * self.inner_group_num
        } else {
            self.num_layers
        }
    }

    /// The parameter blocks run, in order, for layer `layer` (ALBERT runs a whole group).
    pub fn blocks_for_layer(&self, layer: usize) -> std::ops::Range<usize> {
        if self.shared_layers {
            let group = layer * self.num_groups / self.num_layers;
            group * self.inner_group_num..(group + 1) * self.inner_group_num
        } else {
            layer..layer + 1
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// RoBERTa numbers positions from `pad_token_id + 1`.
    pub fn position_offset(&self) -> usize {
        match self.layout {
            Layout::Roberta => self.pad_token_id as usize + 1,
            _ => 0,
        }
    }

    /// Checks internal consistency; `origin` names where the config came from.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let checks: [(bool, String); 7] = [
            (self.vocab_size > 0, "vocab_size must be > 0".into()),
            (self.hidden_size > 0, "hidden_size must be > 0".into()),
            (self.num_layers > 0, "num_hidden_layers must be > 0".into()),
            (
                self.num_heads > 0 && self.hidden_size.is_multiple_of(self.num_heads),
                format!(
                    "hidden_size {} must be a multiple of num_attention_heads {}",
                    self.hidden_size, self.num_heads
                ),
            ),
            (
                self.intermediate_size > 0,
                "intermediate_size must be > 0".into(),
            ),
            (
                !self.shared_layers
                    || (self.num_groups > 0
                        && self.inner_group_num > 0
                        && self.num_groups <= self.num_layers),
                format!(
                    "num_hidden_groups {} must be between 1 and num_hidden_layers {}",
                    self.num_groups, self.num_layers
                ),
            ),
            (
                (0.0..1.0).contains(&self.hidden_dropout)
                    && (0.0..1.0).contains(&self.attention_dropout),
                "dropout probabilities must be in [0, 1)".into(),
            ),
        ];
        for (ok, msg) in checks {
            if !ok {
                bail!("{origin}: invalid config: {msg}");
            }
        }
        Ok(())
    }

    /// Reads a Hugging Face `config.json`. `layout` is the layout detected from the weights
    /// (which wins over `model_type`); `None` trusts `model_type`.
    pub fn from_hf_file(path: &Path, layout: Option<Layout>) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read model config {}", path.display()))?;
        let value: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", path.display()))?;
        Self::from_hf_json(&value, layout, &path.display().to_string())
    }

    /// Parses the JSON of a Hugging Face config; `origin` is used in error messages.
    pub fn from_hf_json(v: &Value, layout: Option<Layout>, origin: &str) -> Result<Self> {
        let obj = v
            .as_object()
            .with_context(|| format!("{origin}: the config must be a JSON object"))?;
        let model_type = obj.get("model_type").and_then(Value::as_str);
        let layout = match (layout, model_type) {
            (Some(l), _) => l,
            (None, Some(mt)) => Layout::from_model_type(mt).with_context(|| {
                format!(
                    "{origin}: unknown model_type \"{mt}\" (expected bert, roberta, distilbert or albert)"
                )
            })?,
            (None, None) => Layout::Bert,
        };
        let get = |keys: &[&str]| keys.iter().find_map(|k| obj.get(*k));
        let usize_of = |keys: &[&str], default: Option<usize>| -> Result<usize> {
            match get(keys) {
                Some(x) => x.as_u64().map(|n| n as usize).with_context(|| {
                    format!(
                        "{origin}: key \"{}\" must be a non-negative integer, got {x}",
                        keys[0]
                    )
                }),
                None => default
                    .with_context(|| format!("{origin}: missing key \"{}\"", keys.join("\" / \""))),
            }
        };
        let f64_of = |keys: &[&str], default: f64| -> Result<f64> {
            match get(keys) {
                Some(x) => x.as_f64().with_context(|| {
                    format!("{origin}: key \"{}\" must be a number, got {x}", keys[0])
                }),
                None => Ok(default),
            }
        };
        let act_of = |keys: &[&str], default: Activation| -> Result<Activation> {
            match get(keys) {
                Some(Value::String(s)) => Activation::parse(s).with_context(|| {
                    format!(
                        "{origin}: unsupported activation \"{s}\" in \"{}\" (expected gelu, gelu_new, gelu_pytorch_tanh or relu)",
                        keys[0]
                    )
                }),
                Some(x) => bail!("{origin}: key \"{}\" must be a string, got {x}", keys[0]),
                None => Ok(default),
            }
        };
        let cfg = match layout {
            Layout::DistilBert => {
                let hidden = usize_of(&["dim", "hidden_size"], Some(768))?;
                EncoderConfig {
                    layout,
                    vocab_size: usize_of(&["vocab_size"], None)?,
                    hidden_size: hidden,
                    num_layers: usize_of(&["n_layers", "num_hidden_layers"], Some(6))?,
                    num_heads: usize_of(&["n_heads", "num_attention_heads"], Some(12))?,
                    intermediate_size: usize_of(&["hidden_dim", "intermediate_size"], Some(3072))?,
                    embedding_size: hidden,
                    shared_layers: false,
                    num_groups: 1,
                    inner_group_num: 1,
                    hidden_act: act_of(&["activation", "hidden_act"], Activation::GeluErf)?,
                    max_position_embeddings: usize_of(&["max_position_embeddings"], Some(512))?,
                    type_vocab_size: 0,
                    layer_norm_eps: 1e-12,
                    pad_token_id: usize_of(&["pad_token_id"], Some(0))? as u32,
                    hidden_dropout: f64_of(&["dropout"], 0.1)? as f32,
                    attention_dropout: f64_of(&["attention_dropout"], 0.1)? as f32,
                    initializer_range: f64_of(&["initializer_range"], 0.02)?,
                    tie_word_embeddings: obj
                        .get("tie_word_embeddings")
                        .and_then(Value::as_bool)
                        .unwrap_or(true),
                }
            }
            Layout::Bert | Layout::Roberta | Layout::Albert => {
                let hidden = usize_of(&["hidden_size"], None)?;
                let albert = layout == Layout::Albert;
                EncoderConfig {
                    layout,
                    vocab_size: usize_of(&["vocab_size"], None)?,
                    hidden_size: hidden,
                    num_layers: usize_of(&["num_hidden_layers"], None)?,
                    num_heads: usize_of(&["num_attention_heads"], None)?,
                    intermediate_size: usize_of(&["intermediate_size"], None)?,
                    embedding_size: if albert {
                        usize_of(&["embedding_size"], Some(128))?
                    } else {
                        hidden
                    },
                    shared_layers: albert,
                    num_groups: if albert {
                        usize_of(&["num_hidden_groups"], Some(1))?
                    } else {
                        1
                    },
                    inner_group_num: if albert {
                        usize_of(&["inner_group_num"], Some(1))?
                    } else {
                        1
                    },
                    hidden_act: act_of(
                        &["hidden_act"],
                        if albert {
                            Activation::GeluTanh
                        } else {
                            Activation::GeluErf
                        },
                    )?,
                    max_position_embeddings: usize_of(&["max_position_embeddings"], Some(512))?,
                    type_vocab_size: usize_of(&["type_vocab_size"], Some(2))?,
                    layer_norm_eps: f64_of(&["layer_norm_eps"], 1e-12)?,
                    pad_token_id: usize_of(
                        &["pad_token_id"],
                        Some(if layout == Layout::Roberta { 1 } else { 0 }),
                    )? as u32,
                    hidden_dropout: f64_of(&["hidden_dropout_prob"], 0.1)? as f32,
                    attention_dropout: f64_of(&["attention_probs_dropout_prob"], 0.1)? as f32,
                    initializer_range: f64_of(&["initializer_range"], 0.02)?,
                    tie_word_embeddings: obj
                        .get("tie_word_embeddings")
                        .and_then(Value::as_bool)
                        .unwrap_or(true),
                }
            }
        };
        cfg.validate(origin)?;
        Ok(cfg)
    }

    /// The Hugging Face `config.json` for this model saved in `layout` (BERT or DistilBERT
    /// tensor names; RoBERTa and ALBERT keep their own).
    pub fn to_hf_json(&self, layout: Layout) -> Value {
        let mut m = Map::new();
        match layout {
            Layout::DistilBert => {
                m.insert("architectures".into(), json!(["DistilBertForMaskedLM"]));
                m.insert("model_type".into(), json!("distilbert"));
                m.insert("vocab_size".into(), json!(self.vocab_size));
                m.insert("dim".into(), json!(self.hidden_size));
                m.insert("n_layers".into(), json!(self.num_layers));
                m.insert("n_heads".into(), json!(self.num_heads));
                m.insert("hidden_dim".into(), json!(self.intermediate_size));
                m.insert("activation".into(), json!(self.hidden_act.hf_name()));
                m.insert(
                    "max_position_embeddings".into(),
                    json!(self.max_position_embeddings),
                );
                m.insert("sinusoidal_pos_embds".into(), json!(false));
                m.insert("dropout".into(), json!(self.hidden_dropout));
                m.insert("attention_dropout".into(), json!(self.attention_dropout));
                m.insert("initializer_range".into(), json!(self.initializer_range));
                m.insert("pad_token_id".into(), json!(self.pad_token_id));
                m.insert("tie_weights_".into(), json!(true));
            }
            _ => {
                let (arch, mt) = match layout {
                    Layout::Roberta => ("RobertaForMaskedLM", "roberta"),
                    Layout::Albert => ("AlbertForMaskedLM", "albert"),
                    _ => ("BertForMaskedLM", "bert"),
                };
                m.insert("architectures".into(), json!([arch]));
                m.insert("model_type".into(), json!(mt));
                m.insert("vocab_size".into(), json!(self.vocab_size));
                m.insert("hidden_size".into(), json!(self.hidden_size));
                m.insert("num_hidden_layers".into(), json!(self.num_layers));
                m.insert("num_attention_heads".into(), json!(self.num_heads));
                m.insert("intermediate_size".into(), json!(self.intermediate_size));
                m.insert("hidden_act".into(), json!(self.hidden_act.hf_name()));
                m.insert(
                    "max_position_embeddings".into(),
                    json!(self.max_position_embeddings),
                );
                m.insert("type_vocab_size".into(), json!(self.type_vocab_size.max(1)));
                m.insert("layer_norm_eps".into(), json!(self.layer_norm_eps));
                m.insert("pad_token_id".into(), json!(self.pad_token_id));
                m.insert("hidden_dropout_prob".into(), json!(self.hidden_dropout));
                m.insert(
                    "attention_probs_dropout_prob".into(),
                    json!(self.attention_dropout),
                );
                m.insert("initializer_range".into(), json!(self.initializer_range));
                if layout == Layout::Albert {
                    m.insert("embedding_size".into(), json!(self.embedding_size));
                    m.insert("num_hidden_groups".into(), json!(self.num_groups));
                    m.insert("inner_group_num".into(), json!(self.inner_group_num));
                }
            }
        }
        m.insert(
            "tie_word_embeddings".into(),
            json!(self.tie_word_embeddings),
        );
        Value::Object(m)
    }
}
