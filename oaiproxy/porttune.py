"""
Twisted's TCP listening port and the connections it accepts, with the per-connection work
trimmed.

A client that opens a connection per request (each stream of a burst of new clients, a
script without keep-alive) pays for the accept and the close as much as for its request.
Twisted 26.10.0's accept loop (C{tcp.Port.doRead}) makes, for every connection: two
C{Logger} objects (its C{_logger} descriptor makes one per look-up) and a log buffer; the
standard library's C{socket.accept}, which turns the listening socket's family and type into
enums twice; and an attrs C{IPv4Address}, validators run, that the connection's C{getPeer}
then makes again on its first request. Its C{Server} formats two strings that only a log line
or a C{repr} reads. At the close, C{readConnectionLost} looks the protocol up in zope's adapter
registry (is it half-closeable?) and C{connectionLost} asks a C{Failure} whether it was an
abort, which builds the exception's class names.

L{TunedPort} and L{TunedServer} do the same with less: one accept loop without the logger
(an accept error, and everything after it in that turn, is left to Twisted's loop, which
logs and recovers as it always does), the peer's address made once and kept, the local
address object made once per local address (not per connection), the log prefix and the
C{repr} made when asked for, half-close support asked of zope once per protocol class
(unless an instance declares its own), and the abort told by the exception's class. Reads
go straight from C{recv} to the protocol, one Python call fewer per read. Everything else is
Twisted's: writing, producers, TLS, aborting, closing. With the plain HTTP/1.1 listener's
protocol built without Twisted's HTTP/1.1-or-HTTP/2 switch
(L{oaiproxy.http.h2fix.ProxySite.plain_factory}): C{bench/ab.py instructions --protocol
http1-new} 717,607 to 642,514 instructions per request on a new connection (-10.5%).

The endpoints (L{TCP4ServerEndpoint}, L{TCP6ServerEndpoint}, L{SSL4ServerEndpoint}, Twisted's
own with C{listen} overridden) listen with L{TunedPort} on a reactor of Twisted's POSIX
family whose C{tcp} module is as written for here (L{tuned_for}), and as Twisted's endpoints
do everywhere else (another Twisted, a test's C{MemoryReactor}).

Written against Twisted 26.10.0, private API included (C{tcp.Port}, C{tcp.Server},
C{tcp.Connection}, C{abstract.FileDescriptor} and C{tcp.BaseClient.doConnect} internals;
the endpoints' C{_reactor}, C{_port}, C{_backlog}, C{_interface} and
C{_sslContextFactory}): the methods replaced or copied are checked by the names their code
uses (L{_AS_WRITTEN}).
"""

from __future__ import annotations

import socket
from errno import EWOULDBLOCK
from typing import Any

from twisted.internet import abstract, address, endpoints, error, main, tcp
from twisted.internet.defer import Deferred, execute
from twisted.internet.interfaces import IHalfCloseableProtocol, IListeningPort, IProtocolFactory
from twisted.internet.posixbase import PosixReactorBase
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.python.runtime import platformType
from typing_extensions import override
from zope.interface import directlyProvidedBy

__all__ = [
    "SSL4ServerEndpoint",
    "TCP4ServerEndpoint",
    "TCP6ServerEndpoint",
    "TunedPort",
    "TunedServer",
    "read_and_deliver",
    "reads_as_written",
    "tuned_for",
]

log = Logger()

