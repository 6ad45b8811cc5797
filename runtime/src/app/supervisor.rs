//! The routes of a runtime and their hot reload: one diff from the config being served to a new
//! one, used both at start (from an empty config) and by every reload.
//!
//! A reload (file change, SIGHUP or `POST /reload`) reads runtime.toml and every handler module
//! again and reconciles: routes whose settings are unchanged but whose module (or handler table)
//! changed get the new version swapped into their [`HandlerSlot`] (messages already started finish
//! on the old one); routes whose own settings or brokers changed are drained and restarted; new
//! routes start; removed routes drain, commit and stop. Everything new is compiled and
//! instantiated once *before* anything changes: a config with a problem, or a module that is
//! truncated, not a component, of the wrong world or trapping at start, refuses the whole reload
//! and the old state keeps serving.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sha2::Digest as _;
use tokio::sync::mpsc;

use crate::broker::local::LocalBroker;
use crate::config::ResolvedHandler;
use crate::config::{Config, HandlerConfig, RouteConfig, StoreConfig};
use crate::engine::outbound::Outbound;
use crate::engine::{Engine, Handler, HandlerEnv, HandlerLimits, InstancePool, SqlGrant};
use crate::pipeline::idempotency::DoneKeys;
use crate::pipeline::{HandlerSlot, Route, RouteReport, RouteSinks, Shutdown, ShutdownTrigger};
use crate::pipeline::{Invoker, Passthrough};
use crate::state::StateStore;
use crate::telemetry::{AdminRoutes, RouteEntry};

use super::clients::Clients;
use super::error::{ClientError, ReloadError};
use super::events::{Event, RestartReason, RouteChange, StopCause, summary};
use super::stores::Stores;

/// Settings given on the command line, which a reloaded file does not override.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--admin`.
    pub admin: Option<String>,
}

impl Overrides {
    /// Applies the overrides to a freshly loaded config.
    pub fn apply(&self, config: &mut Config) {
        if let Some(d) = &self.state_dir {
            config.state_dir.clone_from(d);
        }
        if let Some(a) = &self.admin {
            config.admin = Some(a.clone());
        }
    }
}

/// A running route.
struct Running {
    config: RouteConfig,
    /// Its state store's name and table (a change restarts the route).
    store: (String, Option<StoreConfig>),
    /// `None` for a relay that publishes rows as written.
    handler: Option<HandlerConfig>,
    module_hash: String,
    /// The values its handler version was given (`config`, `env`, `files`), to swap in a new
    /// version when a reload reads different ones (a rotated secret).
    resolved: Option<ResolvedHandler>,
    slot: HandlerSlot,
    trigger: ShutdownTrigger,
    task: tokio::task::JoinHandle<RouteReport>,
    generation: u64,
}

/// A handler loaded and instantiated once, ready to serve a route (`None`: a relay without
/// one).
struct Prepared {
    handler: Option<(Handler, HandlerConfig)>,
    store: StateStore,
}

impl Prepared {
    fn module_hash(&self) -> String {
        self.handler
            .as_ref()
            .map(|(h, _)| h.module_hash().to_owned())
            .unwrap_or_default()
    }

    /// The values the handler version was given.
    fn resolved(&self) -> Option<ResolvedHandler> {
        self.handler.as_ref().map(|(h, _)| ResolvedHandler {
            config: h.env().config.clone(),
            wasi: h.env().wasi.clone(),
        })
    }
}

/// What a reload will do to one route.
enum Plan {
    Start(RouteConfig, Prepared),
    Restart(RouteConfig, Prepared, RestartReason),
    Swap(RouteConfig, Prepared),
    Stop(String),
}

/// The config of `config`'s process with nothing in it: no routes, handlers, brokers or stores,
/// the same runtime settings. Starting is applying a config to this.
fn empty_like(config: &Config) -> Config {
    let mut empty = config.clone();
    empty.routes.clear();
    empty.handlers.clear();
    empty.brokers.clear();
    empty.stores.clear();
    empty
}

/// Owns the running routes, the clients and stores they share, and applies configs to them.
pub struct Supervisor {
    config: Config,
    overrides: Overrides,
    engine: Engine,
    stores: Stores,
    broker: LocalBroker,
    clients: Clients,
    admin: AdminRoutes,
    grace: Duration,
    routes: BTreeMap<String, Running>,
    ended_tx: mpsc::UnboundedSender<(String, u64)>,
    events: mpsc::UnboundedSender<Event>,
    next_generation: u64,
    /// Reports of routes that a reload stopped, for the end of the run.
    stopped: Vec<Arc<RouteReport>>,
}

