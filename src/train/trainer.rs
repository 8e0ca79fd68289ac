//! The training loop shared by pretraining and distillation.

use super::batch::DeviceBatch;
use super::distributed::{next_for_rank, Dist};
use super::eval::{evaluate, EvalResult};
use super::metrics::Metrics;
use super::objective::{MlmObjective, Objective, PendingUpdate, Progress, StudentForward};
use super::optim::{clip_factor, global_norm, update_beside, AdamW, AdamWConfig, LossScaler};
use super::run_dir::{read_state, RunDir, TrainerState, OPTIMIZER_FILE, STATE_FILE};
use super::schedule::Schedule;
use crate::data::{Batcher, Position, Tok};
use crate::model::{save_encoder, AllReady, Encoder, EncoderOutput, Layout};
use crate::recipe::{OnNan, TrainingArgs};
use crate::util::atomic_write;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Everything a run trains with.
pub struct Trainer<'a> {
    pub model: &'a Encoder,
    pub tok: &'a Tok,
    pub train: &'a Batcher,
    pub eval: Option<&'a Batcher>,
    pub args: &'a TrainingArgs,
    pub objective: &'a dyn Objective,
    /// The layout checkpoints are written in.
    pub save_layout: Layout,
    /// Set by Ctrl-C / SIGTERM: the loop writes a checkpoint and returns.
    pub stop: &'a AtomicBool,
    /// Print progress (a bar on a terminal, log lines otherwise).
    pub verbose: bool,
}

