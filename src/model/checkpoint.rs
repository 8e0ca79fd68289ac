//! Reading and writing Hugging Face checkpoints.
//!
//! Reads `config.json` plus `model.safetensors` (single or sharded with its index) or
//! `pytorch_model.bin` (parsed as data by candle's pickle reader: nothing in it is executed).
//! Writes `config.json` + `model.safetensors` in BERT or DistilBERT layout, atomically.

use super::config::{EncoderConfig, Layout};
use super::encoder::Encoder;
use super::names::{detect_layout, from_canonical, to_canonical, Mapped};
use super::params::{init_tensor, param_specs, ParamSpec, Params, Part, Parts};
use crate::util::atomic_write;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// How to load a checkpoint.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Parameters become trainable `Var`s (a student) or frozen tensors (a teacher).
    pub trainable: bool,
    /// Seed for any part initialised fresh (a missing MLM head).
    pub seed: u64,
    /// Give the model an MLM head, fresh when the checkpoint has none.
    pub want_mlm_head: bool,
    pub dtype: DType,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            trainable: true,
            seed: 0,
            want_mlm_head: true,
            dtype: DType::F32,
        }
    }
}

/// What a load found, for the user.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub dir: PathBuf,
    pub weights_files: Vec<PathBuf>,
    pub model_type: Option<String>,
    /// Parts the checkpoint lacked that were initialised fresh.
    pub initialised_fresh: Vec<&'static str>,
    /// Optional parts it lacks (no pooler, no NSP head) and that were left out.
    pub absent: Vec<&'static str>,
    /// Tensors in the file that distil does not use.
    pub ignored: Vec<String>,
    pub notes: Vec<String>,
}

/// A checkpoint's raw tensors by their names in the file.
pub struct RawCheckpoint {
    pub tensors: BTreeMap<String, Tensor>,
    pub files: Vec<PathBuf>,
}

/// Reads every tensor of the checkpoint in `dir`.
pub fn read_weights(dir: &Path, device: &Device) -> Result<RawCheckpoint> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let bin = dir.join("pytorch_model.bin");
    let files: Vec<PathBuf> = if single.exists() {
        vec![single]
    } else if index.exists() {
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("cannot read {}", index.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{}: missing object \"weight_map\"", index.display()))?;
        let mut shards: Vec<String> = map
            .values()
            .map(|f| {
                f.as_str().map(str::to_string).with_context(|| {
                    format!("{}: weight_map values must be file names", index.display())
                })
            })
            .collect::<Result<_>>()?;
        shards.sort();
        shards.dedup();
        shards.into_iter().map(|f| dir.join(f)).collect()
    } else if bin.exists() {
        vec![bin]
    } else {
        bail!(
            "{}: no weights found (expected model.safetensors, model.safetensors.index.json or pytorch_model.bin)",
            dir.display()
        );
    };
    let mut tensors = BTreeMap::new();
    for f in &files {
        let loaded = if f.extension().is_some_and(|e| e == "bin") {
            candle_core::pickle::read_all(f)
                .with_context(|| format!("{}: not a readable PyTorch checkpoint", f.display()))?
        } else {
            read_safetensors(f, device)?
        };
        for (name, t) in loaded {
            tensors.insert(name, t.to_device(device)?);
        }
    }
    Ok(RawCheckpoint { tensors, files })
}

fn read_safetensors(path: &Path, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let data =
        std::fs::read(path).with_context(|| format!("cannot read weights {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&data).map_err(|e| {
        anyhow::anyhow!(
            "{}: corrupt or truncated safetensors file ({e})",
            path.display()
        )
    })?;
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let t = candle_core::safetensors::Load::load(&view, device)
                .with_context(|| format!("{}: cannot read tensor \"{name}\"", path.display()))?;
            Ok((name, t))
        })
        .collect()
}

