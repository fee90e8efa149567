"""
HTTPS upstreams over real loopback sockets: the certificate and host name are verified against
the upstream's CA bundle; a wrong CA fails the request as a 502, never passes it through.
"""

from __future__ import annotations

import json
from typing import Any

import treq
from twisted.internet import reactor as _global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.http_headers import Headers

from oaiproxy.config import Deadlines, ListenerConfig, PoolConfig, ProxyConfig, UpstreamConfig
from oaiproxy.errors import UpstreamConnectTimeout
from oaiproxy.http.client import UpstreamClient
from oaiproxy.http.forwarder import BytesProducer, _endpoint, map_failure
from oaiproxy.mock import MockConfig, build_mock_site
from oaiproxy.service import build_site
from oaiproxy.tls import ensure_self_signed, server_context_factory

# The global reactor's module type says nothing of its interfaces (IReactorTCP, IReactorSSL).
reactor: Any = _global_reactor

_DONE = Failure(ConnectionDone())

CHAT = json.dumps({"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]})


class UpstreamTLSTests(TestCase):
    """The proxy talks to an HTTPS mock upstream."""

    timeout = 30

    def setUp(self) -> None:
        key, self.cert = ensure_self_signed(self.mktemp())
        site = build_mock_site(MockConfig(name="tls-mock"), reactor)
        port = reactor.listenSSL(
            0, site, server_context_factory(key, self.cert), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        self.upstream_port = port.getHost().port

    def proxy(self, url: str, ca_bundle: str) -> str:
        """Start the proxy for one HTTPS upstream; return its base URL."""
        upstream = UpstreamConfig(url=url, ca_bundle=ca_bundle, name="tls")
        config = ProxyConfig(
            listeners=(ListenerConfig("tcp", 0),),
            pools=(PoolConfig(upstreams=(upstream,)),),
            deadlines=Deadlines(connect=5.0),
        )
        site = build_site(config, reactor, config.pools[0], {})
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(site.resource.close)
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}"

    async def post(self, base: str) -> tuple[int, dict[str, Any], str]:
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await treq.post(
            base + "/v1/chat/completions",
            data=CHAT.encode(),
            headers=Headers({b"content-type": [b"application/json"]}),
            pool=pool,
        )
        body: dict[str, Any] = await response.json()
        upstream = response.headers.getRawHeaders(b"x-mock-upstream", [b""])[0].decode()
        return response.code, body, upstream

    async def test_verified_by_ca_bundle(self) -> None:
        """With the upstream's CA as the bundle, the request goes through over TLS by name."""
        base = self.proxy(f"https://localhost:{self.upstream_port}/v1", self.cert)
        code, body, upstream = await self.post(base)
        self.assertEqual((code, upstream), (200, "tls-mock"))
        self.assertIn("choices", body)

    async def test_verified_by_ip(self) -> None:
        """An upstream addressed by IP is verified against the certificate's IP names."""
        base = self.proxy(f"https://127.0.0.1:{self.upstream_port}/v1", self.cert)
        code, _, upstream = await self.post(base)
        self.assertEqual((code, upstream), (200, "tls-mock"))

    async def test_wrong_ca_is_502(self) -> None:
        """A certificate the bundle does not vouch for fails the request with a 502."""
        _, other_ca = ensure_self_signed(self.mktemp())
        base = self.proxy(f"https://localhost:{self.upstream_port}/v1", other_ca)
        code, body, upstream = await self.post(base)
        self.assertEqual((code, upstream), (502, ""))
        self.assertEqual(set(body["error"]), {"message", "type", "param", "code"})
        # Says why, rather than "closed the connection before answering".
        self.assertIn("could not be verified", body["error"]["message"])

    async def test_wrong_name_is_502(self) -> None:
        """A certificate for other names fails the request with a 502 that says so."""
        key, cert = ensure_self_signed(self.mktemp(), hostnames=("other.invalid",))
        site = build_mock_site(MockConfig(name="other"), reactor)
        port = reactor.listenSSL(0, site, server_context_factory(key, cert), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        base = self.proxy(f"https://localhost:{port.getHost().port}/v1", cert)
        code, body, upstream = await self.post(base)
        self.assertEqual((code, upstream), (502, ""))
        self.assertIn("does not name", body["error"]["message"])

    async def test_stalled_handshake_is_a_connect_timeout(self) -> None:
        """
        An upstream that takes the TCP connection but never answers the TLS handshake fails
        the request when the connect deadline expires (a retryable connect timeout), not at
        the first-byte deadline: the deadline covers the handshake, and the connection is
        aborted.
        """
        hello: Deferred[None] = Deferred()
        lost: Deferred[None] = Deferred()

        class Silent(Protocol):
            def dataReceived(self, data: bytes) -> None:
                if not hello.called:
                    hello.callback(None)  # the ClientHello came

            def connectionLost(self, reason: Failure = _DONE) -> None:
                lost.callback(None)

        port = reactor.listenTCP(0, Factory.forProtocol(Silent), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        origin = f"https://127.0.0.1:{port.getHost().port}"
        config = UpstreamConfig(url=origin + "/v1", ca_bundle=self.cert)
        clock = Clock()
        client = UpstreamClient(
            clock,
            origin.encode(),
            _endpoint(reactor, config, 2.0, clock),
            idle_connections=1,
            keepalive=4.0,
        )
        d = client.request(b"POST", origin.encode() + b"/v1/x", None, BytesProducer(b"{}"))
        await hello
        clock.advance(1.9)
        self.assertFalse(d.called)
        clock.advance(0.2)
        failures: list[Failure] = []
        d.addErrback(failures.append)
        self.assertEqual(len(failures), 1)
        error = map_failure(failures[0])
        self.assertIsInstance(error, UpstreamConnectTimeout)
        self.assertTrue(error.retryable)
        await lost
