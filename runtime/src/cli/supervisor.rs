//! The routes of `lockgate run` and their hot reload.
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
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use lockgate::broker::local::LocalBroker;
use lockgate::config::{
    Config, EMBEDDED_STORE, HandlerConfig, RouteConfig, StoreConfig, StoreKind,
};
use lockgate::engine::{Engine, Handler, HandlerEnv, HandlerLimits, InstancePool};
use lockgate::health::HealthWatch;
use lockgate::pipeline::idempotency::DoneKeys;
use lockgate::pipeline::{HandlerSlot, Route, RouteReport, RouteSinks, Shutdown, ShutdownTrigger};
use lockgate::pipeline::{Invoker, Passthrough};
use lockgate::state::probe::StoreMonitor;
use lockgate::state::{KvStore, PostgresStore, RedisStore, StateStore};
use lockgate::telemetry::{AdminRoutes, ReloadOutcome, RouteEntry};
use sha2::Digest as _;
use tokio::sync::mpsc;

use super::clients::Clients;

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

/// The state stores routes use: the embedded one, and each `[stores.<name>]` opened on first use
/// (a reload that changes a store's table opens it anew), with a watch on its health.
pub struct Stores {
    embedded: StateStore,
    open: HashMap<String, (StoreConfig, StateStore)>,
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
    pub fn get(&mut self, config: &Config, name: &str) -> Result<StateStore, String> {
        if name == EMBEDDED_STORE {
            return Ok(self.embedded.clone());
        }
        let Some(sc) = config.stores.get(name) else {
            return Err(format!("state store {name} is not defined"));
        };
        if let Some((c, s)) = self.open.get(name)
            && c == sc
        {
            return Ok(s.clone());
        }
        let url = sc.url()?;
        let fail = |e| format!("stores.{name}: {e}");
        let store = match &sc.kind {
            StoreKind::Redis { prefix } => {
                StateStore::shared(name, Arc::new(RedisStore::new(&url, prefix).map_err(fail)?))
            }
            StoreKind::Postgres { schema, pool_size } => StateStore::shared(
                name,
                Arc::new(PostgresStore::new(&url, schema, *pool_size).map_err(fail)?),
            ),
        };
        self.open
            .insert(name.to_owned(), (sc.clone(), store.clone()));
        Ok(store)
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
}

/// What a reload will do to one route.
enum Plan {
    Start(RouteConfig, Prepared),
    Restart(RouteConfig, Prepared, &'static str),
    Swap(RouteConfig, Prepared),
    Stop(String),
}

/// Owns the routes of `lockgate run`.
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
    next_generation: u64,
    /// Reports of routes that a reload stopped.
    pub stopped: Vec<RouteReport>,
}

impl Supervisor {
    /// A supervisor with no routes yet; `ended_tx` hears of every route task that ends.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Config,
        overrides: Overrides,
        engine: Engine,
        stores: Stores,
        broker: LocalBroker,
        admin: AdminRoutes,
        ended_tx: mpsc::UnboundedSender<(String, u64)>,
    ) -> Self {
        let grace = Duration::from_millis(config.shutdown_grace_ms);
        Self {
            config,
            overrides,
            engine,
            stores,
            broker,
            clients: Clients::default(),
            admin,
            grace,
            routes: BTreeMap::new(),
            ended_tx,
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

    /// Files whose change means a reload: the config and every module it names.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.config.file.clone()];
        for h in self.config.handlers.values() {
            if !files.contains(&h.module) {
                files.push(h.module.clone());
            }
        }
        files
    }

    /// Starts every route of the config (at process start).
    pub async fn start_all(&mut self) -> anyhow::Result<()> {
        let config = self.config.clone();
        for route in config.routes.values() {
            let store = self
                .stores
                .get(&config, config.store_of(route))
                .map_err(|e| anyhow::anyhow!("route {}: {e}", route.name))?;
            let prepared = prepare(&self.engine, store, &config, route)
                .await
                .map_err(anyhow::Error::msg)?;
            self.start(route, prepared).await?;
        }
        Ok(())
    }

    /// Whether `(name, generation)` is a route still meant to run (its end is a failure).
    pub fn is_current(&self, name: &str, generation: u64) -> bool {
        self.routes
            .get(name)
            .is_some_and(|r| r.generation == generation)
    }

    /// Takes a route that ended by itself out of the set; its report.
    pub async fn reap(&mut self, name: &str) -> Option<RouteReport> {
        let r = self.routes.remove(name)?;
        self.admin.remove(name);
        r.task.await.ok()
    }

    /// Stops every route (drains, commits) and returns their reports.
    pub async fn stop_all(&mut self) -> Vec<RouteReport> {
        for r in self.routes.values() {
            r.trigger.trigger();
        }
        let mut reports = std::mem::take(&mut self.stopped);
        for (_, r) in std::mem::take(&mut self.routes) {
            match r.task.await {
                Ok(report) => reports.push(report),
                Err(e) => tracing::error!(error = %e, "A route task failed"),
            }
        }
        reports
    }

    async fn start(&mut self, route: &RouteConfig, prepared: Prepared) -> anyhow::Result<()> {
        let module_hash = prepared.module_hash();
        let Prepared { handler, store } = prepared;
        let source = self
            .clients
            .source(&self.config, &self.broker, route)
            .await
            .with_context(|| format!("route {}: cannot open its source", route.name))?;
        println!(
            "{}",
            super::run::summary(route, &module_hash, &source.describe())
        );
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
            .with_context(|| format!("route {}: cannot create its output producer", route.name))?;
        let dlq = self
            .clients
            .sink(&self.config, &self.broker, &route.dlq.broker)
            .await
            .with_context(|| format!("route {}: cannot create its DLQ producer", route.name))?;
        let replies = self.clients.replies(&self.config, route).await?;
        let done_keys = route
            .idempotency
            .as_ref()
            .map(|i| DoneKeys::new(store.idempotency.clone(), &route.name, i.ttl, i.lease));
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
        .shutdown_grace(self.grace);
        // A route is ready only while the stores it writes to answer: its state store (for
        // idempotency keys and the handler's kv) and a dead-letter table.
        let uses_state = route.handler.is_some() || route.idempotency.is_some();
        if uses_state && let Some(h) = self.stores.health(&self.config, &store.name) {
            r.stats()
                .depend_on(format!("state store {}", store.name), h);
        }
        if let Some(dlq) = route.dlq.dlq_store()
            && let Some(h) = self.stores.health(&self.config, dlq)
        {
            r.stats().depend_on(format!("dead-letter store {dlq}"), h);
        }
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
                slot,
                trigger,
                task,
                generation,
            },
        );
        Ok(())
    }

    /// Drains and stops a route; its report is kept for the end-of-run summary.
    async fn stop(&mut self, name: &str) {
        let Some(r) = self.routes.remove(name) else {
            return;
        };
        r.trigger.trigger();
        self.admin.remove(name);
        match r.task.await {
            Ok(report) => {
                println!(
                    "route {name}: stopped by a reload ({})",
                    super::run::counts(&report)
                );
                self.stopped.push(report);
            }
            Err(e) => tracing::error!(route = name, error = %e, "A route task failed"),
        }
    }

    /// Reads the config and modules again and applies what changed (see the module docs).
    pub async fn reload(&mut self) -> ReloadOutcome {
        let outcome = match self.try_reload().await {
            Ok(changes) => ReloadOutcome {
                applied: true,
                changes,
                error: None,
            },
            Err(error) => ReloadOutcome {
                applied: false,
                changes: Vec::new(),
                error: Some(error),
            },
        };
        let counters = self.admin.reloads();
        if let Some(e) = &outcome.error {
            counters
                .refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(
                "Reload refused; the running routes and modules stay as they were: {e}"
            );
        } else if !outcome.changes.is_empty() {
            counters
                .applied
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            for c in &outcome.changes {
                tracing::info!("Reloaded: {c}");
            }
        }
        outcome
    }

    async fn try_reload(&mut self) -> Result<Vec<String>, String> {
        let mut new = Config::load(&self.config.file).map_err(|e| e.to_string())?;
        self.overrides.apply(&mut new);
        let mut notes = Vec::new();
        if new.state_dir != self.config.state_dir
            || new.admin != self.config.admin
            || new.admin_token_env != self.config.admin_token_env
            || new.engine != self.config.engine
            || new.shutdown_grace_ms != self.config.shutdown_grace_ms
            || new.watch != self.config.watch
        {
            notes.push("[runtime] and [engine] changes are not applied until a restart".to_owned());
        }
        let mut changed_brokers: Vec<String> = self
            .config
            .brokers
            .keys()
            .chain(new.brokers.keys())
            .filter(|n| self.config.brokers.get(*n) != new.brokers.get(*n))
            .cloned()
            .collect();
        // A changed store is a changed DLQ destination for routes that dead-letter into it.
        changed_brokers.extend(
            self.config
                .stores
                .keys()
                .chain(new.stores.keys())
                .filter(|n| self.config.stores.get(*n) != new.stores.get(*n))
                .map(|n| format!("{}{n}", lockgate::config::DLQ_STORE_PREFIX)),
        );

        // Everything that will run is loaded and instantiated before anything changes. A module
        // several routes use is read and hashed once.
        let mut modules: HashMap<PathBuf, (Vec<u8>, String)> = HashMap::new();
        let mut plans = Vec::new();
        for route in new.routes.values() {
            let module = match &route.handler {
                None => None,
                Some(name) => {
                    let Some(hc) = new.handlers.get(name) else {
                        return Err(format!(
                            "route {}: handler {name} is not defined",
                            route.name
                        ));
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
            let uses_changed_broker = [
                &route.source.broker,
                &route.dlq.broker,
                &route.outputs_broker,
            ]
            .iter()
            .any(|b| changed_brokers.contains(b));
            let store_name = new.store_of(route).to_owned();
            let store_key = (store_name.clone(), new.stores.get(&store_name).cloned());
            let store = self
                .stores
                .get(&new, &store_name)
                .map_err(|e| format!("route {}: {e}", route.name))?;
            let plan: fn(RouteConfig, Prepared) -> Plan = match self.routes.get(&route.name) {
                None => Plan::Start,
                Some(r) if r.config != *route => {
                    |r, p| Plan::Restart(r, p, "restart: its settings changed")
                }
                Some(_) if uses_changed_broker => {
                    |r, p| Plan::Restart(r, p, "restart: its broker changed")
                }
                Some(r) if r.store != store_key => {
                    |r, p| Plan::Restart(r, p, "restart: its state store changed")
                }
                Some(r)
                    if r.handler.as_ref() != module.as_ref().map(|m| m.0)
                        || module.as_ref().is_some_and(|m| r.module_hash != m.2) =>
                {
                    Plan::Swap
                }
                Some(_) => continue,
            };
            let prepared = match module {
                Some((hc, bytes, hash)) => {
                    prepare_bytes(&self.engine, store, route, hc, bytes, Some(hash)).await?
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
                    changes.push(format!("route {name}: removed (drained and stopped)"));
                }
                Plan::Restart(route, _, _) => self.stop(&route.name).await,
                _ => {}
            }
        }
        for name in &changed_brokers {
            self.clients.forget(name);
        }
        self.stores.forget_removed(&new);
        let old_config = std::mem::replace(&mut self.config, new);
        if self.config.local != old_config.local {
            // Read by every append and retention pass: applies at once, without restarts.
            self.broker.set_settings(self.config.local.clone());
            changes.push("[local] settings of the embedded broker applied".to_owned());
        }
        for plan in plans {
            match plan {
                Plan::Stop(_) => {}
                Plan::Start(route, prepared) => {
                    let hash = prepared.module_hash();
                    self.start(&route, prepared)
                        .await
                        .map_err(|e| format!("{e:#}"))?;
                    changes.push(format!("route {}: added ({})", route.name, short(&hash)));
                }
                Plan::Restart(route, prepared, why) => {
                    self.start(&route, prepared)
                        .await
                        .map_err(|e| format!("{e:#}"))?;
                    changes.push(format!("route {}: {why}", route.name));
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
                    let from =
                        std::mem::replace(&mut r.module_hash, handler.module_hash().to_owned());
                    r.slot.swap(Arc::new(InstancePool::new(
                        handler,
                        hc.isolation,
                        hc.max_messages_per_instance,
                    )));
                    changes.push(format!(
                        "route {}: handler {} {} -> {}",
                        route.name,
                        hc.name,
                        short(&from),
                        short(&r.module_hash)
                    ));
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

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

fn read_module(hc: &HandlerConfig) -> Result<Vec<u8>, String> {
    std::fs::read(&hc.module).map_err(|e| {
        format!(
            "handlers.{}: module {}: cannot read: {e}",
            hc.name,
            hc.module.display()
        )
    })
}

async fn prepare(
    engine: &Engine,
    store: StateStore,
    config: &Config,
    route: &RouteConfig,
) -> Result<Prepared, String> {
    let Some(name) = &route.handler else {
        return Ok(Prepared {
            handler: None,
            store,
        });
    };
    let Some(hc) = config.handlers.get(name) else {
        return Err(format!(
            "route {}: handler {name} is not defined",
            route.name
        ));
    };
    let bytes = read_module(hc)?;
    prepare_bytes(engine, store, route, hc, bytes, None).await
}

/// Compiles (or loads from the cache) and instantiates once, off the async threads.
async fn prepare_bytes(
    engine: &Engine,
    store: StateStore,
    route: &RouteConfig,
    hc: &HandlerConfig,
    bytes: Vec<u8>,
    hash: Option<String>,
) -> Result<Prepared, String> {
    let env = HandlerEnv {
        name: hc.name.clone(),
        config: hc.config.clone(),
        outputs: Some(route.outputs.iter().cloned().collect()),
        limits: HandlerLimits::from(hc),
        kv: store.kv.clone(),
    };
    let (engine, hc2) = (engine.clone(), hc.clone());
    let handler = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let h = match hash {
            Some(hash) => engine.load_handler_hashed(&hc2.module, &bytes, hash, env)?,
            None => engine.load_handler_bytes(&hc2.module, &bytes, env)?,
        };
        let loaded = started.elapsed();
        h.check_instantiate()?;
        tracing::debug!(
            handler = %hc2.name,
            from_cache = h.loaded_from_cache(),
            load_ms = loaded.as_secs_f64() * 1000.0,
            instantiate_ms = (started.elapsed() - loaded).as_secs_f64() * 1000.0,
            "Handler prepared"
        );
        Ok::<_, lockgate::engine::EngineError>(h)
    })
    .await
    .map_err(|e| format!("handlers.{}: loading task failed: {e}", hc.name))?
    .map_err(|e| format!("handlers.{}: {e}", hc.name))?;
    Ok(Prepared {
        handler: Some((handler, hc.clone())),
        store,
    })
}

/// What the watcher tells the run loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// A watched file was closed after writing or renamed into place: its content is complete.
    Complete,
    /// A watched file is being modified (or a backend without close events saw a change):
    /// reload once it has been quiet for [`DEBOUNCE`].
    InProgress,
}

/// Quiet time after the last in-progress change before a reload.
pub const DEBOUNCE: Duration = Duration::from_millis(300);

/// Watches `files` (their directories, so editors that replace a file by renaming are seen)
/// and reports changes on `tx`. Returns the watcher, which watches until dropped.
pub fn watch(
    files: &[PathBuf],
    mode: lockgate::config::WatchMode,
    tx: mpsc::UnboundedSender<Change>,
) -> anyhow::Result<Option<Box<dyn notify::Watcher + Send>>> {
    use notify::event::{AccessKind, AccessMode, ModifyKind};
    use notify::{EventKind, RecursiveMode, Watcher};

    if mode == lockgate::config::WatchMode::Off {
        return Ok(None);
    }
    // Directory -> file names in it that matter.
    let mut dirs: HashMap<PathBuf, Vec<std::ffi::OsString>> = HashMap::new();
    for f in files {
        let dir = f
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
        if let Some(name) = f.file_name() {
            dirs.entry(dir).or_default().push(name.to_owned());
        }
    }
    let wanted = dirs.clone();
    let handler = move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else { return };
        let relevant = event.paths.iter().any(|p| {
            let (Some(dir), Some(name)) = (p.parent(), p.file_name()) else {
                return false;
            };
            wanted
                .get(dir)
                .is_some_and(|names| names.iter().any(|n| n == name))
        });
        if !relevant {
            return;
        }
        let change = match event.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(ModifyKind::Name(_)) => Change::Complete,
            EventKind::Access(_) | EventKind::Remove(_) => return,
            _ => Change::InProgress,
        };
        let _ = tx.send(change);
    };
    // Polling compares contents (its timestamps have whole-second resolution, so two writes in
    // one second would look alike) and watches the files themselves, not every file of their
    // directories.
    let poll = |handler| -> anyhow::Result<Box<dyn notify::Watcher + Send>> {
        let mut w = notify::PollWatcher::new(
            handler,
            notify::Config::default()
                .with_poll_interval(Duration::from_millis(500))
                .with_compare_contents(true),
        )?;
        for f in files {
            let f = f.canonicalize().unwrap_or_else(|_| f.clone());
            w.watch(&f, RecursiveMode::NonRecursive)
                .with_context(|| format!("cannot watch {}", f.display()))?;
        }
        Ok(Box::new(w))
    };
    if mode == lockgate::config::WatchMode::Poll {
        return poll(handler).map(Some);
    }
    let mut watcher = match notify::RecommendedWatcher::new(
        handler.clone(),
        notify::Config::default(),
    ) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "File events are unavailable; polling every 500 ms instead");
            return poll(handler).map(Some);
        }
    };
    for dir in dirs.keys() {
        watcher
            .watch(dir, RecursiveMode::NonRecursive)
            .with_context(|| format!("cannot watch {}", dir.display()))?;
    }
    let watcher: Box<dyn notify::Watcher + Send> = Box::new(watcher);
    Ok(Some(watcher))
}
