"""
The proxy over HTTP/2, in memory: an h2 client, the real site and resource, fake upstreams.
RST_STREAM in every window cancels the upstream; a slow h2 reader pauses the upstream read.
"""

from __future__ import annotations

import json

import h2.errors
import h2.events
import h2.settings
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.config import Deadlines, Limits
from oaiproxy.http.h2fix import ProxyH2Connection
from tests.support.fakes import FakeResponse, ProxyHarness, forbid_temporary_files, make_harness
from tests.support.h2client import REQUEST_HEADERS, H2Client, h2_server

CHAT = json.dumps({"model": "m", "messages": [], "stream": True}).encode()
SSE = {b"content-type": [b"text/event-stream"]}
JSON_HEADERS = [(b"content-type", b"application/json")]
MAX_WINDOW = 2**31 - 1


class H2ProxyTestCase(SynchronousTestCase):
    """Shared set-up: a proxy harness and an h2 client connected to it."""

    high_water = 64 * 1024

    def setUp(self) -> None:
        self.h = make_harness(limits=Limits(stream_high_water=self.high_water))

    def connect(
        self, h: ProxyHarness | None = None, settings: dict[int, int] | None = None
    ) -> tuple[ProxyH2Connection, StringTransport, H2Client]:
        h = h or self.h
        connection, transport = h2_server(h.clock, h.site, self.high_water)
        client = H2Client(connection, transport)
        client.connect(settings)
        self.turn()
        client.receive()
        return connection, transport, client

    def turn(self, rounds: int = 50) -> None:
        """Run due zero-delay calls (bounded: the fixed send loop does not spin)."""
        for _ in range(rounds):
            due = [c for c in self.h.clock.calls if c.getTime() <= self.h.clock.seconds()]
            if not due:
                return
            self.h.clock.advance(0)

    def chat(self, client: H2Client) -> int:
        return client.request(
            b"POST", path=b"/v1/chat/completions", headers=JSON_HEADERS, body=CHAT
        )


class H2ForwardingTests(H2ProxyTestCase):
    """A complete exchange over HTTP/2."""

    def test_stream_relayed(self) -> None:
        """An SSE answer reaches the h2 client whole, with the upstream's status."""
        _, _, client = self.connect()
        stream = self.chat(client)
        (sent,) = self.h.sent()
        self.assertEqual(sent.body, CHAT)
        self.assertEqual(sent.uri, b"http://a.invalid:9000/v1/chat/completions")
        response = FakeResponse(200, SSE)
        sent.deferred.callback(response)
        response.deliver(b"data: 1\n\n")
        response.deliver(b"data: [DONE]\n\n")
        response.end()
        self.turn()
        client.receive()
        self.assertEqual(client.headers[stream][b":status"], b"200")
        self.assertEqual(client.body[stream], b"data: 1\n\ndata: [DONE]\n\n")
        self.assertIn(stream, client.ended)

    def test_small_reads_coalesced(self) -> None:
        """Reads arriving within one reactor turn go out as one DATA frame."""
        _, transport, client = self.connect()
        stream = self.chat(client)
        response = FakeResponse(200, SSE)
        self.h.sent()[0].deferred.callback(response)
        for i in range(5):
            response.deliver(b"data: %d\n\n" % i)
        self.turn()
        frames = [
            (e.stream_id, e.data)
            for e in client.h2.receive_data(transport.value())
            if isinstance(e, h2.events.DataReceived)
        ]
        transport.clear()
        self.assertEqual(frames, [(stream, b"".join(b"data: %d\n\n" % i for i in range(5)))])

    def test_body_without_length_in_memory(self) -> None:
        """
        A request body sent without content-length (usual over HTTP/2) is held in memory:
        Twisted's request would put it in a temporary file.
        """
        forbid_temporary_files(self)
        _, _, client = self.connect()
        stream_id = client.h2.get_next_available_stream_id()
        head = [(b":method", b"POST"), (b":path", b"/v1/chat/completions")]
        client.h2.send_headers(stream_id, head + REQUEST_HEADERS[2:] + JSON_HEADERS)
        client.h2.send_data(stream_id, CHAT[:10])
        client.h2.send_data(stream_id, CHAT[10:], end_stream=True)
        client.send()
        self.turn()
        self.assertEqual([sent.body for sent in self.h.sent()], [CHAT])

    def test_body_over_cap_413(self) -> None:
        """An h2 request body over the cap is answered 413 and not forwarded."""
        h = make_harness(limits=Limits(max_body_bytes=1024))
        self.h = h
        _, _, client = self.connect(h)
        stream = client.request(
            b"POST", path=b"/v1/embeddings", headers=JSON_HEADERS, body=b"x" * 4000
        )
        self.turn()
        client.receive()
        self.assertEqual(client.headers[stream][b":status"], b"413")
        self.assertEqual(json.loads(client.body[stream])["error"]["code"], "request_too_large")
        self.assertEqual(h.sent(), [])


