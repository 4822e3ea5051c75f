"""The worker's side of Docker: small calls in worker threads, and one watch loop.

`Containers.watch` serves the runs the worker started and the containers it took over
from a dead worker alike: it samples the container's stats into a `Meter`, keeps one
run-time clock (from the container's own `StartedAt`), calls back once when the tier's
maximum run time is reached, and returns when the container is no longer running. A
failing callback is logged and never ends the watch; a Docker error ends only the
sampling, never the run (the caller finishes the container from what Docker says).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import anyio
import docker
import docker.errors
import requests.exceptions
from docker.constants import DEFAULT_TIMEOUT_SECONDS
from prefect.utilities.asyncutils import run_sync_in_worker_thread

from prefect_managed.configuration import API_LABEL, MANAGED_LABEL, WORKSPACE_LABEL
from prefect_managed.container_output import CappedOutput, StreamTail, merge
from prefect_managed.metering import Meter
from prefect_managed.outcome import ContainerReport, docker_lost

__all__ = [
    "STATS_INTERVAL",
    "VERSION_SECONDS",
    "Containers",
    "DockerClients",
    "Watch",
    "in_daemon_thread",
    "is_root_user",
    "orphans",
    "pool_labels",
    "workspace_labels",
]

#: Seconds between two run-time checks of a running container; Docker's stats stream
#: sends a sample about every second, each one added to the container's meter.
STATS_INTERVAL = 2.0
#: Seconds for which the engine's API version, once asked, serves every new client.
VERSION_SECONDS = 60.0
_DOCKER_ERRORS = (RuntimeError, docker.errors.DockerException, requests.RequestException)

#: The wait before a stats stream that ended while its container runs is opened again.
STREAM_AGAIN_SECONDS = 1.0


class DockerClients:
    """Docker clients made as prefect-docker makes them (from the environment, with its
    `DOCKER_CLIENT_TIMEOUT`), that ask the engine for its API version once a minute
    rather than once per client.

    `docker.from_env()` asks the engine for its version before a client's first call:
    with a client per call (each closed after it), that doubled the worker's requests to
    the engine and was about a tenth of its CPU in the benchmark's profile. An engine
    upgraded meanwhile serves the older version; one replaced by an older engine is
    asked again within `version_seconds`. Thread-safe: at worst two threads both ask.
    """

    def __init__(
        self,
        version_seconds: float = VERSION_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._version_seconds = version_seconds
        self._clock = clock
        self._version: str | None = None
        self._asked_at = -math.inf

    def __call__(self) -> docker.DockerClient:
        known = self._clock() - self._asked_at < self._version_seconds
        version = self._version if known else None  # None: the client asks the engine
        timeout = int(os.environ.get("DOCKER_CLIENT_TIMEOUT", DEFAULT_TIMEOUT_SECONDS))
        try:
            client = docker.from_env(timeout=timeout, version=version)
        except docker.errors.DockerException as exc:
            raise RuntimeError("Could not connect to Docker.") from exc  # as prefect-docker
        if version is None:
            self._version, self._asked_at = client.api.api_version, self._clock()
        return client


@dataclass(frozen=True)
class ImageFacts:
    """What one inspection of a run's image says (`Containers.image_facts`)."""

    id: str
    user: str  # its USER; "" for root
    entrypoint: list[str] | None


@dataclass
class Watch:
    """One container under watch: what it was when first seen, and what was measured."""

    container_id: str
    meter: Meter = field(default_factory=Meter)
    report: ContainerReport | None = None
    #: reached the maximum run time (the run's message says so)
    timed_out: bool = False
    #: the container was stopped for it (a failed stop is tried again at the next sample)
    stopped: bool = False
    #: stopped by the worker because its run stayed Cancelling (`cancels`)
    cancelled: bool = False


