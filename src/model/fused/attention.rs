//! Multi-head self-attention, `softmax(Q·Kᵀ/√d + mask) · V` with dropout on the
//! probabilities, as one graph node over `q`, `k`, `v` `[batch, seq, hidden]`.
//!
//! The heads are column blocks of the inputs and of the output: gemm reads and writes them
//! with row stride `hidden`, so there is no reshape, transpose or copy into `[b, heads, s, d]`
//! and back (each of which costs a full copy forward and again backward in candle's graph).
//! The `batch × heads` small products run in parallel, one task each, rather than each being
//! split across threads. The probabilities are kept for the backward (training only).

use super::dropout::Mask;
use super::gemm::{gemm, gemm_raw, Acc, Mat};
use super::math::{dot, exp, max, sum};
use super::{cpu_out, cpu_slice, tensor, uninit, Read, SharedMut};
use anyhow::Result;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Where the heads are: `q`, `k`, `v` (and their gradients) are `[batch · seq]` rows `rs`
/// elements apart, head `hi` in columns `hi · d .. (hi + 1) · d` from the slice's start (so
/// q, k and v may be column blocks of one `[rows, 3h]` projection). The output and its
/// gradient are `[batch · seq, nh · d]`, row-major.
#[derive(Clone, Copy)]
pub(crate) struct Dims {
    pub b: usize,
    pub s: usize,
    pub nh: usize,
    pub d: usize,
    pub rs: usize,
}

impl Dims {
    fn h(&self) -> usize {
        self.nh * self.d
    }

    /// Head `hi` of batch row `bi` of an input laid out as `self` says, as an `s × d` matrix.
    fn head<'a>(&self, x: &'a [f32], bi: usize, hi: usize) -> Mat<'a> {
        self.head_rs(x, bi, hi, self.rs)
    }

    fn head_rs<'a>(&self, x: &'a [f32], bi: usize, hi: usize, rs: usize) -> Mat<'a> {
        Mat {
            data: &x[bi * self.s * rs + hi * self.d..],
            rows: self.s,
            cols: self.d,
            rs,
            cs: 1,
            panels: None,
        }
    }

    fn offset(&self, bi: usize, hi: usize, rs: usize) -> usize {
        bi * self.s * rs + hi * self.d
    }
}

/// Row-wise softmax of the scores of batch row `bi`, keys masked out get probability 0.
fn softmax(p: &mut [f32], key_mask: Option<&[u8]>, bi: usize, s: usize) {
    let mask = key_mask.map(|m| &m[bi * s..(bi + 1) * s]);
    #[cfg(target_arch = "x86_64")]
    if super::math::avx512::available() {
        // Safety: the CPU has AVX-512F.
        return unsafe { softmax_rows_avx512(p, mask, s) };
    }
    softmax_rows(p, mask, s);
}

