//! Timing of one BERT masked-LM step (or one distillation step) in distil, to set beside
//! `benches/torch_step.py`.
//!
//! ```text
//! cargo bench --bench encoder_step -- --shape small --mode train --threads 2
//! cargo bench --bench encoder_step -- --shape base --mode forward --iters 3 --warmup 1
//! cargo bench --bench encoder_step -- --shape small --mode distill --threads 2
//! benches/compare.sh small train 2      # ours and PyTorch's, alternating, with a table
//! ```
//!
//! Shapes (BERT layout, randomly initialised, float32, as torch_step.py):
//!   small: 4 layers, hidden 256, 4 heads, intermediate 1024, vocab 8000
//!   base:  12 layers, hidden 768, 12 heads, intermediate 3072, vocab 30522
//!
//! `--mode forward`: eval mode (no dropout, frozen parameters, no gradient tracking),
//! input ids -> MLM logits for every position `[batch, seq, vocab]`.
//! `--mode train`: dropout `--dropout` on (hidden and attention, seeded), forward + MLM
//! cross-entropy over a fixed 15% of the positions (replaced by `[MASK]`) + backward +
//! the crate's in-place AdamW update (`distil::train::optim`; weight decay 0.01, none on
//! biases and LayerNorm weights). `--no-optim` leaves the update out (the JSON then says
//! `"optimizer": false`; compare with `torch_step.py --no-optim`). The matmul FLOP count
//! never includes the optimiser. `--head-on masked` (the default here) runs the MLM head
//! only on the masked rows; `--head-on all` runs it on every position and then picks the
//! masked rows, as Hugging Face does.
//! `--mode distill`: one DistilBERT-style distillation step (issue 6). The teacher is the
//! shape above, frozen (parameters not trainable, eval mode, no gradient tracking); the
//! student is a DistilBERT-layout copy of it with `--student-layers` layers (small: 2,
//! base: 6) taken from the teacher by `distil::model::student::init_from_teacher`, dropout
//! `--dropout`. Both see the same masked batch; both run the MLM head on the masked rows
//! only. Loss, as `recipes/distilbert.yaml` and `DistillObjective`: 5 · soft KL·T² (T = 2,
//! masked rows) + 2 · MLM cross-entropy + 1 · cosine of the last hidden states over the
//! non-padding tokens, from `distil::loss`; then backward and the in-place AdamW on the
//! student. As distil's trainer, `MlmObjective` and `DistillObjective` run a step: each
//! step's AdamW update is held back and applied as the next step starts; in distill mode the
//! teacher's forward runs beside that update and the student's forward (`rayon::join`), in
//! train mode the update runs beside the forward, block by block
//! (`distil::train::optim::update_beside`).
//! Parts: `teacher_s` (teacher encoder + head + its softmax at T), `encoder_s` (student
//! encoder; train mode: with the update beside it), `head_s` (student head + the three
//! losses), `backward_s`, `optim_s` (the update; 0 in train mode, where it is inside
//! `encoder_s`); `forward_s`, the phase in which the teacher, the update and the student's
//! forward overlap (each of those three parts is timed as it ran, beside the others).
//! Batch 16 × 128 for small and 8 × 128 for base unless `--batch`/`--seq` say otherwise.
//! The ids and masked positions come from a splitmix64 stream that torch_step.py
//! reproduces, so both sides see the very same batch (`--mode forward|train` draw theirs
//! separately on each side). `matmul_flops` is the teacher's forward plus 3 × the student's.
//!
//! Each of `--warmup + --iters` steps is timed on its own (the step's tensors are dropped
//! inside the timed region, as PyTorch frees them inside its step, and its gradients inside
//! the next step's, once applied: so `--warmup` is at least 1 with the optimiser); the median
//! of the timed steps is reported, with the medians of its parts (`encoder_s`; `head_s`:
//! MLM head + loss; `backward_s`; `optim_s`; in distill mode also `teacher_s`). One JSON
//! line, as torch_step.py prints: `tokens_per_s = batch * seq / median_s`; `peak_rss_mb` is the process's VmHWM (read
//! before the matmul peak is measured), `huge_pages_mb` its memory in transparent huge pages
//! at that time; `matmul_flops` counts the matmuls the step really
//! does (2·m·n·k each, ×3 with the backward), `gflops` is that over `median_s`, and
//! `peak_gflops` is the best of a few `--peak-size`³ fp32 candle matmuls on the same
//! threads, so `pct_of_peak` is this step's share of it.
//!
//! `--threads N` sets `RAYON_NUM_THREADS` (candle's matmul and element-wise thread count)
//! before any candle op runs.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Parser, ValueEnum};
// The batch generator, FLOP count and median shared with `distil bench-step`; torch_step.py
// computes the same batch.
use distil::cli::bench::{
    distilbert_student_config, forward_matmul_flops, mask_batch, median, shared_batch,
};
use distil::loss::{cosine_loss, cross_entropy, masked_positions, soft_kl, teacher_probs};
use distil::model::student::init_from_teacher;
use distil::model::{Encoder, EncoderConfig, EncoderInput, ForwardOptions, Params, Parts};
use distil::train::optim::{update_beside, AdamW, AdamWConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Shape {
    Small,
    Base,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Forward,
    Train,
    Distill,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum HeadOn {
    All,
    Masked,
}

#[derive(Parser, Debug)]
#[command(about = "Time one BERT masked-LM step in distil (see benches/torch_step.py)")]
struct Args {
    #[arg(long, value_enum, default_value = "small")]
    shape: Shape,
    /// Sequences per batch (default: 16 for small distill, 8 otherwise).
    #[arg(long)]
    batch: Option<usize>,
    #[arg(long, default_value_t = 128)]
    seq: usize,
    #[arg(long, default_value_t = 10)]
    iters: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Sets RAYON_NUM_THREADS (default: candle's choice).
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long, value_enum, default_value = "train")]
    mode: Mode,
    /// Distill mode: the student's layers (default: small 2, base 6).
    #[arg(long)]
    student_layers: Option<usize>,
    /// Hidden and attention dropout in train mode (the student's in distill mode).
    #[arg(long, default_value_t = 0.1)]
    dropout: f32,
    /// Train mode: the MLM head on all positions or only the masked ones.
    #[arg(long, value_enum, default_value = "masked")]
    head_on: HeadOn,
    /// Train and distill modes: leave out the AdamW step (as torch_step.py --no-optim).
    #[arg(long)]
    no_optim: bool,
    /// AdamW learning rate (weight decay 0.01, as torch_step.py).
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// Step when told (benches/lockstep.py): after the warm-up, print `{"ready": true}`,
    /// then before each timed step read a line from stdin (end of input ends the timing) and
    /// after it print `{"step_s": …}`; the rest (the peak matmul, the summary line, last as
    /// without it) waits for the end of stdin.
    #[arg(long)]
    lockstep: bool,
    /// Side of the square fp32 matmul timed for the machine's peak; 0 skips it.
    #[arg(long, default_value_t = 2048)]
    peak_size: usize,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// (layers, hidden, heads, intermediate, vocab), as torch_step.py's SHAPES.
fn dims(shape: Shape) -> (usize, usize, usize, usize, usize) {
    match shape {
        Shape::Small => (4, 256, 4, 1024, 8000),
        Shape::Base => (12, 768, 12, 3072, 30522),
    }
}

/// Distill mode's temperature and loss weights (soft, hard, cosine), as recipes/distilbert.yaml
/// and torch_step.py.
const TEMPERATURE: f64 = 2.0;
const W_SOFT: f64 = 5.0;
const W_HARD: f64 = 2.0;
const W_COSINE: f64 = 1.0;

/// The `key:` line of a `/proc/self` file that gives a size in kB, in MB.
fn proc_self_mb(file: &str, key: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/self/{file}")).ok()?;
    let line = text
        .lines()
        .find(|l| l.strip_prefix(key).is_some_and(|r| r.starts_with(':')))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The process's peak resident set (`VmHWM`), MB.
fn vm_hwm_mb() -> Option<f64> {
    proc_self_mb("status", "VmHWM")
}

/// The process's anonymous memory in transparent huge pages now (`AnonHugePages` of
/// `smaps_rollup`), MB: whether the kernel granted the huge pages asked for.
fn anon_huge_mb() -> Option<f64> {
    proc_self_mb("smaps_rollup", "AnonHugePages")
}

fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

/// Best GFLOP/s of a few `n×n · n×n` fp32 matmuls.
fn matmul_peak(n: usize, dev: &Device) -> Result<f64> {
    let a = Tensor::randn(0f32, 1.0, (n, n), dev)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), dev)?;
    let flops = 2.0 * (n as f64).powi(3);
    let _ = a.matmul(&b)?;
    let mut best = Duration::MAX;
    let deadline = Instant::now() + Duration::from_secs(3);
    for i in 0..8 {
        let t0 = Instant::now();
        let c = a.matmul(&b)?;
        drop(c);
        best = best.min(t0.elapsed());
        if i >= 2 && Instant::now() > deadline {
            break;
        }
    }
    Ok(flops / best.as_secs_f64() / 1e9)
}

/// Times of one step's parts, in seconds.
#[derive(Default, Clone, Copy)]
struct StepTimes {
    total: f64,
    teacher: f64,
    encoder: f64,
    /// The forward phase: distill mode's teacher beside (update, student); train mode's
    /// update and student.
    forward: f64,
    head: f64,
    backward: f64,
    optim: f64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(n) = args.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        // Before any candle or rayon work: both read it once.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    if args.iters == 0 {
        bail!("--iters must be at least 1");
    }
    if args.mode != Mode::Forward && !args.no_optim && args.warmup == 0 {
        // Each step applies the previous step's update (as the trainer does): the first
        // step has none to apply, so it must not be timed.
        bail!("--warmup must be at least 1 with the optimiser (each step applies the previous step's update)");
    }
    // What `distil` itself does first: huge pages (an exec of this program with a glibc
    // tunable), malloc tuning and candle's element-wise pool.
    distil::util::threads::init_runtime();
    let dev = Device::Cpu;
    let (layers, hidden, heads, ffn, vocab) = dims(args.shape);
    let distill = args.mode == Mode::Distill;
    // Train and distill modes: dropout, a loss, backward and (unless --no-optim) AdamW.
    let train = args.mode != Mode::Forward;
    let p_drop = if train { args.dropout } else { 0.0 };
    let b = args.batch.unwrap_or(match (args.mode, args.shape) {
        (Mode::Distill, Shape::Small) => 16,
        _ => 8,
    });
    let s = args.seq;
    let mut cfg = EncoderConfig::bert(vocab, hidden, layers, heads, ffn);
    cfg.max_position_embeddings = cfg.max_position_embeddings.max(s);
    cfg.hidden_dropout = p_drop;
    cfg.attention_dropout = p_drop;
    // Distill mode: a frozen teacher of the shape, and a DistilBERT-style student built from
    // it as `distil run` builds one (distill::run::build_student): the teacher's config with
    // the DistilBERT layout, no token types and fewer layers, its weights copied from
    // teacher layers spread evenly over the stack (default_layer_map).
    let (teacher, enc) = if distill {
        let mut tcfg = cfg.clone();
        tcfg.hidden_dropout = 0.0;
        tcfg.attention_dropout = 0.0;
        let tparams = Params::random(&tcfg, Parts::MLM, 0, &dev, false)?;
        let teacher = Encoder::new(tcfg, tparams)?;
        let student_layers = args.student_layers.unwrap_or(match args.shape {
            Shape::Small => 2,
            Shape::Base => 6,
        });
        if student_layers == 0 || student_layers > layers {
            bail!("--student-layers must be 1 to {layers}");
        }
        let scfg = distilbert_student_config(&cfg, student_layers);
        let sparams = init_from_teacher(&teacher, &scfg, None, 0)?;
        (Some(teacher), Encoder::new(scfg, sparams)?)
    } else {
        let params = Params::random(&cfg, Parts::MLM, 0, &dev, train)?;
        (None, Encoder::new(cfg.clone(), params)?)
    };
    let num_params = enc.params.num_parameters();

    // Fixed inputs: random ids, an all-ones attention mask, and exactly 15% of the positions
    // masked (replaced by [MASK] = 103) with their original ids as labels. Forward and train
    // modes draw them from ChaCha8 (seed 0); distill mode from `shared_batch`, as
    // torch_step.py does.
    let tokens = b * s;
    let low = if vocab > 2000 { 1000 } else { 5 };
    let n_masked = ((tokens as f64 * 0.15).round() as usize).max(1);
    let (ids, masked) = if distill {
        shared_batch(tokens, vocab as u64, low as u64, n_masked)
    } else {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let ids: Vec<u32> = (0..tokens)
            .map(|_| rng.random_range(low..vocab as u32))
            .collect();
        let masked = rand::seq::index::sample(&mut rng, tokens, n_masked).into_vec();
        (ids, masked)
    };
    let (labels, train_ids) = mask_batch(&ids, &masked);
    let targets = masked_positions(&labels, &dev)?;
    let input_ids = Tensor::from_vec(if train { train_ids } else { ids }, (b, s), &dev)?;
    let attention_mask = Tensor::ones((b, s), DType::U32, &dev)?;
    let input = EncoderInput {
        input_ids: &input_ids,
        attention_mask: Some(&attention_mask),
        token_type_ids: None,
    };
    let mut dropout_rng = ChaCha8Rng::seed_from_u64(1);
    let mut opt = if train && !args.no_optim {
        let cfg = AdamWConfig {
            weight_decay: 0.01,
            ..AdamWConfig::default()
        };
        Some(AdamW::new(enc.params.vars(), cfg)?)
    } else {
        None
    };

    let mut last_loss = f32::NAN;
    // Distill mode: the last step's soft, hard and cosine losses (unweighted).
    let mut last_parts = [f32::NAN; 3];
    // Train and distill modes: the last step's gradients, applied as the next step starts.
    let mut deferred: Option<BTreeMap<String, Tensor>> = None;
    let mut step = || -> Result<StepTimes> {
        let t0 = Instant::now();
        if !train {
            let out = enc.forward(&input, ForwardOptions::default(), None)?;
            let t1 = Instant::now();
            let logits = enc.mlm_logits(&out.last_hidden_state)?;
            let t2 = Instant::now();
            drop((out, logits));
            let t3 = Instant::now();
            return Ok(StepTimes {
                total: (t3 - t0).as_secs_f64(),
                teacher: 0.0,
                encoder: (t1 - t0).as_secs_f64(),
                forward: (t1 - t0).as_secs_f64(),
                head: (t2 - t1).as_secs_f64(),
                backward: 0.0,
                optim: 0.0,
            });
        }
        // Distill mode: the teacher's last hidden states and its distribution at T over the
        // masked rows, nothing tracked (frozen parameters, eval mode).
        let teacher_fwd = || -> Result<_> {
            let t = teacher.as_ref().expect("distill mode has a teacher");
            let out = t.forward(&input, ForwardOptions::default(), None)?;
            let logits = t.mlm_logits_at(&out.last_hidden_state, &targets.positions)?;
            let probs = teacher_probs(&logits, TEMPERATURE)?;
            Ok(((out.last_hidden_state, probs), Instant::now()))
        };
        // The last step's update, held back as the trainer holds it (`Deferred`), then the
        // student's forward.
        let (rng, opt, deferred) = (&mut dropout_rng, &mut opt, &mut deferred);
        let mut student_fwd = || -> Result<_> {
            let t0 = Instant::now();
            if !distill {
                // Train mode, as MlmObjective: the update beside the forward, block by block
                // (`optim::update_beside`); `encoder_s` is then both, `optim_s` 0.
                if let (Some(opt), Some(grads)) = (opt.as_mut(), deferred.take()) {
                    let out = update_beside(opt, grads, (args.lr, 1.0), &enc, |ready| {
                        let opts = ForwardOptions::default();
                        enc.forward_beside(&input, opts, Some(&mut *rng), ready)
                    })?;
                    return Ok((out, Default::default(), t0.elapsed()));
                }
            }
            if let (Some(opt), Some(grads)) = (opt.as_mut(), deferred.take()) {
                opt.update(&grads, args.lr, 1.0)?;
            }
            let tu = Instant::now();
            let out = enc.forward(&input, ForwardOptions::default(), Some(rng))?;
            Ok((out, tu - t0, tu.elapsed()))
        };
        // As DistillObjective on the CPU: the teacher beside the update and the student.
        let (teacher_out, t_teacher, out, t_update, t_student, t1) = if distill {
            let (t, st) = rayon::join(teacher_fwd, student_fwd);
            let ((teacher_out, tt), (out, tu, ts)) = (t?, st?);
            (Some(teacher_out), tt - t0, out, tu, ts, Instant::now())
        } else {
            let (out, tu, ts) = student_fwd()?;
            (None, Default::default(), out, tu, ts, Instant::now())
        };
        let (logits, loss) = match &teacher_out {
            Some((t_last, t_probs)) => {
                let logits = enc.mlm_logits_at(&out.last_hidden_state, &targets.positions)?;
                let soft = soft_kl(&logits, t_probs, TEMPERATURE)?;
                let hard = cross_entropy(&logits, &targets.targets)?;
                let cos = cosine_loss(&out.last_hidden_state, t_last, &attention_mask)?;
                let loss = (((&soft * W_SOFT)? + (&hard * W_HARD)?)? + (&cos * W_COSINE)?)?;
                last_parts = [
                    soft.to_scalar::<f32>()?,
                    hard.to_scalar::<f32>()?,
                    cos.to_scalar::<f32>()?,
                ];
                (logits, loss)
            }
            None => {
                let logits = match args.head_on {
                    HeadOn::Masked => {
                        enc.mlm_logits_at(&out.last_hidden_state, &targets.positions)?
                    }
                    HeadOn::All => enc
                        .mlm_logits(&out.last_hidden_state)?
                        .reshape((tokens, vocab))?
                        .index_select(&targets.positions, 0)?,
                };
                let loss = cross_entropy(&logits, &targets.targets)?;
                (logits, loss)
            }
        };
        let t2 = Instant::now();
        let grads = enc.backward(&loss)?;
        let t3 = Instant::now();
        if opt.is_some() {
            let mut by_name = BTreeMap::new();
            for (name, var) in enc.params.vars() {
                if let Some(g) = grads.get(var.as_tensor()) {
                    by_name.insert(name.clone(), g.clone());
                }
            }
            *deferred = Some(by_name);
        }
        last_loss = loss.to_scalar::<f32>()?;
        drop((teacher_out, out, logits, loss, grads));
        let t5 = Instant::now();
        Ok(StepTimes {
            total: (t5 - t0).as_secs_f64(),
            teacher: t_teacher.as_secs_f64(),
            encoder: t_student.as_secs_f64(),
            forward: (t1 - t0).as_secs_f64(),
            head: (t2 - t1).as_secs_f64(),
            backward: (t3 - t2).as_secs_f64(),
            optim: t_update.as_secs_f64(),
        })
    };
    let mut times = Vec::with_capacity(args.iters);
    let mut run = || -> Result<()> {
        for i in 0..args.warmup + args.iters {
            if args.lockstep && i >= args.warmup {
                use std::io::Write;
                if i == args.warmup {
                    println!("{{\"ready\": true}}");
                    std::io::stdout().flush()?;
                }
                if std::io::stdin().read_line(&mut String::new())? == 0 {
                    break;
                }
            }
            // Under --lockstep each step runs hot on its own (see below), so that nothing of
            // ours spins or naps while the other side steps.
            let t = if args.lockstep {
                distil::util::threads::run_hot(&mut step)
            } else {
                step()
            }
            .with_context(|| format!("step {i}"))?;
            if i >= args.warmup {
                times.push(t);
                if args.lockstep {
                    use std::io::Write;
                    println!("{{\"step_s\": {:.6}}}", t.total);
                    std::io::stdout().flush()?;
                }
            }
        }
        if times.is_empty() {
            bail!("no step was timed (--lockstep: stdin ended before the first)");
        }
        if args.lockstep {
            // Nothing more (the peak matmul) until told: the other side may still be stepping.
            while std::io::stdin().read_line(&mut String::new())? > 0 {}
        }
        Ok(())
    };
    // As the trainer runs its steps: on a pool worker, the other workers spinning.
    if args.lockstep {
        run()?;
    } else {
        distil::util::threads::run_hot(run)?;
    }
    let totals: Vec<f64> = times.iter().map(|t| t.total).collect();
    let part = |f: fn(&StepTimes) -> f64| median(&times.iter().map(f).collect::<Vec<_>>());
    let median_s = median(&totals);
    let min_s = totals.iter().cloned().fold(f64::INFINITY, f64::min);
    let max_s = totals.iter().cloned().fold(0.0, f64::max);
    let peak_rss_mb = vm_hwm_mb().unwrap_or(f64::NAN);
    let huge_mb = anon_huge_mb();

    let head_rows = if distill || (train && args.head_on == HeadOn::Masked) {
        n_masked
    } else {
        tokens
    };
    let mut flops = forward_matmul_flops(&enc.cfg, b, s, head_rows);
    if train {
        flops *= 3.0;
    }
    // Distill mode: plus the teacher's forward (MLM head on the masked rows too).
    let teacher_flops = teacher
        .as_ref()
        .map(|t| forward_matmul_flops(&t.cfg, b, s, n_masked));
    flops += teacher_flops.unwrap_or(0.0);
    let gflops = flops / median_s / 1e9;
    let threads = candle_core::utils::get_num_threads();

    let lower = |x: &dyn std::fmt::Debug| format!("{x:?}").to_lowercase();
    let mut out: Vec<(&str, Value)> = vec![
        ("framework", "distil".into()),
        ("shape", lower(&args.shape).into()),
        ("mode", lower(&args.mode).into()),
        ("batch", b.into()),
        ("seq", s.into()),
        ("tokens_per_s", round(tokens as f64 / median_s, 1).into()),
        ("median_s", round(median_s, 6).into()),
        ("peak_rss_mb", round(peak_rss_mb, 1).into()),
        ("huge_pages_mb", huge_mb.map(|m| round(m, 1)).into()),
        ("min_s", round(min_s, 6).into()),
        ("max_s", round(max_s, 6).into()),
        ("iters", args.iters.into()),
        ("warmup", args.warmup.into()),
        ("threads", threads.into()),
        ("attn", "eager".into()),
        ("device", "cpu".into()),
        ("params", num_params.into()),
        ("candle", "0.11".into()),
    ];
    if let Some(t) = &teacher {
        out.push(("teacher_params", t.params.num_parameters().into()));
        out.push(("teacher_layers", t.cfg.num_layers.into()));
        out.push(("student_layers", enc.cfg.num_layers.into()));
        out.push(("teacher_s", round(part(|t| t.teacher), 6).into()));
    }
    out.extend([
        ("encoder_s", round(part(|t| t.encoder), 6).into()),
        ("head_s", round(part(|t| t.head), 6).into()),
    ]);
    if train {
        out.push(("backward_s", round(part(|t| t.backward), 6).into()));
        if opt.is_some() {
            out.push(("optim_s", round(part(|t| t.optim), 6).into()));
        }
        // The phase the parts above overlap in (distill mode: teacher beside update + student).
        out.push(("forward_s", round(part(|t| t.forward), 6).into()));
    }
    out.push(("matmul_flops", flops.into()));
    if let Some(f) = teacher_flops {
        out.push(("teacher_matmul_flops", f.into()));
    }
    out.push(("gflops", round(gflops, 1).into()));
    if train {
        out.push(("optimizer", opt.is_some().into()));
        out.push(("dropout", round(p_drop as f64, 6).into()));
        let head_on = if distill {
            HeadOn::Masked
        } else {
            args.head_on
        };
        out.push(("head_on", lower(&head_on).into()));
        out.push(("masked_tokens", n_masked.into()));
        out.push(("last_loss", round(last_loss as f64, 6).into()));
    }
    if distill {
        out.push(("temperature", TEMPERATURE.into()));
        out.push((
            "loss",
            format!("{W_SOFT}*soft + {W_HARD}*hard + {W_COSINE}*cosine").into(),
        ));
        for (k, v) in ["loss_soft", "loss_hard", "loss_cosine"]
            .into_iter()
            .zip(last_parts)
        {
            out.push((k, round(v as f64, 6).into()));
        }
    }
    if args.peak_size > 0 {
        let peak = matmul_peak(args.peak_size, &dev)?;
        out.push(("peak_gflops", round(peak, 1).into()));
        out.push(("peak_size", args.peak_size.into()));
        out.push(("pct_of_peak", round(100.0 * gflops / peak, 1).into()));
    }
    // One line, keys in this order, formatted as Python's json.dumps does.
    let fields: Vec<String> = out
        .iter()
        .map(|(k, v)| format!("{}: {}", Value::from(*k), v))
        .collect();
    println!("{{{}}}", fields.join(", "));
    Ok(())
}
