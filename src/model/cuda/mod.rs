//! Fused CUDA kernels with hand-written backward passes, for what candle would run on the GPU
//! as many small kernels (or, for layer norm and softmax, as fused kernels with no backward):
//! the dense layer (cuBLAS product, then bias, activation and dropout in one pass),
//! multi-head attention (cuBLAS products around one softmax kernel with the scale and the
//! padding mask folded in), dropout, softmax, layer normalisation, the soft-target and
//! cross-entropy losses over the vocabulary, and the AdamW update.
//!
//! Each is one node of candle's graph. That matters beyond the kernel count: candle's
//! backward gives every node input a zero-filled gradient buffer and adds into it, so a dense
//! layer written as a reshape, casts, a transpose, a product, a broadcast bias add, an
//! activation and a dropout product paid that for each of them, on tensors as large as
//! `[tokens, 3072]`; attention as ~20 such nodes on `[batch, heads, seq, seq]`. Dropout draws
//! its mask from a counter-based hash of (seed, element), the seed taken from the training
//! RNG, so the backward recomputes the mask instead of storing it, and a resumed run draws
//! exactly what an uninterrupted one does.
//!
//! The kernels (`kernels.cu`) are compiled at run time with NVRTC, once per process: the build
//! needs no `nvcc` (CI checks the `cuda` feature with a stand-in that emits empty PTX), and
//! the PTX suits whatever GPU the binary meets. Every op also runs on the CPU, through the
//! kernels' twins in [`reference`], so `tests/cuda_ops.rs` checks the ops and their backward
//! passes against candle's composed ops on any machine; on a GPU, `distil parity --device
//! cuda` checks the encoder built on them against transformers, and `distil bench-step
//! --composed` times the step without them. [`applies`] says when the encoder and the
//! optimiser use them: `f32` tensors on a CUDA device, in a build with the `cuda` feature.

#[cfg(feature = "cuda")]
pub(crate) mod launch;
mod ops;
pub mod reference;

use super::config::Activation;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// Whether the encoder and the optimiser run these ops on `t`: an `f32` tensor on a CUDA
/// device (never in a build without the `cuda` feature).
pub fn applies(t: &Tensor) -> bool {
    cfg!(feature = "cuda") && t.device().is_cuda() && t.dtype() == DType::F32
}

/// Keeps the device memory a training step frees for the next step instead of returning it
/// to the driver at each synchronisation (see `launch::keep_freed_memory`); call it once
/// when opening a CUDA device. A no-op on the CPU and in builds without the `cuda` feature.
/// `DISTIL_CUDA_POOL=release` leaves the driver's default (for side-by-side measurements);
/// `keep` (or unset) is the default.
pub fn keep_freed_memory(device: &candle_core::Device) -> Result<()> {
    match std::env::var("DISTIL_CUDA_POOL").as_deref() {
        Err(_) | Ok("keep") => {}
        Ok("release") => return Ok(()),
        Ok(other) => bail!("DISTIL_CUDA_POOL must be keep or release, not '{other}'"),
    }
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = device {
        launch::keep_freed_memory(d)?;
    }
    let _ = device;
    Ok(())
}

/// `table[ids]`: rows of `table` `[rows, h]` for `ids` (`u32`, 1-d, on the table's device),
/// `[ids, h]`; the table's gradient is summed per id in a fixed order (the same bits every
/// run, on the CPU twin too), without candle's single-block `index_add`.
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (_, h) = table.dims2()?;
    if ids.rank() != 1 || ids.dtype() != DType::U32 || h == 0 {
        bail!(
            "embedding: expected 1-d u32 ids and a [rows, hidden] table, got {:?} {:?} and {:?}",
            ids.dims(),
            ids.dtype(),
            table.dims()
        );
    }
    if !ids.device().same_device(table.device()) {
        bail!(
            "embedding: the ids are on {:?}, the table on {:?}",
            ids.device(),
            table.device()
        );
    }
    if ids.elem_count() == 0 {
        return Ok(Tensor::zeros((0, h), table.dtype(), table.device())?);
    }
    let op = ops::Embedding {
        ids: ids.contiguous()?,
    };
    Ok(table.contiguous()?.apply_op1(op)?)
}

