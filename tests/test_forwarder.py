"""Sending requests upstream: connect deadline, failure mapping, the clients' requests."""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import ParseError, ResponseNeverReceived
from twisted.web._newclient import Request as ClientRequest
from twisted.web.http_headers import Headers

from oaiproxy.balancing.pool import Upstream
from oaiproxy.config import ConfigError, UpstreamConfig
from oaiproxy.errors import (
    UpstreamConnectFailed,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamProtocolError,
)
from oaiproxy.http.client import UpstreamClient
from oaiproxy.http.forwarder import BytesProducer, DeadlineEndpoint, build_agents, map_failure
from tests.support.fakes import HangingEndpoint, InstantEndpoint


class DeadlineEndpointTests(SynchronousTestCase):
    """The connect deadline, on a fake clock."""

    def test_expires(self) -> None:
        """No connection within the deadline: the attempt is cancelled; retryable timeout."""
        clock = MemoryReactorClock()
        inner = HangingEndpoint()
        d = DeadlineEndpoint(inner, 2.0, clock).connect(Factory())
        clock.advance(1.9)
        self.assertNoResult(d)
        clock.advance(0.2)
        self.assertTrue(inner.cancelled)
        error = map_failure(self.failureResultOf(d))
        self.assertIsInstance(error, UpstreamConnectTimeout)
        self.assertTrue(error.retryable)

    def test_connects_in_time(self) -> None:
        """A connection in time passes through and disarms the deadline."""
        clock = MemoryReactorClock()
        inner = HangingEndpoint()
        d = DeadlineEndpoint(inner, 2.0, clock).connect(Factory())
        proto: Any = object()
        assert inner.attempt is not None
        inner.attempt.callback(proto)
        self.assertIs(self.successResultOf(d), proto)
        self.assertEqual(clock.getDelayedCalls(), [])


class MapFailureTests(SynchronousTestCase):
    """Client failures onto the error tree."""

    def test_refused_retryable(self) -> None:
        """A refused connection is a retryable connect failure."""
        error = map_failure(Failure(ierror.ConnectionRefusedError()))
        self.assertIsInstance(error, UpstreamConnectFailed)
        self.assertTrue(error.retryable)

    def test_tls_error_retryable(self) -> None:
        """
        A TLS error itself (as when setting up TLS on an eager connection raises) is a
        retryable connect failure that says what OpenSSL said.
        """
        error = map_failure(Failure(SSL.Error([("SSL routines", "", "no protocols available")])))
        self.assertIsInstance(error, UpstreamConnectFailed)
        self.assertTrue(error.retryable)
        self.assertEqual(error.message, "upstream TLS handshake failed: no protocols available")

    def test_dns_failure_retryable(self) -> None:
        """A name that does not resolve is a retryable connect failure that says so."""
        error = map_failure(Failure(ierror.DNSLookupError("api.example.invalid")))
        self.assertIsInstance(error, UpstreamConnectFailed)
        self.assertTrue(error.retryable)
        self.assertIn("could not be resolved", error.message)

    def test_never_received_retryable(self) -> None:
        """A response never received (stale pooled connection) is retryable."""
        error = map_failure(Failure(ResponseNeverReceived([Failure(ierror.ConnectionDone())])))
        self.assertIsInstance(error, UpstreamConnectFailed)

    def test_garbage_is_protocol_error(self) -> None:
        """An unparsable response is a 502 protocol error."""
        error = map_failure(Failure(ResponseNeverReceived([Failure(ParseError("x", b"y"))])))
        self.assertIsInstance(error, UpstreamProtocolError)
        self.assertEqual(error.status, 502)

    def test_other(self) -> None:
        """Anything else is a plain 502 upstream error, not retried."""
        error = map_failure(Failure(CancelledError()))
        self.assertEqual((type(error), error.retryable), (UpstreamError, False))


class BuildAgentsTests(SynchronousTestCase):
    """One agent per upstream, over one pool."""

    def test_agents_connect_to_their_upstream(self) -> None:
        """Each agent connects to its own upstream's address."""
        reactor = MemoryReactorClock()
        ups = [
            Upstream(UpstreamConfig("http://127.0.0.1:9001/v1", name="a")),
            Upstream(UpstreamConfig("http://127.0.0.1:9002/v1", name="b")),
        ]
        agents, _ = build_agents(
            reactor, ups, connect_timeout=1.0, idle_connections=4, keepalive=4.0
        )
        self.assertEqual(set(agents), {"a", "b"})
        agents["b"].request(b"GET", b"http://127.0.0.1:9002/v1/models")
        self.assertEqual([(h, p) for h, p, *_ in reactor.tcpClients], [("127.0.0.1", 9002)])


