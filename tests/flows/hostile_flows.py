"""Hostile flows: each tries one way out of its container, without catching the error,
so the run's final state says what the container refused."""

import os
import socket
import subprocess
from pathlib import Path

from prefect import flow, get_run_logger


def _docker_socket() -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect("/var/run/docker.sock")


def _host_file(target: str) -> None:
    """A file of the worker host (its path given by the test): tried as the host names
    it and through every root the container's /proc offers. None is mounted."""
    spellings = [
        target,
        f"/proc/1/root{target}",
        f"/proc/self/root{target}",
        f"/proc/1/cwd/../../../..{target}",
        f"/host{target}",
        f"/rootfs{target}",
        f"/run/prefect-managed/../../..{target}",
    ]
    for spelling in spellings:
        try:
            content = Path(spelling).read_text()
        except OSError:
            continue
        raise RuntimeError(f"read the host's file at {spelling}: {content}")
    raise FileNotFoundError(f"the host's file is at none of {len(spellings)} paths")


def _setuid() -> None:
    os.setuid(0)


def _setuid_binary() -> None:
    # `su` is setuid root in the image; no-new-privileges keeps it from gaining root.
    done = subprocess.run(
        ["su", "-c", "id -u", "root"], input="", capture_output=True, text=True, timeout=30
    )
    raise PermissionError(
        f"su exited with code {done.returncode}: {(done.stderr or done.stdout).strip()}"
    )


def _capability() -> None:
    # A raw socket needs CAP_NET_RAW, which the container does not have.
    socket.socket(socket.AF_PACKET, socket.SOCK_RAW)


def _write_outside() -> None:
    Path("/usr/lib/escape.txt").write_text("written by a flow")


ATTEMPTS = {
    "docker_socket": _docker_socket,
    "host_file": _host_file,
    "setuid": _setuid,
    "setuid_binary": _setuid_binary,
    "capability": _capability,
    "write_outside": _write_outside,
}


@flow
def escape(attempt: str, target: str = "") -> str:
    get_run_logger().info("attempting %s", attempt)
    if attempt == "host_file":
        _host_file(target)
    else:
        ATTEMPTS[attempt]()
    return f"{attempt} succeeded"


@flow
def writable_dirs() -> dict:
    """Writes where a flow may: its home, its working directory and /tmp."""
    written = {}
    for folder in (Path.home(), Path.cwd(), Path("/tmp")):
        target = folder / "flow-output.txt"
        target.write_text("ok")
        written[str(folder)] = target.read_text()
    get_run_logger().info("writable: %s", written)
    return written


@flow
def fork_bomb(hold_seconds: float = 20.0) -> int:
    """Forks sleeping children until the kernel refuses, and keeps them.

    Each child becomes `sleep` at once, so the bomb exhausts processes, not memory: a
    forked copy of the engine process would reach the memory cap first.
    """
    children = 0
    while True:
        pid = os.fork()
        if pid == 0:
            try:
                os.execv("/bin/sleep", ["sleep", str(int(hold_seconds))])
            finally:
                os._exit(0)
        children += 1