/// Loads an encoder from a checkpoint directory.
pub fn load_encoder(
    dir: &Path,
    device: &Device,
    opts: &LoadOptions,
) -> Result<(Encoder, LoadReport)> {
    let config_path = dir.join("config.json");
    if !config_path.exists() {
        bail!("{}: missing config.json", dir.display());
    }
    let raw = read_weights(dir, device)?;
    let mut report = LoadReport {
        dir: dir.to_path_buf(),
        weights_files: raw.files.clone(),
        ..Default::default()
    };
    let files = raw
        .files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let layout = detect_layout(raw.tensors.keys().map(String::as_str)).with_context(|| {
        format!(
            "{files}: unknown checkpoint layout: no tensor name looks like BERT, RoBERTa, DistilBERT or ALBERT (first names: {})",
            raw.tensors.keys().take(3).cloned().collect::<Vec<_>>().join(", ")
        )
    })?;
    let config_json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&config_path)
            .with_context(|| format!("cannot read {}", config_path.display()))?,
    )
    .with_context(|| format!("{}: not valid JSON", config_path.display()))?;
    report.model_type = config_json
        .get("model_type")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    match report.model_type.as_deref() {
        None => report.notes.push(format!(
            "config.json has no model_type; layout {} detected from the tensor names",
            layout.name()
        )),
        Some(mt) if Layout::from_model_type(mt) != Some(layout) => report.notes.push(format!(
            "config.json says model_type \"{mt}\" but the tensors are in {} layout; using {}",
            layout.name(),
            layout.name()
        )),
        _ => {}
    }
    let cfg = EncoderConfig::from_hf_json(
        &config_json,
        Some(layout),
        &config_path.display().to_string(),
    )?;
    // Map names to canonical ones.
    let mut canonical: BTreeMap<String, Tensor> = BTreeMap::new();
    for (name, t) in raw.tensors {
        match to_canonical(layout, &name, cfg.inner_group_num) {
            Mapped::Param(c) => {
                if cfg.tie_word_embeddings && c == "cls.predictions.decoder.weight" {
                    continue; // tied to the word embeddings
                }
                canonical.insert(c, t);
            }
            Mapped::Ignored => report.ignored.push(name),
            Mapped::Unknown => bail!(
                "{files}: unexpected tensor \"{name}\" for a {} checkpoint",
                layout.name()
            ),
        }
    }
    let has = |p: &str| canonical.contains_key(p);
    let parts = Parts {
        pooler: has("pooler.dense.weight"),
        mlm_head: opts.want_mlm_head || has("cls.predictions.transform.dense.weight"),
        seq_relationship: has("cls.seq_relationship.weight"),
    };
    let specs = param_specs(&cfg, parts);
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let mut out = BTreeMap::new();
    let mut fresh: Vec<&ParamSpec> = Vec::new();
    for spec in &specs {
        match canonical.remove(&spec.name) {
            Some(t) => {
                if t.dims() != spec.shape.as_slice() {
                    let file_name = from_canonical(layout, &spec.name, cfg.inner_group_num)
                        .unwrap_or(spec.name.clone());
                    bail!(
                        "{files}: tensor \"{file_name}\" has shape {:?} but {} implies {:?}",
                        t.dims(),
                        config_path.display(),
                        spec.shape
                    );
                }
                out.insert(spec.name.clone(), t.to_dtype(opts.dtype)?);
            }
            None if spec.part == Part::MlmHead => {
                fresh.push(spec);
                let t = init_tensor(spec, &cfg, &mut rng, device)?.to_dtype(opts.dtype)?;
                out.insert(spec.name.clone(), t);
            }
            None => {
                let file_name = from_canonical(layout, &spec.name, cfg.inner_group_num)
                    .unwrap_or(spec.name.clone());
                bail!("{files}: missing tensor \"{file_name}\" required by the config");
            }
        }
    }
    if let Some(extra) = canonical.keys().next() {
        bail!(
            "{files}: tensor \"{}\" is not used by the model described in {}",
            from_canonical(layout, extra, cfg.inner_group_num).unwrap_or(extra.clone()),
            config_path.display()
        );
    }
    if !fresh.is_empty() {
        report.initialised_fresh.push(Part::MlmHead.name());
    }
    if !parts.pooler {
        report.absent.push(Part::Pooler.name());
    }
    if !parts.mlm_head {
        report.absent.push(Part::MlmHead.name());
    }
    let params = Params::new(out, opts.trainable)?;
    Ok((Encoder::new(cfg, params)?, report))
}

/// Saves `encoder` as a Hugging Face checkpoint in `dir` (created if needed):
/// `config.json` and `model.safetensors`, both written atomically.
///
/// `layout` must be BERT or DistilBERT for BERT-family models; RoBERTa and ALBERT models are
/// saved in their own layout. Saving as DistilBERT needs a model without token types.
pub fn save_encoder(encoder: &Encoder, dir: &Path, layout: Layout) -> Result<()> {
    let cfg = &encoder.cfg;
    let layout = match (cfg.layout, layout) {
        (Layout::Roberta | Layout::Albert, _) => cfg.layout,
        (_, l) => l,
    };
    if layout == Layout::DistilBert && cfg.type_vocab_size > 0 {
        bail!("cannot save as DistilBERT: the model has token-type embeddings (DistilBERT has none); build the student with type_vocab_size 0");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in encoder.params.tensors() {
        let Some(hf) = from_canonical(layout, name, cfg.inner_group_num) else {
            continue;
        };
        tensors.insert(hf, t.to_dtype(DType::F32)?.contiguous()?);
    }
    let mut json = cfg.to_hf_json(layout);
    if layout == Layout::Bert || layout == Layout::DistilBert {
        let arch = match (layout, encoder.has_mlm_head()) {
            (Layout::DistilBert, true) => "DistilBertForMaskedLM",
            (Layout::DistilBert, false) => "DistilBertModel",
            (_, true) if encoder.has_seq_relationship() => "BertForPreTraining",
            (_, true) => "BertForMaskedLM",
            (_, false) => "BertModel",
        };
        json["architectures"] = serde_json::json!([arch]);
    }
    let bytes = safetensors::serialize(
        tensors
            .iter()
            .map(|(k, t)| (k.clone(), t))
            .collect::<Vec<_>>(),
        Some(HashMap::from([("format".to_string(), "pt".to_string())])),
    )
    .context("cannot serialise the weights")?;
    atomic_write(&dir.join("model.safetensors"), &bytes)?;
    atomic_write(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    Ok(())
}
