"""
A cap on the client connections a site holds at once, and the answer past it.

Each connection costs a file descriptor and some memory, idle keep-alive ones included (they
are reaped by the idle timeout). Past C{max_connections} a new connection gets a 503
C{too_many_connections} error with C{Retry-After: 1}, as HTTP/1.1 (over TLS, once the
handshake is done), and is closed; one that does not let itself be closed within a few
seconds is aborted. Refusals are logged at most once per ten seconds, with their count.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from typing_extensions import override

from oaiproxy.errors import TooManyConnections
from oaiproxy.http.early import early_error_response, new_request_id

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
        self._refused_since_log = 0
        self._last_log: float | None = None

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
        self._refused_since_log += 1
        now = self._clock.seconds()
        if self._last_log is None or now - self._last_log >= _LOG_EVERY:
            log.warn(
                "refused {count} client connection(s): {limit} are open (max_connections)",
                count=self._refused_since_log,
                limit=self.limit,
            )
            self._refused_since_log = 0
            self._last_log = now


class Refusal(Protocol):
    """A refused connection: a 503 JSON error, then close (abort if that does not happen)."""

    def __init__(self, clock: IReactorTime, limit: int) -> None:
        self._clock = clock
        self._limit = limit
        self._abort_call: IDelayedCall | None = None

    @override
    def connectionMade(self) -> None:
        transport: Any = self.transport
        error = TooManyConnections(
            f"the proxy is at its limit of {self._limit} client connections; retry later",
            retry_after=1,
        )
        transport.write(early_error_response(error, new_request_id()))
        transport.loseConnection()
        self._abort_call = self._clock.callLater(REFUSAL_ABORT, transport.abortConnection)

    @override
    def dataReceived(self, data: bytes) -> None:
        """Whatever the client sends is ignored."""

    @override
    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
