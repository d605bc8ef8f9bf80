//! Property tests (proptest) of assistant-only training masks on real chat templates and real
//! tokenizers: conversations are rendered with the model's own template, tokenized once, and
//! only the assistant turns (content and end-of-turn token) are trained.
//!
//! Three template/tokenizer pairs, each with its own hazard:
//! - SmolLM2's ChatML template on its own (GPT-2 byte-level BPE) tokenizer: `<|im_end|>` is a
//!   special token, a `\n` of the role header can merge with a content that starts with `\n`;
//! - Llama 3.1's template (`message['content'] | trim`, `<|eot_id|>`) on the llama-bpe vocab:
//!   the rendered content is not the message's content;
//! - Mistral-7B-Instruct-v0.2's `[INST]` template (no system role, `raise_exception` unless
//!   roles alternate, `<s>`/`</s>` from the template) on the llama-spm SentencePiece vocab:
//!   the template writes BOS itself, and a content starting with `(` merges with the `]` of
//!   `[/INST]` into one token (`](`) that straddles the span's start.
//!
//! For every random conversation (system message where the template has one, 1-4
//! user/assistant pairs, maybe a trailing user message; contents with unicode, edge spaces,
//! newlines, and `<|im_end|>` and other special-token texts typed by either side), under
//! `assistant_only` and `last_assistant`, checked against a fresh render and a fresh
//! tokenization (the `tokenizers` crate, not lorasft's chat tokenizer):
//! - the ids are the fresh tokenization of the whole render, BOS added by the tokenizer only
//!   when the render does not start with the BOS text (never twice);
//! - each assistant span is exactly the message's content as rendered plus the end-of-turn
//!   text, right after the template's assistant header;
//! - a token is trained iff it overlaps (by byte offsets) a span the policy trains, except
//!   position 0, which is never a target;
//! - decoding a turn's trained tokens gives the span's text, preceded by at most the part of
//!   the turn's first token that lies before the span (a token straddling the span's start,
//!   which transformers' offset rule trains whole) and, for SentencePiece's decoder only,
//!   less one leading space (its `Strip` decoder drops the first space of the decoded text,
//!   the dummy prefix it assumes). The end-of-turn text is a special token in all three
//!   vocabularies, so no token straddles a span's end: the last trained token ends exactly
//!   where the span does;
//! - with a small `max_len`, truncation cuts whole trailing turns (the row ends with the last
//!   assistant turn that fits and `turns_cut` counts the messages cut), and falls back to
//!   cutting the head at `max_len` only when not even the first assistant turn fits.
//!
//! Also: `{% generation %}` spans of the real tagged templates (LFM2.5, poolside Laguna)
//! against prefix differences; a template that rewrites earlier turns (Qwen3) is refused by
//! name; `<|im_end|>` typed by a user is read as the special token, as at inference, and
//! stays untrained; BOS comes once, from the template or the tokenizer; an empty answer in a
//! template with no end-of-turn text trains nothing and truncates as a whole turn.
//!
//! Cases per property: `LORASFT_FUZZ_CASES`, else 64. Skipped without the asset cache.

mod common;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use lorasft::chat::spans::{self, SpanMethod};
use lorasft::chat::{ChatTemplate, Conversation, Message, RenderOptions, Role};
use lorasft::data::encode::{EncodeConfig, Encoder, Example, IGNORE_INDEX, LabelPolicy, Padding};
use lorasft::data::formats::Sample;
use proptest::prelude::*;
use tokenizers::{Encoding, Tokenizer};

/// One template on one tokenizer, with what the test knows about the template independently.
struct Flavour {
    name: &'static str,
    _tmp: tempfile::TempDir,
    /// The converted `tokenizer.json`.
    tok_path: PathBuf,
    /// Built by `Encoder::from_file`, `assistant_only`, rows long enough never to truncate.
    encoder: Encoder,
    /// The same under `last_assistant`.
    last: Encoder,
    /// The oracle's tokenizer, loaded afresh, reading special-token text as special tokens.
    fresh: Tokenizer,
    /// The oracle's template, compiled afresh from the same text.
    template: ChatTemplate,
    opts: RenderOptions,
    /// Text right before every assistant span (the header the model is prompted with).
    header: &'static str,
    /// The end-of-turn text closing every assistant span.
    eot: &'static str,
    /// The template renders `content | trim`.
    trims: bool,
    /// The template has a system role.
    system: bool,
    /// The decoder is SentencePiece's (drops one leading space of the decoded text).
    sentencepiece: bool,
    /// Texts a message may type besides random text (special tokens, template markup).
    typed: &'static [&'static str],
}

