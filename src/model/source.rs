//! Model sources as a config or a flag names them, resolved to a loaded model: `fixture:SEED`
//! (the test fixture's shape), `fixture:SHAPE:SEED` (a benchmark shape), `gguf:PATH` (imported
//! once into `PATH.hf/`), a local directory, or a hub id. Also where a source's tokenizer and
//! end-of-sequence ids come from, so every command finds them the same way.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::adapter::{BaseRef, owned_hub_id};
use crate::error::{Error, Result};
use crate::gguf::Gguf;
use crate::model::config::LlamaConfig;
use crate::model::fixture::{BenchShape, FixtureSpec};
use crate::model::load::{self, ModelSource};
use crate::model::{Llama, gguf_import};

/// A base model resolved from a source string.
pub struct ResolvedModel {
    /// The model, in the dtype and on the device asked for.
    pub model: Llama,
    /// Its config.json contents.
    pub config: LlamaConfig,
    /// The directory holding config.json, weights and (usually) tokenizer.json.
    pub dir: Option<PathBuf>,
    /// How to name the base model in adapters and reports: the hub id or published name when
    /// one is known (GGUF `general.*` metadata, config.json `_name_or_path`), else the path.
    pub label: String,
    /// How an adapter trained on it names it: the hub id, or the directory's absolute path
    /// when it holds the weights, or nothing PEFT could load (a fixture).
    pub base_ref: BaseRef,
}

impl ResolvedModel {
    /// The tokenizer.json to use: `given`, else the model directory's.
    pub fn tokenizer_path(&self, given: Option<&Path>) -> Result<PathBuf> {
        match (given, &self.dir) {
            (Some(t), _) => Ok(t.to_path_buf()),
            (None, Some(d)) => Ok(d.join("tokenizer.json")),
            (None, None) => Err(Error::Invalid(format!(
                "model {} has no directory: name a tokenizer (model.tokenizer, --tokenizer)",
                self.label
            ))),
        }
    }

