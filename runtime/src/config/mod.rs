//! `runtime.toml`: schema, defaults and validation.
//!
//! Validation reports *every* problem at once, each with the file, the TOML path and the bad
//! value, because a user fixing a config one error per run is a user we lose. Parsing walks the
//! TOML table by hand (rather than one `serde` derive) so an unknown field in one handler does not
//! hide a bad value in another.
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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use toml::map::Map as IndexMap;

pub mod local;
mod routes;

pub use routes::{
    BUILTIN_BROKERS, DEFAULT_GROUP, DEFAULT_IDEMPOTENCY_LEASE_MS, DEFAULT_PREFETCH,
    DLQ_STORE_PREFIX, EMBEDDED_STORE, Endpoint, IdempotencyConfig, IdempotencyKey, JetStreamSource,
    OUTBOX_TABLE, Ordering, OutboxSource, OutputsMode, QueueType, RabbitSource, RouteConfig,
};

use self::local::LocalSettings;

/// The only schema version so far.
pub const SCHEMA_VERSION: i64 = 1;
/// Default deadline of one `handle` call.
pub const DEFAULT_TIMEOUT_MS: u64 = 1_000;
/// Default cap on an instance's memory. Python guests need ~13 MiB just to start.
pub const DEFAULT_MAX_MEMORY_MB: u64 = 128;
/// Largest `max_memory_mb` accepted (the size of a pooling-allocator memory slot).
pub const MAX_MEMORY_MB_LIMIT: u64 = 4_096;
/// Default largest output in bytes (1 MiB, the default message limit of Kafka and NATS).
pub const DEFAULT_MAX_OUTPUT_BYTES: u64 = 1024 * 1024;
/// Default most outputs per invocation.
pub const DEFAULT_MAX_OUTPUTS: u32 = 1_000;
/// Default most log records kept per invocation.
pub const DEFAULT_MAX_LOG_RECORDS: u32 = 100;
/// Default calls before a reused instance is replaced (bounds leaks inside a guest).
pub const DEFAULT_MAX_MESSAGES_PER_INSTANCE: u64 = 10_000;
/// Default pool size (instances alive at once).
pub const DEFAULT_MAX_INSTANCES: u32 = 1_000;
/// Default time in-flight messages get to finish after SIGINT/SIGTERM.
pub const DEFAULT_SHUTDOWN_GRACE_MS: u64 = 10_000;
/// Default state directory, relative to the config file.
pub const DEFAULT_STATE_DIR: &str = ".lockgate";

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
    /// `[runtime] admin_token_env`: the environment variable holding the token that `POST
    /// /reload` must present (`Authorization: Bearer ...`).
    pub admin_token_env: Option<String>,
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
}

/// One `[stores.<name>]` table: a shared state store for idempotency keys and guest kv.
///
/// Example:
/// ```toml
/// [stores.shared]
/// kind = "redis"
/// url = "redis://127.0.0.1:6379/0"     # or url_env = "REDIS_URL" to keep a password out
/// prefix = "lockgate"                  # every key starts with it
///
/// [stores.pg]
/// kind = "postgres"
/// url_env = "DATABASE_URL"             # postgres://user:password@host:5432/db
/// schema = "lockgate"                  # created and migrated by the runtime
/// pool_size = 16
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// The store's name (the table key), used by `state = "<name>"`.
    pub name: String,
    /// Where its URL comes from.
    pub url: UrlSource,
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

/// Whether `name` can be a PostgreSQL store's `schema`: the store uses it unquoted in every
/// statement, so only names that need no quoting (and fit PostgreSQL's 63 bytes) are accepted.
pub fn postgres_schema_name_ok(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63
}

/// A connection URL, inline or from an environment variable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UrlSource {
    /// `url = "..."`.
    Inline(String),
    /// `url_env = "NAME"`.
    Env(String),
    /// `url_file = "path"`: the first line of a file (relative to the config's directory).
    File(PathBuf),
}

impl UrlSource {
    /// The URL, read from the environment or the file when configured so; errors name `table`
    /// (`stores.pg`, `brokers.rabbit`) and the variable or file, never the URL.
    pub fn resolve(&self, table: &str) -> Result<String, String> {
        match self {
            UrlSource::Inline(u) => Ok(u.clone()),
            UrlSource::Env(name) => match std::env::var(name) {
                Ok(v) if !v.is_empty() => Ok(v),
                _ => Err(format!(
                    "{table}.url_env: the environment variable {name} is not set"
                )),
            },
            UrlSource::File(path) => match std::fs::read_to_string(path) {
                Ok(text) => match text.lines().next().map(str::trim) {
                    Some(line) if !line.is_empty() => Ok(line.to_owned()),
                    _ => Err(format!("{table}.url_file: {} is empty", path.display())),
                },
                Err(e) => Err(format!(
                    "{table}.url_file: cannot read {}: {e}",
                    path.display()
                )),
            },
        }
    }
}

impl StoreConfig {
    /// The URL, read from the environment when configured so; the error names the variable.
    pub fn url(&self) -> Result<String, String> {
        self.url.resolve(&format!("stores.{}", self.name))
    }
}

/// `[runtime] watch`: how changes to handler modules and runtime.toml are noticed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WatchMode {
    /// File-system events (inotify), falling back to polling where they are unavailable.
    #[default]
    Events,
    /// Poll the files' size and modification time every 500 ms (network file systems).
    Poll,
    /// No watching: reload only on SIGHUP or `lockgate reload`.
    Off,
}

/// What a `[brokers.<name>]` table defines, with the settings of that kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BrokerKind {
    /// `kind = "kafka"`: Apache Kafka or anything speaking its protocol (rdkafka).
    Kafka(KafkaConfig),
    /// `kind = "nats"`: a NATS server; routes with a `source.stream` use JetStream, routes
    /// without one use core NATS subscriptions.
    Nats(NatsConfig),
    /// `kind = "rabbitmq"`: a RabbitMQ server (AMQP 0.9.1).
    RabbitMq(RabbitConfig),
}

/// `[brokers.<name>]` with `kind = "rabbitmq"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RabbitConfig {
    /// `url`, `url_env` or `url_file`: `amqp://user:password@host:5672/vhost` (or `amqps://`).
    pub url: UrlSource,
    /// `exchange`: where outputs and dead letters are published, with the topic as routing
    /// key; `""` (the default exchange) routes straight to the queue named by the topic, and
    /// lockgate then declares that queue (durable) before its first publish.
    pub exchange: String,
    /// `consumer_timeout_ms`: the server's `consumer_timeout` (RabbitMQ's default 30 minutes).
    /// A source paused by the breaker for half of it lets go of the deliveries it holds, so
    /// the server never closes the channel for holding them too long.
    pub consumer_timeout: std::time::Duration,
    /// `request_timeout_ms`: the longest wait for the server to answer one request (connect,
    /// declare, consume, a publisher confirm, an ack). Past it the connection is dropped and
    /// opened anew, and what the request was for is retried, so a server that goes away
    /// mid-request never holds a message (or every publisher) forever.
    pub request_timeout: std::time::Duration,
    /// `ca_file`: PEM certificates (relative to runtime.toml) trusted for `amqps://` besides
    /// the system's roots, for a server whose certificate a private CA signed.
    pub ca_file: Option<PathBuf>,
}

/// RabbitMQ's default `consumer_timeout`, in ms.
pub const DEFAULT_CONSUMER_TIMEOUT_MS: u64 = 1_800_000;
/// Default of `[brokers.<name>] request_timeout_ms` for RabbitMQ.
pub const DEFAULT_RABBIT_REQUEST_TIMEOUT_MS: u64 = 30_000;

impl RabbitConfig {
    /// The URL (see [`UrlSource::resolve`]); `broker` names the table in errors.
    pub fn url(&self, broker: &str) -> Result<String, String> {
        self.url.resolve(&format!("brokers.{broker}"))
    }
}

