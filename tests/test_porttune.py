"""The tuned TCP port and server connections, over real loopback sockets: Twisted's behaviour."""

from __future__ import annotations

import errno
import gc
import socket
import warnings
from functools import partial
from typing import Any

from twisted.internet import main, tcp
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol, IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase
from zope.interface import alsoProvides, implementer

from oaiproxy import porttune
from oaiproxy.http.eagerconnect import _EagerClient
from oaiproxy.porttune import (
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    TunedPort,
    TunedServer,
    read_and_deliver,
    reads_as_written,
    tuned_for,
)
from tests.support.servers import wait_for

reactor: Any = _reactor


class _Server(Protocol):
    """Echoes what it reads; records the address it was built for and how it was lost."""

    def __init__(self, addr: Any) -> None:
        self.addr = addr
        self.lost: Deferred[None] = Deferred()
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.reason = reason
        self.lost.callback(None)


@implementer(IHalfCloseableProtocol)
class _HalfCloseable(_Server):
    """Answers the client's end of writing with C{bye}, then closes."""

    def readConnectionLost(self) -> None:
        _bye(self)

    def writeConnectionLost(self) -> None:
        """Not used."""


def _bye(protocol: _Server) -> None:
    """Answer the client's end of writing with C{bye}, then close."""
    assert protocol.transport is not None
    protocol.transport.write(b"bye")
    protocol.transport.loseConnection()


class _Factory(Factory):
    """Builds one kind of server protocol and keeps each one built."""

    def __init__(self, kind: type[_Server] = _Server) -> None:
        self.kind = kind
        self.built: list[_Server] = []

    def buildProtocol(self, addr: Any) -> _Server | None:
        protocol = self.kind(addr)
        protocol.factory = self
        self.built.append(protocol)
        return protocol


class _Client(Protocol):
    """Keeps what it reads and how it was lost."""

    def __init__(self) -> None:
        self.data = b""
        self.lost: Deferred[None] = Deferred()
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.reason = reason
        self.lost.callback(None)


