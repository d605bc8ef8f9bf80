//! The Llama forward written for training: logits at every position, a causal + padding mask
//! with a finite mask value, grouped-query attention, RoPE in the Hugging Face layout, RMSNorm,
//! SwiGLU, tied or untied lm_head. Dimension letters: `b` batch, `s` sequence, `h` hidden,
//! `nh`/`nkv` query/kv heads, `d` head dim, `v` vocab.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};

use crate::data::batch::Batch;

use crate::device::master_dtype;
use crate::error::{Error, Result};
use crate::model::config::{ModelShape, Projection};
use crate::model::cpu::attention::Mask;
use crate::model::lora::{Frozen, Linear, LoraAdapter, LoraConfig, Mode};
use crate::model::loss::{LossSum, lm_head_loss_sum};
use crate::model::ops::{attention, frozen_product, rms_norm, swiglu, to_heads};
use crate::model::recompute::recompute;
use crate::model::visibility::KeyRanges;
use crate::rng::Rng;

/// One decoder layer's weights.
#[derive(Debug, Clone)]
pub struct Layer {
    input_norm: Tensor,
    post_norm: Tensor,
    /// The seven linears, indexed in [`Projection::ALL`] order.
    proj: Vec<Linear>,
}

impl Layer {
    fn proj(&self, p: Projection) -> &Linear {
        &self.proj[p as usize]
    }

    /// The layer's adapter tensors, A before B, in [`Projection::ALL`] order.
    fn lora_vars(&self) -> Vec<Var> {
        self.proj
            .iter()
            .filter_map(Linear::lora)
            .flat_map(|l| [l.a.clone(), l.b.clone()])
            .collect()
    }
}

/// A Llama model: frozen base tensors plus optional LoRA adapters (its only `Var`s).
#[derive(Debug, Clone)]
pub struct Llama {
    shape: ModelShape,
    /// The token embedding (v, h), dense or kept quantized.
    embed: Frozen,
    layers: Vec<Layer>,
    norm: Tensor,
    /// The output projection (v, h) when untied, dense or kept quantized.
    lm_head: Option<Frozen>,
    /// RoPE tables for every position up to `max_positions`, (max_pos, d).
    cos: Tensor,
    sin: Tensor,
    lora: Option<LoraConfig>,
    /// Training forwards recompute each layer's intermediates in the backward instead of
    /// keeping them (`train.gradient_checkpointing`).
    recompute: bool,
}

pub use crate::model::visibility::mask_value;

/// The attention mask on the host as 0/1 rows, all ones when absent; checks its shape.
fn host_mask(attention_mask: Option<&Tensor>, b: usize, s: usize) -> Result<Vec<Vec<u32>>> {
    let keep: Vec<Vec<u32>> = match attention_mask {
        Some(m) => m.to_dtype(DType::U32)?.to_vec2::<u32>()?,
        None => vec![vec![1; s]; b],
    };
    if keep.len() != b || keep.iter().any(|r| r.len() != s) {
        return Err(Error::Invalid(format!("attention_mask must be ({b}, {s})")));
    }
    Ok(keep)
}

/// The causal + padding bias (b, 1, s, s): 0 where query i may attend key j (j <= i and key j
/// is a real token), the mask value elsewhere. Built once per batch on the host.
pub fn attention_bias(keep: &[Vec<u32>], dtype: DType, dev: &Device) -> Result<Tensor> {
    let (b, s) = (keep.len(), keep.first().map_or(0, Vec::len));
    let neg = mask_value(dtype);
    let mut bias = vec![0f64; b * s * s];
    for (bi, row) in keep.iter().enumerate() {
        for i in 0..s {
            for (j, &k) in row.iter().enumerate() {
                if j > i || k == 0 {
                    bias[(bi * s + i) * s + j] = neg;
                }
            }
        }
    }
    Ok(Tensor::from_vec(bias, (b, 1, s, s), dev)?.to_dtype(dtype)?)
}

/// Position of each token: its index minus the row's left padding (so real tokens are numbered
/// from 0 whatever the padding side; with right padding this is transformers' `arange`).
/// Left-padding slots get position 0. `None` when every row starts with a real token.
pub fn position_ids(keep: &[Vec<u32>]) -> Option<Vec<u32>> {
    let offsets: Vec<usize> = keep
        .iter()
        .map(|r| r.iter().position(|&k| k != 0).unwrap_or(r.len()))
        .collect();
    if offsets.iter().all(|&o| o == 0) {
        return None;
    }
    Some(
        keep.iter()
            .zip(&offsets)
            .flat_map(|(r, &o)| (0..r.len()).map(move |t| t.saturating_sub(o) as u32))
            .collect(),
    )
}

