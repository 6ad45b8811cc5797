#!/usr/bin/env bash
# Runs every test: the host workspace (unit + integration tests, which build the guest examples
# themselves; the Kafka and NATS ones against real brokers that this script starts) and the guests' native
# tests through the SDK's test host.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/lockgate/target}"

scripts/deps.sh
# The Kafka and JetStream integration tests talk to real brokers on 127.0.0.1 (each started only
# if its port is closed; see scripts/brokers.sh).
scripts/brokers.sh start all

cargo test --workspace --locked
(cd guest-examples && cargo test --workspace --locked --target-dir "$CARGO_TARGET_DIR/guest-native")
