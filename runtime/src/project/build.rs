//! `lockgate build`: one handler project to one component, rebuilt exactly when an input
//! changed. Inputs are the project's files, the SDK and WIT it builds against, the toolchain's
//! versions and the recipe below; the output's own hash is kept beside it, so a deleted or
//! damaged component is rebuilt too. A Rust project is the exception: cargo already rebuilds
//! exactly when a source changes, so it always runs and the result is copied when it differs.

use super::hash::{self, Inputs, sha256_hex};
use super::sdk::{self, Sdk};
use super::toolchain::{self, Progress, Toolchains, copy_tree, run};
use super::{Language, ProjectError, io_err};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Bumped when a recipe below changes in a way that changes its output, so every handler built
/// by an older lockgate is rebuilt.
const RECIPE_VERSION: &str = "lockgate-build-4";

/// A component starts with the wasm magic and version 0x0d, layer 1; a core module has
/// `01 00 00 00` there.
const COMPONENT_HEADER: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];

/// Which engine a JavaScript handler is compiled with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JsBackend {
    /// QuickJS: ~1.6 MB components, much cheaper per call (the default).
    #[default]
    QuickJs,
    /// StarlingMonkey (SpiderMonkey): ~12.5 MB, a fuller web API set.
    StarlingMonkey,
}

impl JsBackend {
    /// Parses `qjs`/`quickjs` or `starlingmonkey`/`sm`.
    pub fn parse(s: &str) -> Option<JsBackend> {
        match s {
            "qjs" | "quickjs" => Some(JsBackend::QuickJs),
            "sm" | "starlingmonkey" => Some(JsBackend::StarlingMonkey),
            _ => None,
        }
    }
}

/// What to build, and where.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The project directory (symlinks are followed).
    pub dir: PathBuf,
    /// Where to write the component; default `<dir>/target/<dir name>.wasm`.
    pub out: Option<PathBuf>,
    /// Rebuild even when nothing changed.
    pub force: bool,
    /// The JavaScript engine.
    pub js_backend: JsBackend,
    /// lockgate's cache folder (unpacked SDK, build staging).
    pub cache: PathBuf,
    /// The toolchains folder.
    pub toolchains: PathBuf,
}

impl BuildOptions {
    /// Options for `dir` with the defaults: cache and toolchains from the environment (see
    /// [`toolchain::cache_dir`]), QuickJS, no forced rebuild.
    pub fn new(dir: impl Into<PathBuf>) -> BuildOptions {
        BuildOptions {
            dir: dir.into(),
            out: None,
            force: false,
            js_backend: JsBackend::default(),
            cache: toolchain::cache_dir(),
            toolchains: toolchain::toolchains_dir(),
        }
    }
}

/// The result of a build.
#[derive(Debug, Clone)]
pub struct Built {
    /// The component.
    pub wasm: PathBuf,
    /// The project's language.
    pub language: Language,
    /// Whether the component was (re)written by this build; false when it was up to date.
    pub rebuilt: bool,
    /// SHA-256 of the component.
    pub sha256: String,
}

/// Builds the project at `opts.dir` (see the module docs).
pub fn build(opts: &BuildOptions, progress: Progress<'_>) -> Result<Built, ProjectError> {
    let dir = opts.dir.canonicalize().map_err(io_err(&opts.dir))?;
    if !dir.is_dir() {
        return Err(ProjectError::Invalid {
            path: dir,
            message: "not a directory: give the folder of a handler project".into(),
        });
    }
    let language = Language::detect(&dir)?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "handler".into());
    let out = match &opts.out {
        Some(o) => std::path::absolute(o).map_err(io_err(o))?,
        None => dir.join("target").join(format!("{name}.wasm")),
    };
    let toolchains = Toolchains::at(opts.toolchains.clone())?;
    if language == Language::Rust {
        return build_rust(&dir, &out, opts.force, progress);
    }
    let sdk = Sdk::for_project(&dir, &opts.cache)?;
    let recipe = Recipe::prepare(language, opts.js_backend, &toolchains, progress)?;

    let mut inputs = Inputs::default();
    inputs.word(RECIPE_VERSION);
    inputs.word(language.name());
    for w in &recipe.words {
        inputs.word(w);
    }
    // Only what the toolchain is given: a README edit, fixtures or a run's logs in the
    // project are no reason to rebuild (and, in Python, to get new bytes).
    for (rel, path) in sources(language, &dir)? {
        inputs.file(&rel, &std::fs::read(&path).map_err(io_err(&path))?);
    }
    if sdk.is_vendored() {
        inputs.tree("sdk", &sdk.language_dir(language))?;
        inputs.tree("wit", &sdk.wit())?;
    } else {
        inputs.word(&sdk::embedded_hash());
    }
    let inputs = inputs.finish();
    if !opts.force
        && let Some(sha) = up_to_date(&out, &inputs)
    {
        return Ok(Built {
            wasm: out,
            language,
            rebuilt: false,
            sha256: sha,
        });
    }

    // The staging path is part of what some toolchains embed (componentize-py's snapshot), so it
    // is derived from the inputs rather than random: the same inputs build in the same place.
    let stage_root = opts.cache.join("build");
    std::fs::create_dir_all(&stage_root).map_err(io_err(&stage_root))?;
    let stage = stage_root.join(format!("{}-{}", language.name(), &inputs[..16]));
    let lock_path = stage_root.join(format!(".{}-{}.lock", language.name(), &inputs[..16]));
    let lock = std::fs::File::create(&lock_path).map_err(io_err(&lock_path))?;
    lock.lock().map_err(io_err(&lock_path))?;
    let _ = std::fs::remove_dir_all(&stage);
    std::fs::create_dir_all(&stage).map_err(io_err(&stage))?;
    progress(&format!("building {} ({language})", dir.display()));
    let result = recipe
        .build(&dir, &stage, &sdk)
        .and_then(|wasm| check_component(&wasm).map(|()| wasm))
        .and_then(|wasm| install(&wasm, &out, &inputs));
    let _ = std::fs::remove_dir_all(&stage);
    // The lock file stays: removing it would let a waiting build and a new one both hold a
    // lock (on the old and the new file) over the same stage.
    drop(lock);
    let sha256 = result?;
    Ok(Built {
        wasm: out,
        language,
        rebuilt: true,
        sha256,
    })
}

