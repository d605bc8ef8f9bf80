//! Shared test helpers: fixture models and an independent, plain-Rust f64 Llama forward.
#![allow(dead_code)]

pub mod gguf_writer;
pub mod tfevents;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use lorasft::model::Llama;
use lorasft::model::fixture::FixtureSpec;

/// The default fixture model in `dtype` on the CPU.
pub fn tiny(seed: u64, dtype: DType) -> Llama {
    FixtureSpec::default()
        .build(seed, dtype, &Device::Cpu)
        .expect("fixture builds")
}

/// A (b, s) u32 tensor of token ids drawn from a simple formula (no RNG needed).
pub fn ids(b: usize, s: usize, vocab: usize, salt: usize) -> Tensor {
    let v: Vec<u32> = (0..b * s)
        .map(|i| ((i * 7919 + salt * 104_729 + 3) % vocab) as u32)
        .collect();
    Tensor::from_vec(v, (b, s), &Device::Cpu).unwrap()
}

/// Max |x| over a tensor, in f64.
pub fn max_abs(x: &Tensor) -> f64 {
    x.to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Max |a - b| over two tensors of the same shape, in f64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    max_abs(&(a - b).unwrap())
}

/// Max |a - b| / max |b| over two tensors, in f64: the relative error of a whole tensor.
pub fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    max_abs_diff(a, b) / max_abs(b).max(1e-30)
}

/// Raw bytes of a tensor, for bitwise comparisons.
pub fn bits(t: &Tensor) -> Vec<u64> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(|x| u64::from(x.to_bits()))
            .collect(),
        DType::F64 => t
            .to_vec1::<f64>()
            .unwrap()
            .into_iter()
            .map(f64::to_bits)
            .collect(),
        d => panic!("bits: unsupported {d:?}"),
    }
}

/// An independent Llama forward on plain `Vec<f64>`s, written from the transformers source
/// (LlamaForCausalLM, eager attention) and sharing no code with lorasft's candle forward.
pub struct Reference {
    spec: FixtureSpec,
    w: HashMap<String, (Vec<f64>, Vec<usize>)>,
}

impl Reference {
    /// The reference model for a fixture spec and seed (the same weights lorasft builds).
    pub fn new(spec: &FixtureSpec, seed: u64) -> Self {
        let w = spec
            .tensors(seed)
            .unwrap()
            .into_iter()
            .map(|(n, t)| {
                let dims = t.dims().to_vec();
                let v = t
                    .to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap();
                (n, (v, dims))
            })
            .collect();
        Self {
            spec: spec.clone(),
            w,
        }
    }

    fn t(&self, name: &str) -> &[f64] {
        &self.w[name].0
    }

    /// y = W x for W (out, in) stored row-major.
    fn matvec(&self, name: &str, x: &[f64]) -> Vec<f64> {
        let (w, dims) = &self.w[name];
        let (out, inp) = (dims[0], dims[1]);
        assert_eq!(x.len(), inp);
        (0..out)
            .map(|o| (0..inp).map(|i| w[o * inp + i] * x[i]).sum())
            .collect()
    }

    fn rms(&self, x: &[f64], w: &str) -> Vec<f64> {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let r = 1.0 / (ms + 1e-5).sqrt();
        x.iter().zip(self.t(w)).map(|(v, g)| v * r * g).collect()
    }

    fn rope(&self, v: &mut [f64], pos: usize, d: usize) {
        let half = d / 2;
        let orig = v.to_vec();
        for i in 0..half {
            let inv = 1.0 / self.spec.rope_theta.powf((2 * i) as f64 / d as f64);
            let (s, c) = (pos as f64 * inv).sin_cos();
            v[i] = orig[i] * c - orig[i + half] * s;
            v[i + half] = orig[i + half] * c + orig[i] * s;
        }
    }

