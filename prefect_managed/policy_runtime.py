"""The policy's `[runtime]` table: the operator-only settings of flow run containers
(images, network, user, package index, dependency cache, environments, the run gateway,
log limits). Pure."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Annotated, Literal, NamedTuple
from urllib.parse import urlsplit

from docker.utils import parse_bytes
from pydantic import BeforeValidator, Field, model_validator

from prefect_managed.gateway.tunnel import Destination, parse_destination
from prefect_managed.policy_values import CacheSize, Count, LogSize, StrictModel

__all__ = ["BOUNDARY", "OFFICIAL_IMAGES", "BoundarySetting", "Runtime"]

OFFICIAL_IMAGES = ("prefecthq/prefect:3*", "docker.io/prefecthq/prefect:3*")


def _gateway_port(value: object) -> object:
    if value == "auto" or (type(value) is int and 0 <= value <= 65535):  # not a bool
        return value
    raise ValueError(
        f'{value!r} is not a run gateway port; give "auto" (the default), a port from '
        "1024 to 65535, or 0 to turn the gateway off"
    )


class BoundarySetting(NamedTuple):
    """One setting of the trust boundary between flow code and the workspace: its
    secure default and what the opt-out gives away."""

    key: str
    default: str
    opt_out: str
    gives_away: str


#: The boundary's settings, as `policy check` prints them and docs/security.md tables them.
BOUNDARY = (
    BoundarySetting(
        "api_gateway_port",
        '"auto" (the run gateway on)',
        '0 (with network_mode "host": the isolated network needs the gateway)',
        "each run's container holds the worker's Prefect credential: a flow can delete "
        "usage records and change other runs, deployments, limits, blocks and variables",
    ),
    BoundarySetting(
        "network_mode",
        '"isolated" (the run gateway, the package index and allowed_destinations only)',
        '"host"',
        "a flow reaches every service on the worker host's loopback (the Prefect server, "
        "databases) and every address the host reaches",
    ),
    BoundarySetting(
        "trusted_code_only",
        "false (a worker refuses a Prefect server that answers without a credential)",
        "true",
        "any flow run can reach the Prefect API directly, around the gateway, and edit "
        "the workspace's books",
    ),
)


class Runtime(StrictModel):
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
        default="isolated",
        description=(
            "Docker network mode of flow run containers. 'isolated' (the default): a "
            "network of the run's own that reaches only the run gateway, the package index "
            "and allowed_destinations; a run whose image has no python3 falls back to "
            "'host' with a warning unless this is set explicitly. 'host': the host's "
            "network, its loopback services included (see the security page)."
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

    api_gateway_port: Annotated[Literal["auto"] | int, BeforeValidator(_gateway_port)] = Field(
        default="auto",
        description=(
            "The port on the worker host's 127.0.0.1 of the run gateway: 'auto' (the "
            "default: one port derived from the Prefect API URL and the ledger key, so "
            "every worker of the host finds the same one), a port from 1024 to 65535, or 0 "
            "to turn the gateway off. With the gateway, a run's container holds a token "
            "valid only for its own run instead of the worker's Prefect credential, and "
            "reaches the API through the gateway (see the security page). Needs "
            "network_mode 'host' or 'isolated'."
        ),
    )
    trusted_code_only: bool = Field(
        default=False,
        description=(
            "Serve a Prefect server that answers without a credential, because every "
            "flow it runs is trusted. Without this, a worker refuses such a server: any "
            "flow run could reach it directly and edit the workspace's books."
        ),
    )

    cancel_grace_seconds: Count = Field(
        default=60,
        ge=5,
        le=3600,
        description=(
            "How long a run may stay Cancelling with its container still running before "
            "the worker stops the container itself (Prefect's runner in the container "
            "stops the flow first; this is for a flow that ignores the signal or a runner "
            "that cannot act). The run then ends Cancelled, recorded as cancelled."
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

    @property
    def gateway_on(self) -> bool:
        """Whether runs reach the API through the run gateway (`api_gateway_port` not 0)."""
        return self.api_gateway_port != 0

    @property
    def network_mode_chosen(self) -> bool:
        """Whether the policy file names network_mode (else 'isolated' is the default,
        with the fallback to 'host' for an image without python3)."""
        return "network_mode" in self.model_fields_set

    @model_validator(mode="after")
    def _official_image_builds_environments(self) -> Runtime:
        official = any(fnmatch.fnmatchcase(self.default_image, p) for p in OFFICIAL_IMAGES)
        if official and not self.prebuilt_environments:
            raise ValueError(
                f"prebuilt_environments = false installs pip_packages in each run's "
                f"container as uid {self.user.partition(':')[0]} (runtime.user), but "
                f"default_image {self.default_image!r} keeps Python's packages where only "
                "root may write, so every run with pip_packages would fail; keep "
                "prebuilt_environments = true (the default: environments are built as the "
                "image's own user), or set default_image to an image whose Python "
                "environment that uid owns (prefect-managed image build makes one)"
            )
        return self

    @model_validator(mode="after")
    def _gateway_is_reachable(self) -> Runtime:
        port = self.api_gateway_port
        if isinstance(port, int) and 0 < port < 1024:
            raise ValueError(
                f"api_gateway_port {port} is a privileged port; choose one from 1024 to "
                "65535, 'auto', or 0 for no gateway"
            )
        if self.gateway_on and self.network_mode not in ("host", "isolated"):
            raise ValueError(
                f"network_mode {self.network_mode!r} cannot reach the run gateway (it listens "
                "on the worker host's 127.0.0.1); use network_mode 'isolated' or 'host', or "
                "turn the gateway off with api_gateway_port = 0 (runs then hold the "
                "worker's Prefect credential; see the security page)"
            )
        if self.network_mode == "isolated" and not self.gateway_on:
            raise ValueError(
                "network_mode 'isolated' needs the run gateway: an isolated run reaches the "
                "Prefect API through it only; set api_gateway_port to 'auto' or a free port "
                "(1024-65535), or choose another network_mode"
            )
        if self.allowed_destinations and self.network_mode != "isolated":
            raise ValueError(
                f"allowed_destinations is for network_mode 'isolated', not "
                f"{self.network_mode!r}; remove it, or set network_mode = 'isolated'"
            )
        self.isolated_destinations()  # each entry is host:port
        return self

    def boundary_values(self) -> dict[str, tuple[str, bool]]:
        """This policy's value of each `BOUNDARY` setting, as TOML writes it, and whether
        it opts out of the boundary."""
        port = self.api_gateway_port
        return {
            "api_gateway_port": (
                f'"{port}"' if isinstance(port, str) else str(port),
                not self.gateway_on,
            ),
            "network_mode": (f'"{self.network_mode}"', self.network_mode != "isolated"),
            "trusted_code_only": (str(self.trusted_code_only).lower(), self.trusted_code_only),
        }

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
