//! The state stores of a runtime: the embedded one, and each `[stores.<name>]` opened on first
//! use and watched for health.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{Config, EMBEDDED_STORE, StoreConfig, StoreKind};
use crate::health::HealthWatch;
use crate::state::probe::StoreMonitor;
use crate::state::{KvStore, PostgresStore, RedisStore, StateStore};

use super::error::StoreError;

/// The state stores routes use: the embedded one, and each `[stores.<name>]` opened on first use
/// (a reload that changes a store's table opens it anew), with a watch on its health.
pub struct Stores {
    embedded: StateStore,
    open: HashMap<String, (StoreConfig, StateStore, Option<PostgresStore>)>,
    monitors: HashMap<String, (StoreConfig, StoreMonitor)>,
}

impl Stores {
    /// Stores with `embedded` as the built-in one.
    pub fn new(embedded: Arc<dyn KvStore>) -> Self {
        Self {
            embedded: StateStore::local(EMBEDDED_STORE, embedded),
            open: HashMap::new(),
            monitors: HashMap::new(),
        }
    }

    /// The health of shared store `name` of `config`, watched from its first use (`None` for the
    /// embedded store, which has nothing to connect to).
    pub fn health(&mut self, config: &Config, name: &str) -> Option<HealthWatch> {
        let sc = config.stores.get(name)?;
        if let Some((c, m)) = self.monitors.get(name)
            && c == sc
        {
            return Some(m.health());
        }
        let url = sc.url().ok()?;
        let monitor = StoreMonitor::spawn(&url, &sc.kind);
        let health = monitor.health();
        self.monitors.insert(name.to_owned(), (sc.clone(), monitor));
        Some(health)
    }

    /// Stops watching stores `config` no longer defines.
    pub fn forget_removed(&mut self, config: &Config) {
        self.monitors
            .retain(|name, _| config.stores.contains_key(name));
    }

    /// The store named `name` in `config`.
    pub fn get(&mut self, config: &Config, name: &str) -> Result<StateStore, StoreError> {
        if name == EMBEDDED_STORE {
            return Ok(self.embedded.clone());
        }
        let Some(sc) = config.stores.get(name) else {
            return Err(StoreError::Undefined(name.to_owned()));
        };
        if let Some((c, s, _)) = self.open.get(name)
            && c == sc
        {
            return Ok(s.clone());
        }
        let url = sc.url().map_err(|error| StoreError::Url {
            store: name.to_owned(),
            error: Box::new(error),
        })?;
        let fail = |error| StoreError::Open {
            store: name.to_owned(),
            error,
        };
        let (store, pg) = match &sc.kind {
            StoreKind::Redis { prefix } => (
                StateStore::shared(name, Arc::new(RedisStore::new(&url, prefix).map_err(fail)?)),
                None,
            ),
            StoreKind::Postgres { schema, pool_size } => {
                let pg = PostgresStore::new(&url, schema, *pool_size).map_err(fail)?;
                (StateStore::shared(name, Arc::new(pg.clone())), Some(pg))
            }
        };
        self.open
            .insert(name.to_owned(), (sc.clone(), store.clone(), pg));
        Ok(store)
    }

    /// PostgreSQL store `name` of `config` itself, the one [`Self::get`] serves (a handler's
    /// `sql` commits in the same database, through the same tables, as its route's keys).
    pub fn postgres(&mut self, config: &Config, name: &str) -> Result<PostgresStore, StoreError> {
        self.get(config, name)?;
        self.open
            .get(name)
            .and_then(|(_, _, pg)| pg.clone())
            .ok_or_else(|| StoreError::NotPostgres(name.to_owned()))
    }
}

/// A PostgreSQL store of its own (with its own small pool of `pool_size`) on
/// `[stores.<store>]`, for a dead-letter table or an outbox relay.
pub fn postgres(
    config: &Config,
    store: &str,
    pool_size: usize,
) -> Result<PostgresStore, StoreError> {
    let Some(sc) = config.stores.get(store) else {
        return Err(StoreError::Undefined(store.to_owned()));
    };
    let StoreKind::Postgres { schema, .. } = &sc.kind else {
        return Err(StoreError::NotPostgres(store.to_owned()));
    };
    let url = sc.url().map_err(|error| StoreError::Url {
        store: store.to_owned(),
        error: Box::new(error),
    })?;
    PostgresStore::new(&url, schema, pool_size).map_err(|error| StoreError::Open {
        store: store.to_owned(),
        error,
    })
}
