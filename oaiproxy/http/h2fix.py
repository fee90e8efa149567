# This module subclasses Twisted's unannotated (private) HTTP/2 and channel-switch classes,
# so calling their methods is unavoidable here.
# mypy: disallow-untyped-calls=False
"""
Twisted's HTTP/2 server with the gaps a streaming proxy falls into closed.

Written against Twisted 26.10.0 (and h2 4.4.1). It subclasses the private
L{twisted.web._http2.H2Connection} and L{twisted.web.http._GenericHTTPChannelProtocol} and
overrides the public C{dataReceived} of the first (replacing its event loop) and private
methods (C{_requestReceived}, C{_requestDataReceived},
C{_requestEnded}, C{_requestAborted}, C{_requestDone}, C{_terminate}, C{abortRequest},
C{writeHeaders}, C{_handlePriorityUpdate},
C{_handleWindowUpdate}, C{_sendPrioritisedData}) and uses its private state (the stream
queues, the priority tree, the Rapid Reset token bucket C{_resetTokens}, a stream's
C{_request}), so re-read those two
classes (and re-run C{tests.test_h2fix} and C{tests.test_h2_hardening}) whenever Twisted is
upgraded.

What changes compared with Twisted's own classes:

 - B{No busy loop on a closed flow-control window.} Twisted keeps a stream with queued data
   scheduled while its window (the smaller of the stream's and the connection's) is zero, so
   its send loop reschedules itself with C{callLater(0)} until a WINDOW_UPDATE arrives: 100%
   CPU. Here such a stream is blocked in the priority tree, and a WINDOW_UPDATE (stream or
   connection level) or a larger C{SETTINGS_INITIAL_WINDOW_SIZE} unblocks it and wakes the
   sleeping send loop, which Twisted never does.
 - B{Bounded memory per stream.} Twisted queues up to the client's flow-control window per
   stream, however slowly the client reads its socket; a client may advertise 2 GiB. Here a
   stream's producer is paused once C{stream_high_water} bytes are queued for it, and resumed
   when the queue drains below half of that (and the window is open). Queued bytes are counted
   per stream instead of summing the queue on every write.
 - B{No idle timeout under a waiting stream.} Twisted's idle timer only hears frames, so a
   stream waiting on a slow upstream (a long silent generation) gets its connection cut. Here
   the timeout is re-armed while every open stream is waiting on this server; a connection
   whose client has stopped sending or reading is still timed out.
 - B{A send deadline for finished responses.} Once a response is complete its relay is gone;
   bytes of it that the client takes none of for the send deadline get the stream reset
   (L{_tail_stalled}), even while the client keeps the connection busy with other frames.
 - B{Closed after a GOAWAY.} After a GOAWAY for an error (or the idle timeout) the
   connection is closed as soon as the GOAWAY is written (RFC 9113 section 5.4.1), and its
   streams are cancelled at once; a client that does not read is aborted after
   C{abortTimeout}. Twisted's stayed the transport's producer, which keeps a TLS connection
   open: it lingered until the idle timeout plus C{abortTimeout}.
 - B{Nothing read into a dead connection.} After a GOAWAY, bytes that still arrive are
   dropped instead of being appended to h2's frame buffer (a flood would sit there).
 - B{No empty-frame floods.} More than 100 DATA frames that carry nothing and end nothing
   close the connection with GOAWAY ENHANCE_YOUR_CALM (CVE-2019-9518).
 - B{PRIORITY only for open streams.} Twisted inserts a never-removed node in its priority
   tree for a PRIORITY frame on any idle or closed stream; past 1,000 the C{priority} library
   raises out of C{dataReceived}. Here such frames are ignored.
 - B{Requests answered on their own stream.} Some requests are answered here with an
   OpenAI-shaped JSON error on their stream alone (L{_refuse}), never reaching the resource:
   C{CONNECT} (no C{:path}; Twisted's request crashed on it, dropping the connection and every
   stream on it) gets 405. A request body over the cap (a C{content-length} over it, or DATA
   passing it) gets 413 at once, not after the whole body has been read with window granted
   for it; the stream is then reset with NO_ERROR so that the client stops sending, and what
   it sent meanwhile is acknowledged on the connection window only. A request body that stops
   coming for the idle timeout gets 408 (the HTTP/1.1 body deadline), even while the client
   keeps the connection busy (with PINGs, say).
 - B{One bad stream, one stream error.} A malformed request (see L{h2streams}) gets
   RST_STREAM(PROTOCOL_ERROR) on its stream alone, and an excess one REFUSED_STREAM; each is
   logged (info, with the stream id and the reason), as is every protocol error that ends a
   connection. Twisted logged none of them.
 - B{Rapid Reset costs no upstream work.} A stream reset in the same read that opened it
   never reaches the resource, and nothing is dispatched after an event that ended the
   connection; a response for a connection closed by a GOAWAY is dropped quietly (the
   exchange cancelled) instead of raising out of h2. A client that resets its streams
   early in later reads (each request started upstream, then cancelled) is closed with
   GOAWAY ENHANCE_YOUR_CALM once L{PREMATURE_RESETS} of its streams were reset within
   L{PREMATURE_RESET_LIFETIME} seconds of opening and they are more than half of its
   streams (Envoy's rule); Twisted's own token bucket let 1,000 of them through at once.
 - B{Control frame floods.} PING and SETTINGS frames beyond a burst of
   L{CONTROL_FRAME_BURST} (then L{CONTROL_FRAME_RATE} a second) end the connection with
   GOAWAY ENHANCE_YOUR_CALM; Twisted answered every one. A client that does not read those
   answers is aborted as Twisted does, logged at info level instead of error.
 - B{Header limits.} The HTTP/1.1 limits (C{max_headers} fields, C{max_header_bytes})
   hold per request: over them, 431 on the stream. C{SETTINGS_MAX_HEADER_LIST_SIZE}
   advertises them (Twisted advertised h2's 64 KiB and enforced nothing of its own).
 - B{Injected reactor.} Twisted's ALPN switch builds C{H2Connection()}, which takes the global
   reactor; L{ProxySite} and L{ProxyHTTPChannelSwitch} pass theirs down.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from contextlib import suppress
from typing import Any, ClassVar, Final, TypeVar, cast

import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import priority
from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    ILoggingContext,
    IProtocolFactory,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web._http2 import _END_STREAM_SENTINEL, H2Connection
from twisted.web.error import ExcessiveBufferingError
from twisted.web.http import HTTPChannel, Request, _GenericHTTPChannelProtocol
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import Site
from typing_extensions import override
from zope.interface import implementer

from oaiproxy.errors import (
    BodyTooLarge,
    HeadersTooLarge,
    MethodNotAllowed,
    ProxyError,
    RequestTimeout,
)
from oaiproxy.http.capacity import ConnectionLimit, Refusal
from oaiproxy.http.early import early_error_h2, request_id_for
from oaiproxy.http.h1server import (
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_MAX_HEADERS,
    H1Channel,
)
from oaiproxy.http.h2streams import RefusingH2Connection, StreamRejected
from oaiproxy.http.headers import FORWARDED_ALLOW, for_log
from oaiproxy.http.stall import StallWatch
from oaiproxy.http.throttle import Throttle
from oaiproxy.tls import openssl_reasons

__all__ = [
    "DEFAULT_STREAM_HIGH_WATER",
    "ProxyH2Connection",
    "ProxyHTTPChannelSwitch",
    "ProxySite",
]

#: Empty DATA frames (no data, no END_STREAM) one connection may send before it is closed.
MAX_EMPTY_DATA_FRAMES: Final = 100

#: A stream the client resets within this many seconds of opening it, before its response
#: ended, is reset early ("premature", as Envoy counts them).
PREMATURE_RESET_LIFETIME: Final = 1.0

#: Early resets after which a connection is closed (GOAWAY ENHANCE_YOUR_CALM), when they are
#: also more than half of the streams it opened: Rapid Reset spread over reads, each request
#: started upstream and then cancelled. A client cancelling long generations is not counted.
PREMATURE_RESETS: Final = 100

#: PING and SETTINGS frames a client may send in a burst, and how many more each second:
#: past that, GOAWAY ENHANCE_YOUR_CALM (each costs an answer; a flood of them is work for
#: nothing). Clients send a few: keep-alive and RTT pings, one SETTINGS per connection.
CONTROL_FRAME_BURST: Final = 500
CONTROL_FRAME_RATE: Final = 50.0

DEFAULT_STREAM_HIGH_WATER: Final = 256 * 1024
"""Bytes of response data queued per HTTP/2 stream before its producer is paused."""


_CLOSED: Final = "the HTTP/2 connection is closed"

#: Control frames a client can send at will, each answered: counted against a token bucket.
_CONTROL_EVENTS = (h2.events.PingReceived, h2.events.RemoteSettingsChanged)


def _take_token(tokens: float, elapsed: float, burst: float, rate: float) -> tuple[float, bool]:
    """
    One step of a token bucket (Twisted's against Rapid Reset, and ours for control frames):
    C{tokens} refilled for C{elapsed} seconds (never below 0: the clock may step back) at
    C{rate}, up to C{burst}; then one spent if there is one. The tokens left, and whether
    one was spent.
    """
    tokens = min(burst, tokens + max(0.0, elapsed) * rate)
    if tokens < 1:
        return tokens, False
    return tokens - 1, True


#: The events of a request, dropped for a stream reset in the same bytes (the reset itself is
#: still handled).
_REQUEST_EVENTS = (
    h2.events.RequestReceived,
    h2.events.DataReceived,
    h2.events.StreamEnded,
    h2.events.TrailersReceived,
)


class ProxyH2Connection(H2Connection):
    """
    One server-side HTTP/2 connection: Twisted's, with bounded, spin-free sending.

    @ivar stream_high_water: bytes of response data queued for one stream at which that
        stream's producer is paused; it is resumed below half of this.
    @ivar frames_per_turn: DATA frames sent per reactor turn before yielding to other work.
    """

    # This class's own state in slots (see H1Channel's): with Twisted's, the connection held
    # 37 names, past the 29 CPython 3.11 keeps in an instance's compact attribute array.
    __slots__ = (
        "_above_high_water",
        "_body_received",
        "_body_watches",
        "_continue_wanted",
        "_control_tokens",
        "_control_tokens_at",
        "_early_resets",
        "_empty_data_frames",
        "_opened_at",
        "_queued_bytes",
        "_streams_started",
        "_tails",
        "max_header_bytes",
        "max_headers",
        "send_timeout",
        "stream_high_water",
    )

    frames_per_turn = 16
    _log = Logger()
    # Set by Twisted's unannotated code; declared for the type checker.
    _reactor: IReactorTime
    requestFactory: Callable[..., IRequest]
    # Twisted's class attributes say None, but the channel switch sets the Site here.
    site: Site | None = None  # type: ignore[assignment]
    factory: http.HTTPFactory | None = None  # type: ignore[assignment]

    def __init__(
        self,
        reactor: IReactorTime,
        stream_high_water: int = DEFAULT_STREAM_HIGH_WATER,
        send_timeout: float | None = None,
        max_headers: int = DEFAULT_MAX_HEADERS,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    ) -> None:
        """
        @param reactor: schedules the send loop and the idle timeout.
        @param max_headers: header fields allowed in one request head, pseudo-header
            fields not counted (as HTTP/1.1 counts the fields, not the request line); more
            get 431 on the stream.
        @param max_header_bytes: bytes allowed in one request head, counted as the lengths
            of the names and values of all its fields, pseudo-header fields included; more
            get 431 on the stream.
        @param stream_high_water: see L{stream_high_water}; must be positive.
        @param send_timeout: seconds a finished response may wait on a client that takes
            none of its queued bytes before its stream is reset (L{_tail_stalled}); C{None}:
            no limit.
        @raise ValueError: if C{stream_high_water} is not positive.
        """
        if stream_high_water <= 0:
            raise ValueError(f"stream_high_water must be positive, not {stream_high_water}")
        self.stream_high_water = stream_high_water
        self.send_timeout = send_timeout
        # Finished responses whose bytes still wait on the client, by stream.
        self._tails: dict[int, StallWatch] = {}
        # Response bytes queued and not yet sent, per stream.
        self._queued_bytes: dict[int, int] = {}
        # Streams whose producer is paused for crossing the high-water mark.
        self._above_high_water: set[int] = set()
        # Request body bytes received so far, per stream.
        self._body_received: dict[int, int] = {}
        # The body deadline of each stream whose request body is still coming.
        self._body_watches: dict[int, StallWatch] = {}
        self._empty_data_frames = 0
        # When each stream that reached the resource was opened; how many did; how many of
        # those the client reset early (see PREMATURE_RESETS).
        self._opened_at: dict[int, float] = {}
        self._streams_started = 0
        self._early_resets = 0
        self._control_tokens = float(CONTROL_FRAME_BURST)
        self._control_tokens_at = reactor.seconds()
        # Whether the request being received asked for 100 Continue (see _send100Continue).
        self._continue_wanted = False
        self.max_headers = max_headers
        self.max_header_bytes = max_header_bytes
        super().__init__(reactor)
        # Twisted's own state machine, but resetting excess (REFUSED_STREAM) and malformed
        # (PROTOCOL_ERROR) streams one by one instead of failing the whole connection: see
        # h2streams. The header list size advertised is what the limits allow, counted as
        # RFC 9113 does (32 bytes more per field; 4 pseudo-header fields).
        self.conn = RefusingH2Connection(
            config=self.conn.config,
            max_header_list_size=max_header_bytes + 32 * (max_headers + 4),
        )

    @override
    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        """Schedule the idle and abort timers on the injected reactor, not the global one."""
        return self._reactor.callLater(period, func)

    # Events from the client.

    @override
    def dataReceived(self, data: bytes) -> None:
        """
        Handle the client's bytes: Twisted's, plus a log event for a protocol error that ends
        the connection, the streams h2 rejected on their own (L{StreamRejected}), and a
        re-plan of the streams if the client resized its stream windows.
        """
        if self._closed:
            # GOAWAY went out (a protocol error) or came in: the connection is being torn
            # down. h2 would append whatever still arrives to its frame buffer before
            # refusing it, so a client flooding a dead connection (a CONTINUATION flood, say)
            # held its bytes in memory until a full garbage collection.
            return
        initial_window = self.conn.remote_settings.initial_window_size
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as error:
            self._log.info(
                "closing an HTTP/2 connection from {client}: {error}",
                client=self._peer_host(),
                error=str(error) or type(error).__name__,
            )
            self._terminate(Failure())
            return
        # Only frames that parse count as activity.
        self.resetTimeout()
        terminated = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
        if terminated:
            # The client sent GOAWAY: h2 will send nothing more on this connection, so no
            # request in these bytes can be answered. The connection is lost.
            self._dispatch(terminated[0])
            return
        # A stream the client resets in the same bytes that opened it never reaches the
        # resource (Rapid Reset: no upstream work is started and then cancelled for it).
        # Likewise the rest of a request the client resets in the same bytes that end it: its
        # DATA is credited to the connection window only, and only the reset is handled.
        reset_now = {e.stream_id for e in events if isinstance(e, h2.events.StreamReset)}
        for event in events:
            if self._closed or not self._stillProducing:
                # An earlier event ended the connection (our GOAWAY): Twisted went on starting
                # requests, which reached the upstream and answered into a closed connection.
                break
            if isinstance(event, _CONTROL_EVENTS) and not self._spend_control_token():
                break
            if getattr(event, "stream_id", None) in reset_now and isinstance(
                event, _REQUEST_EVENTS
            ):
                if isinstance(event, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                continue
            self._dispatch(event)
        self._tryToWriteControlData()
        # A new SETTINGS_INITIAL_WINDOW_SIZE resizes every stream window without any
        # WINDOW_UPDATE event, and Twisted ignores RemoteSettingsChanged.
        if (
            self._stillProducing
            and self.conn.remote_settings.initial_window_size != initial_window
        ):
            self._replan_streams(list(self.streams))

    def _dispatch(self, event: h2.events.Event) -> None:
        """Hand one h2 event to its handler, as Twisted's C{dataReceived} does."""
        if isinstance(event, h2.events.RequestReceived):
            self._requestReceived(event)
        elif isinstance(event, h2.events.DataReceived):
            self._requestDataReceived(event)
        elif isinstance(event, h2.events.StreamEnded):
            self._requestEnded(event)
        elif isinstance(event, h2.events.StreamReset):
            self._requestAborted(event)
        elif isinstance(event, h2.events.WindowUpdated):
            self._handleWindowUpdate(event)
        elif isinstance(event, h2.events.PriorityUpdated):
            self._handlePriorityUpdate(event)
        elif isinstance(event, StreamRejected):
            self._stream_rejected(event)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._close_transport()
            self.connectionLost(
                Failure(ConnectionLost("Remote peer sent GOAWAY")), _cancelTimeouts=False
            )

    def _stream_rejected(self, event: StreamRejected) -> None:
        """A stream h2 reset on its own (see L{h2streams}): log it, and forget its request."""
        self._log.info(
            "HTTP/2 stream {stream} from {client} reset ({error_code}): {reason}",
            stream=event.stream_id,
            client=self._peer_host(),
            error_code=event.error_code.name,
            reason=for_log(event.reason),
        )
        self._forget_stream(event.stream_id, event.reason)

    @override
    def _requestReceived(self, event: h2.events.RequestReceived) -> None:
        """Start a request, unless this proxy answers it here (L{_refusal_for})."""
        error = self._refusal_for(event.headers)
        if error is not None:
            self._refuse(event.stream_id, error, _header(event.headers, b"x-request-id"))
            return
        self._continue_wanted = False  # set by _send100Continue, as Twisted builds the request
        super()._requestReceived(event)
        self._opened_at[event.stream_id] = self._reactor.seconds()
        self._streams_started += 1
        self._queued_bytes[event.stream_id] = 0
        self._body_received[event.stream_id] = 0
        if event.stream_ended is None:
            self._watch_body(event.stream_id)
        cap = self._body_cap(event.stream_id)
        # A content-length over the cap (the request noted it): answer before any DATA.
        if cap is not None and getattr(self._request_of(event.stream_id), "body_too_large", False):
            self._refuse(
                event.stream_id, BodyTooLarge.over(cap), _header(event.headers, b"x-request-id")
            )
            return
        if self._continue_wanted and event.stream_ended is None:  # a body is coming
            super()._send100Continue(event.stream_id)

    @override
    def _send100Continue(self, streamID: int) -> None:
        """
        Twisted sends C{100 Continue} while it builds the request, before the proxy has
        looked at it: held until L{_requestReceived} has (no 100 before a 413, nor for a
        request whose HEADERS ended the stream), as over HTTP/1.1.
        """
        self._continue_wanted = True

    def _refusal_for(self, headers: list[tuple[bytes, bytes]]) -> ProxyError | None:
        """
        The error a request head gets here, before Twisted's request is made, if any.

        A head over C{max_headers} or C{max_header_bytes} gets 431, as over HTTP/1.1.
        C{CONNECT} (a tunnel: C{:authority} and no C{:path}, which h2 accepts) is refused:
        Twisted's request would crash on the missing path, taking the connection down.
        """
        fields = sum(1 for name, _ in headers if not name.startswith(b":"))
        size = sum(len(name) + len(value) for name, value in headers)
        if fields > self.max_headers or size > self.max_header_bytes:
            return HeadersTooLarge(
                f"the request head is over {self.max_headers} header fields or "
                f"{self.max_header_bytes} bytes"
            )
        method = _header(headers, b":method")
        if method == b"CONNECT" or _header(headers, b":path") is None:
            return MethodNotAllowed(
                f"{(method or b'?').decode('latin-1')} is not supported: this is not a "
                "forward proxy",
                allow=FORWARDED_ALLOW,
            )
        return None

    def _refuse(self, stream_id: int, error: ProxyError, given_id: bytes | None) -> None:
        """
        Answer one stream with C{error} and forget it; the connection and its other streams
        carry on. Nothing of the stream's request reaches the resource (a Twisted request
        already made for it is told its client went away).

        @param given_id: the client's C{x-request-id}, if any (used if sane).
        """
        request_id = request_id_for(given_id)
        self._log.info(
            "{status} {code} for HTTP/2 stream {stream} from {client} ({request_id}): {message}",
            status=error.status,
            code=error.code,
            stream=stream_id,
            client=self._peer_host(),
            request_id=request_id.decode("ascii"),
            message=error.message,
        )
        self._forget_stream(stream_id, error.message)
        self._answer(stream_id, error, request_id)
        self._tryToWriteControlData()

    def _answer(self, stream_id: int, error: ProxyError, request_id: bytes) -> None:
        """
        Send C{error} on a stream at once, then RST_STREAM(NO_ERROR) if the client has not
        finished sending its request: RFC 9113 section 8.1 lets a server answer before the
        request is complete and so ask the client to stop sending it.

        The answer bypasses the priority queue (no response of the stream is under way). If
        the client's window is too small for it, the stream is only reset (CANCEL): waiting
        for the window would hold the stream open for the client.
        """
        h2_stream = self.conn.streams.get(stream_id)
        if self._closed or h2_stream is None or h2_stream.closed:
            return
        head, body = early_error_h2(error, request_id)
        if self._window(stream_id) < len(body):
            self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
            return
        self.conn.send_headers(stream_id, head)
        self.conn.send_data(stream_id, body, end_stream=True)
        if not h2_stream.closed:
            self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)

    def _peer_host(self) -> str:
        """The client's address for log events."""
        transport: Any = self.transport
        peer = transport.getPeer() if transport is not None else None
        return str(getattr(peer, "host", "?"))

    @property
    def _closed(self) -> bool:
        """Whether GOAWAY went out or came in: the connection is being torn down."""
        return self.conn.state_machine.state is h2.connection.ConnectionState.CLOSED

    @override
    def _handlePriorityUpdate(self, event: h2.events.PriorityUpdated) -> None:
        """
        Apply a client's priority only to a stream that is open. Twisted inserts a node for
        any other stream id, idle or closed, and never removes it: a client sending PRIORITY
        frames for many ids grows the tree until the C{priority} library's limit of 1,000
        raises out of C{dataReceived} (a traceback and a dropped connection). RFC 9113
        deprecates this signal; ignoring it for streams not open loses nothing.
        """
        if event.stream_id not in self.streams:
            return
        # A priority that cannot be applied (a dependency loop, say) leaves the stream as is.
        with suppress(priority.PriorityLoop, priority.BadWeightError, priority.PseudoStreamError):
            super()._handlePriorityUpdate(event)

    @override
    def _requestDataReceived(self, event: h2.events.DataReceived) -> None:
        """
        Count DATA frames that carry nothing and end nothing: a flood of them costs CPU and
        moves no request forward (CVE-2019-9518). Past L{MAX_EMPTY_DATA_FRAMES} on one
        connection it is closed with GOAWAY ENHANCE_YOUR_CALM.
        """
        if event.stream_id not in self.streams:
            # A stream answered here, or reset by the client in the same read: its DATA
            # still counts against the connection window (h2 closed the stream, so this
            # acknowledges the connection only).
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            return
        if self._over_body_cap(event):
            # Answered (413) and reset: acknowledge on the connection window only.
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            return
        if not event.data and event.stream_ended is None:
            self._empty_data_frames += 1
            if self._empty_data_frames > MAX_EMPTY_DATA_FRAMES:
                self._calm_down("too many empty DATA frames")
                return
        super()._requestDataReceived(event)

    def _watch_body(self, stream_id: int) -> None:
        """
        Give a request body the HTTP/1.1 body deadline: no DATA on the stream for the idle
        timeout and it gets 408 (L{_body_stalled}). The connection's idle timer cannot do it:
        any frame (a PING) re-arms it, so one stalled upload held its stream for ever.
        """
        if self.timeOut is None:
            return
        self._body_watches[stream_id] = StallWatch(
            self._reactor,
            self.timeOut,
            lambda: self._body_received.get(stream_id),
            lambda: self._body_stalled(stream_id),
        )

    def _body_stalled(self, stream_id: int) -> None:
        """A request body stopped coming: 408 on its stream, which is then reset."""
        self._body_watches.pop(stream_id, None)
        if stream_id not in self.streams:
            return
        error = RequestTimeout(f"no request data for {self.timeOut:g}s: request timed out")
        self._refuse(stream_id, error, self._given_request_id(stream_id))

    def _stop_body_watch(self, stream_id: int) -> None:
        watch = self._body_watches.pop(stream_id, None)
        if watch is not None:
            watch.cancel()

    def _request_of(self, stream_id: int) -> IRequest:
        """The Twisted request of an open stream."""
        request: IRequest = self.streams[stream_id]._request
        return request

    def _given_request_id(self, stream_id: int) -> bytes | None:
        """The C{x-request-id} the client sent with an open stream's request, if any."""
        given = self._request_of(stream_id).requestHeaders.getRawHeaders(b"x-request-id")
        return given[0] if given else None

    def _body_cap(self, stream_id: int) -> int | None:
        """The request body cap of an open stream's request (L{ProxyRequest}), if any."""
        cap = getattr(self._request_of(stream_id), "max_body_bytes", None)
        return cap if isinstance(cap, int) else None

    def _over_body_cap(self, event: h2.events.DataReceived) -> bool:
        """
        Count a stream's request body, and answer the stream with 413 once it goes over the
        cap: at once (RFC 9113 section 8.1 allows answering an incomplete request), with
        RST_STREAM(NO_ERROR) after it so that the client stops sending, instead of granting
        window for the rest of a body that is thrown away and answering at its end.

        @return: whether the stream was answered.
        """
        stream_id = event.stream_id
        received = self._body_received[stream_id] = self._body_received.get(stream_id, 0) + len(
            event.data
        )
        cap = self._body_cap(stream_id)
        if cap is None or received <= cap:
            return False
        self._refuse(stream_id, BodyTooLarge.over(cap), self._given_request_id(stream_id))
        return True

    def _calm_down(self, why: str) -> None:
        """End the connection with GOAWAY ENHANCE_YOUR_CALM."""
        if self._closed:
            return
        transport: Any = self.transport
        peer = transport.getPeer() if transport is not None else None
        self._log.info("closing an HTTP/2 connection from {client}: {why}", client=peer, why=why)
        self.conn.close_connection(error_code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        self._terminate(Failure(ConnectionLost(why)))

    @override
    def _terminate(self, reason: Failure) -> None:
        """
        End the connection after a GOAWAY (sent, or queued in h2 by a protocol error): write
        it and whatever control frames are held back, then really close (RFC 9113 section
        5.4.1), giving up after C{abortTimeout} on a client that does not read.

        Twisted's own (C{_tryToWriteControlData}, C{loseConnection}) stays the transport's
        producer, and a TLS transport closes only once its producer is gone (TCP's resumes a
        paused producer instead of closing): the connection was held until the idle timeout
        plus C{abortTimeout}. It also held the GOAWAY back while the transport was paused.
        """
        transport = self.transport
        assert transport is not None
        held = [*self._bufferedControlFrames, self.conn.data_to_send()]
        self._bufferedControlFrames.clear()
        self._bufferedControlFrameBytes = 0
        transport.write(b"".join(held))
        self._close_transport()
        self.connectionLost(reason, _cancelTimeouts=False)
        if self._abortingCall is None and self.abortTimeout is not None:
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)

    def _close_transport(self) -> None:
        """Close the transport once what was written is sent (see L{_terminate})."""
        transport: Any = self.transport
        # The channel switch registers this connection as the transport's producer (a test
        # transport may have none: it would refuse to unregister nothing).
        if getattr(transport, "producer", self) is not None:
            transport.unregisterProducer()
        transport.loseConnection()

    @override
    def _requestEnded(self, event: h2.events.StreamEnded) -> None:
        if event.stream_id not in self.streams:
            return  # answered here (see _refuse)
        self._stop_body_watch(event.stream_id)
        super()._requestEnded(event)

    @override
    def _requestAborted(self, event: h2.events.StreamReset) -> None:
        """A client's RST_STREAM; one for a stream answered here still counts as a reset."""
        if event.stream_id not in self.streams:
            self._spend_reset_token()
            return
        opened = self._opened_at.get(event.stream_id)
        super()._requestAborted(event)
        if opened is None or self._closed:
            return
        if self._reactor.seconds() - opened < PREMATURE_RESET_LIFETIME:
            self._early_resets += 1
            if (
                self._early_resets >= PREMATURE_RESETS
                and 2 * self._early_resets > self._streams_started
            ):
                self._calm_down(
                    f"{self._early_resets} of {self._streams_started} streams reset within "
                    f"{PREMATURE_RESET_LIFETIME:g}s of opening (Rapid Reset)"
                )

    def _spend_control_token(self) -> bool:
        """
        One PING or SETTINGS frame from the client: refill the bucket for the time elapsed,
        spend one token; with none left, GOAWAY ENHANCE_YOUR_CALM (and C{False}).
        """
        now = self._reactor.seconds()
        self._control_tokens, taken = _take_token(
            self._control_tokens,
            now - self._control_tokens_at,
            CONTROL_FRAME_BURST,
            CONTROL_FRAME_RATE,
        )
        self._control_tokens_at = now
        if not taken:
            self._calm_down("too many PING or SETTINGS frames")
        return taken

    @override
    def _tryToWriteControlData(self) -> bool:
        """
        Twisted 26.10.0's, but a client that leaves its control frames unread (a flood of
        PINGs it does not read the answers to) is logged at info level, with the other
        refusals: Twisted logged an error, for what any client can cause at will.
        """
        buffered = self.conn.data_to_send()
        if not buffered:
            return True
        transport: Any = self.transport
        if self._consumerBlocked is None and not self._bufferedControlFrames:
            transport.write(buffered)
            return True
        self._bufferedControlFrames.append(buffered)
        self._bufferedControlFrameBytes += len(buffered)
        if self._bufferedControlFrameBytes < self._maxBufferedControlFrameBytes:
            return True
        self._log.info(
            "closing an HTTP/2 connection from {client}: it does not read what it is sent "
            "({size} bytes of control frames waiting)",
            client=self._peer_host(),
            size=self._bufferedControlFrameBytes,
        )
        transport.abortConnection()
        self.connectionLost(Failure(ExcessiveBufferingError()))
        return False

    def _spend_reset_token(self) -> None:
        """
        Twisted's token bucket against Rapid Reset (CVE-2023-44487), for a reset of a stream
        Twisted does not know (its own C{_requestAborted} needs the stream): refill for the
        time elapsed, spend one token, and close the connection with GOAWAY
        ENHANCE_YOUR_CALM when none is left.
        """
        now = self._reactor.seconds()
        tokens, taken = _take_token(
            self._resetTokens,
            now - self._resetTokenTimestamp,
            self._resetTokenBurst,
            self._resetTokenRate,
        )
        # Inferred as an int from Twisted's burst; its own refill makes it a float as well.
        self._resetTokens = tokens  # type: ignore[assignment]
        self._resetTokenTimestamp = now
        if not taken:
            self._calm_down("too many stream resets")

    @override
    def _handleWindowUpdate(self, event: h2.events.WindowUpdated) -> None:
        """Unblock the streams a WINDOW_UPDATE lets send, and wake the send loop for them."""
        if event.stream_id:
            if event.stream_id in self.streams:
                self._replan_streams([event.stream_id])
        else:
            # The connection window caps every stream's window.
            self._replan_streams(list(self.streams))

    # Response data from the streams.

    @override
    def writeHeaders(
        self, version: bytes, code: bytes, reason: bytes, headers: Any, streamID: int
    ) -> None:
        """
        Send a response head; into a connection closed by a GOAWAY, drop it instead (Twisted
        let h2's error out: a critical traceback) and cancel the stream's exchange, as for a
        client that went away, once this write has returned.
        """
        h2_stream = self.conn.streams.get(streamID)
        if self._closed or h2_stream is None or h2_stream.closed:
            # Or into a stream h2 has closed (reset) and may have forgotten already: Twisted
            # catches StreamClosedError, not StreamIDTooLowError for a forgotten one.
            self._reactor.callLater(0, self._forget_stream, streamID, _CLOSED)
            return
        super().writeHeaders(version, code, reason, headers, streamID)

    def _forget_stream(self, stream_id: int, why: str) -> None:
        """Tell a stream's request (if any) its client is gone, and drop the stream."""
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.connectionLost(Failure(ConnectionLost(why)))
            self._requestDone(stream_id)

    @override
    def writeDataToStream(self, streamID: int, data: bytes) -> None:
        """Queue response data for a stream; pause its producer if the queue is full."""
        queue = self._outboundStreamQueues.get(streamID)
        # Nothing to send for an empty write, and nowhere to send it once the stream is gone.
        if not data or queue is None:
            return
        queue.append(data)
        self._queued_bytes[streamID] += len(data)
        self._update_producer(streamID)
        if self._plan_stream(streamID):
            self._wake_sender()

    @override
    def endRequest(self, streamID: int) -> None:
        """
        Queue the end of a stream's response. If bytes of it still wait on the client, the
        send deadline watches them from now on (the relay, which watched them until now, is
        done).
        """
        queue = self._outboundStreamQueues.get(streamID)
        if queue is None:
            return
        queue.append(_END_STREAM_SENTINEL)
        if self.send_timeout is not None and self._queued_bytes.get(streamID, 0) > 0:
            self._tails[streamID] = StallWatch(
                self._reactor,
                self.send_timeout,
                lambda: self.queued_bytes(streamID),
                lambda: self._tail_stalled(streamID),
            )
        if self._plan_stream(streamID):
            self._wake_sender()

    def _tail_stalled(self, stream_id: int) -> None:
        """
        The send deadline for a finished response whose bytes still wait on the client.

        While a response is relayed, the relay cuts it when the client takes none of it for
        the send deadline. Once the upstream is done the relay is gone, and a client that
        never opened its window (while keeping the connection busy with other frames, so that
        the idle timeout never fires) would hold up to C{stream_high_water} bytes per stream
        for as long as it liked. After a whole deadline without the stream's queue going
        down, the stream is reset (INTERNAL_ERROR) and its queue freed.
        """
        self._tails.pop(stream_id, None)
        if stream_id not in self.streams:
            return
        self._log.info(
            "client read nothing of HTTP/2 stream {stream} for {timeout:g}s: resetting it",
            stream=stream_id,
            timeout=self.send_timeout,
        )
        self.abortRequest(stream_id)

    @override
    def remainingOutboundWindow(self, streamID: int) -> int:
        """The stream's flow-control window minus its queued bytes, in O(1)."""
        return self._window(streamID) - self._queued_bytes.get(streamID, 0)

    def queued_bytes(self, stream_id: int) -> int:
        """Response bytes queued for C{stream_id} and not yet sent (0 for an unknown stream)."""
        return self._queued_bytes.get(stream_id, 0)

    @override
    def abortRequest(self, streamID: int) -> None:
        """
        Reset a stream whose response is cut short with INTERNAL_ERROR: Twisted resets with
        NO_ERROR, which some clients take for a normal end of a body under way. Nothing is
        sent once the connection is closed (GOAWAY).
        """
        if self._closed:
            self._forget_stream(streamID, _CLOSED)
            return
        self.conn.reset_stream(streamID, h2.errors.ErrorCodes.INTERNAL_ERROR)
        if self._tryToWriteControlData():
            self._requestDone(streamID)

    @override
    def _requestDone(self, streamID: int) -> None:
        tail = self._tails.pop(streamID, None)
        if tail is not None:
            tail.cancel()
        self._queued_bytes.pop(streamID, None)
        self._body_received.pop(streamID, None)
        self._opened_at.pop(streamID, None)
        self._stop_body_watch(streamID)
        self._above_high_water.discard(streamID)
        super()._requestDone(streamID)

    @override
    def _sendPrioritisedData(self, *args: object) -> None:
        """
        Send up to C{frames_per_turn} frames, each from the highest-priority stream that can
        send, then go round again on the next reactor turn.

        Twisted's loop, except that a stream whose window is closed is blocked instead of
        being picked again and again, a stream's producer is resumed as its queue drains,
        and several frames go per turn (Twisted sends one frame per C{callLater(0)}).

        The frames are left to the TLS transport to join per turn: sending each pass at once
        (http/sendnow.py) cut the throughput of 8 connections of 8 streams from 1,321 to
        1,008 requests/s, as a write wakes the loop for a pass of one frame.
        """
        reset = False
        for _ in range(self.frames_per_turn):
            if not self._stillProducing or self._closed:
                return
            try:
                stream_id: int = next(self.priority)
            except priority.DeadlockError:
                # Nothing can be sent: sleep until _wake_sender.
                assert self._sendingDeferred is None
                self._sendingDeferred = Deferred()
                self._sendingDeferred.addCallback(self._sendPrioritisedData)
                return
            # Wait behind the transport.
            if self._consumerBlocked is not None:
                self._consumerBlocked.addCallback(self._sendPrioritisedData)
                return
            if not reset:
                self.resetTimeout()
                reset = True
            self._send_frame(stream_id)
        self._reactor.callLater(0, self._sendPrioritisedData)

    def _send_frame(self, stream_id: int) -> None:
        """Send the next frame (or the end) of one stream, as far as its window allows."""
        transport = self.transport
        assert transport is not None
        queue: deque[object] = self._outboundStreamQueues[stream_id]
        chunk = queue.popleft()
        if chunk is _END_STREAM_SENTINEL:
            try:
                self.conn.end_stream(stream_id)
            except h2.exceptions.StreamClosedError:
                # The client reset the stream in the bytes being processed now: its
                # StreamReset event, still to come, cleans the stream up. (Twisted lets this
                # error kill the send loop.)
                self.priority.block(stream_id)
            else:
                transport.write(self.conn.data_to_send())
                self._requestDone(stream_id)
            return
        chunk = cast(bytes, chunk)
        size = min(self.conn.max_outbound_frame_size, self._window(stream_id))
        if size <= 0:
            queue.appendleft(chunk)
        else:
            if len(chunk) > size:
                queue.appendleft(chunk[size:])
                chunk = chunk[:size]
            self.conn.send_data(stream_id, chunk)
            self._queued_bytes[stream_id] -= len(chunk)
            transport.write(self.conn.data_to_send())
        if stream_id in self.streams:
            self._plan_stream(stream_id)
            self._update_producer(stream_id)

    # Idle timeout.

    @override
    def timeoutConnection(self) -> None:
        """
        Time the connection out, unless its open streams are all waiting on this server.

        A stream waits on the client while response bytes are queued for it (the send loop
        resets the timer on every frame, so queued bytes after a full idle period mean the
        client stopped reading). A stream whose request body is still to come has its own
        deadline (L{_watch_body}), answered with 408 on that stream.
        """
        if self.streams and not self._waiting_on_client():
            self._log.debug(
                "HTTP/2 idle timeout re-armed for {streams} open stream(s) from {client}",
                streams=len(self.streams),
                client=self.getPeer(),
            )
            self.setTimeout(self.timeOut)
            return
        if self.streams:
            super().timeoutConnection()  # streams stalled on the client: logged (info)
        else:
            # Twisted 26.10.0's for a connection with no stream, at debug level: reaping idle
            # connections is routine (Twisted's info line per connection was thousands).
            transport: Any = self.transport
            self._log.debug(
                "closing an idle HTTP/2 connection from {client}", client=self._peer_host()
            )
            self.conn.close_connection(error_code=h2.errors.ErrorCodes.NO_ERROR)
            transport.write(self.conn.data_to_send())
            if self.abortTimeout is not None:
                self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)
            transport.loseConnection()
        # Twisted's sends GOAWAY but keeps the streams, whose responses would then be
        # written into a closed connection, and stays the transport's producer.
        self._close_transport()
        self.connectionLost(Failure(ConnectionLost("idle timeout")), _cancelTimeouts=False)

    # Helpers.

    def _waiting_on_client(self) -> bool:
        """Whether any open stream is stalled on the client (see L{timeoutConnection})."""
        # A request body still coming has its own deadline (L{_watch_body}).
        return any(self._queued_bytes.get(stream_id, 0) > 0 for stream_id in self.streams)

    def _window(self, stream_id: int) -> int:
        """How many bytes the client lets us send on a stream now (0 once h2 closed it)."""
        try:
            window: int = self.conn.local_flow_control_window(stream_id)
        except h2.exceptions.NoSuchStreamError:
            return 0
        return window

    def _plan_stream(self, stream_id: int) -> bool:
        """
        Block or unblock a stream in the priority tree by whether it can send now.

        @return: whether the stream is unblocked.
        """
        queue = self._outboundStreamQueues[stream_id]
        sendable = bool(queue) and (
            queue[0] is _END_STREAM_SENTINEL or self._window(stream_id) > 0
        )
        if sendable:
            self.priority.unblock(stream_id)
        else:
            self.priority.block(stream_id)
        return sendable

    def _replan_streams(self, stream_ids: list[int]) -> None:
        """Re-plan streams whose window may have opened, then wake the send loop if needed."""
        woken = False
        for stream_id in stream_ids:
            # A producer resumed below may have ended another stream.
            if stream_id in self.streams:
                woken = self._plan_stream(stream_id) or woken
                self._update_producer(stream_id)
        if woken:
            self._wake_sender()

    def _update_producer(self, stream_id: int) -> None:
        """Pause or resume a stream's producer by its queued bytes and its window."""
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        queued = self._queued_bytes[stream_id]
        if stream_id in self._above_high_water:
            if queued * 2 < self.stream_high_water:
                self._above_high_water.discard(stream_id)
        elif queued >= self.stream_high_water:
            self._above_high_water.add(stream_id)

        if stream_id in self._above_high_water or self._window(stream_id) <= queued:
            # Pauses the producer if it is producing.
            stream.flowControlBlocked()
        else:
            # Resumes the producer if this connection paused it and the window is open.
            stream.windowUpdated()

    def _wake_sender(self) -> None:
        """Restart the send loop if it is asleep waiting for a sendable stream."""
        if self._sendingDeferred is not None:
            sending, self._sendingDeferred = self._sendingDeferred, None
            sending.callback(None)


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of a (lower-case) header C{name} in an h2 header list, if any."""
    for key, value in headers:
        if key == name:
            return value
    return None


class ProxyHTTPChannelSwitch(_GenericHTTPChannelProtocol):
    """
    Twisted's HTTP/1.1-or-HTTP/2 switch, building a L{ProxyH2Connection} on ALPN C{h2}.

    Wraps an L{HTTPChannel} until the first bytes arrive, then keeps it (HTTP/1.1, or no
    ALPN) or replaces it with a L{ProxyH2Connection} on the same transport. A connection that
    negotiated anything else, or C{h2} without HTTP/2 support, is logged and closed.
    """

    _log = Logger()

    def __init__(
        self,
        channel: HTTPChannel | H1Channel,
        reactor: IReactorTime,
        stream_high_water: int = DEFAULT_STREAM_HIGH_WATER,
        send_timeout: float | None = None,
        *,
        max_headers: int = DEFAULT_MAX_HEADERS,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    ) -> None:
        """
        @param channel: the HTTP/1.1 channel to start with, not yet connected.
        @param reactor: passed to the L{ProxyH2Connection}.
        @param stream_high_water: passed to the L{ProxyH2Connection}.
        @param send_timeout: passed to the L{ProxyH2Connection}.
        @param max_headers: passed to the L{ProxyH2Connection}.
        @param max_header_bytes: passed to the L{ProxyH2Connection}.
        """
        super().__init__(channel)
        self._reactor = reactor
        self._stream_high_water = stream_high_water
        self._send_timeout = send_timeout
        self._max_headers = max_headers
        self._max_header_bytes = max_header_bytes
        self._refused = False

    @override
    def dataReceived(self, data: bytes) -> None:
        """Pick the protocol from ALPN on the first bytes, then hand them to the channel."""
        if self._refused:
            return
        if self._negotiatedProtocol is None:
            transport = self._channel.transport
            assert transport is not None
            negotiated = getattr(transport, "negotiatedProtocol", None) or b"http/1.1"
            if negotiated == b"h2" and http.H2_ENABLED:
                self._switch_to_h2()
            elif negotiated != b"http/1.1":
                self._log.error(
                    "Refusing connection from {client}: cannot serve ALPN protocol {protocol!r}",
                    client=transport.getPeer(),
                    protocol=negotiated,
                )
                self._refused = True
                transport.loseConnection()
                return
            # Twisted declares it as None until a protocol is negotiated.
            self._negotiatedProtocol = negotiated  # type: ignore[assignment]
        self._channel.dataReceived(data)

    @override
    def connectionLost(self, reason: Failure) -> None:
        """Pass the loss to the channel, and give the site's connection slot back."""
        site = self._site
        if (
            self._negotiatedProtocol is None
            and reason.check(SSL.Error)
            and isinstance(site, ProxySite)
        ):
            # Nothing got past TLS: garbage, plain HTTP on the TLS port, a failed handshake.
            # At most one line per 10 s (a scan of the port would flood the log).
            count = site.tls_failures.passes()
            if count is not None:
                transport = self._channel.transport
                self._log.info(
                    "TLS handshake with {client} failed: {reason} ({count} since the last"
                    " such line)",
                    client=getattr(transport.getPeer(), "host", "?") if transport else "?",
                    reason=", ".join(openssl_reasons(reason.value or SSL.Error())) or "TLS error",
                    count=count,
                )
        try:
            self._channel.connectionLost(reason)
        finally:
            if isinstance(site, ProxySite):
                site.connections.release()

    def _switch_to_h2(self) -> None:
        """Replace the HTTP/1.1 channel by a L{ProxyH2Connection}, as Twisted does."""
        channel = self._channel
        assert isinstance(channel, HTTPChannel | H1Channel)
        # The H2 connection registers itself as the transport's producer instead.
        network_producer = channel._networkProducer
        network_producer.unregisterProducer()
        channel.setTimeout(None)

        transport = channel.transport
        connection = ProxyH2Connection(
            self._reactor,
            self._stream_high_water,
            send_timeout=self._send_timeout,
            max_headers=self._max_headers,
            max_header_bytes=self._max_header_bytes,
        )
        connection.requestFactory = self._requestFactory
        connection.site = self._site
        connection.factory = self._factory
        connection.timeOut = self._timeOut
        # Its timers run on self._reactor (see ProxyH2Connection.callLater), the reactor
        # whose callLater the factory gave this switch.
        self._channel = connection
        connection.makeConnection(transport)
        network_producer.registerProducer(connection, True)


