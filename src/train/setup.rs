//! From a recipe to what the loop needs: tokenizer, data, model.

use crate::data::{prepare, BatchConfig, Batcher, BertVocabOptions, Corpus, Masker, Prepared, Tok};
use crate::model::hub::resolve;
use crate::model::{load_encoder, Encoder, LoadOptions, Params, Parts};
use crate::recipe::{parse_device, DeviceSpec, Recipe, TokenizerKind, TrainingArgs};
use crate::train::distributed;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use std::path::Path;
use std::sync::Arc;

/// The tokenizer a recipe asks for. A tokenizer trained by the recipe is saved in
/// `run_root/tokenizer` and reused from there (on resume, and by later generations).
pub fn tokenizer(recipe: &Recipe, run_root: &Path, verbose: bool) -> Result<Tok> {
    let t = &recipe.tokenizer;
    let bert = BertVocabOptions {
        lowercase: t.lowercase.unwrap_or(true),
        ..Default::default()
    };
    if let Some(path) = &t.load {
        let p = if Path::new(path).exists() {
            path.into()
        } else {
            resolve(path)?
        };
        return Ok(Tok::load(&p, &bert)?);
    }
    if let Some(train) = &t.train {
        let saved = run_root.join("tokenizer");
        if saved.join("tokenizer.json").is_file() {
            return Ok(Tok::load(&saved, &bert)?);
        }
        let corpus = Corpus::open(&recipe.data.corpus)?;
        if verbose {
            eprintln!(
                "training a {:?} tokenizer (vocabulary {}) on {}",
                train.kind,
                train.vocab_size,
                corpus.describe()
            );
        }
        let tok = match train.kind {
            TokenizerKind::Wordpiece => Tok::train_wordpiece(
                &corpus,
                &crate::data::tokenizer::WordPieceTrainOptions {
                    vocab_size: train.vocab_size,
                    min_frequency: train.min_frequency,
                    limit_alphabet: Some(1000),
                    normalizer: BertVocabOptions {
                        lowercase: train.lowercase,
                        ..Default::default()
                    },
                    extra_special_tokens: vec![],
                },
            )?,
            TokenizerKind::Bpe => Tok::train_byte_level_bpe(
                &corpus,
                &crate::data::tokenizer::BpeTrainOptions {
                    vocab_size: train.vocab_size,
                    min_frequency: train.min_frequency,
                    add_prefix_space: true,
                    extra_special_tokens: vec![],
                },
            )?,
        };
        tok.save(&saved)?;
        return Ok(Tok::load(&saved, &bert)?);
    }
    match &recipe.model.from {
        Some(m) => {
            let dir = resolve(m)?;
            Tok::load(&dir, &bert).with_context(|| {
                format!(
                    "model {m} has no tokenizer files in {}; give tokenizer.load",
                    dir.display()
                )
            })
        }
        None => bail!("the recipe gives no tokenizer (tokenizer.load or tokenizer.train)"),
    }
}

/// The training batches and (if the data has a held-out split) the evaluation batches.
pub struct DataSetup {
    pub prepared: Prepared,
    pub train: Batcher,
    pub eval: Option<Batcher>,
}

pub fn data(recipe: &Recipe, tok: &Tok) -> Result<DataSetup> {
    let prepared = prepare(&recipe.data, tok)?;
    let masker = Arc::new(Masker::new(
        &recipe.data.masking,
        tok,
        Some(prepared.cache.counts()),
    )?);
    let t = &recipe.training;
    let mut bc = BatchConfig::new(t.per_device_train_batch_size);
    bc.group_by_length = t.group_by_length;
    let train = Batcher::new(
        prepared.splits.train.clone(),
        masker.clone(),
        bc,
        t.seed,
        tok,
    )?;
    let eval = match &prepared.splits.eval {
        Some(e) if !e.is_empty() => {
            let mut bc = BatchConfig::new(t.per_device_eval_batch_size);
            bc.shuffle = false;
            Some(Batcher::new(
                e.clone(),
                masker,
                bc,
                t.seed ^ 0x6576_616c,
                tok,
            )?)
        }
        _ => None,
    };
    Ok(DataSetup {
        prepared,
        train,
        eval,
    })
}

/// The training device: `training.device`, or each rank's `cuda:LOCAL_RANK` in a
/// data-parallel run (which needs a CUDA device in the recipe).
pub fn device(recipe: &Recipe) -> Result<Device> {
    let spec = parse_device(&recipe.training.device)
        .map_err(|e| anyhow::anyhow!("training.device: {e}"))?;
    let dist = distributed::current()?;
    if let Some(d) = dist.device() {
        if spec == DeviceSpec::Cpu {
            bail!(
                "training.device: cpu, but WORLD_SIZE={}: data-parallel training runs one process per GPU (device: cuda)",
                dist.world_size
            );
        }
        return Ok(d.clone());
    }
    spec.device()
}

/// A device named in a recipe besides the training one (the teacher's): in a data-parallel
/// run a CUDA device is this rank's own GPU.
pub fn other_device(spec: DeviceSpec) -> Result<Device> {
    let dist = distributed::current()?;
    match (spec, dist.device()) {
        (DeviceSpec::Cuda(_), Some(d)) => Ok(d.clone()),
        _ => spec.device(),
    }
}

/// The model a pretraining recipe trains: loaded from `model.from` or built from
/// `model.config` with a seeded initialisation.
pub fn model(recipe: &Recipe, tok: &Tok, device: &Device, verbose: bool) -> Result<Encoder> {
    let seed = recipe.training.seed;
    let pairs = recipe.data.sequences.pairs.is_some();
    let enc = match (&recipe.model.from, &recipe.model.config) {
        (Some(m), _) => {
            let dir = resolve(m)?;
            let (enc, report) = load_encoder(
                &dir,
                device,
                &LoadOptions {
                    trainable: true,
                    seed,
                    ..Default::default()
                },
            )?;
            if verbose {
                for part in &report.initialised_fresh {
                    eprintln!("{m}: no {part} in the checkpoint; initialised fresh");
                }
                for n in &report.notes {
                    eprintln!("{m}: {n}");
                }
            }
            enc
        }
        (None, Some(shape)) => {
            let cfg = shape.to_config(tok.vocab_size(), tok.special_ids().pad);
            cfg.validate("recipe model.config")?;
            let parts = Parts {
                pooler: pairs,
                mlm_head: true,
                seq_relationship: pairs,
            };
            Encoder::new(
                cfg.clone(),
                Params::random(&cfg, parts, seed, device, true)?,
            )?
        }
        (None, None) => bail!("the recipe's model section gives neither `from` nor `config`"),
    };
    tok.check_model_vocab(enc.cfg.vocab_size)?;
    let mut enc = enc;
    mixed_precision(&mut enc, &recipe.training)?;
    Ok(enc)
}

/// Sets the model's matmul dtype from `training.bf16` / `training.fp16` (see
/// [`Encoder::set_compute_dtype`]); mixed precision on a CPU model is an error naming the key.
pub fn mixed_precision(enc: &mut Encoder, args: &TrainingArgs) -> Result<()> {
    let dtype = args.compute_dtype();
    if dtype != DType::F32 && enc.device().is_cpu() {
        let key = if args.bf16 {
            "training.bf16"
        } else {
            "training.fp16"
        };
        bail!("{key}: mixed precision needs a CUDA device (device: cpu)");
    }
    enc.set_compute_dtype(dtype);
    Ok(())
}
