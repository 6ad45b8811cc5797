//! `runtime.toml`: schema, defaults and validation.
//!
//! Validation reports *every* problem at once, each with the file, the TOML path and the bad
//! value, because a user fixing a config one error per run is a user we lose. Parsing walks the
//! TOML table by hand (rather than one `serde` derive) so an unknown field in one handler does not
//! hide a bad value in another.
//!
//! Each table's fields are declared once, in [`schema`]: the parser's unknown-field check reads
//! them from there and [`reference::render`] turns them into docs/reference/runtime-toml.md.
//! Files by concern: [`reader`] (the walker and problem reporting), [`runtime`] (`[runtime]`,
//! `[engine]`, `[handlers.*]`), [`stores`], [`brokers`], [`routes`], [`local`], and [`secret`]
//! (the one shape of every password, token and URL with credentials).
//!
//! Example:
//! ```toml
//! version = 1
//!
//! [runtime]
//! state_dir = ".lockgate"
//!
//! [handlers.uppercase]
//! module = "guest-examples/target/wasm32-wasip2/release/uppercase.wasm"
//! timeout_ms = 1000
//! max_memory_mb = 64
//! config = { target = "shouted" }
//! ```

use std::path::{Path, PathBuf};

use toml::map::Map as IndexMap;

mod brokers;
mod grants;
pub mod http;
pub mod local;
mod reader;
pub mod reference;
mod routes;
mod runtime;
pub mod schema;
mod secret;
mod stores;
pub mod telemetry;

pub use brokers::{
    BrokerConfig, BrokerKind, DEFAULT_CONSUMER_TIMEOUT_MS, DEFAULT_MAX_IN_FLIGHT_PER_PARTITION,
    DEFAULT_RABBIT_REQUEST_TIMEOUT_MS, KafkaConfig, MAX_IN_FLIGHT_PER_PARTITION_LIMIT, NatsAuth,
    NatsConfig, Property, RabbitConfig, is_secret_property,
};
pub use grants::{ConfigValue, DirGrant, ResolvedHandler, WasiGrants};
pub use reader::{ConfigError, Problem, format_problem};
pub use routes::{
    BUILTIN_BROKERS, BrokerRef, BrokerSource, DEFAULT_GROUP, DEFAULT_IDEMPOTENCY_LEASE_MS,
    DEFAULT_PREFETCH, DLQ_STORE_PREFIX, DlqTarget, EMBEDDED_STORE, IdempotencyConfig,
    IdempotencyKey, JetStreamSource, LOCAL_BROKER, OUTBOX_TABLE, Ordering, OutboxSource,
    OutputsMode, QueueType, RabbitSource, RouteConfig, SourceOptions, SourceSpec,
};
pub use runtime::{
    DEFAULT_MAX_INSTANCES, DEFAULT_MAX_LOG_RECORDS, DEFAULT_MAX_MEMORY_MB,
    DEFAULT_MAX_MESSAGES_PER_INSTANCE, DEFAULT_MAX_OUTPUT_BYTES, DEFAULT_MAX_OUTPUTS,
    DEFAULT_SHUTDOWN_GRACE_MS, DEFAULT_SQL_MAX_RESULT_BYTES, DEFAULT_SQL_MAX_ROWS,
    DEFAULT_STATE_DIR, DEFAULT_TIMEOUT_MS, EngineConfig, HandlerConfig, Isolation,
    MAX_MEMORY_MB_LIMIT, SCHEMA_VERSION, SqlGrantConfig, WatchMode,
};
pub use secret::{Secret, SecretError, SecretSource};
pub use stores::{POSTGRES_POOL_SIZE, StoreConfig, StoreKind, postgres_schema_name_ok};

use reader::{Findings, Reader};

use self::local::LocalSettings;

