//! What a handler is given besides lockgate's own interfaces (docs/guarantees.md#g9): `config`
//! values that may be [secrets](super::Secret), the host environment variables named in `env`,
//! and the directories of `files`, each preopened read-only.
//!
//! ```toml
//! [handlers.pay]
//! module = "pay.wasm"
//! config = { region = "eu", api_key = { env = "PAY_KEY" }, cert = { file = "secrets/pay.pem" } }
//! env = ["TZ", "PAY_MODE"]
//! files = [{ host = "data/", guest = "/data" }]
//! ```
//!
//! Parsing checks only the shape (names, absolute and distinct guest paths). The values are read
//! by [`HandlerConfig::resolve`], when a handler version is loaded (at start and at every reload)
//! and by `lockgate check`; an unset variable or a missing directory is an error that names the
//! field and where the value was to come from, never a value.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use super::HandlerConfig;
use super::reader::{Problem, Reader, describe, scalar};
use super::schema::HANDLER_FILE;
use super::secret::{Secret, SecretError, parse_secret_value};

/// A value of a handler's `config` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigValue {
    /// A string, number or boolean written in runtime.toml (a number or boolean as its text).
    Plain(String),
    /// `{ env = "NAME" }` or `{ file = "path" }`: read when the handler is loaded, never shown.
    Secret(Secret),
}

impl ConfigValue {
    /// The value the guest gets: as written, or read now from the environment or the file.
    pub fn resolve(&self) -> Result<String, SecretError> {
        match self {
            ConfigValue::Plain(v) => Ok(v.clone()),
            ConfigValue::Secret(s) => s.resolve(),
        }
    }
}

impl fmt::Display for ConfigValue {
    /// A plain value as written; a secret as `<secret: environment variable PAY_KEY>`, never
    /// its value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigValue::Plain(v) => f.write_str(v),
            ConfigValue::Secret(s) => write!(f, "<secret: {}>", s.source()),
        }
    }
}

/// One entry of `files`: a host directory the guest reads at `guest`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirGrant {
    /// `host`, resolved against the config file's directory.
    pub host: PathBuf,
    /// `guest`: the absolute path the guest opens it at.
    pub guest: String,
}

/// What each instance's WASI gets besides the defaults, with every value read.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct WasiGrants {
    /// `env`: name and value of each variable, in the order named.
    pub env: Vec<(String, String)>,
    /// `files`: directories preopened read-only.
    pub dirs: Vec<DirGrant>,
}

impl fmt::Debug for WasiGrants {
    /// The variables' names and the directories; a variable's value may be a secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WasiGrants")
            .field("env", &self.env.iter().map(|(k, _)| k).collect::<Vec<_>>())
            .field("dirs", &self.dirs)
            .finish()
    }
}

/// A handler's `config`, `env` and `files` with every value read: what its instances get.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ResolvedHandler {
    /// `config`, each value as a string, secrets read.
    pub config: BTreeMap<String, String>,
    /// The environment variables and directories.
    pub wasi: WasiGrants,
}

impl fmt::Debug for ResolvedHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResolvedHandler")
            .field("config", &self.config.keys().collect::<Vec<_>>())
            .field("wasi", &self.wasi)
            .finish()
    }
}

impl HandlerConfig {
    /// Reads every value the handler is given: its `config` secrets, the variables of `env` and
    /// the directories of `files` (each must be a directory lockgate can read). `file` is the
    /// config file, which the errors name. Every value that cannot be read is an error naming the
    /// field and the variable or path (`handlers.pay.config.api_key: environment variable PAY_KEY
    /// is not set`), never a value.
    pub fn resolve(&self, file: &Path) -> Result<ResolvedHandler, Vec<SecretError>> {
        let mut errors = Vec::new();
        let mut out = ResolvedHandler::default();
        let fail = |field: String, reason: String| SecretError {
            file: file.to_owned(),
            field,
            reason,
        };
        for (key, value) in &self.config {
            match value.resolve() {
                Ok(v) => {
                    out.config.insert(key.clone(), v);
                }
                Err(e) => errors.push(e),
            }
        }
        for name in &self.env {
            match std::env::var(name) {
                Ok(v) => out.wasi.env.push((name.clone(), v)),
                Err(e) => {
                    let why = match e {
                        std::env::VarError::NotPresent => "is not set",
                        std::env::VarError::NotUnicode(_) => "is not valid UTF-8",
                    };
                    errors.push(fail(
                        format!("handlers.{}.env", self.name),
                        format!("environment variable {name} {why}"),
                    ));
                }
            }
        }
        for (i, dir) in self.files.iter().enumerate() {
            // Listing it proves it is a directory lockgate may read, as the preopen will need.
            match std::fs::read_dir(&dir.host) {
                Ok(_) => out.wasi.dirs.push(dir.clone()),
                Err(e) => errors.push(fail(
                    format!("handlers.{}.files[{i}].host", self.name),
                    format!("directory {}: {e}", dir.host.display()),
                )),
            }
        }
        if errors.is_empty() {
            Ok(out)
        } else {
            Err(errors)
        }
    }
}

