//! Resumable runs: a run killed mid-way — even while a checkpoint's files are being written,
//! or by SIGTERM — and resumed ends with weights bitwise identical to an uninterrupted run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn recipe(dir: &Path, out: &Path, steps: u64) -> PathBuf {
    recipe_edited(dir, out, steps, &[])
}

/// [`recipe`] with each `(from, to)` of `edits` replaced in its text.
fn recipe_edited(dir: &Path, out: &Path, steps: u64, edits: &[(&str, &str)]) -> PathBuf {
    let mut text = format!(
        "task: pretrain
model:
  config:
    hidden_size: 32
    num_hidden_layers: 2
    num_attention_heads: 4
    intermediate_size: 64
    max_position_embeddings: 64
tokenizer:
  load: {root}/tests/fixtures/tokenizer
data:
  corpus:
    paths: [{root}/data/shakespeare/tempest.txt]
  sequences:
    block_size: 32
    eval_fraction: 0.05
  cache_dir: {cache}
training:
  output_dir: {out}
  per_device_train_batch_size: 8
  gradient_accumulation_steps: 2
  learning_rate: 1.0e-3
  weight_decay: 0.01
  warmup_ratio: 0.1
  max_steps: {steps}
  save_steps: 4
  save_total_limit: 2
  logging_steps: 1
  eval_steps: 6
  seed: 7
",
        root = root().display(),
        cache = dir.join("cache").display(),
        out = out.display()
    );
    for (from, to) in edits {
        assert!(text.contains(from), "the recipe has no {from:?}");
        text = text.replace(from, to);
    }
    let p = dir.join(format!(
        "{}.yaml",
        out.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&p, text).unwrap();
    p
}

fn distil(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_distil"));
    c.args(args).args(["--quiet"]);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn weights(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("model.safetensors")).unwrap()
}

fn metrics_steps(dir: &Path) -> Vec<u64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("loss").is_some())
        .filter_map(|v| v["step"].as_u64())
        .collect()
}

/// `(step, eval_loss)` of each evaluation a run logged.
fn evals(dir: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["step"].as_u64()?, v["eval_loss"].as_f64()?)))
        .collect()
}

#[test]
fn evaluations_and_checkpoints_see_every_update_before_them() {
    // The trainer holds each step's update back until the next step's forward; whatever reads
    // the model in between (an evaluation, a checkpoint, the end of the run) must see it
    // applied. A constant learning rate makes step k of a longer run the same as the last
    // step of a k-step run: its checkpoint and its evaluation must equal that run's final
    // model and final evaluation.
    let tmp = tempfile::tempdir().unwrap();
    let constant = [
        (
            "warmup_ratio: 0.1",
            "warmup_ratio: 0.0\n  lr_scheduler_type: constant",
        ),
        ("eval_steps: 6", "eval_steps: 4"),
    ];
    let short = tmp.path().join("short");
    let r = recipe_edited(tmp.path(), &short, 4, &constant);
    let o = distil(&["run", r.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let long = tmp.path().join("long");
    let r = recipe_edited(tmp.path(), &long, 6, &constant);
    let o = distil(&["run", r.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        weights(&long.join("checkpoint-4")) == weights(&short),
        "checkpoint-4 of the longer run is not the 4-step run's final model"
    );
    let (at4, end) = (evals(&long), evals(&short));
    assert_eq!(at4.first().map(|e| e.0), Some(4), "{at4:?}");
    assert_eq!(end.last().map(|e| e.0), Some(4), "{end:?}");
    assert_eq!(
        at4[0].1,
        end.last().unwrap().1,
        "the evaluation at step 4 of the longer run differs from the 4-step run's final one"
    );
}

#[test]
fn killed_inside_a_checkpoint_then_resumed_equals_uninterrupted() {
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full");
    let r = recipe(tmp.path(), &full, 12);
    let o = distil(&["run", r.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let cut = tmp.path().join("cut");
    let r = recipe(tmp.path(), &cut, 12);
    // Abort while checkpoint-8 is half written (model saved, optimizer state not yet).
    let o = distil(
        &["run", r.to_str().unwrap()],
        &[("DISTIL_TEST_ABORT_IN_CHECKPOINT", "8")],
    );
    assert!(!o.status.success(), "the run should have died");
    assert!(
        cut.join("checkpoint-8.tmp").is_dir(),
        "the half-written checkpoint is left"
    );
    assert!(cut.join("checkpoint-4/trainer_state.json").is_file());
    // Without --resume a non-empty output directory is refused.
    let o = distil(&["run", r.to_str().unwrap()], &[]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("is not empty"));
    let o = distil(&["run", r.to_str().unwrap(), "--resume"], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        !cut.join("checkpoint-8.tmp").exists(),
        "partial checkpoint cleaned up"
    );
    assert_eq!(
        weights(&full),
        weights(&cut),
        "resumed weights differ from the uninterrupted run"
    );
    assert_eq!(metrics_steps(&cut), (1..=12).collect::<Vec<_>>());
    // save_total_limit: 2 keeps the newest two.
    let mut cps: Vec<String> = std::fs::read_dir(&cut)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    cps.sort();
    assert_eq!(cps, vec!["checkpoint-4", "checkpoint-8"]);
}

#[test]
fn resuming_a_finished_run_evaluates_its_final_model_without_training() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("done");
    // 10 steps: the last periodic checkpoint is step 8, two steps short of the final model.
    let r = recipe(tmp.path(), &out, 10);
    let o = distil(&["run", r.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let before = weights(&out);
    let eval_before = std::fs::read_to_string(out.join("eval_results.json")).unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_distil"));
    let o = c
        .args(["run", r.to_str().unwrap(), "--resume"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("holds the finished run (step 10 of 10)"),
        "{err}"
    );
    assert!(
        !err.contains("resuming from"),
        "it went back to a checkpoint: {err}"
    );
    assert_eq!(weights(&out), before, "the final model changed");
    assert_eq!(
        std::fs::read_to_string(out.join("eval_results.json")).unwrap(),
        eval_before
    );
    assert_eq!(metrics_steps(&out), (1..=10).collect::<Vec<_>>());
}

#[test]
fn sigterm_writes_a_checkpoint_and_resume_finishes_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full");
    let r = recipe(tmp.path(), &full, 30);
    let o = distil(&["run", r.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let cut = tmp.path().join("cut");
    let r = recipe(tmp.path(), &cut, 30);
    let mut child = Command::new(env!("CARGO_BIN_EXE_distil"))
        .args(["run", r.to_str().unwrap(), "--quiet"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until a few steps are logged, then ask it to stop.
    let start = std::time::Instant::now();
    while metrics_steps(&cut).len() < 3 {
        assert!(start.elapsed().as_secs() < 120, "the run never logged");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    unsafe {
        libc_kill(child.id() as i32, 15);
    }
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "interrupted runs exit with 130");
    let stopped_at = metrics_steps(&cut).last().copied().unwrap();
    assert!(stopped_at < 30, "the signal came too late to test anything");
    assert!(
        cut.join(format!("checkpoint-{stopped_at}/trainer_state.json"))
            .is_file(),
        "a checkpoint at the interrupted step {stopped_at}"
    );
    let o = distil(&["run", r.to_str().unwrap(), "--resume"], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(weights(&full), weights(&cut));
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
