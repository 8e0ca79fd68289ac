// distil's fused CUDA kernels, compiled at run time with NVRTC (src/model/cuda/mod.rs).
// f32 throughout; every tensor contiguous. Row kernels give each row one warp (8 rows a
// block of 256 threads), so they serve attention rows (128 columns), hidden rows (768) and
// vocabulary rows (30522) alike.

typedef unsigned long long u64;

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// The warp's row, or return: all 32 lanes of a warp share a row, so they return together.
#define ROW_OR_RETURN                                                       \
    const u64 row = (u64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); \
    const unsigned lane = threadIdx.x & 31;                                 \
    if (row >= rows) return;

// Inverted dropout's factor for element i: 0 with probability p, else `scale`. The uniform
// comes from splitmix64 of (seed, i): a counter-based draw, so the backward pass recomputes
// the mask instead of storing it.
__device__ __forceinline__ float keep_scale(u64 seed, u64 i, float p, float scale) {
    u64 z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const float u = (float)(z >> 40) * (1.0f / 16777216.0f);
    return u < p ? 0.0f : scale;
}

// y = x * mask(seed): dropout, and its own backward (the same mask on the gradient).
extern "C" __global__ void distil_dropout(const float* x, float* y, u64 n, u64 seed, float p,
                                          float scale) {
    const u64 stride = (u64)blockDim.x * gridDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        y[i] = x[i] * keep_scale(seed, i, p, scale);
}

// Softmax of x * scale over each row of `cols`.
extern "C" __global__ void distil_softmax(const float* x, float* y, u64 rows, u64 cols,
                                          float scale) {
    ROW_OR_RETURN
    const float* xr = x + row * cols;
    float* yr = y + row * cols;
    float m = __int_as_float(0xff800000);
    for (u64 j = lane; j < cols; j += 32) m = fmaxf(m, xr[j] * scale);
    m = warp_max(m);
    float s = 0.0f;
    for (u64 j = lane; j < cols; j += 32) {
        const float e = expf(xr[j] * scale - m);
        yr[j] = e;
        s += e;
    }
    const float inv = 1.0f / warp_sum(s);
    for (u64 j = lane; j < cols; j += 32) yr[j] *= inv;
}

// A value as f32: f32 as it is, bf16 (a product's own dtype in bf16 training, read instead of
// a cast pass) widened exactly.
__device__ __forceinline__ float load_f(const float* p, u64 i) { return p[i]; }
__device__ __forceinline__ float load_f(const unsigned short* p, u64 i) {
    return __uint_as_float(((unsigned)p[i]) << 16);
}

// Attention probabilities: softmax of x * scale + mask over each row of `cols` keys, where
// rows come `rows_per_batch` (heads x queries) a sequence and mask is the additive key mask,
// `cols` values a sequence.
template <typename X>
__device__ __forceinline__ void attention_softmax(const X* x, const float* mask, float* y,
                                                  u64 rows, u64 cols, u64 rows_per_batch,
                                                  float scale) {
    ROW_OR_RETURN
    const X* xr = x + row * cols;
    const float* mr = mask + (row / rows_per_batch) * cols;
    float* yr = y + row * cols;
    float m = __int_as_float(0xff800000);
    for (u64 j = lane; j < cols; j += 32) m = fmaxf(m, load_f(xr, j) * scale + mr[j]);
    m = warp_max(m);
    float s = 0.0f;
    for (u64 j = lane; j < cols; j += 32) {
        const float e = expf(load_f(xr, j) * scale + mr[j] - m);
        yr[j] = e;
        s += e;
    }
    const float inv = 1.0f / warp_sum(s);
    for (u64 j = lane; j < cols; j += 32) yr[j] *= inv;
}

extern "C" __global__ void distil_attention_softmax(const float* x, const float* mask, float* y,
                                                    u64 rows, u64 cols, u64 rows_per_batch,
                                                    float scale) {
    attention_softmax(x, mask, y, rows, cols, rows_per_batch, scale);
}

