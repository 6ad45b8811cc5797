#!/usr/bin/env bash
# The demo: builds the example guests and the runtime, validates runtime.toml, then runs each
# example guest against its fixture messages on the in-memory test host, showing outputs,
# retries, rejections and the sandbox stopping a hostile guest.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/lockgate/target}"

scripts/build-guests.sh >/dev/null
# The dev profile shares its build with the tests; a release build of wasmtime takes minutes.
cargo build --locked -p lockgate --bin lockgate
lockgate="$CARGO_TARGET_DIR/debug/lockgate"
wasm=guest-examples/target/wasm32-wasip2/release

run() { echo; echo "\$ lockgate $*"; "$lockgate" "$@"; }

run check runtime.toml
run test "$wasm/uppercase.wasm" --input tests/fixtures/uppercase/input.jsonl --config target=shouted \
  --expect tests/fixtures/uppercase/expected.jsonl
run test "$wasm/router.wasm" --input tests/fixtures/router/input.jsonl \
  --config route.order=orders --config route.refund=refunds --config default=misc \
  --expect tests/fixtures/router/expected.jsonl
run test "$wasm/flaky.wasm" --input tests/fixtures/flaky/input.jsonl --config target=done \
  --config fail_attempts=2 --expect tests/fixtures/flaky/expected.jsonl
run test "$wasm/adversarial.wasm" --input tests/fixtures/adversarial/input.jsonl \
  --timeout-ms 200 --max-memory-mb 32 --expect tests/fixtures/adversarial/expected.jsonl
