//! The soft-target loss: KL(teacher ‖ student) at temperature T, times T² (Hinton et al.;
//! DistilBERT's `KLDivLoss(reduction="batchmean")` · T²).

use crate::model::ops::{log_softmax_last_dim, softmax_last_dim};
use anyhow::{bail, Result};
use candle_core::Tensor;

/// The teacher's distribution at temperature `t` (detached: nothing flows into the teacher).
pub fn teacher_probs(teacher_logits: &Tensor, t: f64) -> Result<Tensor> {
    if crate::model::fused::enabled_for(teacher_logits) {
        return crate::model::fused::losses::softmax_no_grad(teacher_logits, t);
    }
    if crate::model::cuda::applies(teacher_logits) {
        return crate::model::cuda::softmax_no_grad(teacher_logits, 1.0 / t);
    }
    softmax_last_dim(&(teacher_logits.detach() / t)?)
}

/// `Σ p_t (log p_t − log softmax(s/T)) / rows · T²` for student logits `[rows, vocab]` and
/// teacher probabilities `[rows, vocab]` (already at temperature `t`).
pub fn soft_kl(student_logits: &Tensor, teacher_p: &Tensor, t: f64) -> Result<Tensor> {
    let rows = student_logits.dim(0)?;
    if rows == 0 {
        bail!("soft-target loss over zero positions");
    }
    if crate::model::fused::enabled_for(student_logits)
        && crate::model::fused::enabled_for(teacher_p)
    {
        return crate::model::fused::losses::soft_kl(student_logits, teacher_p, t);
    }
    if crate::model::cuda::applies(student_logits) && crate::model::cuda::applies(teacher_p) {
        return crate::model::cuda::soft_kl(student_logits, teacher_p, t);
    }
    let log_q = log_softmax_last_dim(&(student_logits / t)?)?;
    // p log p, with 0 log 0 = 0.
    let p = teacher_p.detach();
    let log_p = p.clamp(1e-30, 1.0)?.log()?;
    let kl = (p.mul(&(log_p - log_q)?)?).sum_all()?;
    Ok((kl * (t * t / rows as f64))?)
}
