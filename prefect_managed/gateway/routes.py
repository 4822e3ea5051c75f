"""What a flow run's token may do: an allow-list of Prefect's own routes, no I/O.

Each entry is one of the Prefect server's routes, spelled as the server spells it (the
method and path template of its FastAPI route; `tests/test_gateway_routes.py` checks every
entry against the installed server's route table). A request matches at most one entry
on its canonical reading (`reading.Reading`); anything that matches none is refused.

Reads pass as they are (a run may read the workspace, as a Prefect Cloud workspace key
may), but for the server's settings (`/admin/settings`), the collections views (which
fetch from the internet) and the polls that mark a work pool or queue as served. Every
write names what a run may send (a Prefect action schema, and the fields of it a run may
set: anything else is refused, never dropped), and who must own what it touches
(`Check`s, which the gateway answers by reading the API). The body forwarded is the one
validated here, serialised again, so the server parses what was checked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal
from uuid import UUID

from prefect.client.schemas.actions import (
    ArtifactCreate,
    ArtifactUpdate,
    DeploymentFlowRunCreate,
    FlowCreate,
    FlowRunCreate,
    FlowRunUpdate,
    LogCreate,
    StateCreate,
    TaskRunCreate,
    TaskRunUpdate,
)
from prefect.client.schemas.objects import TERMINAL_STATES, StateType
from prefect.results import ResultRecordMetadata
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from prefect_managed.gateway.reading import Reading, encode_segment
from prefect_managed.retries import INFRASTRUCTURE_RETRY
from prefect_managed.run_states import AWAITING_SLOT, HOST_LOST, QUOTA_EXHAUSTED

__all__ = [
    "RESERVED_ARTIFACT_PREFIX",
    "RESERVED_LIMIT_PREFIXES",
    "ROUTES",
    "Check",
    "Decision",
    "Refusal",
    "Route",
    "decide",
    "match",
]

#: Artifact keys only workers write (usage records and summaries).
RESERVED_ARTIFACT_PREFIX = "usage-"
#: Global concurrency limits a run may not take or give back: the workspace's run
#: slots, and the server's own deployment limits.
RESERVED_LIMIT_PREFIXES = ("prefect-managed-", "deployment:")
#: Label keys only Prefect and the managed layer set.
RESERVED_LABEL_PREFIXES = ("prefect.", "prefect-managed.", "io.prefect.")

CheckKind = Literal[
    "flow_run",
    "task_run",
    "new_or_own_task_run",
    "inline_flow_run",
    "artifact",
    "managed_deployment",
    "lease",
]


@dataclass(frozen=True)
class Check:
    """A question the gateway answers before it forwards: is this flow run, task run or
    artifact the requesting run's own (its run, its subflow runs and their task runs), is
    this task run new or its own, is this flow run a subflow of its own that has no
    deployment (`inline_flow_run`), is this deployment in a managed pool, did this run
    take this concurrency lease through the gateway (`lease`)?"""

    kind: CheckKind
    id: UUID


@dataclass(frozen=True)
class Decision:
    """An allowed request: the route it matched, the path and body to forward, and the
    checks to pass first."""

    route: str
    path: str
    query: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    checks: tuple[Check, ...] = ()
    #: A read: its body (a filter) is forwarded as sent, with its content type.
    read: bool = False


class Refusal(Exception):
    """A request the gateway refuses: the HTTP status and the message the run sees."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Request:
    """What a rule sees: the requesting run, the route's parameters, the parsed body."""

    run: UUID
    params: dict[str, Any]
    body: Any


Rule = Callable[[Request], tuple[Any, tuple[Check, ...]]]


