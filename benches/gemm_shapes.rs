//! GFLOP/s of the matrix products one BERT layer step runs, through `distil::model::fused::gemm`
//! (the gemm crate), shape by shape; `benches/gemm_shapes.py` times the same shapes in PyTorch.
//!
//! ```text
//! cargo bench --bench gemm_shapes -- [small|base] [threads]
//! ```
//! Each line: name, m×k×n, operand layouts (`Bᵀ`: B is a transposed view, as a linear's
//! `W` `[out, in]` is in `x·Wᵀ`; `B`: stored row-major), GFLOP/s (best of 5 repeats of ~0.2 s), run as
//! the training step runs its products: on a rayon worker, the pool's other workers spinning
//! (`distil::util::threads::run_hot`).
//! `FLUSH=a`, `b`, `c` or a mix (`abc`) flushes those operands from the caches with
//! `clflush` between repetitions (untimed): cold A, B and C together cost 3-7% on BERT-base
//! shapes, where `FLUSH=1` (below) also leaves the caches full of dirty lines.
//! `IMPL=crate` or `IMPL=packed` (with `SPLIT`) runs each unthreaded product through the gemm
//! crate or through `distil::model::fused::packed` (our packing over gemm's microkernel) instead
//! of distil's own choice: the two side by side in one hour.
//! `SPLIT=n` (or `m`) runs each single product as one unthreaded product per thread over a
//! block of columns (rows). `FLUSH=1` writes a 256 MiB buffer between repetitions (untimed),
//! so that the operands come from memory as a step's weights do (3-6% slower on BERT-base
//! shapes). Without `SPLIT`, as `distil::model::fused::gemm` runs it:
//! products of at least 256 columns a thread split by columns, the others on gemm's own
//! threading.
use distil::model::fused::gemm::{gemm, Acc, Mat};
use rayon::prelude::*;
use std::time::Instant;

struct Shape {
    name: &'static str,
    m: usize,
    k: usize,
    n: usize,
    /// A stored transposed (k × m row-major), B stored transposed (n × k row-major).
    at: bool,
    bt: bool,
    /// Independent products run in parallel, one thread each (the attention's heads).
    batch: usize,
}

fn shapes(base: bool) -> Vec<Shape> {
    let (rows, h, i, s, d, bh, vocab) = if base {
        (1024, 768, 3072, 128, 64, 8 * 12, 30522)
    } else {
        (2048, 256, 1024, 128, 64, 16 * 4, 8000)
    };
    // The MLM head on the masked rows (15%).
    let masked = rows * 15 / 100;
    let sh = |name, m, k, n, at, bt, batch| Shape {
        name,
        m,
        k,
        n,
        at,
        bt,
        batch,
    };
    vec![
        sh("qkv fwd", rows, h, 3 * h, false, true, 1),
        sh("attn-out fwd", rows, h, h, false, true, 1),
        sh("ffn-in fwd", rows, h, i, false, true, 1),
        sh("ffn-out fwd", rows, i, h, false, true, 1),
        // The forward products with the weight stored transposed, [in, out] (a frozen
        // teacher's layout, `distil::model::fused::block::Transposed`).
        sh("qkv fwd, Wᵀ st.", rows, h, 3 * h, false, false, 1),
        sh("attn-out fwd, Wᵀ st.", rows, h, h, false, false, 1),
        sh("ffn-in fwd, Wᵀ st.", rows, h, i, false, false, 1),
        sh("ffn-out fwd, Wᵀ st.", rows, i, h, false, false, 1),
        sh("ffn-in dx", rows, i, h, false, false, 1),
        sh("ffn-out dx", rows, h, i, false, false, 1),
        sh("ffn-in dW", i, rows, h, true, false, 1),
        sh("ffn-out dW", h, rows, i, true, false, 1),
        sh("scores (per head)", s, d, s, false, true, bh),
        sh("context (per head)", s, s, d, false, false, bh),
        sh("decoder fwd", masked, h, vocab, false, true, 1),
        sh("decoder fwd all rows", rows, h, vocab, false, true, 1),
        sh("decoder dx", masked, vocab, h, false, false, 1),
        sh("decoder dW", vocab, masked, h, true, false, 1),
        sh("peak 2048^3", 2048, 2048, 2048, false, false, 1),
    ]
}

