"""
A proxied request leaves no reference cycles: its objects are freed by reference counting
when it ends, not by the garbage collector.

The garbage collector's settings (L{oaiproxy.gctune}: a young threshold far above Python's
default, the start-up heap frozen) assume it: a cycle per request would pile up garbage
between the rarer collections. Real requests over loopback, through the proxy's own
listeners, to a mock upstream; the collector is off while they run, and what it then finds
unreachable (cycles, and what hangs off them) is examined for the proxy's own objects.
"""

from __future__ import annotations

import gc
import json
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import reactor as _global_reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web._http2 import H2Stream

from oaiproxy.config import UpstreamConfig
from oaiproxy.mock import MockConfig, build_mock_site
from oaiproxy.tls import ensure_self_signed, server_context_factory
from tests.support.servers import (
    ProxyServer,
    connect_h2,
    raw_exchange,
    refused_port,
    start_mock,
    start_proxy,
    wait_for,
)

_CHAT = json.dumps({"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]})
_STREAM = json.dumps(
    {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}], "stream": True}
)


def _request(body: str, *, close: bool, extra: bytes = b"") -> bytes:
    data = body.encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"
        b"Content-Type: application/json\r\n%s%sContent-Length: %d\r\n\r\n%s"
        % (extra, b"Connection: close\r\n" if close else b"", len(data), data)
    )


def _is_the_proxys(thing: object) -> bool:
    """An object of the proxy's own (not the mock upstream's, nor the test's clients')."""
    kind = type(thing)
    module = kind.__module__
    return (module.startswith("oaiproxy.") and not module.startswith("oaiproxy.mock")) or (
        kind is H2Stream
    )


