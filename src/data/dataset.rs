//! Datasets: a JSON array or JSON Lines of records in one [`DataFormat`] (Alpaca
//! `{instruction, input?, output}`, `messages`, `sharegpt` or `prompt_completion`; see
//! [`formats`](crate::data::formats)), detected from the first record or given.
//!
//! Every problem is an error naming the file, the line, the record and the field; nothing is
//! skipped silently. The train/validation split is seeded and deterministic.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::data::formats::{self, Columns, DataFormat, Locator, Sample};
use crate::error::{Error, Result};
use crate::rng::Rng;

/// One instruction-tuning example, with its text verbatim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The task.
    pub instruction: String,
    /// Optional context; `None` when absent or null.
    pub input: Option<String>,
    /// The desired answer.
    pub output: String,
}

impl Record {
    /// Whether the record has an input block (present and not whitespace-only).
    pub fn has_input(&self) -> bool {
        self.input.as_deref().is_some_and(|s| !s.trim().is_empty())
    }
}

/// The file format a dataset was read from (its record format is a [`DataFormat`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileFormat {
    /// A JSON array of objects.
    JsonArray,
    /// One JSON object per line.
    JsonLines,
}

/// A loaded dataset: records in file order and the line each starts on.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The file read.
    pub path: PathBuf,
    /// JSON array or JSON Lines.
    pub file_format: FileFormat,
    /// The records' format: given, or detected from the first record.
    pub format: DataFormat,
    /// Records in file order.
    pub records: Vec<Sample>,
    /// 1-based line on which each record starts.
    pub lines: Vec<usize>,
}

impl Dataset {
    /// An error about record `index` (an encoding error, say) placed at its file, line and
    /// record; an error that already names its record is kept as it is.
    pub fn locate_error(&self, index: usize, e: Error) -> Error {
        match e {
            Error::Record { .. } => e,
            other => Error::Record {
                path: self.path.clone(),
                line: self.lines.get(index).copied().unwrap_or(0),
                record: index,
                field: None,
                msg: other.to_string(),
            },
        }
    }
}

