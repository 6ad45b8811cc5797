use std::path::Path;

use super::source::subject_matches;
use super::*;
use crate::config::tests::problems;
use crate::config::{BrokerKind, Config};

const HANDLER: &str = "[handlers.h]\nmodule = \"h.wasm\"\n\n";

fn parse(route: &str) -> Result<RouteConfig, Vec<String>> {
    let text = format!("{HANDLER}[routes.r]\n{route}");
    match Config::parse(Path::new("rt.toml"), &text) {
        Ok(c) => Ok(c.routes["r"].clone()),
        Err(e) => Err(e.to_string().lines().map(str::to_owned).collect()),
    }
}

fn errors(route: &str) -> Vec<String> {
    parse(route).expect_err("expected problems")
}

#[test]
fn nats_subject_filters_match_like_the_server() {
    assert!(subject_matches("orders.>", "orders.dlq"));
    assert!(subject_matches("orders.>", "orders.eu.dlq"));
    assert!(!subject_matches("orders.>", "orders"));
    assert!(subject_matches("orders.*", "orders.dlq"));
    assert!(!subject_matches("orders.*", "orders.eu.dlq"));
    assert!(subject_matches("orders", "orders"));
    assert!(!subject_matches("orders", "orders.dlq"));
    assert!(subject_matches("*.dlq", "orders.dlq"));
}

#[test]
fn minimal_route_gets_defaults() {
    let r = parse("handler = \"h\"\nsource = { topic = \"orders\" }\n").unwrap();
    let src = r.source.as_broker().unwrap();
    assert_eq!(src.broker, BrokerRef::Local);
    assert_eq!(src.group, DEFAULT_GROUP);
    assert_eq!(src.options, SourceOptions::Plain);
    assert_eq!(
        r.dlq,
        DlqTarget::Broker {
            broker: BrokerRef::Local,
            topic: "orders.dlq".into()
        }
    );
    assert_eq!(r.dlq.to_string(), "local:orders.dlq");
    assert_eq!(r.retry, RetryPolicy::default());
    assert_eq!(r.concurrency, 1);
    assert_eq!(r.ordering, Ordering::Partition);
    assert_eq!(r.max_batch, DEFAULT_MAX_BATCH);
    assert!(r.circuit_breaker.is_none() && r.idempotency.is_none() && r.rate_limit.is_none());
}

#[test]
fn full_route_parses() {
    let r = parse(
        "handler = \"h\"\nsource = { broker = \"local\", topic = \"in\", group = \"g\" }\noutputs = [\"out\"]\nconcurrency = 8\nordering = \"key\"\nmax_batch = 7\nretry = { max_attempts = 3, initial_backoff_ms = 10, max_backoff_ms = 1000, multiplier = 1.5, jitter = \"proportional\", jitter_fraction = 0.5, retry_traps = false }\ncircuit_breaker = { failure_ratio = 0.5, window_ms = 1000, min_calls = 4, open_ms = 200, half_open_max = 2 }\ndlq = { topic = \"dead\" }\nidempotency = { key = \"json:/order/id\", ttl_ms = 60000 }\nrate_limit = { per_second = 100 }\n",
    )
    .unwrap();
    assert_eq!(r.outputs, vec!["out"]);
    assert_eq!(r.ordering, Ordering::Key);
    assert_eq!(r.max_batch, 7);
    assert_eq!(r.retry.jitter, Jitter::Proportional(0.5));
    assert!(!r.retry.retry_traps);
    assert_eq!(r.circuit_breaker.unwrap().failure_ratio, Some(0.5));
    assert_eq!(r.dlq.topic(), "dead");
    assert_eq!(
        r.idempotency.unwrap().key,
        IdempotencyKey::JsonPointer("/order/id".into())
    );
    assert_eq!(
        r.rate_limit,
        Some(RateLimitConfig {
            per_second: 100,
            burst: 100
        })
    );
}

#[test]
fn unknown_fields_in_every_table() {
    assert_eq!(
        errors(
            "handler = \"h\"\nsource = { topic = \"t\", topik = 1 }\nretry = { max_attempt = 3 }\nretries = 2\n"
        ),
        vec![
            "rt.toml: routes.r.source.topik: unknown field `topik`; did you mean `topic`?",
            "rt.toml: routes.r.retry.max_attempt: unknown field `max_attempt`; did you mean `max_attempts`?",
            "rt.toml: routes.r.retries: unknown field `retries` (expected one of: handler, source, outputs, concurrency, ordering, max_batch, retry, circuit_breaker, dlq, idempotency, rate_limit, state)",
        ]
    );
}