/// What a supervisor needs besides its config.
pub struct Parts {
    /// Settings from the command line that a reloaded file does not override.
    pub overrides: Overrides,
    /// The engine handlers are compiled with.
    pub engine: Engine,
    /// The state stores.
    pub stores: Stores,
    /// The embedded broker.
    pub broker: LocalBroker,
    /// The routes the admin endpoint reports on.
    pub admin: AdminRoutes,
    /// Hears of every route task that ends (name and generation).
    pub ended_tx: mpsc::UnboundedSender<(String, u64)>,
    /// Where events go.
    pub events: mpsc::UnboundedSender<Event>,
}

impl Supervisor {
    /// A supervisor running nothing yet, for `config`'s process; [`Self::apply`] `config` to
    /// start its routes.
    pub fn new(config: &Config, parts: Parts) -> Self {
        Self {
            config: empty_like(config),
            overrides: parts.overrides,
            engine: parts.engine,
            stores: parts.stores,
            broker: parts.broker,
            clients: Clients::default(),
            admin: parts.admin,
            grace: Duration::from_millis(config.shutdown_grace_ms),
            routes: BTreeMap::new(),
            ended_tx: parts.ended_tx,
            events: parts.events,
            next_generation: 0,
            stopped: Vec::new(),
        }
    }

