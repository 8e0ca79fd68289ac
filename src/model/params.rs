//! A model's parameters by canonical name: trainable ([`Var`]s) or frozen (plain tensors).
//!
//! A frozen set holds plain tensors, so no op on them records a gradient: this is how the
//! teacher is frozen. A trainable set holds [`Var`]s; the optimiser updates them in place.

use super::config::EncoderConfig;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use std::collections::BTreeMap;

/// How a parameter is initialised when it is created fresh (as BERT's `_init_weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// Normal(0, initializer_range).
    Normal,
    /// Normal, with the padding row zeroed (word embeddings).
    NormalPaddingZero,
    Zeros,
    Ones,
}

/// One parameter the config calls for.
#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
    /// The part of the model it belongs to, for `inspect` and for partial loads.
    pub part: Part,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Part {
    Embeddings,
    Layers,
    Pooler,
    MlmHead,
    SeqRelationship,
}

impl Part {
    pub fn name(self) -> &'static str {
        match self {
            Part::Embeddings => "embeddings",
            Part::Layers => "layers",
            Part::Pooler => "pooler",
            Part::MlmHead => "masked-LM head",
            Part::SeqRelationship => "next-sentence / sentence-order head",
        }
    }
}

/// Which optional parts a model has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parts {
    pub pooler: bool,
    pub mlm_head: bool,
    pub seq_relationship: bool,
}

impl Parts {
    pub const MLM: Parts = Parts {
        pooler: false,
        mlm_head: true,
        seq_relationship: false,
    };
}

/// Every parameter the config calls for, with shapes.
pub fn param_specs(cfg: &EncoderConfig, parts: Parts) -> Vec<ParamSpec> {
    let (h, e, i, v) = (
        cfg.hidden_size,
        cfg.embedding_size,
        cfg.intermediate_size,
        cfg.vocab_size,
    );
    let mut out = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, init: Init, part: Part| {
        out.push(ParamSpec {
            name,
            shape,
            init,
            part,
        })
    };
    let linear = |add: &mut dyn FnMut(String, Vec<usize>, Init, Part),
                  p: &str,
                  o: usize,
                  i: usize,
                  part: Part| {
        add(format!("{p}.weight"), vec![o, i], Init::Normal, part);
        add(format!("{p}.bias"), vec![o], Init::Zeros, part);
    };
    let norm = |add: &mut dyn FnMut(String, Vec<usize>, Init, Part), p: &str, d: usize, part| {
        add(format!("{p}.weight"), vec![d], Init::Ones, part);
        add(format!("{p}.bias"), vec![d], Init::Zeros, part);
    };
    use Part::*;
    add(
        "embeddings.word_embeddings.weight".into(),
        vec![v, e],
        Init::NormalPaddingZero,
        Embeddings,
    );
    add(
        "embeddings.position_embeddings.weight".into(),
        vec![cfg.max_position_embeddings, e],
        Init::Normal,
        Embeddings,
    );
    if cfg.type_vocab_size > 0 {
        add(
            "embeddings.token_type_embeddings.weight".into(),
            vec![cfg.type_vocab_size, e],
            Init::Normal,
            Embeddings,
        );
    }
    norm(&mut add, "embeddings.LayerNorm", e, Embeddings);
    if e != h || cfg.layout == super::config::Layout::Albert {
        linear(&mut add, "embeddings.projection", h, e, Embeddings);
    }
    for k in 0..cfg.num_blocks() {
        let p = format!("encoder.layer.{k}");
        for n in ["query", "key", "value"] {
            linear(&mut add, &format!("{p}.attention.self.{n}"), h, h, Layers);
        }
        linear(
            &mut add,
            &format!("{p}.attention.output.dense"),
            h,
            h,
            Layers,
        );
        norm(
            &mut add,
            &format!("{p}.attention.output.LayerNorm"),
            h,
            Layers,
        );
        linear(&mut add, &format!("{p}.intermediate.dense"), i, h, Layers);
        linear(&mut add, &format!("{p}.output.dense"), h, i, Layers);
        norm(&mut add, &format!("{p}.output.LayerNorm"), h, Layers);
    }
    if parts.pooler {
        linear(&mut add, "pooler.dense", h, h, Pooler);
    }
    if parts.mlm_head {
        linear(&mut add, "cls.predictions.transform.dense", e, h, MlmHead);
        norm(&mut add, "cls.predictions.transform.LayerNorm", e, MlmHead);
        if !cfg.tie_word_embeddings {
            add(
                "cls.predictions.decoder.weight".into(),
                vec![v, e],
                Init::Normal,
                MlmHead,
            );
        }
        add("cls.predictions.bias".into(), vec![v], Init::Zeros, MlmHead);
    }
    if parts.seq_relationship {
        linear(&mut add, "cls.seq_relationship", 2, h, SeqRelationship);
    }
    out
}

