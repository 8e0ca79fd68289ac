//! A single-threaded blocked product over gemm's AVX-512 microkernel (our copy of its full
//! tile, [`super::microkernel`], which prefetches; the crate's `gemm_f32::microkernel::avx512f`
//! for edge tiles), with packing of our own and room for work on each finished strip of the
//! result.
//!
//! Why not `gemm::gemm` for everything: gemm packs an operand stored across the direction it
//! needs one element at a time (a scalar load and store per element), the layout of `x·Wᵀ` with
//! W `[out, in]` as PyTorch stores it (the trainable student's forward, the MLM decoder's
//! `x·Eᵀ`, the attention's `q·kᵀ`). Here such an operand is packed with 16×16 AVX-512 register
//! transposes: 3–15% faster products (`IMPL=crate` / `IMPL=packed SPLIT=n cargo bench --bench
//! gemm_shapes -- base 2`). And since the loop is ours, a [`Then`] runs on each strip of NR
//! rows right after the microkernel wrote it, still in L1: a linear's bias, activation and
//! dropout, the FFN backward's `act'`, which were passes over the whole output after the
//! product. The microkernel's arithmetic, the blocking (`kernel_params`) and the loop order
//! are gemm's.
//! On an AVX-512 CPU every unthreaded product big enough goes through here (see [`suits`]);
//! the gemm crate takes the rest, and everything on other CPUs.
//!
//! In gemm's terms the product is column-major: our row-major `dst (m × n) = a · b` is
//! `dstᵀ (n × m) = bᵀ · aᵀ`, so gemm's left operand `L` is `bᵀ` (rows = our columns) and its
//! right operand `R` is `aᵀ`.

use super::gemm::{Acc, Mat, Then};
use gemm_common::cache::kernel_params;
use std::cell::{RefCell, UnsafeCell};
use std::mem::MaybeUninit;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize};

/// f32 lanes in one AVX-512 register.
const LANES: usize = 16;
/// The microkernel's tile: MR rows of L (4 registers) by NR columns of R.
use super::microkernel::{MR, NR};
/// Rows in a strip of the result: a [`Then`] sees row `r` of a strip, then row `r + STRIP`
/// (same columns) of the next one after its product.
pub const STRIP: usize = NR;
/// R's columns a strip of a product stored transposed through a scratch block covers (see
/// [`Pass::strip_through_scratch`]): whole 16-float runs of each destination row.
const GROUP: usize = 8 * NR;

/// Whether this CPU runs the AVX-512 microkernel (the same check as the AVX-512 element-wise
/// kernels', [`super::math::avx512::available`]).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::math::avx512::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether [`gemm`] takes this product: an AVX-512 CPU, operands each stored along one of
/// their directions (rows or columns contiguous; the packing of other strides is a scalar
/// loop), and big enough for the packing to pay. Every layout goes through here rather than
/// through the crate where it can: besides the transposed `b` that the crate packs an
/// element at a time, the backward's row-major products (`dx = g·W`, the weight gradients
/// `gᵀ·x`, the attention's `P·V`, `Pᵀ·dO` and `dS·K`) gained too: BERT-base distillation
/// step, backward 0.655 -> 0.636 s (40 pairs of alternating steps in one process, new
/// faster in 32).
pub fn suits(a: &Mat, b: &Mat) -> bool {
    let along = |m: &Mat| m.rs == 1 || m.cs == 1;
    along(a) && along(b) && b.cols >= MR && a.rows >= 2 * NR && a.cols >= 32 && available()
}

/// Whether `a · b` goes through [`gemm_transposed`] (see `gemm::transposed`): `a` few rows
/// (at most four panels) against many columns of a `b` stored contiguous along its depth and
/// not prepacked.
pub fn transposed_suits(a: &Mat, b: &Mat) -> bool {
    b.rs == 1
        && b.cs != 1
        && b.panels.is_none()
        && (a.rs == 1 || a.cs == 1)
        && a.rows >= 2 * NR
        && a.rows <= 4 * MR
        && b.cols >= 64 * a.rows
        && a.cols >= 32
        && available()
}

thread_local! {
    /// Packing buffers, kept per thread between products (L panel block, R block).
    static BUFS: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    /// The block a strip stored transposed is computed into ([`Pass::strip_through_scratch`]).
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Sixteen rows of L copied out before their transposes ([`ROWS_COPY`]).
    static ROWS_BUF: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}
/// The most floats of sixteen rows of L that [`pack_l_block`] copies out (each row one
/// contiguous run) before transposing them from the copy: 192 KB, in L2. Transposing in place
/// reads sixteen rows at once, 64 bytes of each at a time; the trainable weights' rows come
/// from memory (AdamW has just rewritten them), where sixteen interleaved streams read slower
/// than sixteen runs one after another (for `W` `[out, in]` at the whole depth of `in`, one
/// run of 16 rows). BERT-base, in-process alternating steps: distillation −7.9 ± 3.1 and −6.7
/// ± 2.7 ms a step (20 and 30 pairs, 16 and 23 won; the student's forward −11.0 ± 1.4 and −8.7
/// ± 1.1, the phase beside the teacher −6.5 ± 1.2 and −5.7 ± 1.3); MLM training −19.2 ± 4.1
/// (20 pairs, 18 won; forward −10.0 ± 1.5). Of that, the attention's `k` (16 runs of 256 B)
/// alone: phase −0.8 ± 2.7 ms.
const ROWS_COPY: usize = LANES * ONE_BLOCK;

/// `dst (m × n, row stride dst_rs) = [dst +] scale · a · b` on this thread, then `then` on
/// each strip of rows (a microkernel's NR rows by up to one block of columns) as soon as it
/// is final. With `sums`, also `sums[i] = Σ_k a[i][k]` (the m row sums of `a`), added up
/// while `a` is packed: the bias gradient `Σ_rows g` of a weight gradient `gᵀ·x` without a
/// pass of its own over `g`.
///
/// With `pair`, the product is task `me` (0 or 1) of the pair: one of the two halves of a
/// product split between two threads (by columns or rows), which then balance each other
/// ([`Pair`]); without, it is all this thread's.
///
/// # Safety
/// `dst` must be valid for `(m - 1) * dst_rs + n` elements and `sums` for m, neither written
/// by anyone else during the call, and [`available`] must be true. With a pair, each of its
/// two tasks runs this (or [`gemm_transposed`]) with its own destination block, and the pair
/// outlives both.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm(
    dst: *mut f32,
    dst_rs: usize,
    a: Mat,
    b: Mat,
    acc: Acc,
    scale: f32,
    then: Option<Then>,
    sums: Option<*mut f32>,
    pair: Option<(&Pair, usize)>,
) {
    shared(pair, |p| {
        on_this_thread(dst, dst_rs, a, b, (acc, scale, then, sums), Store::Rows, p)
    })
}