/// The files of a project its language's toolchain is given (relative path, path), sorted:
/// Python modules, JavaScript modules and JSON, the package's top-level Go files, C sources and
/// headers. Never the vendored SDK (an input of its own) or anything else in the folder.
fn sources(language: Language, dir: &Path) -> Result<Vec<(String, PathBuf)>, ProjectError> {
    let vendored = format!("{}/", sdk::VENDOR_DIR);
    let exts: &[&str] = match language {
        Language::Python => &["py"],
        Language::JavaScript => &["js", "mjs", "cjs", "json"],
        Language::Go => &["go"],
        Language::C => &["c", "h"],
        Language::Rust => &["rs", "toml"],
    };
    Ok(hash::files(dir)?
        .into_iter()
        .filter(|(rel, _)| !rel.starts_with(&vendored))
        .filter(|(rel, _)| language != Language::Go || !rel.contains('/'))
        .filter(|(rel, _)| {
            Path::new(rel)
                .extension()
                .is_some_and(|e| exts.iter().any(|x| e == *x))
        })
        .collect())
}

/// The stamp beside a component: `<out>.inputs`.
fn stamp_path(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".inputs");
    PathBuf::from(s)
}

/// The component's SHA-256 if it exists, its stamp names `inputs`, and it still has the hash
/// the stamp recorded (a truncated or overwritten file does not).
fn up_to_date(out: &Path, inputs: &str) -> Option<String> {
    let stamp = std::fs::read_to_string(stamp_path(out)).ok()?;
    let mut lines = stamp.lines();
    let (recorded_inputs, recorded_sha) = (lines.next()?, lines.next()?);
    if recorded_inputs != format!("inputs {inputs}") {
        return None;
    }
    let sha = sha256_hex(&std::fs::read(out).ok()?);
    (recorded_sha == format!("output {sha}")).then_some(sha)
}

/// Copies the built component to `out` (through a temporary file and a rename, so a running
/// `lockgate run` never loads half a file) and writes its stamp. Returns its SHA-256.
fn install(built: &Path, out: &Path, inputs: &str) -> Result<String, ProjectError> {
    let bytes = std::fs::read(built).map_err(io_err(built))?;
    let sha = sha256_hex(&bytes);
    let parent = out.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    let unchanged = std::fs::read(out).is_ok_and(|old| old == bytes);
    if !unchanged {
        let tmp = parent.join(format!(
            ".{}.{}.tmp",
            out.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default(),
            std::process::id()
        ));
        std::fs::write(&tmp, &bytes).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, out).map_err(io_err(out))?;
    }
    let stamp = stamp_path(out);
    std::fs::write(&stamp, format!("inputs {inputs}\noutput {sha}\n")).map_err(io_err(&stamp))?;
    Ok(sha)
}

/// Checks that `wasm` is a component, not a core module or something else.
fn check_component(wasm: &Path) -> Result<(), ProjectError> {
    let bytes = std::fs::read(wasm).map_err(io_err(wasm))?;
    if bytes.len() < 8 || bytes[..8] != COMPONENT_HEADER {
        let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
        return Err(ProjectError::NotAComponent {
            path: wasm.to_owned(),
            reason: format!("header {}", head.join(" ")),
        });
    }
    Ok(())
}

/// The tools of one non-Rust language, installed, and the words they add to the inputs hash.
struct Recipe {
    language: Language,
    js_backend: JsBackend,
    words: Vec<String>,
    main: PathBuf,
    wit_bindgen: Option<PathBuf>,
    wasm_tools: Option<PathBuf>,
    adapter: Option<PathBuf>,
    go_pkg: Option<PathBuf>,
    detshim: Option<PathBuf>,
    toolchains: Toolchains,
}

