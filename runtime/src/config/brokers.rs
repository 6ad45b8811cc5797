//! `[brokers.<name>]`: Kafka, NATS and RabbitMQ brokers, each with the settings of its kind.
//!
//! Example:
//! ```toml
//! [brokers.kafka]
//! kind = "kafka"
//! bootstrap_servers = "127.0.0.1:9092"
//! properties = { "session.timeout.ms" = 6000, "sasl.password" = { env = "KAFKA_PASSWORD" } }
//! consumer_properties = { "group.instance.id" = "node-1" }
//! producer_properties = { "linger.ms" = 5 }
//!
//! [brokers.nats]
//! kind = "nats"
//! servers = ["nats://127.0.0.1:4222"]
//! credentials = { file = "nats.creds" }       # or nkey_seed, token, user + password
//!
//! [brokers.rabbit]
//! kind = "rabbitmq"
//! url = { env = "AMQP_URL" }
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::reader::{Reader, describe, scalar};
use super::routes::BUILTIN_BROKERS;
use super::schema;
use super::secret::{Secret, SecretError, SecretSource, parse_secret_value};

/// One `[brokers.<name>]` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerConfig {
    /// The broker's name (the table key), used by routes' `source.broker` and `dlq.broker`.
    pub name: String,
    /// What it is, with its settings.
    pub kind: BrokerKind,
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

/// Settings of a `kind = "kafka"` broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaConfig {
    /// `bootstrap_servers`: comma-separated host:port list.
    pub bootstrap_servers: String,
    /// `properties`: librdkafka properties for consumers and producers, passed through.
    pub properties: BTreeMap<String, Property>,
    /// `consumer_properties`: librdkafka properties for consumers only (override `properties`).
    pub consumer_properties: BTreeMap<String, Property>,
    /// `producer_properties`: librdkafka properties for producers only (override `properties`).
    pub producer_properties: BTreeMap<String, Property>,
    /// `max_in_flight_per_partition`: a partition with this many received, unfinished messages
    /// is paused until half of them are done.
    pub max_in_flight_per_partition: usize,
}

/// The value of a librdkafka property.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Property {
    /// A plain value (a number or boolean as its text).
    Value(String),
    /// A secret: written as `{ env = ... }` or `{ file = ... }`, or the value of a property
    /// whose name says it is one (`sasl.password`; see [`is_secret_property`]), so that it is
    /// never shown.
    Secret(Secret),
}

impl Property {
    /// The value to hand to librdkafka, read now for a secret from the environment or a file.
    pub fn resolve(&self) -> Result<String, SecretError> {
        match self {
            Property::Value(v) => Ok(v.clone()),
            Property::Secret(s) => s.resolve(),
        }
    }
}

/// Whether librdkafka property `key` holds a secret (`sasl.password`, `ssl.key.password`,
/// `sasl.oauthbearer.client.secret`, a private key, a JAAS config with a password).
pub fn is_secret_property(key: &str) -> bool {
    key.contains("password")
        || key.contains("secret")
        || matches!(
            key,
            "ssl.key.pem" | "sasl.jaas.config" | "sasl.oauthbearer.config"
        )
}

/// Settings of a `kind = "nats"` broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatsConfig {
    /// `servers`: URLs tried in turn (and on reconnect).
    pub servers: Vec<String>,
    /// How it logs in, if it does.
    pub auth: Option<NatsAuth>,
    /// `tls`: require TLS (`true`), or take what the server offers (`false`, the default; a
    /// `tls://` URL also requires it).
    pub tls: bool,
    /// `tls_ca_file`: extra root certificate (PEM), relative to the config file.
    pub tls_ca_file: Option<PathBuf>,
}

/// How a NATS broker logs in (at most one way).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NatsAuth {
    /// `credentials`: a `.creds` file's contents (a user JWT and its nkey seed).
    Credentials(Secret),
    /// `nkey_seed`: an nkey seed.
    NkeySeed(Secret),
    /// `token`: an authentication token.
    Token(Secret),
    /// `user` and `password`.
    UserPassword {
        /// `user`.
        user: String,
        /// `password`.
        password: Secret,
    },
}

