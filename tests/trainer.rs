//! The trainer end to end on the generated tiny model and the fixture data: learning,
//! determinism, resume, accumulation, fault handling, adapters, merge, eval and generate.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use common::{bits, ids, max_abs_diff, smoke};
use lorasft::adapter;
use lorasft::data::batch::Batch;
use lorasft::data::batching::Batching;
use lorasft::model::fixture::FixtureSpec;
use lorasft::model::{LoraConfig, Mode};
use lorasft::records::{Metric, MetricKind, Summary};
use lorasft::rng::Rng;
use lorasft::train::config::TrainConfig;
use lorasft::train::eval::evaluate;
use lorasft::train::prepare::prepare;
use lorasft::train::run::{RunOptions, train};
use lorasft::train::step::forward_backward;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(cfg: TrainConfig, opts: &RunOptions) -> Summary {
    common::train_run(cfg, opts)
}

fn metrics(dir: &Path) -> Vec<Metric> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn losses(dir: &Path) -> Vec<(usize, MetricKind, u64)> {
    metrics(dir)
        .into_iter()
        .map(|m| (m.step, m.kind, m.loss.to_bits()))
        .collect()
}

#[test]
fn smoke_preset_learns_and_its_adapter_reloads_to_the_same_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let s = run(smoke(tmp.path(), 60), &RunOptions::default());
    let (first, last) = (s.first_loss.unwrap(), s.last_loss.unwrap());
    println!(
        "smoke: loss {first:.4} -> {last:.4}, eval {:.4}",
        s.eval_loss.unwrap()
    );
    assert!(
        last < first - 1.0,
        "training loss did not fall well below its start: {first} -> {last}"
    );
    let evals: Vec<f64> = metrics(&s.run_dir)
        .iter()
        .filter(|m| m.is_eval())
        .map(|m| m.loss)
        .collect();
    assert!(
        evals.last().unwrap() < &(first - 0.5),
        "validation loss did not fall: {evals:?}"
    );

    // Reload the saved adapter into a fresh base: the same eval loss, and logits equal to those
    // of the final checkpoint's adapter bit for bit.
    let p = prepare(smoke(tmp.path(), 60)).unwrap();
    let mut reloaded = p.base.model.clone();
    adapter::load(&mut reloaded, &s.adapter_dir).unwrap();
    let (eval, _) = evaluate(&reloaded, &p.encoder, &p.val, 4).unwrap();
    assert_eq!(eval.to_bits(), s.eval_loss.unwrap().to_bits());
    let mut from_ckpt = p.base.model.clone();
    adapter::load(&mut from_ckpt, &s.run_dir.join("checkpoints/step-000060")).unwrap();
    let x = ids(2, 12, 512, 1);
    assert_eq!(
        bits(&reloaded.forward(&x, None, &mut Mode::Eval).unwrap()),
        bits(&from_ckpt.forward(&x, None, &mut Mode::Eval).unwrap())
    );
    let card = std::fs::read_to_string(s.adapter_dir.join("README.md")).unwrap();
    // A generated fixture has no hub id and no directory: the card names no base_model and
    // adapter_config.json's base_model_name_or_path is null, not a name nothing can load.
    assert!(card.starts_with("---\nlibrary_name: peft\npipeline_tag: text-generation\ntags:\n- lora\n- transformers\n---\n"), "{card}");
    let peft: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(s.adapter_dir.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(peft["base_model_name_or_path"], serde_json::Value::Null);
    assert!(s.run_dir.join("config.toml").exists() && s.run_dir.join("generations.json").exists());
    assert_eq!(s.generations.len(), 2);
}

#[test]
fn same_config_and_seed_give_identical_losses_and_adapter_bytes() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let sa = run(smoke(a.path(), 8), &RunOptions::default());
    let sb = run(smoke(b.path(), 8), &RunOptions::default());
    assert_eq!(losses(&sa.run_dir), losses(&sb.run_dir));
    let bytes =
        |s: &Summary| std::fs::read(s.adapter_dir.join("adapter_model.safetensors")).unwrap();
    assert_eq!(bytes(&sa), bytes(&sb));
    let mut other = smoke(b.path(), 8);
    other.run.name = "other-seed".into();
    other.run.seed = 1;
    let sc = run(other, &RunOptions::default());
    assert_ne!(
        bytes(&sa),
        bytes(&sc),
        "a different seed must give a different adapter"
    );
}

