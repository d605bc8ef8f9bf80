//! lorasft: a LoRA fine-tuning trainer for Llama-family models on candle, built around
//! verification.
//!
//! Modules are layered along the path of one run, and a module imports only from its own
//! layer or those below (`tests/architecture.rs` enforces it; `docs/ARCHITECTURE.md` maps
//! every module):
//!
//! 1. foundation: [`error`], [`rng`], [`device`], [`sys`], [`input`], [`output`], [`embedded`],
//!    [`cache`], [`thread_tuning`], [`alloc_tuning`], [`progress`]
//! 2. data: [`data`], [`chat`], [`tokenizer`], [`gguf`]
//! 3. model: [`model`], [`adapter`], [`verify`], [`generate`], [`inspect`], [`export`]
//! 4. run records: [`records`] (the typed files of a run directory)
//! 5. training: [`train`]
//! 6. tools over training: [`report`], [`bench`], [`selftest`]
//! 7. the command line: [`cli`], [`assets`] (and `src/main.rs` on top)

pub mod alloc_tuning;
pub mod cache;
pub mod device;
pub mod embedded;
pub mod error;
pub mod input;
pub mod output;
pub mod progress;
pub mod rng;
pub mod sys;
pub mod thread_tuning;
pub mod world;

pub mod chat;
pub mod data;
pub mod gguf;
pub mod tokenizer;

pub mod adapter;
pub mod export;
pub mod generate;
pub mod inspect;
pub mod model;
pub mod verify;

pub mod records;

pub mod train;

pub mod bench;
pub mod report;
pub mod selftest;

pub mod assets;
pub mod cli;

pub use error::{Error, Result};