class UpstreamConfigTargetTests(SynchronousTestCase):
    """What an upstream's base URL may hold."""

    def test_unprintable_base_path_refused(self) -> None:
        """A base URL that could not go into a request line as it is never gets that far."""
        for url in [
            "http://127.0.0.1:9001/v1 x",
            "http://127.0.0.1:9001/v1\r\nX: y",
            "http://127.0.0.1:9001/v1/caf\u00e9",
        ]:
            with self.assertRaises(ConfigError, msg=url):
                UpstreamConfig(url)
        # An international host name is fine: it goes out in its IDNA form.
        self.assertEqual(
            UpstreamConfig("https://b\u00fccher.example/v1").host_header, b"xn--bcher-kva.example"
        )


class UpstreamRequestTests(SynchronousTestCase):
    """A request goes out whole, in one write, byte for byte as Twisted's client writes it."""

    def written(self, body: bytes | None, method: bytes = b"POST") -> bytes:
        endpoint = InstantEndpoint()
        client = UpstreamClient(
            MemoryReactorClock(), b"http://up.example", endpoint, idle_connections=1, keepalive=1
        )
        headers = Headers({b"host": [b"up.example"], b"x-a": [b"1", b"2"]})
        producer = None if body is None else BytesProducer(body)
        client.request(method, b"http://up.example/v1/chat/completions?x=1", headers, producer)
        _, transport = endpoint.connections[0]
        value: bytes = transport.value()
        return value

    def twisted_wrote(self, body: bytes | None, method: bytes = b"POST") -> bytes:
        headers = Headers({b"host": [b"up.example"], b"x-a": [b"1", b"2"]})
        producer = None if body is None else BytesProducer(body)
        request = ClientRequest(method, b"/v1/chat/completions?x=1", headers, producer, True)
        transport = StringTransport()
        request.writeTo(transport)
        value: bytes = transport.value()
        return value

    def test_same_bytes_as_twisted(self) -> None:
        """For empty, small and large bodies, and for no body at all."""
        for body in [b"", b'{"model": "m"}', b"x" * 300_000, None]:
            self.assertEqual(self.written(body), self.twisted_wrote(body), body)
        self.assertEqual(self.written(None, b"GET"), self.twisted_wrote(None, b"GET"))

    def test_body_not_kept(self) -> None:
        """The producer hands its body over: no copy of it stays behind."""
        producer = BytesProducer(b"abc")
        client = UpstreamClient(
            MemoryReactorClock(), b"http://h", InstantEndpoint(), idle_connections=1, keepalive=1
        )
        client.request(b"POST", b"http://h/", Headers({b"host": [b"h"]}), producer)
        self.assertEqual(producer.take(), b"")

    def test_client_sends_through_its_endpoint(self) -> None:
        """build_agents' client for an upstream connects to it and writes the request at once."""
        reactor = MemoryReactorClock()
        agents, _ = build_agents(
            reactor,
            [Upstream(UpstreamConfig("http://127.0.0.1:9001/v1", name="u"))],
            connect_timeout=1.0,
            idle_connections=4,
            keepalive=4.0,
        )
        d = agents["u"].request(
            b"POST",
            b"http://127.0.0.1:9001/v1/embeddings",
            Headers({b"host": [b"127.0.0.1:9001"]}),
            BytesProducer(b"{}"),
        )
        factory = reactor.tcpClients[0][2]
        protocol: Any = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertEqual(
            transport.value(),
            b"POST /v1/embeddings HTTP/1.1\r\nContent-Length: 2\r\nHost: 127.0.0.1:9001\r\n\r\n{}",
        )
        self.assertNoResult(d)

    def test_close_closes_idle_connections(self) -> None:
        """The Closeable build_agents returns closes every client's idle connections."""
        reactor = MemoryReactorClock()
        agents, closer = build_agents(
            reactor,
            [Upstream(UpstreamConfig("http://127.0.0.1:9001/v1", name="u"))],
            connect_timeout=None,
            idle_connections=4,
            keepalive=4.0,
        )
        d = agents["u"].request(
            b"GET", b"http://127.0.0.1:9001/v1/models", Headers({b"host": [b"127.0.0.1:9001"]})
        )
        protocol: Any = reactor.tcpClients[0][2].buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.successResultOf(d)
        closed = closer.close()
        self.assertTrue(transport.disconnecting)
        self.assertNoResult(closed)
        protocol.connectionLost(Failure(ierror.ConnectionDone()))
        self.assertIsNone(self.successResultOf(closed))
