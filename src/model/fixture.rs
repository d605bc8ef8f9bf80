//! Random Llama models in the Hugging Face layout, generated from a seed, for tests and benches.
//!
//! The same seed and shape always give the same bytes: weights come from the project's own
//! [`Rng`] and safetensors orders its header deterministically.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::config::{LlamaConfig, TokenIds};
use crate::model::llama::Llama;
use crate::rng::Rng;

/// The shape of a generated model; `Default` keeps a test step well under a second.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FixtureSpec {
    /// Residual width.
    pub hidden: usize,
    /// MLP width.
    pub intermediate: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Longest position.
    pub max_positions: usize,
    /// Whether lm_head is tied to the embedding.
    pub tied: bool,
    /// RoPE base.
    pub rope_theta: f64,
    /// Storage dtype of the written file (f32, bf16 or f16).
    pub dtype: FixtureDtype,
}

/// The storage dtype of a generated model file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FixtureDtype {
    /// 32-bit float.
    F32,
    /// bfloat16, as most hub checkpoints are stored.
    Bf16,
    /// IEEE half.
    F16,
}

impl FixtureDtype {
    fn dtype(self) -> DType {
        match self {
            FixtureDtype::F32 => DType::F32,
            FixtureDtype::Bf16 => DType::BF16,
            FixtureDtype::F16 => DType::F16,
        }
    }
}

impl Default for FixtureSpec {
    fn default() -> Self {
        Self {
            hidden: 64,
            intermediate: 160,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            vocab: 512,
            max_positions: 256,
            tied: false,
            rope_theta: 10000.0,
            dtype: FixtureDtype::F32,
        }
    }
}

impl FixtureSpec {
    /// The benchmark "tiny" shape: hidden 256, 4 layers, 8/2 heads, intermediate 688, vocab 32000.
    pub fn tiny_bench() -> Self {
        Self {
            hidden: 256,
            intermediate: 688,
            layers: 4,
            heads: 8,
            kv_heads: 2,
            vocab: 32000,
            max_positions: 2048,
            ..Self::default()
        }
    }

    /// SmolLM2-135M's shape: hidden 576, 30 layers, 9/3 heads, intermediate 1536, vocab 49152,
    /// tied embeddings, RoPE base 100000.
    pub fn smollm2_135m() -> Self {
        Self {
            hidden: 576,
            intermediate: 1536,
            layers: 30,
            heads: 9,
            kv_heads: 3,
            vocab: 49152,
            max_positions: 8192,
            tied: true,
            rope_theta: 100_000.0,
            ..Self::default()
        }
    }

    /// TinyLlama-1.1B-Chat's shape: hidden 2048, 22 layers, 32/4 heads, intermediate 5632,
    /// vocab 32000, untied, RoPE base 10000.
    pub fn tinyllama_1_1b() -> Self {
        Self {
            hidden: 2048,
            intermediate: 5632,
            layers: 22,
            heads: 32,
            kv_heads: 4,
            vocab: 32000,
            max_positions: 2048,
            ..Self::default()
        }
    }

    /// The config.json this spec describes.
    pub fn config(&self) -> LlamaConfig {
        LlamaConfig {
            hidden_size: self.hidden,
            intermediate_size: self.intermediate,
            num_hidden_layers: self.layers,
            num_attention_heads: self.heads,
            num_key_value_heads: Some(self.kv_heads),
            head_dim: None,
            rope_theta: Some(self.rope_theta),
            rope_parameters: None,
            rope_scaling: None,
            rms_norm_eps: 1e-5,
            vocab_size: self.vocab,
            tie_word_embeddings: self.tied,
            max_position_embeddings: self.max_positions,
            bos_token_id: Some(TokenIds::One(1)),
            eos_token_id: Some(TokenIds::One(2)),
            pad_token_id: None,
            hidden_act: "silu".into(),
            attention_bias: false,
            mlp_bias: false,
            torch_dtype: Some(match self.dtype {
                FixtureDtype::F32 => "float32".into(),
                FixtureDtype::Bf16 => "bfloat16".into(),
                FixtureDtype::F16 => "float16".into(),
            }),
            model_type: Some("llama".into()),
            architectures: Some(vec!["LlamaForCausalLM".into()]),
            name_or_path: None,
        }
    }

