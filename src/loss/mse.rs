//! Mean squared error, optionally over real tokens only (logit and hidden-state matching).

use anyhow::{bail, Result};
use candle_core::{Tensor, D};

/// Mean of `(a − b)²` over every element (`b` is a target: detached).
pub fn mse(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok((a - b.detach())?.sqr()?.mean_all()?)
}

/// Mean over real tokens of the per-token mean squared error; `a`, `b`: `[batch, seq, d]`,
/// `mask`: `[batch, seq]`.
pub fn masked_mse(a: &Tensor, b: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let per_token = (a - b.detach())?.sqr()?.mean(D::Minus1)?;
    let m = mask.to_dtype(per_token.dtype())?;
    let n = m
        .sum_all()?
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()?;
    if n == 0.0 {
        bail!("MSE over zero real tokens");
    }
    Ok(((per_token * m)?.sum_all()? / n)?)
}