extern "C" __global__ void distil_attention_softmax_bf16(const unsigned short* x,
                                                         const float* mask, float* y, u64 rows,
                                                         u64 cols, u64 rows_per_batch,
                                                         float scale) {
    attention_softmax(x, mask, y, rows, cols, rows_per_batch, scale);
}

// dx = scale * y * (g - sum(g * y)) for softmax output y (of scaled input) and its gradient g.
extern "C" __global__ void distil_softmax_bwd(const float* y, const float* g, float* dx, u64 rows,
                                              u64 cols, float scale) {
    ROW_OR_RETURN
    const float* yr = y + row * cols;
    const float* gr = g + row * cols;
    float* dr = dx + row * cols;
    float d = 0.0f;
    for (u64 j = lane; j < cols; j += 32) d += gr[j] * yr[j];
    d = warp_sum(d);
    for (u64 j = lane; j < cols; j += 32) dr[j] = scale * yr[j] * (gr[j] - d);
}

// Mean and 1/sqrt(var + eps) of a row, in every lane.
__device__ __forceinline__ void row_stats(const float* xr, u64 cols, unsigned lane, float eps,
                                          float* mean, float* rstd) {
    float s = 0.0f;
    for (u64 j = lane; j < cols; j += 32) s += xr[j];
    const float mu = warp_sum(s) / (float)cols;
    float v = 0.0f;
    for (u64 j = lane; j < cols; j += 32) {
        const float d = xr[j] - mu;
        v += d * d;
    }
    *mean = mu;
    *rstd = rsqrtf(warp_sum(v) / (float)cols + eps);
}

// y = (x - mean) * rstd * w + b over each row.
extern "C" __global__ void distil_layer_norm(const float* x, const float* w, const float* b,
                                             float* y, u64 rows, u64 cols, float eps) {
    ROW_OR_RETURN
    const float* xr = x + row * cols;
    float* yr = y + row * cols;
    float mu, rs;
    row_stats(xr, cols, lane, eps, &mu, &rs);
    for (u64 j = lane; j < cols; j += 32) yr[j] = (xr[j] - mu) * rs * w[j] + b[j];
}

// stats[2 * row] = mean, stats[2 * row + 1] = rstd.
extern "C" __global__ void distil_layer_norm_stats(const float* x, float* stats, u64 rows,
                                                   u64 cols, float eps) {
    ROW_OR_RETURN
    float mu, rs;
    row_stats(x + row * cols, cols, lane, eps, &mu, &rs);
    if (lane == 0) {
        stats[2 * row] = mu;
        stats[2 * row + 1] = rs;
    }
}

// The input gradient: dx = rstd * (gw - mean(gw) - xhat * mean(gw * xhat)), gw = g * w.
extern "C" __global__ void distil_layer_norm_bwd_x(const float* x, const float* w, const float* g,
                                                   const float* stats, float* dx, u64 rows,
                                                   u64 cols) {
    ROW_OR_RETURN
    const float* xr = x + row * cols;
    const float* gr = g + row * cols;
    float* dr = dx + row * cols;
    const float mu = stats[2 * row], rs = stats[2 * row + 1];
    float a = 0.0f, c = 0.0f;
    for (u64 j = lane; j < cols; j += 32) {
        const float gw = gr[j] * w[j];
        a += gw;
        c += gw * (xr[j] - mu) * rs;
    }
    a = warp_sum(a) / (float)cols;
    c = warp_sum(c) / (float)cols;
    for (u64 j = lane; j < cols; j += 32) {
        const float xh = (xr[j] - mu) * rs;
        dr[j] = rs * (gr[j] * w[j] - a - xh * c);
    }
}

// Partial sums for the weight and bias gradients: block (bx, chunk) sums g * xhat and g over
// its chunk of rows for 256 columns; partial is [2, chunks, cols] (weight, then bias).
extern "C" __global__ void distil_layer_norm_bwd_wb(const float* x, const float* g,
                                                    const float* stats, float* partial, u64 rows,
                                                    u64 cols, u64 rows_per_chunk) {
    const u64 c = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const u64 chunk = blockIdx.y, chunks = gridDim.y;
    if (c >= cols) return;
    const u64 r0 = chunk * rows_per_chunk;
    const u64 r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
    float gw = 0.0f, gb = 0.0f;
    for (u64 r = r0; r < r1; r++) {
        const float gg = g[r * cols + c];
        gw += gg * (x[r * cols + c] - stats[2 * r]) * stats[2 * r + 1];
        gb += gg;
    }
    partial[chunk * cols + c] = gw;
    partial[(chunks + chunk) * cols + c] = gb;
}

