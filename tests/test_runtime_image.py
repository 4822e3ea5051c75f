"""The runtime image's interpreters: at exit, what they hold is frozen after their exit
handlers ran (prefect-managed-teardown.pth), unless a run's env says
PREFECT_MANAGED_GC_AT_EXIT=1. What it saves: `python -m benchmarks.teardown`. And its
entrypoint's choice of executor: the pre-fork executor, or Prefect's own command where
the executor cannot stand in for it (tests/test_executor.py runs both with a server)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.docker

SCRIPT = """
import atexit, gc, prefect
# An exit handler of the flow's, registered after the freeze: it runs before it, with
# the collector still whole.
atexit.register(lambda: print("an exit handler of the flow ran, frozen before:", gc.get_freeze_count() > 0))
atexit._run_exitfuncs()  # what the interpreter does at exit, in the same order
print("frozen:", gc.get_freeze_count() > 0)
"""


@pytest.mark.parametrize(
    ("env", "frozen"), [({}, True), ({"PREFECT_MANAGED_GC_AT_EXIT": "1"}, False)]
)
def test_an_interpreter_freezes_its_objects_after_its_exit_handlers(
    docker_client, runtime_image, env, frozen
):
    output = docker_client.containers.run(
        runtime_image,
        ["python", "-c", SCRIPT],
        entrypoint=[],
        environment=env,
        network_mode="none",
        remove=True,
    ).decode()
    assert "an exit handler of the flow ran, frozen before: False" in output, output
    assert f"frozen: {frozen}" in output, output


#: A `prefect` command that says it ran, first on the PATH: Prefect's own executor.
FAKE_PREFECT = """set -e
mkdir -p "$HOME/bin"
printf '#!/bin/sh\\necho "STOCK $*"\\n' > "$HOME/bin/prefect"
chmod +x "$HOME/bin/prefect"
{prepare}
PATH="$HOME/bin:$PATH" exec /opt/prefect/entrypoint.sh prefect flow-run execute
"""
OTHER_VERSION = (
    "sed -i 's/^Version: .*/Version: 3.0.0/' "
    "/opt/prefect/venv/lib/python3*/site-packages/prefect-*.dist-info/METADATA"
)


@pytest.mark.parametrize(
    ("env", "prepare", "tmpfs", "said"),
    [
        ({}, OTHER_VERSION, {}, "it was written for Prefect 3.9.1, this is 3.0.0"),
        ({"PREFECT_PLUGINS_ENABLED": "true"}, "", {}, "Prefect's plugins are enabled"),
        ({}, "", {"/tmp": "noexec"}, "is on a noexec mount"),
        ({"PREFECT_MANAGED_EXECUTOR": "stock"}, "", {}, None),
    ],
    ids=["another Prefect version", "plugins", "noexec /tmp", "the run's switch"],
)
def test_the_executor_starts_prefects_own_command_when_it_cannot_stand_in(
    docker_client, runtime_image, env, prepare, tmpfs, said
):
    output = _output(docker_client, runtime_image, FAKE_PREFECT.format(prepare=prepare), env, tmpfs)
    assert "STOCK flow-run execute" in output, output
    if said is not None:
        assert "prefect-managed: starting the flow run with Prefect's own executor: " in output
        assert said in output, output
    else:
        assert "prefect-managed:" not in output, output


def test_the_executor_runs_prefects_runner_in_process(docker_client, runtime_image):
    """By default the entrypoint starts the pre-fork executor, which runs Prefect's runner
    itself: the `prefect` command on the PATH is not started (here the runner finds no
    flow run to execute and says so, as Prefect's command would)."""
    output = _output(docker_client, runtime_image, FAKE_PREFECT.format(prepare=""), {}, {})
    assert "STOCK" not in output, output
    assert "Could not determine the ID of the flow run to execute" in output, output


def _output(docker_client, image: str, script: str, env: dict, tmpfs: dict) -> str:
    """What a container of the image running `script` wrote, whatever its exit code."""
    container = docker_client.containers.run(
        image,
        ["bash", "-c", script],
        entrypoint=[],
        environment=env,
        tmpfs=tmpfs,
        network_mode="none",
        detach=True,
    )
    try:
        container.wait(timeout=120)
        return container.logs(stdout=True, stderr=True).decode()
    finally:
        container.remove(force=True)
