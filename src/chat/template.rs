//! A model's chat template, rendered as transformers' `apply_chat_template` renders it.
//!
//! transformers compiles templates in a Jinja2 sandbox with `trim_blocks`, `lstrip_blocks` and
//! loop controls, and hands them `messages`, `tools`, `documents`, `add_generation_prompt`, the
//! special tokens, `raise_exception` and `strftime_now`; its `tojson` is Python's
//! `json.dumps` without HTML escaping. This module sets minijinja up the same way (Python's
//! string and dict methods come from minijinja-contrib's pycompat; values print as Python
//! prints them) so that a rendered conversation equals transformers' character for character
//! (`tests/chat_reference.rs` checks it on every template of llama.cpp's collection).
//!
//! Where minijinja's builtins part from Jinja2's, Jinja2 wins: absent `tools` and `documents`
//! are Python's `None`, which is neither iterable nor sized (`{% for t in tools %}` fails, as
//! transformers fails it; `none is iterable` is false); `map`, `select`, `reject`,
//! `selectattr`, `rejectattr`, `unique`, `batch`, `slice` and `reverse` give one-pass
//! generators, which have no length and which `tojson` refuses; `escape` spells entities as
//! MarkupSafe does (`&#34;`, `&#39;`), and `indent` keeps a trailing line break as Jinja2's
//! does. One Jinja2 behaviour is out of reach: a `Markup` (`'x'|safe`) plus a plain string
//! escapes the string in Python, and minijinja offers no hook on `+`, so we concatenate as is.
//!
//! `{% generation %}` blocks, transformers' marks of the assistant's trainable text, are not a
//! tag minijinja knows: they are rewritten into no-op blocks that print private-use marker
//! characters, and the markers are cut out of the output and returned as byte ranges.
//!
//! A template is a program from a file the user did not write: every render runs under a fuel
//! bound ([`FUEL`]) and an output cap ([`OUTPUT_CAP`]), and every error names the template's
//! source and line.

use std::ops::Range;
use std::sync::Arc;

use minijinja::value::{
    Enumerator, Kwargs, Object, ObjectRepr, Rest, Serde, Value as JValue, ValueKind, ValueOrKwargs,
};
use minijinja::{Environment, ErrorKind, State};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::chat::message::Conversation;
use crate::chat::pyjson;
use crate::error::{Error, Result};

/// Instructions one render may run (minijinja's fuel): far above any real template on a long
/// conversation, low enough that a template looping forever stops in about a second.
pub const FUEL: u64 = 50_000_000;

/// The most bytes one render may write (64 MiB).
pub const OUTPUT_CAP: usize = 64 << 20;

/// Marks the start of a `{% generation %}` block in raw output.
const GEN_START: char = '\u{10FFFD}';
/// Marks its end.
const GEN_END: char = '\u{10FFFC}';

/// What a render is given besides the conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderOptions {
    /// End with the header of a new assistant turn (for generation).
    pub add_generation_prompt: bool,
    /// The tokenizer's BOS text (`bos_token` in the template).
    pub bos_token: String,
    /// The tokenizer's EOS text (`eos_token`).
    pub eos_token: String,
    /// The time `strftime_now` formats, in seconds since the Unix epoch (UTC); `None` is now.
    /// Tests fix it so that date-stamping templates render reproducibly.
    pub now: Option<i64>,
}

impl RenderOptions {
    /// Options with the given special tokens, no generation prompt, the real clock.
    pub fn new(bos_token: impl Into<String>, eos_token: impl Into<String>) -> Self {
        Self {
            add_generation_prompt: false,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
            now: None,
        }
    }

    /// The same options with `add_generation_prompt` set to `yes`.
    pub fn with_generation_prompt(&self, yes: bool) -> Self {
        Self {
            add_generation_prompt: yes,
            ..self.clone()
        }
    }
}

/// A rendered conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The text, markers removed.
    pub text: String,
    /// Byte ranges of `text` that `{% generation %}` blocks produced, in order.
    pub generation: Vec<Range<usize>>,
}

