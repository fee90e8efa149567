"""
The upstream HTTP/1.1 client: one L{UpstreamClient} per upstream, each with its own pool of
persistent connections, writing a request in one send and reading its response head in one
pass.

It replaces Twisted's C{Agent} and C{HTTPConnectionPool}, whose layers (endpoint and pool
Deferreds, a state machine per connection and per response, a line-by-line parser, a timer
per pooled connection) cost about a fifth of the proxy's CPU per request; see
C{docs/design.md}. What a caller sees is Twisted's: C{request} fires with an L{IResponse}
whose C{deliverBody} protocol gets a push-producer transport over the upstream socket
(pausing it pauses the socket read) and ends with C{ResponseDone}, C{PotentialDataLoss} or
C{ResponseFailed}.

The response parser is strict, as a proxy's must be (RFC 9112): a status line of
C{HTTP/1.0} or C{HTTP/1.1} and a code from 100 to 599; header names that are tokens; no
obs-fold, NUL or bare CR; one C{Transfer-Encoding}, C{chunked}; one C{Content-Length}
value. Anything else is an L{UpstreamProtocolError} (a 502, or the next upstream) and the
connection is discarded. Bare LF line ends are accepted (RFC 9112 2.2).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from typing import Any

from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IProtocol,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from typing_extensions import override
from zope.interface import implementer

from oaiproxy.errors import (
    InvalidRequest,
    ProxyError,
    UpstreamConnectFailed,
    UpstreamProtocolError,
)
from oaiproxy.http.chunked import ChunkedDecoder
from oaiproxy.http.headers import (
    HOP_BY_HOP,
    MAX_KEPT_NAME,
    canonical,
    is_printable,
    is_valid_name,
    relayed_downstream,
)
from oaiproxy.http.nodelay import set_no_delay
from oaiproxy.http.sendnow import sender, writer
from oaiproxy.tls import openssl_reasons

__all__ = ["MAX_HEAD_BYTES", "RETRY_WINDOW", "UpstreamClient", "tls_failure"]

log = Logger()

#: A response head (status line and fields) longer than this is refused (a 502).
MAX_HEAD_BYTES = 64 * 1024

#: Seconds after a request went out on a reused connection within which losing that
#: connection, with no byte of an answer, sends the request again on a new one. An upstream's
#: keep-alive close races a request within milliseconds; an upstream that dies after holding
#: a request for longer may have worked on it (a second POST could be run, and billed, twice).
RETRY_WINDOW = 1.0

# Fields about the connection, not the response: kept out of the response's headers (as
# Twisted's client keeps them), read for framing and persistence.
_CONTROL = HOP_BY_HOP | {b"content-length", b"proxy-connection"}
_NO_BODY_CODES = frozenset({204, 304})
_DIGITS = b"0123456789"


def tls_failure(exc: BaseException) -> str | None:
    """Why a TLS handshake with an upstream failed, if C{exc} is such a failure."""
    if isinstance(exc, VerificationError | CertificateError):
        return "the certificate does not name the upstream's host"
    if isinstance(exc, SSL.Error):
        details = openssl_reasons(exc)
        if any("certificate verify failed" in d for d in details):
            return "the certificate could not be verified (an unknown CA? see ca= in the docs)"
        return ", ".join(details) or "TLS error"
    return None


def _lost_before_answer(reason: Failure) -> ProxyError:
    """The error for a connection lost before a response head arrived on it."""
    why = tls_failure(reason.value) if reason.value is not None else None
    if why is not None:
        return UpstreamConnectFailed(f"upstream TLS handshake failed: {why}")
    return UpstreamConnectFailed("upstream closed the connection before answering")


class _Head:
    """A parsed response head: what L{_parse_head} found."""

    __slots__ = (
        "chunked",
        "code",
        "downstream",
        "headers",
        "length",
        "persistent",
        "phrase",
        "version",
    )

    def __init__(self) -> None:
        self.version = (b"HTTP", 1, 1)
        self.code = 0
        self.phrase = b""
        self.headers = Headers()
        # The fields relayed to the client, in order: end to end, checked (see _parse_head).
        self.downstream: list[tuple[bytes, bytes]] = []
        self.length: int | None = None
        self.chunked = False
        self.persistent = True


def _find_head_end(data: bytes | bytearray, start: int = 0) -> tuple[int, int]:
    """
    Where the head in C{data} ends and its body starts, or C{(-1, -1)} if not there yet.
    C{start}: where to look from (no empty line ends before it: the caller looked there).
    """
    end = data.find(b"\r\n\r\n", start)
    # Unless a bare LF line end came first: an empty line (LF LF, or LF CRLF) before it.
    if (
        end >= 0
        and data.find(b"\n\n", start, end) < 0
        and data.find(b"\n\r\n", start, end + 2) < 0
    ):
        return end, end + 4
    # Bare LF line ends (RFC 9112 2.2 lets a recipient take them): the first empty line.
    lf = data.find(b"\n\n", start)
    crlf = data.find(b"\n\r\n", start)
    if lf >= 0 and (crlf < 0 or lf < crlf):
        return lf, lf + 2
    if crlf >= 0:
        return crlf, crlf + 3
    return -1, -1


# What a response field name tells, by name as received: its lower case, its canonical form
# in Twisted's Headers, whether it may be relayed downstream. Upstreams send few distinct
# names; the table stops growing at _MAX_NAMES.
_NAMES: dict[bytes, tuple[bytes, bytes, bool]] = {}
_MAX_NAMES = 2048


def _name_info(name: bytes) -> tuple[bytes, bytes, bool] | None:
    """C{name}'s entry of L{_NAMES} (made, and kept while there is room); C{None}: no token."""
    if not is_valid_name(name):
        return None
    lower = name.lower()
    info = (lower, canonical(name), relayed_downstream(lower))
    if len(_NAMES) < _MAX_NAMES and len(name) <= MAX_KEPT_NAME:
        _NAMES[name] = info
    return info


