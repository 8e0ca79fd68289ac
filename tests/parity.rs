//! Forward and gradient parity with Hugging Face `transformers` on committed fixtures
//! (made by `scripts/make_fixtures.py`): tiny random BERT, RoBERTa, DistilBERT and ALBERT.

mod common;

use candle_core::Device;
use common::{fixture_dir, ids, load_io, max_abs, max_abs_diff};
use distil::loss::{cross_entropy, masked_positions};
use distil::model::names::from_canonical;
use distil::model::{load_encoder, EncoderInput, ForwardOptions, LoadOptions};

const LAYOUTS: [&str; 4] = ["bert", "roberta", "distilbert", "albert"];

fn check_forward(layout: &str) {
    let dir = fixture_dir(layout);
    let io = load_io(layout);
    let (mut enc, report) =
        load_encoder(&dir, &Device::Cpu, &LoadOptions::default()).expect("load fixture model");
    assert!(report.initialised_fresh.is_empty(), "{report:?}");
    let input_ids = ids(&io, "input_ids").unwrap();
    let mask = ids(&io, "attention_mask").unwrap();
    let tt = ids(&io, "token_type_ids");
    // The fused CPU kernels (attention fused only when the probabilities are not asked for)
    // and candle's composed ops.
    for (fused, attentions) in [(true, false), (true, true), (false, true)] {
        enc.set_fused(fused);
        let what = format!("{layout} (fused {fused}, attentions {attentions})");
        let out = enc
            .forward(
                &EncoderInput {
                    input_ids: &input_ids,
                    attention_mask: Some(&mask),
                    token_type_ids: tt.as_ref(),
                },
                ForwardOptions {
                    hidden_states: true,
                    attentions,
                },
                None,
            )
            .unwrap();
        let n_hidden = io
            .keys()
            .filter(|k| k.starts_with("hidden_states."))
            .count();
        let n_attn = io.keys().filter(|k| k.starts_with("attentions.")).count();
        assert_eq!(
            out.hidden_states.len(),
            n_hidden,
            "{what}: hidden state count"
        );
        assert_eq!(
            out.attentions.len(),
            if attentions { n_attn } else { 0 },
            "{what}: attention count"
        );
        for (i, h) in out.hidden_states.iter().enumerate() {
            let d = max_abs_diff(h, &io[&format!("hidden_states.{i}")]);
            assert!(d < 1e-4, "{what}: hidden_states.{i} differs by {d}");
        }
        for (i, a) in out.attentions.iter().enumerate() {
            let d = max_abs_diff(a, &io[&format!("attentions.{i}")]);
            assert!(d < 1e-4, "{what}: attentions.{i} differs by {d}");
        }
        let logits = enc.mlm_logits(&out.last_hidden_state).unwrap();
        let d = max_abs_diff(&logits, &io["logits"]);
        assert!(d < 1e-4, "{what}: logits differ by {d}");
    }
}

fn check_gradients(layout_name: &str, fused: bool) {
    let dir = fixture_dir(layout_name);
    let io = load_io(layout_name);
    let (mut enc, _) = load_encoder(&dir, &Device::Cpu, &LoadOptions::default()).unwrap();
    enc.set_fused(fused);
    let layout = format!("{layout_name} (fused {fused})");
    let input_ids = ids(&io, "input_ids").unwrap();
    let mask = ids(&io, "attention_mask").unwrap();
    let tt = ids(&io, "token_type_ids");
    let labels: Vec<i64> = io["labels"].flatten_all().unwrap().to_vec1().unwrap();
    let targets = masked_positions(&labels, &Device::Cpu).unwrap();
    let out = enc
        .forward(
            &EncoderInput {
                input_ids: &input_ids,
                attention_mask: Some(&mask),
                token_type_ids: tt.as_ref(),
            },
            ForwardOptions::default(),
            None,
        )
        .unwrap();
    let logits = enc
        .mlm_logits_at(&out.last_hidden_state, &targets.positions)
        .unwrap();
    let loss = cross_entropy(&logits, &targets.targets).unwrap();
    let expected: Vec<f32> = io["loss"].flatten_all().unwrap().to_vec1().unwrap();
    let got = loss.to_scalar::<f32>().unwrap();
    assert!(
        (got - expected[0]).abs() < 1e-4,
        "{layout}: loss {got} vs {}",
        expected[0]
    );
    let grads = enc.backward(&loss).unwrap();
    let mut checked = 0;
    let inner = enc.cfg.inner_group_num;
    let layout_enum = enc.cfg.layout;
    for (name, var) in enc.params.vars() {
        let hf = from_canonical(layout_enum, name, inner).expect("name maps back");
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{layout}: parameter {name} got no gradient"));
        let g_max = max_abs(g);
        let reference = io
            .get(&format!("grad.{hf}"))
            .unwrap_or_else(|| panic!("{layout}: no reference gradient for {hf}"));
        checked += 1;
        if name.ends_with("attention.self.key.bias") {
            // A key bias shifts every score of a query by the same amount, which softmax
            // ignores: its true gradient is zero, and both frameworks give float noise.
            assert!(
                g_max < 1e-6,
                "{layout}: key bias {name} gradient {g_max} should be ~0"
            );
            assert!(max_abs(reference) < 1e-6);
            continue;
        }
        assert!(
            g_max > 0.0,
            "{layout}: parameter {name} got an all-zero gradient"
        );
        let d = max_abs_diff(g, reference);
        let scale = max_abs(reference).max(1e-6);
        assert!(
            d / scale < 1e-3,
            "{layout}: gradient of {name} ({hf}) differs: max abs diff {d}, reference max {scale}"
        );
    }
    let reference_count = io.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(
        checked, reference_count,
        "{layout}: every PyTorch parameter has a counterpart"
    );
}

#[test]
fn forward_matches_transformers() {
    for l in LAYOUTS {
        check_forward(l);
    }
}

#[test]
fn gradients_match_pytorch() {
    for l in LAYOUTS {
        check_gradients(l, true);
        check_gradients(l, false);
    }
}
