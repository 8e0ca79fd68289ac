//! Branch-free `f32` exp, erf and the activations with their derivatives, written so the
//! compiler vectorises the loops that call them (libm's scalar `expf`/`erff` do not
//! vectorise; `tests/fused.rs` bounds the error of these against them).

use crate::model::config::Activation;

/// `e^x`, relative error below 2e-7 on [-87, 88]; 0 below, +inf above.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.5, 88.5);
    // Round to nearest by the 1.5·2^23 trick: `f32::round` is a libm call that stops the
    // loop from vectorising.
    const SHIFT: f32 = 12_582_912.0;
    let t = x * LOG2E + SHIFT;
    let n = t - SHIFT;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // Degree-6 Taylor polynomial of e^r on |r| <= ln2/2 (error < 1.2e-8 relative).
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // 2^n by building the exponent bits; n in [-127, 128] after the clamp: split in two
    // factors so neither leaves the normal range. n as an integer is read from the low bits
    // of t = 1.5·2^23 + n: `n as i32` is a saturating conversion that the compiler does one
    // lane at a time (it made this function 3x slower).
    let n = (t.to_bits() as i32).wrapping_sub(SHIFT.to_bits() as i32);
    let h = n >> 1;
    let s1 = f32::from_bits(((h + 127) as u32) << 23);
    let s2 = f32::from_bits(((n - h + 127) as u32) << 23);
    p * s1 * s2
}

/// `ln(x)` for positive normal `x` (the teacher probabilities the soft-target KL weighs:
/// callers clamp at 1e-30), relative error a few 1e-7: Cephes' `logf` polynomial, branch
/// free so the loops that call it vectorise (libm's `logf` is a scalar call).
#[inline(always)]
pub fn ln(x: f32) -> f32 {
    const SQRT_HALF: f32 = std::f32::consts::FRAC_1_SQRT_2;
    let bits = x.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 127;
    // Mantissa in [1, 2), moved to [sqrt(1/2), sqrt(2)) so the polynomial's argument is small.
    let mut m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000) * 0.5;
    let small = m < SQRT_HALF;
    m = if small { m + m } else { m };
    e += if small { 0 } else { 1 };
    let f = m - 1.0;
    let z = f * f;
    let mut y = 7.037_683_6e-2;
    y = y * f - 1.151_461_1e-1;
    y = y * f + 1.167_699_9e-1;
    y = y * f - 1.242_014_1e-1;
    y = y * f + 1.424_932_3e-1;
    y = y * f - 1.666_805_8e-1;
    y = y * f + 2.000_071_4e-1;
    y = y * f - 2.499_999_4e-1;
    y = y * f + 3.333_333e-1;
    y *= f * z;
    let e = e as f32;
    y += e * -2.121_944_4e-4;
    y -= 0.5 * z;
    f + y + e * 0.693_359_4
}

/// The error function, max absolute error ~2e-7 (the rational approximation Eigen and
/// PyTorch's vectorised CPU kernels use; inputs clamped to [-4, 4], where erf is ±1 in f32).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p + -2.101_024e-6;
    p = x2 * p + -5.692_506_4e-5;
    p = x2 * p + -7.349_906_3e-4;
    p = x2 * p + -2.954_600_1e-3;
    p = x2 * p + -1.609_603_4e-2;
    p *= x;
    let mut q = x2 * -1.456_607_2e-5 + -2.133_740_6e-4;
    q = x2 * q + -1.682_827e-3;
    q = x2 * q + -7.373_329e-3;
    q = x2 * q + -1.426_474e-2;
    p / q
}

/// `tanh(x)` through `exp`, accurate to a few 1e-7.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    // tanh(x) = sign(x) · (1 − e^{−2|x|}) / (1 + e^{−2|x|}): no overflow, no cancellation
    // worse than ~1e-7 absolute near 0.
    let e = exp(-2.0 * x.abs());
    ((1.0 - e) / (1.0 + e)).copysign(x)
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1/√(2π).
const INV_SQRT_2PI: f32 = 0.398_942_3;
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;

/// The activation at `x`.
#[inline(always)]
pub fn act(a: Activation, x: f32) -> f32 {
    match a {
        Activation::GeluErf => 0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2)),
        Activation::GeluTanh => 0.5 * x * (1.0 + tanh(SQRT_2_OVER_PI * (x + GELU_C * x * x * x))),
        Activation::Relu => x.max(0.0),
    }
}

