//! Running a distillation recipe: teacher (optionally produced by its own recipe first),
//! student, one or more born-again generations, and the comparison table.

use super::objective::DistillObjective;
use super::section::{DistillSection, StudentInit};
use crate::cli::run::{open_run_dir, print_summary, report_data, RunFlags};
use crate::data::{BertVocabOptions, Tok};
use crate::model::hub::{resolve, resolve_offline, Resolved};
use crate::model::student::init_from_teacher;
use crate::model::{load_encoder, Encoder, Layout, LoadOptions, Params, Parts};
use crate::recipe::{parse_device, LoadedRecipe, Recipe};
use crate::train::distributed;
use crate::train::eval::{evaluate, EvalResult};
use crate::train::run_dir::RunDir;
use crate::train::setup;
use crate::train::trainer::{RunSummary, Trainer};
use crate::util::atomic_write;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde::Serialize;
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

/// `distil check`'s view of the teacher: it resolves, and it can give what the losses need.
pub fn check_teacher(loaded: &LoadedRecipe, d: &DistillSection) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let needs_logits = d.losses.soft > 0.0 || d.losses.logit_mse > 0.0;
    let pending =
        d.teacher_recipe.is_some() && !Path::new(&d.teacher).join("config.json").is_file();
    let dir = match resolve_offline(&d.teacher) {
        Ok(Resolved::Dir(dir)) if !pending => dir,
        Ok(Resolved::Dir(_)) => {
            out.push(format!(
                "distill.teacher: {} will be produced by {}",
                d.teacher,
                d.teacher_recipe.as_ref().unwrap().display()
            ));
            return Ok(out);
        }
        Ok(Resolved::ToDownload(_)) => return Ok(out),
        Err(e) if d.teacher_recipe.is_some() => {
            let _ = e;
            out.push(format!(
                "distill.teacher: {} will be produced by {}",
                d.teacher,
                d.teacher_recipe.as_ref().unwrap().display()
            ));
            let tr = crate::recipe::load(d.teacher_recipe.as_ref().unwrap(), &[])?;
            out.push(format!(
                "distill.teacher_recipe: {} is valid",
                tr.path.display()
            ));
            return Ok(out);
        }
        Err(e) => return Err(loaded.error_at("distill.teacher", e)),
    };
    let has_head = std::fs::read_dir(&dir).is_ok() && teacher_has_mlm_head(&dir)?;
    if needs_logits && !has_head {
        return Err(loaded.error_at(
            "distill.losses",
            format!(
                "the teacher {} has no masked-LM head, so it cannot give the soft-target or logit losses; use cosine, hidden_mse or attention_kl",
                d.teacher
            ),
        ));
    }
    out.push(format!(
        "distill.teacher: {} (masked-LM head: {})",
        dir.display(),
        if has_head { "yes" } else { "no" }
    ));
    Ok(out)
}

fn teacher_has_mlm_head(dir: &Path) -> Result<bool> {
    let (enc, _) = load_encoder(
        dir,
        &Device::Cpu,
        &LoadOptions {
            trainable: false,
            want_mlm_head: false,
            ..Default::default()
        },
    )?;
    Ok(enc.has_mlm_head())
}

/// One row of the generations table.
#[derive(Debug, Clone, Serialize)]
pub struct GenerationRow {
    pub name: String,
    pub layers: usize,
    pub parameters: usize,
    pub eval: Option<EvalResult>,
    pub tokens_per_s: Option<f64>,
    pub dir: PathBuf,
}