// Activations by code: 0 none, 1 GELU (erf), 2 GELU (tanh approximation), 3 ReLU.
__device__ __forceinline__ float act_fwd(float z, unsigned act) {
    switch (act) {
    case 1: return 0.5f * z * (1.0f + erff(z * 0.70710678118654752f));
    case 2: {
        const float t = tanhf(0.79788456080286536f * (z + 0.044715f * z * z * z));
        return 0.5f * z * (1.0f + t);
    }
    case 3: return z > 0.0f ? z : 0.0f;
    default: return z;
    }
}

// d act / dz.
__device__ __forceinline__ float act_grad(float z, unsigned act) {
    switch (act) {
    case 1:
        return 0.5f * (1.0f + erff(z * 0.70710678118654752f))
               + z * 0.39894228040143268f * expf(-0.5f * z * z);
    case 2: {
        const float k = 0.79788456080286536f;
        const float t = tanhf(k * (z + 0.044715f * z * z * z));
        return 0.5f * (1.0f + t) + 0.5f * z * (1.0f - t * t) * k * (1.0f + 3.0f * 0.044715f * z * z);
    }
    case 3: return z > 0.0f ? 1.0f : 0.0f;
    default: return 1.0f;
    }
}

// A dense layer's epilogue: y = dropout(act(pre + b)), pre = x . W^T from cuBLAS, [rows, cols].
template <typename P>
__device__ __forceinline__ void bias_act(const P* pre, const float* b, float* y, u64 rows,
                                         u64 cols, unsigned act, float p, u64 seed, float scale) {
    const u64 n = rows * cols;
    const u64 stride = (u64)blockDim.x * gridDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float f = p > 0.0f ? keep_scale(seed, i, p, scale) : 1.0f;
        y[i] = act_fwd(load_f(pre, i) + b[i % cols], act) * f;
    }
}

extern "C" __global__ void distil_bias_act(const float* pre, const float* b, float* y, u64 rows,
                                           u64 cols, unsigned act, float p, u64 seed,
                                           float scale) {
    bias_act(pre, b, y, rows, cols, act, p, seed, scale);
}

extern "C" __global__ void distil_bias_act_bf16(const unsigned short* pre, const float* b,
                                                float* y, u64 rows, u64 cols, unsigned act,
                                                float p, u64 seed, float scale) {
    bias_act(pre, b, y, rows, cols, act, p, seed, scale);
}

// Its backward to the pre-activation: gz = g * mask * act'(pre + b).
template <typename P>
__device__ __forceinline__ void bias_act_bwd(const P* pre, const float* b, const float* g,
                                             float* gz, u64 rows, u64 cols, unsigned act,
                                             float p, u64 seed, float scale) {
    const u64 n = rows * cols;
    const u64 stride = (u64)blockDim.x * gridDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float f = p > 0.0f ? keep_scale(seed, i, p, scale) : 1.0f;
        gz[i] = g[i] * f * act_grad(load_f(pre, i) + b[i % cols], act);
    }
}

extern "C" __global__ void distil_bias_act_bwd(const float* pre, const float* b, const float* g,
                                               float* gz, u64 rows, u64 cols, unsigned act,
                                               float p, u64 seed, float scale) {
    bias_act_bwd(pre, b, g, gz, rows, cols, act, p, seed, scale);
}

extern "C" __global__ void distil_bias_act_bwd_bf16(const unsigned short* pre, const float* b,
                                                    const float* g, float* gz, u64 rows,
                                                    u64 cols, unsigned act, float p, u64 seed,
                                                    float scale) {
    bias_act_bwd(pre, b, g, gz, rows, cols, act, p, seed, scale);
}

