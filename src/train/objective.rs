//! What the loop minimises. Pretraining uses [`MlmObjective`]; distillation plugs in its own.

use super::batch::DeviceBatch;
use crate::loss::cross_entropy;
use crate::model::{Encoder, ForwardOptions};
use anyhow::Result;
use candle_core::{Tensor, Var};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;

/// Where in the run a step is, for schedules inside an objective (annealing, temperature).
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub step: u64,
    pub total_steps: u64,
}

impl Progress {
    /// 0 at the first step, 1 at the last.
    pub fn fraction(&self) -> f64 {
        (self.step as f64 / self.total_steps.saturating_sub(1).max(1) as f64).min(1.0)
    }
}

/// A loss over a batch, with named parts to log.
pub struct StepLoss {
    pub loss: Tensor,
    pub parts: Vec<(&'static str, f64)>,
}

/// Work that must be done before the student's forward reads its parameters: the previous
/// step's parameter update, which the training loop holds back until then (see
/// `trainer`'s `Deferred`) so that an objective with work of its own that does not read the
/// student (a frozen teacher's forward) can run that work meanwhile.
pub type BeforeStudent<'a> = &'a mut (dyn FnMut() -> Result<()> + Send);

pub trait Objective: Sync {
    /// The loss of `student` on `batch` in training mode (dropout from `rng`), calling
    /// `before_student` once, before anything reads the student's parameters.
    fn loss_after(
        &self,
        student: &Encoder,
        batch: &DeviceBatch,
        progress: Progress,
        rng: &mut ChaCha8Rng,
        before_student: BeforeStudent,
    ) -> Result<StepLoss>;

    /// The loss of `student` on `batch` in training mode (dropout from `rng`).
    fn loss(
        &self,
        student: &Encoder,
        batch: &DeviceBatch,
        progress: Progress,
        rng: &mut ChaCha8Rng,
    ) -> Result<StepLoss> {
        self.loss_after(student, batch, progress, rng, &mut || Ok(()))
    }

    /// Extra trainable variables the objective owns (e.g. projections), saved with the
    /// optimizer state.
    fn extra_vars(&self) -> BTreeMap<String, Var> {
        BTreeMap::new()
    }
}

/// Masked-LM pretraining: cross-entropy on the masked tokens, plus NSP / SOP when the batch
/// has sentence labels and the model a sentence head.
pub struct MlmObjective;

impl Objective for MlmObjective {
    fn loss_after(
        &self,
        student: &Encoder,
        batch: &DeviceBatch,
        _progress: Progress,
        rng: &mut ChaCha8Rng,
        before_student: BeforeStudent,
    ) -> Result<StepLoss> {
        before_student()?;
        let out = student.forward(&batch.input(), ForwardOptions::default(), Some(rng))?;
        let logits = student.mlm_logits_at(&out.last_hidden_state, &batch.masked.positions)?;
        let mlm = cross_entropy(&logits, &batch.masked.targets)?;
        let mut parts = vec![("loss_mlm", mlm.to_scalar::<f32>()? as f64)];
        let mut loss = mlm;
        if let (Some(labels), true) = (&batch.sentence_labels, student.has_seq_relationship()) {
            let s = student.seq_relationship_logits(&out.last_hidden_state)?;
            let nsp = cross_entropy(&s, labels)?;
            parts.push(("loss_sentence", nsp.to_scalar::<f32>()? as f64));
            loss = (loss + nsp)?;
        }
        Ok(StepLoss { loss, parts })
    }
}
