//! A whole post-LN transformer layer as one graph node:
//!
//! ```text
//! q, k, v = x·W_qᵀ + b_q, …            one [rows, 3h] buffer, heads read in place
//! a = LN₁(dropout(attention(q, k, v)·W_oᵀ + b_o) + x)
//! y = LN₂(dropout(act(a·W_1ᵀ + b_1)·W_2ᵀ + b_2) + a)
//! ```
//!
//! The per-op kernels ([`super::linear`], [`super::attention`], [`super::layer_norm`]) make
//! a layer ten graph nodes with thirteen activation-sized edges between them, and candle's
//! backward zero-fills and adds a gradient buffer for every edge, serially (~22 ms of a
//! 250 ms small distillation step). As one node the layer has one input edge: the backward
//! runs the same steps in reverse over buffers it owns, accumulating in place (`da`
//! collects the residual and the FFN input gradient; `dx` the residual and the q, k, v
//! input gradients, by gemm accumulation). The parameters are captured rather than graph
//! inputs (a custom op has at most three); their gradients go to the encoder's
//! [`GradSink`].
//!
//! The dropout masks are drawn by the caller in the order the per-op path draws them, so
//! both paths compute the same function of the same RNG state (`tests/fused.rs`).

use super::attention::{self, Dims};
use super::dropout::Mask;
use super::gemm::Acc;
use super::gemm::Mat;
use super::grads::GradSink;
use super::layer_norm::{backward_all_masked, forward_all};
use super::linear::{backward_into, forward_kept, forward_then, weight_t};
use super::math::{act_and_grad, act_slice, mul, prefetch};
use super::packed::STRIP;
use super::{cpu_out, cpu_slice, packed, tensor, uninit, Read, SharedMut};
use crate::model::config::Activation;
use anyhow::Result;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// A layer's parameters, each `(weight, bias)`: the linears' weights are `[out, in]`.
#[derive(Clone)]
pub struct LayerWeights {
    pub query: (Tensor, Tensor),
    pub key: (Tensor, Tensor),
    pub value: (Tensor, Tensor),
    pub attn_out: (Tensor, Tensor),
    pub attn_norm: (Tensor, Tensor),
    pub intermediate: (Tensor, Tensor),
    pub output: (Tensor, Tensor),
    pub out_norm: (Tensor, Tensor),
    /// The linears' weights stored transposed, for a frozen layer ([`Transposed`]).
    pub transposed: Option<Arc<Transposed>>,
}

/// A frozen layer's linear weights stored for the forward, built once (one more copy of the
/// layers' weights: +340 MB for BERT-base; the teacher's forward is most of a distillation
/// step's frozen work).
///
/// On a CPU with AVX-512, each `Wᵀ` (the forward's right operand) as the packed panels the
/// product would otherwise pack from `W` at every call ([`packed::pack_panels`]): the products
/// copy contiguous runs instead of gathering 256 bytes from each row of `W`. BERT-base
/// distillation, teacher forward, in-process alternating steps: −21.4 ± 6.1 and −27.5 ± 7.2 ms
/// (15 and 20 pairs, 12 and 18 won) with the panels read as four streams at once, −15.4 ± 7.1
/// as one, −0.6 ± 2.7 when the microkernel read the panels in place.
///
/// Elsewhere, `Wᵀ` `[in, out]` row-major (the checkpoint keeps `W` `[out, in]`), with q, k
/// and v side by side (`[h, 3h]`, one product writing the `[rows, 3h]` buffer, and their
/// biases `[3h]`): gemm multiplies a row-major right operand faster than a transposed view of
/// one (364 -> 402 GFLOP/s on BERT-base's attention output projection, 371 -> 405 on the FFN
/// output, 2-8% on the others: `benches/gemm_shapes.rs`, the "Wᵀ st." lines).
pub struct Transposed {
    form: Form,
}

enum Form {
    /// The transposes: q, k, v side by side and their biases, then the attention output's,
    /// the FFN input's and the FFN output's.
    Rows {
        qkv: Vec<f32>,
        qkv_bias: Vec<f32>,
        rest: [Vec<f32>; 3],
    },
    /// The panels of q, k, v, the attention output, the FFN input and the FFN output.
    Panels([Vec<f32>; 6]),
}

