//! A data [`Batch`] moved onto the training device as tensors.

use crate::data::Batch;
use crate::loss::{masked_positions, MaskedTargets};
use anyhow::Result;
use candle_core::{Device, Tensor};

pub struct DeviceBatch {
    /// `u32 [batch, seq]`.
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub token_type_ids: Tensor,
    pub masked: MaskedTargets,
    /// NSP / SOP labels `u32 [batch]`.
    pub sentence_labels: Option<Tensor>,
    pub real_tokens: usize,
}

impl DeviceBatch {
    pub fn new(b: &Batch, device: &Device) -> Result<Self> {
        let shape = (b.batch_size, b.seq_len);
        Ok(DeviceBatch {
            input_ids: Tensor::from_slice(&b.input_ids, shape, device)?,
            attention_mask: Tensor::from_slice(&b.attention_mask, shape, device)?,
            token_type_ids: Tensor::from_slice(&b.token_type_ids, shape, device)?,
            masked: masked_positions(&b.labels, device)?,
            sentence_labels: match &b.sentence_labels {
                Some(l) => Some(Tensor::from_slice(l, l.len(), device)?),
                None => None,
            },
            real_tokens: b.real_tokens(),
        })
    }

    pub fn input(&self) -> crate::model::EncoderInput<'_> {
        crate::model::EncoderInput {
            input_ids: &self.input_ids,
            attention_mask: Some(&self.attention_mask),
            token_type_ids: Some(&self.token_type_ids),
        }
    }
}
