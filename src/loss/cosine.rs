//! The hidden-state cosine loss: `1 − cos(student, teacher)` averaged over real tokens
//! (DistilBERT's `CosineEmbeddingLoss` with target 1).

use anyhow::{bail, Result};
use candle_core::{Tensor, D};

/// `student`, `teacher`: `[batch, seq, hidden]`; `mask`: `u32 [batch, seq]` (1 = real token).
pub fn cosine_loss(student: &Tensor, teacher: &Tensor, mask: &Tensor) -> Result<Tensor> {
    if crate::model::fused::enabled_for(student) && crate::model::fused::enabled_for(teacher) {
        let m = mask
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        return match crate::model::fused::losses::cosine_loss(student, teacher, &m)? {
            Some(l) => Ok(l),
            None => bail!("cosine loss over zero real tokens"),
        };
    }
    let teacher = teacher.detach();
    let dot = (student * &teacher)?.sum(D::Minus1)?;
    let ns = student.sqr()?.sum(D::Minus1)?.sqrt()?;
    let nt = teacher.sqr()?.sum(D::Minus1)?.sqrt()?;
    // PyTorch's cosine_similarity clamps each norm at eps = 1e-8.
    let cos = (dot / (ns.clamp(1e-8, f64::MAX)? * nt.clamp(1e-8, f64::MAX)?)?)?;
    let m = mask.to_dtype(cos.dtype())?;
    let n = m
        .sum_all()?
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()?;
    if n == 0.0 {
        bail!("cosine loss over zero real tokens");
    }
    let loss = ((1.0 - cos)? * m)?.sum_all()?;
    Ok((loss / n)?)
}
