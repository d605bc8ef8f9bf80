//! Dataset record formats: Alpaca instructions and three conversation shapes, parsed into
//! [`Sample`]s with errors that name the file, line, record and field path.
//!
//! | format              | record                                                         |
//! |---------------------|----------------------------------------------------------------|
//! | `alpaca`            | `{instruction, input?, output}`                                |
//! | `messages`          | `{messages: [{role, content, tool_calls?, train?/loss_weight?}], tools?}` (OpenAI / TRL / LLaMA-Factory v1) |
//! | `sharegpt`          | `{conversations: [{from, value}], system?, tools?}` (LLaMA-Factory) |
//! | `prompt_completion` | `{prompt, completion}`, each a string or a message list (TRL)  |
//!
//! Field names can be remapped with [`Columns`] (canonical name -> the name in the file), as
//! LLaMA-Factory's `dataset_info.json` `columns` do. Error field paths use the file's names,
//! so they point at what the user wrote (`dialog[2].role`, not `messages[2].role`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::chat::message::{Conversation, Message, Role};
use crate::data::dataset::Record;
use crate::error::{Error, Result};

/// The shape of a dataset's records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum DataFormat {
    /// `{instruction, input?, output}`: one instruction-tuning example.
    Alpaca,
    /// `{messages: [{role, content, ...}], tools?}`: an OpenAI-style conversation.
    Messages,
    /// `{conversations: [{from, value}], system?, tools?}`: LLaMA-Factory's ShareGPT shape.
    Sharegpt,
    /// `{prompt, completion}` (TRL): a prompt and the completion trained on.
    #[value(alias = "prompt-completion")]
    PromptCompletion,
}

impl DataFormat {
    /// Every format, in detection order (the first whose key fields a record has wins).
    pub const ALL: [DataFormat; 4] = [
        DataFormat::Messages,
        DataFormat::Sharegpt,
        DataFormat::PromptCompletion,
        DataFormat::Alpaca,
    ];

    /// The format's name as configs, the command line and messages spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            DataFormat::Alpaca => "alpaca",
            DataFormat::Messages => "messages",
            DataFormat::Sharegpt => "sharegpt",
            DataFormat::PromptCompletion => "prompt_completion",
        }
    }

    /// The canonical field names [`Columns`] may remap for this format.
    pub fn columns(self) -> &'static [&'static str] {
        match self {
            DataFormat::Alpaca => &["instruction", "input", "output"],
            DataFormat::Messages => &["messages", "tools", "role", "content"],
            DataFormat::Sharegpt => &["conversations", "tools", "from", "value", "system"],
            DataFormat::PromptCompletion => &["prompt", "completion"],
        }
    }

    /// The top-level fields whose presence identifies the format (see [`detect`]).
    pub fn key_fields(self) -> &'static [&'static str] {
        match self {
            DataFormat::Alpaca => &["instruction", "output"],
            DataFormat::Messages => &["messages"],
            DataFormat::Sharegpt => &["conversations"],
            DataFormat::PromptCompletion => &["prompt", "completion"],
        }
    }

    /// Whether every key of `columns` is one of this format's canonical fields.
    fn accepts(self, columns: &Columns) -> bool {
        columns.keys().all(|k| self.columns().contains(&k.as_str()))
    }
}

impl fmt::Display for DataFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Canonical field name -> the name used in the user's file (LLaMA-Factory `columns`).
pub type Columns = BTreeMap<String, String>;

/// The name the file uses for canonical field `canonical`: its mapping, or itself.
pub fn column<'a>(columns: &'a Columns, canonical: &'a str) -> &'a str {
    columns.get(canonical).map_or(canonical, String::as_str)
}

fn quoted(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks that every key of `columns` is a canonical field of `format` and every mapped name
/// is non-empty; an unknown key is an error listing the valid ones.
pub fn validate_columns(format: DataFormat, columns: &Columns) -> Result<()> {
    for (k, v) in columns {
        if !format.columns().contains(&k.as_str()) {
            return Err(Error::Invalid(format!(
                "data columns: `{k}` is not a field of the {format} format; its fields are {}",
                quoted(format.columns())
            )));
        }
        if v.is_empty() {
            return Err(Error::Invalid(format!(
                "data columns: `{k}` maps to an empty name"
            )));
        }
    }
    Ok(())
}

/// Checks that some format accepts every key of `columns` (for loading without a format).
pub fn validate_columns_any(columns: &Columns) -> Result<()> {
    if DataFormat::ALL.iter().any(|f| f.accepts(columns)) {
        return Ok(());
    }
    let keys: Vec<&str> = columns.keys().map(String::as_str).collect();
    let formats = DataFormat::ALL
        .iter()
        .map(|f| format!("{f}: {}", quoted(f.columns())))
        .collect::<Vec<_>>()
        .join("; ");
    Err(Error::Invalid(format!(
        "data columns: no data format has all of {} ({formats})",
        quoted(&keys)
    )))
}

/// Where a record is, for errors: the file, the line it starts on and its index.
#[derive(Debug, Clone, Copy)]
pub struct Locator<'a> {
    /// The dataset file.
    pub path: &'a Path,
    /// 1-based line on which the record starts.
    pub line: usize,
    /// 0-based record index.
    pub record: usize,
}

