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

/// A small trainable BERT (3 layers) and gradients for every parameter, all seeded.
fn small_model(seed: u64) -> (distil::model::Encoder, BTreeMap<String, Tensor>) {
    use distil::model::{Encoder, EncoderConfig, Params, Parts};
    let cfg = EncoderConfig::bert(120, 32, 3, 4, 64);
    let params = Params::random(&cfg, Parts::MLM, seed, &Device::Cpu, true).unwrap();
    let grads = params
        .vars()
        .iter()
        .enumerate()
        .map(|(i, (name, v))| {
            // A fixed function of the parameter's place and the element's (candle's own
            // generator cannot be seeded).
            let vals: Vec<f32> = (0..v.elem_count())
                .map(|j| (((i * 7919 + j) * 2654435761) % 2001) as f32 * 1e-4 - 0.1)
                .collect();
            (
                name.clone(),
                Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap(),
            )
        })
        .collect();
    (Encoder::new(cfg, params).unwrap(), grads)
}

/// Two sequences of 16 ids, the second with four padding positions at its end.
struct SmallInput {
    ids: Tensor,
    mask: Tensor,
}

impl SmallInput {
    fn new() -> Self {
        let ids: Vec<u32> = (0..2 * 16).map(|i| (i * 37 % 117 + 3) as u32).collect();
        let mut mask = vec![1u32; 32];
        mask[28..].fill(0);
        SmallInput {
            ids: Tensor::from_vec(ids, (2, 16), &Device::Cpu).unwrap(),
            mask: Tensor::from_vec(mask, (2, 16), &Device::Cpu).unwrap(),
        }
    }

    fn input(&self) -> distil::model::EncoderInput<'_> {
        distil::model::EncoderInput {
            input_ids: &self.ids,
            attention_mask: Some(&self.mask),
            token_type_ids: None,
        }
    }
}

fn params_of(enc: &distil::model::Encoder) -> BTreeMap<String, Vec<f32>> {
    enc.params
        .vars()
        .iter()
        .map(|(n, v)| {
            (
                n.clone(),
                v.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
            )
        })
        .collect()
}

/// `update_in_groups` makes each parameter what `update` makes it, and announces each group
/// (the parameters outside the blocks, then block by block) once every parameter in it is
/// final and before any parameter of a later group has moved.
#[test]
fn update_in_groups_announces_each_block_once_it_is_final() {
    let (reference, grads) = small_model(3);
    let (enc, _) = small_model(3);
    let cfg = AdamWConfig::default();
    let mut opt_ref = AdamW::new(reference.params.vars(), cfg).unwrap();
    opt_ref.update(&grads, 1e-3, 0.5).unwrap();
    let before = params_of(&enc);
    let after = params_of(&reference);
    let groups = enc.block_params();
    assert_eq!(groups.len(), 3);
    let group_of = |v: &Var| {
        groups
            .iter()
            .position(|g| g.contains(&v.as_tensor().id()))
            .map_or(0, |k| k + 1)
    };
    // Every tensor a block reads is a parameter of it.
    let ids: Vec<_> = enc
        .params
        .vars()
        .values()
        .map(|v| v.as_tensor().id())
        .collect();
    assert!(groups.iter().flatten().all(|id| ids.contains(id)));
    assert_eq!(groups.iter().map(Vec::len).sum::<usize>(), 3 * 16);
    let mut opt = AdamW::new(enc.params.vars(), cfg).unwrap();
    let mut announced = Vec::new();
    opt.update_in_groups(grads, 1e-3, 0.5, &groups, |g| {
        for (name, v) in enc.params.vars() {
            let now: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let want = if group_of(v) <= g {
                &after[name]
            } else {
                &before[name]
            };
            assert!(
                now == *want,
                "group {g} announced with {name} not as expected"
            );
        }
        announced.push(g);
    })
    .unwrap();
    assert_eq!(announced, [0, 1, 2, 3]);
    assert_eq!(params_of(&enc), after);
}

/// A [`ParamsReady`] that hides each group's true values (NaN in their place) until the
/// forward says it is about to read them, and records what it was asked.
struct Hidden {
    hidden: std::sync::Mutex<Vec<(Option<usize>, Var, Tensor)>>,
    asked: std::sync::Mutex<Vec<Option<usize>>>,
}

impl distil::model::ParamsReady for Hidden {
    fn wait(&self, block: Option<usize>) -> anyhow::Result<()> {
        self.asked.lock().unwrap().push(block);
        for (g, var, value) in self.hidden.lock().unwrap().iter() {
            if *g == block {
                var.set(value)?;
            }
        }
        Ok(())
    }
}

/// `forward_beside` reads the parameters outside the blocks only after asking for them, and
/// each block's only after asking for that block: with every group hidden until then, it
/// gives `forward`'s output bit for bit.
#[test]
fn forward_beside_reads_each_group_only_once_it_is_ready() {
    use distil::model::ForwardOptions;
    use rand::SeedableRng;
    let (enc, _) = small_model(5);
    let batch = SmallInput::new();
    let input = batch.input();
    let rng = || rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let want = enc
        .forward(&input, ForwardOptions::default(), Some(&mut rng()))
        .unwrap()
        .last_hidden_state;
    let groups = enc.block_params();
    let mut hidden = Vec::new();
    for var in enc.params.vars().values() {
        let g = groups
            .iter()
            .position(|g| g.contains(&var.as_tensor().id()));
        hidden.push((g, var.clone(), var.as_tensor().copy().unwrap()));
        var.set(&(var.as_tensor().ones_like().unwrap() * f64::NAN).unwrap())
            .unwrap();
    }
    let ready = Hidden {
        hidden: std::sync::Mutex::new(hidden),
        asked: Default::default(),
    };
    let got = enc
        .forward_beside(&input, ForwardOptions::default(), Some(&mut rng()), &ready)
        .unwrap()
        .last_hidden_state;
    assert_eq!(max_abs_diff(&got, &want), 0.0);
    assert!(got
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|x| x.is_finite()));
    assert_eq!(
        *ready.asked.lock().unwrap(),
        [None, Some(0), Some(1), Some(2)]
    );
}

/// `update_beside`, on two threads: the same parameters and the same forward output as the
/// update followed by the forward.
#[test]
fn update_beside_gives_what_updating_first_gives() {
    use distil::model::ForwardOptions;
    use distil::train::optim::update_beside;
    use rand::SeedableRng;
    let batch = SmallInput::new();
    let input = batch.input();
    let rng = || rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let cfg = AdamWConfig::default();
    let (first, grads) = small_model(7);
    let mut opt = AdamW::new(first.params.vars(), cfg).unwrap();
    opt.update(&grads, 1e-3, 1.0).unwrap();
    let want = first
        .forward(&input, ForwardOptions::default(), Some(&mut rng()))
        .unwrap()
        .last_hidden_state;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    for threads_round in 0..3 {
        let (beside, _) = small_model(7);
        let mut opt = AdamW::new(beside.params.vars(), cfg).unwrap();
        let got = pool
            .install(|| {
                update_beside(&mut opt, grads.clone(), (1e-3, 1.0), &beside, |ready| {
                    beside.forward_beside(
                        &input,
                        ForwardOptions::default(),
                        Some(&mut rng()),
                        ready,
                    )
                })
            })
            .unwrap()
            .last_hidden_state;
        assert_eq!(max_abs_diff(&got, &want), 0.0, "round {threads_round}");
        assert_eq!(
            params_of(&beside),
            params_of(&first),
            "round {threads_round}"
        );
    }
}
