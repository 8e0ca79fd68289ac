//! `distil tokenizer train`, `distil eval` and `distil report`, run as a user runs them: the
//! binary on small inputs (the Shakespeare corpus, a tiny run trained here).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn corpus(name: &str) -> String {
    root()
        .join("data/shakespeare")
        .join(name)
        .display()
        .to_string()
}

fn distil(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_distil"))
        .args(args)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "distil failed:\nstdout:\n{}\nstderr:\n{}",
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// Runs and expects a non-zero exit; returns stderr.
fn fails(o: Output) -> String {
    assert!(
        !o.status.success(),
        "distil should have failed:\nstdout:\n{}",
        stdout(&o)
    );
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("error: "), "{e}");
    e
}

/// A scratch directory for this test binary under cargo's target tmp dir (emptied at start).
fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("cli_tools")
        .join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const STEPS: u64 = 24;

/// A tiny pretraining run (trained once for all the tests of this file).
fn tiny_run() -> &'static Path {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = scratch("run");
        let out = dir.join("tiny");
        let recipe = dir.join("tiny.yaml");
        std::fs::write(
            &recipe,
            format!(
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
    paths: [{tempest}]
  sequences:
    block_size: 32
    eval_fraction: 0.1
  cache_dir: {cache}
training:
  output_dir: {out}
  per_device_train_batch_size: 8
  learning_rate: 2.0e-3
  warmup_ratio: 0.1
  max_steps: {STEPS}
  save_steps: 12
  logging_steps: 2
  eval_steps: 8
  seed: 42
",
                root = root().display(),
                tempest = corpus("tempest.txt"),
                cache = dir.join("cache").display(),
                out = out.display()
            ),
        )
        .unwrap();
        ok(distil(&["run", recipe.to_str().unwrap(), "--quiet"]));
        out
    })
}

fn cache_dir() -> String {
    tiny_run()
        .parent()
        .unwrap()
        .join("cache")
        .display()
        .to_string()
}

// ---------------------------------------------------------------- tokenizer

fn field<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no `{key}` line in:\n{out}"))
        .trim()
}

#[test]
fn tokenizer_train_wordpiece() {
    let dir = scratch("wordpiece");
    let out = dir.join("tok");
    let s = ok(distil(&[
        "tokenizer",
        "train",
        "--data",
        &corpus("tempest.txt"),
        &corpus("macbeth.txt"),
        "--vocab-size",
        "1500",
        "--out",
        out.to_str().unwrap(),
    ]));
    let n: usize = field(&s, "vocab size:").parse().unwrap();
    assert!((500..=1500).contains(&n), "{s}");
    assert!(
        field(&s, "special ids:")
            .contains("pad=0 [PAD], unk=100 [UNK], cls=101 [CLS], sep=102 [SEP], mask=103 [MASK]"),
        "{s}"
    );
    // The sample encoding is the first line of six words or more, lower-cased.
    assert_eq!(field(&s, "sample:"), "PROSPERO, the right Duke of Milan");
    let tokens = field(&s, "tokens:");
    assert!(tokens.starts_with("[CLS] prospero"), "{tokens}");
    assert!(tokens.ends_with("[SEP]"), "{tokens}");
    let ids: Vec<u32> = field(&s, "ids:")
        .split(' ')
        .map(|x| x.parse().unwrap())
        .collect();
    assert_eq!(ids.len(), tokens.split(' ').count());
    assert_eq!((ids[0], *ids.last().unwrap()), (101, 102));
    // What was saved loads back, with the size printed.
    for f in ["tokenizer.json", "vocab.txt", "tokenizer_config.json"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let tok = distil::data::Tok::load(&out, &Default::default()).unwrap();
    assert_eq!(tok.vocab_size(), n);
    let (re, _) = tok
        .encode_with_specials("PROSPERO, the right Duke of Milan", None)
        .unwrap();
    assert_eq!(re, ids);

    // --no-lowercase keeps the case.
    let out2 = dir.join("cased");
    let s = ok(distil(&[
        "tokenizer",
        "train",
        "--data",
        &corpus("tempest.txt"),
        "--vocab-size",
        "1000",
        "--no-lowercase",
        "--out",
        out2.to_str().unwrap(),
    ]));
    assert!(field(&s, "tokens:").contains("PRO"), "{s}");
}

#[test]
fn tokenizer_train_bpe() {
    let dir = scratch("bpe");
    let out = dir.join("tok");
    let s = ok(distil(&[
        "tokenizer",
        "train",
        "--data",
        &corpus("tempest.txt"),
        "--vocab-size",
        "800",
        "--kind",
        "bpe",
        "--min-frequency",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]));
    let n: usize = field(&s, "vocab size:").parse().unwrap();
    assert!((300..=800).contains(&n), "{s}");
    assert!(
        field(&s, "special ids:")
            .contains("pad=1 <pad>, unk=3 <unk>, cls=0 <s>, sep=2 </s>, mask=4 <mask>"),
        "{s}"
    );
    assert!(out.join("vocab.json").is_file() && out.join("merges.txt").is_file());
    let ids: Vec<u32> = field(&s, "ids:")
        .split(' ')
        .map(|x| x.parse().unwrap())
        .collect();
    assert_eq!((ids[0], *ids.last().unwrap()), (0, 2));
}

#[test]
fn tokenizer_train_bad_input() {
    let dir = scratch("tokenizer-errors");
    let out = dir.join("tok");
    let out = out.to_str().unwrap();
    let e = fails(distil(&[
        "tokenizer",
        "train",
        "--data",
        &corpus("tempest.txt"),
        "--vocab-size",
        "50",
        "--out",
        out,
    ]));
    assert!(e.contains("--vocab-size: 50 is too small"), "{e}");
    let missing = dir.join("no-such.txt");
    let e = fails(distil(&[
        "tokenizer",
        "train",
        "--data",
        missing.to_str().unwrap(),
        "--vocab-size",
        "500",
        "--out",
        out,
    ]));
    assert!(
        e.contains("--data") && e.contains("no-such.txt") && e.contains("does not exist"),
        "{e}"
    );
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "\n\n").unwrap();
    let e = fails(distil(&[
        "tokenizer",
        "train",
        "--data",
        empty.to_str().unwrap(),
        "--vocab-size",
        "500",
        "--out",
        out,
    ]));
    assert!(
        e.contains("empty.txt") && e.contains("holds no text"),
        "{e}"
    );
    let e = fails(distil(&[
        "tokenizer",
        "train",
        "--data",
        &corpus("tempest.txt"),
        "--vocab-size",
        "500",
        "--kind",
        "bpe",
        "--lowercase",
        "--out",
        out,
    ]));
    assert!(e.contains("--lowercase") && e.contains("bpe"), "{e}");
    assert!(!Path::new(out).exists(), "nothing saved after an error");
}

