"""
Chunks of a streamed answer relayed as the upstream framed them, to a plain HTTP/1.1 client,
over real loopback sockets.

The upstream here sends one chunk at a time, each only once the client received the one
before, so that each upstream read holds exactly one chunk (the case the relay passes on as
it came); its chunk sizes are upper-case hex, which the proxy's own framing never writes.
Clients that must not get the upstream's framing (HTTP/1.0, TLS) are checked too.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor as _global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from oaiproxy.config import UpstreamConfig
from tests.support.servers import dechunk, start_proxy

reactor: Any = _global_reactor

_EVENTS = [b"data: %s\n\n" % json.dumps({"n": n, "pad": "x" * n}).encode() for n in range(1, 8)]


def _framed(event: bytes) -> bytes:
    return b"%X\r\n%s\r\n" % (len(event), event)


class _PacedUpstream(Protocol):
    """Answers one request with a chunked SSE body, one chunk per L{send_next} call."""

    def __init__(self, upstreams: list[_PacedUpstream]) -> None:
        self._buffer = b""
        self._sent = 0
        self._answered = False
        upstreams.append(self)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if self._answered or b"\r\n\r\n" not in self._buffer:
            return
        head, _, body = self._buffer.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        if len(body) < length:
            return
        self._answered = True
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        self.send_next()

    def send_next(self) -> None:
        assert self.transport is not None
        if self._sent < len(_EVENTS):
            self.transport.write(_framed(_EVENTS[self._sent]))
            self._sent += 1
        else:
            self.transport.write(b"0\r\n\r\n")


class _Client(Protocol):
    """
    Sends a streamed request; each time a whole new event has arrived, asks the upstream for
    the next chunk (the last time, for the end of the body).
    """

    def __init__(self, upstreams: list[_PacedUpstream], version: bytes) -> None:
        self._upstreams = upstreams
        self._version = version
        self._asked = 0
        self.received = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        body = json.dumps({"model": "m", "stream": True, "messages": []}).encode()
        assert self.transport is not None
        self.transport.write(
            b"POST /v1/chat/completions %s\r\nHost: proxy\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (self._version, len(body), body)
        )

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.received.endswith(b"\r\n0\r\n\r\n"):
            assert self.transport is not None
            self.transport.loseConnection()
            return
        body = self.received.partition(b"\r\n\r\n")[2]
        events = body.count(b"data: ")
        if events > self._asked and body.endswith((b"\n\n", b"\n\n\r\n")):
            self._asked = events
            self._upstreams[0].send_next()

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        self.done.callback(self.received)


class ChunkPassthroughTests(TestCase):
    """A plain HTTP/1.1 client gets each chunk framed as the upstream framed it; others do not."""

    timeout = 30

    async def exchange(self, version: bytes = b"HTTP/1.1", *, tls: bool = False) -> bytes:
        """One streamed request through the proxy to a paced upstream: the raw answer."""
        upstreams: list[_PacedUpstream] = []
        listening = reactor.listenTCP(
            0, Factory.forProtocol(lambda: _PacedUpstream(upstreams)), interface="127.0.0.1"
        )
        self.addCleanup(listening.stopListening)
        port = listening.getHost().port
        proxy = start_proxy(self, [UpstreamConfig(url=f"http://127.0.0.1:{port}/v1")])
        endpoint: Any = TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.http_port)
        if tls:
            with open(proxy.cert_path, "rb") as f:
                trust = Certificate.loadPEM(f.read())
            options = optionsForClientTLS(
                "localhost", trustRoot=trust, acceptableProtocols=[b"http/1.1"]
            )
            endpoint = wrapClientTLS(
                options, TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.tls_port)
            )
        client = _Client(upstreams, version)
        await connectProtocol(endpoint, client)
        return await client.done

    async def test_chunks_as_the_upstream_framed_them(self) -> None:
        """Plain TCP, HTTP/1.1: every chunk after the first as the upstream framed it."""
        head, _, body = (await self.exchange()).partition(b"\r\n\r\n")
        self.assertIn(b"\r\nTransfer-Encoding: chunked", head)
        self.assertEqual(dechunk(body), b"".join(_EVENTS))
        # The first chunk is written with the response head, framed by the proxy (lower
        # case); every one after it as the upstream framed it (upper case).
        first = b"%x\r\n%s\r\n" % (len(_EVENTS[0]), _EVENTS[0])
        self.assertNotEqual(first, _framed(_EVENTS[0]))  # the test can tell them apart
        self.assertEqual(body, first + b"".join(map(_framed, _EVENTS[1:])) + b"0\r\n\r\n")

    async def test_http10_client_gets_the_data_alone(self) -> None:
        """An HTTP/1.0 client's answer is not chunked: the events alone, to the close."""
        head, _, body = (await self.exchange(b"HTTP/1.0")).partition(b"\r\n\r\n")
        self.assertIn(b"\r\nConnection: close", head)
        self.assertNotIn(b"Transfer-Encoding", head)
        self.assertEqual(body, b"".join(_EVENTS))

    async def test_tls_client_gets_the_proxys_framing(self) -> None:
        """Over TLS the relay frames every chunk itself (lower case), as before."""
        head, _, body = (await self.exchange(tls=True)).partition(b"\r\n\r\n")
        self.assertIn(b"\r\nTransfer-Encoding: chunked", head)
        framed = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in _EVENTS)
        self.assertEqual(body, framed + b"0\r\n\r\n")