/// The six linears of a layer, in [`Form::Panels`]'s order, as indices.
const Q: usize = 0;
const ATTN_OUT: usize = 3;
const INTERMEDIATE: usize = 4;
const OUTPUT: usize = 5;

impl Transposed {
    /// `w`'s linear weights (f32 CPU tensors, shapes as [`LayerOp`] checks them) in the form
    /// this CPU's products read fastest: panels where [`packed::available`], else transposes.
    pub fn of(w: &LayerWeights) -> Result<Self> {
        if packed::available() {
            Self::panels(w)
        } else {
            Self::transposes(w)
        }
    }

    /// The weights as packed panels (empty on a CPU without AVX-512).
    fn panels(w: &LayerWeights) -> Result<Self> {
        let (h, f) = (w.query.0.dim(1)?, w.intermediate.0.dim(0)?);
        let lin = [
            (&w.query.0, h, h),
            (&w.key.0, h, h),
            (&w.value.0, h, h),
            (&w.attn_out.0, h, h),
            (&w.intermediate.0, h, f),
            (&w.output.0, f, h),
        ];
        let mut panels: [Vec<f32>; 6] = Default::default();
        for (p, (t, inp, out)) in panels.iter_mut().zip(lin) {
            *p = packed::pack_panels(weight_t(&f32s(t)?, inp, out));
        }
        Ok(Transposed {
            form: Form::Panels(panels),
        })
    }

    /// The weights as row-major transposes.
    fn transposes(w: &LayerWeights) -> Result<Self> {
        let (h, f) = (w.query.0.dim(1)?, w.intermediate.0.dim(0)?);
        let mut qkv = vec![0f32; h * 3 * h];
        let mut qkv_bias = Vec::with_capacity(3 * h);
        for (j, (wt, bt)) in [&w.query, &w.key, &w.value].into_iter().enumerate() {
            transpose_into(&f32s(wt)?, h, h, &mut qkv[j * h..], 3 * h);
            qkv_bias.extend(f32s(bt)?);
        }
        let t = |wt: &Tensor, out: usize, inp: usize| -> Result<Vec<f32>> {
            let mut d = vec![0f32; out * inp];
            transpose_into(&f32s(wt)?, out, inp, &mut d, out);
            Ok(d)
        };
        Ok(Transposed {
            form: Form::Rows {
                qkv,
                qkv_bias,
                rest: [
                    t(&w.attn_out.0, h, h)?,
                    t(&w.intermediate.0, f, h)?,
                    t(&w.output.0, h, f)?,
                ],
            },
        })
    }

    /// q, k and v's transposes side by side and their biases, in the row-major form.
    fn qkv(&self) -> Option<(&[f32], &[f32])> {
        match &self.form {
            Form::Rows { qkv, qkv_bias, .. } => Some((qkv, qkv_bias)),
            Form::Panels(_) => None,
        }
    }

    /// Linear `which`'s right operand `Wᵀ` `[inp, out]`, for the weight `w` it was made from.
    /// (The row-major form holds q, k and v only side by side: see [`Transposed::qkv`].)
    fn operand<'a>(&'a self, which: usize, w: &'a [f32], inp: usize, out: usize) -> Mat<'a> {
        match &self.form {
            Form::Rows { rest, .. } if which >= ATTN_OUT => {
                Mat::rm(&rest[which - ATTN_OUT], inp, out)
            }
            Form::Rows { .. } => weight_t(w, inp, out),
            Form::Panels(p) => weight_t(w, inp, out).with_panels(&p[which]),
        }
    }

    /// Whether the stored weights fit hidden `h` and FFN width `f`; else what they hold.
    fn check(&self, h: usize, f: usize) -> std::result::Result<(), String> {
        let (sizes, want): (Vec<usize>, Vec<usize>) = match &self.form {
            Form::Rows {
                qkv,
                qkv_bias,
                rest,
            } => (
                [qkv.len(), qkv_bias.len()]
                    .into_iter()
                    .chain(rest.iter().map(Vec::len))
                    .collect(),
                vec![3 * h * h, 3 * h, h * h, h * f, f * h],
            ),
            Form::Panels(p) => (
                p.iter().map(Vec::len).collect(),
                [(h, h), (h, h), (h, h), (h, h), (h, f), (f, h)]
                    .into_iter()
                    .map(|(k, n)| packed::panels_len(k, n))
                    .collect(),
            ),
        };
        if sizes == want {
            Ok(())
        } else {
            Err(format!(
                "fused layer: stored transposed weights {sizes:?} do not fit hidden {h}, \
                 intermediate {f}"
            ))
        }
    }
}

