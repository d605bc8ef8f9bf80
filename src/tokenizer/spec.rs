//! The two vocabulary shapes lorasft builds `tokenizer.json` files for, and the JSON itself.

use std::collections::HashMap;

use serde_json::{Value, json};

use crate::error::{Error, Result};

/// What a vocabulary entry is (GGUF's `tokenizer.ggml.token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// An ordinary piece that BPE can produce by merging.
    Normal,
    /// The unknown token.
    Unknown,
    /// A control token such as `<s>` or `</s>`.
    Control,
    /// A user-defined token, matched verbatim in text.
    UserDefined,
    /// An unused slot.
    Unused,
    /// A byte-fallback token `<0xNN>`.
    Byte,
}

impl TokenKind {
    /// From GGUF's integer code (1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte).
    pub fn from_gguf(code: i64) -> Option<Self> {
        Some(match code {
            1 => TokenKind::Normal,
            2 => TokenKind::Unknown,
            3 => TokenKind::Control,
            4 => TokenKind::UserDefined,
            5 => TokenKind::Unused,
            6 => TokenKind::Byte,
            _ => return None,
        })
    }
}

/// A SentencePiece-style vocabulary (Llama, TinyLlama): pieces with scores, `▁` for spaces,
/// byte fallback. Converted to a BPE model whose merges are ranked by the merged piece's score.
#[derive(Debug, Clone)]
pub struct SpmVocab {
    /// Pieces by id.
    pub tokens: Vec<String>,
    /// Score of each piece (higher merges first).
    pub scores: Vec<f32>,
    /// Kind of each piece.
    pub kinds: Vec<TokenKind>,
    /// Id of `<unk>`.
    pub unk_id: u32,
    /// Id of `<s>`.
    pub bos_id: u32,
    /// Id of `</s>`.
    pub eos_id: u32,
    /// Whether encoding adds BOS (Llama: yes).
    pub add_bos: bool,
    /// Whether encoding adds EOS (Llama: no).
    pub add_eos: bool,
    /// Whether a `▁` is prepended to the text (SentencePiece's add_dummy_prefix).
    pub add_space_prefix: bool,
}

fn added_token(id: usize, content: &str, special: bool) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
           "normalized": false, "special": special})
}

fn template(bos: Option<&str>, eos: Option<&str>, ids: &HashMap<&str, usize>) -> Value {
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut specials = serde_json::Map::new();
    let special = |t: &str| json!({"SpecialToken": {"id": t, "type_id": 0}});
    if let Some(b) = bos {
        single.push(special(b));
        pair.push(special(b));
    }
    single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    pair.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    if let Some(e) = eos {
        single.push(special(e));
        pair.push(special(e));
    }
    if let Some(b) = bos {
        pair.push(special(b));
    }
    pair.push(json!({"Sequence": {"id": "B", "type_id": 1}}));
    if let Some(e) = eos {
        pair.push(special(e));
    }
    for t in [bos, eos].into_iter().flatten() {
        specials.insert(
            t.to_string(),
            json!({"id": t, "ids": [ids[t]], "tokens": [t]}),
        );
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
}

/// Maps each piece to its first id (later duplicates are unreachable, as in SentencePiece).
fn vocab_map(tokens: &[String]) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    for (i, t) in tokens.iter().enumerate() {
        m.entry(t.clone()).or_insert(json!(i));
    }
    m
}

impl SpmVocab {
    /// BPE merges from scores: every split `(l, r)` of a normal piece `l + r` whose halves are
    /// both pieces, ranked by the merged piece's score (descending; ties by merged id, then by
    /// the halves' ids). SentencePiece's BPE merges the best-scoring adjacent pair first, so
    /// this ranking reproduces it.
    pub fn merges(&self) -> Vec<(String, String)> {
        let ids: HashMap<&str, usize> = self
            .tokens
            .iter()
            .enumerate()
            .rev()
            .map(|(i, t)| (t.as_str(), i))
            .collect();
        let mut cands: Vec<(f32, usize, usize, usize)> = Vec::new();
        for (id, (piece, kind)) in self.tokens.iter().zip(&self.kinds).enumerate() {
            if !matches!(kind, TokenKind::Normal | TokenKind::UserDefined)
                || ids[piece.as_str()] != id
            {
                continue;
            }
            for (split, _) in piece.char_indices().skip(1) {
                let (l, r) = piece.split_at(split);
                if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                    cands.push((self.scores[id], id, li, ri));
                }
            }
        }
        cands.sort_by(|a, b| {
            b.0.total_cmp(&a.0)
                .then(a.1.cmp(&b.1))
                .then(a.2.cmp(&b.2))
                .then(a.3.cmp(&b.3))
        });
        cands
            .into_iter()
            .map(|(_, _, l, r)| (self.tokens[l].clone(), self.tokens[r].clone()))
            .collect()
    }

    /// The `tokenizer.json` document, keys sorted (see [`sorted_keys`]).
    pub fn to_json(&self) -> Result<Value> {
        self.document().map(sorted_keys)
    }

    fn document(&self) -> Result<Value> {
        let n = self.tokens.len();
        if self.scores.len() != n || self.kinds.len() != n {
            return Err(Error::Invalid(format!(
                "vocabulary has {n} tokens but {} scores and {} kinds",
                self.scores.len(),
                self.kinds.len()
            )));
        }
        for (what, id) in [
            ("unk", self.unk_id),
            ("bos", self.bos_id),
            ("eos", self.eos_id),
        ] {
            if id as usize >= n {
                return Err(Error::Invalid(format!(
                    "{what} id {id} is outside the vocabulary of {n}"
                )));
            }
        }
        let ids: HashMap<&str, usize> = self
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), i))
            .collect();
        let added: Vec<Value> = self
            .kinds
            .iter()
            .enumerate()
            .filter(|(_, k)| {
                matches!(
                    k,
                    TokenKind::Control | TokenKind::Unknown | TokenKind::UserDefined
                )
            })
            .map(|(i, k)| added_token(i, &self.tokens[i], *k != TokenKind::UserDefined))
            .collect();
        let merges: Vec<Value> = self
            .merges()
            .into_iter()
            .map(|(l, r)| json!([l, r]))
            .collect();
        let mut normalizers = Vec::new();
        if self.add_space_prefix {
            normalizers.push(json!({"type": "Prepend", "prepend": "▁"}));
        }
        normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}));
        let mut decoders = vec![
            json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if self.add_space_prefix {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        let bos = self
            .add_bos
            .then(|| self.tokens[self.bos_id as usize].as_str());
        let eos = self
            .add_eos
            .then(|| self.tokens[self.eos_id as usize].as_str());
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": {"type": "Sequence", "normalizers": normalizers},
            "pre_tokenizer": null,
            "post_processor": template(bos, eos, &ids),
            "decoder": {"type": "Sequence", "decoders": decoders},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": self.tokens[self.unk_id as usize],
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
                "byte_fallback": true, "ignore_merges": false,
                "vocab": vocab_map(&self.tokens), "merges": merges
            }
        }))
    }
}

