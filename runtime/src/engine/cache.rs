//! On-disk cache of compiled components, and its eviction.
//!
//! Compiling an 18 MB Python component takes seconds; deserialising its compiled form takes
//! milliseconds. Entries are keyed by the SHA-256 of the component bytes *and* a hash of every
//! engine setting that affects code generation, so a changed setting or wasmtime version misses
//! the cache instead of loading incompatible code.
//!
//! Every hot reload of a new handler version writes one more artefact, so the cache evicts:
//! after each write it keeps the artefacts this process's handlers are using ([`CachePin`]) and
//! the most recently used others within [`CacheLimits`], and removes the rest, least recently
//! used first. "Used" is the file's modification time, set when the artefact is written and
//! again whenever it is loaded, so it also counts the loads of other processes sharing the
//! state directory.
//!
//! Removing is safe while another process uses or loads the artefact: wasmtime maps the file
//! (`Component::deserialize_file`), and a mapping outlives the file's name; a load that finds
//! the file gone is a miss and recompiles. Entries are only ever replaced by a rename, never
//! rewritten in place, so a mapped file never changes under its reader.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use wasmtime::component::Component;

/// Suffix of a compiled artefact's file name.
const EXTENSION: &str = ".cwasm";
/// A temporary file older than this is a crashed writer's leftover (a write takes seconds).
const STALE_TMP: Duration = Duration::from_secs(3600);

/// How much the cache keeps besides the artefacts in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheLimits {
    /// Artefacts not used by this process kept at most (the most recently used ones).
    pub max_unused_entries: usize,
    /// Bytes of artefacts not used by this process kept at most.
    pub max_unused_bytes: u64,
}

impl Default for CacheLimits {
    /// 16 artefacts and 1 GiB: rolling back across a day of reloads still loads from the cache,
    /// and a Python or JavaScript artefact (tens of MB each) cannot fill a disk.
    fn default() -> Self {
        Self {
            max_unused_entries: 16,
            max_unused_bytes: 1 << 30,
        }
    }
}

/// Where compiled artefacts live and how they are named.
#[derive(Clone, Debug)]
pub struct CompileCache {
    dir: PathBuf,
    engine_key: String,
    limits: CacheLimits,
    /// Artefacts in use by this process's handlers: file name → live pins.
    pins: Arc<Mutex<HashMap<PathBuf, usize>>>,
}

/// Keeps one artefact from eviction while it lives; a handler holds one for the artefact it was
/// loaded from, so a running version's compiled code stays on disk for the next restart.
#[derive(Debug)]
pub struct CachePin {
    pins: Arc<Mutex<HashMap<PathBuf, usize>>>,
    path: PathBuf,
}

impl Drop for CachePin {
    fn drop(&mut self) {
        let mut pins = self.pins.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = pins.get_mut(&self.path) {
            *n -= 1;
            if *n == 0 {
                pins.remove(&self.path);
            }
        }
    }
}

impl CompileCache {
    /// A cache in `dir` for code compiled by `engine`, with the default [`CacheLimits`].
    pub fn new(dir: PathBuf, engine: &wasmtime::Engine) -> Self {
        // DefaultHasher::new() has fixed keys, so the value is stable across processes of the same
        // build; wasmtime also refuses artefacts from another version, which we then recompile.
        let mut h = std::hash::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        let engine_key = format!("{:016x}", h.finish());
        Self {
            dir,
            engine_key,
            limits: CacheLimits::default(),
            pins: Arc::default(),
        }
    }