/// The activation's derivative at `x`.
#[inline(always)]
pub fn act_grad(a: Activation, x: f32) -> f32 {
    match a {
        Activation::GeluErf => {
            0.5 * (1.0 + erf(x * FRAC_1_SQRT_2)) + x * INV_SQRT_2PI * exp(-0.5 * x * x)
        }
        Activation::GeluTanh => {
            let u = SQRT_2_OVER_PI * (x + GELU_C * x * x * x);
            let t = tanh(u);
            let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * x * x);
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
        }
        Activation::Relu => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
    }
}

/// Applies `act` to every element of `x` in place.
pub fn act_slice(a: Activation, x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if a == Activation::GeluErf && avx512::available() {
        // Safety: the CPU has AVX-512F.
        return unsafe { avx512::gelu_erf(x) };
    }
    act_slice_auto(a, x)
}

/// Asks the CPU to bring `data` into its caches, one prefetch per cache line (a no-op off
/// x86-64): for an epilogue whose next piece reads memory the product does not touch.
#[inline]
pub fn prefetch<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    prefetch_lines::<{ std::arch::x86_64::_MM_HINT_T0 }>(
        data.as_ptr().cast(),
        std::mem::size_of_val(data),
    );
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// Asks the CPU for the `len` floats from `start` with intent to write them (`prefetchw`; a
/// no-op off x86-64): for an epilogue whose next piece stores to lines nothing has brought
/// into the caches (a fresh output), whose stores would otherwise each wait for its line.
#[inline]
pub fn prefetch_for_write(start: *const f32, len: usize) {
    #[cfg(target_arch = "x86_64")]
    prefetch_lines::<{ std::arch::x86_64::_MM_HINT_ET0 }>(start.cast(), len * 4);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (start, len);
}

/// One prefetch with `HINT` per cache line of the `bytes` from `start`.
#[cfg(target_arch = "x86_64")]
#[inline]
fn prefetch_lines<const HINT: i32>(start: *const i8, bytes: usize) {
    for offset in (0..bytes).step_by(64) {
        // Safety: a prefetch (SSE, part of x86-64; the write hint is a hint where the CPU
        // lacks PREFETCHW) changes no state a program sees and does not fault, whatever the
        // address.
        unsafe { std::arch::x86_64::_mm_prefetch::<HINT>(start.wrapping_add(offset)) };
    }
}

/// `g[i] *= act'(pre[i])`.
pub fn act_grad_mul(a: Activation, g: &mut [f32], pre: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if a == Activation::GeluErf && avx512::available() {
        // Safety: the CPU has AVX-512F.
        return unsafe { avx512::gelu_erf_grad_mul(g, pre) };
    }
    act_grad_mul_auto(a, g, pre)
}

/// `out[i] = act(x[i])` and then `x[i] = act'(x[i])`: a layer's activation and, in place of
/// the pre-activation it keeps for the backward, the derivative there, from one evaluation of
/// the erf they share (the backward then multiplies instead of evaluating erf and exp).
pub fn act_and_grad(a: Activation, x: &mut [f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len(), "act_and_grad: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if a == Activation::GeluErf && avx512::available() {
        // Safety: the CPU has AVX-512F; the lengths match.
        return unsafe { avx512::gelu_erf_and_grad(x, out) };
    }
    act_and_grad_auto(a, x, out)
}

/// [`act_and_grad`] as the compiler vectorises the scalar [`act`] and [`act_grad`].
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma"
))]
pub fn act_and_grad_auto(a: Activation, x: &mut [f32], out: &mut [f32]) {
    for (v, o) in x.iter_mut().zip(out.iter_mut()) {
        *o = act(a, *v);
        *v = act_grad(a, *v);
    }
}

/// `g[i] *= d[i]`.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma"
))]
pub fn mul(g: &mut [f32], d: &[f32]) {
    assert_eq!(g.len(), d.len(), "mul: lengths differ");
    for (g, &d) in g.iter_mut().zip(d) {
        *g *= d;
    }
}

