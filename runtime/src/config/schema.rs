//! Every table of `runtime.toml` and its fields, declared once, as data: key, type, default and
//! a line of documentation.
//!
//! The parser reads the known keys of each table from here ([`Reader::finish`] reports any other,
//! and in debug builds a getter for an undeclared key panics), and `lockgate config reference`
//! renders `docs/reference/runtime-toml.md` from here (see [`super::reference`]). The tables'
//! examples, put together, are one valid config that sets every declared key; a test proves it.
//!
//! [`Reader::finish`]: super::reader::Reader::finish

use super::brokers::{
    DEFAULT_CONSUMER_TIMEOUT_MS, DEFAULT_MAX_IN_FLIGHT_PER_PARTITION,
    DEFAULT_RABBIT_REQUEST_TIMEOUT_MS,
};
use super::local::{
    DEFAULT_DUPLICATE_WINDOW_IDS, DEFAULT_DUPLICATE_WINDOW_MS, DEFAULT_MAX_AGE_MS,
    DEFAULT_MAX_BYTES, DEFAULT_SEGMENT_BYTES,
};
use super::routes::{
    DEFAULT_ACK_WAIT_MS, DEFAULT_GROUP, DEFAULT_IDEMPOTENCY_LEASE_MS, DEFAULT_IDEMPOTENCY_TTL_MS,
    DEFAULT_MAX_ACK_PENDING, DEFAULT_MAX_BATCH, DEFAULT_OUTBOX_BATCH,
    DEFAULT_OUTBOX_CLEANUP_EVERY_MS, DEFAULT_OUTBOX_LEASE_MS, DEFAULT_OUTBOX_POLL_MS,
    DEFAULT_OUTBOX_RETENTION_MS, DEFAULT_PREFETCH, EMBEDDED_STORE,
};
use super::runtime::{
    DEFAULT_MAX_INSTANCES, DEFAULT_MAX_LOG_RECORDS, DEFAULT_MAX_MEMORY_MB,
    DEFAULT_MAX_MESSAGES_PER_INSTANCE, DEFAULT_MAX_OUTPUT_BYTES, DEFAULT_MAX_OUTPUTS,
    DEFAULT_SHUTDOWN_GRACE_MS, DEFAULT_STATE_DIR, DEFAULT_TIMEOUT_MS, SCHEMA_VERSION,
};
use super::stores::{DEFAULT_STORE_PREFIX, DEFAULT_STORE_SCHEMA, POSTGRES_POOL_SIZE};
use super::telemetry::{
    DEFAULT_OTLP_EXPORT_TIMEOUT_MS, DEFAULT_OTLP_MAX_QUEUE_SPANS, DEFAULT_OTLP_METRICS_INTERVAL_MS,
};

/// What a field holds.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    /// `true` or `false`.
    Bool,
    /// An integer.
    Int,
    /// A duration in milliseconds (a positive integer).
    Ms,
    /// A size in bytes (a positive integer).
    Bytes,
    /// An integer or a float.
    Number,
    /// A string.
    Str,
    /// A path, relative to the config file's directory.
    Path,
    /// One of these strings.
    Choice(&'static [&'static str]),
    /// An array of strings.
    Strings,
    /// One string or an array of strings.
    StrOrStrings,
    /// A [secret](super::Secret): `"value"`, `{ env = "NAME" }` or `{ file = "path" }`.
    Secret,
    /// A table of the user's keys with string, number or boolean values.
    Scalars,
    /// Like [`Kind::Scalars`], but a value may also be a secret.
    Properties,
    /// A size in bytes or `"unlimited"`.
    BytesOrUnlimited,
    /// A duration in milliseconds or `"unlimited"`.
    MsOrUnlimited,
    /// A table described by one of these (which one depends on the context).
    Table(&'static [&'static Table]),
    /// Tables by name (`[key.<name>]`), each described by one of these (by its `kind`).
    Named(&'static [&'static Table]),
    /// An array of strings, or a table described by this.
    StringsOrTable(&'static Table),
    /// An array of tables, each described by this.
    Tables(&'static Table),
}

/// A field's default.
#[derive(Clone, Copy, Debug)]
pub enum Preset {
    /// The field must be set.
    Required,
    /// Unset: the feature is off or the value absent.
    Unset,
    /// This integer.
    Int(u64),
    /// This number.
    Float(f64),
    /// This boolean.
    Bool(bool),
    /// This string.
    Str(&'static str),
    /// Described in words (it depends on other fields).
    Text(&'static str),
}

/// One field of a table.
#[derive(Clone, Copy, Debug)]
pub struct Field {
    /// The TOML key.
    pub key: &'static str,
    /// What it holds.
    pub kind: Kind,
    /// Its default.
    pub default: Preset,
    /// What it does, one or two sentences of Markdown.
    pub doc: &'static str,
}

/// How a deprecated key spelled a secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// The key named an environment variable (`url_env = "NAME"`).
    Env,
    /// The key named a file (`url_file = "path"`).
    File,
}

/// A deprecated key that is still accepted: it spells secret field `of` in the old way. It is
/// read with a warning that names the replacement, and never suggested or documented as current.
#[derive(Clone, Copy, Debug)]
pub struct Alias {
    /// The old key (`url_env`).
    pub key: &'static str,
    /// The field it stands for (`url`).
    pub of: &'static str,
    /// What its value names.
    pub shape: Shape,
}

/// One TOML table (or a variant of one, such as a broker of one kind).
#[derive(Debug)]
pub struct Table {
    /// Stable id: the anchor in the reference.
    pub id: &'static str,
    /// How the reference titles it (Markdown).
    pub title: &'static str,
    /// A short name for links to it, among its siblings (Markdown).
    pub label: &'static str,
    /// What it is (Markdown).
    pub doc: &'static str,
    /// Its fields, in the order the reference lists them.
    pub fields: &'static [Field],
    /// Deprecated keys still accepted.
    pub aliases: &'static [Alias],
    /// A TOML example. The examples of [`TABLES`] together are one valid config.
    pub example: &'static str,
}

impl Table {
    /// Whether `key` is a field or a deprecated alias of this table.
    pub fn declares(&self, key: &str) -> bool {
        self.declared_key(key).is_some()
    }

    /// `key` as declared (a field's or an alias's), if it is.
    pub fn declared_key(&self, key: &str) -> Option<&'static str> {
        self.field(key)
            .map(|f| f.key)
            .or_else(|| self.alias(key).map(|a| a.key))
    }

    /// The field `key`.
    pub fn field(&self, key: &str) -> Option<&'static Field> {
        self.fields.iter().find(|f| f.key == key)
    }

    /// The deprecated alias `key`.
    pub fn alias(&self, key: &str) -> Option<&'static Alias> {
        self.aliases.iter().find(|a| a.key == key)
    }
}

const fn field(key: &'static str, kind: Kind, default: Preset, doc: &'static str) -> Field {
    Field {
        key,
        kind,
        default,
        doc,
    }
}

use Kind as K;
use Preset as P;

