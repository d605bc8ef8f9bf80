//! The conversation commands through the `lorasft` binary: `chat render` (the template's exact
//! output from a .jinja, a tokenizer config, a model directory or a GGUF; errors naming the
//! file), `data encode` and `data show` on conversations (ids, assistant-only labels, skipped
//! conversations, record errors), `generate --chat`, the GGUF chat template through import,
//! a stale import's refresh and export, and a short training run whose report and adapter
//! directory carry the template it trained with.
//!
//! The template is `tests/data/chat/chatml.jinja` (ChatML without special tokens, so the
//! fixture tokenizer reads it as text); the GGUF test needs the asset cache and skips without
//! it.

mod common;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::lorasft;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// A file under `tests/data/chat`.
fn chat_data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/chat")
        .join(name)
}

/// The ChatML-like template every test but the GGUF one uses.
fn template() -> PathBuf {
    chat_data("chatml.jinja")
}

/// `tests/data/chat/render_messages.json` rendered by [`template`], no generation prompt.
const RENDERED: &str = "<|im_start|>system\nBe brief.<|im_end|>\n\
                        <|im_start|>user\nName a colour.<|im_end|>\n\
                        <|im_start|>assistant\nRed.<|im_end|>\n";

/// What the generation prompt adds.
const ASSISTANT_HEADER: &str = "<|im_start|>assistant\n";

/// The stderr of a `lorasft` run that must fail.
fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        !out.status.success(),
        "{cmd:?} succeeded unexpectedly: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).unwrap()
}

/// `lorasft chat render --template T --messages M FLAGS...`'s stdout.
fn render(template: &Path, messages: &Path, flags: &[&str]) -> String {
    common::stdout_ok(
        lorasft()
            .args(["chat", "render", "--template"])
            .arg(template)
            .arg("--messages")
            .arg(messages)
            .args(flags),
    )
}

/// A conversation rendered as [`template`] renders it, with the byte range of each assistant
/// turn (content through `<|im_end|>`): written out here, independently of the renderer.
fn chatml(messages: &[Value]) -> (String, Vec<Range<usize>>) {
    let (mut text, mut spans) = (String::new(), Vec::new());
    for m in messages {
        let role = m["role"].as_str().unwrap();
        text.push_str(&format!("<|im_start|>{role}\n"));
        let start = text.len();
        text.push_str(m["content"].as_str().unwrap());
        text.push_str("<|im_end|>");
        if role == "assistant" {
            spans.push(start..text.len());
        }
        text.push('\n');
    }
    (text, spans)
}

/// The `messages` of each line of a JSONL file.
fn jsonl_messages(path: &Path) -> Vec<Vec<Value>> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["messages"].as_array().unwrap().clone()
        })
        .collect()
}

/// The texts marked `[[ ]]` in `data show` or report output.
fn marked(text: &str) -> Vec<&str> {
    text.split("[[")
        .skip(1)
        .map(|s| s.split_once("]]").expect("unclosed [[").0)
        .collect()
}