/// A validated runtime configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it was read from, as given.
    pub file: PathBuf,
    /// Directory relative paths in the file are resolved against.
    pub base_dir: PathBuf,
    /// Where the embedded store, local broker and compiled cache live.
    pub state_dir: PathBuf,
    /// `[runtime] shutdown_grace_ms`: how long in-flight work may take to finish at shutdown.
    pub shutdown_grace_ms: u64,
    /// `[runtime] admin`: `host:port` of `/metrics`, `/healthz` and `/readyz`; off when unset.
    pub admin: Option<String>,
    /// `[runtime] admin_token`: the token that `POST /reload` must present (`Authorization:
    /// Bearer ...`).
    pub admin_token: Option<Secret>,
    /// `[runtime] watch`: how `lockgate run` notices changed modules and config.
    pub watch: WatchMode,
    /// `[runtime] state`: the store of routes without their own `state` (default `embedded`).
    pub state: String,
    /// Shared state stores defined in `[stores.<name>]`, in file order (`embedded` is built in).
    pub stores: IndexMap<String, StoreConfig>,
    /// Engine settings.
    pub engine: EngineConfig,
    /// Handlers by name, in file order.
    pub handlers: IndexMap<String, HandlerConfig>,
    /// Brokers defined in `[brokers.<name>]`, in file order (`local` is built in).
    pub brokers: IndexMap<String, BrokerConfig>,
    /// Routes by name, in file order.
    pub routes: IndexMap<String, RouteConfig>,
    /// `[local]`: the embedded broker's segments, retention and duplicate window (its DLQ
    /// topics are those of the routes that dead-letter to `local`).
    pub local: LocalSettings,
    /// `[telemetry]`: OTLP export.
    pub telemetry: telemetry::TelemetrySettings,
    /// What works but should change, such as a deprecated spelling (`url_env`), each naming
    /// the replacement. `lockgate check` prints them and `lockgate run` logs them.
    pub warnings: Vec<Problem>,
}

/// The names of the `[<key>.<name>]` tables of `table` (of kind `kind` only, when given),
/// valid or not: references to them are checked against these, so a broken table is reported
/// once rather than again as unknown wherever it is named.
fn names<'t>(table: &'t toml::Table, key: &str, kind: Option<&str>) -> Vec<&'t str> {
    table
        .get(key)
        .and_then(toml::Value::as_table)
        .map(|t| {
            t.iter()
                .filter(|(_, v)| {
                    kind.is_none_or(|k| v.get("kind").and_then(toml::Value::as_str) == Some(k))
                })
                .map(|(name, _)| name.as_str())
                .collect()
        })
        .unwrap_or_default()
}

impl Config {
    /// The name of the store `route` uses: its own `state`, else `[runtime] state`.
    pub fn store_of<'a>(&'a self, route: &'a RouteConfig) -> &'a str {
        route.state.as_deref().unwrap_or(&self.state)
    }

