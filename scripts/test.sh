#!/usr/bin/env bash
# Runs every test: the host workspace (unit + integration tests, which build the guest examples
# themselves) and the guests' native tests through the SDK's test host.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/lockgate/target}"

rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2

cargo test --workspace --locked
(cd guest-examples && cargo test --workspace --locked --target-dir "$CARGO_TARGET_DIR/guest-native")
