"""
Upstream TCP connections connected in the call that asks for them, when the kernel can
complete the handshake at once (a loopback or otherwise local upstream).

Twisted's TCP client starts its connect on the reactor's next turn (a C{callLater(0)} in
C{tcp.Client}'s constructor) and learns that it succeeded on a turn after that (a writable
event, then C{getsockopt} and a second C{connect}). A proxy that handles a burst of requests
in one turn therefore sends none of their upstream requests before the whole turn is over:
with 200 streams started at once and no idle pooled connection, each waited for the set-up
of all the others (about 60 ms of the time to first token on this project's benchmark
machine). Here the connect is tried at once: a non-blocking C{connect} says
C{EINPROGRESS}, and a second one says at once whether the handshake is already done. If it
is, the connection is made (the protocol built, its C{connectionMade} run, and so the
request written) before L{EagerTCPEndpoint.connect} returns. Anything else (a handshake
still under way, a refusal, an error) is left to Twisted's own path on the next turn, so
failures are reported as they always were, never from inside the call.

Written against Twisted 26.10.0: it subclasses C{tcp.Client} and C{tcp.Connector} and uses
their private C{_requiresResolution}, C{_connectDone} and C{resolveAddress} (the scheduled
first step), and C{endpoints._WrappingFactory}, as C{TCP4ClientEndpoint} does.
"""

from __future__ import annotations

from errno import EALREADY, EINPROGRESS, EISCONN, EWOULDBLOCK
from os import strerror
from typing import Any

from twisted.internet import error, tcp
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import _WrappingFactory
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.posixbase import PosixReactorBase
from typing_extensions import override
from zope.interface import implementer

__all__ = ["EagerTCPEndpoint"]

# What a connect under way says: the reactor's writable event will tell the rest.
_UNDER_WAY = frozenset({EINPROGRESS, EALREADY, EWOULDBLOCK})


class _EagerClient(tcp.Client):
    """A TCP client connection that may be connected by L{try_now}, before the reactor's turn."""

    # Set by try_now: connected here, or the error the attempt here got (reported by the
    # reactor's scheduled first step, so that it never reaches the caller of connect).
    _eager = False
    _eager_error = 0

    def try_now(self) -> None:
        """Connect now if the kernel completes the handshake at once; else leave it be."""
        if (
            self._requiresResolution
            or self.connected
            or self.disconnected
            or not hasattr(self, "connector")
            or not hasattr(self, "socket")
        ):
            return
        address = self.addr
        try:
            result = self.socket.connect_ex(address)
            if result == EINPROGRESS:
                result = self.socket.connect_ex(address)
        except OSError as e:
            result = e.errno or -1
        if result in _UNDER_WAY:
            return  # Twisted's first step (next turn) connects again: EALREADY, then waits
        self._eager = True
        if result not in (0, EISCONN):
            self._eager_error = result
            return
        self.realAddress = address
        self._connectDone()  # type: ignore[no-untyped-call]  # Twisted is unannotated

    @override
    def resolveAddress(self) -> None:
        """Twisted's first step, scheduled by the constructor: skipped if done already."""
        if not self._eager:
            super().resolveAddress()  # type: ignore[no-untyped-call]
        elif self._eager_error:
            code = self._eager_error
            message = strerror(code) if code > 0 else "connect failed"
            failure = error.getConnectError((code, message))
            self.failIfNotConnected(failure)  # type: ignore[no-untyped-call]  # unannotated


class _EagerConnector(tcp.Connector):
    @override
    def _makeTransport(self) -> _EagerClient:
        # Twisted's tcp.Client.__init__ is unannotated.
        return _EagerClient(self.host, self.port, self.bindAddress, self, self.reactor)  # type: ignore[no-untyped-call]


@implementer(IStreamClientEndpoint)
class EagerTCPEndpoint:
    """
    C{TCP4ClientEndpoint} (or C{TCP6ClientEndpoint}) for an IP address, whose connections
    are made in the call to L{connect} when the kernel allows (see the module docstring).
    """

    def __init__(self, reactor: Any, host: str, port: int) -> None:
        self._reactor = reactor
        self._host = host
        self._port = port

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        """As C{TCP4ClientEndpoint.connect}; the Deferred may have fired when it returns."""
        try:
            wrapping = _WrappingFactory(protocolFactory)
            if not isinstance(self._reactor, PosixReactorBase):
                # A reactor that only records connections (tests' MemoryReactor): its own way.
                self._reactor.connectTCP(self._host, self._port, wrapping, timeout=30)
                made: Deferred[IProtocol] = wrapping._onConnection
                return made
            # Twisted's 30 s connect timeout, as TCP4ClientEndpoint's default (the proxy's own
            # connect deadline, when one is set, is shorter).
            connector = _EagerConnector(self._host, self._port, wrapping, 30, None, self._reactor)
            connector.connect()
            transport: Any = connector.transport
            transport.try_now()
            connected: Deferred[IProtocol] = wrapping._onConnection
            return connected
        except BaseException:
            return fail()
