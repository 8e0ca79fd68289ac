//! The fused CPU kernels (src/model/fused) against candle's composed ops, in training mode:
//! with dropout on, the same RNG state gives both paths the same masks, so the loss and every
//! parameter's gradient must agree. Plus the accuracy of the vectorisable exp / erf / tanh
//! and the activation derivatives the kernels use.

use candle_core::{Device, Tensor};
use distil::loss::{cross_entropy, masked_positions};
use distil::model::fused::math;
use distil::model::{Activation, Encoder, EncoderConfig, EncoderInput, ForwardOptions, Layout};
use distil::model::{Params, Parts};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

#[test]
fn exp_erf_tanh_are_accurate() {
    let mut worst = (0f64, 0f64, 0f64);
    let n = 200_000;
    for i in 0..=n {
        let x = -87.0 + 175.0 * i as f32 / n as f32;
        let e = (x as f64).exp();
        worst.0 = worst.0.max(((math::exp(x) as f64) - e).abs() / e);
    }
    for i in 0..=n {
        let x = -6.0 + 12.0 * i as f32 / n as f32;
        worst.1 = worst
            .1
            .max((math::erf(x) as f64 - libm::erf(x as f64)).abs());
        worst.2 = worst
            .2
            .max((math::tanh(x) as f64 - (x as f64).tanh()).abs());
    }
    println!(
        "exp rel {:.2e}, erf abs {:.2e}, tanh abs {:.2e}",
        worst.0, worst.1, worst.2
    );
    assert!(worst.0 < 5e-7, "exp relative error {}", worst.0);
    assert!(worst.1 < 1e-6, "erf absolute error {}", worst.1);
    assert!(worst.2 < 1e-6, "tanh absolute error {}", worst.2);
    // ln over the range the soft-target KL sees (probabilities clamped at 1e-30) and beyond.
    let mut worst_ln = 0f64;
    for i in 0..=n {
        let x = (-69.0 + 100.0 * i as f64 / n as f64).exp() as f32;
        let l = (x as f64).ln();
        worst_ln = worst_ln.max((math::ln(x) as f64 - l).abs() / l.abs().max(1.0));
    }
    println!("ln rel (abs below 1) {worst_ln:.2e}");
    assert!(worst_ln < 5e-7, "ln error {worst_ln}");
    assert_eq!(math::ln(1.0), 0.0);
    assert!(math::exp(-200.0) < 1.1e-38);
    assert!(math::exp(-87.0) > 0.0);
}

#[test]
fn activation_derivatives_match_finite_differences() {
    for a in [Activation::GeluErf, Activation::GeluTanh, Activation::Relu] {
        for i in 0..=400 {
            let x = -5.0 + 10.0 * i as f64 / 400.0 + 1e-3;
            let f = |x: f64| -> f64 {
                match a {
                    Activation::GeluErf => 0.5 * x * (1.0 + libm::erf(x / 2f64.sqrt())),
                    Activation::GeluTanh => {
                        0.5 * x
                            * (1.0
                                + ((2.0 / std::f64::consts::PI).sqrt()
                                    * (x + 0.044715 * x * x * x))
                                    .tanh())
                    }
                    Activation::Relu => x.max(0.0),
                }
            };
            let h = 1e-5;
            let numeric = (f(x + h) - f(x - h)) / (2.0 * h);
            let got = math::act_grad(a, x as f32) as f64;
            assert!(
                (got - numeric).abs() < 2e-6,
                "{a:?}'({x}) = {got}, finite difference {numeric}"
            );
            assert!(
                (math::act(a, x as f32) as f64 - f(x)).abs() < 2e-6,
                "{a:?}({x})"
            );
        }
    }
}

/// How the encoder runs: candle's composed ops, one fused node per op, or each whole layer
/// as one fused node (the default).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Path {
    Composed,
    PerOp,
    Layer,
}