/// RoPE cos/sin tables (max_pos, d) as transformers computes them (in f32 unless the model
/// runs in f64): inv_freq_i = theta^(-2i/d), angle = pos * inv_freq, tables = cat(angle, angle).
pub fn rope_tables(shape: &ModelShape, dtype: DType, dev: &Device) -> Result<(Tensor, Tensor)> {
    let d = shape.head_dim;
    let n = shape.max_positions;
    let (cos, sin): (Vec<f64>, Vec<f64>) = if dtype == DType::F64 {
        let inv: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / shape.rope_theta.powf((2 * i) as f64 / d as f64))
            .collect();
        (0..n)
            .flat_map(|p| (0..d).map(move |j| (p, j)))
            .map(|(p, j)| {
                let a = p as f64 * inv[j % (d / 2)];
                (a.cos(), a.sin())
            })
            .unzip()
    } else {
        let inv: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / (shape.rope_theta as f32).powf((2 * i) as f32 / d as f32))
            .collect();
        (0..n)
            .flat_map(|p| (0..d).map(move |j| (p, j)))
            .map(|(p, j)| {
                let a = p as f32 * inv[j % (d / 2)];
                (f64::from(a.cos()), f64::from(a.sin()))
            })
            .unzip()
    };
    let cos = Tensor::from_vec(cos, (n, d), dev)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (n, d), dev)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

impl Llama {
    /// Builds the model from base tensors fetched by name; `get(name, expected_shape)` must
    /// return a tensor of that shape in the model's dtype and device.
    pub fn from_tensors(
        shape: ModelShape,
        mut get: impl FnMut(&str, &[usize]) -> Result<Tensor>,
    ) -> Result<Self> {
        Self::from_frozen(shape, |name, dims| get(name, dims).map(Frozen::Dense))
    }

    /// [`Llama::from_tensors`] with the weights given as [`Frozen`]: the seven projections,
    /// the embedding and lm_head may be kept quantized; the norms must be dense.
    pub fn from_frozen(
        shape: ModelShape,
        mut get: impl FnMut(&str, &[usize]) -> Result<Frozen>,
    ) -> Result<Self> {
        let specs = shape.tensor_specs();
        let mut it = specs.iter();
        let mut next_frozen = || -> Result<Frozen> {
            let (name, dims) = it.next().expect("tensor_specs lists every tensor");
            get(name, dims)
        };
        let dense = |f: Frozen| match f {
            Frozen::Dense(t) => Ok(t),
            Frozen::Quant(q) => Err(Error::Invalid(format!("norms must be dense, got {q:?}"))),
        };
        let embed = next_frozen()?;
        let mut layers = Vec::with_capacity(shape.layers);
        for _ in 0..shape.layers {
            let input_norm = next_frozen().and_then(dense)?;
            let proj = (0..Projection::ALL.len())
                .map(|_| next_frozen().map(Linear::from_frozen))
                .collect::<Result<Vec<_>>>()?;
            let post_norm = next_frozen().and_then(dense)?;
            layers.push(Layer {
                input_norm,
                post_norm,
                proj,
            });
        }
        let norm = next_frozen().and_then(dense)?;
        let lm_head = if shape.tied {
            None
        } else {
            Some(next_frozen()?)
        };
        let (cos, sin) = rope_tables(&shape, norm.dtype(), norm.device())?;
        Ok(Self {
            shape,
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            lora: None,
            recompute: false,
        })
    }

    /// Turns activation recomputation on or off for training forwards
    /// (`train.gradient_checkpointing`): results are unchanged, the step's memory falls to
    /// about one layer's intermediates, and each step runs the forward twice.
    pub fn set_recompute(&mut self, on: bool) {
        self.recompute = on;
    }

