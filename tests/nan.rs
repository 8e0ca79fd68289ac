//! A non-finite loss stops the run with an error naming the step and keeping the last good
//! checkpoint, or (with `on_nan: skip`) skips the step and goes on.

use std::path::{Path, PathBuf};
use std::process::Command;

fn recipe(dir: &Path, on_nan: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    // A learning rate of 1e12 blows the weights up after the first updates.
    let text = format!(
        "task: pretrain
model:
  config: {{hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64, max_position_embeddings: 64}}
tokenizer: {{load: {root}/tests/fixtures/tokenizer}}
data:
  corpus: {{paths: [{root}/data/shakespeare/tempest.txt]}}
  sequences: {{block_size: 32}}
  cache_dir: {cache}
training:
  output_dir: {out}
  per_device_train_batch_size: 4
  learning_rate: 1.0e+12
  max_grad_norm: null
  max_steps: 12
  save_steps: 1
  logging_steps: 1
  on_nan: {on_nan}
",
        root = root.display(),
        cache = dir.join("cache").display(),
        out = dir.join(format!("run-{on_nan}")).display(),
    );
    let p = dir.join(format!("{on_nan}.yaml"));
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn non_finite_loss_stops_or_skips() {
    let tmp = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_distil"))
        .args([
            "run",
            recipe(tmp.path(), "stop").to_str().unwrap(),
            "--quiet",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "the run should stop");
    assert!(err.contains("non-finite loss at step"), "{err}");
    assert!(err.contains("last good checkpoint: "), "{err}");
    let step: u64 = err
        .split("non-finite loss at step ")
        .nth(1)
        .unwrap()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(step > 1, "step {step}");
    let run = tmp.path().join("run-stop");
    assert!(run
        .join(format!("checkpoint-{}/trainer_state.json", step - 1))
        .is_file());

    let o = Command::new(env!("CARGO_BIN_EXE_distil"))
        .args([
            "run",
            recipe(tmp.path(), "skip").to_str().unwrap(),
            "--quiet",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let metrics = std::fs::read_to_string(tmp.path().join("run-skip/metrics.jsonl")).unwrap();
    assert!(
        metrics.contains("\"skipped\":\"non-finite loss\""),
        "{metrics}"
    );
}
