"""Operator settings of prefect-managed, read once from the environment.

Every setting is an environment variable prefixed ``PREFECT_INTEGRATIONS_MANAGED_``
(or the ``[integrations.managed]`` table of ``prefect.toml``). They belong to the
operator who runs the worker; job variables of a deployment never change them.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from prefect.settings.base import PrefectBaseSettings, build_settings_config

OFFICIAL_IMAGE = "prefecthq/prefect:3-latest"


class ManagedSettings(PrefectBaseSettings):
    model_config = build_settings_config(("integrations", "managed"))

    default_image: str = Field(
        default=OFFICIAL_IMAGE,
        description=(
            "The image a flow run uses when its deployment names none. Set it to the "
            "local runtime image (`prefect-managed image build`) where no registry "
            "can be reached."
        ),
    )
    memory_limit: str = Field(
        default="2g",
        description=(
            "Memory cap of every flow run container, dependency installation "
            "included, with no swap. Docker's units: 512m, 2g."
        ),
    )
    pids_limit: int = Field(
        default=1024, gt=0, description="Largest number of processes in one container."
    )
    network_mode: str = Field(
        default="host",
        description="Docker network mode of flow run containers.",
    )
    allow_url_requirements: bool = Field(
        default=False,
        description="Whether pip_packages may name a URL (`name @ https://...`).",
    )
    package_index_url: str | None = Field(
        default=None,
        description=(
            "The package index pip_packages are installed from (uv's default index). "
            "Unset: uv's own default."
        ),
    )
    extra_ca_bundle: Path | None = Field(
        default=None,
        description=(
            "A PEM bundle of extra certificate authorities baked into the runtime "
            "image, for a TLS-intercepting proxy."
        ),
    )
    install_log_lines: int = Field(
        default=400,
        gt=0,
        description=(
            "How many of the last lines of a container's output are sent to the "
            "flow run's logs when it exits before the flow starts."
        ),
    )


_settings: ManagedSettings | None = None


def get_settings() -> ManagedSettings:
    """The settings, read from the environment once per process."""
    global _settings
    if _settings is None:
        _settings = ManagedSettings()
    return _settings