impl<'a> Trainer<'a> {
    /// Masked-LM pretraining (the `pretrain` task) of `model`, saved in its own layout, quiet
    /// (set `verbose` for progress).
    pub fn mlm(
        model: &'a Encoder,
        tok: &'a Tok,
        train: &'a Batcher,
        eval: Option<&'a Batcher>,
        args: &'a TrainingArgs,
        stop: &'a AtomicBool,
    ) -> Self {
        Trainer {
            model,
            tok,
            train,
            eval,
            args,
            objective: &MlmObjective,
            save_layout: model.cfg.layout,
            stop,
            verbose: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RunSummary {
    pub steps: u64,
    pub interrupted: bool,
    pub final_eval: Option<EvalResult>,
    pub model_dir: PathBuf,
    pub tokens_per_s: f64,
}

/// Total optimiser steps for the recipe.
pub fn total_steps(args: &TrainingArgs, batches_per_epoch: usize) -> u64 {
    args.max_steps.unwrap_or_else(|| {
        let micro = args.num_train_epochs * batches_per_epoch as f64;
        ((micro / args.gradient_accumulation_steps as f64).ceil() as u64).max(1)
    })
}

fn step_rng(seed: u64, step: u64, micro: usize) -> ChaCha8Rng {
    let mut s = [0u8; 32];
    s[..8].copy_from_slice(&seed.to_le_bytes());
    s[8..16].copy_from_slice(&step.to_le_bytes());
    s[16..24].copy_from_slice(&(micro as u64).to_le_bytes());
    s[24..].copy_from_slice(b"dropout\0");
    ChaCha8Rng::from_seed(s)
}

impl Trainer<'_> {
    fn vars(&self) -> BTreeMap<String, candle_core::Var> {
        let mut v = self.model.params.vars().clone();
        for (k, x) in self.objective.extra_vars() {
            v.insert(format!("objective.{k}"), x);
        }
        v
    }

    /// Runs (or resumes) training in `run_dir`, data-parallel when the process was launched
    /// as one rank of several (see [`super::distributed`]).
    pub fn run(&self, run_dir: &RunDir, resume: bool) -> Result<RunSummary> {
        let dist = super::distributed::current()?;
        if self.model.device().is_cpu() && !dist.is_distributed() {
            // The step's parallel work picked up by spinning workers (see `run_hot`).
            crate::util::threads::run_hot(|| self.run_on(run_dir, resume, &Dist::single()))
        } else {
            self.run_on(run_dir, resume, &dist)
        }
    }

    /// [`Trainer::run`] as rank `dist.rank` of `dist.world_size`: each optimiser step takes
    /// this rank's share of the step's batches, and the gradients are averaged over the
    /// ranks before clipping and the update. Only rank 0 writes metrics, checkpoints and the
    /// final model, and evaluates.
    pub fn run_on(&self, run_dir: &RunDir, resume: bool, dist: &Dist) -> Result<RunSummary> {
        let args = self.args;
        let (rank, world) = (dist.rank, dist.world_size);
        let main = dist.is_main();
        if self.train.batches_per_epoch() < world {
            bail!(
                "the training split has {} batches: the corpus is too small for the batch size{}",
                self.train.batches_per_epoch(),
                if world > 1 {
                    format!(" and {world} ranks")
                } else {
                    String::new()
                }
            );
        }
        // An epoch is shared among the ranks.
        let total = total_steps(args, self.train.batches_per_epoch() / world);
        let warmup = args
            .warmup_steps
            .unwrap_or((args.warmup_ratio * total as f64).ceil() as u64);
        let schedule = Schedule {
            warmup_steps: warmup,
            total_steps: total,
            decay: args.lr_scheduler_type,
        };
        let vars = self.vars();
        let mut opt = AdamW::new(
            &vars,
            AdamWConfig {
                beta1: args.adam_beta1,
                beta2: args.adam_beta2,
                eps: args.adam_epsilon,
                weight_decay: args.weight_decay,
            },
        )?;
        let mut state = TrainerState {
            step: 0,
            total_steps: total,
            position: Position::default(),
            tokens_seen: 0,
            skipped_nan_steps: 0,
            seed: args.seed,
            loss_scaler: None,
            skipped_overflow_steps: 0,
        };
        if resume {
            if let Some(done) = finished_state(&run_dir.root, total)? {
                // The run was finished: its final model, not its last periodic checkpoint.
                self.load_weights(&run_dir.root)?;
                state = done;
                if self.verbose && main {
                    eprintln!(
                        "--resume: {} holds the finished run (step {} of {total}); evaluating its final model",
                        run_dir.root.display(),
                        state.step
                    );
                }
            } else if let Some((step, dir)) = run_dir.latest()? {
                state = self.restore(&dir, &vars, &mut opt)?;
                state.total_steps = total;
                if self.verbose && main {
                    eprintln!("resuming from {} (step {step} of {total})", dir.display());
                }
            } else if self.verbose && main {
                eprintln!(
                    "--resume: no checkpoint in {}, starting from the beginning",
                    run_dir.root.display()
                );
            }
        }
        // fp16: dynamic loss scaling (kept in the trainer state, so resumed with the run).
        state.loss_scaler = match (args.fp16, state.loss_scaler) {
            (true, Some(s)) => Some(s),
            (true, None) => Some(LossScaler::default()),
            (false, _) => None,
        };
        let metrics = if main {
            Metrics::open(&run_dir.metrics_path(), resume.then_some(state.step))?
        } else {
            Metrics::none()
        };
        let bar = if main {
            self.progress_bar(total, state.step)
        } else {
            indicatif::ProgressBar::hidden()
        };
        let mut batches = self.train.iter_from(state.position);
        let device = self.model.device().clone();
        let accum = args.gradient_accumulation_steps;
        let mut window_tokens = 0u64;
        let mut window_start = Instant::now();
        let run_start = Instant::now();
        let start_tokens = state.tokens_seen;
        let mut interrupted = false;
        let mut last_eval = None;
        // The last step's update, held back until the next step's student forward needs it
        // (or until anything else reads the parameters or the optimizer: evaluation, a
        // checkpoint, the end of the run).
        let mut deferred: Option<Deferred> = None;
        while state.step < total {
            let progress = Progress {
                step: state.step,
                total_steps: total,
            };
            let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
            let mut loss_sum = 0f64;
            let mut parts_sum: BTreeMap<&'static str, f64> = BTreeMap::new();
            let mut finite = true;
            let mut step_tokens = 0u64;
            let mut consumed = 0;
            for micro in 0..accum {
                // Rank r takes the r-th of each `world` batches of the shared stream.
                let (_, batch) =
                    next_for_rank(&mut batches, rank, world).context("the batch stream ended")?;
                consumed += 1;
                let db = DeviceBatch::new(&batch, &device)?;
                step_tokens += db.real_tokens as u64;
                if db.masked.count == 0 {
                    continue;
                }
                // Dropout seeded by the batch's place in the step, as one process that took
                // all `world × accum` of them in turn would seed it.
                let mut rng = step_rng(args.seed, state.step, micro * world + rank);
                let l = self.objective.loss_after(
                    self.model,
                    &db,
                    progress,
                    &mut rng,
                    &mut Held {
                        deferred: &mut deferred,
                        opt: &mut opt,
                    },
                )?;
                let value = l.loss.to_scalar::<f32>()? as f64;
                if !value.is_finite() {
                    finite = false;
                    break;
                }
                loss_sum += value / accum as f64;
                for (k, v) in &l.parts {
                    *parts_sum.entry(k).or_default() += v / accum as f64;
                }
                let scaled = match &state.loss_scaler {
                    None => (l.loss / accum as f64)?,
                    Some(s) => (l.loss * (s.scale / accum as f64))?,
                };
                let g = self.model.backward(&scaled)?;
                for (name, var) in &vars {
                    if let Some(gv) = g.get(var.as_tensor()) {
                        let e = grads.entry(name.clone());
                        match e {
                            std::collections::btree_map::Entry::Vacant(v) => {
                                v.insert(gv.clone());
                            }
                            std::collections::btree_map::Entry::Occupied(mut o) => {
                                let sum = (o.get() + gv)?;
                                o.insert(sum);
                            }
                        }
                    }
                }
            }
            // A step stopped early by a non-finite loss still uses up its batches, so that the
            // data position stays the same on every rank.
            for _ in consumed..accum {
                for _ in 0..world {
                    batches.advance();
                }
            }
            state.position = batches.position();
            let mut stop_now = self.stop.load(Ordering::SeqCst);
            if world > 1 {
                // Every rank takes the same decisions: the step's loss, whether any rank saw
                // a non-finite one, the tokens read, and whether any was asked to stop.
                let mut agreed = [
                    loss_sum,
                    (!finite) as u8 as f64,
                    step_tokens as f64,
                    stop_now as u8 as f64,
                ];
                dist.all_reduce_host(&mut agreed, &device)?;
                loss_sum = agreed[0] / world as f64;
                finite = agreed[1] == 0.0;
                step_tokens = agreed[2].round() as u64;
                stop_now = agreed[3] > 0.0;
            }
            window_tokens += step_tokens;
            state.tokens_seen += step_tokens;
            if !finite {
                match args.on_nan {
                    OnNan::Stop => {
                        let last = run_dir
                            .latest()?
                            .map(|(_, p)| p.display().to_string())
                            .unwrap_or_else(|| "none".into());
                        bail!(
                            "non-finite loss at step {}; stopping (last good checkpoint: {last}). Set training.on_nan: skip to skip such steps",
                            state.step + 1
                        );
                    }
                    OnNan::Skip => {
                        state.skipped_nan_steps += 1;
                        state.step += 1;
                        metrics.log(&json!({"step": state.step, "skipped": "non-finite loss"}))?;
                        continue;
                    }
                }
            }
            dist.average_gradients(&vars, &mut grads)?;
            let norm = global_norm(&grads)?;
            let lr = args.learning_rate * schedule.factor(state.step);
            // fp16: the gradients carry the loss scale; the norm and the update take it out.
            let (norm, unscale) = match &state.loss_scaler {
                Some(s) => (norm / s.scale, 1.0 / s.scale),
                None => (norm, 1.0),
            };
            let applied = match state.loss_scaler.as_mut() {
                Some(s) => s.update(norm.is_finite())?,
                None => true,
            };
            if applied {
                Deferred::settle(&mut deferred, &mut opt)?;
                deferred = Some(Deferred {
                    grads,
                    lr,
                    scale: clip_factor(norm, args.max_grad_norm) * unscale,
                });
            } else {
                drop(grads);
            }
            state.step += 1;
            bar.inc(1);
            if !applied {
                state.skipped_overflow_steps += 1;
                metrics.log(&json!({
                    "step": state.step, "skipped": "fp16 gradient overflow",
                    "loss_scale": state.loss_scaler.map(|s| s.scale),
                }))?;
            } else if state.step.is_multiple_of(args.logging_steps.max(1)) || state.step == total {
                let secs = window_start.elapsed().as_secs_f64().max(1e-9);
                let tps = window_tokens as f64 / secs;
                let mut m = json!({
                    "step": state.step, "loss": loss_sum, "learning_rate": lr,
                    "grad_norm": norm, "tokens_per_s": tps, "epoch": state.position.epoch,
                    "tokens_seen": state.tokens_seen,
                });
                for (k, v) in &parts_sum {
                    m[*k] = json!(v);
                }
                if let Some(s) = &state.loss_scaler {
                    m["loss_scale"] = json!(s.scale);
                }
                metrics.log(&m)?;
                bar.set_message(format!("loss {loss_sum:.4} lr {lr:.2e} {tps:.0} tok/s"));
                if bar.is_hidden() && self.verbose {
                    eprintln!(
                        "step {}/{total} loss {loss_sum:.4} lr {lr:.2e} grad_norm {norm:.3} {tps:.0} tok/s",
                        state.step
                    );
                }
                window_tokens = 0;
                window_start = Instant::now();
            }
            if let (Some(eval), true) = (self.eval, main) {
                if args.eval_steps > 0
                    && state.step.is_multiple_of(args.eval_steps)
                    && state.step < total
                {
                    Deferred::settle(&mut deferred, &mut opt)?;
                    let r = evaluate(self.model, eval, args.max_eval_batches)?;
                    self.log_eval(&metrics, &bar, state.step, &r)?;
                    last_eval = Some((state.step, r));
                }
            }
            if world == 1 {
                stop_now = self.stop.load(Ordering::SeqCst);
            }
            if main
                && ((args.save_steps > 0
                    && state.step.is_multiple_of(args.save_steps)
                    && state.step < total)
                    || (stop_now && state.step < total))
            {
                Deferred::settle(&mut deferred, &mut opt)?;
                self.checkpoint(run_dir, &state, &opt)?;
            }
            if stop_now && state.step < total {
                interrupted = true;
                break;
            }
        }
        Deferred::settle(&mut deferred, &mut opt)?;
        bar.finish_and_clear();
        let elapsed = run_start.elapsed().as_secs_f64().max(1e-9);
        let tokens_per_s = (state.tokens_seen - start_tokens) as f64 / elapsed;
        if interrupted {
            if self.verbose && main {
                eprintln!(
                    "interrupted at step {} of {total}: checkpoint written; continue with --resume",
                    state.step
                );
            }
            return Ok(RunSummary {
                steps: state.step,
                interrupted,
                final_eval: None,
                model_dir: run_dir.root.clone(),
                tokens_per_s,
            });
        }
        // Rank 0 evaluates and writes the final model; the others wait for it, so that what
        // follows the run (a student loading this teacher) finds the model on disk.
        dist.rank0_first(&device, |main| {
            let final_eval = match (self.eval, main) {
                (Some(eval), true) => {
                    let r = match last_eval {
                        Some((s, r)) if s == state.step => r,
                        _ => evaluate(self.model, eval, args.max_eval_batches)?,
                    };
                    self.log_eval(&metrics, &bar, state.step, &r)?;
                    Some(r)
                }
                _ => None,
            };
            if main {
                // The final model, in Hugging Face layout, at the top of the output directory,
                // and the final trainer state beside it (as transformers' Trainer writes it),
                // by which `--resume` knows the run is finished.
                self.save_model(&run_dir.root)?;
                atomic_write(
                    &run_dir.root.join(STATE_FILE),
                    serde_json::to_string_pretty(&state)?.as_bytes(),
                )?;
                if let Some(r) = &final_eval {
                    atomic_write(
                        &run_dir.root.join("eval_results.json"),
                        serde_json::to_string_pretty(&json!({"step": state.step, "eval": r}))?
                            .as_bytes(),
                    )?;
                }
            }
            Ok(RunSummary {
                steps: state.step,
                interrupted: false,
                final_eval,
                model_dir: run_dir.root.clone(),
                tokens_per_s,
            })
        })
    }

    fn log_eval(
        &self,
        metrics: &Metrics,
        bar: &indicatif::ProgressBar,
        step: u64,
        r: &EvalResult,
    ) -> Result<()> {
        metrics.log(&json!({
            "step": step, "eval_loss": r.loss, "eval_perplexity": r.perplexity,
            "eval_accuracy": r.accuracy, "eval_masked_tokens": r.masked_tokens,
        }))?;
        if self.verbose {
            bar.suspend(|| {
                eprintln!(
                    "eval at step {step}: loss {:.4}, perplexity {:.2}, masked-token accuracy {:.2}% ({} tokens)",
                    r.loss,
                    r.perplexity,
                    100.0 * r.accuracy,
                    r.masked_tokens
                )
            });
        }
        Ok(())
    }

    fn progress_bar(&self, total: u64, start: u64) -> indicatif::ProgressBar {
        if !self.verbose {
            return indicatif::ProgressBar::hidden();
        }
        let bar = indicatif::ProgressBar::new(total);
        bar.set_position(start);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg} (eta {eta})",
            )
            .unwrap(),
        );
        bar
    }

    /// The model (HF layout) and tokenizer into `dir`.
    pub fn save_model(&self, dir: &Path) -> Result<()> {
        save_encoder(self.model, dir, self.save_layout)?;
        self.tok
            .save(dir)
            .with_context(|| format!("cannot save the tokenizer into {}", dir.display()))?;
        Ok(())
    }

    fn checkpoint(&self, run_dir: &RunDir, state: &TrainerState, opt: &AdamW) -> Result<PathBuf> {
        run_dir.write_checkpoint(state.step, self.args.save_total_limit, |dir| {
            self.save_model(dir)?;
            if std::env::var("DISTIL_TEST_ABORT_IN_CHECKPOINT")
                .ok()
                .as_deref()
                == Some(&state.step.to_string())
            {
                // Test hook: die with the checkpoint half written (tests/resume.rs).
                std::process::abort();
            }
            let mut st = opt.state()?;
            for (k, v) in self.objective.extra_vars() {
                st.insert(format!("param.objective.{k}"), v.as_tensor().copy()?);
            }
            let bytes = safetensors::serialize(
                st.iter().map(|(k, t)| (k.clone(), t)).collect::<Vec<_>>(),
                None,
            )?;
            atomic_write(&dir.join(OPTIMIZER_FILE), &bytes)?;
            atomic_write(
                &dir.join(STATE_FILE),
                serde_json::to_string_pretty(state)?.as_bytes(),
            )?;
            Ok(())
        })
    }

    fn restore(
        &self,
        dir: &Path,
        vars: &BTreeMap<String, candle_core::Var>,
        opt: &mut AdamW,
    ) -> Result<TrainerState> {
        let state = read_state(dir)?;
        self.load_weights(dir)?;
        let p = dir.join(OPTIMIZER_FILE);
        let st: BTreeMap<String, Tensor> =
            candle_core::safetensors::load(&p, &candle_core::Device::Cpu)
                .with_context(|| format!("cannot read {}", p.display()))?
                .into_iter()
                .collect();
        for (k, v) in vars {
            if let Some(rest) = k.strip_prefix("objective.") {
                let t = st
                    .get(&format!("param.objective.{rest}"))
                    .with_context(|| {
                        format!("{}: lacks objective parameter {rest}", p.display())
                    })?;
                v.set(&t.to_device(v.device())?)?;
            }
        }
        opt.load_state(&st, state.updates())
            .with_context(|| format!("{}: optimizer state does not fit the model", p.display()))?;
        Ok(state)
    }

    /// Sets the model's parameters to those saved in `dir` (a checkpoint or a final model).
    fn load_weights(&self, dir: &Path) -> Result<()> {
        let (saved, _) = crate::model::load_encoder(
            dir,
            &candle_core::Device::Cpu,
            &crate::model::LoadOptions {
                trainable: false,
                want_mlm_head: self.model.has_mlm_head(),
                ..Default::default()
            },
        )
        .with_context(|| format!("cannot load the model in {}", dir.display()))?;
        for (name, var) in self.model.params.vars() {
            let t = saved
                .params
                .get(name)
                .with_context(|| format!("{} lacks parameter {name}", dir.display()))?;
            var.set(&t.to_device(var.device())?)?;
        }
        Ok(())
    }
}

