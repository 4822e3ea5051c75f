"""prefect-managed: Prefect Managed work pools for self-hosted Prefect 3.

Importing the package registers the `prefect:managed` worker type with Prefect (the
`prefect.collections` entry point imports it).
"""

from importlib.metadata import PackageNotFoundError, version

from prefect_managed.configuration import ManagedJobConfiguration, ManagedVariables
from prefect_managed.exceptions import (
    ImageNotAllowed,
    InvalidJobVariable,
    InvalidPipPackage,
    ManagedError,
    PolicyError,
    RuntimeImageError,
)
from prefect_managed.policy import Policy
from prefect_managed.settings import ManagedSettings
from prefect_managed.worker import ManagedWorker

try:
    __version__ = version("prefect-managed")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "ImageNotAllowed",
    "InvalidJobVariable",
    "InvalidPipPackage",
    "ManagedError",
    "ManagedJobConfiguration",
    "ManagedSettings",
    "ManagedVariables",
    "ManagedWorker",
    "Policy",
    "PolicyError",
    "RuntimeImageError",
    "__version__",
]
