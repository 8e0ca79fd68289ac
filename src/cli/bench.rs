//! `distil bench-step`: the timing of one DistilBERT-style distillation step on any device and
//! matmul precision, from the release binary (a GPU machine runs it without a Rust toolchain),
//! to set beside `benches/torch_step.py --mode distill --device cuda [--dtype bf16]`.
//!
//! The step is `benches/encoder_step.rs --mode distill`'s: a frozen BERT teacher of the shape
//! (eval mode, no gradient tracking), a DistilBERT student of the same width with half its
//! layers (base: 6 of 12) initialised from it, dropout 0.1, both MLM heads on the masked rows
//! only, loss 5 · soft KL (T = 2) + 2 · MLM + 1 · hidden-state cosine, backward and AdamW on
//! the student; the batch (ids and 15% masked positions) is `shared_batch`'s, which
//! torch_step.py reproduces. Each step is timed from a synchronised device to a synchronised
//! device; the median is reported. `matmul_flops` counts the teacher's forward plus 3 × the
//! student's (torch_step.py's count), `tflops` is that over the median, `mfu` is `tflops`
//! over `--peak-tflops` (the GPU's nominal dense peak in the matmul precision, e.g. 989 for an
//! H100 SXM / H200 in bf16, 67 in fp32 without TF32), and `pct_of_matmul_peak` is it over the
//! best of a few square matmuls in the same precision measured here.
//!
//! The parts run one after the other here, the update at the end of its step, as the trainer
//! runs them on a GPU. On the CPU the trainer runs the teacher beside the previous step's
//! update and the student's forward (`DistillObjective`, `Deferred`), and so does
//! `benches/encoder_step.rs --mode distill`, which is the CPU's benchmark.

use crate::cli::parity::MatmulDtype;
use crate::loss::{cosine_loss, cross_entropy, masked_positions, soft_kl, teacher_probs};
use crate::model::student::init_from_teacher;
use crate::model::{Encoder, EncoderConfig, EncoderInput, ForwardOptions, Layout, Params, Parts};
use crate::recipe::parse_device;
use crate::train::optim::{AdamW, AdamWConfig};
use crate::util::{splitmix64, SPLITMIX_GAMMA};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Args, ValueEnum};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchShape {
    /// 4 layers, hidden 256, 4 heads, FFN 1024, vocabulary 8000 (student: 2 layers).
    Small,
    /// BERT base: 12 layers, hidden 768, 12 heads, FFN 3072, vocabulary 30522 (student: 6).
    Base,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[arg(long, value_enum, default_value = "base")]
    pub shape: BenchShape,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cuda:0")]
    pub device: String,
    /// The matmuls' precision (mixed precision as training.bf16 / training.fp16 runs it).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: MatmulDtype,
    /// Sequences per batch (default: 16 for small, 8 for base, as encoder_step.rs).
    #[arg(long)]
    pub batch: Option<usize>,
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// The student's layers (default: small 2, base 6).
    #[arg(long)]
    pub student_layers: Option<usize>,
    /// The device's nominal dense matmul peak in TFLOP/s for this precision (for `mfu`).
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Side of the square matmul timed for the measured peak; 0 skips it.
    #[arg(long, default_value_t = 4096)]
    pub peak_size: usize,
    /// Also time the step's parts (teacher, student forward with the losses, backward,
    /// optimiser), synchronising the device between them, in `--iters` more steps.
    #[arg(long)]
    pub parts: bool,
    /// Run the encoders and AdamW as candle's composed ops, without distil's fused kernels
    /// (on a GPU: the CUDA kernels of `model::cuda`; the losses keep theirs), for comparison.
    #[arg(long)]
    pub composed: bool,
}

/// The parts of a step `--parts` times, in order.
const PARTS: [&str; 4] = ["teacher", "student_forward", "backward", "optimizer"];

const TEMPERATURE: f64 = 2.0;
const W_SOFT: f64 = 5.0;
const W_HARD: f64 = 2.0;
const W_COSINE: f64 = 1.0;

/// `tokens` ids in `low..vocab` and `n_masked` distinct sorted masked positions from one
/// splitmix64 stream (seed 0): benches/encoder_step.rs's and torch_step.py's `shared_batch`.
pub fn shared_batch(
    tokens: usize,
    vocab: u64,
    low: u64,
    n_masked: usize,
) -> (Vec<u32>, Vec<usize>) {
    let mut state = 0u64;
    let mut next = || {
        let z = splitmix64(state);
        state = state.wrapping_add(SPLITMIX_GAMMA);
        z
    };
    let ids = (0..tokens)
        .map(|_| (low + next() % (vocab - low)) as u32)
        .collect();
    let mut keyed: Vec<(u64, usize)> = (0..tokens).map(|p| (next(), p)).collect();
    keyed.sort_unstable();
    let mut masked: Vec<usize> = keyed[..n_masked].iter().map(|&(_, p)| p).collect();
    masked.sort_unstable();
    (ids, masked)
}

