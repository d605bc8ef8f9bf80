//! Everything a run needs, resolved before the first step: the model, the tokenizer, the data
//! encoded and split, and the starting adapter's settings. Also the run records that describe
//! what was prepared (manifest, data record) and the adapter's model-card text.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::adapter;
use crate::chat::{Conversation, Message, Role};
use crate::data::dataset::{self, Dataset, Split};
use crate::data::encode::{Encoder, Example};
use crate::data::prompt;
use crate::data::stats::{self, DataStats};
use crate::device;
use crate::error::{Error, Result};
use crate::generate::{self, Generation};
use crate::model::Llama;
use crate::model::source::{ResolvedModel, resolve_model_with};
use crate::records::{DataRecord, Manifest};
use crate::train::config::TrainConfig;
use crate::verify::Fingerprint;

/// Everything a run needs, resolved before the first step.
pub struct Prepared {
    /// The configuration as resolved (with an `--init-adapter`'s LoRA settings adopted).
    pub cfg: TrainConfig,
    /// The base model (adapters attached by the run).
    pub base: ResolvedModel,
    /// The encoder.
    pub encoder: Encoder,
    /// tokenizer.json used.
    pub tokenizer_path: PathBuf,
    /// The dataset.
    pub dataset: Dataset,
    /// Its split.
    pub split: Split,
    /// Encoded training examples (split order).
    pub train: Vec<Example>,
    /// Encoded validation examples.
    pub val: Vec<Example>,
    /// Statistics of the training subset under the encoding.
    pub train_stats: DataStats,
    /// Token ids that end generation.
    pub eos_ids: Vec<u32>,
    /// What was adopted from the starting adapter: (the config's LoRA, the adapter's).
    pub adopted_lora: Option<(crate::model::LoraConfig, crate::model::LoraConfig)>,
    /// Validation conversations skipped for having no trained turn.
    pub val_skipped: usize,
}

/// Loads model, tokenizer and data; encodes and splits.
pub fn prepare(mut cfg: TrainConfig) -> Result<Prepared> {
    cfg.validate()?;
    let adopted_lora = adopt_init_adapter(&mut cfg)?;
    let dev = cfg.run.device.open()?;
    if !dev.is_cpu() {
        // Dropout masks are drawn on accelerators: seed their generator from the run.
        dev.set_seed(cfg.run.seed)?;
    }
    let base = resolve_model_with(
        &cfg.model.source,
        &dev,
        cfg.run.precision.dtype(),
        cfg.model.keep_quantized,
    )?;
    let tokenizer_path = base.tokenizer_path(cfg.model.tokenizer.as_deref())?;
    let encoder = Encoder::from_file(&tokenizer_path, cfg.encode.clone())?;
    check_fits(&cfg, &base.model, &encoder, &tokenizer_path)?;
    let mut dataset = dataset::load_with(&cfg.data.path, cfg.data.format, &cfg.data.columns)?;
    if let Some(n) = cfg.data.max_records {
        dataset.records.truncate(n);
        dataset.lines.truncate(n);
    }
    let split = dataset::split(dataset.records.len(), cfg.data.validation, cfg.run.seed)
        .map_err(|e| Error::Invalid(format!("{}: {e}", cfg.data.path.display())))?;
    let pick = |idx: &[usize]| {
        idx.iter()
            .map(|&i| dataset.records[i].clone())
            .collect::<Vec<_>>()
    };
    let (train_records, val_records) = (pick(&split.train), pick(&split.validation));
    let locate = |idx: &[usize]| {
        let (ds, idx) = (&dataset, idx.to_vec());
        move |i: usize, e: Error| ds.locate_error(idx[i], e)
    };
    let (train_stats, train) = stats::compute_with(
        &train_records,
        &encoder,
        cfg.train.batch_size,
        locate(&split.train),
    )?;
    let val_locate = locate(&split.validation);
    let val = val_records
        .iter()
        .enumerate()
        .map(|(i, r)| encoder.encode(r).map_err(|e| val_locate(i, e)))
        .collect::<Result<Vec<_>>>()?;
    // A validation conversation with no trained turn adds nothing to the loss: skip it too.
    let val_skipped = val.iter().filter(|e| stats::has_no_trained_turn(e)).count();
    let val: Vec<Example> = val
        .into_iter()
        .filter(|e| !stats::has_no_trained_turn(e))
        .collect();
    let eos_ids = encoder.stop_ids(base.eos_ids(encoder.special_ids().eos));
    Ok(Prepared {
        cfg,
        base,
        encoder,
        tokenizer_path,
        dataset,
        split,
        train,
        val,
        train_stats,
        eos_ids,
        adopted_lora,
        val_skipped,
    })
}

