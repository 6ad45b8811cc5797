//! What the DLQ tests share: the orders they dead-letter and `lockgate dlq list --json`.

#![allow(clippy::unwrap_used)] // test support: a failed unwrap is a failed test

use lockgate::message::OutRecord;

/// Order `i` for the `chaos` guest on topic `orders`: 0..25 good, 25..35 poison (rejected),
/// 35..40 failing on every attempt (retried until the attempts run out).
pub fn order(i: u64) -> OutRecord {
    let extra = match i {
        25..=34 => r#","poison":true"#,
        35..=39 => r#","fail":99"#,
        _ => "",
    };
    OutRecord {
        topic: "orders".into(),
        key: Some(format!("k{i}").into_bytes()),
        headers: vec![("trace".into(), format!("t{i}").into_bytes())],
        payload: format!(r#"{{"id":{i}{extra}}}"#).into_bytes(),
    }
}

/// `lockgate dlq list --json ARGS` run in `dir`, as parsed objects; fails the test if it fails.
pub fn list(dir: &std::path::Path, args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec!["dlq", "list", "--json"];
    all.extend_from_slice(args);
    let out = crate::lockgate(dir, &all);
    assert!(out.status.success(), "{}", crate::show(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Writes `dir/runtime.toml`: route `orders` (the `chaos` guest, two attempts) on the embedded
/// broker, deduplicating by the payload's `id` (the case where a replay must re-open the key of
/// a dead letter); `fixed` deploys the version that accepts poison orders. With `table_schema`
/// the DLQ is the `dead_letters` table of a PostgreSQL store in that schema and the keys live in
/// that store, else the DLQ is the topic `orders.dlq` and the keys are in the embedded store.
pub fn write_config(
    dir: &std::path::Path,
    fixed: bool,
    table_schema: Option<&str>,
) -> std::path::PathBuf {
    let (store, dlq) = match table_schema {
        Some(schema) => (
            format!(
                "[stores.pg]\nkind = \"postgres\"\nurl = \"{}\"\nschema = \"{schema}\"\n\n",
                crate::pg::URL
            ),
            "dlq = { store = \"pg\" }\nstate = \"pg\"\n",
        ),
        None => (String::new(), ""),
    };
    let config = dir.join("runtime.toml");
    std::fs::write(
        &config,
        format!(
            r#"[runtime]
state_dir = "state"

{store}[handlers.chaos]
module = "{}"
config = {{ target = "out", poison_ok = "{fixed}" }}

[routes.orders]
handler = "chaos"
source = {{ topic = "orders" }}
outputs = ["out"]
retry = {{ max_attempts = 2, initial_backoff_ms = 5, jitter = "none" }}
idempotency = {{ key = "json:/id" }}
{dlq}"#,
            crate::guest("chaos").display()
        ),
    )
    .unwrap();
    config
}

/// Waits until the embedded broker's group `lockgate` committed `offset` of topic `orders`
/// (every message before it was done) while run `run` works.
pub fn wait_committed(
    broker: &lockgate::broker::local::LocalBroker,
    child: &mut crate::Proc,
    dir: &std::path::Path,
    run: u32,
    offset: u64,
) {
    crate::wait_for_progress(
        child,
        dir,
        run,
        offset,
        std::time::Duration::from_secs(60),
        std::time::Duration::from_millis(20),
        || broker.committed("orders", "lockgate").unwrap_or(0),
    );
}
