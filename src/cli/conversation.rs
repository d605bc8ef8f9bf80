//! The conversation commands: `chat render` (a template's exact output), `data encode` (ids and
//! labels as JSONL) and `data show` (the trained tokens marked), and the chat side of
//! `generate`.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::chat::{Conversation, RenderOptions};
use crate::cli::args::{ChatRenderArgs, DataEncodeArgs, DataShowArgs, DataSourceArgs};
use crate::data::dataset::{self, Dataset};
use crate::data::encode::{EncodeConfig, Encoder, IGNORE_INDEX};
use crate::data::formats::{self, Sample};
use crate::data::show::{self, Style};
use crate::error::{Error, Result};
use crate::gguf::Gguf;
use crate::model::source::resolve_model;

/// Reads a conversation file: a JSON array of messages, or an object with `messages` (and
/// `tools`); returns both as JSON, as a template sees them.
pub fn read_messages(path: &Path) -> Result<(Value, Option<Value>)> {
    let text = crate::input::read_text(path, crate::input::DOCUMENT_CEILING, "a conversation")?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    match v {
        Value::Array(_) => Ok((v, None)),
        Value::Object(mut o) => {
            let messages = o
                .remove("messages")
                .filter(Value::is_array)
                .ok_or_else(|| {
                    Error::Invalid(format!(
                        "{}: expected a list of messages or an object with a `messages` list",
                        path.display()
                    ))
                })?;
            Ok((messages, o.remove("tools").filter(|t| !t.is_null())))
        }
        _ => Err(Error::Invalid(format!(
            "{}: expected a list of messages or an object with a `messages` list",
            path.display()
        ))),
    }
}

/// Reads a conversation file as a [`Conversation`] (the `messages` format's rules).
pub fn read_conversation(path: &Path) -> Result<Conversation> {
    let (messages, tools) = read_messages(path)?;
    let mut record = serde_json::Map::new();
    record.insert("messages".into(), messages);
    if let Some(t) = tools {
        record.insert("tools".into(), t);
    }
    let at = formats::Locator {
        path,
        line: 1,
        record: 0,
    };
    match formats::parse_sample(
        &Value::Object(record),
        formats::DataFormat::Messages,
        &formats::Columns::new(),
        &at,
    )? {
        Sample::Chat(c) => Ok(c),
        Sample::Instruction(_) => unreachable!("the messages format gives conversations"),
    }
}

/// The BOS and EOS texts a template source names (its tokenizer config, or a GGUF's ids).
fn source_special_texts(path: &Path) -> Result<(String, String)> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if path.is_dir() {
        return crate::data::encode::special_texts(&path.join("tokenizer.json"));
    }
    if ext.eq_ignore_ascii_case("json") {
        // The config the template came from, whatever its name (`special_texts` would read a
        // `tokenizer_config.json` beside it instead).
        let cfg = crate::chat::locate::read_config(path)?;
        return Ok(crate::data::encode::special_texts_of(&cfg));
    }
    if ext.eq_ignore_ascii_case("gguf") {
        let cfg = crate::tokenizer::from_gguf::tokenizer_config(&Gguf::read(path)?)?;
        return Ok(crate::data::encode::special_texts_of(&cfg));
    }
    Ok((String::new(), String::new()))
}

/// `lorasft chat render`: the template's output for a conversation, exactly.
pub fn chat_render(a: &ChatRenderArgs) -> Result<String> {
    let template = crate::chat::locate::from_path(&a.template, a.template_name.as_deref())?;
    let (bos, eos) = source_special_texts(&a.template)?;
    let opts = RenderOptions::new(
        a.bos_token.clone().unwrap_or(bos),
        a.eos_token.clone().unwrap_or(eos),
    )
    .with_generation_prompt(a.add_generation_prompt);
    let (messages, tools) = read_messages(&a.messages)?;
    Ok(template.render_json(&messages, tools.as_ref(), &opts)?.text)
}

/// The tokenizer a data command uses: `--tokenizer`, or the model's.
fn tokenizer_of(s: &DataSourceArgs) -> Result<PathBuf> {
    if let Some(t) = &s.tokenizer {
        return Ok(t.clone());
    }
    let model = s
        .model
        .as_deref()
        .ok_or_else(|| Error::Invalid("give --model or --tokenizer".into()))?;
    let resolved = resolve_model(model, &candle_core::Device::Cpu, candle_core::DType::F32)?;
    resolved.tokenizer_path(None)
}

