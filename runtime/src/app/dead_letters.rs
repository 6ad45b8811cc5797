//! The DLQs of a config ([`crate::telemetry::DeadLetterAccess`]), for the admin endpoint's
//! console and for `lockgate dlq`: the broker clients ([`Clients`]), opened on first use and
//! shared by every request. A reload gives the console's the new config
//! ([`ConfigDeadLetters::set_config`]).

use std::collections::HashSet;
use std::sync::Arc;

use futures_util::future::BoxFuture;

use super::clients::Clients;
use crate::broker::local::LocalBroker;
use crate::broker::{Scan, Sink};
use crate::config::{Config, DlqTarget};
use crate::dlq::{DlqRef, IoError};

/// The config's DLQs and the clients that read and write them.
pub struct ConfigDeadLetters {
    /// The config being served; each request reads the one it started with.
    config: std::sync::Mutex<Arc<Config>>,
    local: LocalBroker,
    clients: tokio::sync::Mutex<Clients>,
}

impl std::fmt::Debug for ConfigDeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigDeadLetters")
            .field("config", &self.config().file)
            .finish_non_exhaustive()
    }
}

impl ConfigDeadLetters {
    /// The DLQs of `config`, on `local` for the embedded broker's.
    pub fn new(config: Config, local: LocalBroker) -> Self {
        Self {
            config: std::sync::Mutex::new(Arc::new(config)),
            local,
            clients: tokio::sync::Mutex::new(Clients::default()),
        }
    }

    /// Serves `config` from now on (after a reload); clients are opened anew, since a broker's
    /// definition may have changed.
    pub async fn set_config(&self, config: Config) {
        let mut clients = self.clients.lock().await;
        *self
            .config
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(config);
        *clients = Clients::default();
    }

    /// The config being served.
    pub fn config(&self) -> Arc<Config> {
        self.config
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The DLQ of `config` that `dlq` names.
    fn target(config: &Config, dlq: &DlqRef) -> Result<DlqTarget, IoError> {
        config
            .routes
            .values()
            .map(|r| &r.dlq)
            .find(|d| dlq_ref(d) == *dlq)
            .cloned()
            .ok_or_else(|| format!("the DLQ {dlq} is not in the config").into())
    }
}

/// How the replay names a route's DLQ (as `lockgate dlq` does).
fn dlq_ref(dlq: &DlqTarget) -> DlqRef {
    DlqRef {
        broker: dlq.place(),
        topic: dlq.topic().to_owned(),
    }
}

impl crate::telemetry::DeadLetterAccess for ConfigDeadLetters {
    fn dlqs(&self, route: Option<&str>) -> Result<Vec<DlqRef>, String> {
        let config = self.config();
        if let Some(name) = route {
            return match config.routes.get(name) {
                Some(r) => Ok(vec![dlq_ref(&r.dlq)]),
                None => Err(format!(
                    "{}: no route {name:?} (routes: {})",
                    config.file.display(),
                    config.routes.keys().cloned().collect::<Vec<_>>().join(", ")
                )),
            };
        }
        let mut seen = HashSet::new();
        Ok(config
            .routes
            .values()
            .map(|r| dlq_ref(&r.dlq))
            .filter(|d| seen.insert(d.clone()))
            .collect())
    }

    fn scan<'a>(&'a self, dlq: &'a DlqRef) -> BoxFuture<'a, Result<Box<dyn Scan>, IoError>> {
        Box::pin(async move {
            let mut clients = self.clients.lock().await;
            let config = self.config();
            let target = Self::target(&config, dlq)?;
            Ok(clients.scan(&config, &self.local, &target).await?)
        })
    }

    fn marker_sink<'a>(&'a self, dlq: &'a DlqRef) -> BoxFuture<'a, Result<Arc<dyn Sink>, IoError>> {
        Box::pin(async move {
            let mut clients = self.clients.lock().await;
            let config = self.config();
            let target = Self::target(&config, dlq)?;
            Ok(clients.dlq_sink(&config, &self.local, &target).await?)
        })
    }

    fn feeder<'a>(&'a self, route: &'a str) -> BoxFuture<'a, Result<Arc<dyn Sink>, IoError>> {
        Box::pin(async move {
            let mut clients = self.clients.lock().await;
            let config = self.config();
            let Some(r) = config.routes.get(route) else {
                return Err(format!("route {route} is not in the config").into());
            };
            Ok(clients.feeder(&config, &self.local, r).await?)
        })
    }

    fn source_broker(&self, route: &str) -> Option<String> {
        self.config().routes.get(route).map(|r| r.source.place())
    }
}
