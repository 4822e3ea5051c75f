"""Infrastructure retries without Docker or a server: which endings are retried, how
attempts are counted, the records of attempts (keys, signatures, the month's totals), and
the order the worker keeps (the crashed attempt's slot released before the run is
scheduled again). The same behaviour is proven for real in test_faults.py.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any
from uuid import uuid4

import docker.errors
import httpx
import pytest
import requests.exceptions
from prefect.client.schemas import SetStateStatus
from prefect.states import Completed, Crashed, Failed, Paused, Pending, Running, Scheduled

import prefect_managed.worker as worker_module
from prefect_managed.exceptions import (
    GpuNotAvailable,
    ImageNotAllowed,
    ImageNotAvailable,
    InvalidJobVariable,
)
from prefect_managed.outcome import Ending
from prefect_managed.policy import Policy
from prefect_managed.retries import (
    ATTEMPT_LABEL,
    INFRASTRUCTURE_RETRY,
    InfrastructureCause,
    attempt_in,
    attempt_of,
    cause_of_ending,
    cause_of_start_failure,
    claim_message,
    infrastructure_retry_message,
    retries_done,
)
from prefect_managed.run_states import RunStates
from prefect_managed.usage import (
    MonthlyUsage,
    Outcome,
    UsageRecord,
    check_record,
    run_key,
    sign_record,
)
from prefect_managed.worker import ManagedWorker

KEY = b"k" * 32
FINISHED = datetime(2026, 11, 15, 12, tzinfo=timezone.utc)

# -- which endings are retried ---------------------------------------------------------


@pytest.mark.parametrize(
    ("how", "cause"),
    [
        (Ending.REMOVED, InfrastructureCause.REMOVED),
        (Ending.ENGINE_LOST, InfrastructureCause.ENGINE_LOST),
        (Ending.OUT_OF_MEMORY, None),
        (Ending.RUN_TIME, None),
        (Ending.EXITED, None),  # the flow's own exit, a failed install or pull step
    ],
)
def test_only_a_removed_container_or_a_lost_engine_that_crashed_the_run_is_retried(how, cause):
    assert cause_of_ending(how, Crashed(message="x")) is cause


@pytest.mark.parametrize(
    "final", [Completed(), Failed(message="the flow raised"), None, Running(), Pending()]
)
def test_a_run_that_did_not_end_crashed_is_never_retried(final):
    for how in Ending:
        assert cause_of_ending(how, final) is None


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (ImageNotAvailable("img:1", "pull access denied"), InfrastructureCause.IMAGE_NOT_AVAILABLE),
        (
            requests.exceptions.ConnectionError("connection refused"),
            InfrastructureCause.ENGINE_UNREACHABLE,
        ),
        (
            docker.errors.DockerException("Error while fetching server API version"),
            InfrastructureCause.ENGINE_UNREACHABLE,
        ),
        (docker.errors.APIError("bad mount"), None),
        (GpuNotAvailable("gpu", 1, "could not select device driver"), None),
        (InvalidJobVariable("mem_limit", "lots", "use Docker's units"), None),
        (ImageNotAllowed("python:3.12", ["prefect-managed-runtime:*"]), None),
        (RuntimeError("anything else"), None),
    ],
)
def test_a_container_that_could_not_start_is_retried_only_for_the_infrastructure(error, cause):
    assert cause_of_start_failure(error) is cause


# -- counting attempts -----------------------------------------------------------------


def test_attempts_are_counted_from_the_distinctive_states_of_the_history():
    history = [
        Scheduled(),
        Pending(),
        Running(),
        Crashed(message="removed"),
        Scheduled(name=INFRASTRUCTURE_RETRY),
        Scheduled(name="AwaitingConcurrencySlot"),
        Pending(),
        Running(),
        Crashed(message="removed"),
        Scheduled(name=INFRASTRUCTURE_RETRY),
        Scheduled(name="AwaitingRetry"),  # Prefect's own flow retries do not count
    ]
    assert retries_done(history) == 2
    assert retries_done([]) == 0


def test_every_start_of_a_run_is_a_new_attempt():
    """A container's attempt: how many times a worker has taken the run to start it
    (Prefect's Pending after a state that is not Pending), whoever made it due again;
    never what happens within a start, nor a managed worker's claim."""
    start = [Pending(), Pending(name="Submitting")]  # Prefect's worker submitting it
    first = [Scheduled(), *start, Running()]
    assert attempt_in([]) == 1
    assert attempt_in([Scheduled()]) == 1
    assert attempt_in(first) == 1
    # Prefect's own flow retries stay within one start, as a pause does.
    assert attempt_in([*first, Scheduled(name="AwaitingRetry"), Running(), Completed()]) == 1
    assert attempt_in([*first, Paused(), Running(), Completed()]) == 1
    # Waiting for a slot: claims (a managed worker's Pending) start nothing.
    claim = Pending(message=claim_message("0" * 32))
    waited = [Scheduled(), claim, Scheduled(name="AwaitingConcurrencySlot"), *start, Running()]
    assert attempt_in(waited) == 1
    # An infrastructure retry, as before.
    crashed = [*first, Crashed(message="removed"), Scheduled(name=INFRASTRUCTURE_RETRY)]
    assert attempt_in(crashed) == 1  # not started again yet
    assert attempt_in([*crashed, *start, Running()]) == 2
    # `prefect flow-run retry` or the UI's Retry on a finished run, twice.
    retried = [*first, Completed(), Scheduled(message="Retried via CLI"), *start, Running()]
    assert attempt_in(retried) == 2
    assert attempt_in([*retried, Failed(), Scheduled(name="AwaitingRetry"), *start]) == 3
    # A run made due again while its container still runs (its in-process retry turned
    # into one a poll returns), started by another host: a new attempt too.
    hijacked = [*first, Scheduled(name="AwaitingRetry"), *start, Running()]
    assert attempt_in(hijacked) == 2
    # A claim on a run that had ended, replaced by a full deployment limit's state and
    # the ending put back: not a start.
    put_back = [*first, Completed(), Scheduled(name="AwaitingConcurrencySlot"), Completed()]
    assert attempt_in(put_back) == 1
    # A suspended run resumed starts in a new container.
    suspended = [*first, Paused(name="Suspended"), Scheduled(name="Resuming"), *start]
    assert attempt_in(suspended) == 2


@pytest.mark.parametrize(
    ("labels", "attempt"),
    [({}, 1), ({ATTEMPT_LABEL: "1"}, 1), ({ATTEMPT_LABEL: "3"}, 3), ({ATTEMPT_LABEL: "x"}, 1)],
)
def test_a_container_says_which_attempt_it_ran(labels, attempt):
    assert attempt_of(labels) == attempt


def test_the_retry_message_says_why_and_which_attempt():
    message = infrastructure_retry_message(InfrastructureCause.REMOVED, 2, 1, "team")
    assert "infrastructure reason: its container was removed from outside the worker" in message
    assert "attempt 2 of at most 2" in message
    assert "infrastructure_retries is 1" in message


# -- records of attempts ---------------------------------------------------------------


def _record(attempt: int = 1, flow_run_id=None, minutes: float = 3) -> UsageRecord:
    return UsageRecord.from_timestamps(
        FINISHED - timedelta(minutes=minutes),
        FINISHED,
        flow_run_id=flow_run_id or uuid4(),
        flow_run_name="run",
        workspace="acme",
        tier="free",
        pool="managed",
        image="runtime:1",
        outcome=Outcome.CRASHED,
        attempt=attempt,
    )


def test_the_first_attempt_keeps_the_runs_key_and_later_ones_add_their_number():
    run = uuid4()
    assert run_key("acme", "2026-11", run) == f"usage-acme-202611-run-{run}"
    assert run_key("acme", "2026-11", run, 1) == f"usage-acme-202611-run-{run}"
    assert run_key("acme", "2026-11", run, 2) == f"usage-acme-202611-run-{run}-attempt-2"


def test_a_signed_record_of_a_later_attempt_verifies_under_its_own_key_only():
    record = _record(attempt=2)
    body = record.model_dump_json()
    own = run_key("acme", "2026-11", record.flow_run_id, 2)
    assert check_record(KEY, "acme", "2026-11", own, body, sign_record(KEY, own, body)) == record
    for other in (1, 3):
        key = run_key("acme", "2026-11", record.flow_run_id, other)
        # Signed for the other key: the signature holds, the key does not match the record.
        checked = check_record(KEY, "acme", "2026-11", key, body, sign_record(KEY, key, body))
        assert "its record is of attempt 2, another than its key's" == checked
        # Moved there with its own signature: it does not verify.
        checked = check_record(KEY, "acme", "2026-11", key, body, sign_record(KEY, own, body))
        assert "signature does not verify" in str(checked)


def test_a_record_written_before_attempts_existed_still_verifies_as_attempt_1():
    record = _record()
    old_body = record.model_dump_json(exclude={"attempt"})
    assert '"attempt"' not in old_body
    key = run_key("acme", "2026-11", record.flow_run_id)
    checked = check_record(KEY, "acme", "2026-11", key, old_body, sign_record(KEY, key, old_body))
    assert isinstance(checked, UsageRecord) and checked.attempt == 1


def test_the_month_counts_every_attempt_once_and_the_run_once():
    run = uuid4()
    usage = MonthlyUsage("acme", "2026-11")
    assert usage.add(_record(1, run, minutes=3))
    assert usage.add(_record(2, run, minutes=2))
    assert not usage.add(_record(2, run, minutes=2))  # the same attempt again
    assert usage.add(_record(1, minutes=1))  # another run
    assert usage.minutes == 6
    assert usage.runs == 2
    assert len(usage.records) == 3


def test_a_record_has_at_least_attempt_1():
    with pytest.raises(ValueError):
        _record(attempt=0)


# -- rescheduling through Prefect's client ------------------------------------------------


class FakeClient:
    """Stands in for PrefectClient: a run's current state and its history."""

    def __init__(self, current, history, status=SetStateStatus.ACCEPT, calls=None) -> None:
        self.current = current
        self.history = history
        self.status = status
        self.set_states: list[Any] = []
        self.calls = calls if calls is not None else []

    async def read_flow_run(self, flow_run_id):
        return SimpleNamespace(state=self.current)

    async def read_flow_run_states(self, flow_run_id):
        return list(self.history)

    async def set_flow_run_state(self, flow_run_id, state, force=False):
        self.calls.append("scheduled")
        self.set_states.append((state, force))
        return SimpleNamespace(status=self.status, details=SimpleNamespace(reason="refused"))


def _states(client: FakeClient, logger: logging.Logger) -> RunStates:
    async def propose_crashed(flow_run, message):  # not used here
        raise AssertionError("not expected")

    return RunStates(client, lambda flow_run: logger, propose_crashed, lambda: None)  # type: ignore[arg-type]


def _retry(client: FakeClient, retries: int, caplog) -> int | None:
    logger = logging.getLogger("tests.retries")
    caplog.set_level(logging.INFO, logger="tests.retries")
    run = SimpleNamespace(id=uuid4())
    return asyncio.run(
        _states(client, logger).retry_for_infrastructure(
            run,  # type: ignore[arg-type]
            InfrastructureCause.REMOVED,
            retries,
            "team",
        )
    )


def test_a_crashed_run_is_scheduled_again_with_the_distinctive_state_and_a_log_line(caplog):
    client = FakeClient(Crashed(message="removed"), [Running(), Crashed(message="removed")])
    assert _retry(client, 1, caplog) == 2
    ((state, force),) = client.set_states
    assert state.is_scheduled() and state.name == INFRASTRUCTURE_RETRY
    assert "attempt 2 of at most 2" in state.message
    assert state.state_details.scheduled_time is not None
    assert not force  # Prefect's orchestration allows a deployment's Crashed run to be rescheduled
    assert any("attempt 2 of at most 2" in r.getMessage() for r in caplog.records)


def test_a_run_out_of_retries_is_left_crashed_saying_so(caplog):
    history = [Crashed(), Scheduled(name=INFRASTRUCTURE_RETRY), Crashed()]
    client = FakeClient(Crashed(message="removed"), history)
    assert _retry(client, 1, caplog) is None
    assert client.set_states == []
    assert any("Attempt 2 was its last" in r.getMessage() for r in caplog.records)


def test_with_no_retries_nothing_is_scheduled_or_said(caplog):
    client = FakeClient(Crashed(message="removed"), [Crashed()])
    assert _retry(client, 0, caplog) is None
    assert client.set_states == []
    assert not caplog.records


@pytest.mark.parametrize(
    "current", [Completed(), Failed(), Scheduled(name=INFRASTRUCTURE_RETRY), Running()]
)
def test_a_run_that_is_not_crashed_now_is_not_scheduled_again(current, caplog):
    client = FakeClient(current, [Crashed()])
    assert _retry(client, 3, caplog) is None
    assert client.set_states == []


def test_a_refused_reschedule_is_logged_and_not_counted(caplog):
    client = FakeClient(Crashed(), [Crashed()], status=SetStateStatus.ABORT)
    assert _retry(client, 1, caplog) is None
    assert any("could not be scheduled again" in r.getMessage() for r in caplog.records)


# -- the worker's order: slot released, then scheduled again -------------------------------


class OrderedSlots:
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    async def release(self, flow_run_id) -> None:
        self.calls.append("released")


@pytest.fixture
def worker(monkeypatch) -> ManagedWorker:
    policy = Policy.model_validate(
        {"workspace": {"tier": "team"}, "tiers": {"team": {"infrastructure_retries": 1}}}
    )
    monkeypatch.setattr(worker_module, "get_policy", lambda: policy)
    return ManagedWorker(work_pool_name="unit-pool", name="unit-worker")


def test_the_worker_releases_the_crashed_attempts_slot_before_scheduling_it_again(worker, caplog):
    calls: list[str] = []
    client = FakeClient(Crashed(message="removed"), [Crashed()], calls=calls)
    worker._slots = OrderedSlots(calls)  # type: ignore[assignment]
    worker._states = _states(client, logging.getLogger("tests.retries"))
    run = SimpleNamespace(id=uuid4())
    worker._note_infrastructure_crash(run, Ending.REMOVED, Crashed(message="removed"))  # type: ignore[arg-type]

    asyncio.run(worker._retry_infrastructure_crash(run))  # type: ignore[arg-type]

    assert calls == ["released", "scheduled"]
    assert run.id not in worker._infrastructure_crashes
    asyncio.run(worker._retry_infrastructure_crash(run))  # type: ignore[arg-type]
    assert calls == ["released", "scheduled"]  # once per crash


@pytest.mark.parametrize(
    ("how", "final"),
    [
        (Ending.OUT_OF_MEMORY, Crashed()),
        (Ending.RUN_TIME, Crashed()),
        (Ending.EXITED, Crashed()),
        (Ending.REMOVED, Failed()),
        (Ending.ENGINE_LOST, Completed()),
    ],
)
def test_the_worker_schedules_nothing_for_a_crash_that_is_not_the_infrastructures(
    worker, how, final
):
    calls: list[str] = []
    worker._slots = OrderedSlots(calls)  # type: ignore[assignment]
    worker._states = _states(FakeClient(final, [], calls=calls), logging.getLogger("t"))
    run = SimpleNamespace(id=uuid4())
    worker._note_infrastructure_crash(run, how, final)  # type: ignore[arg-type]
    asyncio.run(worker._retry_infrastructure_crash(run))  # type: ignore[arg-type]
    assert calls == []


def _unparsable_history() -> Exception:
    """What Prefect's client raises for a state whose data does not parse as the result
    metadata it claims to be (a flow run could once store one through the gateway)."""
    from prefect.client.schemas.objects import State
    from pydantic import ValidationError

    try:
        State.model_validate({"id": str(uuid4()), "type": "RUNNING", "data": {"storage_key": 1}})
    except ValidationError as error:
        return error
    raise AssertionError("Prefect's State now reads that data")


@pytest.mark.parametrize(
    "error",
    [httpx.ConnectError("the Prefect API is down"), _unparsable_history()],
    ids=["api-away", "history-unparsable"],
)
def test_a_container_is_not_started_under_a_guessed_attempt(worker, monkeypatch, caplog, error):
    """The history unread (the API away, or a state in it that does not parse): no
    container is labelled with a guess, which might be an earlier attempt's number (its
    record would be taken for that one's); at the finish the container is taken for the
    latest attempt, so its run is finished and recorded."""

    class Away:
        async def read_flow_run_states(self, flow_run_id: Any) -> list:
            raise error

    monkeypatch.setattr(ManagedWorker, "client", property(lambda self: Away()))
    run = SimpleNamespace(id=uuid4())
    with pytest.raises(RuntimeError, match=f"state history of flow run {run.id}.*not started"):
        asyncio.run(worker._attempt(run, to_start=True))  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING):
        assert asyncio.run(worker._attempt(run)) == 1  # type: ignore[arg-type]
    assert "taken for the run's latest attempt" in caplog.text


