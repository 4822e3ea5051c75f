"""Health and Prometheus metrics of `prefect-managed serve`.

`prefect-managed serve --http-port N` serves, on `--http-host` (127.0.0.1 by default):

- `GET /health`: 200 while the service serves (or drains) and read its pools from the
  Prefect API lately; 503 when it is stopping or has not reached the API for
  `3 × --poll-seconds + 30` seconds. The body is JSON saying which.
- `GET /metrics`: Prometheus' text format (`prometheus-client`), read from the live
  service at each scrape: runs admitted, waiting (for a slot or for room on the host),
  running; slots held; start latency; the month's compute hours against the quota; the
  host's memory and CPUs held against what it may give; draining.

A worker counts into its `PoolStats`; the service gives every worker of a pool the same
one, so counters survive a worker's restart. The collector only reads.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from prefect_managed.service import ManagedService

__all__ = ["START_BUCKETS", "HealthServer", "PoolStats", "ServiceCollector"]

#: Start latency buckets, in seconds (scheduled time to container started).
START_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


@dataclass
class PoolStats:
    """What the workers of one pool counted."""

    admitted: int = 0
    waiting_for_slot: int = 0  # at the last poll
    waiting_for_room: int = 0  # at the last poll
    start_buckets: list[int] = field(default_factory=lambda: [0] * len(START_BUCKETS))
    start_count: int = 0
    start_sum: float = 0.0

    def observe_start(self, seconds: float) -> None:
        for index, bound in enumerate(START_BUCKETS):
            if seconds <= bound:
                self.start_buckets[index] += 1
        self.start_count += 1
        self.start_sum += seconds


class ServiceCollector:
    """Reads the service and its workers at each scrape."""

    def __init__(self, service: ManagedService) -> None:
        self._service = service

    def collect(self) -> Iterator[Metric]:
        service = self._service
        workers = service.workers()
        stats = service.stats()
        admitted = CounterMetricFamily(
            "prefect_managed_runs_admitted", "Flow runs this service started.", labels=["pool"]
        )
        waiting = GaugeMetricFamily(
            "prefect_managed_runs_waiting",
            "Flow runs due that this service did not start at its last poll, by reason: no "
            "workspace slot free, or no room on this host.",
            labels=["pool", "reason"],
        )
        latency = HistogramMetricFamily(
            "prefect_managed_start_latency_seconds",
            "From a flow run's scheduled time to its container started.",
            labels=["pool"],
        )
        for pool, counted in stats:
            admitted.add_metric([pool], counted.admitted)
            waiting.add_metric([pool, "slot"], counted.waiting_for_slot)
            waiting.add_metric([pool, "room"], counted.waiting_for_room)
            cumulative = [
                (str(bound), count)
                for bound, count in zip(START_BUCKETS, counted.start_buckets, strict=True)
            ]
            latency.add_metric(
                [pool], [*cumulative, ("+Inf", counted.start_count)], counted.start_sum
            )
        running = GaugeMetricFamily(
            "prefect_managed_runs_running",
            "Flow runs this service runs now (started or taken over, until finished).",
            labels=["pool"],
        )
        slots = GaugeMetricFamily(
            "prefect_managed_slots_held",
            "Slots of the workspace's concurrency limit this service holds.",
            labels=["pool"],
        )
        for pool, worker in workers:
            running.add_metric([pool], worker.runs_in_flight)
            slots.add_metric([pool], worker.slots_held)
        yield from (admitted, waiting, latency, running, slots)

        workspace = service.policy.workspace.name
        quota = GaugeMetricFamily(
            "prefect_managed_quota_hours",
            "The workspace's monthly compute hours.",
            labels=["workspace"],
        )
        quota.add_metric([workspace], service.policy.tier.compute_hours_per_month)
        yield quota
        used = next((w.month_hours for _, w in workers if w.month_hours is not None), None)
        if used is not None:
            used_hours = GaugeMetricFamily(
                "prefect_managed_quota_used_hours",
                "Compute hours the workspace used this month, as last read from the ledger.",
                labels=["workspace"],
            )
            used_hours.add_metric([workspace], used)
            yield used_hours
        capacity = next((w.host_capacity for _, w in workers), None)
        if capacity is not None and capacity.capacity is not None:
            memory = GaugeMetricFamily(
                "prefect_managed_host_memory_bytes",
                "Memory of this host's engine that flow runs may be given, and that the "
                "running ones hold (their limits).",
                labels=["kind"],
            )
            memory.add_metric(["capacity"], capacity.capacity.memory)
            memory.add_metric(["held"], capacity.held.memory)
            cpus = GaugeMetricFamily(
                "prefect_managed_host_cpus",
                "CPUs of this host's engine that flow runs' caps may add up to, and that the "
                "running ones hold.",
                labels=["kind"],
            )
            cpus.add_metric(["capacity"], capacity.capacity.cpus)
            cpus.add_metric(["held"], capacity.held.cpus)
            yield from (memory, cpus)
        served = GaugeMetricFamily("prefect_managed_pools_served", "Managed pools served.")
        served.add_metric([], len(workers))
        draining = GaugeMetricFamily(
            "prefect_managed_draining", "1 while the service drains (takes no new runs)."
        )
        draining.add_metric([], 1.0 if service.draining else 0.0)
        yield from (served, draining)


class HealthServer:
    """`/health` and `/metrics` over HTTP, in a daemon thread."""

    def __init__(self, service: ManagedService, host: str, port: int) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ServiceCollector(service))  # type: ignore[arg-type]
        registry = self.registry

        class Handler(BaseHTTPRequestHandler):
            timeout = 10  # an idle connection is closed, not kept by a thread for good

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path == "/metrics":
                    self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif self.path == "/health":
                    healthy, body = service.health()
                    self._send(
                        200 if healthy else 503,
                        json.dumps(body).encode(),
                        "application/json",
                    )
                else:
                    self._send(404, b"not found: try /health or /metrics\n", "text/plain")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # scrapes every few seconds: not worth a log line each

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="prefect-managed-http", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