pub fn run(loaded: &LoadedRecipe, flags: &RunFlags, stop: &AtomicBool) -> Result<RunSummary> {
    let r = &loaded.recipe;
    let dist = distributed::current()?;
    let verbose = flags.verbose && dist.is_main();
    let d = r
        .distill
        .as_ref()
        .context("a distill recipe needs a distill section")?;
    if let Some(tr) = &d.teacher_recipe {
        if !Path::new(&d.teacher).join("config.json").is_file() {
            if verbose {
                eprintln!(
                    "teacher {} not found: running its recipe {} first",
                    d.teacher,
                    tr.display()
                );
            }
            // Continue a teacher run that was interrupted; start one that never began.
            let teacher_flags = RunFlags {
                resume: Path::new(&d.teacher).is_dir(),
                overwrite: false,
                verbose: flags.verbose,
            };
            let s = crate::cli::run::run(tr, &[], &teacher_flags, stop)?;
            if s.interrupted {
                bail!("interrupted while training the teacher; run again to continue");
            }
        }
    }
    let device = setup::device(r)?;
    let teacher_dir = resolve(&d.teacher).map_err(|e| loaded.error_at("distill.teacher", e))?;
    let teacher_device = match &d.teacher_device {
        Some(s) => setup::other_device(
            parse_device(s).map_err(|e| loaded.error_at("distill.teacher_device", e))?,
        )?,
        None => device.clone(),
    };
    let (mut teacher, report) = load_encoder(
        &teacher_dir,
        &teacher_device,
        &LoadOptions {
            trainable: false,
            want_mlm_head: false,
            seed: r.training.seed,
            ..Default::default()
        },
    )?;
    // The frozen teacher runs its matmuls in the student's precision on a GPU; on the CPU
    // (distill.teacher_device: cpu) it stays f32.
    if !teacher.device().is_cpu() {
        setup::mixed_precision(&mut teacher, &r.training)?;
    }
    if verbose {
        eprintln!(
            "teacher: {} ({} layers, hidden {}, {} parameters{})",
            teacher_dir.display(),
            teacher.cfg.num_layers,
            teacher.cfg.hidden_size,
            teacher.params.num_parameters(),
            if report.absent.is_empty() {
                String::new()
            } else {
                format!("; no {}", report.absent.join(", "))
            }
        );
    }
    let run_root = open_run_dir(loaded, flags, &device)?;
    let tok = if r.tokenizer.load.is_none() && r.tokenizer.train.is_none() && r.model.from.is_none()
    {
        Tok::load(&teacher_dir, &BertVocabOptions::default()).with_context(|| {
            format!(
                "the teacher {} has no tokenizer files; give tokenizer.load",
                teacher_dir.display()
            )
        })?
    } else {
        // Rank 0 trains and saves a recipe's tokenizer; the others load it.
        dist.rank0_first(&device, |_| setup::tokenizer(r, &run_root.root, verbose))?
    };
    tok.check_model_vocab(teacher.cfg.vocab_size)?;
    let data = dist.rank0_first(&device, |_| setup::data(r, &tok))?;
    if verbose {
        report_data(&data);
    }
    let generations = d.generations;
    let mut rows = Vec::new();
    let teacher_eval = match &data.eval {
        Some(e) if teacher.has_mlm_head() && dist.is_main() => {
            Some(evaluate(&teacher, e, r.training.max_eval_batches)?)
        }
        _ => None,
    };
    rows.push(GenerationRow {
        name: "teacher".into(),
        layers: teacher.cfg.num_layers,
        parameters: teacher.params.num_parameters(),
        eval: teacher_eval,
        tokens_per_s: None,
        dir: teacher_dir.clone(),
    });
    let mut previous: Vec<Encoder> = Vec::new();
    let mut last_summary = None;
    for g in 1..=generations {
        let dir = if generations == 1 {
            run_root.root.clone()
        } else {
            run_root.root.join(format!("generation-{g}"))
        };
        let gen_dir = if generations == 1 || !dist.is_main() {
            RunDir { root: dir.clone() }
        } else {
            RunDir::open(&dir, false, true)?
        };
        if generations > 1 && dir.join("eval_results.json").is_file() && flags.resume {
            // Finished in an earlier invocation: reuse.
            let (mut s, _) = load_encoder(
                &dir,
                &device,
                &LoadOptions {
                    trainable: false,
                    ..Default::default()
                },
            )?;
            setup::mixed_precision(&mut s, &r.training)?;
            if verbose {
                eprintln!("generation {g}: already trained in {}", dir.display());
            }
            let ev = match &data.eval {
                Some(e) if dist.is_main() => Some(evaluate(&s, e, r.training.max_eval_batches)?),
                _ => None,
            };
            rows.push(GenerationRow {
                name: format!("generation {g}"),
                layers: s.cfg.num_layers,
                parameters: s.params.num_parameters(),
                eval: ev,
                tokens_per_s: None,
                dir: dir.clone(),
            });
            previous.push(s);
            continue;
        }
        let born_again = generations > 1;
        let this_teacher: &Encoder = if g == 1 {
            &teacher
        } else {
            previous.last().unwrap()
        };
        let mut student = build_student(r, d, this_teacher, &device, born_again, g as u64)?;
        setup::mixed_precision(&mut student, &r.training)?;
        if verbose {
            eprintln!(
                "generation {g}/{generations}: student {} layers, hidden {}, {} parameters ({:?} init)",
                student.cfg.num_layers,
                student.cfg.hidden_size,
                student.params.num_parameters(),
                d.student_init
            );
        }
        let mut teachers: Vec<&Encoder> = vec![this_teacher];
        if g > 1 && d.average_teachers {
            teachers = std::iter::once(&teacher).chain(previous.iter()).collect();
        }
        let objective =
            DistillObjective::new(teachers, &student, d.clone(), r.training.seed + g as u64)?;
        let trainer = Trainer {
            model: &student,
            tok: &tok,
            train: &data.train,
            eval: data.eval.as_ref(),
            args: &r.training,
            objective: &objective,
            save_layout: student.cfg.layout,
            stop,
            verbose,
        };
        let summary = trainer.run_on(&gen_dir, flags.resume, &dist)?;
        if summary.interrupted {
            return Ok(summary);
        }
        rows.push(GenerationRow {
            name: if generations == 1 {
                "student".into()
            } else {
                format!("generation {g}")
            },
            layers: student.cfg.num_layers,
            parameters: student.params.num_parameters(),
            eval: summary.final_eval,
            tokens_per_s: Some(summary.tokens_per_s),
            dir: dir.clone(),
        });
        last_summary = Some(summary);
        if g < generations {
            let (mut frozen, _) = load_encoder(
                &dir,
                &device,
                &LoadOptions {
                    trainable: false,
                    ..Default::default()
                },
            )?;
            setup::mixed_precision(&mut frozen, &r.training)?;
            previous.push(frozen);
        }
    }
    let summary = last_summary.context("no generation was trained")?;
    if !dist.is_main() {
        return Ok(summary);
    }
    let table = table(&rows);
    atomic_write(&run_root.root.join("comparison.md"), table.as_bytes())?;
    atomic_write(
        &run_root.root.join("comparison.json"),
        serde_json::to_string_pretty(&rows)?.as_bytes(),
    )?;
    if verbose {
        print_summary(&summary);
        println!("{table}");
    }
    Ok(summary)
}