class Containers:
    """Docker calls for the worker, each with a client it closes."""

    def __init__(
        self,
        get_client: Callable[[], docker.DockerClient],
        logger: logging.Logger | logging.LoggerAdapter[Any],
    ) -> None:
        self._get_client = get_client
        self._logger = logger
        # Image id -> whether it can run the isolated network's forwarder.
        self._forwarder_images: dict[str, bool] = {}
        # `running`'s labels -> the containers it listed last, as first inspected.
        self._listed: dict[tuple[str, ...], dict[str, ContainerReport]] = {}

    # -- the watch loop -------------------------------------------------------------

    async def watch(
        self,
        watch: Watch,
        max_run_seconds: float,
        on_run_time: Callable[[], Awaitable[None]],
    ) -> None:
        """Sample and clock the container until it stops running (or the caller cancels)."""
        try:
            # One Docker client for the whole watch: a sample every few seconds per
            # running container must not pay for building a client each time.
            with closing(await run_sync_in_worker_thread(self._get_client)) as client:
                attrs = await run_sync_in_worker_thread(_inspect, client, watch.container_id)
                if attrs is None:
                    return
                watch.report = report = ContainerReport.from_inspect(attrs)
                if report.started_at and report.finished_at and not report.running:
                    # Found already exited (taken over after a crash): it ran past its
                    # limit if its own timestamps say so; it was stopped for it.
                    length = (report.finished_at - report.started_at).total_seconds()
                    watch.timed_out = watch.stopped = length >= max_run_seconds
                per_check = max(1, round(STATS_INTERVAL))
                while True:
                    try:
                        # One stats stream at a time: Docker pushes a sample a second on
                        # one connection, where a request per sample cost the worker about
                        # five times the CPU (and a second's wait each, one_shot or not).
                        samples = await run_sync_in_worker_thread(
                            client.api.stats, watch.container_id, stream=True, decode=True
                        )
                        while fed := await run_sync_in_worker_thread(
                            _feed, samples, watch.meter, per_check
                        ):
                            await self._check_run_time(watch, max_run_seconds, on_run_time)
                        if fed is False:
                            return  # stopped, or gone
                    except _DOCKER_ERRORS:
                        self._logger.debug(
                            "The stats of container %s stopped", watch.container_id, exc_info=True
                        )
                    # The stream ended without saying why: the container is being
                    # removed or stopped meanwhile, or the stream was cut while it runs
                    # (an engine restarted with live-restore, a dropped connection). Then
                    # it is watched again: else its run time would no longer be clocked,
                    # nor its usage sampled.
                    attrs = await run_sync_in_worker_thread(_inspect, client, watch.container_id)
                    if attrs is None or not ContainerReport.from_inspect(attrs).running:
                        return
                    await self._check_run_time(watch, max_run_seconds, on_run_time)
                    self._logger.info(
                        "The stats stream of container %s ended while it runs; watching it again",
                        watch.container_id,
                    )
                    await anyio.sleep(STREAM_AGAIN_SECONDS)
        except _DOCKER_ERRORS:
            # Measuring is not worth a run: a container being removed answers stats with
            # an empty body, an engine going away with no answer. The caller finishes
            # the container from what Docker says.
            self._logger.debug("Stopped watching container %s", watch.container_id, exc_info=True)

    async def _check_run_time(
        self, watch: Watch, max_run_seconds: float, on_run_time: Callable[[], Awaitable[None]]
    ) -> None:
        started = watch.report.started_at if watch.report else None
        if watch.stopped or started is None:
            return
        if (datetime.now(timezone.utc) - started).total_seconds() < max_run_seconds:
            return
        watch.timed_out = True
        try:
            await on_run_time()
        except Exception:
            # Logged and tried again at the next sample; the container is finished and
            # removed when it exits, and its run made final then.
            self._logger.exception(
                "Could not stop container %s at the maximum run time", watch.container_id
            )
        else:
            watch.stopped = True

    # -- single calls, in worker threads --------------------------------------------

    async def inspect(self, container_id: str) -> ContainerReport | None:
        attrs = await run_sync_in_worker_thread(self._with_client, _inspect, container_id)
        return None if attrs is None else ContainerReport.from_inspect(attrs)

    async def find(self, labels: list[str]) -> list[ContainerReport]:
        """Every container (running or not) carrying all of `labels` ("key=value")."""

        def _find(client: docker.DockerClient) -> list[dict[str, Any]]:
            found = client.api.containers(all=True, filters={"label": labels})
            return [a for a in (_inspect(client, item["Id"]) for item in found) if a]

        found: list[dict[str, Any]] = await run_sync_in_worker_thread(self._with_client, _find)
        return [ContainerReport.from_inspect(attrs) for attrs in found]

    async def running(self, labels: list[str]) -> list[ContainerReport]:
        """Every running container carrying all of `labels` ("key=value"), as inspected
        when it was first listed.

        Each call lists the containers (one request) and inspects only those it has not
        listed before: what is read of a running container (its labels, its limits, its
        start) is fixed when it is made and started. Admission calls this at every poll
        with runs waiting: one inspect per running container per poll was most of the
        worker's requests to the engine on a busy host."""
        key = tuple(sorted(labels))

        def _running(client: docker.DockerClient) -> list[ContainerReport]:
            known = self._listed.get(key, {})
            found = client.api.containers(filters={"label": labels, "status": "running"})
            listed: dict[str, ContainerReport] = {}
            for item in found:
                report = known.get(item["Id"])
                if report is None:
                    attrs = _inspect(client, item["Id"])
                    if attrs is None:
                        continue  # removed since the list
                    report = ContainerReport.from_inspect(attrs)
                listed[item["Id"]] = report
            self._listed[key] = listed  # those no longer running are forgotten
            return list(listed.values())

        result: list[ContainerReport] = await run_sync_in_worker_thread(self._with_client, _running)
        return result

    async def output(self, container_id: str, tail: int) -> list[str]:
        def _output(client: docker.DockerClient) -> list[str]:
            try:
                raw: bytes = client.api.logs(container_id, stdout=True, stderr=True, tail=tail)
            except docker.errors.APIError:  # 404 gone, 409 dead or being removed
                return ["(the container was removed before its output could be read)"]
            return raw.decode(errors="replace").splitlines()

        return await run_sync_in_worker_thread(self._with_client, _output)

    async def output_tail(self, container_id: str, max_bytes: int) -> CappedOutput | None:
        """The last `max_bytes` of the container's stdout and stderr in time order,
        Prefect's own log records left out; None when the container is gone.

        Each stream is read as a stream (Docker's frames, timestamps on) into a bounded
        `StreamTail`, so a flood never holds more than about `max_bytes` per stream in
        the worker's memory; in a worker thread, off the event loop."""

        def _read(client: docker.DockerClient) -> CappedOutput | None:
            tails = []
            for stream in ("stdout", "stderr"):
                tail = StreamTail(stream, max_bytes)
                try:
                    frames = client.api.logs(
                        container_id,
                        stdout=stream == "stdout",
                        stderr=stream == "stderr",
                        stream=True,
                        follow=False,
                        timestamps=True,
                    )
                    for frame in frames:
                        tail.feed(frame)
                except docker.errors.APIError:  # 404 gone, 409 dead or being removed
                    return None
                tail.close()
                tails.append(tail)
            return merge(tails, max_bytes)

        return await run_sync_in_worker_thread(self._with_client, _read)

    async def remove_unstarted(self, flow_run_id: str) -> None:
        """Remove the containers of a flow run that were created but never started."""

        def _remove(client: docker.DockerClient) -> None:
            filters = {"label": [f"io.prefect.flow-run-id={flow_run_id}"], "status": "created"}
            for item in client.api.containers(all=True, filters=filters):
                try:
                    client.api.remove_container(item["Id"], force=True)
                except docker.errors.NotFound:
                    continue

        await run_sync_in_worker_thread(self._with_client, _remove)

    async def image_present(self, image: str) -> bool:
        def _present(client: docker.DockerClient) -> bool:
            try:
                client.api.inspect_image(image)
            except docker.errors.ImageNotFound:
                return False
            except docker.errors.APIError:
                return True  # not the image's fault: report the original error
            return True

        return await run_sync_in_worker_thread(self._with_client, _present)

    async def image_facts(self, image: str, pull: bool = False) -> ImageFacts | None:
        """What the worker decides a run's container from (`ImageFacts`), read in one
        inspection; None when the image is not on the Docker host.

        `pull`: pull it first when it is missing, as prefect-docker would at the
        container's creation, only sooner (the image's user, entrypoint and python3
        decide the container). A failed pull is left to the run's own start, which
        reports it (`ImageNotAvailable`)."""

        def _facts(client: docker.DockerClient) -> ImageFacts | None:
            try:
                found = client.api.inspect_image(image)
            except docker.errors.ImageNotFound:
                if not pull:
                    return None
                repository, tag = docker.utils.parse_repository_tag(image)
                try:
                    client.images.pull(repository, tag=tag or "latest")
                except _DOCKER_ERRORS:
                    self._logger.debug("Could not pull image %s", image, exc_info=True)
                    return None
                try:
                    found = client.api.inspect_image(image)
                except docker.errors.ImageNotFound:
                    return None
            config = found.get("Config") or {}
            return ImageFacts(
                id=str(found["Id"]),
                user=config.get("User") or "",
                entrypoint=config.get("Entrypoint"),
            )

        return await run_sync_in_worker_thread(self._with_client, _facts)

    async def runs_forwarder(self, image_id: str, user: str) -> bool | None:
        """Whether the image `image_id` has what the isolated network's forwarder needs
        (`/bin/sh` and `python3` or `python` on its PATH), asked once per image in a
        short container with no network. None when it cannot be told (the probe did not
        end in time): the run then stays isolated."""
        if image_id in self._forwarder_images:
            return self._forwarder_images[image_id]

        def _probe(client: docker.DockerClient) -> bool | None:
            container = client.containers.create(
                image_id,
                entrypoint=["/bin/sh", "-c", "command -v python3 || command -v python"],
                command=[],
                network_mode="none",
                user=user,
                cap_drop=["ALL"],
                security_opt=["no-new-privileges"],
                mem_limit="64m",
                pids_limit=16,
            )
            try:
                try:
                    container.start()
                except docker.errors.APIError as exc:
                    # No /bin/sh in the image: it cannot start isolate.sh either.
                    missing = ("executable file not found", "no such file or directory")
                    return False if any(text in str(exc) for text in missing) else None
                return container.wait(timeout=60).get("StatusCode") == 0
            except (docker.errors.APIError, requests.exceptions.RequestException):
                return None
            finally:
                container.remove(force=True)

        found = await run_sync_in_worker_thread(self._with_client, _probe)
        if found is not None:
            self._forwarder_images[image_id] = found
        return found

    async def remove(self, container_id: str) -> None:
        def _remove(client: docker.DockerClient) -> None:
            try:
                client.api.remove_container(container_id, force=True)
            except docker.errors.NotFound:
                return

        await run_sync_in_worker_thread(self._with_client, _remove)
        self._logger.debug("Removed Docker container %r", container_id)

    async def info(self) -> dict[str, Any]:
        return await run_sync_in_worker_thread(self._with_client, lambda c: c.info())

    async def answers(self) -> bool:
        """Whether the Docker engine answers a new connection now (an error status is an
        answer; False only when it cannot be reached)."""
        try:
            await run_sync_in_worker_thread(self._with_client, lambda c: c.ping())
        except docker.errors.APIError:
            return True
        except Exception as exc:
            if docker_lost(exc):
                return False
            raise
        return True

    async def wait_for_engine(self, seconds: float) -> None:
        """Return once the Docker engine answers; `TimeoutError` after `seconds`."""
        with anyio.fail_after(seconds):
            while True:
                try:
                    await run_sync_in_worker_thread(self._with_client, lambda c: c.ping())
                    return
                except _DOCKER_ERRORS:
                    await anyio.sleep(2)

    def _with_client(self, call: Callable[..., Any], *args: Any) -> Any:
        with closing(self._get_client()) as client:
            return call(client, *args)


