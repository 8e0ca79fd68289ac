//! A checked, strided view of `gemm::gemm` (the crate candle's CPU matmul uses, with its
//! AVX-512 kernels enabled in Cargo.toml) so kernels can multiply transposed operands and
//! write into column blocks of a larger matrix without copies.

use gemm::Parallelism;

/// A matrix inside a slice: element `(i, j)` is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
    /// For a right operand, its transpose already packed as [`super::packed`] packs it
    /// ([`super::packed::pack_panels`]: a frozen weight, packed once): the AVX-512 product
    /// reads it in place instead of packing `data`, which every other path reads.
    pub panels: Option<&'a [f32]>,
}

impl<'a> Mat<'a> {
    /// Row-major `rows × cols`.
    pub fn rm(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
            panels: None,
        }
    }

    /// The same matrix with its transpose's packed panels (see [`Mat::panels`]).
    pub fn with_panels(self, panels: &'a [f32]) -> Self {
        Mat {
            panels: Some(panels),
            ..self
        }
    }

    /// The transpose (a view: strides swapped).
    pub fn t(self) -> Self {
        Mat {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            panels: None,
        }
    }

    pub(crate) fn check(&self) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.rs + (self.cols - 1) * self.cs;
            assert!(last < self.data.len(), "gemm operand out of bounds");
        }
    }
}

/// How the destination is combined: `dst = a·b · scale` or `dst += a·b · scale`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acc {
    Overwrite,
    Add,
}

/// `dst (m × n, row stride dst_rs, column stride 1) = [dst +] scale · a · b`.
///
/// `threads > 1` lets gemm split the product over the rayon pool; kernels that already run
/// many small products in parallel pass 1.
#[allow(clippy::too_many_arguments)]
pub fn gemm(dst: &mut [f32], dst_rs: usize, a: Mat, b: Mat, acc: Acc, scale: f32, threads: usize) {
    let (m, n) = checked(dst, dst_rs, &a, &b);
    unsafe { gemm_raw(dst.as_mut_ptr(), dst_rs, m, n, a, b, acc, scale, threads) }
}

/// Panics unless `a · b` is defined and fits `dst` with rows `dst_rs` apart; its size.
fn checked(dst: &[f32], dst_rs: usize, a: &Mat, b: &Mat) -> (usize, usize) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "gemm: inner dimensions differ");
    a.check();
    b.check();
    if m > 0 && n > 0 {
        assert!(
            (m - 1) * dst_rs + n <= dst.len(),
            "gemm destination out of bounds"
        );
    }
    (m, n)
}

/// What runs on each finished piece of a product's destination while it is still in cache:
/// `(row, col0, values)`, `values` being row `row`'s columns `col0..col0 + values.len()`.
/// Each element is in exactly one piece; pieces may run on any thread, in any order.
pub type Then<'a> = &'a (dyn Fn(usize, usize, &mut [f32]) + Sync);

/// `dst (m × n, row stride dst_rs) = a · b`, then `then` on every piece of it: inside the
/// product (on the few rows each microkernel pass has just written, still in L1) where
/// `packed` runs it, else in a parallel pass over the rows after it.
pub fn gemm_then(dst: &mut [f32], dst_rs: usize, a: Mat, b: Mat, threads: usize, then: Then) {
    let (m, n) = checked(dst, dst_rs, &a, &b);
    // Safety: bounds checked above; `dst` is borrowed mutably for the call.
    unsafe {
        product(
            dst.as_mut_ptr(),
            dst_rs,
            (m, n),
            a,
            b,
            (Acc::Overwrite, 1.0, Some(then), None),
            threads,
            None,
        )
    }
}

/// Whether `a · b` runs as [`transposed`] (the MLM decoder's `x·Eᵀ`): the products whose
/// `then` is a pass over the whole result after it, and which [`gemm_bias`] takes.
pub fn stores_transposed(a: &Mat, b: &Mat, threads: usize) -> bool {
    threads > 1 && a.cols > 0 && super::packed::transposed_suits(a, b)
}

/// `dst (m × n, row stride dst_rs) = a · b + bias` (`bias[j]` added to column `j`) for a
/// product [`stores_transposed`] takes: the bias added to each strip of columns as it is stored,
/// rather than in a pass over the whole result after it (a `then`). Panics for others.
pub fn gemm_bias(dst: &mut [f32], dst_rs: usize, a: Mat, b: Mat, bias: &[f32], threads: usize) {
    let (m, n) = checked(dst, dst_rs, &a, &b);
    assert_eq!(
        bias.len(),
        n,
        "gemm_bias: a bias for each of the {n} columns"
    );
    assert!(
        stores_transposed(&a, &b, threads),
        "gemm_bias: not a transposed-store product"
    );
    // Safety: bounds checked above; `dst` is borrowed mutably for the call.
    unsafe {
        let extras = (Acc::Overwrite, 1.0, Some(bias));
        transposed(dst.as_mut_ptr(), dst_rs, (m, n), a, b, extras, threads)
    };
}

