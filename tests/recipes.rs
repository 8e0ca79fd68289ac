//! Recipe validation: every shipped recipe passes `distil check`; bad recipes give errors that
//! name the file, line, column and key.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn distil(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_distil"))
        .args(args)
        .current_dir(root())
        .env("HF_HOME", root().join("../shared/hf-home"))
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn every_shipped_recipe_checks() {
    let mut n = 0;
    let shared = root().join("../shared").is_dir();
    for e in std::fs::read_dir(root().join("recipes")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml") {
            let body = std::fs::read_to_string(&p).unwrap();
            if !shared && body.contains("../shared") {
                eprintln!("SKIPPED: {} reads ../shared, which is absent", p.display());
                n += 1;
                continue;
            }
            let (ok, text) = distil(&["check", p.to_str().unwrap()]);
            assert!(ok, "{}: {text}", p.display());
            n += 1;
        }
    }
    assert!(n >= 2, "recipes/ holds {n} recipes");
}

const GOOD: &str = "task: pretrain
model:
  config:
    hidden_size: 32
    num_hidden_layers: 2
    num_attention_heads: 4
    intermediate_size: 64
tokenizer:
  load: tests/fixtures/tokenizer
data:
  corpus:
    paths: [data/shakespeare/tempest.txt]
training:
  output_dir: /tmp/distil-recipe-test
  learning_rate: 1.0e-3
  per_device_train_batch_size: 8
";

fn check_text(text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r.yaml");
    std::fs::write(&p, text).unwrap();
    let (ok, out) = distil(&["check", p.to_str().unwrap()]);
    (ok, out.replace(p.to_str().unwrap(), "r.yaml"))
}

#[test]
fn bad_recipes_name_file_line_key_and_fix() {
    let cases: &[(&str, &str, &str)] = &[
        // (what to replace, replacement, expected message part)
        ("  learning_rate: 1.0e-3", "  lerning_rate: 1.0e-3", "r.yaml:15:3: training.lerning_rate: unknown field `lerning_rate`"),
        ("  learning_rate: 1.0e-3", "  lerning_rate: 1.0e-3", "did you mean `learning_rate`?"),
        ("  learning_rate: 1.0e-3", "  learning_rate: -0.1", "r.yaml:15:3: training.learning_rate: must be a positive number, got -0.1"),
        ("  learning_rate: 1.0e-3", "  learning_rate: fast", "training.learning_rate: invalid type: string \"fast\", expected f64"),
        ("  per_device_train_batch_size: 8", "  per_device_train_batch_size: 0", "r.yaml:16:3: training.per_device_train_batch_size: must be at least 1, got 0"),
        ("  per_device_train_batch_size: 8", "  per_device_train_batch_size: -4", "training.per_device_train_batch_size: invalid value: integer `-4`"),
        ("    paths: [data/shakespeare/tempest.txt]", "    paths: [data/no-such-file.txt]", "data/no-such-file.txt"),
        ("task: pretrain", "task: pretrian", "r.yaml:1:1: task: unknown variant `pretrian`"),
        ("task: pretrain", "task: pretrian", "did you mean `pretrain`?"),
        ("    num_attention_heads: 4", "    num_attention_heads: 5", "r.yaml:6:5: model.config.num_attention_heads: hidden_size 32 must be a multiple of num_attention_heads 5"),
        ("    hidden_size: 32", "    hiden_size: 32", "model.config.hiden_size: unknown field `hiden_size`"),
        ("  output_dir: /tmp/distil-recipe-test", "  output_dir: /tmp/x\n  device: gpu", "training.device: expected cpu, cuda or cuda:N, got \"gpu\""),
        ("  load: tests/fixtures/tokenizer", "  load: tests/fixtures/tokenizer\n  train: {vocab_size: 1000}", "tokenizer: give either `load` or `train`, not both"),
        ("training:", "trainin:", "unknown field `trainin`"),
        ("model:\n", "model: [1, 2]\nx:\n", "model"),
    ];
    let (ok, out) = check_text(GOOD);
    assert!(ok, "the good recipe must pass: {out}");
    for (from, to, want) in cases {
        assert!(GOOD.contains(from), "case text {from:?} not in the recipe");
        let text = GOOD.replacen(from, to, 1);
        let (ok, out) = check_text(&text);
        assert!(!ok, "{to:?} should fail");
        assert!(out.contains(want), "{to:?}: expected {want:?} in:\n{out}");
    }
    // Invalid YAML names the line too.
    let (ok, out) = check_text("task: pretrain\nmodel: {\n");
    assert!(
        !ok && out.contains("r.yaml:") && out.contains("invalid YAML"),
        "{out}"
    );
}