/// [`act_slice`] as the compiler vectorises the scalar [`act`].
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma"
))]
pub fn act_slice_auto(a: Activation, x: &mut [f32]) {
    match a {
        Activation::GeluErf => x.iter_mut().for_each(|v| *v = act(Activation::GeluErf, *v)),
        Activation::GeluTanh => x
            .iter_mut()
            .for_each(|v| *v = act(Activation::GeluTanh, *v)),
        Activation::Relu => x.iter_mut().for_each(|v| *v = v.max(0.0)),
    }
}

/// [`act_grad_mul`] as the compiler vectorises the scalar [`act_grad`].
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma"
))]
pub fn act_grad_mul_auto(a: Activation, g: &mut [f32], pre: &[f32]) {
    match a {
        Activation::GeluErf => g
            .iter_mut()
            .zip(pre)
            .for_each(|(g, &p)| *g *= act_grad(Activation::GeluErf, p)),
        Activation::GeluTanh => g
            .iter_mut()
            .zip(pre)
            .for_each(|(g, &p)| *g *= act_grad(Activation::GeluTanh, p)),
        Activation::Relu => g
            .iter_mut()
            .zip(pre)
            .for_each(|(g, &p)| *g *= act_grad(Activation::Relu, p)),
    }
}

/// AVX-512 intrinsics: the erf GELU and its derivative, and the pieces the attention's softmax
/// shares with them ([`avx512::exp16`], [`avx512::lanes`], [`avx512::available`], the check
/// `packed` uses too). The compiler vectorises the scalar [`erf`] too, but its `p / q` becomes a full-precision division (`vdivps`, about
/// a third of the activation's time); here it is `rcp14` refined by one Newton step (relative
/// error ~2^-28, below f32's rounding), and `exp`'s `2^n` is one `scalef`. Same polynomials
/// as the scalar functions, so the results agree with them to a few ulp (`tests` below).
#[cfg(target_arch = "x86_64")]
pub mod avx512 {
    use std::arch::x86_64::*;

