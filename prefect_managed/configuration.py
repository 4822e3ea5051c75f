"""The managed pool's form (`ManagedVariables`) and its job configuration.

Job variables are untrusted: a deployment can set any key of the job configuration,
including the ones the form hides (`privileged`, `volumes`, `mem_limit`,
`container_create_kwargs`, ...), and a pool's base job template can be edited. So the
operator's settings are applied last, in `prepare_for_flow_run`, after templating, and
overwrite whatever the templating produced.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from uuid import UUID

from docker.errors import DockerException
from docker.types import DeviceRequest
from docker.utils import parse_bytes
from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, get_current_settings
from prefect.workers.base import BaseVariables
from prefect_docker.worker import CONTAINER_LABELS, DockerWorkerJobConfiguration
from pydantic import Field

from prefect_managed.dependencies import (
    CACHE_ENV_KEYS,
    CACHE_MOUNT,
    cache_environment,
    cache_volume_name,
    normalize_pip_packages,
    split_extra_pip_packages,
)
from prefect_managed.exceptions import ImageNotAllowed, InvalidJobVariable
from prefect_managed.gateway.port import run_gateway_port
from prefect_managed.gateway.tokens import run_token, token_lifetime
from prefect_managed.gateway.tunnel import ISOLATED_MOUNT, isolation
from prefect_managed.policy import Policy
from prefect_managed.settings import get_policy, ledger_key

if TYPE_CHECKING:
    from prefect.client.schemas.objects import Flow as APIFlow
    from prefect.client.schemas.objects import FlowRun, WorkPool
    from prefect.client.schemas.responses import DeploymentResponse

__all__ = ["MANAGED_LABEL", "WORKSPACE_LABEL", "ManagedJobConfiguration", "ManagedVariables"]

#: Docker labels (in Docker's reversed-domain form) on every container this worker creates.
MANAGED_LABEL = "io.prefect-managed.managed"
WORKSPACE_LABEL = "io.prefect-managed.workspace"
API_LABEL = "io.prefect-managed.api"
#: Environment variables only the worker sets: where the flow run reports, and as whom.
#: Compared without regard to case (Prefect's settings are read that way).
WORKER_OWNED_ENV = ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING")
#: What a run's container gets of the worker's own Prefect settings: how to reach the
#: API and its logging. Nothing else of the worker's environment reaches it (a worker
#: started next to the server holds the database URL and the server's auth string).
RUN_ENV_FROM_WORKER = (
    *WORKER_OWNED_ENV,
    "PREFECT_API_SSL_CERT_FILE",
    "PREFECT_API_TLS_INSECURE_SKIP_VERIFY",
    "PREFECT_API_REQUEST_TIMEOUT",
    "PREFECT_API_ENABLE_HTTP2",
)
#: The CA file of the run's Prefect client.
API_CA_FILE = "PREFECT_API_SSL_CERT_FILE"
RUN_ENV_FROM_WORKER_PREFIXES = ("PREFECT_LOGGING_", "PREFECT_CLIENT_")
#: Of those, what is a path or file on the worker's host, not the run's.
RUN_ENV_NOT_FROM_WORKER = ("PREFECT_LOGGING_SETTINGS_PATH",)
#: Installer settings that would install from another index than the operator's.
INDEX_ENV = (
    "UV_INDEX",
    "UV_INDEX_URL",
    "UV_DEFAULT_INDEX",
    "UV_EXTRA_INDEX_URL",
    "UV_FIND_LINKS",
    "UV_NO_INDEX",
    "UV_INDEX_STRATEGY",
    "UV_INSECURE_HOST",
    "UV_CONFIG_FILE",
    "UV_NO_CONFIG",
    "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL",
    "PIP_FIND_LINKS",
    "PIP_NO_INDEX",
    "PIP_TRUSTED_HOST",
    "PIP_CONFIG_FILE",
)
#: Label prefixes that name a container's run, pool, worker and workspace: Prefect's
#: and ours, set by the worker only (a replacement worker finds its runs by them).
RESERVED_LABEL_PREFIXES = ("io.prefect.", "io.prefect-managed.", "prefect.io/")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

#: (settings object, network mode, environment): the last `_base_environment` rendered.
_base_env: tuple[object, str | None, dict[str, str]] | None = None


def api_label_value() -> str:
    """Which Prefect API a container belongs to: a digest of the API URL, so that
    workers of different Prefect servers sharing a Docker engine never take over each
    other's containers."""
    url = PREFECT_API_URL.value() or ""
    return hashlib.sha256(url.encode()).hexdigest()[:16]


