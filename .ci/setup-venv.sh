#!/usr/bin/env bash
# Create (or reuse) .venv with everything in requirements.txt and the project installed editable.
# A stamp of requirements.txt + pyproject.toml makes repeated runs instant when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-}
if [ -z "$py" ]; then
  # torch 2.14.1 / torchvision 0.29.1 install from this machine's disk for Python 3.11.
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then py=$cand; break; fi
  done
  py=${py:-python3}
fi
stamp=$(cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)
if [ -x .venv/bin/python ] && [ "$(cat .venv/.glom-stamp 2>/dev/null)" = "$stamp" ]; then
  exit 0
fi
echo "setting up .venv with $($py --version) (first run takes a few minutes: torch is large)" >&2
[ -x .venv/bin/python ] || "$py" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps -e .
echo "$stamp" > .venv/.glom-stamp
