//! Where each assistant turn lies in a rendered conversation: the text the model must learn
//! to produce, from the first byte of the turn's content through its end-of-turn token.
//!
//! Two methods:
//! - **`{% generation %}` blocks.** A template that marks the assistant's text (transformers'
//!   convention for `return_assistant_tokens_mask`) says where the spans are; the k-th block
//!   is the k-th assistant message's. The marks are the template author's and are followed as
//!   transformers follows them, even where they cover more than the prefix method would
//!   (poolside's Laguna templates put the `<assistant>` header inside the block).
//! - **Prefix differences**, for every other template (most real ones). Render the
//!   conversation up to message i with the generation prompt (`P`), and up to and including
//!   message i without it (`F`). The assistant turn is `F[len(P)..]`: `P` ends with the role
//!   header the model is prompted with, so the difference is exactly what the model generates
//!   after it, content and end-of-turn token included. Whitespace after the end-of-turn token
//!   (`<|im_end|>\n`) belongs to the separator, not the turn, and is left out.
//!
//! Why this is sound: the whole conversation is rendered once for training, and each `F` is
//! checked to be a prefix of that render, and each `P` a prefix of its `F`. Where both hold,
//! the bytes of the span are the bytes of the training text at that position, and the text
//! before them is what inference renders as the prompt for that turn. It fails for templates
//! that render a turn differently once later turns exist (Qwen3 drops earlier turns'
//! reasoning, some templates move the system prompt): then an `F` is not a prefix of the full
//! render, and the conversation is refused with the template named, never silently mislabelled.
//! A template whose generation prompt does not prefix the assistant turn (one that opens the
//! turn differently when generating) falls back to the render without the prompt and takes the
//! span from where the message's content first appears after it.

use std::ops::Range;

use crate::chat::message::{Conversation, Role};
use crate::chat::template::{ChatTemplate, RenderOptions, Rendered};
use crate::error::{Error, Result};

/// How the spans were found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpanMethod {
    /// The template's `{% generation %}` blocks.
    GenerationBlocks,
    /// Renders of conversation prefixes, compared.
    PrefixDifference,
}

impl std::fmt::Display for SpanMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SpanMethod::GenerationBlocks => "{% generation %} blocks",
            SpanMethod::PrefixDifference => "prefix differences",
        })
    }
}

/// One assistant turn's span in the rendered text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnSpan {
    /// Index of the assistant message in the conversation.
    pub message: usize,
    /// Byte range in the rendered text: content and end-of-turn text.
    pub bytes: Range<usize>,
}

/// A conversation rendered for training, with its assistant spans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpannedRender {
    /// The rendered text (no generation prompt).
    pub text: String,
    /// One span per assistant message, in order.
    pub spans: Vec<TurnSpan>,
    /// How they were found.
    pub method: SpanMethod,
}

/// Renders `conv` and finds every assistant turn's span, with the template's own method:
/// generation blocks when it has them, prefix differences otherwise.
pub fn spanned_render(
    template: &ChatTemplate,
    conv: &Conversation,
    opts: &RenderOptions,
) -> Result<SpannedRender> {
    match method_for(template) {
        SpanMethod::GenerationBlocks => by_generation_blocks(template, conv, opts),
        SpanMethod::PrefixDifference => by_prefix_difference(template, conv, opts),
    }
}

/// The method [`spanned_render`] uses for a template: its `{% generation %}` blocks when it
/// has them, prefix differences otherwise.
pub fn method_for(template: &ChatTemplate) -> SpanMethod {
    if template.has_generation_blocks() {
        SpanMethod::GenerationBlocks
    } else {
        SpanMethod::PrefixDifference
    }
}

/// Spans from the template's `{% generation %}` blocks.
pub fn by_generation_blocks(
    template: &ChatTemplate,
    conv: &Conversation,
    opts: &RenderOptions,
) -> Result<SpannedRender> {
    let Rendered { text, generation } =
        template.render(conv, &opts.with_generation_prompt(false))?;
    let assistants: Vec<usize> = assistant_indices(conv);
    if generation.len() != assistants.len() {
        return Err(Error::Invalid(format!(
            "chat template {}: {} `{{% generation %}}` blocks for {} assistant messages; \
             cannot tell which block is whose",
            template.source(),
            generation.len(),
            assistants.len()
        )));
    }
    let spans = assistants
        .into_iter()
        .zip(generation)
        .map(|(message, bytes)| TurnSpan { message, bytes })
        .collect();
    Ok(SpannedRender {
        text,
        spans,
        method: SpanMethod::GenerationBlocks,
    })
}

fn assistant_indices(conv: &Conversation) -> Vec<usize> {
    conv.messages
        .iter()
        .enumerate()
        .filter(|(_, m)| m.role == Role::Assistant)
        .map(|(i, _)| i)
        .collect()
}