_IMAGE_DESCRIPTION = (
    "The Prefect image flow runs execute in. Leave it empty to use the workspace's "
    "runtime image, which has Prefect, uv and git installed."
)
_PIP_PACKAGES_DESCRIPTION = (
    "Python packages installed with uv before the flow starts, one PEP 508 requirement "
    "per entry (for example 'pandas>=2.2' or 'prefect-aws'). A package set is installed "
    "once into an environment that later runs with the same packages start from (unless "
    "the operator turned prebuilt environments off); the installation counts against the "
    "run's memory limit."
)


class ManagedVariables(BaseVariables):
    """The variables a `prefect:managed` pool offers in its form."""

    image: str | None = Field(
        default=None,
        title="Image",
        description=_IMAGE_DESCRIPTION,
        examples=["prefecthq/prefect:3-latest"],
    )
    pip_packages: list[str] = Field(
        default_factory=list,
        title="Pip Packages",
        description=_PIP_PACKAGES_DESCRIPTION,
        examples=[["pandas>=2.2", "prefect-aws"]],
    )
    mem_limit: str | None = Field(
        default=None,
        title="Memory Limit",
        description=(
            "Memory for each flow run, dependency installation included, with no swap, "
            "in Docker's units (for example 512m or 1g). It can only lower the workspace "
            "tier's limit; leave it empty to get the tier's limit."
        ),
        examples=["512m"],
    )