impl Shape {
    /// The operands as the kernels see them (row-major storage, transposed by strides).
    fn mats<'a>(&self, a: &'a [f32], b: &'a [f32]) -> (Mat<'a>, Mat<'a>) {
        let am = if self.at {
            Mat::rm(a, self.k, self.m).t()
        } else {
            Mat::rm(a, self.m, self.k)
        };
        let bm = if self.bt {
            Mat::rm(b, self.n, self.k).t()
        } else {
            Mat::rm(b, self.k, self.n)
        };
        (am, bm)
    }
}

/// Which implementation runs each unthreaded product under `SPLIT` (`IMPL`): distil's
/// choice, the gemm crate, or distil's own packing over gemm's microkernel
/// (`distil::model::fused::packed`).
#[derive(Clone, Copy, PartialEq)]
enum Impl {
    Auto,
    Crate,
    Packed,
}

/// `c (m × n, row stride rs) = a · b` on this thread, by `imp`.
unsafe fn one(c: *mut f32, rs: usize, a: Mat, b: Mat, imp: Impl) {
    match imp {
        Impl::Auto => distil::model::fused::gemm::gemm_raw(
            c,
            rs,
            a.rows,
            b.cols,
            a,
            b,
            Acc::Overwrite,
            1.0,
            1,
        ),
        Impl::Packed => {
            distil::model::fused::packed::gemm(c, rs, a, b, Acc::Overwrite, 1.0, None, None, None)
        }
        Impl::Crate => distil::model::fused::gemm::crate_gemm(
            c,
            rs,
            a,
            b,
            Acc::Overwrite,
            1.0,
            gemm::Parallelism::None,
        ),
    }
}

/// The product as one unthreaded product per thread, over blocks of rows (`by_rows`) or of
/// columns.
fn split(
    sh: &Shape,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    threads: usize,
    by_rows: bool,
    imp: Impl,
) {
    let (am, bm) = sh.mats(a, b);
    let per = (if by_rows { sh.m } else { sh.n }).div_ceil(threads);
    let c = c.as_mut_ptr() as usize;
    (0..threads).into_par_iter().for_each(|t| {
        let len = if by_rows { sh.m } else { sh.n };
        let (lo, hi) = (t * per, ((t + 1) * per).min(len));
        if lo >= hi {
            return;
        }
        let (am, bm, offset) = if by_rows {
            let am = Mat {
                data: &am.data[lo * am.rs..],
                rows: hi - lo,
                ..am
            };
            (am, bm, lo * sh.n)
        } else {
            let bm = Mat {
                data: &bm.data[lo * bm.cs..],
                cols: hi - lo,
                ..bm
            };
            (am, bm, lo)
        };
        // Safety: this task's block of rows or columns of `c` is its alone.
        unsafe { one((c as *mut f32).add(offset), sh.n, am, bm, imp) }
    });
}

/// Evicts `buf` from every cache level (clflush on each 64-byte line, then a fence).
fn flush_lines(buf: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        for line in buf.chunks(16) {
            // Safety: the pointer is inside `buf`; clflush only evicts.
            unsafe { std::arch::x86_64::_mm_clflush(line.as_ptr() as *const u8) };
        }
        // Safety: a fence has no operands.
        unsafe { std::arch::x86_64::_mm_mfence() };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = buf;
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let base = args.first().map(|s| s == "base").unwrap_or(false);
    let threads: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    let split_by = std::env::var("SPLIT").ok();
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .unwrap();
    // As the training step runs them: on a rayon worker, the other workers spinning.
    distil::util::threads::run_hot(|| run(base, threads, split_by.as_deref()));
}