#[test]
fn resume_continues_bitwise_identically_to_an_uninterrupted_run() {
    // Every batching mode: its seeded plan is rebuilt on resume, across epoch boundaries.
    for batching in Batching::ALL {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut cfg = smoke(a.path(), 12);
        cfg.encode.batching = batching;
        cfg.train.save_every = 4;
        cfg.train.eval_every = 4;
        let full = run(cfg.clone(), &RunOptions::default());
        let mut cfg_b = cfg.clone();
        cfg_b.run.out_dir = b.path().to_path_buf();
        let part = run(
            cfg_b.clone(),
            &RunOptions {
                stop_at_step: Some(6),
                ..RunOptions::default()
            },
        );
        assert!(part.interrupted && part.steps == 6);
        let resumed = run(
            cfg_b,
            &RunOptions {
                resume: true,
                ..RunOptions::default()
            },
        );
        assert_eq!(resumed.steps, 12);
        assert_eq!(
            losses(&full.run_dir),
            losses(&resumed.run_dir),
            "{batching:?}"
        );
        let bytes =
            |s: &Summary| std::fs::read(s.adapter_dir.join("adapter_model.safetensors")).unwrap();
        assert_eq!(bytes(&full), bytes(&resumed), "{batching:?}");
    }
}

/// Packing trains on the same examples with fewer rows: the smoke run's validation loss
/// before training is the padded run's (evaluation packs too), metrics count padding, and
/// the report says what a packed step holds.
#[test]
fn packed_runs_evaluate_like_padded_ones_and_record_real_and_padded_tokens() {
    let eval0 = |batching: Batching| {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = smoke(dir.path(), 2);
        cfg.encode.batching = batching;
        cfg.train.eval_every = 1;
        let s = run(cfg, &RunOptions::default());
        let m = metrics(&s.run_dir);
        let first_eval = m.iter().find(|m| m.is_eval()).unwrap().loss;
        let train = m.iter().rfind(|m| m.is_train()).unwrap().clone();
        lorasft::report::write(&s.run_dir).unwrap();
        let report = std::fs::read_to_string(s.run_dir.join("REPORT.md")).unwrap();
        let batch_line = report
            .lines()
            .find(|l| l.starts_with("- Batch: "))
            .unwrap()
            .to_string();
        (first_eval, train, batch_line)
    };
    let (padded, pt, padded_line) = eval0(Batching::Padded);
    let (packed, kt, packed_line) = eval0(Batching::Packed);
    assert!(
        padded_line.ends_with("= 8 examples per optimizer step"),
        "{padded_line}"
    );
    assert!(
        packed_line.contains("packed rows of up to 128 tokens per micro-batch × 2 accumulation = 8 rows per optimizer step (")
            && packed_line.ends_with("examples per optimizer step on average)"),
        "{packed_line}"
    );
    assert!(
        ((padded - packed) / padded).abs() < 1e-5,
        "validation loss before training: padded {padded}, packed {packed}"
    );
    for t in [&pt, &kt] {
        let (real, all) = (t.tokens_seen.unwrap(), t.padded_tokens_seen.unwrap());
        assert!(real > 0 && real <= all, "{real} real of {all}");
        assert!(t.padded_tokens_per_s.unwrap() >= t.tokens_per_s.unwrap());
    }
    let share =
        |t: &Metric| 1.0 - t.tokens_seen.unwrap() as f64 / t.padded_tokens_seen.unwrap() as f64;
    assert!(
        share(&kt) < share(&pt),
        "packing pads less: {} vs {}",
        share(&kt),
        share(&pt)
    );
}

#[test]
fn accumulating_micro_batches_equals_one_larger_batch() {
    let mut cfg = smoke(Path::new("/nonexistent"), 1);
    cfg.lora.dropout = 0.0;
    let p = prepare(cfg).unwrap();
    let mut model = p.base.model.clone();
    model.add_lora(&p.cfg.lora, 3).unwrap();
    // Non-zero B so that every gradient is non-trivial.
    common::randomise_adapters(&model, 3);
    let named = model.lora_vars();
    let ex: Vec<_> = p.train[..4].iter().collect();
    let batch = |e: &[&lorasft::data::encode::Example]| {
        Batch::from_rows(&p.encoder.collate(e), &Device::Cpu).unwrap()
    };
    let big = vec![batch(&ex)];
    let small = vec![batch(&ex[..2]), batch(&ex[2..])];
    let t_big: usize = big.iter().map(|b| b.targets).sum();
    let t_small: usize = small.iter().map(|b| b.targets).sum();
    assert_eq!(t_big, t_small);
    let mut rng = Rng::new(0);
    let (l1, g1, _) = forward_backward(&model, &named, &big, t_big, 1.0, &mut rng).unwrap();
    let (l2, g2, _) = forward_backward(&model, &named, &small, t_small, 1.0, &mut rng).unwrap();
    assert!((l1 - l2).abs() / t_big as f64 <= 1e-6, "loss {l1} vs {l2}");
    let worst = g1
        .iter()
        .zip(&g2)
        .map(|(a, b)| max_abs_diff(a, b))
        .fold(0.0, f64::max);
    println!("max |grad difference| = {worst:e}");
    assert!(worst <= 1e-6, "accumulated gradients differ by {worst:e}");
}

