//! Tensor names: between each checkpoint layout's names and distil's canonical ones.
//!
//! Canonical names are BERT's `BertForMaskedLM` names without the `bert.` prefix, plus
//! `embeddings.projection.*` for ALBERT's factorised-embedding projection. Transformer
//! parameter blocks are numbered `encoder.layer.{k}` with `k = group * inner_group_num + inner`
//! for ALBERT's shared groups.

use super::config::Layout;

/// (layout's per-layer suffix, canonical per-layer suffix).
const DISTILBERT_LAYER: &[(&str, &str)] = &[
    ("attention.q_lin.", "attention.self.query."),
    ("attention.k_lin.", "attention.self.key."),
    ("attention.v_lin.", "attention.self.value."),
    ("attention.out_lin.", "attention.output.dense."),
    ("sa_layer_norm.", "attention.output.LayerNorm."),
    ("ffn.lin1.", "intermediate.dense."),
    ("ffn.lin2.", "output.dense."),
    ("output_layer_norm.", "output.LayerNorm."),
];

const ALBERT_LAYER: &[(&str, &str)] = &[
    ("attention.query.", "attention.self.query."),
    ("attention.key.", "attention.self.key."),
    ("attention.value.", "attention.self.value."),
    ("attention.dense.", "attention.output.dense."),
    ("attention.LayerNorm.", "attention.output.LayerNorm."),
    ("ffn_output.", "output.dense."),
    ("ffn.", "intermediate.dense."),
    ("full_layer_layer_norm.", "output.LayerNorm."),
];

/// (layout's name prefix, canonical prefix) for everything outside the layers.
fn top_level(layout: Layout) -> &'static [(&'static str, &'static str)] {
    match layout {
        Layout::Bert => &[
            ("bert.embeddings.", "embeddings."),
            ("bert.pooler.", "pooler."),
            ("cls.", "cls."),
        ],
        Layout::Roberta => &[
            ("roberta.embeddings.", "embeddings."),
            ("roberta.pooler.", "pooler."),
            ("lm_head.dense.", "cls.predictions.transform.dense."),
            (
                "lm_head.layer_norm.",
                "cls.predictions.transform.LayerNorm.",
            ),
            ("lm_head.decoder.weight", "cls.predictions.decoder.weight"),
            ("lm_head.bias", "cls.predictions.bias"),
        ],
        Layout::DistilBert => &[
            ("distilbert.embeddings.", "embeddings."),
            ("vocab_transform.", "cls.predictions.transform.dense."),
            ("vocab_layer_norm.", "cls.predictions.transform.LayerNorm."),
            ("vocab_projector.weight", "cls.predictions.decoder.weight"),
            ("vocab_projector.bias", "cls.predictions.bias"),
        ],
        Layout::Albert => &[
            (
                "albert.encoder.embedding_hidden_mapping_in.",
                "embeddings.projection.",
            ),
            ("albert.embeddings.", "embeddings."),
            ("albert.pooler.", "pooler.dense."),
            ("predictions.dense.", "cls.predictions.transform.dense."),
            (
                "predictions.LayerNorm.",
                "cls.predictions.transform.LayerNorm.",
            ),
            (
                "predictions.decoder.weight",
                "cls.predictions.decoder.weight",
            ),
            ("predictions.bias", "cls.predictions.bias"),
            ("sop_classifier.classifier.", "cls.seq_relationship."),
        ],
    }
}

/// Names that duplicate another tensor in some layouts (HF writes the tied bias twice).
fn is_duplicate(layout: Layout, name: &str) -> bool {
    matches!(
        (layout, name),
        (Layout::Bert, "cls.predictions.decoder.bias")
            | (Layout::Roberta, "lm_head.decoder.bias")
            | (Layout::Albert, "predictions.decoder.bias")
    ) || name.ends_with("position_ids")
}

/// The model prefix a layout's base model puts before its names (`bert.`, `roberta.` …).
fn base_prefix(layout: Layout) -> &'static str {
    match layout {
        Layout::Bert => "bert.",
        Layout::Roberta => "roberta.",
        Layout::DistilBert => "distilbert.",
        Layout::Albert => "albert.",
    }
}

