//! Packing changes nothing that is learned: a packed batch gives the loss, the target count
//! and every adapter gradient of the same examples run unpacked (one per row, right-padded),
//! and every example's logits are those of the example run alone.
//!
//! "Unpacked" keeps each example's own targets. Under `input_ids` labels an unpacked row also
//! trains on its padding (the reference rule); a packed row has no padding between examples to
//! train on, so the comparison masks the unpacked rows' padding targets.
//!
//! What these tests cannot see: RoPE scores depend only on the distance between query and key,
//! so under block-diagonal attention, positions that did not restart would change the results
//! by rounding alone. `model::visibility`'s unit tests pin the restart itself.

mod common;

use std::collections::BTreeSet;

use candle_core::{DType, Tensor};
use common::{max_abs, max_abs_diff, randomise_adapters, rel_diff, tiny};
use lorasft::data::batch::Batch;
use lorasft::data::batching::{self, Batching, Planner};
use lorasft::data::encode::{
    EncodeConfig, Encoder, EosPolicy, Example, IGNORE_INDEX, LabelPolicy, Padding, PaddingSide,
    PromptTemplate, SpecialIds,
};
use lorasft::data::formats::Sample;
use lorasft::model::{Llama, LoraConfig, Mode, Projection};
use lorasft::rng::Rng;
use proptest::prelude::*;

fn encoder(labels: LabelPolicy, max_len: usize, batching: Batching) -> Encoder {
    let tok = lorasft::tokenizer::load(&common::fixture_tokenizer()).unwrap();
    let cfg = EncodeConfig {
        max_len,
        padding: Padding::Longest { multiple_of: None },
        padding_side: PaddingSide::Right,
        labels,
        eos: EosPolicy::Omit,
        batching,
        ..Default::default()
    };
    Encoder::new(tok, cfg, SpecialIds { eos: 2, pad: 0 }).unwrap()
}

/// Examples of the given lengths with seeded ids in 3..512 and a seeded prompt length.
fn examples(lengths: &[usize], seed: u64) -> Vec<Example> {
    let mut r = Rng::new(seed);
    lengths
        .iter()
        .map(|&n| {
            let ids = (0..n).map(|_| 3 + r.below(509) as u32).collect();
            let prompt_tokens = r.below(n as u64 + 1) as usize;
            // Conversation-style trained turns (read by the assistant policies only): up to
            // two seeded token ranges, as a multi-turn conversation has.
            let mut cuts: Vec<usize> = (0..4).map(|_| r.below(n as u64 + 1) as usize).collect();
            cuts.sort_unstable();
            Example {
                ids,
                prompt_tokens,
                full_len: n,
                trained: Some(vec![cuts[0]..cuts[1], cuts[2]..cuts[3]]),
                turns_cut: 0,
            }
        })
        .collect()
}

/// A model with LoRA on every projection and non-zero adapters, so every gradient is live.
fn model(dtype: DType, seed: u64) -> Llama {
    let mut m = tiny(seed, dtype);
    let cfg = LoraConfig {
        targets: BTreeSet::from(Projection::ALL),
        ..LoraConfig::default()
    };
    m.add_lora(&cfg, seed + 1).unwrap();
    randomise_adapters(&m, seed + 2);
    m
}

/// Summed loss, target count and the gradient of the mean loss for every adapter tensor.
fn loss_and_grads(m: &Llama, batches: &[Batch]) -> (f64, usize, Vec<Tensor>) {
    let (mut total, mut targets): (Option<Tensor>, usize) = (None, 0);
    for b in batches {
        let l = m.batch_loss_sum(b, &mut Mode::Eval).unwrap();
        targets += l.tokens;
        total = Some(match total {
            None => l.sum,
            Some(t) => (t + l.sum).unwrap(),
        });
    }
    let total = total.unwrap();
    let sum = total
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let grads = (total / targets.max(1) as f64).unwrap().backward().unwrap();
    let g = m
        .lora_vars()
        .iter()
        .map(|(name, v)| {
            // No target at all (a case of only first-position or empty trained turns) leaves
            // the graph without gradients: zeros, which the caller's checks then see.
            match grads.get(v.as_tensor()) {
                Some(g) => g.clone(),
                None if targets == 0 => v.as_tensor().zeros_like().unwrap(),
                None => panic!("{name} has no gradient"),
            }
        })
        .collect();
    (sum, targets, g)
}

/// The examples packed into rows of `capacity`, in micro-batches of `rows` rows.
fn packed_batches(enc: &Encoder, exs: &[Example], rows: usize, seed: u64) -> Vec<Batch> {
    let lengths = exs.iter().map(|e| e.ids.len()).collect();
    let cap = enc.config().max_len;
    Planner::new(Batching::Packed, lengths, cap, rows, seed, true)
        .epoch(0)
        .iter()
        .map(|micro| {
            let r = batching::collate(enc, micro, exs);
            Batch::from_rows(&r, &candle_core::Device::Cpu).unwrap()
        })
        .collect()
}

