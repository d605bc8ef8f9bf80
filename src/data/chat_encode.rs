//! Conversations into token ids and trained ranges, the way inference sees them.
//!
//! The whole conversation is rendered once with the model's template and tokenized once, with
//! the template's special tokens (`<|im_start|>`, `<|eot_id|>`) read as the special tokens they
//! are, exactly as `apply_chat_template(tokenize=True)` and inference do; it is never tokenized
//! turn by turn. Each assistant span (see [`crate::chat::spans`]) becomes a token range through
//! the tokenizer's byte offsets: a token is trained when its bytes overlap the span, which is
//! transformers' rule for a token straddling a span's edge (from the token holding the span's
//! first byte through the one holding its last).
//!
//! BOS: when the template writes `bos_token` itself, the tokenizer adds none (no double BOS);
//! otherwise the tokenizer's own post-processor decides, as for Alpaca prompts.
//!
//! Tool calls: a template that renders `tool_calls` gets them as given. One that ignores them
//! (plain ChatML, SmolLM2's) would train an empty turn in their place, so for such a template
//! (found by rendering a probe call once) each call is written into the message's content as
//! the JSON `{"name": ..., "arguments": ...}`, the form ShareGPT data carries it in.
//!
//! Truncation past `max_len` cuts whole trailing turns first: the conversation is cut after the
//! last assistant turn that fits, and the number of messages cut is recorded. Only when not even
//! the first assistant turn fits are tokens cut from the tail, as for Alpaca prompts.

use std::ops::Range;

use tokenizers::{Encoding, Tokenizer};

use crate::chat::message::{Conversation, Message, Role};
use crate::chat::pyjson;
use crate::chat::spans::{self, SpannedRender};
use crate::chat::template::{ChatTemplate, RenderOptions};
use crate::data::encode::{EncodeConfig, Example, LabelPolicy};
use crate::error::{Error, Result};

/// A chat template with the tokenizer that reads its special tokens.
#[derive(Clone)]
pub struct ChatEncoding {
    template: ChatTemplate,
    opts: RenderOptions,
    tokenizer: Tokenizer,
    end_of_turn: String,
    stop_ids: Vec<u32>,
    renders_tool_calls: bool,
}

impl std::fmt::Debug for ChatEncoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatEncoding")
            .field("template", &self.template)
            .field("end_of_turn", &self.end_of_turn)
            .finish()
    }
}

/// One token range per assistant span, with the span's message index.
struct TokenSpan {
    message: usize,
    tokens: Range<usize>,
}

impl ChatEncoding {
    /// A chat encoding over `base` (whose special-token handling is set here so the template's
    /// markup tokenizes as special tokens); `bos` and `eos` are the texts the template gets.
    pub fn new(base: &Tokenizer, template: ChatTemplate, bos: String, eos: String) -> Result<Self> {
        let mut tokenizer = base.clone();
        tokenizer.set_encode_special_tokens(false);
        let opts = RenderOptions::new(bos, eos);
        // A template that refuses the probe conversation (one that insists on a system
        // message, say) still encodes data; it just has no end-of-turn text to stop on.
        let end_of_turn = spans::end_of_turn(&template, &opts).unwrap_or_default();
        let stop_ids = if end_of_turn.is_empty() {
            Vec::new()
        } else {
            match tokenizer.encode(end_of_turn.as_str(), false) {
                Ok(e) if e.get_ids().len() == 1 => e.get_ids().to_vec(),
                _ => Vec::new(),
            }
        };
        let renders_tool_calls = renders_tool_calls(&template, &opts);
        Ok(Self {
            template,
            opts,
            tokenizer,
            end_of_turn,
            stop_ids,
            renders_tool_calls,
        })
    }

    /// The conversation as this template is given it: tool calls written into the content
    /// when the template would drop them.
    pub fn adapt(&self, conv: &Conversation) -> Conversation {
        if self.renders_tool_calls || conv.messages.iter().all(|m| m.tool_calls.is_none()) {
            return conv.clone();
        }
        let mut conv = conv.clone();
        for m in &mut conv.messages {
            let Some(calls) = m.tool_calls.take() else {
                continue;
            };
            let text: Vec<String> = calls
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or(std::slice::from_ref(&calls))
                .iter()
                .map(|c| {
                    let f = c.get("function").unwrap_or(c);
                    let mut call = serde_json::Map::new();
                    for key in ["name", "arguments"] {
                        if let Some(v) = f.get(key) {
                            call.insert(key.into(), v.clone());
                        }
                    }
                    pyjson::dumps(
                        &serde_json::Value::Object(call),
                        &pyjson::DumpOptions::python(None),
                    )
                })
                .collect();
            let mut content = m.content.take().unwrap_or_default();
            if !content.is_empty() {
                content.push('\n');
            }
            content.push_str(&text.join("\n"));
            m.content = Some(content);
        }
        conv
    }

    /// The template.
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// The render options (special-token texts).
    pub fn options(&self) -> &RenderOptions {
        &self.opts
    }

    /// The tokenizer that reads special tokens in rendered text.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The text that closes an assistant turn (`<|im_end|>`), empty when none was found.
    pub fn end_of_turn(&self) -> &str {
        &self.end_of_turn
    }

    /// The token ids that close assistant turns (generation stops at them).
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// The text a conversation is trained on (the render, without finding its spans).
    pub fn render_text(&self, conv: &Conversation) -> Result<String> {
        Ok(self.template.render(&self.adapt(conv), &self.opts)?.text)
    }

