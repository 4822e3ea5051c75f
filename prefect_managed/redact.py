"""Credentials kept out of what users and logs see: the user and password of URLs.

A password may hold `/` and `@` (written raw, not percent-encoded) and a URL's path may
hold `@` too (pip's `git+https://host/repo@v1`), so the userinfo ends at the last `@`
that a host name follows, itself followed by a port, a path or the URL's end. Also
scp-like git addresses with a password (`user:token@host:repo`).
"""

from __future__ import annotations

import re

__all__ = ["redact_url_credentials"]

_SCHEME = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://")
_TOKEN_END = re.compile(r"[\s'\"<>]")
_HOST_THEN = re.compile(r"(?:[A-Za-z0-9._~-]+|\[[0-9A-Fa-f:.]+\])(?P<then>[:/?#]|$)")
_SCP_WITH_PASSWORD = re.compile(r"(?<![\w/.:@-])[\w.+-]+:[^\s@'\"/]+@(?=[A-Za-z0-9.-]+:)")


def _userinfo_end(url: str) -> int | None:
    """The index of the `@` that ends the userinfo of `url` (after its scheme), if any."""
    with_path = at_end = None
    for at in (i for i, char in enumerate(url) if char == "@"):
        host = _HOST_THEN.match(url, at + 1)
        if host is None:
            continue
        if host["then"]:
            with_path = at
        else:
            at_end = at
    if with_path is not None:
        return with_path
    # Only a host at the very end: a userinfo only when no path came before it
    # (`https://host/repo@v1` names a revision, not a user).
    if at_end is not None and "/" not in url[:at_end]:
        return at_end
    return None


def redact_url_credentials(text: str) -> str:
    """Replace the user and password of every URL in `text` with ``***``."""
    out, position = [], 0
    for scheme in _SCHEME.finditer(text):
        if scheme.start() < position:
            continue
        start = scheme.end()
        end_match = _TOKEN_END.search(text, start)
        end = end_match.start() if end_match else len(text)
        at = _userinfo_end(text[start:end])
        if at is None:
            continue
        out.append(text[position:start])
        out.append("***")
        position = start + at
    out.append(text[position:])
    return _SCP_WITH_PASSWORD.sub("***@", "".join(out))
