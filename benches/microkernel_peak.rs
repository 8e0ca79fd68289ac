//! This CPU's fp32 FMA peak on one thread against gemm's AVX-512 microkernel (the one every
//! product of `src/model/fused/packed.rs` runs) on packed operands that stay in cache: how
//! much of a step's time outside the peak can be the microkernel's own.
//!
//! ```text
//! cargo bench --bench microkernel_peak
//! ```
//!
//! The peak: twelve independent AVX-512 FMA chains (two FMA pipes, four cycles' latency: enough
//! to keep both busy; sixteen spill, the compiler keeping to zmm0–15 here). The microkernel: `x4x6` (64 × 6 tile, what `packed` uses) and the
//! edge kernels `x2x6`/`x3x6`, called on one tile of packed L and R at depths 154 (the MLM
//! decoder's masked rows) and 768 (a BERT-base layer), so L is in L1 or L2. Session 20, Zen 5
//! EPYC, two runs: peak 269 and 272 GFLOP/s a core (a C loop of the same FMAs: 264), `x4x6`
//! 99% of it, the edge kernels 93–99%. Also our copy of `x4x6` (`fused::microkernel`, which
//! the products' full tiles run): session 22, 100% and 99% of the peak at depths 768 and 154.

#[cfg(target_arch = "x86_64")]
fn main() {
    if !std::arch::is_x86_feature_detected!("avx512f") {
        println!("no AVX-512 here: nothing to measure");
        return;
    }
    // Safety: AVX-512F checked above.
    let peak = unsafe { fma_peak() };
    println!("fp32 FMA peak, one thread: {peak:.1} GFLOP/s");
    for (k, mi, m) in [
        (768usize, 3usize, 64usize),
        (768, 2, 48),
        (768, 1, 32),
        (154, 3, 64),
    ] {
        let g = microkernel(k, mi, m);
        println!(
            "microkernel {m} x 6, depth {k}: {g:.1} GFLOP/s ({:.1}% of the peak)",
            100.0 * g / peak
        );
    }
    for k in [768usize, 154] {
        let g = ours(k);
        println!(
            "our copy of it (distil::model::fused::microkernel), 64 x 6, depth {k}: {g:.1} GFLOP/s ({:.1}% of the peak)",
            100.0 * g / peak
        );
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    println!("not an x86-64 CPU: nothing to measure");
}

/// GFLOP/s of twelve independent chains of `a = a·b + c` on 16 lanes, best of three.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_peak() -> f64 {
    use std::arch::x86_64::*;
    let (b, c) = (_mm512_set1_ps(0.999_999_9), _mm512_set1_ps(1e-8));
    let mut best = 0f64;
    for _ in 0..3 {
        let one = _mm512_set1_ps(1.0);
        let (mut a0, mut a1, mut a2, mut a3, mut a4, mut a5) = (one, one, one, one, one, one);
        let (mut a6, mut a7, mut a8, mut a9, mut a10, mut a11) = (one, one, one, one, one, one);
        let iters = 20_000_000usize;
        let t = std::time::Instant::now();
        for _ in 0..iters {
            // Twelve named chains (three per pipe at four cycles' latency), all in registers.
            macro_rules! step {
                ($($v:ident),*) => { $($v = _mm512_fmadd_ps($v, b, c);)* };
            }
            step!(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11);
        }
        let dt = t.elapsed().as_secs_f64();
        let a = [a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11];
        let sum: f32 = a.iter().map(|&v| _mm512_reduce_add_ps(v)).sum();
        std::hint::black_box(sum);
        best = best.max((iters * 12 * 16 * 2) as f64 / dt / 1e9);
    }
    best
}

/// GFLOP/s of `call` doing `flop` floating-point operations, called about a GFLOP's worth of
/// times in a row, best of three.
#[cfg(target_arch = "x86_64")]
fn best_gflops(flop: usize, mut call: impl FnMut()) -> f64 {
    let reps = 1_000_000_000 / flop;
    let mut best = 0f64;
    for _ in 0..3 {
        let t = std::time::Instant::now();
        for _ in 0..reps {
            call();
        }
        best = best.max((flop * reps) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// GFLOP/s of gemm's microkernel `UKR[mi][5]` (`m` rows × 6 columns) on one tile of packed
/// operands of depth `k`.
#[cfg(target_arch = "x86_64")]
fn microkernel(k: usize, mi: usize, m: usize) -> f64 {
    use gemm_f32::microkernel::avx512f::f32::UKR;
    let lhs = vec![0.01f32; 64 * k + 64];
    let rhs = vec![0.02f32; 6 * k + 64];
    let mut dst = vec![0f32; 64 * 6 + 64];
    let kernel = UKR[mi][5];
    best_gflops(m * 6 * k * 2, || {
        // Safety: the tile's operands and destination are inside the buffers above (L
        // panels 64 floats a depth, R 6, the destination 64 × 6 column-major).
        unsafe {
            kernel(
                m,
                6,
                k,
                dst.as_mut_ptr(),
                lhs.as_ptr(),
                rhs.as_ptr(),
                64,
                1,
                64,
                6,
                1,
                1.0,
                1.0,
                0,
                false,
                false,
                false,
                std::ptr::null(),
            )
        };
        std::hint::black_box(&dst);
    })
}

/// GFLOP/s of our copy of the `x4x6` kernel (without its prefetches), as [`microkernel`].
#[cfg(target_arch = "x86_64")]
fn ours(k: usize) -> f64 {
    let lhs = vec![0.01f32; 64 * k];
    let rhs = vec![0.02f32; 6 * k];
    let mut dst = vec![0f32; 64 * 6 + 64];
    best_gflops(64 * 6 * k * 2, || {
        // Safety: AVX-512F checked in `main`; the operands as in `microkernel`.
        unsafe {
            distil::model::fused::microkernel::x4x6::<0>(
                k,
                dst.as_mut_ptr(),
                64,
                lhs.as_ptr(),
                rhs.as_ptr(),
                (6, 1),
                1.0,
                0,
            )
        };
        std::hint::black_box(&dst);
    })
}
