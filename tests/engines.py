"""A second Docker engine on this machine, standing in for a second Docker host.

Its own data root, exec root, pid file and Unix socket under one short directory, no
bridge and no iptables rules (runs use host networking or the isolated `none` network),
its own containerd namespaces; a worker reaches it through `DOCKER_HOST`. The runtime
image is copied into it with `docker save | docker load` (no registry here).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import docker


@dataclass
class Engine:
    root: Path
    log_path: Path
    process: subprocess.Popen | None = field(default=None)

    @property
    def host(self) -> str:
        """Its `DOCKER_HOST`."""
        return f"unix://{self.root}/docker.sock"

    @property
    def namespace(self) -> str:
        """Its containerd namespace: letters and digits of its root's name (containerd
        refuses a `_` next to a `-` or at the end, which `mkdtemp`'s names may have)."""
        return "pm" + "".join(c for c in self.root.name if c.isalnum())

    def client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.host, timeout=120)

    def answers(self) -> bool:
        try:
            client = self.client()
        except Exception:
            return False
        try:
            return bool(client.ping())
        except Exception:
            return False
        finally:
            client.close()

    def start(self, timeout: float = 120) -> None:
        command = [
            "dockerd",
            "--data-root", str(self.root / "data"),
            "--exec-root", str(self.root / "exec"),
            "--pidfile", str(self.root / "docker.pid"),
            "-H", self.host,
            "--bridge=none",
            "--iptables=false",
            "--containerd-namespace", self.namespace,
            "--containerd-plugins-namespace", f"{self.namespace}-plugins",
        ]  # fmt: skip
        bridge = default_bridge()
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.process.poll() is not None:
                raise RuntimeError(f"the second dockerd exited:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the second dockerd did not answer within {timeout} s")
            time.sleep(0.5)
        # A dockerd started with --bridge=none deletes the link `docker0` at its start, and
        # this one shares the host's network namespace: the machine's own engine would
        # then start no container on its default bridge until it restarted.
        if bridge is not None and default_bridge() is None:
            restore_default_bridge(bridge)

    def stop(self, timeout: float = 300) -> None:
        """Stop the engine (and with it its containers); SIGKILL after `timeout`."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def load(self, image: str) -> float:
        """Copy `image` from this machine's default engine; the seconds it took."""
        began = time.monotonic()
        saved = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
        loaded = subprocess.run(
            ["docker", "load", "-q"],
            stdin=saved.stdout,
            capture_output=True,
            env={**os.environ, "DOCKER_HOST": self.host},
        )
        assert saved.stdout is not None
        saved.stdout.close()
        if saved.wait() != 0 or loaded.returncode != 0:
            raise RuntimeError(f"could not load {image} into {self.host}: {loaded.stderr!r}")
        return time.monotonic() - began

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def remove(self) -> None:
        self.stop()
        # Its container layers are mounted under the data root until it stops.
        shutil.rmtree(self.root, ignore_errors=True)


def default_bridge() -> list[str] | None:
    """The IPv4 addresses (CIDR) of the default engine's bridge `docker0`; None when the
    link is not there."""
    if shutil.which("ip") is None:  # no iproute2: nothing can be put back anyway
        return None
    found = subprocess.run(
        ["ip", "-j", "-4", "addr", "show", "dev", "docker0"], capture_output=True, text=True
    )
    if found.returncode != 0:
        return None
    return [
        f"{address['local']}/{address['prefixlen']}"
        for link in json.loads(found.stdout or "[]")
        for address in link.get("addr_info", [])
    ]


def restore_default_bridge(addresses: list[str]) -> None:
    """Make `docker0` again as it was (the default engine finds its bridge by name)."""
    subprocess.run(["ip", "link", "add", "docker0", "type", "bridge"], check=True)
    for address in addresses:
        subprocess.run(["ip", "addr", "add", address, "dev", "docker0"], check=True)
    subprocess.run(["ip", "link", "set", "docker0", "up"], check=True)


def start_engine(log_dir: Path) -> Engine:
    """A second engine, started; its root is short (a Unix socket path has 108 bytes)."""
    root = Path(tempfile.mkdtemp(prefix="pm-eng-", dir="/tmp"))
    engine = Engine(root, log_dir / f"dockerd-{root.name}.log")
    engine.start()
    return engine
