//! GGUF import: dequantisation, llama.cpp names, the Q/K un-permutation, a synthetic round
//! trip, the real SmolLM2-135M-Instruct weights, and the KV cache used for generation.

mod common;

use std::path::Path;

use candle_core::{DType, Device};
use common::{bits, ids, max_abs_diff};
use lorasft::model::Mode;
use lorasft::model::fixture::FixtureSpec;
use lorasft::model::gguf_import::{self, dequantize, permute_qk, unpermute_qk};
use lorasft::model::llama::KvCache;

/// A minimal GGUF v3 writer for tests: metadata of u32/f32/string/bool and F32 tensors.
enum Meta {
    U32(u32),
    F32(f32),
    Str(String),
    Bool(bool),
}

fn write_gguf(path: &Path, meta: &[(&str, Meta)], tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let mut b: Vec<u8> = Vec::new();
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend((x.len() as u64).to_le_bytes());
        b.extend(x.as_bytes());
    };
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        s(&mut b, k);
        match v {
            Meta::U32(x) => {
                b.extend(4u32.to_le_bytes());
                b.extend(x.to_le_bytes());
            }
            Meta::F32(x) => {
                b.extend(6u32.to_le_bytes());
                b.extend(x.to_le_bytes());
            }
            Meta::Bool(x) => {
                b.extend(7u32.to_le_bytes());
                b.push(u8::from(*x));
            }
            Meta::Str(x) => {
                b.extend(8u32.to_le_bytes());
                s(&mut b, x);
            }
        }
    }
    let mut offset = 0u64;
    for (name, shape, _) in tensors {
        s(&mut b, name);
        b.extend((shape.len() as u32).to_le_bytes());
        for d in shape.iter().rev() {
            b.extend((*d as u64).to_le_bytes());
        }
        b.extend(0u32.to_le_bytes()); // F32
        b.extend(offset.to_le_bytes());
        offset += (shape.iter().product::<usize>() * 4).div_ceil(32) as u64 * 32;
    }
    while !b.len().is_multiple_of(32) {
        b.push(0);
    }
    for (_, _, vals) in tensors {
        let start = b.len();
        for v in vals {
            b.extend(v.to_le_bytes());
        }
        while !(b.len() - start).is_multiple_of(32) {
            b.push(0);
        }
    }
    std::fs::write(path, b).unwrap();
}

fn gguf_name(hf: &str) -> String {
    let map = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = map.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, part) = rest.split_once('.').unwrap();
    let g = match part {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        other => panic!("{other}"),
    };
    format!("blk.{layer}.{g}")
}

#[test]
fn synthetic_gguf_imports_back_to_the_original_model_bit_for_bit() {
    let spec = FixtureSpec::default();
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = spec
        .tensors(4)
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            let shape = t.dims().to_vec();
            let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            // llama.cpp's converter permutes Q and K for its interleaved RoPE.
            if n.ends_with("q_proj.weight") {
                v = permute_qk(&v, shape[0], shape[1], spec.heads);
            } else if n.ends_with("k_proj.weight") {
                v = permute_qk(&v, shape[0], shape[1], spec.kv_heads);
            }
            (gguf_name(&n), shape, v)
        })
        .collect();
    let meta = [
        ("general.architecture", Meta::Str("llama".into())),
        ("llama.embedding_length", Meta::U32(64)),
        ("llama.feed_forward_length", Meta::U32(160)),
        ("llama.block_count", Meta::U32(2)),
        ("llama.attention.head_count", Meta::U32(4)),
        ("llama.attention.head_count_kv", Meta::U32(2)),
        ("llama.attention.layer_norm_rms_epsilon", Meta::F32(1e-5)),
        ("llama.rope.freq_base", Meta::F32(10000.0)),
        ("llama.context_length", Meta::U32(256)),
        ("llama.vocab_size", Meta::U32(512)),
        ("tokenizer.ggml.eos_token_id", Meta::U32(2)),
        ("tokenizer.ggml.add_bos_token", Meta::Bool(true)),
    ];
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("tiny.gguf");
    write_gguf(&file, &meta, &tensors);
    let out = tmp.path().join("hf");
    let cfg = gguf_import::import(&file, &out).unwrap();
    assert_eq!(
        (
            cfg.hidden_size,
            cfg.num_key_value_heads,
            cfg.tie_word_embeddings
        ),
        (64, Some(2), false)
    );
    let src = lorasft::model::load::ModelSource::Dir(out);
    let imported = lorasft::model::load::load_model(&src, DType::F32, &Device::Cpu)
        .unwrap()
        .1;
    let original = spec.build(4, DType::F32, &Device::Cpu).unwrap();
    for ((n, a), (_, b)) in imported.base_tensors().iter().zip(original.base_tensors()) {
        assert_eq!(bits(a), bits(&b), "{n} differs after import");
    }
}

