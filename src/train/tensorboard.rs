//! TensorBoard event files: the run's curves (`train/loss`, `train/learning_rate`,
//! `train/grad_norm`, `train/tokens_per_s`, `eval/loss`, by optimizer step) and its resolved
//! config as text, in `RUN/tensorboard/`, for `tensorboard --logdir runs/` (`report.tensorboard`
//! or `lorasft train --tensorboard`).
//!
//! The format is TensorFlow's: TFRecord framing (the data's length as a little-endian u64, the
//! masked CRC32C of those 8 bytes, the data, the masked CRC32C of the data) around `Event`
//! protocol buffers, the first of which carries `file_version = "brain.Event:2"`. Scalars are a
//! `Summary.Value`'s `simple_value`, and text is a DT_STRING tensor under the `text` plugin, as
//! tensorboardX and PyTorch write them (`tests/tensorboard.rs` compares the records' structure
//! with a golden file tensorboardX wrote).
//!
//! Written here rather than through a TensorBoard crate: `tensorboard-rs`, the one that writes
//! more than scalars, has had no release since 2022, says on its repository that it is no longer
//! active, pulls `image` 0.23 and the deprecated `protobuf` 2, and panics on I/O errors; `tboard`
//! (two releases, January 2024) writes scalars only and needs `prost-build` at build time. The
//! few messages are declared here with `prost`'s derive (the usual protobuf crate; no `protoc`,
//! no build script), and the CRC is the `crc32c` crate's (hardware-accelerated, well kept).
//!
//! A resume cuts the event file back to where it stood at the checkpoint, as it does
//! metrics.jsonl: the checkpointed [`LoopState`](super::checkpoint::LoopState) records the file's
//! name and length ([`EventFileMark`]), the file is fsync'd before each checkpoint, and a resumed
//! run truncates it to that length and appends. So every step appears exactly once for every
//! reader, where the alternative (a new file that opens with a `SessionLog` START, after which
//! TensorBoard drops the older file's later steps) relies on the reader purging them.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::records::{Metric, MetricKind};

/// The directory inside a run directory that holds its event files.
pub const DIR: &str = "tensorboard";

/// The prefix of every event file's name (TensorBoard reads the files whose name has `tfevents`).
const PREFIX: &str = "events.out.tfevents.";

/// Where a run's event file stood when a checkpoint was taken: what a resume cuts it back to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventFileMark {
    /// The file's name inside `RUN/tensorboard/`.
    pub file: String,
    /// Its length in bytes (whole records only).
    pub bytes: u64,
}

/// An open event file that records are appended to, each with one `write` so TensorBoard can
/// read the file while the run goes on.
#[derive(Debug)]
pub struct EventLog {
    path: PathBuf,
    file: File,
    mark: EventFileMark,
}

impl EventLog {
    /// Opens the run's event file: the one `resume` names, cut back to its length, or else a new
    /// file that starts with the `file_version` event.
    pub fn open(run_dir: &Path, resume: Option<&EventFileMark>) -> Result<Self> {
        let dir = run_dir.join(DIR);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        if let Some(mark) = resume {
            check_name(&mark.file)?;
            let path = dir.join(&mark.file);
            if path.exists() {
                return Self::reopen(path, mark.clone());
            }
        }
        let (path, file) = create_new(&dir)?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let mut log = Self {
            path,
            file,
            mark: EventFileMark {
                file: name.unwrap_or_default(),
                bytes: 0,
            },
        };
        log.write(&event(0, What::FileVersion("brain.Event:2".into())))?;
        Ok(log)
    }