#: The names used by the code of each Twisted method that L{TunedPort} and L{TunedServer}
#: replace, or whose work they copy, in Twisted 26.10.0. Another Twisted whose methods use
#: other names (new state, new steps) gets Twisted's own port.
_AS_WRITTEN: dict[tuple[type, str], frozenset[str]] = {
    (tcp.Port, "doRead"): frozenset(
        [
            "BaseException",
            "NI_NUMERICHOST",
            "NI_NUMERICSERV",
            "_BuffersLogs",
            "_accept",
            "_buildAddr",
            "_logger",
            "_reservedFD",
            "buildProtocol",
            "close",
            "deferr",
            "enumerate",
            "factory",
            "getnameinfo",
            "len",
            "list",
            "log",
            "makeConnection",
            "max",
            "namespace",
            "numberAccepts",
            "observer",
            "platformType",
            "range",
            "reactor",
            "sessionno",
            "socket",
            "transport",
            "tuple",
        ]
    ),
    (tcp.Port, "_buildAddr"): frozenset(["_addressType"]),
    (tcp.Server, "__init__"): frozenset(
        [
            "Connection",
            "IPv6Address",
            "__class__",
            "__init__",
            "__name__",
            "_addressType",
            "_getLogPrefix",
            "_realPortNumber",
            "address",
            "client",
            "connected",
            "format",
            "hostname",
            "len",
            "logstr",
            "protocol",
            "repstr",
            "server",
            "sessionno",
            "startReading",
        ]
    ),
    (tcp.Connection, "__init__"): frozenset(
        ["FileDescriptor", "__init__", "abstract", "fileno", "protocol", "setblocking", "socket"]
    ),
    (abstract.FileDescriptor, "__init__"): frozenset(
        ["_tempDataBuffer", "_tempDataLen", "reactor", "twisted.internet"]
    ),
    (tcp.Connection, "doRead"): frozenset(
        [
            "CONNECTION_LOST",
            "EWOULDBLOCK",
            "OSError",
            "_dataReceived",
            "args",
            "bufferSize",
            "main",
            "recv",
            "socket",
        ]
    ),
    (tcp.Connection, "_dataReceived"): frozenset(
        ["CONNECTION_DONE", "dataReceived", "main", "protocol"]
    ),
    (tcp.Connection, "readConnectionLost"): frozenset(
        [
            "BaseException",
            "Failure",
            "IHalfCloseableProtocol",
            "connectionLost",
            "err",
            "failure",
            "log",
            "protocol",
            "readConnectionLost",
        ]
    ),
    (tcp.Connection, "connectionLost"): frozenset(
        [
            "ConnectionAborted",
            "FileDescriptor",
            "_closeSocket",
            "abstract",
            "check",
            "connectionLost",
            "error",
            "fileno",
            "hasattr",
            "protocol",
            "socket",
        ]
    ),
    (tcp.Server, "getPeer"): frozenset(["_addressType", "client"]),
    (tcp.Server, "getHost"): frozenset(["_addressType", "_getsockname", "socket"]),
    (tcp.Server, "__repr__"): frozenset(["repstr"]),
    (tcp.Connection, "logPrefix"): frozenset(["logstr"]),
    # While a client connects, its own doRead is on the instance (see reads_as_written).
    (tcp.BaseClient, "doConnect"): frozenset(
        [
            "EALREADY",
            "EINPROGRESS",
            "EINVAL",
            "EISCONN",
            "EWOULDBLOCK",
            "OSError",
            "SOL_SOCKET",
            "SO_ERROR",
            "_connectDone",
            "args",
            "connect_ex",
            "doConnect",
            "doRead",
            "doWrite",
            "error",
            "failIfNotConnected",
            "getConnectError",
            "getsockopt",
            "hasattr",
            "platformType",
            "realAddress",
            "socket",
            "startReading",
            "startWriting",
            "stopReading",
            "stopWriting",
            "strerror",
        ]
    ),
}


def _as_written() -> bool:
    """
    Whether Twisted's C{tcp} module is as L{_AS_WRITTEN} says, on a POSIX system whose
    sockets have the standard library's C{_accept}.
    """
    if platformType != "posix" or not hasattr(socket.socket, "_accept"):
        return False
    for (cls, name), names in _AS_WRITTEN.items():
        code = getattr(getattr(cls, name, None), "__code__", None)
        if code is None or frozenset(code.co_names) != names:
            return False
    return True


_TWISTED_AS_WRITTEN = _as_written()