impl Locator<'_> {
    /// An [`Error::Record`] at this record, about `field` (a path such as `messages[2].role`).
    pub fn error(&self, field: Option<String>, msg: impl Into<String>) -> Error {
        Error::Record {
            path: self.path.to_path_buf(),
            line: self.line,
            record: self.record,
            field,
            msg: msg.into(),
        }
    }

    fn at(&self, field: impl Into<String>, msg: impl Into<String>) -> Error {
        self.error(Some(field.into()), msg)
    }
}

/// One record: an instruction record or a conversation.
#[derive(Debug, Clone, PartialEq)]
pub enum Sample {
    /// An Alpaca record, rendered by the reference prompt template or a chat template.
    Instruction(Record),
    /// A conversation from the `messages`, `sharegpt` or `prompt_completion` formats.
    Chat(Conversation),
}

impl Sample {
    /// Whether the sample is an instruction record with an input block (conversations: never).
    pub fn has_input(&self) -> bool {
        self.as_instruction().is_some_and(Record::has_input)
    }

    /// The instruction record, when the sample is one.
    pub fn as_instruction(&self) -> Option<&Record> {
        match self {
            Sample::Instruction(r) => Some(r),
            Sample::Chat(_) => None,
        }
    }

    /// The conversation, when the sample is one.
    pub fn as_chat(&self) -> Option<&Conversation> {
        match self {
            Sample::Chat(c) => Some(c),
            Sample::Instruction(_) => None,
        }
    }

    /// The sample as a conversation, for chat templates. An instruction record becomes a user
    /// message (instruction, then `\n` and the input when it is non-empty, as LLaMA-Factory's
    /// alpaca converter joins them) and an assistant message (the output).
    pub fn to_conversation(&self) -> Conversation {
        match self {
            Sample::Chat(c) => c.clone(),
            Sample::Instruction(r) => {
                let mut user = r.instruction.clone();
                if let Some(input) = r.input.as_deref().filter(|s| !s.is_empty()) {
                    user.push('\n');
                    user.push_str(input);
                }
                Conversation::new(vec![
                    Message::text(Role::User, user),
                    Message::text(Role::Assistant, r.output.clone()),
                ])
            }
        }
    }
}

/// The format a record's keys identify (names after `columns` mapping), in [`DataFormat::ALL`]
/// order: `messages`, `conversations`, `prompt` + `completion`, `instruction` + `output`.
/// Formats that do not accept every key of `columns` are skipped. `None` when nothing fits.
pub fn detect(first: &Value, columns: &Columns) -> Option<DataFormat> {
    let Value::Object(obj) = first else {
        return None;
    };
    DataFormat::ALL.into_iter().find(|f| {
        f.accepts(columns)
            && f.key_fields()
                .iter()
                .all(|k| obj.contains_key(column(columns, k)))
    })
}

/// Why [`detect`] found nothing, for the loader's error: the formats and their key fields,
/// the keys the record has, and the formats it half-matches.
pub fn detect_failure(v: &Value, columns: &Columns) -> String {
    let Value::Object(obj) = v else {
        return format!("expected an object (one record), found {}", type_name(v));
    };
    let formats = DataFormat::ALL
        .iter()
        .filter(|f| f.accepts(columns))
        .map(|f| {
            let keys: Vec<&str> = f.key_fields().iter().map(|k| column(columns, k)).collect();
            format!("{f} ({})", quoted(&keys))
        })
        .collect::<Vec<_>>()
        .join(", ");
    let found: Vec<&str> = obj.keys().map(String::as_str).collect();
    let mut msg = format!(
        "cannot tell the data format: expected the key fields of one of {formats}; found {}",
        if found.is_empty() {
            "no keys".to_string()
        } else {
            format!("keys {}", quoted(&found))
        }
    );
    for f in DataFormat::ALL.iter().filter(|f| f.accepts(columns)) {
        let (has, lacks): (Vec<&str>, Vec<&str>) = f
            .key_fields()
            .iter()
            .map(|k| column(columns, k))
            .partition(|k| obj.contains_key(*k));
        if !has.is_empty() && !lacks.is_empty() {
            msg.push_str(&format!(" (looks like {f} but lacks {})", quoted(&lacks)));
        }
    }
    msg.push_str("; or name the format explicitly");
    msg
}

/// Parses one record in `format`; `columns` (already validated) maps field names, `at`
/// locates errors. Every problem is an [`Error::Record`] naming the field path.
pub fn parse_sample(
    v: &Value,
    format: DataFormat,
    columns: &Columns,
    at: &Locator,
) -> Result<Sample> {
    match format {
        DataFormat::Alpaca => parse_alpaca(v, columns, at).map(Sample::Instruction),
        DataFormat::Messages => parse_messages(v, columns, at).map(Sample::Chat),
        DataFormat::Sharegpt => parse_sharegpt(v, columns, at).map(Sample::Chat),
        DataFormat::PromptCompletion => parse_prompt_completion(v, columns, at).map(Sample::Chat),
    }
}

/// A value's JSON type for messages (numbers and booleans with their value).
pub(crate) fn type_name(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(_) => "string".into(),
        Value::Array(_) => "array".into(),
        Value::Object(_) => "object".into(),
    }
}

