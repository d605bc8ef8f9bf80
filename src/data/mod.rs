//! The data pipeline: records -> prompt text -> token ids and labels -> batches.

pub mod batch;
pub mod batching;
pub mod chat_encode;
pub mod dataset;
pub mod encode;
pub mod formats;
pub mod prompt;
pub mod show;
pub mod stats;

pub use batching::Batching;
pub use dataset::{Dataset, Record};
pub use encode::{EncodeConfig, Encoder, LabelPolicy, Padding, PaddingSide};
