//! REPORT.md written by the run itself, in the shape of the reference "Day 2" report: every
//! value comes from the run directory (config.toml, manifest.json, data.json, checks.json,
//! metrics.jsonl, summary.json, generations.json), so every sentence is a measured fact.

pub mod plot;

use std::fmt::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::adapter::model_card_front_matter;
use crate::data::dataset::{Split, SplitSpec};
use crate::data::stats::DataStats;
use crate::error::{Error, Result};
use crate::generate::Generation;
use crate::train::config::TrainConfig;
use crate::train::trainer::{Metric, Prepared, Summary, metrics_from};
use crate::verify::Fingerprint;

/// The checks a run performed on itself, with their measured results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunChecks {
    /// PEFT's trainable-parameter line for the adapted model.
    pub trainable_params: String,
    /// Number of base tensors fingerprinted.
    pub base_tensors: usize,
    /// Digest of all base-tensor SHA-256s before training.
    pub base_fingerprint_before: String,
    /// The same after training.
    pub base_fingerprint_after: String,
    /// Base tensors whose bytes changed (must be empty).
    pub changed_base_tensors: Vec<String>,
    /// Adapter tensors (A and B) in the model.
    pub adapter_tensors: usize,
    /// lora_B tensors with a non-zero gradient on the run's first backward.
    pub lora_b_with_grad_first_step: Option<usize>,
    /// lora_A tensors with a non-zero gradient on the backward after the first update.
    pub lora_a_with_grad_after_first_update: Option<usize>,
    /// Loss of the run's first step.
    pub first_loss: Option<f64>,
    /// Loss of its last step.
    pub last_loss: Option<f64>,
    /// Whether every logged loss was finite.
    pub all_losses_finite: bool,
    /// (step, validation loss) of every evaluation.
    pub eval_losses: Vec<(usize, f64)>,
}

/// Everything needed to repeat a run and to know what produced it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// lorasft's version.
    pub lorasft_version: String,
    /// Git commit the binary was built from.
    pub git_commit: String,
    /// candle-core's version.
    pub candle_version: String,
    /// tokenizers' version.
    pub tokenizers_version: String,
    /// safetensors' version.
    pub safetensors_version: String,
    /// The command line that started the run.
    pub command: Vec<String>,
    /// The run's seed.
    pub seed: u64,
    /// SHA-256 of the resolved config (config.toml).
    pub config_sha256: String,
    /// The dataset file.
    pub data_path: PathBuf,
    /// Its SHA-256.
    pub data_sha256: String,
    /// The tokenizer file.
    pub tokenizer_path: PathBuf,
    /// Its SHA-256.
    pub tokenizer_sha256: String,
    /// The base model as named by the config.
    pub base_model: String,
    /// Its shape, as `lorasft inspect` prints it.
    pub model_shape: String,
    /// Digest of the SHA-256 of every base tensor.
    pub base_weights_digest: String,
    /// "cpu" (CUDA runs say which GPU).
    pub device: String,
    /// CPU model name.
    pub cpu: String,
    /// Worker threads candle uses.
    pub threads: usize,
    /// Operating system.
    pub os: String,
    /// Host name.
    pub host: String,
    /// Start time, seconds since the Unix epoch.
    pub started_at: u64,
}

fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

fn first_line_of(path: &str, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_once([':', '=']))
        .map(|(_, v)| v.trim().trim_matches('"').to_string())
}

