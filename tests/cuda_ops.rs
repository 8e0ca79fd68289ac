//! The GPU ops of `model::cuda` run on the CPU through their kernels' Rust twins
//! (`model::cuda::reference`): their values and gradients against candle's composed ops, so
//! the ops' shapes, argument order and backward passes are checked on any machine. On a GPU,
//! `distil parity --device cuda` checks the encoder built on them against transformers.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::max_abs_diff;
use distil::model::cuda::{self, reference};
use distil::model::ops::{log_softmax_last_dim, softmax_last_dim, LayerNorm};
use distil::model::Activation;
use distil::util::{splitmix64, SPLITMIX_GAMMA};

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // A deterministic pseudo-normal tensor (sums of uniforms from a splitmix stream).
    let n: usize = shape.iter().product();
    let mut state = seed.wrapping_mul(SPLITMIX_GAMMA) | 1;
    let mut next = || {
        let z = splitmix64(state);
        state = state.wrapping_add(SPLITMIX_GAMMA);
        (z >> 40) as f32 / 16_777_216.0
    };
    let v: Vec<f32> = (0..n)
        .map(|_| (next() + next() + next() + next() - 2.0) * 1.7)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// `Σ y · r` for a fixed random `r`: a loss whose gradient at `y` is `r`.
fn probe(y: &Tensor, seed: u64) -> Tensor {
    (y * randn(y.dims(), seed)).unwrap().sum_all().unwrap()
}

/// Values of `f` and gradients of `Σ f · r` for each input, for both implementations.
fn check(
    name: &str,
    inputs: &[Tensor],
    ours: impl Fn(&[Tensor]) -> Tensor,
    composed: impl Fn(&[Tensor]) -> Tensor,
    tol: f32,
) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let (a, b) = (ours(&ts), composed(&ts));
    let d = max_abs_diff(&a, &b);
    assert!(d < tol, "{name}: values differ by {d}");
    let ga = probe(&a, 99).backward().unwrap();
    let gb = probe(&b, 99).backward().unwrap();
    for (i, v) in vars.iter().enumerate() {
        let (x, y) = (ga.get(v).unwrap(), gb.get(v).unwrap());
        let scale = y
            .abs()
            .unwrap()
            .max_keepdim(0)
            .unwrap()
            .flatten_all()
            .unwrap();
        let scale = scale.max(0).unwrap().to_scalar::<f32>().unwrap().max(1.0);
        let d = max_abs_diff(x, y) / scale;
        assert!(
            d < tol,
            "{name}: gradient of input {i} differs by {d} (relative)"
        );
    }
}

