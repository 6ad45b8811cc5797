//! Helpers for tests against nats-server with JetStream (started by `scripts/brokers.sh start
//! nats`; `LOCKGATE_NATS_URL` overrides nats://127.0.0.1:4222).

#![allow(clippy::unwrap_used)] // test support: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;

/// The test server's URL; panics with the command that starts it when nothing listens there.
pub fn url() -> String {
    let url = std::env::var("LOCKGATE_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let addr = url
        .trim_start_matches("nats://")
        .split(',')
        .next()
        .unwrap_or_default()
        .to_owned();
    assert!(
        std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(2))
            .is_ok(),
        "no NATS server at {url}: start one with `scripts/brokers.sh start nats`"
    );
    url
}

/// One message read back from a stream.
#[derive(Clone, Debug)]
pub struct Got {
    /// Its subject.
    pub subject: String,
    /// Stream sequence.
    pub sequence: u64,
    /// Headers (last value of each name).
    pub headers: BTreeMap<String, String>,
    /// Payload as text.
    pub payload: String,
}

/// A blocking client for tests: its own runtime, one connection.
pub struct Nats {
    rt: tokio::runtime::Runtime,
    /// The connection.
    pub client: async_nats::Client,
    js: jetstream::Context,
}

impl Nats {
    /// Connects to the test server.
    pub fn connect() -> Self {
        Self::connect_to(&url())
    }

    /// Connects to `url`.
    pub fn connect_to(url: &str) -> Self {
        let rt = crate::kafka::runtime();
        let client = rt.block_on(async_nats::connect(url)).unwrap();
        // The context spawns a task: it needs the runtime.
        let js = rt.block_on(async { jetstream::new(client.clone()) });
        Self { rt, client, js }
    }

    /// Connects to `url` with an auth token.
    pub fn connect_with_token(url: &str, token: &str) -> Self {
        let rt = crate::kafka::runtime();
        let client = rt
            .block_on(
                async_nats::ConnectOptions::with_token(token.to_owned()).connect(url.to_owned()),
            )
            .unwrap();
        let js = rt.block_on(async { jetstream::new(client.clone()) });
        Self { rt, client, js }
    }

    /// Runs `f` on this client's runtime.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Creates file-backed stream `name` capturing `subjects`.
    pub fn create_stream(&self, name: &str, subjects: &[&str]) {
        self.rt
            .block_on(self.js.create_stream(stream::Config {
                name: name.to_owned(),
                subjects: subjects.iter().map(|s| (*s).to_owned()).collect(),
                storage: stream::StorageType::File,
                ..Default::default()
            }))
            .unwrap();
    }

    /// Publishes `(subject, key, payload)` to JetStream, awaiting every PubAck. A key goes in the
    /// `lockgate-key` header.
    pub fn publish(&self, messages: &[(String, Option<String>, String)]) {
        self.rt.block_on(async {
            for chunk in messages.chunks(1000) {
                let mut acks = Vec::new();
                for (subject, key, payload) in chunk {
                    let mut headers = async_nats::HeaderMap::new();
                    if let Some(k) = key {
                        headers.insert("lockgate-key", k.as_str());
                    }
                    acks.push(
                        self.js
                            .publish_with_headers(subject.clone(), headers, payload.clone().into())
                            .await
                            .unwrap(),
                    );
                }
                for a in acks {
                    a.await.unwrap();
                }
            }
        });
    }

    /// Messages stored in stream `name`.
    pub fn count(&self, name: &str) -> u64 {
        self.rt.block_on(async {
            let stream = self.js.get_stream(name).await.unwrap();
            stream.get_info().await.unwrap().state.messages
        })
    }

    /// Every message of stream `name`, in sequence order.
    pub fn read(&self, name: &str) -> Vec<Got> {
        self.rt.block_on(async {
            let stream = self.js.get_stream(name).await.unwrap();
            let want = stream.get_info().await.unwrap().state.messages as usize;
            let reader: consumer::PullConsumer = stream
                .create_consumer(consumer::pull::Config {
                    ack_policy: consumer::AckPolicy::None,
                    deliver_policy: consumer::DeliverPolicy::All,
                    ..Default::default()
                })
                .await
                .unwrap();
            let mut got = Vec::with_capacity(want);
            while got.len() < want {
                let mut batch = reader
                    .fetch()
                    .max_messages(1000)
                    .expires(Duration::from_millis(500))
                    .messages()
                    .await
                    .unwrap();
                while let Some(m) = batch.next().await {
                    let m = m.unwrap();
                    let sequence = m.info().unwrap().stream_sequence;
                    let headers = m
                        .headers
                        .as_ref()
                        .map(|h| {
                            h.iter()
                                .filter_map(|(n, v)| {
                                    Some((n.to_string(), v.last()?.as_str().to_owned()))
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    got.push(Got {
                        subject: m.subject.to_string(),
                        sequence,
                        headers,
                        payload: String::from_utf8_lossy(&m.payload).into_owned(),
                    });
                }
            }
            got.sort_by_key(|g| g.sequence);
            got
        })
    }

    /// (unacknowledged, redelivered, not yet delivered) of durable consumer `durable`.
    pub fn consumer_state(&self, stream: &str, durable: &str) -> (usize, usize, u64) {
        self.rt.block_on(async {
            let stream = self.js.get_stream(stream).await.unwrap();
            let c: consumer::PullConsumer = stream.get_consumer(durable).await.unwrap();
            let info = c.get_info().await.unwrap();
            (info.num_ack_pending, info.num_redelivered, info.num_pending)
        })
    }
}
