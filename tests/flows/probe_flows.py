"""Flows the integration tests deploy from a git repository."""

import time
from pathlib import Path

from prefect import flow, get_run_logger

CGROUP_MEMORY_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def cgroup_memory_limit() -> str:
    for path in CGROUP_MEMORY_FILES:
        try:
            return Path(path).read_text().strip()
        except OSError:
            continue
    return "unknown"


@flow
def probe(sleep_seconds: float = 0.0) -> str:
    """Imports the package that pip_packages installed and reports its cgroup memory limit."""
    import managed_probe

    logger = get_run_logger()
    logger.info("probe says: %s", managed_probe.MESSAGE)
    logger.info("cgroup memory limit: %s", cgroup_memory_limit())
    time.sleep(sleep_seconds)
    return managed_probe.MESSAGE


@flow
def hello() -> str:
    get_run_logger().info("hello from a managed container")
    return "hello"


@flow
def sleeper(seconds: float = 5.0) -> float:
    time.sleep(seconds)
    return seconds


@flow
def allocate(megabytes: int = 1024) -> int:
    """Holds `megabytes` of memory at once, touching every page."""
    blocks = [bytearray(b"\x01") * (1024 * 1024) for _ in range(megabytes)]
    return len(blocks)


@flow
def inspect_self(sleep_seconds: float = 0.0) -> dict:
    """Reports what the container lets the flow see and do."""
    import os

    status = Path("/proc/self/status").read_text()
    caps = next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff"))
    seen = {
        "uid": os.getuid(),
        "cap_eff": caps,
        "docker_socket": Path("/var/run/docker.sock").exists(),
        "no_new_privs": next(
            line.split()[1] for line in status.splitlines() if line.startswith("NoNewPrivs")
        ),
        # The process that started the engine: Prefect's runner (`prefect flow-run
        # execute`) on Prefect's executor, the executor's waiter (`python -I -S`) on ours.
        "parent": [
            arg.decode()
            for arg in Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")[:3]
        ],
    }
    get_run_logger().info("inspect_self: %s", seen)
    time.sleep(sleep_seconds)
    return seen


@flow
def slow_first_attempt(seconds: float = 120.0) -> int:
    """Sleeps `seconds` on its first run only (Prefect's run count), then returns the count:
    a test removes the first attempt's container while it sleeps."""
    from prefect.runtime import flow_run

    count = flow_run.run_count
    get_run_logger().info("slow_first_attempt: run count %s", count)
    if count <= 1:
        time.sleep(seconds)
    return count


@flow
def fails() -> None:
    """The flow's own failure: it raises."""
    raise ValueError("the flow failed by itself")


@flow
def output_then_segfault() -> None:
    """Writes from a subprocess to stdout and stderr, logs through Prefect, then crashes
    its own process with a segmentation fault."""
    import ctypes
    import subprocess

    logger = get_run_logger()
    logger.info("sent-marker from get_run_logger")
    time.sleep(3)  # Prefect's API handler sends it meanwhile
    subprocess.run(["sh", "-c", "echo out-marker; echo err-marker >&2"], check=True)
    logger.info("last-words-marker from get_run_logger")  # the crash comes before it is sent
    ctypes.string_at(0)


@flow
def numbered_lines(count: int = 2000) -> int:
    """Prints `count` numbered lines to stdout."""
    for number in range(count):
        print(f"numbered-line-{number:05d}", flush=True)
    return count


@flow
def ignores_sigterm(seconds: float = 300.0) -> None:
    """Ignores SIGTERM, the signal of a cancel, and sleeps."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    get_run_logger().info("ignores_sigterm: SIGTERM ignored")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.5)


@flow
def stops_its_runner(seconds: float = 300.0) -> None:
    """Stops (SIGSTOP) every ancestor of its process but the container's first process:
    Prefect's runner and supervisor in the container can no longer act on a cancel."""
    import os
    import signal

    get_run_logger().info("stops_its_runner: stopping the runner")
    time.sleep(2)  # the log line is sent meanwhile
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pid = os.getppid()
    while pid > 1:
        with open(f"/proc/{pid}/stat") as stat:
            parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        os.kill(pid, signal.SIGSTOP)
        pid = parent
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.5)


@flow
def starts_itself_again(seconds: float = 25.0) -> int:
    """Hostile: on its first start, makes its own run due again while its container goes
    on (its own retry, proposed as a failure, turned into one a worker's poll returns by
    rewriting its retry policy), so that another worker starts a second container of the
    run meanwhile; a later start only says which one it is."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import FlowRunPolicy
    from prefect.context import get_run_context
    from prefect.states import Failed

    run = get_run_context().flow_run
    logger = get_run_logger()
    logger.info("starts_itself_again: run count %d", run.run_count)
    if run.run_count > 1:
        return run.run_count
    policy = FlowRunPolicy(retries=1, retry_delay=0)
    with get_client(sync_client=True) as client:
        client.update_flow_run(run.id, empirical_policy=policy)
        answer = client.set_flow_run_state(run.id, Failed(message="not really"))
        client.update_flow_run(run.id, empirical_policy=policy)  # retry_type gone
        logger.info("starts_itself_again: its run is now %s", answer.state.name)
    time.sleep(seconds)
    return run.run_count
