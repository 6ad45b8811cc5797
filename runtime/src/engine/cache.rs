//! On-disk cache of compiled components.
//!
//! Compiling an 18 MB Python component takes seconds; deserialising its compiled form takes
//! milliseconds. Entries are keyed by the SHA-256 of the component bytes *and* a hash of every
//! engine setting that affects code generation, so a changed setting or wasmtime version misses
//! the cache instead of loading incompatible code.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use wasmtime::component::Component;

/// Where compiled artefacts live and how they are named.
#[derive(Clone, Debug)]
pub struct CompileCache {
    dir: PathBuf,
    engine_key: String,
}

impl CompileCache {
    /// A cache in `dir` for code compiled by `engine`.
    pub fn new(dir: PathBuf, engine: &wasmtime::Engine) -> Self {
        // DefaultHasher::new() has fixed keys, so the value is stable across processes of the same
        // build; wasmtime also refuses artefacts from another version, which we then recompile.
        let mut h = std::hash::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        let engine_key = format!("{:016x}", h.finish());
        Self { dir, engine_key }
    }

    /// The file a component with content hash `content_sha256` compiles to.
    pub fn path_for(&self, content_sha256: &str) -> PathBuf {
        self.dir
            .join(format!("{content_sha256}-{}.cwasm", self.engine_key))
    }

    /// Loads a cached artefact, or `None` on a miss or an unusable entry (which is removed).
    pub fn load(&self, engine: &wasmtime::Engine, content_sha256: &str) -> Option<Component> {
        let path = self.path_for(content_sha256);
        if !path.is_file() {
            return None;
        }
        // SAFETY: the file is one we wrote with `Component::serialize` for this engine
        // configuration (the name carries both hashes), in a directory owned by the operator.
        // wasmtime additionally validates the header and version before using it.
        #[allow(unsafe_code)]
        let loaded = unsafe { Component::deserialize_file(engine, &path) };
        match loaded {
            Ok(component) => Some(component),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "Discarding unusable compiled-component cache entry.");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Stores a compiled component. Failures only cost a recompile next time, so they are logged,
    /// not returned.
    pub fn store(&self, content_sha256: &str, component: &Component) {
        if let Err(e) = self.try_store(content_sha256, component) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "Could not write compiled-component cache entry.");
        }
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
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp{}", std::process::id()));
    path.with_file_name(name)
}