/// A tensor's values as f32.
fn f32s(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1()?)
}

/// A linear's right operand `Wᵀ` `[inp, out]`: the stored form, or a view of `w`.
fn wt<'a>(
    stored: Option<&'a Transposed>,
    which: usize,
    w: &'a [f32],
    inp: usize,
    out: usize,
) -> Mat<'a> {
    match stored {
        Some(t) => t.operand(which, w, inp, out),
        None => weight_t(w, inp, out),
    }
}

/// `dst[j * dst_rs + i] = src[i * cols + j]` for `src` `[rows, cols]` row-major, in parallel
/// over blocks of `dst`'s rows.
fn transpose_into(src: &[f32], rows: usize, cols: usize, dst: &mut [f32], dst_rs: usize) {
    const B: usize = 64;
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(
        src.len() >= rows * cols && dst_rs >= rows && dst.len() >= (cols - 1) * dst_rs + rows,
        "transpose: buffers too short for [{rows}, {cols}]"
    );
    let d = SharedMut::new(dst);
    (0..cols.div_ceil(B)).into_par_iter().for_each(|jb| {
        for i0 in (0..rows).step_by(B) {
            for j in jb * B..((jb + 1) * B).min(cols) {
                for i in i0..(i0 + B).min(rows) {
                    // Safety: rows jb·B.. of dst are this task's alone.
                    unsafe { *d.at(j * dst_rs + i) = src[i * cols + j] };
                }
            }
        }
    });
}

impl LayerWeights {
    fn all(&self) -> [&Tensor; 16] {
        let p = [
            &self.query,
            &self.key,
            &self.value,
            &self.attn_out,
            &self.attn_norm,
            &self.intermediate,
            &self.output,
            &self.out_norm,
        ];
        let mut out = [&self.query.0; 16];
        for (i, (w, b)) in p.into_iter().enumerate() {
            out[2 * i] = w;
            out[2 * i + 1] = b;
        }
        out
    }

    /// Whether the layer can run as one node: f32 CPU parameters that are trainable leaves
    /// or constants (see [`GradSink::accepts`]).
    pub fn fusable(&self) -> bool {
        self.all()
            .iter()
            .all(|t| super::enabled_for(t) && GradSink::accepts(t))
    }

    fn track(&self) -> bool {
        self.all().iter().any(|t| t.track_op())
    }

    /// Whether no parameter trains (a frozen teacher's layer): then the forward may use a
    /// stored [`Transposed`].
    pub fn frozen(&self) -> bool {
        !self.track()
    }
}

/// A parameter pair's name, tensors, and the weight and bias shapes it must have.
type ShapeCheck<'a> = (&'a str, &'a (Tensor, Tensor), &'a [usize], &'a [usize]);

/// What the backward needs from the forward (training only).
struct Saved {
    qkv: Vec<f32>,
    probs: Vec<f32>,
    ctx: Vec<f32>,
    /// The attention output after dropout (LN₁'s input, with `x`).
    a_d: Vec<f32>,
    a: Vec<f32>,
    /// The activation's derivative at the FFN's pre-activation (`act'(x·W₁ᵀ + b₁)`).
    act_d: Vec<f32>,
    i: Vec<f32>,
    /// The FFN output after dropout (LN₂'s input, with `a`).
    o_d: Vec<f32>,
}

/// The dropout masks of one layer, drawn in this order: attention probabilities
/// `[b, heads, s, s]`, attention output `[rows, h]`, FFN output `[rows, h]`.
#[derive(Default)]
pub struct LayerMasks {
    pub attention: Option<Mask>,
    pub attn_out: Option<Mask>,
    pub output: Option<Mask>,
}

struct LayerOp {
    w: LayerWeights,
    heads: usize,
    act: Activation,
    eps: f32,
    key_mask: Option<Arc<Vec<u8>>>,
    masks: LayerMasks,
    keep: bool,
    saved: Mutex<Option<Saved>>,
    sink: GradSink,
}

