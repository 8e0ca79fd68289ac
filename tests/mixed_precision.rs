//! Mixed precision (`training.bf16` / `training.fp16`) checked on the CPU, where it is not
//! offered to recipes but where the library's plumbing runs all the same (candle has bf16 and
//! f16 matmuls on the CPU): the matmuls in half precision with f32 weights and gradients
//! stay close to the f32 model, and fp16 training with dynamic loss scaling skips the steps
//! whose scaled gradients overflow, halving the scale, without touching the weights.

mod common;

use candle_core::{DType, Device};
use common::{fixture_dir, ids, load_io, max_abs, max_abs_diff};
use distil::loss::{cross_entropy, masked_positions};
use distil::model::{load_encoder, EncoderInput, ForwardOptions, LoadOptions};
use distil::recipe;
use distil::train::run_dir::{read_state, RunDir};
use distil::train::setup;
use distil::train::trainer::Trainer;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

/// Forward and gradients of the BERT fixture with the matmuls in `dtype`, against f32.
#[test]
fn half_precision_matmuls_stay_close_to_f32() {
    let io = load_io("bert");
    let input_ids = ids(&io, "input_ids").unwrap();
    let mask = ids(&io, "attention_mask").unwrap();
    let tt = ids(&io, "token_type_ids");
    let labels: Vec<i64> = io["labels"].flatten_all().unwrap().to_vec1().unwrap();
    let targets = masked_positions(&labels, &Device::Cpu).unwrap();
    let run = |dtype: DType| {
        let (mut enc, _) =
            load_encoder(&fixture_dir("bert"), &Device::Cpu, &LoadOptions::default()).unwrap();
        enc.set_compute_dtype(dtype);
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
        let h = out.last_hidden_state;
        let logits = enc.mlm_logits_at(&h, &targets.positions).unwrap();
        let loss = cross_entropy(&logits, &targets.targets).unwrap();
        let grads = enc.backward(&loss).unwrap();
        let g: Vec<(String, candle_core::Tensor)> = enc
            .params
            .vars()
            .iter()
            .map(|(n, v)| (n.clone(), grads.get(v.as_tensor()).unwrap().clone()))
            .collect();
        (h, logits, loss.to_scalar::<f32>().unwrap(), g)
    };
    let (h32, l32, loss32, g32) = run(DType::F32);
    // The f32 run is the reference the parity tests check against transformers.
    assert!(max_abs_diff(&h32, &io["hidden_states.2"]) < 1e-4);
    // bf16 keeps 8 significant bits (unit roundoff 2^-9 ≈ 2e-3), f16 11 (2^-12 ≈ 2.4e-4):
    // after two layers, a head and a backward pass the errors are a few units of roundoff
    // (measured: bf16 1.0e-2 hidden, 1.3e-2 logits, 2.0e-2 worst gradient; f16 about 7×
    // less, the 2^3 the three extra bits give).
    for (dtype, tol_h, tol_g) in [(DType::BF16, 3e-2, 5e-2), (DType::F16, 5e-3, 1e-2)] {
        let (h, l, loss, g) = run(dtype);
        // Activations, logits and the loss stay f32; only the matmuls were half precision.
        assert_eq!(h.dtype(), DType::F32);
        assert_eq!(l.dtype(), DType::F32);
        // Relative to the largest reference value.
        let dh = max_abs_diff(&h, &h32) / max_abs(&h32);
        let dl = max_abs_diff(&l, &l32) / max_abs(&l32);
        assert!(dh < tol_h, "{dtype:?}: last hidden state differs by {dh}");
        assert!(dl < tol_h, "{dtype:?}: logits differ by {dl}");
        assert!(
            dh > 0.0,
            "{dtype:?}: no rounding at all: the matmuls were not in {dtype:?}"
        );
        assert!(
            (loss - loss32).abs() < tol_h,
            "{dtype:?}: loss {loss} vs {loss32}"
        );
        let mut worst = (0f32, String::new());
        for ((name, a), (_, b)) in g.iter().zip(&g32) {
            assert_eq!(a.dtype(), DType::F32, "{dtype:?}: gradient of {name}");
            if name.ends_with("attention.self.key.bias") {
                continue; // its true gradient is 0 (see tests/parity.rs)
            }
            let rel = max_abs_diff(a, b) / max_abs(b).max(1e-6);
            if rel > worst.0 {
                worst = (rel, name.clone());
            }
        }
        assert!(
            worst.0 < tol_g,
            "{dtype:?}: gradient of {} differs by {} relative",
            worst.1,
            worst.0
        );
        eprintln!(
            "{dtype:?}: hidden {dh:.2e}, logits {dl:.2e}, loss {:.2e}, worst gradient {:.2e} rel ({})",
            (loss - loss32).abs(),
            worst.0,
            worst.1
        );
    }
}