/// The top level of the file.
pub const ROOT: Table = Table {
    id: "top-level",
    title: "Top level",
    label: "top level",
    doc: "The file holds these tables; each is optional. Relative paths anywhere in it are resolved against the directory of the file.",
    fields: &[
        field(
            "version",
            K::Int,
            P::Int(SCHEMA_VERSION as u64),
            "Schema version of the file; only 1 exists.",
        ),
        field(
            "runtime",
            K::Table(&[&RUNTIME]),
            P::Unset,
            "Settings of the process.",
        ),
        field(
            "engine",
            K::Table(&[&ENGINE]),
            P::Unset,
            "The WebAssembly engine.",
        ),
        field(
            "handlers",
            K::Named(&[&HANDLER]),
            P::Unset,
            "Handler components, by name.",
        ),
        field(
            "brokers",
            K::Named(BROKERS),
            P::Unset,
            "Brokers, by name, besides the built-in embedded broker `local`.",
        ),
        field(
            "stores",
            K::Named(STORES),
            P::Unset,
            "Shared state stores, by name, besides the built-in `embedded` one.",
        ),
        field(
            "routes",
            K::Named(&[&ROUTE]),
            P::Unset,
            "Routes, by name: a source, a handler, and the delivery policies around each call.",
        ),
        field(
            "local",
            K::Table(&[&LOCAL]),
            P::Unset,
            "The embedded broker's segments, retention and duplicate window.",
        ),
        field(
            "telemetry",
            K::Table(&[&TELEMETRY]),
            P::Unset,
            "Where traces go besides the logs.",
        ),
    ],
    aliases: &[],
    example: "version = 1\n",
};

/// `[telemetry]`.
pub const TELEMETRY: Table = Table {
    id: "telemetry",
    title: "`[telemetry]`",
    label: "`[telemetry]`",
    doc: "Export beyond `/metrics` and the logs. Changes take effect at the next start.",
    fields: &[field(
        "otlp",
        K::Table(&[&TELEMETRY_OTLP]),
        P::Unset,
        "OpenTelemetry export of a trace per message and of the metrics; off unless present.",
    )],
    aliases: &[],
    example: "",
};

/// `[telemetry.otlp]`.
pub const TELEMETRY_OTLP: Table = Table {
    id: "telemetry-otlp",
    title: "`[telemetry.otlp]`",
    label: "`otlp`",
    doc: "OpenTelemetry (OTLP/HTTP, protobuf) export: a trace per message with a span per attempt, per handler call and per outbound HTTP request and SQL statement, continuing the message's `traceparent`; and the metrics of `/metrics`, from the same snapshot ([observability](../operate/observability.md#opentelemetry)). Export never slows delivery: spans wait in a bounded queue, and what does not fit or cannot be sent is dropped and counted (`lockgate_otlp_spans_dropped_total`).",
    fields: &[
        field(
            "endpoint",
            K::Str,
            P::Required,
            "The collector's OTLP/HTTP base URL (`http://collector:4318`); traces are sent to `<endpoint>/v1/traces`, metrics to `<endpoint>/v1/metrics`. `http://` or `https://` (verified against the web PKI roots).",
        ),
        field(
            "protocol",
            K::Choice(&["http/protobuf"]),
            P::Str("http/protobuf"),
            "The OTLP transport; only OTLP/HTTP with protobuf bodies.",
        ),
        field(
            "headers",
            K::Properties,
            P::Unset,
            "Headers sent with every export, such as `authorization`; each value a string or a secret (`{ env = \"NAME\" }`).",
        ),
        field(
            "sampling_ratio",
            K::Number,
            P::Float(1.0),
            "The share of traces exported, from 0 to 1, for messages without a `traceparent`; a message with one follows its `sampled` flag.",
        ),
        field(
            "resource",
            K::Scalars,
            P::Unset,
            "Resource attributes of every span besides `service.name = \"lockgate\"` and `service.version` (`service.name` may be set here).",
        ),
        field(
            "max_queue_spans",
            K::Int,
            P::Int(DEFAULT_OTLP_MAX_QUEUE_SPANS),
            "Spans waiting to be sent at most; a span that finds the queue full is dropped and counted. The sender takes the queue every 20 ms, so this many spans per 20 ms is the most that is kept.",
        ),
        field(
            "export_timeout_ms",
            K::Ms,
            P::Int(DEFAULT_OTLP_EXPORT_TIMEOUT_MS),
            "How long one export request may take; its spans are dropped and counted after it.",
        ),
        field(
            "traces",
            K::Bool,
            P::Bool(true),
            "Export the message traces.",
        ),
        field(
            "metrics",
            K::Bool,
            P::Bool(true),
            "Export the metrics of `/metrics` (cumulative sums, gauges and histograms with their labels as attributes), every `metrics_interval_ms` and once more when the process stops.",
        ),
        field(
            "metrics_interval_ms",
            K::Ms,
            P::Int(DEFAULT_OTLP_METRICS_INTERVAL_MS),
            "Time between two metrics exports.",
        ),
    ],
    aliases: &[],
    example: r#"[telemetry.otlp]
endpoint = "http://127.0.0.1:4318"
protocol = "http/protobuf"
headers = { authorization = { env = "OTLP_AUTHORIZATION" } }
sampling_ratio = 1.0
resource = { "deployment.environment" = "production" }
max_queue_spans = 2048
export_timeout_ms = 10000
traces = true
metrics = true
metrics_interval_ms = 15000
"#,
};

/// `[runtime]`.
pub const RUNTIME: Table = Table {
    id: "runtime",
    title: "`[runtime]`",
    label: "`[runtime]`",
    doc: "Settings of the process. Changes to this table take effect at the next start, not on a reload.",
    fields: &[
        field(
            "state_dir",
            K::Path,
            P::Str(DEFAULT_STATE_DIR),
            "Where the embedded broker, the embedded state store (guest kv, idempotency keys) and the compiled-component cache live.",
        ),
        field(
            "shutdown_grace_ms",
            K::Ms,
            P::Int(DEFAULT_SHUTDOWN_GRACE_MS),
            "Time in-flight messages get to finish after SIGINT or SIGTERM; the rest stay unacknowledged and are redelivered.",
        ),
        field(
            "admin",
            K::Str,
            P::Unset,
            "`ip:port` of the admin endpoint: `/metrics`, `/healthz`, `/readyz`, `/status`, `POST /reload` ([observability](../operate/observability.md)). `lockgate run --admin` overrides it.",
        ),
        field(
            "admin_token",
            K::Secret,
            P::Unset,
            "The token `POST /reload` must present as `Authorization: Bearer <token>`. Without one, a reload over an endpoint beyond loopback is refused.",
        ),
        field(
            "watch",
            K::Choice(&["events", "poll", "off"]),
            P::Str("events"),
            "How changed modules and config are noticed: file-system events (polling where there are none), polling every 500 ms (network file systems), or not at all (reload on SIGHUP or `lockgate reload` only).",
        ),
        field(
            "state",
            K::Str,
            P::Str(EMBEDDED_STORE),
            "The state store of the routes that name none: `embedded` or a `[stores.<name>]`.",
        ),
    ],
    aliases: &[Alias {
        key: "admin_token_env",
        of: "admin_token",
        shape: Shape::Env,
    }],
    example: r#"[runtime]
state_dir = ".lockgate"
shutdown_grace_ms = 10000
admin = "127.0.0.1:9464"
admin_token = { env = "LOCKGATE_ADMIN_TOKEN" }
watch = "events"
state = "embedded"
"#,
};