/// One `[brokers.<name>]` table.
///
/// Example:
/// ```toml
/// [brokers.kafka]
/// kind = "kafka"
/// bootstrap_servers = "127.0.0.1:9092"
/// properties = { "session.timeout.ms" = 6000 }          # consumers and producers
/// consumer_properties = { "group.instance.id" = "node-1" }
/// producer_properties = { "linger.ms" = 5 }
///
/// [brokers.nats]
/// kind = "nats"
/// servers = ["nats://127.0.0.1:4222"]
/// credentials_file = "nats.creds"             # or nkey_seed_file, token_env, user + password_env
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerConfig {
    /// The broker's name (the table key), used by routes' `source.broker` and `dlq.broker`.
    pub name: String,
    /// What it is, with its settings.
    pub kind: BrokerKind,
}

/// Settings of a `kind = "kafka"` broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaConfig {
    /// `bootstrap_servers`: comma-separated host:port list.
    pub bootstrap_servers: String,
    /// `properties`: librdkafka properties for consumers and producers, passed through.
    pub properties: BTreeMap<String, String>,
    /// `consumer_properties`: librdkafka properties for consumers only (override `properties`).
    pub consumer_properties: BTreeMap<String, String>,
    /// `producer_properties`: librdkafka properties for producers only (override `properties`).
    pub producer_properties: BTreeMap<String, String>,
    /// `max_in_flight_per_partition`: a partition with this many received, unfinished messages
    /// is paused until half of them are done.
    pub max_in_flight_per_partition: usize,
}

/// Settings of a `kind = "nats"` broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatsConfig {
    /// `servers`: URLs tried in turn (and on reconnect).
    pub servers: Vec<String>,
    /// `credentials_file`: a `.creds` file (JWT + nkey), relative to the config file.
    pub credentials_file: Option<PathBuf>,
    /// `nkey_seed_file`: a file holding an nkey seed, relative to the config file.
    pub nkey_seed_file: Option<PathBuf>,
    /// `token_env`: the environment variable holding an auth token (secrets stay out of the
    /// config file).
    pub token_env: Option<String>,
    /// `user` and `password_env` (the environment variable holding the password).
    pub user_password_env: Option<(String, String)>,
    /// `tls`: require TLS (`true`), or take what the server offers (`false`, the default; a
    /// `tls://` URL also requires it).
    pub tls: bool,
    /// `tls_ca_file`: extra root certificate (PEM), relative to the config file.
    pub tls_ca_file: Option<PathBuf>,
}

/// Default of `[brokers.<name>] max_in_flight_per_partition`. Large enough that the pause and
/// resume it costs (a fetch round trip) are rare; small enough to bound memory.
pub const DEFAULT_MAX_IN_FLIGHT_PER_PARTITION: usize = 5000;
/// Largest accepted `max_in_flight_per_partition`.
pub const MAX_IN_FLIGHT_PER_PARTITION_LIMIT: u64 = 1_000_000;

/// The `[engine]` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// Use the pooling allocator. Default true.
    pub pooling: bool,
    /// Most instances alive at once. Default 1000.
    pub max_instances: u32,
    /// Cache compiled components in `<state_dir>/cache`. Default true.
    pub cache: bool,
}

/// How instances are used across messages (the handler's `isolation` setting).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Isolation {
    /// Reuse an instance for many messages; replace it after a trap, a timeout or
    /// `max_messages_per_instance` calls.
    #[default]
    Reuse,
    /// A fresh instance for every message.
    PerMessage,
}

/// One `[handlers.<name>]` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandlerConfig {
    /// The handler's name (the table key).
    pub name: String,
    /// `module` as written in the file.
    pub module_raw: String,
    /// `module` resolved against the config file's directory.
    pub module: PathBuf,
    /// `timeout_ms`: deadline of one call.
    pub timeout_ms: u64,
    /// `max_memory_mb`: cap on the instance's memory.
    pub max_memory_mb: u64,
    /// `isolation`: `"reuse"` (default) or `"per-message"`.
    pub isolation: Isolation,
    /// `max_messages_per_instance`: calls before a reused instance is replaced.
    pub max_messages_per_instance: u64,
    /// `max_output_bytes`: largest output.
    pub max_output_bytes: u64,
    /// `max_outputs`: most outputs per invocation.
    pub max_outputs: u32,
    /// `max_log_records`: most log records kept per invocation.
    pub max_log_records: u32,
    /// `config`: values the guest reads with `config.get`.
    pub config: BTreeMap<String, String>,
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
        let mut problems = Vec::new();
        let mut root = Reader::new("", &table, &mut problems);

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

        let mut state_dir = base_dir.join(DEFAULT_STATE_DIR);
        let mut shutdown_grace_ms = DEFAULT_SHUTDOWN_GRACE_MS;
        let mut admin = None;
        let mut admin_token_env = None;
        let mut watch = WatchMode::default();
        let mut state = EMBEDDED_STORE.to_owned();
        let stores = root.named_tables("stores", "store", parse_store);
        let store_names: Vec<&str> = table
            .get("stores")
            .and_then(toml::Value::as_table)
            .map(|t| t.keys().map(String::as_str).collect())
            .unwrap_or_default();
        if let Some(rt) = root.table("runtime") {
            let mut r = root.child("runtime", rt);
            if let Some(dir) = r.string("state_dir") {
                if dir.is_empty() {
                    r.problem("state_dir", "must not be empty".into());
                } else {
                    state_dir = base_dir.join(dir);
                }
            }
            if let Some(ms) = r.positive("shutdown_grace_ms") {
                shutdown_grace_ms = ms;
            }
            if let Some(a) = r.string("admin") {
                match a.parse::<std::net::SocketAddr>() {
                    Ok(_) => admin = Some(a),
                    Err(_) => r.problem(
                        "admin",
                        format!(
                            "\"{a}\" is not an address: expected ip:port, e.g. \"127.0.0.1:9464\""
                        ),
                    ),
                }
            }
            if let Some(name) = r.string("admin_token_env") {
                if name.is_empty() {
                    r.problem("admin_token_env", "must not be empty".into());
                } else {
                    admin_token_env = Some(name);
                }
            }
            if let Some(w) = r.string("watch") {
                match w.as_str() {
                    "events" => watch = WatchMode::Events,
                    "poll" => watch = WatchMode::Poll,
                    "off" => watch = WatchMode::Off,
                    other => r.problem(
                        "watch",
                        format!("\"{other}\" is not a watch mode: expected \"events\", \"poll\" or \"off\""),
                    ),
                }
            }
            if let Some(st) = r.string("state")
                && check_store(&mut r, "state", &st, &store_names)
            {
                state = st;
            }
            r.finish(&[
                "state_dir",
                "shutdown_grace_ms",
                "admin",
                "admin_token_env",
                "watch",
                "state",
            ]);
        }

        let mut engine = EngineConfig {
            pooling: true,
            max_instances: DEFAULT_MAX_INSTANCES,
            cache: true,
        };
        if let Some(en) = root.table("engine") {
            let mut r = root.child("engine", en);
            if let Some(b) = r.bool("pooling") {
                engine.pooling = b;
            }
            if let Some(b) = r.bool("cache") {
                engine.cache = b;
            }
            if let Some(n) = r.positive_u32("max_instances") {
                engine.max_instances = n;
            }
            r.finish(&["pooling", "cache", "max_instances"]);
        }

        let handlers = root.named_tables("handlers", "handler", |name, r| {
            parse_handler(name, &base_dir, r)
        });
        // Routes are checked against every declared handler name, valid or not, so a broken
        // handler table is reported once rather than again as an "unknown handler".
        let declared: Vec<&str> = table
            .get("handlers")
            .and_then(toml::Value::as_table)
            .map(|t| t.keys().map(String::as_str).collect())
            .unwrap_or_default();
        let brokers = root.named_tables("brokers", "broker", |name, r| {
            parse_broker(name, &base_dir, r)
        });
        let broker_names: Vec<&str> = table
            .get("brokers")
            .and_then(toml::Value::as_table)
            .map(|t| t.keys().map(String::as_str).collect())
            .unwrap_or_default();
        // Source fields that only JetStream knows are checked against the declared kind.
        let nats_brokers: Vec<&str> = table
            .get("brokers")
            .and_then(toml::Value::as_table)
            .map(|t| {
                t.iter()
                    .filter(|(_, b)| b.get("kind").and_then(toml::Value::as_str) == Some("nats"))
                    .map(|(name, _)| name.as_str())
                    .collect()
            })
            .unwrap_or_default();
        let rabbit_brokers: Vec<&str> = table
            .get("brokers")
            .and_then(toml::Value::as_table)
            .map(|t| {
                t.iter()
                    .filter(|(_, b)| {
                        b.get("kind").and_then(toml::Value::as_str) == Some("rabbitmq")
                    })
                    .map(|(name, _)| name.as_str())
                    .collect()
            })
            .unwrap_or_default();
        let pg_stores: Vec<&str> = table
            .get("stores")
            .and_then(toml::Value::as_table)
            .map(|t| {
                t.iter()
                    .filter(|(_, b)| {
                        b.get("kind").and_then(toml::Value::as_str) == Some("postgres")
                    })
                    .map(|(name, _)| name.as_str())
                    .collect()
            })
            .unwrap_or_default();
        let routes = root.named_tables("routes", "route", |name, r| {
            routes::parse_route(
                name,
                &declared,
                &broker_names,
                &nats_brokers,
                &rabbit_brokers,
                &routes::StoreNames {
                    all: &store_names,
                    postgres: &pg_stores,
                    default: &state,
                },
                r,
            )
        });
        let mut local = match root.table("local") {
            Some(t) => local::parse_local(&mut root.child("local", t)),
            None => LocalSettings::default(),
        };
        // Retention never drops dead letters silently: these topics are unlimited by default.
        local.dlq_topics = routes
            .values()
            .filter(|r| r.dlq.broker == "local")
            .map(|r| r.dlq.topic.clone())
            .collect();
        root.finish(&[
            "version", "runtime", "engine", "handlers", "brokers", "stores", "routes", "local",
        ]);

        let config = Config {
            file: file.to_owned(),
            base_dir,
            state_dir,
            shutdown_grace_ms,
            admin,
            admin_token_env,
            watch,
            state,
            stores,
            engine,
            handlers,
            brokers,
            routes,
            local,
        };
        Ok((config, problems))
    }
}