/// Loss and gradients of a small random model, one training step's forward and backward.
fn step(cfg: &EncoderConfig, path: Path) -> (f32, Vec<(String, Tensor)>) {
    let params = Params::random(cfg, Parts::MLM, 11, &Device::Cpu, true).unwrap();
    let mut enc = Encoder::new(cfg.clone(), params).unwrap();
    enc.set_fused(path != Path::Composed);
    enc.set_layer_kernel(path == Path::Layer);
    let ids = Tensor::new(
        &[
            [2u32, 17, 33, 4, 41, 9, 12, 3, 0, 0, 0],
            [2, 5, 6, 7, 8, 9, 10, 11, 12, 13, 3],
            [2, 44, 3, 0, 0, 0, 0, 0, 0, 0, 0],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let mask = ids
        .ne(0u32)
        .unwrap()
        .to_dtype(candle_core::DType::U32)
        .unwrap();
    let mut labels = vec![-100i64; 33];
    for (i, t) in [(1, 17), (4, 41), (13, 6), (17, 10), (21, 3), (23, 44)] {
        labels[i] = t;
    }
    let targets = masked_positions(&labels, &Device::Cpu).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let out = enc
        .forward(
            &EncoderInput {
                input_ids: &ids,
                attention_mask: Some(&mask),
                token_type_ids: None,
            },
            ForwardOptions::default(),
            Some(&mut rng),
        )
        .unwrap();
    let logits = enc
        .mlm_logits_at(&out.last_hidden_state, &targets.positions)
        .unwrap();
    let loss = cross_entropy(&logits, &targets.targets).unwrap();
    let grads = enc.backward(&loss).unwrap();
    let g = enc
        .params
        .vars()
        .iter()
        .map(|(n, v)| {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{n} got no gradient ({path:?})"));
            (n.clone(), g.clone())
        })
        .collect();
    (loss.to_scalar::<f32>().unwrap(), g)
}

#[test]
fn fused_kernels_match_composed_ops_in_training_mode() {
    let mut cases = Vec::new();
    for act in [Activation::GeluErf, Activation::GeluTanh, Activation::Relu] {
        let mut cfg = EncoderConfig::bert(50, 32, 2, 4, 64);
        cfg.hidden_act = act;
        cfg.hidden_dropout = 0.2;
        cfg.attention_dropout = 0.3;
        cases.push(cfg);
    }
    let mut albert = EncoderConfig::bert(50, 32, 3, 4, 64);
    albert.layout = Layout::Albert;
    albert.shared_layers = true;
    albert.embedding_size = 16;
    cases.push(albert);
    for (cfg, path) in cases
        .iter()
        .flat_map(|c| [(c, Path::Layer), (c, Path::PerOp)])
    {
        let (lf, gf) = step(cfg, path);
        let (lc, gc) = step(cfg, Path::Composed);
        let what = format!("{:?} {:?} {path:?}", cfg.layout, cfg.hidden_act);
        assert!(
            (lf - lc).abs() < 1e-5,
            "{what}: loss {lf} fused vs {lc} composed"
        );
        for ((name, a), (_, b)) in gf.iter().zip(&gc) {
            let scale = b
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let d = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            if name.ends_with("attention.self.key.bias") {
                // Its true gradient is 0 (softmax ignores a shift); both give float noise.
                assert!(d < 1e-6, "{what}: {name}: {d}");
                continue;
            }
            assert!(scale > 0.0, "{what}: {name} has an all-zero gradient");
            assert!(
                d / scale < 1e-4,
                "{what}: gradient of {name} differs by {d} (max {scale})"
            );
        }
    }
}

/// Loss and gradient of `f` at `x`, as f32 (fused kernels) or f64 (candle's composed ops).
fn loss_and_grad(
    x: &Tensor,
    dtype: candle_core::DType,
    f: &dyn Fn(&Tensor) -> Tensor,
) -> (f64, Vec<f64>) {
    let v = candle_core::Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
    let loss = f(v.as_tensor());
    let g = loss.backward().unwrap();
    let grad = g.get(v.as_tensor()).expect("a gradient");
    (
        loss.to_dtype(candle_core::DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap(),
        grad.to_dtype(candle_core::DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap(),
    )
}

fn assert_close(what: &str, a: (f64, Vec<f64>), b: (f64, Vec<f64>)) {
    assert!(
        (a.0 - b.0).abs() < 1e-5 * b.0.abs().max(1.0),
        "{what}: loss {} fused vs {} composed",
        a.0,
        b.0
    );
    let scale = b.1.iter().fold(0f64, |m, v| m.max(v.abs()));
    let d =
        a.1.iter()
            .zip(&b.1)
            .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        scale > 0.0 && d / scale < 1e-4,
        "{what}: gradient differs by {d} (max {scale})"
    );
}

#[test]
fn fused_losses_match_composed_ops() {
    use candle_core::DType::{F32, F64};
    let dev = Device::Cpu;
    let logits = (Tensor::randn(0f32, 3.0, (7, 50), &dev).unwrap())
        .contiguous()
        .unwrap();
    let teacher = Tensor::randn(0f32, 3.0, (7, 50), &dev).unwrap();
    let targets = Tensor::new(&[3u32, 0, 49, 17, 17, 8, 21], &dev).unwrap();
    for dtype in [F32, F64] {
        let p = distil::loss::teacher_probs(&teacher.to_dtype(dtype).unwrap(), 2.0).unwrap();
        let sums = p
            .sum(1)
            .unwrap()
            .to_dtype(F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert!(
            sums.iter().all(|s| (s - 1.0).abs() < 1e-5),
            "{dtype:?}: {sums:?}"
        );
    }
    let ce = |x: &Tensor| distil::loss::cross_entropy(x, &targets).unwrap();
    assert_close(
        "cross-entropy",
        loss_and_grad(&logits, F32, &ce),
        loss_and_grad(&logits, F64, &ce),
    );
    for t in [1.0, 2.0, 4.0] {
        let kl = |x: &Tensor| {
            let p = distil::loss::teacher_probs(&teacher.to_dtype(x.dtype()).unwrap(), t).unwrap();
            distil::loss::soft_kl(x, &p, t).unwrap()
        };
        assert_close(
            &format!("soft KL at T={t}"),
            loss_and_grad(&logits, F32, &kl),
            loss_and_grad(&logits, F64, &kl),
        );
    }
    let hs = Tensor::randn(0f32, 1.0, (2, 5, 16), &dev).unwrap();
    let ht = Tensor::randn(0f32, 1.0, (2, 5, 16), &dev).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 0, 0], [1, 1, 1, 1, 1]], &dev).unwrap();
    let cos =
        |x: &Tensor| distil::loss::cosine_loss(x, &ht.to_dtype(x.dtype()).unwrap(), &mask).unwrap();
    assert_close(
        "cosine",
        loss_and_grad(&hs, F32, &cos),
        loss_and_grad(&hs, F64, &cos),
    );
}

#[test]
fn fused_embedding_lookup_matches_index_select() {
    use candle_core::Var;
    use distil::model::fused::{embedding::lookup, grads::GradSink};
    let dev = Device::Cpu;
    let (rows, width) = (50, 136); // 136: column blocks of 64, 64 and 8 in the scatter
    let vals: Vec<f32> = (0..rows * width)
        .map(|i| ((i * 37) % 101) as f32 * 0.01 - 0.5)
        .collect();
    let table = Var::from_tensor(&Tensor::from_vec(vals, (rows, width), &dev).unwrap()).unwrap();
    // Repeated ids: their rows' gradients must add up.
    let ids = vec![3u32, 7, 3, 49, 0, 7, 7];
    let n = ids.len();
    let sink = GradSink::default();
    let fused = lookup(table.as_tensor(), &ids, &sink).unwrap();
    let plain = table
        .as_tensor()
        .index_select(&Tensor::from_vec(ids.clone(), n, &dev).unwrap(), 0)
        .unwrap();
    let diff = (&fused - &plain).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    let w: Vec<f32> = (0..n * width)
        .map(|i| ((i * 13) % 17) as f32 - 8.0)
        .collect();
    let w = Tensor::from_vec(w, (n, width), &dev).unwrap();
    let mut g_fused = (&fused * &w)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(
        g_fused.get(table.as_tensor()).is_none(),
        "the fused lookup hands its gradient to the sink, not to candle"
    );
    sink.drain_into(&mut g_fused).unwrap();
    let g_plain = (&plain * &w)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let (a, b) = (
        g_fused.get(table.as_tensor()).unwrap(),
        g_plain.get(table.as_tensor()).unwrap(),
    );
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    // An id outside the table is an error that says which.
    let err = lookup(table.as_tensor(), &[2, 50], &sink).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("token id 50") && msg.contains("50 rows"),
        "{msg}"
    );
}

#[test]
fn fused_linear_rejects_a_bias_of_the_wrong_length() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((3, 4), candle_core::DType::F32, &dev).unwrap();
    let w = Tensor::zeros((5, 4), candle_core::DType::F32, &dev).unwrap();
    let b = Tensor::zeros(4, candle_core::DType::F32, &dev).unwrap();
    let err = distil::model::fused::linear::linear(&x, &w, &b, None, None, false, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bias of shape [4]") && err.contains("expected [5]"),
        "{err}"
    );
}
