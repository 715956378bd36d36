#!/bin/sh
# Container entry: `label` (default) starts the labeling app, `viewer` the diagnosis viewer;
# anything else runs as a command (e.g. `glom stats`).
set -e
case "${1:-label}" in
  label)
    glom db upgrade
    glom demo --if-empty
    exec python app/serve.py --host 0.0.0.0 --port 8501 ;;
  viewer)
    glom db upgrade
    exec python app/viewer.py --host 0.0.0.0 --port 7860 ;;
  *)
    exec "$@" ;;
esac
