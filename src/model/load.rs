//! Loading a base model: `config.json` plus `model.safetensors` or a sharded
//! `model.safetensors.index.json`, from a local directory or the Hugging Face hub cache.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device};

use crate::error::{Error, Result};
use crate::model::config::LlamaConfig;
use crate::model::llama::Llama;

/// The Hugging Face id of the model the reference run fine-tuned.
pub const DEFAULT_HUB_ID: &str = "TinyLlama/TinyLlama-1.1B-Chat-v1.0";

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A local directory in the Hugging Face layout.
    Dir(PathBuf),
    /// A hub id such as `TinyLlama/TinyLlama-1.1B-Chat-v1.0`, resolved through hf-hub's cache.
    Hub(String),
}

impl ModelSource {
    /// A local directory if `spec` looks like a path, else a hub id.
    ///
    /// A hub id is `name` or `owner/name`, so a `/` alone does not make a path. `spec` is a
    /// path when it exists locally, starts with `.`, `/`, `~` or a backslash, contains a
    /// backslash, has more than one `/`, or when its first component exists locally
    /// (`models/foo` with a `models/` beside you). A path that is not a directory is reported
    /// by [`resolve_config`] as "no such model directory", never looked up on the hub.
    pub fn parse(spec: &str) -> Self {
        if looks_like_path(spec) {
            ModelSource::Dir(PathBuf::from(spec))
        } else {
            ModelSource::Hub(spec.to_string())
        }
    }
}

/// The rule of [`ModelSource::parse`].
fn looks_like_path(spec: &str) -> bool {
    let p = Path::new(spec);
    p.exists()
        || spec.starts_with(['.', '/', '~', '\\'])
        || spec.contains('\\')
        || spec.matches('/').count() > 1
        || spec
            .split('/')
            .next()
            .is_some_and(|first| spec.contains('/') && Path::new(first).exists())
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelSource::Dir(p) => write!(f, "{}", p.display()),
            ModelSource::Hub(id) => write!(f, "hf://{id}"),
        }
    }
}

/// The files of a model on local disk.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// `config.json`.
    pub config: PathBuf,
    /// One or more safetensors files holding the weights.
    pub weights: Vec<PathBuf>,
}

/// Resolves the config file only (for `inspect --config-only`).
pub fn resolve_config(source: &ModelSource) -> Result<PathBuf> {
    match source {
        ModelSource::Dir(dir) if !dir.is_dir() => Err(Error::NoModelDir { path: dir.clone() }),
        ModelSource::Dir(dir) => existing(dir.join("config.json")),
        ModelSource::Hub(id) => hub_file(id, "config.json"),
    }
}

/// Resolves config and weight files, downloading hub files into the cache if allowed.
pub fn resolve(source: &ModelSource) -> Result<ModelFiles> {
    let config = resolve_config(source)?;
    let fetch = |name: &str| -> Result<PathBuf> {
        match source {
            ModelSource::Dir(dir) => existing(dir.join(name)),
            ModelSource::Hub(id) => hub_file(id, name),
        }
    };
    let index = fetch("model.safetensors.index.json");
    let weights = match index {
        Ok(index) => shard_files(&index)?
            .iter()
            .map(|f| fetch(f))
            .collect::<Result<Vec<_>>>()?,
        Err(_) => vec![fetch("model.safetensors")?],
    };
    Ok(ModelFiles { config, weights })
}

fn existing(p: PathBuf) -> Result<PathBuf> {
    if p.is_file() {
        Ok(p)
    } else {
        Err(Error::io(
            p,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        ))
    }
}

/// The distinct shard files named in a `model.safetensors.index.json`, in name order.
fn shard_files(index: &Path) -> Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let text = crate::input::read_text(index, crate::input::CONFIG_CEILING, "a safetensors index")?;
    let idx: Index = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: index.to_path_buf(),
        msg: e.to_string(),
    })?;
    for (tensor, file) in &idx.weight_map {
        if !is_plain_relative(file) {
            return Err(Error::Invalid(format!(
                "{}: weight_map entry `{tensor}` names {file:?}, which is not a plain file name \
                 inside the model directory (no `..`, no absolute path)",
                index.display()
            )));
        }
    }
    Ok(idx
        .weight_map
        .into_values()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect())
}

