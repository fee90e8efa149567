"""
Tests for L{oaiproxy.http.h2fix}: Twisted's HTTP/2 server without its busy loop on a closed
window, its unbounded per-stream queue and its idle timeout under waiting streams.

The server protocols run on a L{MemoryReactorClock} and a L{StringTransport}; an C{h2} client
connection feeds them bytes and parses what they write.
"""

# trial's assertions, StringTransport and twisted.web are unannotated.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

from collections import deque
from io import StringIO

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame, PriorityFrame
from twisted.internet.base import DelayedCall
from twisted.internet.interfaces import IProtocol, IProtocolNegotiationFactory, IPushProducer
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer
from zope.interface.verify import verifyObject

from oaiproxy.http.h1server import H1Channel
from oaiproxy.http.h2fix import (
    DEFAULT_STREAM_HIGH_WATER,
    MAX_EMPTY_DATA_FRAMES,
    ProxyH2Connection,
    ProxyHTTPChannelSwitch,
    ProxySite,
)
from oaiproxy.http.h2streams import RefusingH2Connection
from tests.support.h2client import CLIENT_ADDRESS, REQUEST_HEADERS, H2Client, h2_server

_INITIAL_WINDOW_SIZE = h2.settings.SettingCodes.INITIAL_WINDOW_SIZE
_MAX_WINDOW = 2**31 - 1
_DEFAULT_WINDOW = 65535
_TIMEOUT = 60
_CLIENT = CLIENT_ADDRESS
_REQUEST_HEADERS = REQUEST_HEADERS


class _HeldResource(Resource):
    """The app: holds every request open for the test to answer."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []
        # Answer at once with an empty body instead.
        self.answer_empty = False

    def render(self, request: Request) -> int | bytes:
        self.requests.append(request)
        if self.answer_empty:
            return b""
        return NOT_DONE_YET


class _HelloResource(Resource):
    """The app: answers every GET with a short text body."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return b"hello over " + request.clientproto


@implementer(IPushProducer)
class _ChunkWriter:
    """A response body producer: writes C{total} bytes in C{chunk}-byte writes while allowed."""

    def __init__(self, request: Request, total: int, chunk: int = 1000) -> None:
        self.request = request
        self.total = total
        self.chunk = chunk
        self.written = 0
        self.paused = False
        self.pauses = 0
        self.resumes = 0
        self.stopped = False
        self.finished = False

    def start(self) -> None:
        """Register with the request and write until paused or done."""
        self.request.registerProducer(self, True)
        self._produce()

    def _produce(self) -> None:
        while not self.paused and self.written < self.total:
            size = min(self.chunk, self.total - self.written)
            self.written += size
            self.request.write(b"x" * size)
        if self.written >= self.total and not self.finished:
            self.finished = True
            self.request.unregisterProducer()
            self.request.finish()

    def pauseProducing(self) -> None:
        self.pauses += 1
        self.paused = True

    def resumeProducing(self) -> None:
        self.resumes += 1
        self.paused = False
        self._produce()

    def stopProducing(self) -> None:
        self.stopped = True
        self.paused = True


class _ALPNTransport(StringTransport):
    """A transport that reports the protocol TLS negotiated with ALPN, if any."""

    def __init__(self, negotiated: bytes | None) -> None:
        super().__init__(peerAddress=_CLIENT)
        self.negotiatedProtocol = negotiated