// ---------------------------------------------------------------- eval

#[derive(Debug, PartialEq)]
struct Row {
    model: String,
    layers: usize,
    parameters: usize,
    loss: f64,
    perplexity: f64,
    accuracy: f64,
    tokens_per_s: f64,
}

/// Parses the table `distil eval` prints.
fn rows(out: &str) -> Vec<Row> {
    let lines: Vec<&str> = out.lines().filter(|l| l.starts_with('|')).collect();
    assert!(lines.len() >= 3, "no table in:\n{out}");
    assert!(lines[0].contains("held-out MLM loss") && lines[0].contains("eval tokens/s"));
    lines[2..]
        .iter()
        .map(|l| {
            let c: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            assert_eq!(c.len(), 7, "{l}");
            Row {
                model: c[0].into(),
                layers: c[1].parse().unwrap(),
                parameters: c[2].parse().unwrap(),
                loss: c[3].parse().unwrap(),
                perplexity: c[4].parse().unwrap(),
                accuracy: c[5].trim_end_matches('%').parse().unwrap(),
                tokens_per_s: c[6].parse().unwrap(),
            }
        })
        .collect()
}

fn eval_args<'a>(extra: &[&'a str], cache: &'a str, tempest: &'a str) -> Vec<&'a str> {
    let mut v = vec!["eval"];
    v.extend_from_slice(extra);
    v.extend_from_slice(&[
        "--data",
        tempest,
        "--block-size",
        "32",
        "--cache-dir",
        cache,
    ]);
    v
}

