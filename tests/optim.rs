//! AdamW against torch.optim.AdamW (fixture from scripts/make_fixtures.py): two parameter
//! groups (decay / no decay), a changing learning rate, a gradient scale, saved/restored state.

mod common;

use candle_core::{Device, Tensor, Var};
use common::{load_io, max_abs_diff};
use distil::train::optim::{AdamW, AdamWConfig};
use std::collections::BTreeMap;

#[test]
fn adamw_matches_pytorch_and_resumes_exactly() {
    let io = load_io("optim");
    let names = ["w.weight", "w.bias"];
    let vars: BTreeMap<String, Var> = names
        .iter()
        .map(|n| {
            (
                n.to_string(),
                Var::from_tensor(&io[&format!("init.{n}")]).unwrap(),
            )
        })
        .collect();
    let cfg = AdamWConfig {
        weight_decay: 0.1,
        ..Default::default()
    };
    let mut opt = AdamW::new(&vars, cfg).unwrap();
    let lrs: Vec<f32> = io["lrs"].to_vec1().unwrap();
    let scales: Vec<f32> = io["scales"].to_vec1().unwrap();
    let grads_at = |step: usize| -> BTreeMap<String, Tensor> {
        names
            .iter()
            .map(|n| (n.to_string(), io[&format!("grad{step}.{n}")].clone()))
            .collect()
    };
    let mut saved = None;
    for step in 0..3 {
        opt.update(&grads_at(step), lrs[step] as f64, scales[step] as f64)
            .unwrap();
        for n in names {
            let d = max_abs_diff(vars[n].as_tensor(), &io[&format!("after{step}.{n}")]);
            assert!(d < 1e-6, "step {step}: {n} differs from PyTorch by {d}");
        }
        if step == 0 {
            let params: BTreeMap<String, Tensor> = vars
                .iter()
                .map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap()))
                .collect();
            saved = Some((opt.state().unwrap(), params));
        }
    }
    // Restore after step 0 into a fresh optimizer: steps 1 and 2 give the same numbers.
    let (state, params) = saved.unwrap();
    let vars2: BTreeMap<String, Var> = params
        .iter()
        .map(|(k, t)| (k.clone(), Var::from_tensor(t).unwrap()))
        .collect();
    let mut opt2 = AdamW::new(&vars2, cfg).unwrap();
    opt2.load_state(&state, 1).unwrap();
    for step in 1..3 {
        opt2.update(&grads_at(step), lrs[step] as f64, scales[step] as f64)
            .unwrap();
    }
    for n in names {
        assert_eq!(max_abs_diff(vars2[n].as_tensor(), vars[n].as_tensor()), 0.0);
    }
    // A state for another shape is refused with the key named.
    let mut bad = state.clone();
    bad.insert(
        "m.w.bias".into(),
        Tensor::zeros(7, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let err = opt2.load_state(&bad, 1).unwrap_err().to_string();
    assert!(err.contains("m.w.bias"), "{err}");
}