class _H2TestCase(SynchronousTestCase):
    """Shared set-up: a clock, a held app and a site; helpers to run the reactor's turns."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.app = _HeldResource()
        self.site = ProxySite(self.app, self.clock, idle_timeout=_TIMEOUT)

    def due_calls(self) -> list[DelayedCall]:
        """The delayed calls due now (a callLater(0) loop leaves one here forever)."""
        now = self.clock.seconds()
        return [call for call in self.clock.calls if call.getTime() <= now]

    def settle(self, limit: int = 1000) -> None:
        """
        Run due calls until none is left, failing if they keep coming back.

        C{Clock.advance(0)} would loop forever on a busy send loop, so run one call at a time.
        """
        for _ in range(limit):
            due = self.due_calls()
            if not due:
                return
            call = due[0]
            func, args, kw = call.func, call.args, call.kw
            call.cancel()
            func(*args, **kw)
        self.fail(f"still scheduling zero-delay calls after {limit} turns: busy loop")

    def serve(
        self,
        settings: dict[int, int] | None = None,
        connection_window: int = 0,
        high_water: int = DEFAULT_STREAM_HIGH_WATER,
        send_timeout: float | None = None,
    ) -> tuple[ProxyH2Connection, StringTransport, H2Client]:
        """A server connection and a client that has sent its preface and settings."""
        connection, transport = h2_server(
            self.clock, self.site, high_water, _TIMEOUT, send_timeout
        )
        client = H2Client(connection, transport)
        client.connect(settings, connection_window)
        self.settle()
        client.receive()
        return connection, transport, client


class ZeroWindowTests(_H2TestCase):
    """A closed flow-control window blocks the stream instead of spinning the send loop."""

    def test_stream_window_exhausted_sleeps_until_window_update(self) -> None:
        """No zero-delay call is left once the stream window is used up; WINDOW_UPDATE resumes."""
        _, _, client = self.serve({_INITIAL_WINDOW_SIZE: 1000})
        stream_id = client.request()
        [request] = self.app.requests

        request.write(b"a" * 5000)
        self.settle()
        client.receive()
        self.assertEqual(len(client.body[stream_id]), 1000)
        self.assertEqual(self.due_calls(), [])

        # Data written while the window is closed does not wake the loop either.
        request.write(b"b" * 1000)
        request.finish()
        self.settle()
        client.receive()
        self.assertEqual(len(client.body[stream_id]), 1000)
        self.assertNotIn(stream_id, client.ended)

        client.open_window(5000, stream_id=stream_id)
        self.settle()
        client.receive()
        self.assertEqual(client.body[stream_id], b"a" * 5000 + b"b" * 1000)
        self.assertIn(stream_id, client.ended)

    def test_connection_window_exhausted_sleeps_until_connection_window_update(self) -> None:
        """With the connection window at zero the loop sleeps; a WINDOW_UPDATE on 0 wakes it."""
        _, _, client = self.serve({_INITIAL_WINDOW_SIZE: 1_000_000})
        stream_id = client.request()
        [request] = self.app.requests

        request.write(b"a" * 70_000)
        request.finish()
        self.settle()
        client.receive()
        self.assertEqual(len(client.body[stream_id]), _DEFAULT_WINDOW)
        self.assertEqual(self.due_calls(), [])

        client.open_window(10_000)
        self.settle()
        client.receive()
        self.assertEqual(client.body[stream_id], b"a" * 70_000)
        self.assertIn(stream_id, client.ended)

    def test_larger_initial_window_setting_wakes_blocked_stream(self) -> None:
        """A SETTINGS frame raising the initial window (no WINDOW_UPDATE) restarts the stream."""
        _, _, client = self.serve({_INITIAL_WINDOW_SIZE: 1000})
        stream_id = client.request()
        [request] = self.app.requests
        request.write(b"a" * 3000)
        request.finish()
        self.settle()
        client.receive()
        self.assertEqual(len(client.body[stream_id]), 1000)

        client.h2.update_settings({_INITIAL_WINDOW_SIZE: 10_000})
        client.send()
        self.settle()
        client.receive()
        self.assertEqual(client.body[stream_id], b"a" * 3000)
        self.assertIn(stream_id, client.ended)

    def test_reset_of_blocked_stream_leaves_other_streams_working(self) -> None:
        """A client reset of a window-blocked stream frees it; a later stream completes."""
        _, _, client = self.serve({_INITIAL_WINDOW_SIZE: 1000})
        first = client.request()
        self.app.requests[0].write(b"a" * 3000)
        self.settle()
        client.h2.reset_stream(first)
        client.send()
        self.settle()

        second = client.request()
        self.app.requests[1].write(b"b" * 500)
        self.app.requests[1].finish()
        self.settle()
        client.receive()
        self.assertEqual(client.body[second], b"b" * 500)
        self.assertIn(second, client.ended)
        self.assertEqual(self.due_calls(), [])

    def test_client_reset_racing_an_ended_response_keeps_sending(self) -> None:
        """A reset arriving with the request, answered at once with no body, stops nothing."""
        _, _, client = self.serve()
        first = client.h2.get_next_available_stream_id()
        client.h2.send_headers(first, _REQUEST_HEADERS, end_stream=True)
        client.h2.reset_stream(first)
        self.app.answer_empty = True
        client.send()
        self.settle()

        self.app.answer_empty = False
        second = client.request()
        self.app.requests[-1].write(b"still here")
        self.app.requests[-1].finish()
        self.settle()
        client.receive()
        self.assertNotIn(first, client.headers)
        self.assertEqual(client.body[second], b"still here")
        self.assertIn(second, client.ended)


class HighWaterTests(_H2TestCase):
    """Queued response bytes per stream stay under the high-water mark whatever the window."""

    high_water = 16_384

    def huge_window_client(
        self, stream_window: int = _MAX_WINDOW
    ) -> tuple[ProxyH2Connection, StringTransport, H2Client]:
        """A client advertising a huge window for each stream, and 2**31-1 for the connection."""
        return self.serve(
            {_INITIAL_WINDOW_SIZE: stream_window},
            connection_window=_MAX_WINDOW - _DEFAULT_WINDOW,
            high_water=self.high_water,
        )

    def test_slow_reader_pauses_producer_at_high_water(self) -> None:
        """With the socket full, the producer is paused at the mark and resumed once drained."""
        connection, _, client = self.huge_window_client()
        # As a TCP transport does when its send buffer fills.
        connection.pauseProducing()
        stream_id = client.request()
        writer = _ChunkWriter(self.app.requests[0], total=100_000)
        self.assertTrue(verifyObject(IPushProducer, writer))
        writer.start()

        self.assertEqual(writer.pauses, 1)
        self.assertGreaterEqual(writer.written, self.high_water)
        # Nothing left while the transport was paused: everything written is queued.
        self.assertLessEqual(writer.written, self.high_water + writer.chunk)
        self.settle()
        self.assertEqual(writer.resumes, 0)

        connection.resumeProducing()
        self.settle()
        client.receive()
        self.assertGreaterEqual(writer.resumes, 1)
        self.assertEqual(client.body[stream_id], b"x" * 100_000)
        self.assertIn(stream_id, client.ended)

    def test_window_update_does_not_resume_producer_above_high_water(self) -> None:
        """A WINDOW_UPDATE leaves a producer paused for a full queue paused."""
        # Room left for the client to open the stream window further.
        connection, _, client = self.huge_window_client(stream_window=2**30)
        connection.pauseProducing()
        stream_id = client.request()
        writer = _ChunkWriter(self.app.requests[0], total=100_000)
        writer.start()
        self.assertTrue(writer.paused)

        client.open_window(1000, stream_id=stream_id)
        self.settle()
        self.assertEqual((writer.paused, writer.resumes), (True, 0))

    def test_closed_window_still_pauses_and_window_update_resumes(self) -> None:
        """Below the mark, Twisted's window rule holds: pause when full, resume on update."""
        _, _, client = self.serve({_INITIAL_WINDOW_SIZE: 1000}, high_water=self.high_water)
        stream_id = client.request()
        writer = _ChunkWriter(self.app.requests[0], total=3000)
        writer.start()
        self.assertEqual((writer.written, writer.pauses), (1000, 1))
        self.settle()

        client.open_window(2000, stream_id=stream_id)
        self.settle()
        client.receive()
        self.assertGreaterEqual(writer.resumes, 1)
        self.assertEqual(client.body[stream_id], b"x" * 3000)
        self.assertIn(stream_id, client.ended)

    def test_remaining_outbound_window_counts_queued_bytes(self) -> None:
        """remainingOutboundWindow is the window minus the bytes queued, sent or not."""
        connection, _, client = self.serve()
        connection.pauseProducing()
        stream_id = client.request()
        window = connection.conn.local_flow_control_window(stream_id)
        request = self.app.requests[0]
        request.write(b"a" * 2000)
        request.write(b"b" * 1000)
        self.assertEqual(connection.remainingOutboundWindow(stream_id), window - 3000)

        connection.resumeProducing()
        self.settle()
        self.assertEqual(connection.conn.local_flow_control_window(stream_id), window - 3000)
        self.assertEqual(connection.remainingOutboundWindow(stream_id), window - 3000)

    def test_high_water_must_be_positive(self) -> None:
        """A zero high-water mark is refused."""
        self.assertRaises(ValueError, ProxyH2Connection, self.clock, 0)


