#!/usr/bin/env bash
# The demo: builds the example guests and lockgate, feeds messages (good, flaky, poison and a
# duplicate) to the embedded broker, runs the routes of runtime.toml until everything is handled,
# stops with SIGTERM and prints what landed in each output and dead-letter topic. Uses a fresh
# state directory, so it can run any number of times.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/lockgate/target}"

scripts/deps.sh
scripts/build-guests.sh >/dev/null
# The dev profile shares its build with the tests; a release build of wasmtime takes minutes.
cargo build --locked -p lockgate --bin lockgate
lockgate="$CARGO_TARGET_DIR/debug/lockgate"
wasm=guest-examples/target/wasm32-wasip2/release
state="$(mktemp -d)"
pid=""
cleanup() {
    [[ -n "$pid" ]] && kill "$pid" 2>/dev/null || true
    rm -rf "$state"
}
trap cleanup EXIT

run() { echo; echo "\$ lockgate $*"; "$lockgate" "$@"; }
count() { "$lockgate" tail "$1" --json --state-dir "$state" | wc -l; }

run check runtime.toml
run send incoming --file scripts/demo/incoming.jsonl --state-dir "$state"
run send payments --file scripts/demo/payments.jsonl --state-dir "$state"
run send words "hello from the demo" --state-dir "$state"

echo
echo "\$ lockgate run runtime.toml --state-dir $state   # in the background, stopped below"
"$lockgate" run runtime.toml --state-dir "$state" &
pid=$!

# Wait until every message is handled: outputs plus dead letters reach what was sent (the
# duplicate order is skipped, so incoming yields 5 of 6).
deadline=$((SECONDS + 120))
until (( $(count orders.accepted) + $(count refunds) + $(count misc) + $(count incoming.dlq) >= 5 \
      && $(count payments.done) + $(count payments.dlq) >= 5 && $(count shouted) >= 1 )); do
    if (( SECONDS > deadline )); then
        echo "demo: messages were not handled within 120 s" >&2
        exit 1
    fi
    kill -0 "$pid" || { echo "demo: lockgate run exited early" >&2; exit 1; }
    sleep 0.2
done
kill -TERM "$pid"
wait "$pid"
pid=""

for topic in orders.accepted refunds misc incoming.dlq payments.done payments.dlq shouted; do
    run tail "$topic" --state-dir "$state"
done

# The dead letters as an operator sees them, and what a replay would do once the handler is fixed.
run dlq list --config runtime.toml --state-dir "$state"
run dlq replay --config runtime.toml --state-dir "$state" --dry-run

# The sandbox: a hostile guest's infinite loop, memory bomb and file/socket/env access all fail.
run test "$wasm/adversarial.wasm" --input tests/fixtures/adversarial/input.jsonl \
  --timeout-ms 200 --max-memory-mb 32 --expect tests/fixtures/adversarial/expected.jsonl