/// A compiled chat template and where it came from.
#[derive(Clone)]
pub struct ChatTemplate {
    source: String,
    text: String,
    sha256: String,
    has_generation: bool,
    env: Arc<Environment<'static>>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("sha256", &self.sha256)
            .finish()
    }
}

/// The name the template is compiled under: errors show the source instead.
const NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `text`; `source` names it in errors and reports (a path, `PATH:chat_template`).
    pub fn new(source: impl Into<String>, text: impl Into<String>) -> Result<Self> {
        let source = source.into();
        let text = text.into();
        let (rewritten, has_generation) = rewrite_generation_tags(&text);
        let mut env = environment();
        env.add_template_owned(NAME, rewritten)
            .map_err(|e| template_error(&source, &e))?;
        Ok(Self {
            sha256: format!("{:x}", Sha256::digest(text.as_bytes())),
            source,
            text,
            has_generation,
            env: Arc::new(env),
        })
    }

    /// Where the template came from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The template's text as found.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// SHA-256 of the text, hex.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Whether the template marks the assistant's text with `{% generation %}` blocks.
    pub fn has_generation_blocks(&self) -> bool {
        self.has_generation
    }

    /// Renders a conversation.
    pub fn render(&self, conv: &Conversation, opts: &RenderOptions) -> Result<Rendered> {
        self.render_json(&conv.template_messages(), conv.tools.as_ref(), opts)
    }

    /// Renders messages given as JSON (as a template sees them) with optional tools.
    pub fn render_json(
        &self,
        messages: &Value,
        tools: Option<&Value>,
        opts: &RenderOptions,
    ) -> Result<Rendered> {
        if has_marker(messages) || tools.is_some_and(has_marker) {
            return Err(Error::Invalid(format!(
                "{}: the conversation holds U+10FFFC/U+10FFFD, which the renderer reserves",
                self.source
            )));
        }
        // transformers drops every null-valued key of a message before rendering (a tool-call
        // message has no `content` at all, rather than `content = None`).
        let messages = match messages {
            Value::Array(list) => Value::Array(
                list.iter()
                    .map(|m| match m {
                        Value::Object(o) => Value::Object(
                            o.iter()
                                .filter(|(_, v)| !v.is_null())
                                .map(|(k, v)| (k.clone(), v.clone()))
                                .collect(),
                        ),
                        other => other.clone(),
                    })
                    .collect(),
            ),
            other => other.clone(),
        };
        let ctx = minijinja::context! {
            messages => JValue::from(Serde(&messages)),
            tools => tools.map_or_else(py_none, |t| JValue::from(Serde(t))),
            documents => py_none(),
            add_generation_prompt => opts.add_generation_prompt,
            bos_token => opts.bos_token.clone(),
            eos_token => opts.eos_token.clone(),
            __lorasft_now => opts.now,
        };
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| template_error(&self.source, &e))?;
        let mut sink = CappedWriter::default();
        let result = tmpl.render_captured_to(ctx, &mut sink);
        if sink.overflow {
            return Err(Error::Invalid(format!(
                "{}: the rendered conversation passed {} MiB; a template that writes this much \
                 is refused",
                self.source,
                OUTPUT_CAP >> 20
            )));
        }
        result.map_err(|e| template_error(&self.source, &e))?;
        let raw = String::from_utf8(sink.buf)
            .map_err(|_| Error::Invalid(format!("{}: rendered text is not UTF-8", self.source)))?;
        strip_markers(&raw).map_err(|msg| Error::Invalid(format!("{}: {msg}", self.source)))
    }
}

/// Whether any string in `v` holds a marker character.
fn has_marker(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains([GEN_START, GEN_END]),
        Value::Array(a) => a.iter().any(has_marker),
        Value::Object(m) => m
            .iter()
            .any(|(k, v)| k.contains([GEN_START, GEN_END]) || has_marker(v)),
        _ => false,
    }
}

