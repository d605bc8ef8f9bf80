//! The command tree as data: every argument that names a file or directory, so the hostile
//! input tests cover each one, including flags added later, without a list kept by hand.

use std::path::PathBuf;

/// One line per argument that takes a path: the subcommand path (`data stats`), and the flag
/// (`--data`) or, for a positional argument, its value name in angle brackets (`<FILE>`).
pub fn path_args(root: &clap::Command) -> String {
    let mut out = Vec::new();
    walk("", root, &mut out);
    out.iter().map(|l| format!("{l}\n")).collect()
}

fn walk(prefix: &str, cmd: &clap::Command, out: &mut Vec<String>) {
    for sub in cmd.get_subcommands() {
        let name = if prefix.is_empty() {
            sub.get_name().to_string()
        } else {
            format!("{prefix} {}", sub.get_name())
        };
        walk(&name, sub, out);
    }
    if prefix.is_empty() {
        return;
    }
    for arg in cmd.get_arguments().filter(|a| takes_path(a)) {
        let spelled = match arg.get_long() {
            Some(long) => format!("--{long}"),
            None => format!("<{}>", arg.get_id().as_str().to_uppercase()),
        };
        out.push(format!("{prefix} {spelled}"));
    }
}

/// A `PathBuf` value, or a value hinted as a path (a model source: a directory, `gguf:PATH`
/// or a hub id).
fn takes_path(arg: &clap::Arg) -> bool {
    arg.get_value_parser().type_id() == std::any::TypeId::of::<PathBuf>()
        || matches!(
            arg.get_value_hint(),
            clap::ValueHint::AnyPath | clap::ValueHint::FilePath | clap::ValueHint::DirPath
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_arguments_are_found_by_type_and_hint_in_nested_subcommands() {
        let cmd = clap::Command::new("t").subcommand(
            clap::Command::new("data").subcommand(
                clap::Command::new("stats")
                    .arg(
                        clap::Arg::new("data")
                            .long("data")
                            .value_parser(clap::value_parser!(PathBuf)),
                    )
                    .arg(
                        clap::Arg::new("model")
                            .long("model")
                            .value_hint(clap::ValueHint::AnyPath),
                    )
                    .arg(clap::Arg::new("n").long("n"))
                    .arg(clap::Arg::new("file").value_parser(clap::value_parser!(PathBuf))),
            ),
        );
        assert_eq!(
            path_args(&cmd),
            "data stats --data\ndata stats --model\ndata stats <FILE>\n"
        );
    }
}