/// The slices of `ts` (f32, contiguous, CPU), for the length of `f`.
fn with_slices<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> candle_core::Result<R> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(ts.len());
    for (storage, layout) in &guards {
        let (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) =
            (&**storage, layout.contiguous_offsets())
        else {
            return Err(candle_core::Error::Msg(
                "fused layer: parameters must be contiguous f32 CPU tensors".into(),
            ));
        };
        slices.push(&v[a..b]);
    }
    Ok(f(&slices))
}

/// A `forward_then` step applying `mask` (the dropout of an output `[rows, h]`) to a piece of
/// a row, when there is one.
fn dropout(mask: Option<&Mask>, h: usize) -> impl Fn(usize, usize, &mut [f32]) + Sync + '_ {
    move |row, c0, c| {
        if let Some(m) = mask {
            m.apply(c, row * h + c0)
        }
    }
}

impl LayerOp {
    fn dims(&self, l: &Layout) -> candle_core::Result<(Dims, usize)> {
        let (b, s, h) = l.shape().dims3()?;
        let (f, _) = self.w.intermediate.0.dims2()?;
        if self.heads == 0 || h % self.heads != 0 {
            return Err(candle_core::Error::Msg(format!(
                "fused layer: hidden {h} is not a multiple of {} heads",
                self.heads
            )));
        }
        // Every parameter's shape, against the input's width h and the FFN's width f.
        let w = &self.w;
        let expected: [ShapeCheck; 8] = [
            ("query", &w.query, &[h, h], &[h]),
            ("key", &w.key, &[h, h], &[h]),
            ("value", &w.value, &[h, h], &[h]),
            ("attention output", &w.attn_out, &[h, h], &[h]),
            ("attention layer norm", &w.attn_norm, &[h], &[h]),
            ("intermediate", &w.intermediate, &[f, h], &[f]),
            ("output", &w.output, &[h, f], &[h]),
            ("output layer norm", &w.out_norm, &[h], &[h]),
        ];
        for (name, (wt, bt), ws, bs) in expected {
            if wt.dims() != ws || bt.dims() != bs {
                return Err(candle_core::Error::Msg(format!(
                    "fused layer: {name} weight {:?} and bias {:?}, expected {ws:?} and {bs:?} \
                     for hidden {h}",
                    wt.dims(),
                    bt.dims()
                )));
            }
        }
        if let Some(t) = &self.w.transposed {
            t.check(h, f).map_err(candle_core::Error::Msg)?;
        }
        let dm = Dims {
            b,
            s,
            nh: self.heads,
            d: h / self.heads,
            rs: 3 * h,
        };
        Ok((dm, f))
    }
}

