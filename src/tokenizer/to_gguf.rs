//! A `tokenizer.json` (BPE, as lorasft's GGUF conversion or a Hugging Face Llama/SmolLM
//! checkpoint writes it) as GGUF `tokenizer.ggml.*` metadata, so an exported model carries
//! its vocabulary the way llama.cpp's converter writes it.
//!
//! - Byte-level BPE (`ByteLevel` pre-tokenizer) becomes `model = "gpt2"`: tokens by id,
//!   merges in rank order, and `pre` named after the pre-tokenizer (`gpt-2`, `smollm` for
//!   digits-then-GPT-2, `llama-bpe` for Llama 3's regex), or the name the GGUF import recorded.
//! - BPE with byte fallback and `▁` for spaces becomes `model = "llama"` (SentencePiece). GGUF
//!   stores a score per piece, not merges: a piece's score is minus the rank of the first merge
//!   that makes it, so SentencePiece's best-score-first merging replays the merge order, and
//!   pieces no merge makes score below every merged piece.
//!
//! Token types: the unknown token 2, special added tokens 3 (control), other added tokens 4
//! (user defined), `<0xNN>` pieces of a byte-fallback vocabulary 6 (byte), the rest 1.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value as GValue;
use serde_json::Value as Json;

use crate::error::{Error, Result};

/// Metadata key/value pairs for a GGUF file.
pub type GgufMeta = Vec<(String, GValue)>;

fn bad(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("{}: {msg}", path.display()))
}

fn read_json(path: &Path) -> Result<Json> {
    let text = crate::input::read_text(path, crate::input::TOKENIZER_CEILING, "a tokenizer JSON")?;
    serde_json::from_str(&text).map_err(|e| bad(path, e))
}

/// Tokens by id: the BPE vocab plus the added tokens, with no id missing.
fn tokens_by_id(j: &Json, path: &Path) -> Result<Vec<String>> {
    let vocab = j["model"]["vocab"]
        .as_object()
        .ok_or_else(|| bad(path, "model.vocab is not an object (only BPE is exported)"))?;
    let mut by_id: HashMap<usize, String> = HashMap::new();
    for (tok, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| bad(path, format!("vocab id of {tok:?} is not an integer")))?;
        by_id.entry(id as usize).or_insert_with(|| tok.clone());
    }
    for a in j["added_tokens"].as_array().into_iter().flatten() {
        if let (Some(id), Some(c)) = (a["id"].as_u64(), a["content"].as_str()) {
            by_id.entry(id as usize).or_insert_with(|| c.to_string());
        }
    }
    (0..by_id.len())
        .map(|i| {
            by_id
                .remove(&i)
                .ok_or_else(|| bad(path, format!("token id {i} is missing from the vocabulary")))
        })
        .collect()
}

/// Merges as `"left right"` strings, from either JSON form (pairs or strings).
fn merges(j: &Json, path: &Path) -> Result<Vec<String>> {
    j["model"]["merges"]
        .as_array()
        .ok_or_else(|| bad(path, "model.merges is not an array"))?
        .iter()
        .map(|m| match m {
            Json::String(s) => Ok(s.clone()),
            Json::Array(p) if p.len() == 2 => match (p[0].as_str(), p[1].as_str()) {
                (Some(l), Some(r)) => Ok(format!("{l} {r}")),
                _ => Err(bad(path, format!("merge {m} is not two strings"))),
            },
            other => Err(bad(path, format!("merge {other} is not a pair"))),
        })
        .collect()
}

/// The GGUF `tokenizer.ggml.pre` name of a byte-level pre-tokenizer.
fn pre_name(pre: &Json) -> &'static str {
    let text = pre.to_string();
    if text.contains("\"Split\"") {
        "llama-bpe"
    } else if text.contains("\"Digits\"") {
        "smollm"
    } else {
        "gpt-2"
    }
}

/// The first special token of the post-processor's single template, and its last one when it
/// comes after the sequence: whether encoding adds BOS and EOS.
fn template_ends(j: &Json) -> (Option<String>, Option<String>) {
    let single = j["post_processor"]["single"].as_array();
    let special = |v: &Json| v["SpecialToken"]["id"].as_str().map(str::to_string);
    let first = single.and_then(|s| s.first()).and_then(special);
    let last = single
        .filter(|s| s.len() > 1)
        .and_then(|s| s.last())
        .and_then(special);
    (first, last)
}