class NoCyclesTests(TestCase):
    """Requests through the proxy, then what the collector finds."""

    timeout = 60

    def setUp(self) -> None:
        self.mock = start_mock(self, "a")
        self.proxy = self.start_proxy([self.mock.upstream()])

    def start_proxy(self, upstreams: list[UpstreamConfig]) -> ProxyServer:
        """
        The proxy, its client connections untracked (the tracker's closures are reference
        cycles themselves); every test closes them before it ends.
        """
        return start_proxy(self, upstreams, track=False)

    async def unreachable_after(self, exchange: Callable[[], Awaitable[None]]) -> Counter[str]:
        """
        Run C{exchange} once to warm up (pooled upstream connection, lazy imports), then
        three times with the collector off: the proxy's objects it then finds unreachable,
        by type.
        """
        await exchange()
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        for _ in range(3):
            await exchange()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            found = Counter(
                f"{type(o).__module__}.{type(o).__qualname__}"
                for o in gc.garbage
                if _is_the_proxys(o)
            )
        finally:
            gc.garbage.clear()
            gc.set_debug(0)
        return found

    async def test_probe(self) -> None:
        """The census sees a cycle of the proxy's objects (the test can fail)."""
        from oaiproxy.context import RequestContext

        async def exchange() -> None:
            context = RequestContext(
                request_id=b"x",
                method=b"GET",
                rest=b"/models",
                query=b"",
                headers=None,  # type: ignore[arg-type]
                body=b"",
                client_ip="127.0.0.1",
                secure=False,
                started=0.0,
                model=None,
                stream=False,
            )
            context.cycle = context  # type: ignore[attr-defined]

        found = await self.unreachable_after(exchange)
        self.assertEqual(found, Counter({"oaiproxy.context.RequestContext": 3}))

    async def test_http1_new_connections(self) -> None:
        """Streamed and plain answers, each on a new HTTP/1.1 connection the proxy closes."""

        async def exchange() -> None:
            for body in (_CHAT, _STREAM):
                answer = await raw_exchange(self.proxy.http_port, _request(body, close=True))
                self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:200])

        self.assertEqual(await self.unreachable_after(exchange), Counter())

    async def test_http1_keep_alive(self) -> None:
        """Several requests on one HTTP/1.1 connection, the last one closing it."""
        pipelined = _request(_CHAT, close=False) + _request(_STREAM, close=False)

        async def exchange() -> None:
            answer = await raw_exchange(
                self.proxy.http_port, pipelined + _request(_CHAT, close=True)
            )
            self.assertEqual(answer.count(b"HTTP/1.1 200 "), 3, answer[:200])

        self.assertEqual(await self.unreachable_after(exchange), Counter())

    async def test_http2(self) -> None:
        """Streamed and plain answers on one HTTP/2 connection over TLS (still open)."""
        client = await connect_h2(self, self.proxy)
        self.addCleanup(client.close)

        async def exchange() -> None:
            for body in (_CHAT, _STREAM):
                response = await client.request(b"/v1/chat/completions", body.encode()).done
                self.assertEqual(response.status, 200)

        self.assertEqual(await self.unreachable_after(exchange), Counter())

    async def test_errors(self) -> None:
        """Refusals (400), a 404, and an upstream's own error answer (500, passed on)."""

        async def exchange() -> None:
            for request in (
                _request("{not json", close=True),
                _request(_CHAT, close=True, extra=b"x-mock-fault: 500\r\n"),
                b"GET /nowhere HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n",
                b"GET /v1/models HTTP/1.1\r\nConnection: close\r\n\r\n",  # no Host: 400
            ):
                answer = await raw_exchange(self.proxy.http_port, request)
                self.assertRegex(answer[:12], rb"HTTP/1.1 [45]\d\d", answer[:200])

        self.assertEqual(await self.unreachable_after(exchange), Counter())

    async def test_upstream_failures(self) -> None:
        """
        An upstream that refuses the connection (the request fails over), one that sends
        garbage, and one that drops the connection mid-stream: each upstream connection
        closed, and new ones made.
        """
        dead = UpstreamConfig(url=f"http://127.0.0.1:{refused_port(self)}/v1", name="dead")
        proxy = self.start_proxy([dead, self.mock.upstream()])

        async def exchange() -> None:
            for body, fault, status in (
                (_CHAT, b"", b"200"),
                (_CHAT, b"garbage", b"502"),
                (_STREAM, b"disconnect-after=1", b"200"),
            ):
                extra = b"x-mock-fault: %s\r\n" % fault if fault else b""
                answer = await raw_exchange(
                    proxy.http_port, _request(body, close=True, extra=extra)
                )
                self.assertTrue(answer.startswith(b"HTTP/1.1 %s " % status), answer[:200])
            self.assertIn(b'"error"', answer)  # the error event after the cut

        self.assertEqual(await self.unreachable_after(exchange), Counter())

    async def test_client_goes_away(self) -> None:
        """A client that closes its connection mid-stream: the upstream request cancelled."""

        def stream_then_leave() -> None:
            with socket.create_connection(("127.0.0.1", self.proxy.http_port), 30) as sock:
                extra = b"x-mock-chunks: 1000\r\nx-mock-delay-ms: 5\r\n"
                sock.sendall(_request(_STREAM, close=False, extra=extra))
                self.assertTrue(sock.recv(65536).startswith(b"HTTP/1.1 200 "))

        async def exchange() -> None:
            await deferToThread(stream_then_leave)
            # The proxy cancels the upstream request by closing its connection.
            await wait_for(
                lambda: self.mock.connections.open_count == 0, "the upstream connection to close"
            )

        self.assertEqual(await self.unreachable_after(exchange), Counter())

    async def test_https_upstream(self) -> None:
        """
        An HTTPS upstream, verified by its CA bundle: plain and streamed answers on pooled
        TLS connections, and one with the wrong CA (a 502, its connection dropped).
        """
        reactor: Any = _global_reactor
        key, cert = ensure_self_signed(self.mktemp())
        _, other_ca = ensure_self_signed(self.mktemp())
        site = build_mock_site(MockConfig(name="tls-mock"), reactor)
        port = reactor.listenSSL(0, site, server_context_factory(key, cert), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"https://localhost:{port.getHost().port}/v1"
        good = self.start_proxy([UpstreamConfig(url=url, ca_bundle=cert, name="tls")])
        bad = self.start_proxy([UpstreamConfig(url=url, ca_bundle=other_ca, name="wrong-ca")])

        async def exchange() -> None:
            for proxy, body, status in (
                (good, _CHAT, b"200"),
                (good, _STREAM, b"200"),
                (bad, _CHAT, b"502"),
            ):
                answer = await raw_exchange(proxy.http_port, _request(body, close=True))
                self.assertTrue(answer.startswith(b"HTTP/1.1 %s " % status), answer[:200])

        self.assertEqual(await self.unreachable_after(exchange), Counter())
