//! `tokenizer.json` from the vocabulary stored in a GGUF file (`tokenizer.ggml.*` keys).

use std::path::Path;

use serde_json::Value as Json;

use crate::error::{Error, Result};
use crate::gguf::{Gguf, Value};
use crate::tokenizer::spec::{ByteLevelVocab, PreTokenizer, SpmVocab, TokenKind};

fn strings(g: &Gguf, key: &str) -> Result<Vec<String>> {
    g.get(key)?
        .as_array()
        .ok_or_else(|| Error::Invalid(format!("{}: `{key}` is not an array", g.path.display())))?
        .iter()
        .map(|v| v.as_str().map(str::to_string))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| Error::Invalid(format!("{}: `{key}` holds a non-string", g.path.display())))
}

fn kinds(g: &Gguf, n: usize) -> Result<Vec<TokenKind>> {
    let Some(arr) = g
        .metadata
        .get("tokenizer.ggml.token_type")
        .and_then(Value::as_array)
    else {
        return Ok(vec![TokenKind::Normal; n]);
    };
    arr.iter()
        .enumerate()
        .map(|(i, v)| {
            let code = match v {
                Value::I64(c) => *c,
                Value::U64(c) => *c as i64,
                _ => -1,
            };
            TokenKind::from_gguf(code).ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: token {i} has unknown token_type {v:?}",
                    g.path.display()
                ))
            })
        })
        .collect()
}

fn opt_u32(g: &Gguf, key: &str) -> Option<u32> {
    g.metadata
        .get(key)
        .and_then(Value::as_u64)
        .map(|v| v as u32)
}

fn opt_bool(g: &Gguf, key: &str, default: bool) -> bool {
    g.metadata
        .get(key)
        .and_then(Value::as_bool)
        .unwrap_or(default)
}

/// The SentencePiece vocabulary of a `tokenizer.ggml.model = "llama"` file.
pub fn spm_vocab(g: &Gguf) -> Result<SpmVocab> {
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    let scores = g
        .get("tokenizer.ggml.scores")?
        .as_array()
        .and_then(|a| {
            a.iter()
                .map(|v| v.as_f64().map(|f| f as f32))
                .collect::<Option<Vec<_>>>()
        })
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{}: `tokenizer.ggml.scores` is not a float array",
                g.path.display()
            ))
        })?;
    let kinds = kinds(g, tokens.len())?;
    Ok(SpmVocab {
        unk_id: opt_u32(g, "tokenizer.ggml.unknown_token_id").unwrap_or(0),
        bos_id: opt_u32(g, "tokenizer.ggml.bos_token_id").unwrap_or(1),
        eos_id: opt_u32(g, "tokenizer.ggml.eos_token_id").unwrap_or(2),
        add_bos: opt_bool(g, "tokenizer.ggml.add_bos_token", true),
        add_eos: opt_bool(g, "tokenizer.ggml.add_eos_token", false),
        add_space_prefix: opt_bool(g, "tokenizer.ggml.add_space_prefix", true),
        tokens,
        scores,
        kinds,
    })
}

/// The byte-level BPE vocabulary of a `tokenizer.ggml.model = "gpt2"` file.
pub fn byte_level_vocab(g: &Gguf) -> Result<ByteLevelVocab> {
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    let merges = strings(g, "tokenizer.ggml.merges")?;
    let kinds = kinds(g, tokens.len())?;
    let pre_name = g
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let pre = PreTokenizer::from_gguf(pre_name).ok_or_else(|| {
        Error::Invalid(format!(
            "{}: pre-tokenizer `{pre_name}` is not supported (supported: gpt-2, starcoder, smollm, refact, llama-bpe)",
            g.path.display()
        ))
    })?;
    Ok(ByteLevelVocab {
        bos_id: opt_u32(g, "tokenizer.ggml.bos_token_id"),
        add_bos: opt_bool(g, "tokenizer.ggml.add_bos_token", false),
        tokens,
        kinds,
        merges,
        pre,
    })
}

/// An error about `g`'s vocabulary, prefixed with the file's path unless it names it already.
fn in_file(g: &Gguf, e: Error) -> Error {
    let path = g.path.display().to_string();
    match e {
        Error::Invalid(msg) if !msg.starts_with(&path) => Error::Invalid(format!("{path}: {msg}")),
        other => other,
    }
}

/// The `tokenizer.json` document for a GGUF file's vocabulary; every error names the file.
pub fn tokenizer_json(g: &Gguf) -> Result<Json> {
    vocab_json(g).map_err(|e| in_file(g, e))
}

