"""`ManagedWorker`: prefect-docker's worker with the managed pool's contract.

prefect-docker creates, watches and stops the containers. This worker adds what
managed execution needs on top: the form and caps (in `configuration`), the output of
a container that exited before its flow started sent to the flow run's logs with a
clear final state, and the removal of every container once it has been read.
"""

from __future__ import annotations

import logging
from contextlib import closing
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import anyio.abc
import docker.errors
from prefect.client.schemas.actions import LogCreate
from prefect.utilities.asyncutils import run_sync_in_worker_thread
from prefect_docker.worker import DockerWorker, DockerWorkerResult

from prefect_managed.configuration import ManagedJobConfiguration, ManagedVariables
from prefect_managed.dependencies import describe_early_exit
from prefect_managed.settings import get_settings

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

__all__ = ["ManagedWorker"]

CONTAINER_OUTPUT_LOGGER = "prefect_managed.container"


class ManagedWorker(DockerWorker):
    """Runs each flow run of a `prefect:managed` pool in a capped, hardened container."""

    type = "prefect:managed"
    job_configuration = ManagedJobConfiguration  # type: ignore[assignment]
    job_configuration_variables = ManagedVariables  # type: ignore[assignment]
    _display_name = "Prefect Managed"
    _description = (
        "Run flows in containers managed for you: deploy code from git or object storage, "
        "list the packages it needs in pip_packages, and each run executes in a capped, "
        "hardened container. No worker, image or cloud account on your side."
    )
    _documentation_url = "https://docs.prefect.io/v3/how-to-guides/deployment_infra/managed"

    async def run(  # type: ignore[override]
        self,
        flow_run: FlowRun,
        configuration: ManagedJobConfiguration,
        task_status: anyio.abc.TaskStatus[str] | None = None,
    ) -> DockerWorkerResult:
        result = await super().run(flow_run, configuration, task_status)
        _, container_id = self._parse_infrastructure_pid(result.identifier)
        try:
            if result.status_code != 0:
                await self._report_exit_before_flow_start(
                    flow_run, configuration, container_id, result.status_code
                )
        finally:
            await run_sync_in_worker_thread(self._remove_container, container_id)
        return result

    async def _report_exit_before_flow_start(
        self,
        flow_run: FlowRun,
        configuration: ManagedJobConfiguration,
        container_id: str,
        exit_code: int,
    ) -> None:
        """A container that exits while its run is still Pending never started the flow.

        The engine in the container reports nothing then, so the container's output
        (the installer's, usually) goes to the flow run's logs from here, and the run
        ends Crashed with a message saying why.
        """
        current = await self.client.read_flow_run(flow_run.id)
        if current.state is None or not current.state.is_pending():
            return
        lines = await run_sync_in_worker_thread(
            self._container_output, container_id, get_settings().install_log_lines
        )
        message = describe_early_exit(exit_code, configuration.pip_packages, lines)
        await self.client.create_logs(
            [
                LogCreate(
                    name=CONTAINER_OUTPUT_LOGGER,
                    level=logging.ERROR,
                    message=f"{message}\nContainer output:\n" + "\n".join(lines),
                    timestamp=datetime.now(timezone.utc),
                    flow_run_id=flow_run.id,
                    worker_id=self.backend_id,
                )
            ]
        )
        await self._propose_crashed_state(flow_run, message)

    def _container_output(self, container_id: str, tail: int) -> list[str]:
        with closing(self._get_client()) as client:
            try:
                raw: bytes = client.containers.get(container_id).logs(
                    stdout=True, stderr=True, tail=tail
                )
            except docker.errors.NotFound:
                return ["(the container was removed before its output could be read)"]
        return raw.decode(errors="replace").splitlines()

    def _remove_container(self, container_id: str) -> None:
        with closing(self._get_client()) as client:
            try:
                client.containers.get(container_id).remove(force=True)
            except docker.errors.NotFound:
                return
        self._logger.debug("Removed Docker container %r", container_id)
