//! lorasft's chat-template renderer against transformers' own (`scripts/chat_reference.py`,
//! whose output is committed as `tests/data/chat/reference.json`): every template in
//! llama.cpp's `models/templates/` on fixed conversations, with and without the generation
//! prompt, and every template case of llama.cpp's `tests/test-chat-template.cpp`. A render
//! must equal transformers' byte for byte, or both must refuse the conversation.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use lorasft::chat::{ChatTemplate, RenderOptions};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn data(name: &str) -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/chat")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// 2024-07-26 00:00:00 UTC, the time the reference fixed for `strftime_now`.
const NOW: i64 = 1_721_952_000;

/// The largest char boundary of `s` at or below `i` (std's `floor_char_boundary` is newer than
/// the crate's MSRV).
fn floor(s: &str, i: usize) -> usize {
    let mut i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[derive(Default, Debug)]
struct Tally {
    equal: usize,
    both_refuse: usize,
    differ: Vec<String>,
}

impl Tally {
    fn check(&mut self, what: String, ours: lorasft::Result<String>, theirs: &Value) {
        match (ours, theirs.get("output").and_then(Value::as_str)) {
            (Ok(a), Some(b)) if a == b => self.equal += 1,
            (Err(_), None) => self.both_refuse += 1,
            (Ok(a), Some(b)) => {
                let at = a
                    .char_indices()
                    .zip(b.chars())
                    .find(|((_, x), y)| x != y)
                    .map_or(a.len().min(b.len()), |((i, _), _)| i);
                let lo = floor(&a, at.saturating_sub(40));
                self.differ.push(format!(
                    "{what}: differs at byte {at}: ours {:?} / transformers {:?}",
                    &a[lo..floor(&a, at + 40)],
                    b.get(lo..floor(b, at + 40)).unwrap_or("")
                ))
            }
            (Ok(_), None) => self.differ.push(format!(
                "{what}: ours renders, transformers raises {}",
                theirs["error"]
            )),
            (Err(e), Some(_)) => self.differ.push(format!("{what}: ours fails: {e}")),
        }
    }
}

#[test]
fn every_llama_cpp_template_renders_as_transformers_renders_it() {
    let Some(assets) = common::assets() else {
        return;
    };
    let dir = assets.join("chat/templates");
    let reference = data("reference.json");
    let convs: BTreeMap<String, Value> = data("conversations.json")
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["id"].as_str().unwrap().to_string(), c.clone()))
        .collect();
    let opts = RenderOptions {
        now: Some(NOW),
        ..RenderOptions::new(
            reference["bos_token"].as_str().unwrap(),
            reference["eos_token"].as_str().unwrap(),
        )
    };
    let mut tally = Tally::default();
    // Per template: (every case equal, some case refused by both, some case differs).
    let (mut all_equal, mut some_refused, mut some_differ) = (0, 0, 0);
    let templates = reference["templates"].as_array().unwrap();
    assert!(templates.len() >= 70, "{} templates", templates.len());
    for t in templates {
        let file = t["file"].as_str().unwrap();
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        assert_eq!(
            format!("{:x}", Sha256::digest(text.as_bytes())),
            t["sha256"].as_str().unwrap(),
            "{file} is not the template the reference rendered"
        );
        let tmpl = ChatTemplate::new(file, text);
        let before = (tally.equal, tally.both_refuse, tally.differ.len());
        for case in t["cases"].as_array().unwrap() {
            let conv = &convs[case["conversation"].as_str().unwrap()];
            let prompt = case["add_generation_prompt"].as_bool().unwrap();
            let ours = match &tmpl {
                Ok(tmpl) => tmpl
                    .render_json(
                        &conv["messages"],
                        conv.get("tools").filter(|v| !v.is_null()),
                        &opts.with_generation_prompt(prompt),
                    )
                    .map(|r| r.text),
                Err(e) => Err(lorasft::Error::Invalid(e.to_string())),
            };
            tally.check(
                format!("{file} / {} / gen={prompt}", case["conversation"]),
                ours,
                case,
            );
        }
        if tally.differ.len() > before.2 {
            some_differ += 1;
        } else if tally.both_refuse > before.1 {
            some_refused += 1;
        } else {
            all_equal += 1;
        }
    }
    eprintln!(
        "llama.cpp templates: {} templates render every case equal, {} render the rest equal \
         where both refuse some, {} differ somewhere",
        all_equal, some_refused, some_differ
    );
    eprintln!(
        "llama.cpp templates: {} renders equal, {} refused by both, {} differ",
        tally.equal,
        tally.both_refuse,
        tally.differ.len()
    );
    // The one known difference: functionary-medium-v3.1 builds its tool list as
    // `"..."|safe + name + ... + tool|tojson`, and in Python `Markup + str` HTML-escapes the
    // string even with autoescape off, so transformers writes `&#34;` inside the JSON.
    // minijinja escapes only under autoescape, which would also escape every `~` join. The
    // set must be exactly this, so both a regression and a fix show here.
    let known: Vec<String> = ["tool_call", "parallel_tool_calls"]
        .iter()
        .flat_map(|c| {
            [false, true]
                .map(|p| format!("meetkai-functionary-medium-v3.1.jinja / {c:?} / gen={p}"))
        })
        .collect();
    let mut differ: Vec<&str> = tally
        .differ
        .iter()
        .map(|d| d.split(": ").next().unwrap_or(""))
        .collect();
    differ.sort_unstable();
    let mut want: Vec<&str> = known.iter().map(String::as_str).collect();
    want.sort_unstable();
    assert_eq!(differ, want, "{:#?}", tally.differ);
    assert!(tally.equal > 1000, "{tally:?}");
}

#[test]
fn llama_cpp_test_chat_template_cases_render_as_transformers_renders_them() {
    let reference = data("reference.json");
    let conv = &reference["cpp_conversation"];
    let mut tally = Tally::default();
    for case in reference["cpp_cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let messages = case
            .get("messages")
            .filter(|m| !m.is_null())
            .unwrap_or(conv);
        let opts = RenderOptions {
            now: Some(NOW),
            ..RenderOptions::new(
                case["bos_token"].as_str().unwrap(),
                case["eos_token"].as_str().unwrap(),
            )
        }
        .with_generation_prompt(case["add_generation_prompt"].as_bool().unwrap());
        let ours = ChatTemplate::new(name, case["template"].as_str().unwrap())
            .and_then(|t| t.render_json(messages, None, &opts).map(|r| r.text));
        tally.check(name.to_string(), ours, case);
    }
    eprintln!(
        "test-chat-template.cpp cases: {} equal, {} refused by both, {} differ",
        tally.equal,
        tally.both_refuse,
        tally.differ.len()
    );
    assert!(tally.differ.is_empty(), "{:#?}", tally.differ);
    assert_eq!(tally.equal + tally.both_refuse, 36);
}
