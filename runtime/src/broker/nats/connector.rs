//! The NATS [`Connector`]: one connection per broker, shared by its JetStream and core NATS
//! sources, its sink and its reply sink.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::OnceCell;

use super::{
    JetStreamScan, JetStreamSink, JetStreamSource, NatsCoreSource, NatsLink, NatsReplySink,
    connect, probe_connect, probe_stream,
};
use crate::broker::{BrokerError, Connector, Probe, Scan, Sink, Source, SourceProbe};
use crate::config::{BrokerSource, NatsConfig, SourceOptions};
use crate::policy::backoff::RetryMode;

/// How long a scan (`lockgate dlq`, a one-shot command) waits for the connection before it
/// fails with the reason.
const SCAN_CONNECT_WAIT: Duration = Duration::from_secs(10);

/// A `kind = "nats"` broker.
pub struct NatsConnector {
    name: String,
    config: NatsConfig,
    base_dir: PathBuf,
    link: OnceCell<NatsLink>,
}

impl NatsConnector {
    /// The connector of broker `name`; relative file paths in `config` are taken from
    /// `base_dir`.
    pub fn new(name: &str, config: &NatsConfig, base_dir: &Path) -> Self {
        Self {
            name: name.to_owned(),
            config: config.clone(),
            base_dir: base_dir.to_owned(),
            link: OnceCell::new(),
        }
    }

    /// The connection (connecting in the background if the server is not there yet).
    async fn link(&self) -> Result<NatsLink, BrokerError> {
        let link = self
            .link
            .get_or_try_init(|| connect(&self.name, &self.config, &self.base_dir))
            .await?;
        Ok(link.clone())
    }
}

/// Whether `source` reads core NATS (no `stream`), whose messages carry reply subjects and are
/// published to without a stream.
fn is_core(source: &BrokerSource) -> bool {
    !matches!(source.options, SourceOptions::JetStream(_))
}

impl Connector for NatsConnector {
    fn messaging_system(&self) -> &'static str {
        "nats"
    }

    fn source<'a>(
        &'a self,
        route: &'a str,
        source: &'a BrokerSource,
        _retry: RetryMode,
    ) -> BoxFuture<'a, Result<Box<dyn Source>, BrokerError>> {
        Box::pin(async move {
            let link = self.link().await?;
            Ok(match &source.options {
                SourceOptions::JetStream(js) => {
                    Box::new(JetStreamSource::new(link, &source.topic, &source.group, js))
                        as Box<dyn Source>
                }
                _ => {
                    tracing::warn!(
                        route,
                        "Core NATS source (no `source.stream`): delivery is at most once. Retries, the breaker and the DLQ apply only while this process runs; messages it holds when it stops or crashes are lost. Use a JetStream stream for at-least-once."
                    );
                    Box::new(NatsCoreSource::new(link, &source.topic, &source.group))
                }
            })
        })
    }

    fn sink(&self) -> BoxFuture<'_, Result<Arc<dyn Sink>, BrokerError>> {
        Box::pin(async move {
            Ok(Arc::new(JetStreamSink::new(self.link().await?.client)) as Arc<dyn Sink>)
        })
    }

    fn replies<'a>(
        &'a self,
        source: &'a BrokerSource,
    ) -> BoxFuture<'a, Result<Option<Arc<dyn Sink>>, BrokerError>> {
        Box::pin(async move {
            if !is_core(source) {
                return Ok(None);
            }
            let sink = NatsReplySink::new(self.link().await?.client);
            Ok(Some(Arc::new(sink) as Arc<dyn Sink>))
        })
    }

    /// A core NATS source is fed by plain publishes: a JetStream publish would find no stream.
    fn feeder<'a>(
        &'a self,
        source: &'a BrokerSource,
    ) -> BoxFuture<'a, Result<Arc<dyn Sink>, BrokerError>> {
        Box::pin(async move {
            if is_core(source) {
                let sink = NatsReplySink::new(self.link().await?.client);
                return Ok(Arc::new(sink) as Arc<dyn Sink>);
            }
            self.sink().await
        })
    }

    fn scan<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Box<dyn Scan>, BrokerError>> {
        Box::pin(async move {
            let link = self.link().await?;
            link.connected_within(SCAN_CONNECT_WAIT).await?;
            Ok(Box::new(JetStreamScan::open(link.client, topic).await?) as Box<dyn Scan>)
        })
    }

    fn probe<'a>(&'a self, sources: &'a [(&'a str, &'a BrokerSource)]) -> BoxFuture<'a, Probe> {
        Box::pin(async move {
            let client = match probe_connect(&self.name, &self.config, &self.base_dir).await {
                Ok(c) => c,
                Err(e) => return Probe::unreachable(e),
            };
            let mut found = Probe::default();
            for (route, source) in sources {
                // Core NATS has nothing to check beyond the connection.
                let SourceOptions::JetStream(js) = &source.options else {
                    continue;
                };
                let outcome = probe_stream(client.clone(), &js.stream, &source.group).await;
                let field = if outcome.is_ok() {
                    None
                } else {
                    Some("stream")
                };
                found.sources.push(SourceProbe {
                    route: (*route).to_owned(),
                    field,
                    outcome,
                });
            }
            found
        })
    }
}
