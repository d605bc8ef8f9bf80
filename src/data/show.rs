//! An encoded example as a person checking a dataset wants to see it: the text the model
//! reads, with the tokens that are loss targets marked. Positions come from the tokenizer's
//! byte offsets into the rendered text, so the marks fall exactly where the trained tokens do.

use crate::data::encode::{Encoder, Example, IGNORE_INDEX};
use crate::data::formats::Sample;
use crate::error::Result;

/// How trained text is marked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// `[[trained]]`, for files, logs and terminals without colour.
    Brackets,
    /// Green on a terminal (ANSI), untrained text dimmed.
    Color,
}

impl Style {
    /// Colour on a terminal unless `NO_COLOR` is set (<https://no-color.org>), else brackets.
    pub fn for_stdout() -> Self {
        use std::io::IsTerminal;
        let colour = crate::progress::Colour::from_env();
        if std::io::stdout().is_terminal() && colour == crate::progress::Colour::On {
            Style::Color
        } else {
            Style::Brackets
        }
    }

    fn open(self, trained: bool) -> &'static str {
        match (self, trained) {
            (Style::Brackets, true) => "[[",
            (Style::Brackets, false) => "",
            (Style::Color, true) => "\x1b[1;32m",
            (Style::Color, false) => "\x1b[2m",
        }
    }

    fn close(self, trained: bool) -> &'static str {
        match (self, trained) {
            (Style::Brackets, true) => "]]",
            (Style::Brackets, false) => "",
            (Style::Color, _) => "\x1b[0m",
        }
    }
}

/// Which of an example's tokens are loss targets under the encoder's policy.
pub fn trained_mask(encoder: &Encoder, ex: &Example) -> Vec<bool> {
    encoder
        .row(ex, ex.ids.len())
        .labels
        .iter()
        .map(|&l| l != IGNORE_INDEX)
        .collect()
}

/// The sample's text with its trained tokens marked. Text past truncation is shown after a
/// `…(truncated)` note; tokens with no text of their own (an appended EOS) are shown by name.
pub fn marked(encoder: &Encoder, sample: &Sample, ex: &Example, style: Style) -> Result<String> {
    let text = encoder.text(sample)?;
    let enc = match (encoder.uses_chat(sample), encoder.chat()) {
        (true, Some(chat)) => chat.tokenize(&text)?,
        _ => encoder.tokenize(&text)?,
    };
    let mask = trained_mask(encoder, ex);
    let offsets = enc.get_offsets();
    let mut pieces: Vec<(String, bool)> = Vec::new();
    let mut push = |s: &str, t: bool| match pieces.last_mut() {
        _ if s.is_empty() => {}
        Some((p, pt)) if *pt == t => p.push_str(s),
        _ => pieces.push((s.to_string(), t)),
    };
    let mut at = 0usize;
    for (i, &trained) in mask.iter().enumerate() {
        match offsets.get(i).filter(|(s, e)| e > s && *s >= at) {
            Some(&(start, end)) if i < enc.get_ids().len() && enc.get_ids()[i] == ex.ids[i] => {
                push(&text[at..start], false);
                push(&text[start..end], trained);
                at = end;
            }
            _ if offsets.get(i).is_some_and(|(s, e)| s == e || *e <= at) => {}
            _ => {
                let name = encoder
                    .tokenizer()
                    .id_to_token(ex.ids[i])
                    .unwrap_or_default();
                push(&name, trained);
            }
        }
    }
    let mut out = String::new();
    for (s, t) in &pieces {
        out.push_str(style.open(*t));
        out.push_str(s);
        out.push_str(style.close(*t));
    }
    if ex.truncated() && at < text.len() {
        out.push_str(&format!(
            "{}…(truncated: {} more bytes not trained on){}",
            style.open(false),
            text.len() - at,
            style.close(false)
        ));
    }
    Ok(out)
}
