"""
Header translation between the client side (HTTP/2 or HTTP/1.1) and HTTP/1.1 upstreams.

Pure functions on L{Headers}: hop-by-hop headers are dropped in both directions, framing
headers are left to be recomputed from the bytes actually relayed, and every name and value is
validated before it is written as HTTP/1.1 text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from email.utils import parsedate_to_datetime

from twisted.web.http_headers import Headers, InvalidHeaderName, _nameEncoder

from oaiproxy.errors import InvalidRequest

__all__ = [
    "CANONICAL_NAMES",
    "FORWARDED_ALLOW",
    "FORWARDED_METHODS",
    "HOP_BY_HOP",
    "MAX_KEPT_NAME",
    "add_checked",
    "canonical",
    "connection_named",
    "downstream_response_headers",
    "for_log",
    "is_printable",
    "is_valid_name",
    "is_valid_reason",
    "is_valid_value",
    "raw_values",
    "relayed_downstream",
    "retry_after",
    "set_checked",
    "upstream_request_headers",
]

#: Headers that describe one connection, never forwarded (RFC 9110 7.6.1); so is every
#: C{Proxy-*} header (see L{is_hop_by_hop}).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

#: The methods forwarded upstream; any other is answered 405, with C{Allow: FORWARDED_ALLOW}.
FORWARDED_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"})
FORWARDED_ALLOW = b", ".join(sorted(FORWARDED_METHODS))

# Recomputed or set by the proxy itself on the way up.
_NOT_FORWARDED_UP = frozenset(
    {b"host", b"content-length", b"expect", b"x-forwarded-proto", b"http2-settings"}
)
# Recomputed by the proxy on the way down (framing), or replaced by its own.
_NOT_FORWARDED_DOWN = frozenset({b"content-length", b"server", b"date"})

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(rb"[\r\n\x00]")


def is_valid_name(name: bytes) -> bool:
    """Whether C{name} is an RFC 9110 token (what may be written as an HTTP/1.1 name)."""
    return _TOKEN.fullmatch(name) is not None  # fullmatch: no final LF slips through


# Printable ASCII without space: what a request target may hold once written as HTTP/1.1.
_TARGET_OK = bytes(range(0x21, 0x7F))


def is_printable(value: bytes) -> bool:
    """Whether C{value} is printable ASCII without space (checked in C, not per byte)."""
    return not value.translate(None, _TARGET_OK)


# Control characters (C0, DEL, C1) written into a log line as escapes: a client's CR or LF
# would split the line (a forged entry), an ESC would drive the operator's terminal.
_LOG_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}


def for_log(text: str, limit: int = 200) -> str:
    """C{text} from a client, safe in a log line: control characters escaped, at most C{limit}."""
    return text[:limit].translate(_LOG_ESCAPES)


def is_valid_value(value: bytes) -> bool:
    """Whether C{value} is free of CR, LF and NUL."""
    return _BAD_VALUE.search(value) is None


# What a reason phrase may not hold: controls but HTAB, and DEL (RFC 9112: HTAB, SP, VCHAR,
# obs-text).
_NOT_REASON = bytes([*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F])


def is_valid_reason(phrase: bytes) -> bool:
    """Whether C{phrase} may be written as a reason phrase (no CR, LF, NUL or other control)."""
    return len(phrase.translate(None, _NOT_REASON)) == len(phrase)


#: Canonical names (Twisted's Headers form) by name as given: only tokens, none over
#: L{MAX_KEPT_NAME} bytes; it stops growing at 2,048 names. Filled by L{canonical}; read
#: elsewhere (a dictionary look-up costs far less than a call per field), never written.
CANONICAL_NAMES: dict[bytes, bytes] = {}
_CANONICAL = CANONICAL_NAMES  # the name this module uses
_MAX_CANONICAL = 2048


#: Names longer than this are not kept in any table (a client chooses them: a table of
#: 30 KB names would hold tens of megabytes for ever).
MAX_KEPT_NAME = 64


def canonical(name: bytes) -> bytes:
    """
    C{name} as Twisted's L{Headers} stores it, checked as Twisted's C{_nameEncoder} checks it.

    @raise InvalidHeaderName: if C{name} is not a token.
    """
    known = _CANONICAL.get(name)
    if known is not None:
        return known
    if len(name) > MAX_KEPT_NAME:
        # Twisted's encoder would keep it in its own table (10,000 names of any length).
        if not is_valid_name(name):
            raise InvalidHeaderName(name)
        joined = b"-".join([word.capitalize() for word in name.split(b"-")])
        return _nameEncoder._caseMappings.get(joined, joined)
    encoded: bytes = _nameEncoder.encode(name)
    if len(_CANONICAL) < _MAX_CANONICAL:
        _CANONICAL[name] = encoded
    return encoded


def raw_values(headers: Headers, name: bytes) -> list[bytes]:
    """
    C{headers.getRawHeaders(name, [])} for a canonical C{name} (C{b"Content-Type"}), without
    a copy or Twisted's encoder: the list must not be changed. Twisted 26.10.0: L{Headers}
    keeps its values in C{_rawHeaders} (private), under canonical names.
    """
    values: list[bytes] = headers._rawHeaders.get(name, _NONE)
    return values


_NONE: list[bytes] = []


def add_checked(headers: Headers, name: bytes, value: bytes) -> None:
    """
    C{headers.addRawHeader(name, value)} for a value already known to be free of CR, LF and
    NUL: the same result (the name is still checked and canonicalised by Twisted's encoder),
    without Twisted rescanning the value for line breaks, about 3% of the proxy's
    instructions per request over the headers it copies.

    Written against Twisted 26.10.0: L{Headers} keeps its values in C{_rawHeaders} (private),
    under canonical names.
    """
    headers._rawHeaders.setdefault(_CANONICAL.get(name) or canonical(name), []).append(value)


def set_checked(headers: Headers, name: bytes, value: bytes) -> None:
    """C{headers.setRawHeaders(name, [value])}, as L{add_checked} is to C{addRawHeader}."""
    headers._rawHeaders[_CANONICAL.get(name) or canonical(name)] = [value]


#: The longest an upstream is left out for its C{Retry-After} (a buggy or hostile value could
#: otherwise take it out of service for days).
MAX_RETRY_AFTER = 300.0


def retry_after(headers: Headers, now: float) -> float | None:
    """
    The seconds an upstream asks to be left alone for, from C{retry-after-ms} (OpenAI's) or
    C{Retry-After} (seconds or an HTTP date, RFC 9110 10.2.3), at most L{MAX_RETRY_AFTER};
    C{None} when it asks for none (or for nothing valid).

    @param now: the current time, in seconds since the epoch, for an HTTP date.
    """
    millis = headers.getRawHeaders(b"retry-after-ms")
    value = headers.getRawHeaders(b"retry-after")
    seconds = _retry_after_ms(millis[0]) if millis else None
    if seconds is None and value:
        seconds = _retry_after(value[0], now)
    return None if seconds is None else min(seconds, MAX_RETRY_AFTER)


def _retry_after_ms(value: bytes) -> float | None:
    """C{retry-after-ms}: positive milliseconds, as seconds; else C{None}."""
    try:
        seconds = float(value) / 1000
    except ValueError:
        return None
    return seconds if seconds > 0 else None  # NaN is not > 0


def _retry_after(value: bytes, now: float) -> float | None:
    """C{Retry-After}: positive seconds, or an HTTP date after C{now}; else C{None}."""
    try:
        if value.strip().isdigit():
            seconds = float(value)
        else:
            seconds = parsedate_to_datetime(value.decode("latin-1")).timestamp() - now
    except (ValueError, TypeError, IndexError, OverflowError):
        return None
    return seconds if seconds > 0 else None


def connection_named(headers: Headers) -> frozenset[bytes]:
    """The header names listed in C{Connection}, lower-cased: they are hop-by-hop too."""
    named: set[bytes] = set()
    for value in headers.getRawHeaders(b"connection", []):
        for raw in value.split(b","):
            token = raw.strip().lower()
            if token:
                named.add(token)
    return frozenset(named)


def _end_to_end(headers: Headers, skip: frozenset[bytes]) -> Iterable[tuple[bytes, bytes, bytes]]:
    """Yield (lower name, name, value) for the end-to-end headers not in C{skip}."""
    dropped = HOP_BY_HOP | skip | connection_named(headers)
    for name, values in headers.getAllRawHeaders():
        lower = name.lower()
        if lower in dropped or lower.startswith((b":", b"proxy-")):
            continue
        for value in values:
            yield lower, name, value


# What a client field name tells, by its canonical name (as Twisted's Headers hold names):
# its lower case, whether it is a token, whether it may be forwarded at all. A table, so that
# the checks run once per name and not once per request; it stops growing at _MAX_NAMES
# (clients choose names, and a table they could grow without end would be a leak).
_UP_NAMES: dict[bytes, tuple[bytes, bool, bool]] = {}
_MAX_NAMES = 2048
_DROPPED_UP = HOP_BY_HOP | _NOT_FORWARDED_UP
# Forwarded fields that the proxy replaces or treats apart (see upstream_request_headers).
_SPECIAL_UP = frozenset(
    {b"authorization", b"x-forwarded-for", b"x-request-id", b"accept-encoding"}
)


def _up_name(name: bytes) -> tuple[bytes, bool, bool]:
    """C{name}'s entry of L{_UP_NAMES}, made (and kept while there is room)."""
    lower = name.lower()
    forwarded = lower not in _DROPPED_UP and not lower.startswith((b":", b"proxy-"))
    info = (lower, is_valid_name(name), forwarded)
    if len(_UP_NAMES) < _MAX_NAMES and len(name) <= MAX_KEPT_NAME:
        _UP_NAMES[name] = info
    return info


def upstream_request_headers(
    client: Headers,
    *,
    host: bytes,
    api_key: bytes | None,
    client_ip: str,
    secure: bool,
    request_id: bytes,
    stream: bool,
) -> Headers:
    """
    The headers to send upstream for a client's request.

    C{Host} comes from the upstream URL (C{host}), never from the client; with C{api_key} the
    client's C{Authorization} is replaced; C{X-Forwarded-For} gets the client's address
    appended, C{X-Forwarded-Proto} says how the client connected; C{x-request-id} is set. For
    streamed answers, C{Accept-Encoding: identity} keeps the upstream from compressing events.

    @raise InvalidRequest: if a client header name or value could not be written safely as
        HTTP/1.1 (not a token; CR, LF or NUL in it).
    """
    out = Headers()
    # Names in Twisted's canonical form, values checked below: stored as add_checked does.
    stored = out._rawHeaders
    named = connection_named(client) if raw_values(client, b"Connection") else frozenset()
    known = _UP_NAMES
    values: list[bytes] = []
    for name, field_values in client.getAllRawHeaders():
        lower, token, forwarded = known.get(name) or _up_name(name)
        if not forwarded or lower in named:
            continue
        if not token:
            raise InvalidRequest(f"invalid header name {name!r}")
        if lower in _SPECIAL_UP and (
            lower in (b"x-forwarded-for", b"x-request-id")
            or (lower == b"authorization" and api_key is not None)
            or (lower == b"accept-encoding" and stream)
        ):
            continue
        values.extend(field_values)
        stored[name] = list(field_values)
    # One scan of every value forwarded (a space between them cannot hide a CR, LF or NUL).
    if values and _BAD_VALUE.search(b" ".join(values)):
        for name, field_values in stored.items():
            if not all(map(is_valid_value, field_values)):
                raise InvalidRequest(f"invalid value in header {name.decode('latin-1')!r}")
    stored[b"Host"] = [host]
    if api_key is not None:
        out.setRawHeaders(b"authorization", [b"Bearer " + api_key])
    forwarded_for = [v.strip() for v in raw_values(client, b"X-Forwarded-For") if v.strip()]
    for value in forwarded_for:
        if not is_valid_value(value):
            raise InvalidRequest("invalid value in header 'X-Forwarded-For'")
    # The client's address is an IP address; the request id is printable ASCII (the client's
    # only once checked so, see http/resource.py).
    set_checked(
        out,
        b"x-forwarded-for",
        b", ".join([*forwarded_for, client_ip.encode("ascii", "replace")]),
    )
    set_checked(out, b"x-forwarded-proto", b"https" if secure else b"http")
    set_checked(out, b"x-request-id", request_id)
    if stream:
        set_checked(out, b"accept-encoding", b"identity")
    return out


_DROPPED_DOWN = HOP_BY_HOP | _NOT_FORWARDED_DOWN


def relayed_downstream(lower: bytes) -> bool:
    """
    Whether a response field named C{lower} (lower case) may be relayed to the client, as far
    as its name tells: not hop-by-hop, not framing, not replaced by the proxy. (The fields
    the response's C{Connection} names are hop-by-hop too: the caller drops those.)
    """
    return lower not in _DROPPED_DOWN and not lower.startswith(b"proxy-")


def downstream_response_headers(upstream: Headers) -> list[tuple[bytes, bytes]]:
    """
    The upstream response headers that go back to the client, as (name, value) pairs.

    Hop-by-hop and framing headers are dropped (the proxy recomputes framing); headers that are
    not safe to write (bad name, CR/LF/NUL in the value) are dropped rather than relayed.
    """
    return [
        (name, value)
        for _, name, value in _end_to_end(upstream, _NOT_FORWARDED_DOWN)
        if is_valid_name(name) and is_valid_value(value)
    ]
