//! Differentiable building blocks.
//!
//! candle 0.11's fused `LayerNorm::forward`, `softmax_last_dim` and `rms_norm` record no
//! backward, so gradients upstream of them silently vanish. Everything here is composed of
//! ops that candle differentiates, and `tests/gradients.rs` checks every parameter's gradient
//! against PyTorch.

use super::config::Activation;
use super::fused::dropout::Mask;
use anyhow::Result;
use candle_core::{DType, Tensor, D};
use rand_chacha::ChaCha8Rng;

/// A dense layer: `x · Wᵀ + b`, with `W` stored `[out, in]` as in PyTorch.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_in(x, x.dtype())
    }

    /// [`Linear::forward`] with the matmul done in `compute` (mixed precision): `x` and `W`
    /// are cast to it for the product, and the product back to `x`'s dtype before the bias.
    /// The casts are differentiable, so the gradients reach the f32 weights in f32.
    pub fn forward_in(&self, x: &Tensor, compute: DType) -> Result<Tensor> {
        let dims = x.dims();
        let in_dim = *dims.last().unwrap();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, in_dim))?;
        // The weight is cast before it is transposed, so the product reads it as stored.
        let w = self.weight.to_dtype(compute)?;
        let mut y = matmul_in(&x2, &w.t()?, compute)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().unwrap() = self.weight.dim(0)?;
        Ok(y.reshape(out_dims)?)
    }
}

/// `a · b` computed in `compute` and returned in `a`'s dtype (the plain product when the
/// dtypes agree).
pub fn matmul_in(a: &Tensor, b: &Tensor, compute: DType) -> Result<Tensor> {
    // `to_dtype` to the tensor's own dtype returns the tensor itself (no copy, no node).
    Ok(a.to_dtype(compute)?
        .matmul(&b.to_dtype(compute)?)?
        .to_dtype(a.dtype())?)
}

/// Layer normalisation over the last dimension, built from differentiable ops.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        Ok(normed
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)?)
    }
}

/// Softmax over the last dimension. The max is subtracted for stability and detached:
/// softmax is invariant to the shift, so the gradient is unchanged.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&sum)?)
}

/// `log_softmax` over the last dimension, differentiable.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// The configured activation (candle's `gelu_erf` and `gelu` have backward passes).
pub fn activate(x: &Tensor, act: Activation) -> Result<Tensor> {
    Ok(match act {
        Activation::GeluErf => x.gelu_erf()?,
        Activation::GeluTanh => x.gelu()?,
        Activation::Relu => x.relu()?,
    })
}

/// Inverted dropout. On the CPU the mask is drawn from `rng` (candle's CPU RNG cannot be
/// seeded): [`Mask::draw`]'s, the same the fused kernels draw from the same RNG state. On a
/// GPU it is drawn there, from the device's generator, which [`Encoder::forward`] reseeds
/// from `rng` at the start of each training pass: drawing it on the host and copying it over
/// would cost more than the step's matmuls. With `rng == None` or `p == 0` the input is
/// returned unchanged.
///
/// [`Encoder::forward`]: super::Encoder::forward
pub fn dropout(x: &Tensor, p: f32, rng: Option<&mut ChaCha8Rng>) -> Result<Tensor> {
    let Some(rng) = rng else {
        return Ok(x.clone());
    };
    if p <= 0.0 {
        return Ok(x.clone());
    }
    if !x.device().is_cpu() {
        let u = Tensor::rand(0f32, 1f32, x.shape(), x.device())?;
        let keep = (u.ge(p as f64)?.to_dtype(x.dtype())? * (1.0 / (1.0 - p as f64)))?;
        return Ok(x.mul(&keep)?);
    }
    let m = Mask::draw(rng, x.elem_count(), p);
    let mask: Vec<f32> = (0..x.elem_count()).map(|i| m.factor(i)).collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok(x.mul(&mask)?)
}

/// Mean of a tensor's elements as an `f32` scalar (for logging).
pub fn scalar_f32(x: &Tensor) -> Result<f32> {
    Ok(x.to_dtype(DType::F32)?
        .flatten_all()?
        .mean(0)?
        .to_scalar::<f32>()?)
}