/// [`softmax_rows`] with AVX-512 intrinsics: each row's max, exp and sum in 16-lane registers
/// with the key mask as register masks (drawn once for all the rows), `exp` as
/// [`super::math::avx512`]'s; rows of up to 128 keys stay in registers, two rows at a time.
/// One (batch, head) of 128 × 128 on one thread, hot: 12.9 µs with the compiler's
/// vectorisation of the scalar version, 6.3 µs so (each with a 64 KB copy to start from);
/// BERT-base forward, in-process alternating steps: -6.3 ± 4.0 ms (40 pairs, 27 won).
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_rows_avx512(p: &mut [f32], mask: Option<&[u8]>, s: usize) {
    use super::math::avx512::exp16;
    use std::arch::x86_64::*;
    if s == 0 {
        return;
    }
    // Per 16 keys: the lanes inside the row, and of those the keys that may be attended to.
    let chunks = s.div_ceil(16);
    let mut lanes = vec![0u16; chunks];
    let mut keep = vec![0u16; chunks];
    for c in 0..chunks {
        lanes[c] = super::math::avx512::lanes(s - 16 * c);
        for j in 0..16.min(s - 16 * c) {
            if mask.is_none_or(|m| m[16 * c + j] != 0) {
                keep[c] |= 1 << j;
            }
        }
    }
    if chunks <= 8 {
        // Rows of up to 128 keys held in registers, two rows at a time.
        let mut rows = p.chunks_exact_mut(2 * s);
        for pair in &mut rows {
            let r = pair.as_mut_ptr();
            let mut v = [[_mm512_setzero_ps(); 8]; 2];
            let mut mx = [_mm512_set1_ps(f32::NEG_INFINITY); 2];
            for (t, vt) in v.iter_mut().enumerate() {
                for c in 0..chunks {
                    vt[c] = _mm512_maskz_loadu_ps(lanes[c], r.add(t * s + 16 * c));
                    mx[t] = _mm512_mask_max_ps(mx[t], keep[c], mx[t], vt[c]);
                }
            }
            let m = [_mm512_reduce_max_ps(mx[0]), _mm512_reduce_max_ps(mx[1])];
            let mut total = [_mm512_setzero_ps(); 2];
            for t in 0..2 {
                let mv = _mm512_set1_ps(m[t]);
                for c in 0..chunks {
                    v[t][c] = _mm512_maskz_mov_ps(keep[c], exp16(_mm512_sub_ps(v[t][c], mv)));
                    total[t] = _mm512_add_ps(total[t], v[t][c]);
                }
            }
            for t in 0..2 {
                let row = r.add(t * s);
                if m[t] == f32::NEG_INFINITY {
                    std::slice::from_raw_parts_mut(row, s).fill(1.0 / s as f32);
                    continue;
                }
                let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(total[t]));
                for c in 0..chunks {
                    _mm512_mask_storeu_ps(row.add(16 * c), lanes[c], _mm512_mul_ps(v[t][c], inv));
                }
            }
        }
        let rest = rows.into_remainder();
        if rest.is_empty() {
            return;
        }
        return softmax_rows_avx512_loop(rest, &lanes, &keep, s);
    }
    softmax_rows_avx512_loop(p, &lanes, &keep, s)
}

/// [`softmax_rows_avx512`] over rows of any length, one pass over the row per stage.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_rows_avx512_loop(p: &mut [f32], lanes: &[u16], keep: &[u16], s: usize) {
    use super::math::avx512::exp16;
    use std::arch::x86_64::*;
    let chunks = lanes.len();
    for row in p.chunks_exact_mut(s) {
        let r = row.as_mut_ptr();
        let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
        for c in 0..chunks {
            let v = _mm512_maskz_loadu_ps(lanes[c], r.add(16 * c));
            mx = _mm512_mask_max_ps(mx, keep[c], mx, v);
        }
        let m = _mm512_reduce_max_ps(mx);
        if m == f32::NEG_INFINITY {
            // No key may be attended to: uniform, as the scalar version.
            row.fill(1.0 / s as f32);
            continue;
        }
        let mv = _mm512_set1_ps(m);
        let mut total = _mm512_setzero_ps();
        for c in 0..chunks {
            let v = _mm512_maskz_loadu_ps(lanes[c], r.add(16 * c));
            let e = _mm512_maskz_mov_ps(keep[c], exp16(_mm512_sub_ps(v, mv)));
            _mm512_mask_storeu_ps(r.add(16 * c), lanes[c], e);
            total = _mm512_add_ps(total, e);
        }
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(total));
        for (c, &l) in lanes.iter().enumerate() {
            let v = _mm512_maskz_loadu_ps(l, r.add(16 * c));
            _mm512_mask_storeu_ps(r.add(16 * c), l, _mm512_mul_ps(v, inv));
        }
    }
}