#[test]
fn eval_reproduces_the_runs_held_out_numbers() {
    let run = tiny_run();
    let run_s = run.to_str().unwrap();
    let cache = cache_dir();
    let tempest = corpus("tempest.txt");
    let json = run.parent().unwrap().join("eval.json");
    // The same checkpoint twice, on the held-out split the recipe cut (fraction 0.1, seed 42).
    let mut args = eval_args(&[run_s, run_s], &cache, &tempest);
    args.extend_from_slice(&["--eval-fraction", "0.1", "--json", json.to_str().unwrap()]);
    let o = distil(&args);
    assert!(!stderr(&o).contains("note:"), "{}", stderr(&o));
    let s = ok(o);
    let r = rows(&s);
    assert_eq!(r.len(), 2, "{s}");
    assert_eq!(r[0].layers, 2);
    assert!(r[0].parameters > 10_000);
    assert!(r[0].loss.is_finite() && r[0].loss > 0.0);
    assert!((r[0].perplexity - r[0].loss.exp()).abs() / r[0].perplexity < 1e-3);
    assert!((0.0..=100.0).contains(&r[0].accuracy));
    assert!(r[0].tokens_per_s > 0.0);
    assert_eq!(
        (r[0].loss, r[0].perplexity, r[0].accuracy),
        (r[1].loss, r[1].perplexity, r[1].accuracy),
        "the same checkpoint gave different numbers"
    );

    // The JSON holds the same numbers, at full precision, and they equal the run's own final
    // evaluation (eval_results.json).
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let models = j["models"].as_array().unwrap();
    assert_eq!(models.len(), 2);
    assert_eq!(models[0]["loss"], models[1]["loss"]);
    assert_eq!(models[0]["masked_tokens"], models[1]["masked_tokens"]);
    let er: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("eval_results.json")).unwrap())
            .unwrap();
    let (mine, theirs) = (
        models[0]["loss"].as_f64().unwrap(),
        er["eval"]["loss"].as_f64().unwrap(),
    );
    assert!(
        (mine - theirs).abs() < 1e-9,
        "distil eval gives {mine}, the run logged {theirs}"
    );
    assert_eq!(models[0]["masked_tokens"], er["eval"]["masked_tokens"]);
    assert_eq!(
        models[0]["accuracy"].as_f64().unwrap(),
        er["eval"]["accuracy"].as_f64().unwrap()
    );
    assert_eq!(j["eval_fraction"].as_f64(), Some(0.1));

    // A second process gives the same numbers; a mid-run checkpoint is compared on the same
    // tokens and (after 12 of 24 steps) does worse than the final model.
    let ck = run.join("checkpoint-12");
    let mut args = eval_args(&[run_s, ck.to_str().unwrap()], &cache, &tempest);
    args.extend_from_slice(&["--eval-fraction", "0.1"]);
    let r2 = rows(&ok(distil(&args)));
    assert_eq!(r2[0].loss, r[0].loss);
    assert_eq!(r2[0].accuracy, r[0].accuracy);
    assert!(r2[1].model.ends_with("checkpoint-12"));
    assert!(r2[1].loss > r2[0].loss, "{r2:?}");
}

#[test]
fn eval_on_all_of_the_text_with_options() {
    let run = tiny_run();
    let run_s = run.to_str().unwrap();
    let cache = cache_dir();
    let tempest = corpus("tempest.txt");
    let mut args = eval_args(&[run_s], &cache, &tempest);
    args.extend_from_slice(&[
        "--mode",
        "line_by_line",
        "--masking",
        "whole_word",
        "--probability",
        "0.2",
        "--batch-size",
        "8",
        "--max-batches",
        "5",
        "--seed",
        "3",
    ]);
    let o = distil(&args);
    // The run's recipe.yaml tells which flags would give its held-out numbers.
    let note = stderr(&o);
    for flag in [
        "--eval-fraction 0.1",
        "--mode packed",
        "--masking token",
        "--probability 0.15",
        "--batch-size 16",
        "--seed 42",
    ] {
        assert!(note.contains(flag), "{flag} not in {note}");
    }
    let s = ok(o);
    assert!(s.contains("all of the text"), "{s}");
    assert!(s.contains("line_by_line sequences"), "{s}");
    assert!(s.contains("in 5 batches"), "{s}");
    let r = rows(&s);
    assert_eq!(r.len(), 1);
    assert!(r[0].loss.is_finite());
    // Another seed masks other tokens.
    let n = args.len();
    args[n - 1] = "4";
    let r4 = rows(&ok(distil(&args)));
    assert_ne!(r4[0].loss, r[0].loss);
}