class TunedForTests(TestCase):
    """Where the tuned port is used."""

    def test_this_twisted(self) -> None:
        """
        This Twisted's C{tcp} module is the one the tuned port was written against (a
        Twisted upgrade that changes it fails here: read the change, then update
        L{porttune._AS_WRITTEN}).
        """
        self.assertTrue(porttune._as_written())
        self.assertTrue(tuned_for(reactor))

    def test_not_on_other_reactors(self) -> None:
        """A reactor outside Twisted's POSIX family gets Twisted's own listening."""
        memory = MemoryReactor()
        self.assertFalse(tuned_for(memory))
        factory = Factory()
        self.successResultOf(TCP4ServerEndpoint(memory, 8080, 7, "127.0.0.1").listen(factory))
        self.assertEqual(memory.tcpServers, [(8080, factory, 7, "127.0.0.1")])

    async def test_not_with_another_twisted(self) -> None:
        """Where Twisted's C{tcp} module is not as written for, its own port listens."""
        self.patch(porttune, "_TWISTED_AS_WRITTEN", False)
        port = await self.listen(_Factory())
        self.assertIs(type(port), tcp.Port)

    async def test_tuned_port(self) -> None:
        """On this reactor the endpoint listens with the tuned port."""
        port = await self.listen(_Factory())
        self.assertIsInstance(port, TunedPort)

    async def listen(self, factory: Factory) -> IListeningPort:
        port = await TCP4ServerEndpoint(reactor, 0, 50, "127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        return port


class TunedConnectionTests(TestCase):
    """Connections accepted by the tuned port behave as Twisted's."""

    async def serve(self, factory: _Factory, ipv6: bool = False) -> int:
        endpoint = (
            TCP6ServerEndpoint(reactor, 0, 50, "::1")
            if ipv6
            else TCP4ServerEndpoint(reactor, 0, 50, "127.0.0.1")
        )
        port: Any = await endpoint.listen(factory)
        self.addCleanup(port.stopListening)
        self.assertIsInstance(port, TunedPort)
        return int(port.getHost().port)

    async def connect(self, port: int, ipv6: bool = False) -> _Client:
        client = _Client()
        endpoint = (
            TCP6ClientEndpoint(reactor, "::1", port)
            if ipv6
            else TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        )
        await connectProtocol(endpoint, client)
        self.addCleanup(self.close, client)
        return client

    def close(self, client: _Client) -> Deferred[None] | None:
        if client.lost.called:
            return None
        assert client.transport is not None
        client.transport.loseConnection()
        return client.lost

    async def pair(self) -> tuple[_Client, _Server]:
        """A client connected to a tuned port, and the server's protocol for it."""
        factory = _Factory()
        client = await self.connect(await self.serve(factory))
        await wait_for(lambda: bool(factory.built), "the connection")
        [server] = factory.built
        return client, server

    async def test_exchange_and_addresses(self) -> None:
        """
        The protocol reads and writes; its transport's peer is the address its factory was
        given (one object), the client's; the log prefix and repr are Twisted's.
        """
        factory = _Factory()
        port = await self.serve(factory)
        client = await self.connect(port)
        assert client.transport is not None
        client.transport.write(b"ping")
        await wait_for(lambda: client.data == b"ping", "the echo")
        [server] = factory.built
        transport: Any = server.transport
        self.assertIsInstance(transport, TunedServer)
        local: Any = client.transport.getHost()
        self.assertEqual(server.addr, IPv4Address("TCP", "127.0.0.1", local.port))
        self.assertIs(transport.getPeer(), server.addr)
        self.assertEqual(transport.getHost(), IPv4Address("TCP", "127.0.0.1", port))
        self.assertEqual(transport.logPrefix(), "_Server,0,127.0.0.1")
        self.assertEqual(repr(transport), f"<_Server #0 on {port}>")
        self.assertFalse(transport.socket.getblocking())
        self.assertIs(transport.getHost(), transport.getHost())  # one object per address
        client.transport.loseConnection()
        await _lost(server)
        # As Twisted's say once the connection is lost.
        self.assertEqual(transport.logPrefix(), "_Server,0,127.0.0.1")
        self.assertEqual(repr(transport), f"<_Server #0 on {port}>")

    async def test_ipv6(self) -> None:
        """An IPv6 connection's peer is an IPv6 address, as Twisted makes it."""
        if not socket.has_ipv6:
            raise SkipTest("no IPv6 on this machine")
        factory = _Factory()
        try:
            port = await self.serve(factory, ipv6=True)
        except Exception as e:  # no ::1 here
            raise SkipTest(f"cannot listen on ::1: {e}") from None
        client = await self.connect(port, ipv6=True)
        assert client.transport is not None
        client.transport.write(b"six")
        await wait_for(lambda: client.data == b"six", "the echo")
        [server] = factory.built
        local: Any = client.transport.getHost()
        self.assertEqual(server.addr, IPv6Address("TCP", "::1", local.port))
        self.assertIs(server.transport.getPeer(), server.addr)  # type: ignore[union-attr]

    async def test_client_closes(self) -> None:
        """A client's close reaches the protocol as a clean end, and the socket is closed."""
        client, server = await self.pair()
        assert client.transport is not None
        client.transport.loseConnection()
        reason = await _lost(server)
        self.assertTrue(reason.check(ConnectionDone))
        self.assertFalse(hasattr(server.transport, "socket"))
        # Its log prefix, made now (Twisted's loop asked for it at each event), is still
        # Twisted's.
        transport: Any = server.transport
        transport._logstr = None
        self.assertEqual(transport.logPrefix(), "_Server,0,127.0.0.1")

    async def test_server_closes(self) -> None:
        """The server's orderly close reaches the client as a clean end."""
        client, server = await self.pair()
        assert server.transport is not None
        server.transport.loseConnection()
        self.assertTrue((await _lost(client)).check(ConnectionDone))
        self.assertTrue((await _lost(server)).check(ConnectionDone))

    async def test_abort_resets(self) -> None:
        """An abort closes with a reset, as Twisted's does: the client sees a lost connection."""
        client, server = await self.pair()
        server.transport.abortConnection()  # type: ignore[union-attr]
        self.assertTrue((await _lost(server)).check(ConnectionAborted))
        reason = await _lost(client)
        self.assertTrue(reason.check(ConnectionLost), reason)
        self.assertFalse(reason.check(ConnectionDone))

    async def test_half_close(self) -> None:
        """A half-closeable protocol hears of the client's end of writing, and can answer."""
        factory = _Factory(_HalfCloseable)
        port = await self.serve(factory)
        client = await self.connect(port)
        assert client.transport is not None
        client.transport.loseWriteConnection()  # type: ignore[attr-defined]
        self.assertTrue((await _lost(client)).check(ConnectionDone))
        self.assertEqual(client.data, b"bye")

    async def test_half_close_declared_per_instance(self) -> None:
        """
        Half-close support declared by one instance, not its class, is heard: the class's
        answer, remembered from another instance, does not decide for it.
        """
        factory = _Factory()
        port = await self.serve(factory)
        first = await self.connect(port)
        assert first.transport is not None
        first.transport.loseWriteConnection()  # type: ignore[attr-defined]
        self.assertTrue((await _lost(first)).check(ConnectionDone))
        self.assertEqual(first.data, b"")  # _Server is not half-closeable: closed at once
        build = factory.buildProtocol

        def declaring(addr: Any) -> _Server | None:
            protocol = build(addr)
            assert protocol is not None
            protocol.readConnectionLost = partial(_bye, protocol)  # type: ignore[attr-defined]
            alsoProvides(protocol, IHalfCloseableProtocol)
            return protocol

        factory.buildProtocol = declaring  # type: ignore[method-assign]
        second = await self.connect(port)
        assert second.transport is not None
        second.transport.loseWriteConnection()  # type: ignore[attr-defined]
        self.assertTrue((await _lost(second)).check(ConnectionDone))
        self.assertEqual(second.data, b"bye")

    async def test_refused_by_factory(self) -> None:
        """A connection the factory builds nothing for is closed; the port goes on."""
        factory = _Factory()
        refuse = [True]
        build = factory.buildProtocol
        factory.buildProtocol = lambda addr: None if refuse and refuse.pop() else build(addr)  # type: ignore[method-assign]
        port = await self.serve(factory)
        refused = await self.connect(port)
        self.assertTrue((await _lost(refused)).check(ConnectionDone, ConnectionLost))
        served = await self.connect(port)
        assert served.transport is not None
        served.transport.write(b"after")
        await wait_for(lambda: served.data == b"after", "the echo after a refusal")

    async def test_factory_error_logged(self) -> None:
        """An error building a protocol is logged, and the port goes on accepting."""
        factory = _Factory()
        build = factory.buildProtocol
        fail = [True]

        def flaky(addr: Any) -> _Server | None:
            if fail:
                fail.pop()
                raise RuntimeError("broken factory")
            return build(addr)

        factory.buildProtocol = flaky  # type: ignore[method-assign]
        port = await self.serve(factory)
        await self.connect(port)
        await wait_for(lambda: not fail, "the broken build")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        served = await self.connect(port)
        assert served.transport is not None
        served.transport.write(b"still")
        await wait_for(lambda: served.data == b"still", "the echo after the error")

    async def test_accept_error_left_to_twisted(self) -> None:
        """
        After an accept error, Twisted's own loop accepts for the rest of the turn: the
        connection is served, its peer address made when asked for.
        """
        factory = _Factory()
        port_number = await self.serve(factory)
        [port] = [p for p in _listening(reactor) if p.getHost().port == port_number]
        failing = _FailingOnce(port.socket)
        port.socket = failing
        client = await self.connect(port_number)
        assert client.transport is not None
        client.transport.write(b"echo")
        await wait_for(lambda: client.data == b"echo", "the echo")
        self.assertTrue(failing.failed)
        [server] = factory.built
        transport: Any = server.transport
        self.assertIsNone(transport._peer)  # made by Twisted's loop, which passes none
        local: Any = client.transport.getHost()
        self.assertEqual(transport.getPeer(), IPv4Address("TCP", "127.0.0.1", local.port))


class AcceptLoopTests(TestCase):
    """The accept loop itself, run by hand over connections queued on a real socket."""

    async def port(self, factory: _Factory) -> TunedPort:
        port: Any = await TCP4ServerEndpoint(reactor, 0, 50, "127.0.0.1").listen(factory)
        port.stopReading()  # this test accepts, not the reactor
        self.addCleanup(port.stopListening)
        assert isinstance(port, TunedPort)
        return port

    def queue(self, port: TunedPort, count: int) -> list[socket.socket]:
        """C{count} connections queued on C{port}, not yet accepted."""
        address: Any = port.getHost()
        clients = [socket.create_connection(("127.0.0.1", address.port)) for _ in range(count)]
        for client in clients:
            self.addCleanup(client.close)
        return clients

    def lose_all(self, factory: _Factory) -> None:
        for protocol in factory.built:
            if protocol.transport is not None and not protocol.lost.called:
                protocol.transport.abortConnection()  # type: ignore[attr-defined]

    async def test_scaling(self) -> None:
        """
        As Twisted's loop: fewer waiting than it may accept, it takes them all and next
        time accepts as many as it found; as many as it may, it takes those and 20 more next
        time.
        """
        factory = _Factory()
        port = await self.port(factory)
        self.addCleanup(self.lose_all, factory)
        self.queue(port, 3)
        port.doRead()
        self.assertEqual((len(factory.built), port.numberAccepts), (3, 3))
        self.queue(port, 5)
        port.doRead()
        self.assertEqual((len(factory.built), port.numberAccepts), (6, 23))
        port.doRead()
        self.assertEqual((len(factory.built), port.numberAccepts), (8, 2))

    async def test_nothing_left_behind(self) -> None:
        """
        A connection its factory refuses, or fails to build a protocol for, is closed at
        once, not left to the garbage collector.
        """
        factory = _Factory()
        outcomes: list[str] = ["refuse", "fail"]

        def build(addr: Any) -> _Server | None:
            if outcomes.pop(0) == "refuse":
                return None
            raise RuntimeError("broken factory")

        factory.buildProtocol = build  # type: ignore[method-assign]
        port = await self.port(factory)
        clients = self.queue(port, 2)
        gc.collect()  # what earlier tests left behind warns now, not below
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            port.doRead()
            port.doRead()
            # Each closed by the server already (on loopback its FIN is here at once), while
            # the logged error (its traceback, the accepting frame) is still held.
            for client in clients:
                self.assertEqual(client.recv(1, socket.MSG_DONTWAIT), b"")
            self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
            gc.collect()
        self.assertEqual(outcomes, [])
        number = port.getHost().port
        ours = [
            str(w.message)
            for w in caught
            if w.category is ResourceWarning and f"127.0.0.1', {number})" in str(w.message)
        ]
        self.assertEqual(ours, [])


class _FailingOnce:
    """A listening socket whose first lean accept fails (a connection aborted in the queue)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.failed = False

    def _accept(self) -> Any:
        if not self.failed:
            self.failed = True
            raise OSError(errno.ECONNABORTED, "Software caused connection abort")
        return self._sock._accept()  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _listening(reactor: Any) -> list[Any]:
    """The tuned ports the reactor reads from."""
    return [r for r in reactor.getReaders() if isinstance(r, TunedPort)]


async def _lost(protocol: _Server | _Client) -> Failure:
    """Why C{protocol}'s connection was lost, once it is."""
    await protocol.lost
    assert protocol.reason is not None
    return protocol.reason


class _Socket:
    """A socket whose recv gives one outcome: bytes, or an error raised."""

    def __init__(self, outcome: bytes | OSError) -> None:
        self.outcome = outcome

    def recv(self, size: int) -> bytes:
        if isinstance(self.outcome, OSError):
            raise self.outcome
        return self.outcome


class _Connection:
    """What read_and_deliver reads of a connection."""

    bufferSize = 65536

    def __init__(self, outcome: bytes | OSError) -> None:
        self.socket = _Socket(outcome)
        self.received: list[bytes] = []
        self.protocol = self
        self.dataReceived = self.received.append


class ReadTests(TestCase):
    """A read as Twisted's C{Connection.doRead} and C{_dataReceived} make it."""

    def test_outcomes(self) -> None:
        """Bytes are delivered; the end is a clean loss; EAGAIN nothing; other errors a loss."""
        data = _Connection(b"abc")
        self.assertIsNone(read_and_deliver(data))
        self.assertEqual(data.received, [b"abc"])
        end = _Connection(b"")
        self.assertIs(read_and_deliver(end), main.CONNECTION_DONE)
        self.assertEqual(end.received, [])
        again = _Connection(BlockingIOError(errno.EAGAIN, "again"))
        self.assertIsNone(read_and_deliver(again))
        reset = _Connection(ConnectionResetError(errno.ECONNRESET, "reset"))
        self.assertIs(read_and_deliver(reset), main.CONNECTION_LOST)
        self.assertEqual(reset.received, [])

    def test_used_where_written_for(self) -> None:
        """The tuned server connections and the upstream connections read so."""
        self.assertTrue(reads_as_written())
        self.assertIs(TunedServer.doRead, read_and_deliver)
        self.assertIs(_EagerClient.doRead, read_and_deliver)
