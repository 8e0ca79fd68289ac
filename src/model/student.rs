//! Building a student from a teacher: copy the embeddings, a chosen list of layers and the MLM
//! head, as DistilBERT does.

use super::config::EncoderConfig;
use super::encoder::Encoder;
use super::params::{init_tensor, param_specs, Params, Parts};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;

/// DistilBERT's choice: `student_layers` teacher layers spread evenly from the first to the
/// last (12 → 6 gives 0, 2, 4, 7, 9, 11, the layers DistilBERT copied).
pub fn default_layer_map(teacher_layers: usize, student_layers: usize) -> Vec<usize> {
    if student_layers <= 1 {
        return vec![0; student_layers];
    }
    (0..student_layers)
        .map(|i| ((i * (teacher_layers - 1)) as f64 / (student_layers - 1) as f64).round() as usize)
        .collect()
}

/// Trainable parameters for a student of shape `cfg`, initialised from `teacher`.
///
/// The student's widths (hidden, embedding, FFN, heads, vocabulary) must equal the teacher's.
/// When the student has no token types and the teacher has, the teacher's type-0 embedding is
/// folded into the position embeddings, which is exact for single-segment input.
pub fn init_from_teacher(
    teacher: &Encoder,
    cfg: &EncoderConfig,
    layers: Option<&[usize]>,
    seed: u64,
) -> Result<Params> {
    let t = &teacher.cfg;
    let widths = [
        ("hidden_size", t.hidden_size, cfg.hidden_size),
        ("embedding_size", t.embedding_size, cfg.embedding_size),
        (
            "intermediate_size",
            t.intermediate_size,
            cfg.intermediate_size,
        ),
        ("num_attention_heads", t.num_heads, cfg.num_heads),
        ("vocab_size", t.vocab_size, cfg.vocab_size),
    ];
    for (name, tv, sv) in widths {
        if tv != sv {
            bail!("cannot initialise the student from the teacher: {name} differs (teacher {tv}, student {sv}); initialise it at random or match the widths");
        }
    }
    if t.shared_layers && t.inner_group_num != 1 {
        bail!("cannot initialise a student from an ALBERT teacher with inner_group_num > 1");
    }
    let map = match layers {
        Some(l) => l.to_vec(),
        None => default_layer_map(t.num_layers, cfg.num_layers),
    };
    if map.len() != cfg.num_blocks() {
        bail!(
            "the layer map lists {} teacher layers but the student has {} layers",
            map.len(),
            cfg.num_blocks()
        );
    }
    if let Some(&bad) = map.iter().find(|&&l| l >= t.num_layers) {
        bail!(
            "the layer map names teacher layer {bad}, but the teacher has {} layers (0–{})",
            t.num_layers,
            t.num_layers - 1
        );
    }
    let parts = Parts {
        pooler: false,
        mlm_head: true,
        seq_relationship: false,
    };
    let tp = teacher.params.tensors();
    let device = teacher.device().clone();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out: BTreeMap<String, Tensor> = BTreeMap::new();
    for spec in param_specs(cfg, parts) {
        let source = if let Some(rest) = spec.name.strip_prefix("encoder.layer.") {
            let (k, suffix) = rest.split_once('.').unwrap();
            let k: usize = k.parse()?;
            let teacher_block = t.blocks_for_layer(map[k]).start;
            Some(format!("encoder.layer.{teacher_block}.{suffix}"))
        } else {
            Some(spec.name.clone())
        };
        let value = match source.as_deref().and_then(|s| tp.get(s)) {
            Some(v) if v.dims() == spec.shape.as_slice() => {
                let mut v = v.to_dtype(DType::F32)?;
                if spec.name == "embeddings.position_embeddings.weight"
                    && cfg.type_vocab_size == 0
                    && t.type_vocab_size > 0
                {
                    let tt = tp["embeddings.token_type_embeddings.weight"]
                        .narrow(0, 0, 1)?
                        .to_dtype(DType::F32)?;
                    v = v.broadcast_add(&tt)?;
                }
                v.copy()?
            }
            Some(v) if spec.name == "embeddings.position_embeddings.weight" => {
                let n = spec.shape[0].min(v.dim(0)?);
                if n < spec.shape[0] {
                    bail!("the student's max_position_embeddings {} exceeds the teacher's {}", spec.shape[0], v.dim(0)?);
                }
                v.narrow(0, 0, n)?.to_dtype(DType::F32)?.copy()?
            }
            Some(v) => bail!(
                "cannot copy teacher tensor {} of shape {:?} into student parameter {} of shape {:?}",
                source.unwrap_or_default(),
                v.dims(),
                spec.name,
                spec.shape
            ),
            None => init_tensor(&spec, cfg, &mut rng, &device)?,
        };
        out.insert(spec.name, value);
    }
    Params::new(out, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distilbert_layer_choice() {
        assert_eq!(default_layer_map(12, 6), vec![0, 2, 4, 7, 9, 11]);
        assert_eq!(default_layer_map(4, 2), vec![0, 3]);
        assert_eq!(default_layer_map(6, 3), vec![0, 3, 5]);
        assert_eq!(default_layer_map(6, 6), vec![0, 1, 2, 3, 4, 5]);
    }
}