#[test]
fn unpermute_inverts_llama_cpp_permutation() {
    let w: Vec<f32> = (0..8 * 3).map(|i| i as f32).collect();
    assert_eq!(unpermute_qk(&permute_qk(&w, 8, 3, 2), 8, 3, 2), w);
    // Per head, llama.cpp interleaves the two rotary halves: rows (0,2,1,3) of a head of 4.
    assert_eq!(
        &permute_qk(&w, 8, 3, 2)[..12],
        &[0., 1., 2., 6., 7., 8., 3., 4., 5., 9., 10., 11.]
    );
}

#[test]
fn q8_0_and_q4_1_blocks_dequantize_by_their_formulas() {
    // Q8_0: f16 scale d, then 32 signed bytes; value = d * q.
    let mut q8 = half::f16::from_f32(0.5).to_le_bytes().to_vec();
    q8.extend((0..32).map(|i| (i as i8 - 16) as u8));
    let v = dequantize(8, &q8, 32).unwrap();
    assert_eq!(v[0], -8.0);
    assert_eq!(v[31], 7.5);
    // Q4_1: f16 d, f16 min, 16 bytes of nibbles (low nibbles first, then high); value = d*q + m.
    let mut q4 = half::f16::from_f32(0.25).to_le_bytes().to_vec();
    q4.extend(half::f16::from_f32(-1.0).to_le_bytes());
    q4.extend((0..16).map(|i| (i as u8) | (15 - i as u8) << 4));
    let v = dequantize(3, &q4, 32).unwrap();
    assert_eq!(v[0], -1.0);
    assert_eq!(v[15], -1.0 + 0.25 * 15.0);
    assert_eq!(v[16], -1.0 + 0.25 * 15.0);
    assert_eq!(v[31], -1.0);
    assert!(
        dequantize(99, &q4, 32)
            .unwrap_err()
            .to_string()
            .contains("99")
    );
}

#[test]
fn kv_cache_logits_equal_the_full_forward() {
    let model = common::tiny(12, DType::F64);
    let x = ids(1, 9, 512, 12);
    let full = model.forward(&x, None, &mut Mode::Eval).unwrap();
    let mut cache = KvCache::new();
    let first = model
        .forward_cached(&x.narrow(1, 0, 6).unwrap(), &mut cache)
        .unwrap();
    let d = max_abs_diff(&first, &full.narrow(1, 5, 1).unwrap().squeeze(1).unwrap());
    assert!(d < 1e-10, "prefill differs by {d:e}");
    for t in 6..9 {
        let step = model
            .forward_cached(&x.narrow(1, t, 1).unwrap(), &mut cache)
            .unwrap();
        let d = max_abs_diff(&step, &full.narrow(1, t, 1).unwrap().squeeze(1).unwrap());
        assert!(d < 1e-10, "position {t} differs by {d:e}");
    }
    assert_eq!(cache.len(), 9);
}

#[test]
fn real_smollm2_weights_import_and_answer_sensibly() {
    let Some(assets) = common::assets() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("smollm2");
    let cfg = gguf_import::import(
        &assets.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        &out,
    )
    .unwrap();
    assert_eq!(
        (
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.vocab_size,
            cfg.tie_word_embeddings
        ),
        (30, 576, 49152, true)
    );
    let src = lorasft::model::load::ModelSource::Dir(out.clone());
    let model = lorasft::model::load::load_model(&src, DType::F32, &Device::Cpu)
        .unwrap()
        .1;
    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let prompt =
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let g = lorasft::generate::generate(
        &model,
        &tok,
        prompt,
        &[2],
        &lorasft::generate::GenerateConfig {
            max_new_tokens: 12,
            ..Default::default()
        },
    )
    .unwrap();
    println!("SmolLM2 answers: {:?}", g.text);
    assert!(
        g.text.contains("Paris"),
        "un-permuted weights should answer Paris, got {:?}",
        g.text
    );
}
