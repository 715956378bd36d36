#!/usr/bin/env bash
# The whole test suite, from any state: venv, Debian packages, PostgreSQL on loopback, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
.ci/setup-venv.sh
.ci/system-deps.sh
export GLOM_TEST_PG=${GLOM_TEST_PG:-$(.ci/postgres.sh)}
export GLOM_REQUIRE_PG=1 TQDM_DISABLE=1
exec .venv/bin/python -m pytest "$@"