def tuned_for(reactor: object) -> bool:
    """
    Whether the endpoints here listen on C{reactor} with L{TunedPort}: a reactor of
    Twisted's POSIX family that listens as Twisted's does (its own C{listenTCP} and
    C{listenSSL} are Twisted's).
    """
    cls = type(reactor)
    return (
        _TWISTED_AS_WRITTEN
        and isinstance(reactor, PosixReactorBase)
        and getattr(cls, "listenTCP", None) is _LISTEN_TCP
        and getattr(cls, "listenSSL", None) is _LISTEN_SSL
    )


_LISTEN_TCP = PosixReactorBase.listenTCP
_LISTEN_SSL = PosixReactorBase.listenSSL


def read_and_deliver(connection: Any) -> Any:
    """
    Twisted 26.10.0's C{tcp.Connection.doRead} and C{_dataReceived} in one call: a TCP
    connection's read, one Python call shorter (per read: per streamed event). For a
    C{tcp.Connection} class, as its C{doRead} (C{doRead = read_and_deliver}), where
    L{reads_as_written} says Twisted's are as written for.
    """
    try:
        data = connection.socket.recv(connection.bufferSize)
    except OSError as e:
        if e.args[0] == EWOULDBLOCK:
            return None
        return main.CONNECTION_LOST
    if not data:
        return main.CONNECTION_DONE
    connection.protocol.dataReceived(data)
    return None


def reads_as_written() -> bool:
    """
    Whether Twisted's C{tcp.Connection} reads as L{read_and_deliver} does, and its client
    connections too: C{tcp.Client} reads with C{Connection.doRead}, and while connecting
    C{BaseClient.doConnect} puts its own C{doRead} on the instance (and takes it off).
    """
    return _TWISTED_AS_WRITTEN and tcp.Client.doRead is tcp.Connection.doRead


#: Whether each protocol class seen is half-closeable, asked of zope once per class (an
#: instance with declarations of its own is asked each time).
_HALF_CLOSEABLE: dict[type, bool] = {}

#: The local addresses of accepted connections, by what C{getsockname} says: made once each,
#: up to this many.
_HOSTS: dict[Any, address.IPv4Address | address.IPv6Address] = {}
_MAX_HOSTS = 256


