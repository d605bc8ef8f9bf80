//! A reader of TensorBoard event files of the tests' own, sharing nothing with lorasft's writer:
//! its own CRC32C (bit by bit), its own TFRecord framing and a plain protobuf wire decoder, with
//! the field numbers of tensorflow/core/util/event.proto and framework/summary.proto.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// CRC32C (Castagnoli, reflected polynomial 0x82F63B78), one bit at a time.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// TFRecord's mask of a CRC.
pub fn masked(data: &[u8]) -> u32 {
    let c = crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// Every record of an event file, each of its two CRCs checked; the file must end on a record.
pub fn records(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        assert!(bytes.len() >= at + 12, "a torn header at byte {at}");
        let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
        assert_eq!(
            u32_at(bytes, at + 8),
            masked(&bytes[at..at + 8]),
            "length CRC at byte {at}"
        );
        let data = &bytes[at + 12..at + 12 + len];
        assert_eq!(
            u32_at(bytes, at + 12 + len),
            masked(data),
            "data CRC of the record at byte {at}"
        );
        out.push(data.to_vec());
        at += 16 + len;
    }
    assert_eq!(at, bytes.len());
    out
}

/// One protobuf field's value, by wire type.
#[derive(Debug, Clone, PartialEq)]
pub enum Wire {
    /// Wire type 0.
    Varint(u64),
    /// Wire type 1.
    I64(u64),
    /// Wire type 2.
    Len(Vec<u8>),
    /// Wire type 5.
    I32(u32),
}

fn varint(b: &[u8], at: &mut usize) -> u64 {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = b[*at];
        *at += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return v;
        }
    }
    panic!("a varint longer than 10 bytes");
}

/// A message's fields in wire order.
pub fn fields(b: &[u8]) -> Vec<(u64, Wire)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < b.len() {
        let key = varint(b, &mut at);
        let value = match key & 7 {
            0 => Wire::Varint(varint(b, &mut at)),
            1 => {
                at += 8;
                Wire::I64(u64::from_le_bytes(b[at - 8..at].try_into().unwrap()))
            }
            2 => {
                let len = varint(b, &mut at) as usize;
                at += len;
                Wire::Len(b[at - len..at].to_vec())
            }
            5 => {
                at += 4;
                Wire::I32(u32_at(b, at - 4))
            }
            t => panic!("wire type {t}"),
        };
        out.push((key >> 3, value));
    }
    out
}

fn first(f: &[(u64, Wire)], n: u64) -> Option<&Wire> {
    f.iter().find(|(k, _)| *k == n).map(|(_, w)| w)
}

fn bytes_of(w: Option<&Wire>) -> &[u8] {
    match w {
        Some(Wire::Len(b)) => b,
        None => &[],
        w => panic!("not a length-delimited field: {w:?}"),
    }
}

fn string_of(w: Option<&Wire>) -> String {
    String::from_utf8(bytes_of(w).to_vec()).unwrap()
}

/// What a reader needs of an Event: its step and one summary value (lorasft and tensorboardX
/// write one value per event).
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub step: i64,
    pub file_version: Option<String>,
    pub tag: String,
    pub simple_value: Option<f32>,
    pub plugin: Option<String>,
    pub text: Option<String>,
}

/// Decodes an Event (tensorflow/core/util/event.proto) and its Summary.Value.
pub fn decode(record: &[u8]) -> Decoded {
    let e = fields(record);
    let step = match first(&e, 2) {
        Some(Wire::Varint(v)) => *v as i64,
        None => 0,
        w => panic!("step: {w:?}"),
    };
    assert!(matches!(first(&e, 1), Some(Wire::I64(_))), "wall_time");
    let summary = fields(bytes_of(first(&e, 5)));
    assert!(summary.len() <= 1, "one value per event");
    let value = fields(bytes_of(first(&summary, 1)));
    let simple_value = match first(&value, 2) {
        Some(Wire::I32(bits)) => Some(f32::from_bits(*bits)),
        None => None,
        w => panic!("simple_value: {w:?}"),
    };
    let metadata = fields(bytes_of(first(&value, 9)));
    let plugin = first(&metadata, 1).map(|p| string_of(first(&fields(bytes_of(Some(p))), 1)));
    let text = first(&value, 8).map(|t| {
        let tensor = fields(bytes_of(Some(t)));
        assert_eq!(first(&tensor, 1), Some(&Wire::Varint(7)), "dtype DT_STRING");
        string_of(first(&tensor, 8))
    });
    Decoded {
        step,
        file_version: first(&e, 3).map(|w| string_of(Some(w))),
        tag: string_of(first(&value, 1)),
        simple_value,
        plugin,
        text,
    }
}

/// A record's structure: each field's number and wire type, and the fields of the messages
/// inside it, following the schema's message fields (Event.summary, Summary.value,
/// Value.tensor, Value.metadata, SummaryMetadata.plugin_data, TensorProto.tensor_shape,
/// TensorShapeProto.dim); field order ignored.
pub fn shape(b: &[u8], message: &str) -> Vec<String> {
    let mut out: Vec<String> = fields(b)
        .into_iter()
        .map(|(n, w)| {
            let inner = match (message, n) {
                ("Event", 5) => Some("Summary"),
                ("Summary", 1) => Some("Value"),
                ("Value", 8) => Some("Tensor"),
                ("Value", 9) => Some("Metadata"),
                ("Metadata", 1) => Some("PluginData"),
                ("Tensor", 2) => Some("Shape"),
                ("Shape", 2) => Some("Dim"),
                _ => None,
            };
            match (&w, inner) {
                (Wire::Len(b), Some(m)) => format!("{n}:{m}{{{}}}", shape(b, m).join(",")),
                (Wire::Varint(_), _) => format!("{n}:varint"),
                (Wire::I64(_), _) => format!("{n}:i64"),
                (Wire::I32(_), _) => format!("{n}:i32"),
                (Wire::Len(_), None) => format!("{n}:len"),
            }
        })
        .collect();
    out.sort();
    out
}

/// The records of the one event file in a run's `tensorboard/`.
pub fn run_records(run: &Path) -> (PathBuf, Vec<Vec<u8>>) {
    let dir = run.join("tensorboard");
    let files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let bytes = std::fs::read(&files[0]).unwrap();
    (files[0].clone(), records(&bytes))
}

/// (tag, step) -> value of every scalar, each pair at most once.
pub fn scalars(records: &[Vec<u8>]) -> BTreeMap<(String, i64), f32> {
    let mut out = BTreeMap::new();
    for r in records {
        let d = decode(r);
        if let Some(v) = d.simple_value {
            let key = (d.tag.clone(), d.step);
            assert!(out.insert(key.clone(), v).is_none(), "{key:?} twice");
        }
    }
    out
}
