"""The isolated network: a run's container with no network of its own, and a tunnel to
the few places the operator allows.

With `runtime.network_mode = "isolated"` a run's container is made with Docker's `none`
network: it has its own loopback and nothing else. Each destination it may reach (the
run gateway, the package index, and `runtime.allowed_destinations`) gets a listener on
that loopback, started by `runtime/isolate.sh` before the image's entrypoint; a
connection to it is carried over a Unix socket, mounted read-only into the container,
to this module's server on the worker's host, which connects to the destination and
relays the bytes. A destination on the host's loopback keeps its address inside the
container (the git server at `127.0.0.1:9418` is reached at `127.0.0.1:9418`); a named
one gets an address of `127.77.0.0/16` and an `/etc/hosts` entry, so TLS and URLs work
unchanged.

The server decides, not the container: every connection opens with the run's *grant*
(the destinations its worker allowed it, signed with the ledger key) and the destination
asked for; anything not in a valid grant is closed and logged. Flow code that replaces
the in-container listeners reaches no more than the grant says.

The server lives with the run gateway (`gateway.RunGateway`): one per host, in the
directory `tunnel_directory(port)`, taken over with the gateway's port.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import os
import re
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

from prefect.logging import get_logger

__all__ = [
    "ISOLATED_MOUNT",
    "NO_TLS_CA",
    "NO_TLS_CA_SOURCE",
    "Destination",
    "Isolation",
    "TunnelServer",
    "grant",
    "granted",
    "isolation",
    "parse_destination",
    "tunnel_directory",
]

logger = get_logger("managed.tunnel")

#: Where the tunnel's directory (socket and scripts) is mounted in a run's container.
ISOLATED_MOUNT = "/run/prefect-managed"
SOCKET_NAME = "tunnel.sock"
#: One certificate, not a CA's (`CA:FALSE`), whose key was never kept: a TLS context made
#: from it trusts no server. A run's Prefect client reaches the gateway over plain HTTP on
#: the container's loopback, yet makes a TLS context from its CA file for every client it
#: opens (about 17 ms of CPU with Prefect's default bundle, 0.3 ms with this one, 14 times
#: a run).
NO_TLS_CA = "no-tls-ca.pem"
#: The in-container files, copied next to the socket by the server's holder.
_SCRIPTS = ("isolate.sh", "forward.py", NO_TLS_CA)
_RUNTIME = Path(__file__).parent.parent / "runtime"
#: The certificate as the package ships it (copied into the tunnel's directory).
NO_TLS_CA_SOURCE = _RUNTIME / NO_TLS_CA
GRANT_PREFIX = "pmt1"
_GRANT_CONTEXT = b"prefect-managed tunnel grant\0"
#: Named destinations get container addresses from here (never 127.0.0.1).
_NAMED_NETWORK = ipaddress.IPv4Network("127.77.0.0/16")
_HOST = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_HEADER_LIMIT = 8192
_CONNECT_SECONDS = 10.0
#: A connection with no bytes either way for this long is closed.
IDLE_SECONDS = 600.0
#: Connections one run may hold open at once.
MAX_CONNECTIONS_PER_RUN = 64
#: Connections not yet past their grant, from all runs: each must send its grant within
#: `_CONNECT_SECONDS`; beyond this many waiting, a new one is closed at once.
MAX_PENDING = 256


@dataclass(frozen=True, order=True)
class Destination:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def loopback(self) -> bool:
        try:
            return ipaddress.IPv4Address(self.host).is_loopback
        except ValueError:
            return False


def parse_destination(value: str) -> Destination:
    """`host:port` as the policy writes it; raises `ValueError` with what to write."""
    host, sep, port_text = str(value).strip().rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(
            f"allowed destination {value!r} is not host:port (for example "
            "'127.0.0.1:9418' or 'git.example.com:443')"
        )
    host = host.lower()
    if host == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        if not _HOST.match(host):
            raise ValueError(
                f"allowed destination {value!r}: {host!r} is not a host name"
            ) from None
        return Destination(host, int(port_text))
    if not (isinstance(address, ipaddress.IPv4Address) and address.is_loopback):
        raise ValueError(
            f"allowed destination {value!r}: an isolated run reaches an address of another "
            "machine by its host name only (it becomes a name in the container's /etc/hosts); "
            "write the host name, or a 127.x.x.x address for a service on the worker's host"
        )
    return Destination(str(address), int(port_text))


def _mac(key: bytes, run: UUID, payload: bytes) -> str:
    return hmac.new(key, _GRANT_CONTEXT + run.bytes + payload, hashlib.sha256).hexdigest()


def grant(key: bytes, run: UUID, destinations: Iterable[Destination]) -> str:
    """The destinations a run may reach, signed with `key` (every worker holding the
    ledger key verifies it)."""
    names = sorted({str(d) for d in destinations})
    payload = json.dumps(names, separators=(",", ":")).encode()
    body = base64.urlsafe_b64encode(payload).decode().rstrip("=")
    return f"{GRANT_PREFIX}.{run}.{body}.{_mac(key, run, payload)}"


def granted(key: bytes, text: str) -> tuple[UUID, frozenset[str]] | None:
    """The run and destinations of a grant signed with `key`, or None."""
    parts = text.split(".")
    if len(parts) != 4 or parts[0] != GRANT_PREFIX:
        return None
    try:
        run = UUID(parts[1])
        payload = base64.urlsafe_b64decode(parts[2] + "=" * (-len(parts[2]) % 4))
        names = json.loads(payload)
    except (ValueError, binascii.Error):
        return None
    if not hmac.compare_digest(_mac(key, run, payload), parts[3]):
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return None
    return run, frozenset(names)


@dataclass
class Isolation:
    """What a container (a run's or an environment builder's) needs to be isolated."""

    volume: str
    extra_hosts: dict[str, str]
    sysctls: dict[str, str]
    #: The arguments before the image's entrypoint.
    entrypoint_prefix: list[str]
    destinations: list[Destination] = field(default_factory=list)
    #: `NO_TLS_CA` in the container, when the tunnel's directory holds it (a holder of
    #: the gateway's port from an earlier version may not have copied it).
    no_tls_ca: str | None = None

    def entrypoint(self, image_entrypoint: list[str] | None) -> list[str]:
        return [*self.entrypoint_prefix, "--", *(image_entrypoint or [])]


def isolation(
    key: bytes, run: UUID, gateway_port: int, destinations: Iterable[Destination]
) -> Isolation:
    """The isolation of `run`'s container: its grant, its listeners and host names."""
    wanted = sorted({Destination("127.0.0.1", gateway_port), *destinations})
    addresses: dict[str, str] = {}
    hosts = iter(_NAMED_NETWORK.hosts())
    listeners = []
    for destination in wanted:
        if destination.loopback:
            address = destination.host
        else:
            if destination.host not in addresses:
                addresses[destination.host] = str(next(hosts))
            address = addresses[destination.host]
        listeners.append(f"{address}:{destination.port}={destination}")
    return Isolation(
        volume=f"{tunnel_directory(gateway_port)}:{ISOLATED_MOUNT}:ro",
        extra_hosts=addresses,
        # Listeners on the destinations' own ports (443, 80) as the non-root user.
        sysctls={"net.ipv4.ip_unprivileged_port_start": "0"},
        entrypoint_prefix=[
            "/bin/sh",
            f"{ISOLATED_MOUNT}/isolate.sh",
            grant(key, run, wanted),
            ",".join(listeners),
        ],
        destinations=wanted,
        no_tls_ca=(
            f"{ISOLATED_MOUNT}/{NO_TLS_CA}"
            if (tunnel_directory(gateway_port) / NO_TLS_CA).is_file()
            else None
        ),
    )