/// `[brokers.<name>]` with `kind = "rabbitmq"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RabbitConfig {
    /// `url`: `amqp://user:password@host:5672/vhost` (or `amqps://`).
    pub url: Secret,
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
    /// The URL, read from the environment or a file when configured so (see
    /// [`Secret::resolve`]); errors name the field, never the URL.
    pub fn url(&self) -> Result<String, SecretError> {
        self.url.resolve()
    }
}

/// Default of `[brokers.<name>] max_in_flight_per_partition`. Large enough that the pause and
/// resume it costs (a fetch round trip) are rare; small enough to bound memory.
pub const DEFAULT_MAX_IN_FLIGHT_PER_PARTITION: usize = 5000;
/// Largest accepted `max_in_flight_per_partition`.
pub const MAX_IN_FLIGHT_PER_PARTITION_LIMIT: u64 = 1_000_000;

/// The kind of broker a `[brokers.<name>]` table defines.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Kafka,
    Nats,
    RabbitMq,
}

/// Reads one `[brokers.<name>]` table (the reader is bound to every kind's fields).
pub(super) fn parse_broker(name: &str, r: &mut Reader<'_>) -> Option<BrokerConfig> {
    let before = r.problem_count();
    if BUILTIN_BROKERS.contains(&name) {
        r.problem(
            "",
            format!("`{name}` is the built-in embedded broker and cannot be redefined"),
        );
    }
    if !r.has("kind") {
        r.problem(
            "kind",
            "missing: \"kafka\", \"nats\" or \"rabbitmq\"".into(),
        );
    }
    let kind = match r.choice(
        "kind",
        &[
            ("kafka", Kind::Kafka),
            ("nats", Kind::Nats),
            ("rabbitmq", Kind::RabbitMq),
        ],
    ) {
        Some(Kind::Kafka) => {
            r.rebind(&[&schema::KAFKA]);
            parse_kafka(r).map(BrokerKind::Kafka)
        }
        Some(Kind::Nats) => {
            r.rebind(&[&schema::NATS]);
            parse_nats(r).map(BrokerKind::Nats)
        }
        Some(Kind::RabbitMq) => {
            r.rebind(&[&schema::RABBITMQ]);
            parse_rabbit(r).map(BrokerKind::RabbitMq)
        }
        None => None,
    };
    if r.problem_count() != before {
        return None;
    }
    Some(BrokerConfig {
        name: name.to_owned(),
        kind: kind?,
    })
}

fn parse_rabbit(r: &mut Reader<'_>) -> Option<RabbitConfig> {
    let url = r.secret("url");
    if !r.secret_given("url") {
        r.problem(
            "url",
            "missing: url = \"amqp://guest:guest@127.0.0.1:5672/%2f\", { env = \"<VARIABLE>\" } or { file = \"<path>\" }".into(),
        );
    }
    if let Some(u) = url.as_ref().and_then(Secret::inline)
        && !(u.starts_with("amqp://") || u.starts_with("amqps://"))
    {
        // Never echo the URL: it may hold a password.
        r.problem(
            "url",
            "not an AMQP URL: expected amqp://user:password@host:5672/vhost or amqps://...".into(),
        );
    }
    let exchange = r.string("exchange").unwrap_or_default();
    let consumer_timeout = r
        .positive("consumer_timeout_ms")
        .unwrap_or(DEFAULT_CONSUMER_TIMEOUT_MS);
    let request_timeout = r
        .positive("request_timeout_ms")
        .unwrap_or(DEFAULT_RABBIT_REQUEST_TIMEOUT_MS);
    let ca_file = r.string("ca_file").map(|f| r.base_dir().join(f));
    if ca_file.is_some()
        && let Some(u) = url.as_ref().and_then(Secret::inline)
        && !u.starts_with("amqps://")
    {
        r.problem(
            "ca_file",
            "only used with an amqps:// URL (TLS); the url is amqp://".into(),
        );
    }
    r.finish();
    Some(RabbitConfig {
        url: url?,
        exchange,
        consumer_timeout: std::time::Duration::from_millis(consumer_timeout),
        request_timeout: std::time::Duration::from_millis(request_timeout),
        ca_file,
    })
}

