#!/usr/bin/env bash
# Sets up a virtualenv and runs the whole system on its embedded default (Redis, a MongoDB-compatible
# and a Kafka-compatible server under DM_HOME, no servers to install). Arguments go to `dm up`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DM_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e .
exec "$VENV/bin/dm" up "$@"
