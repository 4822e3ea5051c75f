"""Where a run's container spends its CPU, read from the host while it runs.

`ContainerCpu` follows Docker's start events for containers with a given label and, for
each, reads every 10 ms its cgroup's CPU counter and the CPU of each of its processes
(`/proc/<pid>/stat`, all threads of the process), until the cgroup is gone. A process
that lives less than a read's interval may be missed; what the processes seen do not
account for is reported as `unseen`. Processes are named by what they are in a run:

- the pre-fork executor's processes by their session (they share one command line):
  `runner` is the first started (it imports Prefect and runs Prefect's runner; it may be
  the container's first process, which leads its session), `supervisor+engine` leads a
  session of its own (the zygote forks it with `setsid`; it runs the supervisor, then
  the engine in-process), `pull steps` is in that session (the supervisor's child);
- Prefect's own executor's by their command: `runner` (`prefect flow-run execute`),
  `supervisor+engine` (the workspace supervisor, which `exec`s the engine);
- `stub, waiter` (`python -I -S`: the pre-fork executor's stand-in for the supervisor,
  and the zygote once it has forked the supervisor), `git`, `tunnel` (`forward.py`),
  `entrypoint` (the image's shell scripts) and `other`.

Used by `python -m benchmarks` around each trivial run.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from statistics import median
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK")
_CGROUP_CANDIDATES = (
    "/sys/fs/cgroup/cpuacct/docker/{id}",  # cgroup v1, cgroupfs driver
    "/sys/fs/cgroup/cpu,cpuacct/docker/{id}",
    "/sys/fs/cgroup/docker/{id}",  # cgroup v2, cgroupfs driver
    "/sys/fs/cgroup/system.slice/docker-{id}.scope",  # cgroup v2, systemd driver
)


#: The cgroup that holds every container of the engine (cgroupfs driver); its counter keeps
#: the CPU of containers that have gone. With the systemd driver, containers share
#: system.slice with the machine's services, and no such figure is read.
_ALL_CONTAINERS = (
    "/sys/fs/cgroup/cpuacct/docker",
    "/sys/fs/cgroup/cpu,cpuacct/docker",
    "/sys/fs/cgroup/docker",
)


def _first_dir(candidates: Iterable[str]) -> Path | None:
    return next((Path(c) for c in candidates if Path(c).is_dir()), None)


def all_containers_cpu_seconds() -> float | None:
    """CPU seconds all of the engine's containers have used so far, the ones that have
    exited included; None where they cannot be told apart from the machine's services."""
    path = _first_dir(_ALL_CONTAINERS)
    return None if path is None else _cgroup_cpu_seconds(path)


def _cgroup_dir(container_id: str) -> Path | None:
    return _first_dir(candidate.format(id=container_id) for candidate in _CGROUP_CANDIDATES)


def _cgroup_cpu_seconds(path: Path) -> float | None:
    try:
        if (path / "cpuacct.usage").exists():
            return int((path / "cpuacct.usage").read_text()) / 1e9
        for line in (path / "cpu.stat").read_text().splitlines():
            if line.startswith("usage_usec "):
                return int(line.split()[1]) / 1e6
    except (OSError, ValueError):
        return None
    return None


def stat_fields(stat: Path) -> list[str] | None:
    """A process's or thread's `stat` file from its third field (the state) on, past the
    command name; None when it cannot be read."""
    try:
        return stat.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cpu_seconds_of(fields: list[str]) -> float:
    """User + system CPU time from `stat_fields`."""
    return (int(fields[11]) + int(fields[12])) / _TICK


def _process(pid: int) -> tuple[int, int, float, str] | None:
    """(start time, session id, CPU seconds of all its threads, command line) of a live
    process."""
    fields = stat_fields(Path(f"/proc/{pid}/stat"))
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, UnicodeDecodeError):
        return None
    if fields is None:
        return None
    return int(fields[19]), int(fields[3]), cpu_seconds_of(fields), cmdline.strip()


