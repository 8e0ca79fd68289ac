//! The kernels of `kernels.cu` written out as plain Rust loops over `f32` slices: the ops'
//! CPU implementations, so that the ops' shapes, argument order and backward passes are
//! tested on any machine (`tests/cuda_ops.rs`) against candle's composed ops, and the GPU
//! run only adds the kernels' own arithmetic, which mirrors these line for line.

use crate::model::fused::math::erf;
use crate::util::dropout_draw;

/// Inverted dropout's factor for element `i` (`keep_scale` in `kernels.cu`).
pub fn keep_scale(seed: u64, i: u64, p: f32, scale: f32) -> f32 {
    let u = dropout_draw(seed, i) as f32 * (1.0 / 16_777_216.0);
    if u < p {
        0.0
    } else {
        scale
    }
}

/// The factor of element `i` when dropout may be off (`p == 0`).
fn factor(seed: u64, i: usize, p: f32, scale: f32) -> f32 {
    if p > 0.0 {
        keep_scale(seed, i as u64, p, scale)
    } else {
        1.0
    }
}

pub fn dropout(x: &[f32], seed: u64, p: f32, scale: f32) -> Vec<f32> {
    x.iter()
        .enumerate()
        .map(|(i, &v)| v * keep_scale(seed, i as u64, p, scale))
        .collect()
}

/// Softmax of `x · scale + mask` over rows of `cols`, row `r` taking mask row
/// `r / rows_per_batch` (`mask == None`: no mask).
pub fn softmax(
    x: &[f32],
    cols: usize,
    mask: Option<&[f32]>,
    rows_per_batch: usize,
    scale: f32,
) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    for (r, (xr, yr)) in x.chunks(cols).zip(y.chunks_mut(cols)).enumerate() {
        let m = mask.map(|m| &m[(r / rows_per_batch) * cols..][..cols]);
        let z = |j: usize| xr[j] * scale + m.map_or(0.0, |m| m[j]);
        let max = (0..cols).map(z).fold(f32::NEG_INFINITY, f32::max);
        let mut s = 0f32;
        for (j, v) in yr.iter_mut().enumerate() {
            *v = (z(j) - max).exp();
            s += *v;
        }
        let inv = 1.0 / s;
        yr.iter_mut().for_each(|v| *v *= inv);
    }
    y
}

/// `scale · y · (g - Σ g·y)` over rows of `cols`.
pub fn softmax_bwd(y: &[f32], g: &[f32], cols: usize, scale: f32) -> Vec<f32> {
    let mut dx = vec![0f32; y.len()];
    for ((yr, gr), dr) in y.chunks(cols).zip(g.chunks(cols)).zip(dx.chunks_mut(cols)) {
        let d: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
        for ((o, &yv), &gv) in dr.iter_mut().zip(yr).zip(gr) {
            *o = scale * yv * (gv - d);
        }
    }
    dx
}

/// `[rows, 2]`: each row's mean and `1/sqrt(var + eps)`.
pub fn layer_norm_stats(x: &[f32], cols: usize, eps: f32) -> Vec<f32> {
    x.chunks(cols)
        .flat_map(|r| {
            let mean = r.iter().sum::<f32>() / cols as f32;
            let var = r.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / cols as f32;
            [mean, 1.0 / (var + eps).sqrt()]
        })
        .collect()
}

pub fn layer_norm(x: &[f32], w: &[f32], b: &[f32], cols: usize, eps: f32) -> Vec<f32> {
    let stats = layer_norm_stats(x, cols, eps);
    let mut y = vec![0f32; x.len()];
    for (r, (xr, yr)) in x.chunks(cols).zip(y.chunks_mut(cols)).enumerate() {
        let (mean, rstd) = (stats[2 * r], stats[2 * r + 1]);
        for j in 0..cols {
            yr[j] = (xr[j] - mean) * rstd * w[j] + b[j];
        }
    }
    y
}