/// One product, `dst (m × n, row stride dst_rs) = [dst +] a · b`, with optionally a [`Then`]
/// on its pieces (as [`gemm_then`]) and the row sums of `a`: run alone ([`Job::run`]) or
/// beside another ([`gemm_both`]).
pub struct Job<'a> {
    dst: &'a mut [f32],
    dst_rs: usize,
    a: Mat<'a>,
    b: Mat<'a>,
    acc: Acc,
    then: Option<Then<'a>>,
    sums: Option<&'a mut [f32]>,
}

impl<'a> Job<'a> {
    /// `dst = a · b`; panics as [`gemm`] does when the shapes do not fit.
    pub fn new(dst: &'a mut [f32], dst_rs: usize, a: Mat<'a>, b: Mat<'a>) -> Self {
        checked(dst, dst_rs, &a, &b);
        Job {
            dst,
            dst_rs,
            a,
            b,
            acc: Acc::Overwrite,
            then: None,
            sums: None,
        }
    }

    /// `dst += a · b` with [`Acc::Add`].
    pub fn acc(self, acc: Acc) -> Self {
        Job { acc, ..self }
    }

    /// `then` on each finished piece (with [`Acc::Overwrite`] only: checked when the product
    /// runs, whatever order the two were set in).
    pub fn then(self, then: Option<Then<'a>>) -> Self {
        Job { then, ..self }
    }

    /// Also `sums[i] = Σ_k a[i][k]` (the m row sums of `a`): for a weight gradient `gᵀ·x`
    /// its bias gradient, added up where the product packs `gᵀ` anyway (`packed`) rather
    /// than in a pass of their own over `g` (BERT-base distillation: 9 ms of a step's
    /// backward).
    pub fn row_sums(self, sums: &'a mut [f32]) -> Self {
        let m = self.a.rows;
        assert!(sums.len() >= m, "gemm: {} sums for {m} rows", sums.len());
        Job {
            sums: Some(sums),
            ..self
        }
    }

    /// Whether this product, on one thread, goes through our packing.
    fn packed(&self) -> bool {
        let (m, n) = (self.a.rows, self.b.cols);
        m > 0 && n > 0 && self.a.cols > 0 && super::packed::suits(&self.a, &self.b)
    }

    /// Runs the product on `threads` threads.
    pub fn run(self, threads: usize) {
        self.run_in(threads, None)
    }

    /// Runs the product on `threads` threads, or as task `pair.1` of a pair.
    fn run_in(self, threads: usize, pair: Option<(&super::packed::Pair, usize)>) {
        assert!(
            self.then.is_none() || self.acc == Acc::Overwrite,
            "gemm: a then with Acc::Add"
        );
        let (m, n) = (self.a.rows, self.b.cols);
        let sums = self.sums.map(super::SharedMut::new);
        // Safety: `checked` in `new`; `dst` and `sums` are borrowed mutably for the call.
        unsafe {
            product(
                self.dst.as_mut_ptr(),
                self.dst_rs,
                (m, n),
                self.a,
                self.b,
                (self.acc, 1.0, self.then, sums),
                threads,
                pair,
            )
        }
    }
}

/// Two independent products (a linear's backward: `dx = g·W` and `dW = gᵀ·x`). On two
/// threads, where our packing takes both, each runs whole on a thread of its own, the two
/// balancing each other strip by strip at the end ([`super::packed::Pair`]): each thread then
/// packs its product's operands once, where each product split in two packs one of its
/// operands on both threads (x for the weight gradient, g for dx). Otherwise one after the
/// other, each on all `threads`.
pub fn gemm_both(first: Job, second: Job, threads: usize) {
    if threads == 2 && first.packed() && second.packed() {
        let pair = super::packed::Pair::default();
        rayon::join(
            || first.run_in(1, Some((&pair, 0))),
            || second.run_in(1, Some((&pair, 1))),
        );
    } else {
        first.run(threads);
        second.run(threads);
    }
}

