//! The commands and scripts the GPU checks run (`distil parity`, `distil bench-step`,
//! `scripts/gpu/*.sh`), exercised on the CPU: a GPU machine has no Rust toolchain to find
//! their bugs with.

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn distil(args: &[&str]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_distil"))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

const FIXTURES: [&str; 4] = [
    "tests/fixtures/bert",
    "tests/fixtures/roberta",
    "tests/fixtures/distilbert",
    "tests/fixtures/albert",
];

#[test]
fn parity_passes_on_the_cpu_in_every_precision() {
    for dtype in ["f32", "bf16", "f16"] {
        let mut args = vec!["parity"];
        args.extend(FIXTURES);
        args.extend(["--device", "cpu", "--dtype", dtype]);
        let (ok, out) = distil(&args);
        assert!(ok, "{dtype}: {out}");
        assert!(out.contains("all passed"), "{out}");
        assert_eq!(out.matches("| PASS |").count(), 4, "{out}");
    }
    // A tolerance below bf16's rounding fails, with exit status 1.
    let (ok, out) = distil(&[
        "parity",
        "tests/fixtures/bert",
        "--dtype",
        "bf16",
        "--tol-forward",
        "1e-5",
    ]);
    assert!(
        !ok && out.contains("| FAIL |") && out.contains("FAILED"),
        "{out}"
    );
    // A device this build lacks is an error that says so.
    if !cfg!(feature = "cuda") {
        let (ok, out) = distil(&["parity", "tests/fixtures/bert", "--device", "cuda:0"]);
        assert!(!ok && out.contains("without the `cuda` feature"), "{out}");
    }
}

#[test]
fn bench_step_prints_one_json_line() {
    for dtype in ["f32", "bf16"] {
        let (ok, out) = distil(&[
            "bench-step",
            "--shape",
            "small",
            "--device",
            "cpu",
            "--dtype",
            dtype,
            "--batch",
            "2",
            "--seq",
            "16",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--peak-size",
            "32",
            "--peak-tflops",
            "1",
        ]);
        assert!(ok, "{out}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
        assert_eq!(v["dtype"], dtype);
        assert_eq!(v["student_layers"], 2);
        assert!(v["tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!(v["last_loss"].as_f64().unwrap().is_finite());
        // benches/torch_step.py's count for the same shape and batch.
        assert_eq!(v["matmul_flops"].as_f64().unwrap(), 593_100_800.0);
        assert!(v["mfu"].as_f64().is_some() && v["pct_of_matmul_peak"].as_f64().is_some());
    }
    // The parts of the step, with candle's composed ops.
    let (ok, out) = distil(&[
        "bench-step",
        "--shape",
        "small",
        "--device",
        "cpu",
        "--batch",
        "2",
        "--seq",
        "16",
        "--iters",
        "2",
        "--warmup",
        "0",
        "--peak-size",
        "0",
        "--parts",
        "--composed",
    ]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
    assert_eq!(v["composed"], true);
    let parts = v["parts"].as_object().expect("parts");
    for k in ["teacher", "student_forward", "backward", "optimizer"] {
        assert!(parts[k].as_f64().unwrap() > 0.0, "{k}: {parts:?}");
    }
}

#[test]
fn gpu_scripts_parse_and_explain_themselves() {
    for s in [
        "scripts/gpu/build-cuda.sh",
        "scripts/gpu/run-gpu-checks.sh",
        "scripts/gpu/pack-for-device.sh",
    ] {
        let o = Command::new("bash")
            .args(["-n", s])
            .current_dir(root())
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{s}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let o = Command::new(root().join(s)).arg("--help").output().unwrap();
        let help = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success() && help.contains("GPU"), "{s}: {help}");
    }
}