class IdleTimeoutTests(_H2TestCase):
    """The idle timeout spares streams waiting on the app, not idle or stalled clients."""

    def goaway_codes(self, client: H2Client) -> list[int | None]:
        """The error codes of the GOAWAY frames the client got so far."""
        client.receive()
        return [event.error_code for event in client.terminated]

    def test_stream_waiting_on_app_outlives_idle_timeout(self) -> None:
        """A stream whose response has not started keeps the connection past the timeout."""
        _, transport, client = self.serve()
        stream_id = client.request()
        self.clock.advance(_TIMEOUT + 1)
        self.clock.advance(_TIMEOUT + 1)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.goaway_codes(client), [])

        request = self.app.requests[0]
        request.write(b"late answer")
        request.finish()
        self.settle()
        client.receive()
        self.assertEqual(client.body[stream_id], b"late answer")
        self.assertIn(stream_id, client.ended)

        # With no stream left, the connection is idle and timed out.
        self.clock.advance(_TIMEOUT + 1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.goaway_codes(client), [h2.errors.ErrorCodes.NO_ERROR])

    def test_connection_without_streams_times_out(self) -> None:
        """
        A connection with no stream gets GOAWAY and is closed after the timeout, and then
        aborted if it is not gone; routine, so logged at debug level only.
        """
        log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]  # annotated for unittest.TestCase
        connection, transport, client = self.serve()
        self.clock.advance(_TIMEOUT - 1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(2)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.goaway_codes(client), [h2.errors.ErrorCodes.NO_ERROR])
        self.assertEqual([e for e in log if e["log_level"] > LogLevel.debug], [])
        self.clock.advance(connection.abortTimeout)
        self.assertTrue(transport.disconnected)

    def test_client_not_reading_times_out(self) -> None:
        """A stream with bytes the client will not accept does not keep the connection."""
        _, transport, client = self.serve({_INITIAL_WINDOW_SIZE: 1000})
        client.request()
        self.app.requests[0].write(b"a" * 5000)
        self.settle()
        self.clock.advance(_TIMEOUT + 1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.goaway_codes(client), [h2.errors.ErrorCodes.PROTOCOL_ERROR])

    def test_client_not_sending_request_body_times_out(self) -> None:
        """
        A request whose body stopped coming gets 408 on its stream after the timeout; the
        connection, then idle, is timed out (GOAWAY NO_ERROR: no stream is left open).
        """
        _, transport, client = self.serve()
        stream_id = client.request(b"POST", end_stream=False)
        self.clock.advance(_TIMEOUT + 1)
        client.receive()
        self.assertEqual(client.headers[stream_id][b":status"], b"408")
        self.clock.advance(_TIMEOUT + 1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.goaway_codes(client), [h2.errors.ErrorCodes.NO_ERROR])


