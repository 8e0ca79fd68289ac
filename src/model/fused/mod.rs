//! Fused CPU kernels with hand-written backward passes.
//!
//! candle 0.11 differentiates a composed op graph node by node, and its backward allocates a
//! zero tensor and adds to it for every node's first gradient (views included: a reshape or a
//! transpose costs a full copy in the backward). A BERT block written with candle's ops is
//! ~60 graph nodes; written with the per-op kernels it is 10 (four linears, attention, two
//! residual adds, two layer norms, and the dropout folded into the ops that precede it), and
//! with [`block`] (the default) it is one, whose parameters' gradients bypass candle's store
//! through [`grads::GradSink`] (collect them with `Encoder::backward`). The MLM decoder and
//! the embedding lookups ([`embedding`]) use the sink too, so the word embeddings tied to the
//! decoder get one gradient buffer a step.
//! Each kernel is a `CustomOp` whose `bwd` computes the gradients of all its inputs in one
//! pass over raw `f32` slices, calling `gemm` directly (with the strides it needs, so no
//! transposed copies) and parallelising attention across (batch, head) pairs rather than
//! inside each small matrix.
//!
//! The kernels are for `f32` on the CPU. [`enabled_for`] tells the encoder when it may use
//! them; on other devices and dtypes it keeps the composed, differentiable ops of
//! [`super::ops`]. `tests/fused.rs` checks every kernel's forward and gradients against the
//! composed ops, and the encoder parity tests check the whole model against PyTorch.

pub mod attention;
pub mod block;
pub mod dropout;
pub mod embedding;
pub mod gemm;
pub mod grads;
pub mod layer_norm;
pub mod linear;
pub mod losses;
pub mod math;
pub mod microkernel;
pub mod packed;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Device, Layout, Storage, Tensor};
use rayon::prelude::*;

/// Whether the fused kernels can run on `t`'s device and dtype.
pub fn enabled_for(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// The `f32` elements of a contiguous CPU storage, as candle hands them to `cpu_fwd`.
pub(crate) fn cpu_slice<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &'static str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        return Err(candle_core::Error::Msg(format!(
            "{op}: the fused kernels take f32 tensors, got {:?}",
            s.dtype()
        )));
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => Err(candle_core::Error::Msg(format!(
            "{op}: the fused kernels take contiguous tensors"
        ))),
    }
}

/// Read access to a CPU `f32` tensor's elements (contiguous, or made contiguous first).
pub(crate) struct Read {
    t: Tensor,
}

impl Read {
    pub fn new(t: &Tensor) -> candle_core::Result<Self> {
        if !enabled_for(t) {
            return Err(candle_core::Error::Msg(format!(
                "fused kernels: expected an f32 CPU tensor, got {:?} on {:?}",
                t.dtype(),
                t.device()
            )));
        }
        Ok(Read { t: t.contiguous()? })
    }

    /// Calls `f` with the elements.
    pub fn with<R>(&self, f: impl FnOnce(&[f32]) -> R) -> R {
        let (storage, layout) = self.t.storage_and_layout();
        let Storage::Cpu(CpuStorage::F32(v)) = &*storage else {
            unreachable!("checked in Read::new")
        };
        let (a, b) = layout
            .contiguous_offsets()
            .expect("made contiguous in Read::new");
        f(&v[a..b])
    }
}

/// A vector of `n` elements with unspecified contents, for a kernel's output buffer that
/// it writes in full before anything reads it (gemm with [`gemm::Acc::Overwrite`], a pass
/// that sets every element). `vec![0f32; n]` would memset it first: on the calling thread,
/// while the other cores wait, and for buffers the next pass overwrites anyway; that was
/// ~18 ms of a 280 ms small distillation step.
#[allow(clippy::uninit_vec)]
pub(crate) fn uninit(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // Safety: every f32 bit pattern is a valid value, and callers write each element
    // before reading it.
    unsafe { v.set_len(n) };
    v
}

/// `dst ← src`, in parallel row chunks of `chunk` elements, then `f(chunk index, dst chunk)`:
/// a copy and an in-place pass fused, on all threads (a plain `to_vec` copies on the calling
/// thread alone).
pub(crate) fn copy_then(
    src: &[f32],
    chunk: usize,
    f: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut dst = uninit(src.len());
    dst.par_chunks_mut(chunk.max(1))
        .zip(src.par_chunks(chunk.max(1)))
        .enumerate()
        .for_each(|(i, (d, s))| {
            d.copy_from_slice(s);
            f(i, d)
        });
    dst
}

/// Wraps a vector as a CPU tensor of `shape`.
pub(crate) fn tensor(v: Vec<f32>, shape: &[usize]) -> candle_core::Result<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu)
}

pub(crate) fn cpu_out(v: Vec<f32>) -> CpuStorage {
    CpuStorage::F32(v)
}

/// Row chunking for element-wise passes: about 4 chunks a thread, whole rows each.
pub(crate) fn rows_per_chunk(rows: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    rows.div_ceil(4 * threads).max(1)
}

/// Rows a task takes in reductions over rows. Fixed (not derived from the thread count), so a
/// reduction adds in the same order on every run: resumed runs stay bitwise identical.
pub(crate) const REDUCE_ROWS: usize = 64;

/// Sums `rows × cols` over its rows (the gradient of a broadcast bias), rows `rs` elements
/// apart (`rs > cols`: a column block of a wider matrix), in parallel.
pub(crate) fn column_sums_rs(x: &[f32], rows: usize, cols: usize, rs: usize) -> Vec<f32> {
    let x = &x[..rows.saturating_sub(1) * rs + if rows > 0 { cols } else { 0 }];
    let partial: Vec<Vec<f32>> = x
        .par_chunks(REDUCE_ROWS * rs)
        .map(|chunk| {
            let mut acc = vec![0f32; cols];
            for row in chunk.chunks(rs) {
                for (a, v) in acc.iter_mut().zip(&row[..cols]) {
                    *a += v;
                }
            }
            acc
        })
        .collect();
    sum_in_order(partial, cols)
}

/// Adds per-chunk partial sums in chunk order.
pub(crate) fn sum_in_order(partial: Vec<Vec<f32>>, cols: usize) -> Vec<f32> {
    let mut it = partial.into_iter();
    let mut total = it.next().unwrap_or_else(|| vec![0f32; cols]);
    for p in it {
        for (a, v) in total.iter_mut().zip(&p) {
            *a += v;
        }
    }
    total
}

/// A raw pointer that parallel tasks may share when each writes a disjoint part of it.
/// (Tasks call [`SharedMut::at`], which makes closures capture the wrapper, not the pointer.)
#[derive(Clone, Copy)]
pub(crate) struct SharedMut(*mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    pub fn new(v: &mut [f32]) -> Self {
        SharedMut(v.as_mut_ptr())
    }

    /// The pointer `offset` elements in.
    ///
    /// # Safety
    /// `offset` must be inside the slice this was made from.
    pub unsafe fn at(self, offset: usize) -> *mut f32 {
        self.0.add(offset)
    }

    /// The same slice seen from `offset` elements in.
    ///
    /// # Safety
    /// As [`SharedMut::at`].
    pub unsafe fn offset(self, offset: usize) -> SharedMut {
        SharedMut(self.0.add(offset))
    }
}
