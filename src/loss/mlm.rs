//! The masked-LM hard-target loss: cross-entropy over the masked positions
//! (label `-100` means "not masked", as in Hugging Face).

use crate::model::ops::log_softmax_last_dim;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor, D};

/// The masked positions of a batch, ready for the MLM head.
pub struct MaskedTargets {
    /// Flat indices into `batch * seq` of the masked tokens, `u32 [n]`.
    pub positions: Tensor,
    /// The original token id at each masked position, `u32 [n]`.
    pub targets: Tensor,
    pub count: usize,
}

/// Collects the positions whose label is not `-100`.
pub fn masked_positions(labels: &[i64], device: &Device) -> Result<MaskedTargets> {
    let mut pos = Vec::new();
    let mut tgt = Vec::new();
    for (i, &l) in labels.iter().enumerate() {
        if l >= 0 {
            pos.push(i as u32);
            tgt.push(l as u32);
        } else if l != -100 {
            bail!("label {l} at position {i}: labels must be token ids or -100");
        }
    }
    let count = pos.len();
    Ok(MaskedTargets {
        positions: Tensor::from_vec(pos, count, device)?,
        targets: Tensor::from_vec(tgt, count, device)?,
        count,
    })
}

/// Mean cross-entropy of `logits [n, vocab]` against `targets u32 [n]`.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let n = targets.dim(0)?;
    if n == 0 {
        bail!("cross-entropy over zero targets (no masked token in the batch)");
    }
    if crate::model::fused::enabled_for(logits) {
        let t = targets
            .to_dtype(candle_core::DType::U32)?
            .to_vec1::<u32>()?;
        return crate::model::fused::losses::cross_entropy(logits, &t);
    }
    if crate::model::cuda::applies(logits) {
        return crate::model::cuda::cross_entropy(logits, targets);
    }
    let logp = log_softmax_last_dim(logits)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, D::Minus1)?;
    Ok((picked.sum_all()?.neg()? / n as f64)?)
}