    /// Renders a conversation for training, with its assistant spans.
    pub fn render(&self, conv: &Conversation) -> Result<SpannedRender> {
        spans::spanned_render(&self.template, &self.adapt(conv), &self.opts)
    }

    /// Tokenizes rendered text; the tokenizer adds its special tokens (BOS) only when the
    /// text does not already start with the BOS text.
    pub fn tokenize(&self, text: &str) -> Result<Encoding> {
        let bos = &self.opts.bos_token;
        let add_special = bos.is_empty() || !text.starts_with(bos.as_str());
        self.tokenizer
            .encode(text, add_special)
            .map_err(|e| Error::Invalid(format!("tokenizer failed: {e}")))
    }

    /// The prompt for the model's next assistant turn: the conversation rendered with the
    /// generation prompt, and its token ids.
    pub fn prompt(&self, conv: &Conversation) -> Result<(String, Vec<u32>)> {
        let text = self
            .template
            .render(&self.adapt(conv), &self.opts.with_generation_prompt(true))?
            .text;
        let ids = self.tokenize(&text)?.get_ids().to_vec();
        Ok((text, ids))
    }

    /// Encodes a conversation under the label policy and `max_len`.
    pub fn encode(&self, conv: &Conversation, cfg: &EncodeConfig) -> Result<Example> {
        for (i, m) in conv.messages.iter().enumerate() {
            if m.train == Some(true) && m.role != Role::Assistant {
                return Err(Error::Invalid(format!(
                    "messages[{i}]: a {} message is marked for training; only assistant \
                     turns can be trained",
                    m.role.as_str()
                )));
            }
        }
        let render = self.render(conv)?;
        let enc = self.tokenize(&render.text)?;
        let mut ids = enc.get_ids().to_vec();
        let full_len = ids.len();
        let spans = token_spans(&render, &enc);
        // Cut whole trailing turns: keep through the last assistant turn that fits.
        let mut kept = spans.len();
        let mut turns_cut = 0;
        if ids.len() > cfg.max_len {
            match spans.iter().rposition(|s| s.tokens.end <= cfg.max_len) {
                Some(k) => {
                    ids.truncate(spans[k].tokens.end);
                    kept = k + 1;
                    turns_cut = conv.messages.len() - (spans[k].message + 1);
                }
                None => ids.truncate(cfg.max_len),
            }
        }
        let spans = &spans[..kept];
        let trained = match cfg.labels {
            LabelPolicy::AssistantOnly | LabelPolicy::LastAssistant => {
                let last = spans.last().map(|s| s.message);
                let chosen = spans
                    .iter()
                    .filter(|s| match conv.messages[s.message].train {
                        Some(flag) => flag,
                        None => cfg.labels == LabelPolicy::AssistantOnly || Some(s.message) == last,
                    });
                Some(
                    chosen
                        .map(|s| s.tokens.start.min(ids.len())..s.tokens.end.min(ids.len()))
                        .filter(|r| !r.is_empty())
                        .collect::<Vec<_>>(),
                )
            }
            _ => None,
        };
        let prompt_tokens = trained
            .as_ref()
            .and_then(|t| t.first().map(|r| r.start))
            .unwrap_or(ids.len());
        Ok(Example {
            ids,
            prompt_tokens,
            full_len,
            trained,
            turns_cut,
        })
    }
}

/// Whether `template` renders an assistant's `tool_calls` (a probe call's name appears).
fn renders_tool_calls(template: &ChatTemplate, opts: &RenderOptions) -> bool {
    const NAME: &str = "lorasft_probe_tool";
    let call = Message {
        content: None,
        tool_calls: Some(serde_json::json!([
            {"id": "call00001", "type": "function", "function": {"name": NAME, "arguments": {}}}
        ])),
        ..Message::text(Role::Assistant, "")
    };
    let conv = Conversation::new(vec![Message::text(Role::User, "probe"), call]);
    template
        .render(&conv, opts)
        .is_ok_and(|r| r.text.contains(NAME))
}

/// The token range of each assistant span: the tokens whose bytes overlap it (tokens the
/// post-processor added, which have no bytes in the text, never do).
fn token_spans(render: &SpannedRender, enc: &Encoding) -> Vec<TokenSpan> {
    let offsets = enc.get_offsets();
    let added = enc.get_special_tokens_mask();
    render
        .spans
        .iter()
        .map(|s| {
            let (a, b) = (s.bytes.start, s.bytes.end);
            let overlaps = |i: usize| {
                let (start, end) = offsets[i];
                added[i] == 0
                    && if start == end {
                        a <= start && start < b
                    } else {
                        start < b && end > a
                    }
            };
            let first = (0..offsets.len()).find(|&i| a < b && overlaps(i));
            let tokens = match first {
                Some(f) => {
                    let last = (f..offsets.len()).rev().find(|&i| overlaps(i)).unwrap_or(f);
                    f..last + 1
                }
                // An empty span (an empty answer where the template closes turns with no
                // text) trains nothing, not even a token straddling its position; it sits
                // before the first token at or after that position, so that truncation can
                // cut after it (at 0..0 it would cut the whole conversation).
                None => {
                    let at = (0..offsets.len())
                        .find(|&i| added[i] == 0 && offsets[i].0 >= a)
                        .unwrap_or(offsets.len());
                    at..at
                }
            };
            TokenSpan {
                message: s.message,
                tokens,
            }
        })
        .collect()
}
