//! Python's `json.dumps` and `repr` for template values, written out by hand.
//!
//! transformers replaces Jinja's `tojson` with `json.dumps(x, ensure_ascii=False, indent=None,
//! separators=None, sort_keys=False)`: `", "` and `": "` between items, no HTML escaping, keys
//! in insertion order. serde_json's writers differ in separators and float spelling, and
//! minijinja's own `tojson` escapes HTML, so both are written here to the Python rules. Values
//! printed without a filter (`{{ message.tool_calls }}`) take Python's `repr` (`{'a': True}`),
//! which is the other half of this module. Two string functions of Jinja2's Python side end it:
//! MarkupSafe's `escape` ([`escape_html`]) and the `indent` filter ([`indent`]), whose spellings
//! and line handling differ from minijinja's.

use serde_json::Value;

/// Options of `json.dumps` that templates pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpOptions {
    /// Indent per level; `None` writes everything on one line.
    pub indent: Option<String>,
    /// Between items.
    pub item_sep: String,
    /// Between a key and its value.
    pub key_sep: String,
    /// Keys sorted instead of in insertion order.
    pub sort_keys: bool,
    /// Non-ASCII characters written as `\uXXXX` escapes.
    pub ensure_ascii: bool,
}

impl DumpOptions {
    /// Python's defaults for a given indent: `", "` between items on one line, `","` when
    /// indented, `": "` after keys.
    pub fn python(indent: Option<String>) -> Self {
        let item_sep = if indent.is_some() { "," } else { ", " };
        Self {
            indent,
            item_sep: item_sep.into(),
            key_sep: ": ".into(),
            sort_keys: false,
            ensure_ascii: false,
        }
    }
}

/// `json.dumps(value, ...)` with the given options.
pub fn dumps(value: &Value, opts: &DumpOptions) -> String {
    let mut out = String::new();
    write_json(&mut out, value, opts, 0);
    out
}

fn newline(out: &mut String, opts: &DumpOptions, level: usize) {
    if let Some(ind) = &opts.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(ind);
        }
    }
}

fn write_json(out: &mut String, value: &Value, opts: &DumpOptions, level: usize) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&number(n, true)),
        Value::String(s) => json_string(out, s, opts.ensure_ascii),
        Value::Array(items) if items.is_empty() => out.push_str("[]"),
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline(out, opts, level + 1);
                write_json(out, v, opts, level + 1);
            }
            newline(out, opts, level);
            out.push(']');
        }
        Value::Object(map) if map.is_empty() => out.push_str("{}"),
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            if opts.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline(out, opts, level + 1);
                json_string(out, k, opts.ensure_ascii);
                out.push_str(&opts.key_sep);
                write_json(out, v, opts, level + 1);
            }
            newline(out, opts, level);
            out.push('}');
        }
    }
}

fn json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && (c as u32) > 0x7e) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A number as Python prints it: integers as they are, floats by `repr` (`1.0`, `1e-05`,
/// `1e+16`); `json` spells the non-finite ones `NaN`/`Infinity`, `repr` spells them `nan`/`inf`.
fn number(n: &serde_json::Number, json: bool) -> String {
    if n.is_f64() {
        n.as_f64()
            .map_or_else(|| n.to_string(), |f| float_repr(f, json))
    } else {
        n.to_string()
    }
}

/// Python's `repr(float)`: the shortest round-trip digits, fixed notation for exponents in
/// -4..16, else `d.ddde±XX`.
pub fn float_repr(f: f64, json: bool) -> String {
    if f.is_nan() {
        return if json { "NaN" } else { "nan" }.into();
    }
    if f.is_infinite() {
        let s = if json { "Infinity" } else { "inf" };
        return if f < 0.0 { format!("-{s}") } else { s.into() };
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "1.2345e2", "-1e-5".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').expect("`{:e}` writes an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let body = if point <= 0 {
            format!("0.{}{digits}", "0".repeat((-point) as usize))
        } else if point as usize >= digits.len() {
            format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
        } else {
            format!(
                "{}.{}",
                &digits[..point as usize],
                &digits[point as usize..]
            )
        };
        format!("{sign}{body}")
    } else {
        let m = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{m}e{esign}{:02}", exp.abs())
    }
}

/// Python's `repr` of a value: `{'k': 'v', 'n': 1, 'b': True, 'x': None}`, `[1, 2.0]`.
pub fn repr(value: &Value) -> String {
    let mut out = String::new();
    write_repr(&mut out, value);
    out
}

/// How Python prints a value with `str()`: strings bare, everything else by `repr`.
pub fn str_of(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => repr(other),
    }
}

