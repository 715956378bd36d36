#!/usr/bin/env bash
# Set up, put demo images in the store if it is empty, and start the labeling app on 127.0.0.1:8501.
# On loopback (the default) it runs in single-user mode: no password, labels attributed to your
# login ($GLOM_LOCAL_USER to choose another name). With GLOM_HOST set to another address everyone
# signs in with an account: create the first one with `.venv/bin/glom user add NAME --role admin`.
set -euo pipefail
cd "$(dirname "$0")/.."
.ci/setup-venv.sh
.venv/bin/glom demo --if-empty
host=${GLOM_HOST:-127.0.0.1}
single=()
case "$host" in 127.*|localhost|::1) single=(--single-user) ;; esac
exec .venv/bin/python app/serve.py --host "$host" --port "${GLOM_PORT:-8501}" "${single[@]}" "$@"