#[test]
fn chat_render_prints_the_templates_output_exactly_and_names_bad_files() {
    let messages = chat_data("render_messages.json");
    assert_eq!(render(&template(), &messages, &[]), RENDERED);
    assert_eq!(
        render(&template(), &messages, &["--add-generation-prompt"]),
        format!("{RENDERED}{ASSISTANT_HEADER}")
    );

    // A tokenizer_config.json source: its template, with its bos/eos (a string, or an
    // AddedToken object) unless the flags override them.
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(template()).unwrap();
    let with_specials = format!(
        "{{{{ bos_token }}}}{}",
        text.replace("<|im_end|>", "<|im_end|>{{ eos_token }}")
    );
    let config = |bos: &str| {
        json!({
            "bos_token": bos,
            "eos_token": {"content": "</s>", "special": true},
            "chat_template": with_specials,
        })
    };
    let cfg = tmp.path().join("tokenizer_config.json");
    std::fs::write(&cfg, config("<s>").to_string()).unwrap();
    let expected = format!("<s>{}", RENDERED.replace("<|im_end|>", "<|im_end|></s>"));
    assert_eq!(render(&cfg, &messages, &[]), expected);
    // The model directory holding it renders the same.
    assert_eq!(render(tmp.path(), &messages, &[]), expected);
    assert_eq!(
        render(
            &cfg,
            &messages,
            &["--bos-token", "[B]", "--eos-token", "[E]"]
        ),
        format!("[B]{}", RENDERED.replace("<|im_end|>", "<|im_end|>[E]"))
    );
    // A config under another name gives its own bos/eos, not the tokenizer_config.json's
    // beside it.
    let other = tmp.path().join("other_config.json");
    std::fs::write(&other, config("<other>").to_string()).unwrap();
    assert_eq!(
        render(&other, &messages, &[]),
        format!(
            "<other>{}",
            RENDERED.replace("<|im_end|>", "<|im_end|></s>")
        )
    );

    // Template errors, at compile time and at render time, name the file and the line.
    for (name, body) in [
        (
            "unknown_filter.jinja",
            "{% for m in messages %}\n{{ m.content }}\n{{ m.role | no_such_filter }}\n{% endfor %}",
        ),
        (
            "unclosed.jinja",
            "{% for m in messages %}\n{{ m.content }}\n{% if %}\n{% endfor %}",
        ),
        (
            "raises.jinja",
            "{% for m in messages %}\n{{ m.content }}\n{{ raise_exception('no ' + m.role) }}\n{% endfor %}",
        ),
    ] {
        let bad = tmp.path().join(name);
        std::fs::write(&bad, body).unwrap();
        let err = run_err(
            lorasft()
                .args(["chat", "render", "--template"])
                .arg(&bad)
                .arg("--messages")
                .arg(&messages),
        );
        assert!(
            err.contains(&bad.display().to_string()) && err.contains("line 3"),
            "{name}: {err}"
        );
    }
    let err = run_err(
        lorasft()
            .args(["chat", "render", "--template"])
            .arg(tmp.path().join("raises.jinja"))
            .arg("--messages")
            .arg(&messages),
    );
    assert!(
        err.contains("no system"),
        "the template's own message: {err}"
    );

    // A messages file that is not JSON, or not a conversation, is named.
    for (name, body) in [("broken.json", "[{\"role\": "), ("number.json", "7")] {
        let file = tmp.path().join(name);
        std::fs::write(&file, body).unwrap();
        let err = run_err(
            lorasft()
                .args(["chat", "render", "--template"])
                .arg(template())
                .arg("--messages")
                .arg(&file),
        );
        assert!(err.contains(&file.display().to_string()), "{name}: {err}");
    }
}

#[test]
fn data_encode_labels_only_the_assistant_turns_and_skips_unanswered_conversations() {
    let tmp = tempfile::tempdir().unwrap();
    let data = chat_data("conversations.jsonl");
    let out = tmp.path().join("encoded.jsonl");
    let encode = |labels: &str, data: &Path| {
        let mut cmd = lorasft();
        cmd.args(["data", "encode", "--data"])
            .arg(data)
            .arg("--tokenizer")
            .arg(common::fixture_tokenizer())
            .arg("--chat-template")
            .arg(template())
            .args(["--labels", labels, "--out"])
            .arg(&out);
        cmd
    };
    let printed = common::output_ok(&mut encode("assistant-only", &data));
    assert!(
        printed.contains("wrote 3 examples")
            && printed.contains("skipped, with no trained turn: 1"),
        "{printed}"
    );
    let tokenizer = lorasft::tokenizer::load(&common::fixture_tokenizer()).unwrap();
    let answered: Vec<Vec<Value>> = jsonl_messages(&data)
        .into_iter()
        .filter(|m| m.iter().any(|m| m["role"] == "assistant"))
        .collect();
    let lines: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), answered.len());
    for (line, messages) in lines.iter().zip(&answered) {
        let (text, spans) = chatml(messages);
        assert_eq!(line["text"], text.as_str());
        // The ids are the tokenizer's encoding of the text (BOS from its post-processor).
        let enc = tokenizer.encode(text.as_str(), true).unwrap();
        let ids: Vec<i64> = line["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert_eq!(
            ids,
            enc.get_ids()
                .iter()
                .map(|&i| i64::from(i))
                .collect::<Vec<_>>()
        );
        // A token is trained exactly when its bytes overlap an assistant turn.
        let labels: Vec<i64> = line["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        let want: Vec<i64> = enc
            .get_offsets()
            .iter()
            .zip(enc.get_special_tokens_mask())
            .zip(&ids)
            .map(|((&(a, b), &special), &id)| {
                let trained = special == 0 && spans.iter().any(|s| a < s.end && b > s.start);
                if trained { id } else { -100 }
            })
            .collect();
        assert_eq!(labels, want, "{text}");
        assert!(labels.iter().any(|&l| l != -100), "{text}");
    }

    let err = run_err(&mut encode("completion-only", &data));
    assert!(err.contains("assistant_only"), "{err}");

    // A bad record: the file, its line, the record and the field.
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n\
         {\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": 7}]}\n",
    )
    .unwrap();
    let err = run_err(&mut encode("assistant-only", &bad));
    assert!(
        err.contains(&format!("{}:2", bad.display()))
            && err.contains("record 1")
            && err.contains("messages[1].content"),
        "{err}"
    );
}