    /// The checkpoint's file cut back to `mark.bytes`; refused when it is shorter than that.
    fn reopen(path: PathBuf, mark: EventFileMark) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        if len < mark.bytes {
            return Err(Error::Invalid(format!(
                "{}: {len} bytes, but the checkpoint recorded {} written; the event file was cut \
                 short after the checkpoint (remove it to start a new one)",
                path.display(),
                mark.bytes
            )));
        }
        file.set_len(mark.bytes).map_err(|e| Error::io(&path, e))?;
        drop(file);
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(Self { path, file, mark })
    }

    /// Where the file stands now (what a checkpoint records).
    pub fn mark(&self) -> &EventFileMark {
        &self.mark
    }

    /// The event file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one scalar at `step`.
    pub fn scalar(&mut self, tag: &str, value: f32, step: usize) -> Result<()> {
        let v = Value {
            tag: tag.into(),
            metadata: None,
            value: Some(Kind::SimpleValue(value)),
        };
        self.write(&event(step, What::Summary(Summary { value: vec![v] })))
    }

    /// Appends `text` at `step` as the text plugin shows it, under `TAG/text_summary` (the name
    /// tensorboardX gives it).
    pub fn text(&mut self, tag: &str, text: &str, step: usize) -> Result<()> {
        let v = Value {
            tag: format!("{tag}/text_summary"),
            metadata: Some(SummaryMetadata {
                plugin_data: Some(PluginData {
                    plugin_name: "text".into(),
                    content: Vec::new(),
                }),
            }),
            value: Some(Kind::Tensor(TensorProto {
                dtype: DT_STRING,
                tensor_shape: Some(TensorShape {
                    dim: vec![Dim { size: 1 }],
                }),
                string_val: vec![text.as_bytes().to_vec()],
            })),
        };
        self.write(&event(step, What::Summary(Summary { value: vec![v] })))
    }

    /// Appends a metrics line's scalars: a training step's loss, learning rate, gradient norm
    /// and real tokens per second, or an evaluation's loss.
    pub fn metric(&mut self, m: &Metric) -> Result<()> {
        match m.kind {
            MetricKind::Eval => self.scalar("eval/loss", m.loss as f32, m.step),
            MetricKind::Train => {
                self.scalar("train/loss", m.loss as f32, m.step)?;
                let optional = [
                    ("train/learning_rate", m.lr),
                    ("train/grad_norm", m.grad_norm),
                    ("train/tokens_per_s", m.tokens_per_s),
                ];
                for (tag, v) in optional {
                    if let Some(v) = v {
                        self.scalar(tag, v as f32, m.step)?;
                    }
                }
                Ok(())
            }
        }
    }

    /// fsyncs the file, so that a checkpoint never counts bytes a crash could lose.
    pub fn sync(&self) -> Result<()> {
        self.file.sync_all().map_err(|e| Error::io(&self.path, e))
    }

    /// Frames and appends one event.
    fn write(&mut self, e: &Event) -> Result<()> {
        let record = frame(&prost::Message::encode_to_vec(e));
        self.file
            .write_all(&record)
            .map_err(|e| Error::io(&self.path, e))?;
        self.mark.bytes += record.len() as u64;
        Ok(())
    }
}

/// A checkpoint's file name must be one of this module's, inside the directory.
fn check_name(name: &str) -> Result<()> {
    let plain = name.starts_with(PREFIX) && !name.contains(['/', '\\']) && !name.contains("..");
    if plain {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "the checkpoint's tensorboard.file {name:?} is not an event file name ({PREFIX}...)"
    )))
}

/// Creates `events.out.tfevents.<unix seconds>.<host>` (TensorBoard's name), with `.N` added
/// when a file of that name exists.
fn create_new(dir: &Path) -> Result<(PathBuf, File)> {
    let host: String = crate::sys::host_name()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    let host = if host.is_empty() { "localhost" } else { &host };
    let base = format!("{PREFIX}{}.{host}", crate::sys::unix_time());
    for n in 0..1000 {
        let name = if n == 0 {
            base.clone()
        } else {
            format!("{base}.{n}")
        };
        let path = dir.join(&name);
        match OpenOptions::new().append(true).create_new(true).open(&path) {
            Ok(f) => return Ok((path, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io(&path, e)),
        }
    }
    Err(Error::Invalid(format!(
        "{}: 1000 event files named {base}.N exist already",
        dir.display()
    )))
}

/// One TFRecord: length, its masked CRC, the data, the data's masked CRC.
pub fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// TFRecord's masked CRC32C: rotated right by 15 bits plus a constant, so that a CRC of data
/// that holds CRCs stays well distributed.
pub fn masked_crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
        .rotate_right(15)
        .wrapping_add(0xa282_ead8)
}