    /// How the frozen base is held in memory, for manifests and reports: the dtype of its
    /// dense tensors and, with `model.keep_quantized`, the GGUF types of the projections.
    pub fn base_format(&self) -> String {
        let dtype = format!("{:?}", self.dtype()).to_uppercase();
        let name = |w: &Frozen| match w {
            Frozen::Quant(q) => Some(crate::gguf::tensor::ggml_name(q.dtype())),
            Frozen::Dense(_) => None,
        };
        let mut proj = std::collections::BTreeMap::<&str, usize>::new();
        for p in self.layers.iter().flat_map(|l| &l.proj) {
            if let Some(t) = name(p.weight()) {
                *proj.entry(t).or_default() += 1;
            }
        }
        let mut kept = Vec::new();
        if !proj.is_empty() {
            let types: Vec<String> = proj.iter().map(|(t, n)| format!("{t} × {n}")).collect();
            kept.push(format!("projections {}", types.join(", ")));
        }
        kept.extend(name(&self.embed).map(|t| format!("embedding {t}")));
        kept.extend(
            self.lm_head
                .as_ref()
                .and_then(name)
                .map(|t| format!("lm_head {t}")),
        );
        if kept.is_empty() {
            return format!("{dtype}, every tensor dense");
        }
        format!(
            "kept quantized ({}), dequantized block by block inside each product; the rest {dtype}",
            kept.join("; ")
        )
    }

    /// The model's validated shape.
    pub fn shape(&self) -> &ModelShape {
        &self.shape
    }

    /// The dtype of the base weights and activations.
    pub fn dtype(&self) -> DType {
        self.norm.dtype()
    }

    /// The device the model lives on.
    pub fn device(&self) -> &Device {
        self.norm.device()
    }