/// `[engine]`.
pub const ENGINE: Table = Table {
    id: "engine",
    title: "`[engine]`",
    label: "`[engine]`",
    doc: "The WebAssembly engine every handler runs in.",
    fields: &[
        field(
            "pooling",
            K::Bool,
            P::Bool(true),
            "The pooling instance allocator: a fresh instance in microseconds, its memory reserved up front.",
        ),
        field(
            "max_instances",
            K::Int,
            P::Int(DEFAULT_MAX_INSTANCES as u64),
            "Most instances alive at once, across all handlers.",
        ),
        field(
            "cache",
            K::Bool,
            P::Bool(true),
            "Cache compiled components in `<state_dir>/cache`.",
        ),
    ],
    aliases: &[],
    example: "[engine]\npooling = true\nmax_instances = 1000\ncache = true\n",
};

/// `[handlers.<name>]`.
pub const HANDLER: Table = Table {
    id: "handlers",
    title: "`[handlers.<name>]`",
    label: "`[handlers.<name>]`",
    doc: "A WebAssembly component of the `lockgate:handler` world. Its name (1-64 lower-case letters, digits, `-` or `_`) is what routes name in `handler`.",
    fields: &[
        field("module", K::Path, P::Required, "The component (`.wasm`)."),
        field(
            "timeout_ms",
            K::Ms,
            P::Int(DEFAULT_TIMEOUT_MS),
            "Deadline of one call; past it the call ends as `timed_out`.",
        ),
        field(
            "max_memory_mb",
            K::Int,
            P::Int(DEFAULT_MAX_MEMORY_MB),
            "Cap on the instance's memory in MiB (at most 4096); past it the call ends as `out_of_memory`.",
        ),
        field(
            "isolation",
            K::Choice(&["reuse", "per-message"]),
            P::Str("reuse"),
            "`reuse`: an instance serves many messages, and is replaced after a trap, a timeout or `max_messages_per_instance` calls; `per-message`: a fresh instance for every message.",
        ),
        field(
            "max_messages_per_instance",
            K::Int,
            P::Int(DEFAULT_MAX_MESSAGES_PER_INSTANCE),
            "Calls before a reused instance is replaced (bounds leaks inside a guest).",
        ),
        field(
            "max_output_bytes",
            K::Bytes,
            P::Int(DEFAULT_MAX_OUTPUT_BYTES),
            "Largest single output: payload, key and headers.",
        ),
        field(
            "max_outputs",
            K::Int,
            P::Int(DEFAULT_MAX_OUTPUTS as u64),
            "Most outputs per call.",
        ),
        field(
            "max_log_records",
            K::Int,
            P::Int(DEFAULT_MAX_LOG_RECORDS as u64),
            "Log records kept per call (guest logs and lines of stdout and stderr).",
        ),
        field(
            "config",
            K::Properties,
            P::Unset,
            "Values the guest reads with `config.get`. A [secret](#secrets) written `{ env = \"NAME\" }` or `{ file = \"path\" }` is read when the handler is loaded (at start and at every reload), its file's trailing newline dropped, and never shown.",
        ),
        field(
            "env",
            K::Strings,
            P::Unset,
            "Host environment variables the guest sees (`wasi:cli/environment`), by name; no other. Each must be set.",
        ),
        field(
            "files",
            K::Tables(&HANDLER_FILE),
            P::Unset,
            "Host directories the guest may read, each preopened read-only at its `guest` path; nothing else of the file system is visible.",
        ),
        field(
            "http",
            K::Table(&[&HANDLER_HTTP]),
            P::Unset,
            "Outbound HTTP the handler may make ([outbound HTTP](../handlers/http.md)); without it every request is denied.",
        ),
        field(
            "sql",
            K::Str,
            P::Unset,
            "A `[stores.<name>]` with `kind = \"postgres\"`: the database the handler's statements (the `sql` interface) run on, in one transaction per message that commits with the message's idempotency key ([SQL](../handlers/sql.md)). Every route of the handler must keep its idempotency keys in that store (`state`, `idempotency`). Without it every statement is refused.",
        ),
        field(
            "sql_role",
            K::Str,
            P::Unset,
            "A role the handler's statements run as (`SET LOCAL ROLE`), so that its rights can be narrower than those of the store's user, which must be a member of it. lockgate's own tables are written as the store's user at commit.",
        ),
        field(
            "sql_max_rows",
            K::Int,
            P::Int(crate::config::DEFAULT_SQL_MAX_ROWS),
            "Most rows one query may return; more fail the query with `too-large`.",
        ),
        field(
            "sql_max_result_bytes",
            K::Bytes,
            P::Int(crate::config::DEFAULT_SQL_MAX_RESULT_BYTES),
            "Most bytes of column data one query may return; more fail the query with `too-large`.",
        ),
    ],
    aliases: &[],
    example: r#"[handlers.uppercase]
module = "guest-examples/target/wasm32-wasip2/release/uppercase.wasm"
timeout_ms = 1000
max_memory_mb = 128
isolation = "reuse"
max_messages_per_instance = 10000
max_output_bytes = 1048576
max_outputs = 1000
max_log_records = 100
config = { target = "shouted", api_key = { env = "UPPERCASE_API_KEY" } }
env = ["TZ"]
files = [{ host = "data", guest = "/data" }]

[handlers.ledger]
module = "guest-examples/target/wasm32-wasip2/release/balances.wasm"
sql = "pg"
sql_role = "ledger_writer"
sql_max_rows = 1000
sql_max_result_bytes = 1048576
"#,
};

