"""Real services the tests start on loopback: a Prefect server, a git daemon, a
package index (pypiserver) and `prefect worker start` processes."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx

BIN = Path(sys.executable).parent


def _take_sigint_back() -> None:
    """A process started in the background by a non-interactive shell (`cmd &` in a CI
    script) has SIGINT ignored, and passes that on to every process it starts. `prefect
    worker start` stops on the SIGINT its own SIGTERM handler sends itself: ignored, a
    stopped worker would run on until killed. Services started from here get SIGINT's
    default back."""
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    ):
        signal.signal(signal.SIGINT, signal.default_int_handler)


_take_sigint_back()

#: Prefect's file lease storage: concurrency leases survive a server restart (the default
#: keeps them in memory; see docs/scale-out.md).
FILE_LEASES = "prefect.server.concurrency.lease_storage.filesystem"

#: The server looks for expired leases every 2 s rather than 15 (docs/limits.md): a killed
#: worker's slot comes back within 2 s of its lease's end, which the fault tests wait for.
REPOSSESS_SOON = {"PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "2"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} did not happen within {timeout} s")


@dataclass
class Service:
    name: str
    process: subprocess.Popen
    log_path: Path

    def stop(self, timeout: float = 20) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start(
    name: str,
    command: list[str],
    log_dir: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Service:
    log_path = log_dir / f"{name}.log"
    log = log_path.open("ab")
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd
    )
    return Service(name, process, log_path)


def start_prefect_server(
    port: int,
    home: Path,
    log_dir: Path,
    extra_env: dict[str, str] | None = None,
    name: str = "prefect-server",
) -> Service:
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        # As the operator guide asks: leases that survive a server restart.
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": FILE_LEASES,
        **REPOSSESS_SOON,
        **(extra_env or {}),
    }
    service = start(
        name,
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        log_dir,
        env,
    )

    def healthy() -> bool:
        if service.process.poll() is not None:
            raise RuntimeError(f"prefect server exited:\n{service.log()[-3000:]}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(healthy, 120, "the Prefect server answering /api/health")
    return service


@dataclass
class GitServer:
    """`git daemon` serving the bare repositories under `root` as git://127.0.0.1:port/NAME."""

    root: Path
    port: int
    service: Service | None = None

    def url(self, name: str) -> str:
        return f"git://127.0.0.1:{self.port}/{name}"

    def publish(self, name: str, files: dict[str, str]) -> str:
        """Create (or replace) a repository holding `files`; return its URL."""
        work = self.root / "_work" / name
        bare = self.root / name
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(bare, ignore_errors=True)
        work.mkdir(parents=True)
        for rel, text in files.items():
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            (work / rel).write_text(text)
        git = ["git", "-c", "user.name=tests", "-c", "user.email=tests@127.0.0.1", "-C", str(work)]
        subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
        subprocess.run([*git, "add", "."], check=True)
        subprocess.run([*git, "commit", "-q", "-m", "flow"], check=True)
        subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True)
        return self.url(name)


def start_git_server(root: Path, log_dir: Path) -> GitServer:
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    allow_source(port)
    server = GitServer(root, port)
    server.service = start(
        "git-daemon",
        [
            "git",
            "daemon",
            "--reuseaddr",
            "--export-all",
            f"--base-path={root}",
            "--listen=127.0.0.1",
            f"--port={port}",
            str(root),
        ],
        log_dir,
    )

    def listening() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    wait_for(listening, 20, "git daemon listening")
    return server


def build_wheel(directory: Path, name: str, version: str, modules: dict[str, str]) -> Path:
    """Write a pure-Python wheel by hand: METADATA, WHEEL, RECORD and the modules."""
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    files = dict(modules)
    files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    files[f"{info}/WHEEL"] = (
        "Wheel-Version: 1.0\nGenerator: prefect-managed-tests\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n"
    )
    record = []
    for path, text in files.items():
        data = text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = "\n".join(record) + "\n"
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


@dataclass
class PackageIndex:
    root: Path
    port: int
    service: Service | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/simple/"


def start_package_index(root: Path, log_dir: Path) -> PackageIndex:
    """pypiserver over `root`, with no fallback to any other index."""
    root.mkdir(parents=True, exist_ok=True)
    index = PackageIndex(root, free_port())
    index.service = start(
        "pypiserver",
        [
            str(BIN / "pypi-server"),
            "run",
            "-i",
            "127.0.0.1",
            "-p",
            str(index.port),
            "-a",
            ".",
            "-P",
            ".",
            "--disable-fallback",
            str(root),
        ],
        log_dir,
    )

    def ready() -> bool:
        try:
            return httpx.get(index.url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, 30, "pypiserver answering")
    return index


@dataclass
class Worker:
    service: Service
    pool: str
    env: dict[str, str] = field(default_factory=dict)


def start_worker(pool: str, log_dir: Path, env: dict[str, str], name: str = "worker") -> Worker:
    service = start(
        name,
        [
            str(BIN / "prefect"),
            "worker",
            "start",
            "--pool",
            pool,
            "--type",
            "prefect:managed",
            "--name",
            name,
        ],
        log_dir,
        env,
    )
    return Worker(service, pool, env)


#: The loopback services this test session started that flow runs pull from (git
#: servers, object storage emulators, token endpoints), as "127.0.0.1:port": a policy
#: that leaves runs on the default isolated network lists them in allowed_destinations,
#: as an operator lists the workspace's git server and storage.
SOURCE_DESTINATIONS: set[str] = set()


def allow_source(port: int) -> None:
    SOURCE_DESTINATIONS.add(f"127.0.0.1:{port}")


def write_policy(path: Path, **tables: dict) -> Path:
    """Write a policy file from tables, e.g. workspace={...}, tiers={"t": {...}}, runtime={...}.

    A policy whose runs stay on the default isolated network gets this session's source
    services in `allowed_destinations` unless it lists its own."""
    import tomli_w

    runtime = tables.get("runtime")
    if runtime is not None and runtime.get("network_mode", "isolated") == "isolated":
        tables = {
            **tables,
            "runtime": {"allowed_destinations": sorted(SOURCE_DESTINATIONS), **runtime},
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(tables))
    return path