class FinishedResponseDeadlineTests(_H2TestCase):
    """
    A finished response whose bytes the client never takes is reset after the send deadline,
    even while the client keeps the connection busy (so the idle timeout never fires).
    """

    def finished_response(
        self, send_timeout: float | None
    ) -> tuple[ProxyH2Connection, StringTransport, H2Client, int]:
        connection, transport, client = self.serve(
            {_INITIAL_WINDOW_SIZE: 1000}, send_timeout=send_timeout
        )
        stream_id = client.request()
        request = self.app.requests[0]
        request.write(b"a" * 5000)
        request.finish()
        self.settle()
        client.receive()
        self.assertEqual(len(client.body[stream_id]), 1000)
        self.assertEqual(connection.queued_bytes(stream_id), 4000)
        return connection, transport, client, stream_id

    def ping_for(self, client: H2Client, seconds: int) -> None:
        """The client sends a PING every 5 s (and reads the answers), for C{seconds}."""
        for _ in range(seconds // 5):
            self.clock.advance(5)
            client.h2.ping(b"12345678")
            client.send()
            self.settle()
            client.receive()

    def test_reset_after_deadline(self) -> None:
        connection, transport, client, stream_id = self.finished_response(send_timeout=20)
        self.ping_for(client, 15)
        self.assertNotIn(stream_id, client.reset)
        self.ping_for(client, 10)
        self.assertEqual(client.reset_codes[stream_id], h2.errors.ErrorCodes.INTERNAL_ERROR)
        self.assertNotIn(stream_id, connection.streams)
        self.assertEqual(connection.queued_bytes(stream_id), 0)
        # Only the stream: the connection goes on, and serves new streams.
        self.assertFalse(transport.disconnecting)
        self.app.answer_empty = True
        second = client.request()
        self.settle()
        client.receive()
        self.assertIn(second, client.ended)
        self.assertEqual(connection._tails, {})

    def test_reading_client_not_reset(self) -> None:
        """A client that takes some of the bytes within each deadline gets them all."""
        connection, _, client, stream_id = self.finished_response(send_timeout=20)
        for _ in range(4):
            self.ping_for(client, 15)
            client.open_window(1000, stream_id)
            client.open_window(1000)
            self.settle()
            client.receive()
        self.assertNotIn(stream_id, client.reset)
        self.assertEqual(len(client.body[stream_id]), 5000)
        self.assertIn(stream_id, client.ended)
        self.assertNotIn(stream_id, connection.streams)

    def test_no_deadline(self) -> None:
        """Without a send deadline, the stream waits (for the idle timeout, or forever)."""
        connection, _, client, stream_id = self.finished_response(send_timeout=None)
        self.ping_for(client, 100)
        self.assertNotIn(stream_id, client.reset)
        self.assertIn(stream_id, connection.streams)


class ExcessStreamTests(_H2TestCase):
    """Streams over MAX_CONCURRENT_STREAMS are refused one by one; the connection lives."""

    def overfill(self, client: H2Client, extra: int) -> list[int]:
        """Open 100 + C{extra} streams, ignoring the server's limit on the client side."""
        limit = h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
        self.assertEqual(client.h2.remote_settings.max_concurrent_streams, 100)
        client.h2.remote_settings._settings[limit] = deque([10_000])
        return [client.request() for _ in range(100 + extra)]

    def test_excess_refused_connection_lives(self) -> None:
        """The 101st and 102nd streams get REFUSED_STREAM; the first 100 reach the app."""
        connection, _, client = self.serve()
        streams = self.overfill(client, 2)
        self.settle()
        client.receive()
        self.assertEqual(len(self.app.requests), 100)
        refused = h2.errors.ErrorCodes.REFUSED_STREAM
        self.assertEqual(client.reset_codes, {streams[100]: refused, streams[101]: refused})
        self.assertEqual(client.terminated, [])
        self.assertIsInstance(connection.conn, RefusingH2Connection)
        assert isinstance(connection.conn, RefusingH2Connection)
        self.assertEqual(connection.conn.refused_streams, 2)

        # One of the first 100 is answered; a new stream is then accepted and served.
        first = self.app.requests[0]
        first.write(b"done")
        first.finish()
        self.settle()
        client.receive()
        self.assertIn(streams[0], client.ended)
        later = client.request()
        self.settle()
        client.receive()
        self.assertEqual(len(self.app.requests), 101)
        self.assertNotIn(later, client.reset)
        self.assertEqual(client.terminated, [])

    def test_refused_stream_body_ignored(self) -> None:
        """DATA sent on a refused stream is not delivered and does not end the connection."""
        _, _, client = self.serve()
        self.overfill(client, 0)
        refused = client.request(b"POST", body=b"x" * 1000, end_stream=False)
        # More DATA, sent before the client has read the server's RST_STREAM.
        client.h2.send_data(refused, b"y" * 1000, end_stream=True)
        client.send()
        self.settle()
        client.receive()
        self.assertIn(refused, client.reset)
        self.assertEqual(len(self.app.requests), 100)
        self.assertEqual(client.terminated, [])

    def test_refused_headers_keep_hpack_in_sync(self) -> None:
        """
        A refused stream's header block is decoded all the same: a later request whose
        headers refer to the HPACK table entries it added arrives intact.
        """
        _, _, client = self.serve()
        self.overfill(client, 0)
        client.request(headers=[(b"x-custom", b"value-one")])
        self.settle()
        first = self.app.requests[0]
        first.finish()
        self.settle()
        client.receive()
        client.request(headers=[(b"x-custom", b"value-one")])
        self.settle()
        client.receive()
        self.assertEqual(len(self.app.requests), 101)
        self.assertEqual(
            self.app.requests[-1].requestHeaders.getRawHeaders(b"x-custom"), [b"value-one"]
        )
        self.assertEqual(client.terminated, [])

    def test_limit_zero_refuses_without_closing(self) -> None:
        """Under a limit of 0 (a connection being drained) a new stream is refused, not fatal."""
        connection, _, client = self.serve()
        connection.conn.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 0})
        connection.transport.write(connection.conn.data_to_send())  # type: ignore[union-attr]
        client.receive()  # the client ACKs the new limit
        limit = h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
        client.h2.remote_settings._settings[limit] = deque([10])
        stream = client.request()
        self.settle()
        client.receive()
        self.assertEqual(client.reset_codes, {stream: h2.errors.ErrorCodes.REFUSED_STREAM})
        self.assertEqual(client.terminated, [])
        self.assertEqual(self.app.requests, [])