pub fn layer_norm_bwd_x(x: &[f32], w: &[f32], g: &[f32], stats: &[f32], cols: usize) -> Vec<f32> {
    let mut dx = vec![0f32; x.len()];
    for (r, ((xr, gr), dr)) in x
        .chunks(cols)
        .zip(g.chunks(cols))
        .zip(dx.chunks_mut(cols))
        .enumerate()
    {
        let (mean, rstd) = (stats[2 * r], stats[2 * r + 1]);
        let (mut a, mut c) = (0f32, 0f32);
        for j in 0..cols {
            let gw = gr[j] * w[j];
            a += gw;
            c += gw * (xr[j] - mean) * rstd;
        }
        let (a, c) = (a / cols as f32, c / cols as f32);
        for j in 0..cols {
            let xh = (xr[j] - mean) * rstd;
            dr[j] = rstd * (gr[j] * w[j] - a - xh * c);
        }
    }
    dx
}

/// `[2, 1, cols]`: Σ g·xhat and Σ g over all rows (one chunk).
pub fn layer_norm_bwd_wb(x: &[f32], g: &[f32], stats: &[f32], cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; 2 * cols];
    for (r, (xr, gr)) in x.chunks(cols).zip(g.chunks(cols)).enumerate() {
        let (mean, rstd) = (stats[2 * r], stats[2 * r + 1]);
        for j in 0..cols {
            out[j] += gr[j] * (xr[j] - mean) * rstd;
            out[cols + j] += gr[j];
        }
    }
    out
}

/// Activation `act` (0 none, 1 GELU erf, 2 GELU tanh, 3 ReLU) and its derivative.
pub fn act_fwd(z: f32, act: u32) -> f32 {
    match act {
        1 => 0.5 * z * (1.0 + erf(z * std::f32::consts::FRAC_1_SQRT_2)),
        2 => {
            let t = (0.797_884_6 * (z + 0.044715 * z * z * z)).tanh();
            0.5 * z * (1.0 + t)
        }
        3 => z.max(0.0),
        _ => z,
    }
}

pub fn act_grad(z: f32, act: u32) -> f32 {
    match act {
        1 => {
            0.5 * (1.0 + erf(z * std::f32::consts::FRAC_1_SQRT_2))
                + z * 0.398_942_3 * (-0.5 * z * z).exp()
        }
        2 => {
            let k = 0.797_884_6f32;
            let t = (k * (z + 0.044715 * z * z * z)).tanh();
            0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * z * z)
        }
        3 => {
            if z > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        _ => 1.0,
    }
}

/// A dense layer's epilogue: `dropout(act(pre + b))` over rows of `cols`.
pub fn bias_act(pre: &[f32], b: &[f32], act: u32, p: f32, seed: u64, scale: f32) -> Vec<f32> {
    let cols = b.len();
    pre.iter()
        .enumerate()
        .map(|(i, &v)| act_fwd(v + b[i % cols], act) * factor(seed, i, p, scale))
        .collect()
}

/// Its backward to the product: `g · mask · act'(pre + b)`.
#[allow(clippy::too_many_arguments)]
pub fn bias_act_bwd(
    pre: &[f32],
    b: &[f32],
    g: &[f32],
    act: u32,
    p: f32,
    seed: u64,
    scale: f32,
) -> Vec<f32> {
    let cols = b.len();
    pre.iter()
        .zip(g)
        .enumerate()
        .map(|(i, (&v, &gv))| gv * factor(seed, i, p, scale) * act_grad(v + b[i % cols], act))
        .collect()
}

/// `[1, cols]`: the column sums (one chunk).
pub fn colsum(x: &[f32], cols: usize) -> Vec<f32> {
    let mut s = vec![0f32; cols];
    for r in x.chunks(cols) {
        s.iter_mut().zip(r).for_each(|(a, v)| *a += v);
    }
    s
}

/// `max + ln Σ exp(x · scale - max)` of a row.
fn lse(xr: &[f32], scale: f32) -> f32 {
    let m = xr
        .iter()
        .map(|&v| v * scale)
        .fold(f32::NEG_INFINITY, f32::max);
    m + xr.iter().map(|&v| (v * scale - m).exp()).sum::<f32>().ln()
}

