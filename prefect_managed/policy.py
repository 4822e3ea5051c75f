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

import fnmatch
import sys
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from docker.errors import DockerException
from docker.utils import parse_bytes
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from prefect_managed.exceptions import PolicyError
from prefect_managed.tunnel import Destination, parse_destination

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "BUILTIN_TIERS",
    "Policy",
    "Runtime",
    "Tier",
    "Workspace",
    "format_bytes",
    "format_seconds",
    "load_policy",
]


def _size_between(low: int, high: int, zero_is_off: bool = False) -> AfterValidator:
    def check(value: str | int) -> str | int:
        try:
            size = parse_bytes(value)
        except DockerException as exc:
            raise ValueError(
                f"{value!r} is not a size; use Docker's units such as 512m or 2g"
            ) from exc
        if zero_is_off and size == 0:
            return value
        if size <= 0:
            raise ValueError(
                f"{value!r} must be 0 (off) or more"
                if zero_is_off
                else f"{value!r} must be more than zero"
            )
        if not low <= size <= high:
            raise ValueError(
                f"{value!r} is outside the sane range {format_bytes(low)} to {format_bytes(high)}"
            )
        return value

    return AfterValidator(check)


def _size_value(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"{value!r} is not a size; use Docker's units such as 512m or 2g")
    return value


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"{str(value).lower()} is not a number; give a number")
    return value


#: A size in Docker's units (a string such as "2g", or a number of bytes), in a range.
MemorySize = Annotated[str | int, BeforeValidator(_size_value), _size_between(6 * 2**20, 2**40)]
CacheSize = Annotated[str | int, BeforeValidator(_size_value), _size_between(256 * 2**10, 2**42)]
LogSize = Annotated[str | int, BeforeValidator(_size_value), _size_between(2**20, 2**30)]
DiskSize = Annotated[str | int, BeforeValidator(_size_value), _size_between(2**30, 2**44)]
#: The same, or 0 for off.
OutputSize = Annotated[
    str | int, BeforeValidator(_size_value), _size_between(2**10, 2**26, zero_is_off=True)
]
#: Numbers: never a bool (TOML's `true` is not 1), never infinite or NaN.
Count = Annotated[int, BeforeValidator(_not_bool), Field(strict=True)]
Number = Annotated[float, BeforeValidator(_not_bool), Field(allow_inf_nan=False)]


def format_bytes(size: int) -> str:
    """2147483648 -> '2 GiB', 536870912 -> '512 MiB'."""
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= factor:
            value = size / factor
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{size} B"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Tier(_Strict):
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

OFFICIAL_IMAGES = ("prefecthq/prefect:3*", "docker.io/prefecthq/prefect:3*")


class Workspace(_Strict):
    name: str = Field(
        default="default",
        pattern=r"^[a-z0-9][a-z0-9-]{0,62}$",
        description="The workspace's name: lowercase letters, digits and dashes.",
    )
    tier: str = Field(default="free", description="The tier the workspace is on.")


