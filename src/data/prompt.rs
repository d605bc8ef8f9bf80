//! The reference prompt template, byte for byte:
//!
//! ```text
//! ### Instruction:
//! {instruction}
//!
//! ### Input:
//! {input}
//!
//! ### Response:
//! {output}
//! ```
//! The Input block (heading, text and its blank line) is omitted when the input is missing,
//! null or whitespace-only. Field text is kept verbatim.

use crate::data::dataset::Record;

/// A formatted example: the whole text and where the response starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Formatted {
    /// `prompt + response`.
    pub text: String,
    /// Byte length of the prompt: everything up to and including `### Response:\n`.
    pub prompt_len: usize,
}

impl Formatted {
    /// The prompt part.
    pub fn prompt(&self) -> &str {
        &self.text[..self.prompt_len]
    }

    /// The response part (the record's output).
    pub fn response(&self) -> &str {
        &self.text[self.prompt_len..]
    }
}

/// The prompt for an instruction and optional input, ending with `### Response:\n`.
pub fn prompt(instruction: &str, input: Option<&str>) -> String {
    let mut p = format!("### Instruction:\n{instruction}\n\n");
    if let Some(input) = input.filter(|s| !s.trim().is_empty()) {
        p.push_str("### Input:\n");
        p.push_str(input);
        p.push_str("\n\n");
    }
    p.push_str("### Response:\n");
    p
}

/// Formats a record; the split between prompt and response is by position, so a field that
/// itself contains `### Response:` cannot move it.
pub fn format(record: &Record) -> Formatted {
    let mut text = prompt(&record.instruction, record.input.as_deref());
    let prompt_len = text.len();
    text.push_str(&record.output);
    Formatted { text, prompt_len }
}
