//! GFLOP/s of the matrix products one BERT layer step runs, through `distil::model::fused::gemm`
//! (the gemm crate), shape by shape; `benches/gemm_shapes.py` times the same shapes in PyTorch.
//!
//! ```text
//! cargo bench --bench gemm_shapes -- [small|base] [threads]
//! ```
//! Each line: name, m×k×n, operand layouts, GFLOP/s (best of 5 repeats of ~0.2 s).
//! `SPLIT=n` (or `m`) runs each single product as one unthreaded product per thread over a
//! block of columns (rows) instead of through gemm's own threading: how
//! `distil::model::fused::gemm` chose to split transposed-B products by columns.
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
        sh("ffn-in dx", rows, i, h, false, false, 1),
        sh("ffn-out dx", rows, h, i, false, false, 1),
        sh("ffn-in dW", i, rows, h, true, false, 1),
        sh("ffn-out dW", h, rows, i, true, false, 1),
        sh("scores (per head)", s, d, s, false, true, bh),
        sh("context (per head)", s, s, d, false, false, bh),
        sh("decoder fwd", masked, h, vocab, false, true, 1),
        sh("decoder dx", masked, vocab, h, false, false, 1),
        sh("decoder dW", vocab, masked, h, true, false, 1),
        sh("peak 2048^3", 2048, 2048, 2048, false, false, 1),
    ]
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let base = args.first().map(|s| s == "base").unwrap_or(false);
    let threads: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .unwrap();
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
        let run = |a: &[f32], b: &[f32], c: &mut [f32], t: usize| {
            let am = if sh.at {
                Mat::rm(a, sh.k, sh.m).t()
            } else {
                Mat::rm(a, sh.m, sh.k)
            };
            let bm = if sh.bt {
                Mat::rm(b, sh.n, sh.k).t()
            } else {
                Mat::rm(b, sh.k, sh.n)
            };
            gemm(c, sh.n, am, bm, Acc::Overwrite, 1.0, t);
        };
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t0 = Instant::now();
            for _ in 0..reps {
                if sh.batch == 1 && std::env::var("SPLIT").as_deref() == Ok("n") {
                    // each thread: all rows, a block of columns
                    let nb = sh.n.div_ceil(threads);
                    let cp = distil_ptr(&mut c);
                    (0..threads).into_par_iter().for_each(|t| {
                        let j0 = t * nb;
                        let j1 = (j0 + nb).min(sh.n);
                        let am = if sh.at {
                            Mat::rm(&a, sh.k, sh.m).t()
                        } else {
                            Mat::rm(&a, sh.m, sh.k)
                        };
                        let bm = if sh.bt {
                            Mat::rm(&b, sh.n, sh.k).t()
                        } else {
                            Mat::rm(&b, sh.k, sh.n)
                        };
                        let bm = Mat {
                            data: &bm.data[j0 * bm.cs..],
                            cols: j1 - j0,
                            ..bm
                        };
                        unsafe {
                            distil::model::fused::gemm::gemm_raw(
                                (cp.0 as *mut f32).add(j0),
                                sh.n,
                                sh.m,
                                j1 - j0,
                                am,
                                bm,
                                Acc::Overwrite,
                                1.0,
                                1,
                            )
                        }
                    });
                } else if sh.batch == 1 && std::env::var("SPLIT").as_deref() == Ok("m") {
                    let mb = sh.m.div_ceil(threads);
                    let cp = distil_ptr(&mut c);
                    (0..threads).into_par_iter().for_each(|t| {
                        let i0 = t * mb;
                        let i1 = (i0 + mb).min(sh.m);
                        let am = if sh.at {
                            Mat::rm(&a, sh.k, sh.m).t()
                        } else {
                            Mat::rm(&a, sh.m, sh.k)
                        };
                        let am = Mat {
                            data: &am.data[i0 * am.rs..],
                            rows: i1 - i0,
                            ..am
                        };
                        let bm = if sh.bt {
                            Mat::rm(&b, sh.n, sh.k).t()
                        } else {
                            Mat::rm(&b, sh.k, sh.n)
                        };
                        unsafe {
                            distil::model::fused::gemm::gemm_raw(
                                (cp.0 as *mut f32).add(i0 * sh.n),
                                sh.n,
                                i1 - i0,
                                sh.n,
                                am,
                                bm,
                                Acc::Overwrite,
                                1.0,
                                1,
                            )
                        }
                    });
                } else if sh.batch == 1 {
                    run(&a, &b, &mut c, threads);
                } else {
                    c.par_chunks_mut(sh.m * sh.n)
                        .enumerate()
                        .for_each(|(j, c)| {
                            run(
                                &a[j * sh.m * sh.k..(j + 1) * sh.m * sh.k],
                                &b[j * sh.k * sh.n..(j + 1) * sh.k * sh.n],
                                c,
                                1,
                            )
                        });
                }
            }
            best = best.min(t0.elapsed().as_secs_f64() / reps as f64);
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

#[derive(Clone, Copy)]
struct P(usize);
unsafe impl Send for P {}
unsafe impl Sync for P {}
fn distil_ptr(c: &mut [f32]) -> P {
    P(c.as_mut_ptr() as usize)
}