impl CustomOp1 for LayerOp {
    fn name(&self) -> &'static str {
        "fused-layer"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_slice(s, l, self.name())?;
        let (dm, f) = self.dims(l)?;
        let h = dm.nh * dm.d;
        let rows = dm.b * dm.s;
        let y = with_slices(&self.w.all(), |p| {
            let [wq, bq, wk, bk, wv, bv, wo, bo, g1, be1, w1, b1, w2, b2, g2, be2] = p else {
                unreachable!("sixteen parameters")
            };
            let t = self.w.transposed.as_deref();
            let mut qkv = uninit(rows * 3 * h);
            if let Some((wqkv, bqkv)) = t.and_then(Transposed::qkv) {
                forward_then(
                    &mut qkv,
                    3 * h,
                    x,
                    Mat::rm(wqkv, h, 3 * h),
                    bqkv,
                    rows,
                    |_, _, _| {},
                );
            } else {
                for (j, (w, b)) in [(wq, bq), (wk, bk), (wv, bv)].into_iter().enumerate() {
                    forward_then(
                        &mut qkv[j * h..],
                        3 * h,
                        x,
                        wt(t, Q + j, w, h, h),
                        b,
                        rows,
                        |_, _, _| {},
                    );
                }
            }
            let mut ctx = uninit(rows * h);
            let probs = attention::forward(
                dm,
                &qkv,
                &qkv[h..],
                &qkv[2 * h..],
                &mut ctx,
                self.key_mask.as_deref().map(|m| m.as_slice()),
                self.masks.attention.as_ref(),
                self.keep,
            );
            let mut a_d = uninit(rows * h);
            // Dropout of a [rows, h] output with the bias, piece by piece.
            forward_then(
                &mut a_d,
                h,
                &ctx,
                wt(t, ATTN_OUT, wo, h, h),
                bo,
                rows,
                dropout(self.masks.attn_out.as_ref(), h),
            );
            let a = forward_all(&a_d, Some(x), g1, be1, self.eps);
            // The bias and the activation on each piece of the product as it is finished.
            // Training keeps the activation's derivative at the pre-activation in place of
            // the pre-activation itself (one erf for both; the backward multiplies): BERT-base
            // MLM training forward +11.5 ± 2.9 ms, backward −19.2 ± 7.3 (in-process, 10
            // pairs); distillation student forward +5.3 ± 0.6, backward −7.7 ± 3.4 (15).
            let mut i_pre = uninit(rows * f);
            let w1t = wt(t, INTERMEDIATE, w1, h, f);
            let i = if self.keep {
                forward_kept(&mut i_pre, &a, w1t, b1, rows, |_, _, pre, o| {
                    act_and_grad(self.act, pre, o)
                })
            } else {
                forward_then(&mut i_pre, f, &a, w1t, b1, rows, |_, _, c| {
                    act_slice(self.act, c)
                });
                std::mem::take(&mut i_pre)
            };
            let mut o_d = uninit(rows * h);
            forward_then(
                &mut o_d,
                h,
                &i,
                wt(t, OUTPUT, w2, f, h),
                b2,
                rows,
                dropout(self.masks.output.as_ref(), h),
            );
            let y = forward_all(&o_d, Some(&a), g2, be2, self.eps);
            if let Some(probs) = probs {
                *self.saved.lock().unwrap() = Some(Saved {
                    qkv,
                    probs,
                    ctx,
                    a_d,
                    a,
                    act_d: i_pre,
                    i,
                    o_d,
                });
            }
            y
        })?;
        Ok((cpu_out(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (dm, f) = self.dims(x.layout())?;
        let h = dm.nh * dm.d;
        let rows = dm.b * dm.s;
        let saved = self.saved.lock().unwrap().take().ok_or_else(|| {
            // Saved only when the forward tracked gradients; released by the first backward
            // (freeing them early lowers the backward's peak memory).
            candle_core::Error::Msg(
                "fused layer: no saved activations (forward run without gradient tracking, or \
                 a second backward pass over the same graph)"
                    .into(),
            )
        })?;
        let Saved {
            qkv,
            probs,
            ctx,
            a_d,
            a,
            act_d,
            i,
            o_d,
        } = saved;
        let (xr, gr) = (Read::new(x)?, Read::new(grad)?);
        let w = &self.w;
        let (dx, grads) = with_slices(&w.all(), |p| {
            let [wq, _, wk, _, wv, _, wo, _, g1, _, w1, _, w2, _, g2, _] = p else {
                unreachable!("sixteen parameters")
            };
            xr.with(|x| {
                gr.with(|dy| {
                    // LN₂ over o_d + a.
                    // LN₂'s input gradient da, and do = da through the FFN output's dropout
                    // (da itself without one: it is read before FFN in adds to it).
                    let (mut da, d_o, dg2, dbe2) = backward_all_masked(
                        &o_d,
                        Some(&a),
                        dy,
                        g2,
                        self.eps,
                        self.masks.output.as_ref(),
                    );
                    // FFN out: di = do·W₂, multiplied by the kept act'(pre) piece by piece as
                    // the product finishes it. Prefetching the next strip's piece of it (on a
                    // Zen 5 EPYC, BERT-base distillation backward −15.7 ± 3.3 and −10.2 ± 1.6
                    // ms, in-process, 15 and 20 pairs; two strips ahead no better).
                    let mut di = uninit(rows * f);
                    let act_grad = |row: usize, c0: usize, g: &mut [f32]| {
                        let at = row * f + c0;
                        // The piece the next strip's epilogue reads, asked for while that
                        // strip's product runs: the saved derivative comes from memory.
                        let next = at + STRIP * f;
                        if let Some(p) = act_d.get(next..next + g.len()) {
                            prefetch(p)
                        }
                        mul(g, &act_d[at..at + g.len()])
                    };
                    let (dw2, db2) = backward_into(
                        d_o.as_deref().unwrap_or(&da),
                        h,
                        &i,
                        w2,
                        rows,
                        f,
                        h,
                        &mut di,
                        Acc::Overwrite,
                        Some(&act_grad),
                    );
                    drop(d_o);
                    // FFN in: da += di_pre·W₁ (da already holds the residual's share).
                    let (dw1, db1) =
                        backward_into(&di, f, &a, w1, rows, h, f, &mut da, Acc::Add, None);
                    drop(di);
                    // LN₁ over a_d + x.
                    // LN₁ over a_d + x; the attention output's gradient through its dropout
                    // (dx itself without one: read before q, k, v add to it).
                    let (mut dx, da_pre, dg1, dbe1) = backward_all_masked(
                        &a_d,
                        Some(x),
                        &da,
                        g1,
                        self.eps,
                        self.masks.attn_out.as_ref(),
                    );
                    drop(da);
                    let mut dctx = uninit(rows * h);
                    let (dwo, dbo) = backward_into(
                        da_pre.as_deref().unwrap_or(&dx),
                        h,
                        &ctx,
                        wo,
                        rows,
                        h,
                        h,
                        &mut dctx,
                        Acc::Overwrite,
                        None,
                    );
                    drop(da_pre);
                    let mut dqkv = uninit(rows * 3 * h);
                    let dp = SharedMut::new(&mut dqkv);
                    // Safety: q, k and v's gradients are the three column blocks of dqkv,
                    // laid out as `dm` says; nothing else touches it meanwhile.
                    unsafe {
                        attention::backward(
                            dm,
                            &qkv,
                            &qkv[h..],
                            &qkv[2 * h..],
                            &probs,
                            &dctx,
                            self.masks.attention.as_ref(),
                            dp,
                            dp.offset(h),
                            dp.offset(2 * h),
                        )
                    };
                    drop(dctx);
                    // dx (the residual's share) += dq·W_q + dk·W_k + dv·W_v.
                    let mut qkv_grads = Vec::with_capacity(6);
                    for (j, wj) in [wq, wk, wv].into_iter().enumerate() {
                        let (dwj, dbj) = backward_into(
                            &dqkv[j * h..],
                            3 * h,
                            x,
                            wj,
                            rows,
                            h,
                            h,
                            &mut dx,
                            Acc::Add,
                            None,
                        );
                        qkv_grads.push(dwj);
                        qkv_grads.push(dbj);
                    }
                    let mut q = qkv_grads.into_iter();
                    let mut next = || q.next().expect("six q, k, v gradients");
                    let grads = [
                        next(),
                        next(),
                        next(),
                        next(),
                        next(),
                        next(),
                        dwo,
                        dbo,
                        dg1,
                        dbe1,
                        dw1,
                        db1,
                        dw2,
                        db2,
                        dg2,
                        dbe2,
                    ];
                    (dx, grads)
                })
            })
        })?;
        for (param, g) in w.all().into_iter().zip(grads) {
            self.sink.add(param, g);
        }
        Ok(Some(tensor(dx, x.dims())?))
    }
}

/// One transformer layer over `x` `[batch, seq, h]` (f32, CPU) as a single graph node; see
/// the module docs. `key_mask` `[batch · seq]`: 1 where a key may be attended to. The
/// parameters' gradients go to `sink`.
#[allow(clippy::too_many_arguments)]
pub fn layer(
    x: &Tensor,
    w: LayerWeights,
    heads: usize,
    act: Activation,
    eps: f64,
    key_mask: Option<Arc<Vec<u8>>>,
    masks: LayerMasks,
    sink: &GradSink,
) -> Result<Tensor> {
    let keep = x.track_op() || w.track();
    let op = LayerOp {
        w,
        heads,
        act,
        eps: eps as f32,
        key_mask,
        masks,
        keep,
        saved: Mutex::new(None),
        sink: sink.clone(),
    };
    Ok(x.contiguous()?.apply_op1(op)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n as u64)
            .map(|i| {
                let x = (i.wrapping_mul(2654435761).wrapping_add(seed * 97) % 1000) as f32;
                x / 1000.0 - 0.5
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The largest elementwise difference between two outputs.
    fn worst(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    }

    /// A layer's weights of hidden `h` and FFN width `f` (the linears' weights times `scale`),
    /// from fixed seeds, no stored forms.
    fn test_weights(h: usize, f: usize, scale: f64) -> LayerWeights {
        let lin = |out: usize, inp: usize, seed: u64| {
            let w = (randn(&[out, inp], seed) * scale).unwrap();
            (w, randn(&[out], seed + 1))
        };
        LayerWeights {
            query: lin(h, h, 1),
            key: lin(h, h, 3),
            value: lin(h, h, 5),
            attn_out: lin(h, h, 7),
            attn_norm: (randn(&[h], 9), randn(&[h], 10)),
            intermediate: lin(f, h, 11),
            output: lin(h, f, 13),
            out_norm: (randn(&[h], 15), randn(&[h], 16)),
            transposed: None,
        }
    }

    #[test]
    fn stored_panels_are_what_the_products_read() {
        if !packed::available() {
            eprintln!("no AVX-512 here: no panels are made, nothing to test");
            return;
        }
        // Hidden 512, FFN 1024: wide enough for the products to be split over the threads and
        // run by `packed`, reading the panels (on one thread too). Panels of W give W's
        // output; zero panels (W's data left as it is) give a different one.
        let (h, f, b, s) = (512, 1024, 2, 8);
        let w = test_weights(h, f, 0.05);
        let x = randn(&[b, s, h], 17);
        let run = |w: LayerWeights| {
            let sink = GradSink::default();
            let y = layer(
                &x,
                w,
                8,
                Activation::GeluErf,
                1e-12,
                None,
                LayerMasks::default(),
                &sink,
            )
            .unwrap();
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let plain = run(w.clone());
        let t = Transposed::of(&w).unwrap();
        assert!(matches!(t.form, Form::Panels(_)));
        let stored = run(LayerWeights {
            transposed: Some(Arc::new(t)),
            ..w.clone()
        });
        let d = worst(&plain, &stored);
        assert!(d < 1e-4, "stored panels change the output by {d}");
        let zeros = [(h, h), (h, h), (h, h), (h, h), (h, f), (f, h)]
            .map(|(k, n)| vec![0f32; packed::panels_len(k, n)]);
        let wrong = run(LayerWeights {
            transposed: Some(Arc::new(Transposed {
                form: Form::Panels(zeros),
            })),
            ..w
        });
        assert!(
            worst(&plain, &wrong) > 1e-2,
            "the layer did not read the panels"
        );
    }

    #[test]
    fn stored_transposes_give_the_layer_the_same_output() {
        // hidden 24 (3 heads of 8), FFN 40: q, k, v, the output projection and both FFN
        // products all read the stored transposes; the output must match the views of W.
        let (h, f, b, s) = (24, 40, 2, 5);
        let w = test_weights(h, f, 1.0);
        assert!(w.frozen() && w.fusable());
        let x = randn(&[b, s, h], 17);
        let key_mask = Some(Arc::new(vec![1u8, 1, 1, 0, 0, 1, 1, 1, 1, 1]));
        let run = |w: LayerWeights| {
            let sink = GradSink::default();
            layer(
                &x,
                w,
                3,
                Activation::GeluErf,
                1e-12,
                key_mask.clone(),
                LayerMasks::default(),
                &sink,
            )
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
        };
        let plain = run(w.clone());
        let t = Transposed::transposes(&w).unwrap();
        // The stored q, k, v block: row i of W_k is column h + i of the [h, 3h] transpose.
        assert_eq!(
            t.qkv().unwrap().0[3 * h + h + 2],
            w.key
                .0
                .get(2)
                .unwrap()
                .get(1)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        );
        let mut forms = vec![("transposes", t)];
        if packed::available() {
            // Panels (what Transposed::of makes on this CPU): hidden 24 is below the packed
            // product's sizes, so the layer also goes on reading W itself; the products that
            // read panels are packed's own tests'.
            forms.push(("panels", Transposed::panels(&w).unwrap()));
        }
        for (name, t) in forms {
            let stored = run(LayerWeights {
                transposed: Some(Arc::new(t)),
                ..w.clone()
            });
            let d = worst(&plain, &stored);
            assert!(d < 1e-5, "stored {name} change the output by {d}");
        }
        // A transpose of other shapes is refused, not read out of bounds.
        let mut other = w.clone();
        let wider = test_weights(h, f + 8, 1.0);
        other.intermediate = wider.intermediate;
        other.output = wider.output;
        let wrong = LayerWeights {
            transposed: Some(Arc::new(Transposed::of(&other).unwrap())),
            ..w
        };
        let sink = GradSink::default();
        let err = layer(
            &x,
            wrong,
            3,
            Activation::GeluErf,
            1e-12,
            None,
            LayerMasks::default(),
            &sink,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("stored transposed weights"), "{err}");
    }
}