const HANDLER_FIELDS: &[&str] = &[
    "module",
    "timeout_ms",
    "max_memory_mb",
    "isolation",
    "max_messages_per_instance",
    "max_output_bytes",
    "max_outputs",
    "max_log_records",
    "config",
];

fn parse_handler(name: &str, base_dir: &Path, r: &mut Reader<'_>) -> Option<HandlerConfig> {
    let before = r.problems.len();
    let module_raw = r.string("module");
    if module_raw.is_none() && !r.table.contains_key("module") {
        r.problem(
            "module",
            "missing: the path of the handler's .wasm component".into(),
        );
    }
    if module_raw.as_deref() == Some("") {
        r.problem("module", "must not be empty".into());
    }
    let timeout_ms = r.positive("timeout_ms").unwrap_or(DEFAULT_TIMEOUT_MS);
    let max_memory_mb = r.positive("max_memory_mb").unwrap_or(DEFAULT_MAX_MEMORY_MB);
    if max_memory_mb > MAX_MEMORY_MB_LIMIT {
        r.problem(
            "max_memory_mb",
            format!("{max_memory_mb} is over the limit of {MAX_MEMORY_MB_LIMIT} (4 GiB, the 32-bit address space)"),
        );
    }
    let isolation = r
        .choice(
            "isolation",
            &[
                ("reuse", Isolation::Reuse),
                ("per-message", Isolation::PerMessage),
            ],
        )
        .unwrap_or_default();
    let max_messages_per_instance = r
        .positive("max_messages_per_instance")
        .unwrap_or(DEFAULT_MAX_MESSAGES_PER_INSTANCE);
    let max_output_bytes = r
        .positive("max_output_bytes")
        .unwrap_or(DEFAULT_MAX_OUTPUT_BYTES);
    let max_outputs = r.positive_u32("max_outputs").unwrap_or(DEFAULT_MAX_OUTPUTS);
    let max_log_records = r
        .positive_u32("max_log_records")
        .unwrap_or(DEFAULT_MAX_LOG_RECORDS);
    let config = scalar_table(r, "config");
    r.finish(HANDLER_FIELDS);
    if r.problems.len() != before {
        return None;
    }
    let module_raw = module_raw?;
    Some(HandlerConfig {
        name: name.to_owned(),
        module: base_dir.join(&module_raw),
        module_raw,
        timeout_ms,
        max_memory_mb,
        isolation,
        max_messages_per_instance,
        max_output_bytes,
        max_outputs,
        max_log_records,
        config,
    })
}

