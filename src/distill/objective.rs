//! The distillation objective: the teacher and student see the same masked batch; the loss
//! is a weighted sum of soft targets, hard targets, hidden-state cosine and the optional
//! matching losses, with teacher annealing and a temperature schedule.

use super::section::{DistillSection, SoftPositions};
use crate::loss::{
    attention_kl, cosine_loss, cross_entropy, masked_mse, mse, soft_kl, teacher_probs,
};
use crate::model::ops::Linear;
use crate::model::{Encoder, EncoderOutput, ForwardOptions};
use crate::train::batch::DeviceBatch;
use crate::train::objective::{BeforeStudent, Objective, Progress, StepLoss};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use std::collections::BTreeMap;

/// One or more frozen teachers (several: born-again averaging of distributions).
pub struct DistillObjective<'a> {
    pub teachers: Vec<&'a Encoder>,
    pub section: DistillSection,
    /// `[student_layer, teacher_layer]` pairs for hidden-state / attention matching.
    pub layer_pairs: Vec<[usize; 2]>,
    /// Learned projections student width → teacher width, one per pair, when they differ.
    projections: Vec<Option<(Var, Var)>>,
}

impl<'a> DistillObjective<'a> {
    pub fn new(
        teachers: Vec<&'a Encoder>,
        student: &Encoder,
        section: DistillSection,
        seed: u64,
    ) -> Result<Self> {
        let t = teachers[0];
        let w = section.losses;
        let needs_logits = w.soft > 0.0 || w.logit_mse > 0.0;
        for (i, teacher) in teachers.iter().enumerate() {
            if needs_logits && !teacher.has_mlm_head() {
                bail!("teacher {i} has no masked-LM head: the soft-target and logit losses need one (use cosine, hidden_mse or attention_kl)");
            }
            if needs_logits && teacher.cfg.vocab_size != student.cfg.vocab_size {
                bail!(
                    "teacher vocabulary ({}) and student vocabulary ({}) differ: logit losses need the same vocabulary",
                    teacher.cfg.vocab_size,
                    student.cfg.vocab_size
                );
            }
        }
        let layer_pairs = section
            .hidden_layer_map
            .clone()
            .unwrap_or_else(|| vec![[student.cfg.num_layers, t.cfg.num_layers]]);
        for [s, tl] in &layer_pairs {
            if *s > student.cfg.num_layers || *tl > t.cfg.num_layers {
                bail!("distill.hidden_layer_map pair [{s}, {tl}] is out of range (student has {} layers, teacher {})", student.cfg.num_layers, t.cfg.num_layers);
            }
        }
        if w.attention_kl > 0.0 && student.cfg.num_heads != t.cfg.num_heads {
            bail!(
                "attention_kl needs equal head counts (student {}, teacher {})",
                student.cfg.num_heads,
                t.cfg.num_heads
            );
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7072_6f6a);
        let dev = student.device().clone();
        let mut projections = Vec::new();
        for _ in &layer_pairs {
            let (sw, tw) = (student.cfg.hidden_size, t.cfg.hidden_size);
            if sw == tw {
                projections.push(None);
                continue;
            }
            let normal = Normal::new(0.0f32, student.cfg.initializer_range as f32)?;
            let data: Vec<f32> = (0..sw * tw).map(|_| normal.sample(&mut rng)).collect();
            let w = Var::from_tensor(&Tensor::from_vec(data, (tw, sw), &dev)?)?;
            let b = Var::zeros(tw, candle_core::DType::F32, &dev)?;
            projections.push(Some((w, b)));
        }
        Ok(DistillObjective {
            teachers,
            section,
            layer_pairs,
            projections,
        })
    }

    /// λ of teacher annealing at this point of the run (0 = all teacher, 1 = all gold).
    pub fn lambda(&self, p: Progress) -> Option<f64> {
        self.section.annealing.map(|a| {
            let x = (p.fraction() / a.span).min(1.0);
            a.start + (a.end - a.start) * x
        })
    }

    pub fn temperature(&self, p: Progress) -> f64 {
        match self.section.temperature_end {
            Some(end) => self.section.temperature + (end - self.section.temperature) * p.fraction(),
            None => self.section.temperature,
        }
    }

    fn project(&self, i: usize, h: &Tensor) -> Result<Tensor> {
        match &self.projections[i] {
            None => Ok(h.clone()),
            Some((w, b)) => Linear {
                weight: w.as_tensor().clone(),
                bias: Some(b.as_tensor().clone()),
            }
            .forward(h),
        }
    }

