//! The inputs hash that decides whether `lockgate build` must rebuild: SHA-256 over the path and
//! contents of every source file, plus words naming the toolchain and recipe.

use super::{ProjectError, io_err};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Names skipped when hashing or copying a project: build output, caches, version control and
/// the state directory of a `lockgate run` started in the project.
pub const SKIPPED: &[&str] = &[
    "target",
    ".lockgate",
    ".git",
    "__pycache__",
    "node_modules",
    ".DS_Store",
];

/// Whether a file or directory called `name` is left out of a project's inputs.
pub fn skipped(name: &str) -> bool {
    SKIPPED.contains(&name) || name.ends_with(".pyc") || name.ends_with(".wasm.inputs")
}

/// Every file below `dir` (relative paths with `/`, sorted), skipping [`skipped`] names.
/// Symlinks are followed, so a linked source counts with the contents it points to.
pub fn files(dir: &Path) -> Result<Vec<(String, PathBuf)>, ProjectError> {
    let mut out = Vec::new();
    let mut open = Vec::new();
    walk(dir, "", &mut open, &mut out)?;
    out.sort();
    Ok(out)
}

/// Walks `dir`; `open` holds the real paths of the folders being walked, so a symlink that
/// points back into one of them (`ln -s .. up`) is an error instead of endless recursion.
fn walk(
    dir: &Path,
    prefix: &str,
    open: &mut Vec<PathBuf>,
    out: &mut Vec<(String, PathBuf)>,
) -> Result<(), ProjectError> {
    let real = dir.canonicalize().map_err(io_err(dir))?;
    if open.contains(&real) {
        return Err(ProjectError::Invalid {
            path: dir.to_owned(),
            message: format!(
                "a symlink loop: this folder is {}, which contains it",
                real.display()
            ),
        });
    }
    open.push(real);
    for e in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let e = e.map_err(io_err(dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if skipped(&name) {
            continue;
        }
        let path = e.path();
        let rel = format!("{prefix}{name}");
        // metadata() follows symlinks: a linked directory is walked, a dangling link is an error
        // naming it rather than a silently smaller input set.
        let meta = std::fs::metadata(&path).map_err(io_err(&path))?;
        if meta.is_dir() {
            walk(&path, &format!("{rel}/"), open, out)?;
        } else {
            out.push((rel, path));
        }
    }
    open.pop();
    Ok(())
}

/// Accumulates the inputs hash.
#[derive(Default)]
pub struct Inputs(Sha256);

impl Inputs {
    /// Adds a word (a tool version, a flag, the recipe's version).
    pub fn word(&mut self, w: &str) {
        self.0.update((w.len() as u64).to_le_bytes());
        self.0.update(w.as_bytes());
    }

    /// Adds a file's name and contents.
    pub fn file(&mut self, rel: &str, contents: &[u8]) {
        self.word(rel);
        self.0.update((contents.len() as u64).to_le_bytes());
        self.0.update(contents);
    }

    /// Adds every file below `dir` under the label `label`.
    pub fn tree(&mut self, label: &str, dir: &Path) -> Result<(), ProjectError> {
        self.word(label);
        for (rel, path) in files(dir)? {
            let bytes = std::fs::read(&path).map_err(io_err(&path))?;
            self.file(&rel, &bytes);
        }
        Ok(())
    }

    /// The hash, as hex.
    pub fn finish(self) -> String {
        hex::encode(self.0.finalize())
    }
}

/// SHA-256 of `bytes`, as hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(dir: &Path) -> String {
        let mut i = Inputs::default();
        i.tree("src", dir).unwrap();
        i.finish()
    }

    #[test]
    fn the_hash_follows_contents_and_names_but_not_caches() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("app.py"), "x = 1\n").unwrap();
        let first = hash(d.path());
        std::fs::create_dir_all(d.path().join("__pycache__")).unwrap();
        std::fs::write(d.path().join("__pycache__/app.pyc"), "junk").unwrap();
        std::fs::create_dir_all(d.path().join("target")).unwrap();
        std::fs::write(d.path().join("target/x.wasm"), "junk").unwrap();
        assert_eq!(hash(d.path()), first, "caches and outputs are not inputs");
        std::fs::write(d.path().join("app.py"), "x = 2\n").unwrap();
        assert_ne!(hash(d.path()), first, "an edit changes the hash");
        std::fs::write(d.path().join("app.py"), "x = 1\n").unwrap();
        assert_eq!(hash(d.path()), first);
        std::fs::create_dir_all(d.path().join("lib")).unwrap();
        std::fs::write(d.path().join("lib/util.py"), "").unwrap();
        assert_ne!(hash(d.path()), first, "a new file changes the hash");
    }

    #[test]
    fn a_symlink_loop_is_an_error_not_a_hang() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("app.py"), "").unwrap();
        std::fs::create_dir_all(d.path().join("pkg")).unwrap();
        std::os::unix::fs::symlink("..", d.path().join("pkg/up")).unwrap();
        let err = files(d.path()).unwrap_err().to_string();
        assert!(err.contains("symlink loop") && err.contains("up"), "{err}");
    }

    #[test]
    fn a_linked_source_counts_with_what_it_points_to() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real");
        std::fs::create_dir_all(&real).unwrap();
        std::fs::write(real.join("shared.py"), "a").unwrap();
        let proj = d.path().join("proj");
        std::fs::create_dir_all(&proj).unwrap();
        std::os::unix::fs::symlink(&real, proj.join("lib")).unwrap();
        let first = hash(&proj);
        std::fs::write(real.join("shared.py"), "b").unwrap();
        assert_ne!(hash(&proj), first);
    }
}