const BIG: usize = 1 << 16;

fn config(labels: LabelPolicy, max_len: usize) -> EncodeConfig {
    EncodeConfig {
        max_len,
        padding: Padding::Longest { multiple_of: None },
        labels,
        ..EncodeConfig::default()
    }
}

fn templates(assets: &Path) -> PathBuf {
    assets.join("chat/templates")
}

/// The Mistral-7B-Instruct-v0.2 template from `tests/data/chat/reference.json`.
fn mistral_template_text() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/chat/reference.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    v["cpp_cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["name"]
                .as_str()
                .unwrap()
                .contains("Mistral-7B-Instruct-v0.2")
        })
        .expect("reference.json has the Mistral-7B-Instruct-v0.2 case")["template"]
        .as_str()
        .unwrap()
        .to_string()
}

impl Flavour {
    /// Converts `gguf`'s vocabulary into a temp dir, optionally with a template file beside it,
    /// and builds the encoder the way a run does (`Encoder::from_file`).
    #[allow(clippy::too_many_arguments)]
    fn build(
        name: &'static str,
        assets: &Path,
        gguf: &str,
        template: Option<(&str, String)>,
        header: &'static str,
        eot: &'static str,
        trims: bool,
        system: bool,
        sentencepiece: bool,
        typed: &'static [&'static str],
    ) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let tok_path = tmp.path().join("tokenizer.json");
        lorasft::tokenizer::from_gguf::convert(&assets.join(gguf), &tok_path).unwrap();
        let mut cfg = config(LabelPolicy::AssistantOnly, BIG);
        if let Some((file, text)) = &template {
            let p = tmp.path().join(file);
            std::fs::write(&p, text).unwrap();
            cfg.chat_template = Some(p);
        }
        let encoder = Encoder::from_file(&tok_path, cfg).unwrap();
        let chat = encoder.require_chat().unwrap();
        let opts = chat.options().clone();
        let template = ChatTemplate::new("oracle", chat.template().text()).unwrap();
        let mut fresh = Tokenizer::from_file(&tok_path).unwrap();
        fresh.set_encode_special_tokens(false);
        assert_eq!(chat.end_of_turn(), eot, "{name}: end-of-turn text");
        let last = Encoder::new(
            encoder.tokenizer().clone(),
            config(LabelPolicy::LastAssistant, BIG),
            encoder.special_ids(),
        )
        .unwrap()
        .with_chat_template(
            chat.template().clone(),
            opts.bos_token.clone(),
            opts.eos_token.clone(),
        )
        .unwrap();
        Self {
            name,
            _tmp: tmp,
            tok_path,
            encoder,
            last,
            fresh,
            template,
            opts,
            header,
            eot,
            trims,
            system,
            sentencepiece,
            typed,
        }
    }

    fn smollm2() -> Option<&'static Self> {
        static F: OnceLock<Option<Flavour>> = OnceLock::new();
        F.get_or_init(|| {
            let a = common::assets()?;
            Some(Self::build(
                "smollm2",
                &a,
                "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                None,
                "<|im_start|>assistant\n",
                "<|im_end|>",
                false,
                true,
                false,
                &["<|im_end|>", "<|im_start|>", "<|im_start|>assistant\n"],
            ))
        })
        .as_ref()
    }

    fn llama3() -> Option<&'static Self> {
        static F: OnceLock<Option<Flavour>> = OnceLock::new();
        F.get_or_init(|| {
            let a = common::assets()?;
            let text = std::fs::read_to_string(
                templates(&a).join("meta-llama-Llama-3.1-8B-Instruct.jinja"),
            )
            .unwrap();
            Some(Self::build(
                "llama3",
                &a,
                "vocab/ggml-vocab-llama-bpe.gguf",
                Some(("llama31.jinja", text)),
                "<|start_header_id|>assistant<|end_header_id|>\n\n",
                "<|eot_id|>",
                true,
                true,
                false,
                &["<|im_end|>", "<|eot_id|>", "<|start_header_id|>"],
            ))
        })
        .as_ref()
    }

    fn mistral() -> Option<&'static Self> {
        static F: OnceLock<Option<Flavour>> = OnceLock::new();
        F.get_or_init(|| {
            let a = common::assets()?;
            Some(Self::build(
                "mistral",
                &a,
                "vocab/ggml-vocab-llama-spm.gguf",
                Some(("mistral-v0.2.jinja", mistral_template_text())),
                " [/INST]",
                "</s>",
                false,
                false,
                true,
                // `</s>` and `<s>` typed inside a content are left out: after a special token
                // the (legacy) SentencePiece normalizer prepends `▁` to the next segment, so
                // decoding would not give the text back (inference reads it the same way).
                &["<|im_end|>", "[INST]", " [/INST]", "(", "]("],
            ))
        })
        .as_ref()
    }

    /// The encoder (`max_len` large) for a policy.
    fn encoder(&self, labels: LabelPolicy) -> &Encoder {
        match labels {
            LabelPolicy::AssistantOnly => &self.encoder,
            LabelPolicy::LastAssistant => &self.last,
            other => panic!("not an assistant policy: {other:?}"),
        }
    }

    /// Encodes `conv` under a policy and `max_len`, as `Encoder::encode` does for a
    /// conversation (the chat encoding under the encoder's settings, `max_len` replaced).
    fn encode(&self, conv: &Conversation, labels: LabelPolicy, max_len: usize) -> Example {
        let enc = self.encoder(labels);
        if max_len == BIG {
            return enc.encode(&Sample::Chat(conv.clone())).unwrap();
        }
        let cfg = EncodeConfig {
            max_len,
            ..enc.config().clone()
        };
        enc.require_chat().unwrap().encode(conv, &cfg).unwrap()
    }

    /// The message's content as the template renders it.
    fn rendered_content(&self, m: &Message) -> String {
        let c = m.content_str();
        if self.trims {
            c.trim().to_string()
        } else {
            c.to_string()
        }
    }

    /// The fresh tokenization of `text` under the BOS rule.
    fn tokenize(&self, text: &str) -> Encoding {
        let bos = &self.opts.bos_token;
        let add_special = bos.is_empty() || !text.starts_with(bos.as_str());
        self.fresh.encode(text, add_special).unwrap()
    }
}

