//! The walker every table of `runtime.toml` is read with: typed getters that record each problem
//! (with the file's TOML path and the bad value) and keep going, so one run reports them all.
//!
//! A [`Reader`] is bound to the [`schema`](super::schema) tables that describe its TOML table:
//! [`Reader::finish`] reports every key they do not declare (with the closest declared one), and
//! in debug builds a getter asking for an undeclared key panics, so a field cannot be parsed
//! without being declared (and documented) too.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use toml::map::Map as IndexMap;

use super::schema::Table;

/// One problem in a config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Dotted TOML path (`handlers.uppercase.timeout_ms`); empty for the whole file.
    pub path: String,
    /// What is wrong, including the bad value.
    pub message: String,
}

impl Problem {
    /// A problem at `path`.
    pub fn new(path: &str, message: String) -> Self {
        Self {
            path: path.to_owned(),
            message,
        }
    }
}

/// Every problem found in a config file.
#[derive(Clone, Debug, thiserror::Error)]
pub struct ConfigError {
    /// The file, as given.
    pub file: PathBuf,
    /// The problems, in file order where possible.
    pub problems: Vec<Problem>,
}

impl ConfigError {
    pub(super) fn single(file: &Path, path: &str, message: String) -> Self {
        Self {
            file: file.to_owned(),
            problems: vec![Problem::new(path, message)],
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}", format_problem(&self.file, p))?;
        }
        Ok(())
    }
}

/// `file: path: message`, the one format every config problem is printed in.
pub fn format_problem(file: &Path, p: &Problem) -> String {
    if p.path.is_empty() {
        format!("{}: {}", file.display(), p.message)
    } else {
        format!("{}: {}: {}", file.display(), p.path, p.message)
    }
}

/// Describes a TOML value for an error message: its type and, for scalars, the value.
pub(crate) fn describe(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => format!("string \"{s}\""),
        toml::Value::Integer(i) => format!("integer {i}"),
        toml::Value::Float(x) => format!("float {x}"),
        toml::Value::Boolean(b) => format!("boolean {b}"),
        toml::Value::Datetime(d) => format!("datetime {d}"),
        toml::Value::Array(_) => "an array".into(),
        toml::Value::Table(_) => "a table".into(),
    }
}

/// What reading one file found, shared by the readers of all its tables.
#[derive(Debug, Default)]
pub(crate) struct Findings {
    /// The config file, as given (secrets name it in their errors).
    pub file: PathBuf,
    /// Directory relative paths (modules, secret files, certificates) are resolved against.
    pub base_dir: PathBuf,
    /// Everything that makes the file invalid.
    pub problems: Vec<Problem>,
    /// Things that work but should change (deprecated spellings).
    pub warnings: Vec<Problem>,
    /// `(table id, key)` of every declared key present in the file that a getter read: the
    /// schema tests prove with it that every declared key is parsed.
    #[cfg(test)]
    pub seen: BTreeSet<(&'static str, &'static str)>,
}

/// Walks one TOML table, recording every problem found.
pub(crate) struct Reader<'a> {
    path: String,
    /// The table being read.
    pub(super) table: &'a toml::Table,
    /// The schema tables that declare this table's keys.
    schema: &'static [&'static Table],
    /// Keys a problem was reported at, so [`Reader::finish`] does not report them again.
    reported: BTreeSet<String>,
    pub(super) out: &'a mut Findings,
}