/// As [`gemm`] into a destination that parallel tasks share (each writes its own block).
///
/// # Safety
/// `dst` must be valid for `(m - 1) * dst_rs + n` elements and no other task may write the
/// same elements concurrently.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_raw(
    dst: *mut f32,
    dst_rs: usize,
    m: usize,
    n: usize,
    a: Mat,
    b: Mat,
    acc: Acc,
    scale: f32,
    threads: usize,
) {
    product(
        dst,
        dst_rs,
        (m, n),
        a,
        b,
        (acc, scale, None, None),
        threads,
        None,
    )
}

/// How a product's result is combined, and the extra work it does: `(acc, scale, then,
/// sums)`, `sums` (m elements) for the row sums of `a` ([`Job::row_sums`]).
type Extras<'a> = (Acc, f32, Option<Then<'a>>, Option<super::SharedMut>);

/// [`gemm_raw`] with an optional [`Then`] and row sums. With `pair`, this (unthreaded)
/// product is one of the two tasks of a split one, and shares its strips with the other where
/// our packing runs it ([`super::packed::Pair`]).
#[allow(clippy::too_many_arguments)]
unsafe fn product(
    dst: *mut f32,
    dst_rs: usize,
    (m, n): (usize, usize),
    a: Mat,
    b: Mat,
    (acc, scale, then, sums): Extras,
    threads: usize,
    pair: Option<(&super::packed::Pair, usize)>,
) {
    let k = a.cols;
    debug_assert_eq!(a.rows, m);
    debug_assert_eq!(b.cols, n);
    a.check();
    b.check();
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if acc == Acc::Overwrite {
            for i in 0..m {
                std::slice::from_raw_parts_mut(dst.add(i * dst_rs), n).fill(0.0);
            }
        }
        rows_then(dst, dst_rs, m, n, then);
        row_sums(&a, sums);
        return;
    }
    if stores_transposed(&a, &b, threads) {
        transposed(dst, dst_rs, (m, n), a, b, (acc, scale, None), threads);
        rows_then(dst, dst_rs, m, n, then);
        row_sums(&a, sums);
        return;
    }
    // A transposed view of A (the weight gradient's gᵀ in gᵀ·x) is the operand gemm packs
    // in full for each task: with many more rows than columns (the MLM decoder's weight
    // gradient, 30522×154×768), a split by rows packs half of it per thread instead of all
    // of it twice: 235 -> 292, 285 -> 306, 219 -> 264 GFLOP/s in three alternating runs of
    // `gemm_shapes` ("decoder dW"). The FFN input's (3072×1024×768) gained nothing so.
    // The square weight gradients (the attention's four, 768×1024×768) split by rows too:
    // each thread then packs all of x (a copy of 256-byte runs) but half of g (six-column
    // panels, the costlier packing) rather than the other way round: 407–417 -> 425–436
    // GFLOP/s in cache (`gemm_shapes`, alternating), in-process BERT-base MLM training
    // −14.5 ± 2.5 ms (20 pairs, 18 won; backward −11.1 ± 1.4) and −8.7 ± 4.6, distillation
    // −6.4 ± 4.2 (25 pairs, 19 won).
    let how = if threads > 1 && a.cs != 1 && m >= n && m >= SPLIT_N_MIN * threads {
        Some(Split::Rows(m.div_ceil(threads).next_multiple_of(16)))
    } else if threads > 1 && n >= SPLIT_N_MIN * threads {
        // One block of columns per thread, each an unthreaded product: each thread then
        // packs only its share of B (W, in the forward's x·Wᵀ and the backward's g·W) and
        // keeps it in its own cache, where gemm's own split shares the packing. B stored
        // transposed: 309 -> 397 GFLOP/s on BERT-base's FFN output (1024×3072×768), 335 ->
        // 380 on the attention projections (`SPLIT=n cargo bench --bench gemm_shapes --
        // base 2`). B row-major: the MLM decoder's g·W (154×30522×768) 240-255 -> 317-327,
        // the FFN's dx within noise; the whole BERT-base distillation step's backward
        // 0.709 -> 0.692 s (mean of six alternating runs of `encoder_step`).
        Some(Split::Columns(n.div_ceil(threads).next_multiple_of(16)))
    } else {
        None
    };
    if let Some(how) = how {
        split(dst, dst_rs, (m, n), a, b, (acc, scale, then, sums), how);
        return;
    }
    if threads <= 1 && super::packed::suits(&a, &b) {
        let sums = sums.map(|s| s.at(0));
        super::packed::gemm(dst, dst_rs, a, b, acc, scale, then, sums, pair);
        return;
    }
    let parallelism = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    crate_gemm(dst, dst_rs, a, b, acc, scale, parallelism);
    rows_then(dst, dst_rs, m, n, then);
    row_sums(&a, sums);
}

