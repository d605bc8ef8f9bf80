//! The command line's library side: the argument types of each subcommand (clap derive) and
//! what each subcommand computes. `src/main.rs` parses, dispatches, prints and picks the exit
//! code; everything that can be tested without a process lives here.

pub mod args;
pub mod commands;
pub mod conversation;
pub mod introspect;
