//! The trainable encoder: embeddings, transformer layers, pooler and MLM head.

use super::config::{Activation, EncoderConfig, Layout};
use super::cuda;
use super::fused;
use super::fused::dropout::Mask;
use super::ops::{activate, dropout, matmul_in, softmax_last_dim, LayerNorm, Linear};
use super::params::Params;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use rand::{Rng, RngCore};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;

/// What to feed the encoder. Ids are `u32` tensors of shape `[batch, seq]`.
pub struct EncoderInput<'a> {
    pub input_ids: &'a Tensor,
    /// 1 for real tokens, 0 for padding; `None` means no padding.
    pub attention_mask: Option<&'a Tensor>,
    /// Segment ids; `None` means all zeros. Ignored by layouts without token types.
    pub token_type_ids: Option<&'a Tensor>,
}

/// What to return besides the last hidden state.
#[derive(Debug, Clone, Copy, Default)]
pub struct ForwardOptions {
    /// Every hidden state: the embeddings' output, then each layer's.
    pub hidden_states: bool,
    /// Every layer's attention probabilities `[batch, heads, seq, seq]`.
    pub attentions: bool,
}

/// What [`Encoder::forward_beside`] waits on before it reads parameters: an update of them
/// that runs beside the forward (the trainer's held-back AdamW step), done in order: first
/// every parameter outside the transformer blocks, then block 0's, block 1's, ….
pub trait ParamsReady: Sync {
    /// Returns once the parameters outside the blocks (`None`) or block `k`'s (`Some(k)`, see
    /// [`Encoder::block_params`]) are final, or with the error that stopped the update.
    fn wait(&self, block: Option<usize>) -> Result<()>;
}

/// Nothing pending: every parameter is final.
pub struct AllReady;

impl ParamsReady for AllReady {
    fn wait(&self, _block: Option<usize>) -> Result<()> {
        Ok(())
    }
}

pub struct EncoderOutput {
    /// `[batch, seq, hidden]`.
    pub last_hidden_state: Tensor,
    pub hidden_states: Vec<Tensor>,
    pub attentions: Vec<Tensor>,
}

/// The padding mask in the form the chosen attention takes.
enum AttentionMask {
    /// Fused CPU attention: 1 for each key that may be attended to, `[batch * seq]`.
    Keys(Option<Arc<Vec<u8>>>),
    /// candle's composed attention: added to the scores, `[batch, 1, 1, seq]`.
    Additive(Option<Tensor>),
}

struct Embeddings {
    word: Tensor,
    position: Tensor,
    token_type: Option<Tensor>,
    norm: LayerNorm,
    projection: Option<Linear>,
}

struct Block {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_norm: LayerNorm,
    /// The frozen layer's weights transposed for the CPU forward, made on first use.
    transposed: std::sync::OnceLock<Arc<fused::block::Transposed>>,
}

impl Block {
    /// The layer's tensors as the whole-layer kernel takes them (`None` without biases).
    fn layer_weights(&self) -> Option<fused::block::LayerWeights> {
        let lin = |l: &Linear| Some((l.weight.clone(), l.bias.clone()?));
        let norm = |n: &LayerNorm| (n.weight.clone(), n.bias.clone());
        Some(fused::block::LayerWeights {
            query: lin(&self.query)?,
            key: lin(&self.key)?,
            value: lin(&self.value)?,
            attn_out: lin(&self.attn_out)?,
            attn_norm: norm(&self.attn_norm),
            intermediate: lin(&self.intermediate)?,
            output: lin(&self.output)?,
            out_norm: norm(&self.out_norm),
            transposed: None,
        })
    }