/// What a checkpoint's tensor name means.
#[derive(Debug, PartialEq, Eq)]
pub enum Mapped {
    /// A canonical parameter name.
    Param(String),
    /// A known tensor distil does not need (buffers, duplicated tied weights).
    Ignored,
    /// Not recognised for this layout.
    Unknown,
}

/// Maps a checkpoint's tensor name to the canonical name. Names may lack the base-model
/// prefix (a `BertModel` checkpoint has `embeddings.…` rather than `bert.embeddings.…`).
pub fn to_canonical(layout: Layout, name: &str, inner_group_num: usize) -> Mapped {
    // TF-converted checkpoints name LayerNorm parameters gamma/beta.
    let name = name
        .replace("LayerNorm.gamma", "LayerNorm.weight")
        .replace("LayerNorm.beta", "LayerNorm.bias");
    if is_duplicate(layout, &name) {
        return Mapped::Ignored;
    }
    let prefix = base_prefix(layout);
    let full = if name.starts_with(prefix)
        || name.starts_with("cls.")
        || name.starts_with("lm_head.")
        || name.starts_with("predictions.")
        || name.starts_with("sop_classifier.")
        || name.starts_with("vocab_")
    {
        name.clone()
    } else {
        format!("{prefix}{name}")
    };
    if let Some(rest) = layer_part(layout, &full) {
        return match layer_to_canonical(layout, rest, inner_group_num) {
            Some(c) => Mapped::Param(c),
            None => Mapped::Unknown,
        };
    }
    for (from, to) in top_level(layout) {
        if let Some(rest) = full.strip_prefix(from) {
            return Mapped::Param(format!("{to}{rest}"));
        }
    }
    if full.starts_with("cls.") || full.starts_with("qa_outputs") || full.starts_with("classifier")
    {
        // Task heads we do not model (e.g. a fine-tuned classifier) are skipped.
        return Mapped::Ignored;
    }
    Mapped::Unknown
}

/// The part of a full name after the layers' prefix, if it names a layer tensor.
fn layer_part(layout: Layout, full: &str) -> Option<&str> {
    let p = match layout {
        Layout::Bert => "bert.encoder.layer.",
        Layout::Roberta => "roberta.encoder.layer.",
        Layout::DistilBert => "distilbert.transformer.layer.",
        Layout::Albert => "albert.encoder.albert_layer_groups.",
    };
    full.strip_prefix(p)
}

fn split_index(s: &str) -> Option<(usize, &str)> {
    let (idx, rest) = s.split_once('.')?;
    Some((idx.parse().ok()?, rest))
}

fn layer_to_canonical(layout: Layout, rest: &str, inner_group_num: usize) -> Option<String> {
    match layout {
        Layout::Bert | Layout::Roberta => {
            let (k, suffix) = split_index(rest)?;
            Some(format!("encoder.layer.{k}.{suffix}"))
        }
        Layout::DistilBert => {
            let (k, suffix) = split_index(rest)?;
            let mapped = map_suffix(DISTILBERT_LAYER, suffix, false)?;
            Some(format!("encoder.layer.{k}.{mapped}"))
        }
        Layout::Albert => {
            let (g, rest) = split_index(rest)?;
            let rest = rest.strip_prefix("albert_layers.")?;
            let (i, suffix) = split_index(rest)?;
            let mapped = map_suffix(ALBERT_LAYER, suffix, false)?;
            Some(format!(
                "encoder.layer.{}.{mapped}",
                g * inner_group_num + i
            ))
        }
    }
}

/// Rewrites a suffix through a table; `reverse` maps canonical → layout.
fn map_suffix(table: &[(&str, &str)], suffix: &str, reverse: bool) -> Option<String> {
    table.iter().find_map(|(a, b)| {
        let (from, to) = if reverse { (b, a) } else { (a, b) };
        suffix.strip_prefix(from).map(|rest| format!("{to}{rest}"))
    })
}