// ---------------------------------------------------------------------------------------------
// Random conversations.

fn piece(typed: &'static [&'static str]) -> BoxedStrategy<String> {
    prop_oneof![
        3 => "\\PC{0,12}",
        3 => "[a-zA-Z]{1,8}( [a-z]{1,6}){0,3}",
        2 => "[ \n\t]{1,3}",
        1 => "[éüñß中文🦙 ]{1,6}",
        1 => "[()\\[\\].,!?]{1,3}",
        2 => proptest::sample::select(typed).prop_map(str::to_string),
    ]
    .boxed()
}

fn content(typed: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop::collection::vec(piece(typed), 0..4).prop_map(|v| v.concat())
}

/// An optional system message (where the template has the role), 1-4 user/assistant pairs,
/// and maybe a trailing user message: roles alternate, as every template here accepts.
fn conversation(f: &'static Flavour) -> impl Strategy<Value = Conversation> {
    let system = if f.system {
        prop::option::of(content(f.typed)).boxed()
    } else {
        Just(None).boxed()
    };
    (
        system,
        prop::collection::vec((content(f.typed), content(f.typed)), 1..=4),
        prop::option::weighted(0.25, content(f.typed)),
    )
        .prop_map(|(system, pairs, trailing)| {
            let mut m = Vec::new();
            if let Some(s) = system {
                m.push(Message::text(Role::System, s));
            }
            for (u, a) in pairs {
                m.push(Message::text(Role::User, u));
                m.push(Message::text(Role::Assistant, a));
            }
            if let Some(u) = trailing {
                m.push(Message::text(Role::User, u));
            }
            Conversation::new(m)
        })
}

fn policy() -> impl Strategy<Value = LabelPolicy> {
    prop_oneof![
        Just(LabelPolicy::AssistantOnly),
        Just(LabelPolicy::LastAssistant)
    ]
}

// ---------------------------------------------------------------------------------------------
// The oracle.

/// Whether token `i` of `enc` overlaps the byte range `span` (tokens the post-processor added
/// have no bytes in the text and never do; a zero-width token overlaps when it sits inside).
fn overlaps(enc: &Encoding, i: usize, span: &Range<usize>) -> bool {
    let (s, e) = enc.get_offsets()[i];
    enc.get_special_tokens_mask()[i] == 0
        && if s == e {
            span.start <= s && s < span.end
        } else {
            s < span.end && e > span.start
        }
}

/// The tokens overlapping `span`, as a range (they are contiguous).
fn token_range(enc: &Encoding, span: &Range<usize>) -> Range<usize> {
    let hits: Vec<usize> = (0..enc.len()).filter(|&i| overlaps(enc, i, span)).collect();
    let (first, last) = (hits[0], *hits.last().unwrap());
    assert_eq!(
        hits.len(),
        last - first + 1,
        "tokens of {span:?} not contiguous"
    );
    first..last + 1
}

