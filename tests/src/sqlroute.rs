//! A handler with a SQL grant on a route of the embedded broker, run in process
//! (docs/handlers/sql.md): `sql = "pg"` on a PostgreSQL store in a given schema, the route's
//! idempotency keys on the same store. The SQL tests feed it messages and read what the run came
//! to once every message is acknowledged.

use std::path::Path;
use std::time::Duration;

use lockgate::broker::local::LocalBroker;
use lockgate::dlq::DeadLetter;
use lockgate::message::OutRecord;

/// The route: topic `in` into the handler, which may publish to `out`; failures retried up to 5
/// attempts (10 ms apart), then dead-lettered to `in.dlq`.
pub struct SqlRoute<'a> {
    /// The handler's component.
    pub module: &'a Path,
    /// The handler's `config` table.
    pub config: &'a [(&'a str, &'a str)],
    /// The schema of the store `pg` (lockgate's own tables; the handler's may be elsewhere).
    pub schema: &'a str,
    /// The route's idempotency key (`json:/id`).
    pub key: &'a str,
    /// Lanes of the route (ordered by message key).
    pub concurrency: u32,
    /// The handler's `timeout_ms`.
    pub timeout_ms: u64,
    /// The handler's `sql_role`, if any.
    pub role: Option<&'a str>,
}

/// What a run came to.
pub struct RouteRun {
    /// Records published to `out` (on the embedded broker).
    pub outputs: u64,
    /// Records dead-lettered to `in.dlq`.
    pub dead: u64,
    /// Retries the route made.
    pub retried: u64,
    /// The reason of each dead letter, in order.
    pub dead_reasons: Vec<String>,
}

impl SqlRoute<'_> {
    /// Writes the config, appends `messages` (`(key, payload)`) to `in`, runs the route until
    /// every message is acknowledged (at most two minutes), and stops it.
    pub fn run(&self, messages: Vec<(Vec<u8>, Vec<u8>)>) -> RouteRun {
        self.run_with(messages, r#"["out"]"#)
    }

    /// [`Self::run`] with the route's outputs in outbox mode: what the handler publishes to
    /// `out` becomes rows of the store's outbox table, in the message's transaction (nothing
    /// relays them: [`RouteRun::outputs`] stays 0).
    pub fn run_outbox(&self, messages: Vec<(Vec<u8>, Vec<u8>)>) -> RouteRun {
        self.run_with(messages, r#"{ topics = ["out"], mode = "outbox" }"#)
    }

    fn run_with(&self, messages: Vec<(Vec<u8>, Vec<u8>)>, outputs: &str) -> RouteRun {
        let dir = tempfile::tempdir().expect("dir");
        let config_path = dir.path().join("runtime.toml");
        let quote = |s: &str| serde_json::Value::from(s).to_string(); // a TOML basic string too
        let config: Vec<String> = self
            .config
            .iter()
            .map(|(k, v)| format!("{} = {}", quote(k), quote(v)))
            .collect();
        std::fs::write(
            &config_path,
            format!(
                r#"[runtime]
state_dir = "state"
watch = "off"

[stores.pg]
kind = "postgres"
url = "{url}"
schema = "{schema}"

[handlers.h]
module = {module}
config = {{ {config} }}
timeout_ms = {timeout_ms}
sql = "pg"{role}

[routes.in]
handler = "h"
source = {{ topic = "in" }}
outputs = {outputs}
concurrency = {concurrency}
ordering = "key"
state = "pg"
idempotency = {{ key = {key} }}
retry = {{ max_attempts = 5, initial_backoff_ms = 10, jitter = "none" }}
"#,
                url = crate::pg::URL,
                schema = self.schema,
                module = quote(&self.module.display().to_string()),
                config = config.join(", "),
                timeout_ms = self.timeout_ms,
                role = self
                    .role
                    .map(|r| format!("\nsql_role = {}", quote(r)))
                    .unwrap_or_default(),
                concurrency = self.concurrency,
                key = quote(self.key),
            ),
        )
        .expect("config");
        let records: Vec<OutRecord> = messages
            .into_iter()
            .map(|(key, payload)| OutRecord {
                topic: "in".into(),
                key: Some(key),
                headers: Vec::new(),
                payload,
            })
            .collect();
        let total = records.len() as u64;
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(async {
                let rt = crate::inproc::start(&config_path).await;
                let broker = LocalBroker::open(&dir.path().join("state/local")).expect("broker");
                broker.append(&records).expect("append");
                crate::inproc::until(
                    "every message acknowledged",
                    Duration::from_secs(120),
                    total,
                    || {
                        broker
                            .committed("in", lockgate::config::DEFAULT_GROUP)
                            .unwrap_or(0)
                    },
                )
                .await;
                let retried = rt
                    .runtime
                    .routes()
                    .iter()
                    .map(|r| r.stats.retried.load(std::sync::atomic::Ordering::Relaxed))
                    .sum();
                rt.runtime.stop().await;
                let dead = broker.end_offset("in.dlq").unwrap_or(0);
                let dead_reasons = broker
                    .read("in.dlq", 0, usize::try_from(dead).unwrap_or(usize::MAX))
                    .expect("the dead letters")
                    .into_iter()
                    .filter_map(DeadLetter::parse)
                    .map(|d| d.reason)
                    .collect();
                RouteRun {
                    outputs: broker.end_offset("out").unwrap_or(0),
                    dead,
                    retried,
                    dead_reasons,
                }
            })
    }
}