/// The forward pass: `out ← softmax(Q·Kᵀ/√d + mask)·V` per (batch, head) task, in parallel.
/// Returns the probabilities `[b, nh, s, s]` (before dropout) when `keep`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    dm: Dims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    key_mask: Option<&[u8]>,
    drop: Option<&Mask>,
    keep: bool,
) -> Option<Vec<f32>> {
    let Dims { b, s, nh, d, .. } = dm;
    let h = dm.h();
    let scale = 1.0 / (d as f32).sqrt();
    assert!(out.len() >= b * s * h, "attention output too short");
    let outp = SharedMut::new(out);
    // Task t = (bi, hi): scores, softmax, dropout, · V into head hi's columns of row bi.
    // `p` is the task's probabilities (kept for the backward when training, else a
    // per-thread scratch that stays in cache); `scratch` takes the dropped copy.
    let task = |t: usize, p: &mut [f32], scratch: &mut Vec<f32>| {
        let (bi, hi) = (t / nh, t % nh);
        gemm(
            p,
            s,
            dm.head(q, bi, hi),
            dm.head(k, bi, hi).t(),
            Acc::Overwrite,
            scale,
            1,
        );
        softmax(p, key_mask, bi, s);
        let pd: &[f32] = match drop {
            Some(m) => {
                scratch.clear();
                scratch.extend_from_slice(p);
                m.apply(scratch, t * s * s);
                scratch
            }
            None => p,
        };
        // Safety: task t writes only head hi's columns of batch row bi.
        unsafe {
            gemm_raw(
                outp.at(dm.offset(bi, hi, h)),
                h,
                s,
                d,
                Mat::rm(pd, s, s),
                dm.head(v, bi, hi),
                Acc::Overwrite,
                1.0,
                1,
            )
        }
    };
    if keep {
        let mut probs = uninit(b * nh * s * s);
        probs
            .par_chunks_mut(s * s)
            .enumerate()
            .for_each_init(Vec::new, |scratch, (t, p)| task(t, p, scratch));
        Some(probs)
    } else {
        (0..b * nh).into_par_iter().for_each_init(
            || (uninit(s * s), Vec::new()),
            |(p, scratch), t| task(t, p, scratch),
        );
        None
    }
}

/// The backward pass from the output gradient `go` `[b · s, h]`: writes `dq`, `dk`, `dv`
/// (laid out as `dm` says, like q, k and v).
///
/// # Safety
/// `dq`, `dk` and `dv` must point to buffers laid out as `dm` says, and no one else may
/// touch the head columns they cover while this runs.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn backward(
    dm: Dims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    go: &[f32],
    drop: Option<&Mask>,
    dq: SharedMut,
    dk: SharedMut,
    dv: SharedMut,
) {
    let Dims { b, s, nh, d, rs } = dm;
    let h = dm.h();
    let scale = 1.0 / (d as f32).sqrt();
    (0..b * nh).into_par_iter().for_each_init(
        || (uninit(s * s), uninit(s * s)),
        |(pd_buf, ds), t| {
            let (bi, hi) = (t / nh, t % nh);
            let off = dm.offset(bi, hi, rs);
            let p = &probs[t * s * s..(t + 1) * s * s];
            let pd: &[f32] = match drop {
                Some(m) => {
                    pd_buf.copy_from_slice(p);
                    m.apply(pd_buf, t * s * s);
                    pd_buf
                }
                None => p,
            };
            let go_h = dm.head_rs(go, bi, hi, h);
            // Safety (all three): task t writes only head hi's columns of row bi.
            // dV = P_dᵀ · dO
            gemm_raw(
                dv.at(off),
                rs,
                s,
                d,
                Mat::rm(pd, s, s).t(),
                go_h,
                Acc::Overwrite,
                1.0,
                1,
            );
            // dP_d = dO · Vᵀ, then through the dropout mask.
            gemm(ds, s, go_h, dm.head(v, bi, hi).t(), Acc::Overwrite, 1.0, 1);
            if let Some(m) = drop {
                m.apply(ds, t * s * s);
            }
            // dS = P ∘ (dP − rowsum(dP ∘ P)) · scale
            softmax_backward_rows(ds, p, s, scale);
            // dQ = dS · K
            gemm_raw(
                dq.at(off),
                rs,
                s,
                d,
                Mat::rm(ds, s, s),
                dm.head(k, bi, hi),
                Acc::Overwrite,
                1.0,
                1,
            );
            // dK = dSᵀ · Q
            gemm_raw(
                dk.at(off),
                rs,
                s,
                d,
                Mat::rm(ds, s, s).t(),
                dm.head(q, bi, hi),
                Acc::Overwrite,
                1.0,
                1,
            );
        },
    )
}