/// A Markdown table of every model's held-out evaluation.
pub fn table(rows: &[GenerationRow]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "| model | layers | parameters | held-out MLM loss | perplexity | masked-token accuracy | train tokens/s |");
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    for r in rows {
        let (l, p, a) = match &r.eval {
            Some(e) => (
                format!("{:.4}", e.loss),
                format!("{:.2}", e.perplexity),
                format!("{:.2}%", 100.0 * e.accuracy),
            ),
            None => ("–".into(), "–".into(), "–".into()),
        };
        let t = r
            .tokens_per_s
            .map(|t| format!("{t:.0}"))
            .unwrap_or_else(|| "–".into());
        let _ = writeln!(
            s,
            "| {} | {} | {} | {l} | {p} | {a} | {t} |",
            r.name, r.layers, r.parameters
        );
    }
    s
}

/// The student: from `model.from`, from `model.config`, or the teacher's shape with the
/// `distill.student` overrides (DistilBERT-style by default; the teacher's own shape for
/// born-again generations).
pub fn build_student(
    r: &Recipe,
    d: &DistillSection,
    teacher: &Encoder,
    device: &Device,
    born_again: bool,
    generation: u64,
) -> Result<Encoder> {
    let seed = r.training.seed.wrapping_add(generation);
    if let Some(from) = &r.model.from {
        let dir = resolve(from)?;
        let (s, _) = load_encoder(
            &dir,
            device,
            &LoadOptions {
                trainable: true,
                seed,
                ..Default::default()
            },
        )?;
        return Ok(s);
    }
    let cfg = match &r.model.config {
        Some(shape) => shape.to_config(teacher.cfg.vocab_size, teacher.cfg.pad_token_id),
        None => {
            let mut c = teacher.cfg.clone();
            if !born_again {
                let sh = &d.student;
                c.layout = sh.layout.unwrap_or(Layout::DistilBert);
                c.num_layers = sh
                    .num_hidden_layers
                    .unwrap_or(teacher.cfg.num_layers.div_ceil(2));
                if let Some(h) = sh.hidden_size {
                    c.hidden_size = h;
                    c.embedding_size = h;
                }
                if let Some(h) = sh.num_attention_heads {
                    c.num_heads = h;
                }
                if let Some(i) = sh.intermediate_size {
                    c.intermediate_size = i;
                }
                if c.layout == Layout::DistilBert {
                    c.type_vocab_size = 0;
                    c.shared_layers = false;
                    c.num_groups = 1;
                    c.inner_group_num = 1;
                }
            }
            c
        }
    };
    cfg.validate("the student config")?;
    let params = match d.student_init {
        StudentInit::Teacher => init_from_teacher(teacher, &cfg, d.layer_map.as_deref(), seed)?,
        StudentInit::Random => Params::random(&cfg, Parts::MLM, seed, device, true)?,
    };
    let params = if params
        .tensors()
        .values()
        .next()
        .is_some_and(|t| !t.device().same_device(device))
    {
        let moved = params
            .snapshot(candle_core::DType::F32)?
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_device(device)?)))
            .collect::<Result<_>>()?;
        Params::new(moved, true)?
    } else {
        params
    };
    Encoder::new(cfg, params)
}