    /// The config being served.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Number of running routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Whether no route runs.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Files whose change means a reload: the config and every module it names.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        super::watch::watched_files(&self.config)
    }

    /// Whether `(name, generation)` is a route still meant to run (its end is a failure).
    pub fn is_current(&self, name: &str, generation: u64) -> bool {
        self.routes
            .get(name)
            .is_some_and(|r| r.generation == generation)
    }

    /// Takes a route that ended by itself out of the set; its report.
    pub async fn reap(&mut self, name: &str) -> Option<Arc<RouteReport>> {
        let r = self.routes.remove(name)?;
        self.admin.remove(name);
        let report = Arc::new(r.task.await.ok()?);
        self.emit(Event::RouteStopped {
            report: report.clone(),
            cause: StopCause::SourceFailed,
        });
        Some(report)
    }

    /// Stops every route (drains, commits) and returns the reports of every route stopped
    /// since the start, those a reload stopped first. The routes stay on the admin endpoint:
    /// `/readyz` and `/metrics` show them draining, and the last OTLP metrics export, after
    /// this, has their final counts.
    pub async fn stop_all(&mut self) -> Vec<Arc<RouteReport>> {
        for r in self.routes.values() {
            r.trigger.trigger();
        }
        let mut reports = std::mem::take(&mut self.stopped);
        for (name, r) in std::mem::take(&mut self.routes) {
            match r.task.await {
                Ok(report) => {
                    let report = Arc::new(report);
                    self.emit(Event::RouteStopped {
                        report: report.clone(),
                        cause: StopCause::Shutdown,
                    });
                    reports.push(report);
                }
                Err(e) => tracing::error!(route = %name, error = %e, "A route task failed"),
            }
        }
        reports
    }

    fn emit(&self, event: Event) {
        // Nobody listening is fine: events inform, they do not steer.
        let _ = self.events.send(event);
    }

    async fn start(&mut self, route: &RouteConfig, prepared: Prepared) -> Result<(), ReloadError> {
        let fail = |what: &'static str| {
            move |error: ClientError| ReloadError::Start {
                route: route.name.clone(),
                what,
                error,
            }
        };
        let module_hash = prepared.module_hash();
        let resolved = prepared.resolved();
        let Prepared { handler, store } = prepared;
        let source = self
            .clients
            .source(&self.config, &self.broker, route)
            .await
            .map_err(fail("open its source"))?;
        let (invoker, config): (Arc<dyn Invoker>, _) = match handler {
            Some((handler, config)) => (
                Arc::new(InstancePool::new(
                    handler,
                    config.isolation,
                    config.max_messages_per_instance,
                )),
                Some(config),
            ),
            None => (Arc::new(Passthrough), None),
        };
        let outputs = self
            .clients
            .sink(&self.config, &self.broker, &route.outputs_broker)
            .await
            .map_err(fail("create its output producer"))?;
        let dlq = self
            .clients
            .dlq_sink(&self.config, &self.broker, &route.dlq)
            .await
            .map_err(fail("create its DLQ producer"))?;
        let replies = self
            .clients
            .replies(&self.config, &self.broker, route)
            .await
            .map_err(fail("create its reply producer"))?;
        let done_keys = route
            .idempotency
            .as_ref()
            .map(|i| DoneKeys::new(store.idempotency.clone(), &route.name, i.ttl, i.lease));
        // The traces' `messaging.system`: the source's broker kind (an outbox relay reads
        // PostgreSQL).
        let system = match route.source.as_broker() {
            Some(b) => self
                .clients
                .connector(&self.config, &self.broker, &b.broker)
                .map_err(fail("open its source"))?
                .messaging_system(),
            None => "postgresql",
        };
        let r = Route::new(
            route.clone(),
            invoker,
            RouteSinks {
                outputs,
                dlq,
                replies,
            },
            done_keys,
        )
        .shutdown_grace(self.grace)
        .messaging_system(system);
        // A route is ready only while the stores it writes to answer: its state store (for
        // idempotency keys and the handler's kv) and a dead-letter table.
        let uses_state = route.handler.is_some() || route.idempotency.is_some();
        if uses_state && let Some(h) = self.stores.health(&self.config, &store.name) {
            r.stats()
                .depend_on(format!("state store {}", store.name), h);
        }
        if let Some(dlq) = route.dlq.store()
            && let Some(h) = self.stores.health(&self.config, dlq)
        {
            r.stats().depend_on(format!("dead-letter store {dlq}"), h);
        }
        self.emit(Event::RouteStarted {
            route: route.name.clone(),
            summary: summary(route, &module_hash, &source.describe()),
        });
        let slot = r.handler_slot();
        self.admin.add(RouteEntry {
            route: route.name.clone(),
            handler: route.handler.clone().unwrap_or_else(|| "-".to_owned()),
            slot: slot.clone(),
            stats: r.stats(),
            lag: source.lag(),
        });
        let (trigger, shutdown) = Shutdown::new();
        self.next_generation += 1;
        let generation = self.next_generation;
        let ended = self.ended_tx.clone();
        let name = route.name.clone();
        let task = tokio::spawn(async move {
            let report = r.run(source, shutdown).await;
            let _ = ended.send((name, generation));
            report
        });
        self.routes.insert(
            route.name.clone(),
            Running {
                config: route.clone(),
                store: (
                    store.name.clone(),
                    self.config.stores.get(&store.name).cloned(),
                ),
                handler: config,
                module_hash,
                resolved,
                slot,
                trigger,
                task,
                generation,
            },
        );
        Ok(())
    }

    /// Drains and stops a route; its report goes out as an event.
    async fn stop(&mut self, name: &str) {
        let Some(r) = self.routes.remove(name) else {
            return;
        };
        r.trigger.trigger();
        self.admin.remove(name);
        match r.task.await {
            Ok(report) => {
                let report = Arc::new(report);
                self.stopped.push(report.clone());
                self.emit(Event::RouteStopped {
                    report,
                    cause: StopCause::Reload,
                });
            }
            Err(e) => tracing::error!(route = name, error = %e, "A route task failed"),
        }
    }

    /// Reads the config file and modules again and applies what changed (see the module docs).
    pub async fn reload(&mut self) -> Result<Vec<RouteChange>, Arc<ReloadError>> {
        let outcome = match Config::load(&self.config.file) {
            Ok(mut new) => {
                self.overrides.apply(&mut new);
                self.apply(new).await
            }
            Err(e) => Err(ReloadError::from(e)),
        };
        let counters = self.admin.reloads();
        match outcome {
            Err(e) => {
                counters
                    .refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(
                    "Reload refused; the running routes and modules stay as they were: {e}"
                );
                self.admin.record_reload(crate::telemetry::ReloadRecord {
                    at_ms: crate::message::now_ms(),
                    applied: false,
                    changes: Vec::new(),
                    error: Some(e.to_string()),
                });
                let e = Arc::new(e);
                self.emit(Event::ReloadRefused { error: e.clone() });
                Err(e)
            }
            Ok(changes) => {
                if !changes.is_empty() {
                    counters
                        .applied
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    for c in &changes {
                        tracing::info!("Reloaded: {c}");
                    }
                    self.admin.record_reload(crate::telemetry::ReloadRecord {
                        at_ms: crate::message::now_ms(),
                        applied: true,
                        changes: changes.iter().map(ToString::to_string).collect(),
                        error: None,
                    });
                    self.emit(Event::Reloaded {
                        changes: changes.clone(),
                    });
                }
                Ok(changes)
            }
        }
    }

    /// Makes `new` the config being served: the one diff of start and reload. At start the
    /// config being served is empty, so every route of `new` is a [`RouteChange::Added`].
    pub async fn apply(&mut self, new: Config) -> Result<Vec<RouteChange>, ReloadError> {
        let mut notes = Vec::new();
        if new.state_dir != self.config.state_dir
            || new.admin != self.config.admin
            || new.admin_token != self.config.admin_token
            || new.engine != self.config.engine
            || new.shutdown_grace_ms != self.config.shutdown_grace_ms
            || new.watch != self.config.watch
        {
            notes.push(RouteChange::NeedsRestart);
        }
        let changed_brokers = changed(&self.config.brokers, &new.brokers);
        // A changed store is a changed source or DLQ destination for routes that relay its
        // outbox or dead-letter into its table.
        let changed_stores = changed(&self.config.stores, &new.stores);

        // Everything that will run is loaded and instantiated before anything changes. A module
        // several routes use is read and hashed once.
        let mut modules: HashMap<PathBuf, (Vec<u8>, String)> = HashMap::new();
        let mut plans = Vec::new();
        for route in new.routes.values() {
            let module = match &route.handler {
                None => None,
                Some(name) => {
                    let Some(hc) = new.handlers.get(name) else {
                        return Err(ReloadError::UndefinedHandler {
                            route: route.name.clone(),
                            handler: name.clone(),
                        });
                    };
                    let (bytes, hash) = match modules.get(&hc.module) {
                        Some(m) => m.clone(),
                        None => {
                            let bytes = read_module(hc)?;
                            let hash = hex::encode(sha2::Sha256::digest(&bytes));
                            modules.insert(hc.module.clone(), (bytes.clone(), hash.clone()));
                            (bytes, hash)
                        }
                    };
                    Some((hc, bytes, hash))
                }
            };
            // Read at every reload, so a rotated secret or a changed variable reaches the guest.
            let resolved = match &module {
                None => None,
                Some((hc, _, _)) => {
                    Some(
                        hc.resolve(&new.file)
                            .map_err(|errors| ReloadError::Grants {
                                handler: hc.name.clone(),
                                errors,
                            })?,
                    )
                }
            };
            let uses_changed_broker = changed_brokers.iter().any(|b| route.uses_broker(b))
                || changed_stores.iter().any(|s| route.uses_store_tables(s));
            let store_name = new.store_of(route).to_owned();
            let store_key = (store_name.clone(), new.stores.get(&store_name).cloned());
            let store = self
                .stores
                .get(&new, &store_name)
                .map_err(|error| ReloadError::Store {
                    route: route.name.clone(),
                    error,
                })?;
            let plan: fn(RouteConfig, Prepared) -> Plan = match self.routes.get(&route.name) {
                None => Plan::Start,
                Some(r) if r.config != *route => {
                    |r, p| Plan::Restart(r, p, RestartReason::Settings)
                }
                Some(_) if uses_changed_broker => |r, p| Plan::Restart(r, p, RestartReason::Broker),
                Some(r) if r.store != store_key => {
                    |r, p| Plan::Restart(r, p, RestartReason::StateStore)
                }
                Some(r)
                    if r.handler.as_ref() != module.as_ref().map(|m| m.0)
                        || module.as_ref().is_some_and(|m| r.module_hash != m.2)
                        || r.resolved != resolved =>
                {
                    Plan::Swap
                }
                Some(_) => continue,
            };
            let prepared = match module {
                Some((hc, bytes, hash)) => {
                    let resolved = resolved.unwrap_or_default();
                    let sql = match &hc.sql {
                        None => None,
                        Some(g) => Some(SqlGrant {
                            store_name: g.store.clone(),
                            store: self.stores.postgres(&new, &g.store).map_err(|error| {
                                ReloadError::Store {
                                    route: route.name.clone(),
                                    error,
                                }
                            })?,
                            role: g.role.clone(),
                            max_rows: g.max_rows,
                            max_result_bytes: g.max_result_bytes,
                        }),
                    };
                    prepare(&self.engine, store, route, hc, resolved, sql, bytes, hash).await?
                }
                None => Prepared {
                    handler: None,
                    store,
                },
            };
            plans.push(plan(route.clone(), prepared));
        }
        for name in self.routes.keys() {
            if !new.routes.contains_key(name) {
                plans.push(Plan::Stop(name.clone()));
            }
        }

        // Apply: stop what goes away or restarts (drained, committed), then start and swap.
        let mut changes = Vec::new();
        for plan in &plans {
            match plan {
                Plan::Stop(name) => {
                    self.stop(name).await;
                    changes.push(RouteChange::Removed {
                        route: name.clone(),
                    });
                }
                Plan::Restart(route, _, _) => self.stop(&route.name).await,
                _ => {}
            }
        }
        for name in &changed_brokers {
            self.clients.forget_broker(name);
        }
        for name in &changed_stores {
            self.clients.forget_store(name);
        }
        self.stores.forget_removed(&new);
        let old_config = std::mem::replace(&mut self.config, new);
        let (local, old_local) = (&self.config.local, &old_config.local);
        if local != old_local {
            // Read by every append and retention pass: applies at once, without restarts.
            self.broker.set_settings(local.clone());
            // The DLQ topics follow the routes; only what `[local]` says is news to the user.
            if (&local.defaults, &local.topics) != (&old_local.defaults, &old_local.topics) {
                changes.push(RouteChange::LocalSettings);
            }
        }
        for plan in plans {
            match plan {
                Plan::Stop(_) => {}
                Plan::Start(route, prepared) => {
                    let module_hash = prepared.module_hash();
                    self.start(&route, prepared).await?;
                    changes.push(RouteChange::Added {
                        route: route.name.clone(),
                        module_hash,
                    });
                }
                Plan::Restart(route, prepared, why) => {
                    self.start(&route, prepared).await?;
                    changes.push(RouteChange::Restarted {
                        route: route.name.clone(),
                        why,
                    });
                }
                Plan::Swap(route, prepared) => {
                    let Some(r) = self.routes.get_mut(&route.name) else {
                        continue;
                    };
                    // A change between "no handler" and a handler changes the route's config,
                    // which restarts it: a swap always has one.
                    let Some((handler, hc)) = prepared.handler else {
                        continue;
                    };
                    r.resolved = Some(ResolvedHandler {
                        config: handler.env().config.clone(),
                        wasi: handler.env().wasi.clone(),
                    });
                    let from =
                        std::mem::replace(&mut r.module_hash, handler.module_hash().to_owned());
                    r.slot.swap(Arc::new(InstancePool::new(
                        handler,
                        hc.isolation,
                        hc.max_messages_per_instance,
                    )));
                    changes.push(RouteChange::Swapped {
                        route: route.name.clone(),
                        handler: hc.name.clone(),
                        from,
                        to: r.module_hash.clone(),
                    });
                    r.handler = Some(hc);
                }
            }
        }
        drop(old_config);
        if !changes.is_empty() {
            changes.extend(notes);
        }
        Ok(changes)
    }
}

