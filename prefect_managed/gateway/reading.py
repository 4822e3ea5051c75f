"""One reading of a request: the canonical path, its query and nothing else.

The gateway decides on this reading and forwards exactly it (`Reading.path` rebuilt from
the route and its parameters, `Reading.query` as parameters), so what is checked and
what is sent cannot disagree. Anything that two readers could read two ways is refused
before a rule sees it: dot segments in any encoding, encoded slashes and backslashes,
`#` or `?` inside the path, control characters, empty segments, malformed escapes,
non-UTF-8 bytes, and a path that does not read back the same once re-encoded.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, unquote_to_bytes

__all__ = ["API_PREFIX", "Reading", "Unreadable", "encode_segment", "read_path", "read_query"]

API_PREFIX = "/api/"
#: Bytes a path may hold as sent: RFC 3986's unreserved and sub-delims, ':', '@' and
#: escapes. Everything else ('\\', '#', '"', spaces, controls, non-ASCII) is refused.
_RAW_SEGMENT = re.compile(r"^[A-Za-z0-9\-._~!$&'()*+,;=:@%]*$")
_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
#: Characters a decoded segment may not hold: they would split or end the path.
_FORBIDDEN_DECODED = frozenset("/\\#?%")
#: What stays unescaped when a segment is encoded again (with the unreserved).
_SAFE = "!$&'()*+,;=:@"
_MAX_PATH = 2048
_MAX_SEGMENTS = 16
_MAX_QUERY_FIELDS = 32


class Unreadable(ValueError):
    """A request the gateway will not read: it names what, and why."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"{what}; a request path must name one route of the Prefect API with each "
            "segment written once, as Prefect's client writes it"
        )


@dataclass(frozen=True)
class Reading:
    """The canonical request: `segments` are decoded (a trailing "" is a trailing
    slash); `query` is the decoded query, in order."""

    method: str
    segments: tuple[str, ...]
    query: tuple[tuple[str, str], ...] = ()

    @property
    def path(self) -> str:
        """The path after `/api`, encoded the one way the gateway sends it."""
        return "/" + "/".join(encode_segment(segment) for segment in self.segments)


def encode_segment(segment: str) -> str:
    return quote(segment, safe=_SAFE)


def _control(text: str) -> bool:
    return any(unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp") for char in text)


def _segment(raw: str) -> str:
    if not _RAW_SEGMENT.match(raw):
        raise Unreadable(f"the path segment {raw!r} holds characters a path may not")
    if _ESCAPE.search(raw):
        raise Unreadable(f"the path segment {raw!r} holds a malformed %-escape")
    try:
        decoded = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Unreadable(f"the path segment {raw!r} is not UTF-8 once decoded") from exc
    if decoded and set(decoded) <= {"."}:
        raise Unreadable(f"the path segment {raw!r} is a dot segment")
    if _FORBIDDEN_DECODED & set(decoded) or _control(decoded):
        raise Unreadable(
            f"the path segment {raw!r} encodes '/', '\\', '#', '?', '%' or a control character"
        )
    return decoded


def read_path(raw_path: bytes) -> tuple[str, ...]:
    """The decoded segments after `/api/` of a raw (undecoded) request path."""
    try:
        text = raw_path.decode("ascii")
    except UnicodeDecodeError as exc:
        raise Unreadable("the path holds bytes outside ASCII") from exc
    if len(text) > _MAX_PATH:
        raise Unreadable(f"the path is longer than {_MAX_PATH} characters")
    if not text.startswith(API_PREFIX):
        raise Unreadable(f"the path must start with {API_PREFIX}")
    raws = text[len(API_PREFIX) :].split("/")
    if len(raws) > _MAX_SEGMENTS:
        raise Unreadable(f"the path has more than {_MAX_SEGMENTS} segments")
    if any(raw == "" for raw in raws[:-1]) or raws == [""]:
        raise Unreadable("the path has an empty segment")
    segments = tuple(_segment(raw) for raw in raws)
    # Read back: the path the gateway would send must read as the same segments.
    again = Reading("GET", segments).path.encode("ascii")
    if tuple(_segment(raw) for raw in again.decode("ascii")[1:].split("/")) != segments:
        raise Unreadable("the path does not read back the same once re-encoded")
    return segments


def read_query(raw_query: bytes) -> tuple[tuple[str, str], ...]:
    """The decoded query string's fields, in order."""
    if not raw_query:
        return ()
    try:
        text = raw_query.decode("ascii")
        fields = parse_qsl(
            text,
            keep_blank_values=True,
            strict_parsing=True,
            errors="strict",
            max_num_fields=_MAX_QUERY_FIELDS,
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise Unreadable(f"the query string cannot be read: {exc}") from exc
    for name, value in fields:
        if _control(name) or _control(value):
            raise Unreadable(f"the query field {name!r} holds a control character")
    return tuple(fields)