/// What the oracle knows of a conversation: render, spans (checked), fresh tokenization.
struct Oracle {
    text: String,
    /// (assistant message index, byte span), in order.
    spans: Vec<(usize, Range<usize>)>,
    enc: Encoding,
}

/// Renders `conv` afresh, checks lorasft's render and spans against the template's known
/// layout, and tokenizes the render afresh.
fn oracle(f: &Flavour, conv: &Conversation) -> Oracle {
    let text = f.template.render(conv, &f.opts).unwrap().text;
    let chat = f.encoder.require_chat().unwrap();
    let r = chat.render(conv).unwrap();
    assert_eq!(r.text, text, "{}: lorasft's render differs", f.name);
    assert_eq!(r.method, SpanMethod::PrefixDifference);
    let assistants: Vec<usize> = (0..conv.messages.len())
        .filter(|&i| conv.messages[i].role == Role::Assistant)
        .collect();
    let got: Vec<usize> = r.spans.iter().map(|s| s.message).collect();
    assert_eq!(
        got, assistants,
        "{}: one span per assistant message",
        f.name
    );
    let mut prev_end = 0;
    for s in &r.spans {
        let want = format!("{}{}", f.rendered_content(&conv.messages[s.message]), f.eot);
        assert_eq!(
            &text[s.bytes.clone()],
            want,
            "{}: span of message {} in {text:?}",
            f.name,
            s.message
        );
        assert!(
            text[..s.bytes.start].ends_with(f.header) && s.bytes.start >= prev_end,
            "{}: span of message {} not right after the assistant header: {text:?}",
            f.name,
            s.message
        );
        prev_end = s.bytes.end;
    }
    let enc = f.tokenize(&text);
    // BOS never twice: the template's own or the tokenizer's, not both.
    if let Some(bos) = f.fresh.token_to_id(&f.opts.bos_token) {
        let ids = enc.get_ids();
        assert!(
            !(ids.len() >= 2 && ids[0] == bos && ids[1] == bos),
            "{}: double BOS",
            f.name
        );
    }
    Oracle {
        text,
        spans: r
            .spans
            .iter()
            .map(|s| (s.message, s.bytes.clone()))
            .collect(),
        enc,
    }
}

/// The spans (by index into `o.spans`) a policy trains when the first `kept` spans survive.
fn trained_spans(labels: LabelPolicy, kept: usize) -> Range<usize> {
    match labels {
        LabelPolicy::AssistantOnly => 0..kept,
        LabelPolicy::LastAssistant => kept.saturating_sub(1)..kept,
        other => panic!("not an assistant policy: {other:?}"),
    }
}

/// The labels of `ex` under `enc`'s policy, unpadded.
fn labels(enc: &Encoder, ex: &Example) -> Vec<i64> {
    let row = enc.row(ex, ex.ids.len());
    assert_eq!(row.input_ids, ex.ids);
    row.labels
}

/// Checks that exactly the tokens overlapping the trained spans are trained (position 0
/// never), among the first `ex.ids.len()` tokens, and that labels equal ids where trained.
fn check_labels(f: &Flavour, o: &Oracle, ex: &Example, labels: &[i64], trained: &[usize]) {
    for (i, &l) in labels.iter().enumerate() {
        let want = i > 0 && trained.iter().any(|&k| overlaps(&o.enc, i, &o.spans[k].1));
        let got = l != IGNORE_INDEX;
        assert_eq!(
            got,
            want,
            "{}: token {i} ({:?} at {:?}) trained {got}, want {want}; spans {:?}; text {:?}",
            f.name,
            o.enc.get_tokens()[i],
            o.enc.get_offsets()[i],
            o.spans,
            o.text
        );
        if got {
            assert_eq!(l, i64::from(ex.ids[i]));
        }
    }
}

/// Checks that decoding turn `k`'s trained tokens gives its span's text, allowing a straddling
/// first token and SentencePiece's one dropped leading space.
fn check_decode(f: &Flavour, o: &Oracle, k: usize) {
    let span = &o.spans[k].1;
    let toks = token_range(&o.enc, span);
    let offsets = o.enc.get_offsets();
    let cover = offsets[toks.start].0..offsets[toks.end - 1].1;
    assert!(cover.start <= span.start, "{}: cover {cover:?}", f.name);
    assert_eq!(
        cover.end, span.end,
        "{}: the end-of-turn token must end the turn exactly",
        f.name
    );
    let straddle = &o.text[cover.start..span.start];
    let want = &o.text[cover.clone()];
    let decoded = f
        .fresh
        .decode(&o.enc.get_ids()[toks.clone()], false)
        .unwrap();
    let ok = decoded == want || (f.sentencepiece && want.starts_with(' ') && decoded == want[1..]);
    assert!(
        ok,
        "{}: turn {k} decodes to {decoded:?}, want {want:?} (straddle {straddle:?})",
        f.name
    );
}