/// With `model.init_adapter`, the run trains the adapter it starts from: its r, alpha,
/// dropout, targets and scaling replace the config's, so everything the run prints and
/// writes states the values actually trained. Returns (config's, adopted) when they differ.
pub fn adopt_init_adapter(
    cfg: &mut TrainConfig,
) -> Result<Option<(crate::model::LoraConfig, crate::model::LoraConfig)>> {
    let Some(dir) = &cfg.model.init_adapter else {
        return Ok(None);
    };
    let (_, lora) = adapter::read_config(dir)?;
    lora.validate().map_err(|e| {
        Error::Invalid(format!(
            "{}: {e}",
            dir.join("adapter_config.json").display()
        ))
    })?;
    if lora == cfg.lora {
        return Ok(None);
    }
    let was = std::mem::replace(&mut cfg.lora, lora.clone());
    Ok(Some((was, lora)))
}

/// Refuses a tokenizer larger than the model's vocabulary and a max length beyond its positions.
fn check_fits(cfg: &TrainConfig, model: &Llama, encoder: &Encoder, tokenizer: &Path) -> Result<()> {
    let shape = model.shape();
    encoder.check_vocab(tokenizer, &cfg.model.source, shape.vocab)?;
    if cfg.encode.max_len > shape.max_positions {
        return Err(Error::Invalid(format!(
            "encode.max_len {} exceeds the max_position_embeddings {} of model {}",
            cfg.encode.max_len, shape.max_positions, cfg.model.source
        )));
    }
    Ok(())
}

impl Prepared {
    /// Whether the run's examples are chat-rendered (conversation data or `template = chat`).
    pub fn uses_chat(&self) -> bool {
        // Every record of a dataset has the same format: the first one decides.
        self.dataset
            .records
            .first()
            .is_some_and(|s| self.encoder.uses_chat(s))
    }

    /// Generates an answer for each instruction prompt, in the form the run trains on: a user
    /// turn in the chat template, or the reference template with no input.
    pub fn generate_all(&self, model: &Llama) -> Result<Vec<Generation>> {
        self.cfg
            .prompts
            .iter()
            .map(|instr| {
                if self.uses_chat() {
                    let chat = self.encoder.require_chat()?;
                    let conv = Conversation::new(vec![Message::text(Role::User, instr.clone())]);
                    let (text, ids) = chat.prompt(&conv)?;
                    generate::generate_ids(
                        model,
                        chat.tokenizer(),
                        &text,
                        ids,
                        &self.eos_ids,
                        &self.cfg.generate,
                    )
                    .map(|g| Generation {
                        instruction: Some(instr.clone()),
                        ..g
                    })
                } else {
                    generate::generate(
                        model,
                        self.encoder.tokenizer(),
                        &prompt::prompt(instr, None),
                        &self.eos_ids,
                        &self.cfg.generate,
                    )
                }
            })
            .collect()
    }

    /// Writes the tokenizer beside an adapter, as PEFT/TRL users expect: `tokenizer.json`, and
    /// `tokenizer_config.json` whose `chat_template` is the template the run trained with, so
    /// inference renders prompts the way training did.
    pub fn write_tokenizer_files(&self, dir: &Path) -> Result<()> {
        let write = |name: &str, bytes: &[u8]| {
            crate::sys::write_atomic(&dir.join(name), bytes).map_err(|(p, e)| Error::io(p, e))
        };
        let tok = crate::input::read(
            &self.tokenizer_path,
            crate::input::TOKENIZER_CEILING,
            "a tokenizer.json",
        )?;
        write("tokenizer.json", &tok)?;
        let mut cfg = crate::data::encode::tokenizer_config(&self.tokenizer_path)?;
        if cfg.is_null() {
            cfg = serde_json::json!({});
        }
        if let (Some(chat), Some(obj)) = (
            self.encoder.chat().filter(|_| self.uses_chat()),
            cfg.as_object_mut(),
        ) {
            obj.insert(
                "chat_template".into(),
                serde_json::Value::String(chat.template().text().to_string()),
            );
        }
        crate::records::write_json(&dir.join("tokenizer_config.json"), &cfg)
    }