/// An Alpaca record; the messages are those lorasft has always given.
pub fn parse_alpaca(v: &Value, columns: &Columns, at: &Locator) -> Result<Record> {
    let (ins, inp, out) = (
        column(columns, "instruction"),
        column(columns, "input"),
        column(columns, "output"),
    );
    let Value::Object(obj) = v else {
        return Err(at.error(
            None,
            format!(
                "expected an object with `{ins}` and `{out}`, found {}",
                type_name(v)
            ),
        ));
    };
    let optional = |name: &str| -> Result<Option<String>> {
        match obj.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(at.at(
                name,
                format!("expected a string, found {}", type_name(other)),
            )),
        }
    };
    let required = |name: &str| -> Result<String> {
        match obj.get(name) {
            None => Err(at.at(name, "missing (expected a string)")),
            Some(_) => optional(name)?.ok_or_else(|| at.at(name, "expected a string, found null")),
        }
    };
    Ok(Record {
        instruction: required(ins)?,
        input: optional(inp)?,
        output: required(out)?,
    })
}

/// The top-level object of a conversation record.
fn object<'v>(v: &'v Value, what: &str, at: &Locator) -> Result<&'v Map<String, Value>> {
    match v {
        Value::Object(o) => Ok(o),
        _ => Err(at.error(
            None,
            format!("expected an object with {what}, found {}", type_name(v)),
        )),
    }
}

/// A non-empty array field of a record.
fn list<'v>(obj: &'v Map<String, Value>, name: &str, at: &Locator) -> Result<&'v [Value]> {
    match obj.get(name) {
        None => Err(at.at(name, "missing (expected a list of messages)")),
        Some(Value::Array(a)) if a.is_empty() => {
            Err(at.at(name, "empty list (a conversation needs messages)"))
        }
        Some(Value::Array(a)) => Ok(a),
        Some(other) => Err(at.at(
            name,
            format!("expected a list of messages, found {}", type_name(other)),
        )),
    }
}

/// The message-level names in the file.
#[derive(Clone, Copy)]
struct MessageKeys<'a> {
    role: &'a str,
    content: &'a str,
}

const DEFAULT_KEYS: MessageKeys<'static> = MessageKeys {
    role: "role",
    content: "content",
};

fn parse_messages(v: &Value, columns: &Columns, at: &Locator) -> Result<Conversation> {
    let name = column(columns, "messages");
    let obj = object(v, &format!("`{name}`"), at)?;
    let keys = MessageKeys {
        role: column(columns, "role"),
        content: column(columns, "content"),
    };
    let messages = list(obj, name, at)?
        .iter()
        .enumerate()
        .map(|(i, m)| parse_message(m, &format!("{name}[{i}]"), keys, at))
        .collect::<Result<Vec<_>>>()?;
    let tools_name = column(columns, "tools");
    Ok(Conversation {
        messages,
        tools: parse_tools(obj.get(tools_name), tools_name, false, at)?,
    })
}

/// One OpenAI-style message at field path `path` (e.g. `messages[3]`).
fn parse_message(v: &Value, path: &str, keys: MessageKeys, at: &Locator) -> Result<Message> {
    let Value::Object(obj) = v else {
        return Err(at.at(
            path,
            format!(
                "expected a message object with `{}` and `{}`, found {}",
                keys.role,
                keys.content,
                type_name(v)
            ),
        ));
    };
    let roles = "`system`, `user`, `assistant` or `tool`";
    let role_path = format!("{path}.{}", keys.role);
    let role = match obj.get(keys.role) {
        None => return Err(at.at(role_path, format!("missing (expected {roles})"))),
        Some(Value::String(s)) => Role::parse(s)
            .ok_or_else(|| at.at(&role_path, format!("unknown role {s:?}; expected {roles}")))?,
        Some(other) => {
            return Err(at.at(
                role_path,
                format!("expected a string ({roles}), found {}", type_name(other)),
            ));
        }
    };
    let tool_calls = parse_tool_calls(obj.get("tool_calls"), role, path, at)?;
    let content_path = format!("{path}.{}", keys.content);
    let content = match obj.get(keys.content) {
        None | Some(Value::Null) if role == Role::Assistant && tool_calls.is_some() => None,
        None => {
            return Err(at.at(
                content_path,
                "missing (expected a string or a list of text parts)",
            ));
        }
        Some(Value::Null) => {
            return Err(at.at(
                content_path,
                "null, which only an assistant message with `tool_calls` may have",
            ));
        }
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(parts)) => Some(join_parts(parts, &content_path, at)?),
        Some(other) => {
            return Err(at.at(
                content_path,
                format!(
                    "expected a string or a list of text parts, found {}",
                    type_name(other)
                ),
            ));
        }
    };
    let train = parse_train(obj, path, at)?;
    let extra = obj
        .iter()
        .filter(|(k, _)| {
            ![
                keys.role,
                keys.content,
                "tool_calls",
                "train",
                "loss_weight",
            ]
            .contains(&k.as_str())
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok(Message {
        role,
        content,
        tool_calls,
        train,
        extra,
    })
}

/// Content given as `[{type: "text", text|value}, ...]`, joined with "".
fn join_parts(parts: &[Value], path: &str, at: &Locator) -> Result<String> {
    let mut out = String::new();
    for (j, part) in parts.iter().enumerate() {
        let part_path = format!("{path}[{j}]");
        let Value::Object(p) = part else {
            return Err(at.at(
                part_path,
                format!(
                    "expected a content part `{{\"type\": \"text\", \"text\": ...}}`, found {}",
                    type_name(part)
                ),
            ));
        };
        match p.get("type") {
            Some(Value::String(t)) if t == "text" => {}
            Some(Value::String(t)) => {
                return Err(at.at(
                    format!("{part_path}.type"),
                    format!(
                        "unsupported content part type {t:?}; only \"text\" parts are supported"
                    ),
                ));
            }
            None => return Err(at.at(format!("{part_path}.type"), "missing (expected \"text\")")),
            Some(other) => {
                return Err(at.at(
                    format!("{part_path}.type"),
                    format!("expected \"text\", found {}", type_name(other)),
                ));
            }
        }
        let (key, text) = match (p.get("text"), p.get("value")) {
            (Some(t), _) => ("text", t),
            (None, Some(v)) => ("value", v),
            (None, None) => {
                return Err(at.at(part_path, "a text part needs a string `text` (or `value`)"));
            }
        };
        match text {
            Value::String(s) => out.push_str(s),
            other => {
                return Err(at.at(
                    format!("{part_path}.{key}"),
                    format!("expected a string, found {}", type_name(other)),
                ));
            }
        }
    }
    Ok(out)
}

/// `tool_calls`: absent/null -> none; otherwise an array of objects, on assistant messages
/// only, passed through as given (a string `function.arguments` stays a string). An empty
/// array is treated as absent.
fn parse_tool_calls(
    v: Option<&Value>,
    role: Role,
    path: &str,
    at: &Locator,
) -> Result<Option<Value>> {
    let field = format!("{path}.tool_calls");
    let calls = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(at.at(
                field,
                format!("expected a list of tool calls, found {}", type_name(other)),
            ));
        }
    };
    if role != Role::Assistant {
        return Err(at.at(
            field,
            format!(
                "only assistant messages may call tools (this is a {} message)",
                role.as_str()
            ),
        ));
    }
    for (j, c) in calls.iter().enumerate() {
        let Value::Object(call) = c else {
            return Err(at.at(
                format!("{field}[{j}]"),
                format!("expected a tool call object, found {}", type_name(c)),
            ));
        };
        if let Some(f) = call.get("function").filter(|f| !f.is_object()) {
            return Err(at.at(
                format!("{field}[{j}].function"),
                format!(
                    "expected an object with `name` and `arguments`, found {}",
                    type_name(f)
                ),
            ));
        }
    }
    Ok((!calls.is_empty()).then(|| Value::Array(calls.clone())))
}