def tunnel_directory(gateway_port: int) -> Path:
    """The host directory of the tunnel of the gateway on `gateway_port`."""
    return Path(tempfile.gettempdir()) / f"prefect-managed-gateway-{gateway_port}"


def _peer_container(sock: socket.socket | None) -> str | None:
    """The Docker container id of the process at the other end, when the host's /proc
    says (for the log line of a refusal)."""
    if sock is None:
        return None
    try:
        pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        cgroups = Path(f"/proc/{pid}/cgroup").read_text()
    except (OSError, struct.error):
        return None
    found = re.search(r"[0-9a-f]{64}", cgroups)
    return found.group(0)[:12] if found else None


class TunnelServer:
    """The host end of isolated runs' connections, on a Unix socket in `directory`."""

    def __init__(self, directory: Path, key: bytes) -> None:
        self.directory = directory
        self._key = key
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._open: Counter[UUID] = Counter()
        self._pending = 0

    @property
    def socket_path(self) -> Path:
        return self.directory / SOCKET_NAME

    def start(self) -> None:
        """Bind the socket (a dead holder's is replaced) and serve in a daemon thread."""
        self.directory.mkdir(mode=0o755, exist_ok=True)
        stat = self.directory.lstat()
        if not self.directory.is_dir() or self.directory.is_symlink() or stat.st_uid != os.getuid():
            raise OSError(
                f"the tunnel directory {self.directory} is not a directory owned by this "
                "user; remove it, or choose another api_gateway_port"
            )
        os.chmod(self.directory, 0o755)
        for name in _SCRIPTS:
            staged = self.directory / f".{name}.new"
            shutil.copyfile(_RUNTIME / name, staged)
            os.chmod(staged, 0o644)
            os.replace(staged, self.directory / name)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.socket_path.unlink(missing_ok=True)
        sock.bind(str(self.socket_path))
        os.chmod(self.socket_path, 0o666)  # the run's non-root user connects to it
        sock.listen(256)
        ready = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop

            async def main() -> None:
                server = await asyncio.start_unix_server(self._handle, sock=sock)
                ready.set()
                async with server:
                    await server.serve_forever()

            try:
                loop.run_until_complete(main())
            except (asyncio.CancelledError, RuntimeError):
                pass
            finally:
                sock.close()

        self._thread = threading.Thread(target=serve, name="prefect-managed-tunnel", daemon=True)
        self._thread.start()
        ready.wait(10)

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and loop.is_running():
            for task in asyncio.all_tasks(loop):
                loop.call_soon_threadsafe(task.cancel)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._thread = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self._pending >= MAX_PENDING:
                logger.warning(
                    "Tunnel: %d connections are waiting for their grant; closed a new one",
                    MAX_PENDING,
                )
                return
            self._pending += 1
            try:
                header, asked = await asyncio.wait_for(_grant_lines(reader), _CONNECT_SECONDS)
            except (
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
                TimeoutError,
                asyncio.TimeoutError,
            ):
                return
            finally:
                self._pending -= 1
            target = asked[:-1].decode(errors="replace")[:300]
            grant_of = granted(self._key, header[:-1].decode(errors="replace")[:_HEADER_LIMIT])
            if grant_of is None or target not in grant_of[1]:
                who = f"flow run {grant_of[0]}" if grant_of else "a connection with no valid grant"
                container = _peer_container(writer.get_extra_info("socket"))
                logger.warning(
                    "Tunnel: refused %s%s to %r: not among the destinations its worker allowed "
                    "(runtime.allowed_destinations)",
                    who,
                    f" (container {container})" if container else "",
                    target,
                )
                return
            run = grant_of[0]
            if self._open[run] >= MAX_CONNECTIONS_PER_RUN:
                logger.warning(
                    "Tunnel: refused flow run %s a connection to %s: it holds %d open already",
                    run,
                    target,
                    MAX_CONNECTIONS_PER_RUN,
                )
                return
            self._open[run] += 1
            try:
                await self._connect(reader, writer, run, target)
            finally:
                self._open[run] -= 1
                if self._open[run] <= 0:
                    del self._open[run]
        except Exception:
            logger.exception("Tunnel: a connection failed")
        finally:
            writer.close()

    async def _connect(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, run: UUID, target: str
    ) -> None:
        destination = parse_destination(target)
        try:
            up_reader, upstream = await asyncio.wait_for(
                asyncio.open_connection(destination.host, destination.port), _CONNECT_SECONDS
            )
        except (OSError, TimeoutError) as exc:
            logger.info("Tunnel: flow run %s could not reach %s: %s", run, target, exc)
            return
        try:
            await _relay(reader, writer, up_reader, upstream)
        finally:
            upstream.close()