    /// Logits [b][s][v] for ids and a 0/1 attention mask. A query row with no allowed key
    /// attends uniformly to every key, which is what a finite mask value gives.
    pub fn logits(&self, ids: &[Vec<u32>], mask: &[Vec<u32>]) -> Vec<Vec<Vec<f64>>> {
        let sp = &self.spec;
        let (h, nh, nkv) = (sp.hidden, sp.heads, sp.kv_heads);
        let d = h / nh;
        ids.iter()
            .zip(mask)
            .map(|(row, m)| {
                let s = row.len();
                let emb = self.t("model.embed_tokens.weight");
                let mut xs: Vec<Vec<f64>> = row
                    .iter()
                    .map(|&id| emb[id as usize * h..(id as usize + 1) * h].to_vec())
                    .collect();
                for l in 0..sp.layers {
                    let p = format!("model.layers.{l}");
                    let hn: Vec<Vec<f64>> = xs
                        .iter()
                        .map(|x| self.rms(x, &format!("{p}.input_layernorm.weight")))
                        .collect();
                    let mut q: Vec<Vec<f64>> = hn
                        .iter()
                        .map(|x| self.matvec(&format!("{p}.self_attn.q_proj.weight"), x))
                        .collect();
                    let mut k: Vec<Vec<f64>> = hn
                        .iter()
                        .map(|x| self.matvec(&format!("{p}.self_attn.k_proj.weight"), x))
                        .collect();
                    let v: Vec<Vec<f64>> = hn
                        .iter()
                        .map(|x| self.matvec(&format!("{p}.self_attn.v_proj.weight"), x))
                        .collect();
                    // Real tokens are numbered from 0 after any left padding.
                    let first_real = m.iter().position(|&k| k == 1).unwrap_or(s);
                    for t in 0..s {
                        let pos = t.saturating_sub(first_real);
                        for hd in 0..nh {
                            self.rope(&mut q[t][hd * d..(hd + 1) * d], pos, d);
                        }
                        for hd in 0..nkv {
                            self.rope(&mut k[t][hd * d..(hd + 1) * d], pos, d);
                        }
                    }
                    let mut attn_out = vec![vec![0.0; nh * d]; s];
                    for hd in 0..nh {
                        let kvh = hd / (nh / nkv);
                        for t in 0..s {
                            let allowed: Vec<bool> = (0..s).map(|j| j <= t && m[j] == 1).collect();
                            let any = allowed.iter().any(|&a| a);
                            let scores: Vec<f64> = (0..s)
                                .map(|j| {
                                    (0..d)
                                        .map(|e| q[t][hd * d + e] * k[j][kvh * d + e])
                                        .sum::<f64>()
                                        / (d as f64).sqrt()
                                })
                                .collect();
                            // With no allowed key every score becomes the (finite) mask
                            // value, so the softmax is uniform over all keys.
                            let e: Vec<f64> = if any {
                                let mx = (0..s)
                                    .filter(|&j| allowed[j])
                                    .map(|j| scores[j])
                                    .fold(f64::NEG_INFINITY, f64::max);
                                (0..s)
                                    .map(|j| {
                                        if allowed[j] {
                                            (scores[j] - mx).exp()
                                        } else {
                                            0.0
                                        }
                                    })
                                    .collect()
                            } else {
                                vec![1.0; s]
                            };
                            let z: f64 = e.iter().sum();
                            for j in 0..s {
                                for c in 0..d {
                                    attn_out[t][hd * d + c] += e[j] / z * v[j][kvh * d + c];
                                }
                            }
                        }
                    }
                    for t in 0..s {
                        let o = self.matvec(&format!("{p}.self_attn.o_proj.weight"), &attn_out[t]);
                        for (x, y) in xs[t].iter_mut().zip(o) {
                            *x += y;
                        }
                        let hn = self.rms(&xs[t], &format!("{p}.post_attention_layernorm.weight"));
                        let g = self.matvec(&format!("{p}.mlp.gate_proj.weight"), &hn);
                        let u = self.matvec(&format!("{p}.mlp.up_proj.weight"), &hn);
                        let a: Vec<f64> = g
                            .iter()
                            .zip(&u)
                            .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                            .collect();
                        let dn = self.matvec(&format!("{p}.mlp.down_proj.weight"), &a);
                        for (x, y) in xs[t].iter_mut().zip(dn) {
                            *x += y;
                        }
                    }
                }
                let head = if sp.tied {
                    "model.embed_tokens.weight"
                } else {
                    "lm_head.weight"
                };
                xs.iter()
                    .map(|x| self.matvec(head, &self.rms(x, "model.norm.weight")))
                    .collect()
            })
            .collect()
    }
}

/// The real-asset cache (`scripts/fetch-assets.sh`), or `None` with a clear note when it is
/// absent locally. With `LORASFT_REQUIRE_ASSETS=1` (CI) absence is a failure, not a skip.
pub fn assets() -> Option<std::path::PathBuf> {
    let dir = std::env::var_os("LORASFT_ASSETS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/assets"));
    let ready = [
        "vocab/.done",
        "smollm2/.done",
        "chat/.done",
        "data/alpaca_en_demo.json",
        "data/glaive_toolcall_en_demo.json",
    ]
    .iter()
    .all(|f| dir.join(f).exists());
    if ready {
        return Some(dir);
    }
    if std::env::var("LORASFT_REQUIRE_ASSETS").is_ok_and(|v| v == "1") {
        panic!(
            "real assets missing in {} and LORASFT_REQUIRE_ASSETS=1: run scripts/fetch-assets.sh",
            dir.display()
        );
    }
    eprintln!(
        "SKIPPED: real assets absent in {}; run scripts/fetch-assets.sh (CI requires them)",
        dir.display()
    );
    None
}

/// Converts a GGUF vocabulary from the asset cache into a tokenizer in a temp dir.
pub fn converted_tokenizer(
    assets: &std::path::Path,
    gguf: &str,
) -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("tokenizer.json");
    lorasft::tokenizer::from_gguf::convert(&assets.join(gguf), &out).unwrap();
    (tmp, out)
}

