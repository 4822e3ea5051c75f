#!/usr/bin/env bash
# Installs and starts what prefect-managed needs on a fresh Debian machine, and skips
# what is already there: Debian's Docker engine (started in the background when no
# engine answers), mmdebstrap, git and chromium, a virtualenv in .venv with the package
# and its test, dev, docs and bench extras, and the local runtime image.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v mmdebstrap >/dev/null 2>&1 || missing+=(mmdebstrap)
command -v git >/dev/null 2>&1 || missing+=(git)
# Debian's chromium, driven headless by Playwright in tests/test_ui.py.
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
# Debian's PostgreSQL: tests/test_serve.py starts a throwaway cluster of its own with
# initdb and pg_ctl (Debian keeps them in /usr/lib/postgresql/<version>/bin).
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
# Debian's Redis: tests/topology.py starts one for Prefect's HA topology (prefect-redis).
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]} from Debian's packages..." >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! docker version --format '{{.Server.Version}}' >/dev/null 2>&1; then
  echo "setup: starting the Docker engine..." >&2
  $SUDO mkdir -p /var/log
  $SUDO sh -c 'nohup dockerd >/var/log/prefect-managed-dockerd.log 2>&1 &'
  for _ in $(seq 1 60); do
    docker version --format '{{.Server.Version}}' >/dev/null 2>&1 && break
    sleep 1
  done
  docker version --format 'setup: Docker engine {{.Server.Version}} is up' >&2
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv..." >&2
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q uv
.venv/bin/python -m uv pip install -q --python .venv/bin/python -e ".[test,dev,docs,bench]"

# Code-source tests (tests/test_sources_storage.py): Azurite, the Azure Blob Storage
# emulator, from npm into the gitignored .tools/ (the S3 and GCS emulators are Python
# packages of the test extra). Skipped when this version is already there.
AZURITE_VERSION=3.35.0
if ! grep -qs "\"version\": \"$AZURITE_VERSION\"" .tools/node_modules/azurite/package.json; then
  if ! command -v npm >/dev/null 2>&1; then
    echo "setup: installing npm from Debian's packages..." >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq npm >/dev/null
  fi
  echo "setup: installing azurite $AZURITE_VERSION from npm into .tools/..." >&2
  mkdir -p .tools
  npm install --prefix .tools --no-audit --no-fund --no-save --silent "azurite@$AZURITE_VERSION" >/dev/null
fi

# The runtime image carries the worker's Prefect version; Docker's layer cache makes
# this a no-op when nothing changed. An extra CA bundle (SSL_CERT_FILE) lets pip and uv
# inside containers trust a TLS-intercepting proxy.
ca_args=()
[ -n "${SSL_CERT_FILE:-}" ] && [ -f "${SSL_CERT_FILE}" ] && ca_args=(--ca-bundle "$SSL_CERT_FILE")
.venv/bin/prefect-managed image build "${ca_args[@]}" >/dev/null
echo "setup: ready (runtime image $(.venv/bin/python -c 'from prefect_managed.runtime.builder import default_runtime_tag as t; print(t())'))" >&2