/// A fixture model directory (config, weights, tokenizer) and a trained adapter on it.
fn model_dir(tmp: &Path) -> PathBuf {
    let dir = tmp.join("model");
    FixtureSpec::default().write(0, &dir).unwrap();
    std::fs::copy(
        root().join("fixtures/tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    dir
}

#[test]
fn non_finite_loss_stops_the_run_and_names_a_checkpoint_that_is_really_good() {
    // Warmup makes the first update's lr 0 (the adapter stays finite and good); the second
    // update at an absurd lr blows the adapter up, and the third forward is non-finite. The
    // checkpoint of step 2 holds the adapter that produced it: it is removed, `latest` goes
    // back to step 1, and the error names step 1, whose adapter evaluates to a finite loss.
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = smoke(tmp.path(), 6);
    cfg.optim.lr = 1e30;
    cfg.optim.warmup = lorasft::train::schedule::Warmup::Steps(2);
    cfg.optim.schedule = lorasft::train::schedule::Schedule::Constant;
    cfg.train.save_every = 1;
    cfg.train.eval_every = 0;
    let p = prepare(cfg.clone()).unwrap();
    let err = train(p, &RunOptions::default()).unwrap_err().to_string();
    println!("{err}");
    assert!(
        err.contains("non-finite") && err.contains("at step 3"),
        "{err}"
    );
    assert!(err.contains("checkpoints/step-000001"), "{err}");
    let ckpts = tmp.path().join("smoke/checkpoints");
    assert!(
        !ckpts.join("step-000002").exists(),
        "the bad checkpoint is removed"
    );
    assert_eq!(
        std::fs::read_to_string(ckpts.join("latest")).unwrap(),
        "step-000001"
    );
    let p = prepare(cfg).unwrap();
    let mut good = p.base.model.clone();
    adapter::load(&mut good, &ckpts.join("step-000001")).unwrap();
    let (loss, targets) = evaluate(&good, &p.encoder, &p.val, 4).unwrap();
    assert!(
        targets > 0 && loss.is_finite(),
        "the named checkpoint evaluates to {loss}"
    );
}

#[test]
fn an_update_that_makes_the_adapter_non_finite_stops_before_it_is_saved() {
    // lr = inf: the first update itself is non-finite. Nothing of it may be saved.
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = smoke(tmp.path(), 3);
    cfg.optim.lr = f64::MAX;
    cfg.optim.warmup = lorasft::train::schedule::Warmup::Steps(0);
    cfg.optim.schedule = lorasft::train::schedule::Schedule::Constant;
    cfg.train.save_every = 1;
    let err = train(prepare(cfg).unwrap(), &RunOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("non-finite") && err.contains("at step 1"),
        "{err}"
    );
    assert!(err.contains("last good checkpoint: none"), "{err}");
    let run = tmp.path().join("smoke");
    assert!(!run.join("checkpoints/step-000001").exists() && !run.join("adapter").exists());
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
    assert!(
        !metrics.contains("null"),
        "no NaN is written as null: {metrics}"
    );
}

#[test]
fn corrupt_checkpoint_and_mismatched_adapters_give_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = smoke(tmp.path(), 4);
    let s = run(cfg.clone(), &RunOptions::default());
    let ckpt = s.run_dir.join("checkpoints/step-000004");
    std::fs::write(ckpt.join("optimizer.safetensors"), b"garbage").unwrap();
    let err = train(
        prepare(cfg).unwrap(),
        &RunOptions {
            resume: true,
            ..RunOptions::default()
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("optimizer.safetensors") && err.contains("not a valid safetensors"),
        "{err}"
    );

    // An adapter trained on another shape: the tensor and both shapes are named.
    let mut other = FixtureSpec {
        hidden: 32,
        heads: 2,
        kv_heads: 1,
        ..FixtureSpec::default()
    }
    .build(0, DType::F32, &Device::Cpu)
    .unwrap();
    other
        .add_lora(
            &s.adapter_dir
                .join("x")
                .parent()
                .map(|d| adapter::read_config(d).unwrap().1)
                .unwrap(),
            0,
        )
        .unwrap();
    let err = adapter::load(&mut other, &s.adapter_dir)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("lora_A.weight")
            && err.contains("requires [16, 32]")
            && err.contains("[16, 64]"),
        "{err}"
    );

    // An adapter with a tensor no module of the model has.
    let odd = tmp.path().join("odd");
    std::fs::create_dir_all(&odd).unwrap();
    std::fs::copy(
        s.adapter_dir.join("adapter_model.safetensors"),
        odd.join("adapter_model.safetensors"),
    )
    .unwrap();
    let cfg_text = std::fs::read_to_string(s.adapter_dir.join("adapter_config.json"))
        .unwrap()
        .replace("\"gate_proj\",", "");
    std::fs::write(odd.join("adapter_config.json"), cfg_text).unwrap();
    let mut m = prepare(smoke(tmp.path(), 4)).unwrap().base.model;
    let err = adapter::load(&mut m, &odd).unwrap_err().to_string();
    assert!(
        err.contains("gate_proj") && err.contains("matches no adapted module"),
        "{err}"
    );
}

#[test]
fn peft_written_adapter_loads_and_unsupported_features_are_refused() {
    // adapter_config.json as PEFT 0.18 writes it, with keys lorasft does not use.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("peft");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        root().join("fixtures/peft-adapter_config.json"),
        dir.join("adapter_config.json"),
    )
    .unwrap();
    let mut model = FixtureSpec::default()
        .build(0, DType::F32, &Device::Cpu)
        .unwrap();
    model.add_lora(&LoraConfig::default(), 9).unwrap();
    common::randomise_adapters(&model, 9);
    // PEFT's tensors: same keys, metadata {"format": "pt"}.
    let tensors: Vec<(String, candle_core::Tensor)> = model
        .lora_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    let meta = [("format".to_string(), "pt".to_string())]
        .into_iter()
        .collect();
    safetensors::serialize_to_file(
        tensors.iter().map(|(n, t)| (n.as_str(), t)),
        Some(meta),
        &dir.join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut loaded = FixtureSpec::default()
        .build(0, DType::F32, &Device::Cpu)
        .unwrap();
    let cfg = adapter::load(&mut loaded, &dir).unwrap();
    assert_eq!(cfg.peft_version.as_deref(), Some("0.18.0"));
    let x = ids(1, 9, 512, 2);
    assert_eq!(
        bits(&loaded.forward(&x, None, &mut Mode::Eval).unwrap()),
        bits(&model.forward(&x, None, &mut Mode::Eval).unwrap())
    );
    let text = std::fs::read_to_string(dir.join("adapter_config.json"))
        .unwrap()
        .replace("\"use_dora\": false", "\"use_dora\": true");
    std::fs::write(dir.join("adapter_config.json"), text).unwrap();
    let err = adapter::load(&mut loaded, &dir).unwrap_err().to_string();
    assert!(
        err.contains("adapter_config.json") && err.contains("DoRA"),
        "{err}"
    );
}

use common::lorasft;

#[test]
fn merge_eval_and_generate_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_dir(tmp.path());
    let mut cfg = smoke(tmp.path(), 10);
    cfg.model.source = dir.display().to_string();
    cfg.model.tokenizer = None;
    let s = run(cfg, &RunOptions::default());
    // PEFT loads the base by reference: the model directory the run resolved, absolute.
    assert_eq!(common::loadable_base(&s.adapter_dir), dir);
    let merged = tmp.path().join("merged");
    common::stdout_ok(
        lorasft()
            .args(["merge", "--model"])
            .arg(&dir)
            .arg("--adapter")
            .arg(&s.adapter_dir)
            .arg("--out")
            .arg(&merged),
    );
    let src = lorasft::model::load::ModelSource::Dir(merged.clone());
    let merged_model = lorasft::model::load::load_model(&src, DType::F32, &Device::Cpu)
        .unwrap()
        .1;
    let mut adapted = lorasft::model::load::load_model(
        &lorasft::model::load::ModelSource::Dir(dir.clone()),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
    .1;
    adapter::load(&mut adapted, &s.adapter_dir).unwrap();
    let x = ids(2, 16, 512, 5);
    let diff = max_abs_diff(
        &merged_model.forward(&x, None, &mut Mode::Eval).unwrap(),
        &adapted.forward(&x, None, &mut Mode::Eval).unwrap(),
    );
    println!("merged vs unmerged logits: max |diff| = {diff:e}");
    assert!(diff <= 1e-5, "merged model differs by {diff:e}");
    assert!(merged.join("tokenizer.json").exists());

    let data = root().join("fixtures/instructions.json");
    let per = tmp.path().join("per.json");
    // `lorasft eval` of the trained adapter on the fixture records, masked padding, dynamic
    // padding at 128, plus `extra` flags; its stdout.
    let eval = |extra: &[&std::ffi::OsStr]| {
        common::stdout_ok(
            lorasft()
                .args(["eval", "--model"])
                .arg(&dir)
                .arg("--adapter")
                .arg(&s.adapter_dir)
                .arg("--data")
                .arg(&data)
                .args(["--labels", "mask-padding", "--padding", "longest"])
                .args(["--max-len", "128"])
                .args(extra),
        )
    };
    let out = eval(&["--per-record".as_ref(), per.as_os_str()]);
    assert!(
        out.contains("mean loss") && out.contains("perplexity"),
        "{out}"
    );
    let per: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&per).unwrap()).unwrap();
    assert_eq!(per.len(), 44);
    // Every batching mode evaluates the same targets to the same mean loss (to rounding).
    let eval_loss = |batching: &str| {
        let out = eval(&["--batching".as_ref(), batching.as_ref()]);
        let targets = out.split("loss targets: ").nth(1).unwrap();
        let loss = out.split("mean loss: ").nth(1).unwrap();
        let num = |t: &str| t.split(',').next().unwrap().trim().parse::<f64>().unwrap();
        (num(targets), num(loss))
    };
    let padded = eval_loss("padded");
    for mode in ["group-by-length", "packed"] {
        let (targets, loss) = eval_loss(mode);
        assert_eq!(targets, padded.0, "{mode}: the same targets");
        assert!(
            (loss - padded.1).abs() <= 1e-5 * padded.1,
            "{mode}: {loss} vs {padded:?}"
        );
    }

    let generate = |extra: &[&str]| {
        common::stdout_ok(
            lorasft()
                .args(["generate", "--model"])
                .arg(&dir)
                .arg("--adapter")
                .arg(&s.adapter_dir)
                .args([
                    "--instruction",
                    "Name a mammal that can fly.",
                    "--max-new-tokens",
                    "8",
                ])
                .args(extra),
        )
    };
    assert_eq!(
        generate(&[]),
        generate(&[]),
        "greedy decoding is deterministic"
    );
    assert_eq!(
        generate(&["--temperature", "0.8", "--seed", "3"]),
        generate(&["--temperature", "0.8", "--seed", "3"]),
        "seeded sampling repeats"
    );
    let side = generate(&["--compare"]);
    assert!(
        side.contains("--- base") && side.contains("--- adapted"),
        "{side}"
    );
}

