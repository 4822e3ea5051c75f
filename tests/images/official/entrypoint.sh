#!/usr/bin/env bash
# The official image's entrypoint contract: install EXTRA_PIP_PACKAGES into the system
# interpreter with uv, then run the command (a shell when there is none).
set -e

if [ -f ~/.bashrc ]; then
  . ~/.bashrc
fi

if [ -n "$EXTRA_PIP_PACKAGES" ]; then
  echo "+uv pip install $EXTRA_PIP_PACKAGES"
  uv pip install --system $EXTRA_PIP_PACKAGES 2>&1 | tee /tmp/uv-install.log
  status=${PIPESTATUS[0]}
  if [ "$status" -ne 0 ]; then
    exit "$status"
  fi
fi

if [ -z "$*" ]; then
  exec bash --login
else
  exec "$@"
fi
