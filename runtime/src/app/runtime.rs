//! [`Runtime`]: the handle of a running set of routes, and the loop that serves it (reloads on
//! file changes and admin requests, stops when asked or when a route's source fails for good).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::broker::local::LocalBroker;
use crate::config::Config;
use crate::engine::{Engine, EngineSettings};
use crate::pipeline::{RouteReport, Shutdown, ShutdownTrigger};
use crate::state::{EmbeddedStore, KvStore};
use crate::telemetry::{AdminControl, AdminRoutes, ReloadOutcome, ReloadRequest, RouteEntry};

use super::error::{ReloadError, StartError};
use super::events::{Event, RouteChange};
use super::stores::Stores;
use super::supervisor::{Overrides, Parts, Supervisor};
use super::watch::{DEBOUNCE, FileChange, watch, watched_files};

/// File name of the embedded state store (guest kv and idempotency keys) in the state directory.
pub const STATE_FILE: &str = "state.redb";
/// Directory of the embedded broker in the state directory.
pub const LOCAL_BROKER_DIR: &str = "local";

/// What a reload returns: the changes, or why it was refused.
pub type ReloadResult = Result<Vec<RouteChange>, Arc<ReloadError>>;

enum Command {
    Reload(oneshot::Sender<ReloadResult>),
    Stop,
}

/// How a runtime ended.
#[derive(Debug, Default)]
pub struct RunEnd {
    /// The report of every route that ran: those a reload stopped, then those stopped at the
    /// end (or whose source failed).
    pub reports: Vec<Arc<RouteReport>>,
}

impl RunEnd {
    /// Whether a route's source failed (the run did not end because it was asked to).
    pub fn failed(&self) -> bool {
        self.reports.iter().any(|r| r.error.is_some())
    }
}

/// Builds a [`Runtime`] from a loaded config.
pub struct RuntimeBuilder {
    config: Config,
    overrides: Overrides,
    events: Option<mpsc::UnboundedSender<Event>>,
}

impl RuntimeBuilder {
    /// Keeps the embedded broker, state store and compiled cache in `dir` instead of the
    /// config's `[runtime] state_dir`, also after a reload.
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.overrides.state_dir = Some(dir.into());
        self
    }

    /// Serves the admin endpoint on `addr` (`ip:port`, port 0 picks one) instead of the
    /// config's `[runtime] admin`, also after a reload.
    pub fn admin(mut self, addr: impl Into<String>) -> Self {
        self.overrides.admin = Some(addr.into());
        self
    }

    /// Sends every [`Event`] to `tx`, from the first (events of the start are buffered there,
    /// so a caller sees them even when [`Self::start`] fails).
    pub fn events(mut self, tx: mpsc::UnboundedSender<Event>) -> Self {
        self.events = Some(tx);
        self
    }

    /// Opens the state directory, the embedded broker and store, the admin endpoint, and
    /// starts every route: the same checks as a reload, applied to an empty runtime. Needs a
    /// tokio runtime with time and I/O enabled.
    pub async fn start(self) -> Result<Runtime, StartError> {
        let Self {
            mut config,
            overrides,
            events,
        } = self;
        overrides.apply(&mut config);
        let events = events.unwrap_or_else(|| mpsc::unbounded_channel().0);
        let engine = Engine::new(&EngineSettings::from(&config)).map_err(StartError::Engine)?;
        std::fs::create_dir_all(&config.state_dir).map_err(|error| StartError::StateDir {
            path: config.state_dir.clone(),
            error,
        })?;
        let state_path = config.state_dir.join(STATE_FILE);
        let store: Arc<dyn KvStore> = Arc::new(EmbeddedStore::open(&state_path).map_err(
            |error| StartError::StateStore {
                path: state_path.clone(),
                error,
            },
        )?);
        // This process is the one that applies the embedded broker's retention (see
        // `crate::broker::local`): it owns the state directory and knows the DLQ topics.
        let broker = LocalBroker::open(&config.state_dir.join(LOCAL_BROKER_DIR))
            .map_err(StartError::LocalBroker)?
            .with_settings(config.local.clone())
            .with_retention(true);
        let (trigger, shutdown) = Shutdown::new();
        {
            let (broker, stop) = (broker.clone(), shutdown.clone());
            tokio::spawn(async move { broker.run_retention(stop.wait()).await });
        }
        let admin_routes = AdminRoutes::default();
        // The metrics export reads the same routes as /metrics; it ends after they drained
        // (`Serve::run`), so its last export has the final counts.
        let metrics_export = match &config.telemetry.otlp {
            Some(o) => crate::telemetry::otlp_metrics::start(o, admin_routes.clone())
                .map_err(StartError::Otlp)?,
            None => None,
        };
        let (reload_tx, reload_rx) = mpsc::unbounded_channel::<ReloadRequest>();
        let mut admin_addr = None;
        let mut dead_letters = None;
        if let Some(addr) = &config.admin {
            let (listener, local) =
                crate::telemetry::bind(addr)
                    .await
                    .map_err(|error| StartError::AdminBind {
                        addr: addr.clone(),
                        error,
                    })?;
            let token = match &config.admin_token {
                Some(secret) => Some(secret.resolve().map_err(StartError::AdminToken)?),
                None => None,
            };
            let _ = events.send(Event::AdminListening { addr: local });
            admin_addr = Some(local);
            let control = AdminControl {
                reload: reload_tx,
                token,
                loopback: local.ip().is_loopback(),
                dead_letters: Some(
                    dead_letters
                        .insert(Arc::new(super::dead_letters::ConfigDeadLetters::new(
                            config.clone(),
                            broker.clone(),
                        )))
                        .clone(),
                ),
            };
            let stop = shutdown.clone();
            let admin = admin_routes.clone();
            tokio::spawn(async move {
                if let Err(e) =
                    crate::telemetry::serve(listener, admin, Some(control), async move {
                        stop.wait().await
                    })
                    .await
                {
                    tracing::error!(error = %e, "The admin endpoint failed");
                }
            });
        }
        let (ended_tx, ended_rx) = mpsc::unbounded_channel();
        let grace = Duration::from_millis(config.shutdown_grace_ms);
        let mut sup = Supervisor::new(
            &config,
            Parts {
                overrides,
                engine,
                stores: Stores::new(store),
                broker,
                admin: admin_routes.clone(),
                ended_tx,
                events: events.clone(),
            },
        );
        // Watch before loading, so a change made while the modules compile is not missed.
        let (change_tx, change_rx) = mpsc::unbounded_channel();
        let watcher = start_watching(&watched_files(&config), &config, &change_tx);
        if let Err(e) = sup.apply(config).await {
            trigger.trigger();
            sup.stop_all().await;
            return Err(e.into());
        }
        let route_count = sup.len();
        let _ = events.send(Event::Started {
            routes: route_count,
            grace,
        });
        let (commands_tx, commands_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(
            Serve {
                sup,
                commands: commands_rx,
                ended: ended_rx,
                admin_reloads: reload_rx,
                changes: change_rx,
                change_tx,
                watcher,
                trigger,
                dead_letters,
                metrics_export,
            }
            .run(),
        );
        Ok(Runtime {
            control: RuntimeControl { tx: commands_tx },
            task: Some(task),
            admin_addr,
            admin_routes,
            route_count,
        })
    }
}

