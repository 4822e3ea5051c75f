"""What a run may say in an event: about itself only, no I/O.

Events reach automations, Prefect's cancellation observer and the server's task-run
recorder, which builds task runs from them (the task run's id from the event's resource,
its flow run from the payload's `task_run`, else from the related flow run). So an event
a run sends through `/events/in` must be *about* the run:

- its resource is one of the run's flow runs (a heartbeat, a pull step's), task runs (a task run's
  states, new or its own) or artifacts, or a resource outside Prefect's namespaces (the
  user's own events, `emit_event`), or an asset or the runner (Prefect's own events of a
  run), and then it must name one of the run's flow runs among its related resources;
- every flow run and task run it names is the run's own;
- the flow, deployment, work queue and work pool it names are those of a flow run it
  names (Prefect adds them from the run's context);
- it names no other resource of Prefect's (an automation, a block, a worker) but tags
  and assets, and it did not occur more than a minute from now (the recorder keeps the
  latest event's view of a task run);
- its name is not in a namespace of the server's or the managed pool's.

`check_event` returns the validated event to forward (serialised again, so what was
checked is what is sent) and the `Check`s the gateway answers from the API.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from uuid import UUID

from prefect.events.schemas.events import Event
from pydantic import ValidationError

from prefect_managed.gateway.routes import Check, Refusal

__all__ = ["ContextCheck", "check_event"]

#: Event names a run may send in Prefect's namespace, by prefix.
_PREFECT_EVENTS = (
    "prefect.task-run.",
    "prefect.flow-run.heartbeat",
    "prefect.flow-run.pull-step.",
    "prefect.artifact.created",
    "prefect.artifact.updated",
    "prefect.asset.",
    "prefect.runner.cancelled-flow-run",
)
#: What a run may say in Prefect's namespace about one of its flow runs.
_FLOW_RUN_EVENTS = ("prefect.flow-run.heartbeat", "prefect.flow-run.pull-step.")
_RESERVED = ("prefect.", "prefect-cloud.", "prefect-managed.")
#: Related resources in Prefect's namespaces an event may name freely.
_FREE_RELATED = ("prefect.tag.", "prefect.asset.")
#: How far in the future an event may say it occurred.
MAX_AHEAD_SECONDS = 60
#: Related resources that must be those of a flow run the event names: the kind in the
#: resource id, and the flow run's field.
CONTEXT_FIELDS = {
    "prefect.flow.": "flow_id",
    "prefect.deployment.": "deployment_id",
    "prefect.work-queue.": "work_queue_id",
    "prefect.work-pool.": "work_pool_id",
}


@dataclass(frozen=True)
class ContextCheck:
    """Some flow run the event names has `value` in its `field`."""

    field: str
    value: UUID


def _object_id(resource_id: str, prefix: str) -> UUID | None:
    if not resource_id.startswith(prefix):
        return None
    try:
        return UUID(resource_id[len(prefix) :])
    except ValueError:
        raise Refusal(403, f"the resource {resource_id!r} does not end in an id") from None


def check_event(
    data: Any,
) -> tuple[Event, tuple[Check, ...], set[UUID], tuple[ContextCheck, ...]]:
    """The event as validated, the ownership checks, the flow runs it names, and the
    context it claims. Raises `Refusal` with the reason it is dropped."""
    try:
        event = Event.model_validate(data)
    except ValidationError as exc:
        raise Refusal(422, f"not an event: {exc.errors()[0].get('msg')}") from exc
    name, resource = event.event, event.resource.id
    ahead = (event.occurred - datetime.now(timezone.utc)).total_seconds()
    if ahead > MAX_AHEAD_SECONDS:
        # The task-run recorder keeps the latest event's view of a task run: one from the
        # future would outlast every true event after it.
        raise Refusal(
            403,
            f"the event occurred {ahead:.0f} s from now; an event may be at most "
            f"{MAX_AHEAD_SECONDS} s ahead of the gateway's clock",
        )
    if name.startswith(_RESERVED) and not name.startswith(_PREFECT_EVENTS):
        raise Refusal(
            403,
            f"the event name {name!r} is not one a flow run may send (the server's and the "
            "managed pool's namespaces)",
        )

    checks: list[Check] = []
    flow_runs: set[UUID] = set()
    context: list[ContextCheck] = []
    for related in event.related:
        related_id = related.id
        if (run := _object_id(related_id, "prefect.flow-run.")) is not None:
            flow_runs.add(run)
            checks.append(Check("flow_run", run))
        elif (task_run := _object_id(related_id, "prefect.task-run.")) is not None:
            checks.append(Check("task_run", task_run))
        elif related_id.startswith(tuple(CONTEXT_FIELDS)):
            for prefix, field in CONTEXT_FIELDS.items():
                if (value := _object_id(related_id, prefix)) is not None:
                    context.append(ContextCheck(field, value))
        elif related_id.startswith(_RESERVED) and not related_id.startswith(_FREE_RELATED):
            # Automations act on related resources (an automation, a block, a worker...).
            raise Refusal(
                403,
                f"the related resource {related_id!r} is not one a flow run's event may name",
            )

    if (run := _object_id(resource, "prefect.flow-run.")) is not None:
        if name.startswith("prefect.") and not name.startswith(_FLOW_RUN_EVENTS):
            raise Refusal(403, f"a run may not send {name!r} about a flow run")
        flow_runs.add(run)
        checks.append(Check("flow_run", run))
    elif (task_run := _object_id(resource, "prefect.task-run.")) is not None:
        checks.extend(_task_run_event(event, task_run, flow_runs))
    elif (artifact := _object_id(resource, "prefect.artifact.")) is not None:
        checks.append(Check("artifact", artifact))
    elif resource.startswith(_RESERVED) and not resource.startswith(
        ("prefect.asset.", "prefect.runner.")
    ):
        raise Refusal(403, f"a run may not send events about {resource!r}")
    elif name.startswith("prefect.task-run.") or name.startswith("prefect.flow-run."):
        raise Refusal(403, f"{name!r} must be about a task run or flow run of this run")
    if not flow_runs:
        raise Refusal(403, "the event names none of this run's flow runs")
    return event, tuple(dict.fromkeys(checks)), flow_runs, tuple(dict.fromkeys(context))


def _task_run_event(event: Event, task_run: UUID, flow_runs: set[UUID]) -> list[Check]:
    """A task run's state: the recorder takes the task run's id from the resource and
    its flow run from the payload's `task_run` (else the related flow run)."""
    if not event.event.startswith("prefect.task-run."):
        raise Refusal(403, f"a run may not send {event.event!r} about a task run")
    body = event.payload.get("task_run") if isinstance(event.payload, dict) else None
    if not isinstance(body, dict):
        raise Refusal(403, "a task run's event must carry its task_run")
    if body.get("id") not in (None, str(task_run)):
        raise Refusal(403, "the payload's task run is not the event's resource")
    flow_run = body.get("flow_run_id")
    if flow_run is None:
        in_role = event.resource_in_role.get("flow-run")
        flow_run = in_role.id.removeprefix("prefect.flow-run.") if in_role else None
    try:
        owner = UUID(str(flow_run))
    except ValueError:
        raise Refusal(403, "a task run's event must name the task run's flow run") from None
    flow_runs.add(owner)
    return [Check("flow_run", owner), Check("new_or_own_task_run", task_run)]