/// `sums[i] = Σ_k a[i][k]` when asked for (the products the gemm crate runs): for a
/// transposed view (`gᵀ`, the weight gradient's) the column sums of `g`, read along its rows
/// in parallel.
///
/// # Safety
/// `sums` must be valid for `a.rows` elements that no one else writes meanwhile.
unsafe fn row_sums(a: &Mat, sums: Option<super::SharedMut>) {
    let Some(s) = sums else { return };
    let out = std::slice::from_raw_parts_mut(s.at(0), a.rows);
    if a.rs == 1 && a.cols > 0 {
        out.copy_from_slice(&super::column_sums_rs(a.data, a.cols, a.rows, a.cs));
    } else {
        for (i, o) in out.iter_mut().enumerate() {
            *o = (0..a.cols).map(|k| a.data[i * a.rs + k * a.cs]).sum();
        }
    }
}

/// How [`split`] cuts a product into unthreaded ones: blocks of this many rows or columns.
#[derive(Clone, Copy)]
enum Split {
    Rows(usize),
    Columns(usize),
}

/// [`product`] as one unthreaded product per block of rows or columns, in parallel (each
/// block's `then` told its place in the whole).
///
/// # Safety
/// As [`gemm_raw`]'s destination.
unsafe fn split(
    dst: *mut f32,
    dst_rs: usize,
    (m, n): (usize, usize),
    a: Mat,
    b: Mat,
    (acc, scale, then, sums): Extras,
    how: Split,
) {
    let (len, block) = match how {
        Split::Rows(mb) => (m, mb),
        Split::Columns(nb) => (n, nb),
    };
    let d = super::SharedMut(dst);
    let tasks = len.div_ceil(block);
    // Two tasks (one a thread) through our packing balance each other (`packed::Pair`).
    let pair = (tasks == 2).then(super::packed::Pair::default);
    rayon::prelude::ParallelIterator::for_each(
        rayon::prelude::IntoParallelIterator::into_par_iter(0..tasks),
        |t| {
            let (lo, hi) = (t * block, ((t + 1) * block).min(len));
            let (at, bt, offset, (r0, c0)) = match how {
                Split::Rows(_) => {
                    let at = Mat {
                        data: &a.data[lo * a.rs..],
                        rows: hi - lo,
                        ..a
                    };
                    (at, b, lo * dst_rs, (lo, 0))
                }
                Split::Columns(_) => {
                    let bt = Mat {
                        data: &b.data[lo * b.cs..],
                        cols: hi - lo,
                        panels: b
                            .panels
                            .and_then(|p| super::packed::panels_from(p, lo, b.rows)),
                        ..b
                    };
                    (a, bt, lo, (0, lo))
                }
            };
            let then = then.map(|f| move |r: usize, c: usize, v: &mut [f32]| f(r + r0, c + c0, v));
            let then = then.as_ref().map(|f| f as Then);
            let size = (at.rows, bt.cols);
            // The row sums of a: each block of rows its own; with a block of columns every
            // task sees all of a, and the first alone adds them up.
            let sums = match how {
                Split::Rows(_) => sums.map(|s| s.offset(lo)),
                Split::Columns(_) => sums.filter(|_| t == 0),
            };
            // Safety: each task writes its own block of `dst` and of `sums`. (Should only
            // one of a pair go through our packing, it finds the other never started
            // sharing and helps no one.)
            product(
                d.at(offset),
                dst_rs,
                size,
                at,
                bt,
                (acc, scale, then, sums),
                1,
                pair.as_ref().map(|p| (p, t)),
            )
        },
    );
}

