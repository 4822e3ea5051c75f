"""The operator's policy: tiers, the workspace's tier and the runtime settings.

Pure data and pure functions: `load_policy` reads one TOML file into pydantic models,
and the models answer questions (`Policy.tier`, `Runtime.image_allowed`). No Docker,
no Prefect client.

A policy file looks like::

    [workspace]
    name = "analytics"
    tier = "pro"

    [tiers.pro]                 # override some numbers of a built-in tier
    concurrency_limit = 20

    [tiers.team]                # or define a tier; unset numbers take the free tier's
    concurrency_limit = 3
    pool_limit = 2

    [runtime]
    default_image = "prefect-managed-runtime:3.9.1"
    package_index_url = "http://127.0.0.1:8080/simple/"
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from docker.utils import parse_bytes
from pydantic import Field, ValidationError, model_validator

from prefect_managed.exceptions import PolicyError
from prefect_managed.policy_runtime import Runtime
from prefect_managed.policy_values import (
    Count,
    DiskSize,
    HostMemorySize,
    MemorySize,
    Number,
    OutputSize,
    StrictModel,
    format_bytes,
)
from prefect_managed.redact import redact_url_credentials

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "BUILTIN_TIERS",
    "Host",
    "Policy",
    "Runtime",
    "Tier",
    "Workspace",
    "format_bytes",
    "format_seconds",
    "load_policy",
]


class Tier(StrictModel):
    """The limits of one tier. Unset numbers take the free tier's values."""

    concurrency_limit: Count = Field(
        default=1,
        ge=1,
        le=10_000,
        description="Concurrent flow runs per workspace, across all managed pools.",
    )
    pool_limit: Count = Field(
        default=1, ge=1, le=10_000, description="Managed work pools per workspace."
    )
    memory: MemorySize = Field(
        default="2g",
        description="Memory per flow run, dependency installation included, with no swap.",
    )
    cpus: Number = Field(
        default=1.0,
        ge=0.01,
        le=1024,
        description="CPUs per flow run (0.01 to 1024; Docker's smallest CPU quota is 0.01).",
    )
    max_run_seconds: Count = Field(
        default=24 * 3600,
        ge=1,
        le=366 * 24 * 3600,
        description="Maximum run time of a flow run, from container start, in seconds.",
    )
    compute_hours_per_month: Number = Field(
        default=10,
        gt=0,
        le=10_000_000,
        description="Compute hours per workspace per calendar month (UTC).",
    )
    disk: DiskSize | None = Field(
        default=None,
        description=(
            "The size of each flow run container's writable layer (Docker's `--storage-opt "
            "size`), in Docker's units. Only storage drivers that can enforce it accept it "
            "(overlay2 on xfs with pquota, btrfs, zfs, devicemapper): a worker on another "
            "engine refuses to start on a tier that sets it. Unset: not limited by Docker."
        ),
    )
    gpus: Count = Field(
        default=0,
        ge=0,
        le=64,
        description=(
            "GPUs per flow run, given to the container as a Docker device request "
            "(`--gpus N`; the host needs the NVIDIA container runtime). 0: none."
        ),
    )
    infrastructure_retries: Count = Field(
        default=0,
        ge=0,
        le=5,
        description=(
            "How many times a flow run that crashed for an infrastructure reason (its "
            "container removed from outside, the Docker engine lost under it, its image "
            "not available) is scheduled again as a new attempt (0 to 5). Never for the "
            "flow's own failure, running out of memory, the maximum run time, the process "
            "limit, the quota, refused job variables, GPUs or a failed pull step or "
            "install. 0: never."
        ),
    )
    container_output_max_size: OutputSize = Field(
        default="1m",
        description=(
            "The most of a flow run container's own output (stdout and stderr, Prefect's "
            "log lines left out) the worker sends to the flow run's logs when the container "
            "ends, in Docker's units (1k to 64m). Over it, the last part is kept and a log "
            "line says how much was dropped. 0: none is sent."
        ),
    )

    @property
    def memory_bytes(self) -> int:
        return parse_bytes(self.memory)

    @property
    def disk_bytes(self) -> int | None:
        return None if self.disk is None else parse_bytes(self.disk)

    @property
    def container_output_max_bytes(self) -> int:
        return parse_bytes(self.container_output_max_size)


BUILTIN_TIERS: dict[str, dict[str, Any]] = {
    "free": {},
    "pro": {"concurrency_limit": 10, "pool_limit": 5, "cpus": 2.0, "compute_hours_per_month": 250},
    # The sizes of Prefect Cloud's managed runs since 2025: 4 vCPU, 16 GB of memory and
    # 128 GB of ephemeral storage (the storage only where the engine can enforce it).
    "pro-2025": {
        "concurrency_limit": 10,
        "pool_limit": 5,
        "cpus": 4.0,
        "memory": "16g",
        "disk": "128g",
        "compute_hours_per_month": 250,
    },
}


