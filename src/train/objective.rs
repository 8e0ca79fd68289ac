//! What the loop minimises. Pretraining uses [`MlmObjective`]; distillation plugs in its own.

use super::batch::DeviceBatch;
use crate::loss::cross_entropy;
use crate::model::{AllReady, Encoder, EncoderOutput, ForwardOptions, ParamsReady};
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
/// `trainer`'s `Deferred`) so that other work can run meanwhile: an objective's own work
/// that does not read the student (a frozen teacher's forward), after which it calls
/// [`PendingUpdate::settle`], or the student's forward itself, block by block
/// ([`PendingUpdate::beside`]).
pub trait PendingUpdate: Send {
    /// Applies the update now (nothing if none is pending).
    fn settle(&mut self) -> Result<()>;

    /// Runs `forward` (the student's, through [`Encoder::forward_beside`] and the
    /// [`ParamsReady`] it is given) beside the update, which makes `student`'s parameters
    /// final in the order that forward reads them; returns `forward`'s result once both are
    /// done.
    fn beside(&mut self, student: &Encoder, forward: StudentForward) -> Result<EncoderOutput>;
}

/// The student's forward, run by [`PendingUpdate::beside`].
pub type StudentForward<'a> = &'a mut (dyn FnMut(&dyn ParamsReady) -> Result<EncoderOutput> + Send);

/// How an objective is handed the held-back update ([`Objective::loss_after`]).
pub type BeforeStudent<'a> = &'a mut dyn PendingUpdate;

/// Nothing held back: the parameters are final.
pub struct NoUpdate;

impl PendingUpdate for NoUpdate {
    fn settle(&mut self) -> Result<()> {
        Ok(())
    }

    fn beside(&mut self, _student: &Encoder, forward: StudentForward) -> Result<EncoderOutput> {
        forward(&AllReady)
    }
}

pub trait Objective: Sync {
    /// The loss of `student` on `batch` in training mode (dropout from `rng`), having
    /// `before_student` applied (settled, or run beside the student's forward) before anything
    /// reads the student's parameters.
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
        self.loss_after(student, batch, progress, rng, &mut NoUpdate)
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
        // The update beside the forward, block by block (see `optim::update_beside`).
        let input = batch.input();
        let out = before_student.beside(student, &mut |ready| {
            student.forward_beside(&input, ForwardOptions::default(), Some(&mut *rng), ready)
        })?;
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