/// [`product`] of few rows and many columns, `b` contiguous along its depth (`x · Eᵀ`, the
/// MLM decoder's logits for the masked rows): computed as `(bᵀ · aᵀ)ᵀ`, each thread a block of
/// `b`'s columns (E's rows) read in place by the microkernel and stored transposed, `a` the
/// packed operand ([`super::packed::gemm_transposed`]). The usual way packs all of E (a
/// transpose of 94 MB, BERT-base) for 154 rows of `a`. BERT-base distillation, in-process (20
/// pairs): the student's head −1.5 ± 0.2 ms (won 19), the teacher's forward −2.0 ± 1.7; each
/// thread's half 19.9 → 19.0 ms (`gemm_shapes` "decoder fwd" 360 → 375 GFLOP/s). Less than
/// the packing cost because the microkernel stored a transposed tile element by element (6%
/// in a probe; now through a scratch block, see `packed::Pass::strip_through_scratch`) and
/// the last 25 of 153 rows run its 32-row kernel.
///
/// # Safety
/// As [`gemm_raw`]'s destination.
unsafe fn transposed(
    dst: *mut f32,
    dst_rs: usize,
    (m, n): (usize, usize),
    a: Mat,
    b: Mat,
    (acc, scale, bias): (Acc, f32, Option<&[f32]>),
    threads: usize,
) {
    debug_assert_eq!(m, a.rows);
    let block = n.div_ceil(threads).next_multiple_of(16);
    let d = super::SharedMut(dst);
    let tasks = n.div_ceil(block);
    // Two tasks balance each other as `split`'s do.
    let pair = (tasks == 2).then(super::packed::Pair::default);
    rayon::prelude::ParallelIterator::for_each(
        rayon::prelude::IntoParallelIterator::into_par_iter(0..tasks),
        |t| {
            let (lo, hi) = (t * block, ((t + 1) * block).min(n));
            // Rows lo..hi of bᵀ (b's columns), times aᵀ.
            let bt = Mat {
                data: &b.data[lo * b.cs..],
                rows: hi - lo,
                cols: b.rows,
                rs: b.cs,
                cs: b.rs,
                panels: None,
            };
            // Safety: task t writes only columns lo..hi of dst.
            let pair = pair.as_ref().map(|p| (p, t));
            let bias = bias.map(|b| &b[lo..hi]);
            super::packed::gemm_transposed(d.at(lo), dst_rs, bt, a.t(), (acc, scale), bias, pair)
        },
    );
}

/// `dst (a.rows × b.cols, row stride dst_rs) = [dst +] scale · a · b` by the gemm crate alone
/// (its packing, its threading as `parallelism` says).
///
/// # Safety
/// As [`gemm_raw`]'s destination.
pub unsafe fn crate_gemm(
    dst: *mut f32,
    dst_rs: usize,
    a: Mat,
    b: Mat,
    acc: Acc,
    scale: f32,
    parallelism: Parallelism,
) {
    // gemm computes dst = alpha·dst + beta·(lhs·rhs), reading dst only when asked to.
    gemm::gemm(
        a.rows,
        b.cols,
        a.cols,
        dst,
        1,
        dst_rs as isize,
        acc == Acc::Add,
        a.data.as_ptr(),
        a.cs as isize,
        a.rs as isize,
        b.data.as_ptr(),
        b.cs as isize,
        b.rs as isize,
        1.0,
        scale,
        false,
        false,
        false,
        parallelism,
    )
}

/// `then` on every row of `dst` (`m × n`, rows `dst_rs` apart), in parallel.
///
/// # Safety
/// As [`gemm_raw`]'s destination.
unsafe fn rows_then(dst: *mut f32, dst_rs: usize, m: usize, n: usize, then: Option<Then>) {
    if let Some(f) = then {
        let d = super::SharedMut(dst);
        rayon::prelude::ParallelIterator::for_each(
            rayon::prelude::IntoParallelIterator::into_par_iter(0..m),
            |i| f(i, 0, std::slice::from_raw_parts_mut(d.at(i * dst_rs), n)),
        );
    }
}

/// Below this many columns per thread a product stays on gemm's own threading.
const SPLIT_N_MIN: usize = 256;

/// The thread count candle's own matmuls use.
pub fn threads() -> usize {
    candle_core::utils::get_num_threads()
}