/// Inverted dropout of `x` with probability `p` (0 < p < 1) under `seed` (draw it from the
/// training RNG).
pub fn dropout(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(ops::Dropout { p, seed })?)
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let op = ops::Softmax {
        mask: None,
        scale: 1.0,
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

/// `softmax(x · scale)` over the last dimension, outside the graph (the teacher's
/// probabilities at temperature `1 / scale`).
pub fn softmax_no_grad(x: &Tensor, scale: f64) -> Result<Tensor> {
    let op = ops::Softmax {
        mask: None,
        scale: scale as f32,
    };
    Ok(x.detach().contiguous()?.apply_op1_no_bwd(&op)?)
}

/// The soft-target loss `Σ p (ln p − ln softmax(s/T)) / rows · T²` for student logits
/// `[rows, vocab]` and teacher probabilities at temperature `t` (no gradient to them).
pub fn soft_kl(student_logits: &Tensor, teacher_p: &Tensor, t: f64) -> Result<Tensor> {
    let rows = student_logits.dim(0)?;
    let op = ops::RowLoss {
        kl: Some((1.0 / t) as f32),
    };
    let per_row = student_logits
        .contiguous()?
        .apply_op2(&teacher_p.detach().contiguous()?, op)?;
    Ok((per_row.sum_all()? * (t * t / rows as f64))?)
}

/// Mean cross-entropy of `logits [rows, vocab]` against integer `targets [rows]`.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let rows = targets.dim(0)?;
    let t = targets.to_dtype(DType::F32)?.contiguous()?;
    let per_row = logits
        .contiguous()?
        .apply_op2(&t, ops::RowLoss { kl: None })?;
    Ok((per_row.sum_all()? / rows as f64)?)
}

/// Layer normalisation over the last dimension: `(x - mean) / sqrt(var + eps) · w + b`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let op = ops::LayerNorm { eps: eps as f32 };
    Ok(x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, op)?)
}

/// The dense layer `dropout(act(x · Wᵀ + b))` as one graph node, for `x` `[.., in]`, `w`
/// `[out, in]`, `b` `[out]`: the products in `compute` (mixed precision: inputs cast to it,
/// products cast back to f32, as [`super::ops::matmul_in`], except the forward's bf16
/// product, which the epilogue kernel reads as it is); dropout with probability
/// `dropout.0` under seed `dropout.1` when given.
pub fn linear(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    act: Option<Activation>,
    dropout: Option<(f32, u64)>,
    compute: DType,
) -> Result<Tensor> {
    linear_from(x, None, w, b, act, dropout, compute)
}

/// [`linear`] with `x` already in the compute dtype: `x_low` is `x` detached, as
/// `[rows, in]`, cast to `compute` (a bf16 / f16 copy several layers share: the attention's
/// q, k and v projections read the same `x`, and one cast serves the three products and
/// their backward). `None` casts `x` here.
pub fn linear_from(
    x: &Tensor,
    x_low: Option<Tensor>,
    w: &Tensor,
    b: &Tensor,
    act: Option<Activation>,
    dropout: Option<(f32, u64)>,
    compute: DType,
) -> Result<Tensor> {
    let (out_f, in_f) = w.dims2()?;
    if x.dims().last() != Some(&in_f) || b.elem_count() != out_f {
        bail!(
            "dense layer: input {:?}, weight {:?} and bias {:?} disagree",
            x.dims(),
            w.dims(),
            b.dims()
        );
    }
    let rows = x.elem_count() / in_f.max(1);
    // The product, outside the graph: the node's backward computes its gradients. In bf16 it
    // stays bf16 (the epilogue widens it as it reads), and the bf16 copies of x and W are
    // kept for the backward's products.
    let xc = match x_low {
        Some(xl) if xl.dims() == [rows, in_f] && xl.dtype() == compute => xl,
        Some(xl) => bail!(
            "dense layer: the input's {compute:?} copy is {:?} {:?}, expected {:?} [{rows}, {in_f}]",
            xl.dtype(),
            xl.dims(),
            compute
        ),
        None => x.detach().reshape((rows, in_f))?.to_dtype(compute)?,
    };
    let wc = w.detach().to_dtype(compute)?;
    let pre = xc.matmul(&wc.t()?)?;
    let pre = if compute == DType::BF16 {
        pre.contiguous()?
    } else {
        pre.to_dtype(DType::F32)?.contiguous()?
    };
    let low = (compute != DType::F32).then_some((xc, wc));
    let (p, seed) = dropout.filter(|&(p, _)| p > 0.0).unwrap_or((0.0, 0));
    let op = ops::Dense {
        pre,
        act: match act {
            None => 0,
            Some(Activation::GeluErf) => 1,
            Some(Activation::GeluTanh) => 2,
            Some(Activation::Relu) => 3,
        },
        p,
        seed,
        compute,
        low,
    };
    Ok(x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, op)?)
}

