//! The `distil` command line.

pub mod inspect;

use anyhow::Result;
use clap::{Parser, Subcommand};

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
    /// Print a model's layout, shapes, parameter count and missing parts.
    Inspect {
        /// A checkpoint directory or a Hugging Face hub id (resolved through the cache).
        model: String,
        /// Also list every tensor with its shape.
        #[arg(long)]
        tensors: bool,
    },
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Inspect { model, tensors } => {
            print!("{}", inspect::inspect(&model, tensors)?);
        }
    }
    Ok(())
}