/// `[handlers.<name>.http]`.
pub const HANDLER_HTTP: Table = Table {
    id: "handlers-http",
    title: "`[handlers.<name>.http]`",
    label: "`http`",
    doc: "The outbound HTTP a handler is granted (`wasi:http`). Deny by default: without this table, or to a host no entry allows, a request fails in the guest with `http-request-denied`. A host reached through `*` or `*.domain` is refused when it resolves to a loopback, private or link-local address; name the host or IP exactly to call an internal service. Redirects are never followed by the host. See [outbound HTTP](../handlers/http.md).",
    fields: &[
        field(
            "allowed_hosts",
            K::Strings,
            P::Required,
            "Where requests may go: `scheme://host[:port]` with scheme `http` or `https`; host a name, an IP (`[::1]` for IPv6), `*.domain` (names below it) or `*`; port a number or `*`. An omitted port is the scheme's default (80, 443). No paths.",
        ),
        field(
            "timeout_ms",
            K::Ms,
            P::Int(crate::config::http::DEFAULT_HTTP_TIMEOUT_MS),
            "Bound of one request from connecting to the response headers (and the body, when it declares at most 64 KiB); the call's remaining time bounds it too, and every body read ends at the call's deadline.",
        ),
        field(
            "max_request_bytes",
            K::Bytes,
            P::Int(crate::config::http::DEFAULT_MAX_REQUEST_BYTES),
            "Largest request body; a larger one fails the request.",
        ),
        field(
            "max_response_bytes",
            K::Bytes,
            P::Int(crate::config::http::DEFAULT_MAX_RESPONSE_BYTES),
            "Largest response body; past it the read fails in the guest (`http-response-body-size`).",
        ),
        field(
            "max_concurrent",
            K::Int,
            P::Int(crate::config::http::DEFAULT_MAX_CONCURRENT as u64),
            "Requests of this handler open at once, across its instances; more wait for a slot (until the call's deadline).",
        ),
        field(
            "ca_file",
            K::Path,
            P::Unset,
            "PEM file of certificate authorities trusted besides the built-in webpki roots (a private CA).",
        ),
        field(
            "idempotency_header",
            K::Str,
            P::Str(crate::config::http::DEFAULT_IDEMPOTENCY_HEADER),
            "Header set on every request to a key derived from the message and the request's index in the call: the same on every retry, redelivery and restart, so a receiver that deduplicates applies a request once. `\"\"` turns it off; a header the handler sets itself wins.",
        ),
    ],
    aliases: &[],
    example: r#"[handlers.uppercase.http]
allowed_hosts = ["https://customers.example.com", "http://127.0.0.1:8080"]
timeout_ms = 2000
max_request_bytes = 65536
max_response_bytes = 1048576
max_concurrent = 8
ca_file = "certs/internal-ca.pem"
idempotency_header = "Idempotency-Key"
"#,
};

/// An entry of `files` in `[handlers.<name>]`.
pub const HANDLER_FILE: Table = Table {
    id: "handlers-files",
    title: "`files` of `[handlers.<name>]`",
    label: "`files` entry",
    doc: "A host directory the guest reads at an absolute path of its own, read-only: it can list and read the files under it, not write, create or delete them, nor reach outside it (`..` and symbolic links that leave it are refused). `lockgate check`, the start and every reload fail when the directory is missing.",
    fields: &[
        field("host", K::Path, P::Required, "The directory on the host."),
        field(
            "guest",
            K::Str,
            P::Required,
            "Where the guest finds it: an absolute path (`/data`), each given once.",
        ),
    ],
    aliases: &[],
    example: "",
};

/// The kinds of `[stores.<name>]`.
pub const STORES: &[&Table] = &[&STORE_REDIS, &STORE_POSTGRES];

const STORE_URL_ALIASES: &[Alias] = &[Alias {
    key: "url_env",
    of: "url",
    shape: Shape::Env,
}];

/// `[stores.<name>]` with `kind = "redis"`.
pub const STORE_REDIS: Table = Table {
    id: "stores-redis",
    title: "`[stores.<name>]` with `kind = \"redis\"`",
    label: "`\"redis\"`",
    doc: "A Redis (or Valkey) server holding the idempotency keys and guest kv of the routes that name it in `state`, shared by every process using it ([state stores](../operate/state-stores.md)).",
    fields: &[
        field(
            "kind",
            K::Choice(&["redis"]),
            P::Required,
            "What the store is.",
        ),
        field(
            "url",
            K::Secret,
            P::Required,
            "`redis://[user:password@]host:port[/db]`, `rediss://...` (TLS) or `unix://...`.",
        ),
        field(
            "prefix",
            K::Str,
            P::Str(DEFAULT_STORE_PREFIX),
            "Every key starts with it.",
        ),
    ],
    aliases: STORE_URL_ALIASES,
    example: r#"[stores.shared]
kind = "redis"
url = { env = "LOCKGATE_REDIS_URL" }
prefix = "lockgate"
"#,
};

/// `[stores.<name>]` with `kind = "postgres"`.
pub const STORE_POSTGRES: Table = Table {
    id: "stores-postgres",
    title: "`[stores.<name>]` with `kind = \"postgres\"`",
    label: "`\"postgres\"`",
    doc: "A PostgreSQL database holding idempotency keys and guest kv; it also has the tables of the [transactional outbox](../operate/outbox.md) and of [dead letters](../operate/dead-letters.md).",
    fields: &[
        field(
            "kind",
            K::Choice(&["postgres"]),
            P::Required,
            "What the store is.",
        ),
        field(
            "url",
            K::Secret,
            P::Required,
            "`postgres://user:password@host:5432/db`, or the key=value form.",
        ),
        field(
            "schema",
            K::Str,
            P::Str(DEFAULT_STORE_SCHEMA),
            "The schema holding lockgate's tables, created and migrated by the runtime: lower-case letters, digits and `_`.",
        ),
        field(
            "pool_size",
            K::Int,
            P::Int(POSTGRES_POOL_SIZE as u64),
            "Most connections the store opens.",
        ),
    ],
    aliases: STORE_URL_ALIASES,
    example: r#"[stores.pg]
kind = "postgres"
url = { file = "secrets/pg-url" }
schema = "lockgate"
pool_size = 16
"#,
};

/// The kinds of `[brokers.<name>]`.
pub const BROKERS: &[&Table] = &[&KAFKA, &NATS, &RABBITMQ];

/// `[brokers.<name>]` with `kind = "kafka"`.
pub const KAFKA: Table = Table {
    id: "brokers-kafka",
    title: "`[brokers.<name>]` with `kind = \"kafka\"`",
    label: "`\"kafka\"`",
    doc: "Apache Kafka, or anything speaking its protocol ([Kafka](../operate/brokers/kafka.md)).",
    fields: &[
        field(
            "kind",
            K::Choice(&["kafka"]),
            P::Required,
            "What the broker is.",
        ),
        field(
            "bootstrap_servers",
            K::Str,
            P::Required,
            "Comma-separated `host:port` list.",
        ),
        field(
            "properties",
            K::Properties,
            P::Unset,
            "librdkafka properties of consumers and producers, passed through. A value may be a secret: `\"sasl.password\" = { env = \"KAFKA_PASSWORD\" }`.",
        ),
        field(
            "consumer_properties",
            K::Properties,
            P::Unset,
            "librdkafka properties of consumers only (they override `properties`).",
        ),
        field(
            "producer_properties",
            K::Properties,
            P::Unset,
            "librdkafka properties of producers only (they override `properties`).",
        ),
        field(
            "max_in_flight_per_partition",
            K::Int,
            P::Int(DEFAULT_MAX_IN_FLIGHT_PER_PARTITION as u64),
            "A partition with this many received, unfinished messages is paused until half of them are done (at most 1,000,000).",
        ),
    ],
    aliases: &[],
    example: r#"[brokers.kafka]
kind = "kafka"
bootstrap_servers = "127.0.0.1:9092"
properties = { "security.protocol" = "SASL_SSL", "sasl.mechanisms" = "SCRAM-SHA-512", "sasl.username" = "lockgate", "sasl.password" = { env = "KAFKA_PASSWORD" } }
consumer_properties = { "session.timeout.ms" = 6000 }
producer_properties = { "linger.ms" = 5 }
max_in_flight_per_partition = 5000
"#,
};

