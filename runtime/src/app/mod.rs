//! The runtime as a library: build it from a config, start it, reload it, observe its routes
//! and stop it. `lockgate run` is this plus arguments, signals and printing; tests and
//! embedders drive it in process.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use lockgate::app::{Event, Runtime};
//! let config = lockgate::config::Config::load("runtime.toml".as_ref())?;
//! let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
//! let mut runtime = Runtime::builder(config).events(events_tx).start().await?;
//! while let Ok(Event::RouteStarted { summary, .. }) = events.try_recv() {
//!     println!("{summary}");
//! }
//! let changes = runtime.reload().await?; // after editing runtime.toml or a module
//! let end = runtime.stop().await;
//! # Ok(()) }
//! ```
//!
//! Owns: the supervisor of routes ([`supervisor`]), the broker clients and state stores they
//! share ([`clients`], [`stores`]), the admin endpoint's wiring and the file watcher
//! ([`watch`]). Start and reload are one path: a runtime starts by applying its config to an
//! empty one (docs/architecture.md#who-owns-what).

pub mod clients;
pub mod dead_letters;
pub mod error;
pub mod events;
mod runtime;
pub mod stores;
pub mod supervisor;
pub mod watch;

pub use error::{ClientError, ReloadError, StartError, StoreError, WatchError};
pub use events::{Event, RestartReason, RouteChange, StopCause};
pub use runtime::{LOCAL_BROKER_DIR, RunEnd, Runtime, RuntimeBuilder, RuntimeControl, STATE_FILE};
pub use supervisor::Overrides;