/// Creates one parameter's initial value from `rng`.
pub fn init_tensor(
    spec: &ParamSpec,
    cfg: &EncoderConfig,
    rng: &mut ChaCha8Rng,
    device: &Device,
) -> Result<Tensor> {
    let n: usize = spec.shape.iter().product();
    let data: Vec<f32> = match spec.init {
        Init::Zeros => vec![0.0; n],
        Init::Ones => vec![1.0; n],
        Init::Normal | Init::NormalPaddingZero => {
            let normal = Normal::new(0.0f32, cfg.initializer_range as f32)
                .context("initializer_range must be finite and non-negative")?;
            let mut d: Vec<f32> = (0..n).map(|_| normal.sample(rng)).collect();
            if spec.init == Init::NormalPaddingZero {
                let width = spec.shape[1];
                let pad = cfg.pad_token_id as usize;
                if pad < spec.shape[0] {
                    d[pad * width..(pad + 1) * width].fill(0.0);
                }
            }
            d
        }
    };
    Ok(Tensor::from_vec(data, spec.shape.as_slice(), device)?)
}

/// A named set of parameters.
#[derive(Clone)]
pub struct Params {
    tensors: BTreeMap<String, Tensor>,
    vars: BTreeMap<String, Var>,
}

impl std::fmt::Debug for Params {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Params")
            .field("tensors", &self.tensors.len())
            .field("trainable", &self.is_trainable())
            .field("parameters", &self.num_parameters())
            .finish()
    }
}

impl Params {
    /// Wraps tensors; `trainable` turns each into a [`Var`] (gradients tracked).
    pub fn new(tensors: BTreeMap<String, Tensor>, trainable: bool) -> Result<Self> {
        if !trainable {
            // Detached copies: no op on a frozen model ever tracks a gradient.
            let tensors = tensors.into_iter().map(|(k, t)| (k, t.detach())).collect();
            return Ok(Params {
                tensors,
                vars: BTreeMap::new(),
            });
        }
        let mut vars = BTreeMap::new();
        let mut out = BTreeMap::new();
        for (k, t) in tensors {
            let var = Var::from_tensor(&t.contiguous()?)?;
            out.insert(k.clone(), var.as_tensor().clone());
            vars.insert(k, var);
        }
        Ok(Params { tensors: out, vars })
    }

    /// Fresh random parameters for `cfg`, drawn from a seeded RNG.
    pub fn random(
        cfg: &EncoderConfig,
        parts: Parts,
        seed: u64,
        device: &Device,
        trainable: bool,
    ) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut map = BTreeMap::new();
        for spec in param_specs(cfg, parts) {
            let t = init_tensor(&spec, cfg, &mut rng, device)?;
            map.insert(spec.name, t);
        }
        Params::new(map, trainable)
    }

    pub fn get(&self, name: &str) -> Result<Tensor> {
        match self.tensors.get(name) {
            Some(t) => Ok(t.clone()),
            None => bail!("missing parameter \"{name}\""),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn is_trainable(&self) -> bool {
        !self.vars.is_empty()
    }

    /// The trainable variables by name (empty for a frozen set).
    pub fn vars(&self) -> &BTreeMap<String, Var> {
        &self.vars
    }

    pub fn tensors(&self) -> &BTreeMap<String, Tensor> {
        &self.tensors
    }

    pub fn num_parameters(&self) -> usize {
        self.tensors.values().map(|t| t.elem_count()).sum()
    }

    /// A copy of every tensor in `dtype` (for saving or for a frozen copy).
    pub fn snapshot(&self, dtype: DType) -> Result<BTreeMap<String, Tensor>> {
        self.tensors
            .iter()
            .map(|(k, t)| Ok((k.clone(), t.to_dtype(dtype)?.detach().copy()?)))
            .collect()
    }
}
