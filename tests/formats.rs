//! Dataset record formats end to end: each format from small JSON and JSONL files, column
//! mapping, detection, LLaMA-Factory's demo files, and errors naming file, line, record and
//! field path.

mod common;

use std::path::{Path, PathBuf};

use lorasft::chat::message::{Message, Role};
use lorasft::data::dataset::{FileFormat, load, load_with, parse_record};
use lorasft::data::formats::{Columns, DataFormat, Sample};
use serde_json::json;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn cols(pairs: &[(&str, &str)]) -> Columns {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Loads `text` written to a temp file called `name`.
fn load_text(
    name: &str,
    text: &str,
    format: Option<DataFormat>,
    columns: &Columns,
) -> lorasft::Result<lorasft::data::Dataset> {
    let dir = tempfile::tempdir().unwrap();
    load_with(&write(dir.path(), name, text), format, columns)
}

fn err_of(name: &str, text: &str, format: Option<DataFormat>, columns: &Columns) -> String {
    load_text(name, text, format, columns)
        .unwrap_err()
        .to_string()
}

/// JSON Lines text of `values`, one per line.
fn jsonl(values: &[serde_json::Value]) -> String {
    values.iter().map(|v| format!("{v}\n")).collect()
}

/// A JSON array of `values`, one element per line starting on line 2.
fn json_array(values: &[serde_json::Value]) -> String {
    let items: Vec<String> = values.iter().map(|v| format!("  {v}")).collect();
    format!("[\n{}\n]\n", items.join(",\n"))
}

fn chats(ds: &lorasft::data::Dataset) -> Vec<&lorasft::chat::message::Conversation> {
    ds.records.iter().map(|s| s.as_chat().unwrap()).collect()
}

/// A file from the real-asset cache, or `None` (skipped with a message) when it is absent and
/// `LORASFT_REQUIRE_ASSETS` is not 1.
fn asset(rel: &str) -> Option<PathBuf> {
    let p = common::assets()?.join(rel);
    if p.exists() {
        return Some(p);
    }
    if std::env::var("LORASFT_REQUIRE_ASSETS").is_ok_and(|v| v == "1") {
        panic!(
            "{} missing and LORASFT_REQUIRE_ASSETS=1: run scripts/fetch-assets.sh",
            p.display()
        );
    }
    eprintln!(
        "SKIPPED: {} absent; run scripts/fetch-assets.sh",
        p.display()
    );
    None
}

#[test]
fn alpaca_json_and_jsonl_detected_with_file_format() {
    let recs = [
        json!({"instruction": "x", "output": "y"}),
        json!({"instruction": "p", "input": "q", "output": "r"}),
    ];
    let none = Columns::new();
    let a = load_text("a.json", &json_array(&recs), None, &none).unwrap();
    let b = load_text("b.jsonl", &jsonl(&recs), None, &none).unwrap();
    assert_eq!(
        (a.format, a.file_format),
        (DataFormat::Alpaca, FileFormat::JsonArray)
    );
    assert_eq!(
        (b.format, b.file_format),
        (DataFormat::Alpaca, FileFormat::JsonLines)
    );
    assert_eq!(a.records, b.records);
    assert_eq!(a.lines, [2, 3]);
    assert!(!a.records[0].has_input() && a.records[1].has_input());
    assert_eq!(a.records[1].as_instruction().unwrap().output, "r");
    // `load` is `load_with` without a format or columns.
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "c.jsonl", &jsonl(&recs));
    assert_eq!(load(&p).unwrap().records, b.records);
    // parse_record (the fuzz tests' entry) still reads Alpaca.
    let r = parse_record(&recs[1], &p, 2, 1).unwrap();
    assert_eq!(Sample::Instruction(r), b.records[1]);
}

