#!/usr/bin/env bash
# Installs what building and testing lockgate needs beyond Rust itself, when missing: the
# wasm32-wasip2 target (guests), cmake and the curl headers (rdkafka builds librdkafka from
# source; Debian's librdkafka is too old). Safe to run repeatedly; prints nothing when all is
# there.
set -euo pipefail

if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    rustup target add wasm32-wasip2
fi

missing=()
command -v cmake >/dev/null || missing+=(cmake)
[[ -f /usr/include/curl/curl.h || -f /usr/include/x86_64-linux-gnu/curl/curl.h ]] \
    || missing+=(libcurl4-openssl-dev)
if (( ${#missing[@]} )); then
    echo "installing ${missing[*]} (apt)"
    sudo_=()
    [[ $(id -u) -eq 0 ]] || sudo_=(sudo)
    if ! "${sudo_[@]}" apt-get install -y -q "${missing[@]}" >/dev/null; then
        "${sudo_[@]}" apt-get update -q >/dev/null
        "${sudo_[@]}" apt-get install -y -q "${missing[@]}" >/dev/null
    fi
fi