fn parse_kafka(r: &mut Reader<'_>) -> Option<KafkaConfig> {
    if !r.has("bootstrap_servers") {
        r.problem(
            "bootstrap_servers",
            "missing: e.g. \"127.0.0.1:9092\"".into(),
        );
    }
    let bootstrap_servers = r.string("bootstrap_servers");
    if bootstrap_servers.as_deref() == Some("") {
        r.problem("bootstrap_servers", "must not be empty".into());
    }
    let properties = parse_properties(r, "properties");
    let consumer_properties = parse_properties(r, "consumer_properties");
    let producer_properties = parse_properties(r, "producer_properties");
    let max_in_flight = r.positive("max_in_flight_per_partition");
    if let Some(n) = max_in_flight
        && n > MAX_IN_FLIGHT_PER_PARTITION_LIMIT
    {
        r.problem(
            "max_in_flight_per_partition",
            format!("{n} is over the limit of {MAX_IN_FLIGHT_PER_PARTITION_LIMIT}"),
        );
    }
    r.finish();
    Some(KafkaConfig {
        bootstrap_servers: bootstrap_servers?,
        properties,
        consumer_properties,
        producer_properties,
        max_in_flight_per_partition: max_in_flight
            .map_or(DEFAULT_MAX_IN_FLIGHT_PER_PARTITION, |n| n as usize),
    })
}

/// A table of librdkafka properties: strings, numbers and booleans, or secrets.
fn parse_properties(r: &mut Reader<'_>, key: &str) -> BTreeMap<String, Property> {
    let mut out = BTreeMap::new();
    let Some(t) = r.table(key) else {
        return out;
    };
    for (k, v) in t {
        let path = r.key_path(&format!("{key}.{k}"));
        let property = match (v, scalar(v)) {
            (toml::Value::Table(_), _) => parse_secret_value(r.out, &path, v).map(Property::Secret),
            (_, Some(s)) if is_secret_property(k) => Some(Property::Secret(
                Secret::new(&path, SecretSource::Inline(s)).in_file(&r.out.file),
            )),
            (_, Some(s)) => Some(Property::Value(s)),
            (other, None) => {
                r.out.problems.push(super::Problem::new(
                    &path,
                    format!(
                        "expected a string, number or boolean, or a secret ({{ env = \"NAME\" }} or {{ file = \"path\" }}), found {}",
                        describe(other)
                    ),
                ));
                None
            }
        };
        if let Some(p) = property {
            out.insert(k.clone(), p);
        }
    }
    out
}

