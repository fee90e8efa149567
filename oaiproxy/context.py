"""
The per-request context: the one mutable record of an exchange, created by the resource layer
and passed through the pipeline's phases.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.web.http_headers import Headers


@dataclass
class RequestContext:
    """
    What the pipeline knows about one client request.

    @ivar request_id: the client's C{x-request-id}, or one generated for it.
    @ivar method: the request method, upper case.
    @ivar rest: the path after C{/v1}, starting with C{/} (e.g. C{/chat/completions}).
    @ivar query: the raw query string without C{?}, or C{b""}.
    @ivar headers: the client's request headers (as received).
    @ivar body: the complete request body (bounded by the configured cap).
    @ivar client_ip: the peer address, for C{X-Forwarded-For}.
    @ivar secure: whether the client connection is TLS.
    @ivar model: the C{model} field of a JSON body, when there is one.
    @ivar stream: whether the JSON body asks for a streamed answer.
    @ivar started: reactor time at which the request arrived, in seconds.
    @ivar attempts: names of the upstreams tried, in order, with what happened.
    """

    request_id: bytes
    method: bytes
    rest: bytes
    query: bytes
    headers: Headers
    body: bytes
    client_ip: str
    secure: bool
    started: float
    model: str | None = None
    stream: bool = False
    attempts: list[tuple[str, str]] = field(default_factory=list)
