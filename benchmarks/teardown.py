"""What freezing the garbage collector at exit saves, in the runtime image's containers.

A run's container starts three interpreters that import Prefect (`prefect flow-run
execute`, the workspace supervisor, `prefect.engine`). Each one, at exit, would walk its
objects with the garbage collector; the runtime image's `prefect-managed-teardown.pth`
freezes them after the exit handlers instead. This benchmark runs containers of the local
runtime image that start three such interpreters (each imports what the stock path
imports, then exits), with the freeze (the image as built) and without it
(`PREFECT_MANAGED_GC_AT_EXIT=1`), interleaved, on Docker's default settings but the host
network, and prints the container's CPU seconds (its cgroup's counter, read as its last
act) and the wall time of `docker run`, medians side by side.

    python -m benchmarks.teardown [--samples 10] [--image prefect-managed-runtime:<version>]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

#: Three interpreters, as in a run's container, then the container's CPU in nanoseconds
#: from its cgroup (v1: cpuacct.usage; v2: cpu.stat's usage_usec).
SCRIPT = """
for module in prefect.cli prefect.runner prefect.flow_engine; do
  python -c "import prefect.main, $module" || exit 1
done
if [ -r /sys/fs/cgroup/cpuacct/cpuacct.usage ]; then
  cat /sys/fs/cgroup/cpuacct/cpuacct.usage
else
  echo $(( $(sed -n 's/^usage_usec //p' /sys/fs/cgroup/cpu.stat) * 1000 ))
fi
"""


def sample(image: str, freeze: bool) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one container."""
    command = ["docker", "run", "--rm", "--network", "host", "--entrypoint", "sh"]
    if not freeze:
        command += ["-e", "PREFECT_MANAGED_GC_AT_EXIT=1"]
    started = time.monotonic()
    done = subprocess.run(
        [*command, image, "-c", SCRIPT], capture_output=True, text=True, timeout=300
    )
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"the container failed: {done.stderr[-2000:]}")
    return int(done.stdout.split()[-1]) / 1e9, wall


def main(argv: list[str] | None = None) -> int:
    from prefect_managed.runtime.builder import default_runtime_tag

    parser = argparse.ArgumentParser(prog="python -m benchmarks.teardown", description=__doc__)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--image", default=default_runtime_tag())
    args = parser.parse_args(argv)
    found = subprocess.run(
        ["docker", "image", "inspect", args.image], capture_output=True, text=True
    )
    if found.returncode != 0:
        raise SystemExit(f"No image {args.image!r}: run scripts/setup.sh first.")
    measured: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    sample(args.image, True)  # the image's files in the page cache for both
    for index in range(args.samples):
        # Interleaved, the order alternating: load from elsewhere falls on both alike.
        for freeze in (True, False) if index % 2 == 0 else (False, True):
            measured[freeze].append(sample(args.image, freeze))
        print(f"sample {index + 1}/{args.samples}", flush=True)

    def med(freeze: bool, field: int) -> float:
        return statistics.median(value[field] for value in measured[freeze])

    print(f"\n{args.image}, 3 interpreters per container, medians of {args.samples}:\n")
    print("| measurement | frozen at exit | Python's teardown | saved | ratio |")
    print("|---|---|---|---|---|")
    for name, field in (("container CPU seconds", 0), ("`docker run` wall seconds", 1)):
        on, off = med(True, field), med(False, field)
        print(f"| {name} | {on:.3f} | {off:.3f} | {off - on:+.3f} | {on / off:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
