//! An outside check: `candle-transformers` (a dev-dependency only) runs the same weights and
//! its logits are compared with lorasft's forward. Its `quantized_llama` loads GGUF files with
//! the ecosystem's own mapping of llama.cpp's metadata, names and Q/K layout, so agreement
//! checks lorasft's import (un-permutation, metadata) and its export (permutation, metadata)
//! against an implementation lorasft did not write. Its `models::llama` checks the forward
//! itself on a Hugging Face directory.
//!
//! Tolerances (relative: max |difference| over max |reference|, over every position):
//! - Exact weights (f32 GGUF, safetensors): 1e-4. Both sides compute in f32 with different
//!   summation orders (measured a few 1e-7 on the fixture, a few 1e-6 over SmolLM2's 30
//!   layers), so 1e-4 leaves room for other machines' SIMD paths while a wrong permutation,
//!   norm epsilon or RoPE base moves logits by O(1).
//! - The Q4_1 SmolLM2 file read directly, by lorasft's import or kept quantized: 0.15, and the greedy next token must agree on at
//!   least 3/4 of the positions. candle's quantized matmul does not dequantize the weights:
//!   it quantizes the activations to Q8_1 and takes integer dot products, so its logits
//!   differ from the exact product of the dequantized weights that lorasft computes
//!   (measured about 6e-2). A Q/K permutation error gives a relative difference near 1 and
//!   unrelated argmaxes.

mod common;

use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, IndexOp, Tensor};
use candle_transformers::models::{llama as ct_llama, quantized_llama};
use common::rel_diff;
use lorasft::model::Mode;
use lorasft::model::fixture::FixtureSpec;
use lorasft::model::load::{ModelSource, load_model};

/// Logits of quantized_llama on `gguf`, position by position through its KV cache:
/// (positions, vocab).
fn quantized_llama_logits(gguf: &Path, ids: &[u32]) -> Tensor {
    let mut f = std::fs::File::open(gguf).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut m = quantized_llama::ModelWeights::from_gguf(content, &mut f, &Device::Cpu).unwrap();
    let rows: Vec<Tensor> = ids
        .iter()
        .enumerate()
        .map(|(pos, &id)| {
            let x = Tensor::new(&[[id]], &Device::Cpu).unwrap();
            m.forward(&x, pos).unwrap().squeeze(0).unwrap()
        })
        .collect();
    Tensor::stack(&rows, 0).unwrap()
}