impl Manifest {
    /// The manifest of a prepared run whose base fingerprint is `base`.
    pub fn for_run(p: &Prepared, base: &Fingerprint) -> Result<Self> {
        Ok(Self {
            lorasft_version: env!("CARGO_PKG_VERSION").into(),
            git_commit: env!("LORASFT_GIT_COMMIT").into(),
            candle_version: env!("LORASFT_DEP_CANDLE_CORE").into(),
            tokenizers_version: env!("LORASFT_DEP_TOKENIZERS").into(),
            safetensors_version: env!("LORASFT_DEP_SAFETENSORS").into(),
            command: std::env::args().collect(),
            seed: p.cfg.run.seed,
            config_sha256: format!("{:x}", Sha256::digest(p.cfg.to_toml()?.as_bytes())),
            data_path: p.cfg.data.path.clone(),
            data_sha256: sha256_file(&p.cfg.data.path)?,
            tokenizer_path: p.tokenizer_path.clone(),
            tokenizer_sha256: sha256_file(&p.tokenizer_path)?,
            base_model: p.base.label.clone(),
            model_shape: {
                let sh = p.base.model.shape();
                format!(
                    "{} layers, hidden {}, intermediate {}, {} attention heads ({} key/value heads, head dim {}), vocabulary {}, max positions {}, RoPE theta {}, {} lm_head",
                    sh.layers,
                    sh.hidden,
                    sh.intermediate,
                    sh.heads,
                    sh.kv_heads,
                    sh.head_dim,
                    sh.vocab,
                    sh.max_positions,
                    sh.rope_theta,
                    if sh.tied { "tied" } else { "untied" }
                )
            },
            base_weights_digest: base.digest(),
            device: "cpu".into(),
            cpu: first_line_of("/proc/cpuinfo", "model name")
                .unwrap_or_else(|| std::env::consts::ARCH.into()),
            threads: candle_core::utils::get_num_threads(),
            os: first_line_of("/etc/os-release", "PRETTY_NAME")
                .unwrap_or_else(|| std::env::consts::OS.into()),
            host: std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_default(),
            started_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        })
    }
}

/// The dataset side of a run: sizes, split and encoding statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataRecord {
    /// The dataset file.
    pub path: PathBuf,
    /// Records in the file (after max_records).
    pub records: usize,
    /// The split rule.
    pub validation: SplitSpec,
    /// The split itself.
    pub split: Split,
    /// Statistics of the training subset under the encoding.
    pub train_stats: DataStats,
    /// Records with a non-blank input, over the whole file.
    pub with_input: usize,
    /// Vocabulary size of the tokenizer.
    pub vocab: usize,
    /// EOS token.
    pub eos: String,
    /// Pad token.
    pub pad: String,
    /// The first training record as the model sees it (prompt + response).
    pub example: String,
}

impl DataRecord {
    /// The record of a prepared run.
    pub fn of(p: &Prepared) -> Self {
        let tok = p.encoder.tokenizer();
        let ids = p.encoder.special_ids();
        let first = p
            .split
            .train
            .first()
            .map(|&i| crate::data::prompt::format(&p.dataset.records[i]).text)
            .unwrap_or_default();
        Self {
            path: p.cfg.data.path.clone(),
            records: p.dataset.records.len(),
            validation: p.cfg.data.validation,
            split: p.split.clone(),
            train_stats: p.train_stats.clone(),
            with_input: p.dataset.records.iter().filter(|r| r.has_input()).count(),
            vocab: tok.get_vocab_size(true),
            eos: tok.id_to_token(ids.eos).unwrap_or_default(),
            pad: tok.id_to_token(ids.pad).unwrap_or_default(),
            example: first,
        }
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(dir: &Path, name: &str) -> Result<T> {
    let path = dir.join(name);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Json {
        path,
        msg: e.to_string(),
    })
}

/// Everything the report reads from a run directory.
pub struct RunFiles {
    /// config.toml.
    pub cfg: TrainConfig,
    /// manifest.json.
    pub manifest: Manifest,
    /// data.json.
    pub data: DataRecord,
    /// checks.json.
    pub checks: RunChecks,
    /// summary.json.
    pub summary: Summary,
    /// metrics.jsonl.
    pub metrics: Vec<Metric>,
}

impl RunFiles {
    /// Reads a finished run directory.
    pub fn read(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("config.toml");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let cfg: TrainConfig = toml::from_str(&text).map_err(|e| Error::Json {
            path: cfg_path,
            msg: e.to_string(),
        })?;
        Ok(Self {
            cfg,
            manifest: read_json(dir, "manifest.json")?,
            data: read_json(dir, "data.json")?,
            checks: read_json(dir, "checks.json")?,
            summary: read_json(dir, "summary.json")?,
            metrics: metrics_from(&dir.join("metrics.jsonl"))?,
        })
    }
}

/// Writes REPORT.md, loss.svg and lr.svg into a finished run directory.
pub fn write(dir: &Path) -> Result<PathBuf> {
    write_to(dir, &dir.join("REPORT.md"), false)
}

/// Writes the report of `dir` to `out`, with its SVGs beside it (`<stem>-loss.svg`,
/// `<stem>-lr.svg`); `redact` hides volatile values (times, hosts, paths, throughput).
pub fn write_to(dir: &Path, out: &Path, redact: bool) -> Result<PathBuf> {
    let run = RunFiles::read(dir)?;
    let stem = out
        .file_stem()
        .map_or("REPORT".into(), |s| s.to_string_lossy().into_owned());
    let (loss_svg, lr_svg) = (format!("{stem}-loss.svg"), format!("{stem}-lr.svg"));
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let train_pts: Vec<(f64, f64)> = run
        .metrics
        .iter()
        .filter(|m| m.kind == "train")
        .map(|m| (m.step as f64, m.loss))
        .collect();
    let eval_pts: Vec<(f64, f64)> = run
        .metrics
        .iter()
        .filter(|m| m.kind == "eval")
        .map(|m| (m.step as f64, m.loss))
        .collect();
    let lr_pts: Vec<(f64, f64)> = run
        .metrics
        .iter()
        .filter_map(|m| m.lr.map(|lr| (m.step as f64, lr)))
        .collect();
    plot::line_chart(
        &parent.join(&loss_svg),
        "Loss",
        "optimizer step",
        "mean loss per target token",
        &[
            plot::Series {
                name: "train".into(),
                points: train_pts,
                color: plotters::style::RGBColor(31, 119, 180),
            },
            plot::Series {
                name: "validation".into(),
                points: eval_pts,
                color: plotters::style::RGBColor(214, 39, 40),
            },
        ],
    )?;
    plot::line_chart(
        &parent.join(&lr_svg),
        "Learning rate",
        "optimizer step",
        "lr",
        &[plot::Series {
            name: format!("{:?}", run.cfg.optim.schedule).to_lowercase(),
            points: lr_pts,
            color: plotters::style::RGBColor(44, 160, 44),
        }],
    )?;
    let generations: Vec<(Generation, Generation)> = read_json(dir, "generations.json")?;
    let text = render(&run, &generations, &loss_svg, &lr_svg, redact);
    std::fs::write(out, text).map_err(|e| Error::io(out, e))?;
    Ok(out.to_path_buf())
}

fn opt(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |x| format!("{x:.4}"))
}

