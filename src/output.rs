//! Writing outputs that cannot lie: a file or directory the program produces outside a run
//! directory (an exported GGUF, a merged or imported model, encoded data, a report) appears
//! under its final name only when it is complete.
//!
//! Each output is built under a temporary name beside its target (`.NAME.lorasft-partial-PID`,
//! on the same filesystem, so the final step is a rename), fsync'd, and renamed into place;
//! then the parent directory is fsync'd. A kill at any moment leaves either the old target or
//! the complete new one, never a truncated file or a half-filled directory under the final
//! name. A directory replaces an earlier one by an atomic exchange (`renameat2` with
//! `RENAME_EXCHANGE` on Linux; elsewhere two renames, with the old one kept aside until the new
//! one is in place), and only when the earlier one holds nothing the new output would not
//! rewrite: files of the user's own are never deleted.
//!
//! A temporary left by a killed process is found and removed by the next write to the same
//! target (its process id is checked to be gone first), which says so on stderr. A failed
//! write removes its own temporary.
//!
//! Hand-written because the well-kept crates cover files only (`tempfile`'s `persist`,
//! `atomic-write-file`), and directories need the same rule.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The marker in a temporary's name, between the target's name and the writer's process id.
const MARK: &str = ".lorasft-partial-";

/// An output being built under a temporary name beside its target; [`Staged::commit`] puts
/// it in place. Dropped uncommitted (an error on the way), the temporary is removed.
#[derive(Debug)]
pub struct Staged {
    target: PathBuf,
    tmp: PathBuf,
    is_dir: bool,
    committed: bool,
}

impl Staged {
    /// A file output: write it at [`Staged::path`], then commit. The target's directory must
    /// exist (a mistyped folder is an error, not a new tree of directories).
    pub fn file(target: &Path) -> Result<Self> {
        Self::new(target, false)
    }

    /// A directory output: an empty temporary directory to fill at [`Staged::path`], then
    /// commit. Missing parent directories are created.
    pub fn dir(target: &Path) -> Result<Self> {
        let s = Self::new(target, true)?;
        std::fs::create_dir(&s.tmp).map_err(|e| Error::io(&s.tmp, e))?;
        Ok(s)
    }

    fn new(target: &Path, is_dir: bool) -> Result<Self> {
        let name = target.file_name().ok_or_else(|| {
            Error::Invalid(format!(
                "{}: an output path must end in a file or directory name",
                target.display()
            ))
        })?;
        refuse_other_kind(target, is_dir)?;
        let parent = parent_of(target);
        if is_dir {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        } else if !parent.is_dir() {
            return Err(Error::Invalid(format!(
                "{}: its directory {} does not exist",
                target.display(),
                parent.display()
            )));
        }
        sweep_stale(parent, &name.to_string_lossy());
        let tmp = parent.join(format!(
            ".{}{MARK}{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        // A temporary of this very process (an earlier failed attempt) is replaced.
        remove_any(&tmp);
        Ok(Self {
            target: target.to_path_buf(),
            tmp,
            is_dir,
            committed: false,
        })
    }

    /// Where to write the output until it is committed.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// The final name.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// fsyncs the output and renames it into place (replacing an earlier output), then fsyncs
    /// the parent directory.
    pub fn commit(mut self) -> Result<()> {
        // The worst moment to die: everything written, nothing renamed (the kill tests).
        crate::sys::crash_point("output-commit");
        if self.is_dir {
            sync_tree(&self.tmp)?;
            self.replace_dir()?;
        } else {
            crate::sys::sync_file(&self.tmp).map_err(|e| Error::io(&self.tmp, e))?;
            // Checked again: the target may have appeared while the output was written.
            refuse_other_kind(&self.target, false)?;
            std::fs::rename(&self.tmp, &self.target).map_err(|e| Error::io(&self.target, e))?;
        }
        self.committed = true;
        let parent = parent_of(&self.target);
        crate::sys::sync_dir(parent).map_err(|e| Error::io(parent, e))
    }

    /// Puts the finished temporary directory at the target: a rename when the target is
    /// absent, an exchange when it holds an earlier output of the same files.
    fn replace_dir(&mut self) -> Result<()> {
        let meta = match std::fs::symlink_metadata(&self.target) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return std::fs::rename(&self.tmp, &self.target)
                    .map_err(|e| Error::io(&self.target, e));
            }
            Err(e) => return Err(Error::io(&self.target, e)),
            Ok(m) => m,
        };
        if !meta.is_dir() {
            refuse_other_kind(&self.target, true)?;
        }
        let foreign = foreign_entries(&self.target, &self.tmp)?;
        if !foreign.is_empty() {
            return Err(Error::Invalid(format!(
                "{}: exists and holds files this output would not replace ({}); remove them or \
                 choose another output directory",
                self.target.display(),
                foreign.join(", ")
            )));
        }
        exchange(&self.tmp, &self.target)?;
        // The temporary name now holds the earlier output.
        std::fs::remove_dir_all(&self.tmp).map_err(|e| Error::io(&self.tmp, e))
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            remove_any(&self.tmp);
        }
    }
}

/// Writes `bytes` to `target` through a [`Staged`] file.
pub fn write(target: &Path, bytes: &[u8]) -> Result<()> {
    let staged = Staged::file(target)?;
    std::fs::write(staged.path(), bytes).map_err(|e| Error::io(staged.path(), e))?;
    staged.commit()
}

