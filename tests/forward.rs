//! The training forward checked against an independent implementation and for mask edge cases.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{Reference, bits, ids, max_abs_diff};
use lorasft::model::Mode;
use lorasft::model::fixture::FixtureSpec;

fn compare_with_reference(spec: &FixtureSpec, dtype: DType, mask: Vec<Vec<u32>>, tol: f64) {
    let seed = 11;
    let model = spec.build(seed, dtype, &Device::Cpu).unwrap();
    let (b, s) = (mask.len(), mask[0].len());
    let input = ids(b, s, spec.vocab, 1);
    let mask_t = Tensor::new(mask.clone(), &Device::Cpu).unwrap();
    let logits = model
        .forward(&input, Some(&mask_t), &mut Mode::Eval)
        .unwrap();
    let reference = Reference::new(spec, seed).logits(&input.to_vec2::<u32>().unwrap(), &mask);
    let reference = Tensor::new(reference, &Device::Cpu).unwrap();
    let diff = max_abs_diff(&logits, &reference);
    println!("{dtype:?} tied={} max |diff| = {diff:e}", spec.tied);
    assert!(
        diff <= tol,
        "logits differ from the reference by {diff:e} > {tol:e}"
    );
}

#[test]
fn logits_match_independent_reference_f64() {
    let full = vec![vec![1; 9]; 2];
    compare_with_reference(&FixtureSpec::default(), DType::F64, full.clone(), 1e-10);
    compare_with_reference(
        &FixtureSpec {
            tied: true,
            ..FixtureSpec::default()
        },
        DType::F64,
        full,
        1e-10,
    );
}

#[test]
fn logits_match_independent_reference_f32_to_1e5() {
    let full = vec![vec![1; 12]; 2];
    compare_with_reference(&FixtureSpec::default(), DType::F32, full, 1e-5);
}

#[test]
fn logits_match_reference_with_right_and_left_padding() {
    let right = vec![vec![1, 1, 1, 1, 1, 1, 0, 0], vec![1, 1, 1, 1, 1, 1, 1, 1]];
    let left = vec![vec![0, 0, 0, 1, 1, 1, 1, 1], vec![1, 1, 1, 1, 1, 1, 1, 1]];
    compare_with_reference(&FixtureSpec::default(), DType::F64, right, 1e-10);
    compare_with_reference(&FixtureSpec::default(), DType::F64, left, 1e-10);
}

#[test]
fn fully_masked_rows_give_finite_logits_in_every_dtype() {
    for dtype in [DType::F32, DType::F64] {
        let model = common::tiny(3, dtype);
        let mask =
            Tensor::new(vec![vec![0u32, 0, 0, 0, 1, 1], vec![0u32; 6]], &Device::Cpu).unwrap();
        let logits = model
            .forward(&ids(2, 6, 512, 2), Some(&mask), &mut Mode::Eval)
            .unwrap();
        let v = logits
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert!(
            v.iter().all(|x| x.is_finite()),
            "{dtype:?}: non-finite logits with fully masked rows"
        );
    }
}

#[test]
fn right_padding_does_not_change_real_token_logits() {
    let model = common::tiny(5, DType::F64);
    let short = ids(1, 5, 512, 4);
    let padded = Tensor::cat(
        &[&short, &Tensor::new(&[[2u32, 2, 2]], &Device::Cpu).unwrap()],
        1,
    )
    .unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 0, 0, 0]], &Device::Cpu).unwrap();
    let a = model.forward(&short, None, &mut Mode::Eval).unwrap();
    let b = model
        .forward(&padded, Some(&mask), &mut Mode::Eval)
        .unwrap()
        .narrow(1, 0, 5)
        .unwrap();
    let diff = max_abs_diff(&a, &b);
    assert!(
        diff < 1e-12,
        "padding changed real-token logits by {diff:e}"
    );
}

#[test]
fn left_padding_does_not_change_real_token_logits() {
    let model = common::tiny(5, DType::F64);
    let short = ids(1, 5, 512, 4);
    let padded = Tensor::cat(
        &[&Tensor::new(&[[2u32, 2, 2]], &Device::Cpu).unwrap(), &short],
        1,
    )
    .unwrap();
    let mask = Tensor::new(&[[0u32, 0, 0, 1, 1, 1, 1, 1]], &Device::Cpu).unwrap();
    let a = model.forward(&short, None, &mut Mode::Eval).unwrap();
    let b = model
        .forward(&padded, Some(&mask), &mut Mode::Eval)
        .unwrap()
        .narrow(1, 3, 5)
        .unwrap();
    let diff = max_abs_diff(&a, &b);
    assert!(
        diff < 1e-12,
        "left padding changed real-token logits by {diff:e}"
    );
}

#[test]
fn forward_is_deterministic_bit_for_bit() {
    let model = common::tiny(9, DType::F32);
    let x = ids(2, 16, 512, 9);
    let a = model.forward(&x, None, &mut Mode::Eval).unwrap();
    let b = model.forward(&x, None, &mut Mode::Eval).unwrap();
    assert_eq!(bits(&a), bits(&b));
}

#[test]
fn out_of_vocabulary_ids_and_overlong_sequences_are_errors() {
    let model = common::tiny(1, DType::F32);
    let bad = Tensor::new(&[[1u32, 600]], &Device::Cpu).unwrap();
    let err = model
        .forward(&bad, None, &mut Mode::Eval)
        .unwrap_err()
        .to_string();
    assert!(err.contains("600") && err.contains("512"), "{err}");
    let long = ids(1, 257, 512, 0);
    let err = model
        .forward(&long, None, &mut Mode::Eval)
        .unwrap_err()
        .to_string();
    assert!(err.contains("257"), "{err}");
}
