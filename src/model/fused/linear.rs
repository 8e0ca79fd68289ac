//! `dropout(act(x · Wᵀ + b))` as one graph node.
//!
//! Forward: the bias is written into the output rows and gemm accumulates `x · Wᵀ` onto it
//! (Wᵀ is a stride swap, not a copy), then one pass applies the activation and the dropout
//! mask. Backward: one pass forms `g' = g · mask · act'(pre)`, then `dx = g' · W`,
//! `dW = g'ᵀ · x` (again strides only) and `db = Σ_rows g'`.

use super::dropout::Mask;
use super::gemm::{
    gemm_bias, gemm_both, gemm_then, stores_transposed, threads, Acc, Job, Mat, Then,
};
use super::grads::GradSink;
use super::math::{act_grad_mul, act_slice};
use super::{copy_then, cpu_out, cpu_slice, rows_per_chunk, tensor, uninit, Read, SharedMut};
use crate::model::config::Activation;
use anyhow::Result;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor};
use std::sync::Mutex;

struct LinearOp {
    act: Option<Activation>,
    mask: Option<Mask>,
    /// Keep the pre-activation for the backward (training only).
    keep: bool,
    pre: Mutex<Option<Vec<f32>>>,
}

impl LinearOp {
    fn dims(&self, x: &Layout, w: &Layout) -> candle_core::Result<(usize, usize, usize)> {
        let (out, inp) = w.shape().dims2()?;
        let xd = x.shape().dims();
        let last = *xd.last().unwrap_or(&0);
        if last != inp {
            return Err(candle_core::Error::Msg(format!(
                "fused linear: input width {last} but weight is [{out}, {inp}]"
            )));
        }
        Ok((x.shape().elem_count() / inp.max(1), inp, out))
    }

    /// The forward over slices: `y` `[rows, out]`.
    fn run(
        &self,
        x: &[f32],
        w: &[f32],
        b: &[f32],
        rows: usize,
        inp: usize,
        out: usize,
    ) -> Vec<f32> {
        let mut y = uninit(rows * out);
        // Bias, activation and dropout on each piece of the product as it is finished; out of
        // place when the pre-activation is kept.
        let post = |row: usize, c0: usize, c: &mut [f32]| {
            if let Some(a) = self.act {
                act_slice(a, c);
            }
            if let Some(m) = &self.mask {
                m.apply(c, row * out + c0);
            }
        };
        if self.act.is_some() && self.keep {
            let wt = weight_t(w, inp, out);
            let act = forward_kept(&mut y, x, wt, b, rows, |row, c0, pre, o| {
                o.copy_from_slice(pre);
                post(row, c0, o)
            });
            *self.pre.lock().unwrap() = Some(y);
            act
        } else if self.act.is_none() && self.mask.is_none() {
            forward_bias(&mut y, x, weight_t(w, inp, out), b, rows);
            y
        } else {
            forward_then(&mut y, out, x, weight_t(w, inp, out), b, rows, post);
            y
        }
    }

    /// `(dx, dW, db)` from the output's gradient `g`.
    fn grads(
        &self,
        g: &Read,
        x: &Read,
        w: &Read,
        (rows, inp, out): (usize, usize, usize),
    ) -> candle_core::Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let grads = |gp: &[f32]| x.with(|x| w.with(|w| linear_grads(gp, x, w, rows, inp, out)));
        if self.act.is_none() && self.mask.is_none() {
            // g' = g: no copy.
            return Ok(g.with(grads));
        }
        let per = rows_per_chunk(rows) * out;
        let pre = self.pre.lock().unwrap();
        let pre = match (self.act, pre.as_ref()) {
            (Some(_), None) => {
                return Err(candle_core::Error::Msg(
                    "fused linear: backward of an op run without keep".into(),
                ))
            }
            (_, p) => p,
        };
        // g' = g · mask · act'(pre), copied and transformed in one parallel pass.
        let gp = g.with(|g| {
            copy_then(g, per, |i, c| {
                if let (Some(a), Some(p)) = (self.act, pre) {
                    act_grad_mul(a, c, &p[i * per..i * per + c.len()]);
                }
                if let Some(m) = &self.mask {
                    m.apply(c, i * per);
                }
            })
        });
        Ok(grads(&gp))
    }

    fn out_shape(xl: &Layout, out: usize) -> Shape {
        let mut dims = xl.shape().dims().to_vec();
        *dims.last_mut().unwrap() = out;
        Shape::from(dims)
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, inp, out) = self.dims(xl, wl)?;
        let x = cpu_slice(xs, xl, self.name())?;
        let w = cpu_slice(ws, wl, self.name())?;
        let b = cpu_slice(bs, bl, self.name())?;
        let y = self.run(x, w, b, rows, inp, out);
        Ok((cpu_out(y), Self::out_shape(xl, out)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = self.dims(x.layout(), w.layout())?;
        let (dx, dw, db) = self.grads(&Read::new(grad)?, &Read::new(x)?, &Read::new(w)?, dims)?;
        Ok((
            Some(tensor(dx, x.dims())?),
            Some(tensor(dw, w.dims())?),
            Some(tensor(db, &[dims.2])?),
        ))
    }
}