class Workspace(StrictModel):
    name: str = Field(
        default="default",
        pattern=r"^[a-z0-9][a-z0-9-]{0,62}$",
        description="The workspace's name: lowercase letters, digits and dashes.",
    )
    tier: str = Field(default="free", description="The tier the workspace is on.")


class Host(StrictModel):
    """What each Docker host keeps for itself. A host admits a flow run only while the
    memory limits and CPU caps of the managed containers running on its engine, plus the
    new run's, fit what the engine reports (`docker info`) less these reserves; a run
    that does not fit stays Scheduled for another host."""

    reserve_memory: HostMemorySize = Field(
        default="512m",
        description=(
            "Memory of each Docker host that flow runs are never given (for the host, the "
            "engine and the service), in Docker's units. 0: none kept."
        ),
    )
    reserve_cpus: Number = Field(
        default=0.0,
        ge=0,
        le=1024,
        description="CPUs of each Docker host that flow runs are never given.",
    )
    cpu_overcommit: Number = Field(
        default=4.0,
        ge=0.1,
        le=64,
        description=(
            "How many times its CPUs (less reserve_cpus) a host's running flow runs' CPU "
            "caps may add up to. A cap is a ceiling, not a reservation: most runs wait on "
            "I/O. 1 admits only runs whose caps together fit the host's CPUs."
        ),
    )

    lost_after_seconds: Count = Field(
        default=300,
        ge=30,
        le=7 * 24 * 3600,
        description=(
            "A flow run whose worker has sent no heartbeat for this long, and whose "
            "container no live worker can see, is taken as lost with its host: another "
            "host's worker sets it Crashed (HostLost) and records its usage up to that "
            "heartbeat (outcome lost; a record from the run's container, if one comes, "
            "replaces it). Keep it above 3 x PREFECT_WORKER_HEARTBEAT_SECONDS + 120 s (when "
            "another worker takes over a dead worker's containers) and above how long a "
            "service is ever down for an upgrade (30 s to 7 days)."
        ),
    )

    @property
    def reserve_memory_bytes(self) -> int:
        return parse_bytes(self.reserve_memory)


class Policy(StrictModel):
    workspace: Workspace = Field(default_factory=Workspace)
    tiers: dict[str, Tier] = Field(default_factory=dict)
    runtime: Runtime = Field(default_factory=Runtime)
    host: Host = Field(default_factory=Host)

    @model_validator(mode="before")
    @classmethod
    def _merge_builtin_tiers(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        given = data.get("tiers", {})
        if not isinstance(given, dict):
            return data
        tiers = {name: dict(values) for name, values in BUILTIN_TIERS.items()}
        for name, values in given.items():
            if not isinstance(values, dict):
                tiers[name] = values  # let pydantic name the problem
                continue
            tiers[name] = {**tiers.get(name, {}), **values}
        return {**data, "tiers": tiers}

    @model_validator(mode="after")
    def _tier_exists(self) -> Policy:
        if self.workspace.tier not in self.tiers:
            raise ValueError(
                f"workspace.tier {self.workspace.tier!r} is not a tier; "
                f"known tiers: {', '.join(sorted(self.tiers))}"
            )
        return self

    @property
    def tier(self) -> Tier:
        """The workspace's tier."""
        return self.tiers[self.workspace.tier]

    @property
    def concurrency_limit_name(self) -> str:
        """The Prefect global concurrency limit that caps the workspace's runs."""
        return f"prefect-managed-{self.workspace.name}"


def _describe(error: dict[str, Any]) -> str:
    location = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"key {location!r} is not a known setting"
    if not location:
        return message
    given = error.get("input")
    if isinstance(given, bool | int | float | str) and not error["type"].startswith("value_error"):
        # The value as given (a validator's own message names it already).
        shown = redact_url_credentials(given) if isinstance(given, str) else given
        return f"key {location!r} = {shown!r}: {message}"
    return f"key {location!r}: {message}"


def load_policy(path: Path | None) -> Policy:
    """Read a policy file; `None` gives the built-in policy (free tier, defaults).

    Raises `PolicyError` with one message naming the file, the key and the problem.
    """
    if path is None:
        return Policy()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise PolicyError(
            path, f"it is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})"
        ) from exc
    except FileNotFoundError as exc:
        raise PolicyError(path, "the file does not exist") from exc
    except OSError as exc:
        raise PolicyError(path, f"the file cannot be read ({exc.strerror})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(path, f"it is not valid TOML ({exc})") from exc
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(error) for error in exc.errors())
        raise PolicyError(path, problems) from exc


def format_seconds(seconds: float) -> str:
    """86400 -> '24 h', 90 -> '1 min 30 s'."""
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [
        f"{hours} h" if hours else "",
        f"{minutes} min" if minutes else "",
        f"{secs} s" if secs else "",
    ]
    return " ".join(part for part in parts if part) or "0 s"
