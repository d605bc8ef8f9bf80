//! A tiny SentencePiece-style BPE trainer for the fixture tokenizer: the same pipeline shape
//! as Llama's (`▁` for spaces, byte fallback, BOS template), small enough to commit and to
//! match a fixture model's vocabulary.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::error::{Error, Result};
use crate::tokenizer::spec::{SpmVocab, TokenKind};

/// SentencePiece's normalisation as Llama uses it: a `▁` prefix and `▁` for every space.
fn normalise(text: &str) -> String {
    format!("▁{}", text.replace(' ', "▁"))
}

/// Splits normalised text into words, each starting at a `▁` (SentencePiece's word split).
fn words(norm: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in norm.chars() {
        if c == '▁' && !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
        cur.push(c);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Trains a vocabulary of exactly `vocab_size` pieces (or fewer if the corpus runs out of
/// pairs seen twice): `<unk>`, `<s>`, `</s>`, 256 byte tokens, the corpus's characters seen at
/// least twice, then merges by pair frequency (ties broken by the pair's text). Deterministic.
pub fn train_spm_bpe(texts: &[String], vocab_size: usize) -> Result<SpmVocab> {
    let base = 3 + 256;
    if vocab_size <= base {
        return Err(Error::Invalid(format!(
            "vocab size must exceed {base} (specials + bytes), got {vocab_size}"
        )));
    }
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut kinds = vec![TokenKind::Unknown, TokenKind::Control, TokenKind::Control];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        kinds.push(TokenKind::Byte);
    }
    let mut scores = vec![0f32; tokens.len()];

    let mut word_freq: BTreeMap<String, usize> = BTreeMap::new();
    let mut char_freq: BTreeMap<char, usize> = BTreeMap::new();
    for t in texts {
        for w in words(&normalise(t)) {
            for c in w.chars() {
                *char_freq.entry(c).or_default() += 1;
            }
            *word_freq.entry(w).or_default() += 1;
        }
    }
    let mut chars: Vec<(char, usize)> = char_freq
        .into_iter()
        .filter(|(c, n)| *n >= 2 || *c == '▁')
        .collect();
    chars.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    for (i, (c, _)) in chars.iter().enumerate() {
        if tokens.len() == vocab_size {
            break;
        }
        tokens.push(c.to_string());
        kinds.push(TokenKind::Normal);
        scores.push(-1e6 - i as f32);
    }
    let mut known: HashSet<String> = tokens.iter().cloned().collect();
    // Each word as its symbols; a character outside the alphabet is a barrier no merge crosses.
    let mut corpus: Vec<(Vec<String>, usize)> = word_freq
        .into_iter()
        .map(|(w, n)| (w.chars().map(|c| c.to_string()).collect(), n))
        .collect();
    let mut step = 0usize;
    while tokens.len() < vocab_size {
        let mut pairs: HashMap<(String, String), usize> = HashMap::new();
        for (syms, n) in &corpus {
            for w in syms.windows(2) {
                if known.contains(&w[0]) && known.contains(&w[1]) {
                    *pairs.entry((w[0].clone(), w[1].clone())).or_default() += n;
                }
            }
        }
        let Some(((l, r), freq)) = pairs
            .into_iter()
            .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
        else {
            break;
        };
        if freq < 2 {
            break;
        }
        let merged = format!("{l}{r}");
        for (syms, _) in &mut corpus {
            let mut i = 0;
            while i + 1 < syms.len() {
                if syms[i] == l && syms[i + 1] == r {
                    syms[i] = merged.clone();
                    syms.remove(i + 1);
                }
                i += 1;
            }
        }
        if known.insert(merged.clone()) {
            tokens.push(merged);
            kinds.push(TokenKind::Normal);
            scores.push(-(step as f32));
        }
        step += 1;
    }
    Ok(SpmVocab {
        tokens,
        scores,
        kinds,
        unk_id: 0,
        bos_id: 1,
        eos_id: 2,
        add_bos: true,
        add_eos: false,
        add_space_prefix: true,
    })
}