fn vocab_json(g: &Gguf) -> Result<Json> {
    let model = g
        .get("tokenizer.ggml.model")?
        .as_str()
        .unwrap_or_default()
        .to_string();
    match model.as_str() {
        "llama" => spm_vocab(g)?.to_json(),
        "gpt2" => byte_level_vocab(g)?.to_json(),
        other => Err(Error::Invalid(format!(
            "{}: tokenizer model `{other}` is not supported (supported: llama, gpt2)",
            g.path.display()
        ))),
    }
}

/// The `tokenizer_config.json` that goes beside the converted tokenizer: the BOS, EOS and pad
/// tokens the GGUF file names, so the encoder resolves them as it would for a hub model.
pub fn tokenizer_config(g: &Gguf) -> Result<Json> {
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    let name = |key: &str| -> Result<Json> {
        match opt_u32(g, key) {
            None => Ok(Json::Null),
            Some(id) => tokens
                .get(id as usize)
                .map(|t| Json::String(t.clone()))
                .ok_or_else(|| {
                    Error::Invalid(format!(
                        "{}: `{key}` {id} is outside the vocabulary",
                        g.path.display()
                    ))
                }),
        }
    };
    let llama = g.get("tokenizer.ggml.model")?.as_str() == Some("llama");
    Ok(serde_json::json!({
        "bos_token": name("tokenizer.ggml.bos_token_id")?,
        "eos_token": name("tokenizer.ggml.eos_token_id")?,
        "pad_token": name("tokenizer.ggml.padding_token_id")?,
        "unk_token": name("tokenizer.ggml.unknown_token_id")?,
        "add_bos_token": opt_bool(g, "tokenizer.ggml.add_bos_token", llama),
        "add_eos_token": opt_bool(g, "tokenizer.ggml.add_eos_token", false),
        "converted_from": g.path.file_name().map(|f| f.to_string_lossy().into_owned()),
        // Kept so that `export-gguf` writes the same `tokenizer.ggml.pre` back.
        "gguf_pre": g.metadata.get("tokenizer.ggml.pre").and_then(Value::as_str),
        // The model's own chat template, where transformers looks for it.
        "chat_template": g.metadata.get(crate::chat::locate::GGUF_KEY).and_then(Value::as_str),
    }))
}

/// `cfg` with the source file's absolute path and SHA-256 beside its `converted_from` file
/// name (`converted_from_path`, `converted_from_sha256`): which file exactly an import or a
/// conversion came from.
fn with_provenance(g: &Gguf, cfg: Json) -> Result<Json> {
    let path = std::path::absolute(&g.path).map_err(|e| Error::io(&g.path, e))?;
    let sha = g.sha256()?;
    let Json::Object(fields) = cfg else {
        return Ok(cfg);
    };
    let mut out = serde_json::Map::new();
    for (k, v) in fields {
        let here = k == "converted_from";
        out.insert(k, v);
        if here {
            out.insert(
                "converted_from_path".into(),
                Json::String(path.display().to_string()),
            );
            out.insert("converted_from_sha256".into(), Json::String(sha.clone()));
        }
    }
    Ok(Json::Object(out))
}

/// Converts the vocabulary of `gguf` into a `tokenizer.json` at `out` (and a
/// `tokenizer_config.json` beside it); returns the vocabulary size.
pub fn convert(gguf: &Path, out: &Path) -> Result<usize> {
    convert_parsed(&Gguf::read(gguf)?, out)
}

/// [`convert`] for a header already parsed (an import reads the file's header once).
pub fn convert_parsed(g: &Gguf, out: &Path) -> Result<usize> {
    let gguf = g.path.as_path();
    let json = tokenizer_json(g)?;
    let n = json["model"]["vocab"].as_object().map_or(0, |v| v.len());
    let text = serde_json::to_string(&json).map_err(|e| Error::Invalid(e.to_string()))?;
    // Make sure the tokenizers crate accepts what we wrote before handing it out.
    crate::tokenizer::from_json(&text, gguf)
        .map_err(|e| Error::Invalid(format!("converted tokenizer does not load: {e}")))?;
    let cfg_path = out.with_file_name("tokenizer_config.json");
    let cfg = serde_json::to_string_pretty(&with_provenance(g, tokenizer_config(g)?)?)
        .map_err(|e| Error::Invalid(e.to_string()))?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    crate::output::write(out, text.as_bytes())?;
    crate::output::write(&cfg_path, (cfg + "\n").as_bytes())?;
    Ok(n)
}
