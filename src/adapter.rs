//! Adapters in PEFT's on-disk format: `adapter_model.safetensors` (keys
//! `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`, A (r, in), B (out, r)),
//! `adapter_config.json`, and a model card `README.md` whose YAML front matter matches the
//! reference's. Adapters written by Python PEFT load here, and ours load there.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::config::Projection;
use crate::model::{Llama, LoraConfig};

/// How an adapter names its base model: `adapter_config.json`'s `base_model_name_or_path`
/// must be something PEFT can load (`AutoPeftModelForCausalLM.from_pretrained(adapter)`
/// reads it), and the model card's `base_model` must be a hub id or absent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaseRef {
    /// A Hugging Face hub repository id: PEFT downloads the base by it.
    Hub(String),
    /// A local Hugging Face-layout directory holding config.json and the weights, by its
    /// absolute path (what PEFT writes for a local model), with the hub id it was published
    /// under when its config.json or GGUF names one.
    Dir {
        /// The directory, absolute.
        path: PathBuf,
        /// Its hub repository id, when known.
        hub_id: Option<String>,
    },
    /// Nothing PEFT could load: a generated fixture (`fixture:N`) has no directory, and a
    /// GGUF kept quantized without a full import has no weights in Hugging Face layout.
    /// `base_model_name_or_path` is then null.
    Unloadable {
        /// The hub repository id, when known.
        hub_id: Option<String>,
    },
}

impl BaseRef {
    /// `adapter_config.json`'s `base_model_name_or_path`: the hub id or the directory.
    pub fn name_or_path(&self) -> Option<String> {
        match self {
            BaseRef::Hub(id) => Some(id.clone()),
            BaseRef::Dir { path, .. } => Some(path.display().to_string()),
            BaseRef::Unloadable { .. } => None,
        }
    }

    /// The model card's `base_model`: a hub repository id, when one is known.
    pub fn hub_id(&self) -> Option<&str> {
        match self {
            BaseRef::Hub(id) => Some(id),
            BaseRef::Dir { hub_id, .. } | BaseRef::Unloadable { hub_id } => hub_id.as_deref(),
        }
    }
}

/// `name` when it is a hub repository id with an owner (`owner/name`, the characters and
/// rules the hub allows): a published name that can stand as a model card's `base_model`.
/// Display names (`Smollm2 135M 8k`) and paths are not.
pub fn owned_hub_id(name: &str) -> Option<&str> {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !p.starts_with(['-', '.'])
            && !p.ends_with(['-', '.'])
            && !p.contains("--")
            && !p.contains("..")
    };
    let (owner, repo) = name.split_once('/')?;
    (name.len() <= 96 && part_ok(owner) && part_ok(repo)).then_some(name)
}

/// PEFT's `target_modules`: a list of module names or a single string (`all-linear`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Module names.
    List(Vec<String>),
    /// `all-linear` (regexes are not supported).
    One(String),
}

/// `adapter_config.json`, with the keys PEFT writes; unknown keys are ignored on load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// Always "LORA".
    pub peft_type: String,
    /// Always "CAUSAL_LM".
    pub task_type: Option<String>,
    /// Rank.
    pub r: usize,
    /// Alpha.
    pub lora_alpha: f64,
    /// Dropout on the LoRA branch.
    pub lora_dropout: f64,
    /// Adapted modules, sorted.
    pub target_modules: TargetModules,
    /// Only "none" is supported.
    pub bias: String,
    /// Always false for Llama linears.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// rsLoRA scaling.
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA: not supported, must be false.
    #[serde(default)]
    pub use_dora: bool,
    /// The base model's hub id or path.
    pub base_model_name_or_path: Option<String>,
    /// True for a saved adapter.
    #[serde(default)]
    pub inference_mode: bool,
    /// PEFT's init flag, kept for compatibility.
    #[serde(default = "yes")]
    pub init_lora_weights: serde_json::Value,
    /// Per-module ranks: not supported, must be empty.
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, serde_json::Value>,
    /// Per-module alphas: not supported, must be empty.
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, serde_json::Value>,
    /// Modules trained in full alongside the adapter: not supported, must be null or empty.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Restricting layers: not supported, must be null.
    #[serde(default)]
    pub layers_to_transform: Option<serde_json::Value>,
    /// The PEFT version that wrote the file, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peft_version: Option<String>,
}

fn yes() -> serde_json::Value {
    serde_json::Value::Bool(true)
}