/// Runs `half` (this task's product, sharing its strips through the pair it is given) as
/// task `me` of `pair`, then helps the other task with what is left of its half; without a
/// pair, just `half`.
///
/// # Safety
/// `half` must be one of [`run`]'s products; see [`gemm`].
unsafe fn shared(pair: Option<(&Pair, usize)>, half: impl FnOnce(Option<(&Pair, usize)>)) {
    /// Marks the task done however its half ends: a panic in it must reach rayon's join, not
    /// leave the other task helping forever.
    struct Done<'a>(&'a Slot);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.state.store(DONE, SeqCst);
        }
    }
    let Some((pair, me)) = pair else {
        return half(None);
    };
    let slot = &pair.slots[me];
    slot.state.store(RUNNING, SeqCst);
    {
        let _done = Done(slot);
        half(Some((pair, me)));
    }
    pair.slots[1 - me].help();
}

/// The two tasks of a product split in two, which share out each other's strips: each task
/// offers the strips of each block it works on to the other, claiming them itself from the
/// front while the other, once its own half is done, takes them from the back; so neither
/// waits for the other at the end by more than a strip.
///
/// Why: the halves are equal work, yet one finished systematically later (BERT-base MLM
/// training step, 221 split products, per-product finishing gap summed over a step: 15–22 ms
/// in one hour, 68 ms in another, the task on the same one of the two CPUs later every time:
/// the host's CPUs run at different speeds for minutes at a time).
pub struct Pair {
    slots: [Slot; 2],
}

impl Default for Pair {
    fn default() -> Self {
        let slot = || Slot {
            state: AtomicU8::new(IDLE),
            word: AtomicU64::new(0),
            inflight: AtomicUsize::new(0),
            pass: UnsafeCell::new(MaybeUninit::uninit()),
        };
        Pair {
            slots: [slot(), slot()],
        }
    }
}

// Safety: a slot's pass is written by its task only while no one may read it, and read by
// the other only while the claim protocol keeps it unchanged (see `Slot`).
unsafe impl Sync for Pair {}

/// [`Slot::state`]: not started yet, working on its own half, finished with it.
const IDLE: u8 = 0;
const RUNNING: u8 = 1;
const DONE: u8 = 2;
/// The owner claims a quarter of the strips left at a time (one at least), not one: each
/// claim is a locked instruction, which waits for the strips' stores still in flight. One
/// strip a claim: the claims' compare-exchange 1.3% of a BERT-base training step's samples
/// (0.13% so); in-process (switch flipped every other step), distillation −6.1 ± 2.1 ms (25
/// pairs, 18 won; backward −7.2 ± 1.2, 24 won), MLM training −10.7 ± 3.7 (20 pairs). A half
/// or an eighth at a time: within noise of a quarter. The helper, taking from the back, can
/// still take all but the owner's claim in hand, and claims shrink to one strip at the end.
const CLAIM_SHARE: u64 = 4;
/// Bits of [`Slot::word`] for the front and the back of a pass's strips.
const STRIP_BITS: u32 = 20;
const STRIP_MASK: u64 = (1 << STRIP_BITS) - 1;

/// The `(front, back)` of a [`Slot::word`]: the strips left are `front..back`.
fn ends(w: u64) -> (u64, u64) {
    ((w >> STRIP_BITS) & STRIP_MASK, w & STRIP_MASK)
}

/// One task's side of a [`Pair`]: the block it works on and which of its strips are left.
///
/// The protocol: the owner writes `pass`, then stores `word` (a new generation, front 0, back the
/// number of strips); it claims strips by moving the front up ([`CLAIM_SHARE`] of what is left at a
/// time), the helper one by moving the back down, each with a compare-exchange on the whole word,
/// so each strip goes to one of them. The helper counts itself in `inflight` before it reads `pass`
/// and claims, out after the strip; the owner, once no strip is left, waits for `inflight` to be
/// zero before it changes anything the pass points at (its packed blocks) or writes the next pass.
struct Slot {
    state: AtomicU8,
    /// Generation (24 bits) | front | back, in strips.
    word: AtomicU64,
    inflight: AtomicUsize,
    pass: UnsafeCell<MaybeUninit<Pass<'static>>>,
}

impl Slot {
    /// The owner's side: offers `pass`'s strips, works through them from the front, and
    /// returns when every strip is done (by either task).
    unsafe fn share(&self, pass: &Pass) {
        let n = pass.strips() as u64;
        assert!(n <= STRIP_MASK, "packed: too many strips to share");
        // Safety: no helper reads the pass now (the previous one's strips are all done and
        // `inflight` was zero); the lifetime is the owner's, who waits below for the helper.
        (*self.pass.get()).write(std::mem::transmute::<Pass<'_>, Pass<'static>>(*pass));
        let generation = ((self.word.load(SeqCst) >> (2 * STRIP_BITS)) + 1) & 0xff_ffff;
        self.word
            .store((generation << (2 * STRIP_BITS)) | n, SeqCst);
        let _settled = Settled(self);
        loop {
            let w = self.word.load(SeqCst);
            let (front, back) = ends(w);
            if front >= back {
                break;
            }
            let take = ((back - front) / CLAIM_SHARE).max(1);
            if self
                .word
                .compare_exchange_weak(w, w + (take << STRIP_BITS), SeqCst, Relaxed)
                .is_ok()
            {
                for s in front..front + take {
                    pass.strip(s as usize);
                }
            }
        }
    }

    /// The other task's side, after its own half: takes this task's strips from the back
    /// for as long as this task is working (returns at once if it has not started: the two
    /// tasks may run one after the other on one thread).
    unsafe fn help(&self) {
        while self.state.load(SeqCst) == RUNNING {
            let (front, back) = ends(self.word.load(SeqCst));
            if front >= back {
                // Nothing to take while the owner packs its next block: other work queued
                // meanwhile (the teacher's beside the student's) rather than a spin.
                if rayon::yield_now() != Some(rayon::Yield::Executed) {
                    std::hint::spin_loop();
                }
                continue;
            }
            self.inflight.fetch_add(1, SeqCst);
            let _out = Out(self);
            let w = self.word.load(SeqCst);
            let (front, back) = ends(w);
            if front < back {
                // Safety: a strip left in the word means its pass is written, and it stays
                // as it is while `inflight` counts this helper.
                let pass = (*self.pass.get()).assume_init();
                if self
                    .word
                    .compare_exchange(w, w - 1, SeqCst, Relaxed)
                    .is_ok()
                {
                    pass.strip(back as usize - 1);
                }
            }
        }
    }
}

/// The end of an owner's pass, however it ends (a panic in a strip too): no strip left to
/// take, then none in flight, before anything the pass points at may change or go.
struct Settled<'a>(&'a Slot);