/// Refuses a target that exists as something this output cannot replace: a FIFO, socket or
/// device (never renamed over), a directory where a file goes or a file where a directory goes.
fn refuse_other_kind(target: &Path, is_dir: bool) -> Result<()> {
    let Ok(meta) = std::fs::metadata(target) else {
        return Ok(());
    };
    let t = meta.file_type();
    let what = if t.is_file() {
        "a regular file".to_string()
    } else if t.is_dir() {
        "a directory".to_string()
    } else {
        format!("{} (a special file)", crate::input::kind(&t))
    };
    let fits = if is_dir { t.is_dir() } else { t.is_file() };
    if fits {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "{}: exists and is {what}, which this output would not replace; remove it or choose \
         another {}",
        target.display(),
        if is_dir { "directory" } else { "file name" }
    )))
}

fn parent_of(p: &Path) -> &Path {
    p.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

fn remove_any(p: &Path) {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(p);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(p);
        }
        Err(_) => {}
    }
}

/// Entries of `old` that `new` does not have: what replacing `old` by `new` would delete.
fn foreign_entries(old: &Path, new: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(old).map_err(|e| Error::io(old, e))? {
        let name = e.map_err(|e| Error::io(old, e))?.file_name();
        if !new.join(&name).exists() {
            out.push(name.to_string_lossy().into_owned());
        }
    }
    out.sort();
    Ok(out)
}

/// fsyncs every file under `dir`, then the directories themselves.
fn sync_tree(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let p = e.map_err(|e| Error::io(dir, e))?.path();
        if p.is_dir() {
            sync_tree(&p)?;
        } else {
            crate::sys::sync_file(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    crate::sys::sync_dir(dir).map_err(|e| Error::io(dir, e))
}

/// Swaps two directory entries atomically (Linux), or as two renames elsewhere.
fn exchange(a: &Path, b: &Path) -> Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| {
            std::ffi::CString::new(p.as_os_str().as_bytes())
                .map_err(|_| Error::Invalid(format!("{}: a NUL byte in the path", p.display())))
        };
        let (ca, cb) = (c(a)?, c(b)?);
        // SAFETY: two valid NUL-terminated paths; renameat2 only swaps the two entries.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                ca.as_ptr(),
                libc::AT_FDCWD,
                cb.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        // Filesystems without RENAME_EXCHANGE take the portable way below.
        if err.raw_os_error() != Some(libc::EINVAL) && err.raw_os_error() != Some(libc::ENOSYS) {
            return Err(Error::io(b, err));
        }
    }
    let aside = a.with_extension("old");
    std::fs::rename(b, &aside).map_err(|e| Error::io(b, e))?;
    std::fs::rename(a, b).map_err(|e| Error::io(b, e))?;
    std::fs::rename(&aside, a).map_err(|e| Error::io(a, e))
}

/// Removes temporaries of `name` in `dir` whose writer is gone (killed mid-write), saying so.
fn sweep_stale(dir: &Path, name: &str) {
    let prefix = format!(".{name}{MARK}");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = file
            .strip_prefix(&prefix)
            .and_then(|rest| rest.split('.').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !alive(pid) {
            remove_any(&e.path());
            eprintln!(
                "removed {}: a partial output left by a killed lorasft (process {pid})",
                e.path().display()
            );
        }
    }
}

/// Whether a process with this id exists.
fn alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return false;
        };
        // SAFETY: signal 0 only checks that the process exists and may be signalled.
        let rc = unsafe { libc::kill(pid, 0) };
        rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    #[test]
    fn a_file_appears_only_on_commit_and_an_uncommitted_one_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.gguf");
        let s = Staged::file(&target).unwrap();
        std::fs::write(s.path(), b"half").unwrap();
        assert!(!target.exists());
        drop(s);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        write(&target, b"whole").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"whole");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_directory_replaces_an_earlier_output_but_never_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("merged");
        for round in ["one", "two"] {
            let s = Staged::dir(&target).unwrap();
            std::fs::write(s.path().join("config.json"), round).unwrap();
            s.commit().unwrap();
            assert_eq!(
                std::fs::read_to_string(target.join("config.json")).unwrap(),
                round
            );
        }
        std::fs::write(target.join("notes.txt"), "mine").unwrap();
        let s = Staged::dir(&target).unwrap();
        std::fs::write(s.path().join("config.json"), "three").unwrap();
        let err = s.commit().unwrap_err().to_string();
        assert!(err.contains("notes.txt"), "{err}");
        assert_eq!(
            std::fs::read_to_string(target.join("notes.txt")).unwrap(),
            "mine"
        );
        assert_eq!(
            std::fs::read_to_string(target.join("config.json")).unwrap(),
            "two"
        );
        // Only the target is left: the failed temporary is gone.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_special_file_or_the_other_kind_at_the_target_is_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only creates the node.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = write(&fifo, b"x").unwrap_err().to_string();
        assert!(err.contains("special file"), "{err}");
        assert!(
            std::fs::symlink_metadata(&fifo)
                .unwrap()
                .file_type()
                .is_fifo()
        );
        let err = Staged::file(dir.path()).unwrap_err().to_string();
        assert!(err.contains("is a directory"), "{err}");
        let file = dir.path().join("f");
        std::fs::write(&file, "mine").unwrap();
        let err = Staged::dir(&file).unwrap_err().to_string();
        assert!(err.contains("is a regular file"), "{err}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");
    }

    #[test]
    fn a_dead_writers_temporary_is_swept_and_a_live_ones_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("data.jsonl");
        // A process id far above any pid_max is never alive.
        let dead = dir.path().join(format!(".data.jsonl{MARK}999999999"));
        std::fs::write(&dead, "torn").unwrap();
        let other_live = dir.path().join(format!(".data.jsonl{MARK}1"));
        std::fs::write(&other_live, "init's").unwrap();
        write(&target, b"ok").unwrap();
        assert!(!dead.exists());
        assert!(other_live.exists(), "pid 1 is alive: its temporary stays");
    }
}
