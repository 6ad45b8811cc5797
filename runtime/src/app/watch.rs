//! Watching runtime.toml and the handler modules it names, so a change reloads them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;

use super::error::WatchError;

/// Files whose change means a reload: the config and every module it names.
pub fn watched_files(config: &crate::config::Config) -> Vec<PathBuf> {
    let mut files = vec![config.file.clone()];
    for h in config.handlers.values() {
        if !files.contains(&h.module) {
            files.push(h.module.clone());
        }
    }
    files
}

/// What the watcher tells the run loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileChange {
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
    mode: crate::config::WatchMode,
    tx: mpsc::UnboundedSender<FileChange>,
) -> Result<Option<Box<dyn notify::Watcher + Send>>, WatchError> {
    use notify::event::{AccessKind, AccessMode, ModifyKind};
    use notify::{EventKind, RecursiveMode, Watcher};

    if mode == crate::config::WatchMode::Off {
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
            | EventKind::Modify(ModifyKind::Name(_)) => FileChange::Complete,
            EventKind::Access(_) | EventKind::Remove(_) => return,
            _ => FileChange::InProgress,
        };
        let _ = tx.send(change);
    };
    // Polling compares contents (its timestamps have whole-second resolution, so two writes in
    // one second would look alike) and watches the files themselves, not every file of their
    // directories.
    let poll = |handler| -> Result<Box<dyn notify::Watcher + Send>, WatchError> {
        let mut w = notify::PollWatcher::new(
            handler,
            notify::Config::default()
                .with_poll_interval(Duration::from_millis(500))
                .with_compare_contents(true),
        )
        .map_err(|error| WatchError {
            path: PathBuf::new(),
            error,
        })?;
        for f in files {
            let f = f.canonicalize().unwrap_or_else(|_| f.clone());
            w.watch(&f, RecursiveMode::NonRecursive)
                .map_err(|error| WatchError { path: f, error })?;
        }
        Ok(Box::new(w))
    };
    if mode == crate::config::WatchMode::Poll {
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
            .map_err(|error| WatchError {
                path: dir.clone(),
                error,
            })?;
    }
    let watcher: Box<dyn notify::Watcher + Send> = Box::new(watcher);
    Ok(Some(watcher))
}