class H2ResetTests(H2ProxyTestCase):
    """RST_STREAM cancels the upstream request in every window."""

    def test_reset_before_headers(self) -> None:
        """Before the upstream answered: the upstream client's Deferred is cancelled."""
        _, _, client = self.connect()
        stream = self.chat(client)
        client.reset_stream(stream)
        self.assertTrue(self.h.sent()[0].cancelled)

    def test_reset_after_headers(self) -> None:
        """After the upstream's headers: its body transport is stopped."""
        _, _, client = self.connect()
        stream = self.chat(client)
        response = FakeResponse(200, SSE)
        self.h.sent()[0].deferred.callback(response)
        client.reset_stream(stream)
        self.assertTrue(response.socket.stopped)

    def test_reset_mid_stream(self) -> None:
        """Mid-stream: the body transport is stopped; other streams carry on."""
        _, _, client = self.connect()
        first = self.chat(client)
        second = self.chat(client)
        r1, r2 = FakeResponse(200, SSE), FakeResponse(200, SSE)
        self.h.sent()[0].deferred.callback(r1)
        self.h.sent()[1].deferred.callback(r2)
        r1.deliver(b"data: a\n\n")
        r2.deliver(b"data: b\n\n")
        self.turn()
        client.reset_stream(first)
        self.assertTrue(r1.socket.stopped)
        self.assertFalse(r2.socket.stopped)
        r2.deliver(b"data: [DONE]\n\n")
        r2.end()
        self.turn()
        client.receive()
        self.assertEqual(client.body[second], b"data: b\n\ndata: [DONE]\n\n")
        self.assertIn(second, client.ended)


class H2BackpressureTests(H2ProxyTestCase):
    """A slow h2 reader pauses the upstream read; the queue stays bounded."""

    def test_small_window_pauses_upstream(self) -> None:
        """A client that never opens its window pauses the upstream once the window is full."""
        _, _, client = self.connect()
        stream = self.chat(client)
        response = FakeResponse(200, SSE)
        self.h.sent()[0].deferred.callback(response)
        chunk = b"data: " + b"x" * 16 * 1024 + b"\n\n"
        for _ in range(8):  # 128 KiB against a 64 KiB window
            if response.socket.state == "paused":
                break
            response.deliver(chunk)
            self.turn()
        self.assertEqual(response.socket.state, "paused")
        client.receive()
        self.assertLessEqual(len(client.body[stream]), 65535)
        client.open_window(10 * 1024 * 1024, stream)
        client.open_window(10 * 1024 * 1024)
        self.turn()
        self.assertEqual(response.socket.state, "producing")

    def test_closed_window_cut_after_send_deadline(self) -> None:
        """
        A client holding its window closed for the send deadline gets RST_STREAM; the
        upstream is stopped and the connection's other streams carry on.
        """
        self.h = h = make_harness(
            limits=Limits(stream_high_water=self.high_water),
            deadlines=Deadlines(send=30.0, idle=None),
        )
        _, _, client = self.connect()
        stream = self.chat(client)
        response = FakeResponse(200, SSE)
        h.sent()[0].deferred.callback(response)
        chunk = b"data: " + b"x" * 16 * 1024 + b"\n\n"
        for _ in range(8):
            if response.socket.state == "paused":
                break
            response.deliver(chunk)
            self.turn()
        self.assertEqual(response.socket.state, "paused")
        # What fitted in the window left at once; then nothing moves. The relay checks every
        # quarter of the deadline, so the cut comes 30-37.5 s after the last progress.
        for _ in range(29):  # a second at a time, as a reactor runs its timers
            h.clock.advance(1)
        self.assertFalse(response.socket.stopped)
        for _ in range(10):
            h.clock.advance(1)
        self.turn()
        client.receive()
        self.assertTrue(response.socket.stopped)
        self.assertEqual(client.reset_codes[stream], h2.errors.ErrorCodes.INTERNAL_ERROR)
        self.assertEqual(client.terminated, [])
        client.open_window(1024 * 1024)  # the connection window the first stream used up
        other = client.request(b"GET", path=b"/healthz")
        self.turn()
        client.receive()
        self.assertIn(other, client.ended)

    def test_slow_steady_reader_not_cut(self) -> None:
        """
        A client that reads a little within each send deadline (opening its window 8 KiB at a
        time) is slow, not stalled: its stream is not cut, however long it stays paused.
        """
        self.h = h = make_harness(
            limits=Limits(stream_high_water=self.high_water),
            deadlines=Deadlines(send=30.0, idle=None, total=None),
        )
        _, _, client = self.connect(
            settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 8 * 1024}
        )
        stream = self.chat(client)
        response = FakeResponse(200, SSE)
        h.sent()[0].deferred.callback(response)
        response.deliver(b"data: " + b"x" * 128 * 1024 + b"\n\n")
        self.turn()
        self.assertEqual(response.socket.state, "paused")
        for _ in range(12):  # 240 s of reading 8 KiB every 20 s
            h.clock.advance(20)
            client.receive()
            client.open_window(8 * 1024, stream)
            client.open_window(8 * 1024)
            self.turn()
        client.receive()
        self.assertNotIn(stream, client.reset)
        self.assertFalse(response.socket.stopped)
        self.assertEqual(len(client.body[stream]), 13 * 8 * 1024)

    def test_huge_window_slow_socket_bounded(self) -> None:
        """A huge window but a socket that does not drain: paused at the high-water mark."""
        connection, _, client = self.connect(
            settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: MAX_WINDOW}
        )
        client.open_window(MAX_WINDOW - 65535)
        stream = self.chat(client)
        response = FakeResponse(200, SSE)
        self.h.sent()[0].deferred.callback(response)
        connection.pauseProducing()  # what TCP does when the client stops reading
        chunk = b"data: " + b"y" * 16 * 1024 + b"\n\n"
        delivered = 0
        for _ in range(64):  # up to 1 MiB offered
            if response.socket.state == "paused":
                break
            response.deliver(chunk)
            delivered += len(chunk)
            self.turn()
        self.assertEqual(response.socket.state, "paused")
        self.assertLessEqual(delivered, self.high_water + 2 * len(chunk))
        connection.resumeProducing()
        self.turn()
        client.receive()
        self.assertEqual(response.socket.state, "producing")
        self.assertEqual(len(client.body[stream]), delivered)