#[test]
fn zero_and_negative_durations() {
    assert_eq!(
        errors(
            "handler = \"h\"\nsource = { topic = \"t\" }\nretry = { initial_backoff_ms = 0, max_backoff_ms = -5 }\ncircuit_breaker = { consecutive_failures = 3, open_ms = 0 }\nidempotency = { key = \"key\", ttl_ms = -1 }\n"
        ),
        vec![
            "rt.toml: routes.r.retry.initial_backoff_ms: must be greater than 0, found 0",
            "rt.toml: routes.r.retry.max_backoff_ms: must be greater than 0, found -5",
            "rt.toml: routes.r.circuit_breaker.open_ms: must be greater than 0, found 0",
            "rt.toml: routes.r.idempotency.ttl_ms: must be greater than 0, found -1",
        ]
    );
}

#[test]
fn max_backoff_below_initial_names_both_fields() {
    assert_eq!(
        errors(
            "handler = \"h\"\nsource = { topic = \"t\" }\nretry = { initial_backoff_ms = 500, max_backoff_ms = 100 }\n"
        ),
        vec!["rt.toml: routes.r.retry.max_backoff_ms: 100 is less than initial_backoff_ms (500)"]
    );
    assert_eq!(
        errors("handler = \"h\"\nsource = { topic = \"t\" }\nretry = { max_backoff_ms = 50 }\n"),
        vec![
            "rt.toml: routes.r.retry.max_backoff_ms: 50 is less than initial_backoff_ms (100 by default)"
        ]
    );
}

#[test]
fn unknown_broker_and_handler() {
    assert_eq!(
        errors("handler = \"nope\"\nsource = { broker = \"kafka\", topic = \"t\" }\n"),
        vec![
            "rt.toml: routes.r.handler: unknown handler `nope` (defined: h)",
            "rt.toml: routes.r.source.broker: unknown broker `kafka` (known: local)",
        ]
    );
}

#[test]
fn dlq_pointing_at_the_source_is_refused() {
    assert_eq!(
        errors("handler = \"h\"\nsource = { topic = \"orders\" }\ndlq = { topic = \"orders\" }\n"),
        vec![
            "rt.toml: routes.r.dlq.topic: \"orders\" is the route's own source topic: dead letters would be consumed again"
        ]
    );
}

#[test]
fn bad_enums_and_ranges() {
    assert_eq!(
        errors(
            "handler = \"h\"\nsource = { topic = \"t\" }\nordering = \"global\"\nconcurrency = 5000\nmax_batch = 0\nretry = { jitter = \"some\", multiplier = 0.5 }\ncircuit_breaker = { failure_ratio = 1.5 }\nidempotency = { key = \"payload\" }\n"
        ),
        vec![
            "rt.toml: routes.r.concurrency: 5000 is over the limit of 1024",
            "rt.toml: routes.r.ordering: unknown value \"global\"; expected \"partition\" or \"key\"",
            "rt.toml: routes.r.max_batch: must be greater than 0, found 0",
            "rt.toml: routes.r.retry.multiplier: must be between 1 and 1000, found 0.5",
            "rt.toml: routes.r.retry.jitter: unknown value \"some\"; expected \"full\", \"proportional\" or \"none\"",
            "rt.toml: routes.r.circuit_breaker.failure_ratio: must be greater than 0 and at most 1, found 1.5",
            "rt.toml: routes.r.idempotency.key: unknown key source \"payload\"; expected \"header:<name>\", \"key\", \"json:<pointer starting with />\" or \"position\"",
        ]
    );
}

