"""The worker's Docker clients ask the engine for its API version once a minute, not
once per client (`DockerClients`), against the real engine."""

from __future__ import annotations

import logging
import uuid
from contextlib import closing

import anyio
import docker
import pytest
from docker.api.client import APIClient

from prefect_managed.containers import Containers, DockerClients

pytestmark = pytest.mark.docker


@pytest.fixture
def version_requests(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The engine's answers to the clients' version requests (the real call, counted)."""
    answers: list[str] = []
    ask = APIClient._retrieve_server_version

    def counted(self: APIClient) -> str:
        answers.append(ask(self))
        return answers[-1]

    monkeypatch.setattr(APIClient, "_retrieve_server_version", counted)
    return answers


def test_clients_within_a_minute_ask_the_engine_for_its_version_once(version_requests):
    now = [0.0]
    clients = DockerClients(version_seconds=60, clock=lambda: now[0])
    for _ in range(3):
        with closing(clients()) as client:
            assert client.ping()
            assert client.api.api_version == version_requests[0]
    assert len(version_requests) == 1

    now[0] = 61.0  # a minute on: an engine replaced meanwhile is asked again
    with closing(clients()) as client:
        assert client.ping()
    assert len(version_requests) == 2


def test_the_version_clients_use_is_the_engines():
    with closing(DockerClients()()) as client, closing(docker.from_env()) as reference:
        assert client.api.api_version == reference.version()["ApiVersion"]
        assert client.containers.list(limit=1) is not None


def test_an_engine_that_cannot_be_reached_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    with pytest.raises(RuntimeError, match="Could not connect to Docker"):
        DockerClients()()


def test_answers_says_whether_the_engine_takes_a_new_connection(monkeypatch, tmp_path):
    """What the worker asks when a container exits: an engine told to stop refuses new
    connections before it stops its containers (tests/test_faults.py restarts one)."""
    clients = DockerClients()
    containers = Containers(clients, logging.getLogger("test"))
    assert anyio.run(containers.answers) is True
    # The version is known now, so the next client connects only for the ping itself.
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    assert anyio.run(containers.answers) is False


@pytest.fixture
def inspected(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The containers the engine was asked to inspect (the real call, counted)."""
    asked: list[str] = []
    inspect = APIClient.inspect_container

    def counted(self: APIClient, container: str) -> dict:
        asked.append(container)
        return inspect(self, container)

    monkeypatch.setattr(APIClient, "inspect_container", counted)
    return asked


def test_the_running_containers_are_each_inspected_once_however_often_listed(
    docker_client, runtime_image, inspected
):
    """Admission lists the host's running runs at every poll with runs waiting: a
    container is inspected when first listed, not at every poll."""
    label = f"prefect-managed-test.listed={uuid.uuid4().hex[:8]}"
    containers = Containers(DockerClients(), logging.getLogger("test"))
    made = []

    def start(memory: str) -> str:
        made.append(
            docker_client.containers.run(
                runtime_image,
                ["sleep", "60"],
                entrypoint=[],
                labels=dict([label.split("=")]),
                mem_limit=memory,
                detach=True,
            )
        )
        return made[-1].id

    def listed() -> tuple[dict[str, int], list[str]]:
        """The running containers' memory limits, and which of them this call inspected."""
        inspected.clear()  # the SDK's own run() inspects too
        found = {r.id: r.memory_limit for r in anyio.run(containers.running, [label])}
        return found, list(inspected)

    try:
        first = start("64m")
        assert listed() == ({first: 64 * 2**20}, [first])
        assert listed() == ({first: 64 * 2**20}, [])
        second = start("96m")
        assert listed() == ({first: 64 * 2**20, second: 96 * 2**20}, [second])
        made.pop(0).remove(force=True)
        assert listed() == ({second: 96 * 2**20}, [])
        third = start("32m")
        assert listed() == ({second: 96 * 2**20, third: 32 * 2**20}, [third])
    finally:
        for container in made:
            container.remove(force=True)
