//! `config.json` of a Hugging Face Llama-family model: parsing, validation and parameter counts.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One token id or several (transformers allows a list for `eos_token_id`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// Several ids, any of which ends generation.
    Many(Vec<u32>),
}

impl TokenIds {
    /// All ids as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// The `rope_parameters` block transformers 5.x writes instead of a top-level `rope_theta`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    /// Base of the rotary frequencies.
    pub rope_theta: Option<f64>,
    /// "default" is the only type implemented.
    pub rope_type: Option<String>,
}

/// The fields of a Llama `config.json` that the forward depends on, as written in the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Width of the residual stream (`h`).
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads (`nh`).
    pub num_attention_heads: usize,
    /// Number of key/value heads (`nkv`); defaults to `nh` (no grouping) as in transformers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to `hidden_size / num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// RoPE base at the top level (transformers 4.x).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// RoPE parameters (transformers 5.x).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    /// Long-context RoPE scaling: not implemented, so it must be absent or null.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f64,
    /// Vocabulary size (`v`).
    pub vocab_size: usize,
    /// Whether lm_head reuses the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Longest position the model was trained for.
    pub max_position_embeddings: usize,
    /// Beginning-of-sequence token id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<TokenIds>,
    /// End-of-sequence token id(s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    /// Padding token id, when the model defines one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<u32>,
    /// Activation of the MLP; only "silu" is implemented.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Bias on attention projections; only `false` is implemented.
    #[serde(default)]
    pub attention_bias: bool,
    /// Bias on MLP projections; only `false` is implemented.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Storage dtype the checkpoint was saved in (informational).
    #[serde(default, alias = "dtype", skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    /// Model type; "llama" or a Llama-compatible family ("mistral" without sliding window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
    /// Architectures list, written for transformers' auto classes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    /// transformers' `_name_or_path`: the hub id the model came from, when known. Names the
    /// base model in adapters and reports instead of a local path.
    #[serde(
        default,
        rename = "_name_or_path",
        skip_serializing_if = "Option::is_none"
    )]
    pub name_or_path: Option<String>,
}

fn default_act() -> String {
    "silu".to_string()
}

/// A validated config: every derived size is computed once and the odd cases are rejected.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelShape {
    /// Width of the residual stream (`h`).
    pub hidden: usize,
    /// Width of the MLP.
    pub intermediate: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Query heads (`nh`).
    pub heads: usize,
    /// Key/value heads (`nkv`).
    pub kv_heads: usize,
    /// Per-head width (`d`).
    pub head_dim: usize,
    /// Vocabulary size (`v`).
    pub vocab: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Whether lm_head is the embedding matrix.
    pub tied: bool,
    /// Longest supported position.
    pub max_positions: usize,
}

/// The most decoder layers a config may ask for (`num_hidden_layers`).
pub const MAX_LAYERS: usize = 4096;
/// The longest context a config may ask for (`max_position_embeddings`): 2^24 positions.
pub const MAX_POSITIONS: usize = 1 << 24;
/// The most bytes the f32 base parameters, or the f32 RoPE tables, may take: 2^40 (1 TiB).
/// Anything larger is refused at load, before any allocation, rather than aborting on one.
pub const MAX_BYTES: u64 = 1 << 40;