/// Per row: `Σ p (ln max(p, 1e-30) - ln softmax(s · inv_t))`.
pub fn soft_kl(s: &[f32], p: &[f32], cols: usize, inv_t: f32) -> Vec<f32> {
    s.chunks(cols)
        .zip(p.chunks(cols))
        .map(|(sr, pr)| {
            let l = lse(sr, inv_t);
            sr.iter()
                .zip(pr)
                .map(|(&sv, &pv)| pv * (pv.max(1e-30).ln() - (sv * inv_t - l)))
                .sum()
        })
        .collect()
}

/// `g_row · (q · Σ p - p) · inv_t`.
pub fn soft_kl_bwd(s: &[f32], p: &[f32], g: &[f32], cols: usize, inv_t: f32) -> Vec<f32> {
    let mut ds = vec![0f32; s.len()];
    for (((sr, pr), dr), &gv) in s
        .chunks(cols)
        .zip(p.chunks(cols))
        .zip(ds.chunks_mut(cols))
        .zip(g)
    {
        let l = lse(sr, inv_t);
        let psum: f32 = pr.iter().sum();
        for ((d, &sv), &pv) in dr.iter_mut().zip(sr).zip(pr) {
            *d = gv * inv_t * ((sv * inv_t - l).exp() * psum - pv);
        }
    }
    ds
}

/// Per row: `lse(x) - x[target]`.
pub fn cross_entropy(x: &[f32], targets: &[f32], cols: usize) -> Vec<f32> {
    x.chunks(cols)
        .zip(targets)
        .map(|(xr, &t)| lse(xr, 1.0) - xr[t as usize])
        .collect()
}

/// `g_row · (softmax - onehot(target))`.
pub fn cross_entropy_bwd(x: &[f32], targets: &[f32], g: &[f32], cols: usize) -> Vec<f32> {
    let mut dx = vec![0f32; x.len()];
    for (((xr, dr), &t), &gv) in x.chunks(cols).zip(dx.chunks_mut(cols)).zip(targets).zip(g) {
        let l = lse(xr, 1.0);
        for (j, (d, &xv)) in dr.iter_mut().zip(xr).enumerate() {
            *d = gv * ((xv - l).exp() - if j == t as usize { 1.0 } else { 0.0 });
        }
    }
    dx
}

/// Tokens a chunk of the embedding gradient's first pass sums (`distil_embedding_bwd_chunks`).
pub const EMBEDDING_CHUNK: usize = 32;

/// The fixed order in which the embedding lookup's backward sums the rows' gradients: the
/// tokens grouped by id (ids ascending, each id's tokens in input order), each id's run cut
/// into chunks of at most [`EMBEDDING_CHUNK`] tokens; a chunk's tokens are summed in turn,
/// then an id's chunks in turn. The same on the CPU and the GPU, so both give the same bits.
#[derive(Debug, Clone)]
pub struct EmbeddingGradPlan {
    /// Token indices, grouped by id.
    pub order: Vec<u32>,
    /// Chunk `c` is `order[begin[c]..begin[c + 1]]`.
    pub begin: Vec<u32>,
    /// The ids present, ascending.
    pub uid: Vec<u32>,
    /// Id `uid[u]`'s chunks are `ubegin[u]..ubegin[u + 1]`.
    pub ubegin: Vec<u32>,
}

impl EmbeddingGradPlan {
    /// The plan for `ids` into a table of `rows` rows; an error names an id outside it.
    pub fn new(ids: &[u32], rows: usize) -> Result<Self, String> {
        if ids.len() >= u32::MAX as usize {
            return Err(format!(
                "{} token ids exceed one embedding lookup",
                ids.len()
            ));
        }
        let mut count = vec![0u32; rows];
        for &id in ids {
            match count.get_mut(id as usize) {
                Some(c) => *c += 1,
                None => {
                    return Err(format!(
                        "token id {id} is outside the embedding table of {rows} rows"
                    ))
                }
            }
        }
        // Counting sort: where each id's run starts, then the tokens placed in input order.
        let mut start = Vec::with_capacity(rows);
        let mut at = 0u32;
        for &c in &count {
            start.push(at);
            at += c;
        }
        let mut order = vec![0u32; ids.len()];
        let mut next = start.clone();
        for (i, &id) in ids.iter().enumerate() {
            order[next[id as usize] as usize] = i as u32;
            next[id as usize] += 1;
        }
        let (mut begin, mut uid, mut ubegin) = (Vec::new(), Vec::new(), Vec::new());
        for (id, (&c, &s)) in count.iter().zip(&start).enumerate() {
            if c == 0 {
                continue;
            }
            uid.push(id as u32);
            ubegin.push(begin.len() as u32);
            for k in (s..s + c).step_by(EMBEDDING_CHUNK) {
                begin.push(k);
            }
        }
        begin.push(ids.len() as u32);
        ubegin.push((begin.len() - 1) as u32);
        Ok(EmbeddingGradPlan {
            order,
            begin,
            uid,
            ubegin,
        })
    }

