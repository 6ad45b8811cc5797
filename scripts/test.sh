#!/usr/bin/env bash
# Runs every test: the host workspace (unit + integration tests, which build the guest examples
# themselves; the Kafka ones against a real broker that this script starts) and the guests' native
# tests through the SDK's test host.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/lockgate/target}"

scripts/deps.sh
# The Kafka integration tests talk to a real broker on 127.0.0.1 (started only if its port is
# closed; see scripts/brokers.sh).
scripts/brokers.sh start kafka

cargo test --workspace --locked
(cd guest-examples && cargo test --workspace --locked --target-dir "$CARGO_TARGET_DIR/guest-native")
