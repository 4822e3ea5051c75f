"""What a flow run's credential may do through the run gateway: the rules, no I/O.

Prefect OSS has no permissions: any credential the server accepts may call every
endpoint. With the run gateway on (`runtime.api_gateway_port`), a run's container holds a
*run token* instead of the worker's credential. The token names one flow run and is
signed with the ledger key, so every worker holding that key (on any host, after any
restart) verifies it without a table of issued tokens.

Through the gateway a run may read what the API offers (as a Prefect Cloud workspace key
may), and change only what is its own: its flow run and the subflow runs it started, their
task runs, logs and artifacts, the events about them, and concurrency limits that are not
the managed layer's. It may not touch the usage records, the workspace's concurrency
limit, work pools, deployments, blocks, variables or other runs. `decide` says which rule
a request falls under; a `Check` it returns is a question about ownership that the
gateway answers by reading the API (`gateway.Ownership`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal
from uuid import UUID

__all__ = ["Check", "Decision", "decide", "event_flow_runs", "run_token", "token_run"]

TOKEN_PREFIX = "pmr1"
_TOKEN_CONTEXT = b"prefect-managed run gateway\0"
#: Artifact keys only workers write (usage records and summaries).
RESERVED_ARTIFACT_PREFIX = "usage-"
#: Concurrency limit names only workers use (the workspace's run slots).
RESERVED_LIMIT_PREFIX = "prefect-managed-"
#: POST endpoints that only read, by their last path segment.
_READ_SUFFIXES = frozenset({"filter", "count", "paginate", "history", "lateness", "validate"})
_FLOW_RUN_OWN_WRITES = {
    ("POST", "set_state"),
    ("POST", "resume"),
    ("POST", "input"),
    ("PATCH", "labels"),
    ("DELETE", "input"),
}


def run_token(key: bytes, flow_run_id: UUID) -> str:
    """The credential a run's container gets: its flow run id, signed with `key`."""
    mac = hmac.new(key, _TOKEN_CONTEXT + flow_run_id.bytes, hashlib.sha256).hexdigest()
    return f"{TOKEN_PREFIX}.{flow_run_id}.{mac}"


def token_run(key: bytes, token: str | None) -> UUID | None:
    """The flow run a token was issued to, or None for anything not signed with `key`."""
    parts = (token or "").split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        return None
    try:
        flow_run_id = UUID(parts[1])
    except ValueError:
        return None
    return flow_run_id if hmac.compare_digest(run_token(key, flow_run_id), token or "") else None


def token_from_authorization(header: str | None) -> str | None:
    """The token in an HTTP Authorization header, as Prefect's client sends an auth string
    (`Basic base64(token)`) or an API key (`Bearer token`)."""
    scheme, _, value = (header or "").partition(" ")
    if scheme.lower() == "bearer":
        return value.strip() or None
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
    return None


@dataclass(frozen=True)
class Check:
    """A question the gateway answers from the API before it forwards: does the
    requesting run own this flow run, task run or artifact?"""

    kind: Literal["flow_run", "task_run", "artifact"]
    id: UUID


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""
    checks: tuple[Check, ...] = field(default=())


ALLOW = Decision(True)


def _refuse(reason: str) -> Decision:
    return Decision(False, reason)


def _uuid(value: Any) -> UUID | None:
    try:
        return UUID(str(value))
    except (ValueError, TypeError, AttributeError):
        return None


def _own(kind: Literal["flow_run", "task_run", "artifact"], value: Any, what: str) -> Decision:
    identifier = _uuid(value)
    if identifier is None:
        return _refuse(f"{what} must name a {kind.replace('_', ' ')} of this flow run")
    return Decision(True, checks=(Check(kind, identifier),))


def _reserved_limit(body: Any) -> str | None:
    names = body.get("names") if isinstance(body, dict) else None
    for name in names if isinstance(names, list) else []:
        if isinstance(name, str) and name.startswith(RESERVED_LIMIT_PREFIX):
            return name
    return None


