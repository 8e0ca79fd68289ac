//! Resolving a model reference: a local directory, or a Hugging Face hub id through the
//! `hf-hub` cache (which honours `HF_HOME`), downloading only when the cache lacks it and
//! `HF_HUB_OFFLINE` is not set.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Where a model reference points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// A directory on disk (a local checkpoint or a cached hub snapshot).
    Dir(PathBuf),
    /// A hub id that is not cached: a run would download it.
    ToDownload(String),
}

const OPTIONAL_FILES: &[&str] = &[
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

fn looks_like_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    !s.starts_with('.')
        && !s.starts_with('/')
        && parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// Resolves `reference` without touching the network.
pub fn resolve_offline(reference: &str) -> Result<Resolved> {
    let path = Path::new(reference);
    if path.is_dir() {
        return Ok(Resolved::Dir(path.to_path_buf()));
    }
    if path.exists() {
        bail!(
            "model {reference}: expected a directory holding config.json and weights, found a file"
        );
    }
    if !looks_like_hub_id(reference) {
        bail!("model {reference}: no such directory, and not a hub id (expected \"org/name\")");
    }
    let cache = hf_hub::Cache::from_env();
    let repo = cache.model(reference.to_string());
    match repo.get("config.json") {
        Some(cfg) => Ok(Resolved::Dir(
            cfg.parent()
                .context("cached config.json has no parent directory")?
                .to_path_buf(),
        )),
        None => Ok(Resolved::ToDownload(reference.to_string())),
    }
}

/// Resolves `reference` to a directory, downloading from the hub when it is not cached.
pub fn resolve(reference: &str) -> Result<PathBuf> {
    match resolve_offline(reference)? {
        Resolved::Dir(d) => Ok(d),
        Resolved::ToDownload(id) => download(&id),
    }
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0")
}

fn download(id: &str) -> Result<PathBuf> {
    if offline() {
        bail!(
            "model {id}: not in the hub cache at {} and HF_HUB_OFFLINE is set",
            hf_hub::Cache::from_env().path().display()
        );
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .build()
        .context("cannot start the hub client")?;
    let repo = api.model(id.to_string());
    let config = repo.get("config.json").with_context(|| {
        format!("model {id}: cannot download config.json (is the id right, and is the network up?)")
    })?;
    let weights_ok = repo.get("model.safetensors").is_ok()
        || repo
            .get("model.safetensors.index.json")
            .ok()
            .map(|index| -> Result<()> {
                let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index)?)?;
                if let Some(map) = v.get("weight_map").and_then(|m| m.as_object()) {
                    let mut shards: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
                    shards.sort();
                    shards.dedup();
                    for s in shards {
                        repo.get(s)?;
                    }
                }
                Ok(())
            })
            .transpose()?
            .is_some()
        || repo.get("pytorch_model.bin").is_ok();
    if !weights_ok {
        bail!("model {id}: the hub repository has no model.safetensors or pytorch_model.bin");
    }
    for f in OPTIONAL_FILES {
        let _ = repo.get(f);
    }
    Ok(config
        .parent()
        .context("downloaded config.json has no parent directory")?
        .to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_recognised() {
        assert!(looks_like_hub_id("bert-base-uncased"));
        assert!(looks_like_hub_id("sentence-transformers/all-MiniLM-L6-v2"));
        assert!(!looks_like_hub_id("./runs/x"));
        assert!(!looks_like_hub_id("/abs/path"));
        assert!(!looks_like_hub_id("a/b/c"));
    }
}
