//! Secrets: one shape for every field that holds a password, a token or a URL with credentials.
//!
//! ```toml
//! url = "amqp://user:password@host:5672/%2f"   # the value itself
//! url = { env = "AMQP_URL" }                   # an environment variable
//! url = { file = "secrets/amqp-url" }          # a file, relative to runtime.toml
//! ```
//!
//! A [`Secret`] is resolved where it is used, so a rotated file or variable is read at the next
//! connection; its `Debug` and `Display` never show the value, and its errors name the field and
//! where the value was to come from. The spellings of before (`url_env`, `url_file`,
//! `token_env`, ...) are read as deprecated aliases: they work, with a warning that names the
//! replacement (see [`super::schema::Alias`]).

use std::fmt;
use std::path::{Path, PathBuf};

use super::reader::{Findings, Reader, describe};
use super::schema::{SECRET, Shape};

/// Where a secret's value comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// Written in the config file.
    Inline(String),
    /// `{ env = "NAME" }`: the value of environment variable `NAME`.
    Env(String),
    /// `{ file = "path" }`: the contents of a file (the path resolved against the config file's
    /// directory), its trailing newline dropped.
    File(PathBuf),
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Inline(_) => f.write_str("Inline(<redacted>)"),
            SecretSource::Env(name) => f.debug_tuple("Env").field(name).finish(),
            SecretSource::File(path) => f.debug_tuple("File").field(path).finish(),
        }
    }
}

impl fmt::Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Inline(_) => f.write_str("the value in the config file"),
            SecretSource::Env(name) => write!(f, "environment variable {name}"),
            SecretSource::File(path) => write!(f, "file {}", path.display()),
        }
    }
}

/// A secret field's value, and where to read it (see the module docs).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    /// The config file it was read from (empty when not known), which errors name.
    file: PathBuf,
    /// The field's TOML path (`stores.pg.url`), which errors name.
    field: String,
    source: SecretSource,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Secret")
            .field("file", &self.file)
            .field("field", &self.field)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for Secret {
    /// `stores.pg.url (environment variable PG_URL)`: where it is and where its value comes
    /// from, never the value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.field, self.source)
    }
}

/// A secret that could not be read: the file and field, where its value was to come from and
/// why not (`runtime.toml: stores.pg.url: environment variable PG_URL is not set`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct SecretError {
    /// The config file (empty when not known).
    pub file: PathBuf,
    /// The field's TOML path (`stores.pg.url`).
    pub field: String,
    /// What went wrong, naming the variable or the file (`environment variable PG_URL is not
    /// set`).
    pub reason: String,
}

impl fmt::Display for SecretError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.file.as_os_str().is_empty() {
            write!(f, "{}: ", self.file.display())?;
        }
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl Secret {
    /// A secret of field `field` (a TOML path) read from `source`.
    pub fn new(field: &str, source: SecretSource) -> Self {
        Self {
            file: PathBuf::new(),
            field: field.to_owned(),
            source,
        }
    }

    /// The same secret, as read from config file `file` (which its errors then name).
    pub fn in_file(mut self, file: &Path) -> Self {
        self.file = file.to_owned();
        self
    }

    /// The TOML path of the field it was read from.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// Where the value comes from.
    pub fn source(&self) -> &SecretSource {
        &self.source
    }

    /// The value, if it is written in the config file (so it can be checked when the file is
    /// read).
    pub fn inline(&self) -> Option<&str> {
        match &self.source {
            SecretSource::Inline(v) => Some(v),
            _ => None,
        }
    }

    /// The value: as written, or read now from the environment or the file. An unset or empty
    /// variable and an unreadable or empty file are errors.
    pub fn resolve(&self) -> Result<String, SecretError> {
        let fail = |reason: String| SecretError {
            file: self.file.clone(),
            field: self.field.clone(),
            reason,
        };
        match &self.source {
            SecretSource::Inline(v) => Ok(v.clone()),
            SecretSource::Env(name) => match std::env::var(name) {
                Ok(v) if v.is_empty() => Err(fail(format!("environment variable {name} is empty"))),
                Ok(v) => Ok(v),
                Err(std::env::VarError::NotPresent) => {
                    Err(fail(format!("environment variable {name} is not set")))
                }
                Err(std::env::VarError::NotUnicode(_)) => Err(fail(format!(
                    "environment variable {name} is not valid UTF-8"
                ))),
            },
            SecretSource::File(path) => match std::fs::read_to_string(path) {
                Ok(text) => {
                    let value = text.trim_end_matches(['\n', '\r']);
                    if value.is_empty() {
                        Err(fail(format!("file {} is empty", path.display())))
                    } else {
                        Ok(value.to_owned())
                    }
                }
                Err(e) => Err(fail(format!("file {}: {e}", path.display()))),
            },
        }
    }
}