/// An output sink that stops accepting bytes past [`OUTPUT_CAP`].
#[derive(Default)]
struct CappedWriter {
    buf: Vec<u8>,
    overflow: bool,
}

impl std::io::Write for CappedWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > OUTPUT_CAP {
            self.overflow = true;
            return Err(std::io::Error::other("output cap"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An error naming the template's source and, when minijinja knows it, the line.
fn template_error(source: &str, e: &minijinja::Error) -> Error {
    let line = e.line().map(|l| format!(" line {l}")).unwrap_or_default();
    let msg = match (e.kind(), e.detail()) {
        (ErrorKind::InvalidOperation, Some(d)) if d.starts_with("raise_exception: ") => {
            format!("the template refused the conversation: {}", &d[17..])
        }
        (_, Some(d)) => format!("{}: {d}", e.kind()),
        (_, None) => e.kind().to_string(),
    };
    let msg = if e.kind() == ErrorKind::OutOfFuel {
        format!("{msg} (more than {FUEL} instructions for one conversation)")
    } else {
        msg
    };
    Error::Invalid(format!("chat template {source}{line}: {msg}"))
}

/// Rewrites `{% generation %}` / `{% endgeneration %}` (with any whitespace control) into
/// blocks minijinja renders: the left control stays on a first tag, the right control on a
/// second one, and a marker is printed between them, so trimming around the block is as
/// Jinja2 does it. Returns the text and whether any tag was found.
fn rewrite_generation_tags(text: &str) -> (String, bool) {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut found = false;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        match parse_generation_tag(tag) {
            Some((len, left, right, end)) => {
                found = true;
                if end {
                    out.push_str(&format!(
                        "{{%{left} endif %}}{{{{ '{GEN_END}' }}}}{{% endif {right}%}}"
                    ));
                } else {
                    out.push_str(&format!(
                        "{{%{left} if true %}}{{{{ '{GEN_START}' }}}}{{% if true {right}%}}"
                    ));
                }
                rest = &tag[len..];
            }
            None => {
                out.push_str("{%");
                rest = &tag[2..];
            }
        }
    }
    out.push_str(rest);
    (out, found)
}

/// Parses `{%[-+]? (end)?generation [-+]?%}` at the start of `s`: (length, left control,
/// right control, is the end tag).
fn parse_generation_tag(s: &str) -> Option<(usize, &str, &str, bool)> {
    let body = s.strip_prefix("{%")?;
    let (left, body) = match body.chars().next() {
        Some(c @ ('-' | '+')) => (&s[2..3], &body[c.len_utf8()..]),
        _ => ("", body),
    };
    let trimmed = body.trim_start();
    let (end, after) = if let Some(a) = trimmed.strip_prefix("endgeneration") {
        (true, a)
    } else if let Some(a) = trimmed.strip_prefix("generation") {
        (false, a)
    } else {
        return None;
    };
    if after.starts_with(|c: char| c.is_alphanumeric() || c == '_') {
        return None;
    }
    let after = after.trim_start();
    let (right, after) = match after.chars().next() {
        Some(c @ ('-' | '+')) => (&after[..1], &after[c.len_utf8()..]),
        _ => ("", after),
    };
    let after = after.strip_prefix("%}")?;
    Some((s.len() - after.len(), left, right, end))
}

/// Removes the markers, returning the text and the byte ranges they enclosed.
fn strip_markers(raw: &str) -> std::result::Result<Rendered, String> {
    let mut text = String::with_capacity(raw.len());
    let mut generation = Vec::new();
    let mut open: Option<usize> = None;
    for c in raw.chars() {
        match c {
            GEN_START if open.is_none() => open = Some(text.len()),
            GEN_END => match open.take() {
                Some(start) => {
                    if start < text.len() {
                        generation.push(start..text.len());
                    }
                }
                None => return Err("`{% endgeneration %}` without a matching start".into()),
            },
            GEN_START => return Err("nested `{% generation %}` blocks".into()),
            c => text.push(c),
        }
    }
    if open.is_some() {
        return Err("`{% generation %}` block left open".into());
    }
    Ok(Rendered { text, generation })
}

/// The environment transformers compiles templates in, as minijinja.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .expect("default delimiters"),
    );
    env.set_fuel(Some(FUEL));
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_formatter(|out, _state, value| {
        let text = match value.as_str() {
            Some(s) if value.kind() == ValueKind::String => s.to_string(),
            _ => python_str(value)?,
        };
        out.write_str(&text)
            .map_err(|e| minijinja::Error::new(ErrorKind::WriteFailure, e.to_string()))
    });
    env.add_filter("tojson", tojson);
    env.add_filter("string", |v: JValue| python_str(&v));
    env.add_filter("escape", escape);
    env.add_filter("e", escape);
    env.add_filter("forceescape", |v: JValue| {
        python_str(&v).map(|s| JValue::from_safe_string(pyjson::escape_html(&s)))
    });
    env.add_filter("indent", indent);
    // Jinja2's `map`, `select`, `reject`, `selectattr`, `rejectattr`, `unique`, `batch` and
    // `slice` return generators, and its `reverse` an iterator: wrap minijinja's lists so.
    for (name, builtin, skips_falsy) in [
        ("map", JValue::from_function(minijinja::filters::map), true),
        (
            "select",
            JValue::from_function(minijinja::filters::select),
            true,
        ),
        (
            "reject",
            JValue::from_function(minijinja::filters::reject),
            true,
        ),
        (
            "selectattr",
            JValue::from_function(minijinja::filters::selectattr),
            true,
        ),
        (
            "rejectattr",
            JValue::from_function(minijinja::filters::rejectattr),
            true,
        ),
        (
            "unique",
            JValue::from_function(minijinja::filters::unique),
            false,
        ),
        (
            "batch",
            JValue::from_function(minijinja::filters::batch),
            false,
        ),
        (
            "slice",
            JValue::from_function(minijinja::filters::slice),
            false,
        ),
    ] {
        env.add_filter(name, move |state: &mut State, args: Rest<ValueOrKwargs>| {
            let args = args.into_values();
            // `if value:` guards Jinja2's map and select loops: none maps to nothing.
            if skips_falsy && args.first().is_some_and(|v| !v.is_true()) {
                return Ok(Generator::value("generator", Vec::new()));
            }
            let list = builtin.call(state, &args)?;
            Ok(Generator::value("generator", list.try_iter()?.collect()))
        });
    }
    env.add_filter("reverse", |v: JValue| {
        let reversed = minijinja::filters::reverse(&v)?;
        Ok(match v.kind() {
            ValueKind::Seq => {
                Generator::value("list_reverseiterator", reversed.try_iter()?.collect())
            }
            ValueKind::Map => {
                Generator::value("dict_reversekeyiterator", reversed.try_iter()?.collect())
            }
            _ => reversed,
        })
    });
    env.add_test("none", |v: &JValue| v.is_none() || is_py_none(v));
    env.add_test("iterable", |v: &JValue| {
        !v.is_none() && v.try_iter().is_ok()
    });
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<JValue, minijinja::Error> {
            Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("raise_exception: {msg}"),
            ))
        },
    );
    env.add_function("strftime_now", strftime_now);
    env
}

