//! The Llama model for training: config, weights, forward, loss, LoRA adapters and custom ops.
//!
//! Inside, the imports run one way: `autograd`, `cpu` (the fast path) and `frozen` at the bottom, then
//! `ops` and `loss`, then `lora`, `recompute` and `llama`, then what builds models (`load`, `fixture`,
//! `gguf_import`, `source`).

pub mod autograd;
pub mod config;
pub mod cpu;
pub mod fixture;
pub mod frozen;
pub mod gguf_import;
pub mod llama;
pub mod load;
pub mod lora;
pub mod loss;
pub mod ops;
pub mod recompute;
pub mod source;
pub mod visibility;

pub use config::{LlamaConfig, ModelShape, Projection};
pub use llama::KvCache;
pub use llama::Llama;
pub use lora::{LoraConfig, Mode};