    /// The ids of every tensor the layer reads: its linears' weights and biases and its
    /// layer norms' (the fields [`Block::layer_weights`] takes, biases optional here).
    fn tensor_ids(&self) -> Vec<candle_core::TensorId> {
        let lins = [
            &self.query,
            &self.key,
            &self.value,
            &self.attn_out,
            &self.intermediate,
            &self.output,
        ];
        let norms = [&self.attn_norm, &self.out_norm];
        lins.iter()
            .flat_map(|l| std::iter::once(&l.weight).chain(l.bias.as_ref()))
            .chain(norms.iter().flat_map(|n| [&n.weight, &n.bias]))
            .map(Tensor::id)
            .collect()
    }
}

struct MlmHead {
    dense: Linear,
    norm: LayerNorm,
    decoder: Tensor,
    bias: Tensor,
}

/// The BERT-family encoder. Built over a [`Params`] set whose tensors it shares: when the
/// parameters are trainable [`candle_core::Var`]s, an optimiser updating them in place updates
/// the model.
pub struct Encoder {
    pub cfg: EncoderConfig,
    pub params: Params,
    emb: Embeddings,
    blocks: Vec<Block>,
    pooler: Option<Linear>,
    head: Option<MlmHead>,
    seq_relationship: Option<Linear>,
    /// Use the fused kernels where they apply (f32 on the CPU); see [`fused`].
    fused: bool,
    /// The dtype of the matmuls (mixed precision when not f32); see
    /// [`Encoder::set_compute_dtype`].
    compute: DType,
    /// Gradients of parameters the whole-layer kernel computes outside candle's graph;
    /// [`Encoder::backward`] collects them.
    sink: fused::grads::GradSink,
    /// Whether the whole-layer kernel may run (else one fused node per op).
    layer_kernel: bool,
}