impl Drop for Settled<'_> {
    fn drop(&mut self) {
        let word = &self.0.word;
        let mut w = word.load(SeqCst);
        loop {
            let (front, back) = ends(w);
            if front >= back {
                break;
            }
            // The front moved up to the back.
            let closed = (w & !(STRIP_MASK << STRIP_BITS)) | (back << STRIP_BITS);
            match word.compare_exchange(w, closed, SeqCst, SeqCst) {
                Ok(_) => break,
                Err(now) => w = now,
            }
        }
        while self.0.inflight.load(SeqCst) != 0 {
            std::hint::spin_loop();
        }
    }
}

/// A helper's strip over, however it ends.
struct Out<'a>(&'a Slot);

impl Drop for Out<'_> {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, SeqCst);
    }
}

/// One block of L (packed) against a block of R: what computing one strip of the result
/// (NR rows of it in our terms, `mb` columns) takes, on whichever thread.
#[derive(Clone, Copy)]
struct Pass<'t> {
    dst: *mut f32,
    dst_rs: usize,
    /// The microkernel's destination strides (see [`run`]).
    ucs: usize,
    urs: usize,
    lpack: *const f32,
    /// Floats from one panel of the L block to the next.
    lstride: usize,
    rptr: *const f32,
    rrs: isize,
    rcs: isize,
    r_packed: bool,
    i0: usize,
    mb: usize,
    j0: usize,
    nb: usize,
    kb: usize,
    scale: f32,
    status: u8,
    /// A transposed store computed into a scratch block, then transposed into the
    /// destination 16 × 16 at a time ([`Pass::strip_through_scratch`]).
    scratch: bool,
    /// On the last block of depth only.
    then: Option<Then<'t>>,
    /// [`Store::Transposed`]'s bias, indexed by R's column (on the last block of depth only).
    bias: Option<*const f32>,
}

impl Pass<'_> {
    fn strips(&self) -> usize {
        self.nb.div_ceil(if self.scratch { GROUP } else { NR })
    }

    /// Strip `s`: R's columns `s·NR..` against every panel of the L block, then `then` on
    /// its rows.
    ///
    /// # Safety
    /// As [`run`]'s, for the blocks the pass points at.
    #[cfg(target_arch = "x86_64")]
    unsafe fn strip(&self, s: usize) {
        if self.scratch {
            return self.strip_through_scratch(s);
        }
        let jr = s * NR;
        let nn = NR.min(self.nb - jr);
        let at = (self.j0 + jr) * self.ucs + self.i0 * self.urs;
        self.tiles(jr, nn, self.dst.add(at), (self.ucs, self.urs), self.status);
        if let Some(bias) = self.bias {
            // The strip's nn columns of the transposed result: mb rows of it, each nn floats.
            add_columns(
                self.dst.add(at),
                self.urs,
                self.mb,
                bias.add(self.j0 + jr),
                nn,
            );
        }
        if let Some(f) = self.then {
            for t in 0..nn {
                let row = self.j0 + jr + t;
                let piece = self.dst.add(row * self.dst_rs + self.i0);
                f(row, self.i0, std::slice::from_raw_parts_mut(piece, self.mb));
            }
        }
    }

    /// The microkernel over every panel of the block of L against R's columns `jr..jr + nn`:
    /// element `(i, j)` of that block (`i` from the block's first row of L, `j` from `jr`) at
    /// `dst + i·rs + j·cs`, overwritten (`status` 0) or accumulated (1).
    ///
    /// # Safety
    /// As [`Pass::strip`]'s, `dst` valid for the block.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn tiles(
        &self,
        jr: usize,
        nn: usize,
        dst: *mut f32,
        (cs, rs): (usize, usize),
        status: u8,
    ) {
        use gemm_f32::microkernel::avx512f::f32::UKR;
        let rp = if self.r_packed {
            self.rptr.add(jr * self.kb)
        } else {
            self.rptr.offset(jr as isize * self.rcs)
        };
        let mut ir = 0;
        while ir < self.mb {
            let mm = MR.min(self.mb - ir);
            let lp = self.lpack.add(ir / MR * self.lstride);
            if mm == MR && nn == NR && rs == 1 {
                // Full tiles: our copy of gemm's kernel (see `microkernel`), prefetching L on
                // the block's first strip, where its panels are not yet in L1 or L2.
                use super::microkernel::{x4x6, L_AHEAD};
                let (d, rr) = (dst.add(ir), (self.rrs, self.rcs));
                if jr == 0 {
                    x4x6::<L_AHEAD>(self.kb, d, cs, lp, rp, rr, self.scale, status);
                } else {
                    x4x6::<0>(self.kb, d, cs, lp, rp, rr, self.scale, status);
                }
                ir += MR;
                continue;
            }
            let kernel = UKR[mm.div_ceil(LANES) - 1][nn - 1];
            kernel(
                mm,
                nn,
                self.kb,
                dst.add(ir * rs),
                lp,
                rp,
                cs as isize,
                rs as isize,
                MR as isize,
                self.rrs,
                self.rcs,
                1.0,
                self.scale,
                status,
                false,
                false,
                false,
                std::ptr::null(),
            );
            ir += MR;
        }
    }

    /// Strip `s` of a transposed store (GROUP of R's columns): the microkernel writes its
    /// tiles as it does untransposed, whole registers, into a scratch block (`mb` rows of L
    /// by the group's columns), which is then transposed into the destination 16 × 16 at a
    /// time, with the bias: each destination row gets runs of 16 floats rather than the
    /// microkernel's six single-float stores to six lines, and a pass of its own for the bias.
    /// BERT-base distillation, in-process (the switch flipped every other step): the
    /// student's MLM head −0.4 ± 0.2 and −0.7 ± 0.2 ms (25 and 40 pairs, 19 and 39 won); the
    /// same bits.
    ///
    /// # Safety
    /// As [`Pass::strip`]'s; only for a product of one block of depth that overwrites.
    #[cfg(target_arch = "x86_64")]
    unsafe fn strip_through_scratch(&self, s: usize) {
        debug_assert_eq!(self.status, 0);
        let jr0 = s * GROUP;
        let width = GROUP.min(self.nb - jr0);
        let ld = self.mb.next_multiple_of(LANES);
        SCRATCH.with(|buf| {
            let tile = aligned(&mut buf.borrow_mut(), GROUP * ld);
            for jr in (jr0..jr0 + width).step_by(NR) {
                let nn = NR.min(jr0 + width - jr);
                self.tiles(jr, nn, tile.add((jr - jr0) * ld), (ld, 1), 0);
            }
            for jb in (0..width).step_by(LANES) {
                let live = LANES.min(width - jb);
                let bias = self.bias.map(|b| b.add(self.j0 + jr0 + jb));
                for ib in (0..self.mb).step_by(LANES) {
                    let at = (self.j0 + jr0 + jb) * self.ucs + (self.i0 + ib) * self.urs;
                    transpose16(
                        tile.add(jb * ld + ib),
                        ld,
                        live,
                        LANES.min(self.mb - ib),
                        self.dst.add(at),
                        self.urs,
                        (live, bias),
                    );
                }
            }
        });
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn strip(&self, _s: usize) {
        unreachable!("packed::gemm needs AVX-512")
    }
}