/// An optimizer step held back: the averaged gradients, the learning rate and the factor
/// (clipping, loss-scale removal) they are applied with. Applying it as the next step's
/// student forward begins, rather than at the end of this step, gives the same parameters
/// to everything that reads them, and lets the update stream through memory while products
/// compute: a distillation objective runs its teachers' forwards beside it, the MLM objective
/// its own forward, block by block (see [`Objective::loss_after`], [`PendingUpdate`]).
struct Deferred {
    grads: BTreeMap<String, Tensor>,
    lr: f64,
    scale: f64,
}

impl Deferred {
    /// Applies the held-back update, if any.
    fn settle(pending: &mut Option<Deferred>, opt: &mut AdamW) -> Result<()> {
        match pending.take() {
            Some(d) => opt.update(&d.grads, d.lr, d.scale),
            None => Ok(()),
        }
    }
}

/// The held-back update as the objective sees it ([`PendingUpdate`]).
struct Held<'a> {
    deferred: &'a mut Option<Deferred>,
    opt: &'a mut AdamW,
}

impl PendingUpdate for Held<'_> {
    fn settle(&mut self) -> Result<()> {
        Deferred::settle(self.deferred, self.opt)
    }

    fn beside(&mut self, student: &Encoder, forward: StudentForward) -> Result<EncoderOutput> {
        match self.deferred.take() {
            Some(d) => update_beside(self.opt, d.grads, (d.lr, d.scale), student, forward),
            None => forward(&AllReady),
        }
    }
}

/// The state of a finished run in `root`: its final trainer state, when it reached `total`
/// steps and its final model is there.
fn finished_state(root: &Path, total: u64) -> Result<Option<TrainerState>> {
    if !root.join(STATE_FILE).is_file() || !root.join("model.safetensors").is_file() {
        return Ok(None);
    }
    let state = read_state(root)?;
    Ok((state.step >= total).then_some(state))
}
