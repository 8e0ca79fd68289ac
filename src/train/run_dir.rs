//! A run's output directory: checkpoints written atomically, rotated, found again on resume.
//!
//! A checkpoint is written into `checkpoint-N.tmp/` and renamed to `checkpoint-N/` once every
//! file is on disk, so a crash never leaves a half-written checkpoint that looks complete;
//! leftover `.tmp` directories are removed when the run starts again.

use crate::data::Position;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where the loop stands, saved in every checkpoint as `trainer_state.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimiser updates done.
    pub step: u64,
    pub total_steps: u64,
    /// The next micro-batch to read.
    pub position: Position,
    pub tokens_seen: u64,
    pub skipped_nan_steps: u64,
    pub seed: u64,
    /// fp16: the dynamic loss scale and its count of good steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<crate::train::optim::LossScaler>,
    /// fp16: steps skipped because the scaled gradients overflowed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skipped_overflow_steps: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl TrainerState {
    /// Optimiser updates actually applied (steps minus the skipped ones): AdamW's step count,
    /// for its bias correction.
    pub fn updates(&self) -> u64 {
        self.step
            .saturating_sub(self.skipped_nan_steps)
            .saturating_sub(self.skipped_overflow_steps)
    }
}

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const METRICS_FILE: &str = "metrics.jsonl";

pub struct RunDir {
    pub root: PathBuf,
}

impl RunDir {
    /// Opens `root` for a run. A non-empty directory is refused unless `overwrite` (its
    /// contents are removed) or `resume` (it is continued).
    pub fn open(root: &Path, overwrite: bool, resume: bool) -> Result<RunDir> {
        let non_empty = root.is_dir()
            && std::fs::read_dir(root)
                .with_context(|| format!("cannot read {}", root.display()))?
                .next()
                .is_some();
        if non_empty && !resume {
            if !overwrite {
                bail!(
                    "output directory {} is not empty: pass --resume to continue the run, or set training.overwrite_output_dir (or --overwrite) to start again",
                    root.display()
                );
            }
            std::fs::remove_dir_all(root)
                .with_context(|| format!("cannot clear {}", root.display()))?;
        }
        std::fs::create_dir_all(root)
            .with_context(|| format!("cannot create output directory {}", root.display()))?;
        let dir = RunDir {
            root: root.to_path_buf(),
        };
        dir.remove_partial()?;
        Ok(dir)
    }

    fn remove_partial(&self) -> Result<()> {
        for e in std::fs::read_dir(&self.root)? {
            let p = e?.path();
            if p.is_dir() && p.extension().is_some_and(|x| x == "tmp") {
                std::fs::remove_dir_all(&p)
                    .with_context(|| format!("cannot remove partial checkpoint {}", p.display()))?;
            }
        }
        Ok(())
    }

    /// Complete checkpoints, oldest first.
    pub fn checkpoints(&self) -> Result<Vec<(u64, PathBuf)>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.root)? {
            let p = e?.path();
            let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if let Some(step) = name
                .strip_prefix("checkpoint-")
                .and_then(|s| s.parse::<u64>().ok())
            {
                if p.join(STATE_FILE).is_file() {
                    out.push((step, p));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    pub fn latest(&self) -> Result<Option<(u64, PathBuf)>> {
        Ok(self.checkpoints()?.pop())
    }

    /// Writes checkpoint `step` through `write` (given the temporary directory), then
    /// renames it into place and keeps at most `keep` checkpoints.
    pub fn write_checkpoint(
        &self,
        step: u64,
        keep: Option<usize>,
        write: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<PathBuf> {
        let final_dir = self.root.join(format!("checkpoint-{step}"));
        let tmp = self.root.join(format!("checkpoint-{step}.tmp"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        write(&tmp)?;
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir)?;
        }
        std::fs::rename(&tmp, &final_dir)
            .with_context(|| format!("cannot move {} to {}", tmp.display(), final_dir.display()))?;
        if let Some(keep) = keep {
            let all = self.checkpoints()?;
            if all.len() > keep {
                for (_, p) in &all[..all.len() - keep] {
                    std::fs::remove_dir_all(p)
                        .with_context(|| format!("cannot remove old checkpoint {}", p.display()))?;
                }
            }
        }
        Ok(final_dir)
    }

    pub fn metrics_path(&self) -> PathBuf {
        self.root.join(METRICS_FILE)
    }
}

pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let p = dir.join(STATE_FILE);
    let text =
        std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: not a valid trainer state", p.display()))
}