@dataclass(frozen=True)
class Route:
    method: str
    template: str
    #: None for a read (forwarded as sent); else the rule that returns the body to
    #: forward and the checks to pass.
    rule: Rule | None = None
    parts: tuple[str, ...] = field(init=False, repr=False)
    #: Per part: None for a literal, else the parameter's name and kind ("uuid", "str").
    parameters: tuple[tuple[str, str] | None, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        parts = tuple(self.template[1:].split("/"))
        object.__setattr__(self, "parts", parts)
        object.__setattr__(self, "parameters", tuple(_parameter(part) for part in parts))

    @property
    def literals(self) -> int:
        return sum(not part.startswith("{") for part in self.parts)


_PARAM = re.compile(r"^\{(\w+)(?::(uuid|str))?\}$")


def _parameter(part: str) -> tuple[str, str] | None:
    """A template's part as a parameter (its name, and "uuid" or "str"); None for a
    literal part."""
    param = _PARAM.match(part)
    return None if param is None else (param.group(1), param.group(2) or "str")


def _match_parts(route: Route, segments: tuple[str, ...]) -> dict[str, Any] | None:
    if len(route.parts) != len(segments):
        return None
    params: dict[str, Any] = {}
    for part, parameter, segment in zip(route.parts, route.parameters, segments, strict=True):
        if parameter is None:
            if part != segment:
                return None
            continue
        if not segment:
            return None
        name, kind = parameter
        if kind == "uuid":
            try:
                params[name] = UUID(segment)
            except ValueError:
                return None
            if len(segment) != 36:  # the server's convertor: the 8-4-4-4-12 form only
                return None
        else:
            params[name] = segment
    return params


def match(reading: Reading) -> tuple[Route, dict[str, Any]]:
    """The one route a reading matches, and its parameters; `Refusal` when none does."""
    found = [
        (route, params)
        # Only the routes of its method and number of segments can match it.
        for route in _BY_SHAPE.get((reading.method, len(reading.segments)), ())
        if (params := _match_parts(route, reading.segments)) is not None
    ]
    if not found:
        raise Refusal(
            403,
            f"{reading.method} /api{reading.path} is not open to flow runs through the managed "
            "pool's API gateway: a flow run may read the workspace and change only its own "
            "flow run, subflow runs, task runs, logs and artifacts (see the security page)",
        )
    found.sort(key=lambda item: -item[0].literals)
    if len(found) > 1 and found[0][0].literals == found[1][0].literals:
        raise Refusal(403, f"{reading.method} /api{reading.path} matches more than one route")
    return found[0]


def _render(route: Route, params: dict[str, Any]) -> str:
    """The path forwarded: the route's template with the parameters as read."""
    rendered = []
    for part, parameter in zip(route.parts, route.parameters, strict=True):
        rendered.append(part if parameter is None else encode_segment(str(params[parameter[0]])))
    return "/" + "/".join(rendered)


def decide(reading: Reading, run: UUID, body: bytes) -> Decision:
    """The decision on one reading of a request by `run` with `body` (as sent)."""
    route, params = match(reading)
    path = _render(route, params)
    if route.rule is None:
        return Decision(route.template, path, reading.query, body or None, read=True)
    if reading.query:
        raise Refusal(400, f"{route.method} {route.template} takes no query string")
    parsed: Any = None
    if body:
        try:
            parsed = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise Refusal(400, f"the body of {route.method} {route.template} is not JSON") from exc
    forward, checks = route.rule(Request(run, params, parsed))
    sent = None if forward is None else json.dumps(forward, separators=(",", ":")).encode()
    return Decision(route.template, path, (), sent, tuple(dict.fromkeys(checks)))


# --- bodies ------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _SetState(_Body):
    state: StateCreate
    force: StrictBool = False


class _Resume(_Body):
    run_input: dict[str, Any] | None = None


class _Input(_Body):
    key: str = Field(min_length=1, max_length=1024)
    value: str
    sender: str | None = None


class _LeaseHolder(_Body):
    type: Literal["flow_run", "task_run"]
    id: UUID


class _IncrementV1(_Body):
    names: list[str] = Field(min_length=1, max_length=100)
    task_run_id: UUID


class _Increment(_Body):
    slots: int = Field(gt=0)
    names: list[str] = Field(min_length=1, max_length=100)
    mode: Literal["concurrency", "rate_limit"] = "concurrency"
    create_if_missing: bool | None = None


class _IncrementWithLease(_Body):
    slots: int = Field(gt=0)
    names: list[str] = Field(min_length=1, max_length=100)
    mode: Literal["concurrency", "rate_limit"] = "concurrency"
    lease_duration: float = Field(default=300, ge=60, le=86400)
    holder: _LeaseHolder | None = None


class _Decrement(_Body):
    slots: int = Field(gt=0)
    names: list[str] = Field(min_length=1, max_length=100)
    occupancy_seconds: float | None = Field(default=None, gt=0)
    create_if_missing: bool | None = None


class _DecrementWithLease(_Body):
    lease_id: UUID


class _Renew(_Body):
    lease_duration: float = Field(default=300, ge=60, le=86400)


def _error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ())) or "the body"
    return f"{where}: {first.get('msg')}"