impl AdapterConfig {
    /// The config PEFT would write for `lora` on the base model `base` names (a hub id or
    /// a directory; `None` when there is nothing PEFT could load).
    pub fn from_lora(lora: &LoraConfig, base: Option<&str>) -> Self {
        Self {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            r: lora.r,
            lora_alpha: lora.alpha,
            lora_dropout: lora.dropout,
            target_modules: TargetModules::List(
                lora.targets.iter().map(|p| p.name().to_string()).collect(),
            ),
            bias: "none".into(),
            fan_in_fan_out: false,
            use_rslora: lora.use_rslora,
            use_dora: false,
            base_model_name_or_path: base.map(str::to_string),
            inference_mode: true,
            init_lora_weights: yes(),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            modules_to_save: None,
            layers_to_transform: None,
            peft_version: None,
        }
    }

    /// The LoRA config this adapter stands for; refuses what lorasft does not implement.
    pub fn lora(&self, path: &Path) -> Result<LoraConfig> {
        let bad = |msg: String| Error::AdapterConfig {
            path: path.to_path_buf(),
            msg,
        };
        if self.peft_type != "LORA" {
            return Err(bad(format!("peft_type {:?} is not LORA", self.peft_type)));
        }
        if self.bias != "none" {
            return Err(bad(format!(
                "bias {:?} is not supported (only \"none\")",
                self.bias
            )));
        }
        if self.use_dora
            || self.fan_in_fan_out
            || !self.rank_pattern.is_empty()
            || !self.alpha_pattern.is_empty()
        {
            return Err(bad(
                "DoRA, fan_in_fan_out, rank_pattern and alpha_pattern are not supported".into(),
            ));
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty())
            || self
                .layers_to_transform
                .as_ref()
                .is_some_and(|v| !v.is_null())
        {
            return Err(bad(
                "modules_to_save and layers_to_transform are not supported".into(),
            ));
        }
        let targets = match &self.target_modules {
            TargetModules::List(l) => LoraConfig::parse_targets(&l.join(",")),
            TargetModules::One(s) => LoraConfig::parse_targets(s),
        }
        .map_err(|e| in_file(path, e))?;
        let lora = LoraConfig {
            r: self.r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            targets,
            use_rslora: self.use_rslora,
        };
        lora.validate().map_err(|e| in_file(path, e))?;
        Ok(lora)
    }
}

/// A LoRA config error found in the file at `path`, as an error that names the file.
fn in_file(path: &Path, e: Error) -> Error {
    match e {
        Error::LoraConfig(msg) => Error::AdapterConfig {
            path: path.to_path_buf(),
            msg,
        },
        other => other,
    }
}

