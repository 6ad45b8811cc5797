#!/usr/bin/env bash
# Builds the JavaScript example handlers in guest-examples/js/<name>/ (entry `handler.js`, which
# may import the SDK as "lockgate-sdk" from sdk/js/) as lockgate components and prints the path
# of each .wasm.
#
#   scripts/build-guest-js.sh [name...]          # default: every guest-examples/js/*/
#   LOCKGATE_JS_BACKEND=starlingmonkey scripts/build-guest-js.sh
#
# Backend: QuickJS (`qjs`, the default: ~1.6 MB components, much cheaper per call) or
# StarlingMonkey (`starlingmonkey`: SpiderMonkey, ~12.5 MB, a fuller web API set).
# Installs the toolchain on first use: `npm ci` of scripts/toolchains/js/ (jco, componentize-js,
# componentize-qjs at pinned versions) under ${LOCKGATE_TOOLCHAINS:-~/.cache/lockgate/toolchains}/js.
# Outputs go to ${LOCKGATE_GUEST_OUT:-~/.cache/lockgate/guests}/js/<name>.wasm (js-starlingmonkey/
# for the other backend). A guest whose inputs (its sources, the SDK, wit/, the toolchain pin, the
# backend) have not changed since its last build is not rebuilt: the hash of the inputs is kept
# next to the .wasm.
#
# jco bundles the handler with its imports (rolldown). A Node builtin that needs a host API
# (node:fs, node:process, ...) makes jco add `jco:node/*` imports to the world, which lockgate
# does not provide: the build works on a copy of wit/ and fails if jco changed it.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
toolchains="${LOCKGATE_TOOLCHAINS:-$HOME/.cache/lockgate/toolchains}"
out_root="${LOCKGATE_GUEST_OUT:-$HOME/.cache/lockgate/guests}"
tc="$toolchains/js"
pins="$repo/scripts/toolchains/js"
examples="$repo/guest-examples/js"

die() { echo "build-guest-js: error: $*" >&2; exit 1; }

case "${LOCKGATE_JS_BACKEND:-qjs}" in
    qjs | quickjs)
        # lockgate links components without component-model-async (it slows every call), so
        # QuickJS is built in its synchronous mode (async exports would not load).
        backend=qjs
        backend_args=(--backend qjs --backend-qjs-disable-async)
        out="$out_root/js"
        ;;
    sm | starlingmonkey)
        backend=starlingmonkey
        # Without these, StarlingMonkey components import wasi:http (fetch, incoming handler).
        backend_args=(--backend starlingmonkey -d http -d fetch-event)
        out="$out_root/js-starlingmonkey"
        ;;
    *) die "LOCKGATE_JS_BACKEND must be qjs or starlingmonkey, not \`$LOCKGATE_JS_BACKEND\`" ;;
esac

mkdir -p "$tc" "$out"
# One run at a time per toolchain (tests may run this script concurrently).
exec 9>"$toolchains/js.lock"
flock 9

# --- toolchain -------------------------------------------------------------------------------
command -v node >/dev/null || die "node is needed (apt-get install nodejs npm)"
command -v npm >/dev/null || die "npm is needed (apt-get install npm)"
pins_hash="$(cat "$pins/package.json" "$pins/package-lock.json" | sha256sum | cut -c1-64)"
jco="$tc/node_modules/.bin/jco"
if [[ ! -x "$jco" || "$(cat "$tc/.pins-sha256" 2>/dev/null)" != "$pins_hash" ]]; then
    echo "build-guest-js: installing the pinned jco toolchain into $tc" >&2
    rm -rf "$tc/node_modules" "$tc/.pins-sha256"
    cp "$pins/package.json" "$pins/package-lock.json" "$tc/"
    (cd "$tc" && npm ci --no-audit --no-fund --loglevel=error) || die "npm ci in $tc failed"
    echo "$pins_hash" > "$tc/.pins-sha256"
fi
jco_version="$("$jco" --version)" || die "$jco does not run"

# --- which guests ----------------------------------------------------------------------------
names=("$@")
if [[ ${#names[@]} -eq 0 ]]; then
    for dir in "$examples"/*/; do
        names+=("$(basename "$dir")")
    done
fi
[[ ${#names[@]} -gt 0 ]] || die "no guests found in $examples"

# Hash of every file under the given paths (names and contents).
tree_hash() {
    (cd "$repo" && find "$@" -type f ! -path '*/node_modules/*' -print0 \
        | LC_ALL=C sort -z | xargs -0 sha256sum) | sha256sum | cut -c1-64
}
common_hash="$(tree_hash wit sdk/js scripts/toolchains/js scripts/build-guest-js.sh)"

# A component starts with the wasm magic then version 0x0d, layer 1; a core module has 01 00 00 00.
component_header="0061736d0d000100"

build_dir="$(mktemp -d "$out/.build.XXXXXX")"
trap 'rm -rf "$build_dir"' EXIT

for name in "${names[@]}"; do
    src="$examples/$name"
    [[ -f "$src/handler.js" ]] || die "$src/handler.js not found (a JS guest is a directory with handler.js)"
    wasm="$out/$name.wasm"
    inputs="$(printf '%s\n%s\n%s\n%s\n' "$jco_version" "$backend" "$common_hash" \
        "$(tree_hash "guest-examples/js/$name")" | sha256sum | cut -c1-64)"
    if [[ -f "$wasm" && "$(cat "$out/$name.inputs-sha256" 2>/dev/null)" == "$inputs" ]]; then
        echo "$wasm"
        continue
    fi
    # The handler imports "lockgate-sdk": give the bundler the SDK as a package beside it. Work on
    # a copy of wit/, which jco rewrites when the code needs host APIs lockgate does not provide.
    stage="$build_dir/$name"
    mkdir -p "$stage/node_modules"
    cp -R "$src" "$stage/app"
    cp -R "$repo/sdk/js" "$stage/node_modules/lockgate-sdk"
    cp -R "$repo/wit" "$stage/wit"
    echo "build-guest-js: building $name ($backend)" >&2
    if ! (cd "$stage" && "$jco" componentize "$stage/app/handler.js" --bundle --wit wit --world-name handler \
        "${backend_args[@]}" -o out.wasm >"$stage/jco.log" 2>&1); then
        cat "$stage/jco.log" >&2
        die "jco componentize failed for $name"
    fi
    if ! diff -r "$repo/wit" "$stage/wit" >"$stage/wit.diff" 2>&1; then
        cat "$stage/jco.log" >&2
        grep '^>' "$stage/wit.diff" >&2 || cat "$stage/wit.diff" >&2
        die "$name uses an API that needs host imports outside the lockgate:handler world (see the lines jco added above); lockgate does not provide them"
    fi
    [[ -f "$stage/out.wasm" ]] || { cat "$stage/jco.log" >&2; die "jco produced no component for $name"; }
    header="$(head -c 8 "$stage/out.wasm" | od -An -tx1 | tr -d ' \n')"
    [[ "$header" == "$component_header" ]] || die "$name: output is not a component (header $header)"
    mv "$stage/out.wasm" "$wasm"
    echo "$inputs" > "$out/$name.inputs-sha256"
    echo "$wasm"
done
