#!/usr/bin/env bash
# Builds the go examples in guest-examples/go/<name>/ with `lockgate build` and prints the path of
# each component (~/.cache/lockgate/guests/go/<name>.wasm).
#
#   scripts/build-guest-go.sh [name...]      # default: every example
source "$(dirname "$0")/lib/lockgate-build.sh"
build_examples go go "$@"