#[test]
fn alpaca_columns_remap_fields_and_errors_use_the_files_names() {
    let c = cols(&[("instruction", "question"), ("output", "answer")]);
    let text = jsonl(&[
        json!({"question": "2+2?", "answer": "4"}),
        json!({"question": "3+3?", "input": "hint", "answer": "6"}),
    ]);
    for format in [None, Some(DataFormat::Alpaca)] {
        let ds = load_text("q.jsonl", &text, format, &c).unwrap();
        assert_eq!(ds.format, DataFormat::Alpaca);
        let r = ds.records[1].as_instruction().unwrap();
        assert_eq!((r.instruction.as_str(), r.output.as_str()), ("3+3?", "6"));
        assert_eq!(r.input.as_deref(), Some("hint"));
    }
    let e = err_of(
        "q.jsonl",
        &jsonl(&[
            json!({"question": "a", "answer": "b"}),
            json!({"question": "c", "answer": 3}),
        ]),
        None,
        &c,
    );
    assert!(
        e.contains("q.jsonl:2: record 1, field `answer`: expected a string, found number 3"),
        "{e}"
    );
}

#[test]
fn messages_json_and_jsonl_with_parts_tools_and_flags() {
    let recs = [
        json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}], "loss_weight": 0},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
            {"role": "tool", "content": "12:00", "tool_call_id": "c1"},
            {"role": "assistant", "content": "Noon.", "train": true, "reasoning_content": "r"}
        ], "tools": [{"type": "function", "function": {"name": "now", "parameters": {}}}]}),
        json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
    ];
    let none = Columns::new();
    let a = load_text("m.json", &json_array(&recs), None, &none).unwrap();
    let b = load_text("m.jsonl", &jsonl(&recs), None, &none).unwrap();
    assert_eq!(a.records, b.records);
    assert_eq!(a.format, DataFormat::Messages);
    let c = chats(&a);
    let m = &c[0].messages;
    assert_eq!(m[1].content.as_deref(), Some("Hi there"));
    assert_eq!(m[1].train, Some(false));
    assert_eq!(m[2].content, None);
    assert_eq!(
        m[2].tool_calls.as_ref().unwrap()[0]["function"]["arguments"],
        json!("{}")
    );
    assert_eq!(m[3].extra["tool_call_id"], json!("c1"));
    assert_eq!(m[4].train, Some(true));
    assert_eq!(m[4].extra["reasoning_content"], json!("r"));
    assert!(c[0].tools.is_some());
    assert_eq!(
        c[1].messages,
        [
            Message::text(Role::User, "a"),
            Message::text(Role::Assistant, "b")
        ]
    );
    assert_eq!(c[1].tools, None);
}

#[test]
fn messages_columns_remap_the_list_and_message_keys() {
    let text = jsonl(&[
        json!({"dialog": [{"role": "user", "text": "hi"}, {"role": "assistant", "text": "yo"}]}),
    ]);
    let c = cols(&[("messages", "dialog"), ("content", "text")]);
    let ds = load_text("d.jsonl", &text, None, &c).unwrap();
    assert_eq!(ds.format, DataFormat::Messages);
    assert_eq!(chats(&ds)[0].messages[1].content_str(), "yo");
    let e = err_of(
        "d.jsonl",
        &jsonl(&[json!({"dialog": [{"role": "user", "content": "hi"}]})]),
        None,
        &c,
    );
    assert!(
        e.contains("d.jsonl:1: record 0, field `dialog[0].text`: missing"),
        "{e}"
    );
}

/// Two records shaped like LLaMA-Factory's glaive_toolcall_en_demo.json.
const GLAIVE: &str = r#"[
  {
    "conversations": [
      {"from": "human", "value": "I need a recipe with chicken."},
      {"from": "function_call", "value": "{\"name\": \"search_recipes\", \"arguments\": {\"ingredients\": [\"chicken\"]}}"},
      {"from": "observation", "value": "{\"recipes\": [\"Stir Fry\"]}"},
      {"from": "gpt", "value": "Try a stir fry."}
    ],
    "tools": "[{\"name\": \"search_recipes\", \"description\": \"Search for recipes\", \"parameters\": {\"type\": \"object\", \"properties\": {\"ingredients\": {\"type\": \"array\", \"items\": {\"type\": \"string\"}}}, \"required\": [\"ingredients\"]}}]"
  },
  {
    "conversations": [
      {"from": "human", "value": "Tell me a joke."},
      {"from": "gpt", "value": "Why did the chicken cross the road?"}
    ],
    "tools": "[]"
  }
]"#;