def _parse_head(data: bytes, head_end: int) -> _Head:
    """
    Parse the response head C{data[:head_end]}.

    @raise UpstreamProtocolError: if it is not a valid HTTP/1.1 response head.
    """
    raw = data[:head_end]
    lines = raw.split(b"\r\n")
    # What the CRLFs leave: a CR or LF there is bare (int needles: memchr, unlike counts).
    rest = b"".join(lines)
    if 10 not in rest:
        if 13 in rest:
            raise UpstreamProtocolError("upstream sent an invalid response: a bare CR in its head")
    else:
        lines = [line[:-1] if line.endswith(b"\r") else line for line in raw.split(b"\n")]
        if any(b"\r" in line for line in lines):
            raise UpstreamProtocolError("upstream sent an invalid response: a bare CR in its head")
    if 0 in raw:  # a NUL (an int needle is ten times faster: see h1server._NUL)
        raise UpstreamProtocolError("upstream sent an invalid response: NUL in its head")
    head = _Head()
    status = lines[0].split(b" ", 2)
    if len(status) < 2 or status[0] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise UpstreamProtocolError("upstream sent an invalid response: not HTTP/1.1")
    code = status[1]
    if len(code) != 3 or code.translate(None, _DIGITS) or not b"100" <= code <= b"599":
        raise UpstreamProtocolError("upstream sent an invalid response: bad status code")
    head.code = int(code)
    head.phrase = status[2] if len(status) > 2 else b""
    if status[0] == b"HTTP/1.0":
        head.version = (b"HTTP", 1, 0)
        head.persistent = False
    headers = head.headers
    stored = headers._rawHeaders  # as add_checked stores (Twisted 26.10.0, private)
    downstream = head.downstream
    lengths: list[bytes] = []
    codings: list[bytes] = []
    named: list[bytes] = []
    known = _NAMES
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        info = known.get(name) or _name_info(name)
        if not colon or info is None:
            # Also obs-fold (a line starting with whitespace), which a proxy may refuse
            # (RFC 9112 5.2), and whitespace before the colon (RFC 9112 5.1).
            raise UpstreamProtocolError("upstream sent an invalid response: a bad header line")
        value = value.strip(b" \t")
        lower, canonical, relayed = info
        if lower in _CONTROL:
            if lower == b"content-length":
                lengths.extend(v.strip(b" \t") for v in value.split(b","))
            elif lower == b"transfer-encoding":
                codings.extend(v.strip(b" \t").lower() for v in value.split(b","))
            elif lower == b"connection":
                for raw_token in value.split(b","):
                    token = raw_token.strip(b" \t").lower()
                    if token == b"close":
                        head.persistent = False
                    elif token:
                        named.append(token)
            continue
        stored.setdefault(canonical, []).append(value)
        if relayed:
            downstream.append((name, value))
    if named:
        dropped = {n for n in named if is_valid_name(n)}  # a name that is no token names none
        for name in dropped:
            headers.removeHeader(name)
        head.downstream = [(n, v) for n, v in downstream if n.lower() not in dropped]
    if codings:
        if codings != [b"chunked"]:
            raise UpstreamProtocolError(
                "upstream sent an invalid response: a transfer coding other than chunked"
            )
        head.chunked = True
        if lengths:
            # Both framings (RFC 9112 6.3): chunked wins, and the connection is not trusted
            # with another response.
            head.persistent = False
    elif lengths:
        first = lengths[0]
        if not first or first.translate(None, _DIGITS) or any(v != first for v in lengths):
            raise UpstreamProtocolError("upstream sent an invalid response: a bad Content-Length")
        head.length = int(first)
    return head


