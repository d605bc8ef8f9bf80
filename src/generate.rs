//! Text generation with a KV cache: greedy or temperature / top-p sampling from the project's
//! seeded RNG, stopping at EOS. Used by `lorasft generate` and by training reports to show base
//! and adapted answers side by side.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::model::Llama;
use crate::model::llama::KvCache;
use crate::rng::Rng;

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum Sampling {
    /// The most likely token (ties: the lowest id).
    Greedy,
    /// Sample from the smallest set of tokens whose probability reaches `top_p`, after
    /// dividing logits by `temperature`.
    TopP {
        /// Softmax temperature (> 0).
        temperature: f64,
        /// Nucleus mass in (0, 1].
        top_p: f64,
    },
}

/// Generation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateConfig {
    /// Most new tokens to produce.
    pub max_new_tokens: usize,
    /// Token choice.
    pub sampling: Sampling,
    /// Seed of the sampler.
    pub seed: u64,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            sampling: Sampling::Greedy,
            seed: 0,
        }
    }
}

/// The most new tokens one generation may ask for (`generate.max_new_tokens`,
/// `--max-new-tokens`): 1 Mi, past any model's positions.
pub const MAX_NEW_TOKENS_LIMIT: usize = 1 << 20;

impl Sampling {
    /// Rejects a temperature that is not finite and > 0, or a `top_p` outside (0, 1]. Each
    /// error names the TOML key and the command-line flag.
    pub fn validate(&self) -> Result<()> {
        match *self {
            Sampling::Greedy => Ok(()),
            Sampling::TopP { temperature, top_p } => {
                if !(temperature.is_finite() && temperature > 0.0) {
                    return Err(Error::Invalid(format!(
                        "generate.sampling.temperature (--temperature) must be finite and > 0, \
                         got {temperature}"
                    )));
                }
                if !(top_p > 0.0 && top_p <= 1.0) {
                    return Err(Error::Invalid(format!(
                        "generate.sampling.top_p (--top-p) must be in (0, 1], got {top_p}"
                    )));
                }
                Ok(())
            }
        }
    }
}

impl GenerateConfig {
    /// Rejects `max_new_tokens` above [`MAX_NEW_TOKENS_LIMIT`] and an invalid sampling rule.
    pub fn validate(&self) -> Result<()> {
        if self.max_new_tokens > MAX_NEW_TOKENS_LIMIT {
            return Err(Error::Invalid(format!(
                "generate.max_new_tokens (--max-new-tokens) must be in 0..={MAX_NEW_TOKENS_LIMIT}, \
                 got {}",
                self.max_new_tokens
            )));
        }
        self.sampling.validate()
    }
}

/// The result of one generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// The prompt as given.
    pub prompt: String,
    /// Tokens in the prompt (BOS included where the tokenizer adds it).
    pub prompt_tokens: usize,
    /// New token ids (EOS excluded).
    pub tokens: Vec<u32>,
    /// The new text.
    pub text: String,
    /// Whether generation stopped at EOS (rather than the token limit).
    pub stopped_at_eos: bool,
    /// The instruction the prompt was built from, when it was (a chat prompt's user turn).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instruction: Option<String>,
}

impl Generation {
    /// What the prompt asked: the instruction it was built from, else the second line of an
    /// Alpaca prompt (the line after `### Instruction:`).
    pub fn heading(&self) -> &str {
        self.instruction
            .as_deref()
            .unwrap_or_else(|| self.prompt.lines().nth(1).unwrap_or(""))
    }
}

/// Picks the next token from logits (v values) under a sampling rule.
pub fn pick(logits: &[f32], sampling: Sampling, rng: &mut Rng) -> Result<u32> {
    if logits.is_empty() {
        return Err(Error::Invalid("no logits to sample from".into()));
    }
    if logits.iter().any(|x| x.is_nan()) {
        return Err(Error::Invalid("logits contain NaN".into()));
    }
    match sampling {
        Sampling::Greedy => Ok(logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &x)| {
                if x > best.1 { (i, x) } else { best }
            })
            .0 as u32),
        Sampling::TopP { temperature, top_p } => {
            sampling.validate()?;
            let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let mut probs: Vec<(usize, f64)> = logits
                .iter()
                .enumerate()
                .map(|(i, &x)| (i, ((x as f64 - max) / temperature).exp()))
                .collect();
            let z: f64 = probs.iter().map(|p| p.1).sum();
            probs.iter_mut().for_each(|p| p.1 /= z);
            probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let mut keep = 0;
            let mut mass = 0.0;
            while keep < probs.len() && (keep == 0 || mass < top_p) {
                mass += probs[keep].1;
                keep += 1;
            }
            let u = rng.next_f64() * mass;
            let mut acc = 0.0;
            for &(i, p) in &probs[..keep] {
                acc += p;
                if u < acc {
                    return Ok(i as u32);
                }
            }
            Ok(probs[keep - 1].0 as u32)
        }
    }
}

/// Generates a continuation of `prompt` (tokenized with the tokenizer's special tokens).
pub fn generate(
    model: &Llama,
    tokenizer: &Tokenizer,
    prompt: &str,
    eos: &[u32],
    cfg: &GenerateConfig,
) -> Result<Generation> {
    let enc = tokenizer
        .encode(prompt, true)
        .map_err(|e| Error::Invalid(format!("tokenizer failed: {e}")))?;
    generate_ids(model, tokenizer, prompt, enc.get_ids().to_vec(), eos, cfg)
}

/// Generates a continuation of a prompt already tokenized (`ids`; a chat prompt is tokenized
/// with its template's special tokens read as such); `prompt` is recorded as given.
pub fn generate_ids(
    model: &Llama,
    tokenizer: &Tokenizer,
    prompt: &str,
    ids: Vec<u32>,
    eos: &[u32],
    cfg: &GenerateConfig,
) -> Result<Generation> {
    cfg.validate()?;
    if ids.is_empty() {
        return Err(Error::Invalid("the prompt encodes to no tokens".into()));
    }
    let dev: &Device = model.device();
    let mut rng = Rng::derive(cfg.seed, "generate");
    let mut cache = KvCache::new();
    let mut input = Tensor::from_vec(ids.clone(), (1, ids.len()), dev)?;
    let mut out = Vec::new();
    let stopped_at_eos = dev.with_context(|| -> Result<bool> {
        while out.len() < cfg.max_new_tokens
            && cache.len() + input.dim(1)? <= model.shape().max_positions
        {
            let logits = model
                .forward_cached(&input, &mut cache)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let next = pick(&logits, cfg.sampling, &mut rng)?;
            if eos.contains(&next) {
                return Ok(true);
            }
            out.push(next);
            input = Tensor::from_vec(vec![next], (1, 1), dev)?;
        }
        Ok(false)
    })?;
    let text = tokenizer
        .decode(&out, true)
        .map_err(|e| Error::Invalid(format!("decode failed: {e}")))?;
    Ok(Generation {
        prompt: prompt.to_string(),
        prompt_tokens: ids.len(),
        tokens: out,
        text,
        stopped_at_eos,
        instruction: None,
    })
}
