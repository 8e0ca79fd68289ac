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

    /// Adds `grad` (`ids.len()` rows of `param`'s width) to the rows `ids` of `param`'s
    /// gradient (an embedding table's). Constants are skipped.
    pub(crate) fn add_rows(&self, param: &Tensor, ids: &[u32], grad: &[f32]) {
        if !param.is_variable() || ids.is_empty() {
            return;
        }
        let width = grad.len() / ids.len();
        let mut entries = self.0.lock().unwrap();
        let i = match entries.iter().position(|(p, _)| p.id() == param.id()) {
            Some(i) => i,
            None => {
                let mut zeros = super::uninit(param.elem_count());
                zeros.par_chunks_mut(1 << 14).for_each(|c| c.fill(0.0));
                entries.push((param.clone(), zeros));
                entries.len() - 1
            }
        };
        // Each task owns a block of columns of every row, so repeated ids never race.
        let acc = super::SharedMut::new(&mut entries[i].1);
        let blocks = width.div_ceil(64);
        (0..blocks).into_par_iter().for_each(|blk| {
            let (c0, c1) = (blk * 64, ((blk + 1) * 64).min(width));
            for (r, &id) in ids.iter().enumerate() {
                let src = &grad[r * width + c0..r * width + c1];
                // Safety: column block [c0, c1) of row `id` is this task's alone, and inside
                // the table (the lookup checked the ids).
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(acc.at(id as usize * width + c0), c1 - c0)
                };
                dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
            }
        });
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