/// The name a canonical parameter gets in a checkpoint of `layout` (full `…ForMaskedLM` names).
/// `None` when the layout has no such tensor (e.g. token types or a pooler in DistilBERT).
pub fn from_canonical(layout: Layout, canonical: &str, inner_group_num: usize) -> Option<String> {
    if let Some(rest) = canonical.strip_prefix("encoder.layer.") {
        let (k, suffix) = split_index(rest)?;
        return match layout {
            Layout::Bert | Layout::Roberta => {
                Some(format!("{}encoder.layer.{k}.{suffix}", base_prefix(layout)))
            }
            Layout::DistilBert => Some(format!(
                "distilbert.transformer.layer.{k}.{}",
                map_suffix(DISTILBERT_LAYER, suffix, true)?
            )),
            Layout::Albert => Some(format!(
                "albert.encoder.albert_layer_groups.{}.albert_layers.{}.{}",
                k / inner_group_num,
                k % inner_group_num,
                map_suffix(ALBERT_LAYER, suffix, true)?
            )),
        };
    }
    if layout == Layout::DistilBert
        && (canonical.starts_with("embeddings.token_type")
            || canonical.starts_with("pooler.")
            || canonical.starts_with("cls.seq_relationship"))
    {
        return None;
    }
    top_level(layout).iter().find_map(|(to, from)| {
        canonical
            .strip_prefix(from)
            .map(|rest| format!("{to}{rest}"))
    })
}

/// Guesses the layout from a checkpoint's tensor names; `None` if nothing is recognisable.
pub fn detect_layout<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<Layout> {
    let mut seen = None;
    for n in names {
        let l = if n.contains("albert_layer_groups") || n.starts_with("albert.") {
            Layout::Albert
        } else if n.contains("transformer.layer.") && n.contains("_lin")
            || n.starts_with("distilbert.")
            || n.starts_with("vocab_projector")
        {
            Layout::DistilBert
        } else if n.starts_with("roberta.") || n.starts_with("lm_head.") {
            Layout::Roberta
        } else if n.starts_with("bert.")
            || n.starts_with("cls.")
            || n.starts_with("encoder.layer.")
            || n.starts_with("embeddings.word_embeddings")
        {
            Layout::Bert
        } else {
            continue;
        };
        // ALBERT / DistilBERT / RoBERTa markers are specific; BERT's are the fallback.
        match (seen, l) {
            (None, _) | (Some(Layout::Bert), _) => seen = Some(l),
            _ => {}
        }
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_layout() {
        let canon = [
            "embeddings.word_embeddings.weight",
            "encoder.layer.3.attention.self.query.weight",
            "encoder.layer.3.attention.output.LayerNorm.bias",
            "encoder.layer.3.intermediate.dense.weight",
            "encoder.layer.3.output.dense.bias",
            "cls.predictions.transform.dense.weight",
            "cls.predictions.bias",
        ];
        for layout in [
            Layout::Bert,
            Layout::Roberta,
            Layout::DistilBert,
            Layout::Albert,
        ] {
            for c in canon {
                let hf = from_canonical(layout, c, 2).unwrap();
                assert_eq!(
                    to_canonical(layout, &hf, 2),
                    Mapped::Param(c.to_string()),
                    "{layout:?} {c} via {hf}"
                );
            }
        }
    }

    #[test]
    fn accepts_base_model_names_and_gamma_beta() {
        assert_eq!(
            to_canonical(Layout::Bert, "embeddings.LayerNorm.gamma", 1),
            Mapped::Param("embeddings.LayerNorm.weight".into())
        );
        assert_eq!(
            to_canonical(Layout::Bert, "encoder.layer.0.output.dense.weight", 1),
            Mapped::Param("encoder.layer.0.output.dense.weight".into())
        );
        assert_eq!(
            to_canonical(Layout::Bert, "embeddings.position_ids", 1),
            Mapped::Ignored
        );
    }

    #[test]
    fn detects_layouts() {
        assert_eq!(
            detect_layout([
                "bert.embeddings.word_embeddings.weight",
                "cls.predictions.bias"
            ]),
            Some(Layout::Bert)
        );
        assert_eq!(
            detect_layout(["embeddings.word_embeddings.weight"]),
            Some(Layout::Bert)
        );
        assert_eq!(
            detect_layout(["roberta.embeddings.word_embeddings.weight"]),
            Some(Layout::Roberta)
        );
        assert_eq!(
            detect_layout(["distilbert.transformer.layer.0.attention.q_lin.weight"]),
            Some(Layout::DistilBert)
        );
        assert_eq!(
            detect_layout(["albert.encoder.albert_layer_groups.0.albert_layers.0.ffn.weight"]),
            Some(Layout::Albert)
        );
        assert_eq!(detect_layout(["foo.bar"]), None);
    }
}