    fn teacher_forward(
        &self,
        teacher: &Encoder,
        batch: &DeviceBatch,
        opts: ForwardOptions,
    ) -> Result<(EncoderOutput, Device)> {
        let td = teacher.device().clone();
        let out = if td.same_device(batch.input_ids.device()) {
            teacher.forward(&batch.input(), opts, None)?
        } else {
            let ids = batch.input_ids.to_device(&td)?;
            let mask = batch.attention_mask.to_device(&td)?;
            let tt = batch.token_type_ids.to_device(&td)?;
            teacher.forward(
                &crate::model::EncoderInput {
                    input_ids: &ids,
                    attention_mask: Some(&mask),
                    token_type_ids: Some(&tt),
                },
                opts,
                None,
            )?
        };
        Ok((out, td))
    }
}

/// Flat indices of the non-padding positions of a batch.
fn real_positions(mask: &Tensor) -> Result<Tensor> {
    let m: Vec<u32> = mask.flatten_all()?.to_vec1()?;
    let idx: Vec<u32> = m
        .iter()
        .enumerate()
        .filter(|(_, &v)| v == 1)
        .map(|(i, _)| i as u32)
        .collect();
    let n = idx.len();
    Ok(Tensor::from_vec(idx, n, mask.device())?)
}

/// What the losses need from the teachers: the distributions at temperature T and the logits
/// at the soft positions (averaged over the teachers), and the first teacher's last hidden
/// state, hidden states and attentions, on the student's device, detached.
#[derive(Default)]
struct TeacherOutputs {
    probs: Option<Tensor>,
    logits: Option<Tensor>,
    last: Option<Tensor>,
    hidden: Vec<Tensor>,
    attn: Vec<Tensor>,
}

impl DistillObjective<'_> {
    /// The teachers' forwards on `batch` and what the losses take from them (`logits`: the
    /// soft-target or logit losses are on; `t`: the temperature).
    fn teacher_outputs(
        &self,
        batch: &DeviceBatch,
        opts: ForwardOptions,
        soft_pos: &Tensor,
        logits: bool,
        t: f64,
        sd: &Device,
    ) -> Result<TeacherOutputs> {
        let mut o = TeacherOutputs::default();
        for (k, teacher) in self.teachers.iter().enumerate() {
            let (out, td) = self.teacher_forward(teacher, batch, opts)?;
            if logits {
                let pos = soft_pos.to_device(&td)?;
                let lg = teacher
                    .mlm_logits_at(&out.last_hidden_state, &pos)?
                    .to_device(sd)?;
                let p = teacher_probs(&lg, t)?;
                o.probs = Some(match o.probs {
                    None => p,
                    Some(acc) => (acc + p)?,
                });
                o.logits = Some(match o.logits {
                    None => lg,
                    Some(acc) => (acc + lg)?,
                });
            }
            if k == 0 {
                o.last = Some(out.last_hidden_state.to_device(sd)?.detach());
                o.hidden = out
                    .hidden_states
                    .iter()
                    .map(|h| h.to_device(sd).map(|x| x.detach()))
                    .collect::<candle_core::Result<_>>()?;
                o.attn = out
                    .attentions
                    .iter()
                    .map(|h| h.to_device(sd).map(|x| x.detach()))
                    .collect::<candle_core::Result<_>>()?;
            }
        }
        let n = self.teachers.len() as f64;
        o.probs = o.probs.map(|p| p / n).transpose()?;
        o.logits = o.logits.map(|p| p / n).transpose()?;
        Ok(o)
    }
}