    /// Generates the weights: linears N(0, 0.02²) as transformers initialises them,
    /// embeddings and lm_head N(0, max(0.02, 1/√h)²); norm weights 1 + N(0, 0.1²) so that the norms' scale matters in every test.
    pub fn tensors(&self, seed: u64) -> Result<Vec<(String, Tensor)>> {
        let cfg = self.config();
        let shape = cfg.shape().map_err(Error::Invalid)?;
        let mut rng = Rng::derive(seed, "fixture-weights");
        let vector_std = (1.0 / (self.hidden as f64).sqrt()).max(0.02);
        shape
            .tensor_specs()
            .into_iter()
            .map(|(name, dims)| {
                let n: usize = dims.iter().product();
                // Embeddings and lm_head get std max(0.02, 1/sqrt(h)): with a tiny hidden size,
                // 0.02 would cap the logits' range (the final norm fixes |h|) so that no adapter
                // could ever lower the loss much below ln(vocab).
                let std = if name.contains("embed_tokens") || name.starts_with("lm_head") {
                    vector_std
                } else {
                    0.02
                };
                let vals: Vec<f32> = if dims.len() == 1 {
                    (0..n).map(|_| (1.0 + 0.1 * rng.normal()) as f32).collect()
                } else {
                    (0..n).map(|_| (std * rng.normal()) as f32).collect()
                };
                let t = Tensor::from_vec(vals, dims, &Device::Cpu)?.to_dtype(self.dtype.dtype())?;
                Ok((name, t))
            })
            .collect()
    }

    /// Builds the model in memory (no files) in `dtype` on `dev`.
    pub fn build(&self, seed: u64, dtype: DType, dev: &Device) -> Result<Llama> {
        let shape = self.config().shape().map_err(Error::Invalid)?;
        let mut tensors: HashMap<String, Tensor> = self.tensors(seed)?.into_iter().collect();
        Llama::from_tensors(shape, |name, _| {
            let t = tensors
                .remove(name)
                .expect("tensors() lists every tensor of the shape");
            Ok(t.to_dtype(dtype)?.to_device(dev)?)
        })
    }

    /// Writes `config.json` and `model.safetensors` into `dir` (created if needed).
    pub fn write(&self, seed: u64, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let cfg_path = dir.join("config.json");
        let json = serde_json::to_string_pretty(&self.config())
            .map_err(|e| Error::Invalid(e.to_string()))?;
        crate::output::write(&cfg_path, (json + "\n").as_bytes())?;
        let tensors: HashMap<String, Tensor> = self.tensors(seed)?.into_iter().collect();
        let st = crate::output::Staged::file(&dir.join("model.safetensors"))?;
        candle_core::safetensors::save(&tensors, st.path())?;
        st.commit()
    }
}

/// The benchmark shapes, each with the batch and sequence length of one step: what `lorasft
/// bench` times and what `fixture:SHAPE:SEED` builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BenchShape {
    /// hidden 256, 4 layers, 8/2 heads, intermediate 688, vocab 32000, untied; batch 4 × 128.
    Tiny,
    /// SmolLM2-135M (hidden 576, 30 layers, 9/3 heads, vocab 49152, tied); batch 1 × 256.
    Smollm2,
    /// TinyLlama-1.1B-Chat (hidden 2048, 22 layers, 32/4 heads, vocab 32000); batch 4 × 512.
    Tinyllama,
}

impl BenchShape {
    /// Every shape.
    pub const ALL: [BenchShape; 3] = [BenchShape::Tiny, BenchShape::Smollm2, BenchShape::Tinyllama];

    /// The model shape.
    pub fn spec(self) -> FixtureSpec {
        match self {
            BenchShape::Tiny => FixtureSpec::tiny_bench(),
            BenchShape::Smollm2 => FixtureSpec::smollm2_135m(),
            BenchShape::Tinyllama => FixtureSpec::tinyllama_1_1b(),
        }
    }

    /// (batch, sequence length) of one step.
    pub fn batch_seq(self) -> (usize, usize) {
        match self {
            BenchShape::Tiny => (4, 128),
            BenchShape::Smollm2 => (1, 256),
            BenchShape::Tinyllama => (4, 512),
        }
    }

    /// The name used on the command line and in tables.
    pub fn name(self) -> &'static str {
        match self {
            BenchShape::Tiny => "tiny",
            BenchShape::Smollm2 => "smollm2-135m",
            BenchShape::Tinyllama => "tinyllama-1.1b",
        }
    }
}
