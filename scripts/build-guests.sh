#!/usr/bin/env bash
# Builds the Rust example handlers in guest-examples/ as wasm32-wasip2 components and prints the
# path of each .wasm. GUEST_TARGET_DIR overrides the cargo target dir (default
# guest-examples/target). rustc emits a component directly for wasm32-wasip2 cdylibs, so there is
# no wasm-tools step; the script checks the component header instead of trusting that.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
guests="$repo/guest-examples"
target_dir="${GUEST_TARGET_DIR:-$guests/target}"
# cargo resolves a relative target dir against its cwd; pin it to where the caller meant.
case "$target_dir" in
    /*) ;;
    *) target_dir="$PWD/$target_dir" ;;
esac

if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    rustup target add wasm32-wasip2
fi

(cd "$guests" && cargo build --release --target wasm32-wasip2 --target-dir "$target_dir")

# Every member crate is a cdylib; its package name (first `name =`, in [package]) names the .wasm.
crates=()
for manifest in "$guests"/*/Cargo.toml; do
    crates+=("$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$manifest" | head -n 1)")
done

# A component starts with the wasm magic then version 0x0d, layer 1; a core module has 01 00 00 00.
component_header="0061736d0d000100"
status=0
for crate in "${crates[@]}"; do
    wasm="$target_dir/wasm32-wasip2/release/${crate//-/_}.wasm"
    if [[ ! -f "$wasm" ]]; then
        echo "error: $wasm was not produced" >&2
        status=1
        continue
    fi
    header="$(head -c 8 "$wasm" | od -An -tx1 | tr -d ' \n')"
    if [[ "$header" != "$component_header" ]]; then
        echo "error: $wasm is not a component (header $header)" >&2
        status=1
        continue
    fi
    echo "$wasm"
done
exit "$status"
