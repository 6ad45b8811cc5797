#!/usr/bin/env bash
# Builds the Python example handlers in guest-examples/python/<name>/ (module `app`, using the SDK
# in sdk/python/) as lockgate components and prints the path of each .wasm.
#
#   scripts/build-guest-python.sh [name...]      # default: every guest-examples/python/*/
#
# Installs the toolchain on first use: a venv with the componentize-py pinned in
# scripts/toolchains/python-requirements.txt, under ${LOCKGATE_TOOLCHAINS:-~/.cache/lockgate/toolchains}/python.
# Outputs go to ${LOCKGATE_GUEST_OUT:-~/.cache/lockgate/guests}/python/<name>.wasm. A guest whose
# inputs (its sources, the SDK, wit/, the toolchain pin) have not changed since its last build is
# not rebuilt: the hash of the inputs is kept next to the .wasm as <name>.inputs-sha256.
# The WIT bindings are generated at build time into <out>/python/bindings/ (for editors and type
# checkers; componentize-py generates its own copy inside each build) and never committed.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
toolchains="${LOCKGATE_TOOLCHAINS:-$HOME/.cache/lockgate/toolchains}"
out_root="${LOCKGATE_GUEST_OUT:-$HOME/.cache/lockgate/guests}"
venv="$toolchains/python"
out="$out_root/python"
requirements="$repo/scripts/toolchains/python-requirements.txt"
examples="$repo/guest-examples/python"

die() { echo "build-guest-python: error: $*" >&2; exit 1; }

mkdir -p "$toolchains" "$out"
# One run at a time per toolchain (tests may run this script concurrently).
exec 9>"$toolchains/python.lock"
flock 9

# --- toolchain -------------------------------------------------------------------------------
req_hash="$(sha256sum "$requirements" | cut -c1-64)"
if [[ ! -x "$venv/bin/componentize-py" || "$(cat "$venv/.requirements-sha256" 2>/dev/null)" != "$req_hash" ]]; then
    python="$(command -v python3 || true)"
    [[ -n "$python" ]] || die "python3 is needed to install componentize-py (apt-get install python3 python3-venv)"
    echo "build-guest-python: installing $(grep -v '^#' "$requirements" | xargs) into $venv" >&2
    rm -rf "$venv"
    "$python" -m venv "$venv" || die "cannot create a venv with $python (apt-get install python3-venv)"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements" \
        || die "pip install -r $requirements failed"
    echo "$req_hash" > "$venv/.requirements-sha256"
fi
cpy="$venv/bin/componentize-py"
cpy_version="$("$cpy" --version)" || die "$cpy does not run"

# --- which guests ----------------------------------------------------------------------------
names=("$@")
if [[ ${#names[@]} -eq 0 ]]; then
    for dir in "$examples"/*/; do
        names+=("$(basename "$dir")")
    done
fi
[[ ${#names[@]} -gt 0 ]] || die "no guests found in $examples"

# Hash of every file under the given paths (names and contents), ignoring bytecode caches.
tree_hash() {
    (cd "$repo" && find "$@" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 \
        | LC_ALL=C sort -z | xargs -0 sha256sum) | sha256sum | cut -c1-64
}
common_hash="$(tree_hash wit sdk/python scripts/toolchains/python-requirements.txt scripts/build-guest-python.sh)"

# --- bindings (for editors; regenerated when wit/ changes) -----------------------------------
wit_hash="$(tree_hash wit)"
if [[ "$(cat "$out/bindings/.wit-sha256" 2>/dev/null)" != "$wit_hash" ]]; then
    rm -rf "$out/bindings"
    "$cpy" -q -d "$repo/wit" -w handler bindings "$out/bindings" \
        || die "componentize-py bindings failed"
    echo "$wit_hash" > "$out/bindings/.wit-sha256"
fi

# A component starts with the wasm magic then version 0x0d, layer 1; a core module has 01 00 00 00.
component_header="0061736d0d000100"

build_dir="$(mktemp -d "$out/.build.XXXXXX")"
trap 'rm -rf "$build_dir"' EXIT

for name in "${names[@]}"; do
    src="$examples/$name"
    [[ -f "$src/app.py" ]] || die "$src/app.py not found (a Python guest is a directory with app.py)"
    wasm="$out/$name.wasm"
    inputs="$(printf '%s\n%s\n%s\n' "$cpy_version" "$common_hash" \
        "$(tree_hash "guest-examples/python/$name")" | sha256sum | cut -c1-64)"
    if [[ -f "$wasm" && "$(cat "$out/$name.inputs-sha256" 2>/dev/null)" == "$inputs" ]]; then
        echo "$wasm"
        continue
    fi
    # Build from a copy so the sources stay free of the __pycache__ that pre-initialisation writes.
    stage="$build_dir/$name"
    mkdir -p "$stage/app" "$stage/sdk"
    cp -R "$src/." "$stage/app/"
    cp -R "$repo/sdk/python/lockgate_sdk" "$stage/sdk/"
    find "$stage" -name __pycache__ -prune -exec rm -rf {} +
    echo "build-guest-python: building $name" >&2
    (cd "$stage" && "$cpy" -q -d "$repo/wit" -w handler componentize app \
        -p "$stage/app" -p "$stage/sdk" -o "$stage/out.wasm") \
        || die "componentize-py failed for $name"
    header="$(head -c 8 "$stage/out.wasm" | od -An -tx1 | tr -d ' \n')"
    [[ "$header" == "$component_header" ]] || die "$name: output is not a component (header $header)"
    mv "$stage/out.wasm" "$wasm"
    echo "$inputs" > "$out/$name.inputs-sha256"
    echo "$wasm"
done