#[test]
fn eval_bad_input() {
    let run = tiny_run();
    let run_s = run.to_str().unwrap();
    let cache = cache_dir();
    let tempest = corpus("tempest.txt");
    let dir = scratch("eval-errors");

    // A checkpoint that does not exist.
    let missing = dir.join("no-such-run");
    let e = fails(distil(&eval_args(
        &[run_s, missing.to_str().unwrap()],
        &cache,
        &tempest,
    )));
    assert!(
        e.contains("no-such-run") && e.contains("no such directory"),
        "{e}"
    );

    // A checkpoint without an MLM head: the tiny model with its cls.* tensors taken out.
    let headless = dir.join("headless");
    std::fs::create_dir_all(&headless).unwrap();
    std::fs::copy(run.join("config.json"), headless.join("config.json")).unwrap();
    let tensors =
        candle_core::safetensors::load(run.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let kept: std::collections::HashMap<String, candle_core::Tensor> = tensors
        .into_iter()
        .filter(|(k, _)| !k.starts_with("cls."))
        .collect();
    candle_core::safetensors::save(&kept, headless.join("model.safetensors")).unwrap();
    let e = fails(distil(&eval_args(
        &[run_s, headless.to_str().unwrap()],
        &cache,
        &tempest,
    )));
    assert!(
        e.contains("headless") && e.contains("has no MLM head"),
        "{e}"
    );

    // Empty --data.
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let e = fails(distil(&eval_args(
        &[run_s],
        &cache,
        empty.to_str().unwrap(),
    )));
    assert!(
        e.contains("--data") && e.contains("empty.txt") && e.contains("empty"),
        "{e}"
    );

    // A held-out split too small to hold a sequence, and out-of-range options.
    let mut args = eval_args(&[run_s], &cache, &tempest);
    args.extend_from_slice(&["--eval-fraction", "1.5"]);
    assert!(fails(distil(&args)).contains("--eval-fraction must be between 0 and 1"));
    let mut args = eval_args(&[run_s], &cache, &tempest);
    args.extend_from_slice(&["--batch-size", "0"]);
    assert!(fails(distil(&args)).contains("--batch-size"));
    let mut args = vec!["eval", run_s, "--data", &tempest, "--block-size", "500"];
    args.extend_from_slice(&["--cache-dir", &cache]);
    let e = fails(distil(&args));
    assert!(
        e.contains("--block-size 500") && e.contains("64 positions"),
        "{e}"
    );

    // A checkpoint with another vocabulary.
    let e = fails(distil(&eval_args(
        &[run_s, root().join("tests/fixtures/bert").to_str().unwrap()],
        &cache,
        &tempest,
    )));
    assert!(
        e.contains("tests/fixtures/bert") && e.contains("vocabulary size 99"),
        "{e}"
    );
}

// ---------------------------------------------------------------- report

fn is_png(path: &Path) -> bool {
    let b = std::fs::read(path).unwrap();
    b.len() > 1000 && b.starts_with(b"\x89PNG\r\n\x1a\n") && b[12..16] == *b"IHDR"
}

fn png_size(path: &Path) -> (u32, u32) {
    let b = std::fs::read(path).unwrap();
    let be = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap());
    (be(16), be(20))
}

