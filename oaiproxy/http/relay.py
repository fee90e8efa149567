"""
The streaming relay: an upstream response body, written to the downstream request as it
arrives, with backpressure both ways.

The relay is the protocol given to C{IResponse.deliverBody} and the push producer registered
on the downstream request before its first write: when the client reads slowly, the downstream
transport (HTTP/1.1) or the HTTP/2 stream pauses the relay, which pauses the upstream body
transport, i.e. the upstream socket read. Bytes pass through untouched; over HTTP/2, small reads
that arrive within one reactor turn are coalesced into one downstream write.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._http2 import H2Stream
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http import NO_BODY_CODES, PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from twisted.web.server import Request
from typing_extensions import override
from zope.interface import implementer

from oaiproxy.errors import (
    ProxyError,
    UpstreamDisconnected,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from oaiproxy.http.headers import (
    add_checked,
    downstream_response_headers,
    is_valid_reason,
    raw_values,
    set_checked,
)
from oaiproxy.http.sendnow import Cork, SendTools, send_tools
from oaiproxy.http.stall import StallWatch

__all__ = ["Relay", "abort_downstream", "downstream_backlog"]

log = Logger()


def abort_downstream(request: Request) -> None:
    """
    Cut the client's response short so it cannot mistake it for complete: RST_STREAM on
    HTTP/2, an aborted connection on HTTP/1.1.
    """
    channel: Any = request.channel
    if isinstance(channel, H2Stream):
        channel.abortConnection()
    elif channel is not None and channel.transport is not None:
        channel.transport.abortConnection()


def downstream_backlog(request: Request) -> int | None:
    """
    Bytes of response written for C{request} and not yet taken by its client: the HTTP/2
    stream's queue, or the HTTP/1.1 transport's write buffer (TLS included). C{None} when
    it cannot be known. It goes down only as the client reads.
    """
    channel: Any = request.channel
    if channel is None:
        return None
    if isinstance(channel, H2Stream):
        # H2Stream keeps its connection in a private attribute (Twisted 26.10.0).
        queued = getattr(getattr(channel, "_conn", None), "queued_bytes", None)
        return queued(channel.streamID) if queued is not None else None
    transport = channel.transport
    for _ in range(4):  # down through TLS wrappers to the TCP transport
        if isinstance(transport, FileDescriptor):
            # Twisted's write buffer (private attributes of FileDescriptor, 26.10.0).
            return len(transport.dataBuffer) - transport.offset + transport._tempDataLen
        transport = getattr(transport, "transport", None)
    return None


def _nothing() -> None:
    """What the relay calls for its first byte once it has ended."""


def _writable(request: Any) -> bool:
    """
    Whether body bytes may be written past Twisted's C{Request.write}, its head being out:
    not when the request is finished, or its client gone (Twisted's write would raise, or do
    nothing), or the response has no body: a HEAD, a 204 or a 304, the cases where Twisted's
    first write swaps in a write that drops. Twisted 26.10.0: C{finished} and
    C{_disconnected} are the request's attributes. (Attribute look-ups only: a C{vars}
    of the request would make it a real dictionary in CPython 3.11, every look-up on it
    slower.)
    """
    return not (
        request.finished
        or request._disconnected
        or request.method == b"HEAD"
        or request.code in NO_BODY_CODES
    )


@implementer(IPushProducer)
class Relay(Protocol):
    """
    Relays one upstream response body to one downstream request.

    The response head is written downstream lazily, with the first body byte (or at the end of
    an empty body), so that until then the exchange may still answer with an error or try
    another upstream. C{on_end} is called exactly once: with C{None} when the response was
    relayed completely or ended by the relay itself, or with a L{ProxyError} when the upstream
    failed before anything was written downstream (the caller decides what to do).

    @ivar committed: whether the response head has been written downstream.
    """

    def __init__(
        self,
        request: Request,
        response: IResponse,
        clock: IReactorTime,
        *,
        request_id: bytes,
        idle_timeout: float | None,
        send_timeout: float | None = None,
        on_first_byte: Callable[[], None],
        on_end: Callable[[ProxyError | None], None],
    ) -> None:
        self._request = request
        self._response = response
        self._clock = clock
        self._request_id = request_id
        self._idle_timeout = idle_timeout
        self._send_timeout = send_timeout
        self._stall: StallWatch | None = None
        self._on_first_byte = on_first_byte
        self._on_end: Callable[[ProxyError | None], None] | None = on_end
        content_type = (raw_values(response.headers, b"Content-Type") or [b""])[0]
        self.is_sse = content_type.lower().startswith(b"text/event-stream")
        self.committed = False
        self.bytes_relayed = 0
        self._buffer: list[bytes] = []
        self._flush_call: IDelayedCall | None = None
        self._idle_call: IDelayedCall | None = None
        self._paused = False
        self._registered = False
        self._seen_first_byte = False
        self._last_activity = 0.0
        # Over HTTP/2 each write becomes a frame queued for the connection's send loop: join
        # the reads of one turn into one write. Over HTTP/1.1 each upstream read (one per turn,
        # its chunks joined by the decoder) is written and sent at once.
        channel: Any = request.channel
        self._coalesce = isinstance(channel, H2Stream)
        # An HTTP/1.1 client connection (plain or TLS): what is relayed is sent at once. A
        # plain TCP client: once the head is out, each chunk of a chunked body goes straight
        # to the socket (see _write_chunk); a body that came whole goes out with its head in
        # one send (see start). H1Channel makes these once per connection.
        tools: SendTools | None = getattr(channel, "send_tools", None)
        if tools is None:
            tools = send_tools(None if self._coalesce else getattr(channel, "transport", None))
        self._send_now: Callable[[], None] | None = tools[0]
        self._write_now: Callable[[bytes], None] | None = tools[1]
        self._corker: Cork | None = tools[2]

    def start(self) -> None:
        """Ask the response for its body; bytes flow from the next reactor turn on."""
        whole: bytes | None = getattr(self._response, "whole_body", None)
        if whole is None:
            self._response.deliverBody(self)
            return
        # The body came whole with the head (the upstream client's small answers): written
        # with the head and finished at once, with no producer to register, nothing to pause;
        # to a plain TCP client, in one send.
        request = self._request
        with self._corker or nullcontext():
            if whole:
                self._buffer.append(whole)
                self._flush()
            if self._on_end is not None:
                if not self.committed:
                    self._commit()
                if request.chunked or not request.startedWriting:
                    # The end writes bytes too (the last chunk, or the head itself).
                    self._finish_request()
        if self._on_end is None:
            return  # the client went away meanwhile
        # The request's bookkeeping (the channel's, the exchange's) after the send: the
        # client has its answer while it runs.
        self._finish_request()
        self._seen_first_byte = True
        self._on_first_byte()
        self._complete()

    def _finish_request(self) -> None:
        request = self._request
        if not request.finished and not getattr(request, "_disconnected", False):
            request.finish()

    # -- IProtocol, fed by the upstream response ------------------------------------------

    @override
    def connectionMade(self) -> None:
        # Register before the first write, so a slow client pauses the upstream read from the
        # very first byte. self.transport is the upstream body's producer (the upstream
        # client's body transport, over the upstream socket).
        self._request.registerProducer(self, True)
        self._registered = True

    @override
    def dataReceived(self, data: bytes) -> None:
        if self._on_end is None:
            return
        # Written (and sent) first: the timers below are bookkeeping the client need not wait
        # for.
        if self._seen_first_byte and self._write_now is not None and self._request.startedWriting:
            # A streamed event to a plain-TCP HTTP/1.1 client (the common case, once per
            # event): straight to the socket, without the buffer and _flush.
            self.bytes_relayed += len(data)
            self._write_chunk(data)
            if self._on_end is None:
                return
            self._arm_idle()
            return
        self._buffer.append(data)
        if not self._coalesce:
            self._flush()
            if self._on_end is None:
                return  # the write ended the relay (the client went away)
        elif self._flush_call is None:
            self._flush_call = self._clock.callLater(0, self._flush)
        if not self._seen_first_byte:
            self._seen_first_byte = True
            self._on_first_byte()
        self._arm_idle()

    @override
    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        self._cancel_idle()
        if self._on_end is None:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._flush()
            self._complete()
            return
        malformed = _malformed(reason)
        if not self.committed and not self._buffer:
            # Nothing went to the client: the exchange may try another upstream (a malformed
            # body is a broken response; a close after the head is not retried).
            self._end(
                UpstreamProtocolError(f"upstream sent a malformed body: {malformed}")
                if malformed
                else UpstreamDisconnected("upstream closed the connection before the body")
            )
            return
        self._flush()
        log.info(
            "upstream {what} mid-response {request_id}: {reason}",
            what="sent a malformed body" if malformed else "dropped",
            request_id=self._request_id.decode("ascii", "replace"),
            reason=malformed or _describe(reason),
        )
        self._end_with_error(
            UpstreamProtocolError("the upstream sent a malformed body mid-response")
            if malformed
            else UpstreamDisconnected("the upstream closed the connection mid-response")
        )

    # -- IPushProducer, driven by the downstream consumer ---------------------------------

    def pauseProducing(self) -> None:
        """
        The client is not keeping up: stop reading from the upstream. If it does not catch
        up within the send deadline, the response is cut (see L{_stalled}).
        """
        self._paused = True
        self._cancel_idle()
        if self._send_timeout is not None and self._stall is None and self._on_end:
            self._stall = StallWatch(
                self._clock,
                self._send_timeout,
                lambda: downstream_backlog(self._request),
                self._stalled,
            )
        if self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        """The client caught up: read from the upstream again."""
        self._paused = False
        self._cancel_stall()
        if self._on_end is not None:
            self._arm_idle()
        if self.transport is not None:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        """The downstream consumer is gone: stop the upstream body for good."""
        self.abort(None)

    # -- called by the exchange ----------------------------------------------------------

    def abort(self, error: ProxyError | None) -> None:
        """
        Stop relaying: the upstream body transport is stopped (closing that connection). With
        an C{error} and a client still there, the client is told as well as its protocol
        allows (an SSE error event and a clean end, or a cut response).
        """
        if self._on_end is None:
            return
        if error is None:
            self._on_end = None
            self._stop_upstream()
            self._cleanup()
            return
        self._flush()
        self._stop_upstream()
        self._end_with_error(error)

    # -- internals ------------------------------------------------------------------------

    def _stop_upstream(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def _commit(self) -> None:
        """Write the response head downstream: status, relayed headers, our framing."""
        self.committed = True
        request, response = self._request, self._response
        # The upstream's reason phrase goes out as it is only if it is one (RFC 9112: tabs,
        # spaces, visible and obs-text bytes). Twisted's client keeps a bare CR in it, which
        # some clients would read as the end of the status line and the start of a header.
        phrase = response.phrase
        request.setResponseCode(response.code, phrase if is_valid_reason(phrase) else None)
        out = request.responseHeaders
        # Names and values checked by downstream_response_headers, or by the upstream client
        # as it read them (its responses carry them ready); the request id is ours.
        fields: list[tuple[bytes, bytes]] | None = getattr(response, "downstream_fields", None)
        if fields is None:
            fields = downstream_response_headers(response.headers)
        for name, value in fields:
            add_checked(out, name, value)
        if not raw_values(out, b"X-Request-Id"):
            set_checked(out, b"x-request-id", self._request_id)
        if self.is_sse:
            set_checked(out, b"x-accel-buffering", b"no")
            if not raw_values(out, b"Cache-Control"):
                set_checked(out, b"cache-control", b"no-cache")
        elif request.method == b"HEAD" or response.code == 304:
            # No body follows; the length the upstream said is that of the body a GET would
            # have had (RFC 9110 8.6), and goes out as it came.
            declared: int | None = getattr(response, "declared_length", None)
            if declared is not None:
                set_checked(out, b"content-length", b"%d" % (declared,))
        elif response.length is not UNKNOWN_LENGTH and response.code != 204:
            set_checked(out, b"content-length", b"%d" % (response.length,))

    def _flush(self) -> None:
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        if self._on_end is None or not self._buffer:
            return
        data = b"".join(self._buffer)
        self._buffer.clear()
        if not self.committed:
            self._commit()
        self.bytes_relayed += len(data)
        if self._write_now is not None and self._request.startedWriting:
            self._write_chunk(data)
            return
        if self._corker is not None:
            # The head and the first data, written by Twisted's request apart: one send.
            with self._corker:
                self._request.write(data)
            return
        self._request.write(data)
        if self._send_now is not None:
            self._send_now()

    def chunk_received(self, framed: bytes, start: int, end: int) -> None:
        """
        One whole chunk of the upstream's chunked body, as the upstream framed it (its data is
        C{framed[start:end]}; the decoder checked the framing: a bare hex size, the data, its
        CRLF). To a plain-TCP HTTP/1.1 client whose response is chunked too, once the head is
        out, it is written as it came: chunked framing is hop by hop, and this one is already
        what the client must get (the size's hex digits may be upper case). Anything else
        goes through L{dataReceived}. Saves, per relayed event, the data's slice, its framing
        again, and a call.
        """
        request: Any = self._request
        if (
            self._seen_first_byte
            and self._write_now is not None
            and self._on_end is not None
            and request.startedWriting
            and request.chunked
            and _writable(request)
        ):
            size = end - start
            self.bytes_relayed += size
            request.sentLength += size
            self._write_now(framed)
            if self._on_end is not None:
                self._arm_idle()
            return
        self.dataReceived(framed[start:end])

    def _write_chunk(self, data: bytes) -> None:
        """
        C{Request.write} of a body chunk once the head has been written, framed as it frames
        one, straight to the socket. Twisted's path (the request, the channel, the transport's
        sequence write, then the send) cost about a third of the proxy's CPU per relayed
        event, and two C{epoll_ctl} calls. Twisted 26.10.0: C{chunked}, C{sentLength},
        C{_disconnected} are the request's (public but undocumented) attributes.
        """
        request: Any = self._request
        if not _writable(request):
            return
        request.sentLength += len(data)
        assert self._write_now is not None
        if request.chunked:
            self._write_now(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self._write_now(data)

    def _complete(self) -> None:
        if not self.committed:
            self._commit()
        self._end(None)

    def _end_with_error(self, error: ProxyError) -> None:
        """End a response already under way after an upstream failure."""
        if not self.committed:
            self._end(error)
            return
        if self.is_sse:
            self._request.write(error.to_sse())
            self._end(None)
        else:
            self._cut()

    def _cut(self) -> None:
        """End by cutting the response short for the client (it cannot take it as whole)."""
        on_end = self._on_end
        self._on_end = None
        self._cleanup()
        abort_downstream(self._request)
        if on_end is not None:
            on_end(None)

    def _end(self, error: ProxyError | None) -> None:
        on_end = self._on_end
        self._on_end = None
        self._cleanup()
        request = self._request
        if error is None and not getattr(request, "_disconnected", False) and not request.finished:
            if self._corker is not None:
                # What finish writes (the last chunk, or a head with no body): one send.
                with self._corker:
                    request.finish()
            else:
                request.finish()
                if self._send_now is not None:
                    self._send_now()
        if on_end is not None:
            on_end(error)

    def _cleanup(self) -> None:
        # The exchange holds this relay and this relay held the exchange's methods: let go of
        # them so that both are freed when the request is, not by a full garbage collection.
        self._on_first_byte = _nothing
        self._cancel_idle()
        self._cancel_stall()
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        self._buffer.clear()
        if self._registered:
            self._registered = False
            if self._request.channel is not None:  # None once the client has gone
                self._request.unregisterProducer()

    def _arm_idle(self) -> None:
        # The idle deadline runs between body chunks only: before the first one the exchange's
        # first-byte deadline applies, and while the client holds us paused the silence is not
        # the upstream's doing. Each chunk only records the time; the timer, when it fires,
        # re-arms itself for what is left (resetting a DelayedCall per chunk was costly).
        if self._idle_timeout is None or self._paused or not self._seen_first_byte:
            return
        self._last_activity = self._clock.seconds()
        if self._idle_call is None or not self._idle_call.active():
            self._idle_call = self._clock.callLater(self._idle_timeout, self._idle_expired)

    def _cancel_idle(self) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None

    def _cancel_stall(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
        self._stall = None

    def _stalled(self) -> None:
        """
        While the relay was paused, none of the bytes waiting for the client went for the
        whole send deadline (a slow client that reads some is not cut): its response is cut
        (an SSE error event would only queue behind what it does not read) and the upstream
        request cancelled.
        """
        self._stall = None
        if self._on_end is None:
            return
        log.info(
            "client read nothing for {timeout:g}s, cutting {request_id}",
            timeout=self._send_timeout,
            request_id=self._request_id.decode("ascii", "replace"),
        )
        self._stop_upstream()
        self._cut()

    def _idle_expired(self) -> None:
        self._idle_call = None
        assert self._idle_timeout is not None
        remaining = self._last_activity + self._idle_timeout - self._clock.seconds()
        if remaining > 0:
            self._idle_call = self._clock.callLater(remaining, self._idle_expired)
            return
        log.info(
            "upstream sent nothing for {timeout:g}s, ending {request_id}",
            timeout=self._idle_timeout,
            request_id=self._request_id.decode("ascii", "replace"),
        )
        self.abort(UpstreamTimeout(f"upstream sent nothing for {self._idle_timeout:g}s"))


def _reasons(reason: Failure) -> list[Failure]:
    """The failures under a C{ResponseFailed} (the client wraps what ended a body in one)."""
    if reason.check(ResponseFailed):
        value: Any = reason.value
        return [r for r in value.reasons if isinstance(r, Failure)]
    return [reason]


def _malformed(reason: Failure) -> str | None:
    """What was wrong with the body's framing, when that is why it ended (the decoder's word)."""
    for r in _reasons(reason):
        if r.check(ValueError):
            return r.getErrorMessage()
    return None


def _describe(reason: Failure) -> str:
    """Why a body ended, in words (C{ResponseFailed}'s own message is a list's repr)."""
    return "; ".join(r.getErrorMessage() for r in _reasons(reason)) or "unknown"
