"""
The HTTP/1.1 server channel: requests read, checked and handed to Twisted's request objects,
without Twisted's C{HTTPChannel}.

Twisted's channel is a C{LineReceiver}: it splits a head line by line, through three layers of
methods per line, with a timer cancelled and made again per request; what a proxy must add to
it (see C{shared/BAD-INPUTS.md}) took another layer of overrides reading its private state.
Measured with valgrind (C{bench/floor.py}), twisted.web's server path costs about 310,000
instructions per request more than a minimal HTTP/1.1 server on the same reactor. This channel
reads a head whole (one C{split}, one loop over its fields), keeps one idle timer per
connection, and refuses, as OpenAI-shaped JSON, what must not be forwarded:

- a malformed head (request line, header syntax, a bare CR or LF, NUL, obsolete line
  folding, both Content-Length and Transfer-Encoding, a duplicate, signed, hex or over-long
  Content-Length, any Transfer-Encoding but C{chunked}, chunked in HTTP/1.0) or a malformed
  chunked body: 400, and the connection is closed;
- more than C{max_headers} header fields, or a head (or one of its lines) over
  C{max_header_bytes}: 431;
- a head not complete C{header_timeout} seconds after its first byte (slowloris), or a
  request that stops arriving for the idle timeout: 408.

After a refusal nothing more is read, and the connection is aborted if it has not closed
within C{abortTimeout}. An idle keep-alive connection is closed without an answer. A request
waiting on its upstream is never timed out here (the exchange has its own deadlines).

The requests are Twisted's (L{oaiproxy.http.resource.ProxyRequest}); the channel gives them
what Twisted's C{HTTPChannel} gives: C{writeHeaders}, C{write}, C{writeSequence},
C{requestDone}, C{registerProducer}, C{unregisterProducer}, C{getPeer}, C{getHost},
C{isSecure}, C{loseConnection}, C{site} and C{factory}. It is the producer of its transport,
as Twisted's is: a client that does not read pauses the request's producer (the relay), and
an idle connection's reading. Written against Twisted 26.10.0: it uses Twisted's private
C{_PullToPush} for a non-streaming producer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from weakref import WeakKeyDictionary

from twisted.internet._producer_helpers import _PullToPush
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime, ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import _parseRequestLine
from twisted.web.http_headers import Headers, InvalidHeaderName
from twisted.web.iweb import INonQueuedRequestFactory
from typing_extensions import override
from zope.interface import implementer

from oaiproxy.errors import HeadersTooLarge, InvalidRequest, ProxyError, RequestTimeout
from oaiproxy.http.chunked import ChunkedDecoder, MalformedChunkedData
from oaiproxy.http.early import early_error_response, new_request_id
from oaiproxy.http.headers import CANONICAL_NAMES, canonical
from oaiproxy.http.nodelay import set_no_delay
from oaiproxy.http.sendnow import SendTools, send_tools

__all__ = [
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_MAX_HEADERS",
    "DEFAULT_MAX_HEADER_BYTES",
    "H1Channel",
    "request_line",
]

log = Logger()

DEFAULT_MAX_HEADERS = 100
DEFAULT_MAX_HEADER_BYTES = 32 * 1024
DEFAULT_HEADER_TIMEOUT = 30.0

# While a request is handled, what its client sends next is kept; past this many bytes the
# connection is not read until the request is answered (as Twisted's channel does).
_PIPELINE_BUFFER = 16 * 1024

# The request-target bytes Twisted's C{_parseRequestLine} accepts (33 to 176): deleting them
# from a valid target leaves nothing.
_TARGET_BYTES = bytes(range(33, 177))

# Methods taken without checking each byte: tokens, all of them. Others go through Twisted's
# parser.
_KNOWN_METHODS = frozenset((b"GET", b"POST", b"PUT", b"PATCH", b"DELETE", b"HEAD", b"OPTIONS"))

_VERSIONS = frozenset((b"HTTP/1.1", b"HTTP/1.0"))

# Header names known to be tokens, and their canonical forms (the one table of them, kept by
# headers.canonical). A field named there is taken as it is, unless it frames the body.
_NAMES = CANONICAL_NAMES
_FRAMING = frozenset((b"Content-Length", b"Transfer-Encoding"))


def _field_error(line: bytes, version: bytes) -> ProxyError | None:
    """What is wrong with the header field C{line} on its own, if anything."""
    if line[:1] in (b" ", b"\t"):
        # Obsolete line folding (RFC 9112 section 5.2): a server must reject it or unfold
        # it; unfolding is how one message gets read two ways.
        return InvalidRequest("obsolete line folding in a request header")
    raw_name, colon, value = line.partition(b":")
    if not colon:
        return InvalidRequest("the request is not valid HTTP/1.1")
    try:
        name = canonical(raw_name)
    except InvalidHeaderName:
        return InvalidRequest("the request is not valid HTTP/1.1")
    value = value.strip(b" \t")
    if name == b"Content-Length" and not (value.isdigit() and len(value) <= 18):
        return InvalidRequest("invalid Content-Length")
    if name == b"Transfer-Encoding":
        if value.lower() != b"chunked":
            return InvalidRequest("the only transfer coding accepted is chunked")
        if version != b"HTTP/1.1":
            # RFC 9112 section 6.1: faulty framing in an HTTP/1.0 message.
            return InvalidRequest("chunked transfer coding needs HTTP/1.1")
    return None


# Whether each request factory seen takes no queued argument (INonQueuedRequestFactory).
_NON_QUEUED: WeakKeyDictionary[Any, bool] = WeakKeyDictionary()


def _non_queued(factory: Any) -> bool:
    """Whether C{factory} takes no queued argument; asked of zope once per factory."""
    known = _NON_QUEUED.get(factory)
    if known is None:
        # zope's providedBy of a class costs microseconds.
        known = _NON_QUEUED[factory] = bool(INonQueuedRequestFactory.providedBy(factory))
    return known


# NUL as an int: CPython 3.11 looks for a bytes needle in bytes only after trying it as an
# int and clearing the TypeError, about ten times slower.
_NUL = 0

# Reading states.
_HEAD, _BODY, _HANDLING, _CLOSED = range(4)


def request_line(line: bytes) -> tuple[bytes, bytes, bytes] | None:
    """
    C{line}'s method, target and version, as Twisted's C{_parseRequestLine} would return them;
    C{None} where it would refuse them. Its per-byte loop over the target (in Python, about
    20 bytecode lines per request) is one C{translate} here, for the common methods.
    """
    parts = line.split(b" ")
    if len(parts) != 3:
        return None
    method, target, version = parts
    if method not in _KNOWN_METHODS:
        try:
            return _parseRequestLine(line)
        except ValueError:
            return None
    if version not in _VERSIONS or not target or target.translate(None, _TARGET_BYTES):
        return None
    return method, target, version


@implementer(IPushProducer)
class H1Channel(Protocol):
    """
    An HTTP/1.1 server connection that refuses bad or slow requests with OpenAI-shaped errors.

    @param reactor: runs the deadlines.
    @param max_headers: header fields allowed in one request head.
    @param max_header_bytes: bytes allowed in one request head (request line and fields,
        without line ends), and in any one of its lines.
    @param header_timeout: seconds from the first byte of a request head to its end.
    @ivar timeOut: the idle timeout, in seconds (set by the site, as on Twisted's channel);
        C{None}: none.
    @ivar abortTimeout: seconds a closing connection may take to go before it is aborted.
    """

    # The channel's own state in slots: read by specialized instructions however many there
    # are. In CPython 3.11 an instance's dictionary keeps that speed for at most 29 names
    # (across the class's instances); the channel had 38, and turned into a plain dictionary
    # on its first request. What Twisted and the site set (transport, factory, ...) stays in
    # the dictionary.
    __slots__ = (
        "_abort_call",
        "_blank_allowed",
        "_buffer",
        "_command",
        "_decoder",
        "_factory",
        "_head_call",
        "_header_timeout",
        "_host",
        "_idle_call",
        "_non_queued",
        "_path",
        "_peer",
        "_processing",
        "_producer_streaming",
        "_reactor",
        "_refused",
        "_remaining",
        "_request",
        "_requestProducer",
        "_searched",
        "_secure",
        "_state",
        "_transport_paused",
        "_version",
        "_waiting_for_transport",
        "maxHeaders",
        "persistent",
        "totalHeadersSize",
    )

    abortTimeout = 15
    #: The header values of every request read here are free of CR, LF and NUL.
    values_checked = True
    #: The ways of sending on this connection at once (L{sendnow.send_tools}), for the
    #: relay; made when it connects.
    send_tools: SendTools | None = None
    requestFactory: Any = None
    site: Any = None
    factory: Any = None
    #: Called once when the connection is lost, after the request hears of it (a plain
    #: listener gives its connection slot back so: see L{ProxySite.build_plain}).
    on_close: Callable[[], object] | None = None

    def __init__(
        self,
        reactor: IReactorTime,
        *,
        max_headers: int = DEFAULT_MAX_HEADERS,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    ) -> None:
        self._reactor = reactor
        self.callLater = reactor.callLater
        self.timeOut: float | None = None
        self.maxHeaders = max_headers
        self.totalHeadersSize = max_header_bytes
        self._header_timeout = header_timeout
        self._state = _HEAD
        # Bytes read and not yet parsed: a head in progress (a bytearray once it is over
        # 1 KiB and still unfinished), a body, or what a client pipelined behind a request
        # being handled.
        self._buffer: bytes | bytearray = b""
        # How much of the buffer holds no complete head (searched already).
        self._searched = 0
        # An empty line before a request line is ignored, once (as Twisted does).
        self._blank_allowed = True
        self._request: Any = None
        self._version = b""
        self._command = b""
        self._path = b""
        self._remaining = 0  # body bytes still to come, by Content-Length
        self._decoder: ChunkedDecoder | None = None
        self.persistent = True
        self._processing = False
        self._refused = False
        # Whether this channel stopped the transport's reading (a client not reading its
        # answers while no request is handled, or too much pipelined behind one).
        self._transport_paused = False
        self._waiting_for_transport = False
        self._requestProducer: Any = None
        self._producer_streaming = True
        self._head_call: IDelayedCall | None = None
        self._idle_call: IDelayedCall | None = None
        self._abort_call: IDelayedCall | None = None
        self._host: Any = None
        self._peer: Any = None
        self._secure: bool | None = None
        # The request factory last used, and whether it takes no queued argument.
        self._factory: Any = None
        self._non_queued = False

    # -- the connection ------------------------------------------------------------------

    @override
    def connectionMade(self) -> None:
        transport: Any = self.transport
        # Small writes (a response head, an SSE event) must not wait on the client's
        # delayed ACK: Nagle off, as Twisted's HTTPChannel does (TLS included).
        set_no_delay(transport)
        self.send_tools = send_tools(transport)
        transport.registerProducer(self, True)
        self._arm_idle()

    @property
    def _networkProducer(self) -> Any:
        """The transport, which reads the connection: for the switch to HTTP/2."""
        return self.transport

    def setTimeout(self, period: float | None) -> None:
        """Set the idle timeout (C{None}: none); for the switch to HTTP/2."""
        self.timeOut = period
        if period is None:
            self._cancel_idle()
        else:
            self._arm_idle()

    def getPeer(self) -> Any:
        """The client's address, asked of the transport once (Twisted's makes a new address
        object each time, and each request asks)."""
        if self._peer is None:
            assert self.transport is not None
            self._peer = self.transport.getPeer()
        return self._peer

    def getHost(self) -> Any:
        """The local address, asked of the socket once (it cannot change)."""
        if self._host is None:
            assert self.transport is not None
            self._host = self.transport.getHost()
        return self._host

    def isSecure(self) -> bool:
        """Whether the connection is over TLS, found once."""
        if self._secure is None:
            self._secure = ISSLTransport(self.transport, None) is not None
        return self._secure

    def loseConnection(self) -> None:
        transport: Any = self.transport
        if transport is None:
            return
        transport.unregisterProducer()
        transport.loseConnection()

    @override
    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        self._state = _CLOSED
        self._cancel_head_deadline()
        self._cancel_idle()
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        self._decoder = None
        self._buffer = b""
        self.send_tools = None  # they hold the transport
        request, self._request = self._request, None
        on_close, self.on_close = self.on_close, None
        try:
            if request is not None:
                request.connectionLost(reason)
        finally:
            if on_close is not None:
                on_close()

    # -- reading -------------------------------------------------------------------------

    @override
    def dataReceived(self, data: bytes) -> None:
        state = self._state
        if state == _CLOSED or self._refused:
            return
        buffer = self._buffer
        if not buffer:
            self._buffer = data
        elif type(buffer) is bytearray:
            buffer += data  # in place: a head trickling in is not copied per read
        else:
            self._buffer = buffer + data
        if state == _HANDLING:
            if len(self._buffer) > _PIPELINE_BUFFER:
                self._pause_reading()
            return
        idle = self._idle_call
        if idle is not None and self.timeOut is not None:
            idle.reset(self.timeOut)
        if not self._processing:
            self._process()

    def _process(self) -> None:
        """Read what the buffer holds, request after request, until it needs more."""
        self._processing = True
        try:
            while not self._refused:
                state = self._state
                if state == _HEAD:
                    if not self._read_head():
                        break
                elif state == _BODY:
                    if not self._read_body():
                        break
                else:
                    break
        finally:
            self._processing = False
        if (
            self._state == _HEAD
            and self._buffer
            and self._head_call is None
            and not self._refused
            and self._buffer.strip(b"\r\n")
        ):
            # The first bytes of a head that has not ended yet.
            self._head_call = self.callLater(self._header_timeout, self._head_too_slow)

    def _read_head(self) -> bool:
        """Read a head if the buffer holds one whole; whether to read on."""
        buffer = self._buffer
        if self._blank_allowed and buffer[:2] == b"\r\n":
            buffer = self._buffer = buffer[2:]
            self._blank_allowed = False
            self._searched = 0
        if not buffer:
            return False
        # A head trickled in a byte at a time is searched and checked once per byte, not
        # once per byte for every byte before it: the search starts where the last one
        # stopped, and the checks run when a line ends (or the head outgrows its limit).
        searched = self._searched
        end = buffer.find(b"\r\n\r\n", searched - 3 if searched > 3 else 0)
        if end < 0:
            self._searched = len(buffer)
            if type(buffer) is bytes and len(buffer) > 1024:
                # A head arriving in pieces: gathered in place from now on.
                self._buffer = bytearray(buffer)
            if (
                buffer.find(b"\n", searched) >= 0
                or buffer.find(b"\r", searched) >= 0
                or len(buffer) > self.totalHeadersSize
            ):
                self._check_partial_head(buffer)
            return False
        self._searched = 0
        head = bytes(buffer[:end])
        self._buffer = bytes(buffer[end + 4 :])
        self._cancel_head_deadline()
        return self._start_request(head)

    def _check_partial_head(self, buffer: bytes | bytearray) -> None:
        """Refuse a head that cannot become valid, before its end arrives."""
        buffer = bytes(buffer)
        crlfs = buffer.count(b"\r\n")
        if buffer.count(b"\n") != crlfs:
            # An LF without its CR: the client thinks its line (or head) ended. Waiting
            # would end in a 408 that clients retry.
            self._refuse(InvalidRequest("a line of the request head has a bare LF"))
            return
        last = buffer.rfind(b"\r\n")
        if last > 0 and buffer.count(b"\r", 0, last) != crlfs - 1:
            # A CR inside a line that has ended: the head can never be valid.
            self._refuse(InvalidRequest("a line of the request head has a bare CR or LF"))
            return
        # A CR at the end (its LF, or the end of the head, on its way) counts for no line.
        size = len(buffer) - (buffer[-1] == 13)
        if size - (last + 2 if last >= 0 else 0) > self.totalHeadersSize:
            self._refuse(
                HeadersTooLarge(f"a request head line is over {self.totalHeadersSize} bytes")
            )
            return
        if size - 2 * crlfs > self.totalHeadersSize or crlfs > self.maxHeaders + 1:
            self._too_large()
            return
        if last < 0:
            return
        # The lines that have ended, checked as they would be in a whole head: the request
        # line, and each field line but the last (which an obs-fold line could continue).
        lines = buffer[:last].split(b"\r\n")
        if request_line(lines[0]) is None:
            self._refuse(InvalidRequest("the request is not valid HTTP/1.1"))
            return
        version = lines[0][-8:]
        for at, line in enumerate(lines[1:], 2):
            if line[:1] in (b" ", b"\t"):
                self._refuse(InvalidRequest("obsolete line folding in a request header"))
                return
            if at < len(lines):
                error = _field_error(line, version)
                if error is not None:
                    self._refuse(error)
                    return

    def _too_large(self) -> None:
        self._refuse(
            HeadersTooLarge(
                f"the request head is over {self.maxHeaders} header fields or "
                f"{self.totalHeadersSize} bytes"
            )
        )

    def _start_request(self, head: bytes) -> bool:
        """Check C{head}, make its request and read on; C{False} if it was refused."""
        lines = head.split(b"\r\n")
        fields = len(lines) - 1
        rest = b"".join(lines)  # what the CRLFs leave: a CR or LF there is bare
        if 10 in rest or 13 in rest:  # int needles: memchr, unlike counts
            self._refuse(InvalidRequest("a line of the request head has a bare CR or LF"))
            return False
        if max(map(len, lines)) > self.totalHeadersSize:
            self._refuse(
                HeadersTooLarge(f"a request head line is over {self.totalHeadersSize} bytes")
            )
            return False
        if fields > self.maxHeaders or len(head) - 2 * fields > self.totalHeadersSize:
            self._too_large()
            return False
        parsed = request_line(lines[0])
        if parsed is None:
            self._refuse(InvalidRequest("the request is not valid HTTP/1.1"))
            return False
        method, target, version = parsed
        has_nul = _NUL in head
        raw: dict[bytes, list[bytes]] = {}
        length: bytes | None = None
        chunked = False
        names = _NAMES
        for line in lines[1:]:
            raw_name, colon, value = line.partition(b":")
            value = value.strip(b" \t")
            name = names.get(raw_name) if colon else None
            if name is None or name in _FRAMING:
                error = _field_error(line, version)
                if error is not None:
                    self._refuse(error)
                    return False
                name = canonical(raw_name)
                if name == b"Content-Length":
                    if length is not None or chunked:
                        self._refuse(InvalidRequest("invalid Content-Length"))
                        return False
                    length = value
                elif name == b"Transfer-Encoding":
                    if chunked or length is not None:
                        self._refuse(InvalidRequest("the request is not valid HTTP/1.1"))
                        return False
                    chunked = True
            raw.setdefault(name, []).append(value)
        if has_nul:
            self._refuse(InvalidRequest("invalid header value"))
            return False

        factory = self.requestFactory
        if factory is not self._factory:
            self._factory = factory
            self._non_queued = _non_queued(factory)
        request = factory(self) if self._non_queued else factory(self, 0)
        request.requestHeaders._rawHeaders = raw  # checked as Headers.addRawHeader would
        self._request = request
        self._command, self._path, self._version = method, target, version
        self._blank_allowed = True
        self.persistent = self.checkPersistence(request, version)
        if chunked:
            request.gotLength(None)
            self._decoder = ChunkedDecoder(request.handleContentChunk, self._body_done)
        else:
            request.gotLength(int(length) if length is not None else 0)
            self._remaining = int(length) if length is not None else 0
        if self._closing():
            return False  # answered at once (a body over the cap): read nothing more
        expect = raw.get(b"Expect")
        if (
            expect is not None
            and expect[0].lower() == b"100-continue"
            and version == b"HTTP/1.1"
            and (chunked or self._remaining)
        ):
            transport: Any = self.transport
            transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if chunked or self._remaining:
            self._state = _BODY
            return True
        self._received()
        return True

    def _read_body(self) -> bool:
        """Read what the buffer holds of the body; whether to read on."""
        buffer = bytes(self._buffer)  # bytes already (a head's rest): not copied
        self._buffer = b""
        if not buffer:
            return False
        request = self._request
        decoder = self._decoder
        if decoder is not None:
            try:
                decoder.dataReceived(buffer)
            except MalformedChunkedData:
                self._refuse(InvalidRequest("the request is not valid HTTP/1.1"))
                return False
            if self._closing():
                return False
            return self._state != _BODY
        remaining = self._remaining
        if len(buffer) < remaining:
            self._remaining = remaining - len(buffer)
            request.handleContentChunk(buffer)
            return False
        self._buffer = buffer[remaining:]
        self._remaining = 0
        if remaining:
            request.handleContentChunk(buffer[:remaining] if self._buffer else buffer)
        if self._closing():
            return False
        self._received()
        return True

    def _body_done(self, rest: bytes) -> None:
        """The chunked body ended; C{rest} is what followed it."""
        self._decoder = None
        self._buffer = rest + self._buffer
        if not self._closing():
            self._received()

    def _closing(self) -> bool:
        """Whether the connection is closing (a request answered at once: a body over the
        cap); then nothing more is read."""
        transport: Any = self.transport
        if self._state == _CLOSED:
            return True
        if transport is None or transport.disconnecting:
            self._state = _CLOSED
            if transport is not None:
                # Closed by the request (ProxyRequest's early 413): stop being its producer,
                # and abort it if it has not gone within abortTimeout.
                self._abort_call = self.callLater(self.abortTimeout or 15, self._abort)
                self.loseConnection()
            return True
        return False

    def _received(self) -> None:
        """The request is read whole: hand it over."""
        self._state = _HANDLING
        request = self._request
        request.requestReceived(self._command, self._path, self._version)

    # -- answering -----------------------------------------------------------------------

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        """
        Whether the connection serves another request after C{request}. C{close} is found as
        RFC 9110 section 7.6.1 lists it: in any C{Connection} field, among comma-separated
        options. An HTTP/1.0 request is answered with C{Connection: close} (its answer may
        need the close to end it), under an C{HTTP/1.1} status line (L{writeHeaders}).
        """
        if version != b"HTTP/1.1":
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            return False
        for value in request.requestHeaders._rawHeaders.get(b"Connection", ()):
            if any(option.strip().lower() == b"close" for option in value.split(b",")):
                request.responseHeaders.setRawHeaders(b"connection", [b"close"])
                return False
        return True

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        """
        Write the response head as one string. The status line says C{HTTP/1.1} whatever
        the request's version: RFC 9110 section 6.2 asks a server for the highest version it
        conforms to with the request's major version, as nginx answers.
        """
        if not isinstance(headers, Headers):
            # Pairs: through Headers, which refuses CR, LF and NUL in names and values.
            sanitized = Headers()
            for name, value in headers:
                sanitized.addRawHeader(name, value)
            headers = sanitized
        head = [b"HTTP/1.1 ", code, b" ", reason, b"\r\n"]
        for name, values in headers._rawHeaders.items():  # Twisted 26.10.0's (private)
            for value in values:
                head += (name, b": ", value, b"\r\n")
        head.append(b"\r\n")
        transport: Any = self.transport
        transport.write(b"".join(head))

    def write(self, data: bytes) -> None:
        transport: Any = self.transport
        transport.write(data)

    def writeSequence(self, data: list[bytes]) -> None:
        transport: Any = self.transport
        transport.writeSequence(data)

    def requestDone(self, request: Any) -> None:
        """C{request} is answered: read the next one, or close."""
        if request is not self._request:
            raise TypeError("not the request being handled")
        self._request = None
        self._decoder = None
        if self._state == _CLOSED:
            return
        if not self.persistent:
            self._state = _CLOSED
            self.loseConnection()
            return
        self._state = _HEAD
        self._arm_idle()
        self._maybe_resume_reading()
        if self._buffer and not self._processing:
            self._process()

    # -- producers -----------------------------------------------------------------------

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """The request's producer: paused while the client does not read."""
        if self._requestProducer is not None:
            raise RuntimeError(
                f"Cannot register producer {producer}, because producer {self._requestProducer} "
                "was never unregistered."
            )
        if not streaming:
            producer = _PullToPush(producer, self)
        self._requestProducer = producer
        self._producer_streaming = streaming
        if not streaming:
            producer.startStreaming()

    def unregisterProducer(self) -> None:
        producer, self._requestProducer = self._requestProducer, None
        if producer is not None and not self._producer_streaming:
            producer.stopStreaming()

    def pauseProducing(self) -> None:
        """The client does not read: pause the request's producer, and an idle connection."""
        self._waiting_for_transport = True
        if self._requestProducer is not None:
            self._requestProducer.pauseProducing()
        if self._state != _HANDLING:
            self._pause_reading()

    def resumeProducing(self) -> None:
        self._waiting_for_transport = False
        if self._requestProducer is not None:
            self._requestProducer.resumeProducing()
        self._maybe_resume_reading()

    def _pause_reading(self) -> None:
        if not self._transport_paused and self._state != _CLOSED:
            self._transport_paused = True
            transport: Any = self.transport
            transport.pauseProducing()

    def _maybe_resume_reading(self) -> None:
        """Read the connection again if this channel stopped it and nothing holds it now:
        no request is handled and the client reads its answers."""
        if (
            self._transport_paused
            and not self._waiting_for_transport
            and self._state not in (_HANDLING, _CLOSED)
        ):
            self._transport_paused = False
            transport: Any = self.transport
            transport.resumeProducing()

    def stopProducing(self) -> None:
        if self._requestProducer is not None:
            self._requestProducer.stopProducing()

    # -- deadlines and refusals ----------------------------------------------------------

    def _arm_idle(self) -> None:
        timeout = self.timeOut
        if timeout is None:
            return
        call = self._idle_call
        if call is not None and call.active():
            call.reset(timeout)
        else:
            self._idle_call = self.callLater(timeout, self._idle_expired)

    def _cancel_idle(self) -> None:
        call, self._idle_call = self._idle_call, None
        if call is not None and call.active():
            call.cancel()

    def _idle_expired(self) -> None:
        """
        Nothing came for the idle timeout: a request cut off part way gets 408; an idle
        keep-alive connection is closed without an answer. A request being handled (waiting
        on its upstream, say) is not timed out: the timer starts again once it is answered.
        """
        self._idle_call = None
        if self._state == _HANDLING or self._refused or self._state == _CLOSED:
            return
        if self._state == _BODY or self._buffer.strip(b"\r\n"):
            self._refuse(
                RequestTimeout(f"no request data for {self.timeOut:g}s: request timed out")
            )
            return
        # Routine: at debug level (Twisted's info line per connection was thousands of lines).
        transport: Any = self.transport
        log.debug("closing an idle connection from {client}", client=transport.getPeer())
        self._state = _CLOSED
        self._abort_call = self.callLater(self.abortTimeout or 15, self._abort)
        self.loseConnection()

    def _head_too_slow(self) -> None:
        self._head_call = None
        if self._state == _HEAD and not self._refused:
            self._refuse(
                RequestTimeout(
                    f"the request head took longer than {self._header_timeout:g}s to arrive"
                )
            )

    def _cancel_head_deadline(self) -> None:
        call, self._head_call = self._head_call, None
        if call is not None and call.active():
            call.cancel()

    def _refuse(self, error: ProxyError) -> None:
        """Answer C{error} and close; ignore whatever else the client sends."""
        if self._refused:
            return
        self._refused = True
        self._buffer = b""
        self._cancel_head_deadline()
        self._cancel_idle()
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
        if transport is None or self._state == _CLOSED:
            return
        self._state = _CLOSED
        transport.write(early_error_response(error, request_id))
        # A peer that does not read could keep the closing connection (and its buffered
        # answer) forever: abort it after abortTimeout.
        self._abort_call = self.callLater(self.abortTimeout or 15, self._abort)
        self.loseConnection()

    def _abort(self) -> None:
        self._abort_call = None
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()
