//! `[stores.<name>]`: shared state stores (Redis, PostgreSQL) for idempotency keys and guest kv.
//!
//! Example:
//! ```toml
//! [stores.shared]
//! kind = "redis"
//! url = { env = "REDIS_URL" }          # or "redis://..." inline, or { file = "path" }
//! prefix = "lockgate"                  # every key starts with it
//!
//! [stores.pg]
//! kind = "postgres"
//! url = { env = "DATABASE_URL" }       # postgres://user:password@host:5432/db
//! schema = "lockgate"                  # created and migrated by the runtime
//! pool_size = 16
//! ```

use super::reader::Reader;
use super::routes::EMBEDDED_STORE;
use super::schema;
use super::secret::{Secret, SecretError};

/// One `[stores.<name>]` table: a shared state store for idempotency keys and guest kv.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// The store's name (the table key), used by `state = "<name>"`.
    pub name: String,
    /// `url`: where the server is, with its credentials.
    pub url: Secret,
    /// What it is.
    pub kind: StoreKind,
}

/// The kind of a `[stores.<name>]` table, with its settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreKind {
    /// `kind = "redis"`.
    Redis {
        /// `prefix` of every key (default `lockgate`).
        prefix: String,
    },
    /// `kind = "postgres"`.
    Postgres {
        /// `schema` holding the tables (default `lockgate`).
        schema: String,
        /// `pool_size`: most connections (default 16).
        pool_size: usize,
    },
}

/// Default `pool_size` of a PostgreSQL store: most connections it opens.
pub const POSTGRES_POOL_SIZE: usize = 16;
/// Default `prefix` of a Redis store's keys.
pub const DEFAULT_STORE_PREFIX: &str = "lockgate";
/// Default `schema` of a PostgreSQL store.
pub const DEFAULT_STORE_SCHEMA: &str = "lockgate";

impl StoreConfig {
    /// The URL, read from the environment or a file when configured so (see
    /// [`Secret::resolve`]).
    pub fn url(&self) -> Result<String, SecretError> {
        self.url.resolve()
    }
}

/// Whether `name` can be a PostgreSQL store's `schema`: the store uses it unquoted in every
/// statement, so only names that need no quoting (and fit PostgreSQL's 63 bytes) are accepted.
pub fn postgres_schema_name_ok(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63
}

/// Reports `name` at `key` unless it is `embedded` or a declared store; true if it is known.
pub(super) fn check_store(r: &mut Reader<'_>, key: &str, name: &str, declared: &[&str]) -> bool {
    if name == EMBEDDED_STORE || declared.contains(&name) {
        return true;
    }
    let mut known = vec![EMBEDDED_STORE];
    known.extend(declared.iter().filter(|n| **n != EMBEDDED_STORE));
    r.problem(
        key,
        format!(
            "unknown state store `{name}` (defined: {}; add a [stores.{name}] table)",
            known.join(", ")
        ),
    );
    false
}

/// The kind of store a `[stores.<name>]` table defines.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Redis,
    Postgres,
}

