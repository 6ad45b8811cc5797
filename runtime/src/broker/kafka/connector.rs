//! The Kafka [`Connector`]: a consumer per route, a producer for outputs and dead letters.

use std::sync::Arc;

use futures_util::future::BoxFuture;

use super::{KafkaScan, KafkaSink, KafkaSource, probe};
use crate::broker::{BrokerError, Connector, Probe, Scan, Sink, Source, SourceProbe};
use crate::config::{BrokerSource, KafkaConfig};
use crate::policy::backoff::RetryMode;

/// A `kind = "kafka"` broker.
pub struct KafkaConnector {
    name: String,
    config: KafkaConfig,
}

impl KafkaConnector {
    /// The connector of broker `name`.
    pub fn new(name: &str, config: &KafkaConfig) -> Self {
        Self {
            name: name.to_owned(),
            config: config.clone(),
        }
    }
}

impl Connector for KafkaConnector {
    fn messaging_system(&self) -> &'static str {
        "kafka"
    }

    fn source<'a>(
        &'a self,
        _route: &'a str,
        source: &'a BrokerSource,
        _retry: RetryMode,
    ) -> BoxFuture<'a, Result<Box<dyn Source>, BrokerError>> {
        Box::pin(async move {
            let s = KafkaSource::new(&self.config, &source.topic, &source.group)?;
            Ok(Box::new(s) as Box<dyn Source>)
        })
    }

    fn sink(&self) -> BoxFuture<'_, Result<Arc<dyn Sink>, BrokerError>> {
        Box::pin(
            async move { Ok(Arc::new(KafkaSink::new(&self.name, &self.config)?) as Arc<dyn Sink>) },
        )
    }

    fn scan<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Box<dyn Scan>, BrokerError>> {
        Box::pin(async move {
            Ok(Box::new(KafkaScan::open(&self.config, topic).await?) as Box<dyn Scan>)
        })
    }

    fn probe<'a>(&'a self, sources: &'a [(&'a str, &'a BrokerSource)]) -> BoxFuture<'a, Probe> {
        Box::pin(async move {
            if let Err(e) = probe(&self.config, None).await {
                return Probe::unreachable(e);
            }
            let mut found = Probe::default();
            for (route, source) in sources {
                found.sources.push(SourceProbe {
                    route: (*route).to_owned(),
                    field: Some("topic"),
                    outcome: probe(&self.config, Some(&source.topic))
                        .await
                        .map(|()| Vec::new()),
                });
            }
            found
        })
    }
}
