//! Reading the files a user names, safely: without blocking and without an unbounded read.
//!
//! A path given as input may name anything: a FIFO with no writer (whose `open` blocks
//! forever), a device (`/dev/zero`, `/dev/urandom`, which never end), a directory or a socket,
//! or a regular file far larger than its kind can be. Every input is opened with `O_NONBLOCK`
//! and checked with `fstat` on the open descriptor (checking the path first would race with a
//! swap of the file), and anything but a regular file is refused, naming the path and what it
//! is. Reads then stop at a ceiling that fits the kind of file, and going past it is an error
//! naming the file, its size and the ceiling, never an allocation failure.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

/// Ceiling for a dataset read whole (JSON or JSONL): 4 GiB.
pub const DATASET_CEILING: u64 = 4 << 30;
/// Ceiling for a `tokenizer.json`: 1 GiB (real ones are under 50 MiB).
pub const TOKENIZER_CEILING: u64 = 1 << 30;
/// Ceiling for documents that may carry long text (`tokenizer_config.json` with its chat
/// templates, a conversation file, a chat template): 64 MiB.
pub const DOCUMENT_CEILING: u64 = 64 << 20;
/// Ceiling for small configs (`config.json`, `adapter_config.json`, a run's TOML, a
/// safetensors index, run records): 16 MiB, far above any real one (a 405B model's index is
/// under 200 KiB).
pub const CONFIG_CEILING: u64 = 16 << 20;
/// Ceiling for an adapter's weights, which are read whole: 16 GiB (rank 256 on every
/// projection of a 70B model is about 6 GiB in f32).
pub const ADAPTER_CEILING: u64 = 16 << 30;

/// What a file type is, in words, for errors.
pub(crate) fn kind(ft: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return "a FIFO";
        }
        if ft.is_socket() {
            return "a socket";
        }
        if ft.is_char_device() || ft.is_block_device() {
            return "a device";
        }
    }
    if ft.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

/// Opens `path` for reading without blocking and refuses anything but a regular file
/// (symlinks are followed, as the Hugging Face cache needs).
pub fn open(path: &Path) -> Result<File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NONBLOCK);
    }
    let f = opts.open(path).map_err(|e| Error::io(path, e))?;
    let ft = f.metadata().map_err(|e| Error::io(path, e))?.file_type();
    if !ft.is_file() {
        return Err(Error::Invalid(format!(
            "{}: is {}, not a regular file",
            path.display(),
            kind(&ft)
        )));
    }
    Ok(f)
}

/// Reads a whole input file of at most `ceiling` bytes; `what` names its kind in the error.
/// An `embedded:` path ([`crate::embedded`]) is served from the binary.
pub fn read(path: &Path, ceiling: u64, what: &str) -> Result<Vec<u8>> {
    if let Some(embedded) = crate::embedded::get(path) {
        return embedded.map(<[u8]>::to_vec).map_err(Error::Invalid);
    }
    let f = open(path)?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let too_big = |len: u64| {
        Error::Invalid(format!(
            "{}: {len} bytes, more than the {} MiB ceiling for {what}",
            path.display(),
            ceiling >> 20
        ))
    };
    if len > ceiling {
        return Err(too_big(len));
    }
    let mut buf = Vec::with_capacity(len as usize);
    // The file may grow while it is read: the ceiling holds for the bytes read, too.
    f.take(ceiling + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Error::io(path, e))?;
    if buf.len() as u64 > ceiling {
        return Err(too_big(buf.len() as u64));
    }
    Ok(buf)
}

/// [`read`] as UTF-8 text, naming the file when it is not.
pub fn read_text(path: &Path, ceiling: u64, what: &str) -> Result<String> {
    String::from_utf8(read(path, ceiling, what)?)
        .map_err(|_| Error::Invalid(format!("{}: not UTF-8 text", path.display())))
}

/// SHA-256 of an input file, hex, streamed so memory stays flat whatever its size.
pub fn sha256(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    if let Some(embedded) = crate::embedded::get(path) {
        return Ok(format!(
            "{:x}",
            Sha256::digest(embedded.map_err(Error::Invalid)?)
        ));
    }
    let mut h = Sha256::new();
    std::io::copy(&mut open(path)?, &mut h).map_err(|e| Error::io(path, e))?;
    Ok(format!("{:x}", h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifos_devices_and_directories_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only creates the node.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = read(&fifo, 1 << 20, "a dataset").unwrap_err().to_string();
        assert!(err.contains("fifo") && err.contains("a FIFO"), "{err}");
        let err = read(Path::new("/dev/zero"), 1 << 20, "a dataset")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/dev/zero") && err.contains("a device"),
            "{err}"
        );
        let err = read(dir.path(), 1 << 20, "a dataset")
            .unwrap_err()
            .to_string();
        assert!(err.contains("a directory"), "{err}");
    }

    #[test]
    fn a_file_past_its_ceiling_is_an_error_naming_size_and_ceiling() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big.json");
        std::fs::write(&p, vec![b' '; (2 << 20) + 1]).unwrap();
        let err = read(&p, 2 << 20, "a config").unwrap_err().to_string();
        assert!(
            err.contains("big.json") && err.contains("2097153 bytes") && err.contains("2 MiB"),
            "{err}"
        );
        assert_eq!(read(&p, 4 << 20, "a config").unwrap().len(), (2 << 20) + 1);
    }
}
