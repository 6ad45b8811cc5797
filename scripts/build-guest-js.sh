#!/usr/bin/env bash
# Builds the js examples in guest-examples/js/<name>/ with `lockgate build` and prints the path of
# each component (~/.cache/lockgate/guests/js/<name>.wasm).
#
#   scripts/build-guest-js.sh [name...]      # default: every example
#   LOCKGATE_JS_BACKEND=starlingmonkey scripts/build-guest-js.sh   # -> guests/js-starlingmonkey/
source "$(dirname "$0")/lib/lockgate-build.sh"
if [[ "${LOCKGATE_JS_BACKEND:-qjs}" == starlingmonkey || "${LOCKGATE_JS_BACKEND:-}" == sm ]]; then
    build_examples js js-starlingmonkey "$@"
else
    build_examples js js "$@"
fi