    /// The LoRA config in use, if adapters are attached.
    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.lora.as_ref()
    }

    /// Every frozen base weight as it is held (dense, or kept quantized) with its checkpoint
    /// name, in checkpoint order: what fingerprints hash and gradient checks look for.
    pub fn base_weights(&self) -> Vec<(String, Frozen)> {
        self.named(|f| Ok(f.clone()), |p| Ok(p.weight().clone()))
            .expect("cloning cannot fail")
    }

    /// Every base tensor dense (kept-quantized weights dequantized) with its checkpoint name.
    pub fn base_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        self.named(Frozen::dense, |p| p.weight().dense())
    }

    /// Every weight as the forward sees it, with adapters folded in (`W + B A s` for adapted
    /// linears), under checkpoint names: what `lorasft merge` exports.
    pub fn merged_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        self.named(Frozen::dense, Linear::effective_weight)
    }

    /// The base walked in checkpoint order: `frozen` maps the embedding, norms and lm_head,
    /// `proj` each layer's seven linears; each result is named as in checkpoints.
    fn named<T>(
        &self,
        frozen: impl Fn(&Frozen) -> Result<T>,
        proj: impl Fn(&Linear) -> Result<T>,
    ) -> Result<Vec<(String, T)>> {
        let dense = |t: &Tensor| frozen(&Frozen::Dense(t.clone()));
        let mut out = vec![frozen(&self.embed)?];
        for l in &self.layers {
            out.push(dense(&l.input_norm)?);
            for p in &l.proj {
                out.push(proj(p)?);
            }
            out.push(dense(&l.post_norm)?);
        }
        out.push(dense(&self.norm)?);
        if let Some(h) = &self.lm_head {
            out.push(frozen(h)?);
        }
        let names = self.shape.tensor_specs().into_iter().map(|(n, _)| n);
        Ok(names.zip(out).collect())
    }

    /// Attaches fresh adapters (PEFT's init, drawn from `seed`) to every target module, in the
    /// master dtype (f32; f64 for an f64 model) whatever the base's precision.
    pub fn add_lora(&mut self, cfg: &LoraConfig, seed: u64) -> Result<()> {
        cfg.validate()?;
        let mut rng = Rng::derive(seed, "lora-init");
        let (dtype, dev) = (master_dtype(self.dtype()), self.device().clone());
        for layer in &mut self.layers {
            for p in Projection::ALL {
                let adapter = if cfg.targets.contains(&p) {
                    let (out_f, in_f) = p.dims(&self.shape);
                    Some(LoraAdapter::init(cfg, out_f, in_f, &mut rng, dtype, &dev)?)
                } else {
                    None
                };
                layer.proj[p as usize].set_lora(adapter);
            }
        }
        self.lora = Some(cfg.clone());
        Ok(())
    }

    /// Removes every adapter, leaving the base model.
    pub fn remove_lora(&mut self) {
        for layer in &mut self.layers {
            for p in &mut layer.proj {
                p.set_lora(None);
            }
        }
        self.lora = None;
    }

    /// How many values of the seeded generator one training forward of `tokens` positions
    /// draws for its dropout masks: one per input element of every adapter with dropout, on
    /// the CPU (an accelerator draws its masks on the device, none from the generator). The
    /// trainer jumps the dropout stream by this much per micro-batch, so any rank or thread can
    /// start a micro-batch's masks where one serial run would.
    pub fn dropout_draws(&self, tokens: usize) -> u64 {
        if !self.device().is_cpu() {
            return 0;
        }
        let per_token: u64 = self
            .layers
            .iter()
            .flat_map(|l| l.proj.iter())
            .filter_map(Linear::lora)
            .filter(|l| l.dropout > 0.0)
            .map(|l| l.a.dims()[1] as u64)
            .sum();
        per_token * tokens as u64
    }

    /// Every adapter tensor with its PEFT name
    /// (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`), A before B.
    pub fn lora_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            for p in Projection::ALL {
                if let Some(l) = layer.proj(p).lora() {
                    let prefix = format!(
                        "base_model.model.model.layers.{i}.{}.{}",
                        p.parent(),
                        p.name()
                    );
                    out.push((format!("{prefix}.lora_A.weight"), l.a.clone()));
                    out.push((format!("{prefix}.lora_B.weight"), l.b.clone()));
                }
            }
        }
        out
    }

    /// The adapted linear of layer `i`, for checks that need the module itself.
    pub fn linear(&self, layer: usize, p: Projection) -> Option<&Linear> {
        self.layers.get(layer).map(|l| l.proj(p))
    }

    /// Folds every adapter into its weight (the original weights are kept for unmerge).
    pub fn merge_lora(&mut self) -> Result<()> {
        for layer in &mut self.layers {
            for p in &mut layer.proj {
                p.merge()?;
            }
        }
        Ok(())
    }

    /// Undoes [`Llama::merge_lora`], restoring the exact base weights.
    pub fn unmerge_lora(&mut self) {
        for layer in &mut self.layers {
            for p in &mut layer.proj {
                p.unmerge();
            }
        }
    }

    /// Parameters that training updates (the adapters).
    pub fn trainable_params(&self) -> u64 {
        self.lora_vars()
            .iter()
            .map(|(_, v)| v.elem_count() as u64)
            .sum()
    }

    /// All parameters, base and adapters, as PEFT counts them.
    pub fn all_params(&self) -> u64 {
        self.shape.base_params() + self.trainable_params()
    }

    /// Logits (b, s, v) for token ids (b, s) and an optional attention mask (b, s) of 0/1.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        mode: &mut Mode<'_>,
    ) -> Result<Tensor> {
        let hidden = self.hidden_states(input_ids, attention_mask, mode)?;
        Ok(frozen_product(&hidden, self.lm_head())?)
    }

    /// The output projection (v, h): lm_head, or the embedding when they are tied.
    pub fn lm_head(&self) -> &Frozen {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Summed next-token loss of a batch against `labels` (b, s) (-100 = ignored), through the
    /// fused chunked lm_head + cross-entropy: the training and evaluation path, which never
    /// holds the (b, s, v) logits.
    pub fn loss_sum(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        labels: &Tensor,
        mode: &mut Mode<'_>,
    ) -> Result<LossSum> {
        let hidden = self.hidden_states(input_ids, attention_mask, mode)?;
        lm_head_loss_sum(&hidden, self.lm_head(), labels)
    }

    /// Summed next-token loss of a prepared batch: padded rows under their attention mask,
    /// packed rows block-diagonally with positions restarting per example.
    pub fn batch_loss_sum(&self, batch: &Batch, mode: &mut Mode<'_>) -> Result<LossSum> {
        let hidden = match &batch.segments {
            None => self.hidden_states(&batch.input_ids, Some(&batch.attention_mask), mode)?,
            Some(segments) => self.hidden_states_packed(&batch.input_ids, segments, mode)?,
        };
        lm_head_loss_sum(&hidden, self.lm_head(), &batch.labels)
    }

    /// Logits (b, s, v) of packed rows: `segments` gives each row's example lengths from
    /// position 0. Each example attends to itself alone and its positions start at 0, so its
    /// logits are those of the example run on its own.
    pub fn forward_packed(
        &self,
        input_ids: &Tensor,
        segments: &[Vec<usize>],
        mode: &mut Mode<'_>,
    ) -> Result<Tensor> {
        let hidden = self.hidden_states_packed(input_ids, segments, mode)?;
        Ok(frozen_product(&hidden, self.lm_head())?)
    }

    /// The final normed hidden states (b, s, h), before lm_head.
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        mode: &mut Mode<'_>,
    ) -> Result<Tensor> {
        let (b, s) = self.check_ids(input_ids)?;
        let keep = host_mask(attention_mask, b, s)?;
        let (mask, positions) = match KeyRanges::right_padded(&keep) {
            // Causal over right-padded rows: key ranges, no dense mask, positions = indices.
            Some(ranges) => (self.mask_of(ranges)?, None),
            None => {
                let bias = attention_bias(&keep, master_dtype(self.dtype()), self.device())?;
                (Mask::Bias(bias), position_ids(&keep))
            }
        };
        self.layers_forward(input_ids, mask, positions, mode)
    }

    /// [`Llama::hidden_states`] of packed rows (see [`Llama::forward_packed`]).
    pub fn hidden_states_packed(
        &self,
        input_ids: &Tensor,
        segments: &[Vec<usize>],
        mode: &mut Mode<'_>,
    ) -> Result<Tensor> {
        let (b, s) = self.check_ids(input_ids)?;
        if segments.len() != b {
            return Err(Error::Invalid(format!(
                "{} rows of segments for a batch of {b}",
                segments.len()
            )));
        }
        let ranges = KeyRanges::packed(segments, s)?;
        let positions = ranges.positions();
        let mask = self.mask_of(ranges)?;
        self.layers_forward(input_ids, mask, positions, mode)
    }

    /// Key ranges as the attention takes them: as they are for the fused CPU f32 op, as the
    /// dense bias they stand for (built once per forward) for the composed path.
    fn mask_of(&self, ranges: KeyRanges) -> Result<Mask> {
        if self.device().is_cpu() && self.dtype() == DType::F32 {
            return Ok(Mask::Ranges(Arc::new(ranges)));
        }
        let dtype = master_dtype(self.dtype());
        Ok(Mask::Bias(ranges.to_bias(
            mask_value(dtype),
            dtype,
            self.device(),
        )?))
    }

    /// (b, s) of token ids that fit the model's positions and vocabulary.
    fn check_ids(&self, input_ids: &Tensor) -> Result<(usize, usize)> {
        let (b, s) = input_ids.dims2()?;
        if s == 0 || s > self.shape.max_positions {
            return Err(Error::Invalid(format!(
                "sequence length {s} must be in 1..={} (max_position_embeddings)",
                self.shape.max_positions
            )));
        }
        let max_id = input_ids
            .to_dtype(DType::U32)?
            .max_all()?
            .to_scalar::<u32>()? as usize;
        if max_id >= self.shape.vocab {
            return Err(Error::Invalid(format!(
                "token id {max_id} is outside the vocabulary of {}",
                self.shape.vocab
            )));
        }
        Ok((b, s))
    }

    /// Embedding, every layer under `mask`, and the final norm; `positions` (b * s) gives each
    /// token's RoPE position when it is not its index.
    fn layers_forward(
        &self,
        input_ids: &Tensor,
        mask: Mask,
        positions: Option<Vec<u32>>,
        mode: &mut Mode<'_>,
    ) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        let (cos, sin) = match positions {
            // (s, d), broadcast over batch and heads
            None => (self.cos.narrow(0, 0, s)?, self.sin.narrow(0, 0, s)?),
            // (b, 1, s, d): per-row positions (left padding, packed rows)
            Some(pos) => {
                let pos = Tensor::from_vec(pos, b * s, self.device())?;
                let d = self.shape.head_dim;
                (
                    self.cos.index_select(&pos, 0)?.reshape((b, 1, s, d))?,
                    self.sin.index_select(&pos, 0)?.reshape((b, 1, s, d))?,
                )
            }
        };
        let ids = input_ids.to_dtype(DType::U32)?;
        let mut x = self
            .embed
            .rows(&ids.flatten_all()?, self.dtype(), self.device())?
            .reshape((b, s, self.shape.hidden))?; // (b, s, h)
        let ctx = AttnInputs { mask, cos, sin };
        for layer in &self.layers {
            x = if self.recompute && mode.is_training() {
                let (shape, l, c) = (self.shape.clone(), layer.clone(), ctx.clone());
                recompute(&x, layer.lora_vars(), mode, move |x, mode| {
                    decoder_layer(&shape, &l, x, &c, mode, None)
                })?
            } else {
                decoder_layer(&self.shape, layer, &x, &ctx, mode, None)?
            };
        }
        Ok(rms_norm(&x, &self.norm, self.shape.rms_norm_eps)?)
    }

    /// Logits (1, v) of the last position for new tokens (1, n), extending `cache`; the
    /// inference path of generation (no dropout, batch 1).
    pub fn forward_cached(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let (b, n) = input_ids.dims2()?;
        let past = cache.len;
        if b != 1 || n == 0 || past + n > self.shape.max_positions {
            return Err(Error::Invalid(format!(
                "cached forward takes (1, n) with n > 0 and {past} + n <= {} positions, got ({b}, {n})",
                self.shape.max_positions
            )));
        }
        if cache.layers.len() != self.layers.len() {
            cache.layers = vec![None; self.layers.len()];
        }
        let ids = input_ids.to_dtype(DType::U32)?;
        let neg = mask_value(self.dtype());
        let bias: Vec<f64> = (0..n)
            .flat_map(|i| (0..past + n).map(move |j| if j <= past + i { 0.0 } else { neg }))
            .collect();
        let bias = Tensor::from_vec(bias, (1, 1, n, past + n), self.device())?
            .to_dtype(master_dtype(self.dtype()))?;
        let cos = self.cos.narrow(0, past, n)?;
        let sin = self.sin.narrow(0, past, n)?;
        let mut x = self
            .embed
            .rows(&ids.flatten_all()?, self.dtype(), self.device())?
            .reshape((1, n, self.shape.hidden))?;
        let ctx = AttnInputs {
            mask: Mask::Bias(bias),
            cos,
            sin,
        };
        for (layer, slot) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = decoder_layer(&self.shape, layer, &x, &ctx, &mut Mode::Eval, Some(slot))?;
        }
        cache.len += n;
        let last = rms_norm(&x.narrow(1, n - 1, 1)?, &self.norm, self.shape.rms_norm_eps)?;
        Ok(frozen_product(&last, self.lm_head())?.reshape((1, self.shape.vocab))?)
    }
}

