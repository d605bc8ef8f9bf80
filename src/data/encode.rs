//! Encoding formatted examples into token ids, attention masks and labels.
//!
//! Rules (property-tested in `tests/encode_props.rs`):
//! 1. `input_ids`, `attention_mask`, `labels` have equal length; `max_length` padding makes it
//!    exactly `max_len`.
//! 2. Real tokens are the head of the untruncated encoding, `min(len, max_len)` of them.
//! 3. `attention_mask` is 1 exactly on real tokens.
//! 4. [`LabelPolicy`] decides labels, by position and never by token id (TinyLlama's pad token
//!    is its EOS).
//! 5. With padding masked, extra padding does not change an example's loss.
//! 6. A record whose labels are all masked is counted, and never makes the loss NaN.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::data::batching::Batching;
use crate::data::chat_encode::ChatEncoding;
use crate::data::dataset::Record;
use crate::data::formats::Sample;
use crate::data::prompt;
use crate::error::{Error, Result};

/// Label value that contributes nothing to the loss (PyTorch's `ignore_index`): the data
/// pipeline writes it, the loss skips it.
pub const IGNORE_INDEX: i64 = -100;

/// Which positions carry a label (the rest are -100).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LabelPolicy {
    /// The reference rule: labels == input_ids everywhere, padding included.
    #[default]
    InputIds,
    /// Padding positions are -100 (and the first real token, which nothing real precedes).
    MaskPadding,
    /// Padding and prompt positions are -100: only the response (and EOS) is learned
    /// (Alpaca prompts; for conversations use `AssistantOnly`).
    CompletionOnly,
    /// Conversations: only the assistant turns' content and end-of-turn tokens are learned;
    /// role headers, system, user and tool turns are -100.
    AssistantOnly,
    /// Conversations: only the last assistant turn is learned.
    LastAssistant,
}

impl LabelPolicy {
    /// Whether the policy trains on assistant turns only (and so needs a chat template).
    pub fn is_assistant(self) -> bool {
        matches!(
            self,
            LabelPolicy::AssistantOnly | LabelPolicy::LastAssistant
        )
    }
}

/// How an Alpaca record becomes text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum PromptTemplate {
    /// The reference's `### Instruction:` / `### Response:` prompt.
    #[default]
    Alpaca,
    /// A user turn and an assistant turn in the model's own chat template.
    Chat,
}

/// How rows of a batch are padded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum Padding {
    /// Every row padded to `max_len` (the reference's `padding="max_length"`).
    MaxLength,
    /// Rows padded to the longest in the batch, rounded up to a multiple if given.
    Longest {
        /// Round the padded length up to a multiple of this (e.g. 8 for tensor cores).
        multiple_of: Option<usize>,
    },
}

/// Which side padding goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum PaddingSide {
    /// Pad after the real tokens (the default for training).
    #[default]
    Right,
    /// Pad before the real tokens.
    Left,
}

/// Whether an EOS token follows the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum EosPolicy {
    /// No EOS (the reference: the Llama tokenizer adds BOS only).
    #[default]
    Omit,
    /// Append EOS after the response, so the model learns to stop.
    Append,
}

/// Encoding settings; `Default` is the reference run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncodeConfig {
    /// Longest row in tokens (truncation keeps the head).
    pub max_len: usize,
    /// Padding mode.
    pub padding: Padding,
    /// Padding side.
    pub padding_side: PaddingSide,
    /// Label policy.
    pub labels: LabelPolicy,
    /// EOS after the response.
    pub eos: EosPolicy,
    /// How examples are grouped into rows and micro-batches (`padded` is the reference).
    #[serde(default)]
    pub batching: Batching,
    /// How Alpaca records become text (conversations always use the chat template).
    #[serde(default)]
    pub template: PromptTemplate,
    /// A chat template overriding the model's: a `.jinja` file, a `tokenizer_config.json`,
    /// a model directory or a GGUF.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<std::path::PathBuf>,
    /// Which of several named templates to use (`tokenizer_config.json` lists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template_name: Option<String>,
}