/// C compiler flags: small code, strict warnings, no debug info, and no build paths in the
/// output (`__FILE__` in assertions would otherwise make the bytes depend on where it was built).
const C_FLAGS: &[&str] = &[
    "--target=wasm32-wasi",
    "-mexec-model=reactor",
    "-Os",
    "-std=c11",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wl,--strip-debug",
];

impl Recipe {
    fn prepare(
        language: Language,
        js_backend: JsBackend,
        toolchains: &Toolchains,
        progress: Progress<'_>,
    ) -> Result<Recipe, ProjectError> {
        let mut r = Recipe {
            language,
            js_backend,
            words: Vec::new(),
            main: PathBuf::new(),
            wit_bindgen: None,
            wasm_tools: None,
            adapter: None,
            go_pkg: None,
            detshim: None,
            toolchains: toolchains.clone(),
        };
        match language {
            Language::Rust => unreachable!("Rust builds through cargo"),
            Language::Python => {
                let t = toolchains.componentize_py(progress)?;
                r.words.push(t.version);
                r.main = t.path;
                r.detshim = toolchains.detshim(progress)?;
                r.words.push(format!("detshim {}", r.detshim.is_some()));
            }
            Language::JavaScript => {
                let t = toolchains.jco(progress)?;
                r.words.push(t.version);
                r.words.push(format!("{js_backend:?}"));
                r.main = t.path;
                r.detshim = toolchains.detshim(progress)?;
                r.words.push(format!("detshim {}", r.detshim.is_some()));
            }
            Language::Go | Language::C => {
                let main = if language == Language::Go {
                    toolchains.go(progress)?
                } else {
                    toolchains.clang(progress)?
                };
                let wb = toolchains.wit_bindgen(language, progress)?;
                let wt = toolchains.wasm_tools(language, progress)?;
                let (adapter, go_pkg) = toolchains.crate_files(language, progress)?;
                let adapter_sha = sha256_hex(&std::fs::read(&adapter).map_err(io_err(&adapter))?);
                r.words
                    .extend([main.version, wb.version, wt.version, adapter_sha]);
                r.words.push(C_FLAGS.join(" "));
                r.main = main.path;
                r.wit_bindgen = Some(wb.path);
                r.wasm_tools = Some(wt.path);
                r.adapter = Some(adapter);
                r.go_pkg = Some(go_pkg);
            }
        }
        Ok(r)
    }

    /// Builds `dir` in `stage` and returns the component's path there.
    fn build(&self, dir: &Path, stage: &Path, sdk: &Sdk) -> Result<PathBuf, ProjectError> {
        match self.language {
            Language::Rust => unreachable!("Rust builds through cargo"),
            Language::Python => self.python(dir, stage, sdk),
            Language::JavaScript => self.javascript(dir, stage, sdk),
            Language::Go => self.go(dir, stage, sdk),
            Language::C => self.c(dir, stage, sdk),
        }
    }

    fn python(&self, dir: &Path, stage: &Path, sdk: &Sdk) -> Result<PathBuf, ProjectError> {
        if !dir.join("app.py").is_file() {
            return Err(invalid(dir, "a Python handler is a directory with app.py"));
        }
        // Only the Python sources travel: componentize-py bundles what its paths hold.
        let app = stage.join("app");
        for (rel, path) in sources(Language::Python, dir)? {
            sdk::write_file(
                &app.join(&rel),
                &std::fs::read(&path).map_err(io_err(&path))?,
            )?;
        }
        let sdk_path = stage.join("sdk");
        copy_tree(&sdk.language_dir(Language::Python), &sdk_path)?;
        // Without VIRTUAL_ENV, componentize-py adds the host's site-packages (`pipenv --venv`,
        // then `python3 -c 'import site'`) to the guest's path, and the snapshot then lists what
        // the building machine has installed. An empty venv-shaped folder keeps it out.
        let no_site = stage.join("no-site");
        let site_packages = no_site.join("lib/site-packages");
        std::fs::create_dir_all(&site_packages).map_err(io_err(&site_packages))?;
        // componentize-py unpacks the standard library and its helpers into TMPDIR; the shim
        // gives everything written there, and the stage's own files, fixed times (see
        // pins/lockgate-detshim.c), and fixed random bytes and clocks to the snapshot.
        let tmp = stage.join("tmp");
        std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        fix_times(stage)?;
        let out = stage.join("out.wasm");
        let mut cmd = Command::new(&self.main);
        cmd.current_dir(stage)
            .arg("-q")
            .arg("-d")
            .arg(sdk.wit())
            .arg("-w")
            .arg(world(Language::Python, dir)?)
            // Both `lockgate:handler/types` and `wasi:http/types` would otherwise become
            // `lockgate_handler_types` and `wasi_http_types`; the SDK imports `types` and
            // `http_types` whichever world is built.
            .args(PYTHON_INTERFACE_NAMES)
            .args(["componentize", "app", "-p"])
            .arg(&app)
            .arg("-p")
            .arg(&sdk_path)
            .arg("-o")
            .arg(&out)
            // Not PYTHONHASHSEED or PYTHONDONTWRITEBYTECODE: they reach only the host Python
            // that runs componentize-py; the interpreter it snapshots gets PYTHONHOME,
            // PYTHONPATH and PYTHONUNBUFFERED and nothing else.
            .env("VIRTUAL_ENV", &no_site)
            .env("TMPDIR", &tmp);
        if let Some(shim) = &self.detshim {
            cmd.env("LD_PRELOAD", shim).env("DETSHIM_FS_ROOT", stage);
        }
        run(&mut cmd, "componentize-py")?;
        Ok(out)
    }

