"""Run tokens: the credential a run's container holds instead of the worker's.

A token names one flow run and the time it stops being valid, signed with the ledger
key, so every worker holding that key (on any host, after any restart) verifies it
without a table of issued tokens. It expires after the run's maximum run time and a
margin for the environment's install (`token_lifetime`); the gateway also refuses it
once its run has been final for a while (`app.RunStatus`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from dataclasses import dataclass
from uuid import UUID

__all__ = ["Bearer", "run_token", "token_from_authorization", "token_lifetime", "token_run"]

TOKEN_PREFIX = "pmr2"
_TOKEN_CONTEXT = b"prefect-managed run gateway v2\0"
#: Beyond the run's maximum run time: the image's start and `pip_packages`' install,
#: which the run time does not count, and the last logs and events after the end.
TOKEN_MARGIN_SECONDS = 2 * 3600


@dataclass(frozen=True)
class Bearer:
    """Who a valid token speaks for, and until when."""

    run: UUID
    expires: int


def token_lifetime(max_run_seconds: int) -> int:
    """How long a run's token is valid from its container's creation."""
    return int(max_run_seconds) + TOKEN_MARGIN_SECONDS


def _mac(key: bytes, flow_run_id: UUID, expires: int) -> str:
    message = _TOKEN_CONTEXT + flow_run_id.bytes + str(expires).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def run_token(
    key: bytes, flow_run_id: UUID, lifetime_seconds: int, now: float | None = None
) -> str:
    """The credential a run's container gets: its flow run id and expiry, signed."""
    expires = int((time.time() if now is None else now) + lifetime_seconds)
    return f"{TOKEN_PREFIX}.{flow_run_id}.{expires}.{_mac(key, flow_run_id, expires)}"


def token_run(key: bytes, token: str | None, now: float | None = None) -> Bearer | None:
    """The run a token was issued to, or None for anything not signed with `key` or
    past its expiry."""
    parts = (token or "").split(".")
    if len(parts) != 4 or parts[0] != TOKEN_PREFIX or not parts[2].isdigit():
        return None
    try:
        flow_run_id = UUID(parts[1])
    except ValueError:
        return None
    if parts[1] != str(flow_run_id) or len(parts[2]) > 12:
        return None
    expires = int(parts[2])
    if not hmac.compare_digest(_mac(key, flow_run_id, expires), parts[3]):
        return None
    if expires <= (time.time() if now is None else now):
        return None
    return Bearer(flow_run_id, expires)


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
