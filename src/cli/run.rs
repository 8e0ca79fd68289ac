//! `distil run RECIPE` and `distil check RECIPE`.

use crate::model::hub::{resolve_offline, Resolved};
use crate::recipe::{self, LoadedRecipe, Task};
use crate::train::distributed;
use crate::train::run_dir::RunDir;
use crate::train::setup;
use crate::train::trainer::{RunSummary, Trainer};
use crate::util::atomic_write;
use anyhow::Result;
use candle_core::Device;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Ctrl-C / SIGTERM set the returned flag; a second one ends the process at once.
pub fn stop_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone())?;
        signal_hook::flag::register(sig, flag.clone())?;
    }
    Ok(flag)
}

pub struct RunFlags {
    pub resume: bool,
    pub overwrite: bool,
    pub verbose: bool,
}

pub fn run(
    path: &Path,
    sets: &[String],
    flags: &RunFlags,
    stop: &AtomicBool,
) -> Result<RunSummary> {
    let loaded = recipe::load(path, sets)?;
    // A data-parallel rank joins the others first (WORLD_SIZE > 1), before any work.
    crate::train::distributed::current()?;
    match loaded.recipe.task {
        Task::Pretrain => pretrain(&loaded, flags, stop),
        Task::Distill => crate::distill::run::run(&loaded, flags, stop),
    }
}

/// Opens the run directory and records the resolved recipe in it. In a data-parallel run
/// only rank 0 does (the others wait for it, then use the directory as it left it).
pub fn open_run_dir(loaded: &LoadedRecipe, flags: &RunFlags, device: &Device) -> Result<RunDir> {
    let dist = distributed::current()?;
    dist.rank0_first(device, |main| {
        if main {
            open_run_dir_here(loaded, flags)
        } else {
            Ok(RunDir {
                root: loaded.recipe.training.output_dir.clone(),
            })
        }
    })
}

fn open_run_dir_here(loaded: &LoadedRecipe, flags: &RunFlags) -> Result<RunDir> {
    let t = &loaded.recipe.training;
    let dir = RunDir::open(
        &t.output_dir,
        flags.overwrite || t.overwrite_output_dir,
        flags.resume,
    )?;
    atomic_write(
        &dir.root.join("recipe.yaml"),
        serde_yaml::to_string(&loaded.recipe)?.as_bytes(),
    )?;
    Ok(dir)
}

fn pretrain(loaded: &LoadedRecipe, flags: &RunFlags, stop: &AtomicBool) -> Result<RunSummary> {
    let r = &loaded.recipe;
    let dist = distributed::current()?;
    let verbose = flags.verbose && dist.is_main();
    let device = setup::device(r)?;
    let run_dir = open_run_dir(loaded, flags, &device)?;
    // Rank 0 trains (and saves) the tokenizer and builds the token cache; the others then
    // load both.
    let tok = dist.rank0_first(&device, |_| setup::tokenizer(r, &run_dir.root, verbose))?;
    let data = dist.rank0_first(&device, |_| setup::data(r, &tok))?;
    if verbose {
        report_data(&data);
    }
    let model = setup::model(r, &tok, &device, verbose)?;
    if verbose {
        if dist.is_distributed() {
            eprintln!(
                "data-parallel over {} ranks: {} sequences a step",
                dist.world_size,
                dist.world_size
                    * r.training.per_device_train_batch_size
                    * r.training.gradient_accumulation_steps
            );
        }
        eprintln!(
            "model: {} layers, hidden {}, {} parameters, on {:?}",
            model.cfg.num_layers,
            model.cfg.hidden_size,
            model.params.num_parameters(),
            device
        );
    }
    let trainer = Trainer {
        verbose,
        ..Trainer::mlm(
            &model,
            &tok,
            &data.train,
            data.eval.as_ref(),
            &r.training,
            stop,
        )
    };
    let summary = trainer.run_on(&run_dir, flags.resume, &dist)?;
    if verbose {
        print_summary(&summary);
    }
    Ok(summary)
}

pub fn report_data(d: &setup::DataSetup) {
    let c = &d.prepared.cache_report;
    if c.reused {
        eprintln!("token cache reused: {}", c.dir.display());
    } else {
        eprintln!(
            "tokenised {} units into {} tokens: {}",
            c.tokenized_units,
            c.tokenized_tokens,
            c.dir.display()
        );
    }
    let s = &d.prepared.splits.stats;
    eprintln!(
        "sequences: {} training, {} held out ({} truncated, {} split)",
        s.train_sequences, s.eval_sequences, s.truncated_units, s.split_units
    );
}

pub fn print_summary(s: &RunSummary) {
    println!(
        "trained {} steps ({:.0} tokens/s); model saved in {}",
        s.steps,
        s.tokens_per_s,
        s.model_dir.display()
    );
    if let Some(e) = &s.final_eval {
        println!(
            "held-out: MLM loss {:.4}, perplexity {:.2}, masked-token accuracy {:.2}%",
            e.loss,
            e.perplexity,
            100.0 * e.accuracy
        );
    }
}

/// `distil check`: the recipe parses and validates; models resolve (offline); corpus paths
/// exist. Returns the lines to print.
pub fn check(path: &Path, sets: &[String]) -> Result<Vec<String>> {
    let loaded = recipe::load(path, sets)?;
    let r = &loaded.recipe;
    let mut out = vec![format!(
        "{}: recipe is valid ({:?})",
        path.display(),
        r.task
    )];
    let mut models: Vec<(&str, &String)> = Vec::new();
    if let Some(m) = &r.model.from {
        models.push(("model.from", m));
    }
    if let Some(d) = &r.distill {
        if d.teacher_recipe.is_none() || Path::new(&d.teacher).join("config.json").is_file() {
            models.push(("distill.teacher", &d.teacher));
        }
    }
    if let Some(t) = &r.tokenizer.load {
        if !Path::new(t).exists() {
            models.push(("tokenizer.load", t));
        }
    }
    for (key, m) in models {
        match resolve_offline(m).map_err(|e| loaded.error_at(key, e))? {
            Resolved::Dir(d) => out.push(format!("{key}: {m} → {}", d.display())),
            Resolved::ToDownload(id) => out.push(format!(
                "{key}: {id} is not cached: it will be downloaded from the hub"
            )),
        }
    }
    let corpus = crate::data::Corpus::open(&r.data.corpus)
        .map_err(|e| loaded.error_at("data.corpus.paths", e))?;
    out.push(format!("data: {}", corpus.describe()));
    r.data
        .masking
        .validate()
        .map_err(|e| loaded.error_at("data.masking", e))?;
    r.data
        .sequences
        .validate()
        .map_err(|e| loaded.error_at("data.sequences", e))?;
    if let Some(d) = &r.distill {
        for line in crate::distill::run::check_teacher(&loaded, d)? {
            out.push(line);
        }
    }
    Ok(out)
}