/// Reads one `[stores.<name>]` table (the reader is bound to every kind's fields).
pub(super) fn parse_store(name: &str, r: &mut Reader<'_>) -> Option<StoreConfig> {
    let before = r.problem_count();
    if name == EMBEDDED_STORE {
        r.problem(
            "",
            format!("`{name}` is the built-in embedded store and cannot be redefined"),
        );
    }
    if !r.has("kind") {
        r.problem("kind", "missing: \"redis\" or \"postgres\"".into());
    }
    let kind = r.choice(
        "kind",
        &[("redis", Kind::Redis), ("postgres", Kind::Postgres)],
    );
    match kind {
        Some(Kind::Redis) => r.rebind(&[&schema::STORE_REDIS]),
        Some(Kind::Postgres) => r.rebind(&[&schema::STORE_POSTGRES]),
        None => {}
    }
    let url = r.secret("url");
    if !r.secret_given("url") {
        r.problem(
            "url",
            "missing: url = \"redis://...\" / \"postgres://...\", { env = \"<VARIABLE>\" } or { file = \"<path>\" }"
                .into(),
        );
    }
    let store_kind = match kind {
        Some(Kind::Redis) => {
            let prefix = r
                .string("prefix")
                .unwrap_or_else(|| DEFAULT_STORE_PREFIX.into());
            if prefix.is_empty() {
                r.problem("prefix", "must not be empty".into());
            }
            r.finish();
            if let Some(u) = url.as_ref().and_then(Secret::inline)
                && !(u.starts_with("redis://")
                    || u.starts_with("rediss://")
                    || u.starts_with("unix://"))
            {
                // Never echo the URL: it may hold a password.
                r.problem(
                    "url",
                    "not a Redis URL: expected redis://host:port[/db], rediss://... or unix://..."
                        .into(),
                );
            }
            Some(StoreKind::Redis { prefix })
        }
        Some(Kind::Postgres) => {
            let schema = r
                .string("schema")
                .unwrap_or_else(|| DEFAULT_STORE_SCHEMA.into());
            if !postgres_schema_name_ok(&schema) {
                r.problem(
                    "schema",
                    format!("\"{schema}\" is not a usable schema name: lowercase letters, digits and _, starting with a letter or _"),
                );
            }
            let pool_size = r.positive("pool_size").map_or(POSTGRES_POOL_SIZE, |n| {
                usize::try_from(n).unwrap_or(usize::MAX)
            });
            r.finish();
            if let Some(u) = url.as_ref().and_then(Secret::inline)
                && u.parse::<tokio_postgres::Config>().is_err()
            {
                r.problem(
                    "url",
                    "not a PostgreSQL URL: expected postgres://user@host:5432/db".into(),
                );
            }
            Some(StoreKind::Postgres { schema, pool_size })
        }
        None => None,
    };
    if r.problem_count() != before {
        return None;
    }
    Some(StoreConfig {
        name: name.to_owned(),
        url: url?,
        kind: store_kind?,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::tests::problems;
    use crate::config::{Config, DEFAULT_IDEMPOTENCY_LEASE_MS, SecretSource};

    #[test]
    fn schema_names() {
        assert!(postgres_schema_name_ok("lockgate"));
        assert!(postgres_schema_name_ok("_t1"));
        assert!(!postgres_schema_name_ok("1x"));
        assert!(!postgres_schema_name_ok("a-b"));
        assert!(!postgres_schema_name_ok("A"));
        assert!(!postgres_schema_name_ok(""));
        assert!(!postgres_schema_name_ok("x; drop table y"));
    }

    #[test]
    fn stores_parse_and_routes_pick_one() {
        let c = Config::parse(
            Path::new("conf/rt.toml"),
            "[runtime]\nstate = \"shared\"\n\n[stores.shared]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379/2\"\n\n[stores.pg]\nkind = \"postgres\"\nurl = { env = \"PG_URL\" }\nschema = \"lg_1\"\npool_size = 4\n\n[stores.pg2]\nkind = \"postgres\"\nurl = { file = \"secrets/pg\" }\n\n[handlers.h]\nmodule = \"h.wasm\"\n\n[routes.a]\nhandler = \"h\"\nsource = { topic = \"t\" }\nidempotency = { key = \"key\", lease_ms = 5000 }\n\n[routes.b]\nhandler = \"h\"\nsource = { topic = \"u\" }\nstate = \"pg\"\n\n[routes.c]\nhandler = \"h\"\nsource = { topic = \"v\" }\nstate = \"embedded\"\n",
        )
        .unwrap();
        assert_eq!(c.state, "shared");
        assert_eq!(
            c.stores["shared"].kind,
            StoreKind::Redis {
                prefix: "lockgate".into()
            }
        );
        assert_eq!(
            c.stores["shared"].url(),
            Ok("redis://127.0.0.1:6379/2".to_owned())
        );
        assert_eq!(
            c.stores["pg"].kind,
            StoreKind::Postgres {
                schema: "lg_1".into(),
                pool_size: 4
            }
        );
        assert_eq!(
            c.stores["pg"].url.source(),
            &SecretSource::Env("PG_URL".into())
        );
        assert_eq!(c.stores["pg"].url.field(), "stores.pg.url");
        assert_eq!(
            c.stores["pg2"].url.source(),
            &SecretSource::File(Path::new("conf/secrets/pg").into())
        );
        assert_eq!(c.store_of(&c.routes["a"]), "shared");
        assert_eq!(c.store_of(&c.routes["b"]), "pg");
        assert_eq!(c.store_of(&c.routes["c"]), "embedded");
        let idem = c.routes["a"].idempotency.as_ref().unwrap();
        assert_eq!(idem.lease, std::time::Duration::from_millis(5000));
        // Defaults: the embedded store, a 30 s lease.
        let d = Config::parse(
            Path::new("rt.toml"),
            "[handlers.h]\nmodule = \"h.wasm\"\n\n[routes.a]\nhandler = \"h\"\nsource = { topic = \"t\" }\nidempotency = { key = \"key\" }\n",
        )
        .unwrap();
        assert_eq!(d.store_of(&d.routes["a"]), "embedded");
        assert_eq!(
            d.routes["a"].idempotency.as_ref().unwrap().lease,
            std::time::Duration::from_millis(DEFAULT_IDEMPOTENCY_LEASE_MS)
        );
    }

    #[test]
    fn store_mistakes_are_named() {
        assert_eq!(
            problems(
                "[runtime]\nstate = \"redis\"\n\n[stores.embedded]\nkind = \"redis\"\nurl = \"redis://x\"\n\n[stores.a]\nkind = \"mongo\"\nurl = \"x\"\n\n[stores.b]\nkind = \"redis\"\nurl = \"http://u:secret@x\"\nschema = \"s\"\n\n[stores.c]\nkind = \"postgres\"\nurl = \"postgres://u@h/db\"\nurl_env = \"X\"\nschema = \"Bad-Name\"\n\n[stores.d]\nkind = \"postgres\"\n\n[stores.e]\nkind = \"redis\"\nurl = { env = 5 }\n\n[handlers.h]\nmodule = \"h.wasm\"\n\n[routes.r]\nhandler = \"h\"\nsource = { topic = \"t\" }\nstate = \"sharde\"\nidempotency = { key = \"key\", lease_ms = 0 }\n"
            ),
            vec![
                "rt.toml: stores.embedded: `embedded` is the built-in embedded store and cannot be redefined",
                "rt.toml: stores.a.kind: unknown value \"mongo\"; expected \"redis\" or \"postgres\"",
                "rt.toml: stores.b.schema: unknown field `schema` (expected one of: kind, url, prefix)",
                "rt.toml: stores.b.url: not a Redis URL: expected redis://host:port[/db], rediss://... or unix://...",
                "rt.toml: stores.c.url_env: set either url or url_env, not both: url_env is a deprecated spelling of url",
                "rt.toml: stores.c.schema: \"Bad-Name\" is not a usable schema name: lowercase letters, digits and _, starting with a letter or _",
                "rt.toml: stores.d.url: missing: url = \"redis://...\" / \"postgres://...\", { env = \"<VARIABLE>\" } or { file = \"<path>\" }",
                "rt.toml: stores.e.url.env: expected a string, found integer 5",
                "rt.toml: runtime.state: unknown state store `redis` (defined: embedded, a, b, c, d, e; add a [stores.redis] table)",
                "rt.toml: routes.r.state: unknown state store `sharde` (defined: embedded, a, b, c, d, e; add a [stores.sharde] table)",
                "rt.toml: routes.r.idempotency.lease_ms: must be greater than 0, found 0",
            ]
        );
    }
}
