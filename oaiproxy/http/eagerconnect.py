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
failures are reported as they always were, never from inside the call. The one exception:
a protocol whose C{connectionMade} raises. The reactor would log that and lose the
connection; so is it here, and the Deferred fails with it at once (Twisted's endpoint would
leave it waiting for ever).

These connections do not go through the reactor's C{connectTCP}: whatever wraps or patches
that method does not see them.

Written against Twisted 26.10.0: it subclasses C{tcp.Client} and C{tcp.Connector} and uses
their private C{_requiresResolution}, C{_connectDone} and C{resolveAddress} (the scheduled
first step), and C{endpoints._WrappingFactory}, as C{TCP4ClientEndpoint} does (clearing its
C{_connector} once the connection is lost, with the connector's C{transport}: reference
cycles otherwise, one per upstream connection). Once connected, a connection feeds the
caller's protocol itself (C{_WrappingProtocol}'s private C{_wrappedProtocol}, once its
C{_connectedDeferred} fired), and reads with L{oaiproxy.porttune.read_and_deliver}: two
Python calls fewer per upstream read.
"""

from __future__ import annotations

import socket
from errno import EALREADY, EINPROGRESS, EISCONN, EWOULDBLOCK
from os import strerror
from typing import Any

from twisted.internet import error, tcp
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import _WrappingFactory, _WrappingProtocol
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.posixbase import PosixReactorBase
from twisted.logger import Logger
from twisted.python.failure import Failure
from typing_extensions import override
from zope.interface import implementer

from oaiproxy.porttune import read_and_deliver, reads_as_written

__all__ = ["EagerTCPEndpoint"]

_log = Logger()

# What a connect under way says: the reactor's writable event will tell the rest.
_UNDER_WAY = frozenset({EINPROGRESS, EALREADY, EWOULDBLOCK})


class _EagerClient(tcp.Client):
    """A TCP client connection that may be connected by L{try_now}, before the reactor's turn."""

    # Set by try_now: connected here, or the error the attempt here got (reported by the
    # reactor's scheduled first step, so that it never reaches the caller of connect).
    _eager = False
    _eager_error = 0
    #: What the protocol's set-up raised, when it was connected here.
    eager_failure: Failure | None = None

    if reads_as_written():
        # Each upstream read (a streamed event) one Python call shorter; while connecting,
        # Twisted's BaseClient.doConnect puts its own doRead on the instance.
        doRead = read_and_deliver

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
        if len(address) == 4:
            # IPv6: the scope as Twisted writes it (fe80::1%lo), for getPeer.
            host = socket.getnameinfo(address, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)[0]
            self.realAddress = (host, *address[1:])
        else:
            self.realAddress = address
        try:
            self._connectDone()
        except BaseException as e:
            # As the reactor does when a connection's handler raises: logged, and the
            # connection lost with it (the protocol told, the socket closed).
            self.eager_failure = Failure()
            _log.failure("Setting up an upstream connection failed", self.eager_failure)
            reactor: Any = self.reactor
            reactor._disconnectSelectable(self, e, False)

    @override
    def _connectDone(self) -> None:
        """
        Twisted's; then, once the endpoint's wrapping protocol has connected the caller's
        protocol (and fired the endpoint's Deferred), the connection feeds the caller's
        protocol itself: the wrapper would only pass each read, and the loss, on to it (one
        Python call more per upstream read: per streamed event).
        """
        super()._connectDone()  # type: ignore[no-untyped-call]  # Twisted is unannotated
        wrapping: Any = self.protocol
        if type(wrapping) is _WrappingProtocol and wrapping._connectedDeferred.called:
            self.protocol = wrapping._wrappedProtocol

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
    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self._let_go()

    @override
    def connectionFailed(self, reason: Failure) -> None:
        super().connectionFailed(reason)
        self._let_go()

    def _let_go(self) -> None:
        """
        Twisted keeps a lost connection's transport, which refers back to its connector, and
        the endpoint's factory refers to the connector, which refers to it: reference cycles
        per upstream connection, left for the garbage collector. Once the connection is
        over (lost, or never made), they are let go; the factory keeps its connector while
        its Deferred has not fired (a protocol whose set-up raised, on Twisted's path), since
        cancelling that Deferred asks the connector for its destination.
        """
        if self.state == "disconnected":
            self.transport = None
            wrapping: Any = self.factory
            if isinstance(wrapping, _WrappingFactory) and wrapping._onConnection.called:
                wrapping._connector = None

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
            if transport.eager_failure is not None and not connected.called:
                connected.errback(transport.eager_failure)
            return connected
        except BaseException:
            return fail()