fn read_module(hc: &HandlerConfig) -> Result<Vec<u8>, ReloadError> {
    std::fs::read(&hc.module).map_err(|error| ReloadError::ModuleUnreadable {
        handler: hc.name.clone(),
        path: hc.module.clone(),
        error,
    })
}

/// Compiles (or loads from the cache) and instantiates once, off the async threads.
#[allow(clippy::too_many_arguments)]
async fn prepare(
    engine: &Engine,
    store: StateStore,
    route: &RouteConfig,
    hc: &HandlerConfig,
    resolved: ResolvedHandler,
    sql: Option<SqlGrant>,
    bytes: Vec<u8>,
    hash: String,
) -> Result<Prepared, ReloadError> {
    let env = HandlerEnv {
        name: hc.name.clone(),
        config: resolved.config,
        outputs: Some(route.outputs.iter().cloned().collect()),
        limits: HandlerLimits::from(hc),
        kv: store.kv.clone(),
        http: match hc.http.clone() {
            None => None,
            Some(grant) => Some(Arc::new(Outbound::new(grant).map_err(|error| {
                ReloadError::Http {
                    handler: hc.name.clone(),
                    error,
                }
            })?)),
        },
        sql,
        wasi: resolved.wasi,
    };
    let (engine, hc2) = (engine.clone(), hc.clone());
    let handler = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let h = engine.load_handler_hashed(&hc2.module, &bytes, hash, env)?;
        let loaded = started.elapsed();
        h.check_instantiate()?;
        tracing::debug!(
            handler = %hc2.name,
            from_cache = h.loaded_from_cache(),
            load_ms = loaded.as_secs_f64() * 1000.0,
            instantiate_ms = (started.elapsed() - loaded).as_secs_f64() * 1000.0,
            "Handler prepared"
        );
        Ok::<_, crate::engine::EngineError>(h)
    })
    .await
    .map_err(|e| ReloadError::LoadTask {
        handler: hc.name.clone(),
        error: e.to_string(),
    })?
    .map_err(|error| ReloadError::Handler {
        handler: hc.name.clone(),
        error,
    })?;
    Ok(Prepared {
        handler: Some((handler, hc.clone())),
        store,
    })
}

/// The names defined differently in `old` and `new`, or in only one of them.
fn changed<V: PartialEq>(
    old: &toml::map::Map<String, V>,
    new: &toml::map::Map<String, V>,
) -> Vec<String> {
    old.keys()
        .chain(new.keys())
        .filter(|n| old.get(*n) != new.get(*n))
        .cloned()
        .collect()
}