@implementer(IPushProducer)
class _BodyTransport:
    """
    The transport a response body's protocol gets: pausing it pauses the upstream socket
    read; stopping it closes the connection (it cannot be reused mid-body).
    """

    def __init__(self, connection: _Connection) -> None:
        #: The connection under the body; C{None} once the body is over (the connection
        #: may serve another request by then).
        self.connection: _Connection | None = connection
        #: Whether the body's reader stopped it (it wants no more of it).
        self.stopped = False

    def pauseProducing(self) -> None:
        if self.connection is not None:
            self.connection.pause_body()

    def resumeProducing(self) -> None:
        if self.connection is not None:
            self.connection.resume_body()

    def stopProducing(self) -> None:
        self.stopped = True
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.stop_body()


@implementer(IResponse)
class _Response:
    """An upstream response: its head, and its body delivered to one protocol."""

    request = None
    previousResponse = None

    def __init__(self, head: _Head, connection: _Connection, length: int | object) -> None:
        self.version = head.version
        self.code = head.code
        self.phrase = head.phrase
        self.headers = head.headers
        #: The response's fields to relay downstream, as L{downstream_response_headers}
        #: would give them (names are tokens, values free of CR, LF and NUL, hop-by-hop and
        #: framing fields left out), found while parsing the head.
        self.downstream_fields = head.downstream
        self.length = length
        #: The upstream's Content-Length, checked, even where no body follows (HEAD, 304):
        #: the length of the body a GET would have had.
        self.declared_length = head.length
        self._transport = _BodyTransport(connection)
        self._protocol: IProtocol | None = None
        self._delivering = False
        #: The whole body, when it came with the head (see L{take_whole}); the relay may take
        #: it from here instead of through L{deliverBody}.
        self.whole_body: bytes | None = None
        # What arrived before deliverBody: body bytes, then the end.
        self._early: list[bytes] = []
        self._ended: Failure | None = None

    def deliverBody(self, protocol: IProtocol) -> None:
        """Send the body to C{protocol}: C{makeConnection}, C{dataReceived}, C{connectionLost}."""
        if self._delivering:
            raise RuntimeError("the body of a response is delivered once")
        self._delivering = True
        self._protocol = protocol
        protocol.makeConnection(self._transport)  # type: ignore[arg-type]  # a producer, as Twisted's
        early, self._early = self._early, []
        for data in early:
            if self._transport.stopped:
                break  # what came before is not wanted either
            protocol.dataReceived(data)
        if self._ended is not None:
            self._end(self._ended)
        else:
            connection = self._transport.connection
            if connection is not None:
                connection.body_wanted(protocol)

    def take_whole(self, body: bytes) -> None:
        """The body arrived whole with the head: nothing more will come from the connection."""
        self.whole_body = body
        self._early = [body]
        self._ended = _DONE
        self._transport.connection = None

    def setPreviousResponse(self, response: IResponse) -> None:
        raise NotImplementedError("redirects are not followed")

    # -- called by the connection --------------------------------------------------------

    @property
    def waiting(self) -> bool:
        """Whether the body has no protocol yet (deliverBody was not called)."""
        return not self._delivering

    def body_data(self, data: bytes) -> None:
        protocol = self._protocol
        if protocol is None:
            if not self._delivering:
                self._early.append(data)
        else:
            protocol.dataReceived(data)

    def body_end(self, reason: Failure) -> None:
        self._transport.connection = None
        if not self._delivering:
            self._ended = reason
        else:
            self._end(reason)

    def _end(self, reason: Failure) -> None:
        self._ended = None
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.connectionLost(reason)


