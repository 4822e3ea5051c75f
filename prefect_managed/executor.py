"""The pre-fork executor for runs on the official image, which does not carry it.

The runtime image has `prefork.py` in /opt/prefect and its entrypoint starts it for
`prefect flow-run execute` (see docs/architecture.md). The official image
(`prefecthq/prefect:3*`) has neither, and is not ours to change; its entrypoint's
contract is to install `EXTRA_PIP_PACKAGES` and then `exec` the command. So a run on it
gets the executor through its command: `python -c` with a bootstrap that takes the
executor's source from the run's environment (removed before anything else reads the
environment). The executor then does what it does in the runtime image, and keeps
Prefect's own command for whatever it does not stand in for (another Prefect version
installed from `pip_packages`, a uv project, ...), saying so in the run's logs.

A run's env `PREFECT_MANAGED_EXECUTOR=stock` keeps Prefect's command, as in the runtime
image; any command other than Prefect's own is left as it is.
"""

from __future__ import annotations

import fnmatch
import functools
import shlex
from importlib import resources

from prefect_managed.policy_runtime import OFFICIAL_IMAGES
from prefect_managed.runtime.prefork import STOCK_COMMAND

__all__ = ["PREFORK_VARIABLE", "use_prefork"]

#: The environment variable that carries the executor's source to the bootstrap.
PREFORK_VARIABLE = "PREFECT_MANAGED_PREFORK"

#: Runs the executor's source as `python prefork.py` would, with the variable gone from
#: the environment the runner, the supervisor and the engine inherit.
BOOTSTRAP = (
    "import os; "
    f"exec(compile(os.environ.pop({PREFORK_VARIABLE!r}), '<prefect-managed prefork.py>', 'exec'))"
)


@functools.cache
def prefork_source() -> str:
    """The executor's source, as the runtime image carries it."""
    return resources.files("prefect_managed.runtime").joinpath("prefork.py").read_text()


def use_prefork(image: str, command: str | None, env: dict[str, str | None]) -> str | None:
    """The command that starts a run on `image` with the pre-fork executor, adding its
    source to `env`; None (and `env` unchanged) when the run keeps its command: an image
    that is not the official one, a command that is not Prefect's, or the run's switch."""
    if not any(fnmatch.fnmatchcase(image, pattern) for pattern in OFFICIAL_IMAGES):
        return None
    if (command or "").split() != STOCK_COMMAND:
        return None
    if env.get("PREFECT_MANAGED_EXECUTOR", "prefork") == "stock":
        return None
    env[PREFORK_VARIABLE] = prefork_source()
    return shlex.join(["python", "-c", BOOTSTRAP])
