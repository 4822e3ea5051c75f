"""The messages a user reads when a tier's limit ends or holds back a run: each names
the value, the limit and what to do next. Pure functions of the policy."""

from __future__ import annotations

from prefect_managed.policy import Policy, format_bytes, format_seconds

__all__ = [
    "CANCELLED_AT_EXIT_MESSAGE",
    "awaiting_room_message",
    "awaiting_slot_message",
    "cancel_enforced_message",
    "container_output_dropped_message",
    "out_of_memory_message",
    "pids_limit_message",
    "pool_not_served_message",
    "run_time_exceeded_message",
    "served_pool_names",
    "stopped_before_start_message",
]


def out_of_memory_message(policy: Policy, memory_bytes: int) -> str:
    tier = policy.workspace.tier
    limit = format_bytes(memory_bytes)
    if memory_bytes < policy.tier.memory_bytes:
        which = f"the {limit} its deployment asked for (mem_limit; the {tier} tier allows {format_bytes(policy.tier.memory_bytes)})"
    else:
        which = f"the {tier} tier's memory limit of {limit}"
    return (
        f"Flow run ran out of memory: it used all of {which}, dependency installation "
        "included, and the kernel stopped it. Lower the memory the flow needs, or ask for "
        "a tier with more memory."
    )


def pids_limit_message(policy: Policy, limit: int) -> str:
    return (
        f"Flow run reached the limit of {limit} processes and threads per container "
        "(a fork bomb or a runaway pool of workers), so the kernel refused to start more "
        "and the flow could not go on. Start fewer processes or threads at once; the "
        "limit is the operator's (runtime.pids_limit)."
    )


def container_output_dropped_message(policy: Policy, dropped_bytes: int, dropped_lines: int) -> str:
    lines = f" ({dropped_lines} lines)" if dropped_lines else ""
    return (
        f"The first {format_bytes(dropped_bytes)}{lines} of the container's output are not in "
        f"these logs: the {policy.workspace.tier} tier keeps the last "
        f"{format_bytes(policy.tier.container_output_max_bytes)} of a flow run's output. "
        "Write less to stdout and stderr, or ask the operator to raise the tier's "
        "container_output_max_size."
    )


def cancel_enforced_message(waited_seconds: int) -> str:
    return (
        f"Flow run was cancelled {waited_seconds} s ago but its container still runs "
        "(its flow ignores the stop signal, or Prefect's runner in the container could not "
        "stop it), so the worker stops the container. Its compute until now is recorded; "
        "the grace is the operator's (runtime.cancel_grace_seconds)."
    )


#: The message of a run whose container ended while the run was Cancelling.
CANCELLED_AT_EXIT_MESSAGE = (
    "Flow run cancelled: its container stopped while the run was being cancelled."
)


def run_time_exceeded_message(policy: Policy) -> str:
    seconds = policy.tier.max_run_seconds
    return (
        f"Flow run exceeded the {policy.workspace.tier} tier's maximum run time of "
        f"{format_seconds(seconds)} ({seconds} s, counted from container start) and its "
        "container was stopped. Make the flow finish sooner or split it into several runs."
    )


def awaiting_slot_message(policy: Policy) -> str:
    limit = policy.tier.concurrency_limit
    runs = "flow run" if limit == 1 else "flow runs"
    return (
        f"Waiting for a concurrency slot: workspace {policy.workspace.name!r} is on the "
        f"{policy.workspace.tier} tier, which runs {limit} {runs} at a time across all "
        "managed work pools. This run starts when a running one finishes."
    )


def awaiting_room_message(why: str) -> str:
    return (
        f"Waiting for room on a Docker host: {why}. The run stays Scheduled: another host "
        "of the workspace takes it, or this one once a running flow run ends. Add hosts, "
        "or lower the tier's memory or cpus, if runs wait for room often."
    )


def served_pool_names(pools: list[tuple[str, object]], pool_limit: int) -> list[str]:
    """The pools a workspace may use: the oldest `pool_limit`, by (name, created) pairs."""
    return [name for name, _ in sorted(pools, key=lambda pool: (pool[1], pool[0]))][:pool_limit]


def pool_not_served_message(policy: Policy, pool: str, served: list[str]) -> str:
    limit = policy.tier.pool_limit
    pools = "managed work pool" if limit == 1 else "managed work pools"
    kept = ", ".join(repr(name) for name in served)
    return (
        f"Work pool {pool!r} is not served: workspace {policy.workspace.name!r} is on the "
        f"{policy.workspace.tier} tier, which allows {limit} {pools} (the oldest: {kept}). "
        "Its flow runs stay Scheduled and start once the pool is served. Delete a managed "
        "pool you no longer use, or move the workspace to a tier with more pools."
    )


def stopped_before_start_message(worker: str) -> str:
    """A run its worker was still submitting when it stopped (or was killed)."""
    return (
        f"Worker {worker!r} stopped before this flow run's container started; the flow "
        "run is scheduled again for the next worker of its pool."
    )
