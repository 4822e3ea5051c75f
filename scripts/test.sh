#!/usr/bin/env bash
# The tests: sets up what they need (scripts/setup.sh), then runs pytest against a real
# Prefect server, Docker engine, git daemon and package index, all on loopback.
#
# With no arguments, the whole suite in two phases. First every test that can share the
# Docker engine, in PREFECT_MANAGED_TEST_PROCESSES pytest-xdist processes (default 2; a
# test file stays in one process, and each process starts its own services); most of these
# tests wait on Prefect and on containers, not on the CPU. Then the tests marked `serial`,
# which need the engine to themselves (a Docker restart, a host's room, the engine's
# events), in one process. It fails when either phase fails or selects no test.
#
# Extra arguments run pytest once with them, e.g. `bash scripts/test.sh -k pip_packages`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
pytest=(.venv/bin/pytest -p no:cacheprovider -ra --durations=30)
if [ "$#" -gt 0 ]; then
    exec "${pytest[@]}" "$@"
fi
started=$SECONDS
status=0
"${pytest[@]}" -m "not serial" -n "${PREFECT_MANAGED_TEST_PROCESSES:-2}" --dist loadfile \
    || status=$?
shared_seconds=$((SECONDS - started))
if [ "$status" -ge 2 ] && [ "$status" -le 4 ]; then
    # Interrupted, or pytest could not run: not the moment for a Docker restart.
    echo "tests: the shared phase stopped with pytest's exit status ${status}; no serial phase"
    exit "$status"
fi
"${pytest[@]}" -m serial || { code=$?; [ "$status" -ne 0 ] || status=$code; }
echo "tests: the shared phase took ${shared_seconds} s, the serial phase" \
    "$((SECONDS - started - shared_seconds)) s; pytest's exit status ${status}"
exit "$status"