/// How a byte-level BPE vocabulary splits text before BPE (GGUF's `tokenizer.ggml.pre`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizer {
    /// GPT-2's regex.
    Gpt2,
    /// StarCoder / SmolLM: every digit on its own, then GPT-2's regex.
    DigitsThenGpt2,
    /// Llama 3's regex (case-insensitive contractions, digits in groups of up to three).
    Llama3,
}

impl PreTokenizer {
    /// From GGUF's `tokenizer.ggml.pre` name.
    pub fn from_gguf(name: &str) -> Option<Self> {
        Some(match name {
            "default" | "gpt-2" | "gpt2" => PreTokenizer::Gpt2,
            "starcoder" | "smollm" | "refact" => PreTokenizer::DigitsThenGpt2,
            "llama-bpe" | "llama3" | "llama-v3" => PreTokenizer::Llama3,
            _ => return None,
        })
    }

    fn to_json(self) -> Value {
        let byte_level = |regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": regex});
        match self {
            PreTokenizer::Gpt2 => byte_level(true),
            PreTokenizer::DigitsThenGpt2 => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            PreTokenizer::Llama3 => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": false},
                byte_level(false)]}),
        }
    }
}

const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A GPT-2-style byte-level BPE vocabulary (SmolLM2, StarCoder) with explicit merges.
#[derive(Debug, Clone)]
pub struct ByteLevelVocab {
    /// Tokens by id, in GPT-2's byte-to-unicode alphabet.
    pub tokens: Vec<String>,
    /// Kind of each token.
    pub kinds: Vec<TokenKind>,
    /// Merges in rank order, as `"left right"`.
    pub merges: Vec<String>,
    /// The pre-tokenizer.
    pub pre: PreTokenizer,
    /// BOS id, if the vocabulary adds one.
    pub bos_id: Option<u32>,
    /// Whether encoding adds BOS.
    pub add_bos: bool,
}

impl ByteLevelVocab {
    /// The `tokenizer.json` document, keys sorted (see [`sorted_keys`]).
    pub fn to_json(&self) -> Result<Value> {
        self.document().map(sorted_keys)
    }

    fn document(&self) -> Result<Value> {
        if self.kinds.len() != self.tokens.len() {
            return Err(Error::Invalid(format!(
                "vocabulary has {} tokens but {} kinds",
                self.tokens.len(),
                self.kinds.len()
            )));
        }
        let ids: HashMap<&str, usize> = self
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), i))
            .collect();
        let added: Vec<Value> = self
            .kinds
            .iter()
            .enumerate()
            .filter(|(_, k)| matches!(k, TokenKind::Control | TokenKind::UserDefined))
            .map(|(i, k)| added_token(i, &self.tokens[i], *k == TokenKind::Control))
            .collect();
        let merges = self
            .merges
            .iter()
            .map(|m| {
                let (l, r) = m.split_once(' ').ok_or_else(|| {
                    Error::Invalid(format!(
                        "merge {m:?} is not two tokens separated by a space"
                    ))
                })?;
                Ok(json!([l, r]))
            })
            .collect::<Result<Vec<_>>>()?;
        let post = match (self.add_bos, self.bos_id) {
            (true, Some(b)) => {
                let bos = self.tokens.get(b as usize).ok_or_else(|| {
                    Error::Invalid(format!("bos id {b} is outside the vocabulary"))
                })?;
                template(Some(bos.as_str()), None, &ids)
            }
            _ => {
                json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true})
            }
        };
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": self.pre.to_json(),
            "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                "ignore_merges": self.pre == PreTokenizer::Llama3,
                "vocab": vocab_map(&self.tokens), "merges": merges
            }
        }))
    }
}

/// `v` with every object's keys in sorted order. serde_json keeps insertion order (chat
/// templates need it), and the documents written here are built in whatever order the code
/// inserts; sorting makes their bytes independent of that order, so a regenerated fixture
/// tokenizer stays byte-identical to the committed one.
pub fn sorted_keys(v: Value) -> Value {
    match v {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k, sorted_keys(v)))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted_keys).collect()),
        other => other,
    }
}
