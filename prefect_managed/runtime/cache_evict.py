"""Keep a workspace's dependency cache (uv's cache on a named volume) within its bound.

Run by the runtime image's entrypoint after ``uv pip install``, inside the run's
container (so under its memory cap), with the path of the installer's output:

1. every package uv installed in this container came from the cache: its mark file
   (``<cache>/../used/<name>``) is touched, so its mtime says when it was last used;
2. when the cache holds more than ``PREFECT_MANAGED_CACHE_MAX_BYTES``, the packages
   used least recently (those without a mark first) are removed with
   ``uv cache clean <name>``, which takes uv's cache lock and so waits for installs in
   progress, until the cache holds at most 80 % of the bound.

Standard library only, started with ``python -I -S`` so that it costs milliseconds.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

LOW_WATERMARK = 0.8
INSTALLED = re.compile(r"^ \+ ([A-Za-z0-9][A-Za-z0-9._-]*)==")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def cache_size(root: Path) -> int:
    total = 0
    for directory, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_size
            except OSError:
                pass  # removed meanwhile by another run's eviction
    return total


def cached_packages(root: Path) -> set[str]:
    """Package names with wheels in uv's cache (``wheels-v*/{index/<hash>,pypi}/<name>``)."""
    names: set[str] = set()
    for bucket in root.glob("wheels-v*"):
        for parent in [*bucket.glob("index/*"), bucket / "pypi"]:
            if parent.is_dir():
                names.update(normalize(child.name) for child in parent.iterdir() if child.is_dir())
    return names


def mark_used(used: Path, output: Path) -> None:
    used.mkdir(parents=True, exist_ok=True)
    for line in output.read_text(errors="replace").splitlines():
        match = INSTALLED.match(line)
        if match:
            mark = used / normalize(match.group(1))
            mark.touch()
            os.utime(mark)


def last_used(used: Path, name: str) -> float:
    try:
        return (used / name).stat().st_mtime
    except FileNotFoundError:
        return 0.0


def evict(root: Path, used: Path, max_bytes: int) -> list[str]:
    size = cache_size(root)
    if size <= max_bytes:
        return []
    target = int(max_bytes * LOW_WATERMARK)
    evicted: list[str] = []
    for name in sorted(cached_packages(root), key=lambda n: (last_used(used, n), n)):
        if size <= target:
            break
        subprocess.run(["uv", "cache", "clean", "--quiet", name], check=False)
        (used / name).unlink(missing_ok=True)
        evicted.append(name)
        size = cache_size(root)
    print(
        f"prefect-managed: the dependency cache held more than {max_bytes} bytes; "
        f"evicted the least recently used: {' '.join(evicted)} (now {size} bytes)",
        flush=True,
    )
    return evicted


def main(argv: list[str]) -> int:
    root = Path(os.environ["UV_CACHE_DIR"])
    used = root.parent / "used"
    max_bytes = int(os.environ["PREFECT_MANAGED_CACHE_MAX_BYTES"])
    if len(argv) > 1:
        mark_used(used, Path(argv[1]))
    evict(root, used, max_bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
