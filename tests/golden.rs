//! Golden snapshots (insta, in `golden/`) of encoded batches for every label policy and padding
//! mode, shown readably: position, id, token text, mask and label side by side. A changed
//! snapshot must come with a sentence saying why the encoding should change.

mod common;

use std::fmt::Write;
use std::path::Path;

use lorasft::data::Record;
use lorasft::data::encode::{EncodeConfig, Encoder, EosPolicy, LabelPolicy, Padding, PaddingSide};

fn records() -> Vec<Record> {
    let all = common::fixture_records();
    // With input, without input, and unicode.
    vec![all[1].clone(), all[2].clone(), all[10].clone()]
}

fn render(enc: &Encoder, recs: &[Record]) -> String {
    let ex: Vec<_> = recs.iter().map(|r| enc.encode_record(r).unwrap()).collect();
    let rows = enc.collate(&ex.iter().collect::<Vec<_>>());
    let mut out = String::new();
    let c = enc.config();
    writeln!(
        out,
        "max_len {} padding {:?} side {:?} labels {:?} eos {:?}",
        c.max_len, c.padding, c.padding_side, c.labels, c.eos
    )
    .unwrap();
    for (i, (row, e)) in rows.iter().zip(&ex).enumerate() {
        writeln!(
            out,
            "\nrow {i}: {} real tokens of {} (prompt {}), {} targets",
            e.ids.len(),
            e.full_len,
            e.prompt_tokens,
            row.targets()
        )
        .unwrap();
        writeln!(out, "  pos     id  mask  label  token").unwrap();
        for (p, ((id, m), l)) in row
            .input_ids
            .iter()
            .zip(&row.attention_mask)
            .zip(&row.labels)
            .enumerate()
        {
            let tok = enc.tokenizer().id_to_token(*id).unwrap_or_default();
            writeln!(out, "  {p:>3} {id:>6} {m:>5} {l:>6}  {tok:?}").unwrap();
        }
    }
    out
}

fn configs() -> Vec<(String, EncodeConfig)> {
    let mut v = Vec::new();
    for labels in [
        LabelPolicy::InputIds,
        LabelPolicy::MaskPadding,
        LabelPolicy::CompletionOnly,
    ] {
        for (pname, padding, side) in [
            ("max_length", Padding::MaxLength, PaddingSide::Right),
            (
                "longest_x8",
                Padding::Longest {
                    multiple_of: Some(8),
                },
                PaddingSide::Right,
            ),
            (
                "longest_left",
                Padding::Longest { multiple_of: None },
                PaddingSide::Left,
            ),
        ] {
            let name = format!("{}_{pname}", format!("{labels:?}").to_lowercase());
            let eos = if labels == LabelPolicy::InputIds {
                EosPolicy::Omit
            } else {
                EosPolicy::Append
            };
            v.push((
                name,
                EncodeConfig {
                    max_len: 40,
                    padding,
                    padding_side: side,
                    labels,
                    eos,
                    batching: Default::default(),
                    ..Default::default()
                },
            ));
        }
    }
    v
}

fn snapshot_all(prefix: &str, tokenizer: &Path) {
    let recs = records();
    for (name, cfg) in configs() {
        let enc = Encoder::from_file(tokenizer, cfg).unwrap();
        insta::with_settings!({snapshot_path => "../golden", prepend_module_to_snapshot => false, omit_expression => true}, {
            insta::assert_snapshot!(format!("{prefix}_{name}"), render(&enc, &recs));
        });
    }
}

#[test]
fn golden_batches_fixture_tokenizer() {
    snapshot_all("fixture", &common::fixture_tokenizer());
}

#[test]
fn golden_batches_llama_tokenizer() {
    let Some(assets) = common::assets() else {
        return;
    };
    let (_tmp, path) = common::converted_tokenizer(&assets, "vocab/ggml-vocab-llama-spm.gguf");
    snapshot_all("llama", &path);
}