fn run(base: bool, threads: usize, split_by: Option<&str>) {
    // FLUSH=1: a 256 MiB write between repetitions; FLUSH=a, b, c or any mix (abc): those
    // operands' cache lines flushed with clflush (clean evictions, nothing else disturbed).
    let flush_env = std::env::var("FLUSH").unwrap_or_default();
    if flush_env != "1" && !flush_env.chars().all(|c| "abc".contains(c)) {
        eprintln!("FLUSH must be 1 or letters of abc (the operands to evict), not '{flush_env}'");
        std::process::exit(2);
    }
    let flush = flush_env == "1";
    let imp = match std::env::var("IMPL").unwrap_or_default().as_str() {
        "" | "auto" => Impl::Auto,
        "crate" => Impl::Crate,
        "packed" if distil::model::fused::packed::available() => Impl::Packed,
        "packed" => {
            eprintln!("IMPL=packed needs AVX-512, which this CPU lacks");
            std::process::exit(2);
        }
        other => {
            eprintln!("IMPL must be auto, crate or packed, not '{other}'");
            std::process::exit(2);
        }
    };
    if split_by.is_some_and(|s| s != "m" && s != "n") {
        eprintln!(
            "SPLIT must be m or n, not '{}'",
            split_by.unwrap_or_default()
        );
        std::process::exit(2);
    }
    if imp != Impl::Auto && split_by.is_none() {
        eprintln!("IMPL applies to the SPLIT=n or SPLIT=m products; set SPLIT too");
        std::process::exit(2);
    }
    let clflush = |op: char| !flush && flush_env.contains(op);
    let mut evict = vec![1u8; if flush { 256 << 20 } else { 0 }];
    for sh in shapes(base) {
        let a: Vec<f32> = (0..sh.m * sh.k * sh.batch)
            .map(|i| (i % 7) as f32 * 0.1)
            .collect();
        let b: Vec<f32> = (0..sh.k * sh.n * sh.batch)
            .map(|i| (i % 5) as f32 * 0.1)
            .collect();
        let mut c = vec![0f32; sh.m * sh.n * sh.batch];
        let flop = 2.0 * (sh.m * sh.k * sh.n * sh.batch) as f64;
        let reps = ((2e9 / flop) as usize).max(3);
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t0 = Instant::now();
            let mut flushing = 0.0;
            for _ in 0..reps {
                if flush {
                    // Evict the operands (as the step meets a layer's weights: from memory),
                    // untimed.
                    let t = Instant::now();
                    for x in evict.iter_mut().step_by(64) {
                        *x = x.wrapping_add(1);
                    }
                    flushing += t.elapsed().as_secs_f64();
                }
                let t = Instant::now();
                for (op, buf) in [('a', &a[..]), ('b', &b[..]), ('c', &c[..])] {
                    if clflush(op) {
                        flush_lines(buf);
                    }
                }
                flushing += t.elapsed().as_secs_f64();
                if sh.batch > 1 {
                    let (ma, mb, mc) = (sh.m * sh.k, sh.k * sh.n, sh.m * sh.n);
                    c.par_chunks_mut(mc).enumerate().for_each(|(j, c)| {
                        let (am, bm) = sh.mats(&a[j * ma..(j + 1) * ma], &b[j * mb..(j + 1) * mb]);
                        gemm(c, sh.n, am, bm, Acc::Overwrite, 1.0, 1)
                    });
                } else if let Some(by) = split_by {
                    split(&sh, &a, &b, &mut c, threads, by == "m", imp);
                } else {
                    let (am, bm) = sh.mats(&a, &b);
                    gemm(&mut c, sh.n, am, bm, Acc::Overwrite, 1.0, threads);
                }
            }
            best = best.min((t0.elapsed().as_secs_f64() - flushing) / reps as f64);
        }
        println!(
            "{:20} {:>5}x{:<5}x{:>5} x{:<3} {}{}  {:7.1} GFLOP/s",
            sh.name,
            sh.m,
            sh.k,
            sh.n,
            sh.batch,
            if sh.at { "Aᵀ" } else { "A " },
            if sh.bt { "Bᵀ" } else { "B " },
            flop / best / 1e9
        );
    }
}