#[test]
fn glaive_style_sharegpt_with_tools_as_a_json_string() {
    let ds = load_text("g.json", GLAIVE, None, &Columns::new()).unwrap();
    assert_eq!(ds.format, DataFormat::Sharegpt);
    assert_eq!(ds.lines, [2, 11]);
    let c = chats(&ds);
    let roles: Vec<Role> = c[0].messages.iter().map(|m| m.role).collect();
    assert_eq!(
        roles,
        [Role::User, Role::Assistant, Role::Tool, Role::Assistant]
    );
    let call = &c[0].messages[1];
    assert_eq!(call.content, None);
    assert_eq!(
        call.tool_calls,
        Some(json!([{"type": "function", "function": {
            "name": "search_recipes", "arguments": {"ingredients": ["chicken"]}}}]))
    );
    assert_eq!(
        c[0].messages[2].content_str(),
        r#"{"recipes": ["Stir Fry"]}"#
    );
    let tools = c[0].tools.as_ref().unwrap().as_array().unwrap();
    assert_eq!(tools.len(), 1);
    assert_eq!(tools[0]["type"], json!("function"));
    assert_eq!(tools[0]["function"]["name"], json!("search_recipes"));
    assert_eq!(c[1].tools, None, "an empty tools list is no tools");
}

#[test]
fn sharegpt_system_flags_and_renamed_turn_keys() {
    let text = jsonl(&[json!({
        "chat": [
            {"role": "user", "text": "hi", "loss_weight": 0.0},
            {"role": "assistant", "text": "hello", "train": true}
        ],
        "sys": "Be kind."
    })]);
    let c = cols(&[
        ("conversations", "chat"),
        ("from", "role"),
        ("value", "text"),
        ("system", "sys"),
    ]);
    let ds = load_text("s.jsonl", &text, Some(DataFormat::Sharegpt), &c).unwrap();
    let m = &chats(&ds)[0].messages;
    assert_eq!(m[0], Message::text(Role::System, "Be kind."));
    assert_eq!((m[1].role, m[1].train), (Role::User, Some(false)));
    assert_eq!((m[2].role, m[2].train), (Role::Assistant, Some(true)));
}

#[test]
fn prompt_completion_strings_and_message_lists() {
    let recs = [
        json!({"prompt": "The sky is", "completion": " blue."}),
        json!({"prompt": [{"role": "user", "content": "2+2?"}],
               "completion": [{"role": "assistant", "content": "4"}]}),
    ];
    let none = Columns::new();
    let a = load_text("p.json", &json_array(&recs), None, &none).unwrap();
    let b = load_text("p.jsonl", &jsonl(&recs), None, &none).unwrap();
    assert_eq!(a.records, b.records);
    assert_eq!(a.format, DataFormat::PromptCompletion);
    let c = chats(&a);
    assert_eq!(
        c[0].messages,
        [
            Message::text(Role::User, "The sky is"),
            Message::text(Role::Assistant, " blue.")
        ]
    );
    assert_eq!(c[1].messages[1], Message::text(Role::Assistant, "4"));
    let e = err_of(
        "p.jsonl",
        &jsonl(&[json!({"prompt": "q", "completion": [{"role": "user", "content": "a"}]})]),
        None,
        &none,
    );
    assert!(
        e.contains("p.jsonl:1: record 0, field `completion`: no assistant message"),
        "{e}"
    );
}

#[test]
fn undetectable_first_record_names_file_record_and_formats() {
    let e = err_of(
        "u.json",
        "[\n  {\"rows\": [1, 2]}\n]",
        None,
        &Columns::new(),
    );
    assert!(
        e.contains("u.json:2: record 0: cannot tell the data format"),
        "{e}"
    );
    for part in [
        "messages (`messages`)",
        "sharegpt (`conversations`)",
        "prompt_completion (`prompt`, `completion`)",
        "alpaca (`instruction`, `output`)",
        "found keys `rows`",
    ] {
        assert!(e.contains(part), "{part:?} in {e}");
    }
    let e = err_of("h.jsonl", "{\"prompt\": \"x\"}\n", None, &Columns::new());
    assert!(
        e.contains("looks like prompt_completion but lacks `completion`"),
        "{e}"
    );
    let e = err_of("n.json", "[[1]]", None, &Columns::new());
    assert!(e.contains("n.json:1: record 0: expected an object"), "{e}");
}