def _fields(data: Any, allowed: Iterable[str], what: str) -> None:
    if not isinstance(data, dict):
        raise Refusal(422, f"{what}: the body must be a JSON object")
    extra = sorted(set(data) - set(allowed))
    if extra:
        raise Refusal(
            403,
            f"{what}: {', '.join(extra)} is not a field a flow run may set through the "
            f"managed pool's API gateway; it may set {', '.join(sorted(allowed))}",
        )


def _valid(model: type[BaseModel], data: Any, what: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise Refusal(422, f"{what}: {_error(exc)}") from exc


def _dump(model: BaseModel) -> Any:
    return model.model_dump(mode="json", exclude_unset=True)


#: The state names the managed worker gives a meaning to (a run waiting for a slot, a
#: run refused for the quota, a lost host's run, an infrastructure retry, which counts
#: against the tier's retries): the worker's to set, under any spelling.
_WORKERS_NAMES = {
    name.casefold(): name
    for name in (AWAITING_SLOT, QUOTA_EXHAUSTED, HOST_LOST, INFRASTRUCTURE_RETRY)
}


def _states(state: StateCreate | None, allowed: frozenset[StateType], what: str) -> None:
    if state is None:
        return
    reserved = _WORKERS_NAMES.get("".join((state.name or "").split()).casefold())
    if reserved is not None:
        raise Refusal(
            403,
            f"{what}: a state named {state.name!r} is the managed worker's to set "
            f"({reserved}); name the state otherwise",
        )
    if state.type not in allowed:
        raise Refusal(
            403,
            f"{what}: a {state.type.value} state is not one a flow run may propose through "
            "the managed pool's API gateway; it may propose "
            f"{', '.join(sorted(s.value for s in allowed))}",
        )
    details = state.state_details
    if details.deployment_concurrency_lease_id is not None:
        # The server releases the lease a state names: a deployment's slot is the
        # server's to give back, and its lease id can be read by anyone.
        raise Refusal(
            403,
            f"{what}: deployment_concurrency_lease_id is not a field a flow run may set; "
            "the server sets it",
        )
    if details.pause_reschedule:
        raise Refusal(
            403,
            f"{what}: suspending a flow run (pause_reschedule, suspend_flow_run) is not "
            "available on managed pools (a suspended run resumes in a second container); "
            "use pause_flow_run, which waits in the same container",
        )


#: Prefect's own serializers, the fields each may send, and the modules a field may name:
#: checking a serializer imports the modules it names (`picklelib`, `compressionlib`),
#: in the worker's process (the gateway's check, and every reader of the run's states).
_SERIALIZERS: dict[str, frozenset[str]] = {
    "pickle": frozenset({"type", "picklelib", "picklelib_version"}),
    "json": frozenset(
        {"type", "jsonlib", "object_encoder", "object_decoder", "dumps_kwargs", "loads_kwargs"}
    ),
    "compressed": frozenset({"type", "serializer", "compressionlib"}),
    "compressed/pickle": frozenset({"type", "serializer", "compressionlib"}),
    "compressed/json": frozenset({"type", "serializer", "compressionlib"}),
}
_NAMED: dict[str, frozenset[Any]] = {
    "picklelib": frozenset({"cloudpickle", "pickle"}),
    "jsonlib": frozenset({"json", "orjson"}),
    "compressionlib": frozenset({"lzma", "bz2", "zlib", "gzip"}),
    "object_encoder": frozenset({None, "prefect.serializers.prefect_json_object_encoder"}),
    "object_decoder": frozenset({None, "prefect.serializers.prefect_json_object_decoder"}),
}
#: A result's metadata is a few hundred bytes, three levels deep at most.
_DATA_MAX_BYTES = 16 * 1024
_DATA_MAX_DEPTH = 6


def _one_of(value: Any, allowed: Collection[Any]) -> bool:
    """Whether `value`, as sent (before anything validated it), is one of `allowed`: a
    list or an object never is."""
    return not isinstance(value, dict | list) and value in allowed


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _valid_with_data(model: type[BaseModel], body: Any, what: str) -> tuple[Any, Any]:
    """`body` validated as `model`, and the `data` of the state it holds, to forward
    exactly as sent (None for none). The data is checked first, as sent: validating a
    serializer imports the modules it names."""
    state = body.get("state") if isinstance(body, dict) else None
    data = _state_data(state, what) if isinstance(state, dict) else None
    return _valid(model, body, what), data


def _state_data(state: dict[str, Any], what: str) -> Any:
    """A state's `data`, forwarded only as Prefect's engine sends it: the metadata of a
    final state's result record, that Prefect's client reads back. Anything else is
    stored as given: a dict with a `storage_key` that does not parse as metadata breaks
    every read of the run's states (the worker's finish, which records the run's usage,
    among them, and the pool's poll for a scheduled run), and the server makes an
    artifact of any data, under the key its `artifact_key` names. Bounded in size and
    depth (a server fails to answer for data nested past about 250 levels, and then
    every read of the run fails), valid UTF-8 (a lone surrogate is stored and then
    breaks every read), and a serializer only as Prefect's own, naming only the modules
    they use."""
    data = state.get("data")
    if data is None:
        return None
    if _depth(data) > _DATA_MAX_DEPTH:
        raise Refusal(422, f"{what}: data nests deeper than a result's metadata does")
    try:
        size = len(json.dumps(data, ensure_ascii=False).encode("utf-8"))
    except UnicodeEncodeError:
        raise Refusal(422, f"{what}: data holds a string that is not valid UTF-8") from None
    if size > _DATA_MAX_BYTES:
        raise Refusal(
            413, f"{what}: data of {size} bytes is larger than a result's metadata may be"
        )
    fields = ", ".join(ResultRecordMetadata.model_fields)
    # Prefect's engine sends a result's metadata with a final state (`to_state_create`).
    if not _one_of(state.get("type"), TERMINAL_STATES):
        raise Refusal(
            422, f"{what}: a {state.get('type')} state carries no data; only a final state's result"
        )
    if not isinstance(data, dict) or "storage_key" not in data:
        raise Refusal(422, f"{what}: data must be a result record's metadata ({fields}) or null")
    extra = sorted(set(data) - set(ResultRecordMetadata.model_fields))
    if extra:
        raise Refusal(
            403,
            f"{what}: {', '.join(extra)} is not a field of a result record's metadata; it "
            f"may hold {fields}",
        )
    if data.get("serializer") is not None:
        _screen_serializer(data["serializer"], what)
    try:  # as Prefect's client reads it back
        ResultRecordMetadata.model_validate(data)
    except ValidationError as exc:
        raise Refusal(422, f"{what}: data: {_error(exc)}") from exc
    return data


def _screen_serializer(serializer: Any, what: str, inner: bool = False) -> None:
    kinds = ", ".join(_SERIALIZERS)
    if inner and serializer in ("pickle", "json"):
        return  # a compressed serializer's own, by name
    if not isinstance(serializer, dict) or not _one_of(serializer.get("type"), _SERIALIZERS):
        raise Refusal(
            422, f"{what}: data: a result's serializer must be one of Prefect's ({kinds})"
        )
    kind = serializer["type"]
    extra = sorted(set(serializer) - _SERIALIZERS[kind])
    if extra:
        raise Refusal(
            403, f"{what}: data: {', '.join(extra)} is not a field of Prefect's {kind!r} serializer"
        )
    for field_name, allowed in _NAMED.items():
        if field_name in serializer and not _one_of(serializer[field_name], allowed):
            names = ", ".join(sorted(str(name) for name in allowed if name is not None))
            raise Refusal(
                422,
                f"{what}: data: a result serializer's {field_name} {serializer[field_name]!r} is "
                f"not available on managed pools; use one of {names}",
            )
    for kwargs in ("dumps_kwargs", "loads_kwargs"):
        given = serializer.get(kwargs, {})
        if not isinstance(given, dict) or not all(
            isinstance(value, str | int | float | bool) or value is None for value in given.values()
        ):
            raise Refusal(422, f"{what}: data: a result serializer's {kwargs} must be plain values")
    if "serializer" in serializer:
        _screen_serializer(serializer["serializer"], what, inner=True)


def _with_data(body: Any, data: Any) -> Any:
    """`body` (a dumped model holding a `state`) with the state's data as checked."""
    if data is not None:
        body["state"]["data"] = data
    elif isinstance(body.get("state"), dict):
        body["state"].pop("data", None)
    return body


def _labels(labels: Any, what: str) -> None:
    for key in labels or {}:
        if str(key).lower().startswith(RESERVED_LABEL_PREFIXES):
            raise Refusal(
                403,
                f"{what}: the label {key!r} is Prefect's or the managed pool's to set; "
                "choose a key that does not start with "
                f"{', '.join(repr(p) for p in RESERVED_LABEL_PREFIXES)}",
            )


def _limit_names(names: list[str]) -> None:
    for name in names:
        if name.strip().lower().startswith(RESERVED_LIMIT_PREFIXES):
            raise Refusal(
                403,
                f"the concurrency limit {name!r} is the managed pool's or the server's "
                "(the workspace's run slots, a deployment's concurrency): only workers and "
                "the server take and give back its slots; use a limit of another name",
            )


_ALL_STATES = frozenset(StateType)
_SCHEDULED = frozenset({StateType.SCHEDULED})
#: The run's own flow run: what its engine proposes from start to end (its worker set
#: Pending; Scheduled would start a second container of the run).
_ROOT_STATES = _ALL_STATES - {StateType.SCHEDULED, StateType.PENDING}
_SUBFLOW_FIELDS = {
    "state",
    "name",
    "flow_id",
    "flow_version",
    "parameters",
    "context",
    "parent_task_run_id",
    "empirical_policy",
    "tags",
    "idempotency_key",
    "labels",
}
_FLOW_RUN_UPDATE_FIELDS = {"name", "flow_version", "parameters", "empirical_policy", "tags"}
_DEPLOYMENT_RUN_FIELDS = {
    "state",
    "name",
    "parameters",
    "enforce_parameter_schema",
    "context",
    "empirical_policy",
    "tags",
    "idempotency_key",
    "parent_task_run_id",
    "job_variables",
    "labels",
}
_LOG_FIELDS = {"name", "level", "message", "timestamp", "flow_run_id", "task_run_id"}
_ARTIFACT_FIELDS = {"key", "type", "description", "data", "metadata_", "flow_run_id", "task_run_id"}


# --- rules -------------------------------------------------------------------------


def _create_flow(request: Request) -> tuple[Any, tuple[Check, ...]]:
    _fields(request.body, {"name", "tags", "labels"}, "a flow")
    flow = _valid(FlowCreate, request.body, "a flow")
    _labels(flow.labels, "a flow")
    return _dump(flow), ()


def _create_subflow_run(request: Request) -> tuple[Any, tuple[Check, ...]]:
    what = "a subflow run"
    _fields(request.body, _SUBFLOW_FIELDS, what)
    created, data = _valid_with_data(FlowRunCreate, request.body, what)
    if created.parent_task_run_id is None:
        raise Refusal(
            403,
            "a flow run may create subflow runs of its own task runs only "
            "(parent_task_run_id); use run_deployment to start a deployment's run",
        )
    _states(created.state, _ALL_STATES - {StateType.SCHEDULED}, what)
    _labels(created.labels, what)
    return _with_data(_dump(created), data), (Check("task_run", created.parent_task_run_id),)


def _update_flow_run(request: Request) -> tuple[Any, tuple[Check, ...]]:
    what = "a flow run's update"
    _fields(request.body, _FLOW_RUN_UPDATE_FIELDS, what)
    update = _valid(FlowRunUpdate, request.body, what)
    return _dump(update), (Check("flow_run", request.params["id"]),)


def _set_flow_run_state(request: Request) -> tuple[Any, tuple[Check, ...]]:
    what = "a flow run's state"
    target = request.params["id"]
    proposal, data = _valid_with_data(_SetState, request.body, what)
    _states(proposal.state, _ROOT_STATES if target == request.run else _ALL_STATES, what)
    checks = [Check("flow_run", target)]
    if proposal.state.type in (StateType.SCHEDULED, StateType.PENDING):
        # Only a subflow run in the run's own process: a deployment's run would go back to
        # its pool's workers and run a second container of one attempt.
        checks.append(Check("inline_flow_run", target))
    return _with_data(_dump(proposal), data), tuple(checks)


def _resume(request: Request) -> tuple[Any, tuple[Check, ...]]:
    resume = _valid(_Resume, request.body or {}, "a resume")
    return _dump(resume), (Check("flow_run", request.params["id"]),)


def _create_input(request: Request) -> tuple[Any, tuple[Check, ...]]:
    created = _valid(_Input, request.body, "a flow run input")
    return _dump(created), (Check("flow_run", request.params["id"]),)


def _delete_input(request: Request) -> tuple[Any, tuple[Check, ...]]:
    if request.body is not None:
        raise Refusal(400, "deleting a flow run input takes no body")
    return None, (Check("flow_run", request.params["id"]),)


def _update_labels(request: Request) -> tuple[Any, tuple[Check, ...]]:
    what = "a flow run's labels"
    labels = request.body
    if not isinstance(labels, dict) or not all(
        isinstance(value, str | int | float | bool) for value in labels.values()
    ):
        raise Refusal(422, f"{what}: the body must be an object of strings, numbers or booleans")
    _labels(labels, what)
    return labels, (Check("flow_run", request.params["id"]),)


def _create_task_run(request: Request) -> tuple[Any, tuple[Check, ...]]:
    what = "a task run"
    created, data = _valid_with_data(TaskRunCreate, request.body, what)
    _states(created.state, _ALL_STATES, what)
    if created.flow_run_id is None:
        raise Refusal(403, f"{what}: flow_run_id must name a flow run of this run")
    _labels(created.labels, what)
    checks = [Check("flow_run", created.flow_run_id)]
    if created.id is not None:
        checks.append(Check("new_or_own_task_run", created.id))
    return _with_data(_dump(created), data), tuple(checks)


def _update_task_run(request: Request) -> tuple[Any, tuple[Check, ...]]:
    update = _valid(TaskRunUpdate, request.body, "a task run's update")
    return _dump(update), (Check("task_run", request.params["id"]),)


def _set_task_run_state(request: Request) -> tuple[Any, tuple[Check, ...]]:
    proposal, data = _valid_with_data(_SetState, request.body, "a task run's state")
    _states(proposal.state, _ALL_STATES, "a task run's state")
    return _with_data(_dump(proposal), data), (Check("task_run", request.params["id"]),)


def _create_deployment_run(request: Request) -> tuple[Any, tuple[Check, ...]]:
    what = "a deployment's run"
    _fields(request.body if request.body is not None else {}, _DEPLOYMENT_RUN_FIELDS, what)
    created, data = _valid_with_data(DeploymentFlowRunCreate, request.body or {}, what)
    _states(created.state, _SCHEDULED, what)
    _labels(created.labels, what)
    checks = [Check("managed_deployment", request.params["id"])]
    if created.parent_task_run_id is not None:
        checks.append(Check("task_run", created.parent_task_run_id))
    return _with_data(_dump(created), data), tuple(checks)


def _create_logs(request: Request) -> tuple[Any, tuple[Check, ...]]:
    entries = request.body
    if not isinstance(entries, list) or not entries:
        raise Refusal(422, "logs must be a non-empty list of log entries")
    logs, checks = [], []
    for entry in entries:
        _fields(entry, _LOG_FIELDS, "a log entry")
        log = _valid(LogCreate, entry, "a log entry")
        if log.flow_run_id is None:
            raise Refusal(403, "a log entry: flow_run_id must name a flow run of this run")
        checks.append(Check("flow_run", log.flow_run_id))
        if log.task_run_id is not None:
            checks.append(Check("task_run", log.task_run_id))
        logs.append(log.model_dump(mode="json"))
    return logs, tuple(checks)


def _create_artifact(request: Request) -> tuple[Any, tuple[Check, ...]]:
    what = "an artifact"
    _fields(request.body, _ARTIFACT_FIELDS, what)
    created = _valid(ArtifactCreate, request.body, what)
    if (created.key or "").lower().startswith(RESERVED_ARTIFACT_PREFIX):
        raise Refusal(
            403,
            f"artifact keys starting with {RESERVED_ARTIFACT_PREFIX!r} are the usage records "
            "the workers write; use another key",
        )
    if created.flow_run_id is None:
        raise Refusal(403, f"{what}: flow_run_id must name a flow run of this run")
    checks = [Check("flow_run", created.flow_run_id)]
    if created.task_run_id is not None:
        checks.append(Check("task_run", created.task_run_id))
    return _dump(created), tuple(checks)


def _update_artifact(request: Request) -> tuple[Any, tuple[Check, ...]]:
    update = _valid(ArtifactUpdate, request.body, "an artifact's update")
    return _dump(update), (Check("artifact", request.params["id"]),)


def _holder(holder: _LeaseHolder | None) -> tuple[Check, ...]:
    if holder is None:
        return ()
    return (Check("flow_run" if holder.type == "flow_run" else "task_run", holder.id),)


def _increment_v1(request: Request) -> tuple[Any, tuple[Check, ...]]:
    taken = _valid(_IncrementV1, request.body, "a tag concurrency slot")
    _limit_names(taken.names)
    return _dump(taken), (Check("task_run", taken.task_run_id),)


def _increment(request: Request) -> tuple[Any, tuple[Check, ...]]:
    taken = _valid(_Increment, request.body, "a concurrency slot")
    _limit_names(taken.names)
    return _dump(taken), ()


def _increment_with_lease(request: Request) -> tuple[Any, tuple[Check, ...]]:
    taken = _valid(_IncrementWithLease, request.body, "a concurrency lease")
    _limit_names(taken.names)
    return _dump(taken), _holder(taken.holder)


def _decrement(request: Request) -> tuple[Any, tuple[Check, ...]]:
    given = _valid(_Decrement, request.body, "a concurrency slot")
    _limit_names(given.names)
    return _dump(given), ()


def _decrement_with_lease(request: Request) -> tuple[Any, tuple[Check, ...]]:
    # Lease ids can be read (a deployment's is in its runs' states): a run gives back
    # only a lease it took through the gateway.
    given = _valid(_DecrementWithLease, request.body, "a concurrency lease")
    return _dump(given), (Check("lease", given.lease_id),)


def _renew(request: Request) -> tuple[Any, tuple[Check, ...]]:
    renewed = _valid(_Renew, request.body or {}, "a concurrency lease")
    return _dump(renewed), (Check("lease", request.params["lease_id"]),)


_READS = {
    "GET": """
        /health /version /hello /ready /csrf-token /admin/version /admin/storage
        /flows/{id:uuid} /flows/name/{name}
        /flow_runs/{id:uuid} /flow_runs/{id:uuid}/graph /flow_runs/{id:uuid}/graph-v2
        /flow_runs/{id:uuid}/input/{key} /flow_runs/{id:uuid}/logs/download
        /task_runs/{id:uuid} /flow_run_states/{id:uuid} /flow_run_states/
        /task_run_states/{id:uuid} /task_run_states/ /observed-states
        /deployments/{id:uuid} /deployments/name/{flow_name}/{deployment_name}
        /deployments/{id:uuid}/work_queue_check /deployments/{id:uuid}/schedules
        /saved_searches/{id:uuid} /concurrency_limits/{id:uuid} /concurrency_limits/tag/{tag}
        /v2/concurrency_limits/{id_or_name}
        /block_types/{id:uuid} /block_types/slug/{slug} /block_types/slug/{slug}/block_documents
        /block_types/slug/{slug}/block_documents/name/{block_document_name}
        /block_documents/{id:uuid} /block_schemas/{id:uuid} /block_schemas/checksum/{checksum}
        /block_capabilities/
        /work_pools/{name} /work_pools/{work_pool_name}/queues/{name}
        /work_queues/name/{name} /work_queues/{id:uuid} /work_queues/{id:uuid}/status
        /artifacts/{id:uuid} /artifacts/{key}/latest
        /variables/{id:uuid} /variables/name/{name:str}
        /events/filter/next
        /automations/{id:uuid} /automations/related-to/{resource_id:str}
        /ui/task_runs/{id:uuid}
    """,
    "POST": """
        /flows/count /flows/filter /flows/paginate
        /flow_runs/count /flow_runs/lateness /flow_runs/history /flow_runs/filter
        /flow_runs/paginate /flow_runs/{id:uuid}/input/filter
        /task_runs/count /task_runs/history /task_runs/filter /task_runs/paginate
        /deployments/filter /deployments/paginate /deployments/count
        /saved_searches/filter /logs/filter
        /concurrency_limits/filter /v2/concurrency_limits/filter
        /block_types/filter /block_documents/filter /block_documents/count /block_schemas/filter
        /work_pools/filter /work_pools/count /work_pools/{work_pool_name}/queues/filter
        /work_pools/{work_pool_name}/workers/filter /task_workers/filter /work_queues/filter
        /artifacts/filter /artifacts/latest/filter /artifacts/count /artifacts/latest/count
        /variables/filter /variables/count
        /events/filter /events/count-by/{countable}
        /automations/filter /automations/count
        /templates/validate /automations/templates/validate
        /ui/flows/count-deployments /ui/flows/next-runs /ui/flow_runs/history
        /ui/flow_runs/count-task-runs /ui/schemas/validate /ui/task_runs/dashboard/counts
        /ui/task_runs/count
    """,
}

_WRITES: dict[tuple[str, str], Rule] = {
    ("POST", "/flows/"): _create_flow,
    ("POST", "/flow_runs/"): _create_subflow_run,
    ("PATCH", "/flow_runs/{id:uuid}"): _update_flow_run,
    ("POST", "/flow_runs/{id:uuid}/set_state"): _set_flow_run_state,
    ("POST", "/flow_runs/{id:uuid}/resume"): _resume,
    ("POST", "/flow_runs/{id:uuid}/input"): _create_input,
    ("DELETE", "/flow_runs/{id:uuid}/input/{key}"): _delete_input,
    ("PATCH", "/flow_runs/{id:uuid}/labels"): _update_labels,
    ("POST", "/task_runs/"): _create_task_run,
    ("PATCH", "/task_runs/{id:uuid}"): _update_task_run,
    ("POST", "/task_runs/{id:uuid}/set_state"): _set_task_run_state,
    ("POST", "/deployments/{id:uuid}/create_flow_run"): _create_deployment_run,
    ("POST", "/logs/"): _create_logs,
    ("POST", "/artifacts/"): _create_artifact,
    ("PATCH", "/artifacts/{id:uuid}"): _update_artifact,
    ("POST", "/concurrency_limits/increment"): _increment_v1,
    ("POST", "/concurrency_limits/decrement"): _increment_v1,
    ("POST", "/v2/concurrency_limits/increment"): _increment,
    ("POST", "/v2/concurrency_limits/increment-with-lease"): _increment_with_lease,
    ("POST", "/v2/concurrency_limits/decrement"): _decrement,
    ("POST", "/v2/concurrency_limits/decrement-with-lease"): _decrement_with_lease,
    ("POST", "/v2/concurrency_limits/leases/{lease_id:uuid}/renew"): _renew,
}

#: The allow-list: every route a run's token may call.
ROUTES: tuple[Route, ...] = (
    *(Route(method, template) for method, text in _READS.items() for template in text.split()),
    *(Route(method, template, rule) for (method, template), rule in _WRITES.items()),
)
_BY_SHAPE: dict[tuple[str, int], tuple[Route, ...]] = {}
for _route in ROUTES:
    _shape = (_route.method, len(_route.parts))
    _BY_SHAPE[_shape] = (*_BY_SHAPE.get(_shape, ()), _route)
del _route, _shape
#: The route whose answer names a lease the run took (the gateway remembers it).
LEASE_ROUTE = "/v2/concurrency_limits/increment-with-lease"
LEASE_RELEASE_ROUTE = "/v2/concurrency_limits/decrement-with-lease"
#: The websockets a run may open (both need the 'prefect' subprotocol and its token).
WEBSOCKETS = {"/events/in": "filtered", "/events/out": "read"}
