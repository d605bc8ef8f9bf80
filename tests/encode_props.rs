//! Property tests (proptest) for the prompt template and encoding rules 1-6 of docs/ARCHITECTURE.md,
//! over arbitrary records, max lengths, padding modes and label policies.

mod common;

use candle_core::{DType, Device};
use lorasft::data::Record;
use lorasft::data::batch::Batch;
use lorasft::data::encode::{EncodeConfig, Encoder, EosPolicy, LabelPolicy, Padding, PaddingSide};
use lorasft::data::prompt;
use lorasft::model::loss::{IGNORE_INDEX, causal_lm_loss_sum};
use lorasft::model::{Llama, Mode};
use proptest::prelude::*;
use std::sync::OnceLock;

/// Field text: unicode, whitespace, the template's own markers and special-token text.
fn field() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,40}",
        "[ \t\n]{0,4}",
        Just("### Response:".to_string()),
        Just("a\n\n### Response:\nb".to_string()),
        Just("</s> and <s>".to_string()),
        "[a-z ]{1,30}",
        "[éüñ中文🦙 ]{1,12}",
    ]
}

fn record() -> impl Strategy<Value = Record> {
    (field(), prop::option::of(field()), field()).prop_map(|(instruction, input, output)| Record {
        instruction,
        input,
        output,
    })
}

fn policy() -> impl Strategy<Value = LabelPolicy> {
    prop_oneof![
        Just(LabelPolicy::InputIds),
        Just(LabelPolicy::MaskPadding),
        Just(LabelPolicy::CompletionOnly)
    ]
}

fn config() -> impl Strategy<Value = EncodeConfig> {
    (
        2usize..80,
        prop_oneof![
            Just(Padding::MaxLength),
            Just(Padding::Longest { multiple_of: None }),
            Just(Padding::Longest {
                multiple_of: Some(8)
            })
        ],
        prop_oneof![Just(PaddingSide::Right), Just(PaddingSide::Left)],
        policy(),
        prop_oneof![Just(EosPolicy::Omit), Just(EosPolicy::Append)],
    )
        .prop_map(
            |(max_len, padding, padding_side, labels, eos)| EncodeConfig {
                max_len,
                padding,
                padding_side,
                labels,
                eos,
                batching: Default::default(),
                ..Default::default()
            },
        )
}

fn encoder(cfg: EncodeConfig) -> Encoder {
    Encoder::from_file(&common::fixture_tokenizer(), cfg).unwrap()
}