/// `[brokers.<name>]` with `kind = "nats"`.
pub const NATS: Table = Table {
    id: "brokers-nats",
    title: "`[brokers.<name>]` with `kind = \"nats\"`",
    label: "`\"nats\"`",
    doc: "A NATS server ([NATS and JetStream](../operate/brokers/nats.md)). A route whose source has a `stream` reads it with JetStream (at least once); one without reads a core NATS subscription (at most once). It logs in with at most one of `credentials`, `nkey_seed`, `token`, or `user` and `password`.",
    fields: &[
        field(
            "kind",
            K::Choice(&["nats"]),
            P::Required,
            "What the broker is.",
        ),
        field(
            "servers",
            K::StrOrStrings,
            P::Required,
            "Server URLs (`nats://`, `tls://`), tried in turn, and again on reconnect.",
        ),
        field(
            "credentials",
            K::Secret,
            P::Unset,
            "A `.creds` file's contents: a user JWT and its nkey seed.",
        ),
        field("nkey_seed", K::Secret, P::Unset, "An nkey seed."),
        field("token", K::Secret, P::Unset, "An authentication token."),
        field(
            "user",
            K::Str,
            P::Unset,
            "A user name; it needs `password`.",
        ),
        field("password", K::Secret, P::Unset, "The password of `user`."),
        field(
            "tls",
            K::Bool,
            P::Bool(false),
            "Require TLS; `false` takes what the server offers (a `tls://` URL requires it too).",
        ),
        field(
            "tls_ca_file",
            K::Path,
            P::Unset,
            "An extra root certificate (PEM) to trust.",
        ),
    ],
    aliases: &[
        Alias {
            key: "credentials_file",
            of: "credentials",
            shape: Shape::File,
        },
        Alias {
            key: "nkey_seed_file",
            of: "nkey_seed",
            shape: Shape::File,
        },
        Alias {
            key: "token_env",
            of: "token",
            shape: Shape::Env,
        },
        Alias {
            key: "password_env",
            of: "password",
            shape: Shape::Env,
        },
    ],
    example: r#"[brokers.nats]
kind = "nats"
servers = ["nats://127.0.0.1:4222"]
credentials = { file = "secrets/lockgate.creds" }
tls = true
tls_ca_file = "certs/ca.pem"

# The other ways to log in, at most one per broker:
[brokers.nats-nkey]
kind = "nats"
servers = "nats://127.0.0.1:4222"
nkey_seed = { file = "secrets/lockgate.nk" }

[brokers.nats-token]
kind = "nats"
servers = "nats://127.0.0.1:4222"
token = { env = "NATS_TOKEN" }

[brokers.nats-user]
kind = "nats"
servers = "nats://127.0.0.1:4222"
user = "lockgate"
password = { env = "NATS_PASSWORD" }
"#,
};

/// `[brokers.<name>]` with `kind = "rabbitmq"`.
pub const RABBITMQ: Table = Table {
    id: "brokers-rabbitmq",
    title: "`[brokers.<name>]` with `kind = \"rabbitmq\"`",
    label: "`\"rabbitmq\"`",
    doc: "A RabbitMQ server, over AMQP 0.9.1 ([RabbitMQ](../operate/brokers/rabbitmq.md)).",
    fields: &[
        field(
            "kind",
            K::Choice(&["rabbitmq"]),
            P::Required,
            "What the broker is.",
        ),
        field(
            "url",
            K::Secret,
            P::Required,
            "`amqp://user:password@host:5672/vhost`, or `amqps://...` (TLS).",
        ),
        field(
            "exchange",
            K::Str,
            P::Str(""),
            "Where outputs and dead letters are published, with the topic as routing key. `\"\"`, the default exchange, routes straight to the queue named by the topic, which lockgate then declares (durable).",
        ),
        field(
            "consumer_timeout_ms",
            K::Ms,
            P::Int(DEFAULT_CONSUMER_TIMEOUT_MS),
            "The server's `consumer_timeout`: a source paused by the breaker for half of it lets go of the deliveries it holds.",
        ),
        field(
            "request_timeout_ms",
            K::Ms,
            P::Int(DEFAULT_RABBIT_REQUEST_TIMEOUT_MS),
            "Longest wait for the server to answer one request; past it the connection is opened anew and the request retried.",
        ),
        field(
            "ca_file",
            K::Path,
            P::Unset,
            "PEM certificates trusted for `amqps://` besides the system's roots.",
        ),
    ],
    aliases: &[
        Alias {
            key: "url_env",
            of: "url",
            shape: Shape::Env,
        },
        Alias {
            key: "url_file",
            of: "url",
            shape: Shape::File,
        },
    ],
    example: r#"[brokers.rabbit]
kind = "rabbitmq"
url = { env = "AMQP_URL" }
exchange = ""
consumer_timeout_ms = 1800000
request_timeout_ms = 30000
ca_file = "certs/ca.pem"
"#,
};

/// The fields of `[local]` that `[local.topics.<topic>]` may set too.
const LOCAL_FIELDS: &[Field] = &[
    field(
        "segment_bytes",
        K::Bytes,
        P::Int(DEFAULT_SEGMENT_BYTES),
        "Roll a new segment file at this size (at least 4096).",
    ),
    field(
        "max_bytes",
        K::BytesOrUnlimited,
        P::Int(DEFAULT_MAX_BYTES),
        "Retention by size: the oldest segments are deleted while all of a topic's together are larger.",
    ),
    field(
        "max_age_ms",
        K::MsOrUnlimited,
        P::Int(DEFAULT_MAX_AGE_MS),
        "Retention by age: a segment is deleted once its newest record is older.",
    ),
    field(
        "delete_unconsumed",
        K::Bool,
        P::Bool(false),
        "Retention may delete records a consumer group has not committed (the group then skips them, with a warning); by default a group holds them back.",
    ),
    field(
        "duplicate_window_ms",
        K::Ms,
        P::Int(DEFAULT_DUPLICATE_WINDOW_MS),
        "How long a `lockgate-id` is remembered after its append, so a repeated append is dropped.",
    ),
    field(
        "duplicate_window_ids",
        K::Int,
        P::Int(DEFAULT_DUPLICATE_WINDOW_IDS),
        "Most ids remembered per topic; the oldest go first (at most 10,000,000).",
    ),
];

/// A `[local]` field as `[local.topics.<topic>]` has it: by default, `[local]`'s value.
const fn inherited(f: Field) -> Field {
    Field {
        default: P::Text("`[local]`'s"),
        ..f
    }
}