/// `dst[r·rs + j] += bias[j]` for `r < rows`, `j < nn` (at most 16).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn add_columns(dst: *mut f32, rs: usize, rows: usize, bias: *const f32, nn: usize) {
    use std::arch::x86_64::*;
    let m = super::math::avx512::lanes(nn);
    let b = _mm512_maskz_loadu_ps(m, bias);
    for r in 0..rows {
        let d = dst.add(r * rs);
        _mm512_mask_storeu_ps(d, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, d), b));
    }
}

/// `a · b` (`m × n`) on this thread, stored transposed: element `(i, j)` at
/// `dst[j · dst_rs + i]`, as `dst = [dst +] scale · (a · b)ᵀ`. For a product of few columns
/// and a huge, contiguous-along-depth `a` (the MLM decoder's `E · xᵀ`, E `[vocab, hidden]`):
/// `a` is then the microkernel's operand read in place, streamed once, and the small `b` is
/// the one packed, in a single block (see [`super::gemm`]'s use).
///
/// `pair` as [`gemm`]'s.
///
/// # Safety
/// `dst` must be valid for `(n - 1) * dst_rs + m` elements, written by no one else during the
/// call, and [`available`] must be true; a pair as [`gemm`]'s.
pub unsafe fn gemm_transposed(
    dst: *mut f32,
    dst_rs: usize,
    a: Mat,
    b: Mat,
    (acc, scale): (Acc, f32),
    bias: Option<&[f32]>,
    pair: Option<(&Pair, usize)>,
) {
    if let Some(bias) = bias {
        assert!(bias.len() >= a.rows, "packed: a bias for each of a's rows");
    }
    let store = Store::Transposed(bias.map(|b| b.as_ptr()));
    shared(pair, |p| {
        on_this_thread(dst, dst_rs, a, b, (acc, scale, None, None), store, p)
    })
}

/// How [`run`] stores the result: as computed (row-major, our terms), or transposed (see
/// [`gemm_transposed`]) with, optionally, `bias[j]` added to every element of its column `j`
/// (each strip's columns as soon as the strip is done, while they are in L1).
#[derive(Clone, Copy)]
enum Store {
    Rows,
    Transposed(Option<*const f32>),
}

