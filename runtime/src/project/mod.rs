//! Handler projects: a directory holding one handler's sources in one of the five guest
//! languages. [`build`] turns one into a component (`lockgate build`), [`new()`] creates one
//! (`lockgate new`). Both work anywhere: the SDKs, the WIT and the templates are embedded in the
//! binary ([`sdk`]), and the toolchains are installed, pinned, on first use ([`toolchain`]).
//! docs/handlers/projects.md is the user's side of this.

pub mod build;
mod hash;
mod new;
pub mod sdk;
pub mod toolchain;

pub use build::{BuildOptions, Built, build};
pub use new::{Created, NewOptions, new, valid_name};

use std::fmt;
use std::path::{Path, PathBuf};

/// The language a handler project is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Language {
    /// A cdylib crate (`Cargo.toml`) built for wasm32-wasip2 with cargo.
    Rust,
    /// A module `app.py` componentized by componentize-py.
    Python,
    /// A module `handler.js` componentized by jco.
    JavaScript,
    /// `package handler` `.go` files built by Go (wasip1) and adapted to a component.
    Go,
    /// `.c` files built by clang for wasm32-wasi and adapted to a component.
    C,
}

impl Language {
    /// Every language, in the order the docs list them.
    pub const ALL: [Language; 5] = [
        Language::Rust,
        Language::Python,
        Language::JavaScript,
        Language::Go,
        Language::C,
    ];

    /// The name used on the command line and in the project's `lockgate-sdk/` folder.
    pub fn name(self) -> &'static str {
        match self {
            Language::Rust => "rust",
            Language::Python => "python",
            Language::JavaScript => "javascript",
            Language::Go => "go",
            Language::C => "c",
        }
    }

    /// The folder of this language's SDK under `lockgate-sdk/` (and in [`sdk::SDK_FILES`]).
    pub fn sdk_folder(self) -> &'static str {
        match self {
            Language::Rust => "rust",
            Language::Python => "python",
            Language::JavaScript => "js",
            Language::Go => "go",
            Language::C => "c",
        }
    }

    /// Parses a language as `lockgate new` takes it (`js` and `py` are accepted too).
    pub fn parse(s: &str) -> Option<Language> {
        match s.to_ascii_lowercase().as_str() {
            "rust" | "rs" => Some(Language::Rust),
            "python" | "py" => Some(Language::Python),
            "javascript" | "js" => Some(Language::JavaScript),
            "go" | "golang" => Some(Language::Go),
            "c" => Some(Language::C),
            _ => None,
        }
    }

    /// Tells a project's language from the files in `dir`: `Cargo.toml` is Rust, `app.py`
    /// Python, `handler.js` JavaScript, a `.go` file Go, a `.c` file C. More than one is an
    /// error: a build must not guess.
    pub fn detect(dir: &Path) -> Result<Language, ProjectError> {
        let entries = std::fs::read_dir(dir).map_err(|e| ProjectError::Io {
            path: dir.to_owned(),
            source: e,
        })?;
        let mut found = Vec::new();
        let mut go = false;
        let mut c = false;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            match name.as_str() {
                "Cargo.toml" => found.push(Language::Rust),
                "app.py" => found.push(Language::Python),
                "handler.js" => found.push(Language::JavaScript),
                _ if name.ends_with(".go") && !name.ends_with("_test.go") => go = true,
                _ if name.ends_with(".c") => c = true,
                _ => {}
            }
        }
        if go {
            found.push(Language::Go);
        }
        if c {
            found.push(Language::C);
        }
        match found.as_slice() {
            [one] => Ok(*one),
            [] => Err(ProjectError::NoLanguage(dir.to_owned())),
            many => Err(ProjectError::ManyLanguages(dir.to_owned(), many.to_vec())),
        }
    }
}

impl fmt::Display for Language {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What can go wrong creating or building a handler project.
#[derive(Debug, thiserror::Error)]
pub enum ProjectError {
    /// A file or directory could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The directory holds no handler sources of a known language.
    #[error(
        "{}: no handler found: a project has Cargo.toml (Rust), app.py (Python), handler.js (JavaScript), .go files (Go) or .c files (C); `lockgate new <language> <dir>` creates one",
        .0.display()
    )]
    NoLanguage(PathBuf),
    /// The directory holds the sources of several languages.
    #[error("{}: handler sources of several languages ({}): keep one handler per directory", .0.display(), .1.iter().map(|l| l.name()).collect::<Vec<_>>().join(", "))]
    ManyLanguages(PathBuf, Vec<Language>),
    /// A project's sources break a rule of its language's build.
    #[error("{}: {message}", path.display())]
    Invalid {
        /// The file (or directory) at fault.
        path: PathBuf,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A tool the build needs is missing and cannot be installed here.
    #[error("{tool} is needed to build {language} handlers: {hint}")]
    MissingTool {
        /// The language being built.
        language: Language,
        /// The missing program.
        tool: String,
        /// How to get it.
        hint: String,
    },
    /// A toolchain or build command failed; its output is included.
    #[error("{what} failed{}\n{output}", status.map(|s| format!(" ({s})")).unwrap_or_default())]
    Command {
        /// The command, as a user would retype it.
        what: String,
        /// Its exit status, if it ran.
        status: Option<std::process::ExitStatus>,
        /// What it printed (stderr, then stdout), trimmed.
        output: String,
    },
    /// The build produced something that is not a component.
    #[error("{}: the build produced no WebAssembly component ({reason})", path.display())]
    NotAComponent {
        /// The file it produced.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// `lockgate new` refuses to write into a directory that has files.
    #[error("{}: {reason}", path.display())]
    Refused {
        /// The directory.
        path: PathBuf,
        /// Why, and what to do.
        reason: String,
    },
}

/// Shorthand for an I/O error on `path`.
pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ProjectError + '_ {
    move |source| ProjectError::Io {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_language_is_told_from_its_files_and_two_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        assert!(matches!(
            Language::detect(p),
            Err(ProjectError::NoLanguage(_))
        ));
        std::fs::write(p.join("handler_test.go"), "package handler").unwrap();
        assert!(matches!(
            Language::detect(p),
            Err(ProjectError::NoLanguage(_))
        ));
        std::fs::write(p.join("app.py"), "").unwrap();
        assert_eq!(Language::detect(p).unwrap(), Language::Python);
        std::fs::write(p.join("main.c"), "").unwrap();
        let err = Language::detect(p).unwrap_err().to_string();
        assert!(err.contains("python, c"), "{err}");
    }

    #[test]
    fn languages_parse_by_name_and_short_name() {
        for l in Language::ALL {
            assert_eq!(Language::parse(l.name()), Some(l));
        }
        assert_eq!(Language::parse("JS"), Some(Language::JavaScript));
        assert_eq!(Language::parse("cobol"), None);
    }
}
