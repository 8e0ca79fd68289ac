//! `distil inspect MODEL`: layout, shapes, parameter count and what is missing.

use crate::model::hub::resolve;
use crate::model::params::{param_specs, Part, Parts};
use crate::model::{load_encoder, LoadOptions};
use anyhow::Result;
use candle_core::Device;
use std::collections::BTreeMap;
use std::fmt::Write;

/// The report `distil inspect` prints.
pub fn inspect(model: &str, verbose: bool) -> Result<String> {
    let dir = resolve(model)?;
    let opts = LoadOptions {
        trainable: false,
        want_mlm_head: false,
        ..Default::default()
    };
    let (enc, report) = load_encoder(&dir, &Device::Cpu, &opts)?;
    let cfg = &enc.cfg;
    let mut s = String::new();
    writeln!(s, "model        {model}")?;
    writeln!(s, "directory    {}", dir.display())?;
    for f in &report.weights_files {
        writeln!(s, "weights      {}", f.display())?;
    }
    writeln!(
        s,
        "layout       {} (config model_type: {})",
        cfg.layout.name(),
        report.model_type.as_deref().unwrap_or("none")
    )?;
    writeln!(
        s,
        "shape        {} layers, hidden {}, {} heads, FFN {}, vocab {}, max positions {}",
        cfg.num_layers,
        cfg.hidden_size,
        cfg.num_heads,
        cfg.intermediate_size,
        cfg.vocab_size,
        cfg.max_position_embeddings
    )?;
    if cfg.embedding_size != cfg.hidden_size {
        writeln!(s, "embeddings   factorised, size {}", cfg.embedding_size)?;
    }
    if cfg.shared_layers {
        writeln!(
            s,
            "sharing      {} layers over {} group(s) of {} parameter set(s)",
            cfg.num_layers, cfg.num_groups, cfg.inner_group_num
        )?;
    }
    writeln!(
        s,
        "token types  {}",
        if cfg.type_vocab_size > 0 {
            cfg.type_vocab_size.to_string()
        } else {
            "none".into()
        }
    )?;
    writeln!(s, "activation   {}", cfg.hidden_act.hf_name())?;
    let parts = Parts {
        pooler: enc.has_pooler(),
        mlm_head: enc.has_mlm_head(),
        seq_relationship: enc.has_seq_relationship(),
    };
    let mut by_part: BTreeMap<Part, usize> = BTreeMap::new();
    for spec in param_specs(cfg, parts) {
        *by_part.entry(spec.part).or_default() += spec.shape.iter().product::<usize>();
    }
    writeln!(s, "parameters   {}", enc.params.num_parameters())?;
    for (part, n) in &by_part {
        writeln!(s, "  {:<34} {n}", part.name())?;
    }
    let missing: Vec<&str> = report.absent.to_vec();
    writeln!(
        s,
        "missing      {}",
        if missing.is_empty() {
            "nothing".to_string()
        } else {
            missing.join(", ")
        }
    )?;
    for n in &report.notes {
        writeln!(s, "note         {n}")?;
    }
    if !report.ignored.is_empty() {
        writeln!(s, "ignored      {}", report.ignored.join(", "))?;
    }
    if verbose {
        writeln!(s, "tensors")?;
        for (name, t) in enc.params.tensors() {
            writeln!(s, "  {name:<60} {:?}", t.dims())?;
        }
    }
    Ok(s)
}
