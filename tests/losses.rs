//! Every loss of `distil::loss` against PyTorch (fixtures from scripts/make_loss_fixtures.py):
//! values within 1e-5 relative, gradients w.r.t. the student input within 1e-4 (relative to
//! the largest reference gradient); T² scaling; padding masked out; and the distillation
//! objective's teacher annealing and temperature schedules.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{load_io, max_abs, max_abs_diff};
use distil::distill::{DistillObjective, DistillSection};
use distil::loss::{
    attention_kl, cosine_loss, cross_entropy, masked_mse, masked_positions, mse, soft_kl,
    teacher_probs,
};
use distil::model::Encoder;
use distil::train::batch::DeviceBatch;
use distil::train::objective::{Objective, Progress};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

type Io = HashMap<String, Tensor>;

fn io() -> Io {
    load_io("losses")
}

fn scalar(t: &Tensor) -> f64 {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0] as f64
}

fn scalar64(t: &Tensor) -> f64 {
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()[0]
}

fn u32s(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32).unwrap()
}

/// `got` within `rel` of `want` (relative).
fn assert_close(what: &str, got: f64, want: f64, rel: f64) {
    let err = (got - want).abs() / want.abs().max(1e-12);
    assert!(
        err <= rel,
        "{what}: got {got}, PyTorch {want} (relative error {err:e} > {rel:e})"
    );
}

/// Loss value against the float32 and float64 PyTorch references, and the gradient.
fn check(io: &Io, key: &str, loss: &Tensor, var: &Var) {
    let got = loss.to_scalar::<f32>().unwrap() as f64;
    assert_close(key, got, scalar(&io[&format!("{key}.loss")]), 1e-5);
    assert_close(
        &format!("{key} (float64 reference)"),
        got,
        scalar64(&io[&format!("{key}.loss.f64")]),
        1e-5,
    );
    let grads = loss.backward().unwrap();
    let g = grads
        .get(var.as_tensor())
        .unwrap_or_else(|| panic!("{key}: no gradient for the student input"));
    let reference = &io[&format!("{key}.grad")];
    let d = max_abs_diff(g, reference);
    let scale = max_abs(reference);
    assert!(scale > 0.0, "{key}: the reference gradient is all zero");
    assert!(
        d / scale <= 1e-4,
        "{key}: gradient differs from PyTorch by {d} (reference max {scale})"
    );
}

/// Student logits (a Var over the whole batch) restricted to the soft positions.
fn soft_rows(logits: &Tensor, positions: &Tensor) -> Tensor {
    let v = logits.dim(2).unwrap();
    logits
        .reshape(((), v))
        .unwrap()
        .index_select(positions, 0)
        .unwrap()
}

fn soft_at(io: &Io, t: f64) -> (Tensor, Var) {
    let var = Var::from_tensor(&io["soft.student_logits"]).unwrap();
    let pos = u32s(&io["soft.positions"]);
    let teacher = soft_rows(&io["soft.teacher_logits"], &pos);
    let p = teacher_probs(&teacher, t).unwrap();
    let loss = soft_kl(&soft_rows(var.as_tensor(), &pos), &p, t).unwrap();
    (loss, var)
}

#[test]
fn soft_kl_matches_kldivloss_batchmean_times_t_squared() {
    let io = io();
    for t in [1u32, 2, 4] {
        let key = format!("soft.T{t}");
        // The teacher's distribution at temperature T.
        let pos = u32s(&io["soft.positions"]);
        let p = teacher_probs(&soft_rows(&io["soft.teacher_logits"], &pos), t as f64).unwrap();
        let d = max_abs_diff(&p, &io[&format!("{key}.teacher_probs")]);
        assert!(d < 1e-6, "{key}: teacher probabilities differ by {d}");
        let (loss, var) = soft_at(&io, t as f64);
        check(&io, &key, &loss, &var);
    }
}

