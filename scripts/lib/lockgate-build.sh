# Sourced by scripts/build-guest-{python,js,go,c}.sh: builds examples of guest-examples/<lang>/
# with `lockgate build` (which installs the pinned toolchain on first use and rebuilds only what
# changed; docs/handlers/projects.md) into ${LOCKGATE_GUEST_OUT:-~/.cache/lockgate/guests}/<lang>/
# and prints each component's path. The scripts exist for the examples in this checkout; a
# handler project anywhere else is built with `lockgate build <dir>` directly.
set -euo pipefail

# build_examples <lang folder> <out folder name> [name...]: every example when no name is given.
build_examples() {
    local lang="$1" out_name="$2"; shift 2
    local repo; repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
    case "${1:-}" in
        -h|--help)
            echo "usage: $(basename "$0") [name...]   (builds guest-examples/$lang/<name>/; all without names)"
            exit 0 ;;
    esac
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/lockgate/target}"
    (cd "$repo" && cargo build --quiet --locked -p lockgate --bin lockgate)
    local lockgate="$CARGO_TARGET_DIR/debug/lockgate"
    local out="${LOCKGATE_GUEST_OUT:-$HOME/.cache/lockgate/guests}/$out_name"
    local names=("$@")
    if [[ ${#names[@]} -eq 0 ]]; then
        for d in "$repo/guest-examples/$lang"/*/; do names+=("$(basename "$d")"); done
    fi
    for name in "${names[@]}"; do
        "$lockgate" build "$repo/guest-examples/$lang/$name" -o "$out/$name.wasm"
    done
}
