"""Measures the concurrency leases across the two API processes of the HA topology
(tests/topology.py): a slot taken through API process A, then renewed, contended,
released through process B; then A killed while B renews. Prints a table.

    python tests/topology_leases.py --dir D
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from uuid import uuid4

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.exceptions import PrefectHTTPStatusError
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
from topology import start_topology

LIMIT = "topology-lease-probe"


def client_of(url: str, auth: str):
    with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_API_AUTH_STRING: auth}):
        return get_client()


async def take(client) -> str | None:
    try:
        response = await client.increment_concurrency_slots_with_lease(
            names=[LIMIT],
            slots=1,
            mode="concurrency",
            lease_duration=60,
            holder=ConcurrencyLeaseHolder(type="flow_run", id=uuid4()),
        )
    except PrefectHTTPStatusError as exc:
        return f"{exc.response.status_code}"
    return str(response.json()["lease_id"])


async def status(call) -> str:
    try:
        await call
    except PrefectHTTPStatusError as exc:
        return f"{exc.response.status_code}"
    return "2xx"


async def active(client) -> int:
    return (await client.read_global_concurrency_limit_by_name(LIMIT)).active_slots


async def measure(topology) -> list[tuple[str, str]]:
    rows = []
    a_url, b_url = topology.api_urls
    async with client_of(a_url, topology.auth) as a, client_of(b_url, topology.auth) as b:
        await a.upsert_global_concurrency_limit_by_name(LIMIT, 1)
        lease = await take(a)
        rows.append(("take a slot through A", "lease granted" if len(lease) > 5 else lease))
        rows.append(
            ("renew the lease through B", await status(b.renew_concurrency_lease(lease, 60)))
        )
        second = await take(b)
        rows.append(("take a second slot through B", "granted" if len(second) > 5 else second))
        rows.append(
            ("release through B", await status(b.release_concurrency_slots_with_lease(lease)))
        )
        rows.append(("slots taken right after, read through A", str(await active(a))))
        lease = await take(a)
    topology.kill_api(0)
    async with client_of(b_url, topology.auth) as b:
        rows.append(
            (
                "A SIGKILLed: renew A's lease through B",
                await status(b.renew_concurrency_lease(lease, 60)),
            )
        )
        rows.append(("slots taken, read through B", str(await active(b))))
    began = time.monotonic()
    topology.start_api(0)
    rows.append(("A started again (s)", f"{time.monotonic() - began:.1f}"))
    async with client_of(a_url, topology.auth) as a:
        rows.append(
            ("renew through the restarted A", await status(a.renew_concurrency_lease(lease, 60)))
        )
        rows.append(
            ("release through A", await status(a.release_concurrency_slots_with_lease(lease)))
        )
        rows.append(("slots taken after it", str(await active(a))))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    topology = start_topology(args.dir)
    try:
        rows = asyncio.run(measure(topology))
    finally:
        topology.stop()
    width = max(len(what) for what, _ in rows)
    print(f"| {'Step (limit of 1, Redis lease storage)':{width}} | Answer |")
    for what, answer in rows:
        print(f"| {what:{width}} | {answer} |")


if __name__ == "__main__":
    main()