/// What a `config` value may be, for error messages.
const CONFIG_VALUE: &str =
    "a string, number or boolean, or a secret ({ env = \"NAME\" } or { file = \"path\" })";

/// Reads table `key` (`config`) of a handler: strings, numbers and booleans as text, and secrets
/// in the one shape of [`super::secret`]. Its keys are the user's.
pub(super) fn parse_config_values(r: &mut Reader<'_>, key: &str) -> BTreeMap<String, ConfigValue> {
    let mut out = BTreeMap::new();
    let Some(t) = r.table(key) else {
        return out;
    };
    for (k, v) in t {
        let path = r.key_path(&format!("{key}.{k}"));
        let value = match (v, scalar(v)) {
            (toml::Value::Table(_), _) => {
                parse_secret_value(r.out, &path, v).map(ConfigValue::Secret)
            }
            (_, Some(s)) => Some(ConfigValue::Plain(s)),
            (other, None) => {
                r.out.problems.push(Problem::new(
                    &path,
                    format!("expected {CONFIG_VALUE}, found {}", describe(other)),
                ));
                None
            }
        };
        if let Some(value) = value {
            out.insert(k.clone(), value);
        }
    }
    out
}

/// Reads `env`: names of host environment variables, each a valid name, none twice.
pub(super) fn parse_env(r: &mut Reader<'_>, key: &str) -> Vec<String> {
    let Some(names) = r.strings(key) else {
        return Vec::new();
    };
    let mut seen = BTreeSet::new();
    let mut bad = Vec::new();
    for name in &names {
        let why = if name.is_empty() {
            Some("an empty name")
        } else if name.contains('=') {
            Some("a name containing `=`")
        } else if name.contains('\0') {
            Some("a name containing a NUL character")
        } else if !seen.insert(name.as_str()) {
            Some("a name given twice")
        } else {
            None
        };
        if let Some(why) = why {
            bad.push(format!("{why}: \"{}\"", name.escape_default()));
        }
    }
    if !bad.is_empty() {
        r.problem(
            key,
            format!(
                "{}; give names of environment variables to pass to the guest",
                bad.join(", ")
            ),
        );
        return Vec::new();
    }
    names
}