    /// The manifest of this run, whose base fingerprint is `base`.
    pub fn manifest(&self, base: &Fingerprint) -> Result<Manifest> {
        let sh = self.base.model.shape();
        Ok(Manifest {
            lorasft_version: env!("CARGO_PKG_VERSION").into(),
            git_commit: env!("LORASFT_GIT_COMMIT").into(),
            candle_version: env!("LORASFT_DEP_CANDLE_CORE").into(),
            tokenizers_version: env!("LORASFT_DEP_TOKENIZERS").into(),
            safetensors_version: env!("LORASFT_DEP_SAFETENSORS").into(),
            command: std::env::args().collect(),
            seed: self.cfg.run.seed,
            config_sha256: format!("{:x}", Sha256::digest(self.cfg.to_toml()?.as_bytes())),
            data_path: self.cfg.data.path.clone(),
            data_sha256: sha256_file(&self.cfg.data.path)?,
            tokenizer_path: self.tokenizer_path.clone(),
            tokenizer_sha256: sha256_file(&self.tokenizer_path)?,
            base_model: self.base.label.clone(),
            base_model_hub_id: self.base.base_ref.hub_id().map(str::to_string),
            model_shape: format!(
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
            ),
            base_weights_digest: base.digest(),
            base_format: self.base.model.base_format(),
            device: device::describe(self.base.model.device()),
            precision: self.cfg.run.precision.to_string(),
            cpu: crate::sys::cpu_name(),
            threads: candle_core::utils::get_num_threads(),
            cpu_kernels: device::cpu_kernels(),
            os: crate::sys::os_name(),
            host: crate::sys::host_name(),
            started_at: crate::sys::unix_time(),
            parallelism: crate::records::Parallelism::default(),
        })
    }

    /// The data record of this run.
    pub fn data_record(&self) -> DataRecord {
        let tok = self.encoder.tokenizer();
        let ids = self.encoder.special_ids();
        let first_sample = self.split.train.first().map(|&i| &self.dataset.records[i]);
        let first = first_sample
            .and_then(|s| self.encoder.text(s).ok())
            .unwrap_or_default();
        let marked = first_sample.and_then(|s| {
            let ex = self.encoder.encode(s).ok()?;
            crate::data::show::marked(&self.encoder, s, &ex, crate::data::show::Style::Brackets)
                .ok()
        });
        let chat = self.encoder.chat().filter(|_| self.uses_chat());
        DataRecord {
            path: self.cfg.data.path.clone(),
            records: self.dataset.records.len(),
            validation: self.cfg.data.validation,
            split: self.split.clone(),
            train_stats: self.train_stats.clone(),
            with_input: self
                .dataset
                .records
                .iter()
                .filter(|r| r.has_input())
                .count(),
            vocab: tok.get_vocab_size(true),
            eos: tok.id_to_token(ids.eos).unwrap_or_default(),
            pad: tok.id_to_token(ids.pad).unwrap_or_default(),
            example: first,
            format: self.dataset.format.to_string(),
            template: match chat {
                Some(c) => c.template().source().to_string(),
                None => "alpaca (the reference prompt)".into(),
            },
            template_sha256: chat.map(|c| c.template().sha256().to_string()),
            span_method: chat.map(|c| crate::chat::spans::method_for(c.template()).to_string()),
            marked_example: marked,
            val_skipped: self.val_skipped,
        }
    }

    /// The model-card body of an adapter after `steps` steps: a short summary of the run.
    pub fn card_body(&self, steps: usize, eval: Option<f64>) -> String {
        let c = &self.cfg;
        format!(
            "# LoRA adapter for {base}\n\nTrained by lorasft (run `{name}`): LoRA r {r}, alpha {alpha}, dropout {dropout} on {targets}; \
             {steps} optimizer steps of {bs}×{acc} examples at lr {lr} ({sched:?}), max length {max_len}, labels {labels:?}, seed {seed}. \
             Data: {data} ({n_train} train / {n_val} validation records). Final validation loss: {eval}.\n",
            base = self.base.label,
            name = c.run.name,
            r = c.lora.r,
            alpha = c.lora.alpha,
            dropout = c.lora.dropout,
            targets = adapter::target_names(&c.lora),
            bs = c.train.batch_size,
            acc = c.train.grad_accum,
            lr = c.optim.lr,
            sched = c.optim.schedule,
            max_len = c.encode.max_len,
            labels = c.encode.labels,
            seed = c.run.seed,
            data = c.data.path.display(),
            n_train = self.train.len(),
            n_val = self.val.len(),
            eval = eval.map_or("not measured".to_string(), |e| format!("{e:.4}")),
        )
    }
}

/// SHA-256 of a file's bytes, hex (streamed).
fn sha256_file(path: &Path) -> Result<String> {
    crate::input::sha256(path)
}
