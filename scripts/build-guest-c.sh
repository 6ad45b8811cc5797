#!/usr/bin/env bash
# Builds the C example handlers in guest-examples/c/<name>/ as components and prints the path of
# each .wasm: ${LOCKGATE_GUEST_OUT:-$HOME/.cache/lockgate/guests}/c/<name>.wasm.
#
#   scripts/build-guest-c.sh [name...]     # default: every directory in guest-examples/c/
#
# Installs what is missing first: Debian's clang-19, lld-19, wasi-libc and
# libclang-rt-19-dev-wasm32 (apt-get), wit-bindgen-cli and wasm-tools (cargo install) and the WASI
# reactor adapter (from a crate fetched by cargo), the last three under
# ${LOCKGATE_TOOLCHAINS:-$HOME/.cache/lockgate/toolchains}. Bindings are generated into a build
# directory, never into the repo. A guest whose inputs (its sources, sdk/c, wit/, this script,
# the tool versions) did not change since its last build is not rebuilt: the inputs' hash is kept
# next to the .wasm as <name>.wasm.inputs. Any failure stops the script with a non-zero status.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=lib/guest-toolchain.sh
source "$repo/scripts/lib/guest-toolchain.sh"

examples="$repo/guest-examples/c"
out="${LOCKGATE_GUEST_OUT:-$HOME/.cache/lockgate/guests}/c"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

names=("$@")
if [[ ${#names[@]} -eq 0 ]]; then
    for d in "$examples"/*/; do names+=("$(basename "$d")"); done
fi
for name in "${names[@]}"; do
    [[ -d "$examples/$name" ]] || die "no C guest example $examples/$name"
done

toolchain_lock
ensure_clang
ensure_wit_bindgen
ensure_wasm_tools
ensure_crate_files
toolchain_unlock

tools="$("$CLANG" --version | head -n 1); $("$WIT_BINDGEN" --version); $("$WASM_TOOLS" --version); $(sha256sum < "$ADAPTER")"
cflags=(--target=wasm32-wasi -mexec-model=reactor -Os -std=c11 -Wall -Wextra -Werror
    -Wl,--strip-debug)

exec 9>"$out/.lock"
flock 9
self_tested=0
for name in "${names[@]}"; do
    wasm="$out/$name.wasm"
    hash="$(inputs_hash "guest-examples/c/$name" sdk/c wit scripts/build-guest-c.sh \
        scripts/lib/guest-toolchain.sh -- "$tools" "${cflags[*]}")"
    if [[ -f "$wasm" && -f "$wasm.inputs" && "$(cat "$wasm.inputs")" == "$hash" ]]; then
        echo "$wasm"
        continue
    fi
    build="$out/.build/$name"
    rm -rf "$build"
    mkdir -p "$build"
    quiet "$WIT_BINDGEN" c --world handler --out-dir "$build/bindings" "$repo/wit"
    if [[ $self_tested -eq 0 ]]; then
        # lockgate.h's JSON scanner and formatter, natively, before anything is built on them.
        "$CLANG" -std=c11 -Wall -Wextra -Werror -Wno-format -O1 -I"$build/bindings" \
            -I"$repo/sdk/c" "$repo/sdk/c/lockgate_test.c" -o "$build/lockgate_test"
        "$build/lockgate_test" || die "sdk/c/lockgate.h self-test failed"
        self_tested=1
    fi
    sources=("$examples/$name"/*.c)
    "$CLANG" "${cflags[@]}" -I"$build/bindings" -I"$repo/sdk/c" -I"$examples/$name" \
        "${sources[@]}" "$build/bindings/handler.c" "$build/bindings/handler_component_type.o" \
        -o "$build/core.wasm"
    # A handler that uses no libc I/O imports nothing from WASI and needs no adapter; one that
    # does (printf, snprintf, fopen: wasi-libc speaks WASI preview 1) gets the reactor adapter,
    # which maps those calls to the WASI 0.2 the host links (stdout/stderr become log lines).
    adapt=()
    if "$WASM_TOOLS" print "$build/core.wasm" | grep '(import "wasi_snapshot_preview1"' >/dev/null; then
        adapt=(--adapt "wasi_snapshot_preview1=$ADAPTER")
    fi
    "$WASM_TOOLS" component new "${adapt[@]}" "$build/core.wasm" -o "$build/$name.wasm"
    check_component "$build/$name.wasm"
    mv -f "$build/$name.wasm" "$wasm"
    echo "$hash" > "$wasm.inputs"
    rm -rf "$build"
    rmdir "$out/.build" 2>/dev/null || true
    echo "$wasm"
done