/// `[local]`.
pub const LOCAL: Table = Table {
    id: "local",
    title: "`[local]`",
    label: "`[local]`",
    doc: "The embedded broker `local` ([the embedded broker](../operate/brokers/embedded.md)). A topic a route dead-letters to on it has no size or age limit unless its own `[local.topics.<topic>]` sets one: retention never drops dead letters silently.",
    fields: &[
        LOCAL_FIELDS[0],
        LOCAL_FIELDS[1],
        LOCAL_FIELDS[2],
        LOCAL_FIELDS[3],
        LOCAL_FIELDS[4],
        LOCAL_FIELDS[5],
        field(
            "topics",
            K::Named(&[&LOCAL_TOPIC]),
            P::Unset,
            "Settings of one topic, by topic name.",
        ),
    ],
    aliases: &[],
    example: r#"[local]
segment_bytes = 67108864
max_bytes = 1073741824
max_age_ms = 604800000
delete_unconsumed = false
duplicate_window_ms = 120000
duplicate_window_ids = 100000
"#,
};

/// `[local.topics.<topic>]`.
pub const LOCAL_TOPIC: Table = Table {
    id: "local-topics",
    title: "`[local.topics.<topic>]`",
    label: "`[local.topics.<topic>]`",
    doc: "One topic's own settings on the embedded broker; what it leaves out comes from `[local]`. A topic name is 1-249 characters of `A-Z a-z 0-9 . _ -`.",
    fields: &[
        inherited(LOCAL_FIELDS[0]),
        inherited(LOCAL_FIELDS[1]),
        inherited(LOCAL_FIELDS[2]),
        inherited(LOCAL_FIELDS[3]),
        inherited(LOCAL_FIELDS[4]),
        inherited(LOCAL_FIELDS[5]),
    ],
    aliases: &[],
    example: r#"[local.topics."orders.dlq"]
max_age_ms = 2592000000

[local.topics.audit]
segment_bytes = 16777216
max_bytes = "unlimited"
max_age_ms = "unlimited"
delete_unconsumed = false
duplicate_window_ms = 600000
duplicate_window_ids = 1000000
"#,
};

/// `[routes.<name>]`.
pub const ROUTE: Table = Table {
    id: "routes",
    title: "`[routes.<name>]`",
    label: "`[routes.<name>]`",
    doc: "A source, the handler that runs each of its messages, and the delivery policies around each call ([running routes](../operate/run.md#policies-each-with-an-example)). The sub-tables below can also be written inline: `retry = { max_attempts = 3 }`.",
    fields: &[
        field(
            "handler",
            K::Str,
            P::Text("required, except for an outbox relay"),
            "The `[handlers.<name>]` it runs. An outbox relay without one publishes each row as it is.",
        ),
        field(
            "source",
            K::Table(&[&SOURCE, &SOURCE_JETSTREAM, &SOURCE_RABBITMQ, &SOURCE_OUTBOX]),
            P::Required,
            "Where messages come from.",
        ),
        field(
            "outputs",
            K::StringsOrTable(&OUTPUTS),
            P::Text("none"),
            "The topics the handler may publish to (publishing elsewhere fails the call), or a table that also says how and where.",
        ),
        field(
            "concurrency",
            K::Int,
            P::Int(1),
            "Lanes: messages handled at once (at most 1024).",
        ),
        field(
            "ordering",
            K::Choice(&["partition", "key"]),
            P::Str("partition"),
            "What order is kept: `partition`, one lane per partition at a time; `key`, different keys of one partition run in parallel, each key in order.",
        ),
        field(
            "max_batch",
            K::Int,
            P::Int(DEFAULT_MAX_BATCH as u64),
            "Up to this many queued messages of one lane are handled in a row, their outputs published together and then acknowledged together (at most 10,000).",
        ),
        field(
            "retry",
            K::Table(&[&RETRY]),
            P::Text("the defaults of the table"),
            "Retries of a failed call.",
        ),
        field(
            "circuit_breaker",
            K::Table(&[&BREAKER]),
            P::Unset,
            "Pauses the source while calls keep failing.",
        ),
        field(
            "dlq",
            K::Table(&[&DLQ]),
            P::Text("`<source topic>.dlq` on the source's broker"),
            "Where messages go that failed for good.",
        ),
        field(
            "idempotency",
            K::Table(&[&IDEMPOTENCY]),
            P::Unset,
            "A message whose key already succeeded is not run again; the outputs it had are published instead.",
        ),
        field(
            "rate_limit",
            K::Table(&[&RATE_LIMIT]),
            P::Unset,
            "Most calls per second.",
        ),
        field(
            "state",
            K::Str,
            P::Text("`[runtime] state`"),
            "The store of this route's idempotency keys and its handler's kv: `embedded` or a `[stores.<name>]`.",
        ),
    ],
    aliases: &[],
    example: r#"[routes.orders]
handler = "uppercase"
source = { broker = "kafka", topic = "orders", group = "lockgate" }
outputs = ["orders.valid"]
concurrency = 4
ordering = "key"
max_batch = 256
state = "shared"
"#,
};

/// `source` of a route: the fields every broker's source has.
pub const SOURCE: Table = Table {
    id: "routes-source",
    title: "`source`",
    label: "`source`",
    doc: "Where a route's messages come from: a topic of a broker. A source also takes the fields of its broker's kind (below); a field of another kind is an error.",
    fields: &[
        field(
            "broker",
            K::Str,
            P::Str("local"),
            "`local` (the embedded broker) or a `[brokers.<name>]`.",
        ),
        field(
            "topic",
            K::Str,
            P::Required,
            "The topic; on NATS the subject (wildcards allowed), on RabbitMQ the queue.",
        ),
        field(
            "group",
            K::Str,
            P::Str(DEFAULT_GROUP),
            "Consumer group (Kafka, the embedded broker), durable consumer (JetStream) or queue group (core NATS).",
        ),
    ],
    aliases: &[],
    example: r#"[routes.words]
handler = "uppercase"
source = { broker = "local", topic = "words", group = "lockgate" }
"#,
};

/// `source` on a NATS broker.
pub const SOURCE_JETSTREAM: Table = Table {
    id: "routes-source-nats",
    title: "`source` on a `kind = \"nats\"` broker",
    label: "on NATS",
    doc: "With `stream`, a JetStream durable pull consumer named by `group`: at least once. Without, a core NATS subscription: at most once.",
    fields: &[
        field(
            "stream",
            K::Str,
            P::Unset,
            "The JetStream stream the consumer reads (it must exist).",
        ),
        field(
            "ack_wait_ms",
            K::Ms,
            P::Int(DEFAULT_ACK_WAIT_MS),
            "How long the server waits for an ack before it redelivers; lockgate sends `in_progress` every half of it while it holds a message.",
        ),
        field(
            "max_ack_pending",
            K::Int,
            P::Int(DEFAULT_MAX_ACK_PENDING as u64),
            "Most unacknowledged messages the server hands this consumer.",
        ),
        field(
            "max_deliver",
            K::Int,
            P::Text("unlimited"),
            "Deliveries before the server gives up on a message.",
        ),
    ],
    aliases: &[],
    example: r#"[routes.from-nats]
handler = "uppercase"
source = { broker = "nats", topic = "orders.>", group = "router", stream = "ORDERS", ack_wait_ms = 30000, max_ack_pending = 1000, max_deliver = 10 }
dlq = { topic = "dead.orders" }
"#,
};

