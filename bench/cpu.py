"""
The proxy's own CPU per request, without sockets: oaiproxy's site and the mock upstream run
on one L{MemoryReactorClock}, joined by in-memory transports (C{twisted.test.iosim}), and a
keep-alive client sends the same request again and again.

    /work/venv/bin/python bench/cpu.py [--requests N] [--runs R] [--stream]

What it measures is the Python work of one exchange through the proxy, plus the mock's and
the in-memory pumps' (the same for every version of the proxy): no system calls, no reactor,
no other process. The best of R runs is reported, which makes it steady enough on a noisy
machine to compare two versions of the code (run it on each, A/B, a few times): a change of
a few percent shows, where wrk's numbers vary by 20%. It is not a latency: the socket work,
about half the real cost, is missing.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim

from oaiproxy.config import ListenerConfig, PoolConfig, ProxyConfig, UpstreamConfig
from oaiproxy.mock import MockConfig, build_mock_site
from oaiproxy.service import build_site

_CHAT = b'{"model": "mock-gpt", "messages": [{"role": "user", "content": "Say hello."}]}'
_STREAM = b'{"model": "mock-gpt", "stream": true, "messages": [{"role": "user", "content": "Hi"}]}'


class _Client(Protocol):
    """Counts complete responses: by Content-Length, or the end of a chunked body."""

    def __init__(self) -> None:
        self.buffer = b""
        self.responses = 0

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buffer[: head_end + 2].lower()
            if b"transfer-encoding: chunked" in head:
                end = self.buffer.find(b"\r\n0\r\n\r\n", head_end)
                if end < 0:
                    return
                self.buffer = self.buffer[end + 7 :]
            else:
                start = head.index(b"content-length: ") + 16
                length = int(head[start : head.index(b"\r\n", start)])
                if len(self.buffer) < head_end + 4 + length:
                    return
                self.buffer = self.buffer[head_end + 4 + length :]
            if not head.startswith(b"http/1.1 200"):
                raise RuntimeError(f"unexpected response: {head[:200]!r}")
            self.responses += 1


class Harness:
    """One client connection to the proxy, one pooled upstream connection to the mock."""

    def __init__(self, stream: bool, chunks: int) -> None:
        self.reactor = MemoryReactorClock()
        mock = build_mock_site(MockConfig(name="cpu", chunks=chunks, delay=0.0), self.reactor)
        self.reactor.listenTCP(9001, mock, interface="127.0.0.1")
        pool = PoolConfig(upstreams=(UpstreamConfig("http://127.0.0.1:9001/v1", name="up"),))
        config = ProxyConfig(listeners=(ListenerConfig(kind="tcp", port=9000),), pools=(pool,))
        site = build_site(config, self.reactor, pool, {})
        self.client = _Client()
        # As a plain listener serves it (service.build_service): the channel alone.
        server = site.plain_factory().buildProtocol(IPv4Address("TCP", "127.0.0.1", 9000))
        peer = IPv4Address("TCP", "127.0.0.1", 40000)
        self.downstream = iosim.connect(
            server,
            iosim.FakeTransport(server, True, peerAddress=peer),
            self.client,
            iosim.FakeTransport(self.client, False),
            greet=False,
            clock=self.reactor,
        )
        self.completer = iosim.ConnectionCompleter(self.reactor)
        self.upstream: iosim.IOPump | None = None
        body = _STREAM if stream else _CHAT
        self.request = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/json\r\nAuthorization: Bearer sk-test\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )

    def one(self) -> None:
        """Send one request and pump until its response is complete."""
        want = self.client.responses + 1
        assert self.client.transport is not None
        self.client.transport.write(self.request)
        for _ in range(10_000):
            moved = self.downstream.pump()
            if self.upstream is None:
                self.upstream = self.completer.succeedOnce()
            if self.upstream is not None:
                moved = self.upstream.pump() or moved
            if self.client.responses >= want:
                return
            if not moved:
                self.reactor.advance(0)
        raise RuntimeError("no response")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--stream", action="store_true", help="streamed answers (SSE)")
    parser.add_argument("--chunks", type=int, default=8, help="content chunks per answer")
    args = parser.parse_args(argv)
    harness = Harness(args.stream, args.chunks)
    for _ in range(200):  # warm up: connections made, caches filled
        harness.one()
    best = float("inf")
    for _ in range(args.runs):
        gc.collect()
        start = time.process_time()
        for _ in range(args.requests):
            harness.one()
        best = min(best, (time.process_time() - start) / args.requests)
    kind = f"streamed, {args.chunks} chunks" if args.stream else "non-streaming"
    print(f"{best * 1e6:.1f} us CPU per request ({kind}; best of {args.runs} x {args.requests})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
