"""The run gateway's CPU per request: what the worker process pays for each API call of a
flow run's container, by kind of request, and where it goes.

A real Prefect server (SQLite, with a credential) and the gateway served in this process;
one flow run, and its token; then the same requests as a trivial run makes, sent through
the gateway, with the gateway thread's CPU read from the kernel (`/proc`) before and after.
Side by side, in one run, three gateways:

- `now`: as the worker serves it (`runtime/forward.py` `listener`, Nagle's algorithm
  off; an answer of known, bounded size read whole and sent in one piece; answers asked
  for uncompressed);
- `streamed, compressed`: every answer streamed, and compressed by the server for the
  gateway to decompress (`Gateway.inline_answer_bytes = 0`, `upstream_encoding = None`:
  how it forwarded before);
- `... and Nagle on`: the same, with the listening socket made with protocol 0, so
  asyncio left Nagle's algorithm on (before that);

and the same requests sent straight to the server.

    python -m benchmarks.gateway                 # 200 rounds of each request
    python -m benchmarks.gateway --profile 30    # and cProfile's 30 costliest functions
                                                 # (by the gateway thread's CPU time)

Only loopback traffic.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import secrets
import socket
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from uuid import UUID

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from services import free_port, start_prefect_server  # noqa: E402

KEY = secrets.token_bytes(32)
AUTH = f"admin:{secrets.token_hex(8)}"


def _thread_cpu_seconds(native_id: int) -> float:
    """User and system CPU of one thread of this process, from the kernel."""
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _requests(run: UUID) -> dict[str, tuple[str, str, object]]:
    """What a trivial run's engine sends most (see the benchmark's server request table)."""
    now = datetime.now(timezone.utc).isoformat()
    logs = [
        {
            "name": "prefect.flow_runs",
            "level": 20,
            "message": f"line {i}",
            "timestamp": now,
            "flow_run_id": str(run),
        }
        for i in range(5)
    ]
    return {
        "GET /flow_runs/{id}": ("GET", f"/flow_runs/{run}", None),
        "POST /logs/ (5 lines)": ("POST", "/logs/", logs),
        "POST /flow_runs/filter": ("POST", "/flow_runs/filter", {"limit": 1}),
        "PATCH /flow_runs/{id}/labels": ("PATCH", f"/flow_runs/{run}/labels", {"team": "a"}),
        "GET /admin/version": ("GET", "/admin/version", None),
    }


def _send_all(client: httpx.Client, base: str, requests: dict, rounds: int) -> None:
    for method, path, body in requests.values():
        for _ in range(rounds):
            response = client.request(method, base + path, json=body)
            if response.status_code >= 400:
                raise RuntimeError(f"{method} {path}: {response.status_code} {response.text}")


def _old_listener(address: str, port: int) -> socket.socket:
    """The gateway's listening socket before `forward.listener`: protocol 0, so asyncio
    left Nagle's algorithm on for its connections."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.listen(128)
    return sock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200, help="requests of each kind")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="cProfile's top N")
    args = parser.parse_args()

    from prefect_managed.gateway.app import Gateway
    from prefect_managed.gateway.host import RunGateway, auth_headers
    from prefect_managed.gateway.tokens import run_token
    from prefect_managed.runtime.forward import listener as new_listener

    home = Path(tempfile.mkdtemp(prefix="prefect-managed-gateway-bench-"))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    server = start_prefect_server(
        port, home / "server", home, {"PREFECT_SERVER_API_AUTH_STRING": AUTH}
    )
    # name -> (listening socket, Gateway.inline_answer_bytes, Gateway.upstream_encoding)
    variants = {
        "now": (new_listener, Gateway.inline_answer_bytes, Gateway.upstream_encoding),
        "streamed, compressed": (new_listener, 0, None),
        "... and Nagle on": (_old_listener, 0, None),
    }
    rows: list[tuple[str, str, float, float, float, float]] = []
    # The thread's CPU clock: the time it waits in epoll is not counted.
    profiler = cProfile.Profile(time.thread_time) if args.profile else None
    try:
        headers = auth_headers(AUTH, None)
        with httpx.Client(headers=headers, timeout=30) as admin:
            # A server just started may answer 503 for a moment (its database still busy).
            deadline = time.monotonic() + 60
            while True:
                flow = admin.post(f"{api}/flows/", json={"name": "gateway-bench"})
                created = (
                    admin.post(f"{api}/flow_runs/", json={"flow_id": flow.json()["id"]})
                    if flow.status_code < 400
                    else flow
                )
                if created.status_code != 503 or time.monotonic() > deadline:
                    break
                time.sleep(1)
            if created.status_code >= 400:
                raise RuntimeError(
                    f"creating the flow run: {created.status_code} {created.text[:500]}"
                )
            run = UUID(created.json()["id"])
        token = run_token(KEY, run, 3600)
        requests = _requests(run)
        direct = httpx.Client(headers=headers, timeout=30)
        gateways = {}
        for which, (listener, inline_bytes, encoding) in variants.items():
            app = Gateway(api, headers, AUTH, KEY, "bench")
            app.inline_answer_bytes, app.upstream_encoding = inline_bytes, encoding
            gateway = RunGateway(free_port(), app)
            gateway._start(listener("127.0.0.1", gateway.port))
            client = httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=30)
            _send_all(client, gateway.url, requests, 5)  # warm: connections, caches
            gateways[which] = (gateway, client)
        for index, (name, request) in enumerate(requests.items()):
            one = {name: request}
            # Each kind of request starts with another gateway: a machine that speeds up
            # or slows down during the run weighs on all of them alike.
            order = list(gateways.items())
            order = order[index % len(order) :] + order[: index % len(order)]
            client_before = time.thread_time()
            started = time.perf_counter()
            _send_all(direct, api, one, args.rounds)
            direct_wall = time.perf_counter() - started
            client_cpu = time.thread_time() - client_before
            for which, (gateway, client) in order:
                thread = gateway._thread
                profile = profiler is not None and which == "now"
                if profile:
                    _in_gateway_thread(gateway, profiler.enable)
                before = _thread_cpu_seconds(thread.native_id)
                started = time.perf_counter()
                _send_all(client, gateway.url, one, args.rounds)
                wall = time.perf_counter() - started
                gateway_cpu = _thread_cpu_seconds(thread.native_id) - before
                if profile:
                    _in_gateway_thread(gateway, profiler.disable)
                rows.append((name, which, gateway_cpu, wall, direct_wall, client_cpu))
        for gateway, client in gateways.values():
            client.close()
            gateway.stop()
        direct.close()
    finally:
        server.stop()

    n = args.rounds
    print(
        f"| request ({n} of each) | gateway | gateway thread CPU per request "
        "| latency through the gateway | latency direct to the server |"
    )
    print("|---|---|---|---|---|")
    names, kinds = [row[0] for row in rows], list(variants)
    rows.sort(key=lambda row: (names.index(row[0]), kinds.index(row[1])))
    for name, which, cpu, wall, direct_wall, _ in rows:
        print(
            f"| `{name}` | {which} | {cpu / n * 1000:.2f} ms | {wall / n * 1000:.2f} ms "
            f"| {direct_wall / n * 1000:.2f} ms |"
        )
    print()
    for which in variants:
        mine = [row for row in rows if row[1] == which]
        cpu = sum(row[2] for row in mine) / (n * len(mine))
        added = sum(row[3] - row[4] for row in mine) / (n * len(mine))
        print(
            f"{which}: {cpu * 1000:.2f} ms of the gateway thread's CPU and "
            f"{added * 1000:.1f} ms of latency added per request, on average"
            + (" (cProfile on: CPU inflated)" if profiler is not None and which == "now" else "")
        )
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.profile)
        print("\ncProfile of the gateway thread (now), by own CPU time:\n")
        print(out.getvalue())


def _in_gateway_thread(gateway, call) -> None:
    """Run `call` in the gateway's event loop thread (cProfile profiles the thread that
    enables it) and wait for it."""
    done = threading.Event()
    loop = gateway._server.servers[0].get_loop()  # uvicorn's asyncio server

    def run() -> None:
        call()
        done.set()

    loop.call_soon_threadsafe(run)
    done.wait(5)


if __name__ == "__main__":
    main()
