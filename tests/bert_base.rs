//! `distil run` on the BERT-base recipe starts training at the full shape on this machine
//! (a WordPiece vocabulary of 30,522 trained on the corpus, 12 layers, hidden 768): two steps,
//! limited with --set, end in a checkpoint that loads back with the full shape.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn bert_base_recipe_trains_at_full_shape() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if !root
        .join("../shared/corpora/en/wikipedia-leads.txt")
        .is_file()
    {
        eprintln!("SKIPPED: ../shared/corpora/en/wikipedia-leads.txt not found");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bert-base");
    let sets = [
        format!("training.output_dir={}", out.display()),
        "training.max_steps=2".into(),
        "training.per_device_train_batch_size=2".into(),
        "training.gradient_accumulation_steps=1".into(),
        "training.logging_steps=1".into(),
        "training.max_eval_batches=1".into(),
        "training.save_steps=0".into(),
        format!("data.cache_dir={}", tmp.path().join("cache").display()),
    ];
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_distil"));
    cmd.current_dir(&root)
        .args(["run", "recipes/bert-base.yaml", "--quiet"]);
    for s in &sets {
        cmd.args(["--set", s]);
    }
    let o = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["hidden_size"], 768);
    assert_eq!(cfg["num_hidden_layers"], 12);
    assert_eq!(cfg["vocab_size"], 30522);
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(metrics.lines().filter(|l| l.contains("\"loss\"")).count() == 2);
    let vocab = std::fs::read_to_string(out.join("vocab.txt")).unwrap();
    let lines: Vec<&str> = vocab.lines().collect();
    assert_eq!(lines.len(), 30522);
    assert_eq!(
        (lines[0], lines[100], lines[101], lines[102], lines[103]),
        ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
    );
}
