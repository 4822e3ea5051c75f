"""ManagedWorker against prefect-docker's DockerWorker, in one run on one machine.

Both workers run at the same time against one Prefect server on loopback, with the same
runtime image, the same poll interval (1 s), the same run limit and host networking;
each serves a pool of its own. Samples of the two are interleaved so that load from
elsewhere on the machine falls on both alike; the throughput phase runs in halves,
ManagedWorker, DockerWorker, DockerWorker, ManagedWorker, for the same reason. Everything
stops by itself: each wait has a timeout and the whole benchmark a deadline.

    python -m benchmarks            # the full benchmark (about 15-25 min on 2 cores)
    python -m benchmarks --quick    # a smoke test (a few minutes)
    python -m benchmarks --profile  # and py-spy each worker during the throughput phase
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from contextlib import ExitStack, closing
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from uuid import UUID

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WHEELS = ROOT / "benchmarks" / ".wheels"  # gitignored: pandas and its dependencies
PANDAS = "pandas==2.2.3"
RUN_TIMEOUT = 300.0
QUERY_SECONDS = "1"
#: py-spy's samples a second with `--profile`.
PROFILE_HZ = 250

from benchmarks.container_cpu import (  # noqa: E402
    all_containers_cpu_seconds,
    cpu_seconds_of,
    stat_fields,
)

sys.path.insert(0, str(ROOT / "tests"))
from postgres import Postgres, start_postgres  # noqa: E402
from services import (  # noqa: E402
    BIN,
    GitServer,
    PackageIndex,
    Service,
    free_port,
    start,
    start_git_server,
    start_package_index,
    start_prefect_server,
    write_policy,
)


@dataclass
class Sample:
    seconds: float | None
    phases: dict[str, float] = field(default_factory=dict)
    state: str = ""


@dataclass
class Results:
    command: str
    started: str
    machine: dict[str, object]
    settings: dict[str, object]
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    throughput: dict[str, dict[str, float]] = field(default_factory=dict)
    peak_rss_bytes: dict[str, int] = field(default_factory=dict)
    lease_call_seconds: list[float] = field(default_factory=list)
    #: CPU seconds each worker process used during the throughput phase, and its runs.
    throughput_cpu_seconds: dict[str, float] = field(default_factory=dict)
    #: CPU seconds the Prefect server and the Docker engine used during each worker's
    #: part of (c): worker -> {"server": s, "dockerd": s}.
    throughput_shared_cpu_seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    #: CPU seconds the whole machine used during each worker's part of (c): its runs'
    #: containers, the worker, the server and the engine (and anything else running).
    throughput_machine_cpu_seconds: dict[str, float] = field(default_factory=dict)
    #: CPU seconds the engine's containers used during each worker's part of (c) (its
    #: runs' containers: nothing else runs in a container meanwhile).
    throughput_container_cpu_seconds: dict[str, float] = field(default_factory=dict)
    #: The Prefect server's requests during each worker's throughput phase (its runs'
    #: containers included): worker -> {"METHOD /api/path": count}, ids as {id}.
    throughput_requests: dict[str, dict[str, int]] = field(default_factory=dict)
    #: Of `throughput_cpu_seconds["managed"]`, what the run gateway's threads used (the
    #: proxy every API call of the managed runs goes through; the DockerWorker has none).
    throughput_gateway_cpu_seconds: dict[str, float] = field(default_factory=dict)
    #: Seconds from a run's final state to the Pending of the run that took its slot,
    #: during each worker's part of (c) (`slot_handovers`).
    throughput_handovers: dict[str, list[float]] = field(default_factory=dict)
    #: Whether those threads are the measured worker's (else another worker process of
    #: the host serves the gateway, and the worker's CPU leaves it out).
    gateway_in_worker: bool = True
    #: py-spy over the throughput phase: worker -> {"samples": n, "top": [[frame, n]...]}
    profile: dict[str, dict[str, object]] = field(default_factory=dict)
    #: Opens of the isolated runs' CA file (`NO_TLS_CA`) during each trivial run: the TLS
    #: contexts its Prefect clients made (benchmarks/tls_contexts.py).
    tls_contexts_per_run: list[int] = field(default_factory=list)
    #: CPU milliseconds of one TLS context: {"bundle": ..., "one_certificate": ...}.
    tls_context_ms: dict[str, float] = field(default_factory=dict)
    #: CPU seconds of a trivial run's container, by process (benchmarks/container_cpu.py):
    #: deployment key -> medians over its (a) samples of {"total": s, role: s, ...}.
    container_cpu: dict[str, dict[str, float]] = field(default_factory=dict)
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    #: Before (c): the throughput phase loads the machine itself, by design.
    load_before_throughput: tuple[float, float, float] = (0.0, 0.0, 0.0)
    finished: str = ""
    notes: list[str] = field(default_factory=list)


class Deadline(Exception):
    pass


# -- the machine ---------------------------------------------------------------------


def describe_machine() -> dict[str, object]:
    """Cores, memory, kernel and Docker version; no host names or paths."""
    import docker

    meminfo = Path("/proc/meminfo").read_text().splitlines()
    total_kib = int(next(line.split()[1] for line in meminfo if line.startswith("MemTotal")))
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        model = next(
            (
                line.split(":", 1)[1].strip()
                for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")
            ),
            "",
        )
    client = docker.from_env()
    try:
        version = client.version()
        info = client.info()
    finally:
        client.close()
    import prefect
    import prefect_docker

    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(total_kib / 2**20, 1),
        "kernel": platform.release(),
        "os": platform.platform(terse=True),
        "docker_version": version.get("Version"),
        "docker_storage_driver": info.get("Driver"),
        "cgroup_version": info.get("CgroupVersion"),
        "python": platform.python_version(),
        "prefect": prefect.__version__,
        "prefect_docker": prefect_docker.__version__,
    }


# -- services ------------------------------------------------------------------------


def ensure_wheels() -> None:
    """pandas and its dependencies for the container's Python (3.11, manylinux x86_64)."""
    if list(WHEELS.glob("pandas-*.whl")):
        return
    WHEELS.mkdir(parents=True, exist_ok=True)
    print(f"Downloading {PANDAS} and its dependencies (once) into benchmarks/.wheels ...")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            PANDAS,
            "--dest",
            str(WHEELS),
            "--only-binary=:all:",
            "--python-version",
            "3.11",
            "--implementation",
            "cp",
            "--platform",
            "manylinux_2_28_x86_64",
            "--platform",
            "manylinux_2_17_x86_64",
            "--platform",
            "manylinux2014_x86_64",
        ],
        check=True,
    )


def publish_flows(git: GitServer) -> str:
    return git.publish("bench", {"flows.py": (ROOT / "benchmarks" / "flows.py").read_text()})


def start_workers(
    logs: Path, managed_pool: str, docker_pool: str, policy: Path, limit: int
) -> dict[str, Service]:
    common = {"PREFECT_WORKER_QUERY_SECONDS": QUERY_SECONDS}
    managed = start(
        "bench-managed-worker",
        [
            str(BIN / "prefect"),
            "worker",
            "start",
            "--pool",
            managed_pool,
            "--type",
            "prefect:managed",
            "--name",
            "bench-managed",
            "--limit",
            str(limit),
        ],
        logs,
        {**common, "PREFECT_INTEGRATIONS_MANAGED_POLICY_FILE": str(policy)},
    )
    plain = start(
        "bench-docker-worker",
        [
            str(BIN / "prefect"),
            "worker",
            "start",
            "--pool",
            docker_pool,
            "--type",
            "docker",
            "--name",
            "bench-docker",
            "--limit",
            str(limit),
        ],
        logs,
        common,
    )
    return {"managed": managed, "docker": plain}


