#!/bin/bash
# The official Prefect image's entrypoint contract: install EXTRA_PIP_PACKAGES
# with uv, then run the command. A failed install exits non-zero before the
# command starts.
set -e

if [ -n "$EXTRA_PIP_PACKAGES" ]; then
  # The workspace's dependency cache (a named volume, UV_CACHE_DIR) speeds the
  # install up but must never fail it: without a writable cache, install without.
  if [ -n "${UV_CACHE_DIR:-}" ] && ! { mkdir -p "$UV_CACHE_DIR" 2>/dev/null && [ -w "$UV_CACHE_DIR" ]; }; then
    echo "prefect-managed: the dependency cache $UV_CACHE_DIR is not writable by uid $(id -u); installing without it"
    unset UV_CACHE_DIR PREFECT_MANAGED_CACHE_MAX_BYTES
  fi
  echo "+uv pip install $EXTRA_PIP_PACKAGES"
  # No globbing: requirement strings such as 'pkg[extra]' are passed as they are.
  # The image's Python is the virtual environment in VIRTUAL_ENV (Debian's own
  # Python is externally managed), so uv installs there rather than --system.
  set -f
  if [ -n "${PREFECT_MANAGED_CACHE_MAX_BYTES:-}" ]; then
    # uv's summary (" + name==version") names the packages taken from the cache:
    # the eviction script marks them used, then trims the cache to its bound.
    installed=$(mktemp)
    set +e
    uv pip install $EXTRA_PIP_PACKAGES 2>&1 | tee "$installed"
    status=${PIPESTATUS[0]}
    set -e
    if [ "$status" -ne 0 ]; then
      exit "$status"
    fi
    python -I -S /opt/prefect/cache_evict.py "$installed" || echo "prefect-managed: cache eviction failed; the run goes on"
    rm -f "$installed"
  else
    uv pip install $EXTRA_PIP_PACKAGES
  fi
  set +f
fi

# Prefect's executor, started by the pre-fork executor (prefork.py: Prefect imported once
# for the runner, the workspace supervisor and the engine). PREFECT_MANAGED_EXECUTOR=stock
# in a run's environment keeps Prefect's own command.
# (An image derived from this one without `python` on the PATH keeps Prefect's command.)
if [ "$*" = "prefect flow-run execute" ] && [ "${PREFECT_MANAGED_EXECUTOR:-prefork}" != stock ] \
    && [ -f /opt/prefect/prefork.py ] && command -v python >/dev/null 2>&1; then
  exec python /opt/prefect/prefork.py
fi

if [ -z "$*" ]; then
  exec bash --login
else
  exec "$@"
fi
