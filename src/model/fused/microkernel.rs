//! The product's microkernel for its full tiles: gemm's `x4x6` (64 rows of L by 6 columns of
//! R, 24 AVX-512 accumulators) written out here, so that it can prefetch.
//!
//! The arithmetic is gemm's: one FMA per depth per accumulator, in depth order, then
//! `beta·acc` or `beta·acc + dst` (the same bits: see the test). What differs:
//! - on the first strip of a block of L, where the panels come from memory or L3 (a frozen
//!   teacher's stored panels, a block just packed), each depth's L lines are prefetched
//!   [`L_AHEAD`] depths ahead;
//! - each tile prefetches its 24 destination lines [`C_AHEAD`] depths before its end, so that
//!   its stores (or reads, when accumulating) do not wait on memory at the end;
//! - it is called directly for full tiles with contiguous destination columns, not through
//!   gemm's table of function pointers (18 arguments, branches for partial tiles).
//!
//! Edge tiles still go to gemm's kernels. Hot, on one tile in L1/L2, both kernels run at the
//! FMA peak (`cargo bench --bench microkernel_peak`); the difference is in the step, where the
//! operands are cold. In-process A/B, gemm's kernel against this one (switch flipped every
//! other step, 50 pairs; `experiments/cpu-issue6-session22.md`): BERT-base distillation −11.2 ±
//! 2.0 ms a step (41 won; teacher phase −5.2, backward −6.4), BERT-base MLM training −15.4 ±
//! 3.1 (25 pairs, 22 won), small distillation −0.5 ± 1.0 ms of 110. Prefetching R as well (six
//! rows read in place, or the packed stream) gained nothing measurable; prefetching L on every
//! strip made the backward ~9 ms slower (its packed L is already in L2).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Rows of L in a tile (four registers of 16 floats), for `packed` and gemm's kernels alike.
pub const MR: usize = 64;
/// Columns of R in a tile.
pub const NR: usize = 6;

/// How far ahead, in depths, the first strip of a block prefetches its L panels.
pub const L_AHEAD: usize = 8;

/// How many depths before its end a tile prefetches its destination.
pub const C_AHEAD: usize = 64;

