#!/bin/bash
# The official Prefect image's entrypoint contract: install EXTRA_PIP_PACKAGES
# with uv, then run the command. A failed install exits non-zero before the
# command starts.
set -e

if [ -n "$EXTRA_PIP_PACKAGES" ]; then
  echo "+uv pip install $EXTRA_PIP_PACKAGES"
  # No globbing: requirement strings such as 'pkg[extra]' are passed as they are.
  # The image's Python is the virtual environment in VIRTUAL_ENV (Debian's own
  # Python is externally managed), so uv installs there rather than --system.
  set -f
  uv pip install $EXTRA_PIP_PACKAGES
  set +f
fi

if [ -z "$*" ]; then
  exec bash --login
else
  exec "$@"
fi