/// The per-message training flag from `train` (bool) and/or `loss_weight` (0 or 1).
fn parse_train(obj: &Map<String, Value>, path: &str, at: &Locator) -> Result<Option<bool>> {
    let from_weight = match obj.get("loss_weight") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_f64() {
            Some(0.0) => Some(false),
            Some(1.0) => Some(true),
            _ => {
                return Err(at.at(
                    format!("{path}.loss_weight"),
                    format!("must be 0 or 1, found {n}"),
                ));
            }
        },
        Some(other) => {
            return Err(at.at(
                format!("{path}.loss_weight"),
                format!("expected 0 or 1, found {}", type_name(other)),
            ));
        }
    };
    let from_train = match obj.get("train") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(other) => {
            return Err(at.at(
                format!("{path}.train"),
                format!("expected true or false, found {}", type_name(other)),
            ));
        }
    };
    match (from_train, from_weight) {
        (Some(t), Some(w)) if t != w => Err(at.at(
            format!("{path}.train"),
            format!(
                "`train: {t}` disagrees with `loss_weight: {}`",
                obj["loss_weight"]
            ),
        )),
        (t, w) => Ok(t.or(w)),
    }
}

/// `tools`: absent, null, "" or [] -> none; an array or a JSON string holding one, of objects.
/// With `wrap`, a bare function object `{name, ...}` becomes `{type: "function", function}`.
fn parse_tools(v: Option<&Value>, name: &str, wrap: bool, at: &Locator) -> Result<Option<Value>> {
    let parsed;
    let tools = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => return Ok(None),
        Some(Value::String(s)) => {
            parsed = serde_json::from_str::<Value>(s)
                .map_err(|e| at.at(name, format!("a string that is not valid JSON: {e}")))?;
            match &parsed {
                Value::Array(a) => a,
                other => {
                    return Err(at.at(
                        name,
                        format!(
                            "a JSON string holding {}, expected one holding a list of tools",
                            type_name(other)
                        ),
                    ));
                }
            }
        }
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(at.at(
                name,
                format!(
                    "expected a list of tools (or a JSON string of one), found {}",
                    type_name(other)
                ),
            ));
        }
    };
    let mut out = Vec::with_capacity(tools.len());
    for (j, t) in tools.iter().enumerate() {
        let Value::Object(tool) = t else {
            return Err(at.at(
                format!("{name}[{j}]"),
                format!("expected a tool object, found {}", type_name(t)),
            ));
        };
        if wrap && !tool.contains_key("type") && !tool.contains_key("function") {
            let mut w = Map::new();
            w.insert("type".into(), Value::String("function".into()));
            w.insert("function".into(), t.clone());
            out.push(Value::Object(w));
        } else {
            out.push(t.clone());
        }
    }
    Ok((!out.is_empty()).then_some(Value::Array(out)))
}

fn parse_sharegpt(v: &Value, columns: &Columns, at: &Locator) -> Result<Conversation> {
    let name = column(columns, "conversations");
    let obj = object(v, &format!("`{name}`"), at)?;
    let turns = list(obj, name, at)?;
    let (from_key, value_key) = (column(columns, "from"), column(columns, "value"));
    let system_key = column(columns, "system");
    let mut messages = Vec::with_capacity(turns.len() + 1);
    match obj.get(system_key) {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => messages.push(Message::text(Role::System, s.clone())),
        Some(other) => {
            return Err(at.at(
                system_key,
                format!("expected a string, found {}", type_name(other)),
            ));
        }
    }
    for (i, t) in turns.iter().enumerate() {
        let path = format!("{name}[{i}]");
        messages.push(parse_turn(t, &path, from_key, value_key, at)?);
    }
    let tools_name = column(columns, "tools");
    Ok(Conversation {
        messages,
        tools: parse_tools(obj.get(tools_name), tools_name, true, at)?,
    })
}