/// How Python's `str()` prints a template value (`None`, `True`, `{'a': 1}`).
fn python_str(value: &JValue) -> std::result::Result<String, minijinja::Error> {
    match value.kind() {
        ValueKind::Undefined => Ok(String::new()),
        ValueKind::String => Ok(value.as_str().unwrap_or_default().to_string()),
        ValueKind::Plain | ValueKind::Iterable => Ok(value.to_string()),
        _ => Ok(pyjson::str_of(&to_json(value, false)?)),
    }
}

/// A template value as JSON (key order kept). `strict` is `json.dumps`: undefined values,
/// generators and other objects Python cannot serialize are errors, and keys become strings
/// as Python makes them; otherwise (for printing) they are written as null.
fn to_json(value: &JValue, strict: bool) -> std::result::Result<Value, minijinja::Error> {
    let refuse = |type_name: &str| {
        minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("Object of type {type_name} is not JSON serializable"),
        )
    };
    match value.kind() {
        ValueKind::None => Ok(Value::Null),
        ValueKind::Undefined if strict => Err(refuse("Undefined")),
        ValueKind::Bool => Ok(Value::Bool(value.is_true())),
        ValueKind::String => Ok(Value::String(value.as_str().unwrap_or_default().into())),
        ValueKind::Seq | ValueKind::Iterable => {
            if let Some(g) = value.downcast_object_ref::<Generator>() {
                return if strict {
                    Err(refuse(g.type_name))
                } else {
                    Ok(Value::Null)
                };
            }
            value
                .try_iter()?
                .map(|v| to_json(&v, strict))
                .collect::<std::result::Result<_, _>>()
                .map(Value::Array)
        }
        ValueKind::Map => {
            let mut map = serde_json::Map::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                let key = match key.as_str() {
                    Some(k) if key.kind() == ValueKind::String => k.to_string(),
                    _ => match to_json(&key, strict)? {
                        Value::String(k) => k,
                        k @ (Value::Null | Value::Bool(_) | Value::Number(_)) if strict => {
                            pyjson::dumps(&k, &pyjson::DumpOptions::python(None))
                        }
                        other if strict => {
                            return Err(minijinja::Error::new(
                                ErrorKind::InvalidOperation,
                                format!("keys must be str, int, float, bool or None, not {other}"),
                            ));
                        }
                        other => pyjson::str_of(&other),
                    },
                };
                map.insert(key, to_json(&item, strict)?);
            }
            Ok(Value::Object(map))
        }
        ValueKind::Plain if is_py_none(value) => Ok(Value::Null),
        ValueKind::Plain | ValueKind::Invalid if strict => Err(refuse("object")),
        ValueKind::Undefined | ValueKind::Plain | ValueKind::Invalid => Ok(Value::Null),
        _ => serde_json::to_value(value).map_err(|e| {
            minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("cannot serialize value: {e}"),
            )
        }),
    }
}