# How every body that arrived whole ends: one Failure for all of them (building one per
# response, as Twisted's client does, cost about 1% of the proxy's instructions per request);
# its readers only check it.
_DONE = Failure(ResponseDone())

# A request body longer than this is written after the head rather than joined to it (a copy
# of a large body would double the memory the request takes for a moment).
_JOIN_BODY = 64 * 1024

# A connection's states: idle (pooled, or new), waiting for a response head, reading a body,
# being closed (nothing more is wanted from it), closed.
_IDLE, _WAITING, _BODY, _CLOSING, _CLOSED = range(5)


class _Call:
    """One request to one upstream, from its first attempt to its response head."""

    __slots__ = (
        "body",
        "client",
        "connecting",
        "connection",
        "data",
        "deferred",
        "method",
        "retried",
    )

    def __init__(
        self, client: UpstreamClient, data: bytes, method: bytes, body: bytes = b""
    ) -> None:
        self.client = client
        #: The request's bytes; a large body apart, after them.
        self.data = data
        self.body = body
        self.method = method
        self.deferred: Deferred[IResponse] = Deferred(self._cancel)
        self.connection: _Connection | None = None
        self.connecting: Deferred[IProtocol] | None = None
        self.retried = False

    def start(self, reuse: bool) -> None:
        connection = self.client._take_idle() if reuse else None
        if connection is not None:
            connection.begin(self, reused=True)
            return
        d = self.connecting = self.client._endpoint.connect(self.client._factory)
        d.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, protocol: IProtocol) -> None:
        self.connecting = None
        assert isinstance(protocol, _Connection)
        if self.deferred.called:  # cancelled meanwhile (the attempt was too far along)
            protocol.close()
            return
        protocol.begin(self, reused=False)

    def _connect_failed(self, failure: Failure) -> None:
        self.connecting = None
        if not self.deferred.called:
            self.deferred.errback(failure)

    def _cancel(self, d: Deferred[IResponse]) -> None:
        connecting, self.connecting = self.connecting, None
        if connecting is not None:
            connecting.cancel()
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.abandon()
        # The Deferred errbacks with CancelledError (no errback above called it).

    def answered(self, response: _Response) -> None:
        self.connection = None
        self.data = self.body = b""
        self.deferred.callback(response)

    def failed(self, error: ProxyError | Failure) -> None:
        self.connection = None
        if not self.deferred.called:
            self.deferred.errback(error if isinstance(error, Failure) else Failure(error))


