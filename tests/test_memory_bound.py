"""
The proxy's memory stays bounded under a slow reader, over real loopback sockets: a client that
stops reading pauses the proxy's upstream read, and so the upstream itself, however large the
stream; once the client reads again, every byte arrives, unchanged.

The upstream streams over 20 MB as fast as it can. Bounds are on the bytes the proxy's relay
has taken from the upstream when everything has stopped: over HTTP/1.1 that is what the
kernel's socket buffers between proxy and client hold plus a fixed allowance; over HTTP/2 it
is the client's flow-control window plus the proxy's per-stream high-water mark plus the same
kind of allowance. Without backpressure the relay would take the whole stream.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from oaiproxy.config import Deadlines, Limits
from tests.support.servers import (
    H2Response,
    LoopbackH2Client,
    RecordingRelay,
    SeenRequest,
    connect_h2,
    dechunk,
    reactor,
    record_relays,
    sse_events,
    start_mock,
    start_proxy,
    wait_for,
    wait_until_still,
    within,
)

_CHUNKS = 320
_CHUNK_SIZE = 64 * 1024
#: The content alone is 20 MiB; each event adds its JSON around it.
_AT_LEAST = _CHUNKS * _CHUNK_SIZE
_BIG_STREAM = [
    (b"x-mock-chunks", b"%d" % _CHUNKS),
    (b"x-mock-chunk-size", b"%d" % _CHUNK_SIZE),
    (b"x-mock-delay-ms", b"0"),
]
_BODY = json.dumps(
    {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}], "stream": True}
).encode()
_SMALL = json.dumps(
    {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]}
).encode()
#: The slow HTTP/1.1 client's receive buffer (a fixed size turns off the kernel's autotuning).
_CLIENT_RCVBUF = 16 * 1024
#: Bytes the proxy may hold beyond the kernel buffers or flow-control windows: its transport's
#: write buffer, the relay's coalesced reads, the framing of a few events.
_ALLOWANCE = 1024 * 1024
_H2_INITIAL_WINDOW = 65_535


class _SlowReader:
    """
    An HTTP/1.1 client on a raw socket, in a thread: it sends a request for a big stream,
    reads the response head, then stops reading until L{go_on}; then it either reads the rest
    or closes its socket.
    """

    def __init__(self, port: int) -> None:
        self._port = port
        self.got_head: Deferred[None] = Deferred()
        self._resume = threading.Event()
        self._close = False
        self.rcvbuf = 0
        self.raw = b""

    def run(self) -> Deferred[None]:
        """Start the client thread; the Deferred fires when it is done."""
        return deferToThread(self._run)

    def go_on(self, *, close: bool = False) -> None:
        """Let the thread read the rest of the response (or close, with C{close})."""
        self._close = close
        self._resume.set()

    def _run(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _CLIENT_RCVBUF)
        sock.settimeout(30)
        try:
            sock.connect(("127.0.0.1", self._port))
            self.rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            knobs = b"".join(b"%s: %s\r\n" % header for header in _BIG_STREAM)
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"
                b"Connection: close\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n%s\r\n%s" % (len(_BODY), knobs, _BODY)
            )
            parts = [sock.recv(4096)]
            reactor.callFromThread(self.got_head.callback, None)
            # Stop reading until the test has checked the bound.
            self._resume.wait(30)
            if self._close:
                return
            while parts[-1]:
                parts.append(sock.recv(1 << 20))
            self.raw = b"".join(parts)
        finally:
            sock.close()


class SlowReaderTests(TestCase):
    """A client that stops reading holds the whole chain back, over HTTP/1.1 and HTTP/2."""

    timeout = 60

    async def pause_http11(
        self, deadlines: Deadlines | None = None
    ) -> tuple[_SlowReader, Deferred[None], RecordingRelay, SeenRequest]:
        """
        A slow HTTP/1.1 reader's request, once the relay and the upstream have settled paused:
        the reader, its thread's Deferred, the relay and what the mock saw.
        """
        mock = start_mock(self, "a")
        relays = record_relays(self)
        self.proxy = start_proxy(self, [mock.upstream()], deadlines=deadlines)
        self.mock = mock
        reader = _SlowReader(self.proxy.http_port)
        done = reader.run()
        try:
            await within(reader.got_head, "the response head")
            (relay,) = relays
            (seen,) = mock.requests
            await wait_until_still(
                lambda: relay.paused and seen.producer_paused,
                lambda: (relay.bytes_relayed, seen.body_bytes),
                "the relay and the upstream to stay paused",
            )
        except BaseException:
            reader.go_on(close=True)
            raise
        return reader, done, relay, seen

    async def test_http11_reader_pauses_upstream(self) -> None:
        """HTTP/1.1 client not reading: relay and upstream pause, bounded; then all arrives."""
        reader, done, relay, seen = await self.pause_http11()
        try:
            (transport,) = self.proxy.connections.transports
            sndbuf = transport.getHandle().getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            bound = sndbuf + reader.rcvbuf + _ALLOWANCE
            self.assertLess(bound, _AT_LEAST, "the stream is too small for this machine's test")
            self.assertLessEqual(relay.bytes_relayed, bound)
            self.assertLess(seen.body_bytes, _AT_LEAST)
        finally:
            reader.go_on()
        await within(done, "the client thread")
        head, _, chunked = reader.raw.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        body = dechunk(chunked)
        self.assertGreater(seen.body_bytes, _AT_LEAST)
        self.assertEqual(len(body), seen.body_bytes)
        self.assertEqual(hashlib.sha256(body).hexdigest(), seen.digest.hexdigest())
        self.assertEqual(sse_events(body)[-1], b"[DONE]")

    async def test_http11_close_while_paused_cancels_upstream(self) -> None:
        """A paused HTTP/1.1 reader that closes its socket cancels the upstream request."""
        reader, done, _, seen = await self.pause_http11()
        reader.go_on(close=True)
        await within(done, "the client thread")
        self.assertFalse(await within(seen.ended, "the upstream request to end"))
        await within(self.mock.connections.when_closed(), "the upstream connection to close")

    async def test_http11_stalled_reader_cut_after_send_deadline(self) -> None:
        """
        An HTTP/1.1 client that stops reading for the send deadline has its response cut
        and the upstream request cancelled, without reading a byte more.
        """
        reader, done, _, seen = await self.pause_http11(Deadlines(send=1.0))
        try:
            self.assertFalse(await within(seen.ended, "the upstream request to be cancelled"))
            await within(self.mock.connections.when_closed(), "the upstream connection to close")
            await within(
                self.proxy.connections.when_closed(), "the client connection to be closed"
            )
        finally:
            reader.go_on(close=True)
        await within(done, "the client thread")

    async def test_http2_closed_window_pauses_upstream(self) -> None:
        """h2 client holding its window shut: relay and upstream pause, bounded; then all."""
        mock = start_mock(self, "a")
        relays = record_relays(self)
        proxy = start_proxy(self, [mock.upstream()])
        client = await connect_h2(self, proxy)
        client.reading = False
        response = client.request(b"/v1/chat/completions", _BODY, _BIG_STREAM)
        await within(response.head, "the response head")
        self.assertEqual(client.negotiated, b"h2")
        (relay,) = relays
        (seen,) = mock.requests
        await wait_until_still(
            lambda: relay.paused and seen.producer_paused,
            lambda: (relay.bytes_relayed, seen.body_bytes, response.received),
            "the relay and the upstream to stay paused",
        )
        self.assertLessEqual(response.received, _H2_INITIAL_WINDOW)
        bound = _H2_INITIAL_WINDOW + Limits().stream_high_water + _ALLOWANCE
        self.assertLessEqual(relay.bytes_relayed, bound)
        self.assertLess(seen.body_bytes, _AT_LEAST)

        client.open_windows()
        await within(response.done, "the rest of the stream")
        self.assertEqual(response.status, 200)
        self.assertGreater(seen.body_bytes, _AT_LEAST)
        self.assertEqual(response.received, seen.body_bytes)
        body = response.body
        self.assertEqual(hashlib.sha256(body).hexdigest(), seen.digest.hexdigest())
        self.assertEqual(sse_events(body)[-1], b"[DONE]")

    async def paused_h2(self) -> tuple[LoopbackH2Client, H2Response, SeenRequest]:
        """A big h2 stream held by its window, once its relay and upstream stay paused."""
        self.mock = start_mock(self, "a")
        relays = record_relays(self)
        self.proxy = start_proxy(self, [self.mock.upstream()])
        client = await connect_h2(self, self.proxy)
        # Only the stream's window is held: the connection's stays open for other streams.
        response = client.request(b"/v1/chat/completions", _BODY, _BIG_STREAM, held=True)
        await within(response.head, "the response head")
        (relay,) = relays
        (seen,) = self.mock.requests
        await wait_until_still(
            lambda: relay.paused and seen.producer_paused,
            lambda: (relay.bytes_relayed, seen.body_bytes, response.received),
            "the relay and the upstream to stay paused",
        )
        return client, response, seen

    async def test_http2_reset_while_paused_cancels_upstream(self) -> None:
        """RST_STREAM on a paused h2 stream cancels its upstream; the connection lives on."""
        client, response, seen = await self.paused_h2()
        client.reset(response.stream_id)
        self.assertFalse(await within(seen.ended, "the upstream request to end"))
        await within(self.mock.connections.when_closed(), "the upstream connection to close")
        again = client.request(b"/v1/chat/completions", _SMALL)
        await within(again.done, "another request on the same connection")
        self.assertEqual(again.status, 200)

    async def test_http2_close_while_paused_cancels_upstream(self) -> None:
        """Closing an h2 connection whose stream is paused cancels the upstream request."""
        client, _, seen = await self.paused_h2()
        client.close()
        self.assertFalse(await within(seen.ended, "the upstream request to end"))
        await within(self.mock.connections.when_closed(), "the upstream connection to close")

    async def test_http2_held_stream_does_not_block_others(self) -> None:
        """While one h2 stream is held by its window, others on the connection complete."""
        mock = start_mock(self, "a")
        relays = record_relays(self)
        proxy = start_proxy(self, [mock.upstream()])
        client = await connect_h2(self, proxy)
        held = client.request(b"/v1/chat/completions", _BODY, _BIG_STREAM, held=True)
        await within(held.head, "the response head")
        (relay,) = relays
        await wait_for(lambda: relay.paused, "the held stream's relay to pause")
        for _ in range(3):
            other = client.request(b"/v1/chat/completions", _SMALL)
            await within(other.done, "a request beside the held stream")
            self.assertEqual(other.status, 200)
            content = json.loads(other.body)["choices"][0]["message"]["content"]
            self.assertEqual(content, "lorem ipsum dolor sit amet conse")
        self.assertLessEqual(held.received, _H2_INITIAL_WINDOW)
        self.assertTrue(relay.paused)
        client.release(held)
        await within(held.done, "the held stream, released")
        (seen, *_) = mock.requests
        self.assertEqual(held.received, seen.body_bytes)
        self.assertEqual(hashlib.sha256(held.body).hexdigest(), seen.digest.hexdigest())