/// 1-based line of a byte offset.
fn line_of(bytes: &[u8], offset: usize) -> usize {
    1 + bytes[..offset.min(bytes.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
}

/// Lines on which each element of a top-level JSON array starts (strings and escapes aware).
fn element_lines(text: &str) -> Vec<usize> {
    let mut lines = Vec::new();
    let (mut depth, mut in_str, mut esc, mut line, mut expect) =
        (0usize, false, false, 1usize, false);
    for c in text.chars() {
        if c == '\n' {
            line += 1;
        }
        if in_str {
            match (esc, c) {
                (true, _) => esc = false,
                (false, '\\') => esc = true,
                (false, '"') => in_str = false,
                _ => {}
            }
            continue;
        }
        if depth == 1 && expect && !c.is_whitespace() && c != ']' {
            lines.push(line);
            expect = false;
        }
        match c {
            '"' => in_str = true,
            '[' | '{' => {
                depth += 1;
                if depth == 1 {
                    expect = true;
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            ',' if depth == 1 => expect = true,
            _ => {}
        }
    }
    lines
}

/// Validates one JSON value as an Alpaca record; `line` and `index` locate it in errors.
pub fn parse_record(v: &Value, path: &Path, line: usize, index: usize) -> Result<Record> {
    let at = Locator {
        path,
        line,
        record: index,
    };
    formats::parse_alpaca(v, &Columns::new(), &at)
}

/// Turns record values into samples: settles the format at the first record, then holds
/// every record to it.
struct Parser<'a> {
    path: &'a Path,
    format: Option<DataFormat>,
    /// Whether the format was detected (for the mixed-format hint).
    detected: bool,
    columns: &'a Columns,
}

impl Parser<'_> {
    fn sample(&mut self, v: &Value, line: usize, record: usize) -> Result<Sample> {
        let at = Locator {
            path: self.path,
            line,
            record,
        };
        let format = match self.format {
            Some(f) => f,
            None => {
                let f = formats::detect(v, self.columns)
                    .ok_or_else(|| at.error(None, formats::detect_failure(v, self.columns)))?;
                self.format = Some(f);
                self.detected = true;
                f
            }
        };
        formats::parse_sample(v, format, self.columns, &at).map_err(|e| {
            // A record of another format (a mixed file) gets said so, not only its first
            // missing field.
            let other = formats::detect(v, &Columns::new())
                .or_else(|| formats::detect(v, self.columns))
                .filter(|&o| o != format);
            match (e, other) {
                (
                    Error::Record {
                        path,
                        line,
                        record,
                        field,
                        msg,
                    },
                    Some(o),
                ) => Error::Record {
                    path,
                    line,
                    record,
                    field,
                    msg: if self.detected {
                        format!(
                            "{msg}; this record looks like {o} data, but the dataset is \
                             {format}, as detected from record 0 (a file holds one format)"
                        )
                    } else {
                        format!("{msg}; this record looks like {o} data, but the format given is {format}")
                    },
                },
                (e, _) => e,
            }
        })
    }
}

/// Loads a dataset, detecting JSON array vs JSON Lines from the first non-blank character
/// and the record format from the first record.
pub fn load(path: &Path) -> Result<Dataset> {
    load_with(path, None, &Columns::new())
}

/// Loads a dataset in `format` (detected from the first record when `None`), with field
/// names remapped by `columns` (canonical name -> name in the file).
pub fn load_with(path: &Path, format: Option<DataFormat>, columns: &Columns) -> Result<Dataset> {
    match format {
        Some(f) => formats::validate_columns(f, columns)?,
        None => formats::validate_columns_any(columns)?,
    }
    let bytes = crate::input::read(path, crate::input::DATASET_CEILING, "a dataset")?;
    let text = std::str::from_utf8(&bytes).map_err(|e| Error::NotUtf8 {
        path: path.to_path_buf(),
        line: line_of(&bytes, e.valid_up_to()),
        offset: e.valid_up_to(),
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let syntax = |e: serde_json::Error, line_base: usize| Error::Syntax {
        path: path.to_path_buf(),
        line: line_base + e.line(),
        column: e.column(),
        msg: {
            // serde_json appends " at line L column C"; the location is already in front.
            let m = e.to_string();
            m.rfind(" at line ")
                .map_or(m.clone(), |i| m[..i].to_string())
        },
    };
    let mut parser = Parser {
        path,
        format,
        detected: false,
        columns,
    };
    let (file_format, records, lines) = match text.trim_start().chars().next() {
        None => {
            return Err(Error::EmptyDataset {
                path: path.to_path_buf(),
            });
        }
        Some('[') => {
            let values: Vec<Value> = serde_json::from_str(text).map_err(|e| syntax(e, 0))?;
            let lines = element_lines(text);
            let records = values
                .iter()
                .enumerate()
                .map(|(i, v)| parser.sample(v, lines.get(i).copied().unwrap_or(1), i))
                .collect::<Result<Vec<_>>>()?;
            (FileFormat::JsonArray, records, lines)
        }
        Some('{') => {
            let mut records = Vec::new();
            let mut lines = Vec::new();
            for (i, l) in text.lines().enumerate() {
                if l.trim().is_empty() {
                    continue;
                }
                let v: Value = serde_json::from_str(l).map_err(|e| syntax(e, i))?;
                records.push(parser.sample(&v, i + 1, records.len())?);
                lines.push(i + 1);
            }
            (FileFormat::JsonLines, records, lines)
        }
        Some(c) => {
            return Err(Error::Syntax {
                path: path.to_path_buf(),
                line: 1,
                column: 1,
                msg: format!("expected a JSON array `[` or JSON Lines `{{`, found {c:?}"),
            });
        }
    };
    let Some(format) = parser.format.filter(|_| !records.is_empty()) else {
        return Err(Error::EmptyDataset {
            path: path.to_path_buf(),
        });
    };
    Ok(Dataset {
        path: path.to_path_buf(),
        file_format,
        format,
        records,
        lines,
    })
}

/// How many records go to validation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SplitSpec {
    /// A fraction of the records, rounded up (as `datasets.train_test_split` does).
    Fraction(f64),
    /// An exact count.
    Count(usize),
    /// No validation set: every record trains (`data.validation = "none"`, as the Trainer's
    /// `eval_strategy="no"`).
    None,
}

/// Record indices of the two subsets, each in file order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    /// Training records.
    pub train: Vec<usize>,
    /// Validation records.
    pub validation: Vec<usize>,
}

/// A seeded, deterministic split of `n` records.
pub fn split(n: usize, spec: SplitSpec, seed: u64) -> Result<Split> {
    let n_val = match spec {
        SplitSpec::Fraction(f) if (0.0..1.0).contains(&f) => (f * n as f64).ceil() as usize,
        SplitSpec::Fraction(f) => {
            return Err(Error::Invalid(format!(
                "validation fraction must be in [0, 1), got {f}"
            )));
        }
        SplitSpec::Count(c) => c,
        SplitSpec::None => 0,
    };
    if n_val >= n && n > 0 {
        return Err(Error::Invalid(format!(
            "validation would take {n_val} of {n} records, leaving none to train on"
        )));
    }
    let mut idx: Vec<usize> = (0..n).collect();
    Rng::derive(seed, "split").shuffle(&mut idx);
    let mut validation = idx[..n_val].to_vec();
    let mut train = idx[n_val..].to_vec();
    validation.sort_unstable();
    train.sort_unstable();
    Ok(Split { train, validation })
}