/// The committed fixture tokenizer's path.
pub fn fixture_tokenizer() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tokenizer.json")
}

/// The committed fixture dataset.
pub fn fixture_records() -> Vec<lorasft::data::Record> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/instructions.json");
    lorasft::data::dataset::load(&p)
        .unwrap()
        .records
        .into_iter()
        .map(|s| {
            s.as_instruction()
                .cloned()
                .expect("fixture records are Alpaca")
        })
        .collect()
}

/// Sets every adapter tensor to N(0, 0.05²) values from `seed`, so that every gradient
/// (A's included) is non-trivial.
pub fn randomise_adapters(model: &Llama, seed: u64) {
    let mut r = lorasft::rng::Rng::new(seed);
    for (_, v) in model.lora_vars() {
        let vals: Vec<f64> = (0..v.elem_count()).map(|_| 0.05 * r.normal()).collect();
        let t = Tensor::from_vec(vals, v.shape(), &Device::Cpu)
            .unwrap()
            .to_dtype(v.dtype())
            .unwrap();
        v.set(&t).unwrap();
    }
}

/// The smoke preset with absolute fixture paths, `steps` steps, and its run under `out`.
pub fn smoke(out: &std::path::Path, steps: usize) -> lorasft::train::config::TrainConfig {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut c = lorasft::train::config::TrainConfig::smoke();
    c.run.out_dir = out.to_path_buf();
    c.model.tokenizer = Some(root.join("fixtures/tokenizer.json"));
    c.data.path = root.join("fixtures/instructions.json");
    c.train.max_steps = Some(steps);
    c
}

/// Prepares and trains `cfg`, then writes its REPORT.md, as `lorasft train` does.
pub fn train_run(
    cfg: lorasft::train::config::TrainConfig,
    opts: &lorasft::train::run::RunOptions,
) -> lorasft::records::Summary {
    let p = lorasft::train::prepare::prepare(cfg).unwrap();
    let s = lorasft::train::run::train(p, opts).unwrap();
    lorasft::report::write(&s.run_dir).unwrap();
    s
}

/// The built `lorasft` binary as a command.
pub fn lorasft() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_lorasft"))
}

/// `|a - b| / |b|` for scalars, through `approx`'s relative comparison: true when within `rel`.
pub fn close(a: f64, b: f64, rel: f64) -> bool {
    approx::relative_eq!(a, b, epsilon = 0.0, max_relative = rel)
}

/// Cases per fuzz test: `LORASFT_FUZZ_CASES` when set (a longer local run), else `default`
/// (the bounded count CI runs).
pub fn fuzz_cases(default: u32) -> u32 {
    std::env::var("LORASFT_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `cmd`, which must succeed; its stdout.
pub fn stdout_ok(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `cmd`, which must succeed; its stdout and stderr together.
pub fn output_ok(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// The base an adapter directory's `adapter_config.json` names, checked to be what PEFT can
/// load by reference: an absolute directory holding config.json and model.safetensors.
pub fn loadable_base(adapter_dir: &std::path::Path) -> std::path::PathBuf {
    let path = adapter_dir.join("adapter_config.json");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let base = cfg["base_model_name_or_path"]
        .as_str()
        .unwrap_or_else(|| panic!("{} names no base: {cfg}", path.display()));
    let base = std::path::PathBuf::from(base);
    assert!(base.is_absolute(), "{}: {}", path.display(), base.display());
    for f in ["config.json", "model.safetensors"] {
        assert!(base.join(f).is_file(), "{} lacks {f}", base.display());
    }
    base
}

/// The provenance a GGUF import or conversion records in `tokenizer_config.json` in `dir`:
/// the file name, the absolute path and the SHA-256 of the GGUF.
pub fn import_provenance(dir: &std::path::Path) -> (String, String, String) {
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap())
            .unwrap();
    let s = |k: &str| {
        cfg[k]
            .as_str()
            .unwrap_or_else(|| panic!("no {k}: {cfg}"))
            .to_string()
    };
    (
        s("converted_from"),
        s("converted_from_path"),
        s("converted_from_sha256"),
    )
}

/// SHA-256 of a file, in hex.
pub fn sha256_hex(path: &std::path::Path) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

/// (step, kind, loss bits, gradient norm bits) of one metrics line.
pub type MetricBits = (usize, String, u64, Option<u64>);

/// A finished run's numbers to compare bit for bit: every metrics line, and the adapter bytes.
pub fn run_bits(dir: &std::path::Path) -> (Vec<MetricBits>, Vec<u8>) {
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let lines = metrics
        .lines()
        .map(|l| {
            let m: lorasft::records::Metric = serde_json::from_str(l).unwrap();
            (
                m.step,
                format!("{:?}", m.kind),
                m.loss.to_bits(),
                m.grad_norm.map(f64::to_bits),
            )
        })
        .collect();
    let adapter = std::fs::read(dir.join("adapter/adapter_model.safetensors")).unwrap();
    (lines, adapter)
}