/// Python's `None` as transformers passes it for absent `tools` and `documents`: false, printed
/// `None`, `is none`, null in JSON, but, unlike minijinja's none, neither iterable nor sized,
/// so that `{% for tool in tools %}` and `tools|length` fail as in Jinja2. (It does not equal
/// minijinja's `none` under `==`; templates test it with `is none`.)
#[derive(Debug)]
struct PyNone;

impl Object for PyNone {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Plain
    }

    fn is_true(self: &Arc<Self>) -> bool {
        false
    }

    fn render(self: &Arc<Self>, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("None")
    }
}

fn py_none() -> JValue {
    JValue::from_object(PyNone)
}

fn is_py_none(v: &JValue) -> bool {
    v.downcast_object_ref::<PyNone>().is_some()
}

/// A Python generator or iterator (what Jinja2's `map`, `select`, `reverse`... return): items
/// come out once, it has no length, is always true, and `json.dumps` refuses it.
#[derive(Debug)]
struct Generator {
    type_name: &'static str,
    rest: std::sync::Mutex<std::vec::IntoIter<JValue>>,
}

impl Generator {
    fn value(type_name: &'static str, items: Vec<JValue>) -> JValue {
        JValue::from_object(Generator {
            type_name,
            rest: std::sync::Mutex::new(items.into_iter()),
        })
    }
}

impl Object for Generator {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Iterable
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Iter(Box::new(Drain(Arc::clone(self))))
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        None
    }

    /// `gen[0]` is undefined, as in Jinja2 (minijinja would walk the items, taking them).
    fn get_value(self: &Arc<Self>, _key: &JValue) -> Option<JValue> {
        Some(JValue::UNDEFINED)
    }

    fn is_true(self: &Arc<Self>) -> bool {
        true
    }

    fn render(self: &Arc<Self>, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{} object>", self.type_name)
    }
}