class PriorityFrameTests(_H2TestCase):
    """PRIORITY frames for streams that are not open are ignored, whatever their number."""

    def send_priorities(self, client: H2Client, stream_ids: range) -> None:
        for stream_id in stream_ids:
            frame = PriorityFrame(stream_id)
            frame.depends_on = 0
            frame.stream_weight = 16
            self.connection.dataReceived(frame.serialize())

    def test_many_idle_stream_priorities(self) -> None:
        """
        1,500 PRIORITY frames for idle streams (past the priority library's limit of 1,000)
        neither raise nor end the connection; a request after them is served.
        """
        self.connection, _, client = self.serve()
        self.send_priorities(client, range(1, 3001, 2))
        client.receive()
        self.assertEqual(client.terminated, [])
        stream = client.request(path=b"/late")
        self.settle()
        self.assertEqual([r.path for r in self.app.requests], [b"/late"])
        self.app.requests[0].finish()
        self.settle()
        client.receive()
        self.assertIn(stream, client.ended)

    def test_closed_stream_priority_not_kept(self) -> None:
        """A PRIORITY frame for a finished stream does not put it back in the tree."""
        self.connection, _, client = self.serve()
        stream = client.request()
        self.settle()
        self.app.requests[0].finish()
        self.settle()
        client.receive()
        self.assertIn(stream, client.ended)
        before = len(self.connection.priority._streams)
        self.send_priorities(client, range(stream, stream + 1))
        self.assertEqual(len(self.connection.priority._streams), before)

    def test_open_stream_priority_applied(self) -> None:
        """A PRIORITY frame for an open stream still reaches the tree."""
        self.connection, _, client = self.serve()
        stream = client.request()
        self.settle()
        frame = PriorityFrame(stream)
        frame.depends_on = 0
        frame.stream_weight = 200
        self.connection.dataReceived(frame.serialize())
        self.assertEqual(self.connection.priority._streams[stream].weight, 201)


