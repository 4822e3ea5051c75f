"""A flow the prebuilt-environment tests deploy: it imports a package from its
pip_packages, logs what the package says, and may try to change the installed package."""

import importlib
import sys

from prefect import flow, get_run_logger


@flow
def use_environment(module: str, tamper: bool = False) -> str:
    package = importlib.import_module(module)
    logger = get_run_logger()
    logger.info("environment says: %s (python %s)", package.MARK, sys.prefix)
    if tamper:
        with open(package.__file__, "w") as source:
            source.write("MARK = 'tampered'\n")
        logger.info("rewrote %s", package.__file__)
    return package.MARK
