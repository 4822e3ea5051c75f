#!/usr/bin/env bash
# The tests: sets up what they need (scripts/setup.sh), then runs pytest against a real
# Prefect server, Docker engine, git daemon and package index, all on loopback.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k pip_packages`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pytest -p no:cacheprovider -ra --durations=30 "$@"
