"""The run gateway's port on the worker's host.

`runtime.api_gateway_port = "auto"` (the default) derives one port from the Prefect API's
URL and the ledger key, so every worker process of a host serving that API with that key
finds the same gateway without the operator picking a port, and workers of other servers
or workspaces on the host get others. A number is used as it is; 0 turns the gateway off.
"""

from __future__ import annotations

import hashlib
import hmac

from prefect_managed.policy_runtime import Runtime

__all__ = ["AUTO_PORTS", "auto_gateway_port", "run_gateway_port"]

#: The ports "auto" chooses from: below Linux's ephemeral range (32768-60999), so that no
#: outgoing connection of the host holds it, and above the common services' ports.
AUTO_PORTS = range(20000, 30000)
_CONTEXT = b"prefect-managed gateway port\0"


def auto_gateway_port(api_url: str, key: bytes) -> int:
    digest = hmac.new(key, _CONTEXT + api_url.rstrip("/").encode(), hashlib.sha256).digest()
    return AUTO_PORTS.start + int.from_bytes(digest[:4], "big") % len(AUTO_PORTS)


def run_gateway_port(runtime: Runtime) -> int:
    """The port of this worker's run gateway, 0 when the policy turns it off."""
    if runtime.api_gateway_port != "auto":
        return runtime.api_gateway_port
    from prefect.settings import PREFECT_API_URL

    from prefect_managed.settings import ledger_key

    return auto_gateway_port(str(PREFECT_API_URL.value() or ""), ledger_key())