    fn javascript(&self, dir: &Path, stage: &Path, sdk: &Sdk) -> Result<PathBuf, ProjectError> {
        if !dir.join("handler.js").is_file() {
            return Err(invalid(
                dir,
                "a JavaScript handler is a directory with handler.js",
            ));
        }
        // The handler imports "lockgate-sdk": the bundler finds it as a package beside the app.
        // jco rewrites the WIT when the code needs host APIs lockgate does not provide, so it
        // works on a copy and the copy is compared afterwards.
        let app = stage.join("app");
        for (rel, path) in sources(Language::JavaScript, dir)? {
            sdk::write_file(
                &app.join(&rel),
                &std::fs::read(&path).map_err(io_err(&path))?,
            )?;
        }
        if dir.join("node_modules").is_dir() {
            std::os::unix::fs::symlink(dir.join("node_modules"), app.join("node_modules"))
                .map_err(io_err(&app))?;
        }
        copy_tree(
            &sdk.language_dir(Language::JavaScript),
            &stage.join("node_modules/lockgate-sdk"),
        )?;
        let wit = stage.join("wit");
        copy_tree(&sdk.wit(), &wit)?;
        let world = world(Language::JavaScript, dir)?;
        if matches!(world, "handler-http" | "handler-all") && self.js_backend == JsBackend::QuickJs
        {
            // componentize-qjs (0.4.5) snapshots the engine with Wizer in a linker whose
            // trapping stand-in for wasi:http/types has resource types of its own, and the
            // component then fails to link there (`input-stream`: mismatched resource types).
            return Err(invalid(
                dir,
                "the handler imports \"lockgate-sdk/http\", which needs the StarlingMonkey engine: the QuickJS toolchain (componentize-qjs 0.4.5) cannot build a component that imports wasi:http; build with `--js-backend starlingmonkey`",
            ));
        }
        let out = stage.join("out.wasm");
        let mut cmd = Command::new(&self.main);
        cmd.current_dir(stage)
            .arg("componentize")
            .arg(app.join("handler.js"))
            .args(["--bundle", "--wit", "wit", "--world-name", world]);
        match self.js_backend {
            // lockgate links components without component-model-async (it slows every call),
            // so QuickJS runs in its synchronous mode.
            JsBackend::QuickJs => cmd.args(["--backend", "qjs", "--backend-qjs-disable-async"]),
            // Without these, StarlingMonkey components import wasi:http.
            JsBackend::StarlingMonkey => cmd.args([
                "--backend",
                "starlingmonkey",
                "-d",
                "http",
                "-d",
                "fetch-event",
            ]),
        };
        // rolldown starts each module with a `// <path>` comment, relative to the stage: jco's
        // own modules then name the toolchains folder (`// ../../../../../root/.cache/...`).
        let bundle_config = stage.join("rolldown.config.mjs");
        std::fs::write(
            &bundle_config,
            "export default { experimental: { attachDebugInfo: \"none\" } };\n",
        )
        .map_err(io_err(&bundle_config))?;
        cmd.arg("--bundle-config").arg(&bundle_config);
        // Wizer snapshots the engine after running the handler's top level under
        // wasmtime-wasi's default WASI context, whose random bytes and clocks land in the heap
        // (QuickJS's Math.random state, Rust hash keys): the shim makes them fixed, on the
        // threads where componentize-qjs runs Wizer only.
        if let Some(shim) = &self.detshim {
            cmd.env("LD_PRELOAD", shim)
                .env("DETSHIM_THREADS", "tokio-rt-worker");
        }
        cmd.arg("-o").arg(&out);
        run(&mut cmd, "jco componentize")?;
        let mut before = Inputs::default();
        before.tree("wit", &sdk.wit())?;
        let mut after = Inputs::default();
        after.tree("wit", &wit)?;
        if before.finish() != after.finish() {
            let added = std::fs::read_to_string(wit.join("handler.wit")).unwrap_or_default();
            return Err(invalid(
                dir,
                &format!(
                    "the handler uses an API that needs host imports outside the lockgate:handler world (a Node builtin such as node:fs?); lockgate does not provide them. jco's world:\n{added}"
                ),
            ));
        }
        Ok(out)
    }