class ManagedJobConfiguration(DockerWorkerJobConfiguration):
    """prefect-docker's job configuration plus `pip_packages`, with the caps applied."""

    image: str | None = Field(default=None, description=_IMAGE_DESCRIPTION)  # type: ignore[assignment]
    pip_packages: list[str] = Field(
        default_factory=list,
        description=_PIP_PACKAGES_DESCRIPTION,
        json_schema_extra={"template": "{{ pip_packages }}"},
    )

    @classmethod
    def json_template(cls) -> dict[str, Any]:
        """The pool's job configuration template: only the variables the form offers.

        Prefect's server requires every templated field to be a declared variable, and
        the Docker-only fields (volumes, privileged, ...) are not the user's to set.
        """
        offered = ManagedVariables.model_fields
        return {key: value for key, value in super().json_template().items() if key in offered}

    def _base_environment(self) -> dict[str, str]:
        """Prefect's environment for every run (the worker's settings), rendered once
        per settings object and network mode: rendering every setting costs about 15 ms
        of the worker's event loop, and a run needs it twice (Prefect's templating, then
        `apply_policy`)."""
        global _base_env
        settings, mode = get_current_settings(), self.get_network_mode()
        if _base_env is None or _base_env[0] is not settings or _base_env[1] != mode:
            _base_env = (settings, mode, super()._base_environment())
        return dict(_base_env[2])

    def prepare_for_flow_run(
        self,
        flow_run: FlowRun,
        deployment: DeploymentResponse | None = None,
        flow: APIFlow | None = None,
        work_pool: WorkPool | None = None,
        worker_name: str | None = None,
        worker_id: UUID | None = None,
    ) -> None:
        policy = get_policy()
        self.image = self.image or policy.runtime.default_image
        # Before prefect-docker derives the API URL the container uses from the network.
        self.network_mode = policy.runtime.network_mode
        self.networks = []
        # The container's output reaches the run's logs, capped (`_forward_output`), not
        # the worker's own output: a flow printing without end must not flood the
        # operator's logs, nor cost the worker a line-by-line copy of it.
        self.stream_output = False
        super().prepare_for_flow_run(
            flow_run, deployment, flow, work_pool, worker_name, worker_id=worker_id
        )
        prefect_labels = self._convert_labels_to_docker_format(
            {
                **self._base_flow_run_labels(flow_run),
                **self._base_work_pool_labels(work_pool),
                **self._base_worker_name_label(worker_name),
                **self._base_flow_labels(flow),
                **self._base_deployment_labels(deployment),
                **CONTAINER_LABELS,
            }
        )
        self.apply_policy(policy, flow_run, prefect_labels)
        # Prefect's attribution of the run (worker, flow, deployment), as Prefect sets it.
        self.env.update(
            self._base_attribution_environment(
                flow_run=flow_run,
                deployment=deployment,
                flow=flow,
                worker_id=worker_id,
                worker_name=worker_name,
            )
        )

    def apply_policy(
        self, policy: Policy, flow_run: FlowRun, prefect_labels: Mapping[str, str] = {}
    ) -> None:
        """Overwrite every field a deployment could use to lift a cap or loosen hardening.

        `prefect_labels` are the labels Prefect gives the run's container (its run, flow,
        deployment, pool and worker, in Docker's form); they replace any label under a
        reserved prefix that the job variables set.

        Raises `InvalidPipPackage`, `InvalidJobVariable` or `ImageNotAllowed` for a value
        the policy does not accept, so that no container is created for the run.
        """
        runtime, tier = policy.runtime, policy.tier
        if not runtime.image_allowed(self.image or ""):
            raise ImageNotAllowed(str(self.image), runtime.allowed_images)

        base = self._base_environment()
        self.env = run_environment(self.env, base)
        requested = [
            *self.pip_packages,
            *split_extra_pip_packages(self.env.get("EXTRA_PIP_PACKAGES")),
        ]
        self.pip_packages = normalize_pip_packages(
            requested, allow_urls=runtime.allow_url_requirements
        )
        self.env.pop("EXTRA_PIP_PACKAGES", None)
        if self.pip_packages:
            self.env["EXTRA_PIP_PACKAGES"] = " ".join(self.pip_packages)
        if runtime.package_index_url:
            # uv installs pip_packages; pip installs a pull step's requirements.txt
            # (`pip_install_requirements`): both use the operator's index only.
            self.env["UV_DEFAULT_INDEX"] = runtime.package_index_url
            self.env["PIP_INDEX_URL"] = runtime.package_index_url
        gateway_port = run_gateway_port(runtime)
        if gateway_port:
            # The run reaches the API through the run gateway, as itself: a token valid
            # for its own run only, never the worker's credential (docs/security.md).
            for key in [key for key in self.env if key.upper() in WORKER_OWNED_ENV]:
                del self.env[key]
            self.env["PREFECT_API_URL"] = f"http://127.0.0.1:{gateway_port}/api"
            self.env["PREFECT_API_AUTH_STRING"] = run_token(
                ledger_key(), flow_run.id, token_lifetime(tier.max_run_seconds)
            )
            if PREFECT_UI_URL.value():  # links in the run's logs: the UI, not the gateway
                self.env.setdefault("PREFECT_UI_URL", PREFECT_UI_URL.value())
        # The run's identity is the worker's to say, not the deployment's.
        self.env["PREFECT__FLOW_RUN_ID"] = str(flow_run.id)
        self.labels = {
            **{
                key: value
                for key, value in self.labels.items()
                if not key.lower().startswith(RESERVED_LABEL_PREFIXES)
            },
            **prefect_labels,
            "io.prefect.flow-run-id": str(flow_run.id),
            MANAGED_LABEL: "true",
            WORKSPACE_LABEL: policy.workspace.name,
            API_LABEL: api_label_value(),
        }

        memory = memory_limit_bytes(self.mem_limit, tier.memory_bytes)
        self.mem_limit = str(memory)
        self.memswap_limit = str(memory)  # memory + swap = memory: no swap

        self.privileged = False
        self.volumes = []
        for key in CACHE_ENV_KEYS:
            self.env.pop(key, None)
        if self.pip_packages and runtime.dependency_cache:
            # The workspace's own named volume (not a host path), chosen by the policy.
            volume = cache_volume_name(policy.workspace.name, api_label_value())
            self.volumes = [f"{volume}:{CACHE_MOUNT}:rw"]
            self.env.update(cache_environment(runtime.dependency_cache_max_bytes))
        self.networks = []
        self.network_mode = runtime.network_mode
        isolated = None
        if runtime.network_mode == "isolated":
            # Docker's `none` network, and a tunnel to the allowed destinations only
            # (prefect_managed.gateway.tunnel); the worker adds the image's own entrypoint.
            self.network_mode = "none"
            isolated = isolation(
                ledger_key(), flow_run.id, gateway_port, runtime.isolated_destinations()
            )
            self.volumes.append(isolated.volume)
            if gateway_port and isolated.no_tls_ca is not None:
                # The run reaches the API over plain HTTP, so its Prefect client's TLS
                # contexts are never used: made from a one-certificate file instead of the
                # worker's bundle (a host path besides). A deployment's own file is kept.
                # (Prefect reads its settings from the environment in any case.)
                own = [k for k in self.env if k.upper() == API_CA_FILE]
                if all(self.env[k] == base.get(k) for k in own):
                    for key in own:
                        del self.env[key]
                    self.env[API_CA_FILE] = isolated.no_tls_ca
        self.registry_credentials = None
        self.image_pull_policy = "IfNotPresent"
        self.auto_remove = False  # the worker removes containers once it has read them
        self.container_create_kwargs = {
            "user": runtime.user,
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
            "pids_limit": runtime.pids_limit,
            "nano_cpus": int(tier.cpus * 1e9),
            # The container's output on the host's disk: Docker's json-file log, rotated.
            "log_config": {
                "type": "json-file",
                "config": {
                    "max-size": str(runtime.log_max_bytes),
                    "max-file": str(runtime.log_max_files),
                },
            },
        }
        if isolated is not None:
            self.container_create_kwargs.update(
                extra_hosts=isolated.extra_hosts,
                sysctls=isolated.sysctls,
                entrypoint=isolated.entrypoint(None),
            )
        if tier.disk_bytes is not None:
            # The writable layer's size; the worker checks at start that the engine's
            # storage driver can enforce it (`disk_limit_unsupported`).
            self.container_create_kwargs["storage_opt"] = {"size": str(tier.disk_bytes)}
        if tier.gpus:
            self.container_create_kwargs["device_requests"] = [
                DeviceRequest(count=tier.gpus, capabilities=[["gpu"]])
            ]

    def leave_isolation(self) -> None:
        """The run on the host's network instead of the isolated one (its image cannot run
        the isolated network's forwarder). It keeps its run token: it can reach the Prefect
        server on the host's loopback, which answers nothing without the server's credential."""
        self.network_mode = "host"
        self.volumes = [v for v in self.volumes if not v.endswith(f":{ISOLATED_MOUNT}:ro")]
        if self.env.get(API_CA_FILE, "").startswith(f"{ISOLATED_MOUNT}/"):
            del self.env[API_CA_FILE]  # not mounted any more
        for key in ("extra_hosts", "sysctls", "entrypoint"):
            (self.container_create_kwargs or {}).pop(key, None)


