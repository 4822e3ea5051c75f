"""A second Docker engine on this machine, standing in for a second Docker host.

Its own data root, exec root, pid file and Unix socket under one short directory, no
bridge and no iptables rules (runs use host networking or the isolated `none` network),
its own containerd namespaces; a worker reaches it through `DOCKER_HOST`. The runtime
image is copied into it with `docker save | docker load` (no registry here).
"""

from __future__ import annotations

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
            "--containerd-namespace", f"pm-{self.root.name}",
            "--containerd-plugins-namespace", f"pm-{self.root.name}-plugins",
        ]  # fmt: skip
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.process.poll() is not None:
                raise RuntimeError(f"the second dockerd exited:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the second dockerd did not answer within {timeout} s")
            time.sleep(0.5)

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


def start_engine(log_dir: Path) -> Engine:
    """A second engine, started; its root is short (a Unix socket path has 108 bytes)."""
    root = Path(tempfile.mkdtemp(prefix="pm-eng-", dir="/tmp"))
    engine = Engine(root, log_dir / f"dockerd-{root.name}.log")
    engine.start()
    return engine