/// `source` on a RabbitMQ broker.
pub const SOURCE_RABBITMQ: Table = Table {
    id: "routes-source-rabbitmq",
    title: "`source` on a `kind = \"rabbitmq\"` broker",
    label: "on RabbitMQ",
    doc: "`topic` is the queue; lockgate declares it if it does not exist.",
    fields: &[
        field(
            "queue_type",
            K::Choice(&["quorum", "classic"]),
            P::Str("quorum"),
            "The type the queue is declared with (an existing queue must match). A quorum queue counts deliveries, which lockgate takes as the attempts already made.",
        ),
        field(
            "prefetch",
            K::Int,
            P::Int(DEFAULT_PREFETCH as u64),
            "Most unacknowledged deliveries the server hands this consumer (at most 65535).",
        ),
        field(
            "exchange",
            K::Str,
            P::Unset,
            "Bind the queue to this exchange (which must exist).",
        ),
        field(
            "binding_key",
            K::Str,
            P::Str("#"),
            "The binding's routing key; it needs `exchange`.",
        ),
        field(
            "single_active_consumer",
            K::Bool,
            P::Bool(false),
            "With several processes on one queue, only one consumes at a time (another takes over when it goes), so the queue's order holds across processes.",
        ),
    ],
    aliases: &[],
    example: r#"[routes.from-rabbit]
handler = "uppercase"
source = { broker = "rabbit", topic = "orders", queue_type = "quorum", prefetch = 1000, exchange = "events", binding_key = "order.#", single_active_consumer = false }
"#,
};

/// `source` of an outbox relay.
pub const SOURCE_OUTBOX: Table = Table {
    id: "routes-source-outbox",
    title: "`source` of an outbox relay",
    label: "of an outbox relay",
    doc: "Instead of a broker's topic, a PostgreSQL store's outbox table: the route relays the rows other routes wrote with `outputs.mode = \"outbox\"` ([the transactional outbox](../operate/outbox.md)). It has no `broker`, `topic`, `group` or `stream`.",
    fields: &[
        field(
            "outbox",
            K::Str,
            P::Required,
            "The `[stores.<name>]` (`kind = \"postgres\"`) whose outbox table is relayed.",
        ),
        field(
            "batch",
            K::Int,
            P::Int(DEFAULT_OUTBOX_BATCH as u64),
            "Most rows leased by one query (at most 10,000).",
        ),
        field(
            "lease_ms",
            K::Ms,
            P::Int(DEFAULT_OUTBOX_LEASE_MS),
            "How long leased rows stay this relay's before another may take them; renewed while they are held.",
        ),
        field(
            "poll_ms",
            K::Ms,
            P::Int(DEFAULT_OUTBOX_POLL_MS),
            "How often the table is read when no notification arrives.",
        ),
        field(
            "retention_ms",
            K::Ms,
            P::Int(DEFAULT_OUTBOX_RETENTION_MS),
            "How long published rows are kept.",
        ),
        field(
            "cleanup_every_ms",
            K::Ms,
            P::Int(DEFAULT_OUTBOX_CLEANUP_EVERY_MS),
            "Time between deletions of published rows past `retention_ms`.",
        ),
    ],
    aliases: &[],
    example: r#"[routes.relay]
source = { outbox = "pg", batch = 256, lease_ms = 30000, poll_ms = 1000, retention_ms = 86400000, cleanup_every_ms = 60000 }
outputs = { broker = "kafka" }
dlq = { store = "pg", topic = "outbox.dlq" }
"#,
};

/// `outputs` written as a table.
pub const OUTPUTS: Table = Table {
    id: "routes-outputs",
    title: "`outputs` as a table",
    label: "`outputs`",
    doc: "`outputs = [\"a\", \"b\"]` is short for `outputs = { topics = [\"a\", \"b\"] }`.",
    fields: &[
        field(
            "topics",
            K::Strings,
            P::Text("none"),
            "The topics the handler may publish to.",
        ),
        field(
            "mode",
            K::Choice(&["publish", "outbox"]),
            P::Str("publish"),
            "`publish`: to `broker`, acknowledged there before the source is. `outbox`: rows of the route's PostgreSQL state store's outbox table, committed in one transaction with the handler's kv writes and the idempotency key (it needs `state` on a `postgres` store and `idempotency`); an outbox relay publishes them.",
        ),
        field(
            "broker",
            K::Str,
            P::Text("the source's broker"),
            "Where outputs are published; an outbox relay must set it.",
        ),
    ],
    aliases: &[],
    example: r#"[routes.payments]
handler = "ledger"
source = { topic = "payments" }
state = "pg"
idempotency = { key = "json:/id" }
outputs = { topics = ["payments.done"], mode = "outbox", broker = "kafka" }
"#,
};

/// `[routes.<name>.retry]`.
pub const RETRY: Table = Table {
    id: "routes-retry",
    title: "`[routes.<name>.retry]`",
    label: "`retry`",
    doc: "Retries of a failed call (`retry`, a trap, a timeout) with exponential backoff. A `reject` is never retried. After the last attempt the message is dead-lettered.",
    fields: &[
        field(
            "mode",
            K::Choice(&["process", "broker"]),
            P::Str("process"),
            "`process`: lockgate holds the message and retries after the backoff. `broker`: it hands the message back with the backoff as the redelivery delay (JetStream sources and RabbitMQ queues).",
        ),
        field(
            "max_attempts",
            K::Int,
            P::Int(5),
            "Attempts in total, the first included (1: never retry).",
        ),
        field(
            "initial_backoff_ms",
            K::Ms,
            P::Int(100),
            "Backoff before the first retry.",
        ),
        field(
            "max_backoff_ms",
            K::Ms,
            P::Int(30_000),
            "Upper bound of any backoff, a handler's `retry-after` included; at least `initial_backoff_ms`.",
        ),
        field(
            "multiplier",
            K::Number,
            P::Float(2.0),
            "Growth of the backoff per attempt (1 to 1000).",
        ),
        field(
            "jitter",
            K::Choice(&["full", "proportional", "none"]),
            P::Str("full"),
            "`full`: a random delay between 0 and the backoff; `proportional`: between backoff × (1 - `jitter_fraction`) and the backoff; `none`: the backoff.",
        ),
        field(
            "jitter_fraction",
            K::Number,
            P::Float(0.2),
            "The fraction of `jitter = \"proportional\"`: more than 0, at most 1.",
        ),
        field(
            "retry_traps",
            K::Bool,
            P::Bool(true),
            "Retry traps and out-of-memory.",
        ),
        field(
            "retry_timeouts",
            K::Bool,
            P::Bool(true),
            "Retry calls that timed out.",
        ),
    ],
    aliases: &[],
    example: r#"[routes.orders.retry]
mode = "process"
max_attempts = 5
initial_backoff_ms = 100
max_backoff_ms = 30000
multiplier = 2.0
jitter = "proportional"
jitter_fraction = 0.2
retry_traps = true
retry_timeouts = true
"#,
};