class TunedServer(tcp.Server):
    """
    Twisted's server connection (L{tcp.Server}), made and closed with less work; see the
    module's documentation.
    """

    def __init__(  # noqa: PLR0917  # Twisted's signature: its port may make these too
        self,
        sock: socket.socket,
        protocol: Any,
        client: tuple[Any, ...],
        server: tcp.Port,
        sessionno: int,
        reactor: Any,
        *,
        peer: address.IPv4Address | address.IPv6Address | None = None,
    ) -> None:
        """
        What C{tcp.Server}, C{tcp.Connection} and C{abstract.FileDescriptor} set up (Twisted
        26.10.0), but the log prefix and the C{repr}, made when asked for.

        @param peer: the client's address, as the port gave it to the factory (L{getPeer}
            returns it); L{None}: made from C{client} when first asked for.
        """
        self.reactor = reactor
        self._tempDataBuffer: list[bytes] = []
        self._tempDataLen = 0
        self.socket = sock
        sock.setblocking(False)
        self.fileno = sock.fileno
        self.protocol = protocol
        if len(client) != 2:
            self._addressType = address.IPv6Address
        self.server = server
        self.client = client
        self.sessionno = sessionno
        self.hostname = client[0]
        self._peer = peer
        # For the log prefix and the repr, made when asked for (as Twisted's say, even once
        # the connection is lost and the port closed).
        self._protocol_class = protocol.__class__
        self._port_number = server._realPortNumber if server is not None else None
        self.startReading()  # type: ignore[no-untyped-call]
        self.connected = 1

    @property
    def logstr(self) -> str:
        """The log prefix Twisted's server connection makes at once; kept once made."""
        logstr: str | None = self._logstr
        if logstr is None:
            protocol = getattr(self, "protocol", None)  # gone once the connection is lost
            prefix = (
                self._getLogPrefix(protocol)
                if protocol is not None
                else self._protocol_class.__name__
            )
            logstr = self._logstr = f"{prefix},{self.sessionno},{self.hostname}"
        return logstr

    @logstr.setter
    def logstr(self, value: str) -> None:
        self._logstr = value

    _logstr: str | None = None

    @override
    def __repr__(self) -> str:
        """Twisted's: the protocol's class, the session number, the port."""
        repstr: str | None = getattr(self, "repstr", None)  # _fromConnectedSocket sets one
        if repstr is not None:
            return repstr
        return f"<{self._protocol_class.__name__} #{self.sessionno} on {self._port_number}>"

    @override
    def getPeer(self) -> address.IPv4Address | address.IPv6Address:
        """The client's address, made once (it is immutable)."""
        peer = self._peer
        if peer is None:
            client: Any = self.client
            peer = self._peer = self._addressType("TCP", *client)
        return peer

    @override
    def getHost(self) -> address.IPv4Address | address.IPv6Address:
        """
        The local address, as Twisted's, but the address object made once per local
        address and port (a listener has few): asked of the socket each time, as it must be
        for a listener on every interface.
        """
        name = self.socket.getsockname()
        hosts = _HOSTS
        host = hosts.get(name)
        if host is None:
            host = self._addressType("TCP", *tcp._getrealname(name))
            if len(hosts) < _MAX_HOSTS:
                hosts[name] = host
        return host

    doRead = read_and_deliver

    @override
    def readConnectionLost(self, reason: Failure) -> None:
        """Twisted's, asking zope whether the protocol is half-closeable once per class."""
        protocol = self.protocol
        cls = type(protocol)
        own = list(directlyProvidedBy(protocol))  # declarations of the instance's own
        half_closeable = None if own else _HALF_CLOSEABLE.get(cls)
        if half_closeable is None:
            half_closeable = IHalfCloseableProtocol(protocol, None) is not None
            if not own:
                _HALF_CLOSEABLE[cls] = half_closeable
        if half_closeable:
            super().readConnectionLost(reason)
        else:
            self.connectionLost(reason)

    @override
    def connectionLost(self, reason: Failure) -> None:
        """Twisted's, telling an abort by the exception's class (not C{Failure.check})."""
        if not hasattr(self, "socket"):
            return  # called twice (see Twisted's)
        abstract.FileDescriptor.connectionLost(self, reason)
        aborted = isinstance(reason.type, type) and issubclass(
            reason.type, error.ConnectionAborted
        )
        self._closeSocket(not aborted)  # type: ignore[no-untyped-call]
        protocol = self.protocol
        del self.protocol
        del self.socket
        del self.fileno
        protocol.connectionLost(reason)