def is_root_user(user: str) -> bool:
    """Whether an image's `USER` ("", "root", "0", "0:0", "root:root") is root: an image
    made to run as root, with no home or writable Python for the runs' non-root uid."""
    name = user.partition(":")[0]
    return name in ("", "root", "0")


def workspace_labels(workspace: str, api: str) -> list[str]:
    """The labels every container of a workspace and API carries (Docker's `label=`
    filters)."""
    return [f"{MANAGED_LABEL}=true", f"{WORKSPACE_LABEL}={workspace}", f"{API_LABEL}={api}"]


def pool_labels(workspace: str, api: str, pool: str) -> list[str]:
    """The labels every container of a pool carries (Docker's `label=` filters)."""
    return [*workspace_labels(workspace, api), f"io.prefect.work-pool-name={pool}"]


def orphans(
    found: list[ContainerReport], watched: set[str], online_workers: set[str]
) -> list[ContainerReport]:
    """The containers of a pool a worker takes over: of a flow run, not watched by this
    worker (or just finished by it), and left by no worker that Prefect shows online."""
    return [
        report
        for report in found
        if report.flow_run_id
        and report.id not in watched
        and report.labels.get("io.prefect.worker-name") not in online_workers
    ]


#: The runs whose container this process is making (prefect-docker makes it in a thread
#: that a cancel leaves going), each with an event set when that ended: shared by the
#: workers of the process, so that a worker restarted in it (`prefect-managed serve`)
#: does not take such a run for one whose container will never be made.
CREATIONS = threading.Lock()
CREATING: dict[str, threading.Event] = {}