    /// Reads and validates `file`.
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(file)
            .map_err(|e| ConfigError::single(file, "", format!("cannot read the file: {e}")))?;
        Self::parse(file, &text)
    }

    /// Validates `text` as the contents of `file` (which names it in errors and anchors relative
    /// paths).
    pub fn parse(file: &Path, text: &str) -> Result<Self, ConfigError> {
        let (config, problems) = Self::parse_lenient(file, text)?;
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError {
                file: file.to_owned(),
                problems,
            })
        }
    }

    /// Like [`Self::parse`], but keeps going past problems: returns a config holding only the
    /// sections that validated, together with every problem found. `lockgate check` uses it to
    /// load the valid handlers' modules even when another handler's table is broken. Fails only
    /// when the file is not TOML at all.
    pub fn parse_lenient(file: &Path, text: &str) -> Result<(Self, Vec<Problem>), ConfigError> {
        let (config, findings) = Self::read(file, text)?;
        Ok((config, findings.problems))
    }

    /// Every secret the config holds (store and broker URLs, NATS credentials, Kafka secret
    /// properties, the admin token), in file order. `lockgate check` resolves each. A handler's
    /// secrets are read with its other grants by [`HandlerConfig::resolve`].
    pub fn secrets(&self) -> Vec<&Secret> {
        let mut out: Vec<&Secret> = self.admin_token.iter().collect();
        out.extend(self.stores.values().map(|s| &s.url));
        for b in self.brokers.values() {
            match &b.kind {
                BrokerKind::Kafka(k) => out.extend(
                    [
                        &k.properties,
                        &k.consumer_properties,
                        &k.producer_properties,
                    ]
                    .into_iter()
                    .flat_map(|p| p.values())
                    .filter_map(|p| match p {
                        Property::Secret(s) => Some(s),
                        Property::Value(_) => None,
                    }),
                ),
                BrokerKind::Nats(n) => out.extend(n.auth.as_ref().map(|a| match a {
                    NatsAuth::Credentials(s) | NatsAuth::NkeySeed(s) | NatsAuth::Token(s) => s,
                    NatsAuth::UserPassword { password, .. } => password,
                })),
                BrokerKind::RabbitMq(r) => out.push(&r.url),
            }
        }
        out
    }

    /// Reads `text`: the config (with the sections that validated) and what was found.
    fn read(file: &Path, text: &str) -> Result<(Self, Findings), ConfigError> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigError::single(
                file,
                "",
                format!("invalid TOML: {}", e.to_string().trim_end()),
            )
        })?;
        let base_dir = file
            .parent()
            .map(Path::to_path_buf)
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("."));
        let mut findings = Findings {
            file: file.to_owned(),
            base_dir: base_dir.clone(),
            ..Findings::default()
        };
        let mut root = Reader::new("", &table, &[&schema::ROOT], &mut findings);

        if let Some(v) = root.int("version")
            && v != SCHEMA_VERSION
        {
            root.problem(
                "version",
                format!(
                    "unsupported schema version {v}; this lockgate reads version {SCHEMA_VERSION}"
                ),
            );
        }

        let stores = root.named_tables("stores", "store", schema::STORES, stores::parse_store);
        let store_names = names(&table, "stores", None);
        let rt = root.table("runtime");
        let rt = runtime::parse_runtime(&mut root, rt, &store_names);
        let engine = root.table("engine");
        let engine = runtime::parse_engine(&mut root, engine);
        let handlers = root.named_tables("handlers", "handler", &[&schema::HANDLER], |name, r| {
            runtime::parse_handler(name, &base_dir, r)
        });
        let brokers =
            root.named_tables("brokers", "broker", schema::BROKERS, brokers::parse_broker);
        let routes = root.named_tables("routes", "route", &[&schema::ROUTE], |name, r| {
            routes::parse_route(
                name,
                &names(&table, "handlers", None),
                &names(&table, "brokers", None),
                &names(&table, "brokers", Some("nats")),
                &names(&table, "brokers", Some("rabbitmq")),
                &routes::StoreNames {
                    all: &store_names,
                    postgres: &names(&table, "stores", Some("postgres")),
                    default: &rt.state,
                },
                r,
            )
        });
        check_sql_grants(
            &mut root,
            &handlers,
            &routes,
            &store_names,
            &names(&table, "stores", Some("postgres")),
            &rt.state,
        );
        let mut local = match root.table("local") {
            Some(t) => local::parse_local(&mut root.child("local", t, &[&schema::LOCAL])),
            None => LocalSettings::default(),
        };
        // Retention never drops dead letters silently: these topics are unlimited by default.
        local.dlq_topics = routes
            .values()
            .filter_map(|r| match &r.dlq {
                DlqTarget::Broker {
                    broker: BrokerRef::Local,
                    topic,
                } => Some(topic.clone()),
                _ => None,
            })
            .collect();
        let telemetry = match root.table("telemetry") {
            Some(t) => {
                telemetry::parse_telemetry(&mut root.child("telemetry", t, &[&schema::TELEMETRY]))
            }
            None => telemetry::TelemetrySettings::default(),
        };
        root.finish();

        let config = Config {
            file: file.to_owned(),
            base_dir,
            state_dir: rt.state_dir,
            shutdown_grace_ms: rt.shutdown_grace_ms,
            admin: rt.admin,
            admin_token: rt.admin_token,
            watch: rt.watch,
            state: rt.state,
            stores,
            engine,
            handlers,
            brokers,
            routes,
            local,
            telemetry,
            warnings: std::mem::take(&mut findings.warnings),
        };
        Ok((config, findings))
    }
}