#[test]
fn a_record_of_another_format_later_in_the_file_is_an_error() {
    let text = jsonl(&[
        json!({"instruction": "a", "output": "b"}),
        json!({"messages": [{"role": "user", "content": "x"}]}),
    ]);
    let e = err_of("mix.jsonl", &text, None, &Columns::new());
    assert!(
        e.contains("mix.jsonl:2: record 1, field `instruction`: missing")
            && e.contains(
                "looks like messages data, but the dataset is alpaca, as detected from record 0"
            ),
        "{e}"
    );
    let e = err_of(
        "mix.jsonl",
        &text,
        Some(DataFormat::Messages),
        &Columns::new(),
    );
    assert!(
        e.contains("mix.jsonl:1: record 0, field `messages`: missing")
            && e.contains("looks like alpaca data, but the format given is messages"),
        "{e}"
    );
}

#[test]
fn unknown_columns_are_errors_listing_the_valid_ones() {
    let text = jsonl(&[json!({"instruction": "a", "output": "b"})]);
    let e = err_of(
        "c.jsonl",
        &text,
        Some(DataFormat::Alpaca),
        &cols(&[("messages", "m")]),
    );
    assert!(
        e.contains("`messages` is not a field of the alpaca format")
            && e.contains("`instruction`, `input`, `output`"),
        "{e}"
    );
    let e = err_of("c.jsonl", &text, None, &cols(&[("query", "q")]));
    assert!(e.contains("no data format has all of `query`"), "{e}");
}

