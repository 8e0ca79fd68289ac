//! Layer normalisation over the last dimension as one graph node (candle's own fused
//! `LayerNorm` records no backward). The backward recomputes each row's mean and inverse
//! standard deviation from the input (two cheap passes over a row already in cache) rather
//! than keeping them.

use super::math::{dot, sum};
use super::{cpu_out, cpu_slice, rows_per_chunk, sum_in_order, tensor, Read, REDUCE_ROWS};
use anyhow::Result;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

struct LayerNormOp {
    eps: f32,
}

/// Mean and 1/σ of a row (two-pass variance, as PyTorch).
#[inline(always)]
fn stats(row: &[f32], eps: f32, scratch: &mut [f32]) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = sum(row) / n;
    for (c, v) in scratch.iter_mut().zip(row) {
        *c = v - mean;
    }
    let var = dot(scratch, scratch) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// Forward over whole rows of width `g.len()`.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma"
))]
fn forward_rows(y: &mut [f32], x: &[f32], g: &[f32], b: &[f32], eps: f32) {
    let h = g.len();
    let mut scratch = vec![0f32; h];
    for (yr, xr) in y.chunks_exact_mut(h).zip(x.chunks_exact(h)) {
        let (mean, rstd) = stats(xr, eps, &mut scratch);
        for i in 0..h {
            yr[i] = (xr[i] - mean) * rstd * g[i] + b[i];
        }
    }
}

/// Backward over whole rows: writes `dx`, adds into `dg` and `db`.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma"
))]
fn backward_rows(
    dx: &mut [f32],
    x: &[f32],
    dy: &[f32],
    gamma: &[f32],
    dg: &mut [f32],
    db: &mut [f32],
    eps: f32,
) {
    let h = gamma.len();
    let mut xhat = vec![0f32; h];
    let mut d = vec![0f32; h];
    for ((dxr, xr), dyr) in dx
        .chunks_exact_mut(h)
        .zip(x.chunks_exact(h))
        .zip(dy.chunks_exact(h))
    {
        let (mean, rstd) = stats(xr, eps, &mut xhat);
        for i in 0..h {
            xhat[i] = (xr[i] - mean) * rstd;
            d[i] = dyr[i] * gamma[i];
            dg[i] += dyr[i] * xhat[i];
            db[i] += dyr[i];
        }
        let m1 = sum(&d) / h as f32;
        let m2 = dot(&d, &xhat) / h as f32;
        for i in 0..h {
            dxr[i] = rstd * (d[i] - m1 - xhat[i] * m2);
        }
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_slice(xs, xl, self.name())?;
        let g = cpu_slice(gs, gl, self.name())?;
        let b = cpu_slice(bs, bl, self.name())?;
        let h = g.len();
        if h == 0 || x.len() % h != 0 || b.len() != h {
            return Err(candle_core::Error::Msg(format!(
                "fused layer norm: input {:?} against weight [{h}] and bias [{}]",
                xl.shape(),
                b.len()
            )));
        }
        let mut y = vec![0f32; x.len()];
        let per = rows_per_chunk(x.len() / h) * h;
        y.par_chunks_mut(per)
            .zip(x.par_chunks(per))
            .for_each(|(yc, xc)| forward_rows(yc, xc, g, b, self.eps));
        Ok((cpu_out(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        g: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let h = g.elem_count();
        let (xr, gr, dyr) = (Read::new(x)?, Read::new(g)?, Read::new(grad)?);
        let mut dx = vec![0f32; x.elem_count()];
        let partial: Vec<(Vec<f32>, Vec<f32>)> = xr.with(|x| {
            gr.with(|gamma| {
                dyr.with(|dy| {
                    dx.par_chunks_mut(REDUCE_ROWS * h)
                        .zip(x.par_chunks(REDUCE_ROWS * h))
                        .zip(dy.par_chunks(REDUCE_ROWS * h))
                        .map(|((dxc, xc), dyc)| {
                            let mut dg = vec![0f32; h];
                            let mut db = vec![0f32; h];
                            backward_rows(dxc, xc, dyc, gamma, &mut dg, &mut db, self.eps);
                            (dg, db)
                        })
                        .collect()
                })
            })
        });
        let (dgs, dbs): (Vec<_>, Vec<_>) = partial.into_iter().unzip();
        Ok((
            Some(tensor(dx, x.dims())?),
            Some(tensor(sum_in_order(dgs, h), &[h])?),
            Some(tensor(sum_in_order(dbs, h), &[h])?),
        ))
    }
}

/// Layer norm of `x` `[.., h]` with weight and bias `[h]` (f32, CPU).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let op = LayerNormOp { eps: eps as f32 };
    Ok(x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?)
}