fn parse_nats(r: &mut Reader<'_>) -> Option<NatsConfig> {
    // `servers` may be one string or a list.
    let servers = match r.get("servers") {
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
    let methods = ["credentials", "nkey_seed", "token", "password"]
        .iter()
        .filter(|k| r.secret_given(k))
        .count()
        + usize::from(r.has("user") && !r.secret_given("password"));
    let credentials = r.secret("credentials");
    let nkey_seed = r.secret("nkey_seed");
    let token = r.secret("token");
    let user = r.string("user");
    let password = r.secret("password");
    let user_password = match (user, r.secret_given("password")) {
        (Some(user), true) => password.map(|password| NatsAuth::UserPassword { user, password }),
        (None, false) => None,
        (Some(_), false) => {
            r.problem("password", "missing: `user` needs `password`".into());
            None
        }
        (None, true) => {
            if !r.has("user") {
                r.problem("user", "missing: `password` needs a `user`".into());
            }
            None
        }
    };
    if methods > 1 {
        r.problem(
            "",
            "set at most one of credentials, nkey_seed, token, user/password".into(),
        );
    }
    let auth = credentials
        .map(NatsAuth::Credentials)
        .or(nkey_seed.map(NatsAuth::NkeySeed))
        .or(token.map(NatsAuth::Token))
        .or(user_password);
    let tls = r.bool("tls").unwrap_or(false);
    let tls_ca_file = r.string("tls_ca_file").map(PathBuf::from);
    r.finish();
    Some(NatsConfig {
        servers: servers?,
        auth,
        tls,
        tls_ca_file,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;
    use crate::config::tests::problems;
    use crate::config::{QueueType, RabbitSource, SourceOptions};

    /// The settings of broker `name`, which must be of the kind `f` picks.
    fn kind_of<'c, T>(
        c: &'c Config,
        name: &str,
        f: impl Fn(&'c BrokerKind) -> Option<&'c T>,
    ) -> &'c T {
        f(&c.brokers[name].kind).unwrap_or_else(|| panic!("{name} is of another kind"))
    }

    fn rabbit(k: &BrokerKind) -> Option<&RabbitConfig> {
        match k {
            BrokerKind::RabbitMq(r) => Some(r),
            _ => None,
        }
    }

    fn nats(k: &BrokerKind) -> Option<&NatsConfig> {
        match k {
            BrokerKind::Nats(n) => Some(n),
            _ => None,
        }
    }

    fn kafka(k: &BrokerKind) -> Option<&KafkaConfig> {
        match k {
            BrokerKind::Kafka(n) => Some(n),
            _ => None,
        }
    }

    fn value(s: &str) -> Property {
        Property::Value(s.to_owned())
    }

    #[test]
    fn kafka_brokers_parse_and_routes_may_use_them() {
        let c = Config::parse(
            Path::new("conf/rt.toml"),
            "[brokers.kafka]\nkind = \"kafka\"\nbootstrap_servers = \"127.0.0.1:9092\"\nproperties = { \"session.timeout.ms\" = 6000, \"sasl.username\" = \"lg\", \"sasl.password\" = { env = \"KAFKA_PASSWORD\" }, \"ssl.key.password\" = \"inline-secret\" }\nproducer_properties = { \"linger.ms\" = \"5\" }\nconsumer_properties = { \"sasl.oauthbearer.client.secret\" = { file = \"secrets/oauth\" } }\nmax_in_flight_per_partition = 77\n\n[handlers.h]\nmodule = \"h.wasm\"\n\n[routes.r]\nhandler = \"h\"\nsource = { broker = \"kafka\", topic = \"t\" }\n",
        )
        .unwrap();
        let b = kind_of(&c, "kafka", kafka);
        assert_eq!(b.bootstrap_servers, "127.0.0.1:9092");
        assert_eq!(b.properties["session.timeout.ms"], value("6000"));
        assert_eq!(b.properties["sasl.username"], value("lg"));
        assert_eq!(
            b.properties["sasl.password"],
            Property::Secret(
                Secret::new(
                    "brokers.kafka.properties.sasl.password",
                    SecretSource::Env("KAFKA_PASSWORD".into())
                )
                .in_file(Path::new("conf/rt.toml"))
            )
        );
        // A secret-like property written inline is a secret too: never shown.
        let Property::Secret(inline) = &b.properties["ssl.key.password"] else {
            panic!("not a secret");
        };
        assert_eq!(inline.resolve().unwrap(), "inline-secret");
        assert!(!format!("{b:?}").contains("inline-secret"));
        assert_eq!(
            b.consumer_properties["sasl.oauthbearer.client.secret"],
            Property::Secret(
                Secret::new(
                    "brokers.kafka.consumer_properties.sasl.oauthbearer.client.secret",
                    SecretSource::File(Path::new("conf/secrets/oauth").into())
                )
                .in_file(Path::new("conf/rt.toml"))
            )
        );
        assert_eq!(b.producer_properties["linger.ms"], value("5"));
        assert_eq!(b.max_in_flight_per_partition, 77);
        assert!(c.routes["r"].source.is_on_broker("kafka"));
        assert_eq!(c.routes["r"].dlq.to_string(), "kafka:t.dlq");
    }

    #[test]
    fn secret_properties_are_recognised_by_name() {
        for k in [
            "sasl.password",
            "ssl.key.password",
            "ssl.keystore.password",
            "sasl.oauthbearer.client.secret",
            "ssl.key.pem",
            "sasl.jaas.config",
        ] {
            assert!(is_secret_property(k), "{k}");
        }
        for k in ["sasl.username", "security.protocol", "linger.ms"] {
            assert!(!is_secret_property(k), "{k}");
        }
    }

    #[test]
    fn broker_mistakes_are_named() {
        assert_eq!(
            problems(
                "[brokers.local]\nkind = \"kafka\"\nbootstrap_servers = \"x:1\"\n\n[brokers.k]\nkind = \"kafka\"\nproperties = { a = [1], \"sasl.password\" = { env = \"\" } }\nbootstrap = \"x\"\n\n[brokers.p]\nkind = \"pulsar\"\n\n[brokers.n]\nkind = \"nats\"\nservers = [\"nats://a:4222\", \"http://b\"]\ntokn = \"t\"\nuser = \"u\"\ntls = \"yes\"\n\n[brokers.m]\nkind = \"nats\"\n\n[brokers.o]\nkind = \"nats\"\nservers = \"nats://a:4222\"\ntoken = { env = \"T\" }\ncredentials = { file = \"c.creds\" }\npassword = \"p\"\n\n[handlers.h]\nmodule = \"h.wasm\"\n\n[routes.r]\nhandler = \"h\"\nsource = { broker = \"kafak\", topic = \"t\" }\n"
            ),
            vec![
                "rt.toml: brokers.local: `local` is the built-in embedded broker and cannot be redefined",
                "rt.toml: brokers.k.bootstrap_servers: missing: e.g. \"127.0.0.1:9092\"",
                "rt.toml: brokers.k.properties.a: expected a string, number or boolean, or a secret ({ env = \"NAME\" } or { file = \"path\" }), found an array",
                "rt.toml: brokers.k.properties.sasl.password.env: must not be empty",
                "rt.toml: brokers.k.bootstrap: unknown field `bootstrap` (expected one of: kind, bootstrap_servers, properties, consumer_properties, producer_properties, max_in_flight_per_partition)",
                "rt.toml: brokers.p.kind: unknown value \"pulsar\"; expected \"kafka\", \"nats\" or \"rabbitmq\"",
                "rt.toml: brokers.n.servers: \"http://b\" is not a NATS server address: invalid scheme for NATS server URL: http",
                "rt.toml: brokers.n.password: missing: `user` needs `password`",
                "rt.toml: brokers.n.tls: expected a boolean, found string \"yes\"",
                "rt.toml: brokers.n.tokn: unknown field `tokn`; did you mean `token`?",
                "rt.toml: brokers.m.servers: missing: e.g. [\"nats://127.0.0.1:4222\"]",
                "rt.toml: brokers.o.user: missing: `password` needs a `user`",
                "rt.toml: brokers.o: set at most one of credentials, nkey_seed, token, user/password",
                "rt.toml: routes.r.source.broker: unknown broker `kafak` (known: local, k, p, n, m, o)",
            ]
        );
    }

    #[test]
    fn nats_logs_in_one_way() {
        let c = Config::parse(
            Path::new("conf/rt.toml"),
            "[brokers.a]\nkind = \"nats\"\nservers = \"nats://h:4222\"\ncredentials = { file = \"a.creds\" }\ntls = true\ntls_ca_file = \"ca.pem\"\n\n[brokers.b]\nkind = \"nats\"\nservers = \"nats://h:4222\"\nnkey_seed = { env = \"SEED\" }\n\n[brokers.c]\nkind = \"nats\"\nservers = \"nats://h:4222\"\ntoken = \"t0ken\"\n\n[brokers.d]\nkind = \"nats\"\nservers = [\"nats://h:4222\", \"nats://i:4222\"]\nuser = \"u\"\npassword = { env = \"PW\" }\n\n[brokers.e]\nkind = \"nats\"\nservers = \"nats://h:4222\"\n",
        )
        .unwrap();
        let secret =
            |field: &str, s: SecretSource| Secret::new(field, s).in_file(Path::new("conf/rt.toml"));
        let a = kind_of(&c, "a", nats);
        assert_eq!(
            a.auth,
            Some(NatsAuth::Credentials(secret(
                "brokers.a.credentials",
                SecretSource::File(Path::new("conf/a.creds").into())
            )))
        );
        assert!(a.tls);
        assert_eq!(a.tls_ca_file.as_deref(), Some(Path::new("ca.pem")));
        assert_eq!(
            kind_of(&c, "b", nats).auth,
            Some(NatsAuth::NkeySeed(secret(
                "brokers.b.nkey_seed",
                SecretSource::Env("SEED".into())
            )))
        );
        assert_eq!(
            kind_of(&c, "c", nats).auth,
            Some(NatsAuth::Token(secret(
                "brokers.c.token",
                SecretSource::Inline("t0ken".into())
            )))
        );
        let d = kind_of(&c, "d", nats);
        assert_eq!(d.servers, vec!["nats://h:4222", "nats://i:4222"]);
        assert_eq!(
            d.auth,
            Some(NatsAuth::UserPassword {
                user: "u".into(),
                password: secret("brokers.d.password", SecretSource::Env("PW".into()))
            })
        );
        assert_eq!(kind_of(&c, "e", nats).auth, None);
        assert!(!kind_of(&c, "e", nats).tls);
    }

    #[test]
    fn rabbitmq_brokers_and_sources_parse() {
        let c = Config::parse(
            Path::new("rt.toml"),
            "[brokers.rabbit]\nkind = \"rabbitmq\"\nurl = { env = \"AMQP_URL\" }\nexchange = \"events\"\nconsumer_timeout_ms = 60000\nrequest_timeout_ms = 5000\n\n[brokers.r2]\nkind = \"rabbitmq\"\nurl = { file = \"secrets/amqp\" }\n\n[handlers.h]\nmodule = \"h.wasm\"\n\n[routes.a]\nhandler = \"h\"\nsource = { broker = \"rabbit\", topic = \"orders\", queue_type = \"classic\", prefetch = 50, exchange = \"in\", binding_key = \"order.*\", single_active_consumer = true }\n\n[routes.b]\nhandler = \"h\"\nsource = { broker = \"r2\", topic = \"q\" }\n",
        )
        .unwrap();
        let r = kind_of(&c, "rabbit", rabbit);
        assert_eq!(r.url.source(), &SecretSource::Env("AMQP_URL".into()));
        assert_eq!(r.exchange, "events");
        assert_eq!(r.consumer_timeout, std::time::Duration::from_secs(60));
        assert_eq!(r.request_timeout, std::time::Duration::from_secs(5));
        let r2 = kind_of(&c, "r2", rabbit);
        assert_eq!(
            r2.url.source(),
            &SecretSource::File(Path::new(".").join("secrets/amqp"))
        );
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
        let r = kind_of(&tls, "r", rabbit);
        assert_eq!(r.ca_file, Some(Path::new("conf").join("certs/ca.pem")));
        assert_eq!(
            problems(
                "[brokers.r]\nkind = \"rabbitmq\"\nurl = \"amqp://h\"\nca_file = \"ca.pem\"\n"
            ),
            [
                "rt.toml: brokers.r.ca_file: only used with an amqps:// URL (TLS); the url is amqp://"
            ]
        );
        let rabbit = |r: &str| match &c.routes[r].source.as_broker().unwrap().options {
            SourceOptions::RabbitMq(o) => o.clone(),
            other => panic!("not RabbitMQ: {other:?}"),
        };
        let a = rabbit("a");
        assert_eq!(a.queue_type, QueueType::Classic);
        assert_eq!(a.prefetch, 50);
        assert_eq!(a.exchange.as_deref(), Some("in"));
        assert_eq!(a.binding_key, "order.*");
        assert!(a.single_active_consumer);
        assert_eq!(rabbit("b"), RabbitSource::default());
        assert_eq!(
            problems(
                "[brokers.rabbit]\nkind = \"rabbitmq\"\nurl = \"http://u:secret@h\"\n\n[brokers.k]\nkind = \"kafka\"\nbootstrap_servers = \"h:9092\"\n\n[brokers.none]\nkind = \"rabbitmq\"\n\n[brokers.two]\nkind = \"rabbitmq\"\nurl_env = \"A\"\nurl_file = \"b\"\n\n[handlers.h]\nmodule = \"h.wasm\"\n\n[routes.a]\nhandler = \"h\"\nsource = { broker = \"rabbit\", topic = \"q\", prefetch = 70000, binding_key = \"x\" }\n\n[routes.b]\nhandler = \"h\"\nsource = { broker = \"k\", topic = \"t\", prefetch = 5 }\n"
            ),
            [
                "rt.toml: brokers.rabbit.url: not an AMQP URL: expected amqp://user:password@host:5672/vhost or amqps://...",
                "rt.toml: brokers.none.url: missing: url = \"amqp://guest:guest@127.0.0.1:5672/%2f\", { env = \"<VARIABLE>\" } or { file = \"<path>\" }",
                "rt.toml: brokers.two.url_file: set either url_env or url_file, not both: url_file is a deprecated spelling of url",
                "rt.toml: routes.a.source.prefetch: 70000 is over RabbitMQ's limit of 65535",
                "rt.toml: routes.a.source.binding_key: needs `exchange`: the binding is from that exchange to the queue",
                "rt.toml: routes.b.source.prefetch: only a source on a `kind = \"rabbitmq\"` broker has this (`k` is not one)",
            ]
        );
    }
}
