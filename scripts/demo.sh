#!/usr/bin/env bash
# The demo, from a fresh machine: set up (scripts/setup.sh), then a local Prefect server
# on SQLite, a git server holding examples/flows, a managed pool created with the Prefect
# CLI, a deployment with pip_packages, a worker, and one run in a capped container.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
