"""Prefect's own HA topology on loopback, for the tests and the scale-out walkthrough.

What Prefect's guide to scaling a self-hosted server prescribes, started for real:

- PostgreSQL (Debian's, a throwaway cluster: tests/postgres.py), one database;
- Redis (Debian's `redis-server`, no persistence) through `prefect-redis`, for
  messaging and its cache, the events' causal ordering, the concurrency lease storage
  and docket (`redis_settings` below);
- two API processes, `prefect server start --no-services`, on that database and Redis;
- one process of background services, `prefect server services start`;
- a round-robin proxy of our own in front of the two API processes (`RoundRobin`): each
  new client connection goes to the next API process in turn, one that refuses is
  skipped, websockets pass unchanged. Workers use `PREFECT_API_URL` through it.

`python tests/topology.py up --dir D` brings it up, prints the environment a worker
needs (also written to D/topology.env) and keeps it up until Ctrl-C or SIGTERM, then
takes it all down. With `--hosts N --policy FILE` it also starts N hosts
(`prefect-managed serve --name host-K`), host-1 on this machine's Docker engine and each
other one on a second engine of its own with the runtime image loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))

from postgres import Postgres, start_postgres  # noqa: E402
from services import BIN, REPOSSESS_SOON, Service, free_port, start, wait_for  # noqa: E402


def redis_settings(url: str) -> dict[str, str]:
    """Prefect's settings for Redis, as its scaling guide gives them (prefect-redis)."""
    return {
        "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
        "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
        "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
        "PREFECT_SERVER_DOCKET_URL": url,
        "PREFECT_REDIS_MESSAGING_URL": url,
    }


class RoundRobin:
    """A TCP proxy on 127.0.0.1 that gives each new connection to the next backend."""

    def __init__(self, backends: list[int]) -> None:
        self.backends = backends
        self.port = free_port()
        self.connections: Counter[int] = Counter()  # backend port -> connections given
        self._next = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="round-robin", daemon=True)
        self._server: asyncio.base_events.Server | None = None

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the round-robin proxy did not start")

    def stop(self) -> None:
        def close() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks(self._loop):
                task.cancel()
            self._loop.stop()

        self._loop.call_soon_threadsafe(close)
        self._thread.join(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def listen() -> None:
            self._server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
            self._ready.set()

        self._loop.run_until_complete(listen())
        self._loop.run_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream = None
        for _ in range(len(self.backends)):
            port = self.backends[self._next % len(self.backends)]
            self._next += 1
            try:
                upstream = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                continue  # that API process is down: the next one
            self.connections[port] += 1
            break
        if upstream is None:
            writer.close()
            return
        up_reader, up_writer = upstream

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@dataclass
class Topology:
    root: Path
    log_dir: Path
    auth: str
    postgres: Postgres
    redis: Service
    redis_url: str
    database_url: str
    api_ports: list[int]
    apis: list[Service | None]
    services: Service
    proxy: RoundRobin
    extra: list[Service] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        """What workers and clients use: the proxy in front of the API processes."""
        return f"http://127.0.0.1:{self.proxy.port}/api"

    @property
    def api_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}/api" for port in self.api_ports]

    @property
    def env(self) -> dict[str, str]:
        """The environment of a worker host (and of a client)."""
        return {"PREFECT_API_URL": self.api_url, "PREFECT_API_AUTH_STRING": self.auth}

    def server_env(self, home: Path) -> dict[str, str]:
        return {
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_DATABASE_CONNECTION_URL": self.database_url,
            "PREFECT_SERVER_API_AUTH_STRING": self.auth,
            "PREFECT_API_AUTH_STRING": self.auth,
            **redis_settings(self.redis_url),
            **REPOSSESS_SOON,
        }

    def start_api(self, index: int) -> None:
        """Start API process `index` (again), with `--no-services`; wait until healthy."""
        port = self.api_ports[index]
        home = self.root / f"api-{index}"
        home.mkdir(exist_ok=True)
        command = [str(BIN / "prefect"), "server", "start", "--no-services"]
        command += ["--host", "127.0.0.1", "--port", str(port)]
        api = start(f"topology-api-{index}", command, self.log_dir, self.server_env(home))
        self.apis[index] = api
        wait_for(lambda: _healthy(api, port), 180, f"API process {index} answering /api/health")

    def kill_api(self, index: int) -> None:
        """SIGKILL API process `index` (it does not come back by itself)."""
        api = self.apis[index]
        if api is not None:
            api.process.kill()
            api.process.wait(30)

    def stop(self) -> None:
        self.proxy.stop()
        for service in [*self.extra, self.services, *[a for a in self.apis if a]]:
            service.stop(timeout=30)
        self.redis.stop()
        self.postgres.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _healthy(service: Service, port: int) -> bool:
    if service.process.poll() is not None:
        raise RuntimeError(f"{service.name} exited:\n{service.log()[-3000:]}")
    try:
        return httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def start_redis(root: Path, log_dir: Path) -> tuple[Service, str]:
    port = free_port()
    redis = start(
        "topology-redis",
        [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(root),
        ],  # fmt: skip
        log_dir,
    )

    def answers() -> bool:
        if redis.process.poll() is not None:
            raise RuntimeError(f"redis-server exited:\n{redis.log()[-2000:]}")
        done = subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True)
        return done.stdout.strip() == b"PONG"

    wait_for(answers, 30, "redis-server answering PING")
    return redis, f"redis://127.0.0.1:{port}/0"