/// Whether a name one file gives for another stays inside its directory: relative, with only
/// normal components (no `..`, no root, no prefix). The file itself may still be a symlink
/// (the Hugging Face cache's snapshot files are), which is followed.
fn is_plain_relative(name: &str) -> bool {
    let p = Path::new(name);
    !name.is_empty()
        && p.components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
}

/// A file of a hub model: from the cache, else downloaded unless `HF_HUB_OFFLINE` is set.
fn hub_file(id: &str, file: &str) -> Result<PathBuf> {
    let cache = hf_hub::Cache::from_env();
    if let Some(p) = cache.model(id.to_string()).get(file) {
        return Ok(p);
    }
    let not_cached = |reason: String| Error::NotCached {
        id: id.to_string(),
        file: file.to_string(),
        cache: cache.path().clone(),
        reason,
    };
    if std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0") {
        return Err(not_cached("HF_HUB_OFFLINE is set".into()));
    }
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
        .with_progress(false)
        .build()
        .map_err(|e| not_cached(e.to_string()))?;
    api.model(id.to_string())
        .get(file)
        .map_err(|e| not_cached(e.to_string()))
}

/// What loading found besides the model itself.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Tensors present in the files that the model does not use (e.g. a tied lm_head).
    pub unused: Vec<String>,
    /// Storage dtypes found in the files, with tensor counts.
    pub file_dtypes: BTreeMap<String, usize>,
}

/// Loads a model, converting its weights to `dtype` (f32 by default upstream: bf16/f16 files
/// are upcast). Every tensor's shape is checked against the config before it is used.
pub fn load_model(
    source: &ModelSource,
    dtype: DType,
    dev: &Device,
) -> Result<(LlamaConfig, Llama, LoadReport)> {
    let files = resolve(source)?;
    let cfg = LlamaConfig::from_file(&files.config)?;
    let (model, report) = load_weights(&cfg, &files, dtype, dev)?;
    Ok((cfg, model, report))
}

/// Loads the weights of already-resolved files for a parsed config.
pub fn load_weights(
    cfg: &LlamaConfig,
    files: &ModelFiles,
    dtype: DType,
    dev: &Device,
) -> Result<(Llama, LoadReport)> {
    let shape = cfg.shape().map_err(|msg| Error::Config {
        path: files.config.clone(),
        msg,
    })?;
    for f in &files.weights {
        // A regular file (not a FIFO, device or directory) before it is mapped.
        crate::input::open(f)?;
        // Parse each header up front so a corrupt file is named precisely.
        // SAFETY: the file is mapped read-only and not modified while mapped.
        unsafe { MmapedSafetensors::new(f) }.map_err(|e| Error::Safetensors {
            path: f.clone(),
            msg: e.to_string(),
        })?;
    }
    // SAFETY: as above.
    let st =
        unsafe { MmapedSafetensors::multi(&files.weights) }.map_err(|e| Error::Safetensors {
            path: files.weights[0].clone(),
            msg: e.to_string(),
        })?;
    let where_ = if files.weights.len() == 1 {
        files.weights[0].clone()
    } else {
        files.config.with_file_name("model.safetensors.index.json")
    };
    let mut report = LoadReport::default();
    let mut used = BTreeSet::new();
    let model = Llama::from_tensors(shape, |name, expected| {
        let view = st.get(name).map_err(|_| Error::MissingTensor {
            path: where_.clone(),
            name: name.to_string(),
            expected: expected.to_vec(),
            against: files.config.display().to_string().into(),
        })?;
        if view.shape() != expected {
            return Err(Error::ShapeMismatch {
                path: where_.clone(),
                name: name.to_string(),
                expected: expected.to_vec(),
                found: view.shape().to_vec(),
                against: files.config.display().to_string().into(),
            });
        }
        let found = format!("{:?}", view.dtype());
        if !matches!(
            view.dtype(),
            safetensors::Dtype::F32
                | safetensors::Dtype::F16
                | safetensors::Dtype::BF16
                | safetensors::Dtype::F64
        ) {
            return Err(Error::BadDtype {
                path: where_.clone(),
                name: name.to_string(),
                found,
            });
        }
        *report.file_dtypes.entry(found).or_default() += 1;
        used.insert(name.to_string());
        Ok(st.load(name, dev)?.to_dtype(dtype)?)
    })?;
    report.unused = st
        .tensors()
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| !used.contains(n))
        .collect();
    report.unused.sort();
    Ok((model, report))
}