/// lorasft's logits for `ids` on the model in `dir`: (positions, vocab).
fn lorasft_logits(dir: &Path, ids: &[u32]) -> Tensor {
    let model = load_model(
        &ModelSource::Dir(dir.to_path_buf()),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
    .1;
    let x = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model
        .forward(&x, None, &mut Mode::Eval)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

/// How many positions' greedy next tokens agree.
fn argmax_agreement(a: &Tensor, b: &Tensor) -> (usize, usize) {
    let am = |t: &Tensor| t.argmax(1).unwrap().to_vec1::<u32>().unwrap();
    let (x, y) = (am(a), am(b));
    (x.iter().zip(&y).filter(|(p, q)| p == q).count(), x.len())
}

fn export(model: &str, ty: &str, out: &Path) {
    let o = common::lorasft()
        .args(["export-gguf", "--model", model, "--type", ty, "--out"])
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn quantized_llama_agrees_with_lorasft_on_the_real_smollm2_gguf() {
    let Some(assets) = common::assets() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let gguf = assets.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let dir = tmp.path().join("smollm2.hf");
    lorasft::model::gguf_import::import(&gguf, &dir).unwrap();
    let tok = lorasft::tokenizer::load(&dir.join("tokenizer.json")).unwrap();
    let prompt =
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let ids = tok.encode(prompt, false).unwrap().get_ids().to_vec();
    assert!(ids.len() >= 16, "{ids:?}");
    let ours = lorasft_logits(&dir, &ids);
    // The Q4_1 file as llama.cpp wrote it, through candle's quantized kernels.
    let theirs = quantized_llama_logits(&gguf, &ids);
    let rel = rel_diff(&theirs, &ours);
    let (agree, n) = argmax_agreement(&theirs, &ours);
    println!("quantized_llama on Q4_1 vs lorasft: {rel:.2e} relative, argmax {agree}/{n}");
    assert!(rel < 0.15, "Q4_1: {rel:e}");
    assert!(4 * agree >= 3 * n, "Q4_1: argmax agrees on {agree}/{n}");
    // The same file kept quantized (`model.keep_quantized`): the same bound against
    // quantized_llama, and lorasft's import to f32 reproduced bit for bit.
    let (_, kept) =
        lorasft::model::gguf_import::load_quantized(&lorasft::gguf::Gguf::read(&gguf).unwrap())
            .unwrap();
    let x = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let kept = kept
        .forward(&x, None, &mut Mode::Eval)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let rel = rel_diff(&theirs, &kept);
    let (agree, n) = argmax_agreement(&theirs, &kept);
    println!(
        "quantized_llama on Q4_1 vs lorasft kept quantized: {rel:.2e} relative, argmax {agree}/{n}"
    );
    assert!(rel < 0.15, "Q4_1 kept quantized: {rel:e}");
    assert!(
        4 * agree >= 3 * n,
        "Q4_1 kept quantized: argmax agrees on {agree}/{n}"
    );
    assert_eq!(
        common::bits(&kept),
        common::bits(&ours),
        "kept quantized vs import"
    );
    // The same weights re-exported by lorasft as f32: candle then multiplies exactly, so the
    // two forwards must agree to f32 rounding.
    let f32_gguf = tmp.path().join("smollm2-f32.gguf");
    export(dir.to_str().unwrap(), "f32", &f32_gguf);
    let exact = quantized_llama_logits(&f32_gguf, &ids);
    let rel = rel_diff(&exact, &ours);
    let (agree, n) = argmax_agreement(&exact, &ours);
    println!(
        "quantized_llama on lorasft's f32 export vs lorasft: {rel:.2e} relative, argmax {agree}/{n}"
    );
    assert!(rel < 1e-4, "f32 export: {rel:e}");
    assert_eq!(agree, n);
}

#[test]
fn candle_transformers_llama_agrees_with_lorasft_on_the_fixture() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("fixture");
    let spec = FixtureSpec::default();
    spec.write(7, &dir).unwrap();
    let ids: Vec<u32> = (0..24u32)
        .map(|i| (i * 37 + 11) % spec.vocab as u32)
        .collect();
    let ours = lorasft_logits(&dir, &ids);
    // models::llama from config.json and model.safetensors; without a KV cache it returns the
    // last position's logits, so each prefix is run on its own.
    let cfg: ct_llama::LlamaConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let cfg = cfg.into_config(false);
    // SAFETY: the file was written above and is not modified while mapped.
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let m = ct_llama::Llama::load(vb, &cfg).unwrap();
    let rows: Vec<Tensor> = (1..=ids.len())
        .map(|n| {
            let mut cache = ct_llama::Cache::new(false, DType::F32, &cfg, &Device::Cpu).unwrap();
            let x = Tensor::new(&ids[..n], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            m.forward(&x, 0, &mut cache).unwrap().squeeze(0).unwrap()
        })
        .collect();
    let theirs = Tensor::stack(&rows, 0).unwrap();
    let rel = rel_diff(&theirs, &ours);
    println!("models::llama vs lorasft on the fixture: {rel:.2e} relative");
    assert!(rel < 1e-4, "models::llama: {rel:e}");
    assert_eq!(argmax_agreement(&theirs, &ours), (ids.len(), ids.len()));
    // And quantized_llama on lorasft's f32 GGUF export of the fixture.
    let gguf = tmp.path().join("fixture.gguf");
    std::fs::copy(common::fixture_tokenizer(), dir.join("tokenizer.json")).unwrap();
    export(dir.to_str().unwrap(), "f32", &gguf);
    let q = quantized_llama_logits(&gguf, &ids);
    let rel = rel_diff(&q, &ours);
    println!("quantized_llama on the fixture's f32 export vs lorasft: {rel:.2e} relative");
    assert!(rel < 1e-4, "quantized_llama fixture: {rel:e}");
    let last = ours.i(ids.len() - 1).unwrap();
    assert!(common::max_abs(&last) > 0.0);
}