fn write_repr(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("None"),
        Value::Bool(b) => out.push_str(if *b { "True" } else { "False" }),
        Value::Number(n) => out.push_str(&number(n, false)),
        Value::String(s) => string_repr(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_repr(out, v);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                string_repr(out, k);
                out.push_str(": ");
                write_repr(out, v);
            }
            out.push('}');
        }
    }
}

/// Python's `repr(str)`: single quotes unless the text holds a `'` and no `"`.
fn string_repr(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// MarkupSafe's `escape`: `&`, `<`, `>`, `"` and `'` as `&amp;`, `&lt;`, `&gt;`, `&#34;`,
/// `&#39;` (minijinja spells them `&quot;`, `&#x27;` and escapes `/` too).
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&#34;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Python's `str.splitlines()`: splits at `\n`, `\r\n`, `\r`, `\v`, `\f`, `\x1c`-`\x1e`,
/// `\x85`, U+2028 and U+2029; a final line break ends the last line rather than starting an
/// empty one.
pub fn splitlines(s: &str) -> Vec<&str> {
    let mut lines = Vec::new();
    let mut start = 0;
    let mut chars = s.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let end = match c {
            '\r' if matches!(chars.peek(), Some((_, '\n'))) => {
                chars.next();
                i + 2
            }
            '\n' | '\r' | '\u{b}' | '\u{c}' | '\u{1c}' | '\u{1d}' | '\u{1e}' | '\u{85}'
            | '\u{2028}' | '\u{2029}' => i + c.len_utf8(),
            _ => continue,
        };
        lines.push(&s[start..i]);
        start = end;
    }
    if start < s.len() {
        lines.push(&s[start..]);
    }
    lines
}

/// Jinja2's `indent(s, width, first, blank)` filter with `indention` as the indent: every line
/// after the first is indented, blank lines only when `blank`, the first only when `first`;
/// lines are split as Python splits them and joined with `\n`, and a trailing line break is
/// kept (followed by the indent when `blank`).
pub fn indent(s: &str, indention: &str, first: bool, blank: bool) -> String {
    let s = format!("{s}\n");
    let lines = splitlines(&s);
    let mut rv = String::with_capacity(s.len());
    if first {
        rv.push_str(indention);
    }
    for (i, line) in lines.iter().enumerate() {
        if i > 0 {
            rv.push('\n');
            if blank || !line.is_empty() {
                rv.push_str(indention);
            }
        }
        rv.push_str(line);
    }
    rv
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn dumps_uses_python_separators_order_and_no_html_escaping() {
        let v: Value =
            serde_json::from_str(r#"{"z": 1, "a": [1.0, 1e-5, "<b>&é"], "m": {}}"#).unwrap();
        assert_eq!(
            dumps(&v, &DumpOptions::python(None)),
            r#"{"z": 1, "a": [1.0, 1e-05, "<b>&é"], "m": {}}"#
        );
        assert_eq!(
            dumps(
                &json!([1, {"k": null}]),
                &DumpOptions::python(Some("  ".into()))
            ),
            "[\n  1,\n  {\n    \"k\": null\n  }\n]"
        );
        let ascii = DumpOptions {
            ensure_ascii: true,
            sort_keys: true,
            ..DumpOptions::python(None)
        };
        assert_eq!(
            dumps(&json!({"b": "é😀", "a": 0}), &ascii),
            r#"{"a": 0, "b": "\u00e9\ud83d\ude00"}"#
        );
    }

    #[test]
    fn floats_and_reprs_are_pythons() {
        for (f, s) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1e-5, "1e-05"),
            (1e16, "1e+16"),
            (123.456, "123.456"),
            (-0.0001, "-0.0001"),
            (1.5e300, "1.5e+300"),
            (12345678901234.0, "12345678901234.0"),
        ] {
            assert_eq!(float_repr(f, true), s);
        }
        assert_eq!(
            repr(&json!({"a": true, "b": null, "c": "it's", "d": [1, "x"]})),
            r#"{'a': True, 'b': None, 'c': "it's", 'd': [1, 'x']}"#
        );
    }

    #[test]
    fn escape_and_indent_are_jinja2s() {
        assert_eq!(
            escape_html(r#"<a href="x">'&'/</a>"#),
            "&lt;a href=&#34;x&#34;&gt;&#39;&amp;&#39;/&lt;/a&gt;"
        );
        assert_eq!(
            splitlines("a\r\nb\rc\u{2028}d\n\ne\n"),
            ["a", "b", "c", "d", "", "e"]
        );
        assert!(splitlines("").is_empty());
        assert_eq!(indent("{\n", "    ", true, false), "    {\n");
        assert_eq!(indent("a\n\nb", "  ", false, false), "a\n\n  b");
        assert_eq!(indent("a\n\nb\n", "  ", false, true), "a\n  \n  b\n  ");
        assert_eq!(indent("", "--", true, false), "--");
    }
}