class DeadConnectionTests(_H2TestCase):
    """After a protocol error, what the client still sends is not buffered."""

    def test_flood_after_goaway_not_buffered(self) -> None:
        """
        A CONTINUATION flood: h2 ends the connection (GOAWAY) after its backlog of
        CONTINUATION frames, and the megabytes the client keeps sending are dropped.
        """
        connection, _, client = self.serve()
        headers = HeadersFrame(1)
        headers.data = b"\x82"  # :method GET (indexed), and no END_HEADERS
        connection.dataReceived(headers.serialize())
        continuation = ContinuationFrame(1)
        continuation.data = b"\x00" * 16_000
        for _ in range(200):  # 3.2 MB, past h2's backlog of 64 CONTINUATION frames
            connection.dataReceived(continuation.serialize())
        client.receive()
        self.assertEqual(
            [e.error_code for e in client.terminated], [h2.errors.ErrorCodes.PROTOCOL_ERROR]
        )
        self.assertLess(len(connection.conn.incoming_buffer._data), 100_000)
        self.assertEqual(self.app.requests, [])


class EmptyFrameFloodTests(_H2TestCase):
    """Empty DATA frames that end nothing are allowed up to a point, then the connection ends."""

    def empty_data(self, connection: ProxyH2Connection, stream: int, count: int) -> None:
        frame = DataFrame(stream)
        frame.data = b""
        connection.dataReceived(frame.serialize() * count)

    def test_flood_closes_with_enhance_your_calm(self) -> None:
        """101 empty DATA frames: GOAWAY ENHANCE_YOUR_CALM, and the rest is not read."""
        connection, transport, client = self.serve()
        stream = client.request(b"POST", body=b"{", end_stream=False)
        self.settle()
        self.empty_data(connection, stream, MAX_EMPTY_DATA_FRAMES + 1)
        client.receive()
        self.assertEqual(
            [e.error_code for e in client.terminated],
            [h2.errors.ErrorCodes.ENHANCE_YOUR_CALM],
        )
        self.assertTrue(transport.disconnecting)

    def test_a_few_empty_frames_are_fine(self) -> None:
        """Up to the limit, empty frames are harmless and the request completes."""
        connection, _, client = self.serve()
        stream = client.request(b"POST", body=b"{", end_stream=False)
        self.settle()
        self.empty_data(connection, stream, MAX_EMPTY_DATA_FRAMES)
        client.h2.send_data(stream, b"}", end_stream=True)
        client.send()
        self.settle()
        client.receive()
        self.assertEqual(client.terminated, [])
        content = self.app.requests[0].content
        assert content is not None
        self.assertEqual(content.read(), b"{}")


