//! Driving a runtime in process through the library ([`lockgate::app::Runtime`]): the reload
//! tests start, reload and stop it as a caller would, and wait for its typed events instead of
//! parsing a child's output.

use std::path::Path;
use std::time::Duration;

use lockgate::app::{Event, Runtime};
use lockgate::config::Config;
use tokio::sync::mpsc;

/// A runtime started in this process, with its events.
pub struct InProc {
    /// The runtime.
    pub runtime: Runtime,
    /// Every event since the start (those of the start first).
    pub events: mpsc::UnboundedReceiver<Event>,
}

/// Loads `config` and starts its routes; panics with the reason if they cannot start.
pub async fn start(config: &Path) -> InProc {
    let loaded = Config::load(config).unwrap_or_else(|e| panic!("{e}"));
    let (tx, events) = mpsc::unbounded_channel();
    let runtime = Runtime::builder(loaded)
        .events(tx)
        .start()
        .await
        .unwrap_or_else(|e| panic!("runtime did not start: {e}"));
    InProc { runtime, events }
}

impl InProc {
    /// Waits (at most `limit`) for the next event `want` accepts, skipping others; panics
    /// naming `what` and the events skipped if none comes.
    pub async fn wait_event(
        &mut self,
        what: &str,
        limit: Duration,
        want: impl Fn(&Event) -> bool,
    ) -> Event {
        let mut skipped = Vec::new();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(e)) if want(&e) => return e,
                Ok(Some(e)) => skipped.push(format!("{e:?}")),
                Ok(None) => panic!("the runtime ended before {what}; events: {skipped:#?}"),
                Err(_) => panic!("no {what} within {limit:?}; events: {skipped:#?}"),
            }
        }
    }

    /// The admin address as `ip:port`; panics if the config serves none.
    pub fn admin(&self) -> String {
        self.runtime
            .admin_addr()
            .expect("the config serves an admin endpoint")
            .to_string()
    }
}

/// Polls `progress` every 10 ms until it reaches `target` (outputs have no event to await);
/// panics naming `what` after `limit`.
pub async fn until(what: &str, limit: Duration, target: u64, progress: impl Fn() -> u64) {
    let started = tokio::time::Instant::now();
    loop {
        let now = progress();
        if now >= target {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "{what}: {now} of {target} after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
