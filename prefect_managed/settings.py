"""Where the worker finds its policy, read once per process.

The settings are environment variables prefixed ``PREFECT_INTEGRATIONS_MANAGED_`` (or
the ``[integrations.managed]`` table of ``prefect.toml``). Everything else the operator
decides (tiers, images, network, package index) lives in the policy file.
"""

from __future__ import annotations

from pathlib import Path

from prefect.settings import PREFECT_HOME
from prefect.settings.base import PrefectBaseSettings, build_settings_config
from pydantic import Field

from prefect_managed.policy import Policy, load_policy

DEFAULT_POLICY_FILE_NAME = "prefect-managed.toml"


class ManagedSettings(PrefectBaseSettings):
    model_config = build_settings_config(("integrations", "managed"))

    policy_file: Path | None = Field(
        default=None,
        description=(
            "The policy file (TOML). Unset: prefect-managed.toml in PREFECT_HOME if it "
            "exists, else the built-in policy (the free tier)."
        ),
    )
    install_log_lines: int = Field(
        default=400,
        gt=0,
        description=(
            "How many of the last lines of a container's output are sent to the flow "
            "run's logs when it exits before the flow starts."
        ),
    )

    def resolved_policy_file(self) -> Path | None:
        if self.policy_file is not None:
            return self.policy_file
        default = Path(PREFECT_HOME.value()) / DEFAULT_POLICY_FILE_NAME
        return default if default.is_file() else None


_settings: ManagedSettings | None = None
_policy: Policy | None = None


def get_settings() -> ManagedSettings:
    """The settings, read from the environment once per process."""
    global _settings
    if _settings is None:
        _settings = ManagedSettings()
    return _settings


def get_policy() -> Policy:
    """The policy, read from its file once per process. Raises `PolicyError`."""
    global _policy
    if _policy is None:
        _policy = load_policy(get_settings().resolved_policy_file())
    return _policy
