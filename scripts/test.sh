#!/usr/bin/env bash
# Sets up a virtualenv with everything the tests need, then runs lint, types and the whole test suite.
# The tests start their own Redis, MongoDB-compatible and Kafka-compatible servers on free ports.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DM_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[dev]"
./scripts/ci-deps.sh   # headless Chromium for the browser test (Debian packages; quick when present)
echo "== ruff"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
echo "== mypy"
"$VENV/bin/mypy"
if [ "$#" -gt 0 ]; then  # arguments: run just what they select
  echo "== pytest $*"
  exec "$VENV/bin/pytest" "$@"
fi
# the fast unit tests first (the domain against in-memory ports, no server), then the rest
echo "== pytest -m unit"
"$VENV/bin/pytest" -q -m unit
echo "== pytest (servers: Redis, MongoDB-compatible, Kafka-compatible, started by the fixtures)"
"$VENV/bin/pytest" -m "not unit"
