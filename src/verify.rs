//! Verification that training touched only what it should: PEFT's trainable-parameter line,
//! fingerprints of the frozen base, and gradient coverage of every adapter tensor.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};
use sha2::{Digest, Sha256};

use crate::error::Result;
use crate::model::frozen::Frozen;
use crate::model::llama::Llama;

/// Formats an integer with thousands separators, as Python's `{:,}` does.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The line PEFT's `print_trainable_parameters()` prints, byte for byte.
pub fn trainable_params_line(trainable: u64, all: u64) -> String {
    let pct = if all == 0 {
        0.0
    } else {
        100.0 * trainable as f64 / all as f64
    };
    format!(
        "trainable params: {} || all params: {} || trainable%: {pct:.4}",
        thousands(trainable),
        thousands(all)
    )
}

/// SHA-256 of a tensor's raw bytes in its own dtype (so any bit change shows).
pub fn tensor_sha256(t: &Tensor) -> Result<String> {
    let t = t.flatten_all()?;
    let mut h = Sha256::new();
    // One update over all bytes: the same digest as per-element updates, far fewer calls
    // (a run fingerprints every base tensor twice).
    macro_rules! feed {
        ($ty:ty) => {{
            let bytes: Vec<u8> = t
                .to_vec1::<$ty>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            h.update(&bytes);
        }};
    }
    match t.dtype() {
        DType::F32 => feed!(f32),
        DType::F64 => feed!(f64),
        DType::BF16 => feed!(half::bf16),
        DType::F16 => feed!(half::f16),
        DType::U32 => feed!(u32),
        DType::I64 => feed!(i64),
        DType::U8 => feed!(u8),
        other => {
            return Err(crate::error::Error::Invalid(format!(
                "cannot fingerprint dtype {other:?}"
            )));
        }
    }
    Ok(format!("{:x}", h.finalize()))
}

/// A fingerprint of every base tensor of a model: name -> SHA-256 of its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint(pub BTreeMap<String, String>);

impl Fingerprint {
    /// Hashes every base tensor of `model`: a dense tensor's bytes in its dtype, a
    /// kept-quantized weight's raw blocks where they lie (no copy).
    pub fn of(model: &Llama) -> Result<Self> {
        model
            .base_weights()
            .into_iter()
            .map(|(n, w)| {
                let hash = match &w {
                    Frozen::Dense(t) => tensor_sha256(t)?,
                    Frozen::Quant(q) => format!("{:x}", Sha256::digest(q.raw_bytes())),
                };
                Ok((n, hash))
            })
            .collect::<Result<_>>()
            .map(Fingerprint)
    }

    /// Names of tensors whose hash differs from `other` (or that only one side has).
    pub fn changed(&self, other: &Fingerprint) -> Vec<String> {
        let mut names: Vec<String> = self
            .0
            .iter()
            .filter(|(n, h)| other.0.get(*n) != Some(h))
            .map(|(n, _)| n.clone())
            .collect();
        names.extend(other.0.keys().filter(|n| !self.0.contains_key(*n)).cloned());
        names
    }

    /// One hash over all tensor hashes, for reports.
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        for (n, d) in &self.0 {
            h.update(n.as_bytes());
            h.update(d.as_bytes());
        }
        format!("{:x}", h.finalize())
    }
}

/// The gradient norm of each adapter tensor (`None` when the store holds no gradient for it).
pub fn adapter_grad_norms(model: &Llama, grads: &GradStore) -> Result<Vec<(String, Option<f64>)>> {
    model
        .lora_vars()
        .into_iter()
        .map(|(name, var)| {
            let norm = match grads.get(var.as_tensor()) {
                Some(g) => Some(
                    g.to_dtype(DType::F64)?
                        .sqr()?
                        .sum_all()?
                        .sqrt()?
                        .to_scalar::<f64>()?,
                ),
                None => None,
            };
            Ok((name, norm))
        })
        .collect()
}

/// Names of base tensors that appear in a gradient store (should be none: the base is frozen
/// and its linears compute dX only).
pub fn base_tensors_with_grad(model: &Llama, grads: &GradStore) -> Vec<String> {
    // A weight kept quantized is no tensor, so it cannot be in a gradient store.
    model
        .base_weights()
        .into_iter()
        .filter(|(_, w)| matches!(w, Frozen::Dense(t) if grads.get(t).is_some()))
        .map(|(n, _)| n)
        .collect()
}

/// Shapes of gradients in the store that look like a base weight (its shape or its
/// transpose) without being an adapter. Catches a weight gradient computed through a view
/// such as `w.t()`, which [`base_tensors_with_grad`] cannot see by tensor id.
pub fn weight_shaped_gradients(model: &Llama, grads: &GradStore) -> Vec<Vec<usize>> {
    let adapters: std::collections::HashSet<_> = model
        .lora_vars()
        .iter()
        .map(|(_, v)| v.as_tensor().id())
        .collect();
    let mut shapes: std::collections::HashSet<Vec<usize>> = std::collections::HashSet::new();
    for (_, w) in model.base_weights() {
        let d = w.shape();
        shapes.insert(d.iter().rev().copied().collect());
        shapes.insert(d);
    }
    let mut found: Vec<Vec<usize>> = grads
        .get_ids()
        .filter(|id| !adapters.contains(id))
        .filter_map(|id| grads.get_id(*id))
        .map(|g| g.dims().to_vec())
        .filter(|d| shapes.contains(d))
        .collect();
    found.sort();
    found
}
