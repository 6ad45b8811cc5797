//! docs/reference/cli.md: the `--help` of every command, rendered from the command definitions
//! and checked by a test, so the page cannot drift from the binary (`BLESS=1 cargo test -p
//! lockgate --bin lockgate` rewrites it).

use clap::CommandFactory;

use super::Cli;

/// Where each command is explained at length. A command missing here fails the test: give it
/// a guide.
const GUIDES: &[(&str, &str)] = &[
    ("test", "[Test any component](../handlers/testing.md)"),
    ("new", "[Handler projects](../handlers/projects.md)"),
    (
        "build",
        "[Handler projects](../handlers/projects.md#lockgate-build)",
    ),
    ("check", "[Validate a config](../operate/check.md)"),
    ("run", "[Run routes](../operate/run.md)"),
    (
        "send",
        "[Run routes](../operate/run.md#commands), [the embedded broker](../operate/brokers/embedded.md)",
    ),
    (
        "tail",
        "[Run routes](../operate/run.md#commands), [the embedded broker](../operate/brokers/embedded.md)",
    ),
    (
        "status",
        "[Observability](../operate/observability.md#lockgate-status)",
    ),
    ("dlq", "[Dead letters](../operate/dead-letters.md)"),
    ("reload", "[Hot reload](../operate/hot-reload.md)"),
    ("migrate", "[State stores](../operate/state-stores.md)"),
    ("config", "[runtime.toml reference](runtime-toml.md)"),
];

/// Width the help is wrapped at, whatever the terminal of whoever renders it.
const WIDTH: usize = 100;

/// The Markdown of docs/reference/cli.md.
pub fn render() -> Result<String, String> {
    let mut root = Cli::command().term_width(WIDTH).max_term_width(WIDTH);
    root.build();
    let mut out = String::from(
        "# Command-line reference\n\n\
         <!-- Generated from the command definitions by runtime/src/cli/reference.rs; a test fails when this file differs. -->\n\n\
         The `--help` of every `lockgate` command, as it prints it. Every command states its exit\n\
         codes; the guides explain them at length.\n\n\
         | command | what | guide |\n|---|---|---|\n",
    );
    for cmd in root.get_subcommands().filter(|c| c.get_name() != "help") {
        let name = cmd.get_name();
        let guide = GUIDES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, g)| *g)
            .ok_or_else(|| format!("command `{name}` has no guide in GUIDES"))?;
        let about = cmd.get_about().map(|a| a.to_string()).unwrap_or_default();
        out.push_str(&format!(
            "| [`lockgate {name}`](#lockgate-{name}) | {} | {guide} |\n",
            about.trim().replace('\n', " ").replace('|', "\\|")
        ));
    }
    section(&mut out, "##", "lockgate", &mut root.clone());
    for cmd in root
        .get_subcommands_mut()
        .filter(|c| c.get_name() != "help")
    {
        let name = format!("lockgate {}", cmd.get_name());
        section(&mut out, "##", &name, &mut cmd.clone());
        for sub in cmd.get_subcommands_mut().filter(|c| c.get_name() != "help") {
            let sub_name = format!("{name} {}", sub.get_name());
            section(&mut out, "###", &sub_name, sub);
        }
    }
    Ok(out)
}

/// One command's heading and its long help.
fn section(out: &mut String, level: &str, name: &str, cmd: &mut clap::Command) {
    let help = cmd.render_long_help().to_string();
    let help: Vec<&str> = help.lines().map(str::trim_end).collect();
    out.push_str(&format!(
        "\n{level} `{name}`\n\n```\n{}\n```\n",
        help.join("\n").trim_end()
    ));
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use clap::CommandFactory;

    use super::Cli;

    /// Commands that read no runtime.toml: `test` runs a component alone, `config` describes
    /// the format, `new` and `build` work on a handler project's directory.
    const WITHOUT_CONFIG: &[&str] = &[
        "lockgate test",
        "lockgate new",
        "lockgate build",
        "lockgate config",
        "lockgate config reference",
    ];

    #[test]
    fn every_command_has_an_example_and_takes_its_config_the_same_way() {
        let mut root = Cli::command();
        root.build();
        let mut problems = Vec::new();
        let mut stack: Vec<(String, clap::Command)> = root
            .get_subcommands()
            .map(|c| (format!("lockgate {}", c.get_name()), c.clone()))
            .collect();
        while let Some((name, mut cmd)) = stack.pop() {
            if name.ends_with(" help") {
                continue;
            }
            stack.extend(
                cmd.get_subcommands()
                    .map(|c| (format!("{name} {}", c.get_name()), c.clone())),
            );
            if cmd.has_subcommands() {
                continue;
            }
            let help = cmd.render_long_help().to_string();
            if !help.contains("Example") {
                problems.push(format!("{name}: no example in --help"));
            }
            let positional = cmd
                .get_arguments()
                .any(|a| a.get_id() == "positional" && a.is_positional());
            let option = cmd.get_arguments().any(|a| {
                a.get_id() == "option"
                    && a.get_short() == Some('c')
                    && a.get_long() == Some("config")
            });
            let reads_config = !WITHOUT_CONFIG.contains(&name.as_str());
            if reads_config && !(positional && option) {
                problems.push(format!(
                    "{name}: the config is not [CONFIG] and -c/--config"
                ));
            }
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }

    #[test]
    fn the_committed_cli_reference_is_the_rendered_one() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/reference/cli.md");
        let rendered = super::render().unwrap_or_else(|e| panic!("{e}"));
        if std::env::var_os("BLESS").is_some() {
            std::fs::write(&path, &rendered).unwrap_or_else(|e| panic!("{e}"));
            return;
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == rendered,
            "docs/reference/cli.md is not what the commands print; run `BLESS=1 cargo test -p lockgate --bin lockgate the_committed_cli_reference` and commit it"
        );
    }
}