@implementer(IHandshakeListener)
class _Connection(Protocol):
    """One persistent connection to an upstream: a request at a time."""

    def __init__(self, client: UpstreamClient) -> None:
        self._client = client
        self._state = _IDLE
        self._call: _Call | None = None
        self._response: _Response | None = None
        # The start of a response head that has not arrived whole.
        self._pending: bytearray | None = None
        self._reused = False
        self._received = False
        self._persistent = True
        self._remaining = 0  # body bytes still to come, with a Content-Length
        self._decoder: ChunkedDecoder | None = None
        self._until_close = False
        self._paused = False  # by the body's reader
        self._held = False  # until deliverBody (the read is paused if either is set)
        self._send_now: Callable[[], None] | None = None
        self._write_now: Callable[[bytes], None] | None = None
        self._sent_at = 0.0
        self.idle_since = 0.0
        #: Whether the connection is in its client's idle pool.
        self.pooled = False
        self.lost: Deferred[None] | None = None
        # Fired by handshakeCompleted (see when_handshaken).
        self._handshake: Deferred[_Connection] | None = None
        self._handshaken = False

    @override
    def connectionMade(self) -> None:
        set_no_delay(self.transport)
        self._send_now = sender(self.transport)
        # Plain TCP: a request goes straight to the socket (no epoll_ctl pair around it).
        self._write_now = writer(self.transport)

    def when_handshaken(self) -> Deferred[_Connection]:
        """
        Fires with this connection once its TLS handshake is done (L{HandshakeEndpoint}: an
        upstream's connect deadline covers the handshake); fails with an
        L{UpstreamConnectFailed} saying why if the connection is lost first. Cancelling it
        aborts the connection.
        """
        if self._handshaken:
            return succeed(self)
        if self._state == _CLOSED:
            return fail(UpstreamConnectFailed("upstream TLS handshake failed: connection lost"))
        d: Deferred[_Connection] = Deferred(lambda _: self._abort())
        self._handshake = d
        return d

    def handshakeCompleted(self) -> None:
        """Twisted's TLS layer says the handshake is done: see L{when_handshaken}."""
        self._handshaken = True
        d, self._handshake = self._handshake, None
        if d is not None:
            d.callback(self)

    def _abort(self) -> None:
        self._handshake = None
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # -- requests ------------------------------------------------------------------------

    def begin(self, call: _Call, *, reused: bool) -> None:
        """Write C{call}'s request (whole, and sent at once) and wait for its response."""
        self._state = _WAITING
        self._call = call
        call.connection = self
        self._reused = reused
        self._received = False
        self._persistent = True
        self._until_close = False
        self._sent_at = self._client._clock.seconds()
        assert self.transport is not None
        write_now = self._write_now
        if write_now is not None:
            write_now(call.data)  # sent already, if the socket took it
        else:
            self.transport.write(call.data)
        if call.body:
            # Buffered as it is: write_now would copy what the socket did not take.
            self.transport.write(call.body)
        if (write_now is None or call.body) and self._send_now is not None:
            self._send_now()

    def abandon(self) -> None:
        """The caller gave up on the response (cancelled): this connection is done for."""
        self._call = None
        self.close()

    def retire(self) -> None:
        """Close this connection gracefully (it is healthy, just not needed any more)."""
        if self._closing() and self.transport is not None:
            self.transport.loseConnection()

    def close(self) -> None:
        """Close this connection at once: nothing more is wanted from it."""
        if self._closing() and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _closing(self) -> bool:
        """Mark the connection as being closed (out of the pool); C{False} if it was already."""
        if self._state >= _CLOSING:
            return False
        self._state = _CLOSING
        self._client._forget(self)
        return True

    # -- the body's transport ------------------------------------------------------------

    def pause_body(self) -> None:
        self._paused = True
        if self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resume_body(self) -> None:
        self._paused = False
        if self.transport is not None and not self._held and self._state < _CLOSING:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def _hold(self) -> None:
        """The body has no reader yet: what came is kept, no more is read until deliverBody."""
        self._held = True
        if self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def stop_body(self) -> None:
        """The body's reader wants no more of it: the connection cannot be reused."""
        self.close()

    def body_wanted(self, protocol: IProtocol) -> None:
        """
        deliverBody was called: read again, if waiting for it paused the socket and the
        body's reader did not pause it meanwhile (in its connectionMade or dataReceived).
        A chunked body's decoder hands its data to C{protocol} straight from here on.
        """
        if self._decoder is not None:
            self._decoder.dataCallback = protocol.dataReceived
            # A reader that can take a chunk as the upstream framed it (the relay).
            self._decoder.chunkCallback = getattr(protocol, "chunk_received", None)
        if not self._held:
            return
        self._held = False
        if not self._paused and self._state == _BODY and self.transport is not None:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    # -- IProtocol -----------------------------------------------------------------------

    @override
    def dataReceived(self, data: bytes) -> None:
        state = self._state
        if state == _BODY:
            decoder = self._decoder
            if decoder is None:
                self._body(data)
                return
            # A chunked body (every streamed answer), once per event: decoded here.
            try:
                decoder.dataReceived(data)
            except ValueError as e:  # MalformedChunkedData, or data after the last chunk
                self._body_failed(Failure(e))
        elif state == _WAITING:
            self._received = True
            pending = self._pending
            if pending is None:
                self._head(data)
                return
            # A head arriving in pieces: each piece is looked at once, from where an empty
            # line could end in it (a head trickled a byte per read is not rescanned whole
            # per read, which cost seconds of the reactor for a 64 KiB head).
            start = max(0, len(pending) - 3)
            pending += data
            if _find_head_end(pending, start)[0] < 0:
                if len(pending) > MAX_HEAD_BYTES:
                    self._fail(UpstreamProtocolError("upstream sent a response head too large"))
                return
            self._pending = None
            self._head(bytes(pending))
        elif state == _IDLE:
            # An idle connection speaks out of turn: nothing it says can be trusted.
            self.close()

    def _head(self, data: bytes) -> None:
        while True:
            head_end, body_start = _find_head_end(data)
            if head_end < 0 or head_end > MAX_HEAD_BYTES:
                if len(data) > MAX_HEAD_BYTES:
                    self._fail(UpstreamProtocolError("upstream sent a response head too large"))
                else:
                    self._pending = bytearray(data)
                return
            try:
                head = _parse_head(data, head_end)
            except UpstreamProtocolError as e:
                self._fail(e)
                return
            data = data[body_start:]
            if head.code >= 200:
                self._answer(head, data)
                return
            if head.code == 101:
                self._fail(UpstreamProtocolError("upstream switched protocols"))
                return
            # Informational (100, 103, ...): the final response follows.

    def _answer(self, head: _Head, rest: bytes) -> None:
        call, self._call = self._call, None
        assert call is not None
        self._persistent = head.persistent
        length: int | object
        if call.method == b"HEAD" or head.code in _NO_BODY_CODES:
            length = 0
            self._remaining = 0
        elif head.chunked:
            length = UNKNOWN_LENGTH
        elif head.length is not None:
            length = self._remaining = head.length
        else:
            length = UNKNOWN_LENGTH
            self._until_close = True
            self._persistent = False
        if type(length) is int and 0 < length <= len(rest):
            self._answer_whole(call, head, rest)
            return
        response = self._response = _Response(head, self, length)
        if head.chunked and length is UNKNOWN_LENGTH:
            self._decoder = ChunkedDecoder(response.body_data, self._chunked_done)
        self._state = _BODY
        call.answered(response)
        if self._response is not response or self._state >= _CLOSING:
            return  # ended or stopped in the caller's callback (the body was discarded)
        if length == 0:
            if rest:
                self._persistent = False  # more than the response holds
            self._body_done()
            return
        if rest:
            self.dataReceived(rest)
        if self._response is response and response.waiting:
            self._hold()

    def _answer_whole(self, call: _Call, head: _Head, rest: bytes) -> None:
        """
        The whole body came with the head (a small answer, most non-streamed ones): the
        response is complete before it is handed over (L{_Response.whole_body}), and the
        connection is free for the next request once the caller has it.
        """
        length = self._remaining
        self._remaining = 0
        if len(rest) > length:
            self._persistent = False  # more than the response holds: not to be trusted
        response = _Response(head, self, length)
        response.take_whole(rest[:length] if len(rest) > length else rest)
        if self._persistent:
            self._state = _IDLE
        else:
            self.retire()
        call.answered(response)
        if self._state == _IDLE and self._call is None:
            self._client._put_idle(self)

    def _body(self, data: bytes) -> None:
        """Body bytes without chunked framing (a chunked body is decoded in dataReceived)."""
        response = self._response
        assert response is not None
        if self._until_close:
            response.body_data(data)
            return
        remaining = self._remaining
        if len(data) < remaining:
            self._remaining = remaining - len(data)
            response.body_data(data)
            return
        self._remaining = 0
        if len(data) > remaining:
            self._persistent = False  # more than the response holds: not to be trusted
            data = data[:remaining]
        if data:
            response.body_data(data)
        self._body_done()

    def _chunked_done(self, extra: bytes) -> None:
        if extra:
            self._persistent = False
        self._body_done()

    def _body_done(self) -> None:
        """The whole body arrived: end its delivery, then pool or close the connection."""
        response, self._response = self._response, None
        self._decoder = None
        if self._state >= _CLOSING:
            pass  # stopped by the body's reader as its last bytes arrived: not to be pooled
        elif not self._persistent:
            self.retire()
        else:
            self._state = _IDLE
        if response is not None:
            response.body_end(_DONE)
        if self._state != _IDLE or self._call is not None:
            return  # closed, or already reused, in the body's callback
        if self._paused or self._held:
            self._held = False
            self.resume_body()  # an idle connection is read, to see the upstream close it
        self._client._put_idle(self)

    def _body_failed(self, reason: Failure) -> None:
        response, self._response = self._response, None
        self._decoder = None
        self.close()
        if response is not None:
            response.body_end(Failure(ResponseFailed([reason])))

    def _fail(self, error: ProxyError) -> None:
        """The response head is unusable: fail the call, discard the connection."""
        call, self._call = self._call, None
        self.close()
        if call is not None:
            call.failed(error)

    @override
    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        state, self._state = self._state, _CLOSED
        self._client._forget(self)
        handshake, self._handshake = self._handshake, None
        if handshake is not None:
            why = tls_failure(reason.value) if reason.value is not None else None
            error = UpstreamConnectFailed(
                f"upstream TLS handshake failed: {why or 'the connection was closed'}"
            )
            handshake.errback(Failure(error))
        call, self._call = self._call, None
        if call is not None:
            if (
                self._reused
                and not self._received
                and not call.retried
                and self._client._clock.seconds() - self._sent_at < RETRY_WINDOW
            ):
                # The upstream closed a pooled connection as the request went out (its
                # keep-alive timeout, most likely): once more, on a new connection. Not when
                # the upstream had the request for a while (it may have worked on it).
                call.retried = True
                call.connection = None
                log.info(
                    "upstream {origin} closed a pooled connection as a request went out on it: "
                    "sent again on a new one (is upstream_keepalive above its keep-alive "
                    "timeout?)",
                    origin=self._client._origin.decode("ascii", "replace"),
                )
                call.start(reuse=False)
            else:
                call.failed(_lost_before_answer(reason))
        response, self._response = self._response, None
        # The chunked decoder holds a method of this connection: a reference cycle (through
        # the response, to the relay and the client's request) left for the collector.
        self._decoder = None
        if response is not None:
            if self._until_close and state == _BODY and reason.check(ConnectionDone):
                response.body_end(Failure(PotentialDataLoss()))
            else:
                response.body_end(Failure(ResponseFailed([reason])))
        lost, self.lost = self.lost, None
        if lost is not None:
            lost.callback(None)


