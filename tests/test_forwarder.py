"""The upstream client: connect deadline, failure mapping, agents."""

from __future__ import annotations

from typing import Any

from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import ParseError, ResponseNeverReceived
from twisted.web.client import URI

from oaiproxy.balancing.pool import Upstream
from oaiproxy.config import ConfigError, UpstreamConfig
from oaiproxy.errors import (
    UpstreamConnectFailed,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamProtocolError,
)
from oaiproxy.http.forwarder import DeadlineEndpoint, build_agents, map_failure
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
