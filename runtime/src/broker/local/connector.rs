//! The embedded broker as a [`Connector`]: everything it opens shares one [`LocalBroker`].

use std::sync::Arc;

use futures_util::future::BoxFuture;

use super::LocalBroker;
use crate::broker::{BrokerError, Connector, Probe, Scan, Sink, Source};
use crate::config::BrokerSource;
use crate::policy::backoff::RetryMode;

impl Connector for LocalBroker {
    fn messaging_system(&self) -> &'static str {
        "lockgate"
    }

    fn source<'a>(
        &'a self,
        _route: &'a str,
        source: &'a BrokerSource,
        _retry: RetryMode,
    ) -> BoxFuture<'a, Result<Box<dyn Source>, BrokerError>> {
        let opened = LocalBroker::source(self, &source.topic, &source.group);
        Box::pin(async move { Ok(Box::new(opened?) as Box<dyn Source>) })
    }

    fn sink(&self) -> BoxFuture<'_, Result<Arc<dyn Sink>, BrokerError>> {
        let sink = LocalBroker::sink(self);
        Box::pin(async move { Ok(Arc::new(sink) as Arc<dyn Sink>) })
    }

    fn scan<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<Box<dyn Scan>, BrokerError>> {
        let opened = LocalBroker::scan(self, topic);
        Box::pin(async move { Ok(Box::new(opened?) as Box<dyn Scan>) })
    }

    /// The embedded broker is files in the state directory: there is nothing to connect to.
    fn probe<'a>(&'a self, _sources: &'a [(&'a str, &'a BrokerSource)]) -> BoxFuture<'a, Probe> {
        Box::pin(async { Probe::default() })
    }
}
