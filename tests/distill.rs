//! The distillation objective end to end on the tiny BERT fixture: the teacher stays frozen
//! through real training steps (bitwise-unchanged weights, no Vars, no gradient), the student's
//! gradient matches PyTorch's for DistilBERT's weighted loss, and a born-again student equal
//! to its teacher has ~0 soft and cosine losses in eval mode.

mod common;

use candle_core::{DType, Tensor};
use common::{load_io, max_abs, max_abs_diff};
use distil::distill::{DistillObjective, DistillSection};
use distil::loss::{soft_kl, teacher_probs};
use distil::model::names::from_canonical;
use distil::model::{Encoder, ForwardOptions, Layout};
use distil::train::batch::DeviceBatch;
use distil::train::objective::{Objective, Progress};
use distil::train::optim::{AdamW, AdamWConfig};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, HashMap};

type Io = HashMap<String, Tensor>;

fn teacher() -> Encoder {
    common::fixture_teacher()
}

fn student(teacher: &Encoder, layers: usize, dropout: bool) -> Encoder {
    common::distilbert_student(teacher, layers, dropout)
}

fn batch(io: &Io) -> DeviceBatch {
    common::distill_batch(io)
}

fn section(yaml: &str) -> DistillSection {
    serde_yaml::from_str(yaml).unwrap()
}

/// The exact bits of every tensor.
fn bits(tensors: &BTreeMap<String, Tensor>) -> BTreeMap<String, Vec<u32>> {
    tensors
        .iter()
        .map(|(k, t)| {
            let v: Vec<f32> = t
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            (k.clone(), v.iter().map(|x| x.to_bits()).collect())
        })
        .collect()
}

#[test]
fn teacher_is_frozen_through_training_steps() {
    let io = load_io("distill");
    let t = teacher();
    assert!(t.params.vars().is_empty(), "the teacher has trainable Vars");
    assert!(!t.params.is_trainable());
    let before = bits(t.params.tensors());
    let s = student(&t, 1, true);
    let student_before = bits(s.params.tensors());
    let b = batch(&io);
    let eval_logits = |m: &Encoder| {
        let out = m
            .forward(&b.input(), ForwardOptions::default(), None)
            .unwrap();
        m.mlm_logits(&out.last_hidden_state).unwrap()
    };
    let teacher_logits_before = eval_logits(&t);
    // Every loss that reads the teacher: logits (soft, logit MSE), last hidden state
    // (cosine), mapped hidden states (MSE) and attentions (KL).
    let yaml = "teacher: x\nlosses: {soft: 5.0, hard: 2.0, cosine: 1.0, logit_mse: 0.1, \
                hidden_mse: 1.0, attention_kl: 1.0}\nannealing: {span: 1.0}\n";
    let obj = DistillObjective::new(vec![&t], &s, section(yaml), 0).unwrap();
    let mut vars = s.params.vars().clone();
    for (k, v) in obj.extra_vars() {
        vars.insert(format!("objective.{k}"), v);
    }
    assert!(!vars.is_empty());
    let mut opt = AdamW::new(&vars, AdamWConfig::default()).unwrap();
    let total = 4;
    for step in 0..total {
        let mut rng = ChaCha8Rng::seed_from_u64(step);
        let progress = Progress {
            step,
            total_steps: total,
        };
        let l = obj.loss(&s, &b, progress, &mut rng).unwrap();
        for name in ["loss_soft", "loss_hard", "loss_cosine", "loss_hidden_mse"] {
            assert!(
                l.parts.iter().any(|(k, _)| *k == name),
                "step {step}: {name} missing from {:?}",
                l.parts
            );
        }
        let grads = s.backward(&l.loss).unwrap();
        for (name, tensor) in t.params.tensors() {
            assert!(
                grads.get(tensor).is_none(),
                "step {step}: the gradient store holds a gradient for teacher tensor {name}"
            );
        }
        let mut g = BTreeMap::new();
        for (name, var) in &vars {
            let gv = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("step {step}: student var {name} got no gradient"));
            g.insert(name.clone(), gv.clone());
        }
        opt.update(&g, 1e-3, 1.0).unwrap();
    }
    assert_eq!(
        bits(t.params.tensors()),
        before,
        "the teacher's weights changed during training"
    );
    assert_eq!(
        max_abs_diff(&eval_logits(&t), &teacher_logits_before),
        0.0,
        "the teacher's output changed during training"
    );
    let after = bits(s.params.tensors());
    let changed = after
        .iter()
        .filter(|(k, v)| student_before[*k] != **v)
        .count();
    assert_eq!(
        changed,
        after.len(),
        "every student parameter is updated ({changed} of {} changed)",
        after.len()
    );
}

