//! Each op with a hand-written backward against its composed primitive form (autograd) and
//! against central finite differences, in f64 on tiny shapes.

mod common;

use candle_core::{D, DType, Device, Tensor, Var};
use common::{max_abs_diff, rel_diff};
use lorasft::model::cpu::linear_ce::{exp_f32, linear_cross_entropy_sum};
use lorasft::model::cpu::ops as host_ops;
use lorasft::model::frozen::Frozen;
use lorasft::model::ops;
use lorasft::rng::Rng;

fn randn(dims: &[usize], seed: u64) -> Tensor {
    let mut r = Rng::new(seed);
    let n: usize = dims.iter().product();
    Tensor::from_vec(
        (0..n).map(|_| r.normal()).collect::<Vec<f64>>(),
        dims,
        &Device::Cpu,
    )
    .unwrap()
}

/// Gradient of sum(f(x) * r) w.r.t. x by autograd, for a fixed random projection r.
fn grad_of(f: &dyn Fn(&Tensor) -> Tensor, x: &Tensor, r: &Tensor) -> Tensor {
    let v = Var::from_tensor(x).unwrap();
    let loss = (f(v.as_tensor()) * r).unwrap().sum_all().unwrap();
    loss.backward()
        .unwrap()
        .get(v.as_tensor())
        .expect("input has a gradient")
        .clone()
}