#[test]
fn config_files_presets_and_overrides_resolve_and_are_saved() {
    let d = TrainConfig::day2();
    assert_eq!(d.model.source, "TinyLlama/TinyLlama-1.1B-Chat-v1.0");
    assert_eq!((d.lora.r, d.lora.alpha, d.lora.dropout), (8, 16.0, 0.05));
    assert_eq!(adapter::target_names(&d.lora), "q_proj, v_proj");
    assert_eq!(d.encode, lorasft::data::encode::EncodeConfig::default());
    assert_eq!(d.encode.max_len, 512);
    assert_eq!(d.optim.adamw.weight_decay, 0.0);
    assert!(d.train.grad_accum > 1 && d.optim.max_grad_norm == 1.0 && d.train.eval_every > 0);
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("run.toml");
    std::fs::write(&path, "[optim]\nlr = 0.005\n[train]\nmax_steps = 3\n").unwrap();
    let out = common::stdout_ok(
        lorasft()
            .args(["train", "--preset", "smoke", "--config"])
            .arg(&path)
            .args([
                "--set",
                "lora.r=4",
                "--set",
                "encode.labels=\"completion_only\"",
                "--dry-run",
            ]),
    );
    let cfg: TrainConfig = toml::from_str(&out).unwrap();
    assert_eq!(
        (cfg.optim.lr, cfg.train.max_steps, cfg.lora.r),
        (0.005, Some(3), 4)
    );
    assert_eq!(
        cfg.encode.labels,
        lorasft::data::encode::LabelPolicy::CompletionOnly
    );
    let bad = lorasft()
        .args(["train", "--set", "optim.nope=1", "--dry-run"])
        .output()
        .unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("nope"));
    let unknown = lorasft()
        .args(["train", "--preset", "nope"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("smollm2-demo"));
}

