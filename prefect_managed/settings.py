"""Where the worker finds its policy, read once per process.

The settings are environment variables prefixed ``PREFECT_INTEGRATIONS_MANAGED_`` (or
the ``[integrations.managed]`` table of ``prefect.toml``). Everything else the operator
decides (tiers, images, network, package index) lives in the policy file.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from prefect.settings import PREFECT_HOME
from prefect.settings.base import PrefectBaseSettings, build_settings_config
from pydantic import Field, SecretStr

from prefect_managed.exceptions import LedgerKeyMissing
from prefect_managed.policy import Policy, load_policy

DEFAULT_POLICY_FILE_NAME = "prefect-managed.toml"
#: Where a worker keeps the ledger key it generated, when the operator set none.
LEDGER_KEY_FILE_NAME = "prefect-managed-ledger.key"


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

    ledger_key: SecretStr | None = Field(
        default=None,
        description=(
            "The secret that signs usage records (HMAC-SHA256); only workers and the "
            "operator's `prefect-managed usage` hold it, never a flow run's container. "
            "Every worker of the workspace, on every host, needs the same value. Unset: "
            "a key generated once into prefect-managed-ledger.key in PREFECT_HOME, which "
            "suits one host."
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


def ledger_key(create: bool = True) -> bytes:
    """The key that signs and verifies usage records.

    The setting wins; else the key file in PREFECT_HOME, generated (0600) when `create`
    is true and it does not exist yet. Raises `LedgerKeyMissing` when there is no key
    and none may be made (the `usage` command must not invent a key that verifies
    nothing).
    """
    configured = get_settings().ledger_key
    if configured is not None and configured.get_secret_value():
        return configured.get_secret_value().encode()
    path = Path(PREFECT_HOME.value()) / LEDGER_KEY_FILE_NAME
    if not path.is_file():
        if not create:
            raise LedgerKeyMissing(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another worker of this host made it first
        else:
            with os.fdopen(fd, "w") as file:
                file.write(secrets.token_hex(32))
    return path.read_text().strip().encode()
