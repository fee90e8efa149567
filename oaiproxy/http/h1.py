# This module subclasses Twisted's unannotated HTTPChannel: calling its methods through
# super() is unavoidable here.
# mypy: disallow-untyped-calls=False
"""
The HTTP/1.1 server channel: Twisted's L{HTTPChannel} with a proxy's stricter request parsing
and its refusals as OpenAI-shaped JSON.

Twisted answers every request it cannot parse with a bare C{400 Bad Request} and no body, and
silently drops a connection whose head or body stalls. A proxy in front of OpenAI clients must
do better (see C{shared/BAD-INPUTS.md}), and must refuse what would let a client and an
upstream read one message two ways:

- a malformed head (request line, header syntax, CR/LF/NUL in a value, both Content-Length
  and Transfer-Encoding, a duplicate, signed or hex Content-Length) gets 400 as JSON, and the
  connection is closed; so does obsolete line folding, and any Transfer-Encoding other than
  C{chunked} (Twisted accepts folding and C{identity});
- more than C{max_headers} header fields, or a head over C{max_header_bytes}, gets 431;
- a head not complete C{header_timeout} seconds after its first byte (slowloris), or a body
  that stops arriving for the idle timeout, gets 408.

Nothing refused here reaches the resource, so nothing is forwarded upstream. Written against
Twisted 26.10.0: it overrides C{HTTPChannel._respondToBadRequestAndDisconnect} and reads
C{_handlingRequest}, C{_receivedHeaderSize} and C{_receivedHeaderCount}, which are private.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from typing_extensions import override

from oaiproxy.errors import HeadersTooLarge, InvalidRequest, ProxyError, RequestTimeout
from oaiproxy.http.early import early_error_response, new_request_id

__all__ = [
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_MAX_HEADERS",
    "DEFAULT_MAX_HEADER_BYTES",
    "ProxyHTTPChannel",
]

log = Logger()

DEFAULT_MAX_HEADERS = 100
DEFAULT_MAX_HEADER_BYTES = 32 * 1024
DEFAULT_HEADER_TIMEOUT = 30.0


class ProxyHTTPChannel(HTTPChannel):
    """
    An HTTP/1.1 channel that refuses bad or slow requests with OpenAI-shaped errors.

    @param reactor: runs the head deadline.
    @param max_headers: header fields allowed in one request head.
    @param max_header_bytes: bytes allowed in one request head (request line and fields,
        without line ends), and in any one of its lines.
    @param header_timeout: seconds from the first byte of a request head to its end.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        *,
        max_headers: int = DEFAULT_MAX_HEADERS,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self.maxHeaders = max_headers
        self.totalHeadersSize = max_header_bytes
        self.MAX_LENGTH = max_header_bytes
        self._header_timeout = header_timeout
        self._head_deadline: IDelayedCall | None = None
        # Whether part of a request (head or body) has arrived and its end has not.
        self._receiving = False
        self._refused = False

    # -- the head deadline --------------------------------------------------------------

    @override
    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if not self._handlingRequest:
            self._receiving = True
            if self.line_mode and self._head_deadline is None:
                self._head_deadline = self._reactor.callLater(
                    self._header_timeout, self._head_too_slow
                )
        super().dataReceived(data)

    @override
    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            return
        if line[:1] in (b" ", b"\t"):
            # Obsolete line folding (RFC 9112 section 5.2): a server must reject it or
            # unfold it; unfolding is how one message gets read two ways.
            self._refuse(InvalidRequest("obsolete line folding in a request header"))
            return
        super().lineReceived(line)

    @override
    def headerReceived(self, line: bytes) -> bool:
        name, sep, value = line.partition(b":")
        if (
            sep
            and name.lower() == b"transfer-encoding"
            and value.strip(b" \t").lower() != b"chunked"
        ):
            self._refuse(InvalidRequest("the only transfer coding accepted is chunked"))
            return False
        ok: bool = super().headerReceived(line)
        return ok

    @override
    def allHeadersReceived(self) -> None:
        self._cancel_head_deadline()
        super().allHeadersReceived()

    @override
    def allContentReceived(self) -> None:
        self._receiving = False
        super().allContentReceived()

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        self._refuse(
            RequestTimeout(f"the request head was not received within {self._header_timeout:g}s")
        )

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            if self._head_deadline.active():
                self._head_deadline.cancel()
            self._head_deadline = None

    # -- refusals -------------------------------------------------------------------------

    @override
    def _respondToBadRequestAndDisconnect(self) -> None:
        """Where Twisted gives up on a request: answer as JSON, with the right status."""
        if (
            self._receivedHeaderSize > self.totalHeadersSize
            or self._receivedHeaderCount > self.maxHeaders
        ):
            self._refuse(
                HeadersTooLarge(
                    f"the request head is over {self.maxHeaders} header fields or "
                    f"{self.totalHeadersSize} bytes"
                )
            )
        else:
            self._refuse(InvalidRequest("the request is not valid HTTP/1.1"))

    @override
    def lineLengthExceeded(self, line: bytes) -> None:
        """A request line or header line longer than the whole head may be."""
        self._refuse(HeadersTooLarge(f"a request head line is over {self.totalHeadersSize} bytes"))

    @override
    def timeoutConnection(self) -> None:
        """
        The connection was idle for the idle timeout: a request cut off part way gets 408;
        an idle keep-alive connection is closed without an answer.
        """
        if self._receiving and not self._handlingRequest and not self._refused:
            self._refuse(
                RequestTimeout(f"no request data for {self.timeOut:g}s: request timed out")
            )
            return
        super().timeoutConnection()

    def _refuse(self, error: ProxyError) -> None:
        """Answer C{error} and close; ignore whatever else the client sends."""
        if self._refused:
            return
        self._refused = True
        self._cancel_head_deadline()
        self.setTimeout(None)
        request_id = new_request_id()
        transport: Any = self.transport
        peer = transport.getPeer() if transport is not None else None
        log.info(
            "{status} {code} for {client} ({request_id}): {message}",
            status=error.status,
            code=error.code,
            client=getattr(peer, "host", "?"),
            request_id=request_id.decode("ascii"),
            message=error.message,
        )
        if transport is None:
            return
        transport.write(early_error_response(error, request_id))
        self.loseConnection()

    @override
    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancel_head_deadline()
        super().connectionLost(reason)
