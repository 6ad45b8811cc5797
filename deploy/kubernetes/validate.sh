#!/usr/bin/env bash
# Validates the manifests of this directory (validate.py) with the official `kubernetes` Python
# client, installed on first use into a venv under ~/.cache/lockgate (pinned; needs python3 >= 3.11
# with venv, and PyPI). Arguments go to validate.py (`--fixture`).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${LOCKGATE_K8S_VENV:-$HOME/.cache/lockgate/k8s-venv}"
client_version="37.0.3"

if ! "$venv/bin/python" -c "import kubernetes, sys; sys.exit(kubernetes.__version__ != '$client_version')" 2>/dev/null; then
    echo "validate.sh: installing kubernetes==$client_version into $venv" >&2
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check "kubernetes==$client_version" >&2
fi
exec "$venv/bin/python" "$here/validate.py" "$@"
