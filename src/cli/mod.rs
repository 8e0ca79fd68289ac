//! The `distil` command line.

pub mod bench;
pub mod eval;
pub mod inspect;
pub mod parity;
pub mod report;
pub mod run;
pub mod tokenizer;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "distil",
    version,
    about = "Distil and pretrain BERT-family masked language models"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run a recipe (pretraining or distillation).
    Run {
        recipe: PathBuf,
        /// Override a recipe value: --set training.max_steps=10 (repeatable).
        #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
        sets: Vec<String>,
        /// Continue from the latest checkpoint in the output directory.
        #[arg(long)]
        resume: bool,
        /// Clear a non-empty output directory and start again.
        #[arg(long)]
        overwrite: bool,
        /// Print only the final summary.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Validate a recipe without running it and without the network.
    Check {
        recipe: PathBuf,
        #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
        sets: Vec<String>,
    },
    /// Print a model's layout, shapes, parameter count and missing parts.
    Inspect {
        /// A checkpoint directory or a Hugging Face hub id (resolved through the cache).
        model: String,
        /// Also list every tensor with its shape.
        #[arg(long)]
        tensors: bool,
    },
    /// Train a tokenizer (WordPiece or byte-level BPE) on a corpus.
    Tokenizer {
        #[command(subcommand)]
        command: tokenizer::TokenizerCommand,
    },
    /// Held-out MLM loss, perplexity and masked-token accuracy of one or more checkpoints,
    /// all on the same masked tokens.
    Eval(eval::EvalArgs),
    /// Draw a run's loss, learning-rate and evaluation curves and print a summary.
    Report(report::ReportArgs),
    /// Check the encoder against transformers' outputs and gradients on fixture models
    /// (tests/fixtures/*), on a given device and matmul precision (exit status 1 on a
    /// difference over the tolerance).
    Parity(parity::ParityArgs),
    /// Time one DistilBERT-style distillation step on a given device and matmul precision
    /// (one JSON line, as benches/torch_step.py prints).
    BenchStep(bench::BenchArgs),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run {
            recipe,
            sets,
            resume,
            overwrite,
            quiet,
        } => {
            let stop = run::stop_flag()?;
            let flags = run::RunFlags {
                resume,
                overwrite,
                verbose: !quiet,
            };
            let s = run::run(&recipe, &sets, &flags, &stop)?;
            if quiet && crate::train::distributed::current()?.is_main() {
                run::print_summary(&s);
            }
            if s.interrupted {
                std::process::exit(130);
            }
        }
        Command::Check { recipe, sets } => {
            for line in run::check(&recipe, &sets)? {
                println!("{line}");
            }
        }
        Command::Inspect { model, tensors } => {
            print!("{}", inspect::inspect(&model, tensors)?);
        }
        Command::Tokenizer { command } => tokenizer::run(command)?,
        Command::Eval(args) => {
            let report = eval::run(&args)?;
            print!("{}", eval::table(&report));
            if let Some(path) = &args.json {
                println!("written to {}", path.display());
            }
        }
        Command::Report(args) => {
            print!("{}", report::run(&args)?);
        }
        Command::Parity(args) => {
            let (text, ok) = parity::run(&args)?;
            print!("{text}");
            if !ok {
                std::process::exit(1);
            }
        }
        Command::BenchStep(args) => {
            println!("{}", bench::run(&args)?);
        }
    }
    Ok(())
}