/// The full-length properties for one conversation and policy.
fn check_full(f: &Flavour, conv: &Conversation, labels_policy: LabelPolicy) {
    let o = oracle(f, conv);
    let ex = f.encode(conv, labels_policy, BIG);
    assert_eq!(
        ex.ids,
        o.enc.get_ids(),
        "{}: ids differ from the fresh tokenization of {:?}",
        f.name,
        o.text
    );
    assert_eq!((ex.full_len, ex.turns_cut), (ex.ids.len(), 0));
    let trained: Vec<usize> = trained_spans(labels_policy, o.spans.len()).collect();
    let l = labels(f.encoder(labels_policy), &ex);
    check_labels(f, &o, &ex, &l, &trained);
    for &k in &trained {
        check_decode(f, &o, k);
    }
}

/// The truncation properties for one conversation, policy and `max_len`.
fn check_truncated(f: &Flavour, conv: &Conversation, labels_policy: LabelPolicy, max_len: usize) {
    let o = oracle(f, conv);
    let full = o.enc.get_ids();
    let ex = f.encode(conv, labels_policy, max_len);
    assert_eq!(ex.full_len, full.len());
    assert!(ex.ids.len() <= max_len);
    let ranges: Vec<Range<usize>> = o
        .spans
        .iter()
        .map(|(_, s)| token_range(&o.enc, s))
        .collect();
    let (len, kept, cut) = if full.len() <= max_len {
        (full.len(), o.spans.len(), 0)
    } else {
        match ranges.iter().rposition(|r| r.end <= max_len) {
            Some(k) => (
                ranges[k].end,
                k + 1,
                conv.messages.len() - (o.spans[k].0 + 1),
            ),
            // Not even the first turn fits: the head is cut, and the policy's turns are those
            // of the whole conversation, clipped to the head (under `last_assistant` the last
            // turn, so nothing is trained unless the conversation has only one).
            None => (max_len, o.spans.len(), 0),
        }
    };
    assert_eq!(
        ex.ids,
        &full[..len],
        "{}: max_len {max_len}: ids are not the head through the last whole turn",
        f.name
    );
    assert_eq!(ex.turns_cut, cut, "{}: turns_cut", f.name);
    let trained: Vec<usize> = trained_spans(labels_policy, kept).collect();
    let l = labels(f.encoder(labels_policy), &ex);
    check_labels(f, &o, &ex, &l, &trained);
    if len < full.len() && kept < o.spans.len() {
        // Whole turns: the row ends with an end-of-turn token, fully trained when its turn is.
        assert_eq!(
            o.enc.get_offsets()[len - 1].1,
            o.spans[kept - 1].1.end,
            "{}: row does not end with a turn's end",
            f.name
        );
    }
}

fn cases() -> u32 {
    common::fuzz_cases(64)
}

/// Conversations for a flavour; a placeholder when the assets are absent (the test skips).
fn convs(f: Option<&'static Flavour>) -> BoxedStrategy<Conversation> {
    match f {
        Some(f) => conversation(f).boxed(),
        None => Just(Conversation::default()).boxed(),
    }
}

/// `max_len` as a fraction of the conversation's full length (at least 2).
fn max_len_for(f: &Flavour, conv: &Conversation, frac: f64) -> usize {
    let full = oracle(f, conv).enc.len();
    ((full as f64 * frac) as usize).max(2)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn smollm2_chatml_masks(conv in convs(Flavour::smollm2()), labels in policy()) {
        let Some(f) = Flavour::smollm2() else { return Ok(()) };
        check_full(f, &conv, labels);
    }

    #[test]
    fn llama3_trim_masks(conv in convs(Flavour::llama3()), labels in policy()) {
        let Some(f) = Flavour::llama3() else { return Ok(()) };
        check_full(f, &conv, labels);
    }

    #[test]
    fn mistral_inst_sentencepiece_masks(conv in convs(Flavour::mistral()), labels in policy()) {
        let Some(f) = Flavour::mistral() else { return Ok(()) };
        check_full(f, &conv, labels);
    }

    #[test]
    fn smollm2_truncation_cuts_whole_turns(
        conv in convs(Flavour::smollm2()), labels in policy(), frac in 0.0f64..1.1,
    ) {
        let Some(f) = Flavour::smollm2() else { return Ok(()) };
        check_truncated(f, &conv, labels, max_len_for(f, &conv, frac));
    }

    #[test]
    fn llama3_truncation_cuts_whole_turns(
        conv in convs(Flavour::llama3()), labels in policy(), frac in 0.0f64..1.1,
    ) {
        let Some(f) = Flavour::llama3() else { return Ok(()) };
        check_truncated(f, &conv, labels, max_len_for(f, &conv, frac));
    }

    #[test]
    fn mistral_truncation_cuts_whole_turns(
        conv in convs(Flavour::mistral()), labels in policy(), frac in 0.0f64..1.1,
    ) {
        let Some(f) = Flavour::mistral() else { return Ok(()) };
        check_truncated(f, &conv, labels, max_len_for(f, &conv, frac));
    }
}