#[test]
fn bad_fields_name_file_line_record_and_field_path() {
    let ok = json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]});
    let sg = json!({"conversations": [{"from": "human", "value": "hi"}]});
    let cases = [
        (
            json!({"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}),
            "field `messages[1].role`: unknown role \"robot\"; expected `system`, `user`, `assistant` or `tool`",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            "field `messages[0].content[0].type`: unsupported content part type \"image_url\"",
        ),
        (
            json!({"messages": [{"role": "user", "content": null}]}),
            "field `messages[0].content`: null, which only an assistant message with `tool_calls` may have",
        ),
        (
            json!({"messages": [{"role": "user", "content": "a", "tool_calls": []}]}),
            "field `messages[0].tool_calls`: only assistant messages may call tools",
        ),
        (
            json!({"messages": [{"role": "assistant", "content": "a", "loss_weight": 0.3}]}),
            "field `messages[0].loss_weight`: must be 0 or 1, found 0.3",
        ),
        (
            json!({"messages": [{"role": "assistant", "content": "a", "loss_weight": 1, "train": false}]}),
            "field `messages[0].train`: `train: false` disagrees with `loss_weight: 1`",
        ),
        (json!({"messages": []}), "field `messages`: empty list"),
        (
            json!({"messages": [{"role": "user", "content": "a"}], "tools": "not json"}),
            "field `tools`: a string that is not valid JSON",
        ),
    ];
    for (bad, want) in cases {
        // JSONL: the bad record on line 3 (a blank line before it), record 1.
        let text = format!("{ok}\n\n{bad}\n");
        let e = err_of("bad.jsonl", &text, None, &Columns::new());
        assert!(
            e.contains(&format!("bad.jsonl:3: record 1, {want}")),
            "want {want:?}\n got {e}"
        );
        // JSON array: one element per line from line 2, so record 1 is on line 3.
        let e = err_of(
            "bad.json",
            &json_array(&[ok.clone(), bad]),
            None,
            &Columns::new(),
        );
        assert!(
            e.contains(&format!("bad.json:3: record 1, {want}")),
            "want {want:?}\n got {e}"
        );
    }
    for (bad, want) in [
        (
            json!({"conversations": [{"from": "alien", "value": "b"}]}),
            "field `conversations[0].from`: unknown speaker \"alien\"; expected `human`, `user`, `gpt`, `assistant`, `system`, `function_call` or `observation`",
        ),
        (
            json!({"conversations": [{"from": "function_call", "value": "{oops"}]}),
            "field `conversations[0].value`: not valid JSON",
        ),
        (
            json!({"conversations": []}),
            "field `conversations`: empty list",
        ),
    ] {
        let e = err_of(
            "sg.jsonl",
            &jsonl(&[sg.clone(), bad]),
            None,
            &Columns::new(),
        );
        assert!(
            e.contains(&format!("sg.jsonl:2: record 1, {want}")),
            "want {want:?}\n got {e}"
        );
    }
}

#[test]
fn glaive_toolcall_en_demo_loads_with_its_role_counts() {
    let Some(p) = asset("data/glaive_toolcall_en_demo.json") else {
        return;
    };
    let ds = load(&p).unwrap();
    assert_eq!(ds.format, DataFormat::Sharegpt);
    assert_eq!(ds.records.len(), 300);
    let msgs: Vec<&Message> = chats(&ds).iter().flat_map(|c| &c.messages).collect();
    let count = |r: Role| msgs.iter().filter(|m| m.role == r).count();
    assert_eq!(count(Role::User), 746);
    assert_eq!(count(Role::Assistant), 746 + 211);
    assert_eq!(count(Role::Tool), 211);
    assert_eq!(count(Role::System), 0);
    let calls: Vec<&&Message> = msgs.iter().filter(|m| m.tool_calls.is_some()).collect();
    assert_eq!(calls.len(), 211);
    assert!(calls.iter().all(|m| m.role == Role::Assistant
        && m.content.is_none()
        && m.tool_calls.as_ref().unwrap()[0]["function"]["arguments"].is_object()));
    let with_tools: Vec<_> = chats(&ds)
        .into_iter()
        .filter_map(|c| c.tools.as_ref())
        .collect();
    assert_eq!(with_tools.len(), 191, "109 records have tools \"[]\"");
    assert!(
        with_tools
            .iter()
            .flat_map(|t| t.as_array().unwrap())
            .all(|t| { t["type"] == json!("function") && t["function"]["name"].is_string() })
    );
}

#[test]
fn v1_sft_demo_loads_with_loss_weights_and_text_parts() {
    let Some(p) = asset("data/v1_sft_demo.jsonl") else {
        return;
    };
    let ds = load(&p).unwrap();
    assert_eq!(
        (ds.format, ds.file_format),
        (DataFormat::Messages, FileFormat::JsonLines)
    );
    assert_eq!(ds.records.len(), 500);
    for c in chats(&ds) {
        for m in &c.messages {
            let want = match m.role {
                Role::User => Some(false),
                Role::Assistant => Some(true),
                r => panic!("unexpected role {r:?}"),
            };
            assert_eq!(m.train, want);
            assert!(!m.content_str().is_empty() && m.extra.is_empty());
        }
    }
    assert!(
        chats(&ds)[0].messages[1]
            .content_str()
            .starts_with("Hello! I am {{name}}")
    );
}

#[test]
fn mutated_chat_files_give_errors_never_panics() {
    let seeds = [
        GLAIVE.to_string(),
        jsonl(&[
            json!({"messages": [{"role": "user", "content": [{"type": "text", "value": "hi"}], "loss_weight": 0},
                                {"role": "assistant", "content": null, "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}],
                   "tools": "[{\"type\": \"function\"}]"}),
            json!({"prompt": [{"role": "user", "content": "q"}], "completion": "a"}),
        ]),
    ];
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f.json");
    let mut loaded = 0;
    for seed in &seeds {
        let bytes = seed.as_bytes();
        for i in 0..bytes.len() {
            for replace in [None, Some(b'"'), Some(b'0'), Some(b']'), Some(b'{')] {
                let mut b = bytes.to_vec();
                match replace {
                    None => {
                        b.remove(i);
                    }
                    Some(c) => b[i] = c,
                }
                std::fs::write(&p, &b).unwrap();
                for format in [None, Some(DataFormat::Messages), Some(DataFormat::Sharegpt)] {
                    loaded += usize::from(load_with(&p, format, &Columns::new()).is_ok());
                }
            }
        }
    }
    assert!(
        loaded > 0,
        "some mutations (inside string values) still load"
    );
}