    /// The same cache keeping at most `limits` besides the artefacts in use.
    pub fn with_limits(mut self, limits: CacheLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The directory the artefacts live in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file a component with content hash `content_sha256` compiles to.
    pub fn path_for(&self, content_sha256: &str) -> PathBuf {
        self.dir
            .join(format!("{content_sha256}-{}{EXTENSION}", self.engine_key))
    }

    /// Keeps the artefact of `content_sha256` from eviction until the pin is dropped.
    pub fn pin(&self, content_sha256: &str) -> CachePin {
        let path = self.path_for(content_sha256);
        *self
            .pins
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(path.clone())
            .or_default() += 1;
        CachePin {
            pins: self.pins.clone(),
            path,
        }
    }

    /// Loads a cached artefact, or `None` on a miss or an unusable entry (which is removed).
    /// A hit counts as a use for eviction.
    pub fn load(&self, engine: &wasmtime::Engine, content_sha256: &str) -> Option<Component> {
        let path = self.path_for(content_sha256);
        if !path.is_file() {
            return None;
        }
        // SAFETY: the file is one we wrote with `Component::serialize` for this engine
        // configuration (the name carries both hashes), in a directory owned by the operator, and
        // it is never modified in place (replaced by rename, or removed: the mapping survives).
        // wasmtime additionally validates the header and version before using it.
        #[allow(unsafe_code)]
        let loaded = unsafe { Component::deserialize_file(engine, &path) };
        match loaded {
            Ok(component) => {
                touch(&path);
                Some(component)
            }
            // Evicted by another process since `is_file`: a plain miss.
            Err(_) if !path.exists() => None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "Discarding unusable compiled-component cache entry.");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Stores a compiled component, then evicts what exceeds the limits. Failures only cost a
    /// recompile next time, so they are logged, not returned. Pin the artefact first if it is
    /// about to be used, or it may be evicted at once with tiny limits.
    pub fn store(&self, content_sha256: &str, component: &Component) {
        if let Err(e) = self.try_store(content_sha256, component) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "Could not write compiled-component cache entry.");
            return;
        }
        self.evict();
    }

    fn try_store(&self, content_sha256: &str, component: &Component) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let bytes = component.serialize()?;
        let path = self.path_for(content_sha256);
        // Write then rename so a concurrent reader never sees a half-written artefact.
        let tmp = tmp_path(&path);
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    /// Removes the least recently used artefacts not pinned by this process beyond the limits,
    /// and temporary files a crashed writer left behind. Another process removing the same files
    /// at the same time is harmless.
    pub fn evict(&self) {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::debug!(dir = %self.dir.display(), error = %e, "Could not list the compiled-component cache.");
                return;
            }
        };
        let now = SystemTime::now();
        let mut unused = Vec::new();
        {
            let pins = self.pins.lock().unwrap_or_else(PoisonError::into_inner);
            for entry in entries.flatten() {
                let path = entry.path();
                let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                    continue;
                };
                let Ok(meta) = entry.metadata() else {
                    continue;
                };
                let modified = meta.modified().unwrap_or(now);
                if name.contains(&format!("{EXTENSION}.tmp")) {
                    if now.duration_since(modified).unwrap_or_default() > STALE_TMP {
                        remove(&path);
                    }
                } else if name.ends_with(EXTENSION) && meta.is_file() && !pins.contains_key(&path) {
                    unused.push((modified, meta.len(), path));
                }
            }
        }
        // Most recently used first; keep a prefix within both limits, remove the rest.
        unused.sort_by_key(|(modified, _, _)| std::cmp::Reverse(*modified));
        let mut kept_bytes = 0u64;
        let mut full = false;
        for (n, (_, len, path)) in unused.iter().enumerate() {
            full = full
                || n >= self.limits.max_unused_entries
                || kept_bytes.saturating_add(*len) > self.limits.max_unused_bytes;
            if full {
                remove(path);
            } else {
                kept_bytes += len;
            }
        }
    }
}

/// Marks an artefact as just used. Best effort: a failure only makes eviction less precise.
fn touch(path: &Path) {
    let result = std::fs::File::open(path).and_then(|f| f.set_modified(SystemTime::now()));
    if let Err(e) = result {
        tracing::debug!(path = %path.display(), error = %e, "Could not mark a compiled-component cache entry as used.");
    }
}