#[test]
fn set_overrides_values_and_reports_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r.yaml");
    std::fs::write(&p, GOOD).unwrap();
    let p = p.to_str().unwrap();
    let (ok, out) = distil(&["check", p, "--set", "training.learning_rate=-1"]);
    assert!(
        !ok && out.contains("training.learning_rate: must be a positive number"),
        "{out}"
    );
    let (ok, out) = distil(&["check", p, "--set", "training.max_steps=7"]);
    assert!(ok, "{out}");
    let (ok, out) = distil(&["check", p, "--set", "training.nonsense=1"]);
    assert!(!ok && out.contains("unknown field `nonsense`"), "{out}");
    let (ok, out) = distil(&["check", p, "--set", "noequals"]);
    assert!(!ok && out.contains("expected key.path=value"), "{out}");
}

#[test]
fn a_hub_id_that_is_not_cached_is_to_be_downloaded() {
    let text = GOOD
        .replace("tokenizer:\n  load: tests/fixtures/tokenizer\n", "")
        .replace(
            "model:\n  config:\n    hidden_size: 32\n    num_hidden_layers: 2\n    num_attention_heads: 4\n    intermediate_size: 64\n",
            "model:\n  from: some-org/not-cached-model\n",
        );
    let (ok, out) = check_text(&text);
    assert!(ok, "{out}");
    assert!(
        out.contains("some-org/not-cached-model is not cached: it will be downloaded"),
        "{out}"
    );
    let _ = Path::new("");
}

#[test]
fn mixed_precision_needs_a_cuda_device() {
    // On the CPU (the default device) both switches are refused by `check` and by `run`,
    // naming the key and the device.
    for key in ["bf16", "fp16"] {
        let text = GOOD.replacen(
            "  learning_rate: 1.0e-3",
            &format!("  learning_rate: 1.0e-3\n  {key}: true"),
            1,
        );
        let (ok, out) = check_text(&text);
        assert!(!ok, "{key} on the CPU should fail");
        let want = format!(
            "r.yaml:16:3: training.{key}: mixed precision needs a CUDA device (device: cpu)"
        );
        assert!(out.contains(&want), "expected {want:?} in:\n{out}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.yaml");
        std::fs::write(&p, GOOD).unwrap();
        let set = format!("training.{key}=true");
        let (ok, out) = distil(&["run", p.to_str().unwrap(), "--set", &set]);
        assert!(!ok, "run with {key} on the CPU should fail");
        assert!(
            out.contains(&format!(
                "training.{key}: mixed precision needs a CUDA device (device: cpu)"
            )),
            "{out}"
        );
    }
    let both = GOOD.replacen(
        "  learning_rate: 1.0e-3",
        "  learning_rate: 1.0e-3\n  device: cuda\n  bf16: true\n  fp16: true",
        1,
    );
    let (ok, out) = check_text(&both);
    assert!(
        !ok && out.contains("training.fp16: give either bf16 or fp16, not both"),
        "{out}"
    );
    // On a CUDA device the recipe is valid; a build without the feature says so at run time.
    let gpu = GOOD.replacen(
        "  learning_rate: 1.0e-3",
        "  learning_rate: 1.0e-3\n  device: cuda:0\n  bf16: true",
        1,
    );
    let (ok, out) = check_text(&gpu);
    assert!(ok, "{out}");
    if !cfg!(feature = "cuda") {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.yaml");
        let gpu = gpu.replace(
            "/tmp/distil-recipe-test",
            dir.path().join("out").to_str().unwrap(),
        );
        std::fs::write(&p, gpu).unwrap();
        let (ok, out) = distil(&["run", p.to_str().unwrap()]);
        assert!(
            !ok && out.contains("built without the `cuda` feature"),
            "{out}"
        );
    }
}
