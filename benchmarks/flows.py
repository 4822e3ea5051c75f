"""The flows the benchmark deploys from its loopback git server."""

from prefect import flow


@flow
def noop() -> int:
    return 1


@flow
def uses_pandas() -> str:
    import pandas

    return pandas.__version__
