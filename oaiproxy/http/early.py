"""
Request ids, and answers written straight to the connection: for requests refused before
Twisted's request object can answer them (a malformed head, a head or body sent too slowly, a
body known to be over the cap). Each is an OpenAI-shaped error with its request id; over
HTTP/1.1 the connection is closed after it, over HTTP/2 only the stream ends.
"""

from __future__ import annotations

import itertools
import os
from http import HTTPStatus

from twisted.web.http import RESPONSES

from oaiproxy.errors import ProxyError

__all__ = [
    "early_error_h2",
    "early_error_response",
    "new_request_id",
    "reason_phrase",
    "request_id_for",
]

# Request ids: a random per-process prefix and a counter, 32 hex digits like a UUID, unique
# without a getrandom() call per request.
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(1)
_REQUEST_ID_MAX = 200
# Printable ASCII without space: what a client's request id may hold.
_ID_OK = bytes(range(0x21, 0x7F))


def reason_phrase(status: int) -> bytes:
    """The reason phrase for C{status}: Twisted's, else the standard library's (Twisted's
    table lacks RFC 6585's 429 and 431, and writes C{Unknown Status} for them)."""
    phrase = RESPONSES.get(status)
    if phrase is None:
        try:
            phrase = HTTPStatus(status).phrase.encode("ascii")
        except ValueError:
            phrase = b"Error"
    return phrase


def new_request_id() -> bytes:
    """A new request id, unique in this process and across processes."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}".encode("ascii")


def request_id_for(given: bytes | None) -> bytes:
    """
    The client's C{x-request-id} if it is sane (1 to 200 printable ASCII characters, no
    space), else a new one.
    """
    if given and len(given) <= _REQUEST_ID_MAX and not given.translate(None, _ID_OK):
        return given
    return new_request_id()


def early_error_response(error: ProxyError, request_id: bytes) -> bytes:
    """The bytes of an HTTP/1.1 response carrying C{error}, closing the connection."""
    body = error.to_json()
    reason = reason_phrase(error.status)
    extra = b"".join(b"%s: %s\r\n" % pair for pair in error.headers())
    return (
        b"HTTP/1.1 %d %s\r\n"
        b"content-type: application/json\r\n"
        b"content-length: %d\r\n"
        b"x-request-id: %s\r\n"
        b"%sconnection: close\r\n\r\n%s"
        % (error.status, reason, len(body), request_id, extra, body)
    )


def early_error_h2(
    error: ProxyError, request_id: bytes
) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The HTTP/2 response head (C{:status} first) and body carrying C{error}."""
    body = error.to_json()
    head = [
        (b":status", b"%d" % error.status),
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        (b"x-request-id", request_id),
    ]
    return [*head, *error.headers()], body