impl Encoder {
    /// Builds the encoder over `params`, which must hold every required canonical tensor.
    pub fn new(cfg: EncoderConfig, params: Params) -> Result<Self> {
        let eps = cfg.layer_norm_eps;
        let t = |name: &str| params.get(name);
        let lin = |prefix: &str| -> Result<Linear> {
            Ok(Linear {
                weight: t(&format!("{prefix}.weight"))?,
                bias: Some(t(&format!("{prefix}.bias"))?),
            })
        };
        let norm = |prefix: &str| -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: t(&format!("{prefix}.weight"))?,
                bias: t(&format!("{prefix}.bias"))?,
                eps,
            })
        };
        let emb = Embeddings {
            word: t("embeddings.word_embeddings.weight")?,
            position: t("embeddings.position_embeddings.weight")?,
            token_type: if cfg.type_vocab_size > 0 {
                Some(t("embeddings.token_type_embeddings.weight")?)
            } else {
                None
            },
            norm: norm("embeddings.LayerNorm")?,
            projection: if cfg.embedding_size != cfg.hidden_size || cfg.layout == Layout::Albert {
                Some(lin("embeddings.projection")?)
            } else {
                None
            },
        };
        let blocks = (0..cfg.num_blocks())
            .map(|k| {
                let p = format!("encoder.layer.{k}");
                Ok(Block {
                    query: lin(&format!("{p}.attention.self.query"))?,
                    key: lin(&format!("{p}.attention.self.key"))?,
                    value: lin(&format!("{p}.attention.self.value"))?,
                    attn_out: lin(&format!("{p}.attention.output.dense"))?,
                    attn_norm: norm(&format!("{p}.attention.output.LayerNorm"))?,
                    intermediate: lin(&format!("{p}.intermediate.dense"))?,
                    output: lin(&format!("{p}.output.dense"))?,
                    out_norm: norm(&format!("{p}.output.LayerNorm"))?,
                    transposed: Default::default(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let pooler = if params.contains("pooler.dense.weight") {
            Some(lin("pooler.dense")?)
        } else {
            None
        };
        let head = if params.contains("cls.predictions.transform.dense.weight") {
            Some(MlmHead {
                dense: lin("cls.predictions.transform.dense")?,
                norm: norm("cls.predictions.transform.LayerNorm")?,
                decoder: if cfg.tie_word_embeddings {
                    emb.word.clone()
                } else {
                    t("cls.predictions.decoder.weight")?
                },
                bias: t("cls.predictions.bias")?,
            })
        } else {
            None
        };
        let seq_relationship = if params.contains("cls.seq_relationship.weight") {
            Some(lin("cls.seq_relationship")?)
        } else {
            None
        };
        Ok(Encoder {
            cfg,
            params,
            emb,
            blocks,
            pooler,
            head,
            seq_relationship,
            fused: true,
            compute: DType::F32,
            sink: Default::default(),
            layer_kernel: true,
        })
    }

    /// `loss.backward()` plus the gradients of this encoder's parameters that the
    /// whole-layer kernel computed outside candle's graph (see [`fused::grads`]). Use it
    /// instead of `loss.backward()` whenever the loss depends on this encoder's output.
    pub fn backward(&self, loss: &Tensor) -> Result<candle_core::backprop::GradStore> {
        let mut grads = match loss.backward() {
            Ok(g) => g,
            Err(e) => {
                self.sink.clear();
                return Err(e.into());
            }
        };
        self.sink.drain_into(&mut grads)?;
        Ok(grads)
    }

    /// Runs each transformer layer as one fused node (the default) or as one node per op
    /// (linear, attention, layer norm): the same function, kept for tests and comparison.
    pub fn set_layer_kernel(&mut self, on: bool) {
        self.layer_kernel = on;
    }

    /// Chooses between distil's fused kernels (the default, used where they apply: `fused`
    /// on the CPU in f32, `cuda` on a GPU) and candle's composed ops everywhere. They compute
    /// the same function; on the CPU both draw the same dropout masks from the same RNG
    /// state (on a GPU each path draws its own, from seeds taken from that RNG).
    pub fn set_fused(&mut self, fused: bool) {
        self.fused = fused;
    }

    /// Mixed precision: every matmul (the dense layers, the attention products and the MLM
    /// head) takes its inputs cast to `dtype` and returns its product cast back to the
    /// parameters' dtype (f32), so the weights, layer norms, softmax and losses stay f32 and
    /// the gradients reach the f32 weights through the casts. `DType::F32` (the default)
    /// turns it off. The fused CPU kernels are f32-only: any other dtype runs candle's
    /// composed ops there. The CUDA kernels take it: f32 activations, products in `dtype`.
    pub fn set_compute_dtype(&mut self, dtype: DType) {
        self.compute = dtype;
    }

    pub fn compute_dtype(&self) -> DType {
        self.compute
    }

    fn use_fused(&self, x: &Tensor) -> bool {
        self.fused && self.compute == x.dtype() && fused::enabled_for(x)
    }

    /// Whether the CUDA kernels (`model::cuda`) may run on `x`.
    fn use_cuda(&self, x: &Tensor) -> bool {
        self.fused && cuda::applies(x)
    }

    /// `table[ids]`: the fused lookup (gradient into the sink, beside the tied decoder's)
    /// when it can be, the CUDA lookup on a GPU, `index_select` otherwise.
    fn lookup(&self, table: &Tensor, ids: &Tensor) -> Result<Tensor> {
        if self.use_fused(table)
            && fused::grads::GradSink::accepts(table)
            && ids.dtype() == DType::U32
            && ids.device().is_cpu()
        {
            return fused::embedding::lookup(table, &ids.to_vec1::<u32>()?, &self.sink);
        }
        if self.use_cuda(table)
            && ids.dtype() == DType::U32
            && ids.device().same_device(table.device())
        {
            return cuda::embedding(table, ids);
        }
        Ok(table.index_select(ids, 0)?)
    }

    /// `dropout(act(x·Wᵀ + b))`, one fused node when it can be.
    fn dense(
        &self,
        lin: &Linear,
        x: &Tensor,
        act: Option<Activation>,
        p: f32,
        rng: Option<&mut ChaCha8Rng>,
    ) -> Result<Tensor> {
        if let (true, Some(bias)) = (self.use_fused(x), &lin.bias) {
            let (out, inp) = lin.weight.dims2()?;
            let n = x.elem_count() / inp.max(1) * out;
            let mask = match rng {
                Some(r) if p > 0.0 => Some(Mask::draw(r, n, p)),
                _ => None,
            };
            let keep = x.track_op() || lin.weight.track_op() || bias.track_op();
            return fused::linear::linear(x, &lin.weight, bias, act, mask, keep, Some(&self.sink));
        }
        if let (true, Some(bias)) = (self.use_cuda(x), &lin.bias) {
            let drop = match rng {
                Some(r) if p > 0.0 => Some((p, r.random())),
                _ => None,
            };
            return cuda::linear(x, &lin.weight, bias, act, drop, self.compute);
        }
        let mut y = lin.forward_in(x, self.compute)?;
        if let Some(a) = act {
            y = activate(&y, a)?;
        }
        self.drop(&y, p, rng)
    }

    /// The attention's q, k and v projections of `x`. On a GPU in mixed precision the three
    /// share one low-precision copy of `x` (one cast instead of three, and one copy kept for
    /// their backward).
    fn qkv(&self, blk: &Block, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let lins = [&blk.query, &blk.key, &blk.value];
        let biases = lins.map(|l| l.bias.as_ref());
        if let (true, [Some(bq), Some(bk), Some(bv)]) =
            (self.use_cuda(x) && self.compute != DType::F32, biases)
        {
            let inp = blk.query.weight.dim(1)?;
            let xl = x
                .detach()
                .reshape((x.elem_count() / inp.max(1), inp))?
                .to_dtype(self.compute)?;
            let one = |l: &Linear, b: &Tensor| {
                cuda::linear_from(x, Some(xl.clone()), &l.weight, b, None, None, self.compute)
            };
            return Ok((one(lins[0], bq)?, one(lins[1], bk)?, one(lins[2], bv)?));
        }
        Ok((
            self.dense(&blk.query, x, None, 0.0, None)?,
            self.dense(&blk.key, x, None, 0.0, None)?,
            self.dense(&blk.value, x, None, 0.0, None)?,
        ))
    }

    fn norm(&self, n: &LayerNorm, x: &Tensor) -> Result<Tensor> {
        if self.use_fused(x) {
            return fused::layer_norm::layer_norm(x, &n.weight, &n.bias, n.eps);
        }
        if self.use_cuda(x) {
            return cuda::layer_norm(x, &n.weight, &n.bias, n.eps);
        }
        n.forward(x)
    }

    /// `LN(a + residual)`.
    fn add_norm(&self, n: &LayerNorm, a: &Tensor, residual: &Tensor) -> Result<Tensor> {
        if self.use_fused(a) {
            return fused::layer_norm::residual_layer_norm(a, residual, &n.weight, &n.bias, n.eps);
        }
        self.norm(n, &a.add(residual)?)
    }

    fn drop(&self, x: &Tensor, p: f32, rng: Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        match rng {
            Some(r) if p > 0.0 && self.use_fused(x) => fused::dropout::dropout(x, p, r),
            Some(r) if p > 0.0 && self.use_cuda(x) => cuda::dropout(x, p, r.random()),
            rng => dropout(x, p, rng),
        }
    }

    pub fn device(&self) -> &Device {
        self.emb.word.device()
    }

    pub fn has_mlm_head(&self) -> bool {
        self.head.is_some()
    }

    pub fn has_pooler(&self) -> bool {
        self.pooler.is_some()
    }

    pub fn has_seq_relationship(&self) -> bool {
        self.seq_relationship.is_some()
    }

    /// Runs the encoder. `rng` turns training-mode dropout on (`None` = eval mode).
    pub fn forward(
        &self,
        input: &EncoderInput,
        opts: ForwardOptions,
        rng: Option<&mut ChaCha8Rng>,
    ) -> Result<EncoderOutput> {
        self.forward_beside(input, opts, rng, &AllReady)
    }

    /// The tensors each transformer block reads (`[block][…]`, by id): the groups, after
    /// everything else, in which an update running beside [`Encoder::forward_beside`] makes
    /// the parameters final.
    pub fn block_params(&self) -> Vec<Vec<candle_core::TensorId>> {
        self.blocks.iter().map(Block::tensor_ids).collect()
    }

    /// [`Encoder::forward`] while the parameters are still being updated beside it: waits on
    /// `ready` for those outside the blocks before the embeddings, and for each block's before
    /// the block runs, so that it reads only final values (the same output as updating them
    /// all first). The MLM head and the pooler are outside the blocks.
    pub fn forward_beside(
        &self,
        input: &EncoderInput,
        opts: ForwardOptions,
        mut rng: Option<&mut ChaCha8Rng>,
        ready: &dyn ParamsReady,
    ) -> Result<EncoderOutput> {
        ready.wait(None)?;
        let cfg = &self.cfg;
        let ids = input.input_ids;
        let (b, s) = ids.dims2().context("input_ids must be [batch, seq]")?;
        if s + cfg.position_offset() > cfg.max_position_embeddings {
            bail!(
                "sequence length {s} exceeds the model's max_position_embeddings {}",
                cfg.max_position_embeddings - cfg.position_offset()
            );
        }
        if !self.sink.is_empty() {
            bail!(
                "gradients of this encoder's last backward pass were never collected: \
                 compute them with Encoder::backward(&loss), not loss.backward()"
            );
        }
        let dev = ids.device();
        let position_ids = self.position_ids(ids)?;
        let flat_ids = ids.flatten_all()?;
        let mut x = self.lookup(&self.emb.word, &flat_ids)?;
        x = x.add(&self.lookup(&self.emb.position, &position_ids.flatten_all()?)?)?;
        if let Some(tt) = &self.emb.token_type {
            let tt_ids = match input.token_type_ids {
                Some(t) => t.flatten_all()?,
                None => Tensor::zeros(b * s, DType::U32, dev)?,
            };
            x = x.add(&self.lookup(tt, &tt_ids)?)?;
        }
        let x = x.reshape((b, s, cfg.embedding_size))?;
        let x = self.norm(&self.emb.norm, &x)?;
        if let (Some(r), false, false) = (rng.as_deref_mut(), dev.is_cpu(), self.use_cuda(&x)) {
            // The composed ops' GPU dropout draws from the device's generator (see
            // `ops::dropout`): seeded from `rng` each pass, a run and its resumption draw the
            // same masks.
            dev.set_seed(r.next_u64())?;
        }
        let mut x = self.drop(&x, cfg.hidden_dropout, rng.as_deref_mut())?;
        if let Some(p) = &self.emb.projection {
            x = self.dense(p, &x, None, 0.0, None)?;
        }
        // One choice of attention kernel for every layer, with the padding mask in its form.
        let mask = if self.use_fused(&x) && !opts.attentions {
            // The fused attention takes one flag a key.
            AttentionMask::Keys(match input.attention_mask {
                Some(m) => Some(Arc::new(
                    m.to_dtype(DType::U8)?.flatten_all()?.to_vec1::<u8>()?,
                )),
                None => None,
            })
        } else {
            // Additive [b, 1, 1, s]: 0 on tokens, the dtype's minimum on padding.
            AttentionMask::Additive(match input.attention_mask {
                Some(m) => {
                    let m = m.to_dtype(x.dtype())?;
                    Some(((1.0 - m)? * f32::MIN as f64)?.reshape((b, 1, 1, s))?)
                }
                None => None,
            })
        };
        let mut hidden_states = Vec::new();
        let mut attentions = Vec::new();
        if opts.hidden_states {
            hidden_states.push(x.clone());
        }
        for layer in 0..cfg.num_layers {
            for k in cfg.blocks_for_layer(layer) {
                ready.wait(Some(k))?;
                let (y, probs) = self.block_forward(
                    &self.blocks[k],
                    &x,
                    &mask,
                    opts.attentions,
                    rng.as_deref_mut(),
                )?;
                x = y;
                if let Some(p) = probs {
                    attentions.push(p);
                }
            }
            if opts.hidden_states {
                hidden_states.push(x.clone());
            }
        }
        Ok(EncoderOutput {
            last_hidden_state: x,
            hidden_states,
            attentions,
        })
    }

    fn position_ids(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let dev = ids.device();
        if self.cfg.layout == Layout::Roberta {
            // RoBERTa: positions count real tokens, starting after the padding index.
            let pad = self.cfg.pad_token_id;
            let rows = ids.to_vec2::<u32>()?;
            let mut out = Vec::with_capacity(b * s);
            for row in rows {
                let mut count = 0u32;
                for id in row {
                    if id == pad {
                        out.push(pad);
                    } else {
                        count += 1;
                        out.push(count + pad);
                    }
                }
            }
            Ok(Tensor::from_vec(out, (b, s), dev)?)
        } else {
            Ok(Tensor::arange(0u32, s as u32, dev)?
                .unsqueeze(0)?
                .broadcast_as((b, s))?
                .contiguous()?)
        }
    }

    fn block_forward(
        &self,
        blk: &Block,
        x: &Tensor,
        mask: &AttentionMask,
        want_probs: bool,
        mut rng: Option<&mut ChaCha8Rng>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let cfg = &self.cfg;
        let (b, s, h) = x.dims3()?;
        let (nh, hd) = (cfg.num_heads, cfg.head_dim());
        if let AttentionMask::Keys(key_mask) = mask {
            let weights = self.layer_kernel.then(|| blk.layer_weights()).flatten();
            if let Some(mut weights) = weights.filter(|w| w.fusable()) {
                if weights.frozen() {
                    let t = match blk.transposed.get() {
                        Some(t) => t.clone(),
                        None => {
                            let t = Arc::new(fused::block::Transposed::of(&weights)?);
                            blk.transposed.get_or_init(|| t).clone()
                        }
                    };
                    weights.transposed = Some(t);
                }
                // The masks in the order the per-op path draws them.
                let mut draw = |n: usize, p: f32| match rng.as_deref_mut() {
                    Some(r) if p > 0.0 => Some(Mask::draw(r, n, p)),
                    _ => None,
                };
                let masks = fused::block::LayerMasks {
                    attention: draw(b * nh * s * s, cfg.attention_dropout),
                    attn_out: draw(b * s * h, cfg.hidden_dropout),
                    output: draw(b * s * h, cfg.hidden_dropout),
                };
                let y = fused::block::layer(
                    x,
                    weights,
                    nh,
                    cfg.hidden_act,
                    cfg.layer_norm_eps,
                    key_mask.clone(),
                    masks,
                    &self.sink,
                )?;
                return Ok((y, None));
            }
        }
        let (q, k, v) = self.qkv(blk, x)?;
        let (ctx, probs) = match mask {
            AttentionMask::Keys(key_mask) => {
                let drop = match rng.as_deref_mut() {
                    Some(r) if cfg.attention_dropout > 0.0 => {
                        Some(Mask::draw(r, b * nh * s * s, cfg.attention_dropout))
                    }
                    _ => None,
                };
                let keep = q.track_op() || k.track_op() || v.track_op();
                let ctx =
                    fused::attention::attention(&q, &k, &v, nh, key_mask.clone(), drop, keep)?;
                (ctx, None)
            }
            AttentionMask::Additive(mask) if self.use_cuda(&q) && !want_probs => {
                let drop = match rng.as_deref_mut() {
                    Some(r) if cfg.attention_dropout > 0.0 => {
                        Some((cfg.attention_dropout, r.random()))
                    }
                    _ => None,
                };
                let ctx = cuda::attention(&q, &k, &v, nh, mask.as_ref(), drop, self.compute)?;
                (ctx, None)
            }
            AttentionMask::Additive(mask) => {
                let heads = |t: Tensor| -> Result<Tensor> {
                    Ok(t.reshape((b, s, nh, hd))?.transpose(1, 2)?.contiguous()?)
                };
                let (q, k, v) = (heads(q)?, heads(k)?, heads(v)?);
                let mut scores = (matmul_in(&q, &k.t()?, self.compute)? / (hd as f64).sqrt())?;
                if let Some(m) = mask {
                    scores = scores.broadcast_add(m)?;
                }
                let probs = if self.use_cuda(&scores) {
                    cuda::softmax_last_dim(&scores)?
                } else {
                    softmax_last_dim(&scores)?
                };
                let probs_d = self.drop(&probs, cfg.attention_dropout, rng.as_deref_mut())?;
                let ctx = matmul_in(&probs_d, &v, self.compute)?
                    .transpose(1, 2)?
                    .contiguous()?
                    .reshape((b, s, h))?;
                (ctx, want_probs.then_some(probs))
            }
        };
        let a = self.dense(
            &blk.attn_out,
            &ctx,
            None,
            cfg.hidden_dropout,
            rng.as_deref_mut(),
        )?;
        let a = self.add_norm(&blk.attn_norm, &a, x)?;
        let i = self.dense(&blk.intermediate, &a, Some(cfg.hidden_act), 0.0, None)?;
        let o = self.dense(&blk.output, &i, None, cfg.hidden_dropout, rng)?;
        let o = self.add_norm(&blk.out_norm, &o, &a)?;
        Ok((o, probs))
    }

    /// MLM logits `[.., vocab]` for hidden states `[.., hidden]` (any leading shape).
    pub fn mlm_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let head = self
            .head
            .as_ref()
            .context("this model has no masked-LM head")?;
        let t = self.dense(&head.dense, hidden, Some(self.cfg.hidden_act), 0.0, None)?;
        let t = self.norm(&head.norm, &t)?;
        let dec = Linear {
            weight: head.decoder.clone(),
            bias: Some(head.bias.clone()),
        };
        self.dense(&dec, &t, None, 0.0, None)
    }

    /// MLM logits `[n, vocab]` for only the rows `positions` (flat indices into
    /// `batch * seq`) of `hidden` `[batch, seq, hidden]`: the vocabulary projection, the
    /// step's largest matmul, is then done for masked tokens alone.
    pub fn mlm_logits_at(&self, hidden: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let (b, s, h) = hidden.dims3()?;
        let rows = hidden.reshape((b * s, h))?.index_select(positions, 0)?;
        self.mlm_logits(&rows)
    }

    /// The pooler's output (`tanh(W·h[CLS] + b)`), `[batch, hidden]`.
    pub fn pooled(&self, hidden: &Tensor) -> Result<Tensor> {
        let pooler = self.pooler.as_ref().context("this model has no pooler")?;
        let cls = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        Ok(pooler.forward_in(&cls, self.compute)?.tanh()?)
    }

    /// NSP / SOP logits `[batch, 2]` from the pooled output.
    pub fn seq_relationship_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let head = self
            .seq_relationship
            .as_ref()
            .context("this model has no next-sentence / sentence-order head")?;
        head.forward_in(&self.pooled(hidden)?, self.compute)
    }

    /// Mean of the hidden states over real tokens: sentence-transformers' mean pooling.
    pub fn mean_pool(hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let m = attention_mask
            .to_dtype(hidden.dtype())?
            .unsqueeze(D::Minus1)?;
        let sum = hidden.broadcast_mul(&m)?.sum(1)?;
        let count = m.sum(1)?.clamp(1e-9, f64::MAX)?;
        Ok(sum.broadcast_div(&count)?)
    }
}