/// One ShareGPT turn `{from, value}` at field path `path`.
fn parse_turn(
    v: &Value,
    path: &str,
    from_key: &str,
    value_key: &str,
    at: &Locator,
) -> Result<Message> {
    let Value::Object(obj) = v else {
        return Err(at.at(
            path,
            format!(
                "expected a turn object with `{from_key}` and `{value_key}`, found {}",
                type_name(v)
            ),
        ));
    };
    let accepted =
        "`human`, `user`, `gpt`, `assistant`, `system`, `function_call` or `observation`";
    let from_path = format!("{path}.{from_key}");
    let from = match obj.get(from_key) {
        None => return Err(at.at(from_path, format!("missing (expected {accepted})"))),
        Some(Value::String(s)) => s.as_str(),
        Some(other) => {
            return Err(at.at(
                from_path,
                format!("expected a string ({accepted}), found {}", type_name(other)),
            ));
        }
    };
    let value_path = format!("{path}.{value_key}");
    let value = match obj.get(value_key) {
        None => return Err(at.at(value_path, "missing (expected a string)")),
        Some(Value::String(s)) => s,
        Some(other) => {
            return Err(at.at(
                value_path,
                format!("expected a string, found {}", type_name(other)),
            ));
        }
    };
    let mut message = match from {
        "human" | "user" => Message::text(Role::User, value.clone()),
        "gpt" | "assistant" => Message::text(Role::Assistant, value.clone()),
        "system" => Message::text(Role::System, value.clone()),
        "observation" => Message::text(Role::Tool, value.clone()),
        "function_call" => Message {
            role: Role::Assistant,
            content: None,
            tool_calls: Some(function_call(value, &value_path, at)?),
            train: None,
            extra: Map::new(),
        },
        other => {
            return Err(at.at(
                from_path,
                format!("unknown speaker {other:?}; expected {accepted}"),
            ));
        }
    };
    message.train = parse_train(obj, path, at)?;
    message.extra = obj
        .iter()
        .filter(|(k, _)| ![from_key, value_key, "train", "loss_weight"].contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok(message)
}

/// A `function_call` turn's value: JSON `{"name", "arguments"}` or a list of them, as
/// OpenAI-style `tool_calls`.
fn function_call(value: &str, path: &str, at: &Locator) -> Result<Value> {
    let expected = "a JSON object `{\"name\": ..., \"arguments\": {...}}` or a list of them";
    let parsed: Value = serde_json::from_str(value)
        .map_err(|e| at.at(path, format!("not valid JSON ({e}); expected {expected}")))?;
    let calls = match parsed {
        Value::Array(a) if !a.is_empty() => a,
        Value::Object(_) => vec![parsed],
        other => {
            return Err(at.at(
                path,
                format!("JSON {}, expected {expected}", type_name(&other)),
            ));
        }
    };
    let mut out = Vec::with_capacity(calls.len());
    for c in calls {
        let Value::Object(mut call) = c else {
            return Err(at.at(
                path,
                format!("a list holding {}, expected {expected}", type_name(&c)),
            ));
        };
        let name = match call.remove("name") {
            Some(Value::String(n)) => n,
            _ => {
                return Err(at.at(
                    path,
                    format!("a call without a string `name`; expected {expected}"),
                ));
            }
        };
        let arguments = match call.remove("arguments") {
            Some(a @ (Value::Object(_) | Value::String(_))) => a,
            None => Value::Object(Map::new()),
            Some(other) => {
                return Err(at.at(
                    path,
                    format!(
                        "a call whose `arguments` is {}, expected an object",
                        type_name(&other)
                    ),
                ));
            }
        };
        let mut function = Map::new();
        function.insert("name".into(), Value::String(name));
        function.insert("arguments".into(), arguments);
        let mut wrapped = Map::new();
        wrapped.insert("type".into(), Value::String("function".into()));
        wrapped.insert("function".into(), Value::Object(function));
        out.push(Value::Object(wrapped));
    }
    Ok(Value::Array(out))
}

fn parse_prompt_completion(v: &Value, columns: &Columns, at: &Locator) -> Result<Conversation> {
    let (p, c) = (column(columns, "prompt"), column(columns, "completion"));
    let obj = object(v, &format!("`{p}` and `{c}`"), at)?;
    let side = |name: &str, role: Role| -> Result<Vec<Message>> {
        match obj.get(name) {
            None => Err(at.at(name, "missing (expected a string or a list of messages)")),
            Some(Value::String(s)) => Ok(vec![Message::text(role, s.clone())]),
            Some(Value::Array(a)) if a.is_empty() => Err(at.at(name, "empty list of messages")),
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, m)| parse_message(m, &format!("{name}[{i}]"), DEFAULT_KEYS, at))
                .collect(),
            Some(other) => Err(at.at(
                name,
                format!(
                    "expected a string or a list of messages, found {}",
                    type_name(other)
                ),
            )),
        }
    };
    let mut messages = side(p, Role::User)?;
    let completion = side(c, Role::Assistant)?;
    if !completion.iter().any(|m| m.role == Role::Assistant) {
        return Err(at.at(
            c,
            "no assistant message (the completion is what is trained)",
        ));
    }
    messages.extend(completion);
    Ok(Conversation::new(messages))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at() -> Locator<'static> {
        Locator {
            path: Path::new("d.jsonl"),
            line: 7,
            record: 3,
        }
    }

    fn parse(v: Value, f: DataFormat) -> Result<Sample> {
        parse_sample(&v, f, &Columns::new(), &at())
    }

    fn err(v: Value, f: DataFormat) -> String {
        parse(v, f).unwrap_err().to_string()
    }

    fn cols(pairs: &[(&str, &str)]) -> Columns {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn display_and_serde_use_snake_case() {
        assert_eq!(
            DataFormat::PromptCompletion.to_string(),
            "prompt_completion"
        );
        assert_eq!(
            serde_json::to_value(DataFormat::PromptCompletion).unwrap(),
            json!("prompt_completion")
        );
        use clap::ValueEnum;
        assert_eq!(
            DataFormat::from_str("prompt_completion", false).unwrap(),
            DataFormat::PromptCompletion
        );
        assert_eq!(
            DataFormat::from_str("prompt-completion", false).unwrap(),
            DataFormat::PromptCompletion
        );
        for f in DataFormat::ALL {
            assert_eq!(DataFormat::from_str(f.as_str(), false).unwrap(), f);
        }
    }

    #[test]
    fn detection_follows_key_fields_and_columns() {
        let none = Columns::new();
        assert_eq!(
            detect(&json!({"messages": []}), &none),
            Some(DataFormat::Messages)
        );
        assert_eq!(
            detect(&json!({"conversations": [], "tools": "[]"}), &none),
            Some(DataFormat::Sharegpt)
        );
        assert_eq!(
            detect(&json!({"prompt": "a", "completion": "b"}), &none),
            Some(DataFormat::PromptCompletion)
        );
        assert_eq!(
            detect(&json!({"instruction": "a", "output": "b"}), &none),
            Some(DataFormat::Alpaca)
        );
        assert_eq!(detect(&json!({"instruction": "a"}), &none), None);
        assert_eq!(detect(&json!({"prompt": "a"}), &none), None);
        assert_eq!(detect(&json!([1]), &none), None);
        assert_eq!(
            detect(&json!({"dialog": []}), &cols(&[("messages", "dialog")])),
            Some(DataFormat::Messages)
        );
        assert_eq!(
            detect(
                &json!({"question": "q", "answer": "a"}),
                &cols(&[("instruction", "question"), ("output", "answer")])
            ),
            Some(DataFormat::Alpaca)
        );
        // Columns that only alpaca accepts rule the others out.
        assert_eq!(
            detect(
                &json!({"messages": [], "q": "q", "output": "a"}),
                &cols(&[("instruction", "q")])
            ),
            Some(DataFormat::Alpaca)
        );
        let why = detect_failure(&json!({"instruction": "a", "id": 1}), &none);
        assert!(
            why.contains("looks like alpaca but lacks `output`"),
            "{why}"
        );
        assert!(why.contains("sharegpt (`conversations`)"), "{why}");
        assert!(why.contains("keys `instruction`, `id`"), "{why}");
    }

    #[test]
    fn columns_are_validated_per_format() {
        validate_columns(DataFormat::Messages, &cols(&[("content", "text")])).unwrap();
        let e = validate_columns(DataFormat::Alpaca, &cols(&[("question", "q")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`question` is not a field of the alpaca format")
                && e.contains("`instruction`, `input`, `output`"),
            "{e}"
        );
        let e = validate_columns(DataFormat::Sharegpt, &cols(&[("role", "r")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`conversations`, `tools`, `from`, `value`, `system`"),
            "{e}"
        );
        assert!(validate_columns(DataFormat::Alpaca, &cols(&[("output", "")])).is_err());
        validate_columns_any(&cols(&[("tools", "t")])).unwrap();
        let e = validate_columns_any(&cols(&[("bogus", "b")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`bogus`") && e.contains("prompt_completion"),
            "{e}"
        );
    }

    #[test]
    fn message_fields_are_parsed_and_extra_keeps_order() {
        let s = parse(
            json!({"messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "value": "b"}],
                 "loss_weight": 0.0, "name": "ann", "id": 4},
                {"role": "assistant", "content": null, "train": true,
                 "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
                {"role": "tool", "content": "42", "tool_call_id": "c1"},
                {"role": "assistant", "content": "ok", "loss_weight": 1, "train": true}
            ], "tools": [{"type": "function", "function": {"name": "f"}}]}),
            DataFormat::Messages,
        )
        .unwrap();
        let c = s.as_chat().unwrap();
        assert!(!s.has_input() && s.as_instruction().is_none());
        assert_eq!(c.messages.len(), 5);
        assert_eq!(c.messages[1].content.as_deref(), Some("ab"));
        assert_eq!(c.messages[1].train, Some(false));
        let keys: Vec<&str> = c.messages[1].extra.keys().map(String::as_str).collect();
        assert_eq!(keys, ["name", "id"]);
        assert_eq!(c.messages[2].content, None);
        assert_eq!(c.messages[2].train, Some(true));
        assert_eq!(
            c.messages[2].tool_calls.as_ref().unwrap()[0]["function"]["arguments"],
            json!("{\"x\": 1}"),
            "string arguments stay a string"
        );
        assert_eq!(c.messages[3].extra["tool_call_id"], json!("c1"));
        assert_eq!(c.messages[4].train, Some(true));
        assert_eq!(c.tools.as_ref().unwrap()[0]["function"]["name"], json!("f"));
        // tools as a JSON string is parsed; empty tools are none.
        let s = parse(
            json!({"messages": [{"role": "user", "content": "x"}], "tools": "[{\"type\": \"function\"}]"}),
            DataFormat::Messages,
        )
        .unwrap();
        assert_eq!(
            s.as_chat().unwrap().tools,
            Some(json!([{"type": "function"}]))
        );
        let s = parse(
            json!({"messages": [{"role": "user", "content": "x"}], "tools": "[]"}),
            DataFormat::Messages,
        )
        .unwrap();
        assert_eq!(s.as_chat().unwrap().tools, None);
    }

    #[test]
    fn message_errors_name_the_field_path() {
        let m = |msg: Value| json!({"messages": [{"role": "user", "content": "hi"}, msg]});
        let cases = [
            (
                m(json!({"role": "bot", "content": "x"})),
                "field `messages[1].role`: unknown role \"bot\"; expected `system`, `user`, `assistant` or `tool`",
            ),
            (
                m(json!({"content": "x"})),
                "field `messages[1].role`: missing",
            ),
            (
                m(json!({"role": "user", "content": null})),
                "field `messages[1].content`: null",
            ),
            (
                m(json!({"role": "assistant"})),
                "field `messages[1].content`: missing",
            ),
            (
                m(json!({"role": "user", "content": 5})),
                "field `messages[1].content`: expected a string or a list of text parts, found number 5",
            ),
            (
                m(json!({"role": "user", "content": [{"type": "image_url", "image_url": {}}]})),
                "field `messages[1].content[0].type`: unsupported content part type \"image_url\"",
            ),
            (
                m(json!({"role": "user", "content": [{"type": "text"}]})),
                "field `messages[1].content[0]`: a text part needs",
            ),
            (
                m(json!({"role": "user", "content": [{"type": "text", "text": 1}]})),
                "field `messages[1].content[0].text`: expected a string",
            ),
            (
                m(json!({"role": "user", "content": "x", "tool_calls": []})),
                "field `messages[1].tool_calls`: only assistant messages may call tools",
            ),
            (
                m(json!({"role": "assistant", "content": "x", "tool_calls": {}})),
                "field `messages[1].tool_calls`: expected a list",
            ),
            (
                m(json!({"role": "assistant", "content": "x", "tool_calls": [3]})),
                "field `messages[1].tool_calls[0]`: expected a tool call object",
            ),
            (
                m(json!({"role": "assistant", "content": "x", "loss_weight": 0.5})),
                "field `messages[1].loss_weight`: must be 0 or 1, found 0.5",
            ),
            (
                m(json!({"role": "assistant", "content": "x", "train": "yes"})),
                "field `messages[1].train`: expected true or false",
            ),
            (
                m(json!({"role": "assistant", "content": "x", "train": true, "loss_weight": 0})),
                "field `messages[1].train`: `train: true` disagrees with `loss_weight: 0`",
            ),
            (
                m(json!("hi")),
                "field `messages[1]`: expected a message object",
            ),
            (json!({"messages": []}), "field `messages`: empty list"),
            (
                json!({"messages": "hi"}),
                "field `messages`: expected a list of messages, found string",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "tools": "[oops"}),
                "field `tools`: a string that is not valid JSON",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "tools": "{}"}),
                "field `tools`: a JSON string holding object",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "tools": [1]}),
                "field `tools[0]`: expected a tool object",
            ),
        ];
        for (v, want) in cases {
            let e = err(v, DataFormat::Messages);
            assert!(e.starts_with("d.jsonl:7: record 3, "), "{e}");
            assert!(e.contains(want), "want {want:?}\n got {e}");
        }
    }

    #[test]
    fn remapped_message_keys_are_used_and_named_in_errors() {
        let c = cols(&[
            ("messages", "dialog"),
            ("content", "text"),
            ("role", "speaker"),
        ]);
        let s = parse_sample(
            &json!({"dialog": [{"speaker": "user", "text": "hi"}, {"speaker": "assistant", "text": "yo"}]}),
            DataFormat::Messages,
            &c,
            &at(),
        )
        .unwrap();
        assert_eq!(s.as_chat().unwrap().messages[1].content_str(), "yo");
        let e = parse_sample(
            &json!({"dialog": [{"speaker": "user", "content": "hi"}]}),
            DataFormat::Messages,
            &c,
            &at(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("field `dialog[0].text`: missing"), "{e}");
    }

    #[test]
    fn sharegpt_turns_map_to_roles_and_tool_calls() {
        let s = parse(
            json!({"conversations": [
                {"from": "human", "value": "weather?"},
                {"from": "function_call", "value": "{\"name\": \"get\", \"arguments\": {\"city\": \"Oslo\"}}"},
                {"from": "observation", "value": "{\"t\": 3}"},
                {"from": "gpt", "value": "3 degrees", "loss_weight": 1.0}
            ], "system": "You help.", "tools": "[{\"name\": \"get\", \"parameters\": {}}, {\"type\": \"function\", \"function\": {\"name\": \"h\"}}]"}),
            DataFormat::Sharegpt,
        )
        .unwrap();
        let c = s.as_chat().unwrap();
        let roles: Vec<Role> = c.messages.iter().map(|m| m.role).collect();
        assert_eq!(
            roles,
            [
                Role::System,
                Role::User,
                Role::Assistant,
                Role::Tool,
                Role::Assistant
            ]
        );
        assert_eq!(c.messages[0].content_str(), "You help.");
        assert_eq!(c.messages[2].content, None);
        assert_eq!(
            c.messages[2].tool_calls,
            Some(
                json!([{"type": "function", "function": {"name": "get", "arguments": {"city": "Oslo"}}}])
            )
        );
        assert_eq!(c.messages[3].content_str(), "{\"t\": 3}");
        assert_eq!(c.messages[4].train, Some(true));
        assert_eq!(
            c.tools,
            Some(json!([
                {"type": "function", "function": {"name": "get", "parameters": {}}},
                {"type": "function", "function": {"name": "h"}}
            ]))
        );
        // A list of calls in one turn.
        let s = parse(
            json!({"conversations": [{"from": "user", "value": "x"},
                {"from": "function_call", "value": "[{\"name\": \"a\", \"arguments\": {}}, {\"name\": \"b\", \"arguments\": {}}]"}]}),
            DataFormat::Sharegpt,
        )
        .unwrap();
        assert_eq!(
            s.as_chat().unwrap().messages[1]
                .tool_calls
                .as_ref()
                .unwrap()
                .as_array()
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn sharegpt_errors_name_the_field_path() {
        let t = |turn: Value| json!({"conversations": [{"from": "human", "value": "hi"}, turn]});
        let cases = [
            (
                t(json!({"from": "bot", "value": "x"})),
                "field `conversations[1].from`: unknown speaker \"bot\"; expected `human`, `user`, `gpt`, `assistant`, `system`, `function_call` or `observation`",
            ),
            (
                t(json!({"value": "x"})),
                "field `conversations[1].from`: missing",
            ),
            (
                t(json!({"from": "gpt"})),
                "field `conversations[1].value`: missing",
            ),
            (
                t(json!({"from": "gpt", "value": ["x"]})),
                "field `conversations[1].value`: expected a string, found array",
            ),
            (
                t(json!({"from": "function_call", "value": "{not json"})),
                "field `conversations[1].value`: not valid JSON",
            ),
            (
                t(json!({"from": "function_call", "value": "{\"arguments\": {}}"})),
                "field `conversations[1].value`: a call without a string `name`",
            ),
            (
                t(json!({"from": "function_call", "value": "3"})),
                "field `conversations[1].value`: JSON number 3",
            ),
            (
                t(json!({"from": "gpt", "value": "x", "loss_weight": 2})),
                "field `conversations[1].loss_weight`: must be 0 or 1",
            ),
            (
                json!({"conversations": []}),
                "field `conversations`: empty list",
            ),
            (
                json!({"conversations": [{"from": "human", "value": "x"}], "system": 1}),
                "field `system`: expected a string",
            ),
            (
                json!({"conversations": [{"from": "human", "value": "x"}], "tools": 1}),
                "field `tools`: expected a list of tools",
            ),
        ];
        for (v, want) in cases {
            let e = err(v, DataFormat::Sharegpt);
            assert!(e.contains(want), "want {want:?}\n got {e}");
        }
    }

    #[test]
    fn prompt_completion_strings_and_lists() {
        let s = parse(
            json!({"prompt": "2+2?", "completion": "4"}),
            DataFormat::PromptCompletion,
        )
        .unwrap();
        assert_eq!(
            s.as_chat().unwrap().messages,
            [
                Message::text(Role::User, "2+2?"),
                Message::text(Role::Assistant, "4")
            ]
        );
        let s = parse(
            json!({"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
                   "completion": [{"role": "assistant", "content": "a"}]}),
            DataFormat::PromptCompletion,
        )
        .unwrap();
        assert_eq!(s.as_chat().unwrap().messages.len(), 3);
        for (v, want) in [
            (json!({"prompt": "q"}), "field `completion`: missing"),
            (
                json!({"prompt": "q", "completion": [{"role": "user", "content": "x"}]}),
                "field `completion`: no assistant message",
            ),
            (
                json!({"prompt": [{"role": "user"}], "completion": "a"}),
                "field `prompt[0].content`: missing",
            ),
            (
                json!({"prompt": [], "completion": "a"}),
                "field `prompt`: empty list",
            ),
            (
                json!({"prompt": 1, "completion": "a"}),
                "field `prompt`: expected a string or a list of messages",
            ),
        ] {
            let e = err(v, DataFormat::PromptCompletion);
            assert!(e.contains(want), "want {want:?}\n got {e}");
        }
    }

    #[test]
    fn alpaca_keeps_its_messages_and_maps_columns() {
        let c = cols(&[("instruction", "question"), ("output", "answer")]);
        let s = parse_sample(
            &json!({"question": "q", "answer": "a", "input": "i"}),
            DataFormat::Alpaca,
            &c,
            &at(),
        )
        .unwrap();
        assert!(s.has_input());
        assert_eq!(s.as_instruction().unwrap().instruction, "q");
        let e = parse_sample(&json!({"question": "q"}), DataFormat::Alpaca, &c, &at())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("record 3, field `answer`: missing (expected a string)"),
            "{e}"
        );
        let e = err(json!([1]), DataFormat::Alpaca);
        assert!(
            e.contains("record 3: expected an object with `instruction` and `output`, found array"),
            "{e}"
        );
        let conv = Sample::Instruction(Record {
            instruction: "do".into(),
            input: Some("this".into()),
            output: "done".into(),
        })
        .to_conversation();
        assert_eq!(
            conv.messages,
            [
                Message::text(Role::User, "do\nthis"),
                Message::text(Role::Assistant, "done")
            ]
        );
    }
}