/// [`run`] with this thread's packing buffers.
///
/// # Safety
/// As [`gemm`]'s (or [`gemm_transposed`]'s, `transposed`).
unsafe fn on_this_thread(
    dst: *mut f32,
    dst_rs: usize,
    a: Mat,
    b: Mat,
    extras: (Acc, f32, Option<Then>, Option<*mut f32>),
    store: Store,
    pair: Option<(&Pair, usize)>,
) {
    #[cfg(target_arch = "x86_64")]
    {
        debug_assert!(available());
        BUFS.with(|bufs| {
            let (lbuf, rbuf) = &mut *bufs.borrow_mut();
            run(dst, dst_rs, a, b, extras, store, lbuf, rbuf, pair)
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (dst, dst_rs, a, b, extras, store, pair);
        unreachable!("packed::gemm needs AVX-512")
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn run(
    dst: *mut f32,
    dst_rs: usize,
    a: Mat,
    b: Mat,
    (acc, scale, then, sums): (Acc, f32, Option<Then>, Option<*mut f32>),
    store: Store,
    lbuf: &mut Vec<f32>,
    rbuf: &mut Vec<f32>,
    pair: Option<(&Pair, usize)>,
) {
    // gemm's column-major problem: m' = our n, n' = our m.
    let (mp, np, k) = (b.cols, a.rows, a.cols);
    let (transposed, bias) = match store {
        Store::Rows => (false, None),
        Store::Transposed(bias) => (true, bias),
    };
    let l = Operand {
        data: b.data.as_ptr(),
        rs: b.cs,
        cs: b.rs,
    };
    let r = Operand {
        data: a.data.as_ptr(),
        rs: a.cs,
        cs: a.rs,
    };
    let params = kernel_params(mp, np, k, MR, NR, 4);
    let (kc, mc) = (params.kc.max(1), params.mc.max(MR));
    // Up to a depth of ONE_BLOCK, blocks of depth of our own instead of gemm's (see
    // [`blocking`]).
    let (kc, mc) = blocking((kc, mc), mp, k, l_block_bytes());
    let nc = if params.nc == 0 {
        np.next_multiple_of(NR)
    } else {
        params.nc
    };

    // Stored transposed (see [`gemm_transposed`]): L (our few columns) in one block, so that
    // R, read in place, streams through once.
    let (mc, nc) = if transposed {
        debug_assert!(then.is_none() && sums.is_none());
        (mp.next_multiple_of(MR), np.next_multiple_of(NR))
    } else {
        (mc, nc)
    };
    // The microkernel's destination strides in its terms (column-major: its rows are our
    // columns): ours, or swapped for a transposed store.
    let (ucs, urs) = if transposed { (1, dst_rs) } else { (dst_rs, 1) };
    // R is read in place when a column of it (a row of a) is contiguous, as gemm does for
    // products whose L is not huge.
    // R is a's transpose: its column sums are the row sums asked for, added up as it is
    // packed (so it is packed when they are asked for).
    let pack_r = sums.is_some() || r.rs != 1 || mp > 128 * MR;
    if let Some(s) = sums {
        std::ptr::write_bytes(s, 0, np);
    }
    // A packed R streams from L3 once per block of L: at most R_BLOCK_BYTES of it a block.
    let nc = if pack_r && !transposed {
        narrowed(nc, np, kc, R_BLOCK_BYTES, NR)
    } else {
        nc
    };
    // Stored panels are read in place (below): no block of L to pack.
    let l_len = if b.panels.is_some() {
        0
    } else {
        mc.div_ceil(MR) * MR * kc
    };
    let lpack = aligned(lbuf, l_len);
    let rpack = aligned(rbuf, if pack_r { nc.div_ceil(NR) * NR * kc } else { 0 });
    // A transposed store of one block of depth that overwrites goes through a scratch block
    // (the others accumulate into the destination, which the microkernel then reads).
    let through_scratch = transposed && kc >= k && acc == Acc::Overwrite;

    let mut j0 = 0;
    while j0 < np {
        let nb = nc.min(np - j0);
        let mut p0 = 0;
        while p0 < k {
            let kb = kc.min(k - p0);
            // The first block of depth overwrites (or accumulates, for Acc::Add); the others add.
            let status: u8 = if p0 == 0 && acc == Acc::Overwrite {
                0
            } else {
                1
            };
            let (rptr, rrs, rcs) = if pack_r {
                pack_r_block(rpack, r.shifted(p0, j0), kb, nb, sums.map(|s| s.add(j0)));
                (rpack as *const f32, NR as isize, 1isize)
            } else {
                (r.at(p0, j0), r.rs as isize, r.cs as isize)
            };
            let mut i0 = 0;
            while i0 < mp {
                let mb = mc.min(mp - i0);
                let (lptr, lstride) = match b.panels {
                    // Stored panels are the packed block itself, read in place: each panel's
                    // depths p0.. start at its p0·MR-th float, panels MR·k floats apart.
                    Some(p) => {
                        assert!(
                            i0.is_multiple_of(MR) && (i0 + mb).div_ceil(MR) * MR * k <= p.len(),
                            "packed panels too short for the product"
                        );
                        (p.as_ptr().add(i0 * k + p0 * MR), MR * k)
                    }
                    None => {
                        pack_l_block(lpack, l.shifted(i0, p0), mb, kb);
                        (lpack as *const f32, MR * kb)
                    }
                };
                let pass = Pass {
                    dst,
                    dst_rs,
                    ucs,
                    urs,
                    lpack: lptr,
                    lstride,
                    rptr,
                    rrs,
                    rcs,
                    r_packed: pack_r,
                    i0,
                    mb,
                    j0,
                    nb,
                    kb,
                    scale,
                    status,
                    scratch: through_scratch,
                    then: then.filter(|_| p0 + kb == k),
                    bias: bias.filter(|_| p0 + kb == k),
                };
                match pair {
                    Some((pair, me)) => pair.slots[me].share(&pass),
                    None => (0..pass.strips()).for_each(|s| pass.strip(s)),
                }
                i0 += mb;
            }
            p0 += kb;
        }
        j0 += nb;
    }
}

/// The panels [`pack_panels`] makes of `b`'s transpose (`b`: `k × n`), as many floats.
pub fn panels_len(k: usize, n: usize) -> usize {
    n.div_ceil(MR) * MR * k
}

/// `b`'s transpose (`b`: `k × n`, stored along one of its directions) packed once as [`run`]
/// packs its left operand, each panel of MR columns of `b` over the whole depth `k` (panel
/// `t`: `k` groups of MR values, columns past `n` zero): a frozen weight's, so that each
/// product's microkernel reads its blocks in place, with no packing of its own. Copying each
/// block out of the panels first (contiguous runs, ~2× faster than packing `b` itself) was
/// BERT-base distillation's teacher forward 9.2 ± 2.7 ms slower (in-process, 20 pairs, 17
/// won; the step 10.9 ± 3.8). For [`Mat::panels`].
///
/// On a CPU without AVX-512 (where no product reads panels), an empty vector.
pub fn pack_panels(b: Mat) -> Vec<f32> {
    if !available() {
        return Vec::new();
    }
    let (k, n) = (b.rows, b.cols);
    let mut out = vec![0f32; panels_len(k, n)];
    if k == 0 || n == 0 {
        return out;
    }
    b.check();
    #[cfg(target_arch = "x86_64")]
    {
        let l = Operand {
            data: b.data.as_ptr(),
            rs: b.cs,
            cs: b.rs,
        };
        // Safety: AVX-512 checked above; `out` holds panels_len(k, n) floats and `b` was
        // checked against its slice.
        unsafe { pack_l_block(out.as_mut_ptr(), l, n, k) };
    }
    out
}

/// The panels of columns `lo..` of the `k`-deep operand `panels` was packed from, when `lo`
/// starts a panel (else `None`: the block packs its operand itself).
pub fn panels_from(panels: &[f32], lo: usize, k: usize) -> Option<&[f32]> {
    lo.is_multiple_of(MR)
        .then(|| &panels[(lo * k).min(panels.len())..])
}

/// The deepest product whose blocks of depth [`blocking`] picks (BERT-base's FFN width);
/// deeper ones take gemm's.
const ONE_BLOCK: usize = 3072;

/// The most a block of L may take when [`blocking`] picks the depth: half of a core's L2 as
/// the gemm crate reads the caches, within 256 KiB..=1 MiB. 1 MiB on the 2 MB-L2 Xeon the
/// blocking was first tuned on (as gemm's own 512 × 512 blocks); 512 KiB on a 1 MB-L2 EPYC
/// (Zen 5), where 1 MiB blocks, the whole L2, made a BERT-base distillation step 18.7 ± 3.3
/// ms slower (in-process, 20 pairs, 19 won; 384 KiB −15.2, 256 KiB −10.2 ± 9.3).
fn l_block_bytes() -> usize {
    static BYTES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BYTES.get_or_init(|| {
        let l2 = gemm_common::cache::CACHE_INFO[1].cache_bytes;
        (l2 / 2).clamp(256 << 10, 1 << 20)
    })
}

/// gemm's blocking `(kc, mc)` for a product of depth `k` over `m` rows of L, replaced up to a
/// depth of ONE_BLOCK: blocks of depth as deep as one panel of MR rows allows within `budget`
/// bytes (the whole depth in one block where it fits), each block of L narrowed to at most
/// `budget` bytes (one panel at least). One block of depth reads and writes the result once
/// instead of once per block. At depth 768 (blocks of 320 rows at 1 MiB), in-process
/// alternating steps, BERT-base distillation (2 × 50 pairs): step −16 ms (median of the
/// differences); the whole depth with gemm's wider blocks (1.5 MB of L, more than its share
/// of L2) was 93 ms slower. Extended to the FFN output's depth 3072 (blocks of 64 rows) and
/// the weight gradients' 1024 (256 rows): step −6.7 ± 2.5 and −5.8 ± 1.9 ms (25 and 20
/// pairs); 128-row blocks at depth 3072 (1.5 MB) were 46 ms slower. On the 1 MB-L2 EPYC
/// (512 KiB blocks) depth 3072 as two blocks of 1536 rather than one (64 rows, 768 KB): step
/// −18.5 ± 3.9 ms (20 pairs, 17 won); as three of 1024: +9.2 ± 5.5 against two.
fn blocking((kc, mc): (usize, usize), m: usize, k: usize, budget: usize) -> (usize, usize) {
    if kc >= k || k > ONE_BLOCK {
        return (kc, mc);
    }
    let deepest = (budget / (4 * MR)).max(kc);
    let kc = k.div_ceil(k.div_ceil(deepest));
    (kc, narrowed(mc, m, kc, budget, MR))
}

/// `mc` (a multiple of `unit`, MR or NR) brought down to the rows of at most `budget` bytes at
/// depth `k` (one unit at least), split evenly over `m` rows.
fn narrowed(mc: usize, m: usize, k: usize, budget: usize, unit: usize) -> usize {
    let cap = (budget / (4 * k) / unit * unit).max(unit);
    if mc <= cap {
        return mc;
    }
    let blocks = m.div_ceil(cap);
    (m.div_ceil(blocks * unit) * unit).min(cap)
}

/// The most a block of packed R may take (gemm's `nc` is all of it on BERT-base's shapes):
/// each block of L streams all of it from L3, which the host's other tenants share. Only the
/// FFN input's weight gradient packs an R this big (`gᵀ·x`, each thread's 1536 columns of `g`
/// at depth 1024: 6 MiB, now two blocks of 3): 379–407 -> 440–460 GFLOP/s in cache
/// (`cargo bench --bench gemm_shapes -- base 2`, alternating runs); 2 MiB blocks ran the
/// same, 1.5 MiB and 0.75 MiB slower (425–431, 412–415). In-process (switch flipped every
/// other step), BERT-base distillation −12.4 ± 2.9 ms (25 pairs, 21 won; backward −12.3 ±
/// 1.9), MLM training −8.7 ± 4.7 (20 pairs).
const R_BLOCK_BYTES: usize = 3 << 20;

/// The packed panels' alignment in bytes (gemm's own): a register load never straddles two
/// cache lines. Unaligned panels cost ~10% on every shape.
const ALIGN: usize = 128;

/// `len` floats of `buf`, starting at an [`ALIGN`]-byte boundary (grown as needed).
fn aligned(buf: &mut Vec<f32>, len: usize) -> *mut f32 {
    let pad = ALIGN / 4;
    if buf.len() < len + pad {
        buf.resize(len + pad, 0.0);
    }
    let ptr = buf.as_mut_ptr();
    ptr.wrapping_add(ptr.align_offset(ALIGN))
}

/// A strided matrix by raw pointer: element `(i, j)` at `data + i·rs + j·cs`.
#[derive(Clone, Copy)]
struct Operand {
    data: *const f32,
    rs: usize,
    cs: usize,
}

impl Operand {
    fn at(&self, i: usize, j: usize) -> *const f32 {
        self.data.wrapping_add(i * self.rs + j * self.cs)
    }

    /// The same matrix from element `(i, j)` on.
    fn shifted(self, i: usize, j: usize) -> Self {
        Operand {
            data: self.at(i, j),
            ..self
        }
    }
}

/// Packs `mb × kb` of L (element `(i, p)` at `l.at(i, p)`) into panels of MR rows: panel `t`
/// holds rows `t·MR..` as `kb` groups of MR values (`dst[t·MR·kb + p·MR + i]`), rows past `mb`
/// zero.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_l_block(dst: *mut f32, l: Operand, mb: usize, kb: usize) {
    for t in 0..mb.div_ceil(MR) {
        let rows = MR.min(mb - t * MR);
        let panel = dst.add(t * MR * kb);
        let src = Operand {
            data: l.at(t * MR, 0),
            ..l
        };
        if src.rs == 1 && rows == MR {
            // Columns of L contiguous: a copy per depth (four registers, inline: a call to
            // memcpy per 256 bytes cost more than the copy).
            for p in 0..kb {
                let v = (src.at(0, p) as *const [f32; MR]).read_unaligned();
                (panel.add(p * MR) as *mut [f32; MR]).write(v);
            }
        } else if src.cs == 1 {
            // Rows of L contiguous (W in x·Wᵀ, k in q·kᵀ): 16×16 register transposes, of
            // rows copied out first where they fit (see [`ROWS_COPY`]).
            for g in 0..MR / LANES {
                let live = rows.saturating_sub(g * LANES).min(LANES);
                let rows16 = src.shifted(g * LANES, 0);
                if kb * LANES <= ROWS_COPY {
                    ROWS_BUF.with(|b| {
                        let buf = aligned(&mut b.borrow_mut(), LANES * kb);
                        for i in 0..live {
                            std::ptr::copy_nonoverlapping(rows16.at(i, 0), buf.add(i * kb), kb);
                        }
                        transposes(buf, kb, live, kb, panel.add(g * LANES));
                    });
                } else {
                    transposes(rows16.data, src.rs, live, kb, panel.add(g * LANES));
                }
            }
        } else {
            // A partial last panel, or other strides.
            for p in 0..kb {
                for i in 0..MR {
                    *panel.add(p * MR + i) = if i < rows { *src.at(i, p) } else { 0.0 };
                }
            }
        }
    }
}

/// The `live × kb` rows at `src` (row stride `rs`, rows contiguous) into the 16 lanes of an L
/// panel's depths at `dst` (MR floats a depth), 16 depths at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transposes(src: *const f32, rs: usize, live: usize, kb: usize, dst: *mut f32) {
    let mut p0 = 0;
    while p0 < kb {
        let depth = LANES.min(kb - p0);
        transpose16(
            src.add(p0),
            rs,
            live,
            depth,
            dst.add(p0 * MR),
            MR,
            (LANES, None),
        );
        p0 += LANES;
    }
}

/// Packs `kb × nb` of R (element `(p, j)` at `r.at(p, j)`) into panels of NR columns: panel `u`
/// holds columns `u·NR..` as `kb` groups of NR values (`dst[u·NR·kb + p·NR + j]`), columns past
/// `nb` zero. With `sums`, adds column `j`'s `kb` values to `sums[j]` (in order of depth).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_r_block(dst: *mut f32, r: Operand, kb: usize, nb: usize, sums: Option<*mut f32>) {
    let panels = nb.div_ceil(NR);
    if r.cs == 1 {
        // Rows of R contiguous (gᵀ in the weight gradient gᵀ·x): a block of 16 depths at a
        // time, so that both the rows read and the panels written stay in cache.
        let mut p0 = 0;
        while p0 < kb {
            let depth = 16.min(kb - p0);
            if let Some(s) = sums {
                add_rows(s, r, p0, depth, nb);
            }
            for u in 0..panels {
                let cols = NR.min(nb - u * NR);
                let panel = dst.add(u * NR * kb);
                for p in p0..p0 + depth {
                    let d = panel.add(p * NR);
                    if cols == NR {
                        let v = (r.at(p, u * NR) as *const [f32; NR]).read_unaligned();
                        (d as *mut [f32; NR]).write_unaligned(v);
                    } else {
                        for j in 0..NR {
                            *d.add(j) = if j < cols { *r.at(p, u * NR + j) } else { 0.0 };
                        }
                    }
                }
            }
            p0 += depth;
        }
    } else {
        for u in 0..panels {
            let cols = NR.min(nb - u * NR);
            let panel = dst.add(u * NR * kb);
            for j in 0..NR {
                let mut total = 0f32;
                for p in 0..kb {
                    let v = if j < cols { *r.at(p, u * NR + j) } else { 0.0 };
                    *panel.add(p * NR + j) = v;
                    total += v;
                }
                if let (Some(s), true) = (sums, j < cols) {
                    *s.add(u * NR + j) += total;
                }
            }
        }
    }
}

/// `sums[j] += r(p, j)` for the `depth` rows of R from `p0` (rows contiguous, `r.cs == 1`) and
/// columns `0..nb`, in order of depth, sixteen columns to a register. The packing's panels
/// are six columns wide; summing them there (a six-lane masked load and store a depth, 24
/// bytes at a time; why that is slow was not pinned down: masked stores alone measured no
/// slower in an L1 loop) made the weight gradients slower on a Zen 5 EPYC: this
/// pass over the same rows (in L1 as the packing reads them) took BERT-base MLM training's
/// backward −42.9 ± 9.8 ms and distillation's −17.3 ± 5.6 and −11.2 ± 4.6 (in-process, 15,
/// 15 and 20 pairs).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn add_rows(sums: *mut f32, r: Operand, p0: usize, depth: usize, nb: usize) {
    use super::math::avx512::lanes;
    use std::arch::x86_64::*;
    debug_assert_eq!(r.cs, 1);
    let mut j = 0;
    while j < nb {
        let m = lanes(nb - j);
        let mut acc = _mm512_maskz_loadu_ps(m, sums.add(j));
        for p in p0..p0 + depth {
            acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(m, r.at(p, j)));
        }
        _mm512_mask_storeu_ps(sums.add(j), m, acc);
        j += LANES;
    }
}