class Runtime(_Strict):
    """Operator-only settings of the containers; no job variable changes them."""

    default_image: str = Field(
        default="prefecthq/prefect:3-latest",
        description="The image of a flow run whose deployment names none.",
    )
    allowed_images: list[str] = Field(
        default_factory=lambda: [*OFFICIAL_IMAGES, "prefect-managed-runtime:*"],
        description="Images flow runs may use (shell-style patterns such as 'prefecthq/prefect:3*').",
    )
    network_mode: Literal["host", "bridge", "none", "isolated"] = Field(
        default="host",
        description=(
            "Docker network mode of flow run containers. 'isolated': a network of the "
            "run's own that reaches only the run gateway, the package index and "
            "allowed_destinations (needs api_gateway_port; see the security page)."
        ),
    )
    allowed_destinations: list[str] = Field(
        default_factory=list,
        description=(
            "With network_mode 'isolated': the host:port a run may reach besides the run "
            "gateway and the package index (its git server, object storage, ...), for "
            "example '127.0.0.1:9418' or 'github.com:443'."
        ),
    )
    user: str = Field(
        default="1000:1000",
        pattern=r"^[1-9][0-9]*(:[1-9][0-9]*)?$",
        description="The non-root uid[:gid] flow run containers run as.",
    )
    pids_limit: Count = Field(
        default=1024, ge=16, le=4_194_304, description="Processes per container (16 or more)."
    )
    extra_ca_bundle: Path | None = Field(
        default=None,
        description="A PEM bundle of extra certificate authorities for the runtime image.",
    )
    package_index_url: str | None = Field(
        default=None,
        description="The package index pip_packages are installed from (unset: uv's default).",
    )
    allow_url_requirements: bool = Field(
        default=False, description="Whether pip_packages may name a URL ('name @ https://...')."
    )
    dependency_cache: bool = Field(
        default=True,
        description=(
            "Whether runs with pip_packages use the workspace's dependency cache: a named "
            "Docker volume per workspace (no host path) mounted as uv's cache directory, so "
            "a second run with the same packages installs them without downloading."
        ),
    )
    dependency_cache_max_size: CacheSize = Field(
        default="5g",
        description=(
            "The most the workspace's dependency cache may hold, in Docker's units. A run "
            "that finds it larger evicts the packages used least recently, before its flow "
            "starts, until it holds at most 80 % of this."
        ),
    )
    prebuilt_environments: bool = Field(
        default=True,
        description=(
            "Whether a run's pip_packages are installed once per (image, packages, index, "
            "workspace) into an environment image that later runs start from with nothing "
            "to install (the default), instead of in every run's container (false)."
        ),
    )
    environments_max_size: CacheSize = Field(
        default="20g",
        description=(
            "The most a workspace's environment images may hold on the Docker host (their "
            "own layers), in Docker's units; the least recently used go first."
        ),
    )
    environments_max_age_days: Count = Field(
        default=30,
        ge=1,
        le=3660,
        description="Days an environment image is kept after its last use.",
    )
    environment_build_seconds: Count = Field(
        default=1800,
        ge=10,
        le=86400,
        description=(
            "The longest an environment build may take (it never takes longer than the "
            "tier's maximum run time either); a build that does not end in time fails the run."
        ),
    )

    api_gateway_port: Count = Field(
        default=0,
        ge=0,
        le=65535,
        description=(
            "The port on the worker host's 127.0.0.1 of the run gateway, 0 for none. With "
            "a port, a run's container holds a token valid only for its own run instead of "
            "the worker's Prefect credential, and reaches the API through the gateway (see "
            "the security page). Needs network_mode 'host' or 'isolated'."
        ),
    )

    log_max_size: LogSize = Field(
        default="10m",
        description=(
            "The most of a container's output Docker keeps on the host per log file "
            "(json-file `max-size`), in Docker's units."
        ),
    )
    log_max_files: Count = Field(
        default=3,
        ge=1,
        le=100,
        description="How many rotated log files Docker keeps per container (`max-file`).",
    )

    @property
    def dependency_cache_max_bytes(self) -> int:
        return parse_bytes(self.dependency_cache_max_size)

    @property
    def environments_max_bytes(self) -> int:
        return parse_bytes(self.environments_max_size)

    @property
    def log_max_bytes(self) -> int:
        return parse_bytes(self.log_max_size)

    @model_validator(mode="after")
    def _default_image_is_allowed(self) -> Runtime:
        if not self.image_allowed(self.default_image):
            raise ValueError(
                f"default_image {self.default_image!r} is not in allowed_images {self.allowed_images}"
            )
        return self

    @model_validator(mode="after")
    def _gateway_is_reachable(self) -> Runtime:
        if self.api_gateway_port and self.api_gateway_port < 1024:
            raise ValueError(
                f"api_gateway_port {self.api_gateway_port} is a privileged port; choose one "
                "from 1024 to 65535, or 0 for no gateway"
            )
        if self.api_gateway_port and self.network_mode not in ("host", "isolated"):
            raise ValueError(
                f"api_gateway_port needs network_mode 'host' or 'isolated' (the gateway "
                f"listens on the worker host's 127.0.0.1), not {self.network_mode!r}"
            )
        if self.network_mode == "isolated" and not self.api_gateway_port:
            raise ValueError(
                "network_mode 'isolated' needs api_gateway_port: an isolated run reaches the "
                "Prefect API through the run gateway only; set api_gateway_port to a free "
                "port (1024-65535)"
            )
        if self.allowed_destinations and self.network_mode != "isolated":
            raise ValueError(
                f"allowed_destinations is for network_mode 'isolated', not "
                f"{self.network_mode!r}; remove it, or set network_mode = 'isolated'"
            )
        self.isolated_destinations()  # each entry is host:port
        return self

    def isolated_destinations(self) -> list[Destination]:
        """What an isolated run may reach besides the gateway: allowed_destinations and
        the package index. Raises `ValueError` naming an entry that is not host:port."""
        destinations = [parse_destination(entry) for entry in self.allowed_destinations]
        if self.package_index_url:
            index = urlsplit(self.package_index_url)
            if index.hostname:
                port = index.port or (443 if index.scheme == "https" else 80)
                destinations.append(parse_destination(f"{index.hostname}:{port}"))
        return destinations

    def image_allowed(self, image: str) -> bool:
        return any(fnmatch.fnmatchcase(image, pattern) for pattern in self.allowed_images)


class Policy(_Strict):
    workspace: Workspace = Field(default_factory=Workspace)
    tiers: dict[str, Tier] = Field(default_factory=dict)
    runtime: Runtime = Field(default_factory=Runtime)

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
    return f"key {location!r}: {message}" if location else message


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
