//! Tokenizers built by the project's own code: `tokenizer.json` for the `tokenizers` crate
//! from GGUF vocabularies (Llama SentencePiece and GPT-2-style byte-level BPE), and a tiny
//! Llama-shaped fixture tokenizer trained on the fixture dataset.

pub mod from_gguf;
pub mod spec;
pub mod train;

pub use spec::{ByteLevelVocab, SpmVocab, TokenKind};

use std::path::Path;

use crate::error::{Error, Result};

/// Loads a `tokenizer.json`, with an error naming the file.
pub fn load(path: &Path) -> Result<tokenizers::Tokenizer> {
    tokenizers::Tokenizer::from_file(path)
        .map_err(|e| Error::Invalid(format!("{}: cannot load tokenizer: {e}", path.display())))
}