/// The same gradient by central differences, element by element.
fn fd_grad(f: &dyn Fn(&Tensor) -> Tensor, x: &Tensor, r: &Tensor) -> Tensor {
    let eps = 1e-6;
    let base = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let obj = |v: Vec<f64>| -> f64 {
        let t = Tensor::from_vec(v, x.shape(), &Device::Cpu).unwrap();
        (f(&t) * r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let g: Vec<f64> = (0..base.len())
        .map(|i| {
            let (mut p, mut m) = (base.clone(), base.clone());
            p[i] += eps;
            m[i] -= eps;
            (obj(p) - obj(m)) / (2.0 * eps)
        })
        .collect();
    Tensor::from_vec(g, x.shape(), &Device::Cpu).unwrap()
}

/// Checks the written backward against autograd of the composed form (1e-12) and against
/// finite differences (1e-7: central differences with eps 1e-6 in f64).
fn check(
    name: &str,
    fused: &dyn Fn(&Tensor) -> Tensor,
    composed: &dyn Fn(&Tensor) -> Tensor,
    x: &Tensor,
) {
    let y = fused(x);
    let r = randn(y.dims(), 99);
    let fwd = max_abs_diff(&y, &composed(x));
    let g_fused = grad_of(fused, x, &r);
    let g_comp = grad_of(composed, x, &r);
    let g_fd = fd_grad(fused, x, &r);
    let (d_comp, d_fd) = (
        max_abs_diff(&g_fused, &g_comp),
        max_abs_diff(&g_fused, &g_fd),
    );
    println!(
        "{name}: forward {fwd:e}, backward vs composed {d_comp:e}, vs finite differences {d_fd:e}"
    );
    assert!(
        fwd < 1e-12,
        "{name}: forward differs from the composed form by {fwd:e}"
    );
    assert!(
        d_comp < 1e-12,
        "{name}: backward differs from autograd of the composed form by {d_comp:e}"
    );
    assert!(
        d_fd < 1e-7,
        "{name}: backward differs from finite differences by {d_fd:e}"
    );
}

#[test]
fn frozen_linear_backward_matches_matmul_and_finite_differences() {
    let w = randn(&[5, 4], 1);
    let x = randn(&[2, 3, 4], 2);
    let w2 = w.clone();
    check(
        "frozen_linear",
        &move |x| ops::frozen_linear(x, &w).unwrap(),
        &move |x| x.broadcast_matmul(&w2.t().unwrap()).unwrap(),
        &x,
    );
}

#[test]
fn rms_norm_backward_matches_composed_form_and_finite_differences() {
    let w = randn(&[6], 3).affine(0.1, 1.0).unwrap();
    let x = randn(&[2, 3, 6], 4);
    let w2 = w.clone();
    check(
        "rms_norm",
        &move |x| ops::rms_norm(x, &w, 1e-5).unwrap(),
        &move |x| {
            let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            x.broadcast_div(&(ms + 1e-5).unwrap().sqrt().unwrap())
                .unwrap()
                .broadcast_mul(&w2)
                .unwrap()
        },
        &x,
    );
}

#[test]
fn rope_backward_matches_composed_form_and_finite_differences() {
    let (s, d) = (5, 8);
    let ang: Vec<f64> = (0..s)
        .flat_map(|p| (0..d).map(move |j| p as f64 * 0.3f64.powi((j % (d / 2)) as i32)))
        .collect();
    let ang = Tensor::from_vec(ang, (s, d), &Device::Cpu).unwrap();
    let (cos, sin) = (ang.cos().unwrap(), ang.sin().unwrap());
    let x = randn(&[1, 2, s, d], 5);
    let (c2, s2) = (cos.clone(), sin.clone());
    check(
        "rope",
        &move |x| ops::rope(x, &cos, &sin).unwrap(),
        &move |x| {
            (x.broadcast_mul(&c2).unwrap()
                + ops::rotate_half(x).unwrap().broadcast_mul(&s2).unwrap())
            .unwrap()
        },
        &x,
    );
}

#[test]
fn softmax_backward_matches_composed_form_and_finite_differences() {
    let x = randn(&[2, 3, 7], 6);
    check(
        "softmax",
        &|x| ops::softmax_last_dim(x).unwrap(),
        &|x| ops::softmax_composed(x).unwrap(),
        &x,
    );
}

#[test]
fn log_softmax_matches_log_of_softmax_and_finite_differences() {
    let x = randn(&[3, 9], 7);
    check(
        "log_softmax",
        &|x| ops::log_softmax(x).unwrap(),
        &|x| ops::softmax_composed(x).unwrap().log().unwrap(),
        &x,
    );
}

#[test]
fn frozen_linear_puts_no_weight_in_the_gradient_store() {
    let w = randn(&[5, 4], 8);
    let x = Var::from_tensor(&randn(&[3, 4], 9)).unwrap();
    let grads = ops::frozen_linear(x.as_tensor(), &w)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(grads.get(&w).is_none(), "frozen weight received a gradient");
    assert!(grads.get(x.as_tensor()).is_some());
    // A plain matmul would have computed dW: the reason the op exists.
    let wt = w.t().unwrap();
    let grads = x
        .as_tensor()
        .matmul(&wt)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(grads.get(&wt).map(|g| g.dims().to_vec()), Some(vec![4, 5]));
}

#[test]
fn ops_pass_untracked_inputs_through_without_a_graph() {
    let x = randn(&[2, 4], 10);
    let w = randn(&[3, 4], 11);
    let y = ops::frozen_linear(&x, &w).unwrap();
    assert!(!y.track_op());
    assert_eq!(y.dtype(), DType::F64);
}

/// The composed reference of the fused loss: `-sum log_softmax(h w^T)[t]`.
fn composed_ce(h: &Tensor, w: &Tensor, ids: &[u32]) -> Tensor {
    let idx = Tensor::from_vec(ids.to_vec(), (ids.len(), 1), h.device()).unwrap();
    ops::log_softmax(&h.matmul(&w.t().unwrap()).unwrap())
        .unwrap()
        .gather(&idx, 1)
        .unwrap()
        .sum_all()
        .unwrap()
        .neg()
        .unwrap()
}

/// The fused loss against a dense weight.
fn ce(h: &Tensor, w: &Tensor, ids: &[u32]) -> lorasft::error::Result<Tensor> {
    linear_cross_entropy_sum(h, &Frozen::Dense(w.clone()), ids)
}

fn targets(n: usize, v: usize, seed: u64) -> Vec<u32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.below(v as u64) as u32).collect()
}

#[test]
fn linear_cross_entropy_backward_matches_composed_form_and_finite_differences() {
    let (h, w) = (randn(&[6, 5], 12), randn(&[11, 5], 13));
    let ids = targets(6, 11, 14);
    check(
        "linear-cross-entropy",
        &|h| ce(h, &w, &ids).unwrap(),
        &|h| composed_ce(h, &w, &ids),
        &h,
    );
}