/// What `--dry-run` prints and what a run records in config.toml both come back through
/// `--config` as the same configuration, whatever preset is named beside them.
#[test]
fn printed_and_recorded_configs_make_the_round_trip_through_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let train = |args: &[&std::ffi::OsStr]| {
        common::stdout_ok(lorasft().current_dir(root()).arg("train").args(args))
    };
    let flags: [&std::ffi::OsStr; 8] = [
        "--preset".as_ref(),
        "smoke".as_ref(),
        "--out-dir".as_ref(),
        tmp.path().as_os_str(),
        "--name".as_ref(),
        "rt".as_ref(),
        "--max-steps".as_ref(),
        "2".as_ref(),
    ];
    let printed = train(&[&flags[..], &["--dry-run".as_ref()]].concat());
    let file = tmp.path().join("run.toml");
    std::fs::write(&file, &printed).unwrap();
    train(&flags);
    let recorded = std::fs::read_to_string(tmp.path().join("rt/config.toml")).unwrap();
    assert_eq!(
        recorded, printed,
        "the run records the config --dry-run printed"
    );
    for path in [file, tmp.path().join("rt/config.toml")] {
        for preset in lorasft::train::config::PRESETS {
            let args: [&std::ffi::OsStr; 5] = [
                "--preset".as_ref(),
                preset.as_ref(),
                "--config".as_ref(),
                path.as_os_str(),
                "--dry-run".as_ref(),
            ];
            assert_eq!(train(&args), printed, "{} over {preset}", path.display());
        }
    }
}