/// Reads `files`: an array of `{ host = "dir", guest = "/path" }`, each guest path absolute and
/// given once.
pub(super) fn parse_files(r: &mut Reader<'_>, key: &str) -> Vec<DirGrant> {
    let mut out = Vec::new();
    let Some(value) = r.get(key) else {
        return out;
    };
    let Some(items) = value.as_array() else {
        r.problem(
            key,
            format!(
                "expected an array of {{ host = \"dir\", guest = \"/path\" }}, found {}",
                describe(value)
            ),
        );
        return out;
    };
    let base_dir = r.base_dir().to_owned();
    let mut guests: BTreeSet<String> = BTreeSet::new();
    for (i, item) in items.iter().enumerate() {
        let path = r.key_path(&format!("{key}[{i}]"));
        let Some(t) = item.as_table() else {
            r.out.problems.push(Problem::new(
                &path,
                format!(
                    "expected a table {{ host = \"dir\", guest = \"/path\" }}, found {}",
                    describe(item)
                ),
            ));
            continue;
        };
        let mut e = Reader::new(&path, t, &[&HANDLER_FILE], r.out);
        let host = e.non_empty("host");
        let guest = e.non_empty("guest");
        if !e.has("host") {
            e.problem(
                "host",
                "missing: the host directory to give the guest".into(),
            );
        }
        if !e.has("guest") {
            e.problem(
                "guest",
                "missing: the absolute path the guest opens it at, like \"/data\"".into(),
            );
        }
        e.finish();
        let guest = guest.and_then(|g| {
            if !g.starts_with('/') {
                e.problem(
                    "guest",
                    format!("\"{g}\" is not an absolute path; write it like \"/data\""),
                );
                return None;
            }
            // `/data/` and `/data` are one path to the guest.
            let normal = if g.len() > 1 {
                g.trim_end_matches('/').to_owned()
            } else {
                g.clone()
            };
            if !guests.insert(normal.clone()) {
                e.problem(
                    "guest",
                    format!("\"{g}\" is given to another entry of {key} already"),
                );
                return None;
            }
            Some(normal)
        });
        if let (Some(host), Some(guest)) = (host, guest) {
            out.push(DirGrant {
                host: base_dir.join(host),
                guest,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;
    use crate::config::SecretSource;
    use crate::config::tests::problems;

    fn handler(body: &str) -> HandlerConfig {
        let text = format!("[handlers.pay]\nmodule = \"pay.wasm\"\n{body}");
        let c = Config::parse(Path::new("conf/runtime.toml"), &text).unwrap();
        c.handlers["pay"].clone()
    }

    fn with(body: &str) -> Vec<String> {
        problems(&format!("[handlers.pay]\nmodule = \"pay.wasm\"\n{body}"))
    }

    #[test]
    fn config_values_are_plain_or_secrets() {
        let h = handler(
            "config = { region = \"eu\", n = 3, key = { env = \"PAY_KEY\" }, pem = { file = \"secrets/pay.pem\" } }\n",
        );
        assert_eq!(h.config["region"], ConfigValue::Plain("eu".into()));
        assert_eq!(h.config["n"], ConfigValue::Plain("3".into()));
        let ConfigValue::Secret(key) = &h.config["key"] else {
            panic!("{:?}", h.config["key"]);
        };
        assert_eq!(key.source(), &SecretSource::Env("PAY_KEY".into()));
        assert_eq!(key.field(), "handlers.pay.config.key");
        let ConfigValue::Secret(pem) = &h.config["pem"] else {
            panic!("{:?}", h.config["pem"]);
        };
        // Relative to the config file's directory.
        assert_eq!(
            pem.source(),
            &SecretSource::File(Path::new("conf/secrets/pay.pem").into())
        );
        assert_eq!(h.config["region"].to_string(), "eu");
        assert_eq!(
            h.config["key"].to_string(),
            "<secret: environment variable PAY_KEY>"
        );
    }

    #[test]
    fn env_and_files_parse() {
        let h = handler(
            "env = [\"TZ\", \"PAY_MODE\"]\nfiles = [{ host = \"data/\", guest = \"/data/\" }, { host = \"/etc/ssl\", guest = \"/ssl\" }]\n",
        );
        assert_eq!(h.env, ["TZ", "PAY_MODE"]);
        assert_eq!(
            h.files,
            [
                DirGrant {
                    host: "conf/data/".into(),
                    guest: "/data".into()
                },
                DirGrant {
                    host: "/etc/ssl".into(),
                    guest: "/ssl".into()
                },
            ]
        );
        let bare = handler("");
        assert!(bare.env.is_empty() && bare.files.is_empty() && bare.config.is_empty());
    }

    #[test]
    fn each_wrong_config_value_is_named() {
        assert_eq!(
            with(
                "config = { key = { env = \"\" }, list = [1], both = { env = \"A\", file = \"b\" }, typo = { envv = \"A\" } }\n"
            ),
            [
                "rt.toml: handlers.pay.config.key.env: must not be empty",
                "rt.toml: handlers.pay.config.list: expected a string, number or boolean, or a secret ({ env = \"NAME\" } or { file = \"path\" }), found an array",
                "rt.toml: handlers.pay.config.both: set either env or file, not both",
                "rt.toml: handlers.pay.config.typo.envv: unknown field `envv`; did you mean `env`?",
            ]
        );
    }

    #[test]
    fn each_wrong_env_is_named() {
        assert_eq!(
            with("env = [\"\", \"A=B\", \"C\\u0000\", \"TZ\", \"TZ\"]\n"),
            [
                "rt.toml: handlers.pay.env: an empty name: \"\", a name containing `=`: \"A=B\", a name containing a NUL character: \"C\\u{0}\", a name given twice: \"TZ\"; give names of environment variables to pass to the guest"
            ]
        );
        assert_eq!(
            with("env = \"TZ\"\n"),
            ["rt.toml: handlers.pay.env: expected an array of strings, found string \"TZ\""]
        );
    }

    #[test]
    fn each_wrong_file_entry_is_named() {
        assert_eq!(
            with(
                "files = [{ host = \"a\", guest = \"data\" }, { host = \"b\", guest = \"/d\" }, { host = \"c\", guest = \"/d/\" }, { guest = \"/e\", hots = \"x\" }, \"f\", { host = \"\", guest = \"/g\" }]\n"
            ),
            [
                "rt.toml: handlers.pay.files[0].guest: \"data\" is not an absolute path; write it like \"/data\"",
                "rt.toml: handlers.pay.files[2].guest: \"/d/\" is given to another entry of files already",
                "rt.toml: handlers.pay.files[3].host: missing: the host directory to give the guest",
                "rt.toml: handlers.pay.files[3].hots: unknown field `hots`; did you mean `host`?",
                "rt.toml: handlers.pay.files[4]: expected a table { host = \"dir\", guest = \"/path\" }, found string \"f\"",
                "rt.toml: handlers.pay.files[5].host: must not be empty",
            ]
        );
        assert_eq!(
            with("files = { host = \"a\", guest = \"/a\" }\n"),
            [
                "rt.toml: handlers.pay.files: expected an array of { host = \"dir\", guest = \"/path\" }, found a table"
            ]
        );
    }

    #[test]
    fn resolve_reads_every_value_and_names_every_failure() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("runtime.toml");
        std::fs::create_dir(dir.path().join("data")).unwrap();
        std::fs::write(dir.path().join("pay.pem"), "-----PEM-----\nline\n").unwrap();
        // PATH is set wherever tests run; setting a variable needs `unsafe`.
        let text = "[handlers.pay]\nmodule = \"pay.wasm\"\nconfig = { region = \"eu\", pem = { file = \"pay.pem\" }, path = { env = \"PATH\" } }\nenv = [\"PATH\"]\nfiles = [{ host = \"data\", guest = \"/data\" }]\n";
        let c = Config::parse(&conf, text).unwrap();
        let r = c.handlers["pay"].resolve(&conf).unwrap();
        let path = std::env::var("PATH").unwrap();
        assert_eq!(r.config["region"], "eu");
        // A file's trailing newline is dropped, as for every secret.
        assert_eq!(r.config["pem"], "-----PEM-----\nline");
        assert_eq!(r.config["path"], path);
        assert_eq!(r.wasi.env, [("PATH".to_owned(), path.clone())]);
        assert_eq!(r.wasi.dirs[0].host, dir.path().join("data"));
        assert_eq!(r.wasi.dirs[0].guest, "/data");
        // Debug shows names, never values.
        let shown = format!("{r:?}");
        assert!(!shown.contains(&path) && !shown.contains("PEM"), "{shown}");

        let text = "[handlers.pay]\nmodule = \"pay.wasm\"\nconfig = { key = { env = \"LOCKGATE_GRANT_TEST_UNSET\" }, pem = { file = \"nope.pem\" } }\nenv = [\"PATH\", \"LOCKGATE_GRANT_TEST_UNSET2\"]\nfiles = [{ host = \"data\", guest = \"/data\" }, { host = \"missing\", guest = \"/m\" }, { host = \"pay.pem\", guest = \"/p\" }]\n";
        let c = Config::parse(&conf, text).unwrap();
        let errors: Vec<String> = c.handlers["pay"]
            .resolve(&conf)
            .unwrap_err()
            .iter()
            .map(|e| {
                e.to_string()
                    .replace(&dir.path().display().to_string(), "DIR")
            })
            .collect();
        assert_eq!(
            errors,
            [
                "DIR/runtime.toml: handlers.pay.config.key: environment variable LOCKGATE_GRANT_TEST_UNSET is not set",
                "DIR/runtime.toml: handlers.pay.config.pem: file DIR/nope.pem: No such file or directory (os error 2)",
                "DIR/runtime.toml: handlers.pay.env: environment variable LOCKGATE_GRANT_TEST_UNSET2 is not set",
                "DIR/runtime.toml: handlers.pay.files[1].host: directory DIR/missing: No such file or directory (os error 2)",
                "DIR/runtime.toml: handlers.pay.files[2].host: directory DIR/pay.pem: Not a directory (os error 20)",
            ]
        );
    }
}