// Column sums by chunks of rows: partial is [chunks, cols] (sum it over chunks).
extern "C" __global__ void distil_colsum(const float* x, float* partial, u64 rows, u64 cols,
                                         u64 rows_per_chunk) {
    const u64 c = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const u64 chunk = blockIdx.y;
    if (c >= cols) return;
    const u64 r0 = chunk * rows_per_chunk;
    const u64 r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
    float s = 0.0f;
    for (u64 r = r0; r < r1; r++) s += x[r * cols + c];
    partial[chunk * cols + c] = s;
}

// log-sum-exp of x * scale over a row, in every lane.
__device__ __forceinline__ float row_lse(const float* xr, u64 cols, unsigned lane, float scale) {
    float m = __int_as_float(0xff800000);
    for (u64 j = lane; j < cols; j += 32) m = fmaxf(m, xr[j] * scale);
    m = warp_max(m);
    float z = 0.0f;
    for (u64 j = lane; j < cols; j += 32) z += expf(xr[j] * scale - m);
    return m + logf(warp_sum(z));
}

// Soft-target KL per row: out[row] = sum_j p_j (log max(p_j, 1e-30) - log q_j), where
// q = softmax(s * inv_t) and p the teacher's probabilities.
extern "C" __global__ void distil_soft_kl(const float* s, const float* p, float* out, u64 rows,
                                          u64 cols, float inv_t) {
    ROW_OR_RETURN
    const float* sr = s + row * cols;
    const float* pr = p + row * cols;
    const float lse = row_lse(sr, cols, lane, inv_t);
    float acc = 0.0f;
    for (u64 j = lane; j < cols; j += 32)
        acc += pr[j] * (logf(fmaxf(pr[j], 1e-30f)) - (sr[j] * inv_t - lse));
    acc = warp_sum(acc);
    if (lane == 0) out[row] = acc;
}

// Its gradient to the student's logits: ds_j = g_row (q_j sum_k p_k - p_j) inv_t.
extern "C" __global__ void distil_soft_kl_bwd(const float* s, const float* p, const float* g,
                                              float* ds, u64 rows, u64 cols, float inv_t) {
    ROW_OR_RETURN
    const float* sr = s + row * cols;
    const float* pr = p + row * cols;
    float* dr = ds + row * cols;
    const float lse = row_lse(sr, cols, lane, inv_t);
    float psum = 0.0f;
    for (u64 j = lane; j < cols; j += 32) psum += pr[j];
    psum = warp_sum(psum);
    const float gr = g[row] * inv_t;
    for (u64 j = lane; j < cols; j += 32) dr[j] = gr * (expf(sr[j] * inv_t - lse) * psum - pr[j]);
}

// Cross-entropy per row: out[row] = lse(x) - x[target], targets given as floats.
extern "C" __global__ void distil_cross_entropy(const float* x, const float* target, float* out,
                                                u64 rows, u64 cols) {
    ROW_OR_RETURN
    const float* xr = x + row * cols;
    const float lse = row_lse(xr, cols, lane, 1.0f);
    const u64 t = (u64)target[row];
    if (lane == 0) out[row] = t < cols ? lse - xr[t] : __int_as_float(0x7fc00000);
}

// Its gradient: dx_j = g_row (softmax_j - [j == target]).
extern "C" __global__ void distil_cross_entropy_bwd(const float* x, const float* target,
                                                    const float* g, float* dx, u64 rows,
                                                    u64 cols) {
    ROW_OR_RETURN
    const float* xr = x + row * cols;
    float* dr = dx + row * cols;
    const float lse = row_lse(xr, cols, lane, 1.0f);
    const u64 t = (u64)target[row];
    const float gr = g[row];
    for (u64 j = lane; j < cols; j += 32) dr[j] = gr * (expf(xr[j] - lse) - (j == t ? 1.0f : 0.0f));
}