/// The bench's DistilBERT-style student of `teacher`'s width with `layers` layers.
pub fn distilbert_student_config(teacher: &EncoderConfig, layers: usize) -> EncoderConfig {
    let mut c = teacher.clone();
    c.layout = Layout::DistilBert;
    c.num_layers = layers;
    c.type_vocab_size = 0;
    c
}

/// MLM labels (-100 where not masked) and the ids with `[MASK]` (103) at `masked`.
pub fn mask_batch(ids: &[u32], masked: &[usize]) -> (Vec<i64>, Vec<u32>) {
    let mut labels = vec![-100i64; ids.len()];
    let mut train_ids = ids.to_vec();
    for &p in masked {
        labels[p] = ids[p] as i64;
        train_ids[p] = 103;
    }
    (labels, train_ids)
}

/// Matmul FLOPs of one forward pass (torch_step.py's `matmul_flops`).
pub fn forward_matmul_flops(
    cfg: &EncoderConfig,
    batch: usize,
    seq: usize,
    head_rows: usize,
) -> f64 {
    let (b, s) = (batch as f64, seq as f64);
    let (h, f, v) = (
        cfg.hidden_size as f64,
        cfg.intermediate_size as f64,
        cfg.vocab_size as f64,
    );
    let t = b * s;
    let per_layer = 2.0 * t * h * h * 4.0 + 2.0 * t * h * f * 2.0 + 2.0 * b * s * s * h * 2.0;
    let rows = head_rows as f64;
    cfg.num_layers as f64 * per_layer + 2.0 * rows * h * h + 2.0 * rows * h * v
}

/// The median of `xs` (the mean of the middle two for an even count).
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Best TFLOP/s of a few `n×n · n×n` matmuls in `dtype` on `dev`.
fn matmul_peak(n: usize, dtype: DType, dev: &Device) -> Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (n, n), dev)?.to_dtype(dtype)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), dev)?.to_dtype(dtype)?;
    let _ = a.matmul(&b)?;
    dev.synchronize()?;
    let mut best = Duration::MAX;
    let deadline = Instant::now() + Duration::from_secs(3);
    for i in 0..10 {
        let t0 = Instant::now();
        let c = a.matmul(&b)?;
        dev.synchronize()?;
        best = best.min(t0.elapsed());
        drop(c);
        if i >= 2 && Instant::now() > deadline {
            break;
        }
    }
    Ok(2.0 * (n as f64).powi(3) / best.as_secs_f64() / 1e12)
}

fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

