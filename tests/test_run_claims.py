"""A state the worker sets on a run from what its poll read never replaces what another
host, the user or the run did since (on a real Prefect server, no Docker).

Two hosts poll the same pool. Between one host's poll and its marking a run as waiting
for a slot (or failing it for the quota), the other host may have taken the run, run it,
or the user cancelled it. Prefect's server guards only Scheduled → Pending; any other
state is set whatever the run's current one, and Pending itself is accepted from
Completed, Failed and Crashed. So the worker first checks the run is still as polled
(`RunStates.unchanged`), then takes it as Prefect's workers do (`_claim`: an ending it
would replace is put back), and only then sets its state (a cancel made in between
wins). The worker's part (which runs it checks, what it releases) is in
tests/test_worker_logic.py; two hosts on one pool in tests/test_topology.py.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.states import Cancelling, Completed, Crashed, Failed, Pending, Running, Scheduled

from prefect_managed.run_states import AWAITING_SLOT, QUOTA_EXHAUSTED, RunStates

_LOGGER = logging.getLogger("test.run_claims")

# What happened to a polled run before the worker acts on it, as the state proposals
# another worker, the engine in its container or the UI makes.
SINCE_THE_POLL = {
    "another host took it": [Pending()],
    "another host runs it": [Pending(), Running()],
    "another host ran it to completion": [Pending(), Running(), Completed()],
    "it failed on another host": [Pending(), Running(), Failed(message="the flow raised")],
    "it crashed on another host": [Pending(), Running(), Crashed(message="killed")],
    "it is being cancelled on another host": [Pending(), Running(), Cancelling()],
    "the user cancelled it while it waited": [Cancelling()],  # the server makes it Cancelled
}
# The moves the server's guard on Pending stops; after the others (a run that ended),
# the claim is taken back and the ending put back.
GUARDED_BY_THE_SERVER = {
    "another host took it",
    "another host runs it",
    "it is being cancelled on another host",
    "the user cancelled it while it waited",
}


async def _deployment(client) -> uuid.UUID:
    flow_id = await client.create_flow_from_name(f"claims-{uuid.uuid4().hex[:6]}")
    return await client.create_deployment(flow_id=flow_id, name="claims")


def _states(client, kind: type[RunStates] = RunStates) -> RunStates:
    async def propose_crashed(flow_run, message):  # not used by these paths
        raise AssertionError("not expected")

    return kind(client, lambda flow_run: _LOGGER, propose_crashed, lambda: None)


async def _act(states: RunStates, flow_run, action: str, checked: bool) -> None:
    if checked and flow_run.id not in await states.unchanged([flow_run]):
        return
    if action == "mark":
        await states.mark_awaiting_slot(
            flow_run, flow_run.expected_start_time, "Waiting for a concurrency slot."
        )
    else:
        await states.refuse(flow_run, QUOTA_EXHAUSTED, "The quota is used up.")


async def _scenario(moves: list, action: str, checked: bool) -> dict:
    async with get_client() as client:
        deployment = await _deployment(client)
        polled = await client.create_flow_run_from_deployment(deployment)
        for state in moves:
            result = await client.set_flow_run_state(polled.id, state)
            assert result.status.value in {"ACCEPT", "REJECT"}, result.details
        before = (await client.read_flow_run(polled.id)).state
        await _act(_states(client), polled, action, checked)
        after = (await client.read_flow_run(polled.id)).state
        history = await client.read_flow_run_states(polled.id)
        await client.delete_deployment(deployment)
    return {"before": before, "after": after, "states": len(history)}


@pytest.mark.parametrize("action", ["mark", "refuse"])
@pytest.mark.parametrize("since", list(SINCE_THE_POLL))
def test_a_run_that_moved_since_the_poll_is_left_as_it_is(prefect_server, since, action):
    moves = SINCE_THE_POLL[since]
    seen = asyncio.run(_scenario(moves, action, checked=True))
    assert seen["after"].id == seen["before"].id, (seen["before"].name, seen["after"].name)
    assert seen["states"] == 1 + len(moves)  # no state of the worker's in between
    if since.startswith("the user cancelled"):
        assert seen["after"].type.value == "CANCELLED"


@pytest.mark.parametrize("action", ["mark", "refuse"])
@pytest.mark.parametrize("since", list(SINCE_THE_POLL))
def test_the_claim_alone_leaves_a_run_that_moved_as_it_is(prefect_server, since, action):
    """The check of `unchanged` is one read: a run that moves between it and the claim
    is left to the server's guard on Pending, or, when it ended meanwhile (Prefect takes
    Pending from a final state), has its ending put back."""
    seen = asyncio.run(_scenario(SINCE_THE_POLL[since], action, checked=False))
    before, after = seen["before"], seen["after"]
    assert (after.type, after.name, after.message) == (before.type, before.name, before.message)
    if since in GUARDED_BY_THE_SERVER:
        assert after.id == before.id
    else:  # the claim, then the ending again
        assert seen["states"] == 1 + len(SINCE_THE_POLL[since]) + 2


@pytest.mark.parametrize("action", ["mark", "refuse"])
def test_a_cancel_between_the_claim_and_the_state_ends_the_run_cancelled(prefect_server, action):
    """The user cancels a run the worker has just taken to mark or refuse it: the
    cancel wins, and the run, which has no infrastructure, ends Cancelled (not
    Cancelling for good, not back in the queue)."""

    class CancelledMeanwhile(RunStates):
        async def _claim(self, flow_run, token):
            claimed = await super()._claim(flow_run, token)
            await self._client.set_flow_run_state(flow_run.id, Cancelling())  # the UI's
            return claimed

    async def scenario():
        async with get_client() as client:
            deployment = await _deployment(client)
            polled = await client.create_flow_run_from_deployment(deployment)
            states = _states(client, CancelledMeanwhile)
            await _act(states, polled, action, checked=True)
            history = [s.type.value for s in await client.read_flow_run_states(polled.id)]
            await client.delete_deployment(deployment)
        return history

    assert asyncio.run(scenario()) == ["SCHEDULED", "PENDING", "CANCELLING", "CANCELLED"]


def test_an_ending_whose_put_back_failed_once_is_never_queued_again(prefect_server):
    """The put-back of a run that ended on another host fails (the API away for a
    moment): the claim's release puts the ending back, never the run in the queue,
    which would run it a second time."""

    class AwayOnce(RunStates):
        failed = False

        async def _put_back(self, flow_run, made):
            if not self.failed:
                self.failed = True
                raise httpx.ConnectError("the Prefect API is away")
            return await super()._put_back(flow_run, made)

    async def scenario():
        async with get_client() as client:
            deployment = await _deployment(client)
            polled = await client.create_flow_run_from_deployment(deployment)
            for state in SINCE_THE_POLL["another host ran it to completion"]:
                await client.set_flow_run_state(polled.id, state)
            states = _states(client, AwayOnce)
            with pytest.raises(httpx.ConnectError):
                await _act(states, polled, "mark", checked=False)
            history = [s.type.value for s in await client.read_flow_run_states(polled.id)]
            await client.delete_deployment(deployment)
        return history

    assert asyncio.run(scenario())[-3:] == ["COMPLETED", "PENDING", "COMPLETED"]


COMPRESSED_JSON = {
    "type": "compressed",
    "serializer": {
        "type": "json",
        "jsonlib": "json",
        "object_encoder": "prefect.serializers.prefect_json_object_encoder",
        "object_decoder": "prefect.serializers.prefect_json_object_decoder",
        "dumps_kwargs": {},
        "loads_kwargs": {},
    },
    "compressionlib": "lzma",
}


@pytest.mark.parametrize(
    "serializer", [{"type": "pickle"}, COMPRESSED_JSON], ids=["pickle", "compressed"]
)
def test_an_ending_put_back_keeps_its_stored_result(prefect_server, serializer):
    """A run that failed on another host after the check, with its result stored: the
    claim's put-back sets the same Failed state, the reference to the stored result
    included (Prefect's client would drop it), with its serializer's own fields (a
    compressed result's reference without them no longer reads back)."""
    stored = {
        "storage_key": "/results/the-exception",
        "expiration": None,
        "serializer": serializer,
        "prefect_version": "3.9.1",
        "storage_block_id": None,
    }

    async def scenario():
        async with get_client() as client:
            deployment = await _deployment(client)
            polled = await client.create_flow_run_from_deployment(deployment)
            for state in (Pending(), Running()):
                await client.set_flow_run_state(polled.id, state)
            failed = {"type": "FAILED", "name": "Failed", "message": "raised", "data": stored}
            response = await client.request(
                "POST",
                "/flow_runs/{id}/set_state",
                path_params={"id": polled.id},
                json={"state": failed, "force": False},
            )
            response.raise_for_status()
            before = (await client.read_flow_run(polled.id)).state
            await _act(_states(client), polled, "mark", checked=False)
            history = await client.read_flow_run_states(polled.id)
            response = await client.request(
                "GET", "/flow_run_states/", params={"flow_run_id": str(polled.id)}
            )
            response.raise_for_status()
            await client.delete_deployment(deployment)
        return before, history, response.json()

    before, history, raw = asyncio.run(scenario())
    assert [s.type.value for s in history[-3:]] == ["FAILED", "PENDING", "FAILED"]
    after = history[-1]
    assert (after.name, after.message) == (before.name, before.message)
    assert after.data.storage_key == stored["storage_key"]
    assert [state["data"] for state in raw if state["id"] == str(after.id)] == [stored]


def test_a_run_still_as_polled_waits_in_its_place_or_is_refused(prefect_server):
    # due in a minute: Prefect's server renames a run due over 15 s ago Late
    due = datetime.now(timezone.utc) + timedelta(minutes=1)

    async def scenario() -> dict:
        async with get_client() as client:
            deployment = await _deployment(client)
            waiting, refused = [
                await client.create_flow_run_from_deployment(
                    deployment, state=Scheduled(scheduled_time=due)
                )
                for _ in range(2)
            ]
            states = _states(client)
            assert await states.unchanged([waiting, refused]) == {waiting.id, refused.id}
            await _act(states, waiting, "mark", checked=True)
            await _act(states, refused, "refuse", checked=True)
            seen = {
                "waiting": (await client.read_flow_run(waiting.id)).state,
                "refused": (await client.read_flow_run(refused.id)).state,
                "history": [s.name for s in await client.read_flow_run_states(waiting.id)],
            }
            await client.delete_deployment(deployment)
        return seen

    seen = asyncio.run(scenario())
    waiting = seen["waiting"]
    assert (waiting.type.value, waiting.name) == ("SCHEDULED", AWAITING_SLOT)
    # its place in the queue kept: the time it was due, not the time it was marked
    assert abs((waiting.state_details.scheduled_time - due).total_seconds()) < 1
    assert seen["history"] == ["Scheduled", "Pending", AWAITING_SLOT]
    refused = seen["refused"]
    assert (refused.type.value, refused.name) == ("FAILED", QUOTA_EXHAUSTED)


CLAIM = "Taken by a managed worker to set its state ({})."
LEFT_IN_A_CLAIM = {
    # A worker killed right after its claim of a waiting run.
    "a claim of a waiting run": ([], True),
    # Killed after a claim the server took from an ending (before its put-back).
    "a claim that replaced an ending": ([Pending(), Running(), Completed()], True),
    # Prefect's own submission (a worker killed before its label): not a claim.
    "Prefect's own Pending": ([Pending()], False),
    # The claim a live worker went on from (read before it marked the run).
    "a claim since followed by its mark": ([], False),
}


@pytest.mark.parametrize("case", list(LEFT_IN_A_CLAIM))
def test_a_run_left_in_a_claim_goes_back_as_its_worker_would_have_put_it(prefect_server, case):
    """A worker killed between its claim and the state it was to set left the run
    Pending, with no container: another worker puts it back (`release_abandoned_claim`,
    from the pool's active runs as read) to the state before the claim."""
    moves, left = LEFT_IN_A_CLAIM[case]
    token = uuid.uuid4().hex

    async def scenario():
        async with get_client() as client:
            deployment = await _deployment(client)
            polled = await client.create_flow_run_from_deployment(deployment)
            for state in moves:
                await client.set_flow_run_state(polled.id, state)
            before = (await client.read_flow_run(polled.id)).state
            if left and moves:  # the killed worker's claim, accepted from the ending
                await client.set_flow_run_state(polled.id, Pending(message=CLAIM.format(token)))
            elif left or case.endswith("by its mark"):
                await _states(client)._claim(polled, token)  # the killed worker's request
            read = await client.read_flow_run(polled.id)  # as the pool's runs are read
            if case.endswith("by its mark"):  # the live worker's state after its claim
                await client.set_flow_run_state(
                    polled.id,
                    Scheduled(name=AWAITING_SLOT, scheduled_time=polled.expected_start_time),
                )
            settled = (await client.read_flow_run(polled.id)).state
            released = await _states(client).release_abandoned_claim(read)
            after = (await client.read_flow_run(polled.id)).state
            history = [s.type.value for s in await client.read_flow_run_states(polled.id)]
            await client.delete_deployment(deployment)
        return before, settled, released, after, history

    before, settled, released, after, history = asyncio.run(scenario())
    assert released is left
    if not left:
        assert after.id == settled.id  # not touched
    elif moves:
        assert history[-3:] == ["COMPLETED", "PENDING", "COMPLETED"]
        assert (after.type, after.message) == (before.type, before.message)
    else:
        assert history == ["SCHEDULED", "PENDING", "SCHEDULED"]
        assert after.is_scheduled() and "stopped before it could" in after.message


def test_the_deciding_worker_reads_every_active_run_of_its_pool(prefect_server, monkeypatch):
    """Abandoned claims and lost hosts are looked for among the pool's active runs: all
    of them, page after page (the server answers 200 at most; pages of 2 here)."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.objects import StateType

    from prefect_managed import lost

    monkeypatch.setattr(lost, "_RUNS_PAGE", 2)

    async def scenario() -> tuple[list, list]:
        async with get_client() as client:
            pool = f"claims-pool-{uuid.uuid4().hex[:6]}"
            await client.create_work_pool(WorkPoolCreate(name=pool, type="prefect:managed"))
            flow_id = await client.create_flow_from_name(f"claims-{uuid.uuid4().hex[:6]}")
            deployment = await client.create_deployment(
                flow_id=flow_id, name="claims", work_pool_name=pool
            )
            runs = [await client.create_flow_run_from_deployment(deployment) for _ in range(6)]
            for run in runs[:5]:
                await client.set_flow_run_state(run.id, Pending())
            decider = lost.LostHosts()
            decider.client = client
            decider._work_pool_name = pool
            found = await decider._pool_runs([StateType.PENDING])
            await client.delete_deployment(deployment)
            await client.delete_work_pool(pool)
        return sorted(run.id for run in found), sorted(run.id for run in runs[:5])

    found, pending = asyncio.run(scenario())
    assert found == pending
