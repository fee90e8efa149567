"""
A cap on the client connections a site holds at once, and the answer past it.

Each connection costs a file descriptor and some memory, idle keep-alive ones included (they
are reaped by the idle timeout). Past C{max_connections} a new connection gets a 503
C{too_many_connections} error with C{Retry-After: 1} and is closed; one that does not let
itself be closed within a few seconds is aborted. Over TLS the answer waits for the handshake:
a client that negotiated C{h2} by ALPN gets it as HTTP/2 (the server preface, the 503 on its
first stream, then GOAWAY(NO_ERROR) naming that stream as the last processed, so the client
knows any other was not and may retry it), any other as HTTP/1.1. Refusals are logged at most
once per ten seconds, with their count.
"""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IReactorTime,
    ISSLTransport,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from typing_extensions import override
from zope.interface import implementer

from oaiproxy.errors import TooManyConnections
from oaiproxy.http.early import early_error_h2, early_error_response, new_request_id
from oaiproxy.http.throttle import Throttle

__all__ = ["ConnectionLimit", "Refusal"]

log = Logger()

#: Seconds a refused connection may take to close before it is aborted.
REFUSAL_ABORT = 5.0
_LOG_EVERY = 10.0


class ConnectionLimit:
    """Counts a site's open client connections against C{limit}."""

    def __init__(self, limit: int, clock: IReactorTime) -> None:
        self.limit = limit
        self.open = 0
        self._clock = clock
        self._refusals = Throttle(clock, _LOG_EVERY)

    def admit(self) -> bool:
        """Take a slot for a new connection; C{False} (and counted) when none is left."""
        if self.open >= self.limit:
            self._refused()
            return False
        self.open += 1
        return True

    def release(self) -> None:
        """An admitted connection has closed."""
        self.open -= 1

    def _refused(self) -> None:
        count = self._refusals.passes()
        if count is not None:
            log.warn(
                "refused {count} client connection(s): {limit} are open (max_connections)",
                count=count,
                limit=self.limit,
            )


@implementer(IHandshakeListener)
class Refusal(Protocol):
    """A refused connection: a 503 JSON error, then close (abort if that does not happen)."""

    def __init__(self, clock: IReactorTime, limit: int) -> None:
        self._clock = clock
        self._limit = limit
        self._abort_call: IDelayedCall | None = None
        self._h2: h2.connection.H2Connection | None = None
        self._error = TooManyConnections(
            f"the proxy is at its limit of {limit} client connections; retry later",
            retry_after=1,
        )

    @override
    def connectionMade(self) -> None:
        self._abort_call = self._clock.callLater(REFUSAL_ABORT, self._time_up)
        # Over TLS, which protocol to answer in is known once the handshake is done.
        if not ISSLTransport.providedBy(self.transport):
            self._answer_http1()

    def _time_up(self) -> None:
        """
        The connection is still open after REFUSAL_ABORT. An HTTP/2 client that sent no
        request gets GOAWAY with last stream 0 (nothing was processed: it may retry elsewhere
        or later), and a second more to close; anything else is aborted.
        """
        transport: Any = self.transport
        if self._h2 is not None:
            self._h2.close_connection(h2.errors.ErrorCodes.NO_ERROR, last_stream_id=0)
            self._close_h2()
            self._abort_call = self._clock.callLater(1.0, transport.abortConnection)
            return
        self._abort_call = None
        transport.abortConnection()

    def handshakeCompleted(self) -> None:
        """The TLS handshake is done: answer in the protocol ALPN chose."""
        if getattr(self.transport, "negotiatedProtocol", None) == b"h2":
            self._start_h2()
        else:
            self._answer_http1()

    def _answer_http1(self) -> None:
        transport: Any = self.transport
        transport.write(early_error_response(self._error, new_request_id()))
        transport.loseConnection()

    def _start_h2(self) -> None:
        """Send the server preface, and wait for the client's first request."""
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self._h2 = h2.connection.H2Connection(config=config)
        self._h2.initiate_connection()
        self._flush_h2()

    @override
    def dataReceived(self, data: bytes) -> None:
        """Read an HTTP/2 client's frames up to its first request; ignore anything else."""
        if self._h2 is None:
            return
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._close_h2()  # h2 queued a GOAWAY for it
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self._refuse_stream(event.stream_id)
                return
        self._flush_h2()

    def _refuse_stream(self, stream_id: int) -> None:
        """The 503 on the first stream, GOAWAY(NO_ERROR) with it as the last one, close."""
        assert self._h2 is not None
        head, body = early_error_h2(self._error, new_request_id())
        if self._h2.local_flow_control_window(stream_id) >= len(body):
            self._h2.send_headers(stream_id, head)
            self._h2.send_data(stream_id, body, end_stream=True)
        else:
            self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
        self._h2.close_connection(h2.errors.ErrorCodes.NO_ERROR, last_stream_id=stream_id)
        self._close_h2()

    def _flush_h2(self) -> None:
        assert self._h2 is not None
        data = self._h2.data_to_send()
        if data:
            self.transport.write(data)  # type: ignore[union-attr]

    def _close_h2(self) -> None:
        self._flush_h2()
        self._h2 = None
        self.transport.loseConnection()  # type: ignore[union-attr]

    @override
    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