def being_made(flow_run_id: str) -> bool:
    with CREATIONS:
        return flow_run_id in CREATING


def in_daemon_thread(
    call: Callable[[], Any], abandoned: threading.Event, name: str, abandoned_result: Any
) -> Any:
    """`call()` in a daemon thread, waited for until `abandoned` is set.

    For a blocking wait on a container (prefect-docker's): in a worker thread it would
    keep the process from exiting until the container ended; abandoned, the daemon
    thread is left behind and `abandoned_result` returned.
    """
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    while thread.is_alive() and not abandoned.is_set():
        thread.join(1.0)
    if not outcome:
        return abandoned_result
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def _inspect(client: docker.DockerClient, container_id: str) -> dict[str, Any] | None:
    try:
        return client.api.inspect_container(container_id)
    except docker.errors.NotFound:
        return None


def _feed(samples: Iterator[dict[str, Any]], meter: Meter, count: int) -> bool | None:
    """The next `count` samples of a stats stream into `meter`: True while it goes on;
    False once Docker says the container stopped (its zero time) or is gone; None when
    the stream ended without saying (being removed, or cut while the container runs)."""
    for _ in range(count):
        try:
            stats = next(samples, None)
        except docker.errors.NotFound:
            return False  # gone before the stream began
        except ValueError:
            return None  # a cut answer
        if stats is None:
            return None
        if str(stats.get("read", "")).startswith("0001-"):
            return False
        meter.add(stats)
    return True