class SwitchAndSiteTests(SynchronousTestCase):
    """ProxySite builds the ALPN switch, which picks ProxyH2Connection for h2 only."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.site = ProxySite(
            _HelloResource(), self.clock, stream_high_water=32_768, idle_timeout=30.0
        )

    def connect(self, negotiated: bytes | None) -> tuple[ProxyHTTPChannelSwitch, _ALPNTransport]:
        protocol = self.site.buildProtocol(_CLIENT)
        assert isinstance(protocol, ProxyHTTPChannelSwitch)
        transport = _ALPNTransport(negotiated)
        protocol.makeConnection(transport)
        return protocol, transport

    def test_h2_request_response(self) -> None:
        """Over ALPN h2 a GET gets its status, headers, body and end of stream."""
        protocol, transport = self.connect(b"h2")
        client = H2Client(protocol, transport)
        client.connect()
        stream_id = client.request()
        self.clock.advance(0)
        client.receive()
        self.assertEqual(client.headers[stream_id][b":status"], b"200")
        self.assertEqual(client.headers[stream_id][b"content-type"], b"text/plain")
        self.assertEqual(client.body[stream_id], b"hello over HTTP/2")
        self.assertIn(stream_id, client.ended)

    def test_h2_builds_proxy_connection_with_injected_settings(self) -> None:
        """ALPN h2 swaps in a ProxyH2Connection on the site's reactor, mark and timeout."""
        protocol, transport = self.connect(b"h2")
        H2Client(protocol, transport).connect()
        # Twisted's switch keeps the active channel in _channel.
        connection = protocol._channel
        self.assertIsInstance(connection, ProxyH2Connection)
        assert isinstance(connection, ProxyH2Connection)
        self.assertIs(connection._reactor, self.clock)
        self.assertEqual(connection.stream_high_water, 32_768)
        self.assertEqual(connection.timeOut, 30.0)
        self.assertIs(connection.site, self.site)
        self.assertIs(connection.requestFactory, self.site.requestFactory)
        self.assertIs(transport.producer, connection)
        self.assertTrue(verifyObject(IProtocol, connection))
        self.assertTrue(verifyObject(IPushProducer, connection))

    def test_http11_stays_on_http_channel(self) -> None:
        """Without ALPN, or with http/1.1, the plain HTTPChannel serves HTTP/1.1."""
        for negotiated in (None, b"http/1.1"):
            protocol, transport = self.connect(negotiated)
            protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: proxy.test\r\n\r\n")
            self.assertIsInstance(protocol._channel, H1Channel)
            self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK\r\n"))
            self.assertTrue(transport.value().endswith(b"hello over HTTP/1.1"))

    def test_h2_without_support_is_refused(self) -> None:
        """ALPN h2 without HTTP/2 support closes the connection and logs why, no traceback."""
        self.patch(http, "H2_ENABLED", False)
        events = EventLoggingObserver()
        globalLogPublisher.addObserver(events)
        self.addCleanup(globalLogPublisher.removeObserver, events)
        protocol, transport = self.connect(b"h2")
        protocol.dataReceived(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        protocol.dataReceived(b"more")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.assertIsInstance(protocol._channel, H1Channel)
        [event] = [e for e in events if e["log_level"] == LogLevel.error]
        self.assertEqual(event["protocol"], b"h2")

    def test_site_settings(self) -> None:
        """The site is quiet, on the injected reactor, and configures each protocol like Site."""
        self.assertFalse(self.site.noisy)
        self.assertIs(self.site.reactor, self.clock)
        self.assertEqual(self.site.timeOut, 30.0)
        self.assertTrue(verifyObject(IProtocolNegotiationFactory, self.site))
        self.assertEqual(self.site.acceptableProtocols(), [b"h2", b"http/1.1"])
        protocol = self.site.buildProtocol(_CLIENT)
        assert isinstance(protocol, ProxyHTTPChannelSwitch)
        self.assertIs(protocol.site, self.site)
        self.assertIs(protocol.factory, self.site)
        self.assertEqual(protocol.timeOut, 30.0)
        self.assertEqual(protocol.callLater, self.clock.callLater)

    def test_http11_idle_timeout_uses_injected_clock(self) -> None:
        """An idle HTTP/1.1 connection is closed on the site's clock after idle_timeout."""
        _, transport = self.connect(None)
        self.clock.advance(29)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(2)
        self.assertTrue(transport.disconnecting)

    def test_no_access_log_and_no_log_timer(self) -> None:
        """Twisted's access log stays empty and starting the site schedules nothing."""
        log_file = StringIO()
        self.site.logFile = log_file
        self.site.doStart()
        self.addCleanup(self.site.doStop)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        protocol, transport = self.connect(None)
        protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: proxy.test\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertEqual(log_file.getvalue(), "")

    def test_invalid_settings_are_refused(self) -> None:
        """A non-positive high-water mark or idle timeout is refused."""
        resource = _HelloResource()
        self.assertRaises(ValueError, ProxySite, resource, self.clock, stream_high_water=0)
        self.assertRaises(ValueError, ProxySite, resource, self.clock, idle_timeout=0)