#[test]
fn linear_cross_entropy_f32_over_several_chunks_matches_f64() {
    // v = 2^15 allows at most 256 rows a chunk, so 601 rows take three chunks: 201, 201, 199.
    let (n, d, v) = (601, 8, 1 << 15);
    let (h64, w64) = (randn(&[n, d], 15), (randn(&[v, d], 16) * 3.0).unwrap());
    let ids = targets(n, v, 17);
    let (h32, w32) = (
        h64.to_dtype(DType::F32).unwrap(),
        w64.to_dtype(DType::F32).unwrap(),
    );
    let grad = |h: &Tensor, w: &Tensor, fused: bool| {
        let var = Var::from_tensor(h).unwrap();
        let loss = if fused {
            ce(var.as_tensor(), w, &ids).unwrap()
        } else {
            composed_ce(var.as_tensor(), w, &ids)
        };
        let g = loss
            .backward()
            .unwrap()
            .get(var.as_tensor())
            .unwrap()
            .clone();
        (
            loss.to_dtype(DType::F64).unwrap(),
            g.to_dtype(DType::F64).unwrap(),
        )
    };
    let (l_ref, g_ref) = grad(&h64, &w64, false);
    let (l_f64, g_f64) = grad(&h64, &w64, true);
    let (l_f32, g_f32) = grad(&h32, &w32, true);
    let scalar = |t: &Tensor| t.to_scalar::<f64>().unwrap();
    assert!(common::close(scalar(&l_f64), scalar(&l_ref), 1e-9));
    assert!(max_abs_diff(&g_f64, &g_ref) < 1e-12);
    let rel = (scalar(&l_f32) - scalar(&l_ref)).abs() / scalar(&l_ref);
    let g_err = max_abs_diff(&g_f32, &g_ref);
    println!("f32 fused: loss rel err {rel:e}, grad max abs err {g_err:e}");
    assert!(
        common::close(scalar(&l_f32), scalar(&l_ref), 1e-6),
        "f32 loss relative error {rel:e}"
    );
    assert!(g_err < 1e-4, "f32 gradient error {g_err:e}");
}

#[test]
fn linear_cross_entropy_half_precision_uses_the_composed_path_within_tolerance() {
    let (h, w) = (randn(&[20, 16], 18), randn(&[300, 16], 19));
    let ids = targets(20, 300, 20);
    let reference = composed_ce(&h, &w, &ids).to_scalar::<f64>().unwrap();
    // bf16 keeps 8 mantissa bits, f16 11: each gets its own bound.
    for (dtype, bound) in [(DType::BF16, 2e-2), (DType::F16, 3e-3)] {
        let var = Var::from_tensor(&h.to_dtype(dtype).unwrap()).unwrap();
        let loss = ce(var.as_tensor(), &w.to_dtype(dtype).unwrap(), &ids).unwrap();
        assert_eq!(loss.dtype(), DType::F32, "the loss is kept in f32");
        let got = f64::from(loss.to_scalar::<f32>().unwrap());
        println!(
            "{dtype:?}: loss rel err {:e}",
            (got - reference).abs() / reference
        );
        assert!(
            common::close(got, reference, bound),
            "{dtype:?}: {got} vs {reference}"
        );
        let g = loss.backward().unwrap();
        let g = g
            .get(var.as_tensor())
            .expect("gradient reaches the hidden rows");
        assert_eq!(g.dtype(), dtype);
    }
}

#[test]
fn linear_cross_entropy_refuses_bad_targets_and_gives_no_weight_gradient() {
    let (h, w) = (randn(&[2, 3], 21), randn(&[4, 3], 22));
    assert!(ce(&h, &w, &[0, 4]).is_err());
    assert!(ce(&h, &w, &[0]).is_err());
    let var = Var::from_tensor(&h).unwrap();
    let grads = ce(var.as_tensor(), &w, &[1, 3])
        .unwrap()
        .backward()
        .unwrap();
    assert!(
        grads.get(&w).is_none(),
        "frozen lm_head received a gradient"
    );
    assert!(grads.get(var.as_tensor()).is_some());
}

#[test]
fn fast_exp_is_within_two_ulp_of_exp() {
    let mut worst = 0f64;
    for i in 0..=1_000_000 {
        let x = -87.0 * i as f32 / 1e6;
        let exact = f64::from(x).exp();
        let err = (f64::from(exp_f32(x)) - exact).abs() / exact;
        worst = worst.max(err);
    }
    println!("fast exp: worst relative error {worst:e} on [-87, 0]");
    assert!(worst < 2.0 * f64::from(f32::EPSILON), "{worst:e}");
    assert_eq!(exp_f32(-200.0), 0.0);
    assert_eq!(exp_f32(0.0), 1.0);
}