/// [`LinearOp`] with the weight and bias captured rather than graph inputs: their gradients
/// go to the encoder's [`GradSink`] instead of through candle's zero-fill-and-add (for the
/// MLM decoder, tied to the word embeddings, that was a serial memset and add over the whole
/// `[vocab, hidden]` table each step).
struct SinkLinearOp {
    op: LinearOp,
    w: Tensor,
    b: Tensor,
    sink: GradSink,
}

impl CustomOp1 for SinkLinearOp {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, inp, out) = self.op.dims(xl, self.w.layout())?;
        let x = cpu_slice(xs, xl, self.name())?;
        let (w, b) = (Read::new(&self.w)?, Read::new(&self.b)?);
        let y = w.with(|w| b.with(|b| self.op.run(x, w, b, rows, inp, out)));
        Ok((cpu_out(y), LinearOp::out_shape(xl, out)))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dims = self.op.dims(x.layout(), self.w.layout())?;
        let (dx, dw, db) = self.op.grads(
            &Read::new(grad)?,
            &Read::new(x)?,
            &Read::new(&self.w)?,
            dims,
        )?;
        self.sink.add(&self.w, dw);
        self.sink.add(&self.b, db);
        Ok(Some(tensor(dx, x.dims())?))
    }
}

/// `y ← x · Wᵀ + b` for `x` `[rows, inp]`, `W` `[out, inp]` and `y` `[rows, out]` with rows
/// `y_rs` apart (a column block of a wider matrix when `y_rs > out`), then `post(row, col0,
/// piece)` on each piece of each row (columns `col0..col0 + piece.len()`, see [`Then`]) with
/// the bias added: inside the product while the piece is still in L1 (`super::packed`, on
/// AVX-512 CPUs), else in a parallel pass after it. `wt` is `Wᵀ` `[inp, out]`: [`weight_t`]
/// of the checkpoint's `[out, inp]` (a stride swap), or a transpose stored as such (frozen
/// layers, see [`super::block::Transposed`]).
pub(crate) fn forward_then(
    y: &mut [f32],
    y_rs: usize,
    x: &[f32],
    wt: Mat,
    b: &[f32],
    rows: usize,
    post: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    let inp = wt.rows;
    debug_assert_eq!(b.len(), wt.cols);
    let then = |row: usize, c0: usize, v: &mut [f32]| {
        add_bias(v, &b[c0..c0 + v.len()]);
        post(row, c0, v);
    };
    gemm_then(y, y_rs, Mat::rm(x, rows, inp), wt, threads(), &then);
}

/// `y ← x · Wᵀ + b` (`y` `[rows, out]`), as [`forward_then`] with nothing after the bias; the
/// MLM decoder's (a transposed store, see [`gemm_bias`]) with the bias added strip by strip
/// as the product stores it, not in a pass over the `[rows, vocab]` logits after it:
/// in-process, BERT-base's student head −0.9 ± 0.3 ms (distillation, 20 pairs, 19 won) and
/// −1.4 ± 0.5 (MLM training, 15 of 15 won).
fn forward_bias(y: &mut [f32], x: &[f32], wt: Mat, b: &[f32], rows: usize) {
    let xm = Mat::rm(x, rows, wt.rows);
    if stores_transposed(&xm, &wt, threads()) {
        gemm_bias(y, wt.cols, xm, wt, b, threads());
    } else {
        forward_then(y, wt.cols, x, wt, b, rows, |_, _, _| {});
    }
}

/// [`forward_then`] into `pre` (`[rows, out]`, what a backward keeps), with a second output
/// `[rows, out]` that `post(row, col0, pre_piece, out_piece)` fills from each piece of `pre`
/// (with the bias added) in the same pass, and may change `pre_piece` too; returns the second
/// output.
pub(crate) fn forward_kept(
    pre: &mut [f32],
    x: &[f32],
    wt: Mat,
    b: &[f32],
    rows: usize,
    post: impl Fn(usize, usize, &mut [f32], &mut [f32]) + Sync,
) -> Vec<f32> {
    let out = wt.cols;
    let mut y = uninit(rows * out);
    let dst = SharedMut::new(&mut y);
    forward_then(pre, out, x, wt, b, rows, |row, c0, v| {
        // The next strip's piece of `y`, a fresh buffer, asked for with intent to write while
        // that strip's product runs: BERT-base MLM training, the forward (the FFN input's
        // activation and its derivative) −14.1 ± 4.8 and −15.7 ± 2.7 ms (in-process, 20 pairs
        // each, 19 and 18 won); distillation, the student's forward −6.4 ± 5.5 (25, 21 won).
        if row + super::packed::STRIP < rows {
            // Safety: that strip's rows exist (row + STRIP < rows), so the piece is in `y`.
            let next = unsafe { dst.at((row + super::packed::STRIP) * out + c0) };
            super::math::prefetch_for_write(next, v.len());
        }
        // Safety: the piece's place in `y` (where it is in `pre`) is this task's alone.
        let o = unsafe { std::slice::from_raw_parts_mut(dst.at(row * out + c0), v.len()) };
        post(row, c0, v, o);
    });
    y
}

