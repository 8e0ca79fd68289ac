//! Embedding lookup, `table[ids]`, as a graph node over the table with the ids captured.
//!
//! Its backward scatters the rows' gradient into the table's gradient in the encoder's
//! [`GradSink`], where the tied MLM decoder's gradient already is: one `[vocab, hidden]`
//! buffer a step. candle's `index_select` backward instead zero-fills a copy of the table,
//! `index_add`s into it and adds that to the decoder's gradient: three serial passes over the
//! table on one thread (~0.1 s of a BERT-base distillation step, with page faults).

use super::grads::GradSink;
use super::{cpu_out, cpu_slice, uninit, Read};
use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

struct LookupOp {
    ids: Arc<Vec<u32>>,
    sink: GradSink,
}

impl CustomOp1 for LookupOp {
    fn name(&self) -> &'static str {
        "fused-embedding"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let table = cpu_slice(s, l, self.name())?;
        let (_, h) = l.shape().dims2()?;
        let mut out = uninit(self.ids.len() * h);
        out.par_chunks_mut(h.max(1) * 64)
            .zip(self.ids.par_chunks(64))
            .for_each(|(o, ids)| {
                for (row, &id) in o.chunks_mut(h).zip(ids) {
                    let id = id as usize;
                    row.copy_from_slice(&table[id * h..(id + 1) * h]);
                }
            });
        Ok((cpu_out(out), Shape::from((self.ids.len(), h))))
    }

    fn bwd(
        &self,
        table: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Read::new(grad)?.with(|g| self.sink.add_rows(table, &self.ids, g));
        Ok(None)
    }
}

/// `table[ids]` `[ids.len(), hidden]` for `table` `[rows, hidden]` (f32, CPU); the table's
/// gradient goes to `sink`, which must accept it ([`GradSink::accepts`]).
pub fn lookup(table: &Tensor, ids: &[u32], sink: &GradSink) -> Result<Tensor> {
    let (rows, _) = table.dims2()?;
    if let Some(&id) = ids.iter().find(|&&id| id as usize >= rows) {
        bail!("token id {id} is outside the embedding table of {rows} rows");
    }
    if !GradSink::accepts(table) {
        bail!("fused embedding: the table's gradient cannot go to the encoder's sink");
    }
    let op = LookupOp {
        ids: Arc::new(ids.to_vec()),
        sink: sink.clone(),
    };
    Ok(table.contiguous()?.apply_op1(op)?)
}