/// The longest `encode.max_len` accepted (1 Mi tokens): past any model's positions, and small
/// enough that no padded length, row or batch size computed from it can overflow.
pub const MAX_LEN_LIMIT: usize = 1 << 20;

/// `Ok` when `value` lies in `range`; otherwise an error naming `key` and the allowed range.
fn in_range(key: &str, value: usize, range: std::ops::RangeInclusive<usize>) -> Result<()> {
    if range.contains(&value) {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "{key} must be in {}..={}, got {value}",
        range.start(),
        range.end()
    )))
}

impl EncodeConfig {
    /// Rejects settings no run can use: `encode.max_len` in 2..=[`MAX_LEN_LIMIT`] and
    /// `encode.padding.multiple_of` in 1..=max_len. Each error names the TOML key, the
    /// command-line flag and the allowed range.
    pub fn validate(&self) -> Result<()> {
        in_range(
            "encode.max_len (--max-len)",
            self.max_len,
            2..=MAX_LEN_LIMIT,
        )?;
        if let Padding::Longest {
            multiple_of: Some(m),
        } = self.padding
            && !(1..=self.max_len).contains(&m)
        {
            return Err(Error::Invalid(format!(
                "encode.padding.multiple_of (--pad-to-multiple-of) must be in 1..={} \
                 (at most encode.max_len), got {m}",
                self.max_len
            )));
        }
        if self.batching == Batching::Packed && self.padding_side == PaddingSide::Left {
            return Err(Error::Invalid(
                "encode.batching = \"packed\" (--batching) fills rows from the left; \
                 set encode.padding_side to \"right\""
                    .into(),
            ));
        }
        Ok(())
    }
}

impl Default for EncodeConfig {
    fn default() -> Self {
        Self {
            max_len: 512,
            padding: Padding::MaxLength,
            padding_side: PaddingSide::Right,
            labels: LabelPolicy::InputIds,
            eos: EosPolicy::Omit,
            batching: Batching::Padded,
            template: PromptTemplate::Alpaca,
            chat_template: None,
            chat_template_name: None,
        }
    }
}

/// One encoded example before padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids after truncation (BOS included where the tokenizer adds it).
    pub ids: Vec<u32>,
    /// How many of the untruncated tokens belong to the prompt (by byte position).
    pub prompt_tokens: usize,
    /// Length before truncation.
    pub full_len: usize,
    /// Conversations: the token ranges of the turns the label policy trains (after
    /// truncation); `None` for Alpaca prompts.
    pub trained: Option<Vec<std::ops::Range<usize>>>,
    /// Conversations: whole trailing messages cut to fit `max_len`.
    pub turns_cut: usize,
}

impl Example {
    /// Whether truncation cut tokens off.
    pub fn truncated(&self) -> bool {
        self.full_len > self.ids.len()
    }

    /// Whether token `i` lies in a trained turn (conversations; Alpaca examples: never).
    pub fn is_trained(&self, i: usize) -> bool {
        self.trained
            .as_ref()
            .is_some_and(|r| r.iter().any(|r| r.contains(&i)))
    }
}

/// One padded row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Row {
    /// Token ids, padded.
    pub input_ids: Vec<u32>,
    /// 1 on real tokens, 0 on padding.
    pub attention_mask: Vec<u32>,
    /// Labels (-100 = ignored).
    pub labels: Vec<i64>,
    /// Packed rows only: the token count of each example, in order from position 0; the
    /// rest of the row is padding. Each example attends to itself alone and its positions
    /// start at 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segments: Option<Vec<usize>>,
}

impl Row {
    /// Number of positions that are loss targets (labels[1..] not ignored).
    pub fn targets(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }

    /// Number of loss targets that sit on padding.
    pub fn padding_targets(&self) -> usize {
        self.labels
            .iter()
            .zip(&self.attention_mask)
            .skip(1)
            .filter(|(l, m)| **l != IGNORE_INDEX && **m == 0)
            .count()
    }
}

/// Special token ids the encoder needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecialIds {
    /// End of sequence.
    pub eos: u32,
    /// Padding (EOS when the tokenizer defines none).
    pub pad: u32,
}

/// A tokenizer plus encoding settings: records in, padded rows out.
#[derive(Clone)]
pub struct Encoder {
    tokenizer: Tokenizer,
    cfg: EncodeConfig,
    ids: SpecialIds,
    chat: Option<ChatEncoding>,
}

fn token_name(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

/// The `tokenizer_config.json` beside a tokenizer, parsed; `Null` when there is none.
pub fn tokenizer_config(tokenizer_path: &Path) -> Result<serde_json::Value> {
    let cfg_path = tokenizer_path.with_file_name("tokenizer_config.json");
    if !cfg_path.exists() {
        return Ok(serde_json::Value::Null);
    }
    crate::chat::locate::read_config(&cfg_path)
}

/// The BOS and EOS texts `tokenizer_config.json` beside the tokenizer names (empty when it
/// names none): what a chat template is given as `bos_token` and `eos_token`.
pub fn special_texts(tokenizer_path: &Path) -> Result<(String, String)> {
    Ok(special_texts_of(&tokenizer_config(tokenizer_path)?))
}

/// The BOS and EOS texts a parsed `tokenizer_config.json` names (a string or an
/// `{content}` object each; empty when absent).
pub fn special_texts_of(cfg: &serde_json::Value) -> (String, String) {
    let text = |key: &str| cfg.get(key).and_then(token_name).unwrap_or_default();
    (text("bos_token"), text("eos_token"))
}

/// EOS and pad ids: from `tokenizer_config.json` beside the tokenizer when present, else the
/// tokenizer's `</s>`; pad falls back to EOS (TinyLlama's own choice).
pub fn special_ids(tokenizer: &Tokenizer, tokenizer_path: &Path) -> Result<SpecialIds> {
    let cfg_path = tokenizer_path.with_file_name("tokenizer_config.json");
    let cfg = tokenizer_config(tokenizer_path)?;
    let lookup = |key: &str| -> Result<Option<u32>> {
        match cfg.get(key).and_then(token_name) {
            Some(name) => tokenizer.token_to_id(&name).map(Some).ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: {key} {name:?} is not in the vocabulary",
                    cfg_path.display()
                ))
            }),
            None => Ok(None),
        }
    };
    let eos = match lookup("eos_token")? {
        Some(id) => id,
        None => tokenizer.token_to_id("</s>").ok_or_else(|| {
            Error::Invalid(format!(
                "{}: cannot tell the EOS token: no tokenizer_config.json with eos_token beside it and no `</s>`",
                tokenizer_path.display()
            ))
        })?,
    };
    let pad = lookup("pad_token")?.unwrap_or(eos);
    Ok(SpecialIds { eos, pad })
}