def start_topology(log_dir: Path, auth: str | None = None) -> Topology:
    """The whole topology, up and healthy; `Topology.stop()` takes it down."""
    root = Path(tempfile.mkdtemp(prefix="prefect-managed-topology-"))
    started: list = []
    try:
        postgres = start_postgres(log_dir)
        started.append(postgres)
        redis, redis_url = start_redis(root, log_dir)
        started.append(redis)
        ports = [free_port(), free_port()]
        topology = Topology(
            root=root,
            log_dir=log_dir,
            auth=auth or f"admin:{secrets.token_hex(16)}",
            postgres=postgres,
            redis=redis,
            redis_url=redis_url,
            database_url=postgres.create_database("prefect"),
            api_ports=ports,
            apis=[None, None],
            services=None,  # type: ignore[arg-type]  # set below
            proxy=RoundRobin(ports),
        )
        # One after the other: the first applies the database migrations.
        for index in range(2):
            topology.start_api(index)
            started.append(topology.apis[index])
        home = root / "services"
        home.mkdir()
        topology.services = start(
            "topology-services",
            [str(BIN / "prefect"), "server", "services", "start"],
            log_dir,
            topology.server_env(home),
        )
        started.append(topology.services)
        time.sleep(2)
        if topology.services.process.poll() is not None:
            raise RuntimeError(f"services exited:\n{topology.services.log()[-3000:]}")
        topology.proxy.start()
        return topology
    except BaseException:
        for part in reversed(started):
            part.stop()
        shutil.rmtree(root, ignore_errors=True)
        raise


def start_hosts(topology: Topology, policy: Path, image: str, count: int, parts: list) -> None:
    """`count` hosts: `prefect-managed serve --name host-N`, host-1 on this machine's
    Docker engine, each other one on a second engine of its own (tests/engines.py) with
    `image` loaded. What was started goes into `parts` (to stop, last first)."""
    from engines import start_engine

    for number in range(1, count + 1):
        env = {**topology.env, "PREFECT_INTEGRATIONS_MANAGED_POLICY_FILE": str(policy)}
        if number > 1:
            engine = start_engine(topology.log_dir)
            parts.append(engine)
            engine.load(image)
            env["DOCKER_HOST"] = engine.host
        command = [str(BIN / "prefect-managed"), "serve", "--name", f"host-{number}"]
        parts.append(start(f"topology-host-{number}", command, topology.log_dir, env))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up"])
    parser.add_argument("--dir", type=Path, required=True, help="where the logs and env go")
    parser.add_argument(
        "--hosts",
        type=int,
        default=0,
        help="also start this many hosts (prefect-managed serve), the second and later "
        "each on a Docker engine of its own; needs --policy",
    )
    parser.add_argument("--policy", type=Path, help="the hosts' policy file")
    parser.add_argument(
        "--image", default=None, help="the runtime image loaded into the hosts' engines"
    )
    args = parser.parse_args()
    if args.hosts and args.policy is None:
        parser.error("--hosts needs --policy (the policy file every host reads)")
    args.dir.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    topology = start_topology(args.dir)
    hosts: list = []
    try:
        if args.hosts:
            from prefect_managed.runtime.builder import default_runtime_tag

            image = args.image or default_runtime_tag()
            start_hosts(topology, args.policy.resolve(), image, args.hosts, hosts)
        lines = [f"{key}={value}" for key, value in topology.env.items()]
        lines += [f"# API process {i}: {url}" for i, url in enumerate(topology.api_urls)]
        lines += [
            f"# host-{n + 1}: log {args.dir}/topology-host-{n + 1}.log" for n in range(args.hosts)
        ]
        (args.dir / "topology.env").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        print(f"# up in {time.monotonic() - began:.1f} s; Ctrl-C takes it down", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    finally:
        for part in reversed(hosts):  # services first, then their engines
            (part.stop if isinstance(part, Service) else part.remove)()
        topology.stop()


if __name__ == "__main__":
    main()
