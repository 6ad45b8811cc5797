#!/usr/bin/env bash
# Builds the c examples in guest-examples/c/<name>/ with `lockgate build` and prints the path of
# each component (~/.cache/lockgate/guests/c/<name>.wasm).
#
#   scripts/build-guest-c.sh [name...]      # default: every example
source "$(dirname "$0")/lib/lockgate-build.sh"
build_examples c c "$@"
