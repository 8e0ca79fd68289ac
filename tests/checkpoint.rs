//! Checkpoint loading, saving, student initialisation and bad input.

mod common;

use candle_core::{Device, Tensor};
use common::{fixture_dir, ids, load_io, max_abs_diff};
use distil::model::student::init_from_teacher;
use distil::model::{
    load_encoder, save_encoder, Encoder, EncoderConfig, EncoderInput, ForwardOptions, Layout,
    LoadOptions,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::Path;

fn load(dir: &Path) -> Encoder {
    load_encoder(dir, &Device::Cpu, &LoadOptions::default())
        .unwrap()
        .0
}

fn logits(enc: &Encoder, input_ids: &Tensor, mask: &Tensor, tt: Option<&Tensor>) -> Tensor {
    let out = enc
        .forward(
            &EncoderInput {
                input_ids,
                attention_mask: Some(mask),
                token_type_ids: tt,
            },
            ForwardOptions::default(),
            None,
        )
        .unwrap();
    enc.mlm_logits(&out.last_hidden_state).unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn load_err(dir: &Path) -> String {
    match load_encoder(dir, &Device::Cpu, &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn save_load_round_trip_is_exact() {
    for layout in ["bert", "roberta", "albert", "distilbert"] {
        let enc = load(&fixture_dir(layout));
        let tmp = tempfile::tempdir().unwrap();
        save_encoder(&enc, tmp.path(), enc.cfg.layout).unwrap();
        let back = load(tmp.path());
        assert_eq!(back.cfg, enc.cfg, "{layout}: config");
        assert_eq!(back.params.tensors().len(), enc.params.tensors().len());
        for (name, t) in enc.params.tensors() {
            let u = back.params.get(name).unwrap();
            assert_eq!(max_abs_diff(t, &u), 0.0, "{layout}: {name} changed");
        }
    }
}

#[test]
fn pytorch_bin_and_sharded_safetensors_load_the_same_weights() {
    let reference = load(&fixture_dir("bert"));
    let from_bin = load(&fixture_dir("bert-bin"));
    for (name, t) in reference.params.tensors() {
        assert_eq!(
            max_abs_diff(t, &from_bin.params.get(name).unwrap()),
            0.0,
            "{name}"
        );
    }
    // Split the safetensors file into two shards with an index.
    let tmp = tempfile::tempdir().unwrap();
    let all =
        candle_core::safetensors::load(fixture_dir("bert").join("model.safetensors"), &Device::Cpu)
            .unwrap();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (shard, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        let m: std::collections::HashMap<String, Tensor> = part
            .iter()
            .map(|n| ((*n).clone(), all[*n].clone()))
            .collect();
        candle_core::safetensors::save(&m, tmp.path().join(shard)).unwrap();
        for n in part {
            weight_map.insert((*n).clone(), serde_json::json!(shard));
        }
    }
    std::fs::write(
        tmp.path().join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();
    std::fs::copy(
        fixture_dir("bert").join("config.json"),
        tmp.path().join("config.json"),
    )
    .unwrap();
    let sharded = load(tmp.path());
    for (name, t) in reference.params.tensors() {
        assert_eq!(
            max_abs_diff(t, &sharded.params.get(name).unwrap()),
            0.0,
            "{name}"
        );
    }
}

/// A born-again student (the teacher's own depth, every layer copied) without token types
/// computes exactly what the teacher computes on single-segment input; saved in DistilBERT
/// layout it reloads unchanged. The saved directory is left in `target/student-check` for
/// `scripts/check_hf_load.py target/student-check --arch distilbert --io target/student-check/io.safetensors`.
#[test]
fn student_from_teacher_in_distilbert_layout() {
    let teacher = load(&fixture_dir("bert"));
    let io = load_io("bert");
    let input_ids = ids(&io, "input_ids").unwrap();
    let mask = ids(&io, "attention_mask").unwrap();
    let mut cfg = teacher.cfg.clone();
    cfg.layout = Layout::DistilBert;
    cfg.type_vocab_size = 0;
    let params = init_from_teacher(&teacher, &cfg, None, 0).unwrap();
    let student = Encoder::new(cfg.clone(), params).unwrap();
    let t_logits = logits(&teacher, &input_ids, &mask, None);
    let s_logits = logits(&student, &input_ids, &mask, None);
    let d = max_abs_diff(&t_logits, &s_logits);
    assert!(
        d < 1e-5,
        "born-again student differs from its teacher by {d}"
    );

    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/student-check");
    let _ = std::fs::remove_dir_all(&out);
    save_encoder(&student, &out, Layout::DistilBert).unwrap();
    let names =
        candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(names
        .keys()
        .all(|k| !k.contains("token_type") && !k.contains("pooler")));
    assert!(names.contains_key("distilbert.transformer.layer.1.ffn.lin2.weight"));
    let back = load(&out);
    assert_eq!(back.cfg.layout, Layout::DistilBert);
    assert_eq!(
        max_abs_diff(&logits(&back, &input_ids, &mask, None), &s_logits),
        0.0
    );
    let io_out: std::collections::HashMap<String, Tensor> = [
        (
            "input_ids".to_string(),
            input_ids.to_dtype(candle_core::DType::I64).unwrap(),
        ),
        (
            "attention_mask".to_string(),
            mask.to_dtype(candle_core::DType::I64).unwrap(),
        ),
        ("logits".to_string(), s_logits),
    ]
    .into();
    candle_core::safetensors::save(&io_out, out.join("io.safetensors")).unwrap();

    // Half depth: layers 0 and 1 of a 2-layer teacher → a 1-layer student copies layer 0.
    let mut half = cfg.clone();
    half.num_layers = 1;
    let p = init_from_teacher(&teacher, &half, None, 0).unwrap();
    assert_eq!(
        max_abs_diff(
            &p.get("encoder.layer.0.output.dense.weight").unwrap(),
            &teacher
                .params
                .get("encoder.layer.0.output.dense.weight")
                .unwrap()
        ),
        0.0
    );
    // A width mismatch is a clear error.
    let mut wide = cfg.clone();
    wide.hidden_size = 64;
    let err = init_from_teacher(&teacher, &wide, None, 0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("hidden_size differs (teacher 32, student 64)"),
        "{err}"
    );
    let err = init_from_teacher(&teacher, &half, Some(&[5]), 0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("teacher layer 5"), "{err}");
}

#[test]
fn dropout_is_seeded_and_off_in_eval_mode() {
    let enc = load(&fixture_dir("bert"));
    let io = load_io("bert");
    let input_ids = ids(&io, "input_ids").unwrap();
    let run = |seed: Option<u64>| {
        let mut rng = seed.map(ChaCha8Rng::seed_from_u64);
        enc.forward(
            &EncoderInput {
                input_ids: &input_ids,
                attention_mask: None,
                token_type_ids: None,
            },
            ForwardOptions::default(),
            rng.as_mut(),
        )
        .unwrap()
        .last_hidden_state
    };
    let (a, b, c, eval1, eval2) = (
        run(Some(1)),
        run(Some(1)),
        run(Some(2)),
        run(None),
        run(None),
    );
    assert_eq!(max_abs_diff(&a, &b), 0.0, "same seed, same numbers");
    assert!(max_abs_diff(&a, &c) > 1e-3, "another seed, other dropout");
    assert!(max_abs_diff(&a, &eval1) > 1e-3, "training mode drops");
    assert_eq!(max_abs_diff(&eval1, &eval2), 0.0);
}

#[test]
fn frozen_parameters_track_no_gradient() {
    let opts = LoadOptions {
        trainable: false,
        ..Default::default()
    };
    let (enc, _) = load_encoder(&fixture_dir("bert"), &Device::Cpu, &opts).unwrap();
    assert!(enc.params.vars().is_empty());
    let io = load_io("bert");
    let input_ids = ids(&io, "input_ids").unwrap();
    let mask = ids(&io, "attention_mask").unwrap();
    let l = logits(&enc, &input_ids, &mask, None).sum_all().unwrap();
    let grads = enc.backward(&l).unwrap();
    for t in enc.params.tensors().values() {
        assert!(grads.get(t).is_none());
    }
}

#[test]
fn bad_checkpoints_give_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    // Missing directory / files.
    let err = load_err(&tmp.path().join("nope"));
    assert!(err.contains("missing config.json"), "{err}");
    let d = tmp.path().join("noweights");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(
        fixture_dir("bert").join("config.json"),
        d.join("config.json"),
    )
    .unwrap();
    let err = load_err(&d);
    assert!(err.contains("no weights found"), "{err}");

    // Truncated safetensors.
    let d = tmp.path().join("truncated");
    copy_dir(&fixture_dir("bert"), &d);
    let bytes = std::fs::read(d.join("model.safetensors")).unwrap();
    std::fs::write(d.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(&d);
    assert!(
        err.contains("model.safetensors: corrupt or truncated"),
        "{err}"
    );

    // Garbage header.
    std::fs::write(
        d.join("model.safetensors"),
        b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage",
    )
    .unwrap();
    let err = load_err(&d);
    assert!(err.contains("corrupt or truncated"), "{err}");

    // Config / weights shape mismatch.
    let d = tmp.path().join("mismatch");
    copy_dir(&fixture_dir("bert"), &d);
    let cfg = std::fs::read_to_string(d.join("config.json"))
        .unwrap()
        .replace("\"intermediate_size\": 37", "\"intermediate_size\": 40");
    std::fs::write(d.join("config.json"), cfg).unwrap();
    let err = load_err(&d);
    assert!(
        err.contains(
            "tensor \"bert.encoder.layer.0.intermediate.dense.weight\" has shape [37, 32]"
        ) && err.contains("[40, 32]"),
        "{err}"
    );

    // Bad config values.
    let d = tmp.path().join("badcfg");
    copy_dir(&fixture_dir("bert"), &d);
    let cfg = std::fs::read_to_string(d.join("config.json"))
        .unwrap()
        .replace("\"hidden_act\": \"gelu\"", "\"hidden_act\": \"swishy\"");
    std::fs::write(d.join("config.json"), cfg).unwrap();
    let err = load_err(&d);
    assert!(
        err.contains("config.json: unsupported activation \"swishy\""),
        "{err}"
    );

    // Unknown layout.
    let d = tmp.path().join("unknown");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(
        fixture_dir("bert").join("config.json"),
        d.join("config.json"),
    )
    .unwrap();
    let m: std::collections::HashMap<String, Tensor> = [(
        "transformer.h.0.attn.weight".to_string(),
        Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu).unwrap(),
    )]
    .into();
    candle_core::safetensors::save(&m, d.join("model.safetensors")).unwrap();
    let err = load_err(&d);
    assert!(
        err.contains("unknown checkpoint layout") && err.contains("transformer.h.0.attn.weight"),
        "{err}"
    );

    // A missing required tensor.
    let d = tmp.path().join("missing");
    copy_dir(&fixture_dir("bert"), &d);
    let mut all =
        candle_core::safetensors::load(d.join("model.safetensors"), &Device::Cpu).unwrap();
    all.remove("bert.encoder.layer.1.output.LayerNorm.bias");
    candle_core::safetensors::save(&all, d.join("model.safetensors")).unwrap();
    let err = load_err(&d);
    assert!(
        err.contains("missing tensor \"bert.encoder.layer.1.output.LayerNorm.bias\""),
        "{err}"
    );
}

#[test]
fn model_type_is_not_trusted_over_the_tensors() {
    // chinese-roberta-wwm-ext says "bert" with BERT tensors; ERNIE 1.0 has no model_type.
    // Here: a BERT-format checkpoint whose config claims roberta, and one with no model_type.
    let tmp = tempfile::tempdir().unwrap();
    for (name, edit) in [("claims-roberta", Some("roberta")), ("no-model-type", None)] {
        let d = tmp.path().join(name);
        copy_dir(&fixture_dir("bert"), &d);
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap();
        match edit {
            Some(mt) => cfg["model_type"] = serde_json::json!(mt),
            None => {
                cfg.as_object_mut().unwrap().remove("model_type");
            }
        }
        std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
        let (enc, report) = load_encoder(&d, &Device::Cpu, &LoadOptions::default()).unwrap();
        assert_eq!(enc.cfg.layout, Layout::Bert);
        assert!(!report.notes.is_empty());
    }
}

#[test]
fn random_models_build_for_every_layout() {
    for layout in [
        Layout::Bert,
        Layout::Roberta,
        Layout::DistilBert,
        Layout::Albert,
    ] {
        let mut cfg = EncoderConfig::bert(50, 16, 2, 2, 24);
        cfg.layout = layout;
        if layout == Layout::Albert {
            cfg.shared_layers = true;
            cfg.embedding_size = 8;
        }
        if layout == Layout::DistilBert {
            cfg.type_vocab_size = 0;
        }
        if layout == Layout::Roberta {
            cfg.pad_token_id = 1;
        }
        let p =
            distil::model::Params::random(&cfg, distil::model::Parts::MLM, 3, &Device::Cpu, true)
                .unwrap();
        let enc = Encoder::new(cfg, p).unwrap();
        let ids = Tensor::new(&[[5u32, 6, 7, 8]], &Device::Cpu).unwrap();
        let out = enc
            .forward(
                &EncoderInput {
                    input_ids: &ids,
                    attention_mask: None,
                    token_type_ids: None,
                },
                ForwardOptions::default(),
                None,
            )
            .unwrap();
        assert_eq!(out.last_hidden_state.dims(), &[1, 4, 16]);
    }
}