impl<'a> Reader<'a> {
    /// A reader of `table` at TOML path `path`, whose keys `schema` declares.
    pub(super) fn new(
        path: &str,
        table: &'a toml::Table,
        schema: &'static [&'static Table],
        out: &'a mut Findings,
    ) -> Self {
        Self {
            path: path.to_owned(),
            table,
            schema,
            reported: BTreeSet::new(),
            out,
        }
    }

    /// A reader of sub-table `key` (already read as `table`), declared by `schema`.
    pub(super) fn child<'b>(
        &'b mut self,
        key: &str,
        table: &'b toml::Table,
        schema: &'static [&'static Table],
    ) -> Reader<'b> {
        Reader::new(&self.key_path(key), table, schema, self.out)
    }

    /// Declares this table's keys by `schema` from now on: a table whose fields depend on its
    /// `kind` is read with every kind's fields until the kind is known.
    pub(super) fn rebind(&mut self, schema: &'static [&'static Table]) {
        self.schema = schema;
    }

    /// The schema tables this reader is bound to.
    pub(super) fn schema(&self) -> &'static [&'static Table] {
        self.schema
    }

    /// Notes that a problem about `key` was recorded elsewhere (under a path of its own), so
    /// [`Reader::finish`] leaves the key alone.
    pub(super) fn mark_reported(&mut self, key: &str) {
        self.reported.insert(key.to_owned());
    }

    /// The TOML path of `key` in this table.
    pub(super) fn key_path(&self, key: &str) -> String {
        if key.is_empty() {
            self.path.clone()
        } else if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// The directory relative paths are resolved against.
    pub(super) fn base_dir(&self) -> &Path {
        &self.out.base_dir
    }

    /// Reports a problem at `key` (the table itself when empty).
    pub(super) fn problem(&mut self, key: &str, message: String) {
        let path = self.key_path(key);
        self.reported.insert(key.to_owned());
        self.out.problems.push(Problem::new(&path, message));
    }

    /// Reports a warning at `key`: it works, but should change.
    pub(super) fn warning(&mut self, key: &str, message: String) {
        let path = self.key_path(key);
        self.out.warnings.push(Problem::new(&path, message));
    }

    /// How many problems the whole file has so far (a parse function compares before and after
    /// to know whether its table is valid).
    pub(super) fn problem_count(&self) -> usize {
        self.out.problems.len()
    }

    /// Whether the table has `key` at all (whatever its type).
    pub(super) fn has(&self, key: &str) -> bool {
        self.table.contains_key(key)
    }

    /// The value of declared key `key`, if present.
    pub(super) fn get(&mut self, key: &str) -> Option<&'a toml::Value> {
        debug_assert!(
            self.schema.iter().any(|t| t.declares(key)),
            "{}: `{key}` is read but not declared in config/schema.rs (tables: {:?})",
            self.path,
            self.schema.iter().map(|t| t.id).collect::<Vec<_>>()
        );
        let value = self.table.get(key);
        #[cfg(test)]
        if value.is_some() {
            for t in self.schema {
                if let Some(k) = t.declared_key(key) {
                    self.out.seen.insert((t.id, k));
                }
            }
        }
        value
    }

    fn typed<T>(
        &mut self,
        key: &str,
        expected: &str,
        f: impl FnOnce(&'a toml::Value) -> Option<T>,
    ) -> Option<T> {
        let v = self.get(key)?;
        match f(v) {
            Some(t) => Some(t),
            None => {
                self.problem(key, format!("expected {expected}, found {}", describe(v)));
                None
            }
        }
    }

    pub(super) fn string(&mut self, key: &str) -> Option<String> {
        self.typed(key, "a string", |v| v.as_str().map(str::to_owned))
    }

    pub(super) fn bool(&mut self, key: &str) -> Option<bool> {
        self.typed(key, "a boolean", toml::Value::as_bool)
    }

    pub(super) fn int(&mut self, key: &str) -> Option<i64> {
        self.typed(key, "an integer", toml::Value::as_integer)
    }

    pub(super) fn table(&mut self, key: &str) -> Option<&'a toml::Table> {
        self.typed(key, "a table", toml::Value::as_table)
    }

    /// An integer or a float, as f64.
    pub(super) fn number(&mut self, key: &str) -> Option<f64> {
        self.typed(key, "a number", |v| match v {
            toml::Value::Integer(i) => Some(*i as f64),
            toml::Value::Float(f) => Some(*f),
            _ => None,
        })
    }

    /// A string that must be one of `options` (name, value); `None` when absent or unknown (an
    /// unknown name is reported, listing the names).
    pub(super) fn choice<T: Copy>(&mut self, key: &str, options: &[(&str, T)]) -> Option<T> {
        let name = self.string(key)?;
        if let Some((_, value)) = options.iter().find(|(n, _)| *n == name) {
            return Some(*value);
        }
        let names: Vec<String> = options.iter().map(|(n, _)| format!("\"{n}\"")).collect();
        let expected = match names.split_last() {
            Some((last, [])) => last.clone(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => String::new(),
        };
        self.problem(
            key,
            format!("unknown value \"{name}\"; expected {expected}"),
        );
        None
    }

    /// An array of strings.
    pub(super) fn strings(&mut self, key: &str) -> Option<Vec<String>> {
        self.typed(key, "an array of strings", |v| {
            v.as_array()?
                .iter()
                .map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
    }

    /// A strictly positive integer (durations, sizes, counts: zero is always a mistake).
    pub(super) fn positive(&mut self, key: &str) -> Option<u64> {
        let v = self.int(key)?;
        if v <= 0 {
            self.problem(key, format!("must be greater than 0, found {v}"));
            return None;
        }
        u64::try_from(v).ok()
    }

    pub(super) fn positive_u32(&mut self, key: &str) -> Option<u32> {
        let v = self.positive(key)?;
        match u32::try_from(v) {
            Ok(n) => Some(n),
            Err(_) => {
                self.problem(key, format!("{v} is too large (at most {})", u32::MAX));
                None
            }
        }
    }

    /// A string that must not be empty.
    pub(super) fn non_empty(&mut self, key: &str) -> Option<String> {
        let s = self.string(key)?;
        if s.is_empty() {
            self.problem(key, "must not be empty".into());
            return None;
        }
        Some(s)
    }

    /// Reads the `[key.<name>]` tables: checks each name is valid and each entry is a table,
    /// parses it with `parse` (its reader bound to `schema`), and keeps the ones that parsed, in
    /// file order.
    pub(super) fn named_tables<T>(
        &mut self,
        key: &str,
        kind: &str,
        schema: &'static [&'static Table],
        mut parse: impl FnMut(&str, &mut Reader<'_>) -> Option<T>,
    ) -> IndexMap<String, T> {
        let mut out = IndexMap::new();
        let Some(tables) = self.table(key) else {
            return out;
        };
        for (name, value) in tables {
            let path = self.key_path(&format!("{key}.{name}"));
            let Some(t) = value.as_table() else {
                self.out.problems.push(Problem::new(
                    &path,
                    format!("expected a table, found {}", describe(value)),
                ));
                continue;
            };
            if let Err(why) = validate_name(name, kind) {
                self.out.problems.push(Problem::new(&path, why));
            }
            let mut r = Reader::new(&path, t, schema, self.out);
            if let Some(parsed) = parse(name, &mut r) {
                out.insert(name.clone(), parsed);
            }
        }
        out
    }

    /// Reports every key of the table its schema does not declare, with the closest declared
    /// key when one is near (deprecated spellings are accepted but never suggested). Keys a
    /// problem was already reported at are left alone.
    pub(super) fn finish(&mut self) {
        let mut known: Vec<&'static str> = Vec::new();
        for t in self.schema {
            for f in t.fields {
                if !known.contains(&f.key) {
                    known.push(f.key);
                }
            }
        }
        let unknown: Vec<&String> = self
            .table
            .keys()
            .filter(|k| {
                !known.contains(&k.as_str())
                    && !self.schema.iter().any(|t| t.alias(k).is_some())
                    && !self.reported.contains(k.as_str())
            })
            .collect();
        for k in unknown {
            let hint = match closest(k, &known) {
                Some(s) => format!("; did you mean `{s}`?"),
                None => format!(" (expected one of: {})", known.join(", ")),
            };
            let path = self.key_path(k);
            self.out
                .problems
                .push(Problem::new(&path, format!("unknown field `{k}`{hint}")));
        }
    }
}

/// A string, number or boolean as a string; `None` for other types.
pub(super) fn scalar(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Handler and route names become kv namespaces, metric labels and log fields: keep them plain.
/// `kind` names what is being named in the message.
fn validate_name(name: &str, kind: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid {kind} name \"{name}\": use 1-64 lower-case letters, digits, `-` or `_`, starting with a letter or digit"
        ))
    }
}

/// The known name within edit distance 2 of `word`, if any (the nearest; the first of equals).
fn closest<'k>(word: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (strsim::levenshtein(word, k), *k))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closest_is_the_nearest_known_name_within_two_edits() {
        let known = ["timeout_ms", "module", "max_outputs", "max_memory_mb"];
        assert_eq!(closest("timout_ms", &known), Some("timeout_ms"));
        assert_eq!(closest("modle", &known), Some("module"));
        assert_eq!(closest("max_output", &known), Some("max_outputs"));
        assert_eq!(closest("retries", &known), None);
        assert_eq!(closest("", &known), None);
    }
}
