//! The library's error type: every variant says what was expected, what was found and where.

use std::path::PathBuf;

/// Errors from loading, building and verifying models and adapters.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    ///
    /// The OS error is part of the message and deliberately not exposed as the error's
    /// `source()`: a chain printer (anyhow's `{:#}`) would otherwise print its text twice.
    #[error("{path}: {error}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying I/O error.
        error: std::io::Error,
    },
    /// A model given as a local path is not a directory.
    #[error("no such model directory: {path}{}", file_hint(.path))]
    NoModelDir {
        /// The path given.
        path: PathBuf,
    },
    /// A JSON file did not parse or lacked a required key.
    #[error("{path}: {msg}")]
    Json {
        /// The file involved.
        path: PathBuf,
        /// What was wrong, with line and column where serde knows them.
        msg: String,
    },
    /// A model config is inconsistent or asks for something lorasft does not implement.
    #[error("{path}: invalid model config: {msg}")]
    Config {
        /// The config.json involved.
        path: PathBuf,
        /// What was wrong.
        msg: String,
    },
    /// An `adapter_config.json` asks for something invalid or that lorasft does not implement.
    #[error("{path}: invalid adapter config: {msg}")]
    AdapterConfig {
        /// The adapter_config.json involved.
        path: PathBuf,
        /// What was wrong, quoting the value given.
        msg: String,
    },
    /// A safetensors file could not be parsed.
    #[error("{path}: not a valid safetensors file: {msg}")]
    Safetensors {
        /// The file involved.
        path: PathBuf,
        /// The parser's message.
        msg: String,
    },
    /// A tensor the model needs is absent from the weight files.
    #[error("{path}: missing tensor `{name}` (shape {expected:?}, which {against} requires)")]
    MissingTensor {
        /// The weight file or index searched.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The other input that requires the tensor (a config.json, the model an adapter is
        /// loaded onto): an error about two inputs names both.
        against: Box<str>,
    },
    /// A tensor in the weight files has the wrong shape for the config.
    #[error("{path}: tensor `{name}` has shape {found:?}, but {against} requires {expected:?}")]
    ShapeMismatch {
        /// The weight file holding the tensor.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape found in the file.
        found: Vec<usize>,
        /// The other input that implies the expected shape.
        against: Box<str>,
    },
    /// A tensor has a dtype that cannot hold model weights.
    #[error("{path}: tensor `{name}` has dtype {found}, expected a float type")]
    BadDtype {
        /// The weight file holding the tensor.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// The dtype found.
        found: String,
    },
    /// A hub model could not be found locally and could not be downloaded.
    #[error(
        "model `{id}`: `{file}` is not in the Hugging Face cache ({cache}) and could not be downloaded: {reason}. \
         Download it once with network access, or pass a local directory with --model"
    )]
    NotCached {
        /// The hub id asked for.
        id: String,
        /// The first file that was missing.
        file: String,
        /// The cache directory searched.
        cache: PathBuf,
        /// Why the download did not happen (offline, network error, ...).
        reason: String,
    },
    /// A dataset record is malformed: the message names the file, line, record and field.
    #[error("{path}:{line}: record {record}{}: {msg}", field_suffix(.field))]
    Record {
        /// The dataset file.
        path: PathBuf,
        /// 1-based line where the record (or the syntax error) is.
        line: usize,
        /// 0-based record index.
        record: usize,
        /// The field at fault, when one is (a path such as `messages[2].role`).
        field: Option<String>,
        /// What was wrong.
        msg: String,
    },
    /// A dataset file is not valid JSON / JSONL at all.
    #[error("{path}:{line}:{column}: {msg}")]
    Syntax {
        /// The dataset file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The parser's message.
        msg: String,
    },
    /// A dataset file holds no records.
    #[error("{path}: no records (empty file or empty array)")]
    EmptyDataset {
        /// The dataset file.
        path: PathBuf,
    },
    /// A dataset file is not UTF-8.
    #[error("{path}:{line}: invalid UTF-8 at byte offset {offset}")]
    NotUtf8 {
        /// The dataset file.
        path: PathBuf,
        /// 1-based line of the first invalid byte.
        line: usize,
        /// Byte offset of the first invalid byte.
        offset: usize,
    },
    /// Training met a non-finite loss, gradient norm, updated adapter or validation loss; the
    /// run stopped, and the checkpoints after the last good one were removed.
    #[error(
        "non-finite {what} ({value}) at step {step}: training stopped; last good checkpoint: {checkpoint}"
    )]
    Diverged {
        /// "loss", "gradient norm", "updated adapter" or "validation loss".
        what: &'static str,
        /// The value seen.
        value: f64,
        /// The optimizer step that produced it (1-based).
        step: usize,
        /// The newest checkpoint whose adapter is good (`latest` points at it), or "none".
        checkpoint: String,
    },
    /// The ranks of a data-parallel job hold different values where they must be equal: the
    /// job stops rather than train on.
    #[error(
        "rank {rank}'s {what} differs from rank 0's: the ranks no longer compute the same run; the job stops (the last checkpoint is intact; resume from it)"
    )]
    RanksDisagree {
        /// The first rank that differs.
        rank: usize,
        /// What differs ("adapter after step 12", "config and data").
        what: String,
    },
    /// A LoRA hyper-parameter or target is invalid; the message quotes the value given.
    #[error("invalid LoRA config: {0}")]
    LoraConfig(String),
    /// An argument to a library function is out of its domain.
    #[error("{0}")]
    Invalid(String),
    /// An error from candle's tensor operations.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn field_suffix(field: &Option<String>) -> String {
    field
        .as_deref()
        .map(|f| format!(", field `{f}`"))
        .unwrap_or_default()
}

fn file_hint(path: &std::path::Path) -> &'static str {
    if path.is_file() {
        " (it is a file; pass the directory holding config.json)"
    } else {
        ""
    }
}

impl Error {
    /// An I/O error tagged with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error: source,
        }
    }
}