fn ids_of(tokens: &[String]) -> HashMap<&str, u32> {
    let mut m = HashMap::new();
    for (i, t) in tokens.iter().enumerate() {
        m.entry(t.as_str()).or_insert(i as u32);
    }
    m
}

fn is_byte_piece(t: &str) -> bool {
    t.len() == 6
        && t.starts_with("<0x")
        && t.ends_with('>')
        && t[3..5].chars().all(|c| c.is_ascii_hexdigit())
}

/// Scores of a SentencePiece vocabulary from BPE merges: minus the rank of the first merge
/// making each piece; pieces no merge makes score below all of those, in id order.
fn spm_scores(tokens: &[String], merges: &[String]) -> Vec<f32> {
    let ids = ids_of(tokens);
    let mut scores: Vec<Option<f32>> = vec![None; tokens.len()];
    for (rank, m) in merges.iter().enumerate() {
        if let Some(&id) = ids.get(m.replacen(' ', "", 1).as_str()) {
            scores[id as usize].get_or_insert(-(rank as f32));
        }
    }
    let floor = -(merges.len() as f32);
    scores
        .into_iter()
        .enumerate()
        .map(|(i, s)| s.unwrap_or(floor - i as f32))
        .collect()
}

fn u32s(v: impl IntoIterator<Item = i32>) -> GValue {
    GValue::Array(v.into_iter().map(GValue::I32).collect())
}

fn strings(v: impl IntoIterator<Item = String>) -> GValue {
    GValue::Array(v.into_iter().map(GValue::String).collect())
}

/// The special tokens `tokenizer_config.json` beside `tokenizer.json` names, and the
/// pre-tokenizer name a GGUF import recorded there.
fn config_tokens(tokenizer_json: &Path) -> (HashMap<&'static str, String>, Option<String>) {
    let cfg = tokenizer_json.with_file_name("tokenizer_config.json");
    let Ok(j) = read_json(&cfg) else {
        return (HashMap::new(), None);
    };
    let name = |v: &Json| {
        v.as_str()
            .map(str::to_string)
            .or_else(|| v["content"].as_str().map(str::to_string))
    };
    let mut m = HashMap::new();
    for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
        if let Some(t) = name(&j[key]) {
            m.insert(key, t);
        }
    }
    (m, j["gguf_pre"].as_str().map(str::to_string))
}