#[test]
fn student_gradient_matches_pytorch_for_distilbert_loss() {
    // 5·(1 − λ)·soft(T=2) + 2·λ·hard + 1·cos at λ = 0.5, no dropout: d/dθ vs PyTorch.
    let io = load_io("distill");
    let t = teacher();
    let s = student(&t, 1, false);
    let b = batch(&io);
    let yaml = "teacher: x\ntemperature: 2\nlosses: {soft: 5.0, hard: 2.0, cosine: 1.0}\n\
                annealing: {start: 0, end: 1, span: 1.0}\n";
    let obj = DistillObjective::new(vec![&t], &s, section(yaml), 0).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    // Step 1 of a 3-step run: half way, λ = 0.5.
    let progress = Progress {
        step: 1,
        total_steps: 3,
    };
    let l = obj.loss(&s, &b, progress, &mut rng).unwrap();
    let total = l.loss.to_scalar::<f32>().unwrap();
    let want = io["total"].to_vec1::<f32>().unwrap()[0];
    assert!(
        ((total - want) / want).abs() < 1e-4,
        "total {total} vs PyTorch {want}"
    );
    let grads = s.backward(&l.loss).unwrap();
    let mut checked = 0;
    for (name, var) in s.params.vars() {
        let hf = from_canonical(Layout::Bert, name, 1).expect("name maps to BERT");
        let reference = io
            .get(&format!("grad.{hf}"))
            .unwrap_or_else(|| panic!("no PyTorch gradient for {hf}"));
        let g = grads.get(var.as_tensor()).unwrap();
        let scale = max_abs(reference);
        if name.ends_with("attention.self.key.bias") {
            // Softmax ignores a per-query shift: the true gradient is 0 (float noise both sides).
            assert!(max_abs(g) < 1e-5 && scale < 1e-5);
            continue;
        }
        let d = max_abs_diff(g, reference);
        assert!(
            d / scale < 1e-3,
            "gradient of {name} ({hf}): max abs diff {d}, reference max {scale}"
        );
        checked += 1;
    }
    assert!(checked >= 20, "checked {checked} gradients");
}

#[test]
fn born_again_student_has_zero_soft_loss_in_eval_mode() {
    let io = load_io("distill");
    let t = teacher();
    // Same depth, DistilBERT layout: the born-again initialisation computes the teacher's
    // function exactly.
    let s = student(&t, t.cfg.num_layers, false);
    let b = batch(&io);
    let opts = ForwardOptions::default();
    let t_out = t.forward(&b.input(), opts, None).unwrap();
    let s_out = s.forward(&b.input(), opts, None).unwrap();
    let pos = &b.masked.positions;
    let tl = t.mlm_logits_at(&t_out.last_hidden_state, pos).unwrap();
    let sl = s.mlm_logits_at(&s_out.last_hidden_state, pos).unwrap();
    let kl = soft_kl(&sl, &teacher_probs(&tl, 2.0).unwrap(), 2.0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(kl.abs() < 1e-6, "KL of identical distributions is {kl}");

    // Through the objective: the student has no dropout, and the teacher (whose config has
    // dropout 0.1) runs in eval mode, so the soft and cosine losses are ~0.
    let yaml = "teacher: x\ntemperature: 2\nlosses: {soft: 5.0, hard: 2.0, cosine: 1.0}\n";
    let obj = DistillObjective::new(vec![&t], &s, section(yaml), 0).unwrap();
    let progress = Progress {
        step: 0,
        total_steps: 1,
    };
    let l = obj
        .loss(&s, &b, progress, &mut ChaCha8Rng::seed_from_u64(0))
        .unwrap();
    let part = |n: &str| l.parts.iter().find(|(k, _)| *k == n).unwrap().1;
    assert!(part("loss_soft").abs() < 1e-6, "soft {}", part("loss_soft"));
    assert!(
        part("loss_cosine").abs() < 1e-6,
        "cosine {}",
        part("loss_cosine")
    );
    assert!(part("loss_hard") > 0.1);

    // Sensitivity: the same student in training mode (dropout 0.1) is not identical.
    let noisy = student(&t, t.cfg.num_layers, true);
    let obj = DistillObjective::new(vec![&t], &noisy, section(yaml), 0).unwrap();
    let l = obj
        .loss(&noisy, &b, progress, &mut ChaCha8Rng::seed_from_u64(0))
        .unwrap();
    let soft = l.parts.iter().find(|(k, _)| *k == "loss_soft").unwrap().1;
    assert!(
        soft > 1e-4,
        "dropout should perturb the student: soft {soft}"
    );
}
