//! The RabbitMQ [`Connector`]: a consumer per route (each with its own connection, so one
//! route's flow control does not stall another's), a publisher with confirms, and a reply
//! publisher for request-reply.

use std::sync::Arc;

use futures_util::future::BoxFuture;

use super::{RabbitScan, RabbitSink, RabbitSource, probe_connect, probe_source};
use crate::broker::{BrokerError, Connector, Probe, Scan, Sink, Source, SourceProbe};
use crate::config::{BrokerSource, RabbitConfig, RabbitSource as SourceConfig, SourceOptions};
use crate::policy::backoff::RetryMode;

/// A `kind = "rabbitmq"` broker.
pub struct RabbitConnector {
    name: String,
    config: RabbitConfig,
}

impl RabbitConnector {
    /// The connector of broker `name`.
    pub fn new(name: &str, config: &RabbitConfig) -> Self {
        Self {
            name: name.to_owned(),
            config: config.clone(),
        }
    }
}

/// The queue settings of `source` (the defaults when it names none: config gives every source
/// on a RabbitMQ broker its settings, so that is only a source built by hand).
fn settings(source: &BrokerSource) -> SourceConfig {
    match &source.options {
        SourceOptions::RabbitMq(s) => s.clone(),
        _ => SourceConfig::default(),
    }
}

impl Connector for RabbitConnector {
    fn messaging_system(&self) -> &'static str {
        "rabbitmq"
    }

    fn source<'a>(
        &'a self,
        _route: &'a str,
        source: &'a BrokerSource,
        retry: RetryMode,
    ) -> BoxFuture<'a, Result<Box<dyn Source>, BrokerError>> {
        Box::pin(async move {
            let s = RabbitSource::new(&self.name, &self.config, &source.topic, &settings(source));
            Ok(Box::new(if retry == RetryMode::Broker {
                s.with_broker_retries()
            } else {
                s
            }) as Box<dyn Source>)
        })
    }

    fn sink(&self) -> BoxFuture<'_, Result<Arc<dyn Sink>, BrokerError>> {
        Box::pin(
            async move { Ok(Arc::new(RabbitSink::new(&self.name, &self.config)) as Arc<dyn Sink>) },
        )
    }

    fn replies<'a>(
        &'a self,
        _source: &'a BrokerSource,
    ) -> BoxFuture<'a, Result<Option<Arc<dyn Sink>>, BrokerError>> {
        Box::pin(async move {
            let sink = RabbitSink::replies(&self.name, &self.config);
            Ok(Some(Arc::new(sink) as Arc<dyn Sink>))
        })
    }

    fn scan<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Box<dyn Scan>, BrokerError>> {
        Box::pin(async move {
            Ok(Box::new(RabbitScan::open(&self.name, &self.config, topic).await?) as Box<dyn Scan>)
        })
    }

    fn probe<'a>(&'a self, sources: &'a [(&'a str, &'a BrokerSource)]) -> BoxFuture<'a, Probe> {
        Box::pin(async move {
            if let Err(e) = probe_connect(&self.name, &self.config).await {
                return Probe::unreachable(e);
            }
            let mut found = Probe::default();
            for (route, source) in sources {
                let outcome =
                    probe_source(&self.name, &self.config, &source.topic, &settings(source)).await;
                found.sources.push(SourceProbe {
                    route: (*route).to_owned(),
                    field: None,
                    outcome,
                });
            }
            found
        })
    }
}