// ---------------------------------------------------------------------------------------------
// `{% generation %}` blocks, refusals, special-token text typed by a user, BOS.

fn text(role: Role, content: &str) -> Message {
    Message::text(role, content)
}

/// A few conversations: system or not, edge whitespace, unicode, an empty answer, 3 turns.
fn fixed_conversations() -> Vec<Conversation> {
    use Role::*;
    vec![
        Conversation::new(vec![
            text(System, "Be brief."),
            text(User, "Hi"),
            text(Assistant, " Hello there \n"),
            text(User, "Bye"),
            text(Assistant, "See you"),
        ]),
        Conversation::new(vec![text(User, "Hi"), text(Assistant, "")]),
        Conversation::new(vec![
            text(User, "Grüße 🦙"),
            text(Assistant, "\n\nNamasté — 中文\n"),
            text(User, "  again  "),
            text(Assistant, "Sure."),
            text(User, "last"),
            text(Assistant, "Done <|im_end|> here"),
        ]),
        Conversation::new(vec![
            text(System, ""),
            text(User, "x"),
            text(Assistant, "y"),
            text(User, "trailing"),
        ]),
    ]
}

/// transformers' `{% generation %}` blocks hold whatever the template author put in them; the
/// prefix-difference span is what the model generates after the prompt, up to the end-of-turn
/// text. On the real tagged templates they differ, always the same way: the block is the
/// prefix-difference span plus, before it, the part of the generation prompt the template
/// writes inside the block (`head`: none for LFM2.5, the whole `<assistant>` prompt for the
/// poolside ones) and, after it, the `\n` that follows the end-of-turn text (`tail`).
#[test]
fn generation_blocks_are_prefix_differences_widened_by_prompt_and_newline() {
    let Some(a) = common::assets() else { return };
    for (name, head, tail) in [
        ("LFM2.5-8B-A1B.jinja", "", "\n"),
        ("poolside-Laguna-XS.2.jinja", "<assistant>\n</think>", "\n"),
        (
            "poolside-Laguna-XS-2.1.jinja",
            "<assistant>\n</think>",
            "\n",
        ),
        ("poolside-Laguna-S-2.1.jinja", "<assistant><think>", "\n"),
    ] {
        let t = ChatTemplate::new(
            name,
            std::fs::read_to_string(templates(&a).join(name)).unwrap(),
        )
        .unwrap();
        assert!(t.has_generation_blocks(), "{name}");
        let opts = RenderOptions::new("<|startoftext|>", "<|im_end|>");
        for conv in fixed_conversations() {
            let g = spans::by_generation_blocks(&t, &conv, &opts).unwrap();
            let p = spans::by_prefix_difference(&t, &conv, &opts).unwrap();
            assert_eq!(g.method, SpanMethod::GenerationBlocks);
            assert_eq!(
                spans::spanned_render(&t, &conv, &opts).unwrap(),
                g,
                "{name}: the blocks are used when present"
            );
            assert_eq!(g.text, p.text, "{name}");
            assert_eq!(g.spans.len(), p.spans.len(), "{name}");
            for (gs, ps) in g.spans.iter().zip(&p.spans) {
                assert_eq!(gs.message, ps.message, "{name}");
                let (gb, pb) = (&gs.bytes, &ps.bytes);
                assert!(
                    gb.start <= pb.start && pb.end <= gb.end,
                    "{name}: block {gb:?} does not hold span {pb:?}"
                );
                assert_eq!(&g.text[gb.start..pb.start], head, "{name}: {:?}", g.text);
                assert_eq!(&g.text[pb.end..gb.end], tail, "{name}: {:?}", g.text);
                // The head is the generation prompt's end: inference supplies it.
                let prompt = t
                    .render(&conv.prefix(ps.message), &opts.with_generation_prompt(true))
                    .unwrap()
                    .text;
                assert!(prompt.ends_with(head), "{name}: prompt {prompt:?}");
            }
        }
    }
}

