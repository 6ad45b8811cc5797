//! A PostgreSQL dead-letter table as a route's DLQ (`dlq = { store = "pg" }`, needs
//! `scripts/brokers.sh start postgres`): poison messages land in `<schema>.dead_letters` with the
//! full envelope, `lockgate dlq list|show` read them from there, and after the handler is fixed
//! `lockgate dlq replay` sends them back once, marks the rows replayed and records each one's
//! result. The route's idempotency keys live in the same PostgreSQL store: a dead-lettered key
//! does not make its replay a duplicate, a true duplicate is still skipped.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use lockgate::broker::local::LocalBroker;
use lockgate_tests::dlq::{list, order, wait_committed, write_config};
use lockgate_tests::pg::{self, SyncPg};
use lockgate_tests::{lockgate, show, start_run, stop_run, wait_for_progress};

const DEADLINE: Duration = Duration::from_secs(120);

#[test]
fn poison_lands_in_the_dead_letter_table_and_replays_from_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let schema = pg::unique_schema("lgdlt");
    let sql = SyncPg::connect();
    let table = format!("{schema}.dead_letters");
    let broker = LocalBroker::open(&dir.path().join("state/local")).unwrap();
    broker
        .append(&(0..40).map(order).collect::<Vec<_>>())
        .unwrap();

    // Run 1, the broken handler: 25 outputs, 15 rows in the table, nothing on a DLQ topic.
    let config = write_config(dir.path(), false, Some(&schema));
    let mut run = start_run(dir.path(), &config, 1, None, "warn");
    let rows = |sql: &SyncPg| {
        let exists = sql.count(&format!(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = '{schema}' AND table_name = 'dead_letters'"
        ));
        if exists == 0 {
            0
        } else {
            sql.count(&format!("SELECT count(*) FROM {table}"))
        }
    };
    wait_for_progress(
        &mut run,
        dir.path(),
        1,
        40,
        DEADLINE,
        Duration::from_millis(20),
        || broker.end_offset("out").unwrap().min(25) + rows(&sql).min(15),
    );
    stop_run(&mut run, dir.path(), 1);
    assert_eq!(rows(&sql), 15);
    assert_eq!(broker.end_offset("orders.dlq").unwrap_or(0), 0);

    // The columns SQL users filter on, and the envelope kept whole.
    let by_kind: Vec<(String, String, i64)> = sql
        .query(
            &format!("SELECT route, error_kind, count(*) FROM {table} GROUP BY 1, 2 ORDER BY 2"),
            &[],
        )
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        by_kind,
        vec![
            ("orders".into(), "reject".into(), 10),
            ("orders".into(), "retry".into(), 5)
        ]
    );
    let (id, source, attempts): (i64, String, i32) = {
        let r = &sql.query(
            &format!(
                "SELECT id, source, attempts FROM {table} WHERE error_kind = 'reject' ORDER BY id LIMIT 1"
            ),
            &[],
        )[0];
        (r.get(0), r.get(1), r.get(2))
    };
    assert_eq!((source.as_str(), attempts), ("orders/0/25", 1));

    // `lockgate dlq` reads the table.
    let all = list(dir.path(), &[]);
    assert_eq!(all.len(), 15, "{all:?}");
    assert!(all.iter().all(|r| r["status"] == "pending"));
    let rejects = list(dir.path(), &["--error-kind", "reject"]);
    assert_eq!(rejects.len(), 10);
    assert_eq!(rejects[0]["position"], format!("orders.dlq/-/{id}"));
    let out = lockgate(dir.path(), &["dlq", "list"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("15 dead letters (15 pending, 0 replayed) in store:pg:orders.dlq"),
        "{text}"
    );
    let out = lockgate(dir.path(), &["dlq", "show", &format!("orders.dlq/-/{id}")]);
    assert!(out.status.success(), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("error          reject: order 25 is poison (rejected after 1 attempt)"),
        "{text}"
    );
    assert!(text.contains("key            k25"), "{text}");
    assert!(text.contains("header         trace=t25"), "{text}");
    assert!(
        text.contains(r#"payload        {"id":25,"poison":true}"#),
        "{text}"
    );

    // The fixed handler; replay the rejected ones: each once, rows marked.
    let config = write_config(dir.path(), true, Some(&schema));
    let mut run = start_run(dir.path(), &config, 2, None, "warn");
    let out = lockgate(dir.path(), &["dlq", "replay", "--error-kind", "reject"]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(
        show(&out).contains("replayed 10 dead letters"),
        "{}",
        show(&out)
    );
    assert!(
        show(&out).contains("results: 10 handled, 0 skipped"),
        "{}",
        show(&out)
    );
    wait_for_progress(
        &mut run,
        dir.path(),
        2,
        35,
        DEADLINE,
        Duration::from_millis(20),
        || broker.end_offset("out").unwrap(),
    );
    // True duplicates: of an order handled at first, and of one handled on replay.
    broker.append(&[order(3), order(26)]).unwrap();
    wait_committed(&broker, &mut run, dir.path(), 2, 52);
    stop_run(&mut run, dir.path(), 2);
    assert_eq!(
        broker.end_offset("out").unwrap(),
        35,
        "duplicates run nothing"
    );
    assert_eq!(lockgate_tests::run_stat(dir.path(), 2, "duplicates"), 2);
    assert_eq!(broker.end_offset("orders").unwrap(), 52);
    assert_eq!(
        sql.count(&format!(
            "SELECT count(*) FROM {table} WHERE replay_result = 'handled' AND replay_route = 'orders' AND replay_detail = '1 output' AND replay_result_at IS NOT NULL"
        )),
        10
    );
    // The keys: 35 handled, 5 still dead-lettered.
    let keys: Vec<(String, i64)> = sql
        .query(
            &format!("SELECT state, count(*) FROM {schema}.idempotency GROUP BY 1 ORDER BY 1"),
            &[],
        )
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(keys, vec![("d".into(), 35), ("x".into(), 5)]);
    assert_eq!(
        sql.count(&format!(
            "SELECT count(*) FROM {table} WHERE replayed_at IS NOT NULL AND replayed_to = 'local:orders' AND error_kind = 'reject'"
        )),
        10
    );
    assert_eq!(
        sql.count(&format!(
            "SELECT count(*) FROM {table} WHERE replayed_at IS NOT NULL"
        )),
        10,
        "only the replayed rows are marked"
    );
    let after = list(dir.path(), &[]);
    assert_eq!(
        after.iter().filter(|r| r["status"] == "replayed").count(),
        10
    );
    assert_eq!(
        after.iter().filter(|r| r["result"] == "handled").count(),
        10
    );
    let out = lockgate(dir.path(), &["dlq", "replay", "--error-kind", "reject"]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(show(&out).contains("nothing to replay"), "{}", show(&out));
    assert_eq!(broker.end_offset("orders").unwrap(), 52);
    let copies = broker.read("orders", 40, 10).unwrap();
    assert!(copies.iter().all(|c| {
        c.header("lockgate-replayed-from")
            .is_some_and(|f| f.starts_with(b"orders.dlq/-/"))
    }));

    sql.drop_schema(&schema);
}
