//! The guest SDKs and the WIT, as this binary carries them, and where a build finds them: in the
//! project's own `lockgate-sdk/` folder (written by `lockgate new`, kept in the team's
//! repository), or else the copy embedded in this binary, unpacked once into the cache.

use super::hash::sha256_hex;
use super::{Language, ProjectError, io_err};
use std::path::{Path, PathBuf};

include!(concat!(env!("OUT_DIR"), "/embedded.rs"));

/// The folder of a project that holds its vendored SDK and WIT.
pub const VENDOR_DIR: &str = "lockgate-sdk";

/// Where the SDK and WIT of one build are.
#[derive(Debug, Clone)]
pub struct Sdk {
    root: PathBuf,
    vendored: bool,
}

impl Sdk {
    /// The SDK a project at `dir` builds against: its `lockgate-sdk/` folder when it has one
    /// (with `wit/` in it), else this binary's, unpacked under `cache`.
    pub fn for_project(dir: &Path, cache: &Path) -> Result<Sdk, ProjectError> {
        let vendored = dir.join(VENDOR_DIR);
        if vendored.join("wit").is_dir() {
            return Ok(Sdk {
                root: vendored,
                vendored: true,
            });
        }
        Ok(Sdk {
            root: unpack_embedded(cache)?,
            vendored: false,
        })
    }

    /// The WIT folder (`handler.wit`).
    pub fn wit(&self) -> PathBuf {
        self.root.join("wit")
    }

    /// The SDK folder of `language`.
    pub fn language_dir(&self, language: Language) -> PathBuf {
        self.root.join(language.sdk_folder())
    }

    /// Whether this is the project's own copy (it is then part of the project's inputs).
    pub fn is_vendored(&self) -> bool {
        self.vendored
    }
}

/// A hash of every embedded SDK file: names the unpacked copy, so a newer lockgate never reads
/// an older one's files.
pub fn embedded_hash() -> String {
    let mut all = Vec::new();
    for (path, bytes) in SDK_FILES {
        all.extend_from_slice(path.as_bytes());
        all.push(0);
        all.extend_from_slice(&sha256_hex(bytes).into_bytes());
    }
    sha256_hex(&all)
}

/// Unpacks the embedded SDK into `<cache>/sdk/<hash>/` unless it is there, and returns that.
fn unpack_embedded(cache: &Path) -> Result<PathBuf, ProjectError> {
    let hash = embedded_hash();
    let dest = cache.join("sdk").join(&hash[..16]);
    if dest.join(".complete").is_file() {
        return Ok(dest);
    }
    // Unpack beside it and rename, so a concurrent build never sees half a folder.
    let parent = cache.join("sdk");
    std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    let tmp = parent.join(format!(".{}-{}", &hash[..16], std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    for (rel, bytes) in SDK_FILES {
        write_file(&tmp.join(rel), bytes)?;
    }
    write_file(&tmp.join(".complete"), b"")?;
    match std::fs::rename(&tmp, &dest) {
        Ok(()) => Ok(dest),
        // Another build unpacked it first: the same bytes.
        Err(_) if dest.join(".complete").is_file() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dest)
        }
        Err(e) => Err(ProjectError::Io {
            path: dest,
            source: e,
        }),
    }
}

/// Writes the WIT and `language`'s SDK into `<dir>/lockgate-sdk/`, replacing what was there.
/// Returns the files written (relative to `dir`).
pub fn vendor(dir: &Path, language: Language) -> Result<Vec<String>, ProjectError> {
    let root = dir.join(VENDOR_DIR);
    if root.exists() {
        std::fs::remove_dir_all(&root).map_err(io_err(&root))?;
    }
    let mut written = Vec::new();
    let wanted: &[&str] = match language {
        Language::Rust => &["wit", "rust", "rust-macro"],
        other => &["wit", other.sdk_folder()],
    };
    for (rel, bytes) in SDK_FILES {
        let folder = rel.split('/').next().unwrap_or_default();
        if wanted.contains(&folder) {
            write_file(&root.join(rel), bytes)?;
            written.push(format!("{VENDOR_DIR}/{rel}"));
        }
    }
    if language == Language::Rust {
        // The crates' manifests in the checkout inherit from lockgate's workspace; the vendored
        // ones stand alone.
        for krate in ["rust", "rust-macro"] {
            let rel = format!("vendor/{krate}/Cargo.toml");
            let bytes = template(&rel).ok_or_else(|| ProjectError::Invalid {
                path: PathBuf::from(&rel),
                message: "missing from this lockgate's templates".into(),
            })?;
            write_file(&root.join(krate).join("Cargo.toml"), bytes)?;
            written.push(format!("{VENDOR_DIR}/{krate}/Cargo.toml"));
        }
    }
    Ok(written)
}

/// An embedded template file by its path under `runtime/templates/`.
pub fn template(rel: &str) -> Option<&'static [u8]> {
    TEMPLATE_FILES
        .iter()
        .find(|(p, _)| *p == rel)
        .map(|(_, b)| *b)
}

/// Writes `bytes` to `path`, creating its parent directories.
pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ProjectError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    std::fs::write(path, bytes).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_binary_carries_the_wit_and_every_sdk() {
        for needed in [
            "wit/handler.wit",
            "rust/src/lib.rs",
            "rust-macro/src/lib.rs",
            "python/lockgate_sdk/__init__.py",
            "js/index.js",
            "go/lockgate.go",
            "c/lockgate.h",
        ] {
            assert!(
                SDK_FILES.iter().any(|(p, _)| *p == needed),
                "{needed} is not embedded"
            );
        }
        assert!(
            !SDK_FILES.iter().any(|(p, _)| p.contains("__pycache__")),
            "caches are not embedded"
        );
    }

    #[test]
    fn the_embedded_sdk_unpacks_once_and_a_vendored_one_wins() {
        let cache = tempfile::tempdir().unwrap();
        let proj = tempfile::tempdir().unwrap();
        let sdk = Sdk::for_project(proj.path(), cache.path()).unwrap();
        assert!(!sdk.is_vendored());
        assert!(sdk.wit().join("handler.wit").is_file());
        assert!(sdk.language_dir(Language::C).join("lockgate.h").is_file());
        let again = Sdk::for_project(proj.path(), cache.path()).unwrap();
        assert_eq!(again.wit(), sdk.wit());

        let written = vendor(proj.path(), Language::Python).unwrap();
        assert!(written.iter().any(|w| w == "lockgate-sdk/wit/handler.wit"));
        assert!(written.iter().all(|w| !w.contains("/js/")), "{written:?}");
        let sdk = Sdk::for_project(proj.path(), cache.path()).unwrap();
        assert!(sdk.is_vendored());
        assert!(
            sdk.language_dir(Language::Python)
                .join("lockgate_sdk/kv.py")
                .is_file()
        );
    }
}