/// Qwen3 renders the last assistant turn with a `<think>` block and drops it from earlier
/// turns: a turn's render changes once later turns exist, so the conversation is refused,
/// naming the template, rather than trained on text the spans do not describe.
#[test]
fn a_template_that_rewrites_earlier_turns_is_refused_by_name() {
    let Some(f) = Flavour::smollm2() else { return };
    let Some(a) = common::assets() else { return };
    let mut cfg = config(LabelPolicy::AssistantOnly, BIG);
    cfg.chat_template = Some(templates(&a).join("Qwen-Qwen3-0.6B.jinja"));
    let enc = Encoder::from_file(&f.tok_path, cfg).unwrap();
    let conv = Conversation::new(vec![
        text(Role::User, "What is 2+2?"),
        text(Role::Assistant, "<think>\nAdd them.\n</think>\n\n4"),
        text(Role::User, "And 3+3?"),
        text(Role::Assistant, "<think>\nAgain.\n</think>\n\n6"),
    ]);
    let err = enc
        .encode(&Sample::Chat(conv.clone()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("Qwen-Qwen3-0.6B.jinja") && err.contains("renders earlier turns differently"),
        "{err}"
    );
    // One turn has nothing to rewrite: it encodes, the reasoning trained with the answer.
    let one = enc.encode(&Sample::Chat(conv.prefix(2))).unwrap();
    let r = enc.require_chat().unwrap().render(&conv.prefix(2)).unwrap();
    assert_eq!(
        &r.text[r.spans[0].bytes.clone()],
        "<think>\nAdd them.\n</think>\n\n4<|im_end|>"
    );
    assert!(one.trained.unwrap().len() == 1);
}

/// `<|im_end|>` typed in a user message is read as the special token, exactly as inference
/// reads the same render, and lies outside every trained span; typed by the assistant it is
/// trained like the rest of its content. The prompt inference builds for each assistant turn
/// is the head of the training ids up to the turn's first trained token.
#[test]
fn im_end_typed_by_a_user_is_the_special_token_and_untrained() {
    let Some(f) = Flavour::smollm2() else { return };
    let conv = Conversation::new(vec![
        text(Role::User, "Say <|im_end|> please"),
        text(Role::Assistant, "OK: <|im_end|>"),
        text(Role::User, "Thanks"),
        text(Role::Assistant, "Bye"),
    ]);
    let o = oracle(f, &conv);
    let ex = f.encoder.encode(&Sample::Chat(conv.clone())).unwrap();
    assert_eq!(ex.ids, o.enc.get_ids());
    let labels = labels(&f.encoder, &ex);
    let im_end = f.fresh.token_to_id("<|im_end|>").unwrap();
    let typed_at = |msg: &str| {
        let at = o.text.find(msg).unwrap() + msg.find("<|im_end|>").unwrap();
        (at, at + "<|im_end|>".len())
    };
    let token_at = |bytes: (usize, usize)| {
        let i = o
            .enc
            .get_offsets()
            .iter()
            .position(|&b| b == bytes)
            .unwrap();
        assert_eq!(ex.ids[i], im_end, "read as the special token");
        i
    };
    let user = token_at(typed_at("Say <|im_end|> please"));
    assert_eq!(labels[user], IGNORE_INDEX, "typed by the user: not trained");
    let assistant = token_at(typed_at("OK: <|im_end|>"));
    assert_eq!(
        labels[assistant],
        i64::from(im_end),
        "typed by the assistant: trained"
    );
    assert!(
        o.spans
            .iter()
            .all(|(_, s)| !s.contains(&typed_at("Say <|im_end|>").0))
    );
    let chat = f.encoder.require_chat().unwrap();
    for (k, (m, span)) in o.spans.iter().enumerate() {
        let (_, prompt) = chat.prompt(&conv.prefix(*m)).unwrap();
        let first = token_range(&o.enc, span).start;
        assert_eq!(prompt, &ex.ids[..first], "turn {k}: inference prompt");
        if k == 0 {
            assert!(labels[..first].iter().all(|&l| l == IGNORE_INDEX));
        }
    }
}

/// BOS once either way: a template that writes `bos_token` (Mistral's) gets none from the
/// tokenizer; one that does not (ChatML) gets the tokenizer's own, which has no bytes in the
/// text and is never trained.
#[test]
fn bos_is_added_by_the_tokenizer_only_when_the_render_lacks_it() {
    let Some(f) = Flavour::mistral() else { return };
    let bos = f.fresh.token_to_id("<s>").unwrap();
    let conv = Conversation::new(vec![text(Role::User, "Hi"), text(Role::Assistant, "Hello")]);
    let ex = f.encoder.encode(&Sample::Chat(conv.clone())).unwrap();
    assert_eq!(ex.ids[0], bos);
    assert_ne!(ex.ids[1], bos, "no double BOS");
    // SmolLM2's template less its default system message: no `bos_token` in it.
    let chatml = "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + \
                  '<|im_end|>\\n' }}{% endfor %}\
                  {% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
    let enc = Encoder::new(
        f.encoder.tokenizer().clone(),
        config(LabelPolicy::AssistantOnly, BIG),
        f.encoder.special_ids(),
    )
    .unwrap()
    .with_chat_template(
        ChatTemplate::new("chatml", chatml).unwrap(),
        "<s>".into(),
        "</s>".into(),
    )
    .unwrap();
    let ex = enc.encode(&Sample::Chat(conv.clone())).unwrap();
    let render = enc.require_chat().unwrap().render(&conv).unwrap().text;
    assert!(render.starts_with("<|im_start|>"));
    let fresh = f.fresh.encode(render.as_str(), true).unwrap();
    assert_eq!(ex.ids, fresh.get_ids());
    assert_eq!(ex.ids[0], bos);
    assert_ne!(ex.ids[1], bos);
    assert_eq!(labels(&enc, &ex)[0], IGNORE_INDEX);
}

/// A template that closes turns with no text (`role:content` and a blank line) and an empty
/// answer: its span is empty and trains nothing, not even the whitespace token straddling its
/// position, and truncation still cuts whole turns around it (an empty span once counted as a
/// turn ending at token 0, and cut every conversation that did not fit to nothing).
#[test]
fn an_empty_answer_in_a_template_without_end_of_turn_text() {
    let Some(f) = Flavour::smollm2() else { return };
    let conv = Conversation::new(vec![
        text(Role::User, "Tell me a few words about the weather today."),
        text(Role::Assistant, "Sunny and warm."),
        text(Role::User, "Anything else?"),
        text(Role::Assistant, ""),
        text(
            Role::User,
            "Then tell me a very long story about many things, please.",
        ),
    ]);
    // With `: ` the empty turn sits inside a ` \n\n` token; with `:` on a token boundary.
    for sep in [": ", ":"] {
        let t = ChatTemplate::new(
            "plain",
            format!(
                "{{% for m in messages %}}{{{{ m.role + '{sep}' + m.content + '\\n\\n' }}}}{{% endfor %}}\
                 {{% if add_generation_prompt %}}{{{{ 'assistant{sep}' }}}}{{% endif %}}"
            ),
        )
        .unwrap();
        let encoder = |max_len| {
            Encoder::new(
                f.encoder.tokenizer().clone(),
                config(LabelPolicy::AssistantOnly, max_len),
                f.encoder.special_ids(),
            )
            .unwrap()
            .with_chat_template(t.clone(), String::new(), String::new())
            .unwrap()
        };
        let chat = encoder(BIG).require_chat().unwrap().clone();
        assert_eq!(chat.end_of_turn(), "", "{sep:?}");
        let r = chat.render(&conv).unwrap();
        assert!(r.spans[1].bytes.is_empty(), "{sep:?}: {:?}", r.spans);
        let full = chat.tokenize(&r.text).unwrap();
        let first_end = token_range(&full, &r.spans[0].bytes).end;
        // The empty turn sits before the first token starting at or after its position.
        let at = r.spans[1].bytes.start;
        let empty_at = (0..full.len())
            .find(|&i| full.get_offsets()[i].0 >= at)
            .unwrap();
        let ex = encoder(BIG).encode(&Sample::Chat(conv.clone())).unwrap();
        assert_eq!(
            ex.trained,
            Some(vec![token_range(&full, &r.spans[0].bytes)]),
            "{sep:?}: only the first answer is trained"
        );
        for max_len in 2..full.len() + 2 {
            let ex = encoder(max_len)
                .encode(&Sample::Chat(conv.clone()))
                .unwrap();
            let (len, cut) = if full.len() <= max_len {
                (full.len(), 0)
            } else if empty_at <= max_len {
                (empty_at, 1)
            } else if first_end <= max_len {
                (first_end, 3)
            } else {
                (max_len, 0)
            };
            assert_eq!(
                (ex.ids.len(), ex.turns_cut),
                (len, cut),
                "{sep:?}: max_len {max_len} (first turn ends at {first_end}, empty turn at \
                 {empty_at}, {} tokens)",
                full.len()
            );
            assert_eq!(ex.ids, &full.get_ids()[..len]);
        }
    }
}
