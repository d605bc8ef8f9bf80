//! Each op with a hand-written backward against its composed primitive form (autograd) and
//! against central finite differences, in f64 on tiny shapes.

mod common;

use candle_core::{D, DType, Device, Tensor, Var};
use common::max_abs_diff;
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
