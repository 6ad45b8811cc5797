//! Helpers for tests and benches against the Kafka-protocol test broker.

#![allow(clippy::unwrap_used)] // test support: a failed unwrap is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

/// The Kafka bootstrap address (`LOCKGATE_KAFKA_BOOTSTRAP`, default 127.0.0.1:9092); panics
/// with the command that starts the test broker when nothing listens there.
pub fn bootstrap() -> String {
    let addr =
        std::env::var("LOCKGATE_KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let first = addr.split(',').next().unwrap_or_default().to_owned();
    assert!(
        std::net::TcpStream::connect_timeout(&first.parse().unwrap(), Duration::from_secs(2))
            .is_ok(),
        "no Kafka broker at {addr}: start one with `scripts/brokers.sh start kafka`"
    );
    addr
}

/// A name no other test or run uses (topics, groups).
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

/// A small runtime for the async admin and producer clients.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Creates `(topic, partitions)` on the test broker.
pub fn create_topics(rt: &tokio::runtime::Runtime, topics: &[(&str, i32)]) {
    create_topics_at(rt, &bootstrap(), topics);
}

/// Creates `(topic, partitions)` on the broker at `bootstrap` (an existing topic is fine).
pub fn create_topics_at(rt: &tokio::runtime::Runtime, bootstrap: &str, topics: &[(&str, i32)]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
        .collect();
    let results = rt
        .block_on(admin.create_topics(&new, &AdminOptions::new()))
        .unwrap();
    for r in results {
        match r {
            Ok(_) => {}
            // tansu creates a topic on first produce: a sink retrying may have been first.
            Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, e)) => panic!("cannot create topic {topic}: {e}"),
        }
    }
}

/// Produces (key, payload) pairs to `topic`, in order, and awaits every delivery.
pub fn produce(rt: &tokio::runtime::Runtime, topic: &str, messages: &[(String, String)]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("linger.ms", "5")
        .create()
        .unwrap();
    rt.block_on(async {
        let mut pending = Vec::new();
        for (key, payload) in messages {
            let mut record = FutureRecord::to(topic).key(key).payload(payload);
            let future = loop {
                match producer.send_result(record) {
                    Ok(f) => break f,
                    Err((_, back)) => {
                        record = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            };
            pending.push(future);
        }
        for p in pending {
            p.await.unwrap().unwrap();
        }
    });
}

/// One consumed record: partition, key, payload, headers.
#[derive(Debug, Clone)]
pub struct Got {
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its key, as text.
    pub key: String,
    /// Its payload, as text.
    pub payload: String,
    /// Its headers, as text.
    pub headers: BTreeMap<String, String>,
}

/// Everything published to some topics, read from the beginning without a group and kept.
///
/// tansu's reported high watermark can lag behind the last records, so nothing here relies on
/// watermarks: a read ends when the topics stay quiet.
pub struct Tail {
    consumer: BaseConsumer,
    /// (topic, record) in arrival order.
    pub got: Vec<(String, Got)>,
}

impl Tail {
    /// Reads `(topic, partitions)` from the beginning, on the test broker.
    pub fn new(topics: &[(&str, i32)]) -> Self {
        Self::at(&bootstrap(), topics)
    }

    /// [`Self::new`] on the broker at `bootstrap`.
    pub fn at(bootstrap: &str, topics: &[(&str, i32)]) -> Self {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", unique("reader"))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for (topic, partitions) in topics {
            for p in 0..*partitions {
                tpl.add_partition_offset(topic, p, Offset::Beginning)
                    .unwrap();
            }
        }
        consumer.assign(&tpl).unwrap();
        Self {
            consumer,
            got: Vec::new(),
        }
    }

    /// Reads until nothing arrives for `quiet`.
    pub fn drain(&mut self, quiet: Duration) {
        while let Some(m) = self.consumer.poll(quiet) {
            let m = m.unwrap();
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|x| {
                            (
                                x.key.to_owned(),
                                String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            self.got.push((
                m.topic().to_owned(),
                Got {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                    payload: String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
                    headers,
                },
            ));
        }
    }

    /// What arrived on `topic`.
    pub fn records(&self, topic: &str) -> Vec<Got> {
        self.got
            .iter()
            .filter(|(t, _)| t == topic)
            .map(|(_, g)| g.clone())
            .collect()
    }

    /// The `id`s of every payload that arrived (see [`id_of`]).
    pub fn ids(&self) -> BTreeSet<u64> {
        self.got.iter().map(|(_, g)| id_of(&g.payload)).collect()
    }
}

/// The `id` of a `{"id": n, ...}` payload.
pub fn id_of(payload: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(payload).unwrap();
    v["id"].as_u64().unwrap()
}

/// The offsets `group` committed on partitions `0..partitions` of `topic` (0 when none).
pub fn committed(group: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let c = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    (0..partitions)
        .map(|p| match c.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => 0,
        })
        .collect()
}