// ---- The fused CPU f32 ops (host_ops) against the composed form in f64 ----

/// The fused f32 op's forward and backward against autograd of the composed form in f64, on
/// the same inputs: both within `tol` relative to the reference's largest magnitude.
fn check_f32(
    name: &str,
    fused: &dyn Fn(&Tensor) -> Tensor,
    composed: &dyn Fn(&Tensor) -> Tensor,
    x: &Tensor,
    tol: f64,
) {
    let x32 = x.to_dtype(DType::F32).unwrap();
    let x = x32.to_dtype(DType::F64).unwrap(); // the same values in both precisions
    let (y32, y64) = (fused(&x32), composed(&x));
    assert_eq!(y32.dtype(), DType::F32, "{name}: fused output dtype");
    let r32 = randn(y64.dims(), 98).to_dtype(DType::F32).unwrap();
    let r = r32.to_dtype(DType::F64).unwrap();
    let (g32, g64) = (grad_of(fused, &x32, &r32), grad_of(composed, &x, &r));
    let (fwd, bwd) = (rel_diff(&y32, &y64), rel_diff(&g32, &g64));
    println!("{name} (f32 fused vs f64 composed): forward {fwd:e}, backward {bwd:e}");
    assert!(fwd < tol, "{name}: forward differs by {fwd:e} (relative)");
    assert!(bwd < tol, "{name}: backward differs by {bwd:e} (relative)");
}

#[test]
fn fused_frozen_linear_f32_matches_f64_matmul() {
    let w = randn(&[40, 24], 11);
    let w32 = w.to_dtype(DType::F32).unwrap();
    check_f32(
        "frozen_linear",
        &move |x| {
            x.apply_op1(host_ops::FrozenLinear {
                w: Frozen::Dense(w32.clone()),
            })
            .unwrap()
        },
        &move |x| x.broadcast_matmul(&w.t().unwrap()).unwrap(),
        &randn(&[2, 37, 24], 12),
        1e-6,
    );
}

#[test]
fn fused_rms_norm_f32_matches_f64_composed() {
    let w = randn(&[48], 13).affine(0.1, 1.0).unwrap();
    let w32 = w.to_dtype(DType::F32).unwrap();
    check_f32(
        "rms_norm",
        &move |x| {
            x.apply_op1(host_ops::RmsNorm {
                w: w32.clone(),
                eps: 1e-5,
            })
            .unwrap()
        },
        &move |x| ops::rms_norm(x, &w, 1e-5).unwrap(),
        &randn(&[3, 5, 48], 14),
        1e-6,
    );
}

/// Composed (b, s, n*d) -> (b, n, s, d) with rope on the way, in f64 primitives.
fn composed_heads(x: &Tensor, n: usize, rot: Option<(&Tensor, &Tensor)>) -> Tensor {
    let (b, s, nd) = x.dims3().unwrap();
    let x = x
        .reshape((b, s, n, nd / n))
        .unwrap()
        .transpose(1, 2)
        .unwrap();
    match rot {
        None => x.contiguous().unwrap(),
        Some((c, sn)) => (x.broadcast_mul(c).unwrap()
            + ops::rotate_half(&x).unwrap().broadcast_mul(sn).unwrap())
        .unwrap(),
    }
}

#[test]
fn fused_rope_heads_f32_matches_f64_composed_for_shared_and_per_row_tables() {
    let (b, s, n, d) = (2, 5, 3, 8);
    // Tables with unequal halves: the backward must be the exact transpose, not a reuse of
    // the forward with -sin (which only holds when the halves repeat).
    let tables = [
        (randn(&[s, d], 15), randn(&[s, d], 16)),
        (randn(&[b, 1, s, d], 17), randn(&[b, 1, s, d], 18)),
    ];
    for (cos, sin) in tables {
        let (c32, s32) = (
            cos.to_dtype(DType::F32).unwrap(),
            sin.to_dtype(DType::F32).unwrap(),
        );
        check_f32(
            &format!("rope_heads {:?}", cos.dims()),
            &move |x| {
                x.apply_op1(host_ops::RopeHeads {
                    heads: n,
                    rotation: Some((c32.clone(), s32.clone())),
                })
                .unwrap()
            },
            &move |x| composed_heads(x, n, Some((&cos, &sin))),
            &randn(&[b, s, n * d], 19),
            1e-6,
        );
    }
    check_f32(
        "heads transpose",
        &move |x| {
            x.apply_op1(host_ops::RopeHeads {
                heads: n,
                rotation: None,
            })
            .unwrap()
        },
        &move |x| composed_heads(x, n, None),
        &randn(&[b, s, n * d], 20),
        1e-12,
    );
}