fn fp16_recipe(tmp: &Path) -> recipe::LoadedRecipe {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let text = format!(
        "task: pretrain
model:
  config: {{hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64, max_position_embeddings: 64}}
tokenizer: {{load: {root}/tests/fixtures/tokenizer}}
data:
  corpus: {{paths: [{root}/data/shakespeare/tempest.txt]}}
  sequences: {{block_size: 32}}
  cache_dir: {tmp}/cache
training:
  output_dir: {tmp}/run
  per_device_train_batch_size: 4
  learning_rate: 1.0e-3
  max_steps: 6
  save_steps: 2
  logging_steps: 1
",
        root = root.display(),
        tmp = tmp.display(),
    );
    // fp16 is refused on a CPU device by the recipe; the trainer itself is device-blind.
    let mut loaded = recipe::parse(&text, Path::new("fp16-test.yaml"), &[]).unwrap();
    loaded.recipe.training.fp16 = true;
    loaded
}

#[test]
fn fp16_loss_scaling_skips_overflowing_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let loaded = fp16_recipe(tmp.path());
    let r = &loaded.recipe;
    let run_dir = RunDir::open(&r.training.output_dir, false, false).unwrap();
    let tok = setup::tokenizer(r, &run_dir.root, false).unwrap();
    let data = setup::data(r, &tok).unwrap();
    let mut f32_recipe = r.clone();
    f32_recipe.training.fp16 = false;
    let mut model = setup::model(&f32_recipe, &tok, &Device::Cpu, false).unwrap();
    model.set_compute_dtype(DType::F16);
    let stop = AtomicBool::new(false);
    let trainer = Trainer::mlm(&model, &tok, &data.train, None, &r.training, &stop);
    // Six steps at the initial scale (2^16): a model this small does not overflow.
    let s = trainer.run(&run_dir, false).unwrap();
    assert_eq!(s.steps, 6);
    let metrics = std::fs::read_to_string(run_dir.metrics_path()).unwrap();
    assert_eq!(
        metrics.matches("\"loss_scale\":65536.0").count(),
        6,
        "{metrics}"
    );
    assert!(!metrics.contains("overflow"), "{metrics}");
    let ckpt = run_dir.root.join("checkpoint-4");
    let mut state = read_state(&ckpt).unwrap();
    assert_eq!(state.loss_scaler.unwrap().scale, 65536.0);
    assert_eq!(state.loss_scaler.unwrap().good_steps, 4);

    // A scale of 2^100 overflows float16 whatever the gradients: resumed from step 4 with
    // it, steps 5 and 6 are skipped, the scale halving each time, and the weights stay
    // those of the checkpoint.
    state.loss_scaler.as_mut().unwrap().scale = 2f64.powi(100);
    std::fs::write(
        ckpt.join("trainer_state.json"),
        serde_json::to_string_pretty(&state).unwrap(),
    )
    .unwrap();
    // As if the run had stopped after that checkpoint (a finished run's resume only
    // evaluates its final model).
    std::fs::remove_file(run_dir.root.join("trainer_state.json")).unwrap();
    let s = trainer.run(&run_dir, true).unwrap();
    assert_eq!(s.steps, 6);
    let metrics = std::fs::read_to_string(run_dir.metrics_path()).unwrap();
    let scales: Vec<(u64, f64)> = metrics
        .lines()
        .filter(|l| l.contains("fp16 gradient overflow"))
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["step"].as_u64().unwrap(),
                v["loss_scale"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        scales,
        vec![(5, 2f64.powi(99)), (6, 2f64.powi(98))],
        "{metrics}"
    );
    let saved = load_encoder(&ckpt, &Device::Cpu, &LoadOptions::default())
        .unwrap()
        .0
        .params
        .snapshot(DType::F32)
        .unwrap();
    for (k, v) in model.params.snapshot(DType::F32).unwrap() {
        assert_eq!(
            max_abs_diff(&v, &saved[&k]),
            0.0,
            "{k} changed in a skipped step"
        );
    }
}