#[test]
fn missing_required_parts() {
    assert_eq!(
        errors("circuit_breaker = { open_ms = 10 }\nrate_limit = { burst = 5 }\n"),
        vec![
            "rt.toml: routes.r.handler: missing: the name of a [handlers.<name>] table",
            "rt.toml: routes.r.source: missing: e.g. source = { broker = \"local\", topic = \"orders\" }",
            "rt.toml: routes.r.circuit_breaker: set consecutive_failures, failure_ratio, or both: otherwise the breaker never trips",
            "rt.toml: routes.r.rate_limit.per_second: missing",
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
    assert_eq!(
        c.routes["a"].dlq,
        DlqTarget::Table {
            store: "pg".into(),
            topic: "orders.dlq".into()
        }
    );
    assert_eq!(c.routes["a"].dlq.to_string(), "store:pg:orders.dlq");
    assert_eq!(c.routes["b"].dlq.topic(), "all.dlq");
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

#[test]
fn outbox_routes_and_relays_parse() {
    let stores = "[stores.pg]\nkind = \"postgres\"\nurl = \"postgres://u@h/db\"\n\n[stores.r]\nkind = \"redis\"\nurl = \"redis://h\"\n\n[brokers.k]\nkind = \"kafka\"\nbootstrap_servers = \"127.0.0.1:9092\"\n\n[handlers.h]\nmodule = \"h.wasm\"\n\n";
    let c = Config::parse(
        Path::new("rt.toml"),
        &format!(
            "{stores}[routes.orders]\nhandler = \"h\"\nsource = {{ topic = \"orders\" }}\nstate = \"pg\"\noutputs = {{ topics = [\"events\"], mode = \"outbox\" }}\nidempotency = {{ key = \"key\" }}\n\n[routes.relay]\nsource = {{ outbox = \"pg\", batch = 100, poll_ms = 50, retention_ms = 1000 }}\noutputs = {{ broker = \"k\" }}\nordering = \"key\"\n\n[routes.enrich]\nhandler = \"h\"\nsource = {{ outbox = \"pg\" }}\noutputs = {{ broker = \"local\", topics = [\"x\"] }}\ndlq = {{ topic = \"enrich.dead\" }}\n\n[routes.to_kafka]\nsource = {{ outbox = \"pg\" }}\noutputs = {{ broker = \"k\" }}\ndlq = {{ broker = \"k\", topic = \"relay.dead\" }}\n"
        ),
    )
    .unwrap();
    let o = &c.routes["orders"];
    assert_eq!(o.outputs_mode, OutputsMode::Outbox);
    assert_eq!(o.outputs, vec!["events"]);
    assert_eq!(o.outputs_broker, BrokerRef::Local);
    let r = &c.routes["relay"];
    assert_eq!(r.handler, None);
    assert_eq!(r.outputs_broker, BrokerRef::Named("k".into()));
    assert_eq!(r.outputs_mode, OutputsMode::Publish);
    let SourceSpec::Outbox(ob) = &r.source else {
        panic!("not a relay: {:?}", r.source)
    };
    assert_eq!((ob.store.as_str(), ob.batch), ("pg", 100));
    assert_eq!(ob.poll, std::time::Duration::from_millis(50));
    assert_eq!(ob.retention, std::time::Duration::from_millis(1000));
    assert_eq!(
        ob.lease,
        std::time::Duration::from_millis(DEFAULT_OUTBOX_LEASE_MS)
    );
    // A relay's dead letters go to its store's table by default.
    assert_eq!(r.dlq.store(), Some("pg"));
    assert_eq!(r.dlq.topic(), "outbox.dlq");
    assert_eq!(c.routes["enrich"].handler.as_deref(), Some("h"));
    // A relay's `dlq` names a topic in its store's table unless it names a broker.
    assert_eq!(c.routes["enrich"].dlq.to_string(), "store:pg:enrich.dead");
    assert_eq!(
        c.routes["to_kafka"].dlq,
        DlqTarget::Broker {
            broker: BrokerRef::Named("k".into()),
            topic: "relay.dead".into()
        }
    );
    assert!(c.routes["to_kafka"].uses_broker("k"));
    assert!(c.routes["to_kafka"].uses_store_tables("pg"));
    assert!(
        !c.routes["orders"].uses_store_tables("pg"),
        "its state store is not a table use"
    );

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
        "[brokers.nats]\nkind = \"nats\"\nservers = \"nats://127.0.0.1:4222\"\ncredentials = { file = \"a.creds\" }\ntls = true\n\n[handlers.h]\nmodule = \"h.wasm\"\n\n[routes.js]\nhandler = \"h\"\nsource = { broker = \"nats\", topic = \"orders.*\", group = \"w\", stream = \"ORDERS\", ack_wait_ms = 2000, max_deliver = 5 }\nretry = { mode = \"broker\" }\ndlq = { topic = \"dead.orders\" }\n\n[routes.core]\nhandler = \"h\"\nsource = { broker = \"nats\", topic = \"ping\" }\n",
    )
    .unwrap();
    let BrokerKind::Nats(n) = &c.brokers["nats"].kind else {
        panic!("not nats");
    };
    assert_eq!(n.servers, vec!["nats://127.0.0.1:4222"]);
    assert!(matches!(
        n.auth,
        Some(crate::config::NatsAuth::Credentials(_))
    ));
    assert!(n.tls);
    let Some(SourceOptions::JetStream(js)) = c.routes["js"].source.as_broker().map(|b| &b.options)
    else {
        panic!("not JetStream: {:?}", c.routes["js"].source)
    };
    assert_eq!(js.stream, "ORDERS");
    assert_eq!(js.ack_wait, std::time::Duration::from_secs(2));
    assert_eq!(js.max_ack_pending, DEFAULT_MAX_ACK_PENDING);
    assert_eq!(js.max_deliver, Some(5));
    assert_eq!(
        c.routes["core"].source.as_broker().unwrap().options,
        SourceOptions::Plain
    );
    assert_eq!(c.routes["js"].retry.mode, RetryMode::Broker);
    assert_eq!(c.routes["core"].retry.mode, RetryMode::InProcess);
    assert_eq!(c.routes["core"].dlq.topic(), "ping.dlq");
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
