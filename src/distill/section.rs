//! The `distill:` section of a recipe.

use crate::recipe::LoadedRecipe;
use anyhow::Result;
use serde::{Deserialize, Serialize};

/// How the student starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StudentInit {
    /// Copy the teacher's embeddings, the mapped layers and the MLM head (DistilBERT).
    #[default]
    Teacher,
    /// Random initialisation.
    Random,
}

/// Where the soft-target loss is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SoftPositions {
    /// Only the masked positions (DistilBERT).
    #[default]
    Masked,
    /// Every non-padding position.
    All,
}

/// The weight of each loss; 0 turns a loss off.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossWeights {
    /// KL(teacher/T ‖ student/T) · T².
    #[serde(default)]
    pub soft: f64,
    /// MLM cross-entropy on the gold tokens.
    #[serde(default)]
    pub hard: f64,
    /// Cosine embedding loss between last hidden states.
    #[serde(default)]
    pub cosine: f64,
    /// MSE between logits.
    #[serde(default)]
    pub logit_mse: f64,
    /// MSE between mapped hidden states (with a learned projection where widths differ).
    #[serde(default)]
    pub hidden_mse: f64,
    /// KL between mapped layers' attention distributions (MiniLM / TinyBERT).
    #[serde(default)]
    pub attention_kl: f64,
}

impl Default for LossWeights {
    fn default() -> Self {
        // DistilBERT's alpha_ce / alpha_mlm / alpha_cos.
        LossWeights {
            soft: 5.0,
            hard: 2.0,
            cosine: 1.0,
            logit_mse: 0.0,
            hidden_mse: 0.0,
            attention_kl: 0.0,
        }
    }
}

/// Teacher annealing (BAM!): λ goes from `start` to `end` over the run; the soft weight is
/// scaled by (1 − λ) and the hard weight by λ.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Annealing {
    #[serde(default)]
    pub start: f64,
    #[serde(default = "one")]
    pub end: f64,
    /// Fraction of the run over which λ moves (then it stays at `end`).
    #[serde(default = "one")]
    pub span: f64,
}

fn one() -> f64 {
    1.0
}

/// The student's shape where it differs from the teacher's (used when the recipe's
/// `model:` section is empty). Unset widths are the teacher's.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudentShape {
    /// Checkpoint layout of the student (default `distilbert`: no token types, no pooler).
    #[serde(default)]
    pub layout: Option<crate::model::Layout>,
    /// Default: half the teacher's layers (rounded up).
    #[serde(default)]
    pub num_hidden_layers: Option<usize>,
    #[serde(default)]
    pub hidden_size: Option<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<usize>,
    #[serde(default)]
    pub intermediate_size: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillSection {
    /// The teacher: a checkpoint directory or hub id.
    pub teacher: String,
    /// A pretraining recipe that produces the teacher: run first when `teacher` does not
    /// exist yet (the quickstart's two-stage pipeline).
    #[serde(default)]
    pub teacher_recipe: Option<std::path::PathBuf>,
    #[serde(default)]
    pub student: StudentShape,
    /// `cpu`, `cuda`, `cuda:N` (default: the student's device).
    #[serde(default)]
    pub teacher_device: Option<String>,
    #[serde(default)]
    pub student_init: StudentInit,
    /// Teacher layers copied into the student (default: DistilBERT's spread).
    #[serde(default)]
    pub layer_map: Option<Vec<usize>>,
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// When set, T moves linearly from `temperature` to this over the run.
    #[serde(default)]
    pub temperature_end: Option<f64>,
    #[serde(default)]
    pub losses: LossWeights,
    #[serde(default)]
    pub soft_positions: SoftPositions,
    /// `[student_layer, teacher_layer]` pairs for hidden_mse / attention_kl (1-based layers
    /// for hidden states, 0 = embeddings); default: last with last.
    #[serde(default)]
    pub hidden_layer_map: Option<Vec<[usize; 2]>>,
    #[serde(default)]
    pub annealing: Option<Annealing>,
    /// Born-again generations: each trained student teaches the next.
    #[serde(default = "one_usize")]
    pub generations: usize,
    /// In generation k > 1, distil from the average of all earlier generations' distributions.
    #[serde(default)]
    pub average_teachers: bool,
}

fn default_temperature() -> f64 {
    2.0
}
fn one_usize() -> usize {
    1
}

impl DistillSection {
    pub fn validate(&self, r: &LoadedRecipe) -> Result<()> {
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(r.error_at(
                "distill.temperature",
                format!("must be positive, got {}", self.temperature),
            ));
        }
        if let Some(t) = self.temperature_end {
            if !(t > 0.0 && t.is_finite()) {
                return Err(r.error_at(
                    "distill.temperature_end",
                    format!("must be positive, got {t}"),
                ));
            }
        }
        let w = &self.losses;
        let all = [
            w.soft,
            w.hard,
            w.cosine,
            w.logit_mse,
            w.hidden_mse,
            w.attention_kl,
        ];
        if all.iter().any(|x| *x < 0.0 || !x.is_finite()) {
            return Err(r.error_at("distill.losses", "weights must be ≥ 0"));
        }
        if all.iter().all(|x| *x == 0.0) {
            return Err(r.error_at(
                "distill.losses",
                "every loss weight is 0: nothing to train on",
            ));
        }
        if self.generations == 0 {
            return Err(r.error_at("distill.generations", "must be at least 1"));
        }
        if let Some(a) = &self.annealing {
            let unit = 0.0..=1.0;
            if !(unit.contains(&a.start) && unit.contains(&a.end) && a.span > 0.0 && a.span <= 1.0)
            {
                return Err(r.error_at(
                    "distill.annealing",
                    "start and end must be in [0, 1], span in (0, 1]",
                ));
            }
        }
        if let Some(d) = &self.teacher_device {
            crate::recipe::parse_device(d).map_err(|e| r.error_at("distill.teacher_device", e))?;
        }
        Ok(())
    }
}
