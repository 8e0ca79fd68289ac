//! Layer normalisation over the last dimension as one graph node (candle's own fused
//! `LayerNorm` records no backward). The backward recomputes each row's mean and inverse
//! standard deviation from the input (two cheap passes over a row already in cache) rather
//! than keeping them.

use super::dropout::Mask;
use super::math::{dot, sum};
use super::{
    cpu_out, cpu_slice, rows_per_chunk, sum_in_order, tensor, uninit, Read, SharedMut, REDUCE_ROWS,
};
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

/// Forward over whole rows of width `g.len()`: `y ← LN(x [+ res])`.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma"
))]
fn forward_rows(y: &mut [f32], x: &[f32], res: Option<&[f32]>, g: &[f32], b: &[f32], eps: f32) {
    let h = g.len();
    let mut scratch = vec![0f32; h];
    for (k, (yr, xr)) in y.chunks_exact_mut(h).zip(x.chunks_exact(h)).enumerate() {
        match res {
            Some(r) => {
                for ((v, &a), &c) in yr.iter_mut().zip(xr).zip(&r[k * h..(k + 1) * h]) {
                    *v = a + c;
                }
            }
            None => yr.copy_from_slice(xr),
        }
        let (mean, rstd) = stats(yr, eps, &mut scratch);
        for i in 0..h {
            yr[i] = (yr[i] - mean) * rstd * g[i] + b[i];
        }
    }
}