/// Multi-head attention as one graph node: `q`, `k`, `v` `[batch, seq, hidden]` (the
/// projections), `heads` heads, the additive key mask `[batch, 1, 1, seq]` (none: no
/// padding), dropout on the probabilities with probability `dropout.0` under seed
/// `dropout.1` when given, products in `compute`. Returns the context `[batch, seq, hidden]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
    dropout: Option<(f32, u64)>,
    compute: DType,
) -> Result<Tensor> {
    let (b, s, h) = q.dims3()?;
    if heads == 0 || h % heads != 0 || k.dims() != q.dims() || v.dims() != q.dims() {
        bail!(
            "attention: q {:?}, k {:?}, v {:?} with {heads} heads",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let scale = 1.0 / ((h / heads) as f32).sqrt();
    let c = compute;
    let [qh, kh, vh] = [q, k, v].map(|t| ops::split_heads(&t.detach(), heads, c));
    let (qh, kh, vh) = (qh?, kh?, vh?);
    // In bf16 the softmax kernel reads the product's bf16 scores as they are (no cast pass).
    let scores = qh.matmul(&kh.t()?)?;
    let scores = match scores.dtype() {
        DType::F32 | DType::BF16 => scores.contiguous()?,
        _ => scores.to_dtype(DType::F32)?,
    };
    let mask = match mask {
        Some(m) if m.elem_count() != b * s => bail!(
            "attention: an additive key mask {:?} for {b} sequences of {s} (want [{b}, 1, 1, {s}])",
            m.dims()
        ),
        Some(m) => m
            .detach()
            .to_dtype(DType::F32)?
            .flatten_all()?
            .contiguous()?,
        None => Tensor::zeros(b * s, DType::F32, q.device())?,
    };
    let probs = scores.apply_op1_no_bwd(&ops::Softmax {
        mask: Some(mask),
        scale,
    })?;
    let dropout = dropout
        .filter(|&(p, _)| p > 0.0)
        .map(|(p, seed)| ops::Dropout { p, seed });
    let probs_d = match &dropout {
        Some(d) => probs.apply_op1_no_bwd(d)?,
        None => probs.clone(),
    };
    let ctx = ops::merge_heads(&probs_d.to_dtype(c)?.matmul(&vh)?)?;
    let op = ops::Attention {
        ctx,
        qh,
        kh,
        vh,
        probs,
        dropout,
        scale,
        compute,
    };
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

/// The AdamW step's scalars (`train::optim` computes them; its CPU update takes them too).
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    pub step_size: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub decay_factor: f32,
    pub bias_correction2_sqrt: f32,
    pub grad_scale: f32,
}

/// One AdamW step on `param` (updated in place) with gradient `grad` and moments `m`, `v`
/// (updated in place); all four `f32`, contiguous, on one CUDA device, of one size. (The CPU
/// keeps its moments on the host and has its own update, `train::optim`.)
pub fn adamw(param: &Tensor, grad: &Tensor, m: &Tensor, v: &Tensor, s: AdamWStep) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        param.inplace_op2(&grad.contiguous()?, &adamw::AdamW { m, v, s })?;
        Ok(())
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (param, grad, m, v, s);
        bail!("the CUDA AdamW update needs a build with the `cuda` feature")
    }
}

#[cfg(feature = "cuda")]
mod adamw {
    use super::launch::{elementwise_grid, err, launch, view, view_of, CResult};
    use super::AdamWStep;
    use candle_core::backend::BackendStorage;
    use candle_core::{CpuStorage, CudaStorage, InplaceOp2, Layout, Tensor};

    /// In place on the parameter, with the gradient as source; the moments are updated in
    /// place through their device pointers (they belong to the optimiser alone).
    pub struct AdamW<'a> {
        pub m: &'a Tensor,
        pub v: &'a Tensor,
        pub s: AdamWStep,
    }

    impl InplaceOp2 for AdamW<'_> {
        fn name(&self) -> &'static str {
            "cuda-adamw"
        }
        fn cpu_fwd(
            &self,
            _: &mut CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> CResult<()> {
            Err(err(format!(
                "{}: a CUDA op, called on the CPU",
                self.name()
            )))
        }
        fn cuda_fwd(
            &self,
            ps: &mut CudaStorage,
            pl: &Layout,
            gs: &CudaStorage,
            gl: &Layout,
        ) -> CResult<()> {
            let n = pl.shape().elem_count();
            let dev = ps.device().clone();
            let g = view(gs, gl, self.name())?;
            let (ms, ml) = self.m.storage_and_layout();
            let (vs, vl) = self.v.storage_and_layout();
            let (m, v) = (
                view_of(&ms, ml, self.name())?,
                view_of(&vs, vl, self.name())?,
            );
            if [gl, ml, vl].iter().any(|l| l.shape().elem_count() != n) {
                return Err(err(format!(
                    "{}: parameter, gradient and moments differ in size",
                    self.name()
                )));
            }
            let (a, _) = pl
                .contiguous_offsets()
                .ok_or_else(|| err(format!("{}: the parameter is not contiguous", self.name())))?;
            let mut p = ps.as_cuda_slice_mut::<f32>()?.slice_mut(a..a + n);
            let s = self.s;
            launch!(
                &dev,
                "distil_adamw",
                elementwise_grid(n),
                [&mut p, &g, &m, &v],
                [
                    n as u64,
                    s.step_size,
                    s.beta1,
                    s.beta2,
                    s.eps,
                    s.decay_factor,
                    s.bias_correction2_sqrt,
                    s.grad_scale
                ]
            );
            Ok(())
        }
    }
}
