"""
The error tree: every error a client can see, with its HTTP status and OpenAI type/code.

The resource layer (L{oaiproxy.http.resource}) is the one place that turns these into responses.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar


class ProxyError(Exception):
    """
    Base of every error that reaches a client as OpenAI-shaped JSON.

    Subclasses set C{status}, C{error_type} and C{code}. C{retry_after} (seconds) becomes a
    C{Retry-After} header; C{retryable} says whether another upstream may be tried (only while
    nothing was sent downstream).
    """

    # Set by each class; an instance may set its own (L{UpstreamAnswer}).
    status: int = 500
    error_type: str = "api_error"
    code: ClassVar[str | None] = None
    retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The headers the error adds to its response (C{Retry-After} when it has one)."""
        if self.retry_after is None:
            return []
        return [(b"retry-after", b"%d" % self.retry_after)]

    def body(self) -> dict[str, Any]:
        """The OpenAI-shaped error object: all four keys always present."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_json(self) -> bytes:
        """The error body as compact JSON bytes."""
        return json.dumps(self.body(), separators=(",", ":")).encode("utf-8")

    def to_sse(self) -> bytes:
        """The error as one server-sent event, for streams already under way."""
        return b"data: " + self.to_json() + b"\n\n"


class InvalidRequest(ProxyError):
    """The client's request is malformed (bad JSON, bad header)."""

    status = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class InvalidJSON(InvalidRequest):
    """The body of a JSON endpoint does not parse as a JSON object."""

    code = "invalid_json"


class HeadersTooLarge(InvalidRequest):
    """The request head has too many header fields, or too many bytes (HTTP/1.1)."""

    status = 431
    code = "request_header_fields_too_large"


class RequestTimeout(ProxyError):
    """The client did not send its request head, or the rest of its body, in time."""

    status = 408
    error_type = "invalid_request_error"
    code = "request_timeout"


class NotFound(ProxyError):
    """No such route on this proxy."""

    status = 404
    error_type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(ProxyError):
    """
    The route exists but not for this method.

    @ivar allow: the methods it takes, for the C{Allow} header (RFC 9110 15.5.6).
    """

    status = 405
    error_type = "invalid_request_error"
    code = "method_not_allowed"

    def __init__(self, message: str, *, allow: bytes) -> None:
        super().__init__(message)
        self.allow = allow

    def headers(self) -> list[tuple[bytes, bytes]]:
        """C{Allow}, with the base class's."""
        return [*super().headers(), (b"allow", self.allow)]


class BodyTooLarge(ProxyError):
    """The request body exceeds the configured cap."""

    status = 413
    error_type = "invalid_request_error"
    code = "request_too_large"

    @classmethod
    def over(cls, cap: int) -> BodyTooLarge:
        """The error for a body over a cap of C{cap} bytes."""
        return cls(f"request body is larger than the limit of {cap} bytes")


class UpstreamError(ProxyError):
    """Base of failures on the upstream side."""

    status = 502
    error_type = "api_error"
    code = "upstream_error"


class UpstreamConnectFailed(UpstreamError):
    """The upstream refused, reset or could not be reached; another may be tried."""

    code = "upstream_connect_failed"
    retryable = True


class UpstreamBadStatus(UpstreamError):
    """The upstream answered 5xx before any byte went downstream; another may be tried."""

    code = "upstream_unavailable"
    retryable = True


class UpstreamAnswer(UpstreamError):
    """
    The last upstream's own C{5xx} or C{429}, whose body is not JSON (a gateway's HTML page,
    say): its status and its C{Retry-After}, C{retry-after-ms}, C{x-ratelimit-*},
    C{x-request-id} and C{openai-*} headers reach the client, with an OpenAI-shaped body in
    place of its own.
    """

    code = "upstream_error"

    def __init__(self, status: int, message: str, passed: list[tuple[bytes, bytes]]) -> None:
        super().__init__(message)
        self.status = status
        if status == 429:
            self.error_type = "rate_limit_error"
        self._passed = passed

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The upstream's own headers that are passed on."""
        return self._passed


class UpstreamProtocolError(UpstreamError):
    """The upstream sent something that is not valid HTTP."""

    code = "upstream_protocol_error"
    retryable = True


class UpstreamTimeout(UpstreamError):
    """A deadline (connect, first byte, idle, total) expired."""

    status = 504
    code = "upstream_timeout"


class UpstreamConnectTimeout(UpstreamTimeout):
    """The connection to an upstream was not established in time; another may be tried."""

    code = "upstream_connect_timeout"
    retryable = True


class UpstreamDisconnected(UpstreamError):
    """The upstream went away mid-response."""

    code = "upstream_disconnected"


class TooManyConnections(ProxyError):
    """The proxy holds as many client connections as it is allowed: this one is refused."""

    status = 503
    error_type = "server_error"
    code = "too_many_connections"


class NoUpstreamAvailable(ProxyError):
    """No upstream is usable at all."""

    status = 503
    error_type = "api_error"
    code = "no_upstream_available"