#[test]
fn fused_swiglu_f32_matches_f64_composed_in_both_inputs() {
    let gate = randn(&[3, 4, 50], 22).affine(4.0, 0.0).unwrap(); // reaches the sigmoid's tails
    let up = randn(&[3, 4, 50], 23);
    let r = randn(&[3, 4, 50], 24);
    let grads = |dtype: DType, fused: bool| {
        let g = Var::from_tensor(&gate.to_dtype(dtype).unwrap()).unwrap();
        let u = Var::from_tensor(&up.to_dtype(dtype).unwrap()).unwrap();
        let m = if fused {
            g.as_tensor()
                .apply_op2(u.as_tensor(), host_ops::SwiGlu)
                .unwrap()
        } else {
            (g.as_tensor().silu().unwrap() * u.as_tensor()).unwrap()
        };
        let loss = (&m * r.to_dtype(dtype).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let store = loss.backward().unwrap();
        let dg = store.get(g.as_tensor()).unwrap().clone();
        let du = store.get(u.as_tensor()).unwrap().clone();
        (m, dg, du)
    };
    let (m32, dg32, du32) = grads(DType::F32, true);
    let (m64, dg64, du64) = grads(DType::F64, false);
    let d = [
        rel_diff(&m32, &m64),
        rel_diff(&dg32, &dg64),
        rel_diff(&du32, &du64),
    ];
    println!("swiglu (f32 fused vs f64 composed): forward, dgate, dup {d:?}");
    assert!(d.iter().all(|&x| x < 1e-6), "{d:?}");
}

#[test]
fn model_ops_take_the_fused_path_for_f32_on_the_cpu() {
    // The dispatching wrappers give the fused op's exact bits for CPU f32 inputs.
    let x = randn(&[2, 5, 48], 25).to_dtype(DType::F32).unwrap();
    let w = randn(&[48], 26).to_dtype(DType::F32).unwrap();
    let direct = x
        .apply_op1(host_ops::RmsNorm {
            w: w.clone(),
            eps: 1e-5,
        })
        .unwrap();
    assert_eq!(
        max_abs_diff(&ops::rms_norm(&x, &w, 1e-5).unwrap(), &direct),
        0.0
    );
    let heads = ops::to_heads(&x, 6, None).unwrap();
    assert_eq!(heads.dims(), &[2, 6, 5, 8]);
    let direct = x
        .apply_op1(host_ops::RopeHeads {
            heads: 6,
            rotation: None,
        })
        .unwrap();
    assert_eq!(max_abs_diff(&heads, &direct), 0.0);
}

#[test]
fn fused_attention_f32_matches_f64_composed_in_all_three_inputs() {
    use lorasft::model::cpu::attention::{Attention, Mask};
    use lorasft::model::llama::attention_bias;
    let (b, nh, nkv, d) = (2, 4, 2, 8);
    let keep = vec![vec![1, 1, 1, 1, 1], vec![0, 0, 1, 1, 1]];
    let cases = [
        // Training: causal + left padding per row, s = t.
        (
            attention_bias(&keep, DType::F64, &Device::Cpu).unwrap(),
            b,
            5,
            5,
        ),
        // Three query blocks of 64 (the fused op's key limits), with left padding long enough
        // that row 1's first 70 queries see no key at all.
        (
            attention_bias(
                &[vec![1; 150], [vec![0; 70], vec![1; 80]].concat()],
                DType::F64,
                &Device::Cpu,
            )
            .unwrap(),
            b,
            150,
            150,
        ),
        // Generation with a cache: 3 new queries over 7 keys, one shared bias block.
        (
            Tensor::zeros((1, 1, 3, 7), DType::F64, &Device::Cpu).unwrap(),
            1,
            3,
            7,
        ),
    ];
    let scale = 1.0 / (d as f64).sqrt();
    for (bias, b, s, t) in cases {
        let inputs = [
            randn(&[b, nh, s, d], 30),
            randn(&[b, nkv, t, d], 31),
            randn(&[b, nkv, t, d], 32),
        ]
        .map(|x| x.affine(2.0, 0.0).unwrap().to_dtype(DType::F32).unwrap());
        let r32 = randn(&[b, s, nh * d], 33).to_dtype(DType::F32).unwrap();
        let run = |dtype: DType| {
            let vars = inputs
                .clone()
                .map(|x| Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap());
            let [q, k, v] = [0, 1, 2].map(|i| vars[i].as_tensor().clone());
            let o = ops::attention(
                &q,
                &k,
                &v,
                &Mask::Bias(bias.to_dtype(dtype).unwrap()),
                scale,
            )
            .unwrap();
            let loss = (&o * r32.to_dtype(dtype).unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            let store = loss.backward().unwrap();
            let grads = [q, k, v].map(|x| store.get(&x).expect("input has a gradient").clone());
            (o, grads)
        };
        let (o32, g32) = run(DType::F32);
        let (o64, g64) = run(DType::F64);
        let d = [
            rel_diff(&o32, &o64),
            rel_diff(&g32[0], &g64[0]),
            rel_diff(&g32[1], &g64[1]),
            rel_diff(&g32[2], &g64[2]),
        ];
        println!(
            "attention {:?} (f32 fused vs f64 composed): out, dq, dk, dv {d:?}",
            bias.dims()
        );
        assert!(d.iter().all(|&x| x < 1e-6), "{d:?}");
        // The f32 call took the fused op.
        let bias32 = bias.to_dtype(DType::F32).unwrap();
        let direct = inputs[0]
            .apply_op3(
                &inputs[1],
                &inputs[2],
                Attention::new(Mask::Bias(bias32), scale as f32),
            )
            .unwrap();
        assert_eq!(max_abs_diff(&o32, &direct), 0.0);
    }
}

#[test]
fn fused_attention_over_key_ranges_matches_the_composed_block_diagonal_bias() {
    use lorasft::model::cpu::attention::Mask;
    use lorasft::model::visibility::KeyRanges;
    use std::sync::Arc;
    let (b, nh, nkv, d, s) = (2, 4, 2, 8, 150);
    // Row 0: three examples and 30 padding slots; row 1: one token, then 149 (query blocks
    // of 64 that straddle example boundaries in both rows).
    let ranges = KeyRanges::packed(&[vec![70, 30, 20], vec![1, 149]], s).unwrap();
    let inputs = [
        randn(&[b, nh, s, d], 40),
        randn(&[b, nkv, s, d], 41),
        randn(&[b, nkv, s, d], 42),
    ]
    .map(|x| x.affine(2.0, 0.0).unwrap());
    let r = randn(&[b, s, nh * d], 43);
    let scale = 1.0 / (d as f64).sqrt();
    let run = |dtype: DType, mask: Mask| {
        let vars = inputs
            .clone()
            .map(|x| Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap());
        let [q, k, v] = [0, 1, 2].map(|i| vars[i].as_tensor().clone());
        let o = ops::attention(&q, &k, &v, &mask, scale).unwrap();
        let loss = (&o * r.to_dtype(dtype).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let store = loss.backward().unwrap();
        let grads = [q, k, v].map(|x| store.get(&x).expect("input has a gradient").clone());
        (o, grads)
    };
    // f64 takes the composed path, which turns the ranges into the dense bias.
    let (o64, g64) = run(DType::F64, Mask::Ranges(Arc::new(ranges.clone())));
    let (o32, g32) = run(DType::F32, Mask::Ranges(Arc::new(ranges)));
    let d = [
        rel_diff(&o32, &o64),
        rel_diff(&g32[0], &g64[0]),
        rel_diff(&g32[1], &g64[1]),
        rel_diff(&g32[2], &g64[2]),
    ];
    println!("packed attention (f32 fused ranges vs f64 composed bias): out, dq, dk, dv {d:?}");
    assert!(d.iter().all(|&x| x < 1e-6), "{d:?}");
}