    /// Whether the CPU runs these (std caches the check).
    pub fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
    }

    /// [`super::erf`] on 16 lanes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn erf16(x: __m512) -> __m512 {
        let x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-4.0)), _mm512_set1_ps(4.0));
        let x2 = _mm512_mul_ps(x, x);
        let c = _mm512_set1_ps;
        let mut p = _mm512_fmadd_ps(x2, c(-2.726_142_3e-10), c(2.770_681_4e-8));
        for k in [
            -2.101_024e-6,
            -5.692_506_4e-5,
            -7.349_906_3e-4,
            -2.954_600_1e-3,
            -1.609_603_4e-2,
        ] {
            p = _mm512_fmadd_ps(x2, p, c(k));
        }
        p = _mm512_mul_ps(p, x);
        let mut q = _mm512_fmadd_ps(x2, c(-1.456_607_2e-5), c(-2.133_740_6e-4));
        for k in [-1.682_827e-3, -7.373_329e-3, -1.426_474e-2] {
            q = _mm512_fmadd_ps(x2, q, c(k));
        }
        // 1/q: q is in [-0.0143, -0.0142 - ...], never near zero.
        let r = _mm512_rcp14_ps(q);
        let r = _mm512_mul_ps(r, _mm512_fnmadd_ps(q, r, c(2.0)));
        _mm512_mul_ps(p, r)
    }

    /// [`super::exp`] on 16 lanes.
    ///
    /// # Safety
    /// The CPU must have AVX-512F (callers are themselves compiled for it).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub fn exp16(x: __m512) -> __m512 {
        const SHIFT: f32 = 12_582_912.0;
        let c = _mm512_set1_ps;
        let x = _mm512_min_ps(_mm512_max_ps(x, c(-87.5)), c(88.5));
        let t = _mm512_fmadd_ps(x, c(std::f32::consts::LOG2_E), c(SHIFT));
        let n = _mm512_sub_ps(t, c(SHIFT));
        let r = _mm512_fnmadd_ps(n, c(0.693_145_75), x);
        let r = _mm512_fnmadd_ps(n, c(1.428_606_8e-6), r);
        let mut p = _mm512_fmadd_ps(r, c(1.0 / 720.0), c(1.0 / 120.0));
        for k in [1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm512_fmadd_ps(r, p, c(k));
        }
        _mm512_scalef_ps(p, n)
    }

    /// The lanes of a 16-float register that hold the first `n` of what is left (all 16 when
    /// `n ≥ 16`): the mask of a loop's last, partial block.
    #[inline]
    pub fn lanes(n: usize) -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            (1u16 << n) - 1
        }
    }

    /// `x · Φ(x)` in place.
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn gelu_erf(x: &mut [f32]) {
        let n = x.len();
        let ptr = x.as_mut_ptr();
        let mut i = 0;
        while i < n {
            let m = lanes(n - i);
            let v = _mm512_maskz_loadu_ps(m, ptr.add(i));
            let e = erf16(_mm512_mul_ps(v, _mm512_set1_ps(super::FRAC_1_SQRT_2)));
            let h = _mm512_mul_ps(v, _mm512_set1_ps(0.5));
            _mm512_mask_storeu_ps(ptr.add(i), m, _mm512_fmadd_ps(h, e, h));
            i += 16;
        }
    }

    /// `out = x · Φ(x)` as [`gelu_erf`] computes it, then `x = gelu'(x)` as
    /// [`gelu_erf_grad_mul`] computes it, one erf for both.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `x` and `out` of one length.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn gelu_erf_and_grad(x: &mut [f32], out: &mut [f32]) {
        let n = x.len();
        let (xp, op) = (x.as_mut_ptr(), out.as_mut_ptr());
        let c = _mm512_set1_ps;
        let mut i = 0;
        while i < n {
            let m = lanes(n - i);
            let v = _mm512_maskz_loadu_ps(m, xp.add(i));
            let e = erf16(_mm512_mul_ps(v, c(super::FRAC_1_SQRT_2)));
            let h = _mm512_mul_ps(v, c(0.5));
            _mm512_mask_storeu_ps(op.add(i), m, _mm512_fmadd_ps(h, e, h));
            _mm512_mask_storeu_ps(xp.add(i), m, gelu_erf_grad16(v, e));
            i += 16;
        }
    }

    /// `gelu'(x) = 0.5·(1 + erf(x/√2)) + x·φ(x)/√(2π)` on 16 lanes, given `e = erf(x/√2)`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn gelu_erf_grad16(x: __m512, e: __m512) -> __m512 {
        let c = _mm512_set1_ps;
        let phi = exp16(_mm512_mul_ps(_mm512_mul_ps(x, x), c(-0.5)));
        _mm512_fmadd_ps(
            _mm512_mul_ps(x, c(super::INV_SQRT_2PI)),
            phi,
            _mm512_fmadd_ps(e, c(0.5), c(0.5)),
        )
    }

    /// `g[i] *= gelu'(pre[i])`.
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn gelu_erf_grad_mul(g: &mut [f32], pre: &[f32]) {
        let n = g.len().min(pre.len());
        let (gp, pp) = (g.as_mut_ptr(), pre.as_ptr());
        let c = _mm512_set1_ps;
        let mut i = 0;
        while i < n {
            let m = lanes(n - i);
            let x = _mm512_maskz_loadu_ps(m, pp.add(i));
            let e = erf16(_mm512_mul_ps(x, c(super::FRAC_1_SQRT_2)));
            let d = gelu_erf_grad16(x, e);
            let gv = _mm512_maskz_loadu_ps(m, gp.add(i));
            _mm512_mask_storeu_ps(gp.add(i), m, _mm512_mul_ps(gv, d));
            i += 16;
        }
    }
}

/// Sum with 16 independent accumulators, so it vectorises (a plain `iter().sum()` is a
/// serial chain of adds: the compiler may not reorder float additions).
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    sum_by(x, |v| v)
}

/// `Σ f(x[i])`, vectorised as [`sum`] (`f` inlined into the loop: an `exp` summed without
/// storing it first).
#[inline(always)]
pub fn sum_by(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            acc[i] += f(c[i]);
        }
    }
    let mut total = 0f32;
    for &v in chunks.remainder() {
        total += f(v);
    }
    total + fold16(acc, |a, b| a + b)
}

