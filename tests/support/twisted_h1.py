# This module subclasses Twisted's unannotated HTTPChannel: calling its methods through
# super() is unavoidable here.
# mypy: disallow-untyped-calls=False
"""
The test reference: the proxy's HTTP/1.1 channel before L{oaiproxy.http.h1server}, kept to
compare the two (C{tests/test_h1_reference.py}). Not used by the proxy.

The HTTP/1.1 server channel: Twisted's L{HTTPChannel} with a proxy's stricter request parsing
and its refusals as OpenAI-shaped JSON.

Twisted answers every request it cannot parse with a bare C{400 Bad Request} and no body, and
silently drops a connection whose head or body stalls. A proxy in front of OpenAI clients must
do better (see C{shared/BAD-INPUTS.md}), and must refuse what would let a client and an
upstream read one message two ways:

- a malformed head (request line, header syntax, CR/LF/NUL in a value, both Content-Length
  and Transfer-Encoding, a duplicate, signed, hex or over-long Content-Length) gets 400 as
  JSON, and the connection is closed; so do obsolete line folding, any Transfer-Encoding
  other than C{chunked}, and chunked in an HTTP/1.0 request (Twisted accepts all three), and
  a malformed chunked body;
- more than C{max_headers} header fields, or a head over C{max_header_bytes}, gets 431;
- a head not complete C{header_timeout} seconds after its first byte (slowloris), or a body
  that stops arriving for the idle timeout, gets 408.

Chunked request bodies are decoded by L{ChunkedDecoder}, as upstream bodies are. After a
refusal the connection is aborted if it has not closed within C{abortTimeout} (a peer that
does not read cannot hold it).

Nothing refused here reaches the resource, so nothing is forwarded upstream. Written against
Twisted 26.10.0: it overrides C{HTTPChannel._respondToBadRequestAndDisconnect} and
C{_send100Continue}, sets C{_transferDecoder}, and reads C{_handlingRequest}, C{_version},
C{_receivedHeaderSize}, C{_receivedHeaderCount} and C{LineReceiver._buffer}, which are private.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers
from typing_extensions import override

from oaiproxy.errors import HeadersTooLarge, InvalidRequest, ProxyError, RequestTimeout
from oaiproxy.http.chunked import ChunkedDecoder, MalformedChunkedData
from oaiproxy.http.early import early_error_response, new_request_id
from tests.support import twisted_head as requesthead

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
    @cvar fast_heads: read heads that arrive whole at once (L{requesthead.parse_head});
        tests turn it off to compare with the line-by-line path.
    """

    fast_heads = True

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
        self._abort_call: IDelayedCall | None = None
        # Between the first line of a request head and its end; between its end and the
        # end of its body.
        self._in_head = False
        self._in_body = False
        self._refused = False

    _host: Any = None

    @override
    def getHost(self) -> Any:
        """
        The connection's local address, asked of the socket once: Twisted's request asks for
        it in its constructor, a C{getsockname} system call per request (1.6% of the
        proxy's CPU in the non-streaming profile), and it cannot change.
        """
        if self._host is None:
            self._host = super().getHost()
        return self._host

    # -- the head deadline --------------------------------------------------------------

    @override
    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if self._busyReceiving:
            # Called from inside the parse under way (the end of a body hands what follows
            # it back this way): LineReceiver only queues the bytes, for the loop running
            # below us, and that loop's caller checks them once parsed. Checked here, a
            # pipelined request's body (pretty-printed JSON) looked like a head with bare LFs.
            super().dataReceived(data)
            return
        if not (self.fast_heads and requesthead.parse_head(self, data)):
            super().dataReceived(data)
        if self._bare_lf():
            # Twisted splits heads on CRLF only: it would wait for the head deadline (408,
            # which clients retry) on a head its client thinks complete.
            self._refuse(InvalidRequest("a line of the request head has a bare LF"))
            return
        if self._head_deadline is None and not self._refused and self._partial_line():
            # The first bytes of a head whose first line has not ended yet.
            self._arm_head_deadline()

    def _bare_lf(self) -> bool:
        """Whether the head waiting in the line buffer has an LF not preceded by CR."""
        buffer: bytes = self._buffer  # LineReceiver's (private) buffer
        return (
            bool(buffer)
            and bool(self.line_mode)
            and not self._refused
            and buffer.count(b"\n") != buffer.count(b"\r\n")
        )

    def _partial_line(self) -> bool:
        """Whether part of a request line waits in the line buffer (not a lone CRLF)."""
        return (
            bool(self.line_mode)
            and not self._handlingRequest
            and bool(self._buffer.strip(b"\r\n"))  # LineReceiver's (private) buffer
        )

    def _arm_head_deadline(self) -> None:
        self._head_deadline = self._reactor.callLater(self._header_timeout, self._head_too_slow)

    @override
    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            return
        if b"\n" in line or b"\r" in line:
            # A bare LF or CR inside a CRLF-ended line (RFC 9112 section 2.2): the client and
            # Twisted would not agree on where the line ends.
            self._refuse(InvalidRequest("a line of the request head has a bare CR or LF"))
            return
        if not self._in_head:
            if line:
                # The first line of a head (an empty line between requests is ignored, as
                # RFC 9112 section 2.2 allows and Twisted does).
                self._in_head = True
                if self._head_deadline is None:
                    self._arm_head_deadline()
        elif line[:1] in (b" ", b"\t"):
            # Obsolete line folding (RFC 9112 section 5.2): a server must reject it or
            # unfold it; unfolding is how one message gets read two ways.
            self._refuse(InvalidRequest("obsolete line folding in a request header"))
            return
        super().lineReceived(line)

    @override
    def headerReceived(self, line: bytes) -> bool:
        name, sep, value = line.partition(b":")
        name = name.lower()
        value = value.strip(b" \t")
        if sep and name == b"transfer-encoding":
            if value.lower() != b"chunked":
                self._refuse(InvalidRequest("the only transfer coding accepted is chunked"))
                return False
            if self._version != b"HTTP/1.1":
                # RFC 9112 section 6.1: faulty framing in an HTTP/1.0 message.
                self._refuse(InvalidRequest("chunked transfer coding needs HTTP/1.1"))
                return False
        if sep and name == b"content-length" and not (value.isdigit() and len(value) <= 18):
            # Twisted's int() of a 5,000-digit value raises past its own error handling.
            self._refuse(InvalidRequest("invalid Content-Length"))
            return False
        ok: bool = super().headerReceived(line)
        if ok and sep and name == b"transfer-encoding":
            # Chunked request bodies are parsed like upstream ones: one loop per read, and
            # trailers counted rather than buffered and rescanned (Twisted's decoder is
            # quadratic on trailers sent a byte at a time).
            self._transferDecoder = ChunkedDecoder(
                self.requests[-1].handleContentChunk, self._finishRequestBody
            )
        return ok

    @override
    def rawDataReceived(self, data: bytes) -> None:
        try:
            super().rawDataReceived(data)
        except MalformedChunkedData:
            self._respondToBadRequestAndDisconnect()

    @override
    def allHeadersReceived(self) -> None:
        self._cancel_head_deadline()
        self._in_head = False
        self._in_body = True
        super().allHeadersReceived()

    @override
    def _send100Continue(self) -> None:
        """
        Invite the body (C{Expect: 100-continue}), unless the request was already answered:
        a body known to be over the cap gets its 413 from L{ProxyRequest.gotLength} just
        before this, and Twisted would write C{100 Continue} after that answer. Nor when no
        body is coming (no C{Content-Length}, or 0, and not chunked), as over HTTP/2.
        """
        request = self.requests[-1] if self.requests else None
        if self._refused or getattr(request, "answered_early", False) or self.length == 0:
            return
        super()._send100Continue()

    @override
    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        """
        Twisted's, writing the response head as one string: its C{writeSequence} of four
        pieces per header field cost a type check and a list append for each piece. The
        status line says C{HTTP/1.1} whatever the request's version (Twisted echoes it): RFC
        9110 section 6.2 asks a server for the highest version it conforms to with the
        request's major version, as nginx answers, and as this channel's own refusals did.
        An HTTP/1.0 client still gets what it can read: no chunked coding, and
        C{Connection: close} (L{checkPersistence}).
        """
        version = b"HTTP/1.1"
        if not isinstance(headers, Headers) or self.transport is None:
            super().writeHeaders(version, code, reason, headers)
            return
        head = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                head += (name, b": ", value, b"\r\n")
        head.append(b"\r\n")
        self.transport.write(b"".join(head))

    @override
    def allContentReceived(self) -> None:
        self._in_body = False
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
    def checkPersistence(self, request: Any, version: bytes) -> bool:
        """
        Twisted's, but C{close} is found as RFC 9110 section 7.6.1 lists it: in any
        C{Connection} field, among comma-separated options (Twisted split the first field on
        spaces only: C{close, te} or a second C{Connection: close} kept the connection).
        """
        if version != b"HTTP/1.1":
            # As Twisted: HTTP/1.0 answers may need the close to end them. Said in the answer,
            # whose status line says HTTP/1.1 (writeHeaders).
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            return False
        for value in request.requestHeaders.getRawHeaders(b"connection", ()):
            if any(option.strip().lower() == b"close" for option in value.split(b",")):
                request.responseHeaders.setRawHeaders(b"connection", [b"close"])
                return False
        return True

    @override
    def timeoutConnection(self) -> None:
        """
        The connection was idle for the idle timeout: a request cut off part way gets 408;
        an idle keep-alive connection is closed without an answer.
        """
        receiving = self._in_head or self._in_body or self._partial_line()
        if receiving and not self._handlingRequest and not self._refused:
            self._refuse(
                RequestTimeout(f"no request data for {self.timeOut:g}s: request timed out")
            )
            return
        # Twisted 26.10.0's, but at debug level: reaping idle keep-alive connections is
        # routine, and Twisted's info line per connection was thousands of lines.
        transport: Any = self.transport
        self._log.debug("closing an idle connection from {client}", client=transport.getPeer())
        if self.abortTimeout is not None:
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)
        self.loseConnection()

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
        # A peer that does not read could keep the closing connection (and its buffered
        # answer) forever: abort it after abortTimeout, as Twisted's own idle timeout does.
        self._abort_call = self._reactor.callLater(self.abortTimeout or 15, self._abort)

    def _abort(self) -> None:
        self._abort_call = None
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    @override
    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancel_head_deadline()
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        super().connectionLost(reason)