_Served = TypeVar("_Served", H1Channel, ProxyHTTPChannelSwitch)


class ProxySite(Site):
    """
    A L{Site} on an injected reactor, serving HTTP/1.1 with L{H1Channel} and HTTP/2 with
    L{ProxyH2Connection}.

    Twisted's access log is off (the proxy logs each exchange itself), so no log file is
    opened and no log timestamp timer runs.

    @cvar h1_channel: makes each connection's HTTP/1.1 channel, given the reactor and the
        C{max_headers}, C{max_header_bytes} and C{header_timeout} keywords (tests put the
        previous, Twisted-based channel here to compare the two).
    """

    noisy = False
    h1_channel: ClassVar[Callable[..., HTTPChannel | H1Channel]] = H1Channel

    def __init__(
        self,
        resource: IResource,
        reactor: IReactorTime,
        *,
        stream_high_water: int = DEFAULT_STREAM_HIGH_WATER,
        idle_timeout: float = 60.0,
        max_headers: int = DEFAULT_MAX_HEADERS,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        header_timeout: float = DEFAULT_HEADER_TIMEOUT,
        max_connections: int = 10_000,
        send_timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        """
        @param resource: the root resource.
        @param reactor: used for every connection's timers (and C{Site.reactor}).
        @param stream_high_water: bytes queued per HTTP/2 stream before its producer is
            paused; see L{ProxyH2Connection}.
        @param idle_timeout: seconds without traffic before a connection is closed; an HTTP/2
            connection whose streams are all waiting on this server is kept.
        @param max_headers: passed to each L{H1Channel} (HTTP/1.1) and
            L{ProxyH2Connection}.
        @param max_header_bytes: passed to each L{H1Channel} and L{ProxyH2Connection}.
        @param header_timeout: passed to each L{H1Channel}.
        @param max_connections: client connections held at once (see L{ConnectionLimit}).
        @param send_timeout: how long a finished HTTP/2 response may wait on a client that
            takes none of it (see L{ProxyH2Connection}); C{None}: no limit.
        @param kwargs: passed to L{Site} (e.g. C{requestFactory}).
        @raise ValueError: if C{stream_high_water} or C{idle_timeout} is not positive.
        """
        if stream_high_water <= 0:
            raise ValueError(f"stream_high_water must be positive, not {stream_high_water}")
        if idle_timeout <= 0:
            raise ValueError(f"idle_timeout must be positive, not {idle_timeout}")
        # A proxy relays bodies as they are: never parse form or multipart uploads.
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(resource, timeout=idle_timeout, reactor=reactor, **kwargs)
        self.stream_high_water = stream_high_water
        self.send_timeout = send_timeout
        self.connections = ConnectionLimit(max_connections, reactor)
        self.tls_failures = Throttle(reactor)
        self.max_headers = max_headers
        self.max_header_bytes = max_header_bytes
        self._h1_options: dict[str, Any] = {
            "max_headers": max_headers,
            "max_header_bytes": max_header_bytes,
            "header_timeout": header_timeout,
        }

    @override
    def buildProtocol(self, addr: IAddress | None) -> ProxyHTTPChannelSwitch | Refusal:  # type: ignore[override]
        """
        A switch over a fresh L{H1Channel}, set up as Twisted's L{Site} does; or, with
        C{max_connections} open already, a L{Refusal}.
        """
        if not self.connections.admit():
            return Refusal(self.reactor, self.connections.limit)
        channel = self.h1_channel(self.reactor, **self._h1_options)
        protocol = ProxyHTTPChannelSwitch(
            channel,
            self.reactor,
            self.stream_high_water,
            self.send_timeout,
            max_headers=self.max_headers,
            max_header_bytes=self.max_header_bytes,
        )
        protocol.callLater = self.reactor.callLater
        return self._served_here(protocol)

    def _served_here(self, protocol: _Served) -> _Served:
        """C{protocol}, told of this site as Twisted's L{Site} tells its channels."""
        protocol.factory = self
        protocol.timeOut = self.timeOut
        protocol.requestFactory = self.requestFactory
        protocol.site = self
        return protocol

    def plain_factory(self) -> IProtocolFactory:
        """
        This site's factory for a plain HTTP/1.1 listener: no TLS, so no ALPN and never
        HTTP/2. Each connection is served by its L{H1Channel} alone, without Twisted's
        HTTP/1.1-or-HTTP/2 switch in front (a wrapper made per connection, a call more per
        read).
        """
        return _PlainFactory(self)

    def build_plain(self, addr: IAddress | None) -> H1Channel | ProxyHTTPChannelSwitch | Refusal:
        """
        An L{H1Channel} set up as L{buildProtocol} sets up the switch's, for a plain
        listener; or, with C{max_connections} open already, a L{Refusal}. (With another
        C{h1_channel}, the switch over it, as L{buildProtocol} makes.)
        """
        if self.h1_channel is not H1Channel:
            return self.buildProtocol(addr)
        if not self.connections.admit():
            return Refusal(self.reactor, self.connections.limit)
        channel = H1Channel(self.reactor, **self._h1_options)
        channel.on_close = self.connections.release
        return self._served_here(channel)

    @override
    def log(self, request: Request | IRequest) -> None:
        """Write no access log line: the proxy logs each exchange itself."""

    @override
    def startFactory(self) -> None:
        """Open no access log and start no log timestamp timer."""

    @override
    def stopFactory(self) -> None:
        """Nothing to close: see L{startFactory}."""


@implementer(IProtocolFactory, ILoggingContext)
class _PlainFactory:
    """A L{ProxySite}'s factory for a plain HTTP/1.1 listener: see L{ProxySite.plain_factory}."""

    def __init__(self, site: ProxySite) -> None:
        self.site = site

    def doStart(self) -> None:
        self.site.doStart()

    def doStop(self) -> None:
        self.site.doStop()

    def buildProtocol(self, addr: IAddress) -> H1Channel | ProxyHTTPChannelSwitch | Refusal:
        return self.site.build_plain(addr)

    def logPrefix(self) -> str:
        return str(self.site.logPrefix())