class _ConnectionFactory(Factory):
    """Builds an upstream's connections, quietly (no log line per connection)."""

    noisy = False

    def __init__(self, client: UpstreamClient) -> None:
        self._client = client

    @override
    def buildProtocol(self, addr: Any) -> _Connection:
        return _Connection(self._client)


@implementer(IAgent)
class UpstreamClient:
    """
    The HTTP/1.1 client of one upstream: requests go out over its persistent connections,
    reused most recent first; a connection idle for C{keepalive} seconds is closed, and at
    most C{idle_connections} are kept idle (busy ones are not capped).

    @param origin: the scheme, host and port every URL given to L{request} starts with
        (C{b"http://127.0.0.1:9001"}): the rest is the request target.
    @param endpoint: where connections are made (TLS, and the connect deadline, included).
    """

    def __init__(
        self,
        clock: IReactorTime,
        origin: bytes,
        endpoint: IStreamClientEndpoint,
        *,
        idle_connections: int,
        keepalive: float,
    ) -> None:
        self._clock = clock
        self._origin = origin
        self._endpoint = endpoint
        self._factory = _ConnectionFactory(self)
        self._max_idle = idle_connections
        self._keepalive = keepalive
        # Idle connections, oldest first.
        self._idle: list[_Connection] = []
        self._sweep_call: IDelayedCall | None = None
        self._closed = False

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        """
        Send a request; the Deferred fires with the response once its head arrived, or fails
        with a L{ProxyError} (or the connection attempt's failure). Cancelling it closes the
        connection or the attempt. A body must be in memory: a producer with a C{take()}
        (L{oaiproxy.http.forwarder.BytesProducer}).

        @raise ValueError: for a URL of another origin.
        @raise InvalidRequest: for a method or request target that cannot be written as
            HTTP/1.1 as it is (a 400: the client's doing).
        """
        origin = self._origin
        if not uri.startswith(origin) or uri[len(origin) : len(origin) + 1] != b"/":
            raise ValueError(f"not a URL of this upstream: {uri!r}")
        # A fragment is the client's own business (RFC 9110 4.2.4), never sent.
        target = uri[len(origin) :].partition(b"#")[0]
        if not is_printable(target):
            raise InvalidRequest("the request target cannot be forwarded as HTTP/1.1")
        if not is_valid_name(method):
            raise InvalidRequest("the method cannot be forwarded as HTTP/1.1")
        lines = [b"%s %s HTTP/1.1\r\n" % (method, target)]
        body = b""
        if bodyProducer is not None:
            take: Callable[[], bytes] | None = getattr(bodyProducer, "take", None)
            if take is None:
                raise ValueError("request bodies must be in memory")
            body = take()
            lines.append(b"Content-Length: %d\r\n" % len(body))
        elif method in (b"POST", b"PUT"):
            lines.append(b"Content-Length: 0\r\n")  # as Twisted's client: they expect a body
        if headers is not None:
            extend = lines.extend  # pieces joined once below: cheaper than formatting each
            for name, values in headers.getAllRawHeaders():
                for value in values:
                    extend((name, b": ", value, b"\r\n"))
        lines.append(b"\r\n")
        if len(body) > _JOIN_BODY:
            # A large body (an image, an audio file) is not copied into the request's bytes.
            call = _Call(self, b"".join(lines), method, body)
        else:
            lines.append(body)
            call = _Call(self, b"".join(lines), method)
        call.start(reuse=True)
        return call.deferred

    def close(self) -> Deferred[None]:
        """Close the idle connections (on shutdown); fires once they are closed."""
        self._closed = True
        if self._sweep_call is not None and self._sweep_call.active():
            self._sweep_call.cancel()
        self._sweep_call = None
        waits: list[Deferred[None]] = []
        for connection in list(self._idle):
            d: Deferred[None] = Deferred()
            connection.lost = d
            waits.append(d)
            connection.retire()
        self._idle.clear()
        done: Deferred[Any] = DeferredList(waits)
        return done.addCallback(lambda _: None)

    # -- the idle pool -------------------------------------------------------------------

    def _take_idle(self) -> _Connection | None:
        idle = self._idle
        if not idle:
            return None
        now = self._clock.seconds()
        connection = idle.pop()
        connection.pooled = False
        if now - connection.idle_since < self._keepalive:
            return connection
        # That one, and all older ones, are past their keep-alive time.
        expired = [connection, *idle]
        idle.clear()
        for c in expired:
            c.pooled = False
            c.retire()
        return None

    def _put_idle(self, connection: _Connection) -> None:
        idle = self._idle
        if self._closed or not self._max_idle:
            connection.retire()  # shut down (a request that finished after close()), or no pool
            return
        if len(idle) >= self._max_idle:
            idle[0].retire()  # the oldest goes (it is the nearest to its keep-alive end)
        connection.idle_since = self._clock.seconds()
        connection.pooled = True
        idle.append(connection)
        if self._sweep_call is None:
            self._sweep_call = self._clock.callLater(self._keepalive, self._sweep)

    def _forget(self, connection: _Connection) -> None:
        """A connection was lost or closed: out of the idle pool, if it was there."""
        if connection.pooled:  # (most are not: no list search, no ValueError to catch)
            connection.pooled = False
            with suppress(ValueError):
                self._idle.remove(connection)

    def _sweep(self) -> None:
        """Close the connections idle for C{keepalive}; come back for the next one."""
        self._sweep_call = None
        now = self._clock.seconds()
        idle = self._idle
        while idle and now - idle[0].idle_since >= self._keepalive:
            idle[0].retire()  # takes it out of the list
        if idle:
            wait = idle[0].idle_since + self._keepalive - now
            self._sweep_call = self._clock.callLater(wait, self._sweep)