/// An event at `step`, stamped with the current time.
fn event(step: usize, what: What) -> Event {
    let wall_time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    Event {
        wall_time,
        step: step as i64,
        what: Some(what),
    }
}

/// TensorFlow's `DataType` DT_STRING.
const DT_STRING: i32 = 7;

// The messages, with the field numbers of tensorflow/core/util/event.proto and
// tensorflow/core/framework/{summary,tensor,tensor_shape}.proto; only the fields written here.

/// `tensorflow.Event`.
#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(oneof = "What", tags = "3, 5")]
    what: Option<What>,
}

/// `Event.what`.
#[derive(Clone, PartialEq, prost::Oneof)]
enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<Value>,
}

/// `tensorflow.Summary.Value`.
#[derive(Clone, PartialEq, prost::Message)]
struct Value {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(message, optional, tag = "9")]
    metadata: Option<SummaryMetadata>,
    #[prost(oneof = "Kind", tags = "2, 8")]
    value: Option<Kind>,
}

/// `Summary.Value.value`.
#[derive(Clone, PartialEq, prost::Oneof)]
enum Kind {
    #[prost(float, tag = "2")]
    SimpleValue(f32),
    #[prost(message, tag = "8")]
    Tensor(TensorProto),
}

/// `tensorflow.SummaryMetadata`.
#[derive(Clone, PartialEq, prost::Message)]
struct SummaryMetadata {
    #[prost(message, optional, tag = "1")]
    plugin_data: Option<PluginData>,
}

/// `SummaryMetadata.PluginData`.
#[derive(Clone, PartialEq, prost::Message)]
struct PluginData {
    #[prost(string, tag = "1")]
    plugin_name: String,
    #[prost(bytes = "vec", tag = "2")]
    content: Vec<u8>,
}

/// `tensorflow.TensorProto`.
#[derive(Clone, PartialEq, prost::Message)]
struct TensorProto {
    #[prost(int32, tag = "1")]
    dtype: i32,
    #[prost(message, optional, tag = "2")]
    tensor_shape: Option<TensorShape>,
    #[prost(bytes = "vec", repeated, tag = "8")]
    string_val: Vec<Vec<u8>>,
}

/// `tensorflow.TensorShapeProto`.
#[derive(Clone, PartialEq, prost::Message)]
struct TensorShape {
    #[prost(message, repeated, tag = "2")]
    dim: Vec<Dim>,
}

/// `TensorShapeProto.Dim`.
#[derive(Clone, PartialEq, prost::Message)]
struct Dim {
    #[prost(int64, tag = "1")]
    size: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_matches_tensorflow_for_a_known_record() {
        // The first record tensorboardX wrote into tests/data/tensorboard: the length 24 and
        // its masked CRC, as the bytes the golden file holds.
        let len = 24u64.to_le_bytes();
        assert_eq!(masked_crc(&len).to_le_bytes(), [0xa3, 0x7f, 0x4b, 0x22]);
        // CRC32C's check value ("123456789" -> 0xE3069283), so the polynomial is Castagnoli's.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn a_resume_cuts_the_file_back_to_the_mark_and_a_bad_name_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let mut log = EventLog::open(tmp.path(), None).unwrap();
        log.scalar("train/loss", 1.0, 1).unwrap();
        let mark = log.mark().clone();
        log.scalar("train/loss", 0.5, 2).unwrap();
        let longer = log.mark().bytes;
        assert!(longer > mark.bytes);
        drop(log);
        let mut again = EventLog::open(tmp.path(), Some(&mark)).unwrap();
        assert_eq!(std::fs::metadata(again.path()).unwrap().len(), mark.bytes);
        again.scalar("train/loss", 0.5, 2).unwrap();
        assert_eq!(again.mark().bytes, longer);
        let bad = EventFileMark {
            file: "../metrics.jsonl".into(),
            bytes: 0,
        };
        let e = EventLog::open(tmp.path(), Some(&bad)).unwrap_err();
        assert!(e.to_string().contains("tensorboard.file"), "{e}");
        let long = EventFileMark {
            bytes: longer + 1,
            ..mark
        };
        let e = EventLog::open(tmp.path(), Some(&long)).unwrap_err();
        assert!(e.to_string().contains("cut short"), "{e}");
    }
}
