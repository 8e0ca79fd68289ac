//! A tiny BERT pretrained for 2000 steps on real text (two of the embedded plays, a 300-piece
//! WordPiece vocabulary trained by the test) reaches a held-out perplexity far below the
//! unigram baseline on the same masked tokens.
//!
//! Why blocks of 8 tokens: with 64-token blocks this model (and `BertForMaskedLM` in PyTorch,
//! `scripts/pretrain_reference.py`, the same numbers) stays on the unigram plateau for
//! thousands of steps: its attention stays uniform, so a masked piece is predicted from the
//! bag of the block's pieces, and the only gain over unigram comes from the 10% of masked
//! positions that show the original token. Learning which neighbour sits where takes a tiny
//! BERT far longer than this test may run; with 8 positions it learns it within 2000 steps
//! (same tokens per step: 128 × 8 instead of 16 × 64).

use distil::recipe;
use distil::train::batch::DeviceBatch;
use distil::train::run_dir::RunDir;
use distil::train::setup;
use distil::train::trainer::Trainer;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

#[test]
fn pretraining_beats_the_unigram_baseline() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let text = format!(
        "task: pretrain
model:
  config:
    hidden_size: 64
    num_hidden_layers: 2
    num_attention_heads: 4
    intermediate_size: 256
    max_position_embeddings: 8
tokenizer:
  train:
    vocab_size: 300
data:
  corpus:
    paths: [{root}/data/shakespeare/tempest.txt, {root}/data/shakespeare/macbeth.txt]
  sequences:
    block_size: 8
    eval_fraction: 0.1
  cache_dir: {tmp}/cache
training:
  output_dir: {tmp}/run
  per_device_train_batch_size: 128
  learning_rate: 2.0e-3
  weight_decay: 0.01
  warmup_ratio: 0.05
  max_steps: 2000
  logging_steps: 500
  eval_steps: 1000
  seed: 1
",
        root = root.display(),
        tmp = tmp.path().display()
    );
    let loaded = recipe::parse(&text, Path::new("pretrain-test.yaml"), &[]).unwrap();
    let r = &loaded.recipe;
    let run_dir = RunDir::open(&r.training.output_dir, false, false).unwrap();
    let tok = setup::tokenizer(r, &run_dir.root, false).unwrap();
    let device = setup::device(r).unwrap();
    let data = setup::data(r, &tok).unwrap();
    let model = setup::model(r, &tok, &device, false).unwrap();
    let eval = data.eval.as_ref().expect("a held-out split");

    // Unigram baseline: each masked token predicted with its corpus frequency (add-one).
    let counts = data.prepared.cache.counts();
    let total: f64 = counts.iter().map(|&c| c as f64 + 1.0).sum();
    let (mut nll, mut n) = (0f64, 0u64);
    for b in eval.epoch(0) {
        let db = DeviceBatch::new(&b, &device).unwrap();
        for t in db.masked.targets.to_vec1::<u32>().unwrap() {
            nll -= ((counts[t as usize] as f64 + 1.0) / total).ln();
            n += 1;
        }
    }
    let unigram_ppl = (nll / n as f64).exp();

    let stop = AtomicBool::new(false);
    let trainer = Trainer::mlm(&model, &tok, &data.train, Some(eval), &r.training, &stop);
    let summary = trainer.run(&run_dir, false).unwrap();
    let e = summary.final_eval.unwrap();
    println!(
        "unigram perplexity {unigram_ppl:.1}, model perplexity {:.1} (accuracy {:.1}%) on {} masked tokens",
        e.perplexity,
        100.0 * e.accuracy,
        e.masked_tokens
    );
    assert_eq!(
        e.masked_tokens, n,
        "the baseline saw the same masked tokens"
    );
    // Measured (seed 1, 2000 steps, deterministic tokenizer): model 26.5 against a unigram
    // baseline of 128.1 (0.21×); other seeds gave 0.17–0.30× (see the closing note of the
    // session that set this up). Asserted with margin.
    assert!(unigram_ppl > 100.0, "unigram baseline {unigram_ppl}");
    assert!(
        e.perplexity < 0.4 * unigram_ppl,
        "perplexity {} is not far below the unigram baseline {unigram_ppl}",
        e.perplexity
    );
}