@pytest.mark.parametrize("unreadable", ["history", "state"])
def test_a_run_whose_states_do_not_parse_is_still_recorded_and_its_container_removed(
    worker, monkeypatch, caplog, unreadable
):
    """What the API holds for a run may not parse (a state whose data claims to be result
    metadata and is not, stored before the gateway refused it): no later reconciliation
    would change that, so the container's usage is recorded from the container and the
    container removed, rather than kept and never recorded."""
    from prefect_managed.containers import Watch
    from prefect_managed.outcome import ContainerReport, Outcome

    finished = datetime.now(timezone.utc)
    report = ContainerReport(
        id="c1",
        name="c1",
        image="i",
        labels={"prefect-managed.attempt": "1"},
        started_at=finished - timedelta(seconds=30),
        finished_at=finished,
        exit_code=0,
    )
    calls: list[str] = []

    class Containers:
        async def inspect(self, container_id: str) -> ContainerReport:
            return report

        async def remove(self, container_id: str) -> None:
            calls.append(f"remove {container_id}")

    class Accounting:
        async def record(self, flow_run: Any, seen: Any, meter: Any, outcome: Any, pool: str):
            calls.append(f"record {outcome.value}")

    class Unparsable:
        async def read_flow_run_states(self, flow_run_id: Any) -> list:
            if unreadable == "history":
                raise _unparsable_history()
            return [Pending(), Running()]

        async def request(self, method: str, path: str, **kwargs: Any) -> None:
            state = kwargs["json"]["state"]
            calls.append(f"{method} {path.format(**kwargs['path_params'])} {state['type']}")

    async def settle(*args: Any) -> None:
        raise _unparsable_history()

    monkeypatch.setattr(ManagedWorker, "client", property(lambda self: Unparsable()))
    monkeypatch.setattr(worker, "_settle", settle)
    worker._containers = Containers()  # type: ignore[assignment]
    worker._accounting = Accounting()  # type: ignore[assignment]
    worker._states = object()  # type: ignore[assignment]
    run = SimpleNamespace(id=uuid4())
    with caplog.at_level(logging.WARNING):
        assert asyncio.run(worker._finish(run, Watch("c1", report=report))) is report  # type: ignore[arg-type]
    assert calls == [
        f"POST /flow_runs/{run.id}/set_state CRASHED",  # not left running, container gone
        f"record {Outcome.CRASHED.value}",
        "remove c1",
    ]
    assert f"Could not settle the state of flow run {run.id}" in caplog.text


