//! Layer normalisation over the last dimension as one graph node (candle's own fused
//! `LayerNorm` records no backward). The backward recomputes each row's mean and inverse
//! standard deviation from the input (two cheap passes over a row already in cache) rather
//! than keeping them.

use super::{cpu_out, cpu_slice, sum_in_order, tensor, Read, REDUCE_ROWS};
use anyhow::Result;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

struct LayerNormOp {
    eps: f32,
}

/// Mean and 1/σ of a row (two-pass variance, as PyTorch).
#[inline]
fn stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
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
        y.par_chunks_mut(h)
            .zip(x.par_chunks(h))
            .for_each(|(yr, xr)| {
                let (mean, rstd) = stats(xr, self.eps);
                for i in 0..h {
                    yr[i] = (xr[i] - mean) * rstd * g[i] + b[i];
                }
            });
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
                            let mut xhat = vec![0f32; h];
                            for ((dxr, xr), dyr) in dxc
                                .chunks_exact_mut(h)
                                .zip(xc.chunks_exact(h))
                                .zip(dyc.chunks_exact(h))
                            {
                                let (mean, rstd) = stats(xr, self.eps);
                                let (mut s1, mut s2) = (0f32, 0f32);
                                for i in 0..h {
                                    xhat[i] = (xr[i] - mean) * rstd;
                                    let d = dyr[i] * gamma[i];
                                    s1 += d;
                                    s2 += d * xhat[i];
                                    dg[i] += dyr[i] * xhat[i];
                                    db[i] += dyr[i];
                                }
                                let (m1, m2) = (s1 / h as f32, s2 / h as f32);
                                for i in 0..h {
                                    dxr[i] = rstd * (dyr[i] * gamma[i] - m1 - xhat[i] * m2);
                                }
                            }
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
