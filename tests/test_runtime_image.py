"""The runtime image's interpreters: at exit, what they hold is frozen after their exit
handlers ran (prefect-managed-teardown.pth), unless a run's env says
PREFECT_MANAGED_GC_AT_EXIT=1. What it saves: `python -m benchmarks.teardown`."""

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