@pytest.mark.parametrize(
    "error",
    [
        httpx.ConnectError("the Prefect API is down"),
        requests.exceptions.ConnectionError("the Docker engine is away"),
        RuntimeError("anything else"),
    ],
    ids=["api-away", "docker-away", "other"],
)
def test_a_run_whose_state_is_unsettled_for_a_passing_reason_keeps_its_container(
    worker, monkeypatch, error
):
    """The API or the engine away, or any error but an unreadable or deleted run: the
    container is kept (not recorded nor removed) and finished at a later reconciliation,
    as before."""
    from prefect_managed.containers import Watch
    from prefect_managed.outcome import ContainerReport

    report = ContainerReport(id="c1", name="c1", image="i", exit_code=0)
    calls: list[str] = []

    class Containers:
        async def inspect(self, container_id: str) -> ContainerReport:
            return report

        async def remove(self, container_id: str) -> None:
            calls.append("remove")

    async def away(*args: Any) -> None:
        raise error

    async def latest(*args: Any) -> bool:
        return False

    monkeypatch.setattr(worker, "_settle", away)
    monkeypatch.setattr(worker, "_of_earlier_attempt", latest)
    worker._containers = Containers()  # type: ignore[assignment]
    worker._accounting = object()  # type: ignore[assignment]
    worker._states = object()  # type: ignore[assignment]
    with pytest.raises(type(error)):
        asyncio.run(worker._finish(SimpleNamespace(id=uuid4()), Watch("c1", report=report)))  # type: ignore[arg-type]
    assert calls == []


