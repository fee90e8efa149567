"""Sending a connection's buffer at once, over real loopback connections (plain and TLS)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    wrapClientTLS,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from oaiproxy.http.sendnow import corker, sender, writer
from oaiproxy.tls import ensure_self_signed, server_context_factory, upstream_tls_options

reactor: Any = _reactor


class _Collect(Protocol):
    greeting = b""

    def connectionMade(self) -> None:
        if self.greeting:
            self.transport.write(self.greeting)  # type: ignore[union-attr]

    def __init__(self) -> None:
        self.data = b""
        self.got: Deferred[bytes] | None = None
        self.want = 0
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.got is not None and len(self.data) >= self.want:
            got, self.got = self.got, None
            got.callback(self.data)

    def wait_for(self, size: int) -> Deferred[bytes]:
        self.want = size
        self.got = Deferred()
        if len(self.data) >= size:
            got, self.got = self.got, None
            got.callback(self.data)
        return got if self.got is None else self.got

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        self.lost.callback(None)


class _Producer:
    """A push producer for the transport; tests say what resuming does."""

    def resumeProducing(self) -> None:
        pass

    def pauseProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Loopback(TestCase):
    @inlineCallbacks
    def connected(self, tls: bool = False) -> Any:
        """
        A loopback connection: (our side's transport, the peer's protocol). Over TLS, once
        the handshake is done (the peer's greeting has arrived).
        """
        peer = _Collect()
        peer.greeting = b"hi" if tls else b""
        factory = Factory.forProtocol(lambda: peer)
        if tls:
            key, cert = ensure_self_signed(self.mktemp())
            server: Any = SSL4ServerEndpoint(
                reactor, 0, server_context_factory(key, cert), interface="127.0.0.1"
            )
        else:
            server = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        port = yield server.listen(factory)
        self.addCleanup(port.stopListening)
        client: Any = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        if tls:
            client = wrapClientTLS(upstream_tls_options("localhost", cert), client)
        ours = yield client.connect(Factory.forProtocol(_Collect))
        self.addCleanup(ours.transport.abortConnection)
        if tls:
            yield ours.wait_for(2)
        return ours.transport, peer


class SendNowTests(_Loopback):
    @inlineCallbacks
    def test_sent_before_the_reactor_turns(self) -> Any:
        """What was written leaves the transport's buffer in the call itself, and arrives."""
        transport, peer = yield self.connected()
        transport.write(b"hello ")
        transport.writeSequence([b"wor", b"ld"])
        self.assertTrue(transport.dataBuffer or transport._tempDataBuffer)
        send = sender(transport)
        assert send is not None
        send()
        self.assertEqual((transport.dataBuffer, transport._tempDataBuffer), (b"", []))
        data = yield peer.wait_for(11)
        self.assertEqual(data, b"hello world")

    @inlineCallbacks
    def test_tls_sent_before_the_reactor_turns(self) -> Any:
        """
        Over Twisted's TLS transport, which holds small writes for the next turn, what was
        written is encrypted and leaves the TCP buffer in the call itself, and arrives.
        """
        tls, peer = yield self.connected(tls=True)
        tls.write(b"hello over tls")
        connection = tls.transport
        self.assertTrue(tls._aggregator._buffer)
        sent: list[int] = []
        real_do_write = connection.doWrite

        def recording_do_write() -> Any:
            sent.append(len(connection.dataBuffer) + connection._tempDataLen)
            return real_do_write()

        connection.doWrite = recording_do_write
        send = sender(tls)
        assert send is not None
        send()
        del connection.doWrite
        # Encrypted and sent: ciphertext (longer than the text) went through doWrite at once.
        self.assertEqual(tls._aggregator._buffer, [])
        self.assertEqual(len(sent), 1)
        self.assertGreater(sent[0], 14)
        self.assertEqual((connection.dataBuffer, connection._tempDataBuffer), (b"", []))
        data = yield peer.wait_for(14)
        self.assertEqual(data, b"hello over tls")

    @inlineCallbacks
    def test_closing_connection_left_to_reactor(self) -> Any:
        """A connection being closed keeps its buffer for the reactor, which closes it after."""
        transport, peer = yield self.connected()
        transport.write(b"last words")
        transport.loseConnection()
        send = sender(transport)
        assert send is not None
        send()
        self.assertTrue(transport.dataBuffer or transport._tempDataBuffer)
        yield peer.lost
        self.assertEqual(peer.data, b"last words")

    @inlineCallbacks
    def test_nothing_buffered(self) -> Any:
        """With nothing to send, nothing happens (no write is attempted)."""
        transport, _ = yield self.connected()
        calls: list[object] = []
        transport.doWrite = lambda: calls.append(None)
        send = sender(transport)
        assert send is not None
        send()
        self.assertEqual(calls, [])
        del transport.doWrite

    @inlineCallbacks
    def test_no_recursion(self) -> Any:
        """
        A producer resumed inside the send that writes and sends again does not recurse: the
        inner send is left to the reactor.
        """
        transport, peer = yield self.connected()
        send = sender(transport)
        assert send is not None
        depth: list[int] = []
        send_again: Callable[[], None] = send

        nesting = [0]

        class Producer(_Producer):
            def resumeProducing(self) -> None:
                nesting[0] += 1
                depth.append(nesting[0])
                if len(depth) < 3:
                    # As if the write filled the buffer again: the transport pauses us.
                    transport.producerPaused = True
                    transport.write(b"more")
                    send_again()
                nesting[0] -= 1

        transport.registerProducer(Producer(), True)
        transport.producerPaused = True
        transport.write(b"first")
        send()
        # Resumed once inside our send; its own send was not entered again (the reactor
        # sends "more", and resumes the producer then, not inside the first resume).
        self.assertEqual(depth[0], 1)
        self.assertNotIn(2, depth)
        data = yield peer.wait_for(9)
        self.assertEqual(data[:9], b"firstmore")
        transport.unregisterProducer()

    def test_other_transports(self) -> None:
        """In-memory transports (and HTTP/2 streams) are left alone."""
        self.assertIsNone(sender(StringTransport()))
        self.assertIsNone(sender(None))

    @inlineCallbacks
    def test_producer_error_contained(self) -> Any:
        """
        An exception from a producer resumed inside the send is logged and the connection
        aborted, as the reactor does, instead of reaching the code that wrote.
        """
        transport, peer = yield self.connected()
        send = sender(transport)
        assert send is not None

        class Broken(_Producer):
            def resumeProducing(self) -> None:
                raise RuntimeError("broken producer")

        transport.registerProducer(Broken(), True)
        transport.producerPaused = True
        transport.write(b"data")
        send()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        yield peer.lost


class WriteNowTests(_Loopback):
    """Writing straight to the socket when nothing is buffered."""

    @inlineCallbacks
    def test_written_without_registering(self) -> Any:
        """
        With nothing buffered, the bytes go to the socket in the call, and the socket is
        never registered for writing (Twisted's write would register it, and its send
        unregister it: two epoll_ctl).
        """
        transport, peer = yield self.connected()
        write = writer(transport)
        assert write is not None
        registered: list[object] = []
        self.patch(reactor, "addWriter", registered.append)
        write(b"hello")
        self.assertEqual(
            (registered, transport.dataBuffer, transport._tempDataBuffer), ([], b"", [])
        )
        data = yield peer.wait_for(5)
        self.assertEqual(data, b"hello")

    @inlineCallbacks
    def test_order_kept_behind_a_buffer(self) -> Any:
        """Bytes already buffered go first: the new ones are buffered behind them."""
        transport, peer = yield self.connected()
        write = writer(transport)
        assert write is not None
        transport.write(b"first ")
        write(b"second")
        self.assertEqual(transport._tempDataBuffer, [b"first ", b"second"])
        data = yield peer.wait_for(12)
        self.assertEqual(data, b"first second")

    @inlineCallbacks
    def test_rest_buffered_when_the_socket_is_full(self) -> Any:
        """
        What the socket does not take is buffered (and the producer paused above Twisted's
        buffer size), then arrives whole and in order.
        """
        transport, peer = yield self.connected()
        peer.transport.pauseProducing()  # the peer stops reading
        producer = _Producer()
        paused: list[bool] = []
        producer.pauseProducing = lambda: paused.append(True)  # type: ignore[method-assign]
        transport.registerProducer(producer, True)
        write = writer(transport)
        assert write is not None
        big = bytes(range(256)) * (64 * 1024)  # 16 MiB: more than loopback buffers hold
        write(big)
        self.assertTrue(transport.dataBuffer or transport._tempDataBuffer)
        self.assertEqual(paused, [True])
        write(b"tail")  # behind the buffered rest
        peer.transport.resumeProducing()
        data = yield peer.wait_for(len(big) + 4)
        self.assertEqual(data, big + b"tail")
        transport.unregisterProducer()

    @inlineCallbacks
    def test_closing_connection_left_to_twisted(self) -> Any:
        """
        A connection being closed gets the bytes through Twisted's write, as any write:
        buffered, sent, then the connection closed.
        """
        transport, peer = yield self.connected()
        transport.loseConnection()
        write = writer(transport)
        assert write is not None
        write(b"last")
        self.assertEqual(transport._tempDataBuffer, [b"last"])
        yield peer.lost
        self.assertEqual(peer.data, b"last")

    def test_other_transports_written_by_twisted(self) -> None:
        """Only plain TCP connections are written straight; TLS and in-memory are not."""
        self.assertIsNone(writer(StringTransport()))
        self.assertIsNone(writer(None))


class CorkTests(_Loopback):
    """Writes held between start and send go out in one send, without registering."""

    @inlineCallbacks
    def test_writes_joined_into_one_send(self) -> Any:
        """Two writes and a writeSequence while corked: one send, never registered."""
        transport, peer = yield self.connected()
        cork = corker(transport)
        assert cork is not None
        registered: list[object] = []
        self.patch(reactor, "addWriter", registered.append)
        sends: list[bytes] = []
        real_send = transport.socket.send
        transport.socket = _CountingSocket(transport.socket, sends, real_send)
        cork.start()
        transport.write(b"head ")
        transport.writeSequence([b"bo", b"dy"])
        self.assertEqual(peer.data, b"")
        cork.send()
        self.assertEqual((registered, sends), ([], [b"head body"]))
        self.assertNotIn("write", vars(transport))  # Twisted's write is back
        data = yield peer.wait_for(9)
        self.assertEqual(data, b"head body")

    @inlineCallbacks
    def test_not_corked_behind_a_buffer(self) -> Any:
        """Bytes already buffered go first: the cork holds nothing, Twisted writes as usual."""
        transport, peer = yield self.connected()
        cork = corker(transport)
        assert cork is not None
        transport.write(b"first ")
        cork.start()
        transport.write(b"second")
        self.assertEqual(transport._tempDataBuffer, [b"first ", b"second"])
        cork.send()
        data = yield peer.wait_for(12)
        self.assertEqual(data, b"first second")

    @inlineCallbacks
    def test_closed_while_corked(self) -> Any:
        """A loseConnection while corked (Connection: close): the bytes go, then the close."""
        transport, peer = yield self.connected()
        cork = corker(transport)
        assert cork is not None
        cork.start()
        transport.write(b"last words")
        transport.loseConnection()
        cork.send()
        yield peer.lost
        self.assertEqual(peer.data, b"last words")

    @inlineCallbacks
    def test_rest_buffered_when_the_socket_is_full(self) -> Any:
        """What the socket does not take is buffered by Twisted and arrives in order."""
        transport, peer = yield self.connected()
        peer.transport.pauseProducing()
        cork = corker(transport)
        assert cork is not None
        big = bytes(range(256)) * (64 * 1024)
        cork.start()
        transport.write(big)
        cork.send()
        self.assertTrue(transport.dataBuffer or transport._tempDataBuffer)
        transport.write(b"tail")
        peer.transport.resumeProducing()
        data = yield peer.wait_for(len(big) + 4)
        self.assertEqual(data, big + b"tail")

    def test_other_transports_not_corked(self) -> None:
        """Only plain TCP connections are corked."""
        self.assertIsNone(corker(StringTransport()))
        self.assertIsNone(corker(None))


class _CountingSocket:
    """A socket whose sends are recorded."""

    def __init__(self, sock: Any, sends: list[bytes], real_send: Callable[[bytes], int]):
        self._sock = sock
        self._sends = sends
        self._real_send = real_send

    def send(self, data: bytes) -> int:
        self._sends.append(bytes(data))
        return self._real_send(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class NestedCorkTests(_Loopback):
    """A cork started inside another sends with the outermost send only."""

    @inlineCallbacks
    def test_nested(self) -> Any:
        """Inner start/send pairs hold on; the outer send sends everything at once."""
        transport, peer = yield self.connected()
        cork = corker(transport)
        assert cork is not None
        cork.start()
        transport.write(b"a")
        cork.start()
        transport.write(b"b")
        cork.send()
        self.assertIn("write", vars(transport))  # still corked
        transport.write(b"c")
        cork.send()
        self.assertNotIn("write", vars(transport))
        data = yield peer.wait_for(3)
        self.assertEqual(data, b"abc")
        # And it corks again afterwards.
        cork.start()
        transport.write(b"d")
        cork.send()
        data = yield peer.wait_for(4)
        self.assertEqual(data, b"abcd")