/// Reports `name` at `key` unless it is `embedded` or a declared store; true if it is known.
fn check_store(r: &mut Reader<'_>, key: &str, name: &str, declared: &[&str]) -> bool {
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

fn parse_store(name: &str, r: &mut Reader<'_>) -> Option<StoreConfig> {
    let before = r.problems.len();
    if name == EMBEDDED_STORE {
        r.problem(
            "",
            format!("`{name}` is the built-in embedded store and cannot be redefined"),
        );
    }
    if !r.table.contains_key("kind") {
        r.problem("kind", "missing: \"redis\" or \"postgres\"".into());
    }
    let kind = r.choice("kind", &[("redis", "redis"), ("postgres", "postgres")]);
    let url = match (r.string("url"), r.string("url_env")) {
        (Some(_), Some(_)) => {
            r.problem("url_env", "set either url or url_env, not both".into());
            None
        }
        (Some(u), None) if u.is_empty() => {
            r.problem("url", "must not be empty".into());
            None
        }
        (Some(u), None) => Some(UrlSource::Inline(u)),
        (None, Some(e)) if e.is_empty() => {
            r.problem("url_env", "must not be empty".into());
            None
        }
        (None, Some(e)) => Some(UrlSource::Env(e)),
        (None, None) => {
            if !r.table.contains_key("url") && !r.table.contains_key("url_env") {
                r.problem(
                    "url",
                    "missing: url = \"redis://...\" / \"postgres://...\", or url_env = \"<VARIABLE>\""
                        .into(),
                );
            }
            None
        }
    };
    let store_kind = match kind {
        Some("redis") => {
            let prefix = r.string("prefix").unwrap_or_else(|| "lockgate".into());
            if prefix.is_empty() {
                r.problem("prefix", "must not be empty".into());
            }
            r.finish(&["kind", "url", "url_env", "prefix"]);
            if let Some(UrlSource::Inline(u)) = &url
                && !(u.starts_with("redis://")
                    || u.starts_with("rediss://")
                    || u.starts_with("unix://"))
            {
                r.problem(
                    "url",
                    format!("\"{u}\" is not a Redis URL: expected redis://host:port[/db]"),
                );
            }
            Some(StoreKind::Redis { prefix })
        }
        Some(_) => {
            let schema = r.string("schema").unwrap_or_else(|| "lockgate".into());
            if !postgres_schema_name_ok(&schema) {
                r.problem(
                    "schema",
                    format!("\"{schema}\" is not a usable schema name: lowercase letters, digits and _, starting with a letter or _"),
                );
            }
            let pool_size = r.positive("pool_size").map_or(POSTGRES_POOL_SIZE, |n| {
                usize::try_from(n).unwrap_or(usize::MAX)
            });
            r.finish(&["kind", "url", "url_env", "schema", "pool_size"]);
            if let Some(UrlSource::Inline(u)) = &url
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
    if r.problems.len() != before {
        return None;
    }
    Some(StoreConfig {
        name: name.to_owned(),
        url: url?,
        kind: store_kind?,
    })
}

fn parse_broker(name: &str, base_dir: &Path, r: &mut Reader<'_>) -> Option<BrokerConfig> {
    let before = r.problems.len();
    if routes::BUILTIN_BROKERS.contains(&name) {
        r.problem(
            "",
            format!("`{name}` is the built-in embedded broker and cannot be redefined"),
        );
    }
    if !r.table.contains_key("kind") {
        r.problem(
            "kind",
            "missing: \"kafka\", \"nats\" or \"rabbitmq\"".into(),
        );
    }
    let kind = match r.choice(
        "kind",
        &[
            ("kafka", "kafka"),
            ("nats", "nats"),
            ("rabbitmq", "rabbitmq"),
        ],
    ) {
        Some("kafka") => parse_kafka(r).map(BrokerKind::Kafka),
        Some("nats") => parse_nats(r).map(BrokerKind::Nats),
        Some(_) => parse_rabbit(r, base_dir).map(BrokerKind::RabbitMq),
        None => None,
    };
    if r.problems.len() != before {
        return None;
    }
    Some(BrokerConfig {
        name: name.to_owned(),
        kind: kind?,
    })
}

fn parse_rabbit(r: &mut Reader<'_>, base_dir: &Path) -> Option<RabbitConfig> {
    let inline = r.string("url");
    let env = r.string("url_env");
    let file = r.string("url_file");
    let set = [inline.is_some(), env.is_some(), file.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    let url = match (inline, env, file) {
        _ if set > 1 => {
            r.problem(
                "url",
                "set one of url, url_env and url_file, not several".into(),
            );
            None
        }
        (Some(u), _, _) => {
            if !(u.starts_with("amqp://") || u.starts_with("amqps://")) {
                // Never echo the URL: it may hold a password.
                r.problem(
                    "url",
                    "not an AMQP URL: expected amqp://user:password@host:5672/vhost or amqps://..."
                        .into(),
                );
            }
            Some(UrlSource::Inline(u))
        }
        (_, Some(e), _) => Some(UrlSource::Env(e)),
        (_, _, Some(f)) => Some(UrlSource::File(base_dir.join(f))),
        (None, None, None) => {
            r.problem(
                "url",
                "missing: url = \"amqp://guest:guest@127.0.0.1:5672/%2f\", url_env = \"<VARIABLE>\" or url_file = \"<path>\"".into(),
            );
            None
        }
    };
    let exchange = r.string("exchange").unwrap_or_default();
    let consumer_timeout = r
        .positive("consumer_timeout_ms")
        .unwrap_or(DEFAULT_CONSUMER_TIMEOUT_MS);
    let request_timeout = r
        .positive("request_timeout_ms")
        .unwrap_or(DEFAULT_RABBIT_REQUEST_TIMEOUT_MS);
    let ca_file = r.string("ca_file").map(|f| base_dir.join(f));
    if ca_file.is_some()
        && let Some(UrlSource::Inline(u)) = &url
        && !u.starts_with("amqps://")
    {
        r.problem(
            "ca_file",
            "only used with an amqps:// URL (TLS); the url is amqp://".into(),
        );
    }
    r.finish(&[
        "kind",
        "url",
        "url_env",
        "url_file",
        "exchange",
        "consumer_timeout_ms",
        "request_timeout_ms",
        "ca_file",
    ]);
    Some(RabbitConfig {
        url: url?,
        exchange,
        consumer_timeout: std::time::Duration::from_millis(consumer_timeout),
        request_timeout: std::time::Duration::from_millis(request_timeout),
        ca_file,
    })
}

fn parse_kafka(r: &mut Reader<'_>) -> Option<KafkaConfig> {
    if !r.table.contains_key("bootstrap_servers") {
        r.problem(
            "bootstrap_servers",
            "missing: e.g. \"127.0.0.1:9092\"".into(),
        );
    }
    let bootstrap_servers = r.string("bootstrap_servers");
    if bootstrap_servers.as_deref() == Some("") {
        r.problem("bootstrap_servers", "must not be empty".into());
    }
    let properties = scalar_table(r, "properties");
    let consumer_properties = scalar_table(r, "consumer_properties");
    let producer_properties = scalar_table(r, "producer_properties");
    let max_in_flight = r.positive("max_in_flight_per_partition");
    if let Some(n) = max_in_flight
        && n > MAX_IN_FLIGHT_PER_PARTITION_LIMIT
    {
        r.problem(
            "max_in_flight_per_partition",
            format!("{n} is over the limit of {MAX_IN_FLIGHT_PER_PARTITION_LIMIT}"),
        );
    }
    r.finish(&[
        "kind",
        "bootstrap_servers",
        "properties",
        "consumer_properties",
        "producer_properties",
        "max_in_flight_per_partition",
    ]);
    Some(KafkaConfig {
        bootstrap_servers: bootstrap_servers?,
        properties,
        consumer_properties,
        producer_properties,
        max_in_flight_per_partition: max_in_flight
            .map_or(DEFAULT_MAX_IN_FLIGHT_PER_PARTITION, |n| n as usize),
    })
}

fn parse_nats(r: &mut Reader<'_>) -> Option<NatsConfig> {
    // `servers` may be one string or a list.
    let servers = match r.table.get("servers") {
        None => {
            r.problem(
                "servers",
                "missing: e.g. [\"nats://127.0.0.1:4222\"]".into(),
            );
            None
        }
        Some(toml::Value::String(s)) => Some(vec![s.clone()]),
        Some(_) => r.strings("servers"),
    };
    if let Some(list) = &servers {
        if list.is_empty() {
            r.problem("servers", "must name at least one server".into());
        }
        for url in list {
            if let Err(e) = url.parse::<async_nats::ServerAddr>() {
                r.problem(
                    "servers",
                    format!("\"{url}\" is not a NATS server address: {e}"),
                );
            }
        }
    }
    let path = |r: &mut Reader<'_>, key: &str| r.string(key).map(PathBuf::from);
    let credentials_file = path(r, "credentials_file");
    let nkey_seed_file = path(r, "nkey_seed_file");
    let token_env = r.string("token_env");
    let user = r.string("user");
    let password_env = r.string("password_env");
    let user_password_env = match (user, password_env) {
        (Some(u), Some(p)) => Some((u, p)),
        (None, None) => None,
        (Some(_), None) => {
            r.problem(
                "password_env",
                "missing: `user` needs `password_env`, the environment variable holding the password"
                    .into(),
            );
            None
        }
        (None, Some(_)) => {
            r.problem("user", "missing: `password_env` needs a `user`".into());
            None
        }
    };
    let methods = [
        credentials_file.is_some(),
        nkey_seed_file.is_some(),
        token_env.is_some(),
        user_password_env.is_some(),
    ];
    if methods.iter().filter(|m| **m).count() > 1 {
        r.problem(
            "",
            "set at most one of credentials_file, nkey_seed_file, token_env, user/password_env"
                .into(),
        );
    }
    let tls = r.bool("tls").unwrap_or(false);
    let tls_ca_file = path(r, "tls_ca_file");
    r.finish(&[
        "kind",
        "servers",
        "credentials_file",
        "nkey_seed_file",
        "token_env",
        "user",
        "password_env",
        "tls",
        "tls_ca_file",
    ]);
    Some(NatsConfig {
        servers: servers?,
        credentials_file,
        nkey_seed_file,
        token_env,
        user_password_env,
        tls,
        tls_ca_file,
    })
}

/// A table of strings, numbers and booleans, as strings (handler `config`, broker properties).
fn scalar_table(r: &mut Reader<'_>, key: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some(t) = r.table(key) {
        for (k, v) in t {
            let value = match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    r.problems.push(Problem::new(
                        &format!("{}.{key}.{k}", r.path),
                        format!(
                            "expected a string, number or boolean, found {}",
                            describe(other)
                        ),
                    ));
                    continue;
                }
            };
            out.insert(k.clone(), value);
        }
    }
    out
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
    fn single(file: &Path, path: &str, message: String) -> Self {
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

/// Walks one TOML table, recording which keys were read and every problem found.
pub(crate) struct Reader<'a> {
    path: String,
    table: &'a toml::Table,
    used: BTreeSet<String>,
    problems: &'a mut Vec<Problem>,
}

impl<'a> Reader<'a> {
    fn new(path: &str, table: &'a toml::Table, problems: &'a mut Vec<Problem>) -> Self {
        Self {
            path: path.to_owned(),
            table,
            used: BTreeSet::new(),
            problems,
        }
    }

    fn child<'b>(&'b mut self, key: &str, table: &'b toml::Table) -> Reader<'b> {
        Reader::new(&self.key_path(key), table, self.problems)
    }

    fn key_path(&self, key: &str) -> String {
        if key.is_empty() {
            self.path.clone()
        } else if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn problem(&mut self, key: &str, message: String) {
        let path = self.key_path(key);
        self.problems.push(Problem::new(&path, message));
    }

    fn get(&mut self, key: &str) -> Option<&'a toml::Value> {
        self.used.insert(key.to_owned());
        self.table.get(key)
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

    fn string(&mut self, key: &str) -> Option<String> {
        self.typed(key, "a string", |v| v.as_str().map(str::to_owned))
    }

    fn bool(&mut self, key: &str) -> Option<bool> {
        self.typed(key, "a boolean", toml::Value::as_bool)
    }

    fn int(&mut self, key: &str) -> Option<i64> {
        self.typed(key, "an integer", toml::Value::as_integer)
    }

    fn table(&mut self, key: &str) -> Option<&'a toml::Table> {
        self.typed(key, "a table", toml::Value::as_table)
    }

    /// An integer or a float, as f64.
    fn number(&mut self, key: &str) -> Option<f64> {
        self.typed(key, "a number", |v| match v {
            toml::Value::Integer(i) => Some(*i as f64),
            toml::Value::Float(f) => Some(*f),
            _ => None,
        })
    }

    /// A string that must be one of `options` (name, value); `None` when absent or unknown (an
    /// unknown name is reported, listing the names).
    fn choice<T: Copy>(&mut self, key: &str, options: &[(&str, T)]) -> Option<T> {
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
    fn strings(&mut self, key: &str) -> Option<Vec<String>> {
        self.typed(key, "an array of strings", |v| {
            v.as_array()?
                .iter()
                .map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
    }

    /// A strictly positive integer (durations, sizes, counts: zero is always a mistake).
    fn positive(&mut self, key: &str) -> Option<u64> {
        let v = self.int(key)?;
        if v <= 0 {
            self.problem(key, format!("must be greater than 0, found {v}"));
            return None;
        }
        u64::try_from(v).ok()
    }

    fn positive_u32(&mut self, key: &str) -> Option<u32> {
        let v = self.positive(key)?;
        match u32::try_from(v) {
            Ok(n) => Some(n),
            Err(_) => {
                self.problem(key, format!("{v} is too large (at most {})", u32::MAX));
                None
            }
        }
    }

    /// Reads the `[key.<name>]` tables: checks each name is valid and each entry is a table,
    /// parses it with `parse`, and keeps the ones that parsed, in file order.
    fn named_tables<T>(
        &mut self,
        key: &str,
        kind: &str,
        mut parse: impl FnMut(&str, &mut Reader<'_>) -> Option<T>,
    ) -> IndexMap<String, T> {
        let mut out = IndexMap::new();
        let Some(tables) = self.table(key) else {
            return out;
        };
        for (name, value) in tables {
            let path = self.key_path(&format!("{key}.{name}"));
            let Some(t) = value.as_table() else {
                self.problems.push(Problem::new(
                    &path,
                    format!("expected a table, found {}", describe(value)),
                ));
                continue;
            };
            if let Err(why) = validate_name(name, kind) {
                self.problems.push(Problem::new(&path, why));
            }
            let mut r = Reader::new(&path, t, self.problems);
            if let Some(parsed) = parse(name, &mut r) {
                out.insert(name.clone(), parsed);
            }
        }
        out
    }

    /// Reports keys of the table that no getter asked for.
    fn finish(&mut self, known: &[&str]) {
        let unknown: Vec<&String> = self
            .table
            .keys()
            .filter(|k| !known.contains(&k.as_str()))
            .collect();
        for k in unknown {
            let hint = match closest(k, known) {
                Some(s) => format!("; did you mean `{s}`?"),
                None => format!(" (expected one of: {})", known.join(", ")),
            };
            self.problem(k, format!("unknown field `{k}`{hint}"));
        }
    }
}

/// The known name within edit distance 2 of `word`, if any.
fn closest<'k>(word: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (edit_distance(word, k), *k))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::backoff::RetryMode;

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

    fn problems(text: &str) -> Vec<String> {
        match Config::parse(Path::new("rt.toml"), text) {
            Ok(_) => Vec::new(),
            Err(e) => e.to_string().lines().map(str::to_owned).collect(),
        }
    }

    #[test]
    fn minimal_handler_gets_defaults() {
        let c = Config::parse(
            Path::new("dir/rt.toml"),
            "[handlers.up]\nmodule = \"up.wasm\"\n",
        )
        .unwrap();
        let h = &c.handlers["up"];
        assert_eq!(h.module, Path::new("dir/up.wasm"));
        assert_eq!(h.timeout_ms, DEFAULT_TIMEOUT_MS);
        assert_eq!(h.max_memory_mb, DEFAULT_MAX_MEMORY_MB);
        assert_eq!(h.isolation, Isolation::Reuse);
        assert_eq!(c.state_dir, Path::new("dir/.lockgate"));
        assert!(c.engine.pooling);
    }

    #[test]
    fn config_values_become_strings() {
        let c = Config::parse(
            Path::new("rt.toml"),
            "[handlers.up]\nmodule = \"m.wasm\"\nconfig = { a = \"x\", n = 3, b = true }\n",
        )
        .unwrap();
        let cfg = &c.handlers["up"].config;
        assert_eq!(cfg["a"], "x");
        assert_eq!(cfg["n"], "3");
        assert_eq!(cfg["b"], "true");
    }

    #[test]
    fn reports_every_problem_with_its_path() {
        let p = problems(
            "[handlers.a]\nmodule = \"a.wasm\"\ntimout_ms = 5\n\n[handlers.b]\ntimeout_ms = 0\nisolation = \"fresh\"\n",
        );
        assert_eq!(
            p,
            vec![
                "rt.toml: handlers.a.timout_ms: unknown field `timout_ms`; did you mean `timeout_ms`?",
                "rt.toml: handlers.b.module: missing: the path of the handler's .wasm component",
                "rt.toml: handlers.b.timeout_ms: must be greater than 0, found 0",
                "rt.toml: handlers.b.isolation: unknown value \"fresh\"; expected \"reuse\" or \"per-message\"",
            ]
        );
    }

    #[test]
    fn wrong_types_name_the_value() {
        let p = problems("[handlers.a]\nmodule = 3\ntimeout_ms = \"fast\"\n");
        assert_eq!(
            p,
            vec![
                "rt.toml: handlers.a.module: expected a string, found integer 3",
                "rt.toml: handlers.a.timeout_ms: expected an integer, found string \"fast\"",
            ]
        );
    }

    #[test]
    fn bad_names_and_versions() {
        let p = problems("version = 2\n[handlers.Bad]\nmodule = \"m.wasm\"\n");
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("version: unsupported schema version 2"));
        assert!(p[1].contains("handlers.Bad: invalid handler name"));
    }

    #[test]
    fn kafka_brokers_parse_and_routes_may_use_them() {
        let c = Config::parse(
            Path::new("rt.toml"),
            "[brokers.kafka]\nkind = \"kafka\"\nbootstrap_servers = \"127.0.0.1:9092\"\nproperties = { \"session.timeout.ms\" = 6000 }\nproducer_properties = { \"linger.ms\" = \"5\" }\nmax_in_flight_per_partition = 77\n\n[handlers.h]\nmodule = \"h.wasm\"\n\n[routes.r]\nhandler = \"h\"\nsource = { broker = \"kafka\", topic = \"t\" }\n",
        )
        .unwrap();
        let BrokerKind::Kafka(b) = &c.brokers["kafka"].kind else {
            panic!("not kafka");
        };
        assert_eq!(b.bootstrap_servers, "127.0.0.1:9092");
        assert_eq!(b.properties["session.timeout.ms"], "6000");
        assert_eq!(b.producer_properties["linger.ms"], "5");
        assert_eq!(b.max_in_flight_per_partition, 77);
        assert_eq!(c.routes["r"].source.broker, "kafka");
        assert_eq!(c.routes["r"].dlq.broker, "kafka");
    }

    #[test]
    fn broker_mistakes_are_named() {
        assert_eq!(
            problems(
                "[brokers.local]\nkind = \"kafka\"\nbootstrap_servers = \"x:1\"\n\n[brokers.k]\nkind = \"kafka\"\nproperties = { a = [1] }\nbootstrap = \"x\"\n\n[brokers.p]\nkind = \"pulsar\"\n\n[brokers.n]\nkind = \"nats\"\nservers = [\"nats://a:4222\", \"http://b\"]\ntoken = \"t\"\nuser = \"u\"\ntls = \"yes\"\n\n[brokers.m]\nkind = \"nats\"\n\n[handlers.h]\nmodule = \"h.wasm\"\n\n[routes.r]\nhandler = \"h\"\nsource = { broker = \"kafak\", topic = \"t\" }\n"
            ),
            vec![
                "rt.toml: brokers.local: `local` is the built-in embedded broker and cannot be redefined",
                "rt.toml: brokers.k.bootstrap_servers: missing: e.g. \"127.0.0.1:9092\"",
                "rt.toml: brokers.k.properties.a: expected a string, number or boolean, found an array",
                "rt.toml: brokers.k.bootstrap: unknown field `bootstrap` (expected one of: kind, bootstrap_servers, properties, consumer_properties, producer_properties, max_in_flight_per_partition)",
                "rt.toml: brokers.p.kind: unknown value \"pulsar\"; expected \"kafka\", \"nats\" or \"rabbitmq\"",
                "rt.toml: brokers.n.servers: \"http://b\" is not a NATS server address: invalid scheme for NATS server URL: http",
                "rt.toml: brokers.n.password_env: missing: `user` needs `password_env`, the environment variable holding the password",
                "rt.toml: brokers.n.tls: expected a boolean, found string \"yes\"",
                "rt.toml: brokers.n.token: unknown field `token` (expected one of: kind, servers, credentials_file, nkey_seed_file, token_env, user, password_env, tls, tls_ca_file)",
                "rt.toml: brokers.m.servers: missing: e.g. [\"nats://127.0.0.1:4222\"]",
                "rt.toml: routes.r.source.broker: unknown broker `kafak` (known: local, k, p, n, m)",
            ]
        );
    }

    #[test]
    fn stores_parse_and_routes_pick_one() {
        let c = Config::parse(
            Path::new("rt.toml"),
            "[runtime]\nstate = \"shared\"\n\n[stores.shared]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379/2\"\n\n[stores.pg]\nkind = \"postgres\"\nurl_env = \"PG_URL\"\nschema = \"lg_1\"\npool_size = 4\n\n[handlers.h]\nmodule = \"h.wasm\"\n\n[routes.a]\nhandler = \"h\"\nsource = { topic = \"t\" }\nidempotency = { key = \"key\", lease_ms = 5000 }\n\n[routes.b]\nhandler = \"h\"\nsource = { topic = \"u\" }\nstate = \"pg\"\n\n[routes.c]\nhandler = \"h\"\nsource = { topic = \"v\" }\nstate = \"embedded\"\n",
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
        assert_eq!(c.stores["pg"].url, UrlSource::Env("PG_URL".into()));
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
                "[runtime]\nstate = \"redis\"\n\n[stores.embedded]\nkind = \"redis\"\nurl = \"redis://x\"\n\n[stores.a]\nkind = \"mongo\"\nurl = \"x\"\n\n[stores.b]\nkind = \"redis\"\nurl = \"http://x\"\nschema = \"s\"\n\n[stores.c]\nkind = \"postgres\"\nurl = \"postgres://u@h/db\"\nurl_env = \"X\"\nschema = \"Bad-Name\"\n\n[stores.d]\nkind = \"postgres\"\n\n[handlers.h]\nmodule = \"h.wasm\"\n\n[routes.r]\nhandler = \"h\"\nsource = { topic = \"t\" }\nstate = \"sharde\"\nidempotency = { key = \"key\", lease_ms = 0 }\n"
            ),
            vec![
                "rt.toml: stores.embedded: `embedded` is the built-in embedded store and cannot be redefined",
                "rt.toml: stores.a.kind: unknown value \"mongo\"; expected \"redis\" or \"postgres\"",
                "rt.toml: stores.b.schema: unknown field `schema` (expected one of: kind, url, url_env, prefix)",
                "rt.toml: stores.b.url: \"http://x\" is not a Redis URL: expected redis://host:port[/db]",
                "rt.toml: stores.c.url_env: set either url or url_env, not both",
                "rt.toml: stores.c.schema: \"Bad-Name\" is not a usable schema name: lowercase letters, digits and _, starting with a letter or _",
                "rt.toml: stores.d.url: missing: url = \"redis://...\" / \"postgres://...\", or url_env = \"<VARIABLE>\"",
                "rt.toml: runtime.state: unknown state store `redis` (defined: embedded, a, b, c, d; add a [stores.redis] table)",
                "rt.toml: routes.r.state: unknown state store `sharde` (defined: embedded, a, b, c, d; add a [stores.sharde] table)",
                "rt.toml: routes.r.idempotency.lease_ms: must be greater than 0, found 0",
            ]
        );
    }

    #[test]
    fn a_dlq_can_be_a_postgres_stores_dead_letter_table() {
        let stores = "[stores.pg]\nkind = \"postgres\"\nurl = \"postgres://u@h/db\"\n\n[stores.r]\nkind = \"redis\"\nurl = \"redis://h\"\n\n[handlers.h]\nmodule = \"h.wasm\"\n\n";
        let c = Config::parse(
            Path::new("rt.toml"),
            &format!(
                "{stores}[routes.a]\nhandler = \"h\"\nsource = {{ topic = \"orders\" }}\ndlq = {{ store = \"pg\" }}\n\n[routes.b]\nhandler = \"h\"\nsource = {{ topic = \"refunds\" }}\ndlq = {{ store = \"pg\", topic = \"all.dlq\" }}\n"
            ),
        )
        .unwrap();
        assert_eq!(c.routes["a"].dlq.broker, "store:pg");
        assert_eq!(c.routes["a"].dlq.topic, "orders.dlq");
        assert_eq!(c.routes["a"].dlq.dlq_store(), Some("pg"));
        assert_eq!(c.routes["b"].dlq.topic, "all.dlq");
        assert_eq!(
            problems(&format!(
                "{stores}[routes.a]\nhandler = \"h\"\nsource = {{ topic = \"o\" }}\ndlq = {{ store = \"r\" }}\n\n[routes.b]\nhandler = \"h\"\nsource = {{ topic = \"o\" }}\ndlq = {{ store = \"nope\" }}\n\n[routes.c]\nhandler = \"h\"\nsource = {{ topic = \"o\" }}\ndlq = {{ store = \"pg\", broker = \"local\" }}\n"
            )),
            [
                "rt.toml: routes.a.dlq.store: state store `r` is not a PostgreSQL store: a dead-letter table needs kind = \"postgres\"",
                "rt.toml: routes.b.dlq.store: unknown state store `nope` (PostgreSQL stores defined: pg; add a [stores.nope] table with kind = \"postgres\")",
                "rt.toml: routes.c.dlq.broker: a DLQ goes to a broker or to a store's dead_letters table: set `broker` or `store`, not both",
            ]
        );
    }

    /// The RabbitMQ settings of broker `name`.
    fn rabbit_of<'c>(c: &'c Config, name: &str) -> &'c RabbitConfig {
        match &c.brokers[name].kind {
            BrokerKind::RabbitMq(r) => r,
            _ => panic!("{name} is not rabbitmq"),
        }
    }

    #[test]
    fn rabbitmq_brokers_and_sources_parse() {
        let c = Config::parse(
            Path::new("rt.toml"),
            "[brokers.rabbit]\nkind = \"rabbitmq\"\nurl_env = \"AMQP_URL\"\nexchange = \"events\"\nconsumer_timeout_ms = 60000\nrequest_timeout_ms = 5000\n\n[brokers.r2]\nkind = \"rabbitmq\"\nurl_file = \"secrets/amqp\"\n\n[handlers.h]\nmodule = \"h.wasm\"\n\n[routes.a]\nhandler = \"h\"\nsource = { broker = \"rabbit\", topic = \"orders\", queue_type = \"classic\", prefetch = 50, exchange = \"in\", binding_key = \"order.*\", single_active_consumer = true }\n\n[routes.b]\nhandler = \"h\"\nsource = { broker = \"r2\", topic = \"q\" }\n",
        )
        .unwrap();
        let r = rabbit_of(&c, "rabbit");
        assert_eq!(r.url, UrlSource::Env("AMQP_URL".into()));
        assert_eq!(r.exchange, "events");
        assert_eq!(r.consumer_timeout, std::time::Duration::from_secs(60));
        assert_eq!(r.request_timeout, std::time::Duration::from_secs(5));
        let r2 = rabbit_of(&c, "r2");
        assert_eq!(r2.url, UrlSource::File(Path::new(".").join("secrets/amqp")));
        assert_eq!(r2.exchange, "");
        assert_eq!(
            r2.request_timeout,
            std::time::Duration::from_millis(DEFAULT_RABBIT_REQUEST_TIMEOUT_MS)
        );
        assert_eq!(r2.ca_file, None);
        let tls = Config::parse(
            Path::new("conf/rt.toml"),
            "[brokers.r]\nkind = \"rabbitmq\"\nurl = \"amqps://h\"\nca_file = \"certs/ca.pem\"\n",
        )
        .unwrap();
        let r = rabbit_of(&tls, "r");
        assert_eq!(r.ca_file, Some(Path::new("conf").join("certs/ca.pem")));
        assert_eq!(
            problems(
                "[brokers.r]\nkind = \"rabbitmq\"\nurl = \"amqp://h\"\nca_file = \"ca.pem\"\n"
            ),
            [
                "rt.toml: brokers.r.ca_file: only used with an amqps:// URL (TLS); the url is amqp://"
            ]
        );
        let a = c.routes["a"].rabbitmq.clone().unwrap();
        assert_eq!(a.queue_type, QueueType::Classic);
        assert_eq!(a.prefetch, 50);
        assert_eq!(a.exchange.as_deref(), Some("in"));
        assert_eq!(a.binding_key, "order.*");
        assert!(a.single_active_consumer);
        assert_eq!(c.routes["b"].rabbitmq, Some(RabbitSource::default()));
        assert_eq!(
            problems(
                "[brokers.rabbit]\nkind = \"rabbitmq\"\nurl = \"http://u:secret@h\"\n\n[brokers.k]\nkind = \"kafka\"\nbootstrap_servers = \"h:9092\"\n\n[brokers.none]\nkind = \"rabbitmq\"\n\n[handlers.h]\nmodule = \"h.wasm\"\n\n[routes.a]\nhandler = \"h\"\nsource = { broker = \"rabbit\", topic = \"q\", prefetch = 70000, binding_key = \"x\" }\n\n[routes.b]\nhandler = \"h\"\nsource = { broker = \"k\", topic = \"t\", prefetch = 5 }\n"
            ),
            [
                "rt.toml: brokers.rabbit.url: not an AMQP URL: expected amqp://user:password@host:5672/vhost or amqps://...",
                "rt.toml: brokers.none.url: missing: url = \"amqp://guest:guest@127.0.0.1:5672/%2f\", url_env = \"<VARIABLE>\" or url_file = \"<path>\"",
                "rt.toml: routes.a.source.prefetch: 70000 is over RabbitMQ's limit of 65535",
                "rt.toml: routes.a.source.binding_key: needs `exchange`: the binding is from that exchange to the queue",
                "rt.toml: routes.b.source.prefetch: only a source on a `kind = \"rabbitmq\"` broker has this (`k` is not one)",
            ]
        );
    }

    #[test]
    fn outbox_routes_and_relays_parse() {
        let stores = "[stores.pg]\nkind = \"postgres\"\nurl = \"postgres://u@h/db\"\n\n[stores.r]\nkind = \"redis\"\nurl = \"redis://h\"\n\n[brokers.k]\nkind = \"kafka\"\nbootstrap_servers = \"127.0.0.1:9092\"\n\n[handlers.h]\nmodule = \"h.wasm\"\n\n";
        let c = Config::parse(
            Path::new("rt.toml"),
            &format!(
                "{stores}[routes.orders]\nhandler = \"h\"\nsource = {{ topic = \"orders\" }}\nstate = \"pg\"\noutputs = {{ topics = [\"events\"], mode = \"outbox\" }}\nidempotency = {{ key = \"key\" }}\n\n[routes.relay]\nsource = {{ outbox = \"pg\", batch = 100, poll_ms = 50, retention_ms = 1000 }}\noutputs = {{ broker = \"k\" }}\nordering = \"key\"\n\n[routes.enrich]\nhandler = \"h\"\nsource = {{ outbox = \"pg\" }}\noutputs = {{ broker = \"local\", topics = [\"x\"] }}\n"
            ),
        )
        .unwrap();
        let o = &c.routes["orders"];
        assert_eq!(o.outputs_mode, OutputsMode::Outbox);
        assert_eq!(o.outputs, vec!["events"]);
        assert_eq!(o.outputs_broker, "local");
        let r = &c.routes["relay"];
        assert_eq!(r.handler, None);
        assert_eq!(r.outputs_broker, "k");
        assert_eq!(r.outputs_mode, OutputsMode::Publish);
        let ob = r.outbox.as_ref().unwrap();
        assert_eq!((ob.store.as_str(), ob.batch), ("pg", 100));
        assert_eq!(ob.poll, std::time::Duration::from_millis(50));
        assert_eq!(ob.retention, std::time::Duration::from_millis(1000));
        assert_eq!(
            ob.lease,
            std::time::Duration::from_millis(routes::DEFAULT_OUTBOX_LEASE_MS)
        );
        // A relay's dead letters go to its store's table by default.
        assert_eq!(r.dlq.dlq_store(), Some("pg"));
        assert_eq!(r.dlq.topic, "outbox.dlq");
        assert_eq!(c.routes["enrich"].handler.as_deref(), Some("h"));

        assert_eq!(
            problems(&format!(
                "{stores}[routes.a]\nhandler = \"h\"\nsource = {{ topic = \"o\" }}\noutputs = {{ mode = \"outbox\" }}\n\n[routes.b]\nhandler = \"h\"\nsource = {{ topic = \"o\" }}\nstate = \"r\"\nidempotency = {{ key = \"key\" }}\noutputs = {{ mode = \"outbx\" }}\n\n[routes.c]\nsource = {{ outbox = \"r\" }}\noutputs = [\"x\"]\n\n[routes.d]\nsource = {{ outbox = \"pg\", topic = \"t\" }}\noutputs = {{ mode = \"outbox\" }}\n\n[routes.e]\nsource = {{ topic = \"o\" }}\n"
            )),
            [
                "rt.toml: routes.a.outputs.mode: \"outbox\" needs a PostgreSQL state store (the outbox rows commit in its transaction), but this route's store is `embedded`; set `state` to a [stores.<name>] table with kind = \"postgres\"",
                "rt.toml: routes.a.outputs.mode: \"outbox\" needs idempotency = { key = \"...\" }: the outbox rows commit with the message's idempotency key, which is how a redelivery finds them",
                "rt.toml: routes.b.outputs.mode: unknown value \"outbx\"; expected \"publish\" or \"outbox\"",
                "rt.toml: routes.c.source.outbox: state store `r` is not a PostgreSQL store: only kind = \"postgres\" has an outbox table",
                "rt.toml: routes.c.outputs: missing: a relay publishes to a broker; set outputs = { broker = \"...\" }",
                "rt.toml: routes.d.source.topic: an outbox source reads a table, not a broker: it has `outbox` (the store) instead",
                "rt.toml: routes.d.outputs.broker: missing: the broker a relay publishes its rows to",
                "rt.toml: routes.d.outputs.mode: \"outbox\" on a route that relays an outbox: its rows would be written back to an outbox; publish them instead",
                "rt.toml: routes.e.handler: missing: the name of a [handlers.<name>] table",
            ]
        );
    }

    #[test]
    fn nats_brokers_and_jetstream_sources_parse() {
        let c = Config::parse(
            Path::new("rt.toml"),
            "[brokers.nats]\nkind = \"nats\"\nservers = \"nats://127.0.0.1:4222\"\ncredentials_file = \"a.creds\"\ntls = true\n\n[handlers.h]\nmodule = \"h.wasm\"\n\n[routes.js]\nhandler = \"h\"\nsource = { broker = \"nats\", topic = \"orders.*\", group = \"w\", stream = \"ORDERS\", ack_wait_ms = 2000, max_deliver = 5 }\nretry = { mode = \"broker\" }\ndlq = { topic = \"dead.orders\" }\n\n[routes.core]\nhandler = \"h\"\nsource = { broker = \"nats\", topic = \"ping\" }\n",
        )
        .unwrap();
        let BrokerKind::Nats(n) = &c.brokers["nats"].kind else {
            panic!("not nats");
        };
        assert_eq!(n.servers, vec!["nats://127.0.0.1:4222"]);
        assert_eq!(n.credentials_file.as_deref(), Some(Path::new("a.creds")));
        assert!(n.tls);
        let js = c.routes["js"].jetstream.clone().unwrap();
        assert_eq!(js.stream, "ORDERS");
        assert_eq!(js.ack_wait, std::time::Duration::from_secs(2));
        assert_eq!(js.max_ack_pending, routes::DEFAULT_MAX_ACK_PENDING);
        assert_eq!(js.max_deliver, Some(5));
        assert!(c.routes["core"].jetstream.is_none());
        assert_eq!(c.routes["js"].retry.mode, RetryMode::Broker);
        assert_eq!(c.routes["core"].retry.mode, RetryMode::InProcess);
        assert_eq!(c.routes["core"].dlq.topic, "ping.dlq");
    }

    #[test]
    fn jetstream_mistakes_are_named() {
        assert_eq!(
            problems(
                "[brokers.nats]\nkind = \"nats\"\nservers = [\"nats://127.0.0.1:4222\"]\n\n[brokers.k]\nkind = \"kafka\"\nbootstrap_servers = \"x:1\"\n\n[handlers.h]\nmodule = \"h.wasm\"\n\n[routes.a]\nhandler = \"h\"\nsource = { broker = \"nats\", topic = \"orders.>\", stream = \"O\" }\n\n[routes.b]\nhandler = \"h\"\nsource = { broker = \"nats\", topic = \"orders.>\", stream = \"O\" }\ndlq = { topic = \"orders.dlq\" }\n\n[routes.c]\nhandler = \"h\"\nsource = { broker = \"k\", topic = \"t\", stream = \"S\" }\n\n[routes.d]\nhandler = \"h\"\nsource = { broker = \"nats\", topic = \"t\", ack_wait_ms = 0 }\n\n[routes.e]\nhandler = \"h\"\nsource = { topic = \"t\" }\nretry = { mode = \"broker\" }\n\n[routes.f]\nhandler = \"h\"\nsource = { broker = \"nats\", topic = \"t\", stream = \"S\", max_deliver = 2 }\nretry = { mode = \"broker\", max_attempts = 3 }\n\n[routes.g]\nhandler = \"h\"\nsource = { broker = \"nats\", topic = \"t\", stream = \"S\", max_deliver = 3 }\nretry = { mode = \"nak\", max_attempts = 3 }\n"
            ),
            vec![
                "rt.toml: routes.a.dlq: missing: the source subject \"orders.>\" has wildcards, so there is no default \"<subject>.dlq\"; set dlq = { topic = \"...\" }",
                "rt.toml: routes.b.dlq.topic: \"orders.dlq\" matches the route's source subject \"orders.>\": dead letters would be consumed again",
                "rt.toml: routes.c.source.stream: only a source on a `kind = \"nats\"` broker has this (`k` is not one)",
                "rt.toml: routes.d.source.ack_wait_ms: must be greater than 0, found 0",
                "rt.toml: routes.d.source.ack_wait_ms: needs `stream`: only JetStream sources have it",
                "rt.toml: routes.e.retry.mode: \"broker\" needs a JetStream source (`source.stream`) or a RabbitMQ queue: only they redeliver with a delay",
                "rt.toml: routes.f.source.max_deliver: 2 is less than retry.max_attempts (3): with retry.mode = \"broker\" the server would stop redelivering before the message is dead-lettered",
                "rt.toml: routes.g.retry.mode: unknown value \"nak\"; expected \"process\" or \"broker\"",
            ]
        );
    }

    #[test]
    fn runtime_table_fields() {
        let c = Config::parse(
            Path::new("rt.toml"),
            "[runtime]\nshutdown_grace_ms = 250\nadmin = \"127.0.0.1:9464\"\n",
        )
        .unwrap();
        assert_eq!(c.shutdown_grace_ms, 250);
        assert_eq!(c.admin.as_deref(), Some("127.0.0.1:9464"));
        assert_eq!(Config::parse(Path::new("rt.toml"), "").unwrap().admin, None);
        assert_eq!(
            problems("[runtime]\nshutdown_grace_ms = 0\nstate = \"x\"\n"),
            vec![
                "rt.toml: runtime.shutdown_grace_ms: must be greater than 0, found 0",
                "rt.toml: runtime.state: unknown state store `x` (defined: embedded; add a [stores.x] table)",
            ]
        );
        let c = Config::parse(
            Path::new("rt.toml"),
            "[runtime]\nwatch = \"poll\"\nadmin_token_env = \"TOKEN\"\n",
        )
        .unwrap();
        assert_eq!(c.watch, WatchMode::Poll);
        assert_eq!(c.admin_token_env.as_deref(), Some("TOKEN"));
        assert_eq!(
            Config::parse(Path::new("rt.toml"), "").unwrap().watch,
            WatchMode::Events
        );
        assert_eq!(
            problems("[runtime]\nwatch = \"inotify\"\n"),
            vec![
                "rt.toml: runtime.watch: \"inotify\" is not a watch mode: expected \"events\", \"poll\" or \"off\""
            ]
        );
    }

    #[test]
    fn edit_distance_is_levenshtein() {
        assert_eq!(edit_distance("timout_ms", "timeout_ms"), 1);
        assert_eq!(edit_distance("abc", "abc"), 0);
        assert_eq!(edit_distance("", "ab"), 2);
    }
}