def test_a_left_behind_container_whose_run_cannot_be_read_is_passed_over(
    worker, monkeypatch, caplog
):
    """The takeover reads each left-behind container's run: one that cannot be read (its
    state does not parse, the API hiccups) is passed over until the next reconciliation,
    never stopping the pass for the other containers; one of another server is not ours."""
    from prefect.exceptions import ObjectNotFound

    from prefect_managed.outcome import ContainerReport

    unreadable, foreign, fine = uuid4(), uuid4(), uuid4()

    class Client:
        async def read_flow_run(self, flow_run_id: Any) -> Any:
            if flow_run_id == unreadable:
                raise _unparsable_history()
            if flow_run_id == foreign:
                raise ObjectNotFound(http_exc=Exception("404"))
            return SimpleNamespace(id=flow_run_id)

    monkeypatch.setattr(ManagedWorker, "client", property(lambda self: Client()))

    def left(run: Any) -> ContainerReport:
        labels = {"io.prefect.flow-run-id": str(run)}
        return ContainerReport(id=str(run), name=f"c-{run}", image="i", labels=labels)

    with caplog.at_level(logging.WARNING):
        assert asyncio.run(worker._run_of(left(unreadable))) is None
        assert asyncio.run(worker._run_of(left(foreign))) is None
        assert asyncio.run(worker._run_of(left(fine))).id == fine
    assert f"Could not read flow run {unreadable} of container c-{unreadable}" in caplog.text
    assert str(foreign) not in caplog.text