impl Objective for DistillObjective<'_> {
    fn loss_after(
        &self,
        student: &Encoder,
        batch: &DeviceBatch,
        progress: Progress,
        rng: &mut ChaCha8Rng,
        before_student: BeforeStudent,
    ) -> Result<StepLoss> {
        let w = self.section.losses;
        let (mut w_soft, mut w_hard) = (w.soft, w.hard);
        let lambda = self.lambda(progress);
        if let Some(l) = lambda {
            w_soft *= 1.0 - l;
            w_hard *= l;
        }
        let t = self.temperature(progress);
        let need_hidden = w.hidden_mse > 0.0;
        let need_attn = w.attention_kl > 0.0;
        let opts = ForwardOptions {
            hidden_states: need_hidden,
            attentions: need_attn,
        };
        let sd = student.device();
        let soft_pos = match self.section.soft_positions {
            SoftPositions::Masked => batch.masked.positions.clone(),
            SoftPositions::All => real_positions(&batch.attention_mask)?,
        };
        let logits = w_soft > 0.0 || w.logit_mse > 0.0;
        let teachers = || self.teacher_outputs(batch, opts, &soft_pos, logits, t, sd);
        let mut student_fwd = || -> Result<EncoderOutput> {
            before_student.settle()?;
            student.forward(&batch.input(), opts, Some(rng))
        };
        // On the CPU the teachers' forwards run beside the student's (and beside the update
        // before it, which waits on memory while the teachers' products compute): each
        // thread takes the other's share of the products when it has nothing of its own.
        // Same results: neither side reads what the other writes, and the dropout draws are
        // the student's alone. BERT-base distillation step (12 -> 6 layers, 2 threads,
        // `benches/encoder_step.rs`), in-process alternating steps against the update, the
        // student and the teacher one after the other: −16.0 ± 3.2 ms a step (15 pairs, 13
        // won; the update took 17 ms alone there, and 17–30 ms between processes); the
        // teacher beside the student alone, the update before both: −9.8 ± 2.5 ms. The
        // update's own split over the threads can stay: kept to one thread, +0.5 ± 7.9 ms.
        let on_cpu = sd.is_cpu() && self.teachers.iter().all(|t| t.device().is_cpu());
        let (s_out, to) = if on_cpu {
            let (to, s_out) = rayon::join(teachers, student_fwd);
            (s_out?, to?)
        } else {
            let s_out = student_fwd()?;
            (s_out, teachers()?)
        };
        let TeacherOutputs {
            probs: t_probs,
            logits: t_logits,
            last: t_last,
            hidden: t_hidden,
            attn: t_attn,
        } = to;

        let mut total: Option<Tensor> = None;
        let mut parts = Vec::new();
        let mut add = |name: &'static str, weight: f64, l: Tensor| -> Result<()> {
            parts.push((name, l.to_scalar::<f32>()? as f64));
            if weight > 0.0 {
                let wl = (l * weight)?;
                total = Some(match total.take() {
                    None => wl,
                    Some(acc) => (acc + wl)?,
                });
            }
            Ok(())
        };
        let s_logits_soft = if w_soft > 0.0 || w.logit_mse > 0.0 {
            Some(student.mlm_logits_at(&s_out.last_hidden_state, &soft_pos)?)
        } else {
            None
        };
        if let (Some(sl), Some(tp)) = (&s_logits_soft, &t_probs) {
            if w.soft > 0.0 {
                add("loss_soft", w_soft, soft_kl(sl, tp, t)?)?;
            }
        }
        if let (Some(sl), Some(tl)) = (&s_logits_soft, &t_logits) {
            if w.logit_mse > 0.0 {
                add("loss_logit_mse", w.logit_mse, mse(sl, tl)?)?;
            }
        }
        if w.hard > 0.0 {
            let sl = match (&s_logits_soft, self.section.soft_positions) {
                (Some(sl), SoftPositions::Masked) => sl.clone(),
                _ => student.mlm_logits_at(&s_out.last_hidden_state, &batch.masked.positions)?,
            };
            add(
                "loss_hard",
                w_hard,
                cross_entropy(&sl, &batch.masked.targets)?,
            )?;
        }
        if w.cosine > 0.0 {
            let s_last = self.project(self.layer_pairs.len() - 1, &s_out.last_hidden_state)?;
            add(
                "loss_cosine",
                w.cosine,
                cosine_loss(&s_last, t_last.as_ref().unwrap(), &batch.attention_mask)?,
            )?;
        }
        if need_hidden {
            let mut acc: Option<Tensor> = None;
            for (i, [sl, tl]) in self.layer_pairs.iter().enumerate() {
                let sh = self.project(i, &s_out.hidden_states[*sl])?;
                let l = masked_mse(&sh, &t_hidden[*tl], &batch.attention_mask)?;
                acc = Some(match acc {
                    None => l,
                    Some(a) => (a + l)?,
                });
            }
            add(
                "loss_hidden_mse",
                w.hidden_mse,
                (acc.unwrap() / self.layer_pairs.len() as f64)?,
            )?;
        }
        if need_attn {
            let mut acc: Option<Tensor> = None;
            for [sl, tl] in &self.layer_pairs {
                // Attention of layer l (1-based) is attentions[l - 1].
                let (si, ti) = (sl.max(&1) - 1, tl.max(&1) - 1);
                let l = attention_kl(&s_out.attentions[si], &t_attn[ti], &batch.attention_mask)?;
                acc = Some(match acc {
                    None => l,
                    Some(a) => (a + l)?,
                });
            }
            add(
                "loss_attention_kl",
                w.attention_kl,
                (acc.unwrap() / self.layer_pairs.len() as f64)?,
            )?;
        }
        parts.push(("temperature", t));
        if let Some(l) = lambda {
            parts.push(("lambda", l));
        }
        let loss = match total {
            Some(t) => t,
            None => bail!("every loss has weight 0 at this step"),
        };
        Ok(StepLoss { loss, parts })
    }

    fn extra_vars(&self) -> BTreeMap<String, Var> {
        let mut m = BTreeMap::new();
        for (i, p) in self.projections.iter().enumerate() {
            if let Some((w, b)) = p {
                m.insert(format!("projection.{i}.weight"), w.clone());
                m.insert(format!("projection.{i}.bias"), b.clone());
            }
        }
        m
    }
}
