//! Why a runtime cannot start, a reload is refused, or a client or store cannot be opened.
//!
//! Each message names what the user wrote (the route, the handler, the store or broker table)
//! so the fix can be found in runtime.toml.

use std::path::PathBuf;

use crate::broker::BrokerError;
use crate::config::ConfigError;
use crate::engine::EngineError;
use crate::state::StateError;

/// A `[stores.<name>]` that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A route names a store no table defines.
    #[error("state store {0} is not defined")]
    Undefined(String),
    /// Its URL cannot be read (an unset environment variable, an unreadable file); the message
    /// names the file, the field and the source.
    #[error("{error}")]
    Url {
        /// The store.
        store: String,
        /// What is wrong.
        error: Box<crate::config::SecretError>,
    },
    /// The store refused to open (a URL that does not parse, a bad schema).
    #[error("stores.{store}: {error}")]
    Open {
        /// The store.
        store: String,
        /// Why.
        error: StateError,
    },
    /// A dead-letter table or an outbox was asked of a store that is not PostgreSQL.
    #[error("stores.{0} is not a PostgreSQL store: it has no dead-letter or outbox table")]
    NotPostgres(String),
}

/// A broker client (source, sink, scan) that cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A route or command names a broker no `[brokers.<name>]` table defines.
    #[error("broker {0} is not defined")]
    UndefinedBroker(String),
    /// The PostgreSQL store behind a dead-letter table or an outbox.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The broker adapter refused (settings that cannot work, a broker that answered no).
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// Why a reload was refused. Nothing changed: the routes and modules that ran before keep
/// running, except for [`ReloadError::Start`], which can happen after routes that restart were
/// stopped (they stay stopped until the next reload that succeeds).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// runtime.toml has problems (every one is listed).
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// A route names a handler no `[handlers.<name>]` table defines.
    #[error("route {route}: handler {handler} is not defined")]
    UndefinedHandler {
        /// The route.
        route: String,
        /// The handler it names.
        handler: String,
    },
    /// A handler's module file cannot be read.
    #[error("handlers.{handler}: module {}: cannot read: {error}", path.display())]
    ModuleUnreadable {
        /// The handler.
        handler: String,
        /// Its `module`.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// A handler's module does not compile, is not a handler component, or traps at start.
    #[error("handlers.{handler}: {error}")]
    Handler {
        /// The handler.
        handler: String,
        /// Why.
        error: EngineError,
    },
    /// A handler's HTTP grant cannot be set up (its `ca_file`).
    #[error("handlers.{handler}.http: {error}")]
    Http {
        /// The handler.
        handler: String,
        /// Why.
        error: crate::engine::outbound::OutboundError,
    },
    /// A value a handler is given cannot be read: a secret of its `config`, a variable of its
    /// `env`, a directory of its `files`. One line per value, each naming the file, the field
    /// and where the value was to come from, never a value.
    #[error("{}", errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Grants {
        /// The handler.
        handler: String,
        /// What could not be read.
        errors: Vec<crate::config::SecretError>,
    },
    /// Compiling a module panicked (a bug; the message says where).
    #[error("handlers.{handler}: loading task failed: {error}")]
    LoadTask {
        /// The handler.
        handler: String,
        /// The join error.
        error: String,
    },
    /// A route's state store cannot be used.
    #[error("route {route}: {error}")]
    Store {
        /// The route.
        route: String,
        /// Why.
        error: StoreError,
    },
    /// A route's source, outputs, DLQ or replies cannot be opened.
    #[error("route {route}: cannot {what}: {error}")]
    Start {
        /// The route.
        route: String,
        /// What could not be opened (`open its source`, ...).
        what: &'static str,
        /// Why.
        error: ClientError,
    },
    /// The runtime stopped before it could reload.
    #[error("the runtime has stopped")]
    Stopped,
}

/// Why a runtime cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// `[engine]` settings wasmtime refuses.
    #[error("cannot create the engine: {0}")]
    Engine(EngineError),
    /// The state directory cannot be created.
    #[error("cannot create {}: {error}", path.display())]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The embedded state store cannot be opened (most often: another process holds it).
    #[error("cannot open the state store {} (is another `lockgate run` using this state_dir?): {error}", path.display())]
    StateStore {
        /// Its file.
        path: PathBuf,
        /// Why.
        error: StateError,
    },
    /// The embedded broker's directory cannot be opened.
    #[error("cannot open the embedded broker: {0}")]
    LocalBroker(BrokerError),
    /// The admin address cannot be listened on.
    #[error("cannot listen on the admin address {addr}: {error}")]
    AdminBind {
        /// `[runtime] admin` or `--admin`.
        addr: String,
        /// Why.
        error: std::io::Error,
    },
    /// `[runtime] admin_token` cannot be read (an unset variable, a missing file); the message
    /// names the file, the field and the source.
    #[error("{0}")]
    AdminToken(crate::config::SecretError),
    /// `[telemetry.otlp]` cannot be applied (a header's secret cannot be read).
    #[error("{0}")]
    Otlp(crate::telemetry::otlp::OtlpError),
    /// The routes cannot start (the same checks a reload makes).
    #[error(transparent)]
    Routes(#[from] ReloadError),
}

/// A file that cannot be watched for changes.
#[derive(Debug, thiserror::Error)]
#[error("cannot watch {}: {error}", path.display())]
pub struct WatchError {
    /// The file or directory (empty when the watcher itself could not be created).
    pub path: PathBuf,
    /// Why.
    pub error: notify::Error,
}