def run_environment(requested: Mapping[str, str], worker: Mapping[str, str]) -> dict[str, str]:
    """A run container's environment: the allow-listed part of the worker's settings,
    then what the deployment asked for, checked.

    `requested` is the environment after Prefect's templating (the worker's settings with
    the job variables' `env` over them); `worker` is the worker's settings alone. An entry
    of `requested` equal to the worker's own value came from the worker and is kept only
    when it is allow-listed. Raises `InvalidJobVariable` for a key that is not a plain
    variable name, a worker-owned name in any case, or an installer index setting.
    """
    env = {
        key: value
        for key, value in worker.items()
        if (key in RUN_ENV_FROM_WORKER or key.startswith(RUN_ENV_FROM_WORKER_PREFIXES))
        and key not in RUN_ENV_NOT_FROM_WORKER
    }
    for key, value in requested.items():
        if worker.get(key) == value:
            continue  # the worker's own setting: allow-listed above or left out
        if not isinstance(key, str) or not _ENV_KEY.fullmatch(key):
            raise InvalidJobVariable(
                "env",
                {key: "..."},
                f"{key!r} is not an environment variable name; use letters, digits and "
                "underscores, not starting with a digit",
            )
        upper = key.upper()
        if upper in WORKER_OWNED_ENV:
            raise InvalidJobVariable(
                "env",
                {key: "***" if "KEY" in upper or "AUTH" in upper else value},
                f"{key} is set by the worker so that the flow run reports to this Prefect "
                "server as itself; remove it from the deployment's env",
            )
        if upper in INDEX_ENV:
            raise InvalidJobVariable(
                "env",
                {key: value},
                f"{key} would install packages from another index than the operator's; "
                "pip_packages come from the workspace's package index only. Remove it, "
                "and ask the operator if a package is missing from the index",
            )
        if upper.startswith("PREFECT__"):
            continue  # the run's identity and attribution: set by the worker
        env[key] = value
    return env


def disk_limit_unsupported(driver: str, driver_status: list[list[str]]) -> str | None:
    """Why the Docker engine cannot limit a container's writable layer, or None when it
    can: Docker's `--storage-opt size` works with overlay2 on xfs mounted with project
    quotas (pquota), and with the btrfs, zfs and devicemapper drivers."""
    if driver in ("btrfs", "zfs", "devicemapper", "windowsfilter"):
        return None
    backing = dict((item[0], item[1]) for item in driver_status if len(item) == 2).get(
        "Backing Filesystem", "unknown"
    )
    if driver == "overlay2" and backing == "xfs":
        return None  # Docker itself refuses at container creation when pquota is off
    return (
        f"the Docker engine's storage driver {driver!r} on a {backing!r} file system cannot "
        "limit a container's writable layer (it needs overlay2 on xfs mounted with pquota, "
        "or btrfs, zfs or devicemapper)"
    )


def memory_limit_bytes(requested: str | int | None, cap: int) -> int:
    """The memory a run gets: what it asked for, never more than the cap."""
    if requested in (None, ""):
        return cap
    try:
        asked = parse_bytes(requested)
    except DockerException as exc:
        raise InvalidJobVariable(
            "mem_limit", requested, "use Docker's units, such as 512m or 1g"
        ) from exc
    if asked <= 0:
        raise InvalidJobVariable("mem_limit", requested, "ask for a positive amount, such as 512m")
    return min(asked, cap)
