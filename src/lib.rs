//! lorasft: a LoRA fine-tuning trainer for Llama-family models on candle, built around
//! verification. Modules follow the path of one run (see DESIGN.md): the model and its
//! adapters, the loss and optimiser, and the checks that prove the base stays frozen.

pub mod adapter;
pub mod alloc_tuning;
pub mod bench;
pub mod data;
pub mod device;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod inspect;
pub mod model;
pub mod report;
pub mod rng;
pub mod selftest;
pub mod simd;
pub mod thread_tuning;
pub mod tokenizer;
pub mod train;
pub mod verify;

pub use error::{Error, Result};
