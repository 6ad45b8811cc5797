//! `[runtime]`, `[engine]` and `[handlers.<name>]`: the process, the WebAssembly engine and the
//! handler components.
//!
//! Example:
//! ```toml
//! [runtime]
//! state_dir = ".lockgate"
//!
//! [handlers.uppercase]
//! module = "guest-examples/target/wasm32-wasip2/release/uppercase.wasm"
//! timeout_ms = 1000
//! max_memory_mb = 64
//! config = { target = "shouted" }
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::grants::{self, ConfigValue, DirGrant};
use super::http::{HttpGrant, parse_http};
use super::reader::Reader;
use super::routes::EMBEDDED_STORE;
use super::schema;
use super::secret::Secret;
use super::stores::check_store;

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
/// Default `sql_max_rows`: rows one query may return.
pub const DEFAULT_SQL_MAX_ROWS: u64 = 10_000;
/// Default `sql_max_result_bytes`: bytes of column data one query may return (16 MiB).
pub const DEFAULT_SQL_MAX_RESULT_BYTES: u64 = 16 * 1024 * 1024;
/// Default pool size (instances alive at once).
pub const DEFAULT_MAX_INSTANCES: u32 = 1_000;
/// Default time in-flight messages get to finish after SIGINT/SIGTERM.
pub const DEFAULT_SHUTDOWN_GRACE_MS: u64 = 10_000;
/// Default state directory, relative to the config file.
pub const DEFAULT_STATE_DIR: &str = ".lockgate";

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

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            pooling: true,
            max_instances: DEFAULT_MAX_INSTANCES,
            cache: true,
        }
    }
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
    /// `[handlers.<name>.http]`: the outbound HTTP it may make; `None` denies every request.
    pub http: Option<HttpGrant>,
    /// `sql` and the fields beside it: the database its statements run on; `None` refuses
    /// every statement.
    pub sql: Option<SqlGrantConfig>,
    /// `config`: values the guest reads with `config.get`, plain or secret (read by
    /// [`HandlerConfig::resolve`]).
    pub config: BTreeMap<String, ConfigValue>,
    /// `env`: names of the host environment variables the guest sees.
    pub env: Vec<String>,
    /// `files`: host directories the guest reads, each preopened read-only.
    pub files: Vec<DirGrant>,
}

/// A handler's `sql` grant as configured (`sql`, `sql_role`, `sql_max_rows`,
/// `sql_max_result_bytes`). That the store is a PostgreSQL one, and that every route of the
/// handler keeps its idempotency keys there, is checked with the routes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SqlGrantConfig {
    /// `sql`: the `[stores.<name>]`.
    pub store: String,
    /// `sql_role`.
    pub role: Option<String>,
    /// `sql_max_rows`.
    pub max_rows: u64,
    /// `sql_max_result_bytes`.
    pub max_result_bytes: u64,
}

/// The `[runtime]` table, its defaults filled in.
#[derive(Debug)]
pub(super) struct RuntimeTable {
    pub state_dir: PathBuf,
    pub shutdown_grace_ms: u64,
    pub admin: Option<String>,
    pub admin_token: Option<Secret>,
    pub watch: WatchMode,
    pub state: String,
}

/// Reads `[runtime]` (`table`, absent: every default); `stores` are the declared store names.
pub(super) fn parse_runtime(
    root: &mut Reader<'_>,
    table: Option<&toml::Table>,
    stores: &[&str],
) -> RuntimeTable {
    let base_dir = root.base_dir().to_path_buf();
    let mut rt = RuntimeTable {
        state_dir: base_dir.join(DEFAULT_STATE_DIR),
        shutdown_grace_ms: DEFAULT_SHUTDOWN_GRACE_MS,
        admin: None,
        admin_token: None,
        watch: WatchMode::default(),
        state: EMBEDDED_STORE.to_owned(),
    };
    let Some(table) = table else {
        return rt;
    };
    let mut r = root.child("runtime", table, &[&schema::RUNTIME]);
    if let Some(dir) = r.string("state_dir") {
        if dir.is_empty() {
            r.problem("state_dir", "must not be empty".into());
        } else {
            rt.state_dir = base_dir.join(dir);
        }
    }
    if let Some(ms) = r.positive("shutdown_grace_ms") {
        rt.shutdown_grace_ms = ms;
    }
    if let Some(a) = r.string("admin") {
        match a.parse::<std::net::SocketAddr>() {
            Ok(_) => rt.admin = Some(a),
            Err(_) => r.problem(
                "admin",
                format!("\"{a}\" is not an address: expected ip:port, e.g. \"127.0.0.1:9464\""),
            ),
        }
    }
    rt.admin_token = r.secret("admin_token");
    if let Some(w) = r.string("watch") {
        match w.as_str() {
            "events" => rt.watch = WatchMode::Events,
            "poll" => rt.watch = WatchMode::Poll,
            "off" => rt.watch = WatchMode::Off,
            other => r.problem(
                "watch",
                format!(
                    "\"{other}\" is not a watch mode: expected \"events\", \"poll\" or \"off\""
                ),
            ),
        }
    }
    if let Some(st) = r.string("state")
        && check_store(&mut r, "state", &st, stores)
    {
        rt.state = st;
    }
    r.finish();
    rt
}