fn pass(ok: bool) -> &'static str {
    if ok { "pass" } else { "FAIL" }
}

/// The markdown of the report (pure: everything comes from `run` and `generations`).
pub fn render(
    run: &RunFiles,
    generations: &[(Generation, Generation)],
    loss_svg: &str,
    lr_svg: &str,
    redact: bool,
) -> String {
    let (c, m, d, k, s) = (
        &run.cfg,
        &run.manifest,
        &run.data,
        &run.checks,
        &run.summary,
    );
    let st = &d.train_stats;
    let v = |x: String| if redact { "[redacted]".to_string() } else { x };
    let base = &m.base_model;
    let mut r = String::new();
    let targets = crate::adapter::target_names(&c.lora);
    let shape_line = run_shape(run);
    let fp_equal =
        k.base_fingerprint_before == k.base_fingerprint_after && k.changed_base_tensors.is_empty();
    let n_b = k.adapter_tensors / 2;
    let b_ok = k.lora_b_with_grad_first_step == Some(n_b);
    let a_ok = k
        .lora_a_with_grad_after_first_update
        .is_none_or(|n| n == n_b);
    // Per-step losses are noisy with small batches: compare the means of the first and last
    // quarter of the logged steps, and the validation loss before and after training.
    let train: Vec<f64> = run
        .metrics
        .iter()
        .filter(|m| m.kind == "train")
        .map(|m| m.loss)
        .collect();
    let q = (train.len() / 4).max(1);
    let mean = |xs: &[f64]| {
        if xs.is_empty() {
            f64::NAN
        } else {
            xs.iter().sum::<f64>() / xs.len() as f64
        }
    };
    let (head, tail) = (
        mean(&train[..q.min(train.len())]),
        mean(&train[train.len().saturating_sub(q)..]),
    );
    let fell = tail < head;
    let val_fell = match (k.eval_losses.first(), k.eval_losses.last()) {
        (Some(a), Some(b)) if k.eval_losses.len() > 1 => Some((a.1, b.1, b.1 < a.1)),
        _ => None,
    };
    let all_ok = fp_equal
        && b_ok
        && a_ok
        && k.all_losses_finite
        && fell
        && val_fell.is_none_or(|v| v.2)
        && !s.interrupted;

    r.push_str(&model_card_front_matter(base));
    let _ = writeln!(
        r,
        "\n# TRAINING-REPORT.md\n## {} – LoRA Adapter Training Report (generated by lorasft)\n",
        c.run.name
    );
    let _ = writeln!(
        r,
        "Every value below was measured by the run itself and can be traced to `metrics.jsonl`, `manifest.json`, `checks.json`, `data.json` and `summary.json` in the run directory.\n\n---\n"
    );

    let _ = writeln!(r, "## Objective\n");
    let _ = writeln!(
        r,
        "Fine-tune `{base}` with LoRA (parameter-efficient fine-tuning) for instruction following on `{}` ({} records), training only the adapter weights while the base model stays frozen, and verify that this is exactly what happened.\n\n---\n",
        v(d.path.display().to_string()),
        d.records
    );

    let _ = writeln!(r, "## Base Model Details\n");
    let _ = writeln!(
        r,
        "- Base Model: {base}\n- Model Type: Causal Language Model (LlamaForCausalLM)\n- Architecture: Decoder-only Transformer: {}\n- Parameters: {shape_line}\n- Weights fingerprint (SHA-256 over all {} base tensors): `{}`\n- Finetuning Method: LoRA via lorasft (PEFT-compatible adapters)\n\n---\n",
        m.model_shape, k.base_tensors, m.base_weights_digest
    );

    let _ = writeln!(r, "## Fine-Tuning Strategy\n");
    let _ = writeln!(
        r,
        "Instead of full fine-tuning, LoRA adapters were trained; the base weights are plain tensors (never optimizer variables) and the frozen linears compute input gradients only.\n\n- Base model parameters frozen: verified by fingerprint (see Verification)\n- Trainable parameters: `{}`\n- Objective: causal language-modeling loss with labels `{:?}`, averaged over the target tokens of each optimizer step\n\n---\n",
        k.trainable_params, c.encode.labels
    );

    let _ = writeln!(r, "## LoRA Configuration\n");
    let scaling = c.lora.scaling();
    let _ = writeln!(
        r,
        "- Target Modules: {targets}\n- Rank (r): {}\n- LoRA Alpha: {}\n- LoRA Dropout: {}\n- Bias: none\n- Task Type: CAUSAL_LM\n- Scaling: {scaling} ({})\n- Initialisation: A ~ U(±1/√in) (Kaiming-uniform, a = √5), B = 0, seed {}\n\n---\n",
        c.lora.r,
        c.lora.alpha,
        c.lora.dropout,
        if c.lora.use_rslora {
            "rsLoRA: alpha/√r"
        } else {
            "alpha/r"
        },
        c.run.seed
    );

    let _ = writeln!(r, "## Dataset Structure\n");
    let val_rule = match d.validation {
        SplitSpec::Fraction(f) => format!("{:.1}% (rounded up)", f * 100.0),
        SplitSpec::Count(n) => format!("{n} records"),
    };
    let _ = writeln!(
        r,
        "Each training sample consisted of:\n- instruction\n- input (optional)\n- output\n\n- Records: {} ({} with input, {} without)\n- Split: {} train / {} validation (validation {val_rule}, seeded shuffle with seed {})\n- Characters per training record (formatted): p50 {}, p90 {}, max {}\n- Training records with empty output: {}\n\n---\n",
        d.records,
        d.with_input,
        d.records - d.with_input,
        d.split.train.len(),
        d.split.validation.len(),
        c.run.seed,
        st.chars.p50,
        st.chars.p90,
        st.chars.max,
        st.empty_output
    );

    let _ = writeln!(r, "## Prompt Formatting\n");
    let _ = writeln!(
        r,
        "All samples were converted into the unified instruction-following prompt format:\n\n```\n### Instruction:\n{{instruction}}\n\n### Input:\n{{input}}\n\n### Response:\n{{output}}\n```\n\nIf the input field was missing, null or whitespace-only, the Input block was omitted. The first training record as the model saw it:\n\n```\n{}\n```\n\n---\n",
        truncate_chars(&d.example, 600)
    );

    let _ = writeln!(r, "## Tokenization & Preprocessing\n");
    let padding = match c.encode.padding {
        crate::data::encode::Padding::MaxLength => "max_length".to_string(),
        crate::data::encode::Padding::Longest { multiple_of } => format!(
            "longest in batch{}",
            multiple_of.map_or(String::new(), |m| format!(
                ", rounded up to a multiple of {m}"
            ))
        ),
    };
    let _ = writeln!(
        r,
        "- Tokenizer: `{}` ({} tokens; EOS `{}`, pad `{}`)\n- Max sequence length: {}\n- Truncation: enabled (the head of each example is kept)\n- Padding: {padding}, {:?} side\n- Labels: {:?}{}\n- EOS after the response: {:?}\n- Tokens per training record before truncation: p50 {}, p90 {}, p99 {}, max {}\n- Records truncated: {} of {}; records whose response was cut entirely: {}\n- Records with no trainable label: {}\n- Loss targets on padding: {} of {} ({:.2}%)\n- Compute on padding: {} of {} tokens ({:.1}%)\n\n---\n",
        v(m.tokenizer_path.display().to_string()),
        d.vocab,
        d.eos,
        d.pad,
        c.encode.max_len,
        c.encode.padding_side,
        c.encode.labels,
        match c.encode.labels {
            crate::data::encode::LabelPolicy::InputIds =>
                " (labels = input_ids, the reference's rule: padding is trained on)",
            crate::data::encode::LabelPolicy::MaskPadding => " (padding masked with -100)",
            crate::data::encode::LabelPolicy::CompletionOnly =>
                " (prompt and padding masked: only the response is learned)",
        },
        c.encode.eos,
        st.tokens.p50,
        st.tokens.p90,
        st.tokens.p99,
        st.tokens.max,
        st.truncated,
        st.records,
        st.response_truncated_away,
        st.no_trainable_label,
        st.padding_label_tokens,
        st.label_tokens,
        100.0 * st.padding_label_share(),
        st.padded_tokens - st.real_tokens,
        st.padded_tokens,
        if st.padded_tokens == 0 {
            0.0
        } else {
            100.0 * (st.padded_tokens - st.real_tokens) as f64 / st.padded_tokens as f64
        }
    );

    let _ = writeln!(r, "## Training Framework Decision\n");
    let _ = writeln!(
        r,
        "lorasft {} (Rust, candle {}) was used: its forward is written for training (every op on the gradient path has a backward, frozen linears compute dX only), its data pipeline is property-tested, and each run verifies itself and writes this report. Precision: FP32 (no mixed precision in this run).\n\n---\n",
        m.lorasft_version, m.candle_version
    );

    let _ = writeln!(r, "## Training Configuration\n");
    let eff = c.train.batch_size * c.train.grad_accum;
    let _ = writeln!(
        r,
        "- Trainer: lorasft\n- Precision: FP32\n- Mixed Precision: Disabled\n- Optimizer: AdamW (betas {}/{}, eps {:e}, weight decay {})\n- Learning rate: {} with {:?} schedule, warmup {:?}\n- Batch: {} per micro-batch × {} accumulation = {eff} examples per optimizer step\n- Gradient Accumulation: {}\n- Gradient Clipping: global norm {} ({} of {} steps clipped)\n- Evaluation Strategy: step-based, every {} steps and at the end\n- Steps: {} ({} skipped for lack of trainable tokens)\n- Shuffle: {} (seed {})\n\nOnly LoRA parameters were updated during training.\n\n---\n",
        c.optim.adamw.beta1,
        c.optim.adamw.beta2,
        c.optim.adamw.eps,
        c.optim.adamw.weight_decay,
        c.optim.lr,
        c.optim.schedule,
        c.optim.warmup,
        c.train.batch_size,
        c.train.grad_accum,
        if c.train.grad_accum > 1 {
            "Enabled"
        } else {
            "Disabled"
        },
        c.optim.max_grad_norm,
        s.clipped_steps,
        s.steps,
        c.train.eval_every,
        s.steps,
        s.skipped_steps,
        c.data.shuffle,
        c.run.seed
    );

    let _ = writeln!(r, "## Hardware & Environment\n");
    let _ = writeln!(
        r,
        "- Device: {} ({}, {} threads)\n- Operating system: {}\n- Host: {}\n- Frameworks:\n  - lorasft {} (commit {})\n  - candle-core {}\n  - tokenizers {}\n  - safetensors {}\n- Wall time of the training loop: {} s\n- Throughput: {} tokens/s\n- Peak memory (RSS): {} MiB\n\n---\n",
        m.device,
        v(m.cpu.clone()),
        v(m.threads.to_string()),
        v(m.os.clone()),
        v(m.host.clone()),
        m.lorasft_version,
        v(m.git_commit.clone()),
        m.candle_version,
        m.tokenizers_version,
        m.safetensors_version,
        v(format!("{:.1}", s.wall_s)),
        v(format!("{:.0}", s.tokens_per_s)),
        v(s.peak_rss_mib.map_or("n/a".into(), |x| format!("{x:.0}")))
    );

    let _ = writeln!(r, "## Verification & Validation\n");
    let _ = writeln!(r, "| check | measured | result |\n|---|---|---|");
    let _ = writeln!(
        r,
        "| Trainable parameters (PEFT's format) | `{}` | {} |",
        k.trainable_params,
        pass(k.adapter_tensors > 0)
    );
    let _ = writeln!(
        r,
        "| Base weights unchanged (SHA-256 of {} tensors before vs after) | `{}…` vs `{}…`{} | {} |",
        k.base_tensors,
        &k.base_fingerprint_before[..16.min(k.base_fingerprint_before.len())],
        &k.base_fingerprint_after[..16.min(k.base_fingerprint_after.len())],
        if k.changed_base_tensors.is_empty() {
            String::new()
        } else {
            format!(", changed: {}", k.changed_base_tensors.join(", "))
        },
        pass(fp_equal)
    );
    let _ = writeln!(
        r,
        "| Every lora_B has a gradient on the first backward | {}/{n_b} | {} |",
        k.lora_b_with_grad_first_step
            .map_or("n/a".into(), |x| x.to_string()),
        pass(b_ok)
    );
    let _ = writeln!(
        r,
        "| Every lora_A has a gradient after the first update | {}/{n_b} | {} |",
        k.lora_a_with_grad_after_first_update
            .map_or("n/a (single step)".into(), |x| x.to_string()),
        pass(a_ok)
    );
    let _ = writeln!(
        r,
        "| Loss finite at every step | {} | {} |",
        if k.all_losses_finite {
            "all finite"
        } else {
            "non-finite value seen"
        },
        pass(k.all_losses_finite)
    );
    let _ = writeln!(
        r,
        "| Training loss falls (mean of the first vs the last {q} logged steps) | {head:.4} → {tail:.4} (single steps: {} → {}) | {} |",
        opt(k.first_loss),
        opt(k.last_loss),
        pass(fell)
    );
    if let Some((a, b, ok)) = val_fell {
        let _ = writeln!(
            r,
            "| Validation loss falls (first → last evaluation) | {a:.4} → {b:.4} | {} |",
            pass(ok)
        );
    }
    let evals: Vec<String> = k
        .eval_losses
        .iter()
        .map(|(st, l)| format!("step {st}: {l:.4} (ppl {:.2})", l.exp()))
        .collect();
    let _ = writeln!(
        r,
        "| Validation loss | {} | {} |",
        evals.join("; "),
        pass(!k.eval_losses.is_empty())
    );
    let _ = writeln!(
        r,
        "\nInference on custom instruction prompts, before training (base model: B = 0) and after (greedy decoding, at most {} new tokens):\n",
        c.generate.max_new_tokens
    );
    for (before, after) in generations {
        let instr = before.prompt.lines().nth(1).unwrap_or("");
        let _ = writeln!(
            r,
            "**{instr}**\n\n- before: {}\n- after: {}\n",
            v(quote(&before.text)),
            v(quote(&after.text))
        );
    }
    let _ = writeln!(
        r,
        "The base model weights remained frozen throughout training (fingerprints above).\n\n---\n"
    );

    let _ = writeln!(r, "## Results\n");
    let _ = writeln!(r, "![loss]({loss_svg})\n\n![learning rate]({lr_svg})\n");
    if let Some(m0) = run.metrics.iter().find(|m| m.kind == "eval" && m.step == 0) {
        let _ = writeln!(
            r,
            "Validation loss before the first update (step 0): {:.4} (perplexity {:.2}).\n",
            m0.loss,
            m0.loss.exp()
        );
    }
    let _ = writeln!(
        r,
        "| step | train loss | validation loss | lr | grad norm |\n|---|---|---|---|---|"
    );
    for m in run.metrics.iter().filter(|m| m.kind == "train") {
        let ev = run
            .metrics
            .iter()
            .find(|e| e.kind == "eval" && e.step == m.step)
            .map_or(String::new(), |e| format!("{:.4}", e.loss));
        let _ = writeln!(
            r,
            "| {} | {:.4} | {ev} | {:.3e} | {:.3} |",
            m.step,
            m.loss,
            m.lr.unwrap_or(0.0),
            m.grad_norm.unwrap_or(0.0)
        );
    }
    let _ = writeln!(r, "\n---\n");

    let _ = writeln!(r, "## Issues Faced & Resolutions\n");
    let mut issues = Vec::new();
    if st.truncated > 0 {
        issues.push(format!(
            "{} training records exceeded {} tokens: truncated, keeping the head (prompt first){}",
            st.truncated,
            c.encode.max_len,
            if st.response_truncated_away > 0 {
                format!(
                    "; {} of them lost their whole response",
                    st.response_truncated_away
                )
            } else {
                String::new()
            }
        ));
    }
    if st.no_trainable_label > 0 {
        issues.push(format!("{} training records had no trainable label under {:?}: they add no loss term and cannot make the loss NaN (the loss is normalised by the step's target count)", st.no_trainable_label, c.encode.labels));
    }
    if st.padding_label_tokens > 0 {
        issues.push(format!("{:.1}% of loss targets were padding (labels = input_ids with padding): the model is trained to predict pad tokens; `encode.labels = \"mask_padding\"` with dynamic padding removes this", 100.0 * st.padding_label_share()));
    }
    if s.skipped_steps > 0 {
        issues.push(format!(
            "{} optimizer steps had no trainable token and were skipped",
            s.skipped_steps
        ));
    }
    if s.clipped_steps > 0 {
        issues.push(format!(
            "{} of {} steps had a gradient norm above {} and were clipped to it",
            s.clipped_steps, s.steps, c.optim.max_grad_norm
        ));
    }
    if s.interrupted {
        issues.push(
            "the run was interrupted; its checkpoint can be continued with `--resume`".into(),
        );
    }
    issues.push(if k.all_losses_finite { "NaN/inf guard: not tripped (a non-finite loss or gradient would have stopped the run, keeping the last good checkpoint)".into() } else { "NaN/inf guard tripped".into() });
    for i in &issues {
        let _ = writeln!(r, "- {i}");
    }
    let _ = writeln!(r, "\n---\n");

    let _ = writeln!(r, "## Model Card Alignment\n");
    let _ = writeln!(
        r,
        "The adapter (`adapter/`: adapter_model.safetensors, adapter_config.json, README.md) loads in Python PEFT; its model card carries the reference's front matter:\n\n```yaml\n{}```\n\n- Base model properly referenced\n- PEFT and LoRA usage documented\n- Fine-tuning data and settings stated in the card's summary\n- Hardware and compute used recorded above\n\n---\n",
        model_card_front_matter(base)
    );

    let _ = writeln!(r, "## Conclusion\n");
    let _ = writeln!(
        r,
        "{}\n",
        if all_ok {
            format!(
                "The run completed {} optimizer steps; every verification check passed: the base weights are bitwise unchanged, every adapter tensor received gradient, and the training loss fell from {head:.4} to {tail:.4} (means of the first and last {q} logged steps; validation {}).",
                s.steps,
                val_fell.map_or(opt(s.eval_loss), |(a, b, _)| format!("{a:.4} → {b:.4}"))
            )
        } else {
            "The run completed, but at least one verification check did not pass (see the table above).".to_string()
        }
    );
    let _ = writeln!(
        r,
        "Status: {}\n\n---\n",
        if all_ok {
            "Completed Successfully"
        } else {
            "Needs Attention"
        }
    );

    let _ = writeln!(r, "## Reproduce\n");
    let _ = writeln!(
        r,
        "- Command: `{}`\n- Seed: {}\n- Config SHA-256: `{}`\n- Data SHA-256: `{}`\n- Tokenizer SHA-256: `{}`\n- Base weights digest: `{}`\n\n`lorasft reproduce <run dir>` repeats the run from its `config.toml` and checks that every logged loss matches bit for bit.",
        v(m.command.join(" ")),
        m.seed,
        v(m.config_sha256.clone()),
        m.data_sha256,
        m.tokenizer_sha256,
        m.base_weights_digest
    );
    r
}

fn run_shape(run: &RunFiles) -> String {
    let text = &run.checks.trainable_params;
    let all = text
        .split("all params: ")
        .nth(1)
        .and_then(|x| x.split(' ').next())
        .unwrap_or("?");
    format!("{all} parameters in all (adapters included)")
}

fn truncate_chars(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

fn quote(s: &str) -> String {
    let t = s.trim();
    if t.is_empty() {
        "(empty)".into()
    } else {
        format!("`{}`", t.replace('`', "'").replace('\n', " ⏎ "))
    }
}
