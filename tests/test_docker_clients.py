"""The worker's Docker clients ask the engine for its API version once a minute, not
once per client (`DockerClients`), against the real engine."""

from __future__ import annotations

import logging
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