#[test]
fn steps_without_targets_are_skipped_but_still_checkpointed_and_stoppable() {
    // max_len 8 cuts every response away: CompletionOnly leaves no loss target anywhere.
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = smoke(tmp.path(), 4);
    cfg.encode.max_len = 8;
    cfg.encode.labels = lorasft::data::encode::LabelPolicy::CompletionOnly;
    cfg.train.save_every = 0;
    let part = run(
        cfg.clone(),
        &RunOptions {
            stop_at_step: Some(2),
            ..RunOptions::default()
        },
    );
    assert!(part.interrupted && part.steps == 2 && part.skipped_steps == 2);
    assert!(
        part.run_dir.join("checkpoints/step-000002").exists(),
        "the stop on a skipped step wrote a checkpoint"
    );
    let err = train(
        prepare(cfg).unwrap(),
        &RunOptions {
            resume: true,
            ..RunOptions::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("nothing was trained") && err.contains("none of the 4 steps"),
        "{err}"
    );
    let dir = tmp.path().join("smoke");
    let done: Summary = lorasft::records::read_json(&dir.join("summary.json")).unwrap();
    assert_eq!(
        (done.steps, done.skipped_steps, done.first_loss),
        (4, 4, None)
    );
    assert!(
        dir.join("checkpoints/step-000004").exists(),
        "the final (skipped) step is checkpointed"
    );
    lorasft::report::write(&dir).unwrap();
    let report = std::fs::read_to_string(dir.join("REPORT.md")).unwrap();
    assert!(
        report.contains("4 optimizer steps had no trainable token and were skipped"),
        "{report}"
    );
    assert!(report.contains("Status: Needs Attention"));
}

#[test]
fn max_grad_norm_zero_disables_clipping_and_negative_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = smoke(tmp.path(), 6);
    cfg.optim.max_grad_norm = 0.0;
    let s = run(cfg.clone(), &RunOptions::default());
    assert_eq!(s.clipped_steps, 0);
    assert!(
        s.last_loss.unwrap() < s.first_loss.unwrap(),
        "training still descends without clipping"
    );
    cfg.optim.max_grad_norm = -1.0;
    let err = prepare(cfg).err().unwrap().to_string();
    assert!(err.contains("max_grad_norm") && err.contains("-1"), "{err}");
}

#[test]
fn init_adapter_settings_are_adopted_and_stated_everywhere() {
    // The source adapter: the smoke preset's r 16, alpha 32 on every linear.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().to_str().unwrap();
    let base = ["train", "--preset", "smoke", "--max-steps", "2", "--quiet"];
    common::stdout_ok(lorasft().current_dir(root()).args(base).args([
        "--out-dir",
        out,
        "--name",
        "src",
    ]));
    let src = tmp.path().join("src/adapter");
    // A run whose config says r 4, alpha 8, started from it: the adapter's values are trained
    // and stated by the startup line, config.toml, REPORT.md and the model card.
    let run = lorasft()
        .current_dir(root())
        .args(base)
        .args(["--out-dir", out, "--name", "adopt"])
        .args(["--set", "lora.r=4", "--set", "lora.alpha=8.0"])
        .arg("--init-adapter")
        .arg(&src)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let line = "trainable params: 35,840 || all params: 187,712";
    assert!(stderr.contains(line), "{stderr}");
    assert!(
        stderr.contains("LoRA settings adopted from") && stderr.contains("the config said r 4"),
        "{stderr}"
    );
    let dir = tmp.path().join("adopt");
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    let cfg = read("config.toml");
    assert!(
        cfg.contains("r = 16") && cfg.contains("alpha = 32.0"),
        "{cfg}"
    );
    assert!(cfg.contains("init_adapter = "), "{cfg}");
    let report = read("REPORT.md");
    assert!(
        report.contains("- Rank (r): 16\n- LoRA Alpha: 32\n"),
        "{report}"
    );
    assert!(report.contains(line), "the report states the adopted count");
    assert!(read("adapter/README.md").contains("LoRA r 16, alpha 32"));
}

#[test]
fn a_one_step_run_reports_what_it_could_not_measure_and_records_its_device() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = smoke(tmp.path(), 1);
    cfg.train.eval_every = 0;
    let s = run(cfg, &RunOptions::default());
    let report = std::fs::read_to_string(s.run_dir.join("REPORT.md")).unwrap();
    for row in [
        "| Every lora_A has a gradient after the first update | none: the run made no such backward | not measured |",
        "| Training loss falls (mean of the first vs the last 1 logged steps) | 1 logged step(s): no trend to measure | not measured |",
        "| Validation loss falls (first → last evaluation) | 1 evaluation(s): no trend to measure | not measured |",
    ] {
        assert!(report.contains(row), "missing row {row}\n{report}");
    }
    assert!(
        report.contains("| Every lora_B has a gradient on the first backward | 14/14 | pass |")
    );
    assert!(
        report.contains("Status: Completed, 3 check(s) not measured"),
        "{report}"
    );
    assert!(!report.contains("Completed Successfully"));
    let manifest: lorasft::records::Manifest =
        lorasft::records::read_json(&s.run_dir.join("manifest.json")).unwrap();
    assert_eq!(
        (manifest.device.as_str(), manifest.precision.as_str()),
        ("cpu", "fp32")
    );
    assert!(
        report.contains("- Device: cpu ("),
        "the device line comes from the manifest"
    );
}

