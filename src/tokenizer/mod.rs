//! Tokenizers built by the project's own code: `tokenizer.json` for the `tokenizers` crate
//! from GGUF vocabularies (Llama SentencePiece and GPT-2-style byte-level BPE), and a tiny
//! Llama-shaped fixture tokenizer trained on the fixture dataset; and the way back, a
//! `tokenizer.json` as GGUF `tokenizer.ggml.*` metadata for `export-gguf`.

pub mod from_gguf;
pub mod spec;
pub mod to_gguf;
pub mod train;

pub use spec::{ByteLevelVocab, SpmVocab, TokenKind};

use std::path::Path;

use crate::error::{Error, Result};

/// Loads a `tokenizer.json`, with an error naming the file.
pub fn load(path: &Path) -> Result<tokenizers::Tokenizer> {
    let text = crate::input::read_text(path, crate::input::TOKENIZER_CEILING, "a tokenizer.json")?;
    from_json(&text, path)
}

/// Parses `tokenizer.json` text read from (or written for) `path`, with errors naming it.
///
/// The `tokenizers` crate panics on some malformed documents (its decoder deserializer
/// unwraps a parse error), so the JSON syntax is checked first and the crate's parser runs
/// under `catch_unwind`: a hostile file is an error, never a crash.
pub fn from_json(text: &str, path: &Path) -> Result<tokenizers::Tokenizer> {
    let fail =
        |msg: String| Error::Invalid(format!("{}: cannot load tokenizer: {msg}", path.display()));
    serde_json::from_str::<serde_json::Value>(text).map_err(|e| fail(e.to_string()))?;
    // The default panic hook would print the crate's panic as if lorasft had crashed; it is
    // silenced while the parser runs and the panic becomes this error.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let parsed = std::panic::catch_unwind(|| text.parse::<tokenizers::Tokenizer>());
    std::panic::set_hook(hook);
    match parsed {
        Ok(tokenizer) => tokenizer.map_err(|e| fail(e.to_string())),
        Err(panic) => Err(fail(format!(
            "the tokenizers crate rejected it: {}",
            panic_text(panic.as_ref())
        ))),
    }
}

/// The message of a caught panic.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(no message)".to_string())
}
