"""What a run's Prefect client pays for TLS it never uses.

A run reaches the Prefect API through the run gateway over plain HTTP, yet Prefect's
client makes a TLS context from its CA file (`PREFECT_API_SSL_CERT_FILE`, else certifi's
bundle) for every client it opens and for every server version check. An isolated run's
worker points that setting at a one-certificate file in the tunnel's directory
(`prefect_managed/gateway/tunnel.py`, `NO_TLS_CA`).

Two figures, each measured here:

- `context_cost`: the CPU of one `ssl.create_default_context(cafile=...)` in a container of
  the runtime image, with certifi's bundle and with the one-certificate file, side by side.
- `FileOpens`: how many times the processes of a run open the CA file, counted on the host
  with inotify (the file is bind-mounted into the run's container, so its opens there are
  opens of the host's inode). `python -m benchmarks` counts them during its trivial runs.

    python -m benchmarks.tls_contexts [--samples 200] [--image prefect-managed-runtime:<version>]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import struct
import subprocess
from pathlib import Path

from prefect_managed.gateway.tunnel import NO_TLS_CA_SOURCE

CA_FILE = NO_TLS_CA_SOURCE

_IN_OPEN = 0x20
#: Watched too: inotify merges an event into an identical one not yet read, and an open's
#: close between two opens keeps them apart.
_IN_CLOSE_NOWRITE = 0x10
_IN_Q_OVERFLOW = 0x4000  # events were lost
_IN_IGNORED = 0x8000  # the watch is gone (the file was replaced or removed)
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)

#: Run in the container: CPU milliseconds of one context from each file (process time).
SCRIPT = """
import json, ssl, sys, time, certifi
samples = int(sys.argv[1])
out = {}
for name, path in (("bundle", certifi.where()), ("one_certificate", "/ca/one.pem")):
    ssl.create_default_context(cafile=path)  # the file in the page cache
    start = time.process_time()
    for _ in range(samples):
        ssl.create_default_context(cafile=path)
    out[name] = (time.process_time() - start) / samples * 1000
print(json.dumps(out))
"""


def context_cost(image: str, samples: int) -> dict[str, float]:
    """Milliseconds of CPU per TLS context: {"bundle": ..., "one_certificate": ...}."""
    output = subprocess.run(
        [
            "docker",
            "run",
            "--rm",
            "--network",
            "none",
            "-v",
            f"{CA_FILE}:/ca/one.pem:ro",
            "--entrypoint",
            "python",
            image,
            "-c",
            SCRIPT,
            str(samples),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


class FileOpens:
    """Counts the opens of one file (by any process, in any container) while in the block:
    a lower bound, as two opens at the same moment are one event. Raises when events were
    lost or the file was replaced meanwhile (its new inode is not watched)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        self._fd = -1

    def __enter__(self) -> FileOpens:
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if (
            libc.inotify_add_watch(self._fd, str(self.path).encode(), _IN_OPEN | _IN_CLOSE_NOWRITE)
            < 0
        ):
            os.close(self._fd)
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {self.path}")
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            while True:
                try:
                    data = os.read(self._fd, 65536)
                except BlockingIOError:
                    break
                offset = 0
                while offset < len(data):
                    _, mask, _, length = _EVENT.unpack_from(data, offset)
                    if mask & (_IN_Q_OVERFLOW | _IN_IGNORED):
                        raise RuntimeError(f"the opens of {self.path} were not all seen")
                    if mask & _IN_OPEN:
                        self.count += 1
                    offset += _EVENT.size + length
        finally:
            os.close(self._fd)


def main() -> None:
    import prefect

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--image", default=f"prefect-managed-runtime:{prefect.__version__}")
    args = parser.parse_args()
    cost = context_cost(args.image, args.samples)
    print(f"CPU per TLS context, mean of {args.samples}, in a container of {args.image}:")
    print(f"  certifi's bundle (Prefect's default)  {cost['bundle']:7.2f} ms")
    print(f"  the one-certificate file              {cost['one_certificate']:7.2f} ms")


if __name__ == "__main__":
    main()
