//! The user cache: one directory for the assets lorasft downloads (the demo's GGUF and
//! datasets) and for the imports it makes of them, wherever the user stands, as the Hugging
//! Face tools keep theirs. `$LORASFT_CACHE` when set, else the platform's cache directory
//! (`$XDG_CACHE_HOME/lorasft` or `~/.cache/lorasft` on Linux, `~/Library/Caches/lorasft` on
//! macOS). Its layout is `scripts/fetch-assets.sh`'s (`smollm2/`, `data/`, `vocab/`, `chat/`,
//! `dl/`), so the script's `.cache/assets` can serve as the cache and the reverse.

use std::ffi::OsString;
use std::path::PathBuf;

/// The environment variable that names the cache directory.
pub const ENV: &str = "LORASFT_CACHE";

/// The cache's name under the platform cache directory.
pub const NAME: &str = "lorasft";

/// Where the cache is when no platform cache directory is known (no `HOME`): relative to the
/// working directory, as the presets used to be.
pub const FALLBACK: &str = ".cache/lorasft";

/// The cache directory of this process: `$LORASFT_CACHE`, else the platform's.
pub fn dir() -> PathBuf {
    dir_from(std::env::var_os(ENV), dirs::cache_dir())
}

/// The cache directory given the value of `$LORASFT_CACHE` and the platform cache directory:
/// a set, non-empty variable wins; an empty one counts as unset (as shells leave them).
pub fn dir_from(lorasft_cache: Option<OsString>, platform: Option<PathBuf>) -> PathBuf {
    match lorasft_cache.filter(|v| !v.is_empty()) {
        Some(v) => PathBuf::from(v),
        None => platform.map_or_else(|| PathBuf::from(FALLBACK), |p| p.join(NAME)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variable_wins_then_the_platform_directory_then_the_fallback() {
        let platform = || Some(PathBuf::from("/home/u/.cache"));
        assert_eq!(
            dir_from(Some("/data/lc".into()), platform()),
            PathBuf::from("/data/lc")
        );
        assert_eq!(
            dir_from(None, platform()),
            PathBuf::from("/home/u/.cache/lorasft")
        );
        assert_eq!(
            dir_from(Some(OsString::new()), platform()),
            PathBuf::from("/home/u/.cache/lorasft"),
            "an empty variable is unset"
        );
        assert_eq!(dir_from(None, None), PathBuf::from(FALLBACK));
    }
}
