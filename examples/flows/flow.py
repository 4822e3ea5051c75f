"""The demo's flow. It lives in a git repository and needs `cowsay`, which the
deployment lists in pip_packages, so it is installed in the run's container."""

from pathlib import Path

from prefect import flow, get_run_logger


def memory_limit() -> str:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        if Path(path).exists():
            limit = Path(path).read_text().strip()
            return f"{int(limit) / 2**30:.1f} GiB" if limit.isdigit() else limit
    return "unknown"


@flow(log_prints=True)
def my_flow() -> str:
    import cowsay

    print(cowsay.get_output_string("cow", "Hello from a Prefect Managed container!"))
    get_run_logger().info("This container's memory limit: %s", memory_limit())
    return "done"