fn remove(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {
            tracing::debug!(path = %path.display(), "Evicted a compiled-component cache entry.");
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "Could not evict a compiled-component cache entry.");
        }
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp{}", std::process::id()));
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use wasmtime::component::{Component, Linker};

    use super::*;

    /// The smallest component: a preamble and no sections. Compiles and instantiates.
    const EMPTY: &[u8] = b"\0asm\x0d\x00\x01\x00";

    fn setup(limits: CacheLimits) -> (tempfile::TempDir, wasmtime::Engine, CompileCache) {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = wasmtime::Engine::default();
        let cache = CompileCache::new(dir.path().join("cache"), &engine).with_limits(limits);
        (dir, engine, cache)
    }

    fn hash(i: usize) -> String {
        format!("{i:064x}")
    }

    fn entries(cache: &CompileCache) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(cache.dir())
            .expect("cache dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// Sets an entry's last use to `secs_ago`, so tests do not depend on the file system's
    /// timestamp granularity.
    fn used(cache: &CompileCache, i: usize, secs_ago: u64) {
        let t = SystemTime::now() - Duration::from_secs(secs_ago);
        std::fs::File::open(cache.path_for(&hash(i)))
            .and_then(|f| f.set_modified(t))
            .expect("set mtime");
    }

    fn names(cache: &CompileCache, ids: &[usize]) -> Vec<String> {
        let mut v: Vec<String> = ids
            .iter()
            .map(|i| {
                let p = cache.path_for(&hash(*i));
                p.file_name().expect("name").to_string_lossy().into_owned()
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn keeps_pinned_artefacts_and_the_most_recently_used_others() {
        let (_dir, engine, cache) = setup(CacheLimits::default());
        let component = Component::new(&engine, EMPTY).expect("compile");
        // Entry i was last used 100 - i seconds ago: 0 is the oldest.
        for i in 0..10 {
            cache.store(&hash(i), &component);
            used(&cache, i, 100 - i as u64);
        }
        let cache = cache.with_limits(CacheLimits {
            max_unused_entries: 3,
            max_unused_bytes: u64::MAX,
        });
        // The two oldest are in use by a handler of this process.
        let pins = [cache.pin(&hash(0)), cache.pin(&hash(1))];
        let extra = cache.pin(&hash(1));
        drop(extra); // one of two pins of entry 1 gone: still pinned
        // Entry 2 was loaded a moment ago: recently used again.
        assert!(cache.load(&engine, &hash(2)).is_some());
        cache.evict();
        assert_eq!(entries(&cache), names(&cache, &[0, 1, 2, 8, 9]));
        // A pinned artefact still loads; unpinned, it is evicted like any other.
        assert!(cache.load(&engine, &hash(0)).is_some());
        used(&cache, 0, 1000);
        drop(pins);
        cache.evict();
        assert_eq!(entries(&cache), names(&cache, &[2, 8, 9]));
    }

    #[test]
    fn keeps_no_more_unused_bytes_than_the_limit() {
        let (_dir, engine, cache) = setup(CacheLimits::default());
        let component = Component::new(&engine, EMPTY).expect("compile");
        cache.store(&hash(0), &component);
        let len = std::fs::metadata(cache.path_for(&hash(0)))
            .expect("stored")
            .len();
        for i in 1..6 {
            cache.store(&hash(i), &component);
        }
        for i in 0..6 {
            used(&cache, i, 100 - i as u64);
        }
        let cache = cache.with_limits(CacheLimits {
            max_unused_entries: 100,
            max_unused_bytes: 2 * len + len / 2,
        });
        cache.evict();
        assert_eq!(entries(&cache), names(&cache, &[4, 5]));
    }

    #[test]
    fn an_evicted_artefact_is_a_miss_and_one_already_loaded_keeps_working() {
        let limits = CacheLimits {
            max_unused_entries: 0,
            max_unused_bytes: 0,
        };
        let (_dir, engine, cache) = setup(limits);
        let component = Component::new(&engine, EMPTY).expect("compile");
        let pin = cache.pin(&hash(0));
        cache.store(&hash(0), &component);
        let loaded = cache.load(&engine, &hash(0)).expect("pinned: kept");
        // Another process evicts it while this one has it loaded.
        drop(pin);
        cache.evict();
        assert!(entries(&cache).is_empty());
        assert!(cache.load(&engine, &hash(0)).is_none());
        let mut store = wasmtime::Store::new(&engine, ());
        Linker::<()>::new(&engine)
            .instantiate(&mut store, &loaded)
            .expect("the mapped code outlives its file");
    }

    #[test]
    fn a_crashed_writers_leftovers_are_removed_once_stale() {
        let (_dir, engine, cache) = setup(CacheLimits::default());
        let component = Component::new(&engine, EMPTY).expect("compile");
        cache.store(&hash(0), &component);
        let fresh = tmp_path(&cache.path_for(&hash(1)));
        let stale = tmp_path(&cache.path_for(&hash(2)));
        for (path, age) in [(&fresh, 60), (&stale, 2 * 3600)] {
            std::fs::write(path, b"half").expect("write");
            std::fs::File::open(path)
                .and_then(|f| f.set_modified(SystemTime::now() - Duration::from_secs(age)))
                .expect("set mtime");
        }
        cache.evict();
        let mut want = names(&cache, &[0]);
        want.push(
            fresh
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned(),
        );
        want.sort();
        assert_eq!(entries(&cache), want);
    }
}