/// `Wᵀ` `[inp, out]` as a view of the checkpoint's `W` `[out, inp]` (strides swapped).
pub(crate) fn weight_t(w: &[f32], inp: usize, out: usize) -> Mat<'_> {
    Mat::rm(w, out, inp).t()
}

/// `v += b` (a piece of a row and its columns' biases).
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma"
))]
fn add_bias(v: &mut [f32], b: &[f32]) {
    v.iter_mut().zip(b).for_each(|(y, b)| *y += b);
}

/// `dx = g'·W`, `dW = g'ᵀ·x`, `db = Σ_rows g'` for `g'` `[rows, out]`.
fn linear_grads(
    gp: &[f32],
    x: &[f32],
    w: &[f32],
    rows: usize,
    inp: usize,
    out: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut dx = uninit(rows * inp);
    let (dw, db) = backward_into(gp, out, x, w, rows, inp, out, &mut dx, Acc::Overwrite, None);
    (dx, dw, db)
}

/// `dx (=|+=) g'·W` as `acc` says, and returns `(dW, db) = (g'ᵀ·x, Σ_rows g')`, for `g'`
/// `[rows, out]` with rows `g_rs` apart. `dx_then` (with `Acc::Overwrite` only) runs on each
/// finished piece of `dx` as [`gemm_then`] says.
///
/// The two products run at once, one a thread ([`gemm_both`]), rather than one after the
/// other, each split over both: in-process, BERT-base distillation backward −8.2 ± 2.9 and
/// −8.1 ± 2.2 ms (20 and 30 pairs, 15 and 24 won), MLM training backward −16.5 ± 3.2 (20
/// pairs, 19 won). Session 14 measured the same without the halves balancing each other
/// (a plain `rayon::join`): nothing dependable.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_into(
    gp: &[f32],
    g_rs: usize,
    x: &[f32],
    w: &[f32],
    rows: usize,
    inp: usize,
    out: usize,
    dx: &mut [f32],
    acc: Acc,
    dx_then: Option<Then>,
) -> (Vec<f32>, Vec<f32>) {
    let (mut dw, mut db) = (uninit(out * inp), uninit(out));
    let g = Mat {
        data: gp,
        rows,
        cols: out,
        rs: g_rs,
        cs: 1,
        panels: None,
    };
    let dx = Job::new(dx, inp, g, Mat::rm(w, out, inp))
        .acc(acc)
        .then(dx_then);
    let dw_job = Job::new(&mut dw, inp, g.t(), Mat::rm(x, rows, inp)).row_sums(&mut db);
    gemm_both(dx, dw_job, threads());
    (dw, db)
}

/// `dropout(act(x · Wᵀ + b))` for `x` `[.., in]`, `W` `[out, in]`, `b` `[out]` (f32, CPU).
/// `keep`: the result will be differentiated (the pre-activation is then kept). With `sink`,
/// the weight's and bias's gradients go there (see [`SinkLinearOp`]) when the sink can take
/// them and `x` carries the graph (otherwise the op would not be recorded at all).
pub fn linear(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    act: Option<Activation>,
    mask: Option<Mask>,
    keep: bool,
    sink: Option<&GradSink>,
) -> Result<Tensor> {
    let (out, _) = w.dims2()?;
    if b.dims() != [out] {
        anyhow::bail!(
            "fused linear: bias of shape {:?} for a weight of {out} outputs (expected [{out}])",
            b.dims()
        );
    }
    let op = LinearOp {
        act,
        mask,
        keep,
        pre: Mutex::new(None),
    };
    let x = x.contiguous()?;
    match sink {
        Some(sink)
            if GradSink::accepts(w)
                && GradSink::accepts(b)
                && (x.track_op() || !(w.track_op() || b.track_op())) =>
        {
            let op = SinkLinearOp {
                op,
                w: w.contiguous()?,
                b: b.contiguous()?,
                sink: sink.clone(),
            };
            Ok(x.apply_op1(op)?)
        }
        _ => Ok(x.apply_op3(&w.contiguous()?, &b.contiguous()?, op)?),
    }
}