/// What the table form of a secret looks like, for error messages.
const SHAPES: &str = "a string, { env = \"NAME\" } or { file = \"path\" }";

/// Reads a secret from `value` at TOML path `path`: a non-empty string, or a table with exactly
/// one of `env` and `file`. Problems are recorded in `out`.
pub(super) fn parse_secret_value(
    out: &mut Findings,
    path: &str,
    value: &toml::Value,
) -> Option<Secret> {
    match value {
        toml::Value::String(s) if s.is_empty() => {
            out.problems
                .push(super::Problem::new(path, "must not be empty".to_owned()));
            None
        }
        toml::Value::String(s) => {
            Some(Secret::new(path, SecretSource::Inline(s.clone())).in_file(&out.file))
        }
        toml::Value::Table(t) => {
            let mut r = Reader::new(path, t, &[&SECRET], out);
            let before = r.problem_count();
            let env = r.non_empty("env");
            let file = r.non_empty("file");
            r.finish();
            let source = match (env, file) {
                (Some(_), Some(_)) => {
                    r.problem("", "set either env or file, not both".into());
                    None
                }
                (Some(name), None) => Some(SecretSource::Env(name)),
                (None, Some(f)) => Some(SecretSource::File(r.base_dir().join(f))),
                (None, None) => {
                    if r.problem_count() == before {
                        r.problem(
                            "",
                            "missing: env = \"NAME\" (an environment variable) or file = \"path\""
                                .into(),
                        );
                    }
                    None
                }
            };
            let file = r.out.file.clone();
            source.map(|s| Secret::new(path, s).in_file(&file))
        }
        other => {
            out.problems.push(super::Problem::new(
                path,
                format!("expected {SHAPES}, found {}", describe(other)),
            ));
            None
        }
    }
}