#[test]
fn soft_kl_t_squared_scaling() {
    let io = io();
    let value = |t: f64| soft_at(&io, t).0.to_scalar::<f32>().unwrap() as f64;
    let (l1, l2, l4) = (value(1.0), value(2.0), value(4.0));
    let (r1, r2, r4) = (
        scalar64(&io["soft.T1.loss.f64"]),
        scalar64(&io["soft.T2.loss.f64"]),
        scalar64(&io["soft.T4.loss.f64"]),
    );
    // The ratios between temperatures are PyTorch's (a missing or doubled T² would be off by 16×).
    assert_close("loss(T=4) / loss(T=1)", l4 / l1, r4 / r1, 1e-5);
    assert_close("loss(T=2) / loss(T=1)", l2 / l1, r2 / r1, 1e-5);
    // And explicitly: soft_kl at T is T² × the plain batch-mean KL of the softened logits.
    let pos = u32s(&io["soft.positions"]);
    let s = soft_rows(&io["soft.student_logits"], &pos);
    let t = soft_rows(&io["soft.teacher_logits"], &pos);
    for temp in [2.0f64, 4.0] {
        let plain = soft_kl(
            &(&s / temp).unwrap(),
            &teacher_probs(&(&t / temp).unwrap(), 1.0).unwrap(),
            1.0,
        )
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
        assert_close(
            &format!("T = {temp}: T² · KL"),
            value(temp),
            temp * temp * plain,
            1e-5,
        );
    }
    // The soft loss only looks at its rows: the other rows of the logits get no gradient.
    let (loss, var) = soft_at(&io, 2.0);
    let g = loss.backward().unwrap();
    let g = g.get(var.as_tensor()).unwrap();
    let g_rows: Vec<Vec<f32>> = g
        .reshape(((), g.dim(2).unwrap()))
        .unwrap()
        .abs()
        .unwrap()
        .to_vec2()
        .unwrap();
    let sel: Vec<i64> = io["soft.positions"].to_vec1().unwrap();
    for (i, row) in g_rows.iter().enumerate() {
        let selected = sel.contains(&(i as i64));
        assert_eq!(
            row.iter().any(|&x| x > 0.0),
            selected,
            "row {i}: gradient only on selected rows"
        );
    }
}

#[test]
fn mlm_cross_entropy_matches_pytorch_with_ignore_index() {
    let io = io();
    let labels: Vec<i64> = io["mlm.labels"].flatten_all().unwrap().to_vec1().unwrap();
    let targets = masked_positions(&labels, &Device::Cpu).unwrap();
    assert_eq!(targets.count, labels.iter().filter(|&&l| l != -100).count());
    let var = Var::from_tensor(&io["mlm.logits"]).unwrap();
    let rows = soft_rows(var.as_tensor(), &targets.positions);
    let loss = cross_entropy(&rows, &targets.targets).unwrap();
    check(&io, "mlm", &loss, &var);
    // Labels other than token ids and -100 are an error, not silently ignored.
    assert!(masked_positions(&[3, -1, -100], &Device::Cpu).is_err());
}

fn mask(io: &Io) -> Tensor {
    u32s(&io["mask"])
}

/// Rows (batch, position) that are padding.
fn padded(io: &Io) -> Vec<(usize, usize)> {
    let m: Vec<Vec<u32>> = mask(io).to_vec2().unwrap();
    let mut out = Vec::new();
    for (b, row) in m.iter().enumerate() {
        for (s, &v) in row.iter().enumerate() {
            if v == 0 {
                out.push((b, s));
            }
        }
    }
    assert!(!out.is_empty(), "the fixture batch has padding");
    out
}