/// The model card's YAML front matter, key for key as the reference's. `base_model` and its
/// `base_model:adapter:` tag are there only for a hub id: the hub reads them as a model id,
/// so a display name or a local path would be a broken link.
pub fn model_card_front_matter(hub_id: Option<&str>) -> String {
    match hub_id {
        Some(id) => format!(
            "---\nbase_model: {id}\nlibrary_name: peft\npipeline_tag: text-generation\ntags:\n- base_model:adapter:{id}\n- lora\n- transformers\n---\n"
        ),
        None => "---\nlibrary_name: peft\npipeline_tag: text-generation\ntags:\n- lora\n- transformers\n---\n".into(),
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::sys::write_atomic(path, bytes).map_err(|(p, e)| Error::io(p, e))
}

/// Saves the model's adapters in PEFT's format into `dir`, naming the base as `base` says,
/// with a model card whose body is `card_body` (markdown). Every file is written atomically.
pub fn save(model: &Llama, dir: &Path, base: &BaseRef, card_body: &str) -> Result<()> {
    let lora = model
        .lora_config()
        .ok_or_else(|| Error::Invalid("the model has no adapters to save".into()))?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tensors: Vec<(String, Tensor)> = model
        .lora_vars()
        .into_iter()
        .map(|(n, v)| Ok((n, v.as_tensor().to_dtype(DType::F32)?)))
        .collect::<Result<_>>()?;
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let st_tmp = dir.join("adapter_model.safetensors.tmp");
    safetensors::serialize_to_file(
        tensors.iter().map(|(n, t)| (n.as_str(), t)),
        Some(meta),
        &st_tmp,
    )
    .map_err(|e| Error::Safetensors {
        path: st_tmp.clone(),
        msg: e.to_string(),
    })?;
    let st = dir.join("adapter_model.safetensors");
    crate::sys::sync_file(&st_tmp).map_err(|e| Error::io(&st_tmp, e))?;
    std::fs::rename(&st_tmp, &st).map_err(|e| Error::io(&st, e))?;
    let name_or_path = base.name_or_path();
    let cfg =
        serde_json::to_string_pretty(&AdapterConfig::from_lora(lora, name_or_path.as_deref()))
            .map_err(|e| Error::Invalid(e.to_string()))?;
    write_atomic(&dir.join("adapter_config.json"), (cfg + "\n").as_bytes())?;
    let card = format!("{}\n{card_body}", model_card_front_matter(base.hub_id()));
    write_atomic(&dir.join("README.md"), card.as_bytes())
}

/// Reads `adapter_config.json` from an adapter directory.
pub fn read_config(dir: &Path) -> Result<(AdapterConfig, LoraConfig)> {
    let path = dir.join("adapter_config.json");
    let text = crate::input::read_text(
        &path,
        crate::input::CONFIG_CEILING,
        "an adapter_config.json",
    )?;
    let cfg: AdapterConfig = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    let lora = cfg.lora(&path)?;
    Ok((cfg, lora))
}

/// [`load`] onto the model `base` names (a source such as `fixture:0` or a directory): an
/// adapter whose tensors do not fit is refused naming both the adapter and the model.
pub fn load_onto(model: &mut Llama, dir: &Path, base: &str) -> Result<AdapterConfig> {
    // Errors of one input (unreadable or malformed files) stand as they are; the rest are
    // the adapter and the model disagreeing.
    load(model, dir).map_err(|e| match e {
        Error::Io { .. }
        | Error::Json { .. }
        | Error::AdapterConfig { .. }
        | Error::Safetensors { .. } => e,
        other => Error::Invalid(format!(
            "adapter {} does not fit model {base}: {other}",
            dir.display()
        )),
    })
}

/// Attaches the adapter in `dir` to `model` (replacing any), checking every tensor's name
/// and shape. Accepts PEFT's key spellings with or without the `.default` adapter name.
pub fn load(model: &mut Llama, dir: &Path) -> Result<AdapterConfig> {
    let (cfg, lora) = read_config(dir)?;
    model.add_lora(&lora, 0)?;
    let path = dir.join("adapter_model.safetensors");
    let bytes = crate::input::read(&path, crate::input::ADAPTER_CEILING, "adapter weights")?;
    let file = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::Safetensors {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    let mut found: HashMap<String, String> = file
        .names()
        .into_iter()
        .map(|n| (n.replace(".default.weight", ".weight"), n.to_string()))
        .collect();
    for (name, var) in model.lora_vars() {
        let key = found.remove(&name).ok_or_else(|| Error::MissingTensor {
            path: path.clone(),
            name: name.clone(),
            expected: var.dims().to_vec(),
            against: "the model it is loaded onto".into(),
        })?;
        let view = file.tensor(&key).map_err(|e| Error::Safetensors {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        if view.shape() != var.dims() {
            return Err(Error::ShapeMismatch {
                path: path.clone(),
                name,
                expected: var.dims().to_vec(),
                found: view.shape().to_vec(),
                against: "the model it is loaded onto".into(),
            });
        }
        let t = candle_core::safetensors::Load::load(&view, var.device())?.to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    if let Some(extra) = found.keys().next() {
        return Err(Error::Invalid(format!(
            "{}: tensor `{extra}` matches no adapted module of this model (adapter and base disagree)",
            path.display()
        )));
    }
    Ok(cfg)
}

/// Names of adapted modules, for messages: `q_proj, v_proj`.
pub fn target_names(lora: &LoraConfig) -> String {
    lora.targets
        .iter()
        .map(|p: &Projection| p.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Writes a merged model (adapters folded into the weights) as a Hugging Face directory:
/// config.json and model.safetensors, plus the tokenizer files found beside the base.
///
/// The directory is built under a temporary name and renamed into place when complete (see
/// [`crate::output`]): a kill leaves no half-filled directory under `out`.
pub fn export_merged(model: &Llama, config_json: &Path, out: &Path) -> Result<()> {
    let staged = crate::output::Staged::dir(out)?;
    let dir = staged.path();
    let tensors: HashMap<String, Tensor> = model.merged_tensors()?.into_iter().collect();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    std::fs::copy(config_json, dir.join("config.json")).map_err(|e| Error::io(config_json, e))?;
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        let src = config_json.with_file_name(f);
        if src.exists() {
            std::fs::copy(&src, dir.join(f)).map_err(|e| Error::io(&src, e))?;
        }
    }
    staged.commit()
}