class TunedPort(tcp.Port):
    """
    Twisted's listening TCP port (L{tcp.Port}) with a leaner accept loop, making
    L{TunedServer} connections; see the module's documentation.
    """

    transport = TunedServer

    @override
    def doRead(self) -> None:
        """
        Accept what is waiting, up to C{numberAccepts} connections, as Twisted's loop does.
        An accept error ends this loop and hands the rest of the turn to Twisted's, which
        logs it and recovers (C{EMFILE}, C{ENOBUFS}, ...) as it always does: it accepts
        once more to see the error itself (one system call more per error), then up to
        C{numberAccepts} more connections, and sets C{numberAccepts} from those.
        """
        try:
            listener: Any = self.socket
            accept = listener._accept  # the stdlib's accept, without its enums
            family = self.addressFamily
            factory: Any = self.factory
            build = factory.buildProtocol
            accepted = 0
            for _ in range(self.numberAccepts):
                try:
                    fd, addr = accept()
                except BlockingIOError:
                    break
                except OSError:
                    tcp.Port.doRead(self)
                    return
                accepted += 1
                skt = socket.socket(family, socket.SOCK_STREAM, 0, fd)
                if len(addr) == 4:
                    # IPv6: the scope ID in the host, as Twisted's loop puts it.
                    host = socket.getnameinfo(addr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
                    addr = (host[0], *addr[1:])
                peer = self._addressType("TCP", *addr)
                try:
                    protocol = build(peer)
                except BaseException:
                    skt.close()  # not left to the garbage collector
                    raise
                if protocol is None:
                    skt.close()
                    continue
                s = self.sessionno
                self.sessionno = s + 1
                transport = TunedServer(skt, protocol, addr, self, s, self.reactor, peer=peer)
                protocol.makeConnection(transport)
            if accepted == self.numberAccepts:
                self.numberAccepts += 20
            else:
                self.numberAccepts = max(1, accepted)
        except BaseException:
            # As Twisted's loop: logged, and the port listens on.
            log.failure("while accepting a connection")


def _listen_tuned(
    reactor: Any, port: int, factory: IProtocolFactory, backlog: int, interface: str
) -> TunedPort:
    listening = TunedPort(port, factory, backlog, interface, reactor)
    listening.startListening()
    return listening


class _TunedTCPListen:
    """The C{listen} of the TCP endpoints here: with L{TunedPort} where L{tuned_for} says so."""

    _reactor: Any
    _port: int
    _backlog: int
    _interface: str

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        if not tuned_for(self._reactor):
            twisteds: Any = super()
            listening: Deferred[IListeningPort] = twisteds.listen(protocolFactory)
            return listening
        return execute(
            _listen_tuned,
            self._reactor,
            self._port,
            protocolFactory,
            self._backlog,
            self._interface,
        )


class TCP4ServerEndpoint(_TunedTCPListen, endpoints.TCP4ServerEndpoint):
    """Twisted's, listening with L{TunedPort} where L{tuned_for} says so."""

    def __init__(self, reactor: Any, port: int, backlog: int = 50, interface: str = "") -> None:
        super().__init__(reactor, port, backlog, interface)  # type: ignore[no-untyped-call]


class TCP6ServerEndpoint(_TunedTCPListen, endpoints.TCP6ServerEndpoint):
    """Twisted's, listening with L{TunedPort} where L{tuned_for} says so."""

    def __init__(self, reactor: Any, port: int, backlog: int = 50, interface: str = "::") -> None:
        super().__init__(reactor, port, backlog, interface)  # type: ignore[no-untyped-call]


def _listen_tuned_tls(
    reactor: Any,
    *,
    port: int,
    factory: IProtocolFactory,
    context_factory: Any,
    backlog: int,
    interface: str,
) -> TunedPort:
    """What Twisted's C{listenSSL} does (TLS in memory over a TCP port), on L{TunedPort}."""
    tls = TLSMemoryBIOFactory(context_factory, False, factory)
    listening = _listen_tuned(reactor, port, tls, backlog, interface)
    listening._type = "TLS"
    return listening


class SSL4ServerEndpoint(endpoints.SSL4ServerEndpoint):
    """Twisted's, listening with L{TunedPort} where L{tuned_for} says so."""

    def __init__(
        self,
        reactor: Any,
        port: int,
        sslContextFactory: Any,  # Twisted's name
        backlog: int = 50,
        interface: str = "",
    ) -> None:
        super().__init__(reactor, port, sslContextFactory, backlog, interface)  # type: ignore[no-untyped-call]

    @override
    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        if not tuned_for(self._reactor):
            listening: Deferred[IListeningPort] = super().listen(protocolFactory)  # type: ignore[no-untyped-call]
            return listening
        return execute(
            _listen_tuned_tls,
            self._reactor,
            port=self._port,
            factory=protocolFactory,
            context_factory=self._sslContextFactory,
            backlog=self._backlog,
            interface=self._interface,
        )