/// Reduces 16 accumulators pairwise (8 + 8, 4 + 4, ...): four steps of shuffles the compiler
/// vectorises, where a left fold is a chain of 15 dependent scalar operations, as long as the
/// loop it ends over a 128-float row.
#[inline(always)]
fn fold16(mut acc: [f32; 16], f: impl Fn(f32, f32) -> f32) -> f32 {
    for w in [8, 4, 2, 1] {
        for i in 0..w {
            acc[i] = f(acc[i], acc[i + w]);
        }
    }
    acc[0]
}

/// Dot product, vectorised as [`sum`].
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 16];
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut total = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        total += x * y;
    }
    total + fold16(acc, |a, b| a + b)
}

/// Maximum, vectorised as [`sum`] (NaN-ignoring, as `f32::max`).
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            acc[i] = acc[i].max(c[i]);
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in chunks.remainder() {
        m = m.max(v);
    }
    m.max(fold16(acc, f32::max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_kernels_are_accurate() {
        // act_slice / act_grad_mul (the AVX-512 kernels where the CPU has them, the
        // compiler-vectorised scalar functions elsewhere) against f64 erf and exp, over
        // [-12, 12] (both clamps of erf and the exp's underflow reached), in slices of lengths
        // that leave every tail size of a 16-lane register. The scalar functions measure
        // 2.0e-7 and 2.2e-7 on these bounds; the AVX-512 kernels 1.9e-7 and 2.2e-7.
        let xs: Vec<f32> = (0..=24_000).map(|i| -12.0 + i as f32 * 1e-3).collect();
        for len in [1, 7, 15, 16, 17, 33, 320] {
            for chunk in xs.chunks(len) {
                let mut y = chunk.to_vec();
                act_slice(Activation::GeluErf, &mut y);
                let mut g: Vec<f32> = chunk.iter().map(|x| 1.5 + x).collect();
                act_grad_mul(Activation::GeluErf, &mut g, chunk);
                for (i, &x) in chunk.iter().enumerate() {
                    let xd = x as f64;
                    let cdf = 0.5 * (1.0 + libm::erf(xd / 2f64.sqrt()));
                    let pdf = (-0.5 * xd * xd).exp() / (2.0 * std::f64::consts::PI).sqrt();
                    // x·Φ(x) rounds at x's scale.
                    let err = (y[i] as f64 - xd * cdf).abs() / xd.abs().max(1.0);
                    assert!(err < 3e-7, "gelu({x}) = {}, error {err:.2e}", y[i]);
                    let m = 1.5 + xd;
                    let err = (g[i] as f64 - m * (cdf + xd * pdf)).abs() / m.abs().max(1.0);
                    assert!(err < 3e-7, "gelu'({x}) = {}, error {err:.2e}", g[i]);
                }
            }
        }
    }

    #[test]
    fn act_and_grad_equals_the_activation_and_its_derivative() {
        // The training forward keeps act'(pre) from act_and_grad; the backward multiplies by
        // it. Every activation, every tail length: the same bits as act_slice and
        // act_grad_mul (with g = 1) compute separately, on the AVX-512 path and the other.
        let xs: Vec<f32> = (0..=4_000).map(|i| -10.0 + i as f32 * 5e-3).collect();
        for a in [Activation::GeluErf, Activation::GeluTanh, Activation::Relu] {
            for len in [1, 15, 16, 17, 320] {
                for chunk in xs.chunks(len) {
                    let mut want_y = chunk.to_vec();
                    act_slice(a, &mut want_y);
                    let mut want_d = vec![1f32; chunk.len()];
                    act_grad_mul(a, &mut want_d, chunk);
                    let mut d = chunk.to_vec();
                    let mut y = vec![0f32; chunk.len()];
                    act_and_grad(a, &mut d, &mut y);
                    assert_eq!(y, want_y, "{a:?} activation");
                    assert_eq!(d, want_d, "{a:?} derivative");
                    let mut d = chunk.to_vec();
                    act_and_grad_auto(a, &mut d, &mut y);
                    for (i, &x) in chunk.iter().enumerate() {
                        assert_eq!(y[i], act(a, x), "{a:?}({x}), compiler-vectorised");
                        assert_eq!(d[i], act_grad(a, x), "{a:?}'({x}), compiler-vectorised");
                    }
                }
            }
        }
        let mut g = vec![2f32, -3.0, 0.5];
        mul(&mut g, &[0.5, 2.0, 0.0]);
        assert_eq!(g, [1.0, -6.0, 0.0]);
    }
}