impl LlamaConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::input::read_text(path, crate::input::CONFIG_CEILING, "a config.json")?;
        let cfg: LlamaConfig = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        cfg.shape().map_err(|msg| Error::Config {
            path: path.to_path_buf(),
            msg,
        })?;
        Ok(cfg)
    }

    /// The RoPE base from either place transformers writes it; `None` if neither holds it.
    pub fn rope_theta(&self) -> Option<f64> {
        self.rope_theta
            .or_else(|| self.rope_parameters.as_ref().and_then(|p| p.rope_theta))
    }

    /// Refuses zero sizes and sizes whose products do not fit in memory ([`MAX_LAYERS`],
    /// [`MAX_POSITIONS`], [`MAX_BYTES`]); every product is computed with checked arithmetic.
    fn check_sizes(
        &self,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> std::result::Result<(), String> {
        for (name, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        for (name, v, max) in [
            ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                MAX_POSITIONS,
            ),
        ] {
            if v > max {
                return Err(format!("{name} ({v}) is over the limit of {max}"));
            }
        }
        let too_big = |what: &str| {
            format!(
                "{what} would take more than {MAX_BYTES} bytes (2^40) in f32; refusing to allocate it"
            )
        };
        let param_bytes = self
            .param_count(heads, kv_heads, head_dim)
            .and_then(|p| p.checked_mul(4));
        if param_bytes.is_none_or(|b| b > MAX_BYTES) {
            return Err(too_big(
                "the parameters (from hidden_size, intermediate_size, num_hidden_layers, \
                 num_attention_heads, num_key_value_heads, head_dim and vocab_size)",
            ));
        }
        let rope = (self.max_position_embeddings as u64)
            .checked_mul(head_dim as u64)
            .and_then(|n| n.checked_mul(8));
        if rope.is_none_or(|b| b > MAX_BYTES) {
            return Err(too_big(
                "the RoPE tables (from max_position_embeddings and the head dim)",
            ));
        }
        Ok(())
    }

    /// The base parameter count, or `None` if it overflows a `u64`.
    fn param_count(&self, heads: usize, kv_heads: usize, head_dim: usize) -> Option<u64> {
        let [h, i, v] =
            [self.hidden_size, self.intermediate_size, self.vocab_size].map(|x| x as u64);
        let q = (heads as u64).checked_mul(head_dim as u64)?;
        let kv = (kv_heads as u64).checked_mul(head_dim as u64)?;
        // q_proj and o_proj, k_proj and v_proj, the three MLP matrices, two norms.
        let attn = q.checked_mul(h)?.checked_mul(2)?;
        let kv_w = kv.checked_mul(h)?.checked_mul(2)?;
        let mlp = i.checked_mul(h)?.checked_mul(3)?;
        let layer = attn
            .checked_add(kv_w)?
            .checked_add(mlp)?
            .checked_add(2 * h)?;
        let embed = v
            .checked_mul(h)?
            .checked_mul(if self.tie_word_embeddings { 1 } else { 2 })?;
        layer
            .checked_mul(self.num_hidden_layers as u64)?
            .checked_add(embed)?
            .checked_add(h)
    }

    /// Validates the config and derives the sizes the model uses.
    pub fn shape(&self) -> std::result::Result<ModelShape, String> {
        let heads = self.num_attention_heads;
        let kv_heads = self.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(format!(
                "num_attention_heads ({heads}) must be a positive multiple of num_key_value_heads ({kv_heads})"
            ));
        }
        if let Some(0) = self.head_dim {
            return Err("head_dim must be positive".to_string());
        }
        let head_dim = match self.head_dim {
            Some(d) => d,
            None if self.hidden_size.is_multiple_of(heads) => self.hidden_size / heads,
            None => {
                return Err(format!(
                    "hidden_size ({}) is not divisible by num_attention_heads ({heads})",
                    self.hidden_size
                ));
            }
        };
        if head_dim % 2 != 0 {
            return Err(format!("head dim {head_dim} must be even for RoPE"));
        }
        let rope_theta = self.rope_theta().ok_or_else(|| {
            "no rope_theta at the top level nor in rope_parameters; refusing to guess a default"
                .to_string()
        })?;
        if let Some(p) = &self.rope_parameters
            && let Some(t) = &p.rope_type
            && t != "default"
        {
            return Err(format!(
                "rope_parameters.rope_type {t:?} is not implemented (only \"default\")"
            ));
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err("rope_scaling is set; scaled RoPE is not implemented".to_string());
        }
        if self.hidden_act != "silu" {
            return Err(format!(
                "hidden_act {:?} is not implemented (only \"silu\")",
                self.hidden_act
            ));
        }
        if self.attention_bias || self.mlp_bias {
            return Err("attention_bias / mlp_bias are not implemented".to_string());
        }
        self.check_sizes(heads, kv_heads, head_dim)?;
        Ok(ModelShape {
            hidden: self.hidden_size,
            intermediate: self.intermediate_size,
            layers: self.num_hidden_layers,
            heads,
            kv_heads,
            head_dim,
            vocab: self.vocab_size,
            rope_theta,
            rms_norm_eps: self.rms_norm_eps,
            tied: self.tie_word_embeddings,
            max_positions: self.max_position_embeddings,
        })
    }
}

