"""The CPU of a run gateway peer check (`RunGateway._peer_serves`), which a worker process
sharing another process's gateway makes every 2 s: the reused loopback client against a
new httpx client per check (what it did before), side by side in one run.

    python -m benchmarks.peer_check
"""

from __future__ import annotations

import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from prefect_managed.gateway.app import HEALTH_PATH, Gateway
from prefect_managed.gateway.host import RunGateway

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from services import free_port  # noqa: E402

CHECKS = 40
KEY = b"k" * 32


def _gateway(port: int) -> RunGateway:
    return RunGateway(port, Gateway("http://127.0.0.1:1/api", {}, None, KEY, "api-label"))


def _cpu_ms(check: Callable[[], object]) -> float:
    """The checking thread's CPU per check (the serving thread's is not counted)."""
    check()
    start = time.thread_time()
    for _ in range(CHECKS):
        check()
    return (time.thread_time() - start) / CHECKS * 1000


def main() -> None:
    port = free_port()
    holder = _gateway(port)
    assert holder.ensure() == "bound"
    peer = _gateway(port)
    url = f"http://127.0.0.1:{port}{HEALTH_PATH}"

    def new_client_each_time() -> object:
        return httpx.get(url, params={"challenge": secrets.token_hex(16)}, timeout=3).json()

    reused = _cpu_ms(peer._peer_serves)
    fresh = _cpu_ms(new_client_each_time)
    print("| peer check, CPU of the checking thread | ms per check | per hour (every 2 s) |")
    print("|---|---|---|")
    print(f"| reused loopback client | {reused:.1f} | {reused * 1800 / 1000:.1f} s |")
    print(f"| new httpx client per check (before) | {fresh:.1f} | {fresh * 1800 / 1000:.1f} s |")


if __name__ == "__main__":
    main()