/// Backward over whole rows: writes `dx`, adds into `dg` and `db`.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma"
))]
#[allow(clippy::too_many_arguments)]
fn backward_rows(
    dx: &mut [f32],
    x: &[f32],
    res: Option<&[f32]>,
    dy: &[f32],
    gamma: &[f32],
    dg: &mut [f32],
    db: &mut [f32],
    eps: f32,
) {
    let h = gamma.len();
    let mut xhat = vec![0f32; h];
    let mut d = vec![0f32; h];
    let mut sum_row = vec![0f32; h];
    for (k, ((dxr, xr), dyr)) in dx
        .chunks_exact_mut(h)
        .zip(x.chunks_exact(h))
        .zip(dy.chunks_exact(h))
        .enumerate()
    {
        let xr: &[f32] = match res {
            Some(r) => {
                for ((s, &a), &b) in sum_row.iter_mut().zip(xr).zip(&r[k * h..(k + 1) * h]) {
                    *s = a + b;
                }
                &sum_row
            }
            None => xr,
        };
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

/// `LN(x [+ res])` over all rows, in parallel.
pub(crate) fn forward_all(
    x: &[f32],
    res: Option<&[f32]>,
    g: &[f32],
    b: &[f32],
    eps: f32,
) -> Vec<f32> {
    let h = g.len();
    let mut y = uninit(x.len());
    let per = rows_per_chunk(x.len() / h) * h;
    y.par_chunks_mut(per)
        .zip(x.par_chunks(per))
        .enumerate()
        .for_each(|(i, (yc, xc))| {
            let rc = res.map(|r| &r[i * per..i * per + xc.len()]);
            forward_rows(yc, xc, rc, g, b, eps)
        });
    y
}

/// The backward over all rows: `(dx, dγ, dβ)`, the parameter gradients summed over fixed
/// row blocks in block order (deterministic).
pub(crate) fn backward_all(
    x: &[f32],
    res: Option<&[f32]>,
    dy: &[f32],
    gamma: &[f32],
    eps: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (dx, _, dg, db) = backward_all_masked(x, res, dy, gamma, eps, None);
    (dx, dg, db)
}

/// [`backward_all`], and with `mask` also `dx · mask` (the gradient through the dropout
/// before the norm, in a layer), made from each block of `dx` while it is in cache rather
/// than in a pass of its own over `dx`.
pub(crate) fn backward_all_masked(
    x: &[f32],
    res: Option<&[f32]>,
    dy: &[f32],
    gamma: &[f32],
    eps: f32,
    mask: Option<&Mask>,
) -> (Vec<f32>, Option<Vec<f32>>, Vec<f32>, Vec<f32>) {
    let h = gamma.len();
    let block = REDUCE_ROWS * h;
    let mut dx = uninit(x.len());
    let mut masked = mask.map(|_| uninit(x.len()));
    let dm = masked.as_mut().map(|m| SharedMut::new(m));
    let partial: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(block)
        .zip(x.par_chunks(block))
        .zip(dy.par_chunks(block))
        .enumerate()
        .map(|(i, ((dxc, xc), dyc))| {
            let rc = res.map(|r| &r[i * block..i * block + xc.len()]);
            let mut dg = vec![0f32; h];
            let mut db = vec![0f32; h];
            backward_rows(dxc, xc, rc, dyc, gamma, &mut dg, &mut db, eps);
            if let (Some(m), Some(dm)) = (mask, dm) {
                // Safety: block i of `masked` is this task's alone.
                let mc = unsafe { std::slice::from_raw_parts_mut(dm.at(i * block), dxc.len()) };
                mc.copy_from_slice(dxc);
                m.apply(mc, i * block);
            }
            (dg, db)
        })
        .collect();
    let (dgs, dbs): (Vec<_>, Vec<_>) = partial.into_iter().unzip();
    (dx, masked, sum_in_order(dgs, h), sum_in_order(dbs, h))
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
        Ok((
            cpu_out(forward_all(x, None, g, b, self.eps)),
            xl.shape().clone(),
        ))
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
        let (dx, dg, db) =
            xr.with(|x| gr.with(|gamma| dyr.with(|dy| backward_all(x, None, dy, gamma, self.eps))));
        Ok((
            Some(tensor(dx, x.dims())?),
            Some(tensor(dg, &[h])?),
            Some(tensor(db, &[h])?),
        ))
    }
}

/// `LN(a + r)`: the residual add folded into the norm. The weight and bias travel as one
/// `[2, h]` tensor (a `CustomOp3` has three inputs); the gradient of the sum goes to both
/// `a` and `r`.
struct ResidualLayerNormOp {
    eps: f32,
}

impl CustomOp3 for ResidualLayerNormOp {
    fn name(&self) -> &'static str {
        "fused-residual-layer-norm"
    }

    fn cpu_fwd(
        &self,
        as_: &CpuStorage,
        al: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let a = cpu_slice(as_, al, self.name())?;
        let r = cpu_slice(rs, rl, self.name())?;
        let p = cpu_slice(ps, pl, self.name())?;
        let h = p.len() / 2;
        if h == 0 || a.len() % h != 0 || r.len() != a.len() {
            return Err(candle_core::Error::Msg(format!(
                "fused residual layer norm: inputs {:?} and {:?} against [{h}]",
                al.shape(),
                rl.shape()
            )));
        }
        let (g, b) = p.split_at(h);
        Ok((
            cpu_out(forward_all(a, Some(r), g, b, self.eps)),
            al.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        a: &Tensor,
        r: &Tensor,
        p: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let h = p.elem_count() / 2;
        let (ar, rr, pr, dyr) = (
            Read::new(a)?,
            Read::new(r)?,
            Read::new(p)?,
            Read::new(grad)?,
        );
        let (dx, mut dp, db) = ar.with(|a| {
            rr.with(|r| pr.with(|p| dyr.with(|dy| backward_all(a, Some(r), dy, &p[..h], self.eps))))
        });
        dp.extend(db);
        let dx = tensor(dx, a.dims())?;
        Ok((Some(dx.clone()), Some(dx), Some(tensor(dp, &[2, h])?)))
    }
}

/// `LN(a + r)` for `a`, `r` `[.., h]` with weight and bias `[h]` (f32, CPU).
pub fn residual_layer_norm(
    a: &Tensor,
    r: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let p = Tensor::stack(&[weight, bias], 0)?;
    let op = ResidualLayerNormOp { eps: eps as f32 };
    Ok(a.contiguous()?.apply_op3(&r.contiguous()?, &p, op)?)
}

/// Layer norm of `x` `[.., h]` with weight and bias `[h]` (f32, CPU).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let op = LayerNormOp { eps: eps as f32 };
    Ok(x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?)
}