/// Loads the dataset and the encoder a data command names.
fn open(s: &DataSourceArgs, cfg: EncodeConfig) -> Result<(Dataset, Encoder)> {
    let ds = dataset::load_with(&s.data, s.format, &s.columns()?)?;
    let enc = Encoder::from_file(&tokenizer_of(s)?, cfg)?;
    Ok((ds, enc))
}

/// `lorasft data encode`: one `{"text", "input_ids", "labels"}` line per example (no padding)
/// into `--out`; returns (examples written, conversations skipped for no trained turn).
pub fn data_encode(a: &DataEncodeArgs) -> Result<(usize, usize)> {
    let (ds, enc) = open(&a.source, a.encode.config()?)?;
    // Renamed into place when complete: a kill leaves no truncated file under --out.
    let staged = crate::output::Staged::file(&a.out)?;
    let tmp = staged.path().to_path_buf();
    let mut out =
        std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?);
    let (mut written, mut skipped) = (0, 0);
    let mut task = a
        .output
        .mode()
        .task("data encode", ds.records.len() as u64, "records");
    for (i, sample) in ds.records.iter().enumerate() {
        let ex = enc.encode(sample).map_err(|e| ds.locate_error(i, e))?;
        task.advance(1);
        if crate::data::stats::has_no_trained_turn(&ex) {
            skipped += 1;
            continue;
        }
        let row = enc.row(&ex, ex.ids.len());
        let line = serde_json::json!({
            "text": enc.text(sample)?,
            "input_ids": row.input_ids,
            "labels": row.labels,
        });
        writeln!(out, "{line}").map_err(|e| Error::io(&tmp, e))?;
        written += 1;
    }
    out.flush().map_err(|e| Error::io(&tmp, e))?;
    drop(out);
    staged.commit()?;
    task.finish();
    Ok((written, skipped))
}

/// `lorasft data show`: each chosen record as the model reads it, trained text marked.
pub fn data_show(a: &DataShowArgs, style: Style) -> Result<String> {
    let (ds, enc) = open(&a.source, a.encode.config()?)?;
    let mut out = String::new();
    let end = a.start.saturating_add(a.records).min(ds.records.len());
    if a.start >= ds.records.len() {
        return Err(Error::Invalid(format!(
            "--start {} is past the last record ({} records)",
            a.start,
            ds.records.len()
        )));
    }
    out.push_str(&format!(
        "{}: {} records, format {}; labels {:?}; {}\n",
        ds.path.display(),
        ds.records.len(),
        ds.format,
        a.encode.labels,
        match enc.chat().filter(|_| enc.uses_chat(&ds.records[0])) {
            Some(c) => format!("template {}", c.template().source()),
            None => "the Alpaca prompt".into(),
        }
    ));
    out.push_str(match style {
        Style::Brackets => "trained tokens are in [[ ]]\n",
        Style::Color => "trained tokens are green\n",
    });
    for i in a.start..end {
        let sample = &ds.records[i];
        let ex = enc.encode(sample).map_err(|e| ds.locate_error(i, e))?;
        let targets = enc
            .row(&ex, ex.ids.len())
            .labels
            .iter()
            .filter(|&&l| l != IGNORE_INDEX)
            .count();
        out.push_str(&format!(
            "\n=== record {i} (line {}): {} tokens, {targets} trained{}{}\n",
            ds.lines[i],
            ex.ids.len(),
            if ex.turns_cut > 0 {
                format!(", {} trailing messages cut", ex.turns_cut)
            } else {
                String::new()
            },
            if crate::data::stats::has_no_trained_turn(&ex) {
                " (no trained turn: training skips it)"
            } else {
                ""
            }
        ));
        out.push_str(&show::marked(&enc, sample, &ex, style)?);
        out.push('\n');
    }
    Ok(out)
}

/// The chat template `generate --chat` uses: `--chat-template`, else the model's.
pub fn generation_template(tokenizer: &Path, given: Option<&Path>) -> Result<Encoder> {
    let cfg = EncodeConfig {
        chat_template: given.map(Path::to_path_buf),
        ..EncodeConfig::default()
    };
    let enc = Encoder::from_file(tokenizer, cfg)?;
    enc.require_chat()?;
    Ok(enc)
}