/// An iterator taking a [`Generator`]'s items; its exact size hint gives loops `loop.last` and
/// `loop.length`, which Jinja2 finds by looking ahead.
struct Drain(Arc<Generator>);

impl Iterator for Drain {
    type Item = JValue;

    fn next(&mut self) -> Option<JValue> {
        self.0.rest.lock().ok()?.next()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.0.rest.lock().map_or(0, |rest| rest.len());
        (left, Some(left))
    }
}

/// MarkupSafe's `escape` (Jinja2's `escape`/`e`): the value's `str()` with `&<>"'` escaped,
/// as a safe string; safe strings pass unchanged.
fn escape(v: JValue) -> std::result::Result<JValue, minijinja::Error> {
    if v.is_safe() {
        return Ok(v);
    }
    Ok(JValue::from_safe_string(pyjson::escape_html(&python_str(
        &v,
    )?)))
}

/// Jinja2's `indent(s, width=4, first=False, blank=False)`; `width` may be a string. Like
/// Jinja2's, it takes strings only, and a safe string stays safe.
fn indent(
    s: JValue,
    width: Option<JValue>,
    first: Option<JValue>,
    blank: Option<JValue>,
    kwargs: Kwargs,
) -> std::result::Result<JValue, minijinja::Error> {
    let width = kwargs.get::<Option<JValue>>("width")?.or(width);
    let first = kwargs.get::<Option<JValue>>("first")?.or(first);
    let blank = kwargs.get::<Option<JValue>>("blank")?.or(blank);
    kwargs.assert_all_used()?;
    let text = match s.as_str() {
        Some(t) if s.kind() == ValueKind::String => t,
        _ => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("indent takes a string, not {}", s.kind()),
            ));
        }
    };
    let indention = match &width {
        None => "    ".to_string(),
        Some(w) if w.kind() == ValueKind::String => w.as_str().unwrap_or_default().to_string(),
        Some(w) => match w.as_i64() {
            Some(n) => " ".repeat(usize::try_from(n).unwrap_or(0)),
            None => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!(
                        "indent width must be an integer or a string, not {}",
                        w.kind()
                    ),
                ));
            }
        },
    };
    let rv = pyjson::indent(
        text,
        &indention,
        first.is_some_and(|v| v.is_true()),
        blank.is_some_and(|v| v.is_true()),
    );
    Ok(if s.is_safe() {
        JValue::from_safe_string(rv)
    } else {
        JValue::from(rv)
    })
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`.
fn tojson(
    value: JValue,
    indent: Option<JValue>,
    kwargs: Kwargs,
) -> std::result::Result<JValue, minijinja::Error> {
    let indent = match kwargs.get::<Option<JValue>>("indent")?.or(indent) {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_string(),
            None => " ".repeat(usize::try_from(v.as_i64().unwrap_or(0)).unwrap_or(0)),
        }),
    };
    let mut opts = pyjson::DumpOptions::python(indent);
    if let Some(seps) = kwargs.get::<Option<JValue>>("separators")?
        && !seps.is_none()
    {
        let parts: Vec<String> = seps
            .try_iter()?
            .map(|v| v.as_str().unwrap_or_default().to_string())
            .collect();
        if let [item, key] = parts.as_slice() {
            opts.item_sep = item.clone();
            opts.key_sep = key.clone();
        }
    }
    opts.sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    opts.ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    if value.is_undefined() {
        return Err(minijinja::Error::new(
            ErrorKind::UndefinedError,
            "tojson of an undefined value",
        ));
    }
    Ok(JValue::from(pyjson::dumps(&to_json(&value, true)?, &opts)))
}

/// transformers' `strftime_now(format)`: the current time (or the render's fixed time) in a
/// Python `strftime` format.
fn strftime_now(state: &State, format: String) -> std::result::Result<String, minijinja::Error> {
    let now = state
        .lookup("__lorasft_now")
        .and_then(|v| v.as_i64())
        .unwrap_or_else(|| crate::sys::unix_time() as i64);
    Ok(strftime(now, &format))
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Formats Unix time `t` (UTC) with the `strftime` directives templates use.
pub fn strftime(t: i64, format: &str) -> String {
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let yday = days - days_from_civil(y, 1, 1) + 1;
    let (hh, mm, ss) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:>2}")),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('B') => out.push_str(MONTHS[m as usize - 1]),
            Some('b') | Some('h') => out.push_str(&MONTHS[m as usize - 1][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('H') => out.push_str(&format!("{hh:02}")),
            Some('I') => out.push_str(&format!("{:02}", (hh + 11) % 12 + 1)),
            Some('p') => out.push_str(if hh < 12 { "AM" } else { "PM" }),
            Some('M') => out.push_str(&format!("{mm:02}")),
            Some('S') => out.push_str(&format!("{ss:02}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Days since 1970-01-01 of a civil date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::message::{Message, Role};

    fn conv() -> Conversation {
        Conversation::new(vec![
            Message::text(Role::User, "Hi"),
            Message::text(Role::Assistant, "Hello!"),
        ])
    }

    #[test]
    fn chatml_renders_with_trim_blocks_and_generation_prompt() {
        let t = ChatTemplate::new(
            "test",
            "{% for m in messages %}\n<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\n{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        )
        .unwrap();
        let r = t
            .render(
                &conv(),
                &RenderOptions::new("", "").with_generation_prompt(true),
            )
            .unwrap();
        assert_eq!(
            r.text,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(r.generation.is_empty() && !t.has_generation_blocks());
    }

    #[test]
    fn generation_blocks_become_ranges_with_jinja_whitespace_control() {
        let t = ChatTemplate::new(
            "gen",
            "{% for m in messages %}{{ m.role }}: \n  {%- if m.role == 'assistant' -%}\n  {%- generation -%}\n  {{ m.content }}<end>\n  {%- endgeneration -%}\n  {%- else %}{{ m.content }}{% endif %}\n|{% endfor %}",
        )
        .unwrap();
        assert!(t.has_generation_blocks());
        let r = t.render(&conv(), &RenderOptions::new("", "")).unwrap();
        assert_eq!(r.text, "user:Hi|assistant:Hello!<end>|");
        assert_eq!(r.generation.len(), 1);
        assert_eq!(&r.text[r.generation[0].clone()], "Hello!<end>");
    }

    #[test]
    fn python_printing_tojson_and_raise_exception() {
        let t = ChatTemplate::new(
            "py",
            "{{ messages[0].content.strip().upper() }} {{ x }} {{ true }} {{ none }} {{ {'a': 1}|tojson }} {{ tools }}{% if messages|length > 1 %}{{ raise_exception('too long') }}{% endif %}",
        )
        .unwrap();
        let mut c = conv();
        c.messages.truncate(1);
        c.messages[0].content = Some(" hi ".into());
        c.tools = Some(serde_json::json!([{"b": "<&>", "a": 1.0}]));
        let r = t.render(&c, &RenderOptions::new("", "")).unwrap();
        assert_eq!(r.text, r#"HI  True None {"a": 1} [{'b': '<&>', 'a': 1.0}]"#);
        let err = t.render(&conv(), &RenderOptions::new("", "")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("py") && msg.contains("too long"), "{msg}");
    }

    #[test]
    fn hostile_templates_are_bounded_and_errors_name_source_and_line() {
        let spin = ChatTemplate::new(
            "spin.jinja",
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        )
        .unwrap();
        let err = spin
            .render(&conv(), &RenderOptions::new("", ""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("spin.jinja") && err.contains("instructions"),
            "{err}"
        );
        let big = ChatTemplate::new(
            "big.jinja",
            "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
        )
        .unwrap();
        let err = big
            .render(&conv(), &RenderOptions::new("", ""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("big.jinja"), "{err}");
        let bad = ChatTemplate::new("bad.jinja", "line one\n{% if %}")
            .unwrap_err()
            .to_string();
        assert!(bad.contains("bad.jinja line 2"), "{bad}");
    }

    fn render_src(src: &str) -> Result<String> {
        ChatTemplate::new("t", src)?
            .render_json(&serde_json::json!([]), None, &RenderOptions::new("", ""))
            .map(|r| r.text)
    }

    #[test]
    fn absent_tools_are_pythons_none() {
        assert_eq!(
            render_src(
                "{{ tools }} {{ tools is none }} {{ tools is defined }} {{ tools is iterable }} \
                 {{ none is iterable }} {{ tools|tojson }} {{ {'t': tools} }} \
                 {% if tools %}T{% else %}F{% endif %} {{ tools|map('x')|list }}"
            )
            .unwrap(),
            "None True True False False null {'t': None} F []"
        );
        // Jinja2: TypeError: 'NoneType' object is not iterable / has no len().
        assert!(render_src("{% for t in tools %}{% endfor %}").is_err());
        assert!(render_src("{{ tools|length }}").is_err());
        assert_eq!(
            render_src("{% if tools is iterable and tools|length > 0 %}x{% endif %}").unwrap(),
            ""
        );
    }

    #[test]
    fn filters_that_are_generators_in_jinja2_behave_as_generators() {
        assert_eq!(
            render_src(
                "{% for x in [1, 2]|map('string') %}{{ loop.length }}{{ loop.last }}{% endfor %} \
                 {% set g = [1, 2, 3]|select('odd') %}{{ g|first }}|{{ g|list }}|{{ g|list }} \
                 {{ ([1]|map('int'))[0] }}|{{ [1, 2]|reverse|list }} {{ 'abc'|reverse }} \
                 {{ [{'a': 1}]|map(attribute='a')|list|tojson }}"
            )
            .unwrap(),
            "2False2True 1|[3]|[] |[2, 1] cba [1]"
        );
        for src in [
            "{{ [1]|map('int')|tojson }}",
            "{{ {'a': [1]|selectattr('x')}|tojson }}",
            "{{ [1]|reverse|tojson }}",
            "{{ [1]|map('int')|length }}",
        ] {
            let err = render_src(src).unwrap_err().to_string();
            assert!(
                err.contains("JSON serializable") || err.contains("length"),
                "{src}: {err}"
            );
        }
    }

    #[test]
    fn escape_and_indent_are_jinja2s() {
        assert_eq!(
            render_src("{{ '<\"&\\'>/'|e }} {{ '<'|safe|escape }} {{ none|e }}").unwrap(),
            "&lt;&#34;&amp;&#39;&gt;/ < None"
        );
        assert_eq!(
            render_src(
                "{{ '{\n'|indent(4, first=true) }}|{{ 'a\nb'|indent }}|\
                 {{ 'a\n\nb\n'|indent(width='>', blank=true) }}"
            )
            .unwrap(),
            "    {\n|a\n    b|a\n>\n>b\n>"
        );
        assert!(render_src("{{ none|indent }}").is_err());
        assert_eq!(
            render_src("{{ {1: 2, none: 3, true: 4, 'k': 1.5}|tojson }}").unwrap(),
            r#"{"1": 4, "null": 3, "k": 1.5}"#
        );
        assert!(render_src("{{ {'a': x}|tojson }}").is_err());
    }

    #[test]
    fn strftime_formats_a_fixed_time() {
        // 2024-07-26 00:00:00 UTC was a Friday.
        assert_eq!(
            strftime(1_721_952_000, "%d %b %Y %A %H:%M %j"),
            "26 Jul 2024 Friday 00:00 208"
        );
        assert_eq!(strftime(0, "%Y-%m-%d %a"), "1970-01-01 Thu");
    }
}