    fn go(&self, dir: &Path, stage: &Path, sdk: &Sdk) -> Result<PathBuf, ProjectError> {
        let mut sources = Vec::new();
        for e in std::fs::read_dir(dir).map_err(io_err(dir))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.ends_with(".go") {
                continue;
            }
            let text = std::fs::read_to_string(e.path()).map_err(io_err(&e.path()))?;
            let is_handler = text
                .lines()
                .any(|l| l.trim() == "package handler" || l.starts_with("package handler "));
            if !name.ends_with("_test.go") && !is_handler {
                return Err(invalid(
                    &e.path(),
                    "a Go handler is package handler, with func Handle(msg lockgate.Message) error",
                ));
            }
            sources.push((name, text));
        }
        let module = stage.join("mod");
        copy_tree(&sdk.language_dir(Language::Go), &module)?;
        for (name, text) in &sources {
            sdk::write_file(&module.join("handler").join(name), text.as_bytes())?;
        }
        let go = &self.main;
        let go_bin = go.parent().unwrap_or(Path::new("/"));
        // wit-bindgen runs gofmt on what it generates when gofmt is on PATH.
        let path = format!(
            "{}:{}",
            go_bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        run(
            Command::new(self.tool(&self.wit_bindgen)?)
                .args([
                    "go",
                    "--world",
                    "handler-all",
                    "--pkg-name",
                    "lockgate/bindings",
                    "--out-dir",
                ])
                .arg(module.join("bindings"))
                .arg(sdk.wit())
                .env("PATH", &path),
            "wit-bindgen go",
        )?;
        let go_pkg = self.tool(&self.go_pkg)?;
        let go_line = std::fs::read_to_string(go_pkg.join("go.mod"))
            .map_err(io_err(go_pkg))?
            .lines()
            .find(|l| l.starts_with("go "))
            .unwrap_or("go 1.22")
            .to_owned();
        // The replacement's directory is written into the binary's build info: a copy inside
        // the module, named relatively, keeps the toolchains folder's path out of it.
        copy_tree(go_pkg, &module.join("wit-go-pkg"))?;
        sdk::write_file(
            &module.join("go.mod"),
            format!(
                "module lockgate\n\n{go_line}\n\nrequire go.bytecodealliance.org/pkg v0.4.0\n\nreplace go.bytecodealliance.org/pkg => ./wit-go-pkg\n"
            )
            .as_bytes(),
        )?;
        let go_cmd = |args: &[&str]| {
            let mut c = Command::new(go);
            c.current_dir(&module)
                .args(args)
                .envs(self.toolchains.go_env())
                .env("GOOS", "wasip1")
                .env("GOARCH", "wasm")
                .env("PATH", &path);
            c
        };
        run(&mut go_cmd(&["vet", ".", "./handler"]), "go vet")?;
        let core = stage.join("core.wasm");
        let mut b = go_cmd(&[
            "build",
            "-trimpath",
            "-buildmode=c-shared",
            "-ldflags=-s -w -checklinkname=0",
            "-o",
        ]);
        b.arg(&core).arg("./component");
        run(&mut b, "go build")?;
        let embedded = stage.join("embedded.wasm");
        run(
            Command::new(self.tool(&self.wasm_tools)?)
                .args(["component", "embed", "--world", "handler-all"])
                .arg(sdk.wit())
                .arg(&core)
                .arg("-o")
                .arg(&embedded),
            "wasm-tools component embed",
        )?;
        self.componentize(&embedded, stage, true)
    }

    fn c(&self, dir: &Path, stage: &Path, sdk: &Sdk) -> Result<PathBuf, ProjectError> {
        let mut sources: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io_err(dir))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "c"))
            .collect();
        sources.sort();
        let bindings = stage.join("bindings");
        run(
            Command::new(self.tool(&self.wit_bindgen)?)
                // `handler-all` for the SDK's HTTP helper and the raw `sql` bindings, under the
                // world's old name so the generated files and C names (`handler.h`,
                // `handler_string_t`) stay what handlers and lockgate.h use. A component
                // imports only what it calls.
                .args(["c", "--world", "handler-all", "--rename-world", "handler"])
                .arg("--out-dir")
                .arg(&bindings)
                .arg(sdk.wit()),
            "wit-bindgen c",
        )?;
        let sdk_c = sdk.language_dir(Language::C);
        // lockgate.h's JSON scanner and formatter, natively, before anything is built on them.
        let self_test = stage.join("lockgate_test");
        run(
            Command::new(&self.main)
                .args([
                    "-std=c11",
                    "-Wall",
                    "-Wextra",
                    "-Werror",
                    "-Wno-format",
                    "-O1",
                ])
                .arg(format!("-I{}", bindings.display()))
                .arg(format!("-I{}", sdk_c.display()))
                .arg(sdk_c.join("lockgate_test.c"))
                .arg("-o")
                .arg(&self_test),
            "clang (lockgate.h self-test)",
        )?;
        run(&mut Command::new(&self_test), "lockgate.h self-test")?;
        let core = stage.join("core.wasm");
        run(
            Command::new(&self.main)
                .args(C_FLAGS)
                .arg(format!("-ffile-prefix-map={}=.", dir.display()))
                .arg(format!("-ffile-prefix-map={}=.", stage.display()))
                .arg(format!(
                    "-ffile-prefix-map={}=lockgate-sdk",
                    sdk_c.display()
                ))
                .arg(format!("-I{}", bindings.display()))
                .arg(format!("-I{}", sdk_c.display()))
                .arg(format!("-I{}", dir.display()))
                .args(&sources)
                .arg(bindings.join("handler.c"))
                .arg(bindings.join("handler_component_type.o"))
                .arg("-o")
                .arg(&core),
            "clang",
        )?;
        // A handler that uses no libc I/O imports nothing from WASI and needs no adapter; one
        // that does (printf, snprintf) gets the reactor adapter, which maps those calls to the
        // WASI 0.2 the host links.
        let printed = run(
            Command::new(self.tool(&self.wasm_tools)?)
                .arg("print")
                .arg(&core),
            "wasm-tools print",
        )?;
        let needs_adapter =
            String::from_utf8_lossy(&printed.stdout).contains("(import \"wasi_snapshot_preview1\"");
        self.componentize(&core, stage, needs_adapter)
    }

    /// `wasm-tools component new` (with the reactor adapter when `adapt`) and validate.
    fn componentize(
        &self,
        core: &Path,
        stage: &Path,
        adapt: bool,
    ) -> Result<PathBuf, ProjectError> {
        let wasm_tools = self.tool(&self.wasm_tools)?;
        let out = stage.join("out.wasm");
        let mut cmd = Command::new(wasm_tools);
        cmd.args(["component", "new"]).arg(core);
        if adapt {
            cmd.arg("--adapt").arg(format!(
                "wasi_snapshot_preview1={}",
                self.tool(&self.adapter)?.display()
            ));
        }
        cmd.arg("-o").arg(&out);
        run(&mut cmd, "wasm-tools component new")?;
        run(
            Command::new(wasm_tools).arg("validate").arg(&out),
            "wasm-tools validate",
        )?;
        Ok(out)
    }

    fn tool<'a>(&self, t: &'a Option<PathBuf>) -> Result<&'a PathBuf, ProjectError> {
        t.as_ref()
            .ok_or_else(|| invalid(Path::new(self.language.name()), "tool not prepared"))
    }
}

