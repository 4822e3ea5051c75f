"""A throwaway PostgreSQL cluster on loopback, from Debian's `postgresql` package.

`initdb` refuses to run as root, so as root the cluster belongs to the `postgres` user
(made by the package) and its commands run through `runuser`. Everything lives in one
temporary directory; stopping the cluster removes it, and copies the server's log into
the test output.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from services import free_port


def _bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb); "
            "run scripts/setup.sh, which installs Debian's postgresql package."
        )
    return Path(found[-1]).parent


def _as_cluster_owner(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@dataclass
class Postgres:
    root: Path
    port: int
    log_dir: Path
    bin_dir: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, database: str = "prefect") -> str:
        """The SQLAlchemy URL Prefect's server takes (asyncpg driver)."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def run(self, *command: str) -> str:
        done = subprocess.run(
            _as_cluster_owner([str(self.bin_dir / command[0]), *command[1:]]),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    def create_database(self, name: str) -> str:
        self.run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return self.url(name)

    def stop(self) -> None:
        try:
            self.run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w")
        finally:
            log = self.root / "postgres.log"
            if log.exists():
                shutil.copyfile(log, self.log_dir / "postgres.log")
            shutil.rmtree(self.root, ignore_errors=True)


def start_postgres(log_dir: Path) -> Postgres:
    """initdb a cluster in a temporary directory and start it on 127.0.0.1, trust auth."""
    root = Path(tempfile.mkdtemp(prefix="prefect-managed-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    server = Postgres(root, free_port(), log_dir, _bin_dir())
    server.run(
        "initdb",
        "-D",
        str(server.data),
        "-U",
        "postgres",
        "--auth=trust",
        "-E",
        "UTF8",
        "--no-sync",
    )
    server.run(
        "pg_ctl",
        "start",
        "-D",
        str(server.data),
        "-w",
        "-t",
        "120",
        "-l",
        str(root / "postgres.log"),
        "-o",
        f"-h 127.0.0.1 -p {server.port} -k {root} -c max_connections=200 -c fsync=off",
    )
    return server