/// `x` with the padded positions of dim 1 (`[b, s, ..]`) or dim 2 (`[b, h, s, ..]`)
/// replaced by other values.
fn perturb_padding(x: &Tensor, pad: &[(usize, usize)], seq_dim: usize) -> Tensor {
    let dims = x.dims().to_vec();
    let mut v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let strides: Vec<usize> = (0..dims.len())
        .map(|i| dims[i + 1..].iter().product())
        .collect();
    for (i, val) in v.iter_mut().enumerate() {
        let b = i / strides[0];
        let s = (i / strides[seq_dim]) % dims[seq_dim];
        if pad.contains(&(b, s)) {
            *val = *val * -3.0 + 0.25 + (i % 7) as f32 * 0.1;
        }
    }
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

/// The gradient is exactly zero on padded rows.
fn assert_no_grad_on_padding(g: &Tensor, pad: &[(usize, usize)], seq_dim: usize, what: &str) {
    let z = perturb_padding(
        &Tensor::zeros(g.shape(), DType::F32, &Device::Cpu).unwrap(),
        pad,
        seq_dim,
    );
    // `z` is non-zero exactly on padded rows.
    let on_pad = (g * z.ne(0f32).unwrap().to_dtype(DType::F32).unwrap()).unwrap();
    assert_eq!(max_abs(&on_pad), 0.0, "{what}: gradient on padded rows");
}

#[test]
fn cosine_loss_matches_distilbert_and_ignores_padding() {
    let io = io();
    let m = mask(&io);
    let var = Var::from_tensor(&io["cos.student"]).unwrap();
    let loss = cosine_loss(var.as_tensor(), &io["cos.teacher"], &m).unwrap();
    check(&io, "cos", &loss, &var);
    let pad = padded(&io);
    let g = loss.backward().unwrap();
    assert_no_grad_on_padding(g.get(var.as_tensor()).unwrap(), &pad, 1, "cosine");
    let moved = cosine_loss(
        &perturb_padding(&io["cos.student"], &pad, 1),
        &perturb_padding(&io["cos.teacher"], &pad, 1),
        &m,
    )
    .unwrap();
    assert_eq!(
        moved.to_scalar::<f32>().unwrap(),
        loss.to_scalar::<f32>().unwrap(),
        "changing padded rows changed the cosine loss"
    );
    // Without the mask the padded rows would count: the fixture is built so that matters.
    let all = cosine_loss(var.as_tensor(), &io["cos.teacher"], &m.ones_like().unwrap()).unwrap();
    assert!((scalar(&all) - scalar(&loss)).abs() > 1e-2);
}

#[test]
fn mse_matches_pytorch() {
    let io = io();
    let var = Var::from_tensor(&io["mse.a"]).unwrap();
    let loss = mse(var.as_tensor(), &io["mse.b"]).unwrap();
    check(&io, "mse", &loss, &var);
}

#[test]
fn masked_mse_matches_pytorch_and_ignores_padding() {
    let io = io();
    let m = mask(&io);
    let var = Var::from_tensor(&io["mse.a"]).unwrap();
    let loss = masked_mse(var.as_tensor(), &io["mse.b"], &m).unwrap();
    check(&io, "mmse", &loss, &var);
    let pad = padded(&io);
    let g = loss.backward().unwrap();
    assert_no_grad_on_padding(g.get(var.as_tensor()).unwrap(), &pad, 1, "masked MSE");
    let moved = masked_mse(
        &perturb_padding(&io["mse.a"], &pad, 1),
        &perturb_padding(&io["mse.b"], &pad, 1),
        &m,
    )
    .unwrap();
    assert_eq!(
        moved.to_scalar::<f32>().unwrap(),
        loss.to_scalar::<f32>().unwrap(),
        "changing padded rows changed the masked MSE"
    );
}

#[test]
fn attention_kl_matches_minilm_definition_and_ignores_padding() {
    let io = io();
    let m = mask(&io);
    let var = Var::from_tensor(&io["attn.student"]).unwrap();
    let loss = attention_kl(var.as_tensor(), &io["attn.teacher"], &m).unwrap();
    check(&io, "attn", &loss, &var);
    let pad = padded(&io);
    let g = loss.backward().unwrap();
    // Padded *query* rows ([b, h, s, :]) carry no loss and get no gradient.
    assert_no_grad_on_padding(g.get(var.as_tensor()).unwrap(), &pad, 2, "attention KL");
    let moved = attention_kl(
        &perturb_padding(&io["attn.student"], &pad, 2).abs().unwrap(),
        &perturb_padding(&io["attn.teacher"], &pad, 2).abs().unwrap(),
        &m,
    )
    .unwrap();
    assert_eq!(
        moved.to_scalar::<f32>().unwrap(),
        loss.to_scalar::<f32>().unwrap(),
        "changing padded query rows changed the attention loss"
    );
    // KL(p ‖ p) = 0, and the direction is KL(teacher ‖ student): swapping the arguments
    // gives a different value on this fixture.
    let same = attention_kl(&io["attn.teacher"], &io["attn.teacher"], &m).unwrap();
    assert!(scalar(&same).abs() < 1e-7);
    let swapped = attention_kl(&io["attn.teacher"], &io["attn.student"], &m).unwrap();
    assert!((scalar(&swapped) - scalar(&loss)).abs() > 1e-3);
    // Different head counts are a clear error.
    let fewer = io["attn.student"].narrow(1, 0, 2).unwrap();
    let err = attention_kl(&fewer, &io["attn.teacher"], &m).unwrap_err();
    assert!(err.to_string().contains("head"), "{err}");
}

// --- the distillation objective: annealing and temperature -----------------------------

fn teacher() -> Encoder {
    common::fixture_teacher()
}

/// A one-layer DistilBERT-style student from the teacher's layer 0, without dropout.
fn student(teacher: &Encoder) -> Encoder {
    common::distilbert_student(teacher, 1, false)
}

fn distill_batch(io: &Io) -> DeviceBatch {
    common::distill_batch(io)
}

fn section(yaml: &str) -> DistillSection {
    serde_yaml::from_str(yaml).unwrap()
}

/// Step `step` of a 101-step run: the fraction of the run done is `step / 100`, from 0 at
/// the first step to 1 at the last.
fn at(step: u64) -> Progress {
    Progress {
        step,
        total_steps: 101,
    }
}

fn part(parts: &[(&'static str, f64)], name: &str) -> Option<f64> {
    parts.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
}

#[test]
fn annealing_lambda_at_the_ends_and_middle() {
    let t = teacher();
    let s = student(&t);
    let full = section("teacher: tests/fixtures/bert\nannealing: {start: 0, end: 1, span: 1.0}\n");
    let obj = DistillObjective::new(vec![&t], &s, full, 0).unwrap();
    for (step, want) in [(0, 0.0), (25, 0.25), (50, 0.5), (100, 1.0)] {
        let l = obj.lambda(at(step)).unwrap();
        assert!((l - want).abs() < 1e-12, "span 1: λ at {step}% is {l}");
    }
    let half = section("teacher: x\nannealing: {start: 0, end: 1, span: 0.5}\n");
    let obj = DistillObjective::new(vec![&t], &s, half, 0).unwrap();
    for (step, want) in [(0, 0.0), (25, 0.5), (50, 1.0), (75, 1.0), (100, 1.0)] {
        let l = obj.lambda(at(step)).unwrap();
        assert!((l - want).abs() < 1e-12, "span 0.5: λ at {step}% is {l}");
    }
    let partial = section("teacher: x\nannealing: {start: 0.2, end: 0.8}\n");
    let obj = DistillObjective::new(vec![&t], &s, partial, 0).unwrap();
    assert!((obj.lambda(at(50)).unwrap() - 0.5).abs() < 1e-12);
    assert!((obj.lambda(at(100)).unwrap() - 0.8).abs() < 1e-12);
    // No annealing: no λ, the weights stay as given.
    let none = section("teacher: x\n");
    let obj = DistillObjective::new(vec![&t], &s, none, 0).unwrap();
    assert!(obj.lambda(at(50)).is_none());
}

#[test]
fn annealing_moves_the_weight_from_soft_to_hard_targets() {
    let fx = load_io("distill");
    let t = teacher();
    let s = student(&t);
    let batch = distill_batch(&fx);
    let yaml = "teacher: x\ntemperature: 2\nlosses: {soft: 5.0, hard: 2.0, cosine: 1.0}\n\
                annealing: {start: 0, end: 1, span: 1.0}\n";
    let obj = DistillObjective::new(vec![&t], &s, section(yaml), 0).unwrap();
    let soft_ref = scalar(&fx["soft.T2"]);
    let hard_ref = scalar(&fx["hard"]);
    let cos_ref = scalar(&fx["cos"]);
    for (step, lambda) in [(0u64, 0.0f64), (50, 0.5), (100, 1.0)] {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let l = obj.loss(&s, &batch, at(step), &mut rng).unwrap();
        let parts = &l.parts;
        assert_eq!(part(parts, "lambda"), Some(lambda));
        assert_eq!(part(parts, "temperature"), Some(2.0));
        let hard = part(parts, "loss_hard").expect("hard loss logged");
        let cos = part(parts, "loss_cosine").expect("cosine loss logged");
        assert_close("hard (MLM) part vs PyTorch", hard, hard_ref, 1e-4);
        assert_close("cosine part vs PyTorch", cos, cos_ref, 1e-4);
        let soft = part(parts, "loss_soft");
        // The effective weights: soft 5·(1 − λ), hard 2·λ.
        let (w_soft, w_hard) = (5.0 * (1.0 - lambda), 2.0 * lambda);
        let mut want = w_hard * hard + cos;
        if w_soft > 0.0 {
            let soft = soft.expect("soft loss logged while its weight is > 0");
            assert_close("soft part vs PyTorch (T = 2)", soft, soft_ref, 1e-4);
            want += w_soft * soft;
        } else {
            assert!(
                soft.is_none(),
                "at λ = 1 the teacher's logits are not needed"
            );
        }
        let total = l.loss.to_scalar::<f32>().unwrap() as f64;
        assert_close(&format!("total at λ = {lambda}"), total, want, 1e-5);
        // Against PyTorch's own weighted sum at λ = 0.5.
        if step == 50 {
            assert_close(
                "total vs PyTorch at λ = 0.5",
                total,
                scalar(&fx["total"]),
                1e-4,
            );
        }
    }
    // λ = 0: the hard loss is logged but contributes nothing (its weight is 0).
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let l0 = obj.loss(&s, &batch, at(0), &mut rng).unwrap();
    let total0 = l0.loss.to_scalar::<f32>().unwrap() as f64;
    let soft0 = part(&l0.parts, "loss_soft").unwrap();
    let cos0 = part(&l0.parts, "loss_cosine").unwrap();
    assert_close(
        "λ = 0: total = 5·soft + cos",
        total0,
        5.0 * soft0 + cos0,
        1e-5,
    );
}

#[test]
fn temperature_schedule_reaches_its_end() {
    let fx = load_io("distill");
    let t = teacher();
    let s = student(&t);
    let batch = distill_batch(&fx);
    let yaml = "teacher: x\ntemperature: 4\ntemperature_end: 1\nlosses: {soft: 1.0}\n";
    let obj = DistillObjective::new(vec![&t], &s, section(yaml), 0).unwrap();
    for (step, temp, key) in [
        (0u64, 4.0, "soft.T4"),
        (50, 2.5, "soft.T2.5"),
        (100, 1.0, "soft.T1"),
    ] {
        assert!((obj.temperature(at(step)) - temp).abs() < 1e-12);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let l = obj.loss(&s, &batch, at(step), &mut rng).unwrap();
        assert_eq!(part(&l.parts, "temperature"), Some(temp));
        assert!(part(&l.parts, "lambda").is_none());
        let soft = part(&l.parts, "loss_soft").unwrap();
        assert_close(
            &format!("soft loss at T = {temp}"),
            soft,
            scalar(&fx[key]),
            1e-4,
        );
        assert_close(
            "total = soft",
            l.loss.to_scalar::<f32>().unwrap() as f64,
            soft,
            1e-6,
        );
    }
    // Without temperature_end the temperature is constant.
    let fixed =
        DistillObjective::new(vec![&t], &s, section("teacher: x\ntemperature: 3\n"), 0).unwrap();
    assert_eq!(fixed.temperature(at(0)), 3.0);
    assert_eq!(fixed.temperature(at(100)), 3.0);
}

// --- float64: each loss against PyTorch's float64 value ---------------------------------

fn f64_of(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F64).unwrap()
}

fn assert_f64(key: &str, loss: candle_core::Result<Tensor>) {
    let io = io();
    let got = loss.unwrap().to_scalar::<f64>().unwrap();
    assert_close(
        &format!("{key} in float64"),
        got,
        scalar64(&io[&format!("{key}.loss.f64")]),
        1e-6,
    );
}

#[test]
fn soft_mlm_mse_in_float64_match_pytorch_float64() {
    let io = io();
    let pos = u32s(&io["soft.positions"]);
    for t in [1u32, 2, 4] {
        let s = soft_rows(&f64_of(&io["soft.student_logits"]), &pos);
        let p = teacher_probs(
            &soft_rows(&f64_of(&io["soft.teacher_logits"]), &pos),
            t as f64,
        )
        .unwrap();
        assert_f64(
            &format!("soft.T{t}"),
            Ok(soft_kl(&s, &p, t as f64).unwrap()),
        );
    }
    let labels: Vec<i64> = io["mlm.labels"].flatten_all().unwrap().to_vec1().unwrap();
    let tg = masked_positions(&labels, &Device::Cpu).unwrap();
    let rows = soft_rows(&f64_of(&io["mlm.logits"]), &tg.positions);
    assert_f64("mlm", Ok(cross_entropy(&rows, &tg.targets).unwrap()));
    assert_f64(
        "mse",
        Ok(mse(&f64_of(&io["mse.a"]), &f64_of(&io["mse.b"])).unwrap()),
    );
}

#[test]
fn masked_losses_in_float64_match_pytorch_float64() {
    let io = io();
    let m = mask(&io);
    let cos = cosine_loss(&f64_of(&io["cos.student"]), &f64_of(&io["cos.teacher"]), &m);
    assert_f64(
        "cos",
        cos.map_err(|e| candle_core::Error::Msg(format!("{e:#}"))),
    );
    let mm = masked_mse(&f64_of(&io["mse.a"]), &f64_of(&io["mse.b"]), &m);
    assert_f64(
        "mmse",
        mm.map_err(|e| candle_core::Error::Msg(format!("{e:#}"))),
    );
    let at = attention_kl(
        &f64_of(&io["attn.student"]),
        &f64_of(&io["attn.teacher"]),
        &m,
    );
    assert_f64(
        "attn",
        at.map_err(|e| candle_core::Error::Msg(format!("{e:#}"))),
    );
}
