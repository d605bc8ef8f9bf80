//! A run directory owned by one run. The run holds an OS advisory lock on `DIR/.lock` (std's
//! `File::try_lock`: `flock` on Linux, released by the OS when the process dies, even by
//! `kill -9`) for its whole life, with its PID written inside so a second run can name the
//! holder. A fresh run refuses a directory that holds another run's files unless asked to
//! overwrite it, which removes the files a run writes (and nothing else the user keeps there);
//! `--resume` continues what is there. The directory is never removed: a run that loses the
//! lock race leaves the winner's directory alone.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::records::files;

/// The lock file's name inside a run directory.
pub const LOCK: &str = ".lock";

/// Entries that make a directory a run's: any of them means another run wrote here.
const RUN_ENTRIES: &[&str] = &[
    files::CONFIG,
    files::MANIFEST,
    files::METRICS,
    files::SUMMARY,
    "checkpoints",
    "adapter",
    "best",
    crate::train::tensorboard::DIR,
];

/// Everything a run writes, which `--overwrite` removes; anything else in the directory is
/// the user's and stays.
const RUN_FILES: &[&str] = &[
    files::CONFIG,
    files::MANIFEST,
    files::METRICS,
    files::SUMMARY,
    files::DATA,
    files::CHECKS,
    files::GENERATIONS,
    files::GENERATIONS_BEFORE,
    files::RESUMES,
    "checkpoints",
    "adapter",
    "best",
    "REPORT.md",
    "REPORT-loss.svg",
    "REPORT-lr.svg",
    crate::train::tensorboard::DIR,
];

/// How a run means to use its directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// A new run: the directory must hold no other run's files, or be cleared first.
    Fresh {
        /// Clear another run's files instead of refusing.
        overwrite: bool,
    },
    /// Continue the run that is there.
    Resume,
}

/// A run directory this process holds the lock of (released on drop).
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    _lock: File,
}

impl RunDir {
    /// Creates (if needed) and locks `path` for one run. Fails at once when another process
    /// holds the lock, naming its PID; a fresh claim on a directory with another run's files
    /// fails naming them unless `overwrite`, which removes them first.
    pub fn claim(path: &Path, claim: Claim) -> Result<Self> {
        std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))?;
        let lock = lock(path)?;
        if let Claim::Fresh { overwrite } = claim {
            let held = run_entries(path);
            if !held.is_empty() {
                if !overwrite {
                    return Err(Error::Invalid(format!(
                        "{}: holds another run ({}); continue it with --resume, or replace it with --overwrite",
                        path.display(),
                        held.join(", ")
                    )));
                }
                clear(path)?;
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            _lock: lock,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The run entries present in `dir`.
fn run_entries(dir: &Path) -> Vec<String> {
    RUN_ENTRIES
        .iter()
        .filter(|e| dir.join(e).exists())
        .map(|e| e.to_string())
        .collect()
}

/// Removes the files a run writes (and their temporaries) from `dir`; nothing else.
fn clear(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let ours = RUN_FILES
            .iter()
            .any(|f| name == *f || (name.starts_with(f) && name.ends_with(".tmp")));
        if !ours {
            continue;
        }
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

/// Takes the exclusive lock of `dir` and writes this process's PID into it.
fn lock(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            let holder = match holder.trim() {
                "" => "pid not yet written".to_string(),
                pid => format!("pid {pid}"),
            };
            return Err(Error::Invalid(format!(
                "{}: another lorasft run ({holder}) is using this run directory; wait for it to finish or choose another run.name",
                dir.display()
            )));
        }
        Err(TryLockError::Error(e)) => return Err(Error::io(&path, e)),
    }
    file.set_len(0).map_err(|e| Error::io(&path, e))?;
    write!(file, "{}", std::process::id()).map_err(|e| Error::io(&path, e))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_claim_fails_naming_the_holder_and_the_lock_dies_with_the_claim() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        let first = RunDir::claim(&dir, Claim::Fresh { overwrite: false }).unwrap();
        let err = RunDir::claim(&dir, Claim::Resume).unwrap_err().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())) && err.contains("run"),
            "{err}"
        );
        drop(first);
        RunDir::claim(&dir, Claim::Resume).unwrap();
    }

    #[test]
    fn a_fresh_claim_refuses_another_runs_files_unless_overwriting() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        std::fs::create_dir_all(dir.join("checkpoints/step-000060")).unwrap();
        std::fs::write(dir.join(files::METRICS), "{}\n").unwrap();
        let err = RunDir::claim(&dir, Claim::Fresh { overwrite: false })
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("metrics.jsonl, checkpoints") && err.contains("--overwrite"),
            "{err}"
        );
        assert!(
            dir.join(files::METRICS).exists(),
            "a refused claim deletes nothing"
        );
        std::fs::write(dir.join("notes.txt"), "mine").unwrap();
        let held = RunDir::claim(&dir, Claim::Fresh { overwrite: true }).unwrap();
        assert!(!dir.join("checkpoints").exists() && !dir.join(files::METRICS).exists());
        assert!(
            dir.join("notes.txt").exists(),
            "--overwrite removes only a run's files"
        );
        assert_eq!(held.path(), dir.as_path());
    }
}