/// Runs the benchmark and returns its JSON line.
pub fn run(args: &BenchArgs) -> Result<Value> {
    if args.iters == 0 {
        bail!("--iters must be at least 1");
    }
    let dev = parse_device(&args.device)
        .map_err(|e| anyhow::anyhow!("--device: {e}"))?
        .device()?;
    let dtype = args.dtype.dtype();
    let (layers, hidden, heads, ffn, vocab) = match args.shape {
        BenchShape::Small => (4, 256, 4, 1024, 8000),
        BenchShape::Base => (12, 768, 12, 3072, 30522),
    };
    let b = args.batch.unwrap_or(match args.shape {
        BenchShape::Small => 16,
        BenchShape::Base => 8,
    });
    let s = args.seq;
    let mut cfg = EncoderConfig::bert(vocab, hidden, layers, heads, ffn);
    cfg.max_position_embeddings = cfg.max_position_embeddings.max(s);
    let mut tcfg = cfg.clone();
    tcfg.hidden_dropout = 0.0;
    tcfg.attention_dropout = 0.0;
    let mut teacher = Encoder::new(
        tcfg.clone(),
        Params::random(&tcfg, Parts::MLM, 0, &dev, false)?,
    )?;
    let student_layers = args.student_layers.unwrap_or(layers / 2);
    if student_layers == 0 || student_layers > layers {
        bail!("--student-layers must be 1 to {layers}");
    }
    let mut scfg = distilbert_student_config(&cfg, student_layers);
    scfg.hidden_dropout = 0.1;
    scfg.attention_dropout = 0.1;
    let mut student = Encoder::new(scfg.clone(), init_from_teacher(&teacher, &scfg, None, 0)?)?;
    teacher.set_compute_dtype(dtype);
    student.set_compute_dtype(dtype);
    teacher.set_fused(!args.composed);
    student.set_fused(!args.composed);

    let tokens = b * s;
    let low = if vocab > 2000 { 1000 } else { 5 };
    let n_masked = ((tokens as f64 * 0.15).round() as usize).max(1);
    let (ids, masked) = shared_batch(tokens, vocab as u64, low as u64, n_masked);
    let (labels, train_ids) = mask_batch(&ids, &masked);
    let targets = masked_positions(&labels, &dev)?;
    let input_ids = Tensor::from_vec(train_ids, (b, s), &dev)?;
    let attention_mask = Tensor::ones((b, s), DType::U32, &dev)?;
    let input = EncoderInput {
        input_ids: &input_ids,
        attention_mask: Some(&attention_mask),
        token_type_ids: None,
    };
    let mut opt = AdamW::new(
        student.params.vars(),
        AdamWConfig {
            weight_decay: 0.01,
            ..AdamWConfig::default()
        },
    )?;
    opt.set_fused(!args.composed);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut last_loss = f32::NAN;
    // One step; with `parts`, the device is synchronised after each part and its time added.
    let mut step = |parts: Option<&mut [Vec<f64>; 4]>| -> Result<f64> {
        dev.synchronize()?;
        let t0 = Instant::now();
        let mut marks = [Duration::ZERO; 4];
        let timed = parts.is_some();
        let mut mark = |i: usize| -> Result<()> {
            if timed {
                dev.synchronize()?;
                marks[i] = t0.elapsed();
            }
            Ok(())
        };
        let t_out = teacher.forward(&input, ForwardOptions::default(), None)?;
        let t_logits = teacher.mlm_logits_at(&t_out.last_hidden_state, &targets.positions)?;
        let t_probs = teacher_probs(&t_logits, TEMPERATURE)?;
        mark(0)?;
        let out = student.forward(&input, ForwardOptions::default(), Some(&mut rng))?;
        let logits = student.mlm_logits_at(&out.last_hidden_state, &targets.positions)?;
        let soft = soft_kl(&logits, &t_probs, TEMPERATURE)?;
        let hard = cross_entropy(&logits, &targets.targets)?;
        let cos = cosine_loss(
            &out.last_hidden_state,
            &t_out.last_hidden_state,
            &attention_mask,
        )?;
        let loss = (((&soft * W_SOFT)? + (&hard * W_HARD)?)? + (&cos * W_COSINE)?)?;
        mark(1)?;
        let grads = student.backward(&loss)?;
        mark(2)?;
        let mut by_name = BTreeMap::new();
        for (name, var) in student.params.vars() {
            if let Some(g) = grads.get(var.as_tensor()) {
                by_name.insert(name.clone(), g.clone());
            }
        }
        opt.update(&by_name, 1e-4, 1.0)?;
        drop((t_out, t_probs, out, logits, grads, by_name));
        dev.synchronize()?;
        let dt = t0.elapsed();
        if let Some(parts) = parts {
            let mut from = Duration::ZERO;
            for (i, &to) in marks[..3].iter().chain([&dt]).enumerate() {
                parts[i].push((to - from).as_secs_f64());
                from = to;
            }
        }
        last_loss = loss.to_scalar::<f32>()?;
        Ok(dt.as_secs_f64())
    };
    let mut times = Vec::with_capacity(args.iters);
    let mut part_times: [Vec<f64>; 4] = Default::default();
    let run = || -> Result<()> {
        for i in 0..args.warmup + args.iters {
            let t = step(None)?;
            if i >= args.warmup {
                times.push(t);
            }
        }
        if args.parts {
            for _ in 0..args.iters {
                step(Some(&mut part_times))?;
            }
        }
        Ok(())
    };
    // As the trainer runs its steps.
    crate::util::threads::run_hot_on(&dev, run)?;
    let median_s = median(&times);
    let flops = forward_matmul_flops(&teacher.cfg, b, s, n_masked)
        + 3.0 * forward_matmul_flops(&student.cfg, b, s, n_masked);
    let tflops = flops / median_s / 1e12;
    let mut out = json!({
        "framework": "distil",
        "shape": format!("{:?}", args.shape).to_lowercase(),
        "mode": "distill",
        "device": args.device,
        "dtype": format!("{:?}", args.dtype).to_lowercase(),
        "batch": b,
        "seq": s,
        "teacher_layers": layers,
        "student_layers": student_layers,
        "tokens_per_s": round(tokens as f64 / median_s, 1),
        "median_s": round(median_s, 6),
        "min_s": round(times.iter().cloned().fold(f64::INFINITY, f64::min), 6),
        "iters": args.iters,
        "warmup": args.warmup,
        "matmul_flops": flops,
        "tflops": round(tflops, 3),
        "last_loss": round(last_loss as f64, 6),
        "composed": args.composed,
    });
    if args.parts {
        let parts: serde_json::Map<String, Value> = PARTS
            .iter()
            .zip(&part_times)
            .map(|(name, t)| (name.to_string(), json!(round(median(t), 6))))
            .collect();
        out["parts"] = Value::Object(parts);
    }
    if let Some(p) = args.peak_tflops {
        out["peak_tflops"] = json!(p);
        out["mfu"] = json!(round(tflops / p, 4));
    }
    if args.peak_size > 0 {
        let peak = matmul_peak(args.peak_size, dtype, &dev)?;
        out["matmul_peak_tflops"] = json!(round(peak, 2));
        out["pct_of_matmul_peak"] = json!(round(100.0 * tflops / peak, 1));
    }
    Ok(out)
}