/// Spans from renders of conversation prefixes (the template-agnostic method).
pub fn by_prefix_difference(
    template: &ChatTemplate,
    conv: &Conversation,
    opts: &RenderOptions,
) -> Result<SpannedRender> {
    let plain = opts.with_generation_prompt(false);
    let text = template.render(conv, &plain)?.text;
    let refuse = |i: usize, what: &str| {
        Error::Invalid(format!(
            "chat template {}: {what} (assistant message {i}); its assistant turns cannot be \
             located by prefix differences, so the conversation is refused rather than \
             mislabelled",
            template.source()
        ))
    };
    let mut spans = Vec::new();
    for i in assistant_indices(conv) {
        let upto = template.render(&conv.prefix(i + 1), &plain)?.text;
        if !text.starts_with(&upto) {
            return Err(refuse(
                i,
                "the template renders earlier turns differently once later turns exist",
            ));
        }
        let prompted = template
            .render(&conv.prefix(i), &opts.with_generation_prompt(true))
            .map(|r| r.text);
        let start = match prompted {
            Ok(p) if upto.starts_with(&p) => p.len(),
            _ => {
                let before = template.render(&conv.prefix(i), &plain)?.text;
                if !upto.starts_with(&before) {
                    return Err(refuse(i, "a turn changes the text rendered before it"));
                }
                let content = conv.messages[i].content_str().trim();
                match upto[before.len()..].find(content) {
                    Some(at) if !content.is_empty() => before.len() + at,
                    _ => {
                        return Err(refuse(
                            i,
                            "the generation prompt does not prefix the assistant's turn",
                        ));
                    }
                }
            }
        };
        let end = start + upto[start..].trim_end().len();
        spans.push(TurnSpan {
            message: i,
            bytes: start..end,
        });
    }
    Ok(SpannedRender {
        text,
        spans,
        method: SpanMethod::PrefixDifference,
    })
}

/// The end-of-turn text of a template: what follows an assistant turn's content in its span
/// (`<|im_end|>`, `<|eot_id|>`, `</s>`), found by rendering a probe conversation. Empty when
/// the template closes assistant turns with nothing.
pub fn end_of_turn(template: &ChatTemplate, opts: &RenderOptions) -> Result<String> {
    use crate::chat::message::Message;
    const PROBE: &str = "lorasft probe answer";
    let conv = Conversation::new(vec![
        Message::text(Role::User, "lorasft probe question"),
        Message::text(Role::Assistant, PROBE),
        Message::text(Role::User, "lorasft probe question"),
    ]);
    let r = spanned_render(template, &conv, opts)?;
    let span = &r.text[r.spans[0].bytes.clone()];
    Ok(span
        .find(PROBE)
        .map(|at| span[at + PROBE.len()..].trim().to_string())
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::message::Message;

    const CHATML: &str = "{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn conv() -> Conversation {
        Conversation::new(vec![
            Message::text(Role::System, "Be brief."),
            Message::text(Role::User, "Hi"),
            Message::text(Role::Assistant, "Hello!"),
            Message::text(Role::User, "Bye"),
            Message::text(Role::Assistant, " See you \n"),
        ])
    }

    #[test]
    fn chatml_spans_cover_content_and_im_end_but_not_header_or_newline() {
        let t = ChatTemplate::new("chatml", CHATML).unwrap();
        let r = by_prefix_difference(&t, &conv(), &RenderOptions::new("", "")).unwrap();
        let texts: Vec<&str> = r.spans.iter().map(|s| &r.text[s.bytes.clone()]).collect();
        assert_eq!(texts, ["Hello!<|im_end|>", " See you \n<|im_end|>"]);
        assert_eq!(r.spans[1].message, 4);
        assert_eq!(
            end_of_turn(&t, &RenderOptions::new("", "")).unwrap(),
            "<|im_end|>"
        );
    }

    #[test]
    fn a_template_that_rewrites_earlier_turns_is_refused_by_name() {
        // Drops every assistant turn but the last, as reasoning-dropping templates do.
        let t = ChatTemplate::new(
            "rewriter.jinja",
            "{% for m in messages %}{% if m.role != 'assistant' or loop.last %}{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}",
        )
        .unwrap();
        let err = by_prefix_difference(&t, &conv(), &RenderOptions::new("", ""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("rewriter.jinja") && err.contains("differently"),
            "{err}"
        );
    }

    #[test]
    fn generation_blocks_and_prefix_differences_agree() {
        let tagged = ChatTemplate::new(
            "tagged",
            "{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' }}{% if m.role == 'assistant' %}{% generation %}{{ m.content + '<|im_end|>' }}{% endgeneration %}{% else %}{{ m.content + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
        )
        .unwrap();
        let opts = RenderOptions::new("", "");
        let a = by_generation_blocks(&tagged, &conv(), &opts).unwrap();
        let b = by_prefix_difference(&tagged, &conv(), &opts).unwrap();
        assert_eq!(a.text, b.text);
        assert_eq!(a.spans, b.spans);
        assert_eq!(a.method, SpanMethod::GenerationBlocks);
    }
}
