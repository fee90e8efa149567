"""Sending a TCP transport's buffer at once, over real loopback connections."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from oaiproxy.http.sendnow import plain_tcp, send_now

reactor: Any = _reactor


class _Collect(Protocol):
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
        return self.got

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        self.lost.callback(None)


class SendNowTests(TestCase):
    @inlineCallbacks
    def connected(self) -> Any:
        """A loopback connection: (our side, its transport, the peer's protocol)."""
        peer = _Collect()
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(lambda: peer)
        )
        self.addCleanup(port.stopListening)
        ours = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
            Factory.forProtocol(Protocol)
        )
        self.addCleanup(ours.transport.abortConnection)
        return ours, ours.transport, peer

    @inlineCallbacks
    def test_sent_before_the_reactor_turns(self) -> Any:
        """What was written leaves the transport's buffer in the call itself, and arrives."""
        _, transport, peer = yield self.connected()
        transport.write(b"hello ")
        transport.writeSequence([b"wor", b"ld"])
        self.assertTrue(transport.dataBuffer or transport._tempDataBuffer)
        send_now(plain_tcp(transport))
        self.assertEqual((transport.dataBuffer, transport._tempDataBuffer), (b"", []))
        data = yield peer.wait_for(11)
        self.assertEqual(data, b"hello world")
        # The same connection under TLS is left alone (its bytes pass through the TLS layer).
        self.patch(transport, "TLS", True)
        self.assertIsNone(plain_tcp(transport))

    @inlineCallbacks
    def test_closing_connection_left_to_reactor(self) -> Any:
        """A connection being closed keeps its buffer for the reactor, which closes it after."""
        _, transport, peer = yield self.connected()
        transport.write(b"last words")
        transport.loseConnection()
        send_now(plain_tcp(transport))
        self.assertTrue(transport.dataBuffer or transport._tempDataBuffer)
        yield peer.lost
        self.assertEqual(peer.data, b"last words")

    @inlineCallbacks
    def test_nothing_buffered(self) -> Any:
        """With nothing to send, nothing happens (no write is attempted)."""
        _, transport, _ = yield self.connected()
        calls: list[object] = []
        transport.doWrite = lambda: calls.append(None)
        send_now(plain_tcp(transport))
        self.assertEqual(calls, [])
        del transport.doWrite

    def test_only_plain_tcp(self) -> None:
        """Other transports (in-memory, TLS, HTTP/2 streams) are not touched."""
        self.assertIsNone(plain_tcp(StringTransport()))
        self.assertIsNone(plain_tcp(None))
        send_now(None)