/// componentize-py's names for the imported interfaces whose default module names clash
/// (global options, so `componentize-py bindings` for an editor takes them too).
const PYTHON_INTERFACE_NAMES: &[&str] = &[
    "--import-interface-name",
    "lockgate:handler/types@0.1.0=types",
    "--import-interface-name",
    "wasi:http/types@0.2.12=http_types",
];

/// The world a Python or JavaScript handler is built against: `handler`, plus outbound HTTP
/// (`handler-http`) when its sources use the SDK's HTTP helper or the raw `wasi:http`
/// bindings, plus SQL (`handler-sql`) when they use the SDK's SQL helper or the raw `sql`
/// bindings, or both (`handler-all`).
///
/// componentize-py and componentize-qjs give a component every import of its world, used or
/// not, unlike a Rust, Go or C build where the linker keeps only what is called. A handler that
/// never makes a request therefore stays off `handler-http`, so it does not import
/// `wasi:http/outgoing-handler` and `lockgate check` has no grant to ask it for; the same for
/// `sql`. The test is a superset of what can reach a helper: Python needs an explicit import
/// of the submodule (`lockgate_sdk.http`, `from lockgate_sdk import http`), JavaScript the
/// `lockgate-sdk/http` specifier; a false positive only costs the import.
fn world(language: Language, dir: &Path) -> Result<&'static str, ProjectError> {
    let (mut http, mut sql) = (false, false);
    for (_, path) in sources(language, dir)? {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        http |= uses_module(language, &text, "http");
        sql |= uses_module(language, &text, "sql");
    }
    Ok(match (http, sql) {
        (false, false) => "handler",
        (true, false) => "handler-http",
        (false, true) => "handler-sql",
        (true, true) => "handler-all",
    })
}

/// Whether source `text` of `language` may use the SDK's submodule `module` (`http` or `sql`)
/// or the raw bindings behind it (see [`world`]).
fn uses_module(language: Language, text: &str, module: &str) -> bool {
    let raw = match module {
        "http" => ["outgoing_handler", "wasi:http/"],
        _ => ["wit_world.imports.sql", "lockgate:handler/sql"],
    };
    if raw.iter().any(|r| text.contains(r)) {
        return true;
    }
    match language {
        Language::Python => {
            text.contains(&format!("lockgate_sdk.{module}"))
                || text
                    .match_indices("from lockgate_sdk import")
                    .any(|(i, m)| {
                        let rest = text[i + m.len()..].trim_start();
                        // One line, or a parenthesised list over several.
                        let names = match rest.strip_prefix('(') {
                            Some(list) => list.split(')').next().unwrap_or(""),
                            None => rest.lines().next().unwrap_or(""),
                        };
                        names
                            .split([',', ' ', '\t', '\n', '\\'])
                            .any(|name| name == module)
                    })
        }
        Language::JavaScript => text.contains(&format!("lockgate-sdk/{module}")),
        Language::Rust | Language::Go | Language::C => false,
    }
}