struct AttentionOp {
    heads: usize,
    /// `[batch, seq]`, 1 for keys that may be attended to.
    key_mask: Option<Arc<Vec<u8>>>,
    /// Over `[batch, heads, seq, seq]`.
    drop: Option<Mask>,
    keep: bool,
    probs: Mutex<Option<Vec<f32>>>,
}

impl AttentionOp {
    fn dims(&self, l: &Layout) -> candle_core::Result<Dims> {
        let (b, s, h) = l.shape().dims3()?;
        if self.heads == 0 || h % self.heads != 0 {
            return Err(candle_core::Error::Msg(format!(
                "fused attention: hidden {h} is not a multiple of {} heads",
                self.heads
            )));
        }
        Ok(Dims {
            b,
            s,
            nh: self.heads,
            d: h / self.heads,
            rs: h,
        })
    }
}

#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma"
))]
fn softmax_rows(p: &mut [f32], mask: Option<&[u8]>, s: usize) {
    // A block of rows at a time, one pass over the block for each stage (max, exp, sum,
    // scale): the rows of a stage are independent, so the CPU overlaps one row's reduction
    // with the next row's, where row by row each stage waits on the one before (a row of
    // 128 scores is too short to hide that). With `math`'s pairwise folds: 15.3 -> 12.9 µs
    // for one (batch, head) of 128 × 128 on one thread; ~1% of the attention in a step.
    const BLOCK: usize = 16;
    for block in p.chunks_mut(BLOCK * s) {
        let n = block.len() / s;
        let mut mx = [0f32; BLOCK];
        for (r, row) in block.chunks_exact_mut(s).enumerate() {
            if let Some(m) = mask {
                // Masked keys out of the max and the sum: -inf scores, as adding the dtype's
                // minimum does in the composed path.
                for (v, &k) in row.iter_mut().zip(m) {
                    if k == 0 {
                        *v = f32::NEG_INFINITY;
                    }
                }
            }
            mx[r] = max(row);
        }
        for (row, &m) in block.chunks_exact_mut(s).zip(&mx) {
            if m == f32::NEG_INFINITY {
                // No key may be attended to: uniform, as adding the same large negative
                // number to every score does.
                row.fill(1.0 / s as f32);
            } else {
                for v in row.iter_mut() {
                    *v = exp(*v - m);
                }
            }
        }
        let mut inv = [0f32; BLOCK];
        for (r, row) in block.chunks_exact(s).enumerate() {
            inv[r] = 1.0 / sum(row);
        }
        for (row, &i) in block.chunks_exact_mut(s).zip(&inv[..n]) {
            for v in row.iter_mut() {
                *v *= i;
            }
        }
    }
}