impl Reader<'_> {
    /// Whether secret field `key` is set, in the current spelling or a deprecated one.
    pub(super) fn secret_given(&self, key: &str) -> bool {
        self.has(key)
            || self
                .schema()
                .iter()
                .flat_map(|t| t.aliases.iter())
                .any(|a| a.of == key && self.has(a.key))
    }

    /// Secret field `key`, or its deprecated aliases (`url_env`, `url_file` for `url`) with a
    /// warning naming the replacement. Setting more than one of them is a problem.
    pub(super) fn secret(&mut self, key: &str) -> Option<Secret> {
        let aliases: Vec<_> = self
            .schema()
            .iter()
            .flat_map(|t| t.aliases.iter())
            .filter(|a| a.of == key)
            .collect();
        let given: Vec<&str> = std::iter::once(key)
            .chain(aliases.iter().map(|a| a.key))
            .filter(|k| self.has(k))
            .collect();
        if let [first, second, ..] = given[..] {
            let deprecated = |k: &str| aliases.iter().any(|a| a.key == k);
            let why = if deprecated(second) {
                format!("{second} is a deprecated spelling of {key}")
            } else {
                format!("{first} is a deprecated spelling of {key}")
            };
            let _ = self.get(first);
            let _ = self.get(second);
            self.problem(
                second,
                format!("set either {first} or {second}, not both: {why}"),
            );
            return None;
        }
        if let Some(alias) = aliases.iter().find(|a| given.first() == Some(&a.key)) {
            let name = self.non_empty(alias.key)?;
            let (source, shape) = match alias.shape {
                Shape::Env => (SecretSource::Env(name.clone()), "env"),
                Shape::File => (SecretSource::File(self.base_dir().join(&name)), "file"),
            };
            self.warning(
                alias.key,
                format!(
                    "deprecated: write {key} = {{ {shape} = \"{}\" }} instead",
                    name.escape_default()
                ),
            );
            return Some(Secret::new(&self.key_path(key), source).in_file(&self.out.file));
        }
        let value = self.get(key)?;
        let path = self.key_path(key);
        let before = self.problem_count();
        let secret = parse_secret_value(self.out, &path, value);
        if self.problem_count() != before {
            self.mark_reported(key);
        }
        secret
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn secret(source: SecretSource) -> Secret {
        Secret::new("stores.main.url", source)
    }

    #[test]
    fn an_inline_value_is_itself() {
        let s = secret(SecretSource::Inline("redis://:pw@h".into()));
        assert_eq!(s.resolve().unwrap(), "redis://:pw@h");
        assert_eq!(s.inline(), Some("redis://:pw@h"));
    }

    #[test]
    fn an_env_secret_reads_the_variable_and_names_it_when_unset() {
        // PATH is set wherever tests run (setting a variable needs `unsafe`; an empty one is
        // covered by the `lockgate check` UI cases, whose environment the test sets).
        let s = secret(SecretSource::Env("PATH".into()));
        assert_eq!(s.resolve().unwrap(), std::env::var("PATH").unwrap());
        assert_eq!(s.inline(), None);
        let unset = secret(SecretSource::Env("LOCKGATE_SECRET_TEST_UNSET".into()));
        assert_eq!(
            unset.resolve().unwrap_err().to_string(),
            "stores.main.url: environment variable LOCKGATE_SECRET_TEST_UNSET is not set"
        );
        // Read from a config file, the error names it too.
        let e = unset
            .in_file(Path::new("conf/runtime.toml"))
            .resolve()
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "conf/runtime.toml: stores.main.url: environment variable LOCKGATE_SECRET_TEST_UNSET is not set"
        );
        assert_eq!(
            (e.field.as_str(), e.reason.as_str()),
            (
                "stores.main.url",
                "environment variable LOCKGATE_SECRET_TEST_UNSET is not set"
            )
        );
    }

    #[test]
    fn a_file_secret_drops_the_trailing_newline_and_names_the_file_when_it_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("url");
        std::fs::write(&path, "postgres://u:pw@h/db\r\n\n").unwrap();
        let s = secret(SecretSource::File(path.clone()));
        assert_eq!(s.resolve().unwrap(), "postgres://u:pw@h/db");
        // Only the end is trimmed: a multi-line file (NATS credentials) stays whole.
        std::fs::write(&path, "line 1\n\nline 3\n").unwrap();
        assert_eq!(s.resolve().unwrap(), "line 1\n\nline 3");
        std::fs::write(&path, "\n").unwrap();
        assert_eq!(
            s.resolve().unwrap_err().to_string(),
            format!("stores.main.url: file {} is empty", path.display())
        );
        let missing = dir.path().join("nope");
        let e = secret(SecretSource::File(missing.clone()))
            .resolve()
            .unwrap_err();
        assert_eq!(e.field, "stores.main.url");
        assert!(
            e.reason
                .starts_with(&format!("file {}: No such file", missing.display())),
            "{e}"
        );
    }

    #[test]
    fn debug_and_display_never_show_the_value() {
        let s = secret(SecretSource::Inline("hunter2-password".into()));
        for shown in [
            format!("{s:?}"),
            format!("{s}"),
            format!("{:?}", s.source()),
        ] {
            assert!(!shown.contains("hunter2"), "{shown}");
        }
        assert_eq!(
            s.to_string(),
            "stores.main.url (the value in the config file)"
        );
        let e = secret(SecretSource::Env("PG_URL".into()));
        assert_eq!(
            e.to_string(),
            "stores.main.url (environment variable PG_URL)"
        );
        let f = secret(SecretSource::File(Path::new("/x/y").into()));
        assert_eq!(f.to_string(), "stores.main.url (file /x/y)");
    }

    /// Problems of reading `value` as a secret, or the secret.
    fn parse(value: &str) -> Result<Secret, Vec<String>> {
        let table: toml::Table = format!("url = {value}").parse().unwrap();
        let mut out = Findings {
            base_dir: Path::new("conf").into(),
            ..Findings::default()
        };
        let parsed = parse_secret_value(&mut out, "stores.main.url", &table["url"]);
        match parsed {
            Some(s) if out.problems.is_empty() => Ok(s),
            _ => Err(out
                .problems
                .iter()
                .map(|p| format!("{}: {}", p.path, p.message))
                .collect()),
        }
    }

    #[test]
    fn each_shape_parses() {
        assert_eq!(parse("\"v\"").unwrap().inline(), Some("v"));
        assert_eq!(
            parse("{ env = \"PG_URL\" }").unwrap().source(),
            &SecretSource::Env("PG_URL".into())
        );
        // A file is relative to the config file's directory.
        assert_eq!(
            parse("{ file = \"secrets/pg\" }").unwrap().source(),
            &SecretSource::File(Path::new("conf/secrets/pg").into())
        );
        assert_eq!(parse("\"v\"").unwrap().field(), "stores.main.url");
    }

    #[test]
    fn each_wrong_shape_is_named() {
        let cases = [
            ("\"\"", "stores.main.url: must not be empty"),
            (
                "3",
                "stores.main.url: expected a string, { env = \"NAME\" } or { file = \"path\" }, found integer 3",
            ),
            (
                "{}",
                "stores.main.url: missing: env = \"NAME\" (an environment variable) or file = \"path\"",
            ),
            (
                "{ env = \"A\", file = \"b\" }",
                "stores.main.url: set either env or file, not both",
            ),
            (
                "{ envv = \"A\" }",
                "stores.main.url.envv: unknown field `envv`; did you mean `env`?",
            ),
            ("{ env = \"\" }", "stores.main.url.env: must not be empty"),
            (
                "{ file = 7 }",
                "stores.main.url.file: expected a string, found integer 7",
            ),
        ];
        for (value, want) in cases {
            assert_eq!(parse(value).unwrap_err(), vec![want.to_owned()], "{value}");
        }
    }
}
