#!/usr/bin/env bash
# Set up, put demo images in the store if it is empty, and start the labeling app on 127.0.0.1:8501.
set -euo pipefail
cd "$(dirname "$0")/.."
.ci/setup-venv.sh
.venv/bin/glom demo --if-empty
exec .venv/bin/streamlit run app/label.py --server.address "${GLOM_HOST:-127.0.0.1}" --server.port "${GLOM_PORT:-8501}" "$@"
