//! A tiny BERT pretrained for a few hundred steps on real text (two of the embedded plays)
//! (a 300-piece WordPiece vocabulary trained by the test) reaches a held-out perplexity well
//! below the unigram baseline on the same masked tokens.

use distil::recipe;
use distil::train::batch::DeviceBatch;
use distil::train::objective::MlmObjective;
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
    max_position_embeddings: 64
tokenizer:
  train:
    vocab_size: 300
data:
  corpus:
    paths: [{root}/data/shakespeare/tempest.txt, {root}/data/shakespeare/macbeth.txt]
  sequences:
    block_size: 64
    eval_fraction: 0.1
  cache_dir: {tmp}/cache
training:
  output_dir: {tmp}/run
  per_device_train_batch_size: 16
  learning_rate: 3.0e-3
  weight_decay: 0.01
  warmup_ratio: 0.05
  max_steps: 600
  logging_steps: 100
  eval_steps: 200
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
    let trainer = Trainer {
        model: &model,
        tok: &tok,
        train: &data.train,
        eval: Some(eval),
        args: &r.training,
        objective: &MlmObjective,
        save_layout: model.cfg.layout,
        stop: &stop,
        verbose: false,
    };
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
    // Measured (seed 1, 600 steps): unigram 131.7, model 101.9 (0.77×). Asserted with
    // margin. This model and budget are small: the gap widens with training (a Post-LN BERT
    // first learns the unigram distribution, then context; PyTorch does exactly the same on
    // these batches, see the closing note of the session that wrote this test).
    assert!(unigram_ppl > 100.0, "unigram baseline {unigram_ppl}");
    assert!(
        e.perplexity < 0.85 * unigram_ppl,
        "perplexity {} is not far below the unigram baseline {unigram_ppl}",
        e.perplexity
    );
}
