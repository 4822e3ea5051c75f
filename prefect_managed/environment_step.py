"""The worker's step before a run's container is made: its prebuilt environment.

With `runtime.prebuilt_environments` on and `pip_packages` asked for, `prepare` finds or
builds the run's environment image (`environments.Environments`) and points the run's
configuration at it, with nothing left to install in the run's container. A build that
fails ends the run Crashed with the installer's output in its logs, and its compute is
recorded as the run's usage; no container is left.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import docker.types
from prefect.client.schemas.actions import LogCreate
from prefect.client.schemas.objects import FlowRun
from prefect.utilities.asyncutils import run_sync_in_worker_thread

from prefect_managed.configuration import API_LABEL, api_label_value
from prefect_managed.containers import ImageFacts, is_root_user
from prefect_managed.dependencies import CACHE_ENV_KEYS, describe_early_exit
from prefect_managed.environments import (
    BUILD_SECONDS_LABEL,
    BuildResult,
    Environments,
    environment_key,
)
from prefect_managed.gateway.tunnel import ISOLATED_MOUNT
from prefect_managed.messages import out_of_memory_message
from prefect_managed.metering import Meter
from prefect_managed.outcome import ContainerReport, outcome_of
from prefect_managed.policy import Policy
from prefect_managed.redact import redact_url_credentials
from prefect_managed.run_states import CONTAINER_OUTPUT_LOGGER

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient

    from prefect_managed.accounting import Accounting
    from prefect_managed.configuration import ManagedJobConfiguration
    from prefect_managed.run_states import RunStates

__all__ = ["EnvironmentStep"]

#: What the build takes from the run's environment: the install and its index.
_BUILD_ENV_KEYS = ("EXTRA_PIP_PACKAGES", "UV_DEFAULT_INDEX", "PIP_INDEX_URL", *CACHE_ENV_KEYS)


class EnvironmentStep:
    def __init__(
        self,
        environments: Environments,
        policy: Policy,
        client: PrefectClient,
        states: RunStates,
        accounting: Accounting,
        run_logger: Callable[[FlowRun], logging.Logger | logging.LoggerAdapter[Any]],
        pool: str,
    ) -> None:
        self._environments = environments
        self._policy = policy
        self._client = client
        self._states = states
        self._accounting = accounting
        self._run_logger = run_logger
        self._pool = pool

    def wanted(self, configuration: ManagedJobConfiguration) -> bool:
        return bool(configuration.pip_packages) and self._policy.runtime.prebuilt_environments

    async def prepare(
        self,
        flow_run: FlowRun,
        configuration: ManagedJobConfiguration,
        base: ImageFacts | None,
    ) -> bool:
        """Point the run at its environment, built from its image (`base`, as inspected
        by the worker); False when the build failed (the run is then Crashed and
        recorded, and no container must be made)."""
        if base is None:
            return True  # not on this host: the run's own start says so (ImageNotAvailable)
        base_image, image_id = configuration.image or "", base.id
        runtime, tier = self._policy.runtime, self._policy.tier
        key = environment_key(
            image_id,
            configuration.pip_packages,
            runtime.package_index_url,
            self._policy.workspace.name,
            configuration.labels.get(API_LABEL, api_label_value()),
        )
        build_env = {k: configuration.env[k] for k in _BUILD_ENV_KEYS if configuration.env.get(k)}
        # Compiled once into the environment, rather than by every run that imports them.
        build_env["UV_COMPILE_BYTECODE"] = "1"
        create: dict[str, Any] = dict(configuration.container_create_kwargs or {})
        binds = list(configuration.volumes or [])
        builder_user: str | None = str(create.get("user") or runtime.user)
        if is_root_user(base.user):
            # An image made to run as root (the official image) installs into root-owned
            # site-packages: built as its own user, as `docker build` would, still with
            # every capability dropped and the run's caps. Without the workspace's
            # dependency cache, whose files the runs' uid must keep writing.
            builder_user = None
            build_env = {k: v for k, v in build_env.items() if k not in CACHE_ENV_KEYS}
            build_env["UV_NO_CACHE"] = "1"
            binds = [volume for volume in binds if volume.endswith(f":{ISOLATED_MOUNT}:ro")]
        log_config: dict[str, Any] | None = create.get("log_config")
        host_config: dict[str, Any] = {
            "binds": binds,
            "mem_limit": configuration.mem_limit,
            "memswap_limit": configuration.memswap_limit,
            "nano_cpus": create.get("nano_cpus"),
            "pids_limit": create.get("pids_limit"),
            "cap_drop": create.get("cap_drop"),
            "security_opt": create.get("security_opt"),
            "network_mode": configuration.network_mode,
            "log_config": docker.types.LogConfig(
                type=log_config["type"], config=log_config["config"]
            )
            if log_config
            else None,
            "storage_opt": create.get("storage_opt"),
            # An isolated network (prefect_managed.gateway.tunnel): the builder's as the run's.
            "extra_hosts": create.get("extra_hosts"),
            "sysctls": create.get("sysctls"),
        }
        logger = self._run_logger(flow_run)
        packages = redact_url_credentials(" ".join(configuration.pip_packages))
        logger.info("Preparing the environment for pip_packages %s", packages)
        result: BuildResult = await run_sync_in_worker_thread(
            lambda: self._environments.ensure(
                base_image=base_image,
                pip_packages=configuration.pip_packages,
                build_env=build_env,
                host_config={k: v for k, v in host_config.items() if v is not None},
                user=builder_user,
                workspace=self._policy.workspace.name,
                key=key,
                timeout=min(runtime.environment_build_seconds, tier.max_run_seconds),
                entrypoint_prefix=create.get("entrypoint"),
                output_lines=2000,
            )
        )
        if result.failed:
            await self._fail(flow_run, configuration, result, base_image)
            return False
        if result.built:
            logger.info(
                "Built the environment %s in %.1f s (billed with this run); later runs with "
                "the same pip_packages start from it with nothing to install",
                result.image,
                result.seconds,
            )
            configuration.labels[BUILD_SECONDS_LABEL] = f"{result.seconds:.3f}"
        else:
            logger.info("Using the environment %s: nothing to install", result.image)
        configuration.image = result.image
        configuration.image_pull_policy = "Never"
        for name in ("EXTRA_PIP_PACKAGES", *CACHE_ENV_KEYS):
            configuration.env.pop(name, None)
        # The dependency cache serves builds only; an isolated network's tunnel stays.
        configuration.volumes = [
            volume
            for volume in configuration.volumes or []
            if volume.endswith(f":{ISOLATED_MOUNT}:ro")
        ]
        if result.built:
            await run_sync_in_worker_thread(
                self._environments.evict,
                self._policy.workspace.name,
                runtime.environments_max_bytes,
                runtime.environments_max_age_days,
                result.image,
            )
        return True

    async def _fail(
        self,
        flow_run: FlowRun,
        configuration: ManagedJobConfiguration,
        result: BuildResult,
        base_image: str,
    ) -> None:
        lines = [redact_url_credentials(line) for line in result.output or []]
        exit_code = result.exit_code if result.exit_code is not None else -1
        if result.oom_killed:
            message = out_of_memory_message(
                self._policy, int(configuration.mem_limit or self._policy.tier.memory_bytes)
            )
        else:
            message = describe_early_exit(exit_code, configuration.pip_packages, lines)
        await self._client.create_logs(
            [
                LogCreate(
                    name=CONTAINER_OUTPUT_LOGGER,
                    level=logging.ERROR,
                    message=f"{message}\nEnvironment build output:\n" + "\n".join(lines),
                    timestamp=datetime.now(timezone.utc),  # type: ignore[arg-type]
                    flow_run_id=flow_run.id,
                )
            ]
        )
        await self._states.crash_with_cause(flow_run, message)
        final = await self._states.state(flow_run.id)
        report = ContainerReport(
            id="",
            name="environment build",
            image=base_image,
            labels=dict(configuration.labels),
            started_at=result.started_at,
            finished_at=result.finished_at,
            exit_code=result.exit_code,
            oom_killed=result.oom_killed,
        )
        outcome = outcome_of(final, timed_out=False, out_of_memory=result.oom_killed)
        await self._accounting.record(flow_run, report, Meter(), outcome, self._pool)