/// The examples one per row, right-padded to the longest, padding never a target.
fn unpacked_batch(enc: &Encoder, exs: &[Example]) -> Batch {
    let refs: Vec<&Example> = exs.iter().collect();
    let mut rows = enc.collate(&refs);
    for r in &mut rows {
        for (l, &m) in r.labels.iter_mut().zip(&r.attention_mask) {
            if m == 0 {
                *l = IGNORE_INDEX;
            }
        }
    }
    Batch::from_rows(&rows, &candle_core::Device::Cpu).unwrap()
}

fn policy() -> impl Strategy<Value = LabelPolicy> {
    prop_oneof![
        Just(LabelPolicy::InputIds),
        Just(LabelPolicy::MaskPadding),
        Just(LabelPolicy::CompletionOnly),
        Just(LabelPolicy::AssistantOnly),
        Just(LabelPolicy::LastAssistant),
    ]
}

/// Packed against unpacked in `dtype`: loss sums within `tol` relative, equal target counts,
/// every gradient within `tol` of its tensor's scale.
fn check_packed_equals_unpacked(
    dtype: DType,
    tol: f64,
    (capacity, lengths, labels, rows, seed): (usize, Vec<usize>, LabelPolicy, usize, u64),
) -> Result<(), TestCaseError> {
    let lengths: Vec<usize> = lengths.iter().map(|&n| n.min(capacity)).collect();
    let exs = examples(&lengths, seed);
    let m = model(dtype, seed % 5);
    let packed_enc = encoder(labels, capacity, Batching::Packed);
    let plain_enc = encoder(labels, capacity, Batching::Padded);
    let packed = packed_batches(&packed_enc, &exs, rows, seed);
    prop_assert!(packed.iter().all(|b| b.segments.is_some()));
    let (ps, pt, pg) = loss_and_grads(&m, &packed);
    let (us, ut, ug) = loss_and_grads(&m, &[unpacked_batch(&plain_enc, &exs)]);
    prop_assert_eq!(pt, ut, "target counts");
    prop_assume!(ut > 0);
    prop_assert!(
        ((ps - us) / us).abs() <= tol,
        "loss sum {} vs {} ({:?}, capacity {})",
        ps,
        us,
        labels,
        capacity
    );
    // A gradient may be exactly zero: when every target sits at an example's first position,
    // each query sees one key, its softmax is constant, and q_proj's adapters get nothing.
    // Then the packed one must be zero too; and some gradient must be live.
    prop_assert!(
        ug.iter().any(|g| max_abs(g) > 0.0),
        "every gradient is zero"
    );
    for (i, (a, b)) in pg.iter().zip(&ug).enumerate() {
        let d = max_abs_diff(a, b) / max_abs(b).max(f64::MIN_POSITIVE);
        prop_assert!(d <= tol, "gradient {} differs by {:e} relative", i, d);
    }
    Ok(())
}

fn cases() -> impl Strategy<Value = (usize, Vec<usize>, LabelPolicy, usize, u64)> {
    (4usize..=150)
        .prop_flat_map(|cap| {
            (
                Just(cap),
                prop::collection::vec(2usize..=cap.max(2) + 8, 1..=7),
                policy(),
                1usize..=3,
                any::<u64>(),
            )
        })
        .prop_map(|(cap, lengths, labels, rows, seed)| (cap, lengths, labels, rows, seed))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn packed_loss_and_gradients_equal_unpacked_in_f64(case in cases()) {
        check_packed_equals_unpacked(DType::F64, 1e-10, case)?;
    }

    #[test]
    fn packed_loss_and_gradients_equal_unpacked_in_f32(case in cases()) {
        check_packed_equals_unpacked(DType::F32, 1e-5, case)?;
    }
}

/// A tiny model with dropout-free, non-zero adapters on q/v for the trainer-step tests.
fn step_model(seed: u64) -> Llama {
    let mut m = tiny(seed, DType::F32);
    let lora = LoraConfig {
        dropout: 0.0,
        ..LoraConfig::default()
    };
    m.add_lora(&lora, seed + 1).unwrap();
    randomise_adapters(&m, seed + 2);
    m
}

/// The trainer's own step (`train::step::forward_backward`) over one epoch's plan of
/// micro-batches of `max_len`-token rows: (loss sum, targets, real tokens, gradients,
/// micro-batches).
fn epoch_step(
    m: &Llama,
    enc: &Encoder,
    exs: &[Example],
    max_len: usize,
) -> (f64, usize, usize, Vec<Tensor>, usize) {
    let batching = enc.config().batching;
    let lengths = exs.iter().map(|e| e.ids.len()).collect();
    let plan = Planner::new(batching, lengths, max_len, 2, 5, true).epoch(0);
    let micro: Vec<Batch> = plan
        .iter()
        .map(|mb| Batch::from_rows(&batching::collate(enc, mb, exs), m.device()).unwrap())
        .collect();
    let targets = micro.iter().map(|b| b.targets).sum();
    let mut rng = Rng::new(0);
    let (loss, grads, real) =
        lorasft::train::step::forward_backward(m, &m.lora_vars(), &micro, targets, 1.0, &mut rng)
            .unwrap();
    (loss, targets, real, grads, plan.len())
}