/// Test helpers shared by the product kernels' tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::Mat;

    /// `a · b` in f64, row-major `[a.rows, b.cols]`.
    pub fn naive(a: Mat, b: Mat) -> Vec<f64> {
        let mut c = vec![0f64; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                for p in 0..a.cols {
                    c[i * b.cols + j] +=
                        a.data[i * a.rs + p * a.cs] as f64 * b.data[p * b.rs + j * b.cs] as f64;
                }
            }
        }
        c
    }

    /// Asserts that the `m × n` block at the start of `dst` (rows `rs` apart) holds `want(i,
    /// j)` to within `tol(want)`, and that the gaps between its rows still hold the fill value
    /// 7.0 the tests write first (nothing outside the block was written). `what` names the case.
    pub fn assert_block(
        dst: &[f32],
        rs: usize,
        (m, n): (usize, usize),
        want: impl Fn(usize, usize) -> f64,
        tol: impl Fn(f64) -> f64,
        what: &str,
    ) {
        for i in 0..m {
            for j in 0..n {
                let (got, w) = (dst[i * rs + j] as f64, want(i, j));
                assert!((got - w).abs() < tol(w), "{what} ({i}, {j}) {got} vs {w}");
            }
            if i + 1 < m {
                assert!(
                    dst[i * rs + n..(i + 1) * rs].iter().all(|&v| v == 7.0),
                    "{what}: row {i}'s gap was written"
                );
            }
        }
    }

    /// Asserts that `sums[i]` is the sum of column `i` of `g` (row-major, `sums.len()`
    /// columns) to within `tol`; `what` names the case.
    pub fn assert_column_sums(sums: &[f32], g: &[f32], tol: f64, what: &str) {
        let cols = sums.len();
        for (i, &got) in sums.iter().enumerate() {
            let want: f64 = g.iter().skip(i).step_by(cols).map(|&v| v as f64).sum();
            assert!(
                (got as f64 - want).abs() < tol,
                "{what}: sum {i} {got} vs {want}"
            );
        }
    }

    /// `len` values in [-0.6, 0.6) from a short cycle (`step` apart modulo `period`).
    pub fn filled(len: usize, step: usize, period: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * step) % period) as f32 * 0.1 - 0.6)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{assert_block, assert_column_sums, filled, naive};
    use super::*;

    #[test]
    fn split_by_columns_matches_a_plain_product() {
        // n = 1100 columns over 2 threads: the column-block path (blocks of 560 and 540),
        // for x·Wᵀ (through `packed` where the CPU has AVX-512), g·W and gᵀ·x layouts, into a
        // column block of a wider destination, overwriting and then accumulating.
        let (m, k, n, rs) = (37, 40, 1100, 1107);
        let a = filled(m * k, 7, 13);
        let w = filled(n * k, 5, 11);
        let layouts = [
            (Mat::rm(&a, m, k), Mat::rm(&w, n, k).t()),
            (Mat::rm(&a, m, k), Mat::rm(&w, k, n)),
            (Mat::rm(&a, k, m).t(), Mat::rm(&w, k, n)),
        ];
        for (am, bm) in layouts {
            let want = naive(am, bm);
            let mut dst = vec![7f32; (m - 1) * rs + n + 3];
            for (acc, factor) in [(Acc::Overwrite, 1.0), (Acc::Add, 2.0)] {
                gemm(&mut dst[3..], rs, am, bm, acc, 1.0, 2);
                let want = |i, j| factor * want[i * n + j];
                assert_block(&dst[3..], rs, (m, n), want, |_| 1e-4, &format!("{acc:?}"));
            }
            // Nothing before the block was written.
            assert_eq!(&dst[..3], &[7.0; 3]);
        }
    }

    #[test]
    fn few_rows_times_a_wide_transposed_b_matches_a_plain_product() {
        // x · Eᵀ with E [n, k] row-major (the MLM decoder's logits): stored transposed by
        // `transposed` on AVX-512 CPUs; rows 150 (three panels, the last partial), 64 and 12,
        // depth 200, 70 and 2600 (two blocks of depth: the second accumulates), overwrite and
        // accumulate, and the bias epilogue after it.
        for (m, k, n) in [(150, 200, 9_700), (64, 70, 9_000), (12, 2600, 1_000)] {
            let x = filled(m * k, 7, 13);
            let e = filled(n * k, 5, 11);
            let (am, bm) = (Mat::rm(&x, m, k), Mat::rm(&e, n, k).t());
            let want = naive(am, bm);
            let rs = n + 5;
            let mut dst = vec![7f32; (m - 1) * rs + n + 3];
            for (acc, factor) in [(Acc::Overwrite, 1.0), (Acc::Add, 2.0)] {
                gemm(&mut dst[3..], rs, am, bm, acc, 1.0, 2);
                let want = |i, j| factor * want[i * n + j];
                let what = format!("{m}x{k}x{n} {acc:?}");
                assert_block(&dst[3..], rs, (m, n), want, |_| 1e-3, &what);
            }
            assert_eq!(&dst[..3], &[7.0; 3]);
            let then = |row: usize, c0: usize, v: &mut [f32]| {
                for (j, y) in v.iter_mut().enumerate() {
                    *y += (row * 3 + c0 + j) as f32;
                }
            };
            gemm_then(&mut dst[3..], rs, am, bm, 2, &then);
            let want_then = |i: usize, j: usize| want[i * n + j] + (i * 3 + j) as f64;
            assert_block(&dst[3..], rs, (m, n), want_then, |_| 1e-3, "then");
            // The bias added as the transposed product stores each strip.
            if stores_transposed(&am, &bm, 2) {
                let bias = filled(n, 3, 17);
                gemm_bias(&mut dst[3..], rs, am, bm, &bias, 2);
                let want = |i: usize, j: usize| want[i * n + j] + bias[j] as f64;
                assert_block(&dst[3..], rs, (m, n), want, |_| 1e-3, "bias");
            }
        }
    }

    #[test]
    fn split_by_rows_matches_a_plain_product() {
        // A transposed view of A with m ≥ 4n (the decoder's weight gradient's layout): the
        // row-block path over 2 threads (blocks of 1040 and 1020 rows).
        let (m, k, n, rs) = (2060, 23, 300, 303);
        let a = filled(m * k, 7, 13);
        let b = filled(k * n, 5, 11);
        let (am, bm) = (Mat::rm(&a, k, m).t(), Mat::rm(&b, k, n));
        let want = naive(am, bm);
        let mut dst = vec![7f32; (m - 1) * rs + n];
        gemm(&mut dst, rs, am, bm, Acc::Overwrite, 1.0, 2);
        assert_block(&dst, rs, (m, n), |i, j| want[i * n + j], |_| 1e-4, "rows");
    }

    #[test]
    fn row_sums_come_with_the_product_on_every_path() {
        // gᵀ·x layouts: split by rows (m ≥ 4n), by columns (only the first block's task adds
        // the sums), unthreaded, and small enough for the gemm crate (n < 64); the sums of
        // g's columns must match, and the product must be the plain one.
        for (m, k, n, threads) in [
            (2060, 23, 300, 2),
            (300, 70, 1100, 2),
            (130, 40, 200, 1),
            (9, 7, 30, 2),
        ] {
            let g = filled(k * m, 7, 13);
            let x = filled(k * n, 5, 11);
            let (am, bm) = (Mat::rm(&g, k, m).t(), Mat::rm(&x, k, n));
            let want = naive(am, bm);
            let mut dst = vec![7f32; m * n];
            let mut sums = vec![f32::NAN; m];
            Job::new(&mut dst, n, am, bm)
                .row_sums(&mut sums)
                .run(threads);
            let what = format!("{m}x{k}x{n} on {threads}");
            assert_block(&dst, n, (m, n), |i, j| want[i * n + j], |_| 1e-4, &what);
            assert_column_sums(&sums, &g, 1e-4, &what);
        }
    }

    #[test]
    fn both_products_at_once_match_plain_ones() {
        // A linear's backward: dx (+)= g·W with a `then`, and dW = gᵀ·x with the sums of g's
        // columns, one a thread on AVX-512 CPUs (through `packed`, the thread done first
        // helping the other: dW is four times dx's work), else one after the other; and
        // shapes the gemm crate takes (n < 64), which run one after the other.
        for (rows, inp, out, threads) in [(200, 96, 380, 2), (200, 96, 380, 1), (150, 30, 20, 2)] {
            let g = filled(rows * out, 7, 13);
            let w = filled(out * inp, 5, 11);
            let x = filled(rows * inp, 3, 17);
            let (gm, wm, xm) = (
                Mat::rm(&g, rows, out),
                Mat::rm(&w, out, inp),
                Mat::rm(&x, rows, inp),
            );
            let (want_dx, want_dw) = (naive(gm, wm), naive(gm.t(), xm));
            let what = format!("{rows}x{inp}x{out} on {threads}");
            let then = |r: usize, c0: usize, v: &mut [f32]| {
                for (j, e) in v.iter_mut().enumerate() {
                    *e = 2.0 * *e + ((r * 1000 + c0 + j) as f32) * 1e-3;
                }
            };
            for acc in [Acc::Overwrite, Acc::Add] {
                let mut dx = vec![0.5f32; rows * inp];
                let mut dw = vec![7f32; out * inp];
                let mut sums = vec![f32::NAN; out];
                let dx_job = Job::new(&mut dx, inp, gm, wm).acc(acc);
                let dx_job = match acc {
                    Acc::Overwrite => dx_job.then(Some(&then)),
                    Acc::Add => dx_job,
                };
                let dw_job = Job::new(&mut dw, inp, gm.t(), xm).row_sums(&mut sums);
                gemm_both(dx_job, dw_job, threads);
                let dx_want = |i, j| match acc {
                    Acc::Overwrite => 2.0 * want_dx[i * inp + j] + (i * 1000 + j) as f64 * 1e-3,
                    Acc::Add => 0.5 + want_dx[i * inp + j],
                };
                assert_block(&dx, inp, (rows, inp), dx_want, |_| 1e-3, &what);
                assert_block(
                    &dw,
                    inp,
                    (out, inp),
                    |i, j| want_dw[i * inp + j],
                    |_| 1e-3,
                    &what,
                );
                assert_column_sums(&sums, &g, 1e-3, &what);
            }
        }
    }

    #[test]
    #[should_panic(expected = "a then with Acc::Add")]
    fn a_then_with_accumulation_is_refused_whatever_the_order_it_was_set_in() {
        let (a, b) = (filled(4 * 3, 7, 13), filled(3 * 5, 5, 11));
        let mut dst = vec![0f32; 4 * 5];
        let then = |_: usize, _: usize, _: &mut [f32]| {};
        Job::new(&mut dst, 5, Mat::rm(&a, 4, 3), Mat::rm(&b, 3, 5))
            .then(Some(&then))
            .acc(Acc::Add)
            .run(1);
    }

    #[test]
    fn then_runs_once_on_every_element_after_the_product() {
        // Each element is doubled and offset by its own coordinates: a piece visited twice, a
        // piece missed or a wrong (row, col0) shows. Layouts x·Wᵀ and x·W (through `packed`
        // on AVX-512 CPUs, split over 2 threads), and sizes the fallback pass takes (n < 64).
        for (m, k, n) in [(70, 40, 1100), (130, 300, 200), (9, 7, 30)] {
            let rs = n + 3;
            let a = filled(m * k, 7, 13);
            let w = filled(n * k, 5, 11);
            for (am, bm) in [
                (Mat::rm(&a, m, k), Mat::rm(&w, n, k).t()),
                (Mat::rm(&a, m, k), Mat::rm(&w, k, n)),
            ] {
                let want = naive(am, bm);
                let mut dst = vec![7f32; (m - 1) * rs + n];
                let then = |r: usize, c0: usize, v: &mut [f32]| {
                    for (j, x) in v.iter_mut().enumerate() {
                        *x = 2.0 * *x + ((r * 1000 + c0 + j) as f32) * 1e-3;
                    }
                };
                gemm_then(&mut dst, rs, am, bm, 2, &then);
                let want = |i, j| 2.0 * want[i * n + j] + (i * 1000 + j) as f64 * 1e-3;
                assert_block(&dst, rs, (m, n), want, |_| 1e-3, &format!("{m}x{k}x{n}"));
            }
        }
    }

    #[test]
    fn a_slow_half_is_helped_and_the_product_is_unchanged() {
        // Split by columns over 2 threads (blocks of 256), through `packed` on AVX-512 CPUs:
        // the first half's pieces are made slow, so the second task, done early, takes
        // strips of the first half (`packed::Pair`). Every element must come out
        // once and right, and some of the first half's rows must have run on a thread other
        // than the one that ran its first strip.
        use std::sync::Mutex;
        let (m, k, n) = (120, 64, 512);
        let a = filled(m * k, 7, 13);
        let w = filled(n * k, 5, 11);
        let (am, bm) = (Mat::rm(&a, m, k), Mat::rm(&w, n, k).t());
        let want = naive(am, bm);
        let mut dst = vec![7f32; m * n];
        let seen: Mutex<Vec<(usize, std::thread::ThreadId)>> = Mutex::new(Vec::new());
        let then = |r: usize, c0: usize, v: &mut [f32]| {
            if c0 < 256 {
                std::thread::sleep(std::time::Duration::from_micros(300));
                seen.lock().unwrap().push((r, std::thread::current().id()));
            }
            for (j, x) in v.iter_mut().enumerate() {
                *x = 2.0 * *x + ((r * 1000 + c0 + j) as f32) * 1e-3;
            }
        };
        gemm_then(&mut dst, n, am, bm, 2, &then);
        let want = |i, j| 2.0 * want[i * n + j] + (i * 1000 + j) as f64 * 1e-3;
        assert_block(&dst, n, (m, n), want, |_| 1e-3, "helped product");
        let seen = seen.into_inner().unwrap();
        if !super::super::packed::available() || rayon::current_num_threads() < 2 {
            eprintln!("no AVX-512 or one thread: nothing is shared, nothing more to test");
            return;
        }
        // A panic in a piece, on whichever thread runs it, reaches the caller (neither task
        // waits for the other forever).
        let boom = |r: usize, c0: usize, _: &mut [f32]| {
            if c0 < 256 {
                std::thread::sleep(std::time::Duration::from_micros(300));
                assert!(r != 90, "a piece failed");
            }
        };
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            gemm_then(&mut dst, n, am, bm, 2, &boom)
        }));
        assert!(caught.is_err(), "the piece's panic was lost");
        // The first half's 120 rows, each once per block of columns it was cut into.
        let first = seen.iter().min_by_key(|(r, _)| *r).map(|(_, t)| *t);
        let helped = seen.iter().filter(|(_, t)| Some(*t) != first).count();
        assert!(
            helped > 0,
            "no strip of the slow half ran on the other thread ({} pieces)",
            seen.len()
        );
    }
}