/// The `tokenizer.ggml.*` metadata for `tokenizer.json` at `path` (and the special tokens of
/// the `tokenizer_config.json` beside it, when there is one).
pub fn gguf_metadata(path: &Path) -> Result<GgufMeta> {
    let j = read_json(path)?;
    if j["model"]["type"].as_str() != Some("BPE") {
        return Err(bad(path, "only BPE tokenizers can be written to GGUF"));
    }
    let tokens = tokens_by_id(&j, path)?;
    let merges = merges(&j, path)?;
    let ids = ids_of(&tokens);
    let (named, recorded_pre) = config_tokens(path);
    let byte_level = j["pre_tokenizer"].to_string().contains("\"ByteLevel\"");
    let byte_fallback = j["model"]["byte_fallback"].as_bool() == Some(true);
    let unk = j["model"]["unk_token"]
        .as_str()
        .or(named.get("unk_token").map(String::as_str))
        .and_then(|t| ids.get(t).copied());
    let mut kinds = vec![1i32; tokens.len()];
    if !byte_level && byte_fallback {
        for (k, t) in kinds.iter_mut().zip(&tokens) {
            if is_byte_piece(t) {
                *k = 6;
            }
        }
    }
    for a in j["added_tokens"].as_array().into_iter().flatten() {
        if let Some(id) = a["id"].as_u64().filter(|&i| (i as usize) < tokens.len()) {
            kinds[id as usize] = if a["special"].as_bool() == Some(true) {
                3
            } else {
                4
            };
        }
    }
    if let Some(u) = unk {
        kinds[u as usize] = 2;
    }
    let (add_bos_tok, add_eos_tok) = template_ends(&j);
    let id_of = |t: Option<&String>| t.and_then(|t| ids.get(t.as_str()).copied());
    let bos = id_of(add_bos_tok.as_ref()).or(id_of(named.get("bos_token")));
    let eos = id_of(named.get("eos_token")).or(id_of(add_eos_tok.as_ref()));
    let pad = id_of(named.get("pad_token"));
    let mut meta: GgufMeta = Vec::new();
    let mut put = |k: &str, v: GValue| meta.push((format!("tokenizer.ggml.{k}"), v));
    if byte_level {
        put("model", GValue::String("gpt2".into()));
        let pre = recorded_pre.unwrap_or_else(|| pre_name(&j["pre_tokenizer"]).to_string());
        put("pre", GValue::String(pre));
        put("tokens", strings(tokens.iter().cloned()));
        put("token_type", u32s(kinds));
        put("merges", strings(merges));
    } else {
        put("model", GValue::String("llama".into()));
        put("pre", GValue::String("default".into()));
        let scores = spm_scores(&tokens, &merges);
        put("tokens", strings(tokens.iter().cloned()));
        put(
            "scores",
            GValue::Array(scores.into_iter().map(GValue::F32).collect()),
        );
        put("token_type", u32s(kinds));
        let prefix = j["normalizer"].to_string().contains("\"Prepend\"");
        put("add_space_prefix", GValue::Bool(prefix));
    }
    for (key, id) in [
        ("bos_token_id", bos),
        ("eos_token_id", eos),
        ("unknown_token_id", unk),
        ("padding_token_id", pad),
    ] {
        if let Some(id) = id {
            put(key, GValue::U32(id));
        }
    }
    put("add_bos_token", GValue::Bool(add_bos_tok.is_some()));
    put("add_eos_token", GValue::Bool(add_eos_tok.is_some()));
    if let Some(t) = chat_template(path) {
        meta.push((crate::chat::locate::GGUF_KEY.into(), GValue::String(t)));
    }
    Ok(meta)
}

/// The single chat template of the `tokenizer_config.json` beside `tokenizer.json`, written
/// back as `tokenizer.chat_template` so llama.cpp and an import find the model's own template.
fn chat_template(tokenizer_json: &Path) -> Option<String> {
    let cfg = tokenizer_json.with_file_name("tokenizer_config.json");
    let j = read_json(&cfg).ok()?;
    match &j["chat_template"] {
        Json::String(t) => Some(t.clone()),
        Json::Array(list) => list
            .iter()
            .find(|e| e["name"].as_str() == Some("default"))
            .and_then(|e| e["template"].as_str().map(str::to_string)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spm_scores_replay_the_merge_order() {
        let tokens: Vec<String> = ["<unk>", "a", "b", "c", "ab", "bc", "abc"]
            .iter()
            .map(|t| t.to_string())
            .collect();
        // "ab" first, then "abc" (two ways), then "bc"; single letters score below all.
        let merges: Vec<String> = ["a b", "ab c", "a bc", "b c"]
            .iter()
            .map(|m| m.to_string())
            .collect();
        let s = spm_scores(&tokens, &merges);
        assert_eq!(s[4], 0.0);
        assert_eq!(s[6], -1.0);
        assert_eq!(s[5], -3.0);
        assert!(s[1] < -3.0 && s[2] < s[1] && s[0] > s[1]);
    }

    #[test]
    fn byte_pieces_and_pre_tokenizer_names() {
        assert!(is_byte_piece("<0x0A>") && is_byte_piece("<0xff>"));
        assert!(!is_byte_piece("<0xZZ>") && !is_byte_piece("<0x0A") && !is_byte_piece("a"));
        let j = |s: &str| serde_json::from_str::<Json>(s).unwrap();
        assert_eq!(pre_name(&j(r#"{"type": "ByteLevel"}"#)), "gpt-2");
        assert_eq!(
            pre_name(&j(
                r#"{"type": "Sequence", "pretokenizers": [{"type": "Digits"}, {"type": "ByteLevel"}]}"#
            )),
            "smollm"
        );
        assert_eq!(
            pre_name(&j(
                r#"{"type": "Sequence", "pretokenizers": [{"type": "Split"}, {"type": "ByteLevel"}]}"#
            )),
            "llama-bpe"
        );
    }
}