/// What every layer's attention shares in one forward: the mask and the RoPE tables.
#[derive(Clone)]
struct AttnInputs {
    /// Key ranges, or a (b or 1, 1, s, t) additive bias.
    mask: Mask,
    /// (s, d) or (b, 1, s, d).
    cos: Tensor,
    /// Same shape as `cos`.
    sin: Tensor,
}

/// Keys and values of the positions seen so far, per layer, for incremental decoding.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One decoder layer: attention and MLP, each behind its norm and residual. `kv` extends and
/// returns the layer's cache in generation.
fn decoder_layer(
    shape: &ModelShape,
    l: &Layer,
    x: &Tensor,
    ctx: &AttnInputs,
    mode: &mut Mode<'_>,
    kv: Option<&mut Option<(Tensor, Tensor)>>,
) -> Result<Tensor> {
    let AttnInputs { mask, cos, sin } = ctx;
    let ModelShape {
        heads: nh,
        kv_heads: nkv,
        head_dim: d,
        rms_norm_eps: eps,
        ..
    } = *shape;
    let hn = rms_norm(x, &l.input_norm, eps)?; // (b, s, h)
    let q = l.proj(Projection::QProj).forward(&hn, mode)?; // (b, s, nh*d)
    let k = l.proj(Projection::KProj).forward(&hn, mode)?; // (b, s, nkv*d)
    let v = l.proj(Projection::VProj).forward(&hn, mode)?; // (b, s, nkv*d)
    let q = to_heads(&q, nh, Some((cos, sin)))?; // (b, nh, s, d), rotated
    let k = to_heads(&k, nkv, Some((cos, sin)))?; // (b, nkv, s, d), rotated
    let v = to_heads(&v, nkv, None)?; // (b, nkv, s, d)
    // With a KV cache (generation), keys and values of earlier positions come first.
    let (k, v) = match kv {
        None => (k, v),
        Some(slot) => {
            let (k, v) = match slot.take() {
                Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                None => (k, v),
            };
            *slot = Some((k.clone(), v.clone()));
            (k, v)
        }
    };
    // Keys: t = s in training, cached + s in generation.
    let o = attention(&q, &k, &v, mask, 1.0 / (d as f64).sqrt())?; // (b, s, nh*d)
    let x = (x + l.proj(Projection::OProj).forward(&o, mode)?)?;

    let hn = rms_norm(&x, &l.post_norm, eps)?;
    let gate = l.proj(Projection::GateProj).forward(&hn, mode)?; // (b, s, i)
    let up = l.proj(Projection::UpProj).forward(&hn, mode)?; // (b, s, i)
    let m = swiglu(&gate, &up)?;
    Ok((x + l.proj(Projection::DownProj).forward(&m, mode)?)?)
}