async def _grant_lines(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """A connection's first two lines: its grant and the destination it asks for."""
    return await reader.readuntil(b"\n"), await reader.readuntil(b"\n")


async def _relay(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
    idle: float = IDLE_SECONDS,
) -> None:
    """Both directions until each ends, or until no byte has passed either way for
    `idle` seconds. One watch per connection keeps the idle clock (a timeout around each
    read would make a task and a timer for every chunk relayed)."""
    last = [time.monotonic()]

    async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while chunk := await source.read(65536):
                last[0] = time.monotonic()
                sink.write(chunk)
                await sink.drain()
            if sink.can_write_eof():
                sink.write_eof()
        except (ConnectionError, OSError):
            pass

    directions = [
        asyncio.ensure_future(pipe(reader, up_writer)),
        asyncio.ensure_future(pipe(up_reader, writer)),
    ]
    pipes = asyncio.gather(*directions)
    try:
        while True:
            quiet_until = last[0] + idle
            try:
                await asyncio.wait_for(asyncio.shield(pipes), quiet_until - time.monotonic())
                return
            except (TimeoutError, asyncio.TimeoutError):
                if time.monotonic() - last[0] >= idle:
                    return  # idle both ways: closed by the caller
    finally:
        # Both directions end with the relay, whichever way it ends (one that failed
        # does not leave the other running).
        for direction in directions:
            direction.cancel()
        await asyncio.gather(*directions, return_exceptions=True)
