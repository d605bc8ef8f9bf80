//! Golden snapshots (insta, in `golden/chat_*.snap`) of conversations encoded with a real chat
//! template on a real tokenizer under `assistant_only`: SmolLM2's ChatML on its own tokenizer,
//! Llama 3.1's template (`content | trim`, `<|eot_id|>`) on the llama-bpe vocab, and
//! Mistral-7B-Instruct-v0.2's `[INST]` template on the llama-spm (SentencePiece) vocab.
//!
//! Each snapshot shows the messages, the rendered text, the text with its trained tokens in
//! `[[...]]`, and per token: position, id, label (-100 = not trained), the token and the bytes
//! of the render it covers. The trained tokens must be exactly each assistant turn's content
//! (as rendered) and its end-of-turn token; a token straddling a turn's start is trained whole
//! (Mistral's `](`). A changed snapshot must come with a sentence saying why the encoding
//! should change.

mod common;

use std::fmt::Write;
use std::path::Path;

use lorasft::chat::{Conversation, Message, Role};
use lorasft::data::encode::{EncodeConfig, Encoder, LabelPolicy, Padding};
use lorasft::data::formats::Sample;
use lorasft::data::show::{self, Style};

fn conv(messages: &[(Role, &str)]) -> Conversation {
    Conversation::new(
        messages
            .iter()
            .map(|(r, c)| Message::text(*r, *c))
            .collect(),
    )
}

/// The encoder a run builds for the tokenizer at `gguf` (converted into `dir`), with the
/// template file `template` when the vocabulary carries none.
fn encoder(assets: &Path, dir: &Path, gguf: &str, template: Option<(&str, String)>) -> Encoder {
    let tok = dir.join("tokenizer.json");
    lorasft::tokenizer::from_gguf::convert(&assets.join(gguf), &tok).unwrap();
    let mut cfg = EncodeConfig {
        max_len: 1024,
        padding: Padding::Longest { multiple_of: None },
        labels: LabelPolicy::AssistantOnly,
        ..EncodeConfig::default()
    };
    if let Some((name, text)) = template {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        cfg.chat_template = Some(p);
    }
    Encoder::from_file(&tok, cfg).unwrap()
}

fn render(enc: &Encoder, conv: &Conversation) -> String {
    let chat = enc.require_chat().unwrap();
    let sample = Sample::Chat(conv.clone());
    let ex = enc.encode(&sample).unwrap();
    let row = enc.row(&ex, ex.ids.len());
    let text = chat.render(conv).unwrap().text;
    let tokens = chat.tokenize(&text).unwrap();
    let mut out = String::new();
    let o = chat.options();
    writeln!(
        out,
        "labels assistant_only; bos {:?} eos {:?}; end of turn {:?}",
        o.bos_token,
        o.eos_token,
        chat.end_of_turn()
    )
    .unwrap();
    writeln!(out, "\nmessages:").unwrap();
    for m in &conv.messages {
        writeln!(out, "  {:<9} {:?}", m.role.as_str(), m.content_str()).unwrap();
    }
    writeln!(out, "\nrendered:\n{text:?}").unwrap();
    writeln!(
        out,
        "\ntrained in [[...]]:\n{}",
        show::marked(enc, &sample, &ex, Style::Brackets).unwrap()
    )
    .unwrap();
    writeln!(
        out,
        "\n{} tokens, {} targets, {} turns cut",
        ex.ids.len(),
        row.targets(),
        ex.turns_cut
    )
    .unwrap();
    writeln!(out, "ids {:?}", row.input_ids).unwrap();
    writeln!(out, "labels {:?}", row.labels).unwrap();
    writeln!(out, "\n  pos     id   label  token / text").unwrap();
    for (p, (id, l)) in row.input_ids.iter().zip(&row.labels).enumerate() {
        let tok = enc.tokenizer().id_to_token(*id).unwrap_or_default();
        let (s, e) = tokens.get_offsets()[p];
        writeln!(out, "  {p:>3} {id:>6} {l:>7}  {tok:?} / {:?}", &text[s..e]).unwrap();
    }
    out
}

fn snapshot(name: &str, body: String) {
    insta::with_settings!({snapshot_path => "../golden", prepend_module_to_snapshot => false, omit_expression => true}, {
        insta::assert_snapshot!(name, body);
    });
}

#[test]
fn chat_smollm2_chatml() {
    let Some(assets) = common::assets() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let enc = encoder(
        &assets,
        tmp.path(),
        "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        None,
    );
    let c = conv(&[
        (Role::System, "You are a concise assistant."),
        (Role::User, "What is the capital of France?"),
        (Role::Assistant, "Paris."),
        (Role::User, "And of Italy?"),
        (Role::Assistant, "Rome, since 1871."),
    ]);
    snapshot("chat_smollm2_chatml_assistant_only", render(&enc, &c));
}

#[test]
fn chat_llama3_trim() {
    let Some(assets) = common::assets() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let template = std::fs::read_to_string(
        assets.join("chat/templates/meta-llama-Llama-3.1-8B-Instruct.jinja"),
    )
    .unwrap();
    let enc = encoder(
        &assets,
        tmp.path(),
        "vocab/ggml-vocab-llama-bpe.gguf",
        Some(("llama31.jinja", template)),
    );
    // Edge spaces and newlines: the template trims them away, the span follows the render.
    let c = conv(&[
        (Role::System, "You are a concise assistant.\n"),
        (Role::User, " What is the capital of France?"),
        (Role::Assistant, "  Paris.\n"),
        (Role::User, "And of Italy?"),
        (Role::Assistant, "Rome, since 1871."),
    ]);
    snapshot("chat_llama3_trim_assistant_only", render(&enc, &c));
}

#[test]
fn chat_mistral_inst() {
    let Some(assets) = common::assets() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/chat/reference.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let template = reference["cpp_cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["name"]
                .as_str()
                .unwrap()
                .contains("Mistral-7B-Instruct-v0.2")
        })
        .unwrap()["template"]
        .as_str()
        .unwrap()
        .to_string();
    let enc = encoder(
        &assets,
        tmp.path(),
        "vocab/ggml-vocab-llama-spm.gguf",
        Some(("mistral-v0.2.jinja", template)),
    );
    // No system role. The second answer starts with `(`, which SentencePiece merges with the
    // `]` of `[/INST]` into one token straddling the turn's start.
    let c = conv(&[
        (Role::User, "What is the capital of France?"),
        (Role::Assistant, "Paris."),
        (Role::User, "And of Italy, in parentheses?"),
        (Role::Assistant, "(Rome)"),
    ]);
    snapshot("chat_mistral_inst_assistant_only", render(&enc, &c));
}