/// A handler's `sql` must name a PostgreSQL store, and each route of the handler must keep its
/// idempotency keys in that store: the handler's statements commit in one transaction with the
/// key, and without a key a redelivery would apply them again.
fn check_sql_grants(
    root: &mut Reader<'_>,
    handlers: &IndexMap<String, HandlerConfig>,
    routes: &IndexMap<String, RouteConfig>,
    stores: &[&str],
    postgres: &[&str],
    default_store: &str,
) {
    for h in handlers.values() {
        let Some(sql) = &h.sql else { continue };
        let store = sql.store.as_str();
        match (stores.contains(&store), postgres.contains(&store)) {
            (_, true) => {}
            (true, false) => root.problem(
                &format!("handlers.{}.sql", h.name),
                format!(
                    "store `{}` is not a PostgreSQL store; sql needs a [stores.<name>] with kind = \"postgres\"",
                    sql.store
                ),
            ),
            (false, false) => root.problem(
                &format!("handlers.{}.sql", h.name),
                format!(
                    "no [stores.{}]: sql names the PostgreSQL store the handler's statements run on",
                    sql.store
                ),
            ),
        }
    }
    for r in routes.values() {
        let Some(sql) = r
            .handler
            .as_ref()
            .and_then(|h| handlers.get(h))
            .and_then(|h| h.sql.as_ref())
        else {
            continue;
        };
        let handler = r.handler.as_deref().unwrap_or_default();
        let store = r.state.as_deref().unwrap_or(default_store);
        if store != sql.store {
            root.problem(
                &format!("routes.{}.state", r.name),
                format!(
                    "the route's store is `{store}`, but handler `{handler}` runs its statements on `{}` (sql = \"{}\"): set state = \"{}\", so that they commit in one transaction with the message's idempotency key",
                    sql.store, sql.store, sql.store
                ),
            );
        }
        if r.idempotency.is_none() {
            root.problem(
                &format!("routes.{}.idempotency", r.name),
                format!(
                    "missing: handler `{handler}` runs SQL (sql = \"{}\"), whose effects commit with the message's idempotency key; without one, a redelivered message would apply them again. Add idempotency = {{ key = \"...\" }}",
                    sql.store
                ),
            );
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::schema::{Preset, TABLES, Table};
    use super::*;

    /// The problems of `text` as the lines `lockgate check` prints (empty when it is valid).
    pub(crate) fn problems(text: &str) -> Vec<String> {
        match Config::parse(Path::new("rt.toml"), text) {
            Ok(_) => Vec::new(),
            Err(e) => e.to_string().lines().map(str::to_owned).collect(),
        }
    }

    /// The warnings of a valid `text`, as `lockgate check` prints them (without `warning: `).
    fn warnings(text: &str) -> Vec<String> {
        let config = Config::parse(Path::new("rt.toml"), text).expect("valid");
        config
            .warnings
            .iter()
            .map(|w| format_problem(&config.file, w))
            .collect()
    }

    #[test]
    fn the_examples_together_are_valid_and_set_every_declared_key() {
        let text = schema::full_example();
        let (config, findings) = Config::read(Path::new("runtime.toml"), &text).unwrap();
        let shown: Vec<String> = findings
            .problems
            .iter()
            .map(|p| format_problem(&config.file, p))
            .collect();
        assert!(shown.is_empty(), "{}\n\n{text}", shown.join("\n"));
        assert!(config.warnings.is_empty(), "{:?}", config.warnings);
        let mut missing = Vec::new();
        for t in TABLES {
            for f in t.fields {
                if !findings.seen.contains(&(t.id, f.key)) {
                    missing.push(format!("{}: {}", t.id, f.key));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "declared in config/schema.rs but not set by any table's example, or never read by the parser:\n{}",
            missing.join("\n")
        );
    }

    #[test]
    fn a_handlers_sql_needs_a_postgres_store_and_routes_keyed_in_it() {
        let stores = "[stores.pg]\nkind = \"postgres\"\nurl = \"postgres://u@h/db\"\n[stores.r]\nkind = \"redis\"\nurl = \"redis://h\"\n";
        let handler = |sql: &str| format!("[handlers.h]\nmodule = \"h.wasm\"\nsql = \"{sql}\"\n");
        let route = "[routes.a]\nhandler = \"h\"\nsource = { topic = \"t\" }\n";
        // A keyed route on the handler's store is valid.
        let ok = format!(
            "{stores}{}{route}state = \"pg\"\nidempotency = {{ key = \"key\" }}\n",
            handler("pg")
        );
        assert_eq!(problems(&ok), Vec::<String>::new());
        let p = problems(&format!("{stores}{}", handler("r")));
        assert!(
            p.iter()
                .any(|l| l.contains("handlers.h.sql: store `r` is not a PostgreSQL store")),
            "{p:?}"
        );
        let p = problems(&format!("{stores}{}", handler("nope")));
        assert!(
            p.iter()
                .any(|l| l.contains("handlers.h.sql: no [stores.nope]")),
            "{p:?}"
        );
        let p = problems(&format!("{stores}{}{route}", handler("pg")));
        assert!(
            p.iter()
                .any(|l| l.contains("routes.a.state: the route's store is `embedded`")),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|l| l.contains("routes.a.idempotency: missing: handler `h` runs SQL")),
            "{p:?}"
        );
        let p = problems("[handlers.h]\nmodule = \"h.wasm\"\nsql_role = \"app\"\n");
        assert!(
            p.iter()
                .any(|l| l.contains("handlers.h.sql_role: has no effect without sql")),
            "{p:?}"
        );
    }

    #[test]
    fn unknown_keys_are_refused_in_every_table_of_the_example() {
        // The other half of "declared = parsed": a key the schema does not declare is refused
        // wherever it appears, so nothing undeclared can be accepted silently.
        let text = schema::full_example();
        let mut tables = 0;
        for (no, line) in text.lines().enumerate() {
            if !(line.starts_with('[') && line.ends_with(']')) {
                continue;
            }
            tables += 1;
            let mut lines: Vec<&str> = text.lines().collect();
            lines.insert(no + 1, "not_a_field = 1");
            let p = problems(&lines.join("\n"));
            assert_eq!(p.len(), 1, "{line}: {p:?}");
            assert!(p[0].contains("not_a_field: unknown field"), "{line}: {p:?}");
        }
        assert!(tables > 20, "{tables}");
    }

    /// A config around one table of `table`, with `{X}` where a field goes, and fields of it
    /// the template cannot take alone.
    const TEMPLATES: &[(&Table, &str, &[&str])] = &[
        (&schema::ROOT, "{X}", &[]),
        (&schema::RUNTIME, "[runtime]\n{X}", &[]),
        (&schema::ENGINE, "[engine]\n{X}", &[]),
        (
            &schema::HANDLER,
            "[handlers.h]\nmodule = \"h.wasm\"\n{X}",
            // Only with `sql` (the entry below).
            &["sql_max_rows", "sql_max_result_bytes"],
        ),
        (
            &schema::HANDLER,
            "[stores.pg]\nkind = \"postgres\"\nurl = \"postgres://u@h/db\"\n[handlers.h]\nmodule = \"h.wasm\"\nsql = \"pg\"\n{X}",
            &[],
        ),
        (
            &schema::HANDLER_HTTP,
            "[handlers.h]\nmodule = \"h.wasm\"\n[handlers.h.http]\nallowed_hosts = [\"https://a.example\"]\n{X}",
            &["allowed_hosts"],
        ),
        (
            &schema::STORE_REDIS,
            "[stores.s]\nkind = \"redis\"\nurl = \"redis://h\"\n{X}",
            &[],
        ),
        (
            &schema::STORE_POSTGRES,
            "[stores.s]\nkind = \"postgres\"\nurl = \"postgres://u@h/db\"\n{X}",
            &[],
        ),
        (
            &schema::KAFKA,
            "[brokers.k]\nkind = \"kafka\"\nbootstrap_servers = \"h:9092\"\n{X}",
            &[],
        ),
        (
            &schema::NATS,
            "[brokers.n]\nkind = \"nats\"\nservers = \"nats://h:4222\"\n{X}",
            &[],
        ),
        (
            &schema::RABBITMQ,
            "[brokers.r]\nkind = \"rabbitmq\"\nurl = \"amqp://h\"\n{X}",
            &[],
        ),
        (&schema::LOCAL, "[local]\n{X}", &[]),
        (
            &schema::TELEMETRY_OTLP,
            "[telemetry.otlp]\nendpoint = \"http://c:4318\"\n{X}",
            &[],
        ),
        (
            &schema::ROUTE,
            "[handlers.h]\nmodule = \"h.wasm\"\n[routes.r]\nhandler = \"h\"\nsource = { topic = \"t\" }\n{X}",
            &[],
        ),
        (
            &schema::SOURCE,
            "[handlers.h]\nmodule = \"h.wasm\"\n[routes.r]\nhandler = \"h\"\n[routes.r.source]\ntopic = \"t\"\n{X}",
            &[],
        ),
        (
            &schema::SOURCE_JETSTREAM,
            "[brokers.n]\nkind = \"nats\"\nservers = \"nats://h:4222\"\n[handlers.h]\nmodule = \"h.wasm\"\n[routes.r]\nhandler = \"h\"\n[routes.r.source]\nbroker = \"n\"\ntopic = \"t\"\nstream = \"S\"\n{X}",
            &[],
        ),
        (
            &schema::SOURCE_RABBITMQ,
            "[brokers.b]\nkind = \"rabbitmq\"\nurl = \"amqp://h\"\n[handlers.h]\nmodule = \"h.wasm\"\n[routes.r]\nhandler = \"h\"\n[routes.r.source]\nbroker = \"b\"\ntopic = \"q\"\nexchange = \"x\"\n{X}",
            &[],
        ),
        (
            &schema::SOURCE_OUTBOX,
            "[stores.pg]\nkind = \"postgres\"\nurl = \"postgres://u@h/db\"\n[routes.r]\noutputs = { broker = \"local\" }\n[routes.r.source]\noutbox = \"pg\"\n{X}",
            &[],
        ),
        (
            &schema::OUTPUTS,
            "[handlers.h]\nmodule = \"h.wasm\"\n[routes.r]\nhandler = \"h\"\nsource = { topic = \"t\" }\n[routes.r.outputs]\ntopics = [\"o\"]\n{X}",
            &[],
        ),
        (
            &schema::RETRY,
            "[handlers.h]\nmodule = \"h.wasm\"\n[routes.r]\nhandler = \"h\"\nsource = { topic = \"t\" }\n[routes.r.retry]\n{X}",
            &["jitter_fraction"],
        ),
        (
            &schema::RETRY,
            "[handlers.h]\nmodule = \"h.wasm\"\n[routes.r]\nhandler = \"h\"\nsource = { topic = \"t\" }\n[routes.r.retry]\njitter = \"proportional\"\n{X}",
            &["jitter"],
        ),
        (
            &schema::BREAKER,
            "[handlers.h]\nmodule = \"h.wasm\"\n[routes.r]\nhandler = \"h\"\nsource = { topic = \"t\" }\n[routes.r.circuit_breaker]\nconsecutive_failures = 3\n{X}",
            &[],
        ),
        (
            &schema::IDEMPOTENCY,
            "[handlers.h]\nmodule = \"h.wasm\"\n[routes.r]\nhandler = \"h\"\nsource = { topic = \"t\" }\n[routes.r.idempotency]\nkey = \"key\"\n{X}",
            &[],
        ),
    ];

    #[test]
    fn declared_defaults_are_the_parsers_defaults() {
        let mut checked = Vec::new();
        for (table, template, skip) in TEMPLATES {
            let without = template.replace("{X}", "");
            let base = Config::parse(Path::new("rt.toml"), &without)
                .unwrap_or_else(|e| panic!("{}: {e}", table.id));
            for f in table.fields {
                let value = match f.default {
                    Preset::Int(n) => n.to_string(),
                    Preset::Float(x) => format!("{x:?}"),
                    Preset::Bool(b) => b.to_string(),
                    Preset::Str(s) => format!("{s:?}"),
                    Preset::Required | Preset::Unset | Preset::Text(_) => continue,
                };
                if skip.contains(&f.key) {
                    continue;
                }
                let with = template.replace("{X}", &format!("{} = {value}\n", f.key));
                let set = Config::parse(Path::new("rt.toml"), &with)
                    .unwrap_or_else(|e| panic!("{}.{} = {value}: {e}", table.id, f.key));
                assert_eq!(
                    format!("{set:?}"),
                    format!("{base:?}"),
                    "{}.{}: the declared default {value} is not what the parser takes when the field is absent",
                    table.id,
                    f.key
                );
                checked.push((table.id, f.key));
            }
        }
        // Every declared default is checked: a table with one needs a template above.
        for t in TABLES {
            for f in t.fields {
                if matches!(
                    f.default,
                    Preset::Int(_) | Preset::Float(_) | Preset::Bool(_) | Preset::Str(_)
                ) {
                    assert!(
                        checked.contains(&(t.id, f.key)),
                        "{}.{} has a default no template checks",
                        t.id,
                        f.key
                    );
                }
            }
        }
    }

    /// Every deprecated spelling, each in a table of its own where needed. (Stores are read
    /// before `[runtime]`, whose `state` names one: their findings come first.)
    const OLD: &str = "[runtime]\nadmin_token_env = \"TOKEN\"\n\n[stores.r]\nkind = \"redis\"\nurl_env = \"REDIS_URL\"\n\n[stores.p]\nkind = \"postgres\"\nurl_env = \"PG_URL\"\n\n[brokers.n1]\nkind = \"nats\"\nservers = \"nats://h:4222\"\ncredentials_file = \"n.creds\"\n\n[brokers.n2]\nkind = \"nats\"\nservers = \"nats://h:4222\"\nnkey_seed_file = \"n.nk\"\n\n[brokers.n3]\nkind = \"nats\"\nservers = \"nats://h:4222\"\ntoken_env = \"NATS_TOKEN\"\n\n[brokers.n4]\nkind = \"nats\"\nservers = \"nats://h:4222\"\nuser = \"u\"\npassword_env = \"NATS_PASSWORD\"\n\n[brokers.r1]\nkind = \"rabbitmq\"\nurl_env = \"AMQP_URL\"\n\n[brokers.r2]\nkind = \"rabbitmq\"\nurl_file = \"amqp-url\"\n";

    #[test]
    fn deprecated_spellings_still_work_with_a_warning_naming_the_replacement() {
        assert_eq!(
            warnings(OLD),
            [
                "rt.toml: stores.r.url_env: deprecated: write url = { env = \"REDIS_URL\" } instead",
                "rt.toml: stores.p.url_env: deprecated: write url = { env = \"PG_URL\" } instead",
                "rt.toml: runtime.admin_token_env: deprecated: write admin_token = { env = \"TOKEN\" } instead",
                "rt.toml: brokers.n1.credentials_file: deprecated: write credentials = { file = \"n.creds\" } instead",
                "rt.toml: brokers.n2.nkey_seed_file: deprecated: write nkey_seed = { file = \"n.nk\" } instead",
                "rt.toml: brokers.n3.token_env: deprecated: write token = { env = \"NATS_TOKEN\" } instead",
                "rt.toml: brokers.n4.password_env: deprecated: write password = { env = \"NATS_PASSWORD\" } instead",
                "rt.toml: brokers.r1.url_env: deprecated: write url = { env = \"AMQP_URL\" } instead",
                "rt.toml: brokers.r2.url_file: deprecated: write url = { file = \"amqp-url\" } instead",
            ]
        );
        // Each means exactly what its replacement does.
        let mut new = OLD.to_owned();
        for (old, replacement) in [
            (
                "admin_token_env = \"TOKEN\"",
                "admin_token = { env = \"TOKEN\" }",
            ),
            ("url_env = \"REDIS_URL\"", "url = { env = \"REDIS_URL\" }"),
            ("url_env = \"PG_URL\"", "url = { env = \"PG_URL\" }"),
            (
                "credentials_file = \"n.creds\"",
                "credentials = { file = \"n.creds\" }",
            ),
            (
                "nkey_seed_file = \"n.nk\"",
                "nkey_seed = { file = \"n.nk\" }",
            ),
            (
                "token_env = \"NATS_TOKEN\"",
                "token = { env = \"NATS_TOKEN\" }",
            ),
            (
                "password_env = \"NATS_PASSWORD\"",
                "password = { env = \"NATS_PASSWORD\" }",
            ),
            ("url_env = \"AMQP_URL\"", "url = { env = \"AMQP_URL\" }"),
            ("url_file = \"amqp-url\"", "url = { file = \"amqp-url\" }"),
        ] {
            assert!(new.contains(old), "{old}");
            new = new.replace(old, replacement);
        }
        assert!(warnings(&new).is_empty());
        let (old, new) = (
            Config::parse(Path::new("rt.toml"), OLD).unwrap(),
            Config::parse(Path::new("rt.toml"), &new).unwrap(),
        );
        assert_eq!(old.secrets().len(), 9);
        assert_eq!(old.secrets(), new.secrets());
        assert_eq!(format!("{:?}", old.brokers), format!("{:?}", new.brokers));
        // Every alias the schema declares is exercised above.
        let (_, findings) = Config::read(Path::new("rt.toml"), OLD).unwrap();
        for t in TABLES {
            for a in t.aliases {
                assert!(findings.seen.contains(&(t.id, a.key)), "{}.{}", t.id, a.key);
            }
        }
    }

    #[test]
    fn deprecated_spellings_are_never_suggested() {
        assert_eq!(
            problems("[stores.r]\nkind = \"redis\"\nurl = \"redis://h\"\nurl_en = \"X\"\n"),
            [
                "rt.toml: stores.r.url_en: unknown field `url_en` (expected one of: kind, url, prefix)"
            ]
        );
    }

    #[test]
    fn every_secret_is_listed_in_file_order() {
        let config = Config::parse(Path::new("runtime.toml"), &schema::full_example()).unwrap();
        let fields: Vec<&str> = config.secrets().iter().map(|s| s.field()).collect();
        assert_eq!(
            fields,
            [
                "runtime.admin_token",
                "stores.shared.url",
                "stores.pg.url",
                "brokers.kafka.properties.sasl.password",
                "brokers.nats.credentials",
                "brokers.nats-nkey.nkey_seed",
                "brokers.nats-token.token",
                "brokers.nats-user.password",
                "brokers.rabbit.url",
            ]
        );
    }
}