/// Packed and padded epochs give the same targets, real tokens, loss and every gradient, in
/// fewer micro-batches.
fn assert_same_step(m: &Llama, run: impl Fn(Batching) -> (f64, usize, usize, Vec<Tensor>, usize)) {
    let (pl, pt, pr, pg, pmicro) = run(Batching::Packed);
    let (ul, ut, ur, ug, umicro) = run(Batching::Padded);
    assert!(
        pmicro < umicro,
        "packing needs fewer micro-batches ({pmicro} vs {umicro})"
    );
    assert!(pt > 0, "some target");
    assert_eq!((pt, pr), (ut, ur), "targets and real tokens");
    assert!(((pl - ul) / ul).abs() < 1e-5, "loss sum {pl} vs {ul}");
    for ((name, _), (a, b)) in m.lora_vars().iter().zip(pg.iter().zip(&ug)) {
        let d = rel_diff(a, b);
        assert!(d < 1e-5, "{name}: gradient differs by {d:e} relative");
    }
}

/// The trainer's own step on the fixture tokenizer's real records, dropout off: the packed
/// micro-batches of an epoch give the loss and gradients of the padded ones.
#[test]
fn the_training_step_on_packed_fixture_records_equals_padded() {
    let records = common::fixture_records();
    let m = step_model(11);
    assert_same_step(&m, |batching| {
        let cfg = EncodeConfig {
            max_len: 96,
            padding: Padding::Longest { multiple_of: None },
            labels: LabelPolicy::MaskPadding,
            eos: EosPolicy::Append,
            batching,
            ..EncodeConfig::default()
        };
        let enc = Encoder::from_file(&common::fixture_tokenizer(), cfg).unwrap();
        let exs: Vec<Example> = records
            .iter()
            .map(|r| enc.encode_record(r).unwrap())
            .collect();
        epoch_step(&m, &enc, &exs, 96)
    });
}

/// The same on a conversation dataset: the fixture records in chat form (a ChatML template),
/// assistant turns only. Packing keeps each example's trained turns and nothing else.
#[test]
fn the_training_step_on_packed_conversations_equals_padded() {
    const CHATML: &str = "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
    let samples: Vec<Sample> = common::fixture_records()
        .into_iter()
        .map(Sample::Instruction)
        .collect();
    let m = step_model(21);
    assert_same_step(&m, |batching| {
        let cfg = EncodeConfig {
            max_len: 256,
            padding: Padding::Longest { multiple_of: None },
            labels: LabelPolicy::AssistantOnly,
            batching,
            template: PromptTemplate::Chat,
            ..EncodeConfig::default()
        };
        let tok = lorasft::tokenizer::load(&common::fixture_tokenizer()).unwrap();
        let template = lorasft::chat::ChatTemplate::new("chatml", CHATML).unwrap();
        let enc = Encoder::new(tok, cfg, SpecialIds { eos: 2, pad: 0 })
            .unwrap()
            .with_chat_template(template, "<s>".into(), "</s>".into())
            .unwrap();
        let exs: Vec<Example> = samples.iter().map(|s| enc.encode(s).unwrap()).collect();
        assert!(exs.iter().all(|e| e.trained.is_some()));
        epoch_step(&m, &enc, &exs, 256)
    });
}

/// Each packed example's logits are those of the example run alone, in f64 (composed path,
/// block-diagonal bias) and f32 (fused path, key ranges).
#[test]
fn per_example_logits_are_unchanged_by_packing() {
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
        let m = model(dtype, 21);
        let lengths = [70, 5, 1, 33, 90];
        let exs = examples(&lengths, 22);
        // Two rows of 123 positions: [70, 5, 1] + 47 padding, and [33, 90].
        let rows = [vec![0usize, 1, 2], vec![3, 4]];
        let s = 123;
        let mut ids = Vec::new();
        for r in &rows {
            let mut row: Vec<u32> = r.iter().flat_map(|&i| exs[i].ids.clone()).collect();
            row.resize(s, 0);
            ids.extend(row);
        }
        let ids = Tensor::from_vec(ids, (2, s), &candle_core::Device::Cpu).unwrap();
        let segments: Vec<Vec<usize>> = rows
            .iter()
            .map(|r| r.iter().map(|&i| lengths[i]).collect())
            .collect();
        let packed = m.forward_packed(&ids, &segments, &mut Mode::Eval).unwrap();
        for (bi, r) in rows.iter().enumerate() {
            let mut start = 0;
            for &i in r {
                let n = lengths[i];
                let alone = Tensor::from_vec(exs[i].ids.clone(), (1, n), &candle_core::Device::Cpu)
                    .unwrap();
                let want = m.forward(&alone, None, &mut Mode::Eval).unwrap();
                let got = packed
                    .narrow(0, bi, 1)
                    .unwrap()
                    .narrow(1, start, n)
                    .unwrap();
                let d = rel_diff(&got, &want);
                assert!(
                    d < tol,
                    "{dtype:?} example {i}: logits differ by {d:e} relative"
                );
                start += n;
            }
        }
    }
}