/// Asks a running [`Runtime`] to reload or stop, from anywhere (a signal handler, a test).
#[derive(Clone, Debug)]
pub struct RuntimeControl {
    tx: mpsc::UnboundedSender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Reload(_) => "Reload",
            Self::Stop => "Stop",
        })
    }
}

impl RuntimeControl {
    /// Reads runtime.toml and every module again and applies what changed; the changes, or
    /// why nothing changed.
    pub async fn reload(&self) -> ReloadResult {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Reload(tx)).is_err() {
            return Err(Arc::new(ReloadError::Stopped));
        }
        rx.await.unwrap_or(Err(Arc::new(ReloadError::Stopped)))
    }

    /// Asks the runtime to drain and stop its routes; [`Runtime::stop`] waits for it.
    pub fn stop(&self) {
        let _ = self.tx.send(Command::Stop);
    }
}

/// A running set of routes (see the [module docs](super)).
pub struct Runtime {
    control: RuntimeControl,
    /// `None` once [`Runtime::finished`] has returned its end: a join handle must not be
    /// awaited again after it completed.
    task: Option<tokio::task::JoinHandle<RunEnd>>,
    admin_addr: Option<SocketAddr>,
    admin_routes: AdminRoutes,
    route_count: usize,
}

impl Runtime {
    /// A builder for a runtime serving `config`.
    pub fn builder(config: Config) -> RuntimeBuilder {
        RuntimeBuilder {
            config,
            overrides: Overrides::default(),
            events: None,
        }
    }

    /// A handle that can reload or stop this runtime from elsewhere.
    pub fn control(&self) -> RuntimeControl {
        self.control.clone()
    }

    /// Reads runtime.toml and every module again and applies what changed.
    pub async fn reload(&self) -> ReloadResult {
        self.control.reload().await
    }

    /// The admin endpoint's address, if it serves one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The routes running now, with their live counters and handler versions.
    pub fn routes(&self) -> Vec<RouteEntry> {
        self.admin_routes.all()
    }

    /// How many routes the start started.
    pub fn started_routes(&self) -> usize {
        self.route_count
    }