def peak_rss(service: Service) -> int:
    """The worker process's peak resident set size (VmHWM), in bytes."""
    status = Path(f"/proc/{service.process.pid}/status").read_text()
    kib = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))
    return int(kib) * 1024


def machine_cpu_seconds() -> float | None:
    """CPU time the machine has spent busy (every core), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(service: Service) -> float:
    """User + system CPU time the service's process has used so far."""
    return process_cpu_seconds(service.process.pid) or 0.0


def process_cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a process so far; None when it cannot be read."""
    return None if pid is None else process_cpu_seconds_at(Path(f"/proc/{pid}/stat"))


def process_cpu_seconds_at(stat: Path) -> float | None:
    """User + system CPU time from a process's or thread's `stat` file."""
    fields = stat_fields(stat)
    return None if fields is None else cpu_seconds_of(fields)


#: The run gateway's threads (prefect_managed/gateway/host.py and tunnel.py), by name.
GATEWAY_THREADS = ("prefect-managed-gateway", "prefect-managed-tunnel")


def named_threads(pid: int, names: tuple[str, ...]) -> list[int]:
    """The native ids of a Python process's threads with these names, from `py-spy
    dump` (Python does not give its threads' names to the kernel); [] if unreadable."""
    try:
        dump = subprocess.run(
            [str(BIN / "py-spy"), "dump", "--pid", str(pid)],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    found = re.findall(r'^Thread (\d+) \([^)]*\): "([^"]*)"$', dump, re.MULTILINE)
    return [int(tid) for tid, name in found if name in names]


def threads_cpu_seconds(pid: int, tids: list[int]) -> float | None:
    """User + system CPU time of some threads of a process so far (None for none)."""
    if not tids:
        return None
    total = 0.0
    for tid in tids:
        seconds = process_cpu_seconds_at(Path(f"/proc/{pid}/task/{tid}/stat"))
        if seconds is None:
            return None
        total += seconds
    return total


def dockerd_pid() -> int | None:
    """The Docker engine's process on this machine, if there is one to read."""
    found = subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True, text=True)
    pids = found.stdout.split()
    return int(pids[0]) if pids else None


def _short(frame: str) -> str:
    """A py-spy frame with its file named from the package down (no machine paths)."""
    return re.sub(
        r"\((?:[^()]*/)?(?:site-packages|lib/python3\.\d+|" + re.escape(ROOT.name) + r")/",
        "(",
        frame,
    )


class Profile:
    """py-spy sampling a worker process, until `stop()`: only a thread that holds the GIL
    is sampled (`--gil`), so that the samples are the process's Python CPU (a thread
    waiting in a system call py-spy does not know as idle would count otherwise), 250
    times a second (about one sample per 4 ms of CPU)."""

    def __init__(self, service: Service, output: Path) -> None:
        self.output = output
        self.process = subprocess.Popen(
            [
                str(BIN / "py-spy"),
                "record",
                "--pid",
                str(service.process.pid),
                "--rate",
                str(PROFILE_HZ),
                "--gil",
            ]
            + ["--format", "raw", "--nonblocking", "--output", str(output)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self, top: int = 12) -> dict[str, object]:
        """The number of samples and the functions most often on top of the stack
        (counting the innermost frame of this project or Prefect, so that time in the
        standard library and dependencies is charged to whoever called it)."""
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return {"samples": 0, "top": [], "error": "py-spy did not stop"}
        if not self.output.exists():
            return {"samples": 0, "top": [], "error": "py-spy wrote nothing (ptrace allowed?)"}
        charged: dict[str, int] = {}
        total = managed = 0
        for line in self.output.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = stack.split(";")
            if any("prefect_managed/" in frame for frame in frames):
                managed += n
            ours = [f for f in frames if "prefect_managed/" in f or "/prefect/" in f]
            frame = _short((ours or frames)[-1])
            charged[frame] = charged.get(frame, 0) + n
        ranked = sorted(charged.items(), key=lambda item: -item[1])[:top]
        return {"samples": total, "in_prefect_managed": managed, "top": ranked}


# -- one flow run --------------------------------------------------------------------


def timed_run(deployment_id, deadline: float) -> Sample:
    """From creating the run (what `prefect deployment run` does) to Completed.

    The end is the server's timestamp of the final state (server and benchmark share a
    clock), so how often this loop polls does not count.
    """
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        t0 = datetime.now(timezone.utc)
        run = client.create_flow_run_from_deployment(deployment_id)
        limit = min(deadline, time.monotonic() + RUN_TIMEOUT)
        while True:
            current = client.read_flow_run(run.id)
            if current.state is not None and current.state.is_final():
                break
            if time.monotonic() > limit:
                return Sample(None, state=current.state.name if current.state else "")
            time.sleep(0.2)
        states = client.read_flow_run_states(run.id)
    sample = sample_from_states(t0, states)
    sample.phases.update(start_path(run.id, states, t0))
    return sample


def start_path(flow_run_id, states, t0: datetime) -> dict[str, float]:
    """Where the start goes, from Pending to Running: Docker's own create and start
    events for the run's container, and the run's log lines (written in the container)
    for the pull steps; and the end, from the final state to the container's exit (the
    time its slot stays taken after the run is over). Phases missing from a run are
    left out."""
    import docker
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    first: dict[str, datetime] = {}
    for state in states:
        first.setdefault(state.type.value, state.timestamp)
    marks: dict[str, datetime] = {}
    if "PENDING" in first:
        marks["pending"] = first["PENDING"]
    client = docker.from_env()
    try:
        label = f"io.prefect.flow-run-id={flow_run_id}"
        deadline = time.monotonic() + 30
        while (
            client.containers.list(filters={"label": label}, ignore_removed=True)
            and time.monotonic() < deadline
        ):
            time.sleep(0.1)  # until it exits, for its `die` event
        events = client.api.events(
            since=int(t0.timestamp()) - 1,
            until=int(time.time()) + 1,
            filters={"type": "container", "label": label},
            decode=True,
        )
        for event in events:
            action = event.get("Action") or event.get("status")
            if action in ("create", "start", "die"):
                at = datetime.fromtimestamp(event["timeNano"] / 1e9, timezone.utc)
                marks.setdefault(f"container_{action}", at)
    finally:
        client.close()
    with get_client(sync_client=True) as prefect:
        logs = prefect.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
    for log in sorted(logs, key=lambda entry: entry.timestamp):
        if log.message.startswith("Executing deployment step"):
            marks.setdefault("first_pull_step", log.timestamp)
        elif log.message.startswith("All deployment steps completed"):
            marks.setdefault("pull_steps_done", log.timestamp)
    if "RUNNING" in first:
        marks["running"] = first["RUNNING"]
    if states and states[-1].is_final():
        marks["final"] = states[-1].timestamp
    order = [
        ("pending", "container_create", "pending_to_container_create"),
        ("container_create", "container_start", "container_create_to_start"),
        ("container_start", "first_pull_step", "container_start_to_first_pull_step"),
        ("first_pull_step", "pull_steps_done", "pull_steps"),
        ("pull_steps_done", "running", "pull_steps_to_running"),
        ("final", "container_die", "final_to_container_exit"),
    ]
    return {
        name: round((marks[end] - marks[begin]).total_seconds(), 3)
        for begin, end, name in order
        if begin in marks and end in marks
    }


def sample_from_states(t0: datetime, states) -> Sample:
    first: dict[str, datetime] = {}
    for state in states:
        first.setdefault(state.type.value, state.timestamp)
    final = states[-1]
    end = final.timestamp
    phases = {}
    if "PENDING" in first:
        phases["scheduled_to_pending"] = (first["PENDING"] - t0).total_seconds()
        if "RUNNING" in first:
            phases["pending_to_running"] = (first["RUNNING"] - first["PENDING"]).total_seconds()
    if "RUNNING" in first:
        phases["running_to_final"] = (end - first["RUNNING"]).total_seconds()
    seconds = (end - t0).total_seconds() if final.type.value == "COMPLETED" else None
    return Sample(seconds, phases, final.type.value)


#: The tier's CPU cap of a benchmark run (the runtime's default).
RUN_CPUS = 2.0

#: What the managed worker's log says of a run the host had no room for.
NO_ROOM = "Waiting for room on a Docker host"


def room_for(concurrency: int, engine_cpus: int) -> dict[str, float]:
    """The policy's [host] table: CPU room for `concurrency` runs at once on the engine.

    The DockerWorker runs as many as its limit allows; the managed worker also counts
    the runs' CPU caps against the engine's CPUs times `cpu_overcommit` (4 by default,
    so 4 runs of 2 CPUs on 2 cores). Left at the default, the throughput phase would
    compare 4 managed runs at once with 5 of the DockerWorker's. (Memory is not raised:
    a run that waits for room anyway is noted in the results.)"""
    overcommit = concurrency * RUN_CPUS / max(engine_cpus, 1)
    return {"cpu_overcommit": min(64.0, max(4.0, overcommit))}


def throughput(deployment_id, runs: int, deadline: float) -> dict[str, float]:
    """Create `runs` runs at once; the worker's limit sets the concurrency."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        t0 = datetime.now(timezone.utc)
        ids = [client.create_flow_run_from_deployment(deployment_id).id for _ in range(runs)]
        limit = min(deadline, time.monotonic() + RUN_TIMEOUT * 3)
        pending = set(ids)
        while pending and time.monotonic() < limit:
            # One request a second for all of them: the benchmark's own load on the
            # server stays small next to the workers'.
            for flow_run in client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(pending)))
            ):
                if flow_run.state is not None and flow_run.state.is_final():
                    pending.discard(flow_run.id)
            time.sleep(1.0)
        finals = [client.read_flow_run(i).state for i in ids]
    completed = [s for s in finals if s is not None and s.type.value == "COMPLETED"]
    end = max((s.timestamp for s in finals if s is not None and s.is_final()), default=t0)
    minutes = max((end - t0).total_seconds(), 1e-9) / 60
    return {
        "runs": runs,
        "completed": len(completed),
        "minutes": round(minutes, 3),
        "runs_per_minute": round(len(completed) / minutes, 2),
        "flow_run_ids": ids,
    }


def slot_handovers(flow_run_ids: list, limit: int) -> list[float]:
    """How long a slot stood empty: with `limit` runs at once, the k-th run to start
    (its last Pending, the one its container followed) took the slot of the (k - limit)-th
    to end (its final state), so each handover is the time between the two. Covers the
    container's exit after its final state, the worker's finish and release, and the
    next poll's admission."""
    from prefect.client.orchestration import get_client

    starts, ends = [], []
    with get_client(sync_client=True) as client:
        for flow_run_id in flow_run_ids:
            states = client.read_flow_run_states(flow_run_id)
            pending = [s.timestamp for s in states if s.type.value == "PENDING"]
            final = [s.timestamp for s in states if s.is_final()]
            if pending and final:
                starts.append(pending[-1])
                ends.append(final[-1])
    starts.sort()
    ends.sort()
    return [
        round((starts[k] - ends[k - limit]).total_seconds(), 3) for k in range(limit, len(starts))
    ]


def accumulate(
    totals: dict[str, float], key: str, before: float | None, after: float | None
) -> None:
    """Add a counter's rise over one part of (c) to the worker's total; nothing when the
    counter could not be read."""
    if before is not None and after is not None:
        totals[key] = round(totals.get(key, 0.0) + after - before, 2)


def containers_gone(docker_client: Any, deployment_id: object, deadline: float) -> bool:
    """Wait (up to a minute) until no container of the deployment's runs is running;
    whether none is."""
    limit = min(deadline, time.monotonic() + 60)
    label = f"io.prefect.deployment-id={deployment_id}"
    # ignore_removed: a container the worker removes while it is being listed is gone.
    while docker_client.containers.list(filters={"label": label}, ignore_removed=True):
        if time.monotonic() >= limit:
            return False
        time.sleep(0.2)
    return True


def other_containers(docker_client: Any, deployment_id: object) -> set[str]:
    """The names of running containers that are not of the deployment's runs."""
    label = "io.prefect.deployment-id"
    return {
        container.name
        for container in docker_client.containers.list(ignore_removed=True)
        if container.labels.get(label) != str(deployment_id)
    }


def add_throughput(total: dict[str, float] | None, part: dict[str, float]) -> dict[str, float]:
    """Two parts of (c) for one worker as one: runs and minutes added up."""
    if total is None:
        return part
    runs = total["runs"] + part["runs"]
    completed = total["completed"] + part["completed"]
    minutes = total["minutes"] + part["minutes"]
    return {
        "runs": runs,
        "completed": completed,
        "minutes": round(minutes, 3),
        "runs_per_minute": round(completed / max(minutes, 1e-9), 2),
    }


def image_certifi_bundle(image: str) -> str:
    """Where Prefect's default CA file (certifi's bundle) is in `image`."""
    return subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--entrypoint", "python", image]
        + ["-c", "import certifi; print(certifi.where())"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def floor_sample(image: str) -> float:
    start_time = time.perf_counter()
    subprocess.run(
        ["docker", "run", "--rm", "--network", "host", image, "python", "-c", "import prefect"],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - start_time


_ACCESS = re.compile(r'"(GET|POST|PATCH|PUT|DELETE) (/[^ ?"]*)[^"]* HTTP/[\d.]+" (\d{3})')
_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def server_requests(log: Path, offset: int) -> tuple[Counter[str], int]:
    """The server's access log from `offset` on, counted by method and path ({id} for
    ids, ` [4xx]`/` [5xx]` added to answers that are not successes), and the new offset."""
    with log.open("rb") as handle:
        handle.seek(offset)
        text = handle.read()
    counts: Counter[str] = Counter()
    for match in _ACCESS.finditer(text.decode(errors="replace")):
        method, path, status = match.groups()
        key = f"{method} {_ID.sub('{id}', path)}"
        counts[key if status < "400" else f"{key} [{status[0]}xx]"] += 1
    return counts, offset + len(text)


def lease_call_seconds(limit_name: str, samples: int) -> list[float]:
    """What one global concurrency lease costs: take and release a slot, timed."""
    from prefect.client.orchestration import get_client

    out = []
    with get_client(sync_client=True) as client:
        for _ in range(samples):
            t = time.perf_counter()
            response = client.increment_concurrency_slots_with_lease(
                names=[limit_name], slots=1, mode="concurrency", lease_duration=60
            )
            out.append(time.perf_counter() - t)
            client.release_concurrency_slots_with_lease(UUID(response.json()["lease_id"]))
    return out


def remove_cache_volume(volume: str, timeout: float = 60) -> None:
    """Empty the workspace's cache for a cold run (waiting for containers still on it)."""
    import docker

    client = docker.from_env()
    try:
        end = time.monotonic() + timeout
        while True:
            try:
                client.volumes.get(volume).remove()
                return
            except docker.errors.NotFound:
                return
            except docker.errors.APIError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.5)
    finally:
        client.close()


# -- reporting -----------------------------------------------------------------------


def median(values: list[float | None]) -> float | None:
    done = [v for v in values if v is not None]
    return statistics.median(done) if done else None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


#: What a trivial run may take beyond the floor: 1.5 s, and the poll interval.
FLOOR_ALLOWANCE_SECONDS = 1.5


def floor_budget(floor: float | None) -> float | None:
    """The trivial run's target: the floor, 1.5 s and one poll interval."""
    return None if floor is None else floor + FLOOR_ALLOWANCE_SECONDS + float(QUERY_SECONDS)


def per_run(results: Results, totals: dict[str, float]) -> dict[str, float]:
    """Seconds over each worker's part of (c), per run of that part."""
    return {
        key: seconds / (results.throughput.get(key, {}).get("runs") or 1)
        for key, seconds in totals.items()
    }


def cpu_per_run(results: Results) -> dict[str, float]:
    """Each worker's CPU seconds per run during (c)."""
    return per_run(results, results.throughput_cpu_seconds)


def without_gateway(results: Results) -> dict[str, float]:
    """The managed worker's CPU seconds per run during (c) without the run gateway's."""
    cpu, gateway = cpu_per_run(results), gateway_cpu_per_run(results)
    if "managed" not in cpu or "managed" not in gateway:
        return {}
    inside = gateway["managed"] if results.gateway_in_worker else 0.0
    return {"managed": cpu["managed"] - inside}


def gateway_cpu_per_run(results: Results) -> dict[str, float]:
    """The run gateway's CPU seconds per managed run during (c)."""
    return per_run(results, results.throughput_gateway_cpu_seconds)


def container_and_worker_cpu_per_run(results: Results) -> dict[str, float]:
    """Issue 26's CPU per run: the run's container and the worker together, during (c).
    The run gateway is the managed worker's, wherever the host serves it from."""
    cpu, gateway = cpu_per_run(results), gateway_cpu_per_run(results)
    containers = per_run(results, results.throughput_container_cpu_seconds)
    found = {key: seconds + cpu[key] for key, seconds in containers.items() if key in cpu}
    if "managed" in found and not results.gateway_in_worker:
        found["managed"] += gateway.get("managed", 0.0)
    return found


def median_handovers(results: Results) -> dict[str, float]:
    """Each worker's median slot handover during (c), in seconds."""
    return {
        key: statistics.median(found)
        for key, found in results.throughput_handovers.items()
        if found
    }


def machine_cpu_per_run(results: Results) -> dict[str, float]:
    """The machine's CPU seconds per run during each worker's part of (c)."""
    return per_run(results, results.throughput_machine_cpu_seconds)


def summarize(results: Results) -> dict[str, object]:
    m = {name: median([s.seconds for s in samples]) for name, samples in results.samples.items()}
    tp = results.throughput
    handovers = median_handovers(results)
    rss = results.peak_rss_bytes
    cpu = cpu_per_run(results)
    machine = machine_cpu_per_run(results)
    together = container_and_worker_cpu_per_run(results)
    # The targets of issue 14 ("start in near the floor"), where it sets one.
    checks = {
        "a_trivial_managed_over_docker": (
            ratio(m.get("managed_noop"), m.get("docker_noop")),
            "<=",
            0.6,  # issue 26 (issue 14 set 0.9)
        ),
        "a_trivial_managed_over_floor_budget": (
            ratio(m.get("managed_noop"), floor_budget(m.get("floor"))),
            "<=",
            1.0,
        ),
        "b_warm_over_managed_trivial": (
            ratio(m.get("managed_pandas_warm"), m.get("managed_noop")),
            "<=",
            1.2,
        ),
        "b_docker_deps_over_warm": (
            ratio(m.get("docker_pandas"), m.get("managed_pandas_warm")),
            ">=",
            3.0,
        ),
        "b_env_warm_over_managed_trivial": (
            ratio(m.get("managed_env_warm"), m.get("managed_noop")),
            "<=",
            1.05,
        ),
        "b_env_noop_over_managed_trivial": (
            ratio(m.get("managed_env_noop"), m.get("managed_noop_beside_env")),
            "",
            None,
        ),
        "b_env_warm_over_env_noop": (
            ratio(m.get("managed_env_warm"), m.get("managed_env_noop")),
            "",
            None,
        ),
        "b_docker_deps_over_env_warm": (
            ratio(m.get("docker_pandas"), m.get("managed_env_warm")),
            ">=",
            3.0,
        ),
        "b_registry_docker_deps_over_env_warm": (
            ratio(m.get("docker_pandas_registry"), m.get("managed_env_warm")),
            ">=",
            3.0,
        ),
        "b_cold_over_docker_deps": (
            ratio(m.get("managed_pandas_cold"), m.get("docker_pandas")),
            "",
            None,
        ),
        "c_throughput_managed_over_docker": (
            ratio(
                tp.get("managed", {}).get("runs_per_minute"),
                tp.get("docker", {}).get("runs_per_minute"),
            ),
            ">=",
            1.7,  # issue 26 (issue 14 set 1.0)
        ),
        "c_handover_managed_over_docker": (
            ratio(handovers.get("managed"), handovers.get("docker")),
            "",
            None,
        ),
        "d_rss_managed_over_docker": (ratio(rss.get("managed"), rss.get("docker")), "<=", 1.2),
        "e_cpu_managed_over_docker": (ratio(cpu.get("managed"), cpu.get("docker")), "<=", 1.2),
        # The same without the run gateway's threads: what the boundary costs, apart.
        "e_cpu_without_gateway_managed_over_docker": (
            ratio(without_gateway(results).get("managed"), cpu.get("docker")),
            "",
            None,
        ),
        # Issue 26: the pre-fork executor, against our own worker on Prefect's executor
        # and the machine's CPU for a run.
        "f_prefork_over_stock_executor": (
            ratio(m.get("managed_noop"), m.get("managed_noop_stock")),
            "",
            None,
        ),
        # Issue 26: "CPU per run (the container and the worker together) <= 0.5x".
        "f_container_and_worker_cpu_managed_over_docker": (
            ratio(together.get("managed"), together.get("docker")),
            "<=",
            0.5,
        ),
        # The same with all the machine does for a run (the server, PostgreSQL, the engine):
        # the same work for both workers, which draws the ratio towards 1.
        "f_machine_cpu_managed_over_docker": (
            ratio(machine.get("managed"), machine.get("docker")),
            "",
            None,
        ),
        # The run's TLS contexts from one certificate, against Prefect's default bundle.
        "g_one_certificate_over_bundle": (
            ratio(m.get("managed_noop"), m.get("managed_noop_bundle")),
            "",
            None,
        ),
    }
    verdicts = {}
    for key, (value, op, target) in checks.items():
        met = None
        if value is not None and target is not None:
            met = value <= target if op == "<=" else value >= target
        verdicts[key] = {"ratio": value, "target": f"{op} {target}" if target else "", "met": met}
    phases: dict[str, dict[str, float]] = {}
    for name, samples in results.samples.items():
        keys = {k for s in samples for k in s.phases}
        phases[name] = {
            k: round(median([s.phases.get(k) for s in samples]) or 0, 3) for k in sorted(keys)
        }
    return {
        "medians_seconds": {k: round(v, 3) if v is not None else None for k, v in m.items()},
        "ratios": verdicts,
        "phase_medians_seconds": phases,
    }


def table(results: Results, summary: dict[str, object]) -> str:
    m = summary["medians_seconds"]
    lines = [
        "| measurement | ManagedWorker | DockerWorker | ratio | target | met |",
        "|---|---|---|---|---|---|",
    ]
    r = summary["ratios"]

    def fmt(value, unit="s"):
        return "—" if value is None else f"{value:.2f} {unit}"

    def row(name, ours, theirs, key):
        v = r[key]
        met = {True: "yes", False: "**no**", None: ""}[v["met"]]
        lines.append(f"| {name} | {ours} | {theirs} | {v['ratio']} | {v['target']} | {met} |")

    row(
        "(a) trivial flow, run → Completed",
        fmt(m.get("managed_noop")),
        fmt(m.get("docker_noop")),
        "a_trivial_managed_over_docker",
    )
    row(
        f"(a) vs floor (`docker run --rm … import prefect`) + {FLOOR_ALLOWANCE_SECONDS} s "
        "+ poll interval",
        fmt(m.get("managed_noop")),
        f"floor {fmt(m.get('floor'))} + {FLOOR_ALLOWANCE_SECONDS} + {QUERY_SECONDS} = "
        f"{fmt(floor_budget(m.get('floor')))}",
        "a_trivial_managed_over_floor_budget",
    )
    row(
        "(b) pandas, warm cache vs our trivial run",
        fmt(m.get("managed_pandas_warm")),
        f"ours trivial {fmt(m.get('managed_noop'))}",
        "b_warm_over_managed_trivial",
    )
    row(
        "(b) DockerWorker + EXTRA_PIP_PACKAGES vs our warm run",
        fmt(m.get("managed_pandas_warm")),
        fmt(m.get("docker_pandas")),
        "b_docker_deps_over_warm",
    )
    row(
        "(b) pandas, warm prebuilt environment vs our trivial run",
        fmt(m.get("managed_env_warm")),
        f"ours trivial {fmt(m.get('managed_noop'))}",
        "b_env_warm_over_managed_trivial",
    )
    row(
        "(b) the trivial flow in that warm environment vs our trivial run (interleaved): "
        "what starting from the environment costs",
        fmt(m.get("managed_env_noop")),
        f"ours trivial {fmt(m.get('managed_noop_beside_env'))}",
        "b_env_noop_over_managed_trivial",
    )
    row(
        "(b) pandas vs the trivial flow, both in that warm environment: the flow's own "
        "`import pandas`",
        fmt(m.get("managed_env_warm")),
        f"trivial {fmt(m.get('managed_env_noop'))}",
        "b_env_warm_over_env_noop",
    )
    row(
        "(b) DockerWorker + EXTRA_PIP_PACKAGES (loopback index) vs our prebuilt environment",
        fmt(m.get("managed_env_warm")),
        fmt(m.get("docker_pandas")),
        "b_docker_deps_over_env_warm",
    )
    if m.get("docker_pandas_registry") is not None:
        row(
            "(b) DockerWorker + EXTRA_PIP_PACKAGES from the real registry (network-bound) "
            "vs our prebuilt environment",
            fmt(m.get("managed_env_warm")),
            fmt(m.get("docker_pandas_registry")),
            "b_registry_docker_deps_over_env_warm",
        )
    row(
        "(b) our cold run vs DockerWorker + EXTRA_PIP_PACKAGES",
        fmt(m.get("managed_pandas_cold")),
        fmt(m.get("docker_pandas")),
        "b_cold_over_docker_deps",
    )
    tp = results.throughput
    row(
        f"(c) throughput, {tp.get('managed', {}).get('runs', '?')} runs, limit "
        f"{results.settings['concurrency']}",
        fmt(tp.get("managed", {}).get("runs_per_minute"), "runs/min"),
        fmt(tp.get("docker", {}).get("runs_per_minute"), "runs/min"),
        "c_throughput_managed_over_docker",
    )
    handovers = median_handovers(results)
    row(
        "(c) slot handover during (c), a run's final state to the Pending of the run taking "
        "its slot (median)",
        fmt(handovers.get("managed"), "s"),
        fmt(handovers.get("docker"), "s"),
        "c_handover_managed_over_docker",
    )
    rss = results.peak_rss_bytes
    row(
        "(d) worker peak RSS",
        fmt((rss.get("managed") or 0) / 2**20, "MiB"),
        fmt((rss.get("docker") or 0) / 2**20, "MiB"),
        "d_rss_managed_over_docker",
    )
    cpu = cpu_per_run(results)
    row(
        "(e) worker CPU per run during (c)",
        fmt(cpu["managed"] * 1000 if "managed" in cpu else None, "ms"),
        fmt(cpu["docker"] * 1000 if "docker" in cpu else None, "ms"),
        "e_cpu_managed_over_docker",
    )
    gateway, without = gateway_cpu_per_run(results), without_gateway(results)
    if "managed" in without:
        where = "in this worker" if results.gateway_in_worker else "in another worker process"
        row(
            "(e) the same without the run gateway's threads (the DockerWorker's runs call "
            f"the API directly; the gateway, {where}, used {gateway['managed'] * 1000:.0f} ms "
            "a run)",
            fmt(without["managed"] * 1000, "ms"),
            fmt(cpu["docker"] * 1000 if "docker" in cpu else None, "ms"),
            "e_cpu_without_gateway_managed_over_docker",
        )
    row(
        "(f) trivial run, pre-fork executor vs Prefect's own (both ManagedWorker)",
        fmt(m.get("managed_noop")),
        f"Prefect's executor {fmt(m.get('managed_noop_stock'))}",
        "f_prefork_over_stock_executor",
    )
    together = container_and_worker_cpu_per_run(results)
    row(
        "(f) CPU per run during (c), the run's container and the worker (its gateway "
        "included) together",
        fmt(together.get("managed"), "s"),
        fmt(together.get("docker"), "s"),
        "f_container_and_worker_cpu_managed_over_docker",
    )
    machine = machine_cpu_per_run(results)
    row(
        "(f) machine CPU per run during (c): containers, worker, server, engine",
        fmt(machine.get("managed"), "s"),
        fmt(machine.get("docker"), "s"),
        "f_machine_cpu_managed_over_docker",
    )
    if m.get("managed_noop_bundle") is not None:
        row(
            "(g) trivial run, its TLS contexts from one certificate vs Prefect's default "
            "bundle (both ManagedWorker)",
            fmt(m.get("managed_noop")),
            f"default bundle {fmt(m.get('managed_noop_bundle'))}",
            "g_one_certificate_over_bundle",
        )
    opens, cost = results.tls_contexts_per_run, results.tls_context_ms
    if opens and cost:
        contexts = statistics.median(opens)
        saved = contexts * (cost["bundle"] - cost["one_certificate"])
        lines.append(
            f"\nTLS contexts a trivial run made (opens of its CA file, median of {len(opens)}): "
            f"{contexts:g}; CPU per context {cost['one_certificate']:.2f} ms from one "
            f"certificate, {cost['bundle']:.2f} ms from Prefect's default bundle: "
            f"{saved:.0f} ms of CPU a run saved."
        )
    lines.append(_container_cpu(results))
    return "\n".join(lines)


def _container_cpu(results: Results) -> str:
    """A trivial run's container CPU by process, side by side (medians over (a))."""
    found = results.container_cpu
    if not found:
        return ""
    columns = [
        ("managed_noop", "pre-fork executor"),
        ("managed_noop_stock", "Prefect's executor (ours)"),
        ("docker_noop", "DockerWorker"),
    ]
    columns = [(key, name) for key, name in columns if key in found]
    roles = sorted({role for key, _ in columns for role in found[key]} - {"total", "unseen"})
    out = [
        "\n(h) a trivial run's container CPU by process (s, medians; "
        "benchmarks/container_cpu.py)\n",
        "| process | " + " | ".join(name for _, name in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for role in [*roles, "unseen", "total"]:
        cells = [f"{found[key].get(role, 0.0):.2f}" for key, _ in columns]
        out.append(f"| {role} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _worker_cpu(results: Results) -> str:
    """The workers' own CPU during (c), and where the profile found it going."""
    cpu = results.throughput_cpu_seconds
    if not cpu:
        return ""
    runs = {key: results.throughput.get(key, {}).get("runs") or 1 for key in cpu}
    shared = results.throughput_shared_cpu_seconds

    def per_run(key: str, seconds: float | None) -> str:
        return "–" if seconds is None else f"{seconds / runs[key] * 1000:.0f} ms"

    lines = [
        "## CPU during (c), per run",
        "The worker process itself, and the Prefect server and the Docker engine during "
        "that worker's part of (c) (they serve the runs' containers too).",
        "",
        "| worker | worker CPU seconds | worker per run | server per run | dockerd per run |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {cpu[key]:.2f} s | {per_run(key, cpu[key])} | "
            f"{per_run(key, shared.get(key, {}).get('server'))} | "
            f"{per_run(key, shared.get(key, {}).get('dockerd'))} |"
            for key, name in (("managed", "ManagedWorker"), ("docker", "DockerWorker"))
            if key in cpu
        ),
    ]
    for key, found in results.profile.items():
        samples = found.get("samples") or 0
        lines += [
            "",
            f"py-spy, {key} worker, {samples} samples holding the GIL at {PROFILE_HZ} Hz"
            + (
                f" ({found.get('in_prefect_managed', 0)} with a prefect_managed frame)"
                if key == "managed"
                else ""
            )
            + (f"; {found['error']}" if found.get("error") else "")
            + ": the innermost Prefect or prefect_managed frame, most frequent first",
            "",
            "| samples | frame |",
            "|---|---|",
            *(f"| {n} | `{frame}` |" for frame, n in found.get("top", [])),
        ]
    return "\n".join(lines) + "\n"


def _server_requests(results: Results, top: int = 15) -> str:
    """The server's requests per run during (c), side by side, the most frequent first."""
    found = results.throughput_requests
    if not found:
        return ""
    runs = {key: results.throughput.get(key, {}).get("runs") or 1 for key in found}
    mine, theirs = found.get("managed", {}), found.get("docker", {})

    def per_run(counts: dict[str, int], key: str, path: str | None = None) -> str:
        n = counts.get(path, 0) if path else sum(counts.values())
        return f"{n / runs.get(key, 1):.1f}"

    paths = sorted(
        {*mine, *theirs},
        key=lambda path: -(mine.get(path, 0) + theirs.get(path, 0)),
    )
    return (
        "\n".join(
            [
                "## The Prefect server's requests per run during (c)",
                "The workers' requests and their runs' containers' (the same flow for both), "
                "from the server's access log.",
                "",
                "| request | ManagedWorker | DockerWorker |",
                "|---|---|---|",
                f"| all | {per_run(mine, 'managed')} | {per_run(theirs, 'docker')} |",
                *(
                    f"| `{path}` | {per_run(mine, 'managed', path)} | "
                    f"{per_run(theirs, 'docker', path)} |"
                    for path in paths[:top]
                ),
            ]
        )
        + "\n"
    )


def write_results(results: Results, summary: dict[str, object], text: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {**asdict(results), "summary": summary}
    (RESULTS / "latest.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    phases = json.dumps(summary["phase_medians_seconds"], indent=2)
    machine = "\n".join(f"- {k}: {v}" for k, v in results.machine.items())
    notes = "\n".join(f"- {n}" for n in results.notes) or "- none"
    lease = median(results.lease_call_seconds)
    md = f"""# Benchmark results

Command: `{results.command}` (from the repository root, in `.venv`)

Started {results.started}, finished {results.finished}.
Load average (1, 5, 15 min) before: {_load(results.load_before)}; before (c), the
throughput phase, which loads the machine itself: {_load(results.load_before_throughput)};
after: {_load(results.load_after)}.

## Machine
{machine}

## Settings
{json.dumps(results.settings, indent=2)}

## Medians and ratios
{text}

One global concurrency lease (take + release, the API call ManagedWorker adds per run):
median {lease * 1000 if lease else float("nan"):.1f} ms over {len(results.lease_call_seconds)} calls.

{_worker_cpu(results)}
{_server_requests(results)}
## Where the time goes (medians of the flow run's state timestamps, seconds)
`scheduled_to_pending`: from creating the run to the worker submitting it (poll
interval, the worker's checks); `pending_to_running`: container create and start,
`EXTRA_PIP_PACKAGES` install, `import prefect`, the git clone pull step, until the
engine reports Running; `running_to_final`: the flow itself and the engine's wrap-up.

```json
{phases}
```

## Notes
{notes}
"""
    (RESULTS / "latest.md").write_text(md)
    return RESULTS / "latest.md"


# -- the benchmark -------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="a smoke test: few samples")
    parser.add_argument(
        "--runs",
        type=int,
        default=None,
        help="samples per latency measurement (default 10; quick 2)",
    )
    parser.add_argument("--throughput-runs", type=int, default=None, help="default 50; quick 6")
    parser.add_argument(
        "--concurrency", type=int, default=None, help="worker limit (default 10; quick 3)"
    )
    parser.add_argument("--deadline-minutes", type=float, default=75.0)
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=1.0,
        help="both workers' PREFECT_WORKER_QUERY_SECONDS (default 1; Prefect's own default "
        "is 10, what users run with: ManagedWorker picks runs up on events meanwhile)",
    )
    parser.add_argument(
        "--registry",
        action="store_true",
        help="also time DockerWorker installing pandas from the real package registry "
        "(network-bound: the registry's speed, not the worker's)",
    )
    parser.add_argument(
        "--database",
        choices=("sqlite", "postgres"),
        default="sqlite",
        help="the Prefect server's database: SQLite, as the demo's, or a throwaway "
        "PostgreSQL cluster on loopback, as a production server's (default sqlite)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only, write no results")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="sample each worker with py-spy during the throughput phase",
    )
    parser.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep the workers', server's and services' logs (the path is printed)",
    )
    args = parser.parse_args(argv)
    globals()["QUERY_SECONDS"] = f"{args.poll_interval:g}"  # read by the helpers above
    quick = args.quick
    runs = args.runs or (2 if quick else 10)
    cold_runs = 1 if quick else 3
    tp_runs = args.throughput_runs or (6 if quick else 50)
    concurrency = args.concurrency or (3 if quick else 10)
    deadline = time.monotonic() + args.deadline_minutes * 60

    # SIGTERM (e.g. from `timeout`) stops the benchmark like Ctrl-C: services and
    # containers are cleaned up and what was measured is reported.
    signal.signal(signal.SIGTERM, _interrupt)
    home = Path(tempfile.mkdtemp(prefix="prefect-managed-bench-"))
    logs = home / "logs"
    logs.mkdir()
    port = free_port()
    os.environ["PREFECT_HOME"] = str(home / "client-home")
    os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    # The server requires a credential, as workers insist by default; every client and
    # worker of the benchmark sends it.
    auth = f"bench:{secrets.token_hex(16)}"
    os.environ["PREFECT_API_AUTH_STRING"] = auth
    os.environ["PREFECT_LOGGING_TO_API_BATCH_INTERVAL"] = "0.5"

    from prefect_managed.runtime.builder import default_runtime_tag

    image = default_runtime_tag()
    ensure_wheels()
    results = Results(
        command="python -m benchmarks" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""),
        started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        machine=describe_machine(),
        settings={
            "image": image,
            "poll_interval_seconds": float(QUERY_SECONDS),
            "network_mode": "isolated (managed, the default); host (DockerWorker)",
            "samples_per_latency": runs,
            "cold_samples": cold_runs,
            "throughput_runs": tp_runs,
            "concurrency": concurrency,
            "dependencies": PANDAS,
            "registry": args.registry,
            "database": args.database,
            "quick": quick,
        },
        load_before=os.getloadavg(),
    )
    services: list[Service] = []
    workspace = f"bench-{uuid.uuid4().hex[:6]}"
    env_workspace = f"{workspace}-env"
    database: Postgres | None = None
    try:
        # INFO: the server logs each request (uvicorn's access log), counted per phase.
        server_env = {
            "PREFECT_SERVER_LOGGING_LEVEL": "INFO",
            "PREFECT_SERVER_API_AUTH_STRING": auth,
        }
        if args.database == "postgres":
            database = start_postgres(logs)
            server_env["PREFECT_API_DATABASE_CONNECTION_URL"] = database.create_database("prefect")
        server = start_prefect_server(port, home / "server-home", logs, server_env)
        services.append(server)
        git = start_git_server(home / "git", logs)
        services.append(git.service)
        index: PackageIndex = start_package_index(WHEELS, logs)
        services.append(index.service)
        repo = publish_flows(git)

        import docker
        from prefect import flow
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import WorkPoolCreate
        from prefect_docker.worker import DockerWorker

        from benchmarks.container_cpu import ContainerCpu, medians
        from benchmarks.tls_contexts import FileOpens, context_cost
        from prefect_managed import ManagedWorker
        from prefect_managed.configuration import api_label_value
        from prefect_managed.dependencies import cache_volume_name
        from prefect_managed.gateway.port import run_gateway_port
        from prefect_managed.gateway.tunnel import NO_TLS_CA, tunnel_directory
        from prefect_managed.policy import load_policy

        with get_client(sync_client=True) as client:
            for name, worker_cls in (
                ("bench-managed", ManagedWorker),
                ("bench-docker", DockerWorker),
                ("bench-managed-env", ManagedWorker),
            ):
                client.create_work_pool(
                    WorkPoolCreate(
                        name=name,
                        type=worker_cls.type,
                        base_job_template=worker_cls.get_default_base_job_template(),
                    ),
                    overwrite=True,
                )
        with closing(docker.from_env()) as engine:
            engine_cpus = int(engine.info()["NCPU"])
        # The two managed pools' workspaces: the same tier, the same room.
        tiers = {
            "bench": {
                "concurrency_limit": concurrency,
                "pool_limit": 100,
                "cpus": RUN_CPUS,
                "compute_hours_per_month": 100000,
            }
        }
        host = room_for(concurrency, engine_cpus)
        policy = write_policy(
            home / "policy.toml",
            workspace={"name": workspace, "tier": "bench"},
            tiers=tiers,
            host=host,
            # The dependency cache as runs that install in their own container use it.
            runtime={
                "default_image": image,
                "package_index_url": index.url,
                "prebuilt_environments": False,
            },
        )
        env_policy = write_policy(
            home / "env-policy.toml",
            workspace={"name": env_workspace, "tier": "bench"},
            tiers=tiers,
            host=host,
            runtime={
                "default_image": image,
                "package_index_url": index.url,
                "prebuilt_environments": True,
            },
        )
        workers = start_workers(logs, "bench-managed", "bench-docker", policy, concurrency)
        services.extend(workers.values())
        env_worker = start(
            "bench-managed-env-worker",
            [
                str(BIN / "prefect"),
                "worker",
                "start",
                "--pool",
                "bench-managed-env",
                "--type",
                "prefect:managed",
                "--name",
                "bench-managed-env",
            ],
            logs,
            {
                "PREFECT_WORKER_QUERY_SECONDS": QUERY_SECONDS,
                "PREFECT_INTEGRATIONS_MANAGED_POLICY_FILE": str(env_policy),
            },
        )
        services.append(env_worker)

        docker_vars = {
            "image": image,
            "network_mode": "host",
            "image_pull_policy": "IfNotPresent",
            "auto_remove": True,
            # prefect-docker as its users run it: Prefect's own executor (the runtime
            # image starts the pre-fork executor unless told not to).
            "env": {"PREFECT_MANAGED_EXECUTOR": "stock"},
        }
        deps_env = {
            "EXTRA_PIP_PACKAGES": PANDAS,
            "UV_DEFAULT_INDEX": index.url,
            "PIP_INDEX_URL": index.url,
        }

        def deploy(entry: str, name: str, pool: str, variables: dict) -> object:
            return flow.from_source(source=repo, entrypoint=f"flows.py:{entry}").deploy(
                name=name, work_pool_name=pool, job_variables=variables, print_next_steps=False
            )

        d = {
            "managed_noop": deploy("noop", "managed-noop", "bench-managed", {}),
            "managed_noop_stock": deploy(
                "noop", "managed-noop-stock", "bench-managed", {"env": docker_vars["env"]}
            ),
            "docker_noop": deploy("noop", "docker-noop", "bench-docker", docker_vars),
            # Prefect's default CA file (certifi's bundle in the image), as before the run's
            # TLS contexts were made from one certificate.
            "managed_noop_bundle": deploy(
                "noop",
                "managed-noop-bundle",
                "bench-managed",
                {"env": {"PREFECT_API_SSL_CERT_FILE": image_certifi_bundle(image)}},
            ),
            "managed_pandas": deploy(
                "uses_pandas", "managed-pandas", "bench-managed", {"pip_packages": [PANDAS]}
            ),
            "managed_pandas_env": deploy(
                "uses_pandas",
                "managed-pandas-env",
                "bench-managed-env",
                {"pip_packages": [PANDAS]},
            ),
            # The trivial flow in the same environment: what starting from it costs,
            # without the flow's own `import pandas`.
            "managed_noop_env": deploy(
                "noop", "managed-noop-env", "bench-managed-env", {"pip_packages": [PANDAS]}
            ),
            "docker_pandas_registry": deploy(
                "uses_pandas",
                "docker-pandas-registry",
                "bench-docker",
                {**docker_vars, "env": {**docker_vars["env"], "EXTRA_PIP_PACKAGES": PANDAS}},
            ),
            "docker_pandas": deploy(
                "uses_pandas",
                "docker-pandas",
                "bench-docker",
                {**docker_vars, "env": {**docker_vars["env"], **deps_env}},
            ),
        }
        volume = cache_volume_name(workspace, api_label_value())

        def sample(key: str, deployment_key: str) -> None:
            if time.monotonic() > deadline:
                raise Deadline(key)
            s = timed_run(d[deployment_key], deadline)
            results.samples.setdefault(key, []).append(s)
            shown = f"{s.seconds:.2f} s" if s.seconds is not None else f"not completed ({s.state})"
            print(f"  {key:22s} {shown}", flush=True)

        print("Warming up (one run each; not counted)...", flush=True)
        for key in ("managed_noop", "docker_noop"):
            timed_run(d[key], deadline)

        print(f"Floor: docker run --rm {image} python -c 'import prefect' x{runs}", flush=True)
        results.samples["floor"] = [Sample(floor_sample(image)) for _ in range(runs)]
        print(f"  floor median {median([s.seconds for s in results.samples['floor']]):.2f} s")

        print(f"(a) trivial flow, {runs} runs each, interleaved", flush=True)
        ca_file = tunnel_directory(run_gateway_port(load_policy(policy).runtime)) / NO_TLS_CA
        followed = ("managed_noop", "docker_noop", "managed_noop_stock")
        docker_client = docker.from_env()
        watches = {
            key: ContainerCpu(docker_client, f"io.prefect.deployment-id={d[key]}")
            for key in followed
        }
        with ExitStack() as following:
            for watch in watches.values():
                following.enter_context(watch)
            for _ in range(runs):
                with FileOpens(ca_file) as opens:
                    sample("managed_noop", "managed_noop")
                results.tls_contexts_per_run.append(opens.count)
                sample("docker_noop", "docker_noop")
                sample("managed_noop_stock", "managed_noop_stock")
                sample("managed_noop_bundle", "managed_noop_bundle")
        results.container_cpu = {
            key: medians(watch.found) for key, watch in watches.items() if watch.found
        }
        results.tls_context_ms = context_cost(image, 100)

        print(f"(b) {PANDAS}: {cold_runs} cold, {runs} warm, {runs} DockerWorker", flush=True)
        for _ in range(cold_runs):
            remove_cache_volume(volume)
            sample("managed_pandas_cold", "managed_pandas")
        for _ in range(runs):
            sample("managed_pandas_warm", "managed_pandas")
            sample("docker_pandas", "docker_pandas")

        print(f"(b) {PANDAS}, prebuilt environment: 1 build, {runs} warm", flush=True)
        sample("managed_env_build", "managed_pandas_env")
        for _ in range(runs):
            sample("managed_env_warm", "managed_pandas_env")
            sample("managed_env_noop", "managed_noop_env")
            sample("managed_noop_beside_env", "managed_noop")

        if args.registry:
            print(f"(b) DockerWorker, {PANDAS} from the real registry: {runs}", flush=True)
            for _ in range(runs):
                sample("docker_pandas_registry", "docker_pandas_registry")

        results.load_before_throughput = os.getloadavg()
        print(f"(c) throughput: {tp_runs} runs at a limit of {concurrency}", flush=True)
        # In halves, ManagedWorker, DockerWorker, DockerWorker, ManagedWorker: a machine
        # that gets slower or faster during the phase weighs on both alike.
        half = tp_runs // 2
        order = [("managed", half), ("docker", half)] if half else []
        order += [("docker", tp_runs - half), ("managed", tp_runs - half)]
        profiles = (
            {key: Profile(workers[key], home / f"profile-{key}.txt") for key in workers}
            if args.profile
            else {}
        )
        engine = dockerd_pid()
        # The run gateway is served by one managed worker process of the host, the first
        # to bind its port: the measured one or the prebuilt-environment pool's.
        gateway_pid, gateway = next(
            (
                (service.process.pid, tids)
                for service in (workers["managed"], env_worker)
                if (tids := named_threads(service.process.pid, GATEWAY_THREADS))
            ),
            (workers["managed"].process.pid, []),
        )
        results.gateway_in_worker = gateway_pid == workers["managed"].process.pid
        requests: dict[str, Counter[str]] = {key: Counter() for key in workers}
        for key, count in order:
            before = (
                cpu_seconds(workers[key]),
                cpu_seconds(server),
                process_cpu_seconds(engine),
            )
            machine_before = machine_cpu_seconds()
            containers_before = all_containers_cpu_seconds()
            gateway_before = threads_cpu_seconds(gateway_pid, gateway)
            _, log_offset = server_requests(server.log_path, 0)
            others = other_containers(docker_client, d[f"{key}_noop"])
            no_room_before = workers[key].log().count(NO_ROOM)
            part = throughput(d[f"{key}_noop"], count, deadline)
            flow_run_ids = part.pop("flow_run_ids")
            # Runs still reporting (or released) after the last final state are counted,
            # and the last containers' exits with the worker's work on them: every
            # counter is read once they are gone.
            if not containers_gone(docker_client, d[f"{key}_noop"], deadline):
                results.notes.append(
                    f"(c) {key}: containers of its runs still ran a minute after the last "
                    "final state; their CPU after that is not counted"
                )
            time.sleep(2 * float(QUERY_SECONDS))
            if workers[key].log().count(NO_ROOM) > no_room_before:
                results.notes.append(
                    f"(c) {key}: runs waited for room on this host (the [host] table), so "
                    f"fewer than {concurrency} ran at once"
                )
            others |= other_containers(docker_client, d[f"{key}_noop"])
            if others:
                results.notes.append(
                    f"(c) {key}: other containers ran during the phase and count in the "
                    f"containers' CPU: {', '.join(sorted(others))}"
                )
            after = (cpu_seconds(workers[key]), cpu_seconds(server), process_cpu_seconds(engine))
            machine_after = machine_cpu_seconds()
            containers_after = all_containers_cpu_seconds()
            gateway_after = threads_cpu_seconds(gateway_pid, gateway)
            if key == "managed":
                accumulate(
                    results.throughput_gateway_cpu_seconds, key, gateway_before, gateway_after
                )
            requests[key].update(server_requests(server.log_path, log_offset)[0])
            results.throughput[key] = add_throughput(results.throughput.get(key), part)
            accumulate(results.throughput_cpu_seconds, key, before[0], after[0])
            accumulate(results.throughput_machine_cpu_seconds, key, machine_before, machine_after)
            accumulate(
                results.throughput_container_cpu_seconds, key, containers_before, containers_after
            )
            shared = results.throughput_shared_cpu_seconds.setdefault(key, {})
            accumulate(shared, "server", before[1], after[1])
            accumulate(shared, "dockerd", before[2], after[2])
            # Read after every counter: these requests are the benchmark's own.
            results.throughput_handovers.setdefault(key, []).extend(
                slot_handovers(flow_run_ids, concurrency)
            )
            print(f"  {key}, {count} runs: {part}", flush=True)
        for key, found in requests.items():
            if found:
                results.throughput_requests[key] = dict(found.most_common())
        for key, profile in profiles.items():
            results.profile[key] = profile.stop()

        results.lease_call_seconds = lease_call_seconds(f"prefect-managed-{workspace}", runs)
        results.peak_rss_bytes = {key: peak_rss(service) for key, service in workers.items()}
    except KeyboardInterrupt:
        results.notes.append("interrupted (SIGINT or SIGTERM); reporting what was measured")
        print("Interrupted; reporting what was measured.")
    except Deadline as exc:
        results.notes.append(f"stopped at the deadline during {exc}")
        print(f"Deadline reached during {exc}; reporting what was measured.")
    finally:
        results.load_after = os.getloadavg()
        results.finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
        for service in reversed(services):
            service.stop()
        if database is not None:
            database.stop()
        cleanup(workspace, env_workspace)
    cores = os.cpu_count() or 1
    # Judged before the throughput phase: (c) runs `concurrency` containers at once on
    # purpose, so the load after it says nothing about other work on the machine.
    busiest = max(results.load_before[0], results.load_before_throughput[0])
    if busiest > cores:
        results.notes.append(
            f"The machine was loaded (1-min load average {results.load_before[0]:.1f} at the "
            f"start, {results.load_before_throughput[0]:.1f} before the throughput phase, on "
            f"{cores} cores): other work competed for the CPU and the Docker engine, so the "
            "absolute times and the ratios are noisy; compare the phases, and rerun on an "
            "idle machine before judging the targets."
        )
    summary = summarize(results)
    text = table(results, summary)
    print()
    print(text)
    print("\nPhase medians (s):", json.dumps(summary["phase_medians_seconds"], indent=1))
    print(_worker_cpu(results))
    print(_server_requests(results, top=40))
    if not args.no_write:
        print(f"\nWrote {write_results(results, summary, text).relative_to(ROOT)} and latest.json")
    if args.profile:
        # The raw stacks (py-spy's raw format, e.g. for a flame graph) outlive the run.
        kept = Path(tempfile.mkdtemp(prefix="prefect-managed-profile-"))
        for found in home.glob("profile-*.txt"):
            shutil.move(found, kept / found.name)
        print(f"py-spy's raw stacks: {kept}")
    if args.keep_logs:
        kept = Path(tempfile.mkdtemp(prefix="prefect-managed-bench-logs-"))
        shutil.copytree(logs, kept, dirs_exist_ok=True)
        print(f"The services' logs: {kept}")
    shutil.rmtree(home, ignore_errors=True)
    return 0


def _load(load: tuple[float, float, float] | list[float]) -> str:
    return ", ".join(f"{value:.2f}" for value in load)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def cleanup(workspace: str, env_workspace: str) -> None:
    """Remove the benchmark's containers, its workspaces' cache volumes and environments."""
    import docker

    client = docker.from_env()
    try:
        for filters in (
            {"label": "io.prefect.work-pool-name=bench-managed"},
            {"label": "io.prefect.work-pool-name=bench-docker"},
            {"label": "io.prefect.work-pool-name=bench-managed-env"},
        ):
            for container in client.containers.list(all=True, filters=filters):
                container.remove(force=True)
        for name in (workspace, env_workspace):
            for volume in client.volumes.list(filters={"name": f"prefect-managed-cache-{name}-"}):
                volume.remove(force=True)
        for image in client.images.list(
            filters={"label": f"io.prefect-managed.environment-workspace={env_workspace}"}
        ):
            client.images.remove(image.id, force=True)
    finally:
        client.close()
