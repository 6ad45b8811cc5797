#!/usr/bin/env bash
# Builds the python examples in guest-examples/python/<name>/ with `lockgate build` and prints the path of
# each component (~/.cache/lockgate/guests/python/<name>.wasm).
#
#   scripts/build-guest-python.sh [name...]      # default: every example
source "$(dirname "$0")/lib/lockgate-build.sh"
build_examples python python "$@"