#[test]
fn data_show_brackets_the_assistant_text_only() {
    let data = chat_data("conversations.jsonl");
    let show = |start: &str| {
        let mut cmd = lorasft();
        cmd.args(["data", "show", "--data"])
            .arg(&data)
            .arg("--tokenizer")
            .arg(common::fixture_tokenizer())
            .arg("--chat-template")
            .arg(template())
            .args([
                "--labels",
                "assistant-only",
                "--records",
                "10",
                "--start",
                start,
            ])
            .env("NO_COLOR", "1");
        cmd
    };
    let out = common::stdout_ok(&mut show("0"));
    assert!(!out.contains('\x1b'), "no colour with NO_COLOR:\n{out}");
    let assistant: Vec<String> = jsonl_messages(&data)
        .iter()
        .flatten()
        .filter(|m| m["role"] == "assistant")
        .map(|m| format!("{}<|im_end|>", m["content"].as_str().unwrap()))
        .collect();
    let (_, records) = out
        .split_once("trained tokens are in [[ ]]\n")
        .unwrap_or_else(|| panic!("no legend:\n{out}"));
    assert_eq!(marked(records), assistant, "{out}");
    assert!(
        out.contains("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"),
        "the user turn is shown unmarked:\n{out}"
    );
    assert!(out.contains("no trained turn"), "{out}");
    let err = run_err(&mut show("4"));
    assert!(err.contains("--start 4"), "{err}");
}

#[test]
fn generate_chat_prompts_with_the_template_and_ends_with_the_assistant_header() {
    let generate = |input: &[&str], chat_template: bool| {
        let mut cmd = lorasft();
        cmd.args(["generate", "--model", "fixture:0", "--tokenizer"])
            .arg(common::fixture_tokenizer())
            .args(["--chat", "--max-new-tokens", "3"])
            .args(input);
        if chat_template {
            cmd.arg("--chat-template").arg(template());
        }
        cmd
    };
    let out = common::stdout_ok(&mut generate(&["--instruction", "Name a colour."], true));
    let prompt = format!("<|im_start|>user\nName a colour.<|im_end|>\n{ASSISTANT_HEADER}");
    let tokens = lorasft::tokenizer::load(&common::fixture_tokenizer())
        .unwrap()
        .encode(prompt.as_str(), true)
        .unwrap()
        .len();
    assert!(
        out.starts_with(&format!(
            "=== prompt ({tokens} tokens)\n{prompt}\n--- output"
        )),
        "{out}"
    );
    let messages = chat_data("render_messages.json");
    let out = common::stdout_ok(&mut generate(
        &["--messages", messages.to_str().unwrap()],
        true,
    ));
    assert!(
        out.contains(&format!("{RENDERED}{ASSISTANT_HEADER}\n--- output")),
        "{out}"
    );
    // The fixture tokenizer carries no template of its own.
    let err = run_err(&mut generate(&["--instruction", "Hi"], false));
    assert!(err.contains("no chat template"), "{err}");
}