/// One full tile: `dst[i + j·cs] = beta·Σ_p L[p][i]·R[p][j]` (`status` 0), or that plus
/// `dst[i + j·cs]` (`status` 1), for `i < 64`, `j < 6`. L is a packed panel (64 floats a
/// depth); `R[p][j]` is at `rhs + p·rrs + j·rcs` (packed: `(6, 1)`; read in place: `(1,
/// row stride)`). With `PL > 0`, each depth's L lines `PL` depths ahead are prefetched.
///
/// # Safety
/// The CPU must have AVX-512F; `lhs` valid for `64·k` floats, `rhs` for the `k × 6` elements
/// its strides name, `dst` for the tile (read too with `status` 1). The prefetches may point
/// past `lhs` (harmless: a prefetch never faults).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn x4x6<const PL: usize>(
    k: usize,
    dst: *mut f32,
    cs: usize,
    lhs: *const f32,
    rhs: *const f32,
    (rrs, rcs): (isize, isize),
    beta: f32,
    status: u8,
) {
    let mut c = [[_mm512_setzero_ps(); 4]; 6];
    let mut l = lhs;
    let mut r = rhs;
    macro_rules! depth {
        () => {{
            if PL > 0 {
                let a = l.wrapping_add(PL * MR) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(a);
                _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(64));
                _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(128));
                _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(192));
            }
            let a0 = _mm512_loadu_ps(l);
            let a1 = _mm512_loadu_ps(l.add(16));
            let a2 = _mm512_loadu_ps(l.add(32));
            let a3 = _mm512_loadu_ps(l.add(48));
            let mut j = 0;
            while j < NR {
                let b = _mm512_set1_ps(*r.offset(j as isize * rcs));
                c[j][0] = _mm512_fmadd_ps(a0, b, c[j][0]);
                c[j][1] = _mm512_fmadd_ps(a1, b, c[j][1]);
                c[j][2] = _mm512_fmadd_ps(a2, b, c[j][2]);
                c[j][3] = _mm512_fmadd_ps(a3, b, c[j][3]);
                j += 1;
            }
            l = l.add(MR);
            r = r.offset(rrs);
        }};
    }
    // Units of four depths, as gemm's kernel (more, and the compiler hoists the broadcasts
    // of the whole unit and spills them).
    let mut p = 0;
    // The destination's 24 lines asked for ~64 depths before the end (≥ 700 cycles: enough
    // for a line from memory), so that its stores (or its reads, accumulating) do not wait.
    let c_at = k.saturating_sub(C_AHEAD) & !3;
    while p + 4 <= k {
        if p == c_at {
            for j in 0..NR {
                let d = dst.add(j * cs) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(d);
                _mm_prefetch::<_MM_HINT_T0>(d.wrapping_add(64));
                _mm_prefetch::<_MM_HINT_T0>(d.wrapping_add(128));
                _mm_prefetch::<_MM_HINT_T0>(d.wrapping_add(192));
            }
        }
        depth!();
        depth!();
        depth!();
        depth!();
        p += 4;
    }
    while p < k {
        depth!();
        p += 1;
    }
    let vb = _mm512_set1_ps(beta);
    for (j, cj) in c.iter().enumerate() {
        let d = dst.add(j * cs);
        for (i, &v) in cj.iter().enumerate() {
            let di = d.add(16 * i);
            let v = if status == 1 {
                _mm512_fmadd_ps(vb, v, _mm512_loadu_ps(di))
            } else {
                _mm512_mul_ps(vb, v)
            };
            _mm512_storeu_ps(di, v);
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// The same bits as gemm's `x4x6` (what it replaces), packed and in-place R, both
    /// statuses, with and without the prefetch, at depths with and without a partial unit.
    #[test]
    fn matches_gemms_kernel_bit_for_bit() {
        if !super::super::packed::available() {
            return;
        }
        use gemm_f32::microkernel::avx512f::f32::UKR;
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for k in [1usize, 5, 64, 154, 771] {
            let lhs: Vec<f32> = (0..MR * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            // R in place: six rows of `ld` floats; packed: k × 6.
            let ld = k + 3;
            let rows: Vec<f32> = (0..NR * ld).map(|_| rng.random_range(-1.0..1.0)).collect();
            let packed: Vec<f32> = (0..k * NR).map(|i| rows[(i % NR) * ld + i / NR]).collect();
            let init: Vec<f32> = (0..NR * 70).map(|_| rng.random_range(-1.0..1.0)).collect();
            for (rhs, rrs, rcs) in [(&rows, 1isize, ld as isize), (&packed, NR as isize, 1)] {
                for status in [0u8, 1] {
                    let mut want = init.clone();
                    // Ours into a copy of `init`, without or with the prefetch.
                    let ours = |prefetch: bool| {
                        let mut out = init.clone();
                        let (d, l, r) = (out.as_mut_ptr(), lhs.as_ptr(), rhs.as_ptr());
                        // Safety: as gemm's call below.
                        unsafe {
                            if prefetch {
                                x4x6::<L_AHEAD>(k, d, 70, l, r, (rrs, rcs), 0.5, status);
                            } else {
                                x4x6::<0>(k, d, 70, l, r, (rrs, rcs), 0.5, status);
                            }
                        }
                        out
                    };
                    let (got, got_pf) = (ours(false), ours(true));
                    // Safety: AVX-512 checked; the buffers hold the tile (columns 70 apart).
                    unsafe {
                        UKR[3][5](
                            MR,
                            NR,
                            k,
                            want.as_mut_ptr(),
                            lhs.as_ptr(),
                            rhs.as_ptr(),
                            70,
                            1,
                            MR as isize,
                            rrs,
                            rcs,
                            1.0,
                            0.5,
                            status,
                            false,
                            false,
                            false,
                            std::ptr::null(),
                        );
                    }
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&want), "k {k}, rrs {rrs}, status {status}");
                    assert_eq!(bits(&got_pf), bits(&want), "k {k}, rrs {rrs}, prefetch");
                }
            }
        }
    }
}