/// Transposes the `live × depth` block at `src` (row stride `rs`, rows contiguous) into
/// `depth` rows at `dst` (row stride `drs`): `dst[q·drs + i] = src[i·rs + q] [+ bias[i]]`,
/// with rows `i ≥ live` read as zero, each destination row written in its first `keep`
/// lanes (of 16) only, `bias` (when given) read for those lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(
    src: *const f32,
    rs: usize,
    live: usize,
    depth: usize,
    dst: *mut f32,
    drs: usize,
    (keep, bias): (usize, Option<*const f32>),
) {
    use std::arch::x86_64::*;
    let kept = super::math::avx512::lanes(keep);
    let add = bias.map(|b| _mm512_maskz_loadu_ps(kept, b));
    let mask = super::math::avx512::lanes(depth);
    let mut r = [_mm512_setzero_ps(); 16];
    for (i, row) in r.iter_mut().enumerate().take(live) {
        *row = _mm512_maskz_loadu_ps(mask, src.add(i * rs));
    }
    // Pairs of rows interleaved within 128-bit lanes, then pairs of pairs: u[4g + q] holds, in
    // lane l, column 4l + q of rows 4g..4g + 4.
    let mut t = [_mm512_setzero_ps(); 16];
    for g in 0..8 {
        t[2 * g] = _mm512_unpacklo_ps(r[2 * g], r[2 * g + 1]);
        t[2 * g + 1] = _mm512_unpackhi_ps(r[2 * g], r[2 * g + 1]);
    }
    let mut u = [_mm512_setzero_ps(); 16];
    for g in 0..4 {
        let (a0, a1) = (_mm512_castps_pd(t[4 * g]), _mm512_castps_pd(t[4 * g + 2]));
        let (b0, b1) = (
            _mm512_castps_pd(t[4 * g + 1]),
            _mm512_castps_pd(t[4 * g + 3]),
        );
        u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, a1));
        u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, a1));
        u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b0, b1));
        u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b0, b1));
    }
    // Lanes gathered across the four groups: column 4l + q is lane l of u[q], u[4 + q],
    // u[8 + q], u[12 + q].
    for q in 0..4 {
        let v0 = _mm512_shuffle_f32x4::<0x88>(u[q], u[4 + q]);
        let v1 = _mm512_shuffle_f32x4::<0xdd>(u[q], u[4 + q]);
        let w0 = _mm512_shuffle_f32x4::<0x88>(u[8 + q], u[12 + q]);
        let w1 = _mm512_shuffle_f32x4::<0xdd>(u[8 + q], u[12 + q]);
        let cols = [
            (q, _mm512_shuffle_f32x4::<0x88>(v0, w0)),
            (4 + q, _mm512_shuffle_f32x4::<0x88>(v1, w1)),
            (8 + q, _mm512_shuffle_f32x4::<0xdd>(v0, w0)),
            (12 + q, _mm512_shuffle_f32x4::<0xdd>(v1, w1)),
        ];
        for (c, v) in cols {
            if c < depth {
                let v = match add {
                    Some(b) => _mm512_add_ps(v, b),
                    None => v,
                };
                _mm512_mask_storeu_ps(dst.add(c * drs), kept, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::gemm::testing::{assert_block, filled, naive};
    use super::*;

    #[test]
    fn every_layout_and_edge_matches_a_plain_product() {
        if !available() {
            eprintln!("no AVX-512 here: packed::gemm is not used, nothing to test");
            return;
        }
        // Sizes off every block edge (16-lane groups, MR, NR, a depth past kc = 512 in one
        // block of a narrowed L, 2600 in one block or two as the L2 allows, one past
        // ONE_BLOCK in gemm's blocks) in the four layouts,
        // into a column block of a wider destination, overwriting then adding.
        let shapes = [
            (13, 37, 70),
            (100, 600, 129),
            (64, 64, 64),
            (150, 1030, 77),
            (20, 700, 400),
            (20, 1030, 400),
            (9, 2600, 70),
            (9, 3100, 130),
            (1600, 1030, 20),
        ];
        for &(m, k, n) in &shapes {
            let rs = n + 5;
            let a = filled(m * k, 7, 13);
            let w = filled(n * k, 5, 11);
            let layouts = [
                (Mat::rm(&a, m, k), Mat::rm(&w, n, k).t()),
                (Mat::rm(&a, m, k), Mat::rm(&w, k, n)),
                (Mat::rm(&a, k, m).t(), Mat::rm(&w, k, n)),
                (Mat::rm(&a, k, m).t(), Mat::rm(&w, n, k).t()),
            ];
            for (am, bm) in layouts {
                let want = naive(am, bm);
                let mut dst = vec![7f32; (m - 1) * rs + n + 3];
                for (acc, factor) in [(Acc::Overwrite, 0.5), (Acc::Add, 1.0)] {
                    // Safety: AVX-512 checked above; dst holds the block.
                    unsafe {
                        gemm(
                            dst[3..].as_mut_ptr(),
                            rs,
                            am,
                            bm,
                            acc,
                            0.5,
                            None,
                            None,
                            None,
                        )
                    };
                    let want = |i, j| factor * want[i * n + j];
                    let tol = |w: f64| 1e-3 * (1.0 + w.abs());
                    let what = format!("{m}x{k}x{n} ({acc:?})");
                    assert_block(&dst[3..], rs, (m, n), want, tol, &what);
                }
                assert_eq!(&dst[..3], &[7.0; 3]);
                // With the row sums of a (added up while a is packed as R, in blocks of 16
                // depths, full and partial panels of NR), the product unchanged.
                let mut sums = vec![f32::NAN; m + 1];
                // Safety: as above; sums holds m values.
                unsafe {
                    let (d, s) = (dst[3..].as_mut_ptr(), sums.as_mut_ptr());
                    gemm(d, rs, am, bm, Acc::Overwrite, 1.0, None, Some(s), None)
                };
                let tol = |w: f64| 1e-3 * (1.0 + w.abs());
                let what = format!("{m}x{k}x{n} with sums");
                assert_block(&dst[3..], rs, (m, n), |i, j| want[i * n + j], tol, &what);
                for (i, &got) in sums[..m].iter().enumerate() {
                    let want: f64 = (0..k).map(|p| am.data[i * am.rs + p * am.cs] as f64).sum();
                    assert!((got as f64 - want).abs() < tol(want), "{what}: sum {i}");
                }
                assert!(sums[m].is_nan(), "{what}: wrote past the sums");
            }
        }
    }

    #[test]
    fn products_from_stored_panels_match_a_plain_product() {
        if !available() {
            eprintln!("no AVX-512 here: no panels are made, nothing to test");
            return;
        }
        // b stored both ways, depths within one block, in two of our blocks and past
        // ONE_BLOCK (gemm's blocks: a block of the panels starting mid-depth), a partial last
        // panel; unthreaded here, and through gemm's split over 2 threads: 768 columns (blocks
        // of 384, each starting a panel) and 1100 (blocks of 560: the second starts mid-panel
        // and packs b itself).
        for &(m, k, n) in &[
            (30, 70, 130),
            (20, 3100, 200),
            (20, 2600, 130),
            (40, 300, 768),
            (40, 300, 1100),
        ] {
            let a = filled(m * k, 7, 13);
            let w = filled(n * k, 5, 11);
            for bm in [Mat::rm(&w, n, k).t(), Mat::rm(&w, k, n)] {
                let am = Mat::rm(&a, m, k);
                let want = naive(am, bm);
                let panels = pack_panels(bm);
                assert_eq!(panels.len(), panels_len(k, n));
                let bp = bm.with_panels(&panels);
                let tol = |w: f64| 1e-3 * (1.0 + w.abs());
                let mut dst = vec![7f32; m * n];
                // Safety: AVX-512 checked above; dst holds the product.
                unsafe {
                    gemm(
                        dst.as_mut_ptr(),
                        n,
                        am,
                        bp,
                        Acc::Overwrite,
                        1.0,
                        None,
                        None,
                        None,
                    )
                };
                let what = format!("{m}x{k}x{n} from panels");
                assert_block(&dst, n, (m, n), |i, j| want[i * n + j], tol, &what);
                let mut dst = vec![7f32; m * n];
                super::super::gemm::gemm(&mut dst, n, am, bp, Acc::Overwrite, 1.0, 2);
                let what = format!("{m}x{k}x{n} from panels, 2 threads");
                assert_block(&dst, n, (m, n), |i, j| want[i * n + j], tol, &what);
            }
        }
        // The panels, not b's data, are what the product reads: zero panels, a zero product.
        let (m, k, n) = (20, 100, 128);
        let (a, w, zeros) = (
            filled(m * k, 7, 13),
            filled(k * n, 5, 11),
            vec![0f32; 128 * 100],
        );
        let mut dst = vec![7f32; m * n];
        let bm = Mat::rm(&w, k, n).with_panels(&zeros);
        // Safety: as above.
        unsafe {
            gemm(
                dst.as_mut_ptr(),
                n,
                Mat::rm(&a, m, k),
                bm,
                Acc::Overwrite,
                1.0,
                None,
                None,
                None,
            )
        };
        assert!(
            dst.iter().all(|&v| v == 0.0),
            "the product did not read the panels"
        );
        assert!(panels_from(&[0.0; 640], 32, 5).is_none());
        assert_eq!(panels_from(&[0.0; 640], 64, 5).map(|p| p.len()), Some(320));
    }

    #[test]
    fn narrowed_blocks_are_even_multiples_of_mr() {
        const MIB: usize = 1 << 20;
        assert_eq!(narrowed(256, 1000, 768, MIB, MR), 256);
        // 1152 rows at depth 768: 4 blocks of 320 (the last 192).
        assert_eq!(narrowed(512, 1152, 768, MIB, MR), 320);
        assert_eq!(narrowed(512, 1536, 768, MIB, MR), 320);
        // 384 rows: 2 blocks of 192 rather than 320 + 64.
        assert_eq!(narrowed(512, 384, 768, MIB, MR), 192);
        // Deeper, narrower: 256 rows at 1024, one panel at 3072 (and at any greater depth).
        assert_eq!(narrowed(512, 768, 1024, MIB, MR), 256);
        assert_eq!(narrowed(384, 384, 3072, MIB, MR), 64);
        assert_eq!(narrowed(384, 384, 9000, MIB, MR), 64);
        // Half the budget, half the rows.
        assert_eq!(narrowed(512, 1536, 768, MIB / 2, MR), 128);
        for budget in [MIB / 4, MIB / 2, MIB] {
            for k in [768, 1024, 1536, 3072] {
                for m in [65, 321, 700, 1152, 3072] {
                    let mc = narrowed(512, m, k, budget, MR);
                    assert!(
                        mc.is_multiple_of(MR)
                            && (mc * k * 4 <= budget || mc == MR)
                            && mc * m.div_ceil(mc) >= m,
                        "{m} at {k} within {budget}: {mc}"
                    );
                }
            }
        }
    }

    #[test]
    fn blocks_of_depth_fit_the_budget() {
        const MIB: usize = 1 << 20;
        // gemm's (kc, mc) as it picks them for these depths: 384 at 768, 512 deeper.
        // 1 MiB (a 2 MB L2): every depth up to 3072 in one block.
        assert_eq!(blocking((384, 512), 3072, 768, MIB), (768, 320));
        assert_eq!(blocking((512, 512), 768, 1024, MIB), (1024, 256));
        assert_eq!(blocking((512, 512), 768, 3072, MIB), (3072, 64));
        // 512 KiB (a 1 MB L2): one panel may be 2048 deep, so 3072 is two blocks of 1536.
        assert_eq!(blocking((384, 512), 3072, 768, MIB / 2), (768, 128));
        assert_eq!(blocking((512, 512), 768, 3072, MIB / 2), (1536, 64));
        assert_eq!(blocking((512, 512), 768, 2000, MIB / 2), (2000, 64));
        // Past ONE_BLOCK, or shallower than gemm's own block: gemm's blocking.
        assert_eq!(blocking((512, 512), 768, 3100, MIB), (512, 512));
        assert_eq!(blocking((300, 512), 768, 300, MIB / 2), (300, 512));
        let budget = l_block_bytes();
        assert!((256 << 10..=MIB).contains(&budget), "{budget}");
    }
}
