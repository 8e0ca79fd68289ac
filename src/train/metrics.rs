//! `metrics.jsonl`: one JSON object a line, appended as the run goes.

use anyhow::{Context, Result};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct Metrics {
    /// `None`: logs nothing (data-parallel ranks other than 0).
    path: Option<PathBuf>,
}

impl Metrics {
    /// Opens the file; on resume, drops the lines logged after `resume_step` (they belong to
    /// the part of the run that is being redone).
    pub fn open(path: &Path, resume_step: Option<u64>) -> Result<Metrics> {
        if let Some(step) = resume_step {
            if path.exists() {
                let text = std::fs::read_to_string(path)?;
                let kept: String = text
                    .lines()
                    .filter(|l| {
                        serde_json::from_str::<Value>(l)
                            .ok()
                            .and_then(|v| v.get("step").and_then(Value::as_u64))
                            .is_some_and(|s| s <= step)
                    })
                    .map(|l| format!("{l}\n"))
                    .collect();
                crate::util::atomic_write(path, kept.as_bytes())?;
            }
        } else if path.exists() {
            std::fs::remove_file(path)?;
        }
        Ok(Metrics {
            path: Some(path.to_path_buf()),
        })
    }

    /// A log that writes nothing.
    pub fn none() -> Metrics {
        Metrics { path: None }
    }

    pub fn log(&self, v: &Value) -> Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        writeln!(f, "{v}").with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }
}

/// Reads every line of a metrics file.
pub fn read(path: &Path) -> Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}:{}: not a JSON object", path.display(), i + 1))
        })
        .collect()
}
