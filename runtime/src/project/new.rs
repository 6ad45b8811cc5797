//! `lockgate new`: a handler project from the templates embedded in this binary
//! (`runtime/templates/`), with the SDK and WIT vendored into its `lockgate-sdk/` folder, so
//! it builds anywhere and refers to nothing outside itself.

use super::sdk::{self, TEMPLATE_FILES};
use super::{Language, ProjectError, io_err};
use std::path::PathBuf;

/// What to create.
#[derive(Debug, Clone)]
pub struct NewOptions {
    /// The handler's language.
    pub language: Language,
    /// The project directory: created, or an existing empty one.
    pub dir: PathBuf,
    /// The handler's name (route, handler and topic names; the Rust crate); default: the
    /// directory's name.
    pub name: Option<String>,
    /// Only rewrite the `lockgate-sdk/` folder of an existing project (after upgrading lockgate).
    pub sdk_only: bool,
}

/// What `new` wrote.
#[derive(Debug, Clone)]
pub struct Created {
    /// The project directory (absolute).
    pub dir: PathBuf,
    /// The handler's name.
    pub name: String,
    /// The files written, relative to `dir`, sorted.
    pub files: Vec<String>,
}

/// Creates the project (see the module docs).
pub fn new(opts: &NewOptions) -> Result<Created, ProjectError> {
    let dir = std::path::absolute(&opts.dir).map_err(io_err(&opts.dir))?;
    let dir_name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match &opts.name {
        Some(n) => n.clone(),
        None => dir_name.clone(),
    };
    if let Err(why) = valid_name(&name) {
        let hint = if opts.name.is_none() {
            " (it is the directory's name; give another with --name)"
        } else {
            ""
        };
        return Err(ProjectError::Refused {
            path: dir,
            reason: format!("`{name}` cannot name a handler: {why}{hint}"),
        });
    }
    if opts.sdk_only {
        if !dir.is_dir() {
            return Err(ProjectError::Refused {
                path: dir,
                reason: "no such project directory to refresh the SDK of".into(),
            });
        }
        let mut files = sdk::vendor(&dir, opts.language)?;
        files.sort();
        return Ok(Created { dir, name, files });
    }
    if dir.exists() {
        let mut entries = std::fs::read_dir(&dir).map_err(io_err(&dir))?;
        if entries.next().is_some() {
            return Err(ProjectError::Refused {
                path: dir,
                reason: "the directory is not empty: `lockgate new` writes only into a new or empty one (to refresh an existing project's lockgate-sdk/ folder, add --sdk-only)".into(),
            });
        }
    }
    let prefix = format!("{}/", opts.language.name());
    let mut files = Vec::new();
    for (rel, bytes) in TEMPLATE_FILES {
        let Some(rel) = rel.strip_prefix(&prefix) else {
            continue;
        };
        // Files a template folder cannot hold under their real name (git and cargo would treat
        // them as the checkout's own) carry a `.tmpl` suffix there.
        let rel = rel.strip_suffix(".tmpl").unwrap_or(rel);
        let text = String::from_utf8_lossy(bytes)
            .replace("{{name}}", &name)
            .replace("{{component}}", &dir_name);
        sdk::write_file(&dir.join(rel), text.as_bytes())?;
        files.push(rel.to_owned());
    }
    if files.is_empty() {
        return Err(ProjectError::Invalid {
            path: PathBuf::from(format!("runtime/templates/{prefix}")),
            message: "this lockgate carries no template for the language".into(),
        });
    }
    files.extend(sdk::vendor(&dir, opts.language)?);
    files.sort();
    Ok(Created { dir, name, files })
}

/// A handler name: lowercase ASCII letters, digits and `-`, starting with a letter, at most 64
/// characters, so it works as a Rust crate, a route, a topic prefix and a file name.
pub fn valid_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 64 {
        return Err("it must have 1 to 64 characters");
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err("it must start with a lowercase letter");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err("it may hold only lowercase letters, digits and `-`");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_cannot_be_a_crate_or_a_topic_are_refused() {
        assert!(valid_name("enrich-orders2").is_ok());
        for bad in ["", "Orders", "2fast", "a_b", "a.b", &"x".repeat(65)] {
            assert!(valid_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_directory_with_files_is_refused_and_left_alone() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("mine");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("notes.txt"), "keep").unwrap();
        let err = new(&NewOptions {
            language: Language::Python,
            dir: dir.clone(),
            name: None,
            sdk_only: false,
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("not empty"), "{err}");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        let err = new(&NewOptions {
            language: Language::Python,
            dir: d.path().join("Bad_Name"),
            name: None,
            sdk_only: false,
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("--name"), "{err}");
    }
}