#[test]
fn a_run_directory_belongs_to_one_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().to_str().unwrap();
    let train = || {
        let mut c = lorasft();
        c.current_dir(root())
            .args(["train", "--preset", "smoke", "--max-steps", "2", "--quiet"])
            .args(["--out-dir", out]);
        c
    };
    common::stdout_ok(&mut train());
    // A fresh run into a finished run's directory refuses, naming what is there.
    let refused = train().output().unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("holds another run") && stderr.contains("--overwrite"),
        "{stderr}"
    );
    // --overwrite clears it and runs; the result equals a run into an empty directory.
    common::stdout_ok(train().arg("--overwrite"));
    let dir = tmp.path().join("smoke");
    let other = tempfile::tempdir().unwrap();
    common::stdout_ok(
        lorasft()
            .current_dir(root())
            .args(["train", "--preset", "smoke", "--max-steps", "2", "--quiet"])
            .args(["--out-dir", other.path().to_str().unwrap()]),
    );
    assert_eq!(losses(&dir), losses(&other.path().join("smoke")));
    // While a run holds the directory, a second one fails at once naming the holder's PID.
    let _held =
        lorasft::train::run_dir::RunDir::claim(&dir, lorasft::train::run_dir::Claim::Resume)
            .unwrap();
    let busy = train().arg("--resume").output().unwrap();
    let stderr = String::from_utf8_lossy(&busy.stderr);
    assert!(
        stderr.contains(&format!("pid {}", std::process::id())),
        "{stderr}"
    );
}

#[test]
fn pruning_keeps_this_runs_checkpoints_and_drops_stale_later_ones() {
    // A stale checkpoint numbered after every step of this run (left by an attempt this run
    // resumed past) must not make the pruning delete the checkpoints just written.
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = smoke(tmp.path(), 4);
    cfg.train.save_every = 1;
    let part = run(
        cfg.clone(),
        &RunOptions {
            stop_at_step: Some(2),
            ..RunOptions::default()
        },
    );
    let ckpts = part.run_dir.join("checkpoints");
    std::fs::create_dir_all(ckpts.join("step-000999")).unwrap();
    let done = run(
        cfg,
        &RunOptions {
            resume: true,
            ..RunOptions::default()
        },
    );
    assert_eq!(done.steps, 4);
    let mut left: Vec<String> = std::fs::read_dir(&ckpts)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["latest", "step-000003", "step-000004"]);
    assert_eq!(
        std::fs::read_to_string(ckpts.join("latest")).unwrap(),
        "step-000004"
    );
}

#[test]
fn eval_with_no_loss_target_is_an_error() {
    let out = lorasft()
        .current_dir(root())
        .args([
            "eval",
            "--model",
            "fixture:0",
            "--tokenizer",
            "fixtures/tokenizer.json",
        ])
        .args([
            "--data",
            "fixtures/instructions.json",
            "--labels",
            "completion-only",
        ])
        .args(["--max-len", "8"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("instructions.json") && stderr.contains("no loss target"),
        "{stderr}"
    );
}

#[test]
fn a_failed_init_adapter_leaves_no_run_directory_and_touches_no_other_run() {
    // An adapter for another model shape: its tensors do not fit the fixture's linears.
    let tmp = tempfile::tempdir().unwrap();
    let adapter_dir = tmp.path().join("other-shape");
    let mut other = FixtureSpec {
        hidden: 32,
        ..FixtureSpec::default()
    }
    .build(1, DType::F32, &Device::Cpu)
    .unwrap();
    other.add_lora(&LoraConfig::default(), 1).unwrap();
    adapter::save(
        &other,
        &adapter_dir,
        &adapter::BaseRef::Unloadable { hub_id: None },
        "test\n",
    )
    .unwrap();
    let out = tmp.path().join("runs");
    let attempt = |name: &str| {
        lorasft()
            .current_dir(root())
            .args(["train", "--preset", "smoke", "--max-steps", "1", "--quiet"])
            .args(["--out-dir", out.to_str().unwrap(), "--name", name])
            .args([
                "--set",
                "lora.targets=[\"q_proj\", \"v_proj\"]",
                "--set",
                "lora.r=8",
            ])
            .args(["--set", "lora.alpha=16.0", "--set", "lora.dropout=0.05"])
            .arg("--init-adapter")
            .arg(&adapter_dir)
            .output()
            .unwrap()
    };
    let failed = attempt("fresh");
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("adapter_model.safetensors"), "{stderr}");
    assert!(
        !out.join("fresh").exists(),
        "a failed start leaves no run directory"
    );
    // Into another run's directory: its config.toml is left as it was.
    common::stdout_ok(
        lorasft()
            .current_dir(root())
            .args(["train", "--preset", "smoke", "--max-steps", "1", "--quiet"])
            .args(["--out-dir", out.to_str().unwrap(), "--name", "done"]),
    );
    let before = std::fs::read(out.join("done/config.toml")).unwrap();
    assert_eq!(attempt("done").status.code(), Some(1));
    assert_eq!(std::fs::read(out.join("done/config.toml")).unwrap(), before);
}

