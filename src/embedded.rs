//! Files compiled into the binary, so that an installed `lorasft` runs the `smoke` preset from
//! any directory: the fixture tokenizer and the fixture dataset. A config names them as
//! `embedded:fixtures/NAME` (the path they have in the source tree); every bounded input read
//! ([`crate::input::read`]) serves such a path from memory, so a printed config stays a valid
//! input, and run records name the data by that path and hash its bytes like any file.

use std::path::{Path, PathBuf};

/// The prefix that marks an embedded file's path.
pub const PREFIX: &str = "embedded:";

/// The embedded files, by their path in the source tree.
const FILES: [(&str, &[u8]); 2] = [
    (
        "fixtures/tokenizer.json",
        include_bytes!("../fixtures/tokenizer.json"),
    ),
    (
        "fixtures/instructions.json",
        include_bytes!("../fixtures/instructions.json"),
    ),
];

/// The path a config uses for the embedded file `name` (`fixtures/tokenizer.json`).
pub fn path(name: &str) -> PathBuf {
    PathBuf::from(format!("{PREFIX}{name}"))
}

/// The name after [`PREFIX`] when `path` is an embedded path (whether or not such a file is
/// embedded).
pub fn name_of(path: &Path) -> Option<&str> {
    path.to_str()?.strip_prefix(PREFIX)
}

/// What the embedded file `path` holds: `None` when `path` is not an embedded path, an error
/// naming the embedded files when it names none of them.
pub fn get(path: &Path) -> Option<Result<&'static [u8], String>> {
    let name = name_of(path)?;
    Some(
        FILES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, bytes)| *bytes)
            .ok_or_else(|| {
                let known: Vec<String> =
                    FILES.iter().map(|(n, _)| format!("{PREFIX}{n}")).collect();
                format!(
                    "{}: no such embedded file; the binary embeds {}",
                    path.display(),
                    known.join(", ")
                )
            }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_paths_serve_the_source_tree_files_and_name_the_known_ones() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for name in ["fixtures/tokenizer.json", "fixtures/instructions.json"] {
            let bytes = get(&path(name)).unwrap().unwrap();
            assert_eq!(bytes, std::fs::read(root.join(name)).unwrap(), "{name}");
        }
        let err = get(Path::new("embedded:fixtures/nope.json"))
            .unwrap()
            .unwrap_err();
        assert!(
            err.contains("nope.json") && err.contains("embedded:fixtures/tokenizer.json"),
            "{err}"
        );
        assert!(get(Path::new("fixtures/tokenizer.json")).is_none());
    }
}