fn model() -> &'static Llama {
    static M: OnceLock<Llama> = OnceLock::new();
    M.get_or_init(|| common::tiny(21, DType::F64))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn prop_template_is_byte_exact_and_splits_by_position(rec in record()) {
        let f = prompt::format(&rec);
        let has_input = rec.input.as_deref().is_some_and(|s| !s.trim().is_empty());
        let expected = if has_input {
            format!("### Instruction:\n{}\n\n### Input:\n{}\n\n### Response:\n{}", rec.instruction, rec.input.as_deref().unwrap(), rec.output)
        } else {
            format!("### Instruction:\n{}\n\n### Response:\n{}", rec.instruction, rec.output)
        };
        prop_assert_eq!(&f.text, &expected);
        prop_assert_eq!(f.response(), rec.output.as_str());
        prop_assert!(f.prompt().ends_with("### Response:\n"));
        prop_assert_eq!(f.prompt().contains("### Input:\n"), has_input || rec.instruction.contains("### Input:\n"));
    }

    #[test]
    fn prop_rows_have_equal_lengths_and_max_length_is_exact(recs in prop::collection::vec(record(), 1..4), cfg in config()) {
        let enc = encoder(cfg.clone());
        let ex: Vec<_> = recs.iter().map(|r| enc.encode_record(r).unwrap()).collect();
        let rows = enc.collate(&ex.iter().collect::<Vec<_>>());
        for row in &rows {
            prop_assert_eq!(row.input_ids.len(), row.attention_mask.len());
            prop_assert_eq!(row.input_ids.len(), row.labels.len());
            prop_assert_eq!(row.input_ids.len(), rows[0].input_ids.len());
            match cfg.padding {
                Padding::MaxLength => prop_assert_eq!(row.input_ids.len(), cfg.max_len),
                Padding::Longest { multiple_of } => {
                    let longest = ex.iter().map(|e| e.ids.len()).max().unwrap();
                    prop_assert!(row.input_ids.len() >= longest && row.input_ids.len() <= cfg.max_len.max(longest).div_ceil(8) * 8);
                    if let Some(m) = multiple_of { prop_assert_eq!(row.input_ids.len() % m, 0); }
                    else { prop_assert_eq!(row.input_ids.len(), longest); }
                }
            }
        }
    }

    #[test]
    fn prop_real_tokens_are_the_head_of_the_untruncated_encoding(rec in record(), cfg in config()) {
        let enc = encoder(cfg.clone());
        let mut full = enc.tokenize(&prompt::format(&rec).text).unwrap().get_ids().to_vec();
        if cfg.eos == EosPolicy::Append { full.push(enc.special_ids().eos); }
        let ex = enc.encode_record(&rec).unwrap();
        let row = enc.row(&ex, enc.padded_len(&[&ex]));
        let real: Vec<u32> = row.input_ids.iter().zip(&row.attention_mask).filter(|(_, m)| **m == 1).map(|(i, _)| *i).collect();
        prop_assert_eq!(real.len(), full.len().min(cfg.max_len));
        prop_assert_eq!(&real[..], &full[..real.len()]);
        prop_assert_eq!(ex.full_len, full.len());
    }

    #[test]
    fn prop_attention_mask_is_one_exactly_on_real_tokens(rec in record(), cfg in config()) {
        let enc = encoder(cfg.clone());
        let ex = enc.encode_record(&rec).unwrap();
        let row = enc.row(&ex, enc.padded_len(&[&ex]));
        let n = ex.ids.len();
        let pad = row.input_ids.len() - n;
        let expected: Vec<u32> = match cfg.padding_side {
            PaddingSide::Right => std::iter::repeat_n(1, n).chain(std::iter::repeat_n(0, pad)).collect(),
            PaddingSide::Left => std::iter::repeat_n(0, pad).chain(std::iter::repeat_n(1, n)).collect(),
        };
        prop_assert_eq!(&row.attention_mask, &expected);
        for (id, m) in row.input_ids.iter().zip(&row.attention_mask) {
            if *m == 0 { prop_assert_eq!(*id, enc.special_ids().pad); }
        }
    }

    #[test]
    fn prop_labels_follow_the_policy_by_position_not_by_id(rec in record(), cfg in config()) {
        let enc = encoder(cfg.clone());
        prop_assert_eq!(enc.special_ids().pad, enc.special_ids().eos, "fixture tokenizer pads with EOS, like TinyLlama");
        let ex = enc.encode_record(&rec).unwrap();
        let row = enc.row(&ex, enc.padded_len(&[&ex]));
        let offset = match cfg.padding_side { PaddingSide::Left => row.input_ids.len() - ex.ids.len(), PaddingSide::Right => 0 };
        for (pos, ((id, m), label)) in row.input_ids.iter().zip(&row.attention_mask).zip(&row.labels).enumerate() {
            let real_index = pos.wrapping_sub(offset);
            let expected = match cfg.labels {
                LabelPolicy::InputIds => i64::from(*id),
                LabelPolicy::MaskPadding if *m == 0 || real_index == 0 => IGNORE_INDEX,
                LabelPolicy::MaskPadding => i64::from(*id),
                LabelPolicy::CompletionOnly if *m == 0 || real_index == 0 || real_index < ex.prompt_tokens => IGNORE_INDEX,
                LabelPolicy::CompletionOnly => i64::from(*id),
                LabelPolicy::AssistantOnly | LabelPolicy::LastAssistant => unreachable!("not an Alpaca policy"),
            };
            prop_assert_eq!(*label, expected, "position {}", pos);
        }
        // An appended EOS keeps its label even though it has the pad id.
        if cfg.eos == EosPolicy::Append && !ex.truncated() && cfg.labels != LabelPolicy::InputIds {
            let eos_pos = offset + ex.ids.len() - 1;
            prop_assert_eq!(row.labels[eos_pos], i64::from(enc.special_ids().eos));
        }
    }

    #[test]
    fn prop_masked_padding_never_changes_the_loss(rec in record(), side in prop_oneof![Just(PaddingSide::Right), Just(PaddingSide::Left)], labels in prop_oneof![Just(LabelPolicy::MaskPadding), Just(LabelPolicy::CompletionOnly)], extra in 1usize..12) {
        let base = EncodeConfig { max_len: 40, padding: Padding::Longest { multiple_of: None }, padding_side: side, labels, eos: EosPolicy::Append, batching: Default::default(), ..Default::default() };
        let dynamic = encoder(base.clone());
        let ex = dynamic.encode_record(&rec).unwrap();
        let tight = Batch::from_rows(&[dynamic.row(&ex, ex.ids.len())], &Device::Cpu).unwrap();
        let padded = Batch::from_rows(&[dynamic.row(&ex, ex.ids.len() + extra)], &Device::Cpu).unwrap();
        let loss = |b: &Batch| {
            let logits = model().forward(&b.input_ids, Some(&b.attention_mask), &mut Mode::Eval).unwrap();
            let l = causal_lm_loss_sum(&logits, &b.labels).unwrap();
            (l.sum.to_scalar::<f64>().unwrap(), l.tokens)
        };
        let (a, ta) = loss(&tight);
        let (b, tb) = loss(&padded);
        prop_assert_eq!(ta, tb);
        prop_assert!((a - b).abs() <= 1e-9 * a.abs().max(1.0), "loss {} with padding vs {} without", b, a);
    }

    #[test]
    fn prop_record_with_all_labels_masked_is_counted_and_loss_stays_finite(rec in record(), long in 60usize..120) {
        // A prompt longer than max_len: CompletionOnly leaves no target at all.
        let rec = Record { instruction: "word ".repeat(long), ..rec };
        let cfg = EncodeConfig { max_len: 32, padding: Padding::MaxLength, padding_side: PaddingSide::Right, labels: LabelPolicy::CompletionOnly, eos: EosPolicy::Append, batching: Default::default(), ..Default::default() };
        let enc = encoder(cfg);
        let ex = enc.encode_record(&rec).unwrap();
        let row = enc.row(&ex, 32);
        prop_assert_eq!(row.targets(), 0);
        let (stats, _) = lorasft::data::stats::compute(&[lorasft::data::formats::Sample::Instruction(rec.clone())], &enc, 1).unwrap();
        prop_assert_eq!(stats.no_trainable_label, 1);
        prop_assert_eq!(stats.response_truncated_away, 1);
        let b = Batch::from_rows(&[row], &Device::Cpu).unwrap();
        let logits = model().forward(&b.input_ids, Some(&b.attention_mask), &mut Mode::Eval).unwrap();
        let l = causal_lm_loss_sum(&logits, &b.labels).unwrap();
        prop_assert_eq!(l.tokens, 0);
        prop_assert!(l.mean().unwrap().to_scalar::<f64>().unwrap() == 0.0);
    }
}