/// Reads `[engine]` (`table`, absent: every default).
pub(super) fn parse_engine(root: &mut Reader<'_>, table: Option<&toml::Table>) -> EngineConfig {
    let mut engine = EngineConfig::default();
    if let Some(en) = table {
        let mut r = root.child("engine", en, &[&schema::ENGINE]);
        if let Some(b) = r.bool("pooling") {
            engine.pooling = b;
        }
        if let Some(b) = r.bool("cache") {
            engine.cache = b;
        }
        if let Some(n) = r.positive_u32("max_instances") {
            engine.max_instances = n;
        }
        r.finish();
    }
    engine
}

/// Reads one `[handlers.<name>]` table.
pub(super) fn parse_handler(
    name: &str,
    base_dir: &Path,
    r: &mut Reader<'_>,
) -> Option<HandlerConfig> {
    let before = r.problem_count();
    let module_raw = r.string("module");
    if module_raw.is_none() && !r.has("module") {
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
    let http = r
        .table("http")
        .and_then(|t| parse_http(&mut r.child("http", t, &[&schema::HANDLER_HTTP])));
    let sql = parse_sql_grant(r);
    let config = grants::parse_config_values(r, "config");
    let env = grants::parse_env(r, "env");
    let files = grants::parse_files(r, "files");
    r.finish();
    if r.problem_count() != before {
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
        http,
        sql,
        env,
        files,
    })
}

/// `sql` and the fields beside it; the fields without `sql` are an error.
fn parse_sql_grant(r: &mut Reader<'_>) -> Option<SqlGrantConfig> {
    let store = r.string("sql");
    let role = r.string("sql_role");
    let max_rows = r.positive("sql_max_rows");
    let max_result_bytes = r.positive("sql_max_result_bytes");
    if store.as_deref() == Some("") {
        r.problem(
            "sql",
            "must name a [stores.<name>] with kind = \"postgres\"".into(),
        );
    }
    if let Some(role) = &role
        && (role.is_empty() || role.contains('\0'))
    {
        r.problem("sql_role", format!("{role:?} is not a role name"));
    }
    if store.is_none() {
        for (key, set) in [
            ("sql_role", role.is_some()),
            ("sql_max_rows", max_rows.is_some()),
            ("sql_max_result_bytes", max_result_bytes.is_some()),
        ] {
            if set {
                r.problem(key, "has no effect without sql = \"<store>\"".into());
            }
        }
    }
    Some(SqlGrantConfig {
        store: store?,
        role,
        max_rows: max_rows.unwrap_or(DEFAULT_SQL_MAX_ROWS),
        max_result_bytes: max_result_bytes.unwrap_or(DEFAULT_SQL_MAX_RESULT_BYTES),
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;
    use crate::config::tests::problems;

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
        let plain = |s: &str| ConfigValue::Plain(s.to_owned());
        assert_eq!(cfg["a"], plain("x"));
        assert_eq!(cfg["n"], plain("3"));
        assert_eq!(cfg["b"], plain("true"));
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
            "[runtime]\nwatch = \"poll\"\nadmin_token = { env = \"TOKEN\" }\n",
        )
        .unwrap();
        assert_eq!(c.watch, WatchMode::Poll);
        assert_eq!(
            c.admin_token.as_ref().map(Secret::source),
            Some(&crate::config::SecretSource::Env("TOKEN".into()))
        );
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
}
