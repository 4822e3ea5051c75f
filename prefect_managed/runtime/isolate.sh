#!/bin/sh
# The entrypoint of a container in runtime.network_mode "isolated" (mounted read-only at
# /run/prefect-managed): start the forwarder of the run's allowed destinations on the
# container's own loopback, then run the image's entrypoint and command unchanged.
#   isolate.sh GRANT LISTENERS -- IMAGE-ENTRYPOINT... COMMAND...
grant=$1
listeners=$2
shift 3
python=python3
command -v "$python" >/dev/null 2>&1 || python=python
if ! "$python" -I -S /run/prefect-managed/forward.py "$grant" "$listeners"; then
  echo "prefect-managed: the isolated network's forwarder did not start (it needs python3 in the image)" >&2
  exit 70
fi
[ "$#" -gt 0 ] || set -- /bin/sh
exec "$@"
