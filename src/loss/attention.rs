//! KL between attention distributions (MiniLM / TinyBERT style): for each head and each real
//! query position, KL(teacher row ‖ student row), averaged.

use anyhow::{bail, Result};
use candle_core::{Tensor, D};

/// `student`, `teacher`: `[batch, heads, seq, seq]` probabilities; `mask`: `u32 [batch, seq]`.
pub fn attention_kl(student: &Tensor, teacher: &Tensor, mask: &Tensor) -> Result<Tensor> {
    if student.dims() != teacher.dims() {
        bail!(
            "attention shapes differ: student {:?}, teacher {:?} (the attention loss needs equal head counts)",
            student.dims(),
            teacher.dims()
        );
    }
    let (_, heads, _, _) = student.dims4()?;
    let p = teacher.detach();
    let log_p = p.clamp(1e-30, 1.0)?.log()?;
    let log_q = student.clamp(1e-30, 1.0)?.log()?;
    let kl_rows = (p * (log_p - log_q)?)?.sum(D::Minus1)?; // [b, h, s]
    let m = mask.to_dtype(kl_rows.dtype())?.unsqueeze(1)?; // [b, 1, s]
    let n = m
        .sum_all()?
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()?
        * heads as f64;
    if n == 0.0 {
        bail!("attention loss over zero real tokens");
    }
    Ok((kl_rows.broadcast_mul(&m)?.sum_all()? / n)?)
}
