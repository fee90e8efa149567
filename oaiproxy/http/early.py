"""
Request ids, and answers written straight to an HTTP/1.1 transport: for requests refused
before Twisted's request object can answer them (a malformed head, a head or body sent too
slowly, a body known to be over the cap). Each is an OpenAI-shaped error with its request id,
after which the connection is closed.
"""

from __future__ import annotations

import itertools
import os
from http import HTTPStatus

from twisted.web.http import RESPONSES

from oaiproxy.errors import ProxyError

__all__ = ["early_error_response", "new_request_id", "reason_phrase"]

# Request ids: a random per-process prefix and a counter, 32 hex digits like a UUID, unique
# without a getrandom() call per request.
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(1)


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


def early_error_response(error: ProxyError, request_id: bytes) -> bytes:
    """The bytes of an HTTP/1.1 response carrying C{error}, closing the connection."""
    body = error.to_json()
    reason = reason_phrase(error.status)
    retry = b"" if error.retry_after is None else b"retry-after: %d\r\n" % error.retry_after
    return (
        b"HTTP/1.1 %d %s\r\n"
        b"content-type: application/json\r\n"
        b"content-length: %d\r\n"
        b"x-request-id: %s\r\n"
        b"%sconnection: close\r\n\r\n%s"
        % (error.status, reason, len(body), request_id, retry, body)
    )