    /// Waits until the runtime ends by itself (a route's source failed for good, which stops
    /// every route), without asking it to. Cancel-safe; once it has returned the end, later
    /// calls (and [`Self::stop`]) return an empty one.
    pub async fn finished(&mut self) -> RunEnd {
        let Some(task) = self.task.as_mut() else {
            return RunEnd::default();
        };
        let end = task.await.unwrap_or_else(|e| {
            tracing::error!(error = %e, "The runtime's task failed");
            RunEnd::default()
        });
        self.task = None;
        end
    }

    /// Drains and stops every route; how the run ended.
    pub async fn stop(mut self) -> RunEnd {
        self.control.stop();
        self.finished().await
    }
}

/// The loop of a running runtime.
struct Serve {
    sup: Supervisor,
    commands: mpsc::UnboundedReceiver<Command>,
    ended: mpsc::UnboundedReceiver<(String, u64)>,
    admin_reloads: mpsc::UnboundedReceiver<ReloadRequest>,
    changes: mpsc::UnboundedReceiver<FileChange>,
    change_tx: mpsc::UnboundedSender<FileChange>,
    watcher: Option<Box<dyn notify::Watcher + Send>>,
    trigger: ShutdownTrigger,
    /// The admin console's DLQs, which follow the config a reload applies.
    dead_letters: Option<Arc<super::dead_letters::ConfigDeadLetters>>,
    /// The OTLP metrics export, finished after the routes stopped.
    metrics_export: Option<crate::telemetry::otlp_metrics::MetricsExport>,
}

/// Who asked for a reload, and where its outcome goes.
enum Asker {
    Files,
    Caller(oneshot::Sender<ReloadResult>),
    Admin(oneshot::Sender<ReloadOutcome>),
}

impl Serve {
    async fn run(mut self) -> RunEnd {
        let mut watched = self.sup.watched_files();
        // Armed by an "in progress" change; fires once the files were quiet for DEBOUNCE.
        let settle = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(settle);
        let mut armed = false;
        let mut failed = Vec::new();
        loop {
            let asker = tokio::select! {
                command = self.commands.recv() => match command {
                    Some(Command::Reload(reply)) => Asker::Caller(reply),
                    // Asked to stop, or every handle is gone: nobody can stop it later.
                    Some(Command::Stop) | None => break,
                },
                Some((name, generation)) = self.ended.recv() => {
                    if self.sup.is_current(&name, generation) {
                        // A route that ends by itself lost its source: stop everything.
                        if let Some(report) = self.sup.reap(&name).await {
                            failed.push(report);
                        }
                        break;
                    }
                    continue;
                }
                Some(change) = self.changes.recv() => {
                    tracing::debug!(?change, "Watched file changed");
                    match change {
                        FileChange::Complete => {}
                        FileChange::InProgress => {
                            settle.as_mut().reset(tokio::time::Instant::now() + DEBOUNCE);
                            armed = true;
                            continue;
                        }
                    }
                    Asker::Files
                }
                () = &mut settle, if armed => Asker::Files,
                Some(req) = self.admin_reloads.recv() => Asker::Admin(req.reply),
            };
            armed = false;
            tracing::debug!("Reloading");
            let outcome = self.sup.reload().await;
            if let (Ok(changes), Some(d)) = (&outcome, &self.dead_letters)
                && !changes.is_empty()
            {
                d.set_config(self.sup.config().clone()).await;
            }
            if outcome.is_ok() && self.sup.watched_files() != watched {
                // Only when the set changed: a second watcher would deliver late duplicates of
                // the events the first one saw, and a late "in progress" could time a reload
                // into the middle of the next write.
                watched = self.sup.watched_files();
                self.watcher = start_watching(&watched, self.sup.config(), &self.change_tx);
            }
            match asker {
                Asker::Files => {}
                Asker::Caller(reply) => {
                    let _ = reply.send(outcome);
                }
                Asker::Admin(reply) => {
                    let _ = reply.send(match outcome {
                        Ok(changes) => ReloadOutcome {
                            applied: true,
                            changes: changes.iter().map(ToString::to_string).collect(),
                            error: None,
                        },
                        Err(e) => ReloadOutcome {
                            applied: false,
                            changes: Vec::new(),
                            error: Some(e.to_string()),
                        },
                    });
                }
            }
        }
        drop(self.watcher.take());
        self.trigger.trigger();
        let mut reports = self.sup.stop_all().await;
        if let Some(export) = self.metrics_export.take() {
            export.finish().await;
        }
        reports.extend(failed);
        RunEnd { reports }
    }
}

/// Watches the config and module files; a failure to watch is logged, not fatal (SIGHUP and
/// `lockgate reload` still work).
fn start_watching(
    files: &[PathBuf],
    config: &Config,
    tx: &mpsc::UnboundedSender<FileChange>,
) -> Option<Box<dyn notify::Watcher + Send>> {
    match watch(files, config.watch, tx.clone()) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "Cannot watch the config and modules; reload with SIGHUP or `lockgate reload`");
            None
        }
    }
}
