//! Finding a model's chat template: `tokenizer_config.json`'s `chat_template` (a string, or a
//! list of named templates), a GGUF's `tokenizer.chat_template`, or a `.jinja` file given by
//! the user, which wins over both.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::chat::template::ChatTemplate;
use crate::error::{Error, Result};
use crate::gguf::Gguf;

/// The GGUF metadata key of the default chat template.
pub const GGUF_KEY: &str = "tokenizer.chat_template";

/// The largest template file read (1 MiB; real ones are under 32 KiB).
pub const MAX_TEMPLATE_BYTES: u64 = 1 << 20;

/// The template in a `tokenizer_config.json` value: its `chat_template` string, or from a list
/// of `{name, template}` the one named `name` (default: `"default"`). `Ok(None)` when the
/// config has no template.
pub fn from_config_value(
    cfg: &Value,
    path: &Path,
    name: Option<&str>,
) -> Result<Option<ChatTemplate>> {
    let source = |n: &str| format!("{}:chat_template{n}", path.display());
    match cfg.get("chat_template") {
        None | Some(Value::Null) => match name {
            Some(n) => Err(Error::Invalid(format!(
                "{}: no chat_template, so none named {n:?}",
                path.display()
            ))),
            None => Ok(None),
        },
        Some(Value::String(t)) => match name {
            Some(n) if n != "default" => Err(Error::Invalid(format!(
                "{}: chat_template is a single template; encode.chat_template_name {n:?} names none",
                path.display()
            ))),
            _ => ChatTemplate::new(source(""), t.clone()).map(Some),
        },
        Some(Value::Array(list)) => {
            let want = name.unwrap_or("default");
            let named: Vec<(&str, &str)> = list
                .iter()
                .filter_map(|e| Some((e.get("name")?.as_str()?, e.get("template")?.as_str()?)))
                .collect();
            match named.iter().find(|(n, _)| *n == want) {
                Some((n, t)) => ChatTemplate::new(source(&format!("[{n}]")), *t).map(Some),
                None => Err(Error::Invalid(format!(
                    "{}: no chat template named {want:?} (named: {}); set encode.chat_template_name",
                    path.display(),
                    named.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
                ))),
            }
        }
        Some(other) => Err(Error::Invalid(format!(
            "{}: chat_template must be a string or a list of {{name, template}}, found {}",
            path.display(),
            match other {
                Value::Bool(_) => "a boolean",
                Value::Number(_) => "a number",
                _ => "an object",
            }
        ))),
    }
}

/// The template of a `tokenizer_config.json` file (see [`from_config_value`]).
pub fn from_tokenizer_config(path: &Path, name: Option<&str>) -> Result<Option<ChatTemplate>> {
    from_config_value(&read_config(path)?, path, name)
}

/// A `tokenizer_config.json` (of any name) read with its size ceiling and parsed.
pub fn read_config(path: &Path) -> Result<Value> {
    let text = crate::input::read_text(
        path,
        crate::input::DOCUMENT_CEILING,
        "a tokenizer_config.json",
    )?;
    serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

/// The template a GGUF file carries (`tokenizer.chat_template`, or
/// `tokenizer.chat_template.NAME` when a name is given).
pub fn from_gguf(g: &Gguf, name: Option<&str>) -> Result<Option<ChatTemplate>> {
    let key = match name {
        Some(n) if n != "default" => format!("{GGUF_KEY}.{n}"),
        _ => GGUF_KEY.to_string(),
    };
    match g.metadata.get(&key) {
        None => Ok(None),
        Some(v) => {
            let text = v.as_str().ok_or_else(|| {
                Error::Invalid(format!("{}: `{key}` is not a string", g.path.display()))
            })?;
            ChatTemplate::new(format!("{}:{key}", g.path.display()), text).map(Some)
        }
    }
}

/// A template from a path the user names: a `.jinja` (or any text) file, a
/// `tokenizer_config.json`, a model directory holding one, or a `.gguf` file.
pub fn from_path(path: &Path, name: Option<&str>) -> Result<ChatTemplate> {
    let none = |p: &Path| Error::Invalid(format!("{}: holds no chat template", p.display()));
    if path.is_dir() {
        let cfg = path.join("tokenizer_config.json");
        return from_tokenizer_config(&cfg, name)?.ok_or_else(|| none(&cfg));
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ext.eq_ignore_ascii_case("gguf") {
        return from_gguf(&Gguf::read(path)?, name)?.ok_or_else(|| none(path));
    }
    if ext.eq_ignore_ascii_case("json") {
        return from_tokenizer_config(path, name)?.ok_or_else(|| none(path));
    }
    ChatTemplate::new(path.display().to_string(), read_bounded(path)?)
}

/// The template a run uses: `given` (`encode.chat_template`) when set, else the one in the
/// `tokenizer_config.json` beside the tokenizer. `Ok(None)` when neither has one.
pub fn for_tokenizer(
    given: Option<&Path>,
    tokenizer: &Path,
    name: Option<&str>,
) -> Result<Option<ChatTemplate>> {
    if let Some(p) = given {
        return from_path(p, name).map(Some);
    }
    let cfg: PathBuf = tokenizer.with_file_name("tokenizer_config.json");
    if !cfg.is_file() {
        return Ok(None);
    }
    from_tokenizer_config(&cfg, name)
}

/// Reads a template file of at most [`MAX_TEMPLATE_BYTES`] (a FIFO, device or directory is
/// refused without blocking), naming it in errors.
fn read_bounded(path: &Path) -> Result<String> {
    crate::input::read_text(path, MAX_TEMPLATE_BYTES, "a chat template")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_templates_single_named_and_missing() {
        let p = Path::new("tokenizer_config.json");
        let single = serde_json::json!({"chat_template": "{{ messages[0].content }}"});
        let t = from_config_value(&single, p, None).unwrap().unwrap();
        assert_eq!(t.source(), "tokenizer_config.json:chat_template");
        let named = serde_json::json!({"chat_template": [
            {"name": "default", "template": "a"}, {"name": "tool_use", "template": "b"}]});
        assert_eq!(
            from_config_value(&named, p, None).unwrap().unwrap().text(),
            "a"
        );
        assert_eq!(
            from_config_value(&named, p, Some("tool_use"))
                .unwrap()
                .unwrap()
                .text(),
            "b"
        );
        let err = from_config_value(&named, p, Some("rag"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("default, tool_use"), "{err}");
        assert!(
            from_config_value(&serde_json::json!({}), p, None)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_huge_template_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.jinja");
        std::fs::write(&big, vec![b'x'; (MAX_TEMPLATE_BYTES + 1) as usize]).unwrap();
        let err = from_path(&big, None).unwrap_err().to_string();
        assert!(
            err.contains("big.jinja") && err.contains("ceiling"),
            "{err}"
        );
        let err = from_path(Path::new("/dev/zero"), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("a device"), "{err}");
    }
}
