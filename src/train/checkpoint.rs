//! Checkpoints: adapter, optimizer moments, RNG state and data position, written atomically
//! (a temporary directory renamed into place, then a `latest` pointer replaced by rename).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::adapter;
use crate::device::Precision;
use crate::error::{Error, Result};
use crate::model::Llama;
use crate::rng::Rng;
use crate::train::loss_scale::LossScaler;
use crate::train::optim::AdamW;
use crate::train::tensorboard::EventFileMark;

/// Where the loop stands: everything besides tensors that a resumed run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoopState {
    /// Optimizer steps done.
    pub step: usize,
    /// Current epoch (0-based).
    pub epoch: usize,
    /// Examples of the current epoch trained on (micro-batches are whole).
    pub cursor: usize,
    /// The dropout generator.
    pub dropout_rng: Rng,
    /// Best validation loss so far.
    pub best_eval: Option<f64>,
    /// Real tokens trained on so far.
    pub tokens_seen: u64,
    /// All token slots trained on so far, padding included.
    #[serde(default)]
    pub padded_tokens_seen: u64,
    /// Lines of metrics.jsonl written when the checkpoint was taken.
    pub metrics_lines: usize,
    /// Steps skipped because they had no trainable token.
    pub skipped_steps: usize,
    /// Steps whose gradient norm exceeded max_grad_norm and was clipped.
    #[serde(default)]
    pub clipped_steps: usize,
    /// The f16 loss scaler (disabled in fp32 and bf16).
    #[serde(default = "LossScaler::disabled")]
    pub loss_scaler: LossScaler,
    /// Steps skipped because the scaled gradients overflowed (f16).
    #[serde(default)]
    pub overflow_steps: usize,
    /// Where the TensorBoard event file stood (runs that write one; a resume cuts it back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensorboard: Option<EventFileMark>,
}

impl LoopState {
    /// The state before a fresh run's first step: dropout drawn from the run's seed, the loss
    /// scaler the precision needs, every count at zero.
    pub fn start(seed: u64, precision: Precision) -> Self {
        Self {
            step: 0,
            epoch: 0,
            cursor: 0,
            dropout_rng: Rng::derive(seed, "dropout"),
            best_eval: None,
            tokens_seen: 0,
            padded_tokens_seen: 0,
            metrics_lines: 0,
            skipped_steps: 0,
            clipped_steps: 0,
            loss_scaler: LossScaler::for_precision(precision),
            overflow_steps: 0,
            tensorboard: None,
        }
    }
}

/// Checkpoints kept on disk: the newest two, so a crash while writing one leaves another.
pub const KEEP_CHECKPOINTS: usize = 2;

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

/// The directory name of the checkpoint at `step`.
fn step_name(step: usize) -> String {
    format!("step-{step:06}")
}