#[test]
fn without_a_validation_set_every_record_trains_and_nothing_is_evaluated() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = smoke(tmp.path(), 10);
    cfg.data.validation = lorasft::data::dataset::SplitSpec::None;
    cfg.train.eval_every = 5;
    let s = run(cfg.clone(), &RunOptions::default());
    let m = metrics(&s.run_dir);
    assert!(m.iter().all(|m| m.kind == MetricKind::Train), "{m:?}");
    assert_eq!(s.eval_loss, None);
    assert_eq!(s.best_eval_loss, None);
    assert!(!s.run_dir.join("best").exists());
    let data: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.run_dir.join("data.json")).unwrap())
            .unwrap();
    let records = lorasft::data::dataset::load(&cfg.data.path)
        .unwrap()
        .records
        .len();
    assert_eq!(data["split"]["train"].as_array().unwrap().len(), records);
    assert!(data["split"]["validation"].as_array().unwrap().is_empty());
    let report = std::fs::read_to_string(s.run_dir.join("REPORT.md")).unwrap();
    assert!(report.contains("There was no validation set"), "{report}");
    assert!(!report.contains("| validation loss |"), "{report}");
    assert!(!report.contains("Validation loss falls"), "{report}");
    // The recorded config says so and reads back; a count of 0 is refused naming "none".
    let saved = std::fs::read_to_string(s.run_dir.join("config.toml")).unwrap();
    assert!(saved.contains("validation = \"none\""), "{saved}");
    let mut zero = cfg;
    zero.data.validation = lorasft::data::dataset::SplitSpec::Count(0);
    let err = zero.validate().unwrap_err().to_string();
    assert!(
        err.contains("\"none\"") && err.contains("--no-validation"),
        "{err}"
    );
}

#[test]
fn a_resume_checks_the_checkpoint_is_this_runs_and_names_changed_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = smoke(tmp.path(), 12);
    cfg.train.save_every = 3;
    let stop = |n| RunOptions {
        stop_at_step: Some(n),
        ..RunOptions::default()
    };
    let resume = |allow| RunOptions {
        resume: true,
        allow_config_change: allow,
        ..RunOptions::default()
    };
    run(cfg.clone(), &stop(6));
    let dir = tmp.path().join("smoke");
    let try_resume = |c: TrainConfig, o: &RunOptions| {
        train(prepare(c).unwrap(), o)
            .map(|s| s.steps)
            .map_err(|e| e.to_string())
    };
    // Another base model: refused, naming both, whatever the flag says.
    let mut other = cfg.clone();
    other.model.source = "fixture:1".into();
    let err = try_resume(other, &resume(true)).unwrap_err();
    assert!(
        err.contains("belong to another run")
            && err.contains("\"fixture:0\"")
            && err.contains("\"fixture:1\"")
            && err.contains("base weights digest"),
        "{err}"
    );
    // A changed learning rate: refused without the flag, naming the key and both values.
    let mut lr = cfg.clone();
    lr.optim.lr = 0.5;
    let err = try_resume(lr.clone(), &resume(false)).unwrap_err();
    assert!(
        err.contains("optim.lr: 0.01 → 0.5") && err.contains("--allow-config-change"),
        "{err}"
    );
    // Refusals leave the run as it was: the same resume continues bit for bit.
    assert!(!dir.join("resumes.json").exists());
    // With the flag it continues, and the report says it is not a straight continuation.
    assert_eq!(try_resume(lr, &resume(true)).unwrap(), 12);
    lorasft::report::write(&dir).unwrap();
    let report = std::fs::read_to_string(dir.join("REPORT.md")).unwrap();
    assert!(
        report.contains("not a straight continuation") && report.contains("`optim.lr` 0.01 → 0.5"),
        "{report}"
    );
    // Extending max_steps is ordinary: allowed without the flag, and stated.
    let mut longer = cfg.clone();
    longer.optim.lr = 0.5;
    longer.train.max_steps = Some(15);
    assert_eq!(try_resume(longer, &resume(false)).unwrap(), 15);
    let resumes = lorasft::train::continuation::read(&dir).unwrap();
    assert_eq!(resumes.len(), 2, "{resumes:?}");
    assert_eq!(resumes[1].at_step, 12);
    assert_eq!(resumes[1].changes.len(), 1);
    assert_eq!(resumes[1].changes[0].key, "train.max_steps");
    assert!(!resumes[1].changes[0].breaks_continuity);
}