#[test]
fn report_of_a_pretraining_run() {
    let run = tiny_run();
    let s = ok(distil(&["report", run.to_str().unwrap()]));
    let png = run.join("report.png");
    assert!(is_png(&png), "not a PNG: {}", png.display());
    let (w, h) = png_size(&png);
    assert!(w >= 800 && h >= 600, "{w}x{h}");
    assert_eq!(field(&s, "steps"), STEPS.to_string());
    let num = |k: &str| -> f64 {
        field(&s, k)
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (first, last, min) = (
        num("first training loss"),
        num("last training loss"),
        num("min training loss"),
    );
    assert!(min <= first && min <= last && last < first, "{s}");
    assert!(num("final learning rate") >= 0.0);
    assert!(num("tokens/s (median)") > 0.0);
    // Evaluations at steps 8, 16 and the final one at 24.
    let evals: Vec<(u64, f64, f64, f64)> = s
        .lines()
        .filter(|l| l.starts_with("| ") && !l.contains("step"))
        .map(|l| {
            let c: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            (
                c[0].parse().unwrap(),
                c[1].parse().unwrap(),
                c[2].parse().unwrap(),
                c[3].trim_end_matches('%').parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        evals.iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![8, 16, 24],
        "{s}"
    );
    assert!(evals.iter().all(|e| (e.2 - e.1.exp()).abs() / e.2 < 1e-3));
    assert!(
        s.contains("eval_results.json:") && s.contains("step 24: MLM loss"),
        "{s}"
    );
    assert!(!s.contains("comparison.md"));

    // --out elsewhere.
    let other = run.parent().unwrap().join("plots/curves.png");
    ok(distil(&[
        "report",
        run.to_str().unwrap(),
        "--out",
        other.to_str().unwrap(),
    ]));
    assert!(is_png(&other));
}

#[test]
fn report_of_a_distillation_run() {
    // A distillation run's files, written by hand: loss parts, the temperature, comparison.md.
    let dir = scratch("distill-run");
    let mut m = String::new();
    for step in (10..=100).step_by(10) {
        let t = step as f64;
        m += &format!(
            "{{\"step\":{step},\"loss\":{},\"learning_rate\":{},\"loss_soft\":{},\"loss_hard\":{},\"loss_cosine\":{},\"temperature\":2.0,\"tokens_per_s\":{}}}\n",
            10.0 - t / 20.0,
            1e-3 * (1.0 - t / 100.0),
            0.02 - t / 1e4,
            5.0 - t / 50.0,
            0.07 - t / 1e4,
            1000.0 + t
        );
        if step % 50 == 0 {
            m += &format!(
                "{{\"step\":{step},\"eval_loss\":{},\"eval_perplexity\":{},\"eval_accuracy\":0.125,\"eval_masked_tokens\":100}}\n",
                6.0 - t / 100.0,
                (6.0 - t / 100.0f64).exp()
            );
        }
    }
    std::fs::write(dir.join("metrics.jsonl"), m).unwrap();
    let table = "| model | layers |\n|---|---|\n| teacher | 4 |\n| student | 2 |\n";
    std::fs::write(dir.join("comparison.md"), table).unwrap();
    let s = ok(distil(&["report", dir.to_str().unwrap()]));
    assert!(is_png(&dir.join("report.png")));
    assert_eq!(field(&s, "steps"), "100");
    assert_eq!(field(&s, "first training loss"), "9.5000 (step 10)");
    assert_eq!(field(&s, "min training loss"), "5.0000 (step 100)");
    assert_eq!(field(&s, "tokens/s (median)"), "1055");
    assert_eq!(field(&s, "last loss_hard"), "3.0000");
    assert!(
        s.contains("|       50 |     5.5000 |       244.69 |    12.50% |"),
        "{s}"
    );
    assert!(
        s.contains("comparison.md") && s.contains("| student | 2 |"),
        "{s}"
    );
    // Five panels (loss, learning rate, evaluation, parts, temperature) take a row more than
    // the three of a run that logs no parts.
    let (_, h) = png_size(&dir.join("report.png"));
    let plain = scratch("plain-run");
    std::fs::write(
        plain.join("metrics.jsonl"),
        "{\"step\":1,\"loss\":2.0,\"learning_rate\":0.1}\n{\"step\":2,\"loss\":1.5,\"learning_rate\":0.05}\n",
    )
    .unwrap();
    let s = ok(distil(&["report", plain.to_str().unwrap()]));
    assert!(s.contains("no evaluation logged"), "{s}");
    let (_, h1) = png_size(&plain.join("report.png"));
    assert!(h > h1, "{h} vs {h1}");
}

#[test]
fn report_bad_input() {
    let dir = scratch("report-errors");
    let e = fails(distil(&["report", dir.join("nope").to_str().unwrap()]));
    assert!(
        e.contains("nope") && e.contains("no such run directory"),
        "{e}"
    );
    let e = fails(distil(&["report", dir.to_str().unwrap()]));
    assert!(e.contains("metrics.jsonl"), "{e}");
    std::fs::write(
        dir.join("metrics.jsonl"),
        "{\"step\":1,\"loss\":2.0,\"learning_rate\":0.1}\nnot json\n",
    )
    .unwrap();
    let e = fails(distil(&["report", dir.to_str().unwrap()]));
    assert!(e.contains("metrics.jsonl:2"), "{e}");
    std::fs::write(dir.join("metrics.jsonl"), "{\"loss\":2.0}\n").unwrap();
    let e = fails(distil(&["report", dir.to_str().unwrap()]));
    assert!(
        e.contains("metrics.jsonl:1") && e.contains("\"step\""),
        "{e}"
    );
    std::fs::write(dir.join("metrics.jsonl"), "{\"step\":1,\"loss\":2.0}\n").unwrap();
    let e = fails(distil(&[
        "report",
        dir.to_str().unwrap(),
        "--out",
        dir.join("r.jpg").to_str().unwrap(),
    ]));
    assert!(e.contains("--out") && e.contains(".png"), "{e}");
    // One logged step is enough for a picture.
    ok(distil(&["report", dir.to_str().unwrap()]));
    assert!(is_png(&dir.join("report.png")));
}