/// `[routes.<name>.circuit_breaker]`.
pub const BREAKER: Table = Table {
    id: "routes-circuit-breaker",
    title: "`[routes.<name>.circuit_breaker]`",
    label: "`circuit_breaker`",
    doc: "Off unless present; it needs `consecutive_failures`, `failure_ratio` or both. While it is open the route pauses its source, and the messages wait in the broker instead of being dead-lettered.",
    fields: &[
        field(
            "consecutive_failures",
            K::Int,
            P::Unset,
            "Open after this many failed calls in a row.",
        ),
        field(
            "failure_ratio",
            K::Number,
            P::Unset,
            "Open when this share of the calls within `window_ms` failed (more than 0, at most 1), once `min_calls` were made.",
        ),
        field(
            "window_ms",
            K::Ms,
            P::Int(30_000),
            "The sliding window of `failure_ratio`.",
        ),
        field(
            "min_calls",
            K::Int,
            P::Int(20),
            "Calls within the window before `failure_ratio` counts.",
        ),
        field(
            "open_ms",
            K::Ms,
            P::Int(10_000),
            "How long it stays open before letting probes through.",
        ),
        field(
            "half_open_max",
            K::Int,
            P::Int(1),
            "Probes let through while half-open; all must succeed to close it.",
        ),
    ],
    aliases: &[],
    example: r#"[routes.orders.circuit_breaker]
consecutive_failures = 5
failure_ratio = 0.5
window_ms = 30000
min_calls = 20
open_ms = 10000
half_open_max = 1
"#,
};

/// `[routes.<name>.dlq]`.
pub const DLQ: Table = Table {
    id: "routes-dlq",
    title: "`[routes.<name>.dlq]`",
    label: "`dlq`",
    doc: "Where messages that failed for good go, with the failure in `lockgate-dlq-*` headers ([dead letters](../operate/dead-letters.md)). Without this table: `<source topic>.dlq` on the source's broker, and an outbox relay's to its store's table; a NATS source subject with wildcards needs one.",
    fields: &[
        field(
            "broker",
            K::Str,
            P::Text("the source's broker"),
            "The broker of the DLQ. Without `broker` and `store`, an outbox relay's dead letters go to its store's table.",
        ),
        field(
            "topic",
            K::Str,
            P::Text("required with a broker; `<source topic>.dlq` in a dead-letter table"),
            "Topic, subject or queue of the DLQ; not the route's own source (nor matched by its subject).",
        ),
        field(
            "store",
            K::Str,
            P::Unset,
            "Instead of a broker: a `[stores.<name>]` (`kind = \"postgres\"`) whose `dead_letters` table holds them, under `topic`.",
        ),
    ],
    aliases: &[],
    example: r#"[routes.orders.dlq]
broker = "kafka"
topic = "orders.dlq"
"#,
};

/// `[routes.<name>.idempotency]`.
pub const IDEMPOTENCY: Table = Table {
    id: "routes-idempotency",
    title: "`[routes.<name>.idempotency]`",
    label: "`idempotency`",
    doc: "Off unless present. Each message's key is claimed in the route's state store before the call; a message whose key already succeeded is not run again, and its outputs are published as they were ([state stores](../operate/state-stores.md)).",
    fields: &[
        field(
            "key",
            K::Str,
            P::Required,
            "Where the key comes from: `\"header:<name>\"`, `\"key\"` (the message key), `\"json:<pointer>\"` (a JSON pointer into the payload, such as `json:/order/id`) or `\"position\"` (topic, partition and offset).",
        ),
        field(
            "ttl_ms",
            K::Ms,
            P::Int(DEFAULT_IDEMPOTENCY_TTL_MS),
            "How long a completed key is remembered.",
        ),
        field(
            "lease_ms",
            K::Ms,
            P::Int(DEFAULT_IDEMPOTENCY_LEASE_MS),
            "How long a claim holds: after a crash, another process may take the key over once it passed.",
        ),
    ],
    aliases: &[],
    example: r#"[routes.orders.idempotency]
key = "header:idempotency-key"
ttl_ms = 604800000
lease_ms = 30000
"#,
};

/// `[routes.<name>.rate_limit]`.
pub const RATE_LIMIT: Table = Table {
    id: "routes-rate-limit",
    title: "`[routes.<name>.rate_limit]`",
    label: "`rate_limit`",
    doc: "Off unless present: a token bucket in front of the handler.",
    fields: &[
        field("per_second", K::Int, P::Required, "Calls per second."),
        field(
            "burst",
            K::Int,
            P::Text("`per_second`"),
            "Calls allowed at once after a quiet spell.",
        ),
    ],
    aliases: &[],
    example: "[routes.orders.rate_limit]\nper_second = 500\nburst = 50\n",
};

/// The table form of a secret.
pub const SECRET: Table = Table {
    id: "secrets",
    title: "Secrets",
    label: "secret",
    doc: "A field that holds a secret (a password, a URL with one, a token) takes one of three forms: the value itself, `\"amqp://user:password@host\"`; `{ env = \"NAME\" }`, the value of an environment variable; or `{ file = \"path\" }`, the contents of a file, relative to runtime.toml, its trailing newline dropped. The value is read when it is used (at start, and on a reload that changes its table), never printed, and `lockgate check` reads each one to report a variable that is not set or a file that cannot be read. Only `{ env = ... }` and `{ file = ... }` keep the secret out of the config file.",
    fields: &[
        field(
            "env",
            K::Str,
            P::Unset,
            "The environment variable holding the value.",
        ),
        field("file", K::Path, P::Unset, "The file holding the value."),
    ],
    aliases: &[],
    example: "",
};

/// Every table, in the order the reference lists them.
pub const TABLES: &[&Table] = &[
    &ROOT,
    &SECRET,
    &RUNTIME,
    &ENGINE,
    &HANDLER,
    &HANDLER_HTTP,
    &HANDLER_FILE,
    &STORE_REDIS,
    &STORE_POSTGRES,
    &KAFKA,
    &NATS,
    &RABBITMQ,
    &LOCAL,
    &LOCAL_TOPIC,
    &ROUTE,
    &SOURCE,
    &SOURCE_JETSTREAM,
    &SOURCE_RABBITMQ,
    &SOURCE_OUTBOX,
    &OUTPUTS,
    &RETRY,
    &BREAKER,
    &DLQ,
    &IDEMPOTENCY,
    &RATE_LIMIT,
    &TELEMETRY,
    &TELEMETRY_OTLP,
];

/// The examples of every table together: one config that sets every declared key.
pub fn full_example() -> String {
    let mut out = String::new();
    for t in TABLES.iter().filter(|t| !t.example.is_empty()) {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(t.example);
    }
    out
}
