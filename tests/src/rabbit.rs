//! Helpers for tests against the test RabbitMQ (`scripts/brokers.sh start rabbitmq`).

#![allow(clippy::unwrap_used)] // test support: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::time::Duration;

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

/// The test broker's URL (`LOCKGATE_RABBITMQ_URL`, default guest on 127.0.0.1:5672).
pub fn url() -> String {
    std::env::var("LOCKGATE_RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The test broker's AMQP-over-TLS URL (`LOCKGATE_RABBITMQ_TLS_URL`, default guest on
/// localhost:5671, the name its certificate carries).
pub fn tls_url() -> String {
    std::env::var("LOCKGATE_RABBITMQ_TLS_URL")
        .unwrap_or_else(|_| "amqps://guest:guest@localhost:5671/%2f".into())
}

/// The CA certificate the test broker's TLS listener was signed with
/// (`LOCKGATE_RABBITMQ_CA`, default `rabbitmq-ca.pem` in the brokers dir, where
/// `scripts/brokers.sh` copies it).
pub fn tls_ca() -> std::path::PathBuf {
    if let Ok(p) = std::env::var("LOCKGATE_RABBITMQ_CA") {
        return p.into();
    }
    let dir = std::env::var("LOCKGATE_BROKERS_DIR").map_or_else(
        |_| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/lockgate/brokers")
        },
        std::path::PathBuf::from,
    );
    dir.join("rabbitmq-ca.pem")
}

/// One message read back: key (the `lockgate-key` header), payload, headers and `message_id`.
#[derive(Clone, Debug)]
pub struct Got {
    /// The `lockgate-key` header, as text.
    pub key: Option<String>,
    /// The payload, as text.
    pub payload: String,
    /// Headers with string values, as text.
    pub headers: BTreeMap<String, String>,
    /// The AMQP `message_id`.
    pub message_id: Option<String>,
    /// The AMQP `correlation_id`.
    pub correlation_id: Option<String>,
}

/// A blocking client (test bodies are synchronous): lapin on a private runtime.
pub struct Rabbit {
    rt: tokio::runtime::Runtime,
    _conn: Connection,
    channel: Channel,
}

impl Rabbit {
    /// Connects to [`url`], with publisher confirms on.
    pub fn connect() -> Self {
        let rt = crate::kafka::runtime();
        let (conn, channel) = rt.block_on(async {
            let conn = Connection::connect(&url(), ConnectionProperties::default())
                .await
                .expect("RabbitMQ on 127.0.0.1:5672 (scripts/brokers.sh start rabbitmq)");
            let channel = conn.create_channel().await.unwrap();
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            (conn, channel)
        });
        Self {
            rt,
            _conn: conn,
            channel,
        }
    }

    /// Declares durable quorum queue `name`.
    pub fn declare(&self, name: &str) {
        self.declare_with(name, false);
    }

    /// Declares durable quorum queue `name` with `x-single-active-consumer` set as given.
    pub fn declare_with(&self, name: &str, single_active_consumer: bool) {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
        if single_active_consumer {
            args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        }
        self.rt
            .block_on(
                self.channel
                    .queue_declare(name.into(), QueueDeclareOptions::durable(), args),
            )
            .unwrap();
    }

    /// Declares durable classic queue `name` (no `x-queue-type`).
    pub fn declare_classic(&self, name: &str) {
        self.rt
            .block_on(self.channel.queue_declare(
                name.into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            ))
            .unwrap();
    }

    /// Publishes `(key, payload)`s to queue `name` (default exchange), awaiting every confirm.
    pub fn publish(&self, name: &str, messages: &[(Option<String>, String)]) {
        self.publish_with(name, messages, |_| None);
    }

    /// [`Rabbit::publish`], giving message `i` of `messages` the AMQP `message_id` `id(i)`.
    pub fn publish_with(
        &self,
        name: &str,
        messages: &[(Option<String>, String)],
        id: impl Fn(usize) -> Option<String>,
    ) {
        self.rt.block_on(async {
            for (c, chunk) in messages.chunks(1_000).enumerate() {
                let mut confirms = Vec::new();
                for (i, (key, payload)) in chunk.iter().enumerate() {
                    let mut headers = FieldTable::default();
                    if let Some(k) = key {
                        headers.insert(
                            "lockgate-key".into(),
                            AMQPValue::LongString(LongString::from(k.as_str())),
                        );
                    }
                    let mut props = BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_headers(headers);
                    if let Some(id) = id(c * 1_000 + i) {
                        props = props.with_message_id(id.into());
                    }
                    confirms.push(self.send(name, payload, props).await);
                }
                for c in confirms {
                    assert!(c.await.unwrap().is_ack());
                }
            }
        });
    }

    /// A server-named queue of this connection only, for answers.
    pub fn reply_queue(&self) -> String {
        let options = QueueDeclareOptions {
            exclusive: true,
            ..QueueDeclareOptions::default()
        };
        self.rt
            .block_on(
                self.channel
                    .queue_declare("".into(), options, FieldTable::default()),
            )
            .unwrap()
            .name()
            .as_str()
            .to_owned()
    }

    /// Sends a request to queue `name`: `payload`, answered to `reply_to` with `correlation`.
    pub fn request(&self, name: &str, payload: &str, reply_to: &str, correlation: &str) {
        self.rt.block_on(async {
            let props = BasicProperties::default()
                .with_reply_to(reply_to.into())
                .with_correlation_id(correlation.into());
            assert!(
                self.send(name, payload, props)
                    .await
                    .await
                    .unwrap()
                    .is_ack()
            );
        });
    }

    /// Publishes `payload` to queue `name` (default exchange); its confirm, to await.
    async fn send(
        &self,
        name: &str,
        payload: &str,
        props: BasicProperties,
    ) -> lapin::PublisherConfirm {
        self.channel
            .basic_publish(
                "".into(),
                name.into(),
                BasicPublishOptions::default(),
                payload.as_bytes(),
                props,
            )
            .await
            .unwrap()
    }

    /// Messages ready in queue `name` (not counting those delivered and unacknowledged).
    pub fn ready(&self, name: &str) -> u32 {
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        self.rt
            .block_on(
                self.channel
                    .queue_declare(name.into(), passive, FieldTable::default()),
            )
            .map(|q| q.message_count())
            .unwrap_or(0)
    }

    /// Takes every ready message out of queue `name`, in queue order.
    pub fn drain(&self, name: &str) -> Vec<Got> {
        self.rt.block_on(async {
            let mut out = Vec::new();
            let options = BasicGetOptions { no_ack: true };
            while let Some(m) = self.channel.basic_get(name.into(), options).await.unwrap() {
                let d = m.delivery;
                let mut headers = BTreeMap::new();
                if let Some(t) = d.properties.headers() {
                    for (k, v) in t {
                        if let AMQPValue::LongString(s) = v {
                            headers.insert(
                                k.as_str().to_owned(),
                                String::from_utf8_lossy(s.as_bytes()).into_owned(),
                            );
                        }
                    }
                }
                out.push(Got {
                    key: headers.remove("lockgate-key"),
                    payload: String::from_utf8_lossy(&d.data).into_owned(),
                    headers,
                    message_id: d
                        .properties
                        .message_id()
                        .as_ref()
                        .map(|s| s.as_str().to_owned()),
                    correlation_id: d
                        .properties
                        .correlation_id()
                        .as_ref()
                        .map(|s| s.as_str().to_owned()),
                });
            }
            out
        })
    }

    /// Deletes queue `name` (tests leave nothing behind).
    pub fn delete(&self, name: &str) {
        let _ = self.rt.block_on(
            self.channel
                .queue_delete(name.into(), QueueDeleteOptions::default()),
        );
    }

    /// Waits until `ready(name)` reaches `n`, or fails after `deadline`.
    pub fn wait_ready(&self, name: &str, n: u32, deadline: Duration) {
        let start = std::time::Instant::now();
        while self.ready(name) < n {
            assert!(
                start.elapsed() < deadline,
                "queue {name}: {} of {n} after {deadline:?}",
                self.ready(name)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