def decide(method: str, path: str, body: Any = None) -> Decision:
    """The rule for `method` on `path` (the part after the API's `/api`) with `body`
    (parsed JSON, or None)."""
    method = method.upper()
    segments = [segment for segment in path.strip("/").split("/") if segment]
    if method in ("GET", "HEAD", "OPTIONS") or not segments:
        return ALLOW
    head, last = segments[0], segments[-1]
    reads_events = head == "events" and segments[1:2] in (["filter"], ["count-by"])
    if method == "POST" and (last in _READ_SUFFIXES or head == "ui" or reads_events):
        return ALLOW
    where = f"{method} /{'/'.join(segments)}"

    if head == "flows" and len(segments) == 1 and method == "POST":
        return ALLOW  # Prefect reads a flow's id by creating it by name (subflows)
    if head == "flow_runs":
        if len(segments) == 1 and method == "POST":
            parent = body.get("parent_task_run_id") if isinstance(body, dict) else None
            if parent is None:
                return _refuse(
                    "a flow run may create subflow runs of its own task runs only; "
                    "use run_deployment to start another deployment's run"
                )
            return _own("task_run", parent, "parent_task_run_id")
        if len(segments) >= 2 and _uuid(segments[1]) is not None:
            sub = segments[2] if len(segments) > 2 else None
            if (sub is None and method == "PATCH") or (method, sub) in _FLOW_RUN_OWN_WRITES:
                return _own("flow_run", segments[1], "the flow run")
    if head == "task_runs":
        if len(segments) == 1 and method == "POST":
            flow_run = body.get("flow_run_id") if isinstance(body, dict) else None
            return _own("flow_run", flow_run, "flow_run_id")
        if len(segments) >= 2 and _uuid(segments[1]) is not None:
            sub = segments[2] if len(segments) > 2 else None
            if (method, sub) in (("PATCH", None), ("POST", "set_state")):
                return _own("task_run", segments[1], "the task run")
    if head == "logs" and len(segments) == 1 and method == "POST":
        entries = body if isinstance(body, list) else []
        if not entries:
            return _refuse("logs must be a list of log entries of this flow run")
        flow_runs = {
            entry.get("flow_run_id") if isinstance(entry, dict) else None for entry in entries
        }
        checks = []
        for flow_run in flow_runs:
            decision = _own("flow_run", flow_run, "every log entry's flow_run_id")
            if not decision.allowed:
                return decision
            checks.extend(decision.checks)
        return Decision(True, checks=tuple(checks))
    if head == "artifacts":
        if len(segments) == 1 and method == "POST":
            key = body.get("key") if isinstance(body, dict) else None
            if isinstance(key, str) and key.startswith(RESERVED_ARTIFACT_PREFIX):
                return _refuse(
                    f"artifact keys starting with {RESERVED_ARTIFACT_PREFIX!r} are the "
                    "usage records the workers write; choose another key"
                )
            flow_run = body.get("flow_run_id") if isinstance(body, dict) else None
            return _own("flow_run", flow_run, "the artifact's flow_run_id")
        if len(segments) == 2 and method == "PATCH":
            return _own("artifact", segments[1], "the artifact")
    if head == "deployments" and method == "POST" and last == "create_flow_run":
        return ALLOW  # a new run of the pool: admitted under the workspace's limits
    if head in ("concurrency_limits", "v2") and method == "POST":
        operation = segments[-1] if head == "concurrency_limits" else "/".join(segments[2:])
        if head == "v2" and segments[1:2] != ["concurrency_limits"]:
            return _refuse(f"{where} is not open to flow runs")
        if operation in ("increment", "increment-with-lease", "decrement"):
            reserved = _reserved_limit(body)
            if reserved is not None:
                return _refuse(
                    f"the concurrency limit {reserved!r} holds the workspace's run slots; "
                    "only workers take and give back its slots"
                )
            return ALLOW
        if operation == "decrement-with-lease" or (
            head == "v2" and len(segments) == 5 and segments[2] == "leases" and last == "renew"
        ):
            return ALLOW  # a lease id is known only to whoever took the slots
    return _refuse(
        f"a flow run cannot call {where} through the managed pool's API gateway: it may "
        "read the API and change only its own flow run, task runs, logs and artifacts"
    )


def event_flow_runs(event: Any) -> set[UUID]:
    """The flow runs an event names (its resource and related resources)."""
    if not isinstance(event, dict):
        return set()
    resources: Iterable[Any] = [event.get("resource"), *(event.get("related") or [])]
    runs: set[UUID] = set()
    for resource in resources:
        identifier = resource.get("prefect.resource.id") if isinstance(resource, dict) else None
        if isinstance(identifier, str) and identifier.startswith("prefect.flow-run."):
            run = _uuid(identifier.removeprefix("prefect.flow-run."))
            if run is not None:
                runs.add(run)
    return runs