    pub fn chunks(&self) -> usize {
        self.begin.len() - 1
    }
}

/// `table[ids]` for a table of rows of `h` (`distil_embedding`).
pub fn embedding(table: &[f32], ids: &[u32], h: usize) -> Vec<f32> {
    let rows = table.len() / h.max(1);
    let mut y = Vec::with_capacity(ids.len() * h);
    for &id in ids {
        let id = id as usize;
        if id < rows {
            y.extend_from_slice(&table[id * h..(id + 1) * h]);
        } else {
            y.extend(std::iter::repeat_n(f32::NAN, h));
        }
    }
    y
}

/// The table's gradient `[rows, h]` from the rows' gradient `g` `[ids, h]`, summed in `plan`'s
/// order (`distil_embedding_bwd_chunks`, then `distil_embedding_bwd_rows`).
pub fn embedding_grad(g: &[f32], plan: &EmbeddingGradPlan, rows: usize, h: usize) -> Vec<f32> {
    let mut partial = vec![0f32; plan.chunks() * h];
    for (c, p) in partial.chunks_mut(h.max(1)).enumerate() {
        for k in plan.begin[c]..plan.begin[c + 1] {
            let t = plan.order[k as usize] as usize;
            for (s, &v) in p.iter_mut().zip(&g[t * h..(t + 1) * h]) {
                *s += v;
            }
        }
    }
    let mut dt = vec![0f32; rows * h];
    for (u, &id) in plan.uid.iter().enumerate() {
        let row = &mut dt[id as usize * h..(id as usize + 1) * h];
        for c in plan.ubegin[u]..plan.ubegin[u + 1] {
            for (s, &v) in row
                .iter_mut()
                .zip(&partial[c as usize * h..(c as usize + 1) * h])
            {
                *s += v;
            }
        }
    }
    dt
}

/// Where element `i` of `[b, nh, s, d]` sits in `[b, s, nh, d]` (and back, `to_heads` false:
/// element `i` of `[b, s, nh, d]` in `[b, nh, s, d]`), as `distil_split_heads_bf16` and
/// `distil_merge_heads_bf16` index.
fn heads_source(i: usize, (s, nh, d): (usize, usize, usize), to_heads: bool) -> usize {
    let (di, t) = (i % d, i / d);
    if to_heads {
        let (si, t2) = (t % s, t / s);
        let (hi, bi) = (t2 % nh, t2 / nh);
        ((bi * s + si) * nh + hi) * d + di
    } else {
        let (hi, t2) = (t % nh, t / nh);
        let (si, bi) = (t2 % s, t2 / s);
        ((bi * nh + hi) * s + si) * d + di
    }
}

/// `[b, s, nh · d]` f32 -> `[b, nh, s, d]` bf16 (`distil_split_heads_bf16`).
pub fn split_heads_bf16(x: &[f32], s: usize, nh: usize, d: usize) -> Vec<half::bf16> {
    (0..x.len())
        .map(|i| half::bf16::from_f32(x[heads_source(i, (s, nh, d), true)]))
        .collect()
}

/// `[b, nh, s, d]` bf16 -> `[b, s, nh · d]` f32 (`distil_merge_heads_bf16`).
pub fn merge_heads_bf16(x: &[half::bf16], s: usize, nh: usize, d: usize) -> Vec<f32> {
    (0..x.len())
        .map(|i| x[heads_source(i, (s, nh, d), false)].to_f32())
        .collect()
}