/// The mask the kernels draw, as a tensor of factors (0 or 1/(1-p)).
fn mask_of(shape: &[usize], p: f32, seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let scale = 1.0 / (1.0 - p);
    let v: Vec<f32> = (0..n as u64)
        .map(|i| reference::keep_scale(seed, i, p, scale))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

#[test]
fn dropout_drops_at_the_rate_and_its_gradient_reuses_the_mask() {
    let x = randn(&[64, 257], 1);
    let (p, seed) = (0.1f32, 12345);
    check(
        "dropout",
        std::slice::from_ref(&x),
        |t| cuda::dropout(&t[0], p, seed).unwrap(),
        |t| (&t[0] * mask_of(&[64, 257], p, seed)).unwrap(),
        1e-6,
    );
    let m = mask_of(&[64, 257], p, seed)
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let dropped = m.iter().filter(|&&v| v == 0.0).count() as f64 / m.len() as f64;
    assert!((dropped - 0.1).abs() < 0.01, "dropped {dropped}");
    // Another seed, another mask.
    let other = mask_of(&[64, 257], p, seed + 1);
    assert!(max_abs_diff(&other, &mask_of(&[64, 257], p, seed)) > 0.0);
}

#[test]
fn softmax_matches_the_composed_softmax() {
    check(
        "softmax",
        &[randn(&[3, 5, 77], 2)],
        |t| cuda::softmax_last_dim(&t[0]).unwrap(),
        |t| softmax_last_dim(&t[0]).unwrap(),
        1e-5,
    );
}

#[test]
fn layer_norm_matches_the_composed_layer_norm() {
    let w = randn(&[96], 4).affine(0.2, 1.0).unwrap();
    check(
        "layer norm",
        &[randn(&[2, 7, 96], 3), w, randn(&[96], 5)],
        |t| cuda::layer_norm(&t[0], &t[1], &t[2], 1e-12).unwrap(),
        |t| {
            let ln = LayerNorm {
                weight: t[1].clone(),
                bias: t[2].clone(),
                eps: 1e-12,
            };
            ln.forward(&t[0]).unwrap()
        },
        2e-5,
    );
}

#[test]
fn dense_layer_matches_the_composed_layer() {
    let acts = [
        None,
        Some(Activation::GeluErf),
        Some(Activation::GeluTanh),
        Some(Activation::Relu),
    ];
    for act in acts {
        for drop in [None, Some((0.1f32, 777u64))] {
            let name = format!("dense {act:?} dropout {drop:?}");
            check(
                &name,
                &[
                    randn(&[2, 9, 48], 6),
                    (randn(&[80, 48], 7) * 0.1).unwrap(),
                    randn(&[80], 8),
                ],
                |t| cuda::linear(&t[0], &t[1], &t[2], act, drop, DType::F32).unwrap(),
                |t| {
                    let y = t[0]
                        .broadcast_matmul(&t[1].t().unwrap())
                        .unwrap()
                        .broadcast_add(&t[2])
                        .unwrap();
                    let y = match act {
                        None => y,
                        Some(Activation::GeluErf) => y.gelu_erf().unwrap(),
                        Some(Activation::GeluTanh) => y.gelu().unwrap(),
                        Some(Activation::Relu) => y.relu().unwrap(),
                    };
                    match drop {
                        Some((p, seed)) => (y * mask_of(&[2, 9, 80], p, seed)).unwrap(),
                        None => y,
                    }
                },
                2e-5,
            );
        }
    }
}

#[test]
fn dense_layer_and_attention_in_half_precision_stay_close_to_f32() {
    let inputs = [
        randn(&[4, 8, 64], 9),
        (randn(&[32, 64], 10) * 0.1).unwrap(),
        randn(&[32], 11),
    ];
    let act = Some(Activation::GeluErf);
    let qkv = [
        randn(&[2, 8, 32], 21),
        randn(&[2, 8, 32], 22),
        randn(&[2, 8, 32], 23),
    ];
    for dt in [DType::BF16, DType::F16] {
        check(
            &format!("dense {dt:?}"),
            &inputs,
            |t| cuda::linear(&t[0], &t[1], &t[2], act, None, dt).unwrap(),
            |t| cuda::linear(&t[0], &t[1], &t[2], act, None, DType::F32).unwrap(),
            5e-2,
        );
        check(
            &format!("attention {dt:?}"),
            &qkv,
            |t| cuda::attention(&t[0], &t[1], &t[2], 4, None, Some((0.1, 9)), dt).unwrap(),
            |t| cuda::attention(&t[0], &t[1], &t[2], 4, None, Some((0.1, 9)), DType::F32).unwrap(),
            5e-2,
        );
    }
}

#[test]
fn dense_layer_reads_a_shared_low_precision_copy_of_its_input() {
    // The q, k and v projections share one bf16 copy of x: the same values and gradients as
    // each layer casting x itself.
    let inputs = [
        randn(&[4, 8, 64], 31),
        (randn(&[32, 64], 32) * 0.1).unwrap(),
        randn(&[32], 33),
    ];
    let dt = DType::BF16;
    check(
        "dense from a shared bf16 copy",
        &inputs,
        |t| {
            let xl = t[0]
                .detach()
                .reshape((32, 64))
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            cuda::linear_from(&t[0], Some(xl), &t[1], &t[2], None, None, dt).unwrap()
        },
        |t| cuda::linear(&t[0], &t[1], &t[2], None, None, dt).unwrap(),
        1e-6,
    );
    // A copy of another shape or dtype is refused, not multiplied.
    for xl in [
        inputs[0].reshape((16, 128)).unwrap().to_dtype(dt).unwrap(),
        inputs[0].reshape((32, 64)).unwrap(),
    ] {
        let err = cuda::linear_from(&inputs[0], Some(xl), &inputs[1], &inputs[2], None, None, dt)
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected BF16 [32, 64]"), "{err}");
    }
}

#[test]
fn attention_matches_the_composed_attention() {
    let (b, s, h, nh) = (2usize, 6usize, 32usize, 4usize);
    // The second sequence has two padding positions.
    let keep: Vec<f32> = (0..b * s)
        .map(|i| if i >= 2 * s - 2 { 0.0 } else { 1.0 })
        .collect();
    let keep = Tensor::from_vec(keep, (b, s), &Device::Cpu).unwrap();
    let mask = ((1.0 - keep).unwrap() * f32::MIN as f64)
        .unwrap()
        .reshape((b, 1, 1, s))
        .unwrap();
    for drop in [None, Some((0.2f32, 4242u64))] {
        let qkv = [
            randn(&[b, s, h], 12),
            randn(&[b, s, h], 13),
            randn(&[b, s, h], 14),
        ];
        check(
            &format!("attention dropout {drop:?}"),
            &qkv,
            |t| cuda::attention(&t[0], &t[1], &t[2], nh, Some(&mask), drop, DType::F32).unwrap(),
            |t| {
                let heads = |x: &Tensor| {
                    x.reshape((b, s, nh, h / nh))
                        .unwrap()
                        .transpose(1, 2)
                        .unwrap()
                        .contiguous()
                        .unwrap()
                };
                let (q, k, v) = (heads(&t[0]), heads(&t[1]), heads(&t[2]));
                let scores = (q.matmul(&k.t().unwrap()).unwrap() / ((h / nh) as f64).sqrt())
                    .unwrap()
                    .broadcast_add(&mask)
                    .unwrap();
                let probs = softmax_last_dim(&scores).unwrap();
                let probs = match drop {
                    Some((p, seed)) => (probs * mask_of(&[b, nh, s, s], p, seed)).unwrap(),
                    None => probs,
                };
                probs
                    .matmul(&v)
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap()
                    .reshape((b, s, h))
                    .unwrap()
            },
            2e-5,
        );
    }
}

#[test]
fn soft_target_kl_matches_the_composed_loss() {
    let t = 2.0;
    let p = softmax_last_dim(&(randn(&[7, 50], 19) / t).unwrap()).unwrap();
    let p2 = p.clone();
    check(
        "soft KL",
        &[randn(&[7, 50], 18)],
        |x| cuda::soft_kl(&x[0], &p, t).unwrap(),
        |x| {
            let log_q = log_softmax_last_dim(&(&x[0] / t).unwrap()).unwrap();
            let log_p = p2.clamp(1e-30, 1.0).unwrap().log().unwrap();
            let kl = (&p2 * (log_p - log_q).unwrap()).unwrap().sum_all().unwrap();
            (kl * (t * t / 7.0)).unwrap()
        },
        2e-5,
    );
    let teacher = randn(&[7, 50], 19);
    let d = max_abs_diff(&cuda::softmax_no_grad(&teacher, 1.0 / t).unwrap(), &p);
    assert!(d < 1e-6, "teacher softmax differs by {d}");
}

#[test]
fn cross_entropy_matches_the_composed_loss() {
    let targets = Tensor::new(&[3u32, 0, 49, 17, 17, 8, 30], &Device::Cpu).unwrap();
    let t2 = targets.clone();
    check(
        "cross-entropy",
        &[randn(&[7, 50], 20)],
        |x| cuda::cross_entropy(&x[0], &targets).unwrap(),
        |x| {
            let logp = log_softmax_last_dim(&x[0]).unwrap();
            let picked = logp.gather(&t2.unsqueeze(1).unwrap(), 1).unwrap();
            (picked.sum_all().unwrap().neg().unwrap() / 7.0).unwrap()
        },
        2e-5,
    );
    let bad = Tensor::new(&[3u32, 0, 50, 17, 17, 8, 30], &Device::Cpu).unwrap();
    let e = cuda::cross_entropy(&randn(&[7, 50], 20), &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("target 50 outside 0..50"), "{e}");
}

#[test]
fn ops_report_shape_errors() {
    let x = randn(&[2, 3, 8], 15);
    let e = cuda::linear(
        &x,
        &randn(&[4, 7], 16),
        &randn(&[4], 17),
        None,
        None,
        DType::F32,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("disagree"), "{e}");
    let e = cuda::attention(&x, &x, &x, 3, None, None, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("3 heads"), "{e}");
    let full = Tensor::zeros((2, 1, 3, 3), DType::F32, &Device::Cpu).unwrap();
    let e = cuda::attention(&x, &x, &x, 2, Some(&full), None, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(e.contains("additive key mask"), "{e}");
}

#[test]
fn embedding_lookup_matches_index_select_and_sums_each_ids_gradient_in_a_fixed_order() {
    // 300 tokens over a table of 50 rows: id 7 seventy times (three chunks of its run), ids
    // 40..50 never (zero gradient rows), the rest scattered.
    let ids: Vec<u32> = (0..300u64)
        .map(|i| {
            if i % 4 == 1 && i < 280 {
                7
            } else {
                (splitmix64(i) % 40) as u32
            }
        })
        .collect();
    assert!(ids.iter().filter(|&&i| i == 7).count() > 2 * reference::EMBEDDING_CHUNK);
    let ids_t = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap();
    check(
        "embedding",
        &[randn(&[50, 24], 31)],
        |t| cuda::embedding(&t[0], &ids_t).unwrap(),
        |t| t[0].index_select(&ids_t, 0).unwrap(),
        1e-5,
    );
    // The plan: runs grouped by id, ascending, tokens in input order, chunks of at most 32.
    let plan = reference::EmbeddingGradPlan::new(&ids, 50).unwrap();
    assert_eq!(plan.order.len(), 300);
    assert!(plan.order.windows(2).all(|w| {
        let (a, b) = (ids[w[0] as usize], ids[w[1] as usize]);
        a < b || (a == b && w[0] < w[1])
    }));
    assert!(plan
        .begin
        .windows(2)
        .all(|w| w[1] > w[0] && w[1] - w[0] <= reference::EMBEDDING_CHUNK as u32));
    let distinct: std::collections::BTreeSet<u32> = ids.iter().copied().collect();
    assert_eq!(plan.uid, distinct.into_iter().collect::<Vec<_>>());
    // Gradient rows of absent ids are zero.
    let table = Var::from_tensor(&randn(&[50, 24], 31)).unwrap();
    let y = cuda::embedding(table.as_tensor(), &ids_t).unwrap();
    let g = probe(&y, 5).backward().unwrap();
    let gt = g.get(&table).unwrap().to_vec2::<f32>().unwrap();
    assert!(gt[40..].iter().all(|row| row.iter().all(|&v| v == 0.0)));
    assert!(gt[7].iter().any(|&v| v != 0.0));
}

#[test]
fn embedding_lookup_reports_an_id_outside_the_table() {
    let ids = Tensor::new(&[1u32, 9, 3], &Device::Cpu).unwrap();
    let table = Var::from_tensor(&randn(&[5, 4], 1)).unwrap();
    let y = cuda::embedding(table.as_tensor(), &ids).unwrap();
    // The lookup marks the row (NaN); the backward, which reads the ids, names the id.
    assert!(y.get(1).unwrap().to_vec1::<f32>().unwrap()[0].is_nan());
    let err = probe(&y, 2).backward().unwrap_err().to_string();
    assert!(
        err.contains("token id 9 is outside the embedding table of 5 rows"),
        "{err}"
    );
    let bad = cuda::embedding(
        table.as_tensor(),
        &Tensor::new(&[1i64], &Device::Cpu).unwrap(),
    );
    assert!(bad.unwrap_err().to_string().contains("u32 ids"));
    let none = Tensor::zeros(0, DType::U32, &Device::Cpu).unwrap();
    let empty = cuda::embedding(table.as_tensor(), &none).unwrap();
    assert_eq!(empty.dims(), &[0, 4]);
}
