//! The CPU fast path: every fused kernel, `unsafe` block and SIMD loop of the model lives here.
//!
//! Each fused op equals a composed form built from candle primitives; `model::ops` takes the
//! fused op for contiguous f32 tensors on the CPU and the composed form everywhere else (other
//! devices, half precision, f64). Rows are independent and reduced in a fixed order, so results
//! do not depend on the thread count, nor on which threads run them: training, evaluation and
//! generation run their forwards and backwards inside candle's pool (`Device::with_context`),
//! so each kernel's parallel loop starts from a pool worker instead of waking the pool from the
//! main thread. The table lists each op, what it equals, and the test
//! that pins it (all in `tests/ops.rs` unless named otherwise):
//!
//! | fused op | equals (composed form) | pinned by |
//! |---|---|---|
//! | [`ops::FrozenLinear`], dense (gemm on storage, [`matmul::gemm_rows_f32`]) | `x.matmul(w.t())`, dX only | `fused_frozen_linear_f32_matches_f64_matmul`, `frozen_linear_backward_matches_matmul_and_finite_differences` |
//! | [`ops::FrozenLinear`], kept quantized (a [`quant::QuantWeight`] dequantized per column slice of [`matmul::gemm_rows_f32`], [`quant::gemm_rows_quant`]) | the dense op on the dequantized weight, bit for bit | `tests/keep_quantized.rs` |
//! | [`ops::RmsNorm`] | `x * rsqrt(mean(x²) + eps) * w` | `fused_rms_norm_f32_matches_f64_composed` |
//! | [`ops::RopeHeads`] | `to_heads` + `x cos + rotate_half(x) sin` | `fused_rope_heads_f32_matches_f64_composed_for_shared_and_per_row_tables` |
//! | [`ops::SwiGlu`] | `silu(gate) * up` | `fused_swiglu_f32_matches_f64_composed_in_both_inputs` |
//! | [`attention::Attention`] (GQA, causal skip) | `softmax(q kᵀ · scale + bias) v` with repeated kv heads | `fused_attention_f32_matches_f64_composed_in_all_three_inputs` |
//! | [`linear_ce::linear_cross_entropy_sum`] (chunked, no logits tensor) | `-log_softmax(h wᵀ)[target]` summed | `linear_cross_entropy_backward_matches_composed_form_and_finite_differences`, `linear_cross_entropy_f32_over_several_chunks_matches_f64` |
//! | [`simd::exp_f32`] | `f32::exp` | `fast_exp_is_within_two_ulp_of_exp` |
//!
//! The whole fused f32 path against the composed f64 path, in loss and every adapter gradient:
//! `tests/gradients.rs::fused_f32_cpu_path_matches_the_composed_f64_path_in_loss_and_every_adapter_gradient`.
//! That the model's wrappers take these ops at all: `model_ops_take_the_fused_path_for_f32_on_the_cpu`.

pub mod attention;
pub mod kernels;
pub mod linear_ce;
pub mod matmul;
pub mod ops;
pub mod quant;
pub mod simd;