// One AdamW step in place, as the CPU update (src/train/optim.rs) computes it.
extern "C" __global__ void distil_adamw(float* p, const float* g, float* m, float* v, u64 n,
                                        float step_size, float beta1, float beta2, float eps,
                                        float decay_factor, float bias_correction2_sqrt,
                                        float grad_scale) {
    const u64 stride = (u64)blockDim.x * gridDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float gi = g[i] * grad_scale;
        const float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        const float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        const float denom = sqrtf(vi) / bias_correction2_sqrt + eps;
        p[i] = p[i] * decay_factor - step_size * mi / denom;
    }
}

// y[i, :] = table[ids[i], :], the embedding lookup; NaN for an id outside the table (the
// backward, which reads the ids on the host, reports it).
extern "C" __global__ void distil_embedding(const float* table, const unsigned* ids, float* y,
                                            u64 n, u64 h, u64 rows) {
    const u64 stride = (u64)blockDim.x * gridDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n * h; i += stride) {
        const u64 id = ids[i / h];
        y[i] = id < rows ? table[id * h + i % h] : __int_as_float(0x7fc00000);
    }
}

// The lookup's backward, in a fixed order (no atomics: every run sums alike). First,
// partial[c, :] = the sum of g's rows order[begin[c]], ..., order[begin[c + 1] - 1] in turn:
// chunk c, a run of at most 32 tokens with one id. Grid: chunks x column blocks.
extern "C" __global__ void distil_embedding_bwd_chunks(const float* g, const unsigned* order,
                                                       const unsigned* begin, float* partial,
                                                       u64 h) {
    const u64 c = blockIdx.x;
    const u64 col = (u64)blockIdx.y * blockDim.x + threadIdx.x;
    if (col >= h) return;
    float s = 0.0f;
    for (unsigned k = begin[c]; k < begin[c + 1]; ++k) s += g[(u64)order[k] * h + col];
    partial[c * h + col] = s;
}

// Then dt[uid[u], :] = the sum of id u's chunks ubegin[u], ..., ubegin[u + 1] - 1 in turn
// (dt zero elsewhere). Grid: ids present x column blocks.
extern "C" __global__ void distil_embedding_bwd_rows(const float* partial, const unsigned* uid,
                                                     const unsigned* ubegin, float* dt, u64 h) {
    const u64 u = blockIdx.x;
    const u64 col = (u64)blockIdx.y * blockDim.x + threadIdx.x;
    if (col >= h) return;
    float s = 0.0f;
    for (unsigned c = ubegin[u]; c < ubegin[u + 1]; ++c) s += partial[(u64)c * h + col];
    dt[(u64)uid[u] * h + col] = s;
}

// Attention heads: [b, s, nh, d] (rows of h = nh·d, as the projections write them) <->
// [b, nh, s, d], cast as they are copied, in one pass (candle's strided cast computed each
// element's address from the view's dims and strides: 295 µs against 162 µs for a contiguous
// cast of a [256·128, 768] tensor on an H200, session 7's profile). Index math in u32: the
// callers check n < 2^32.
// f32 -> bf16 rounds to nearest even, as candle's cast does; NaN stays NaN.
__device__ __forceinline__ unsigned short to_bf16(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

extern "C" __global__ void distil_split_heads_bf16(const float* x, unsigned short* y, unsigned s,
                                                   unsigned nh, unsigned d, unsigned n) {
    const unsigned stride = blockDim.x * gridDim.x;
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        // i indexes y, [b, nh, s, d].
        const unsigned di = i % d, t = i / d, si = t % s, t2 = t / s, hi = t2 % nh, bi = t2 / nh;
        y[i] = to_bf16(x[((bi * s + si) * nh + hi) * d + di]);
    }
}

extern "C" __global__ void distil_merge_heads_bf16(const unsigned short* x, float* y, unsigned s,
                                                   unsigned nh, unsigned d, unsigned n) {
    const unsigned stride = blockDim.x * gridDim.x;
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        // i indexes y, [b, s, nh, d].
        const unsigned di = i % d, t = i / d, hi = t % nh, t2 = t / nh, si = t2 % s, bi = t2 / s;
        y[i] = load_f(x, ((bi * nh + hi) * s + si) * d + di);
    }
}
