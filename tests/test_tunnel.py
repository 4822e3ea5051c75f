"""The isolated network's pure parts: destinations as the policy writes them, grants,
and what a run's container is given. No Docker, no server."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid

import pytest

from prefect_managed.gateway.tunnel import (
    ISOLATED_MOUNT,
    Destination,
    _relay,
    grant,
    granted,
    isolation,
    parse_destination,
    tunnel_directory,
)
from prefect_managed.policy import Runtime
from prefect_managed.runtime.forward import listener

KEY = b"k" * 32


@pytest.mark.parametrize(
    "text, expected",
    [
        ("127.0.0.1:9418", Destination("127.0.0.1", 9418)),
        ("localhost:8080", Destination("127.0.0.1", 8080)),
        ("Git.Example.com:443", Destination("git.example.com", 443)),
        ("127.0.0.5:1", Destination("127.0.0.5", 1)),
    ],
)
def test_destinations_are_parsed_to_one_spelling(text, expected):
    assert parse_destination(text) == expected


@pytest.mark.parametrize(
    "text, says",
    [
        ("git.example.com", "is not host:port"),
        ("127.0.0.1:0", "is not host:port"),
        ("127.0.0.1:70000", "is not host:port"),
        (":80", "is not host:port"),
        ("bad_name:80", "is not a host name"),
        ("192.0.2.10:9000", "by its host name only"),
        ("[::1]:80", "by its host name only"),
    ],
)
def test_bad_destinations_say_what_to_write(text, says):
    with pytest.raises(ValueError, match=says):
        parse_destination(text)


def test_a_grant_verifies_with_its_key_only_and_names_its_run():
    run = uuid.uuid4()
    text = grant(KEY, run, [Destination("127.0.0.1", 9418), Destination("git.example.com", 443)])
    assert granted(KEY, text) == (run, frozenset({"127.0.0.1:9418", "git.example.com:443"}))
    assert granted(b"x" * 32, text) is None


def test_a_grant_cannot_be_widened_or_moved_to_another_run():
    run = uuid.uuid4()
    text = grant(KEY, run, [Destination("127.0.0.1", 9418)])
    wider = grant(b"attacker", run, [Destination("127.0.0.1", 4200)])
    prefix, _, body, mac = text.split(".")
    assert granted(KEY, f"{prefix}.{run}.{wider.split('.')[2]}.{mac}") is None
    assert granted(KEY, f"{prefix}.{uuid.uuid4()}.{body}.{mac}") is None
    for junk in ["", "pmt1", "pmt1.a.b.c", "pmr1.x.y.z", f"pmt1.{run}.!!!.00"]:
        assert granted(KEY, junk) is None


def test_an_isolated_container_listens_where_its_destinations_are():
    run = uuid.uuid4()
    destinations = [
        Destination("127.0.0.1", 9418),
        Destination("git.example.com", 443),
        Destination("git.example.com", 22),
        Destination("objects.example.com", 443),
    ]
    isolated = isolation(KEY, run, 4210, destinations)
    assert isolated.volume == f"{tunnel_directory(4210)}:{ISOLATED_MOUNT}:ro"
    # Named hosts get their own loopback address (one per name) and an /etc/hosts entry.
    assert isolated.extra_hosts == {
        "git.example.com": "127.77.0.1",
        "objects.example.com": "127.77.0.2",
    }
    prefix = isolated.entrypoint(["/usr/bin/tini", "--", "/entry.sh"])
    assert prefix[:2] == ["/bin/sh", f"{ISOLATED_MOUNT}/isolate.sh"]
    assert prefix[4:] == ["--", "/usr/bin/tini", "--", "/entry.sh"]
    listeners = set(prefix[3].split(","))
    assert listeners == {
        "127.0.0.1:4210=127.0.0.1:4210",  # the run gateway, always
        "127.0.0.1:9418=127.0.0.1:9418",
        "127.77.0.1:443=git.example.com:443",
        "127.77.0.1:22=git.example.com:22",
        "127.77.0.2:443=objects.example.com:443",
    }
    assert granted(KEY, prefix[2]) == (run, frozenset(item.split("=")[1] for item in listeners))


def test_the_package_index_is_an_isolated_runs_destination():
    runtime = Runtime(
        network_mode="isolated",
        api_gateway_port=4210,
        package_index_url="https://index.example.com/simple/",
        allowed_destinations=["127.0.0.1:9418"],
        default_image="prefect-managed-runtime:x",
    )
    assert runtime.isolated_destinations() == [
        Destination("127.0.0.1", 9418),
        Destination("index.example.com", 443),
    ]


def test_an_answer_is_sent_at_once_not_after_the_clients_delayed_ack():
    """The listener of the gateway and of the container's end of the tunnel (one
    function, `runtime/forward.py`): each connection asyncio accepts on it has Nagle's
    algorithm off (with it on, every API answer written in two parts
    waited about 40 ms for the client's delayed ACK; `python -m benchmarks.gateway`)."""
    sock = listener("127.0.0.1", 0)

    async def accepted_nodelay() -> int:
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted = writer.get_extra_info("socket")
            seen.set_result(accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(handle, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(*sock.getsockname())
            try:
                return await asyncio.wait_for(seen, 10)
            finally:
                writer.close()

    assert asyncio.run(accepted_nodelay()) != 0


async def _relayed(traffic_seconds: float, idle: float) -> tuple[list[bytes], float, float, bool]:
    """A relay between two socket pairs: the client sends a byte every tenth of
    `idle` for `traffic_seconds`, the far side echoes each one; then both fall silent.
    What came back, when the last byte came back and when the relay ended (seconds from
    its start), and whether the client then saw it closed."""
    client, near = socket.socketpair()
    far, upstream = socket.socketpair()
    for sock in (client, upstream):
        sock.setblocking(False)
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_unix_connection(sock=near)
    up_reader, up_writer = await asyncio.open_unix_connection(sock=far)
    started = time.monotonic()
    relay = asyncio.create_task(_relay(reader, writer, up_reader, up_writer, idle=idle))
    echoed: list[bytes] = []
    last = 0.0
    while time.monotonic() - started < traffic_seconds:
        await loop.sock_sendall(client, b"x")
        relayed = await asyncio.wait_for(loop.sock_recv(upstream, 1), 10)
        await loop.sock_sendall(upstream, relayed)
        echoed.append(await asyncio.wait_for(loop.sock_recv(client, 1), 10))
        last = time.monotonic() - started
        await asyncio.sleep(idle / 10)
    await asyncio.wait_for(relay, idle * 10)
    stood = time.monotonic() - started
    writer.close()
    up_writer.close()
    closed = await asyncio.wait_for(loop.sock_recv(client, 1), idle * 10) == b""
    for sock in (client, upstream):
        sock.close()
    return echoed, last, stood, closed


def test_a_relay_carries_bytes_while_they_flow_and_closes_once_idle():
    """The tunnel's relay: bytes pass both ways for as long as they flow (here three
    idle periods), and a connection with nothing either way for one idle period ends."""
    idle = 0.3
    echoed, last, stood, closed = asyncio.run(_relayed(traffic_seconds=3 * idle, idle=idle))
    assert len(echoed) >= 5 and set(echoed) == {b"x"}, echoed
    assert last >= 2 * idle  # it carried bytes for longer than one idle period
    assert last + idle <= stood < last + idle + 2, (last, stood)
    assert closed


def test_a_relay_with_no_traffic_ends_after_one_idle_period():
    idle = 0.3
    echoed, _, stood, closed = asyncio.run(_relayed(traffic_seconds=0, idle=idle))
    assert echoed == []
    assert idle <= stood < idle + 2, stood
    assert closed
