//! The Llama model for training: config, weights, forward, LoRA adapters and custom ops.

pub mod config;
pub mod fixture;
pub mod gguf_import;
pub mod host_attention;
pub mod host_kernels;
pub mod host_ops;
pub mod llama;
pub mod load;
pub mod lora;
pub mod matmul;
pub mod ops;

pub use config::{LlamaConfig, ModelShape, Projection};
pub use llama::KvCache;
pub use llama::Llama;
pub use lora::{LoraConfig, Mode};