/// SmolLM2's GGUF: import writes its template into tokenizer_config.json, rendering from the
/// GGUF and from the import agree, a stale import (no template) is refreshed when used as a
/// `gguf:` source while a template edited into the import is kept, and export writes the
/// template back into the GGUF.
#[test]
fn gguf_chat_template_survives_import_refresh_and_export() {
    let Some(assets) = common::assets() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    // A private copy: a `gguf:` source imports into PATH.hf beside it.
    let gguf = tmp.path().join("smollm2.gguf");
    std::fs::copy(
        assets.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        &gguf,
    )
    .unwrap();
    let key = lorasft::chat::locate::GGUF_KEY;
    let want = lorasft::gguf::Gguf::read(&gguf).unwrap().metadata[key]
        .as_str()
        .unwrap()
        .to_string();
    let dir = gguf.with_extension("hf");
    common::stdout_ok(
        lorasft()
            .arg("import-gguf")
            .arg(&gguf)
            .arg("--out")
            .arg(&dir),
    );
    let cfg_path = dir.join("tokenizer_config.json");
    let config =
        || -> Value { serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap() };
    assert_eq!(config()["chat_template"], want.as_str());

    // The GGUF and the import render alike (SmolLM2 adds its system prompt when none is given).
    let user_only = tmp.path().join("user_only.json");
    std::fs::write(
        &user_only,
        json!([{"role": "user", "content": "Hi!"}]).to_string(),
    )
    .unwrap();
    for messages in [chat_data("render_messages.json"), user_only] {
        for flags in [&[][..], &["--add-generation-prompt"][..]] {
            let from_gguf = render(&gguf, &messages, flags);
            assert_eq!(from_gguf, render(&dir, &messages, flags));
            assert!(from_gguf.starts_with("<|im_start|>system\n"), "{from_gguf}");
        }
    }

    // A stale import: `data encode --model gguf:` refreshes it and encodes with the template.
    let mut stale = config();
    stale.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(&cfg_path, stale.to_string()).unwrap();
    let out = tmp.path().join("encoded.jsonl");
    let encode = || {
        common::output_ok(
            lorasft()
                .args(["data", "encode", "--model"])
                .arg(format!("gguf:{}", gguf.display()))
                .arg("--data")
                .arg(chat_data("conversations.jsonl"))
                .args(["--labels", "assistant-only", "--out"])
                .arg(&out),
        )
    };
    let printed = encode();
    assert!(printed.contains("refreshing"), "{printed}");
    assert_eq!(config()["chat_template"], want.as_str());
    let first: Value = serde_json::from_str(
        std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert!(
        first["text"]
            .as_str()
            .unwrap()
            .starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM"),
        "{first}"
    );

    // Export writes the template back.
    let exported = tmp.path().join("exported.gguf");
    common::stdout_ok(
        lorasft()
            .arg("export-gguf")
            .arg("--model")
            .arg(&dir)
            .args(["--type", "q8_0", "--out"])
            .arg(&exported),
    );
    let back = lorasft::gguf::Gguf::read(&exported).unwrap();
    assert_eq!(back.metadata[key].as_str(), Some(want.as_str()));
    std::fs::remove_file(&exported).unwrap();

    // A template edited into the import is the user's: using the source again keeps it.
    let mut edited = config();
    let own = std::fs::read_to_string(template()).unwrap();
    edited["chat_template"] = Value::String(own.clone());
    std::fs::write(&cfg_path, edited.to_string()).unwrap();
    let printed = encode();
    assert!(!printed.contains("refreshing"), "{printed}");
    assert_eq!(config()["chat_template"], own.as_str());
    let first = std::fs::read_to_string(&out).unwrap();
    assert!(
        first.starts_with("{\"text\":\"<|im_start|>user\\nWhat is the capital"),
        "{first}"
    );
}

/// A short smoke training run on conversations: REPORT.md's tokenization section names the
/// format, the template and its hash and shows the first example marked; the adapter
/// directories carry the template.
#[test]
fn training_on_conversations_reports_the_template_and_saves_it_with_the_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    // The fixture instructions as one-turn conversations (those with an answer).
    let records = common::fixture_records();
    let data = tmp.path().join("conversations.jsonl");
    let mut answers = Vec::new();
    let mut lines = String::new();
    for r in records.iter().filter(|r| !r.output.is_empty()) {
        let user = match r.input.as_deref().filter(|_| r.has_input()) {
            Some(input) => format!("{}\n\n{input}", r.instruction),
            None => r.instruction.clone(),
        };
        let conv = json!({"messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": r.output},
        ]});
        lines.push_str(&format!("{conv}\n"));
        answers.push(format!("{}<|im_end|>", r.output));
    }
    std::fs::write(&data, lines).unwrap();
    let runs = tmp.path().join("runs");
    common::output_ok(
        lorasft()
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["train", "--preset", "smoke", "--max-steps", "2", "--quiet"])
            .arg("--set")
            .arg(format!("data.path=\"{}\"", data.display()))
            .arg("--set")
            .arg(format!("encode.chat_template=\"{}\"", template().display()))
            .args(["--set", "encode.labels=\"assistant_only\""])
            .arg("--out-dir")
            .arg(&runs),
    );
    let run = runs.join("smoke");
    let report = std::fs::read_to_string(run.join("REPORT.md")).unwrap();
    let section = report
        .split("## Tokenization")
        .nth(1)
        .and_then(|s| s.split("\n---").next())
        .unwrap_or_else(|| panic!("no tokenization section:\n{report}"));
    let text = std::fs::read_to_string(template()).unwrap();
    let sha = format!("{:x}", Sha256::digest(text.as_bytes()));
    let line = section
        .lines()
        .find(|l| l.starts_with("- Template: "))
        .unwrap_or_else(|| panic!("no template line:\n{section}"));
    assert!(
        line.ends_with(&format!("chatml.jinja (SHA-256 `{}`)", &sha[..16])),
        "{line}"
    );
    for want in [
        "- Data format: messages",
        "- Assistant spans found by: prefix differences",
        "trained tokens in `[[ ]]`",
    ] {
        assert!(section.contains(want), "{want}:\n{section}");
    }
    let example = section
        .split("```text\n")
        .nth(1)
        .and_then(|s| s.split("\n```").next())
        .unwrap_or_else(|| panic!("no marked example:\n{section}"));
    let spans = marked(example);
    assert_eq!(spans.len(), 1, "{example}");
    assert!(answers.iter().any(|a| a == spans[0]), "{example}");
    assert!(example.starts_with("<|im_start|>user\n"), "{example}");
    for dir in ["adapter", "best"] {
        let cfg: Value = serde_json::from_str(
            &std::fs::read_to_string(run.join(dir).join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["chat_template"], text.as_str(), "{dir}");
    }
}