/// A Llama linear layer, named as in Hugging Face checkpoints and PEFT's `target_modules`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Projection {
    /// Attention query projection.
    QProj,
    /// Attention key projection.
    KProj,
    /// Attention value projection.
    VProj,
    /// Attention output projection.
    OProj,
    /// MLP gate projection.
    GateProj,
    /// MLP up projection.
    UpProj,
    /// MLP down projection.
    DownProj,
}

impl Projection {
    /// All seven, in checkpoint order.
    pub const ALL: [Projection; 7] = [
        Projection::QProj,
        Projection::KProj,
        Projection::VProj,
        Projection::OProj,
        Projection::GateProj,
        Projection::UpProj,
        Projection::DownProj,
    ];

    /// The module name (`q_proj`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Projection::QProj => "q_proj",
            Projection::KProj => "k_proj",
            Projection::VProj => "v_proj",
            Projection::OProj => "o_proj",
            Projection::GateProj => "gate_proj",
            Projection::UpProj => "up_proj",
            Projection::DownProj => "down_proj",
        }
    }

    /// The parent module in a decoder layer (`self_attn` or `mlp`).
    pub fn parent(self) -> &'static str {
        match self {
            Projection::QProj | Projection::KProj | Projection::VProj | Projection::OProj => {
                "self_attn"
            }
            _ => "mlp",
        }
    }

    /// Parses a module name.
    pub fn parse(name: &str) -> Option<Projection> {
        Projection::ALL.into_iter().find(|p| p.name() == name)
    }

    /// (out_features, in_features) of this projection for a model shape.
    pub fn dims(self, s: &ModelShape) -> (usize, usize) {
        let q = s.heads * s.head_dim;
        let kv = s.kv_heads * s.head_dim;
        match self {
            Projection::QProj => (q, s.hidden),
            Projection::KProj | Projection::VProj => (kv, s.hidden),
            Projection::OProj => (s.hidden, q),
            Projection::GateProj | Projection::UpProj => (s.intermediate, s.hidden),
            Projection::DownProj => (s.hidden, s.intermediate),
        }
    }
}

impl std::fmt::Display for Projection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl ModelShape {
    /// Every base tensor of the model in checkpoint order: name and shape.
    pub fn tensor_specs(&self) -> Vec<(String, Vec<usize>)> {
        let mut specs = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab, self.hidden],
        )];
        for i in 0..self.layers {
            let p = format!("model.layers.{i}");
            specs.push((format!("{p}.input_layernorm.weight"), vec![self.hidden]));
            for proj in Projection::ALL {
                let (out, inp) = proj.dims(self);
                specs.push((
                    format!("{p}.{}.{}.weight", proj.parent(), proj.name()),
                    vec![out, inp],
                ));
            }
            specs.push((
                format!("{p}.post_attention_layernorm.weight"),
                vec![self.hidden],
            ));
        }
        specs.push(("model.norm.weight".to_string(), vec![self.hidden]));
        if !self.tied {
            specs.push(("lm_head.weight".to_string(), vec![self.vocab, self.hidden]));
        }
        specs
    }

    /// Number of base parameters, counting a tied lm_head once (as PyTorch does).
    pub fn base_params(&self) -> u64 {
        self.tensor_specs()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>() as u64)
            .sum()
    }
}
