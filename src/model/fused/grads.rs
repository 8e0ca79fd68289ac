//! Parameter gradients that fused kernels hand over outside candle's graph.
//!
//! candle's backward gives every input of every graph node a zero tensor and adds the node's
//! gradient to it (`GradStore::or_insert` then `add`): for a parameter that is a memset and
//! an add over the whole parameter, serially on the calling thread (~100 ms of a BERT-base
//! distillation step). A kernel whose parameters are trainable leaves ([`candle_core::Var`]s)
//! or constants can instead take them as captured values rather than graph inputs and put
//! their gradients here; [`GradSink::drain_into`] then moves them into the `GradStore`
//! `backward()` returned, adding to whatever candle computed for the same tensor (a tied
//! decoder weight that is also the word embedding, an ALBERT layer used many times).
//!
//! An encoder owns one sink; [`crate::model::Encoder::backward`] runs `backward()` and
//! drains it, and a forward pass refuses to start while gradients of an earlier backward are
//! still waiting in it, so a caller that calls `loss.backward()` directly is told, instead of
//! silently training without those gradients.

use super::tensor;
use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::Tensor;
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// A parameter and its gradient so far.
type Entry = (Tensor, Vec<f32>);

/// Gradients for parameter tensors, accumulated across uses (see the module docs).
#[derive(Clone, Default)]
pub struct GradSink(Arc<Mutex<Vec<Entry>>>);

impl GradSink {
    /// Whether a kernel may route `param`'s gradient here: it is a trainable leaf (the
    /// gradient belongs to it alone) or a constant (no gradient is wanted).
    pub fn accepts(param: &Tensor) -> bool {
        param.is_variable() || !param.track_op()
    }

    /// Adds `grad` (as many elements as `param`) to `param`'s gradient. Constants are skipped.
    pub(crate) fn add(&self, param: &Tensor, grad: Vec<f32>) {
        if !param.is_variable() {
            return;
        }
        debug_assert_eq!(grad.len(), param.elem_count());
        let mut entries = self.0.lock().unwrap();
        match entries.iter_mut().find(|(p, _)| p.id() == param.id()) {
            Some((_, acc)) => acc
                .par_chunks_mut(1 << 14)
                .zip(grad.par_chunks(1 << 14))
                .for_each(|(a, g)| a.iter_mut().zip(g).for_each(|(a, g)| *a += g)),
            None => entries.push((param.clone(), grad)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.lock().unwrap().is_empty()
    }

    /// Moves every collected gradient into `grads`, adding to a gradient already there.
    pub fn drain_into(&self, grads: &mut GradStore) -> Result<()> {
        let entries = std::mem::take(&mut *self.0.lock().unwrap());
        for (param, g) in entries {
            let g = tensor(g, param.dims())?;
            let total = match grads.get(&param) {
                Some(existing) => existing.add(&g)?,
                None => g,
            };
            grads.insert(&param, total);
        }
        Ok(())
    }

    /// Drops whatever was collected (after an aborted step).
    pub fn clear(&self) {
        self.0.lock().unwrap().clear();
    }
}
