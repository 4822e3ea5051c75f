"""A flow the dependency cache tests deploy: what the run's cache holds."""

import importlib
import os

from prefect import flow, get_run_logger


@flow
def cache_contents(module: str = "") -> list[str]:
    """Imports `module` (installed by pip_packages), then logs the distributions whose
    unpacked wheels are in the run's uv cache (UV_CACHE_DIR)."""
    if module:
        importlib.import_module(module)
    root = os.environ.get("UV_CACHE_DIR", "")
    names = sorted(
        {
            entry.split("-")[0]
            for _, directories, _ in os.walk(root)
            for entry in directories
            if entry.endswith(".dist-info")
        }
    )
    get_run_logger().info("cache holds: [%s]", " ".join(names))
    return names
