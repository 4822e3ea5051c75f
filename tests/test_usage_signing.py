"""Signing and checking usage records (pure), and where the ledger key comes from."""

from __future__ import annotations

import stat
from datetime import datetime, timedelta, timezone
from uuid import uuid4

import pytest
from prefect.settings import PREFECT_HOME, temporary_settings

from prefect_managed import settings
from prefect_managed.exceptions import LedgerKeyMissing
from prefect_managed.usage import Outcome, UsageRecord, check_record, run_key, sign_record

KEY = b"k" * 32
FINISHED = datetime(2026, 11, 15, 12, tzinfo=timezone.utc)


def _record(workspace: str = "acme", minutes: float = 3, **values) -> UsageRecord:
    return UsageRecord.from_timestamps(
        FINISHED - timedelta(minutes=minutes),
        FINISHED,
        **{
            "flow_run_id": uuid4(),
            "flow_run_name": "run",
            "workspace": workspace,
            "tier": "free",
            "pool": "managed",
            "image": "runtime:1",
            "outcome": Outcome.COMPLETED,
            **values,
        },
    )


def _signed(record: UsageRecord, key: bytes = KEY) -> tuple[str, str, str]:
    artifact_key = run_key(record.workspace, record.month, record.flow_run_id)
    body = record.model_dump_json()
    return artifact_key, body, sign_record(key, artifact_key, body)


def test_a_record_signed_with_the_workers_key_verifies():
    record = _record()
    checked = check_record(KEY, "acme", "2026-11", *_signed(record))
    assert checked == record


def test_a_changed_record_does_not_verify():
    record = _record()
    artifact_key, body, signature = _signed(record)
    zeroed = body.replace('"billable_minutes":3', '"billable_minutes":0')
    assert zeroed != body
    assert "signature does not verify" in str(
        check_record(KEY, "acme", "2026-11", artifact_key, zeroed, signature)
    )


@pytest.mark.parametrize("signature", [None, "", "0" * 64, "not hex"])
def test_a_missing_or_made_up_signature_does_not_verify(signature):
    artifact_key, body, _ = _signed(_record())
    checked = check_record(KEY, "acme", "2026-11", artifact_key, body, signature)
    assert "signature does not verify" in str(checked)


def test_a_record_signed_with_another_key_does_not_verify():
    checked = check_record(KEY, "acme", "2026-11", *_signed(_record(), key=b"other"))
    assert "signature does not verify" in str(checked)


def test_a_signed_record_moved_under_another_runs_key_does_not_verify():
    _, body, signature = _signed(_record())
    other_key = run_key("acme", "2026-11", uuid4())
    checked = check_record(KEY, "acme", "2026-11", other_key, body, signature)
    assert "signature does not verify" in str(checked)


def test_a_signed_record_of_another_workspace_or_month_is_not_counted():
    record = _record(workspace="other")
    assert "workspace 'other' in 2026-11" in str(
        check_record(KEY, "acme", "2026-11", *_signed(record))
    )
    assert "workspace 'acme' in 2026-11" in str(
        check_record(KEY, "acme", "2026-10", *_signed(_record()))
    )


def test_a_signed_record_that_names_another_run_than_its_key_is_not_counted():
    record = _record()
    artifact_key = run_key("acme", "2026-11", uuid4())
    body = record.model_dump_json()
    checked = check_record(
        KEY, "acme", "2026-11", artifact_key, body, sign_record(KEY, artifact_key, body)
    )
    assert checked == "its record names another flow run than its key"


@pytest.mark.parametrize("body", [None, "", "{not json", '{"flow_run_id": "x"}'])
def test_an_empty_or_invalid_body_is_a_reason_not_an_exception(body):
    artifact_key = run_key("acme", "2026-11", uuid4())
    signature = sign_record(KEY, artifact_key, body) if body else None
    checked = check_record(KEY, "acme", "2026-11", artifact_key, body, signature)
    assert isinstance(checked, str)
    assert checked in ("it holds no usage record",) or checked.startswith("its record is not valid")


@pytest.fixture
def no_configured_key(monkeypatch, tmp_path):
    monkeypatch.setattr(settings, "_settings", settings.ManagedSettings(ledger_key=None))
    with temporary_settings(updates={PREFECT_HOME: tmp_path}):
        yield tmp_path


def test_the_configured_key_wins(monkeypatch):
    monkeypatch.setattr(settings, "_settings", settings.ManagedSettings(ledger_key="shared-key"))
    assert settings.ledger_key() == b"shared-key"


def test_without_a_configured_key_one_is_generated_once_and_kept_private(no_configured_key):
    first = settings.ledger_key()
    path = no_configured_key / settings.LEDGER_KEY_FILE_NAME
    assert len(first) == 64
    assert settings.ledger_key() == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_the_usage_command_does_not_invent_a_key(no_configured_key):
    with pytest.raises(LedgerKeyMissing):
        settings.ledger_key(create=False)
    assert not (no_configured_key / settings.LEDGER_KEY_FILE_NAME).exists()