def _roles(processes: dict[int, tuple[int, int, float, str]]) -> dict[str, float]:
    """CPU seconds by role (see the module's docstring)."""
    prefork = {pid: p for pid, p in processes.items() if "prefork.py" in p[3]}
    runner = min(prefork, key=lambda pid: (prefork[pid][0], pid), default=None)
    supervisors = {pid for pid, p in prefork.items() if p[1] == pid and pid != runner}
    roles: dict[str, float] = defaultdict(float)
    for pid, (_, session, cpu, cmdline) in processes.items():
        if pid in prefork:
            if pid == runner:
                role = "runner"
            elif pid in supervisors:
                role = "supervisor+engine"
            elif session in supervisors:
                role = "pull steps"
            else:
                role = "zygote"  # not yet the waiter
        elif "flow-run execute" in cmdline:
            role = "runner"
        elif "_workspace_supervisor" in cmdline or "prefect.engine" in cmdline:
            role = "supervisor+engine"
        elif "forward.py" in cmdline:
            role = "tunnel"
        elif " -I -S " in f" {cmdline} ":
            role = "stub, waiter"
        elif cmdline.startswith("git") or "/git" in cmdline.split(" ")[0]:
            role = "git"
        elif cmdline.split(" ")[0].endswith("sh") or ".sh" in cmdline:
            role = "entrypoint"
        else:
            role = "other"
        roles[role] += cpu
    return dict(roles)


class ContainerCpu:
    """Follows the containers started with `label` (a `key=value` filter) while in its
    `with` block; `.found` holds, per container, `{"total": s, "unseen": s, role: s}`."""

    def __init__(self, docker_client: Any, label: str, interval: float = 0.01) -> None:
        self._docker = docker_client
        self._label = label
        self._interval = interval
        self.found: list[dict[str, float]] = []
        self._threads: list[threading.Thread] = []
        self._events: Any = None

    def __enter__(self) -> ContainerCpu:
        since = time.time() - 1  # the engine answers before it subscribes
        self._events = self._docker.events(
            decode=True,
            since=since,
            filters={"type": "container", "event": "start", "label": self._label},
        )
        reader = threading.Thread(target=self._read, daemon=True)
        reader.start()
        self._threads.append(reader)
        return self

    def __exit__(self, *exc_info: object) -> None:
        time.sleep(0.5)  # a start event that is still on its way
        self._events.close()
        for thread in list(self._threads):
            thread.join(30)

    def _read(self) -> None:
        try:
            for event in self._events:
                watcher = threading.Thread(target=self._follow, args=(event["id"],), daemon=True)
                watcher.start()
                self._threads.append(watcher)
        except Exception:  # closed by __exit__
            return

    def _follow(self, container_id: str) -> None:
        path = None
        deadline = time.monotonic() + 5
        while path is None and time.monotonic() < deadline:
            path = _cgroup_dir(container_id)
            if path is None:
                time.sleep(self._interval)
        if path is None:
            return
        total: float | None = None
        seen: dict[int, tuple[int, int, float, str]] = {}
        while True:
            now = _cgroup_cpu_seconds(path)
            if now is None:
                break  # the cgroup is gone: the container exited
            total = now
            try:
                pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
            except (OSError, ValueError):
                break
            for pid in pids:
                process = _process(pid)
                if process is not None:
                    if not process[3] and pid in seen:  # exiting: its command line is gone
                        process = (*process[:3], seen[pid][3])
                    seen[pid] = process
            time.sleep(self._interval)
        if total is None:
            return
        roles = _roles(seen)
        self.found.append(
            {"total": total, "unseen": max(0.0, total - sum(roles.values())), **roles}
        )


def medians(found: list[dict[str, float]]) -> dict[str, float]:
    """The median of each figure over containers (a role a container lacks counts 0)."""
    keys = {key for item in found for key in item}
    return {key: median(item.get(key, 0.0) for item in found) for key in sorted(keys)}
