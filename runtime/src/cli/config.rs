//! `lockgate config`: facts about runtime.toml itself. `config reference` prints the reference
//! the library renders from the config schema (lockgate::config::reference).

use std::process::ExitCode;

use clap::{Args, Subcommand};

/// Arguments of `lockgate config`.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    command: ConfigCommand,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the runtime.toml reference as Markdown: every table and field with its type,
    /// default and meaning, an example of each table, and the deprecated spellings still read.
    ///
    /// It is rendered from the declarations the parser itself reads the fields from, so it
    /// always matches this lockgate; docs/reference/runtime-toml.md is its output.
    /// Example: lockgate config reference > runtime-toml.md
    Reference,
}

pub fn run(args: ConfigArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        ConfigCommand::Reference => {
            super::write_out(format_args!("{}", lockgate::config::reference::render()));
        }
    }
    Ok(ExitCode::SUCCESS)
}
