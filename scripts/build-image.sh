#!/usr/bin/env bash
# Builds the lockgate container image (deploy/container/Containerfile) with buildah: FROM scratch,
# with the release binary (debug info stripped, symbols kept for backtraces), the shared
# libraries `ldd` names, CA certificates, a non-root user (10001 `lockgate`) and a writable
# /var/lib/lockgate. Prints the image's name and size. See docs/operate/production.md.
#
# Usage: scripts/build-image.sh [--binary PATH] [--tag NAME] [--context-only DIR]
#   --binary PATH       use this lockgate binary instead of building the release one
#                       (cargo build --release --locked -p lockgate --bin lockgate)
#   --tag NAME          the image name (default localhost/lockgate:<version>)
#   --context-only DIR  stage the build context in DIR and stop (for `podman build` or
#                       `docker build -f deploy/container/Containerfile DIR`)
#
# Storage: buildah keeps images in $LOCKGATE_CONTAINERS (default ~/.cache/lockgate/containers)
# with the vfs driver, which works as root without a daemon and inside a container, where
# overlay mounts are often refused; the build runs nothing inside the image (--isolation
# chroot is only a fallback for that). Use the same flags to read the image back, e.g.
#   buildah --root "$LOCKGATE_CONTAINERS/storage" --runroot "$LOCKGATE_CONTAINERS/run" \
#     --storage-driver vfs push localhost/lockgate:0.1.0 docker-archive:lockgate.tar
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/lockgate/target}"

binary=""
tag=""
context_only=""
while (( $# )); do
    case "$1" in
        --binary) binary="${2:?--binary needs a path}"; shift 2 ;;
        --tag) tag="${2:?--tag needs a name}"; shift 2 ;;
        --context-only) context_only="${2:?--context-only needs a directory}"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "build-image.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

need() {
    command -v "$1" >/dev/null || { echo "build-image.sh: $1 not found; $2" >&2; exit 1; }
}
need ldd "it comes with libc (Debian: libc-bin)"
need strip "it comes with binutils (apt-get install binutils)"
[[ -n "$context_only" ]] || need buildah "apt-get install buildah (Debian's package works as root without a daemon)"
certs=/etc/ssl/certs/ca-certificates.crt
[[ -f "$certs" ]] || { echo "build-image.sh: $certs missing; apt-get install ca-certificates" >&2; exit 1; }

if [[ -z "$binary" ]]; then
    cargo build --release --locked -p lockgate --bin lockgate >&2
    binary="$CARGO_TARGET_DIR/release/lockgate"
fi
[[ -x "$binary" ]] || { echo "build-image.sh: $binary is not an executable" >&2; exit 1; }
version="$("$binary" --version | awk '{ print $2 }')"
tag="${tag:-localhost/lockgate:$version}"

if [[ -n "$context_only" ]]; then
    mkdir -p "$context_only"
    ctx="$(cd "$context_only" && pwd)"
else
    ctx="$(mktemp -d)"
    trap 'rm -rf "$ctx"' EXIT
fi
root="$ctx/rootfs"
rm -rf "$root" "$ctx/state"
mkdir -p "$root/usr/local/bin" "$root/etc/ssl/certs" "$root/etc/lockgate" "$root/modules" "$root/var/lib" \
    "$root/tmp" "$ctx/state"
chmod 1777 "$root/tmp"

strip --strip-debug -o "$root/usr/local/bin/lockgate" "$binary"
chmod 0755 "$root/usr/local/bin/lockgate"

# Every library the dynamic loader will look for, at the path it looks (the loader itself at
# the interpreter path the binary names). glibc >= 2.34 has its `files` and `dns` name services
# built in, so host names resolve through /etc/hosts and the /etc/resolv.conf the runtime mounts.
ldd_out="$(ldd "$binary")"
if grep -q "not found" <<<"$ldd_out"; then
    echo "build-image.sh: $binary needs libraries this machine lacks:" >&2
    echo "$ldd_out" >&2
    exit 1
fi
while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done < <(awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$ldd_out")

cp -L "$certs" "$root/etc/ssl/certs/ca-certificates.crt"
# No login shell exists: the user is for file ownership and process identity only.
cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
lockgate:x:10001:10001:lockgate:/var/lib/lockgate:/sbin/nologin
EOF
cat >"$root/etc/group" <<'EOF'
root:x:0:
lockgate:x:10001:
EOF
cp deploy/container/Containerfile "$ctx/Containerfile"

if [[ -n "$context_only" ]]; then
    echo "$ctx"
    exit 0
fi

storage="${LOCKGATE_CONTAINERS:-$HOME/.cache/lockgate/containers}"
bah=(buildah --root "$storage/storage" --runroot "$storage/run" --storage-driver vfs)
"${bah[@]}" bud --quiet --isolation chroot --layers=false --format oci \
    --build-arg "VERSION=$version" -f "$ctx/Containerfile" -t "$tag" "$ctx" >/dev/null
size="$("${bah[@]}" images --format '{{.Size}}' "$tag" | head -n 1)"
echo "$tag $size"