/// The softmax backward in place: `ds ← P ∘ (ds − rowsum(ds ∘ P)) · scale`.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma"
))]
fn softmax_backward_rows(ds: &mut [f32], p: &[f32], s: usize, scale: f32) {
    // A block of rows at a time, the dot products first (independent), as the forward.
    const BLOCK: usize = 16;
    for (db, pb) in ds.chunks_mut(BLOCK * s).zip(p.chunks(BLOCK * s)) {
        let mut d = [0f32; BLOCK];
        for (r, (dr, pr)) in db.chunks_exact(s).zip(pb.chunks_exact(s)).enumerate() {
            d[r] = dot(dr, pr);
        }
        for ((dr, pr), &d) in db.chunks_exact_mut(s).zip(pb.chunks_exact(s)).zip(&d) {
            for (x, &pv) in dr.iter_mut().zip(pr) {
                *x = pv * (*x - d) * scale;
            }
        }
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dm = self.dims(ql)?;
        if kl.shape() != ql.shape() || vl.shape() != ql.shape() {
            return Err(candle_core::Error::Msg(
                "fused attention: q, k and v must have the same shape".into(),
            ));
        }
        let (q, k, v) = (
            cpu_slice(qs, ql, self.name())?,
            cpu_slice(ks, kl, self.name())?,
            cpu_slice(vs, vl, self.name())?,
        );
        let mut out = uninit(q.len());
        let probs = forward(
            dm,
            q,
            k,
            v,
            &mut out,
            self.key_mask.as_deref().map(|m| m.as_slice()),
            self.drop.as_ref(),
            self.keep,
        );
        *self.probs.lock().unwrap() = probs;
        Ok((cpu_out(out), ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dm = self.dims(q.layout())?;
        let probs = self.probs.lock().unwrap();
        let probs = probs.as_ref().ok_or_else(|| {
            candle_core::Error::Msg("fused attention: backward of an op run without keep".into())
        })?;
        let (qr, kr, vr, gr) = (
            Read::new(q)?,
            Read::new(k)?,
            Read::new(v)?,
            Read::new(grad)?,
        );
        let n = q.elem_count();
        let (mut dq, mut dk, mut dv) = (uninit(n), uninit(n), uninit(n));
        let (dqp, dkp, dvp) = (
            SharedMut::new(&mut dq),
            SharedMut::new(&mut dk),
            SharedMut::new(&mut dv),
        );
        qr.with(|q| {
            kr.with(|k| {
                vr.with(|v| {
                    gr.with(|go| {
                        // Safety: three separate buffers laid out as q, k and v.
                        unsafe {
                            backward(dm, q, k, v, probs, go, self.drop.as_ref(), dqp, dkp, dvp)
                        }
                    })
                })
            })
        });
        let shape = q.dims();
        Ok((
            Some(tensor(dq, shape)?),
            Some(tensor(dk, shape)?),
            Some(tensor(dv, shape)?),
        ))
    }
}

/// Attention over `q`, `k`, `v` `[batch, seq, hidden]` (f32, CPU) with `heads` heads.
/// `key_mask` `[batch, seq]`: 1 where a key may be attended to (`None`: everywhere).
/// `drop`: a mask over `[batch, heads, seq, seq]` for the probabilities.
/// `keep`: the result will be differentiated.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    key_mask: Option<Arc<Vec<u8>>>,
    drop: Option<Mask>,
    keep: bool,
) -> Result<Tensor> {
    let op = AttentionOp {
        heads,
        key_mask,
        drop,
        keep,
        probs: Mutex::new(None),
    };
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn avx512_softmax_matches_the_scalar_one() {
        if !super::super::math::avx512::available() {
            eprintln!("no AVX-512 here: the scalar softmax is the only one");
            return;
        }
        // Rows of lengths that leave every tail of a 16-lane register, scores from -30 to 30,
        // without a mask, with some keys masked, and with every key masked (uniform rows).
        for s in [1, 7, 16, 100, 128, 129, 300] {
            let scores: Vec<f32> = (0..5 * s)
                .map(|i| ((i * 7919 % 601) as f32 - 300.0) / 10.0)
                .collect();
            let some: Vec<u8> = (0..s).map(|j| (j % 3 != 1) as u8).collect();
            let none = vec![0u8; s];
            for mask in [None, Some(&some[..]), Some(&none[..])] {
                let mut want = scores.clone();
                softmax_rows(&mut want, mask, s);
                let mut got = scores.clone();
                // Safety: AVX-512 checked above.
                unsafe { softmax_rows_avx512(&mut got, mask, s) };
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-6 * w.abs() + 1e-30,
                        "s {s}, mask {:?}, element {i}: {g} vs {w}",
                        mask.map(|m| m.iter().filter(|&&k| k == 0).count())
                    );
                }
            }
        }
    }
}