fn invalid(path: &Path, message: &str) -> ProjectError {
    ProjectError::Invalid {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// The time every staged file and folder of a Python build gets (2001-09-09), the one the shim
/// gives what componentize-py writes.
const FIXED_TIME_SECS: u64 = 1_000_000_000;

/// Gives every file and folder below `dir` the fixed time and every folder a `__pycache__`
/// file, children before parents (a folder's time changes when an entry is added): the
/// interpreter componentize-py snapshots keeps the times it saw, and would otherwise write
/// bytecode caches there and change them again.
fn fix_times(dir: &Path) -> Result<(), ProjectError> {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(FIXED_TIME_SECS);
    let times = std::fs::FileTimes::new().set_accessed(t).set_modified(t);
    let blocker = dir.join("__pycache__");
    if !blocker.exists() {
        std::fs::write(&blocker, b"").map_err(io_err(&blocker))?;
    }
    for e in std::fs::read_dir(dir).map_err(io_err(dir))?.flatten() {
        let path = e.path();
        if e.file_type().map_err(io_err(&path))?.is_dir() {
            fix_times(&path)?;
        } else {
            let f = std::fs::File::options()
                .write(true)
                .open(&path)
                .map_err(io_err(&path))?;
            f.set_times(times).map_err(io_err(&path))?;
        }
    }
    let d = std::fs::File::open(dir).map_err(io_err(dir))?;
    d.set_times(times).map_err(io_err(dir))
}

/// Variables cargo sets for its own children that would leak a host build's flags, wrappers
/// and target into the guest build when `lockgate build` runs under cargo (tests, build
/// scripts).
const CARGO_LEAKS: &[&str] = &[
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTC_WRAPPER",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_TARGET",
    "CARGO_MAKEFLAGS",
    "MAKEFLAGS",
    "MFLAGS",
];

/// A Rust project: `cargo build --release --target wasm32-wasip2`, then the cdylib of the
/// crate at `dir` copied to `out` when it differs.
fn build_rust(
    dir: &Path,
    out: &Path,
    force: bool,
    progress: Progress<'_>,
) -> Result<Built, ProjectError> {
    ensure_wasip2_target(progress)?;
    let manifest = dir.join("Cargo.toml");
    let mut artifact = None;
    for attempt in 0..2 {
        let mut cmd =
            Command::new(
                toolchain::which("cargo").ok_or_else(|| ProjectError::MissingTool {
                    language: Language::Rust,
                    tool: "cargo".into(),
                    hint: "install Rust from https://rustup.rs".into(),
                })?,
            );
        cmd.args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--message-format",
            "json-render-diagnostics",
            "--manifest-path",
        ])
        .arg(&manifest)
        .current_dir(dir);
        for v in CARGO_LEAKS {
            cmd.env_remove(v);
        }
        progress(&format!("building {} (rust, cargo)", dir.display()));
        let output = run(&mut cmd, "cargo build --release --target wasm32-wasip2")?;
        let wasm = cdylib_of(&output.stdout, &manifest).ok_or_else(|| {
            invalid(
                &manifest,
                "cargo built no .wasm for this crate: a handler crate has `[lib] crate-type = [\"cdylib\"]`",
            )
        })?;
        match check_component(&wasm) {
            Ok(()) => {
                artifact = Some(wasm);
                break;
            }
            // cargo does not notice a damaged artefact, but it rebuilds a missing one.
            Err(e) if attempt == 0 => {
                progress(&format!("{e}; rebuilding it"));
                std::fs::remove_file(&wasm).map_err(io_err(&wasm))?;
            }
            Err(e) => return Err(e),
        }
    }
    let artifact = artifact.ok_or_else(|| invalid(&manifest, "cargo built no component"))?;
    let bytes = std::fs::read(&artifact).map_err(io_err(&artifact))?;
    let sha = sha256_hex(&bytes);
    let current = up_to_date(out, &sha);
    if !force && current.is_some() {
        return Ok(Built {
            wasm: out.to_owned(),
            language: Language::Rust,
            rebuilt: false,
            sha256: sha,
        });
    }
    let sha256 = install(&artifact, out, &sha)?;
    Ok(Built {
        wasm: out.to_owned(),
        language: Language::Rust,
        rebuilt: true,
        sha256,
    })
}

/// The `.wasm` file cargo reported for the crate at `manifest` (a `compiler-artifact` message).
fn cdylib_of(stdout: &[u8], manifest: &Path) -> Option<PathBuf> {
    let mut found = None;
    for line in stdout.split(|b| *b == b'\n') {
        let Ok(msg) = serde_json::from_slice::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        let same = msg["manifest_path"]
            .as_str()
            .and_then(|m| Path::new(m).canonicalize().ok())
            .is_some_and(|m| m == manifest);
        if !same {
            continue;
        }
        for f in msg["filenames"].as_array().into_iter().flatten() {
            if let Some(f) = f.as_str().filter(|f| f.ends_with(".wasm")) {
                found = Some(PathBuf::from(f));
            }
        }
    }
    found
}