impl Encoder {
    /// An encoder over a loaded tokenizer. Special-token text inside records (`</s>`, `<s>`) is
    /// encoded as ordinary text, never as control tokens: user data cannot inject an EOS.
    pub fn new(mut tokenizer: Tokenizer, cfg: EncodeConfig, ids: SpecialIds) -> Result<Self> {
        // The hard limits only: a config may round past max_len (`validate` is stricter).
        in_range("encode.max_len (--max-len)", cfg.max_len, 2..=MAX_LEN_LIMIT)?;
        if let Padding::Longest {
            multiple_of: Some(m),
        } = cfg.padding
        {
            in_range(
                "encode.padding.multiple_of (--pad-to-multiple-of)",
                m,
                1..=MAX_LEN_LIMIT,
            )?;
        }
        tokenizer.set_encode_special_tokens(true);
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::Invalid(e.to_string()))?;
        tokenizer.with_padding(None);
        Ok(Self {
            tokenizer,
            cfg,
            ids,
            chat: None,
        })
    }

    /// Loads `tokenizer.json` (and `tokenizer_config.json` beside it, if any) with the chat
    /// template the config names or the tokenizer config carries.
    pub fn from_file(path: &Path, cfg: EncodeConfig) -> Result<Self> {
        let tokenizer = crate::tokenizer::load(path)?;
        let ids = special_ids(&tokenizer, path)?;
        let template = crate::chat::locate::for_tokenizer(
            cfg.chat_template.as_deref(),
            path,
            cfg.chat_template_name.as_deref(),
        )?;
        let texts = special_texts(path)?;
        let mut enc = Self::new(tokenizer, cfg, ids)?;
        if let Some(t) = template {
            enc = enc.with_chat_template(t, texts.0, texts.1)?;
        }
        Ok(enc)
    }

    /// The same encoder rendering conversations with `template`; `bos` and `eos` are the
    /// tokenizer's special-token texts the template is given.
    pub fn with_chat_template(
        mut self,
        template: crate::chat::ChatTemplate,
        bos: String,
        eos: String,
    ) -> Result<Self> {
        self.chat = Some(ChatEncoding::new(&self.tokenizer, template, bos, eos)?);
        Ok(self)
    }

    /// The ids that end generation: the model's EOS ids (`base_eos`) plus, when a chat
    /// template is loaded, the tokens that close its assistant turns.
    pub fn stop_ids(&self, mut base_eos: Vec<u32>) -> Vec<u32> {
        for &id in self.chat.iter().flat_map(|c| c.stop_ids()) {
            if !base_eos.contains(&id) {
                base_eos.push(id);
            }
        }
        base_eos
    }

    /// The chat encoding, when a template was found.
    pub fn chat(&self) -> Option<&ChatEncoding> {
        self.chat.as_ref()
    }

    /// The chat encoding, or an error saying where the template was looked for.
    pub fn require_chat(&self) -> Result<&ChatEncoding> {
        self.chat.as_ref().ok_or_else(|| {
            Error::Invalid(
                "no chat template: the tokenizer_config.json beside the tokenizer has no \
                 `chat_template`; set encode.chat_template (--chat-template) to a .jinja file, \
                 a tokenizer_config.json, a model directory or a GGUF"
                    .into(),
            )
        })
    }

    /// Whether a sample is rendered with the chat template.
    pub fn uses_chat(&self, sample: &Sample) -> bool {
        sample.as_chat().is_some() || self.cfg.template == PromptTemplate::Chat
    }

    /// The settings.
    pub fn config(&self) -> &EncodeConfig {
        &self.cfg
    }

    /// The special ids in use.
    pub fn special_ids(&self) -> SpecialIds {
        self.ids
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Refuses a tokenizer (read from `path`) with ids past the vocabulary of the model
    /// `model` names, naming both: its ids would index past the embedding table.
    pub fn check_vocab(&self, path: &Path, model: &str, model_vocab: usize) -> Result<()> {
        let vocab = self.tokenizer.get_vocab_size(true);
        if vocab > model_vocab {
            return Err(Error::Invalid(format!(
                "tokenizer {} has {vocab} tokens (ids up to {}), but model {model} has a \
                 vocabulary of {model_vocab}: the tokenizer does not belong to this model",
                path.display(),
                vocab - 1
            )));
        }
        Ok(())
    }

    /// Token ids of a text with the tokenizer's own special tokens (BOS), untruncated.
    pub fn tokenize(&self, text: &str) -> Result<tokenizers::Encoding> {
        self.tokenizer
            .encode(text, true)
            .map_err(|e| Error::Invalid(format!("tokenizer failed: {e}")))
    }

    /// Encodes one sample: an Alpaca record with the reference prompt, or a conversation (or
    /// an Alpaca record in chat form) with the chat template.
    pub fn encode(&self, sample: &Sample) -> Result<Example> {
        match sample {
            Sample::Instruction(r) if self.cfg.template == PromptTemplate::Alpaca => {
                if self.cfg.labels.is_assistant() {
                    return Err(Error::Invalid(format!(
                        "encode.labels = {:?} trains assistant turns: it needs conversation data \
                         or encode.template = \"chat\"; for Alpaca prompts use \"completion_only\"",
                        self.cfg.labels
                    )));
                }
                self.encode_record(r)
            }
            _ => {
                if self.cfg.labels == LabelPolicy::CompletionOnly {
                    return Err(Error::Invalid(
                        "encode.labels = \"completion_only\" is for Alpaca prompts; for \
                         conversations use \"assistant_only\" (or \"last_assistant\")"
                            .into(),
                    ));
                }
                self.require_chat()?
                    .encode(&sample.to_conversation(), &self.cfg)
            }
        }
    }

    /// The text a sample is trained on: the reference prompt and response, or the rendered
    /// conversation.
    pub fn text(&self, sample: &Sample) -> Result<String> {
        match sample {
            Sample::Instruction(r) if self.cfg.template == PromptTemplate::Alpaca => {
                Ok(prompt::format(r).text)
            }
            _ => self.require_chat()?.render_text(&sample.to_conversation()),
        }
    }

    /// Encodes one Alpaca record: BOS + prompt + response (+ EOS), truncated to `max_len`.
    pub fn encode_record(&self, record: &Record) -> Result<Example> {
        let f = prompt::format(record);
        let enc = self.tokenize(&f.text)?;
        let mut ids = enc.get_ids().to_vec();
        // A token belongs to the prompt when it starts before the response's first byte;
        // special tokens added by the post-processor (BOS) have no span and count as prompt.
        let specials = enc.get_special_tokens_mask();
        let prompt_tokens = enc
            .get_offsets()
            .iter()
            .zip(specials)
            .take_while(|((start, _), special)| **special == 1 || *start < f.prompt_len)
            .count();
        if self.cfg.eos == EosPolicy::Append {
            ids.push(self.ids.eos);
        }
        let full_len = ids.len();
        ids.truncate(self.cfg.max_len);
        Ok(Example {
            ids,
            prompt_tokens,
            full_len,
            trained: None,
            turns_cut: 0,
        })
    }

    /// The padded length for a batch of examples.
    pub fn padded_len(&self, examples: &[&Example]) -> usize {
        self.padded_len_for(examples.iter().map(|e| e.ids.len()).max().unwrap_or(0))
    }

    /// The length rows are padded to when the longest holds `longest` tokens.
    pub fn row_len(&self, longest: usize) -> usize {
        self.padded_len_for(longest).max(longest)
    }

    /// The padded length of rows whose longest holds `longest` tokens.
    fn padded_len_for(&self, longest: usize) -> usize {
        match self.cfg.padding {
            Padding::MaxLength => self.cfg.max_len,
            Padding::Longest { multiple_of } => {
                let longest = longest.max(1);
                match multiple_of {
                    // Both are at most MAX_LEN_LIMIT (checked in `new`): no overflow.
                    Some(m) => longest.div_ceil(m).saturating_mul(m),
                    None => longest,
                }
            }
        }
    }

    /// Pads one example to `len` and applies the label policy by position.
    pub fn row(&self, ex: &Example, len: usize) -> Row {
        let n = ex.ids.len().min(len);
        let pad = len - n;
        let real = &ex.ids[..n];
        let real_labels = real
            .iter()
            .enumerate()
            .map(|(i, &id)| self.label_at(ex, i, id));
        let pad_label = match self.cfg.labels {
            LabelPolicy::InputIds => i64::from(self.ids.pad),
            _ => IGNORE_INDEX,
        };
        let (mut input_ids, mut attention_mask, mut labels) = (
            Vec::with_capacity(len),
            Vec::with_capacity(len),
            Vec::with_capacity(len),
        );
        let pads = |ids: &mut Vec<u32>, mask: &mut Vec<u32>, labels: &mut Vec<i64>| {
            ids.extend(std::iter::repeat_n(self.ids.pad, pad));
            mask.extend(std::iter::repeat_n(0, pad));
            labels.extend(std::iter::repeat_n(pad_label, pad));
        };
        if self.cfg.padding_side == PaddingSide::Left {
            pads(&mut input_ids, &mut attention_mask, &mut labels);
        }
        input_ids.extend_from_slice(real);
        attention_mask.extend(std::iter::repeat_n(1, n));
        labels.extend(real_labels);
        if self.cfg.padding_side == PaddingSide::Right {
            pads(&mut input_ids, &mut attention_mask, &mut labels);
        }
        Row {
            input_ids,
            attention_mask,
            labels,
            segments: None,
        }
    }

    /// The label of token `i` (id `id`) of `ex` under the label policy. The first token is
    /// never a target of real context: unpadded it sits at position 0; left-padded it would be
    /// "predicted" from a pad slot; packed, from the previous example. Masking policies ignore
    /// it so that padding cannot change the loss (rule 5).
    fn label_at(&self, ex: &Example, i: usize, id: u32) -> i64 {
        match self.cfg.labels {
            LabelPolicy::InputIds => i64::from(id),
            LabelPolicy::MaskPadding if i == 0 => IGNORE_INDEX,
            LabelPolicy::CompletionOnly if i == 0 || i < ex.prompt_tokens => IGNORE_INDEX,
            LabelPolicy::AssistantOnly | LabelPolicy::LastAssistant
                if i == 0 || !ex.is_trained(i) =>
            {
                IGNORE_INDEX
            }
            _ => i64::from(id),
        }
    }

    /// One packed row: the examples back to back, each labelled by the policy with its first
    /// token ignored whatever the policy (nothing of its own precedes it), then right padding
    /// to `len` that is never a target. `len` must hold the examples.
    pub fn packed_row(&self, exs: &[&Example], len: usize) -> Row {
        let (mut input_ids, mut attention_mask, mut labels) = (
            Vec::with_capacity(len),
            Vec::with_capacity(len),
            Vec::with_capacity(len),
        );
        let mut segments = Vec::with_capacity(exs.len());
        for ex in exs {
            input_ids.extend_from_slice(&ex.ids);
            attention_mask.extend(std::iter::repeat_n(1, ex.ids.len()));
            labels.extend(ex.ids.iter().enumerate().map(|(i, &id)| match i {
                0 => IGNORE_INDEX,
                _ => self.label_at(ex, i, id),
            }));
            segments.push(ex.ids.len());
        }
        let pad = len.saturating_sub(input_ids.len());
        input_ids.extend(std::iter::repeat_n(self.ids.pad, pad));
        attention_mask.extend(std::iter::repeat_n(0, pad));
        labels.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
        Row {
            input_ids,
            attention_mask,
            labels,
            segments: Some(segments),
        }
    }

    /// Packs each group of examples into one row; rows share the length the padding mode
    /// gives for the longest row's token count.
    pub fn collate_packed(&self, rows: &[Vec<&Example>]) -> Vec<Row> {
        let longest = rows
            .iter()
            .map(|r| r.iter().map(|e| e.ids.len()).sum::<usize>())
            .max()
            .unwrap_or(0);
        let len = self.row_len(longest);
        rows.iter().map(|r| self.packed_row(r, len)).collect()
    }

    /// Pads a batch of examples to their common length.
    pub fn collate(&self, examples: &[&Example]) -> Vec<Row> {
        let len = self.padded_len(examples);
        examples.iter().map(|e| self.row(e, len)).collect()
    }
}
