"""The upstream client: connect deadline, failure mapping, agents."""

from __future__ import annotations

from typing import Any

from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, succeed
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import ParseError, ResponseNeverReceived
from twisted.web._newclient import Request as ClientRequest
from twisted.web.client import URI
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from oaiproxy.balancing.pool import Upstream
from oaiproxy.config import ConfigError, UpstreamConfig
from oaiproxy.errors import (
    UpstreamConnectFailed,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamProtocolError,
)
from oaiproxy.http.forwarder import (
    BytesProducer,
    DeadlineEndpoint,
    _UpstreamRequest,
    build_agents,
    map_failure,
)
from tests.support.fakes import HangingEndpoint


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


class UpstreamAgentTests(SynchronousTestCase):
    """The per-upstream Agent builds the same URI Twisted would parse, without parsing."""

    def record(self, url: str) -> tuple[Any, list[tuple[Any, ...]]]:
        """An agent for upstream C{url}, recording what it passes to Twisted's request path."""
        reactor = MemoryReactorClock()
        agents, _ = build_agents(
            reactor,
            [Upstream(UpstreamConfig(url, name="u"))],
            connect_timeout=1.0,
            idle_connections=4,
            keepalive=4.0,
        )
        agent: Any = agents["u"]
        calls: list[tuple[Any, ...]] = []
        agent._requestWithEndpoint = lambda *args: calls.append(args)
        return agent, calls

    def assert_same_as_twisted(self, upstream: str, urls: list[bytes]) -> None:
        agent, calls = self.record(upstream)
        for url in urls:
            agent.request(b"POST", url)
            key, _, method, parsed, _, _, target = calls[-1]
            expected = URI.fromBytes(url)
            fields = ("scheme", "netloc", "host", "port", "path", "params", "query", "fragment")
            self.assertEqual(
                [getattr(parsed, f) for f in fields], [getattr(expected, f) for f in fields], url
            )
            self.assertEqual(parsed.toBytes(), expected.toBytes(), url)
            self.assertEqual(target, expected.originForm, url)
            self.assertEqual(target, parsed.originForm, url)
            self.assertEqual(key, (expected.scheme, expected.host, expected.port), url)
            self.assertEqual(method, b"POST")

    def test_plain_with_port(self) -> None:
        """http with an explicit port; paths with queries and parameters."""
        self.assert_same_as_twisted(
            "http://127.0.0.1:9001/v1",
            [
                b"http://127.0.0.1:9001/v1/chat/completions",
                b"http://127.0.0.1:9001/v1/models?limit=2&after=x",
                b"http://127.0.0.1:9001/v1/files/f;a=b?x=1",
                b"http://127.0.0.1:9001/v1/files/f;?x=1",
                b"http://127.0.0.1:9001/v1/models;",
                b"http://127.0.0.1:9001/v1/a%20b/..//c?q=%0d",
                b"http://127.0.0.1:9001/",
            ],
        )

    def test_tls_default_port(self) -> None:
        """https on its default port (no port in the origin)."""
        self.assert_same_as_twisted(
            "https://api.example.com/v1", [b"https://api.example.com/v1/responses?stream=true"]
        )

    def test_ipv6(self) -> None:
        """An IPv6 literal."""
        self.assert_same_as_twisted("http://[::1]:9001/v1", [b"http://[::1]:9001/v1/models"])

    def test_other_urls_parsed_by_twisted(self) -> None:
        """A URL of another origin, or with a fragment, goes through Twisted's own parsing."""
        self.assert_same_as_twisted(
            "http://127.0.0.1:9001/v1",
            [b"http://127.0.0.1:9002/v1/models", b"http://127.0.0.1:9001/v1/models#frag"],
        )

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

    def test_one_endpoint_reused(self) -> None:
        """The endpoint is made once per agent, not per request."""
        agent, _ = self.record("http://127.0.0.1:9001/v1")
        made: list[Any] = []
        real = agent._getEndpoint

        def counting(uri: Any) -> Any:
            made.append(uri)
            return real(uri)

        agent._getEndpoint = counting
        for _ in range(3):
            agent.request(b"GET", b"http://127.0.0.1:9001/v1/models")
        self.assertEqual(len(made), 1)


class UpstreamRequestTests(SynchronousTestCase):
    """An in-memory body goes out with its head at once, byte for byte as Twisted writes it."""

    def written(self, request_class: Any, body: bytes | None, method: bytes = b"POST") -> bytes:
        headers = Headers({b"host": [b"up.example"], b"x-a": [b"1", b"2"]})
        producer = None if body is None else BytesProducer(body)
        request = request_class(method, b"/v1/chat/completions?x=1", headers, producer, True)
        transport = StringTransport()
        d = request.writeTo(transport)
        self.assertIsNone(self.successResultOf(d))
        value: bytes = transport.value()
        return value

    def test_same_bytes_as_twisted(self) -> None:
        """For empty, small and large bodies, and for no body at all."""
        for body in [b"", b'{"model": "m"}', b"x" * 300_000, None]:
            self.assertEqual(
                self.written(_UpstreamRequest, body), self.written(ClientRequest, body), body
            )
        self.assertEqual(
            self.written(_UpstreamRequest, None, b"GET"), self.written(ClientRequest, None, b"GET")
        )

    def test_body_not_kept(self) -> None:
        """The producer hands its body over: no copy of it stays behind."""
        producer = BytesProducer(b"abc")
        request = _UpstreamRequest(b"POST", b"/", Headers({b"host": [b"h"]}), producer, True)
        request.writeTo(StringTransport())
        self.assertEqual(producer.take(), b"")

    def test_other_producers_take_twisteds_path(self) -> None:
        """A producer of unknown length still goes out chunked, through Twisted's code."""

        @implementer(IBodyProducer)
        class Streaming:
            length = UNKNOWN_LENGTH

            def startProducing(self, consumer: Any) -> Any:
                consumer.write(b"hello")
                return succeed(None)

            def stopProducing(self) -> None:
                pass

            def pauseProducing(self) -> None:
                pass

            def resumeProducing(self) -> None:
                pass

        request = _UpstreamRequest(b"POST", b"/", Headers({b"host": [b"h"]}), Streaming(), True)
        transport = StringTransport()
        request.writeTo(transport)
        self.assertIn(b"Transfer-Encoding: chunked\r\n", transport.value())
        self.assertTrue(transport.value().endswith(b"5\r\nhello\r\n0\r\n\r\n"))

    def test_agent_sends_through_it(self) -> None:
        """The per-upstream agent writes requests with L{_UpstreamRequest}, body and all."""
        reactor = MemoryReactorClock()
        agents, _ = build_agents(
            reactor,
            [Upstream(UpstreamConfig("http://127.0.0.1:9001/v1", name="u"))],
            connect_timeout=1.0,
            idle_connections=4,
            keepalive=4.0,
        )
        d = agents["u"].request(
            b"POST", b"http://127.0.0.1:9001/v1/embeddings", None, BytesProducer(b"{}")
        )
        factory = reactor.tcpClients[0][2]
        protocol: Any = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertEqual(
            transport.value(),
            b"POST /v1/embeddings HTTP/1.1\r\nContent-Length: 2\r\nHost: 127.0.0.1:9001\r\n\r\n{}",
        )
        client = protocol._wrappedProtocol
        self.assertIsInstance(client._currentRequest, _UpstreamRequest)
        # Written at once: the protocol already waits for the response.
        self.assertEqual(client._state, "WAITING")
        self.assertNoResult(d)
