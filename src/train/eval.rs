//! Held-out evaluation: MLM loss over the masked tokens, perplexity, masked-token accuracy.

use super::batch::DeviceBatch;
use crate::data::Batcher;
use crate::model::ops::log_softmax_last_dim;
use crate::model::{Encoder, ForwardOptions};
use anyhow::{bail, Result};
use candle_core::{DType, D};
use serde::Serialize;

#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct EvalResult {
    /// Mean cross-entropy over masked tokens (nats).
    pub loss: f64,
    pub perplexity: f64,
    /// Fraction of masked tokens whose arg-max prediction is the original token.
    pub accuracy: f64,
    pub masked_tokens: u64,
    pub batches: usize,
}

/// Evaluates `model` on the batches of `batcher`'s epoch 0 (its masks are fixed by its seed,
/// so every evaluation of a run sees the same masked tokens).
pub fn evaluate(
    model: &Encoder,
    batcher: &Batcher,
    max_batches: Option<usize>,
) -> Result<EvalResult> {
    let mut total = 0f64;
    let mut correct = 0u64;
    let mut count = 0u64;
    let mut batches = 0usize;
    let device = model.device().clone();
    for b in batcher.epoch(0) {
        if max_batches.is_some_and(|m| batches >= m) {
            break;
        }
        let db = DeviceBatch::new(&b, &device)?;
        batches += 1;
        if db.masked.count == 0 {
            continue;
        }
        let out = model.forward(&db.input(), ForwardOptions::default(), None)?;
        let logits = model.mlm_logits_at(&out.last_hidden_state, &db.masked.positions)?;
        let logp = log_softmax_last_dim(&logits)?;
        let picked = logp.gather(&db.masked.targets.unsqueeze(1)?, D::Minus1)?;
        total -= picked.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        let pred = logits.argmax(D::Minus1)?;
        correct += pred
            .eq(&db.masked.targets)?
            .to_dtype(DType::U32)?
            .sum_all()?
            .to_scalar::<u32>()? as u64;
        count += db.masked.count as u64;
    }
    if count == 0 {
        bail!("the held-out split has no masked token to evaluate on (is data.sequences.eval_fraction 0?)");
    }
    let loss = total / count as f64;
    Ok(EvalResult {
        loss,
        perplexity: loss.exp(),
        accuracy: correct as f64 / count as f64,
        masked_tokens: count,
        batches,
    })
}