/// Adds the wasm32-wasip2 target with rustup when it is missing.
fn ensure_wasip2_target(progress: Progress<'_>) -> Result<(), ProjectError> {
    let Some(rustup) = toolchain::which("rustup") else {
        // Without rustup, cargo's own error names the missing target.
        return Ok(());
    };
    let listed = run(
        Command::new(&rustup).args(["target", "list", "--installed"]),
        "rustup target list",
    )?;
    if String::from_utf8_lossy(&listed.stdout)
        .lines()
        .any(|l| l.trim() == "wasm32-wasip2")
    {
        return Ok(());
    }
    progress("installing the wasm32-wasip2 target (rustup target add wasm32-wasip2)");
    run(
        Command::new(&rustup).args(["target", "add", "wasm32-wasip2"]),
        "rustup target add wasm32-wasip2",
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_damaged_or_missing_component_is_not_up_to_date() {
        let d = tempfile::tempdir().unwrap();
        let built = d.path().join("built.wasm");
        let mut bytes = COMPONENT_HEADER.to_vec();
        bytes.extend_from_slice(b"rest");
        std::fs::write(&built, &bytes).unwrap();
        let out = d.path().join("target/h.wasm");
        let sha = install(&built, &out, "abc").unwrap();
        assert_eq!(up_to_date(&out, "abc"), Some(sha));
        assert_eq!(up_to_date(&out, "other inputs"), None);
        std::fs::write(&out, &bytes[..6]).unwrap();
        assert_eq!(up_to_date(&out, "abc"), None, "a truncated component");
        std::fs::remove_file(&out).unwrap();
        assert_eq!(up_to_date(&out, "abc"), None, "a deleted component");
    }

    #[test]
    fn only_components_pass_the_check() {
        let d = tempfile::tempdir().unwrap();
        let core = d.path().join("core.wasm");
        std::fs::write(&core, [0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00]).unwrap();
        let err = check_component(&core).unwrap_err().to_string();
        assert!(err.contains("00 61 73 6d 01 00 00 00"), "{err}");
    }

    #[test]
    fn cargo_messages_name_the_crates_wasm() {
        let d = tempfile::tempdir().unwrap();
        let manifest = d.path().join("Cargo.toml");
        std::fs::write(&manifest, "").unwrap();
        let manifest = manifest.canonicalize().unwrap();
        let msgs = format!(
            "{{\"reason\":\"compiler-artifact\",\"manifest_path\":\"/elsewhere/Cargo.toml\",\"filenames\":[\"/t/dep.wasm\"]}}\nnot json\n{{\"reason\":\"compiler-artifact\",\"manifest_path\":{:?},\"filenames\":[\"/t/mine.wasm\",\"/t/mine.d\"]}}\n",
            manifest.display().to_string()
        );
        assert_eq!(
            cdylib_of(msgs.as_bytes(), &manifest),
            Some(PathBuf::from("/t/mine.wasm"))
        );
    }

    #[test]
    fn only_handlers_that_use_http_get_the_http_world() {
        let py = |t: &str| uses_module(Language::Python, t, "http");
        assert!(py("from lockgate_sdk import handler, http\n"));
        assert!(py(
            "from lockgate_sdk import (\n    handler,\n    http,\n)\n"
        ));
        assert!(py("from lockgate_sdk import http as web\n"));
        assert!(py("import lockgate_sdk.http\n"));
        assert!(py("from lockgate_sdk.http import get\n"));
        assert!(!py(
            "from lockgate_sdk import handler, publish\nURL = 'http://x'\n"
        ));
        assert!(!py(
            "from lockgate_sdk import (\n    handler,\n)\nhttp = 1\n"
        ));
        let js = |t: &str| uses_module(Language::JavaScript, t, "http");
        assert!(js("import { http } from \"lockgate-sdk/http\";"));
        assert!(!js(
            "import { handler } from \"lockgate-sdk\"; const u = \"http://x\";"
        ));
    }

    #[test]
    fn the_world_has_what_the_sources_use_and_no_more() {
        let world_of = |language: Language, file: &str, text: &str| {
            let d = tempfile::tempdir().unwrap();
            std::fs::write(d.path().join(file), text).unwrap();
            world(language, d.path()).unwrap()
        };
        let py = |t: &str| world_of(Language::Python, "app.py", t);
        assert_eq!(py("from lockgate_sdk import handler\n"), "handler");
        assert_eq!(py("from lockgate_sdk import handler, sql\n"), "handler-sql");
        assert_eq!(py("import lockgate_sdk.sql as db\n"), "handler-sql");
        assert_eq!(
            py("from lockgate_sdk import (\n    http,\n    sql,\n)\n"),
            "handler-all"
        );
        assert_eq!(
            py("from lockgate_sdk import handler\nsql = 'SELECT 1'\n"),
            "handler"
        );
        let js = |t: &str| world_of(Language::JavaScript, "handler.js", t);
        assert_eq!(js("import { handler } from \"lockgate-sdk\";"), "handler");
        assert_eq!(
            js("import * as sql from \"lockgate-sdk/sql\";"),
            "handler-sql"
        );
        assert_eq!(
            js(
                "import * as sql from \"lockgate-sdk/sql\";\nimport { http } from \"lockgate-sdk/http\";"
            ),
            "handler-all"
        );
    }
}