    /// Token ids that end generation: the tokenizer's EOS and the config's `eos_token_id`s,
    /// sorted and without repeats.
    pub fn eos_ids(&self, tokenizer_eos: u32) -> Vec<u32> {
        let mut ids = vec![tokenizer_eos];
        if let Some(more) = &self.config.eos_token_id {
            ids.extend(more.to_vec());
        }
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// Builds a `fixture:` source: `fixture:SEED` or `fixture:SHAPE:SEED`.
fn fixture(source: &str, rest: &str, dev: &Device, dtype: DType) -> Result<ResolvedModel> {
    let (spec, seed) = match rest.split_once(':') {
        None => (FixtureSpec::default(), rest),
        Some((shape, seed)) => {
            let shape = <BenchShape as clap::ValueEnum>::from_str(shape, true).map_err(|_| {
                Error::Invalid(format!(
                    "model source {source:?}: the shape must be tiny, smollm2 or tinyllama"
                ))
            })?;
            (shape.spec(), seed)
        }
    };
    let seed: u64 = seed.parse().map_err(|_| {
        Error::Invalid(format!(
            "model source {source:?}: the seed must be an integer"
        ))
    })?;
    Ok(ResolvedModel {
        model: spec.build(seed, dtype, dev)?,
        config: spec.config(),
        dir: None,
        label: source.to_string(),
        base_ref: BaseRef::Unloadable { hub_id: None },
    })
}

/// Imports `gguf:PATH` into `PATH.hf/` unless a complete import is already there.
fn imported_gguf(path: &str) -> Result<ModelSource> {
    let gguf = PathBuf::from(path);
    let dir = gguf.with_extension("hf");
    if !["config.json", "model.safetensors", "tokenizer.json"]
        .iter()
        .all(|f| dir.join(f).exists())
    {
        eprintln!("importing {} into {} ...", gguf.display(), dir.display());
        gguf_import::import(&gguf, &dir)?;
    } else {
        gguf_import::refresh_tokenizer_config(&Gguf::read(&gguf)?, &dir)?;
    }
    Ok(ModelSource::Dir(dir))
}

/// A `gguf:PATH` source with its projections kept quantized. Only config.json and
/// tokenizer.json are written to `PATH.hf/` (when absent): the weights come from the file.
fn quantized_gguf(source: &str, dev: &Device, dtype: DType) -> Result<ResolvedModel> {
    let Some(path) = source.strip_prefix("gguf:") else {
        return Err(Error::Invalid(format!(
            "model.keep_quantized (--keep-quantized) needs a `gguf:PATH` model source, \
             got {source:?}"
        )));
    };
    let g = Gguf::read(Path::new(path))?;
    let (config, model) = gguf_import::load_quantized_on(&g, dev, dtype)?;
    let dir = PathBuf::from(path).with_extension("hf");
    if !dir.join("tokenizer.json").exists() || !dir.join("config.json").exists() {
        gguf_import::write_config_and_tokenizer(&g, &config, &dir)?;
    } else {
        gguf_import::refresh_tokenizer_config(&g, &dir)?;
    }
    let label = gguf_import::model_name(&g);
    let hub_id = owned_hub_id(&label).map(str::to_string);
    // The computed values equal the f32 import's, so a full import beside it is the base.
    let base_ref = if dir.join("model.safetensors").exists() {
        local_dir(&dir, hub_id)?
    } else {
        BaseRef::Unloadable { hub_id }
    };
    Ok(ResolvedModel {
        model,
        config,
        dir: Some(dir),
        label,
        base_ref,
    })
}

/// Loads a model source in `dtype` on `dev`.
pub fn resolve_model(source: &str, dev: &Device, dtype: DType) -> Result<ResolvedModel> {
    resolve_model_with(source, dev, dtype, false)
}

/// [`resolve_model`], with the frozen projections of a `gguf:` source kept quantized when
/// `keep_quantized` (`model.keep_quantized`); that needs a `gguf:` source, and f32 on the CPU.
pub fn resolve_model_with(
    source: &str,
    dev: &Device,
    dtype: DType,
    keep_quantized: bool,
) -> Result<ResolvedModel> {
    if keep_quantized {
        return quantized_gguf(source, dev, dtype);
    }
    if let Some(rest) = source.strip_prefix("fixture:") {
        return fixture(source, rest, dev, dtype);
    }
    let gguf_path = source.strip_prefix("gguf:");
    let source = match gguf_path {
        Some(path) => imported_gguf(path)?,
        None => ModelSource::parse(source),
    };
    let (config, model, _) = load::load_model(&source, dtype, dev)?;
    let (dir, label, base_ref) = match &source {
        // The name the model was published under, when the file or config.json records one:
        // model cards name the hub model, not a local cache path.
        ModelSource::Dir(d) => {
            // An import records the GGUF's name as `_name_or_path`; a directory imported
            // before it did is named from the file's header.
            let published = match config.name_or_path.clone().filter(|n| !n.trim().is_empty()) {
                Some(name) => Some(name),
                None => match gguf_path {
                    Some(path) => Some(gguf_import::model_name(&Gguf::read(Path::new(path))?)),
                    None => None,
                },
            };
            let hub_id = published
                .as_deref()
                .and_then(owned_hub_id)
                .map(str::to_string);
            let label = published.unwrap_or_else(|| d.display().to_string());
            (Some(d.clone()), label, local_dir(d, hub_id)?)
        }
        ModelSource::Hub(id) => (
            load::resolve_config(&source)?
                .parent()
                .map(Path::to_path_buf),
            id.clone(),
            BaseRef::Hub(id.clone()),
        ),
    };
    Ok(ResolvedModel {
        model,
        config,
        dir,
        label,
        base_ref,
    })
}

/// A local model directory as an adapter names it: its absolute path, as PEFT writes it for
/// a model loaded from a directory (symbolic links are kept as the run named them).
fn local_dir(dir: &Path, hub_id: Option<String>) -> Result<BaseRef> {
    let path = std::path::absolute(dir).map_err(|e| Error::io(dir, e))?;
    Ok(BaseRef::Dir { path, hub_id })
}