/// Writes a checkpoint for `state` under `dir/checkpoints/step-NNNNNN`, moves `latest` to it,
/// and prunes (see [`prune`]). Durable in this order: every file of the checkpoint and its
/// directory are fsync'd before the rename into place, the parent after it, and `latest` is
/// written, fsync'd and renamed only then, so a power loss never leaves `latest` naming a torn
/// checkpoint. Returns the checkpoint's path.
pub fn save(
    dir: &Path,
    model: &Llama,
    opt: &AdamW,
    state: &LoopState,
    base: &adapter::BaseRef,
    keep: usize,
) -> Result<PathBuf> {
    let root = dir.join("checkpoints");
    std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
    let name = step_name(state.step);
    let tmp = root.join(format!("{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    write_contents(&tmp, model, opt, state, base)?;
    // The adapter's files were fsync'd as `adapter::save` wrote them; the two written here
    // are fsync'd now, then the directory that holds all of them.
    sync::file(&tmp.join("optimizer.safetensors"))?;
    sync::file(&tmp.join("state.json"))?;
    sync::dir(&tmp)?;
    crate::sys::crash_point("checkpoint-before-rename");
    let final_dir = root.join(&name);
    if final_dir.exists() {
        remove(&final_dir)?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    sync::dir(&root)?;
    crate::sys::crash_point("checkpoint-before-latest");
    point_latest(&root, Some(&name))?;
    prune(&root, state.step, keep)?;
    Ok(final_dir)
}

/// The adapter, the optimizer moments and the loop state, into `tmp`.
fn write_contents(
    tmp: &Path,
    model: &Llama,
    opt: &AdamW,
    state: &LoopState,
    base: &adapter::BaseRef,
) -> Result<()> {
    adapter::save(
        model,
        tmp,
        base,
        "Training checkpoint written by lorasft.\n",
    )?;
    let (step, m, v) = opt.state();
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (i, (a, b)) in m.iter().zip(v).enumerate() {
        tensors.insert(format!("m.{i}"), a.clone());
        tensors.insert(format!("v.{i}"), b.clone());
    }
    tensors.insert("step".into(), Tensor::new(&[step as i64], &Device::Cpu)?);
    candle_core::safetensors::save(&tensors, tmp.join("optimizer.safetensors"))?;
    let json = serde_json::to_string_pretty(state).map_err(|e| Error::Invalid(e.to_string()))?;
    write_file(&tmp.join("state.json"), json.as_bytes())
}

/// fsync with errors naming the path.
mod sync {
    use std::path::Path;

    use crate::error::{Error, Result};

    pub fn dir(p: &Path) -> Result<()> {
        crate::sys::sync_dir(p).map_err(|e| Error::io(p, e))
    }

    pub fn file(p: &Path) -> Result<()> {
        crate::sys::sync_file(p).map_err(|e| Error::io(p, e))
    }
}

/// Points `root/latest` at the checkpoint `name` durably, or removes it when `None`.
fn point_latest(root: &Path, name: Option<&str>) -> Result<()> {
    let latest = root.join("latest");
    let Some(name) = name else {
        if latest.exists() {
            std::fs::remove_file(&latest).map_err(|e| Error::io(&latest, e))?;
        }
        return sync::dir(root);
    };
    let latest_tmp = root.join("latest.tmp");
    write_file(&latest_tmp, name.as_bytes())?;
    sync::file(&latest_tmp)?;
    std::fs::rename(&latest_tmp, &latest).map_err(|e| Error::io(&latest, e))?;
    sync::dir(root)
}

/// The checkpoints under `root` (`step-NNNNNN`), with their steps, oldest first. A checkpoint
/// becomes `step-NNNNNN` only by the rename of its complete temporary directory and stops being
/// one by the rename that starts its removal ([`remove`]), so every one listed is complete.
fn checkpoints(root: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut all: Vec<(usize, PathBuf)> = std::fs::read_dir(root)
        .map_err(|e| Error::io(root, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?;
            let step = name.strip_prefix("step-")?.parse::<usize>().ok()?;
            Some((step, p))
        })
        .collect();
    all.sort();
    Ok(all)
}

/// Removes a checkpoint: first renamed out of the `step-NNNNNN` names (so a crash midway never
/// leaves a torn directory under a checkpoint's name), then deleted.
fn remove(path: &Path) -> Result<()> {
    let mut doomed = path.as_os_str().to_owned();
    doomed.push(".del");
    let doomed = PathBuf::from(doomed);
    std::fs::rename(path, &doomed).map_err(|e| Error::io(path, e))?;
    std::fs::remove_dir_all(&doomed).map_err(|e| Error::io(&doomed, e))
}

/// Keeps the newest `keep` checkpoints at or before `step` and removes every other one:
/// older ones, any after `step` (left by an attempt this run has resumed past), and the
/// leftovers of a write or removal a crash interrupted. Pruning by this run's step numbers
/// never deletes the checkpoint just written.
fn prune(root: &Path, step: usize, keep: usize) -> Result<()> {
    let all = checkpoints(root)?;
    let current = all.iter().filter(|(s, _)| *s <= step).count();
    for (i, (s, path)) in all.iter().enumerate() {
        if *s > step || i + keep.max(1) < current {
            remove(path)?;
        }
    }
    for entry in std::fs::read_dir(root).map_err(|e| Error::io(root, e))? {
        let path = entry.map_err(|e| Error::io(root, e))?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.starts_with("step-") && (name.ends_with(".tmp") || name.ends_with(".del")) {
            std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

/// Removes every checkpoint at or after `step` (their adapters are not trusted) and points
/// `latest` at the newest one left. Returns that checkpoint, if any.
pub fn roll_back(dir: &Path, step: usize) -> Result<Option<PathBuf>> {
    let root = dir.join("checkpoints");
    if !root.is_dir() {
        return Ok(None);
    }
    let all = checkpoints(&root)?;
    let good = all.iter().rfind(|(s, _)| *s < step).map(|(_, p)| p.clone());
    let name = good
        .as_ref()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned());
    // `latest` moves first: a crash during the removals leaves it on a good checkpoint.
    point_latest(&root, name.as_deref())?;
    for (_, path) in all.iter().filter(|(s, _)| *s >= step) {
        remove(path)?;
    }
    Ok(good)
}

/// The newest checkpoint of a run, if any.
pub fn latest(dir: &Path) -> Result<Option<PathBuf>> {
    let pointer = dir.join("checkpoints").join("latest");
    match std::fs::read_to_string(&pointer) {
        Ok(name) => {
            let p = dir.join("checkpoints").join(name.trim());
            if p.is_dir() {
                Ok(Some(p))
            } else {
                Err(Error::Invalid(format!(
                    "{}: points to {}, which does not exist",
                    pointer.display(),
                    p.display()
                )))
            }
        }
        Err(_) => Ok(None),
    }
}

/// Optimizer moments as saved: step count, first and second moments in variable order.
pub type OptimState = (u64, Vec<Tensor>, Vec<Tensor>);

/// Restores the adapter into `model` (new `Var`s: build the optimizer after this) and returns
/// the loop state and the optimizer state to restore.
pub fn load(ckpt: &Path, model: &mut Llama) -> Result<(LoopState, OptimState)> {
    adapter::load(model, ckpt)?;
    let opt_path = ckpt.join("optimizer.safetensors");
    crate::input::open(&opt_path)?;
    let tensors = candle_core::safetensors::load(&opt_path, &Device::Cpu).map_err(|e| {
        Error::Safetensors {
            path: opt_path.clone(),
            msg: e.to_string(),
        }
    })?;
    let n = model.lora_vars().len();
    let get = |k: String| {
        tensors
            .get(&k)
            .cloned()
            .ok_or_else(|| Error::MissingTensor {
                path: opt_path.clone(),
                name: k,
                expected: vec![],
                against: "the adapter it was saved with".into(),
            })
    };
    let dev = model.device().clone();
    let moments = |prefix: &str| {
        (0..n)
            .map(|i| Ok(get(format!("{prefix}.{i}"))?.to_device(&dev)?))
            .collect::<Result<Vec<_>>>()
    };
    let (m, v) = (moments("m")?, moments("v")?);
    let step = get("step".into())?
        .to_vec1::<i64>()?
        .first()
        .copied()
        .unwrap_or(0) as u64;
    let sp = ckpt.join("state.json");
    let text = crate::input::read_text(&sp, crate::input::CONFIG_CEILING, "a checkpoint state")?;
    let state = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: sp,
        msg: e.to_string(),
    })?;
    Ok((state, (step, m, v)))
}
