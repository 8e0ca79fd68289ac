//! Helpers shared by the integration tests.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// `../shared` (or `$DISTIL_SHARED`), if present.
pub fn shared_dir() -> Option<PathBuf> {
    let p = std::env::var_os("DISTIL_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    if p.is_dir() {
        Some(p)
    } else {
        eprintln!(
            "SKIPPED: shared data not found at {} (set DISTIL_SHARED)",
            p.display()
        );
        None
    }
}

pub fn load_io(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_dir(name).join("io.safetensors"), &Device::Cpu)
        .expect("fixture io.safetensors")
}

pub fn ids(io: &HashMap<String, Tensor>, key: &str) -> Option<Tensor> {
    io.get(key).map(|t| t.to_dtype(DType::U32).unwrap())
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    a.to_dtype(DType::F32)
        .unwrap()
        .sub(&b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn max_abs(a: &Tensor) -> f32 {
    a.to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The tiny BERT fixture as a frozen teacher.
pub fn fixture_teacher() -> distil::model::Encoder {
    let opts = distil::model::LoadOptions {
        trainable: false,
        ..Default::default()
    };
    distil::model::load_encoder(&fixture_dir("bert"), &Device::Cpu, &opts)
        .unwrap()
        .0
}

/// A DistilBERT-layout student of `layers` layers initialised from `teacher`, with dropout
/// on or off (off: a loss() call is deterministic and comparable with PyTorch).
pub fn distilbert_student(
    teacher: &distil::model::Encoder,
    layers: usize,
    dropout: bool,
) -> distil::model::Encoder {
    let mut cfg = teacher.cfg.clone();
    cfg.layout = distil::model::Layout::DistilBert;
    cfg.type_vocab_size = 0;
    cfg.num_layers = layers;
    if !dropout {
        cfg.hidden_dropout = 0.0;
        cfg.attention_dropout = 0.0;
    }
    let params = distil::model::student::init_from_teacher(teacher, &cfg, None, 0).unwrap();
    distil::model::Encoder::new(cfg, params).unwrap()
}

/// The batch of tests/fixtures/distill (scripts/make_loss_fixtures.py): row 1 padded, five
/// masked tokens.
pub fn distill_batch(io: &HashMap<String, Tensor>) -> distil::train::batch::DeviceBatch {
    let (b, s) = io["input_ids"].dims2().unwrap();
    let flat = |k: &str| -> Vec<i64> { io[k].flatten_all().unwrap().to_vec1().unwrap() };
    let batch = distil::data::Batch {
        batch_size: b,
        seq_len: s,
        input_ids: flat("input_ids").iter().map(|&x| x as u32).collect(),
        attention_mask: flat("attention_mask").iter().map(|&x| x as u32).collect(),
        token_type_ids: flat("token_type_ids").iter().map(|&x| x as u32).collect(),
        labels: flat("labels"),
        sentence_labels: None,
    };
    distil::train::batch::DeviceBatch::new(&batch, &Device::Cpu).unwrap()
}
