"""Upstream TCP connections made in the call that asks for them, over real loopback sockets."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from errno import EALREADY, ECONNREFUSED
from typing import Any, TypeVar

from twisted.internet import reactor as _reactor
from twisted.internet.error import (
    CannotListenError,
    ConnectingCancelledError,
    ConnectionRefusedError,
    NotConnectingError,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase

from oaiproxy.http import eagerconnect
from oaiproxy.http.eagerconnect import EagerTCPEndpoint
from tests.support.fakes import Recorder
from tests.support.servers import refused_port, wait_for

reactor: Any = _reactor


class _Server(Protocol):
    """Keeps what it is sent."""

    def __init__(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data


class _Greeter(Protocol):
    """Writes a greeting as soon as it is connected, as the upstream client writes a request."""

    made = False

    def connectionMade(self) -> None:
        self.made = True
        assert self.transport is not None
        self.transport.write(b"hello")


class _Broken(Protocol):
    """Raises from connectionMade; keeps why its connection was lost."""

    lost: Failure | None = None

    def connectionMade(self) -> None:
        raise RuntimeError("set-up failed")

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.lost = reason


class _HandshakeUnderWay(socket.socket):
    """A socket whose second connect says the handshake is still under way (a remote peer)."""

    calls = 0

    def connect_ex(self, address: Any) -> int:
        _HandshakeUnderWay.calls += 1
        if _HandshakeUnderWay.calls == 2:
            return EALREADY
        return super().connect_ex(address)


_P = TypeVar("_P", bound=Protocol)


def _keeping(kind: Callable[[], _P], built: list[_P]) -> Factory:
    """A factory of C{kind} protocols that keeps each one it builds in C{built}."""

    def build() -> _P:
        built.append(kind())
        return built[-1]

    return Factory.forProtocol(build)


class EagerConnectTests(TestCase):
    """When the kernel completes the handshake at once, the connection is made in the call."""

    def listen(self) -> tuple[int, list[_Server]]:
        servers: list[_Server] = []
        port = reactor.listenTCP(0, _keeping(_Server, servers), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port, servers

    async def test_connected_and_written_in_the_call(self) -> None:
        """
        A loopback connection is made before connect returns: its Deferred has fired, the
        protocol's connectionMade has run, and what it wrote reaches the peer.
        """
        port, servers = self.listen()
        d = EagerTCPEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(_Greeter))
        protocol = self.successResultOf(d)
        assert isinstance(protocol, _Greeter)
        self.assertTrue(protocol.made)
        assert protocol.transport is not None
        self.addCleanup(protocol.transport.loseConnection)
        await wait_for(lambda: bool(servers) and servers[0].data == b"hello", "the greeting")

    async def test_connection_feeds_the_protocol_itself(self) -> None:
        """
        Once connected in the call, the connection reads into the caller's protocol itself,
        not the endpoint's wrapper: bytes, then the loss.
        """
        await self.feeds_itself()

    async def test_connection_feeds_the_protocol_itself_twisteds_path(self) -> None:
        """The same for a connection made on Twisted's path (the handshake not done at once)."""
        self.patch(eagerconnect._EagerClient, "try_now", lambda client: None)
        await self.feeds_itself()

    async def feeds_itself(self) -> None:
        port, servers = self.listen()
        built: list[Recorder] = []
        protocol = await EagerTCPEndpoint(reactor, "127.0.0.1", port).connect(
            _keeping(Recorder, built)
        )
        [reader] = built
        self.assertIs(protocol, reader)
        transport: Any = reader.transport
        # (On Twisted's path, the Deferred fires inside the set-up, before the swap.)
        await wait_for(lambda: transport.protocol is reader, "the protocol itself fed")
        await wait_for(lambda: bool(servers), "the server's side")
        server_transport: Any = servers[0].transport
        server_transport.write(b"answer")
        await wait_for(lambda: reader.received == b"answer", "the answer")
        server_transport.loseConnection()
        await wait_for(lambda: reader.lost is not None, "the loss")

    async def test_ipv6_connected_in_the_call(self) -> None:
        """Over IPv6 too; the peer's address is as Twisted gives it."""
        servers: list[_Server] = []
        try:
            port = reactor.listenTCP(0, _keeping(_Server, servers), interface="::1")
        except CannotListenError:
            raise SkipTest("no IPv6 loopback on this machine") from None
        self.addCleanup(port.stopListening)
        endpoint = EagerTCPEndpoint(reactor, "::1", port.getHost().port)
        protocol: Any = self.successResultOf(endpoint.connect(Factory.forProtocol(_Greeter)))
        self.addCleanup(protocol.transport.loseConnection)
        peer = protocol.transport.getPeer()
        self.assertEqual((peer.host, peer.port), ("::1", port.getHost().port))
        await wait_for(lambda: bool(servers) and servers[0].data == b"hello", "the greeting")

    def record_clients(self) -> list[Any]:
        """The connections the endpoint tries at once, as it tries them."""
        clients: list[Any] = []
        try_now = eagerconnect._EagerClient.try_now

        def recording(client: Any) -> None:
            clients.append(client)
            try_now(client)

        self.patch(eagerconnect._EagerClient, "try_now", recording)
        return clients

    async def test_refusal_reported_later(self) -> None:
        """
        A refusal the kernel gives at once fails the Deferred on a later turn, never inside
        the call, and its socket is closed.
        """
        clients = self.record_clients()
        endpoint = EagerTCPEndpoint(reactor, "127.0.0.1", refused_port(self))
        d = endpoint.connect(Factory.forProtocol(_Greeter))
        self.assertNoResult(d)
        [client] = clients
        self.assertEqual(client._eager_error, ECONNREFUSED)  # seen here, told later
        with self.assertRaises(ConnectionRefusedError):
            await d
        self.assertFalse(hasattr(client, "socket"))  # closed and let go

    async def test_set_up_raising_loses_the_connection(self) -> None:
        """
        A protocol whose connectionMade raises: as the reactor does, the error is logged and
        the connection lost (the protocol told, the peer sees the close), and the Deferred
        fails with the error at once.
        """
        port, servers = self.listen()
        closed: list[bool] = []
        built: list[_Broken] = []

        server_lost = _Server.connectionLost

        def lost(server: _Server, reason: Failure) -> None:
            closed.append(True)
            server_lost(server, reason)

        self.patch(_Server, "connectionLost", lost)
        d = EagerTCPEndpoint(reactor, "127.0.0.1", port).connect(_keeping(_Broken, built))
        self.failureResultOf(d, RuntimeError)
        [protocol] = built
        self.assertIsNotNone(protocol.lost)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        await wait_for(lambda: bool(servers) and closed == [True], "the close at the peer")

    def handshakes_under_way(self, kind: type[_HandshakeUnderWay]) -> None:
        """Connect through sockets of C{kind}, whose handshake is said to be under way."""
        _HandshakeUnderWay.calls = 0

        def create(client: Any) -> socket.socket:
            s = kind(client.addressFamily, client.socketType)
            s.setblocking(False)
            return s

        self.patch(eagerconnect._EagerClient, "createInternetSocket", create)

    async def test_handshake_under_way_left_to_the_reactor(self) -> None:
        """
        A handshake the kernel has not finished is completed by Twisted's own path (its
        writable event): no result in the call, then the connection as usual, made once.
        """
        port, servers = self.listen()
        self.handshakes_under_way(_HandshakeUnderWay)
        built: list[_Greeter] = []
        d = EagerTCPEndpoint(reactor, "127.0.0.1", port).connect(_keeping(_Greeter, built))
        self.assertNoResult(d)
        self.assertEqual(built, [])
        protocol: Any = await d
        self.addCleanup(protocol.transport.loseConnection)
        self.assertEqual(built, [protocol])
        self.assertGreaterEqual(_HandshakeUnderWay.calls, 3)  # Twisted connected it again
        await wait_for(lambda: bool(servers) and servers[0].data == b"hello", "the greeting")

    async def test_cancel_after_set_up_raised_on_twisteds_path(self) -> None:
        """
        On Twisted's own path (a handshake done on the socket's writable event), a protocol
        whose connectionMade raises has its connection lost and leaves the Deferred waiting,
        as Twisted's endpoint does; cancelling the Deferred still fails it (the endpoint's
        factory keeps its connector for that, reference cycle or not).
        """
        port, _ = self.listen()

        class Slower(_HandshakeUnderWay):
            """Still under way at Twisted's first connect too: done on the writable event."""

            def connect_ex(self, address: Any) -> int:
                if _HandshakeUnderWay.calls == 2:
                    _HandshakeUnderWay.calls += 1
                    return EALREADY
                return super().connect_ex(address)

        self.handshakes_under_way(Slower)
        built: list[_Broken] = []
        d = EagerTCPEndpoint(reactor, "127.0.0.1", port).connect(_keeping(_Broken, built))
        await wait_for(lambda: bool(built) and built[0].lost is not None, "the lost connection")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertNoResult(d)
        with contextlib.suppress(NotConnectingError):  # Twisted's canceller, after its errback
            d.cancel()
        self.failureResultOf(d, ConnectingCancelledError)

    def test_recording_reactor_gets_the_connect(self) -> None:
        """A reactor that only records connections (tests' fakes) is asked to connect."""
        memory = MemoryReactor()
        d = EagerTCPEndpoint(memory, "10.0.0.1", 9000).connect(Factory.forProtocol(_Greeter))
        self.assertNoResult(d)
        self.assertEqual([(h, p) for h, p, *_ in memory.tcpClients], [("10.0.0.1", 9000)])
