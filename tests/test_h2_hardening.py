"""
The proxy's HTTP/2 edge against malformed, oversized, slow and abusive clients, in memory: an
h2 client, the real site and resource, fake upstreams. What one stream does wrong is answered
on that stream (OpenAI-shaped JSON, or RST_STREAM); the connection and its other streams carry
on, and nothing of the bad stream reaches an upstream.
"""

# trial's assertions and twisted.web are unannotated.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import json

import h2.errors
import h2.settings
from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame, RstStreamFrame
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from zope.interface import alsoProvides

from oaiproxy.config import Limits
from oaiproxy.http.capacity import Refusal
from oaiproxy.http.h2fix import MAX_EMPTY_DATA_FRAMES, ProxyH2Connection, ProxySite
from tests.support.fakes import FakeResponse, make_harness
from tests.support.h2client import CLIENT_ADDRESS, REQUEST_HEADERS, H2Client
from tests.test_h2_relay import JSON_HEADERS, H2ProxyTestCase

_NO_ERROR = h2.errors.ErrorCodes.NO_ERROR
_PROTOCOL_ERROR = h2.errors.ErrorCodes.PROTOCOL_ERROR
_INITIAL_WINDOW_SIZE = h2.settings.SettingCodes.INITIAL_WINDOW_SIZE


def _frame_types(data: bytes) -> list[int]:
    """The types of the HTTP/2 frames in C{data} (no preface)."""
    types = []
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        types.append(data[3])
        data = data[9 + length :]
    return types


class _Hardening(H2ProxyTestCase):
    """Shared checks: a JSON error on one stream, and a connection that still serves."""

    def assert_error(self, client: H2Client, stream: int, status: int, code: str) -> None:
        """The stream got an OpenAI-shaped JSON error, ended, with a request id."""
        headers = client.headers[stream]
        self.assertEqual(headers[b":status"], b"%d" % status)
        self.assertEqual(headers[b"content-type"], b"application/json")
        self.assertTrue(headers[b"x-request-id"])
        error = json.loads(client.body[stream])["error"]
        self.assertEqual(set(error), {"message", "type", "param", "code"})
        self.assertEqual(error["code"], code)
        self.assertIn(stream, client.ended)

    def answer(self, client: H2Client, index: int, stream: int) -> None:
        """The upstream answers the request it got C{index}-th; the client reads it whole."""
        response = FakeResponse(200, {b"content-type": [b"application/json"]})
        self.h.sent()[index].deferred.callback(response)
        response.deliver(b"{}")
        response.end()
        self.turn()
        client.receive()
        self.assertEqual(client.headers[stream][b":status"], b"200")
        self.assertEqual(client.body[stream], b"{}")
        self.assertIn(stream, client.ended)

    def assert_still_serves(self, client: H2Client) -> None:
        """The connection is up: a new request on it is forwarded and answered."""
        self.assertEqual(client.terminated, [])
        before = len(self.h.sent())
        stream = client.request(b"GET", path=b"/v1/models")
        self.turn()
        self.assertEqual(len(self.h.sent()), before + 1)
        self.answer(client, before, stream)
        self.assertEqual(client.terminated, [])


class ConnectMethodTests(_Hardening):
    """CONNECT (no :path) is answered 405 on its stream; it used to crash the connection."""

    def connect_stream(self, client: H2Client, end_stream: bool) -> int:
        stream: int = client.h2.get_next_available_stream_id()
        head = [(b":method", b"CONNECT"), (b":authority", b"example.com:443")]
        client.h2.send_headers(stream, head, end_stream=end_stream)
        client.send()
        return stream

    def test_connect_gets_405_and_connection_lives(self) -> None:
        """A CONNECT stream gets a JSON 405; a stream opened before it is still answered."""
        _, _, client = self.connect()
        held = client.request(b"GET", path=b"/v1/models")
        stream = self.connect_stream(client, end_stream=True)
        self.turn()
        client.receive()
        self.assert_error(client, stream, 405, "method_not_allowed")
        self.assertEqual(len(self.h.sent()), 1)
        self.answer(client, 0, held)
        self.assert_still_serves(client)

    def test_connect_tunnel_data_ignored(self) -> None:
        """CONNECT without END_STREAM: 405, RST_STREAM(NO_ERROR), its DATA dropped."""
        _, _, client = self.connect()
        stream = self.connect_stream(client, end_stream=False)
        client.h2.send_data(stream, b"\x16\x03\x01" * 100)
        client.send()
        self.turn()
        client.receive()
        self.assert_error(client, stream, 405, "method_not_allowed")
        self.assertEqual(client.reset_codes[stream], _NO_ERROR)
        self.assertEqual(self.h.sent(), [])
        self.assert_still_serves(client)


class CloseAfterGoawayTests(_Hardening):
    """
    After a GOAWAY for an error the connection is closed once the GOAWAY is written: the
    connection stops being its transport's producer (a TLS transport closes only then) and
    loses the connection; a client that does not read is aborted after abortTimeout.
    """

    def assert_closing(self, connection: ProxyH2Connection, transport: StringTransport) -> None:
        self.assertIsNone(transport.producer)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(connection.streams, {})

    def test_continuation_flood_closes(self) -> None:
        """HEADERS without END_HEADERS and 2,000 CONTINUATION frames: GOAWAY, then close."""
        connection, transport, client = self.connect()
        held = client.request(b"GET", path=b"/v1/models")
        self.turn()
        headers = HeadersFrame(held + 2)
        headers.data = b"\x82"
        continuation = ContinuationFrame(held + 2)
        continuation.data = b"\x00" * 100
        connection.dataReceived(headers.serialize() + continuation.serialize() * 2000)
        client.receive()
        self.assertEqual([e.error_code for e in client.terminated], [_PROTOCOL_ERROR])
        self.assert_closing(connection, transport)
        # The stream under way was cancelled upstream.
        self.assertTrue(self.h.sent()[0].deferred.called)

    def test_empty_data_flood_closes(self) -> None:
        """The empty-DATA flood's GOAWAY ENHANCE_YOUR_CALM is followed by a close."""
        connection, transport, client = self.connect()
        stream = client.request(b"POST", path=b"/v1/embeddings", body=b"{", end_stream=False)
        frame = DataFrame(stream)
        connection.dataReceived(frame.serialize() * (MAX_EMPTY_DATA_FRAMES + 1))
        client.receive()
        calm = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        self.assertEqual([e.error_code for e in client.terminated], [calm])
        self.assert_closing(connection, transport)

    def test_goaway_written_while_transport_paused(self) -> None:
        """A GOAWAY is written even while the transport has paused the connection."""
        connection, transport, client = self.connect()
        connection.pauseProducing()
        headers = HeadersFrame(1)
        headers.data = b"\x82"
        continuation = ContinuationFrame(1)
        continuation.data = b"\x00" * 100
        connection.dataReceived(headers.serialize() + continuation.serialize() * 2000)
        client.receive()
        self.assertEqual([e.error_code for e in client.terminated], [_PROTOCOL_ERROR])
        self.assert_closing(connection, transport)

    def test_client_not_reading_aborted(self) -> None:
        """A client that does not read after the GOAWAY is aborted after abortTimeout."""
        connection, transport, _ = self.connect()
        connection.dataReceived(DataFrame(1).serialize())  # DATA on an idle stream
        self.assertFalse(transport.disconnected)
        self.h.clock.advance(connection.abortTimeout)
        self.assertTrue(transport.disconnected)

    def test_idle_timeout_closes_and_cancels_streams(self) -> None:
        """An idle timeout with a stream the client stopped reading: GOAWAY, close, cancel."""
        connection, transport, client = self.connect(settings={_INITIAL_WINDOW_SIZE: 0})
        stream = client.request(b"GET", path=b"/v1/models")
        self.turn()
        response = FakeResponse(200, {b"content-type": [b"application/json"]})
        self.h.sent()[0].deferred.callback(response)
        response.deliver(b"{}")
        self.turn()
        self.h.clock.advance(60)  # h2_server's idle timeout
        client.receive()
        self.assertEqual(len(client.terminated), 1)
        self.assert_closing(connection, transport)
        self.assertNotIn(stream, client.ended)
        # The upstream response was let go of (its transport stopped).
        self.assertTrue(response.socket.stopped)


class ClientGoawayTests(_Hardening):
    """
    A GOAWAY from the client ends the connection: h2 sends nothing after it, so the streams
    in flight are cancelled (their upstream requests stopped) and the transport closed.
    """

    def test_goaway_closes_the_connection(self) -> None:
        """A stream forwarded upstream, then the client's GOAWAY: closed, upstream stopped."""
        connection, transport, client = self.connect()
        client.request(b"GET", path=b"/v1/models")
        self.turn()
        (sent,) = self.h.sent()
        client.h2.close_connection()
        client.send()
        self.turn()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(connection.streams, {})
        self.assertTrue(sent.cancelled)

    def test_no_408_after_goaway(self) -> None:
        """A body cut short by the client's GOAWAY gets no 408 later (nor a traceback)."""
        _, transport, client = self.connect()
        stream = client.request(
            b"POST",
            path=b"/v1/embeddings",
            headers=[*JSON_HEADERS, (b"content-length", b"14")],
            end_stream=False,
        )
        client.h2.send_data(stream, b'{"in')
        client.send()
        self.turn()
        client.h2.close_connection()
        client.send()
        self.turn()
        self.assertTrue(transport.disconnecting)
        transport.clear()
        self.h.clock.advance(61)
        self.h.clock.advance(61)
        # At most Twisted's idle GOAWAY into the closed transport: no HEADERS (no 408).
        self.assertNotIn(0x1, _frame_types(transport.value()))
        self.assertEqual(self.h.sent(), [])


class MalformedStreamTests(_Hardening):
    """
    A malformed request (RFC 9113 section 8.1.1) gets RST_STREAM(PROTOCOL_ERROR) on its own
    stream, is logged once, and never reaches the upstream; the connection carries on.
    """

    def setUp(self) -> None:
        super().setUp()
        # Annotated for unittest.TestCase; trial cases work.
        self.log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]

    def send_raw_head(
        self, client: H2Client, head: list[tuple[bytes, bytes]], end_stream: bool = True
    ) -> int:
        """Send a request head as is: the client's own checks are off for it."""
        stream: int = client.h2.get_next_available_stream_id()
        config = client.h2.config
        config.validate_outbound_headers = config.normalize_outbound_headers = False
        try:
            client.h2.send_headers(stream, head, end_stream=end_stream)
        finally:
            config.validate_outbound_headers = config.normalize_outbound_headers = True
        client.send()
        return stream

    def assert_rejected(self, client: H2Client, stream: int) -> None:
        """The stream was reset with PROTOCOL_ERROR, logged once, and nothing went upstream."""
        self.turn()
        client.receive()
        self.assertEqual(client.reset_codes.get(stream), _PROTOCOL_ERROR)
        self.assertNotIn(stream, client.headers)
        self.assertEqual(self.h.sent(), [])
        rejections = [e for e in self.log if e.get("stream") == stream]
        self.assertEqual(len(rejections), 1)
        self.assertEqual(rejections[0]["log_level"], LogLevel.info)
        self.assertEqual(rejections[0]["error_code"], "PROTOCOL_ERROR")
        self.assertTrue(rejections[0]["reason"])
        self.assert_still_serves(client)

    def post_head(self, *extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
        return [
            (b":method", b"POST"),
            (b":path", b"/v1/embeddings"),
            (b":scheme", b"https"),
            (b":authority", b"proxy.test"),
            *extra,
        ]

    def test_body_longer_than_content_length(self) -> None:
        """H2.CL: content-length 10 and 20 bytes of DATA."""
        _, _, client = self.connect()
        stream = self.send_raw_head(client, self.post_head((b"content-length", b"10")), False)
        client.h2.send_data(stream, b"x" * 20, end_stream=True)
        client.send()
        self.assert_rejected(client, stream)

    def test_body_shorter_than_content_length(self) -> None:
        """content-length 100 and 5 bytes of DATA, then END_STREAM."""
        _, _, client = self.connect()
        stream = self.send_raw_head(client, self.post_head((b"content-length", b"100")), False)
        client.h2.send_data(stream, b"x" * 5, end_stream=True)
        client.send()
        self.assert_rejected(client, stream)

    def test_content_length_without_body(self) -> None:
        """content-length 5 on HEADERS that carry END_STREAM."""
        _, _, client = self.connect()
        stream = self.send_raw_head(client, self.post_head((b"content-length", b"5")))
        self.assert_rejected(client, stream)

    def test_control_characters_logged_escaped(self) -> None:
        """
        A header value with CR, LF, NUL or ESC is rejected, and the log line that says why
        holds them as escapes: a client cannot split or forge log lines, or drive a terminal.
        """
        _, _, client = self.connect()
        stream = self.send_raw_head(client, self.post_head((b"x-bad", b"a\rb\nc\x00d\x1be")))
        self.assert_rejected(client, stream)
        [rejection] = [e for e in self.log if e.get("stream") == stream]
        line = formatEvent(rejection)
        self.assertFalse(any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in line), repr(line))

    def test_connection_specific_headers(self) -> None:
        """connection, transfer-encoding, upgrade, keep-alive and te other than trailers."""
        for field in [
            (b"connection", b"keep-alive"),
            (b"transfer-encoding", b"chunked"),
            (b"upgrade", b"websocket"),
            (b"keep-alive", b"timeout=5"),
            (b"te", b"gzip"),
        ]:
            with self.subTest(field=field):
                self.setUp()
                _, _, client = self.connect()
                stream = self.send_raw_head(client, self.post_head(field))
                self.assert_rejected(client, stream)

    def test_duplicate_and_missing_pseudo_headers(self) -> None:
        """A second :path; no :method; an upper-case field name."""
        for head in [
            [*self.post_head(), (b":path", b"/v1/other")],
            self.post_head()[1:],
            self.post_head((b"X-Upper", b"1")),
        ]:
            with self.subTest(head=head):
                self.setUp()
                _, _, client = self.connect()
                stream = self.send_raw_head(client, head)
                self.assert_rejected(client, stream)

    def test_hpack_state_kept(self) -> None:
        """A rejected head's HPACK entries are decoded: a later head that refers to them works."""
        _, _, client = self.connect()
        marker = (b"x-marker", b"kept-in-the-table")
        stream = self.send_raw_head(client, self.post_head(marker, (b"connection", b"close")))
        self.turn()
        client.receive()
        self.assertEqual(client.reset_codes.get(stream), _PROTOCOL_ERROR)
        later = client.request(b"GET", path=b"/v1/models", headers=[marker])
        self.turn()
        (sent,) = self.h.sent()
        self.assertEqual(sent.headers.getRawHeaders(b"x-marker"), [marker[1]])
        self.answer(client, 0, later)
        self.assertEqual(client.terminated, [])

    def test_stream_under_way_is_cancelled(self) -> None:
        """Trailers without END_STREAM on a stream already in the app: reset, not forwarded."""
        connection, _, client = self.connect()
        stream = self.send_raw_head(client, self.post_head(*JSON_HEADERS), end_stream=False)
        client.h2.send_data(stream, b"{}")
        client.send()
        self.assertIn(stream, connection.streams)
        trailers = HeadersFrame(stream)
        trailers.flags.add("END_HEADERS")
        trailers.data = client.h2.encoder.encode([(b"x-trailer", b"1")])
        connection.dataReceived(trailers.serialize())
        self.assertNotIn(stream, connection.streams)
        self.assert_rejected(client, stream)

    def test_undecodable_header_block_still_ends_connection(self) -> None:
        """An HPACK error is a connection error (the shared table is lost): GOAWAY, logged."""
        connection, transport, client = self.connect()
        headers = HeadersFrame(1)
        headers.flags.add("END_HEADERS")
        headers.data = b"\xff\xff\xff\xff\xff"
        connection.dataReceived(headers.serialize())
        client.receive()
        self.assertEqual(len(client.terminated), 1)
        self.assertTrue(transport.disconnecting)
        closing = [e for e in self.log if "closing an HTTP/2 connection" in e["log_format"]]
        self.assertEqual(len(closing), 1)


class TrailersTests(_Hardening):
    """A body ended by trailers is checked against its content-length too."""

    def body_then_trailers(self, length: bytes) -> tuple[H2Client, int]:
        """A POST declaring C{length}, a 2-byte body, then trailers ending the stream."""
        connection, _, client = self.connect()
        stream = client.request(
            b"POST",
            path=b"/v1/embeddings",
            headers=[*JSON_HEADERS, (b"content-length", length)],
            end_stream=False,
        )
        client.h2.send_data(stream, b"{}")
        client.send()
        trailers = HeadersFrame(stream)
        trailers.flags.add("END_HEADERS")
        trailers.flags.add("END_STREAM")
        trailers.data = client.h2.encoder.encode([(b"x-trailer", b"1")])
        connection.dataReceived(trailers.serialize())
        self.turn()
        return client, stream

    def test_short_body_ended_by_trailers_reset(self) -> None:
        """content-length 100, 2 bytes of DATA, then trailers: PROTOCOL_ERROR, not forwarded."""
        client, stream = self.body_then_trailers(b"100")
        client.receive()
        self.assertEqual(self.h.sent(), [])
        self.assertEqual(client.reset_codes[stream], h2.errors.ErrorCodes.PROTOCOL_ERROR)

    def test_whole_body_with_trailers_forwarded(self) -> None:
        """The same with the whole body: forwarded (trailers are not, as over HTTP/1.1)."""
        self.body_then_trailers(b"2")
        self.assertEqual([sent.body for sent in self.h.sent()], [b"{}"])


class BodyCapTests(_Hardening):
    """
    A request body over the cap is answered 413 as soon as its declared length or its DATA
    passes the cap, then reset with NO_ERROR; no more window is granted for it, its DATA
    still counts on the connection window, and nothing is forwarded.
    """

    def setUp(self) -> None:
        self.h = make_harness(
            limits=Limits(stream_high_water=self.high_water, max_body_bytes=1000)
        )

    def post(self, client: H2Client, *extra: tuple[bytes, bytes]) -> int:
        head = [*JSON_HEADERS, (b"x-request-id", b"client-id-1"), *extra]
        return client.request(b"POST", path=b"/v1/embeddings", headers=head, end_stream=False)

    def test_declared_length_over_cap_answered_at_once(self) -> None:
        """content-length 5000 (cap 1000) and no DATA yet: 413 at once, then RST(NO_ERROR)."""
        _, _, client = self.connect()
        stream = self.post(client, (b"content-length", b"5000"))
        self.turn()
        client.receive()
        self.assert_error(client, stream, 413, "request_too_large")
        self.assertEqual(client.headers[stream][b"x-request-id"], b"client-id-1")
        self.assertEqual(client.reset_codes[stream], _NO_ERROR)
        self.assertEqual(self.h.sent(), [])
        self.assert_still_serves(client)

    def test_expect_continue_only_for_a_body_to_come(self) -> None:
        """
        C{expect: 100-continue}, as over HTTP/1.1: no 100 before a 413 (declared length over
        the cap), nor for a request whose HEADERS end the stream; a 100 for a body to come.
        Never forwarded.
        """
        _, _, client = self.connect()
        expect = (b"expect", b"100-continue")
        over = self.post(client, (b"content-length", b"5000"), expect)
        bodiless = client.request(b"GET", path=b"/v1/models", headers=[expect])
        invited = self.post(client, (b"content-length", b"2"), expect)
        self.turn()
        client.receive()
        self.assert_error(client, over, 413, "request_too_large")
        self.assertEqual(client.informational[over], [])
        self.assertEqual(client.informational[bodiless], [])
        self.assertEqual(client.informational[invited], [b"100"])
        client.h2.send_data(invited, b"{}", end_stream=True)
        client.send()
        self.turn()
        self.assertEqual(len(self.h.sent()), 2)
        for sent in self.h.sent():
            self.assertIsNone(sent.headers.getRawHeaders(b"expect"))

    def test_data_over_cap_answered_before_the_end(self) -> None:
        """
        DATA past the cap: 413 before the client has finished, then RST(NO_ERROR). DATA the
        client sent before it heard still counts on the connection window: five such
        streams send 3.7 times the initial connection window, and the connection still
        serves.
        """
        connection, _, client = self.connect()
        total = 0
        for _ in range(5):
            stream = self.post(client)
            client.h2.send_data(stream, b"x" * 800)
            client.send()
            client.h2.send_data(stream, b"x" * 800)  # past the cap
            total += 1600
            # Sent before the client reads the 413: as much as the windows let it.
            for _ in range(3):
                size = min(16000, client.h2.local_flow_control_window(stream))
                client.h2.send_data(stream, b"x" * size)
                total += size
            client.send()
            self.turn()
            client.receive()
            self.assert_error(client, stream, 413, "request_too_large")
            self.assertEqual(client.reset_codes[stream], _NO_ERROR)
            self.assertNotIn(stream, connection.streams)
        self.assertGreater(total, 3 * 65535)
        self.assertEqual(self.h.sent(), [])
        self.assert_still_serves(client)

    def test_body_at_cap_forwarded(self) -> None:
        """A body of exactly the cap is forwarded whole."""
        _, _, client = self.connect()
        body = b'{"input": "' + b"x" * 987 + b'"}'
        self.assertEqual(len(body), 1000)
        stream = self.post(client)
        client.h2.send_data(stream, body, end_stream=True)
        client.send()
        self.turn()
        (sent,) = self.h.sent()
        self.assertEqual(sent.body, body)
        self.answer(client, 0, stream)


class BodyDeadlineTests(_Hardening):
    """
    A request body that stops coming for the idle timeout gets 408 on its stream, then
    RST_STREAM(NO_ERROR); nothing is forwarded and the connection lives on, even while the
    client keeps it busy with PINGs.
    """

    def stalled_upload(self, client: H2Client) -> int:
        head = [*JSON_HEADERS, (b"content-length", b"14")]
        stream = client.request(b"POST", path=b"/v1/embeddings", headers=head, end_stream=False)
        client.h2.send_data(stream, b'{"in')
        client.send()
        return stream

    def test_stalled_body_gets_408_while_client_pings(self) -> None:
        """4 of 14 bytes, then only PINGs: 408 within 1.25 idle timeouts, connection kept."""
        _, transport, client = self.connect()
        stream = self.stalled_upload(client)
        self.turn()
        for _ in range(8):  # 80 s of PINGs every 10 s
            self.h.clock.advance(10)
            client.h2.ping(b"12345678")
            client.send()
            client.receive()
        self.turn()
        client.receive()
        self.assert_error(client, stream, 408, "request_timeout")
        self.assertEqual(client.reset_codes[stream], _NO_ERROR)
        self.assertEqual(self.h.sent(), [])
        self.assertFalse(transport.disconnecting)
        self.assert_still_serves(client)

    def test_slow_steady_body_not_cut(self) -> None:
        """A byte every 40 s (inside the 60 s deadline) is slow but alive: forwarded."""
        _, _, client = self.connect()
        stream = self.stalled_upload(client)
        for byte in b'put": "a"}':
            self.h.clock.advance(40)
            client.h2.send_data(stream, bytes([byte]))
            client.send()
        client.h2.end_stream(stream)
        client.send()
        self.turn()
        client.receive()
        self.assertNotIn(stream, client.headers)
        (sent,) = self.h.sent()
        self.assertEqual(sent.body, b'{"input": "a"}')


class HeaderLimitTests(_Hardening):
    """
    The HTTP/1.1 header limits hold per HTTP/2 request: more than max_headers fields
    (pseudo-headers not counted) or max_header_bytes (names and values, pseudo-headers
    included) get 431 on the stream, and nothing is forwarded.
    """

    def assert_431(self, headers: list[tuple[bytes, bytes]]) -> None:
        _, _, client = self.connect()
        stream = client.request(b"GET", path=b"/v1/models", headers=headers)
        self.turn()
        client.receive()
        self.assert_error(client, stream, 431, "request_header_fields_too_large")
        self.assertEqual(self.h.sent(), [])
        self.assert_still_serves(client)

    def test_too_many_fields(self) -> None:
        """1,000 header fields."""
        self.assert_431([(b"x-h-%d" % i, b"v") for i in range(1000)])

    def test_one_field_over_the_byte_limit(self) -> None:
        """One 40 KB header."""
        self.assert_431([(b"x-big", b"a" * 40_000)])

    def test_block_over_the_byte_limit(self) -> None:
        """A 60 KB header block of three fields."""
        self.assert_431([(b"x-big-%d" % i, b"a" * 20_000) for i in range(3)])

    def test_at_the_limits_forwarded(self) -> None:
        """100 fields (and the 4 pseudo-headers) within 32 KiB are forwarded."""
        _, _, client = self.connect()
        pseudo = len(b":methodGET:path/v1/models:schemehttps")
        pseudo += len(b":authorityproxy.test")
        room = 32 * 1024 - pseudo - 100 * len(b"x-h-00")
        headers = [(b"x-h-%02d" % i, b"v" * (room // 100)) for i in range(100)]
        stream = client.request(b"GET", path=b"/v1/models", headers=headers)
        self.turn()
        self.assertEqual(len(self.h.sent()), 1)
        self.answer(client, 0, stream)

    def test_header_list_size_advertised(self) -> None:
        """SETTINGS_MAX_HEADER_LIST_SIZE says what the limits allow, counted per RFC 9113."""
        _, _, client = self.connect()
        self.assertEqual(client.h2.remote_settings.max_header_list_size, 32 * 1024 + 32 * 104)


class RapidResetTests(_Hardening):
    """
    A stream reset in the same bytes that opened it starts no upstream work; a flood of them
    ends the connection (GOAWAY ENHANCE_YOUR_CALM) with no upstream work either; a response
    for a connection closed by a GOAWAY is dropped quietly.
    """

    def pairs(self, client: H2Client, count: int) -> None:
        """HEADERS(END_STREAM) then RST_STREAM, C{count} times, in one write."""
        head = [
            (b":method", b"GET"),
            (b":path", b"/v1/models"),
            (b":scheme", b"https"),
            (b":authority", b"proxy.test"),
        ]
        for _ in range(count):
            stream = client.h2.get_next_available_stream_id()
            client.h2.send_headers(stream, head, end_stream=True)
            client.h2.reset_stream(stream, error_code=h2.errors.ErrorCodes.CANCEL)
        client.send()

    def test_pairs_below_the_flood_threshold(self) -> None:
        """50 pairs: no exchange started, the connection serves on."""
        _, _, client = self.connect()
        self.pairs(client, 50)
        self.turn()
        client.receive()
        self.assertEqual(self.h.sent(), [])
        self.assert_still_serves(client)

    def test_end_and_reset_in_one_read(self) -> None:
        """
        A request's last DATA (END_STREAM) and its RST_STREAM in one read: the request is
        not run (it was, and its answer raised out of h2 for the forgotten stream), and the
        connection serves on.
        """
        log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]  # annotated for unittest.TestCase
        connection, _, client = self.connect()
        stream = client.request(b"POST", path=b"/nope", headers=JSON_HEADERS, end_stream=False)
        self.turn()
        data = DataFrame(stream)
        data.data = b"{}"
        data.flags.add("END_STREAM")
        reset = RstStreamFrame(stream)
        reset.error_code = h2.errors.ErrorCodes.CANCEL
        connection.dataReceived(data.serialize() + reset.serialize())
        self.turn()
        self.assertEqual([e for e in log if "log_failure" in e], [])
        self.assertEqual(self.h.sent(), [])
        self.assert_still_serves(client)

    def test_flood_ends_connection_without_upstream_work(self) -> None:
        """2,000 pairs: GOAWAY ENHANCE_YOUR_CALM, and not one request went upstream."""
        _, transport, client = self.connect()
        self.pairs(client, 2000)
        self.turn()
        client.receive()
        calm = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        self.assertEqual([e.error_code for e in client.terminated], [calm])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.h.sent(), [])

    def open_and_reset(self, client: H2Client, count: int, lifetime: float = 0.0) -> None:
        """
        C{count} times: a request in one write (it reaches the upstream), then its RST_STREAM
        in a later one, C{lifetime} seconds after.
        """
        for _ in range(count):
            if client.terminated:
                return
            stream = client.request(b"GET", path=b"/v1/models")
            self.turn()
            self.h.clock.advance(lifetime)
            client.h2.reset_stream(stream, error_code=h2.errors.ErrorCodes.CANCEL)
            client.send()
            self.turn()
            client.receive()

    def test_early_resets_in_later_reads_end_connection(self) -> None:
        """
        Rapid Reset spread over reads: each request started upstream, then reset. At the
        100th such early reset the connection gets GOAWAY ENHANCE_YOUR_CALM (logged); every
        upstream request it started was cancelled.
        """
        log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]  # annotated for unittest.TestCase
        _, transport, client = self.connect()
        self.open_and_reset(client, 150)
        calm = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        self.assertEqual([e.error_code for e in client.terminated], [calm])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(self.h.sent()), 100)
        self.assertTrue(all(sent.cancelled for sent in self.h.sent()))
        self.assertTrue(any("Rapid Reset" in formatEvent(e) for e in log))

    def test_late_resets_not_counted(self) -> None:
        """Streams reset after a second (a client cancelling generations): no GOAWAY."""
        _, _, client = self.connect()
        self.open_and_reset(client, 150, lifetime=1.5)
        self.assert_still_serves(client)

    def test_early_resets_of_a_minority_not_counted(self) -> None:
        """120 early resets among 380 streams, most of them answered: no GOAWAY."""
        _, _, client = self.connect()
        for _ in range(260):
            stream = client.request(b"GET", path=b"/v1/models")
            self.turn()
            self.answer(client, len(self.h.sent()) - 1, stream)
        self.open_and_reset(client, 120)
        self.assert_still_serves(client)

    def test_response_after_goaway_dropped(self) -> None:
        """A response head for a connection closed by a GOAWAY: dropped, exchange cancelled."""
        connection, _, client = self.connect()
        stream = client.request(b"GET", path=b"/v1/models")
        self.turn()
        (sent,) = self.h.sent()
        connection.conn.close_connection()  # the GOAWAY h2 queues on a connection error
        response = FakeResponse(200, {b"content-type": [b"application/json"]})
        sent.deferred.callback(response)
        response.deliver(b"{}")
        self.turn()
        self.assertNotIn(stream, connection.streams)
        self.assertTrue(response.socket.stopped)


class ControlFloodTests(_Hardening):
    """
    PING and SETTINGS floods end the connection with GOAWAY ENHANCE_YOUR_CALM; a client that
    does not read the answers is aborted, logged at info level (it is the client's doing).
    """

    def flood(self, client: H2Client, count: int, frame: str) -> None:
        for i in range(count):
            if frame == "ping":
                client.h2.ping(b"%08d" % i)
            else:
                client.h2.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100})
        client.send()
        self.turn()
        client.receive()

    def test_ping_flood_ends_connection(self) -> None:
        """600 PINGs at once: GOAWAY ENHANCE_YOUR_CALM, logged."""
        log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]  # annotated for unittest.TestCase
        _, transport, client = self.connect()
        self.flood(client, 600, "ping")
        calm = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        self.assertEqual([e.error_code for e in client.terminated], [calm])
        self.assertTrue(transport.disconnecting)
        self.assertTrue(any("too many PING or SETTINGS" in formatEvent(e) for e in log))

    def test_settings_flood_ends_connection(self) -> None:
        """600 SETTINGS frames at once: GOAWAY ENHANCE_YOUR_CALM."""
        _, _, client = self.connect()
        self.flood(client, 600, "settings")
        calm = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        self.assertEqual([e.error_code for e in client.terminated], [calm])

    def test_pings_over_time_allowed(self) -> None:
        """400 PINGs, 10 s later 400 more (the bucket refills): the connection serves on."""
        _, _, client = self.connect()
        self.flood(client, 400, "ping")
        self.h.clock.advance(10)
        self.flood(client, 400, "ping")
        self.assert_still_serves(client)

    def test_unread_answers_abort_at_info_level(self) -> None:
        """
        A client that reads none of its PING answers: the connection is aborted once they
        pile up, and the log line says so at info level (Twisted logged an error).
        """
        log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]  # annotated for unittest.TestCase
        connection, transport, client = self.connect()
        connection._maxBufferedControlFrameBytes = 200
        connection.pauseProducing()  # what the transport does when the client does not read
        self.flood(client, 20, "ping")
        self.assertTrue(transport.disconnected or transport.disconnecting)
        closing = [e for e in log if "does not read" in formatEvent(e)]
        self.assertEqual([e["log_level"] for e in closing], [LogLevel.info])
        self.assertEqual([e for e in log if e["log_level"] >= LogLevel.error], [])


class _TLSTransport(StringTransport):
    """A TLS transport, its handshake done, reporting the protocol ALPN chose."""

    def __init__(self, negotiated: bytes | None) -> None:
        super().__init__(peerAddress=CLIENT_ADDRESS)
        self.negotiatedProtocol = negotiated
        # Declared on the instance: the TCP half of ISSLTransport is not needed here.
        alsoProvides(self, ISSLTransport)


class RefusalOverH2Tests(SynchronousTestCase):
    """
    Past max_connections a TLS client that negotiated h2 gets an HTTP/2 refusal: the server
    preface, a JSON 503 with retry-after on its first stream, GOAWAY(NO_ERROR) naming that
    stream as the last one, then close. An HTTP/1.1 client still gets the HTTP/1.1 503.
    """

    def refusal(self, negotiated: bytes | None) -> tuple[Refusal, _TLSTransport]:
        clock = MemoryReactorClock()
        site = ProxySite(Resource(), clock, max_connections=1)
        self.assertTrue(site.connections.admit())  # the one slot is taken
        refusal = site.buildProtocol(CLIENT_ADDRESS)
        assert isinstance(refusal, Refusal)
        transport = _TLSTransport(negotiated)
        refusal.makeConnection(transport)
        self.assertEqual(transport.value(), b"")  # nothing before the handshake is done
        refusal.handshakeCompleted()
        return refusal, transport

    def test_h2_client_gets_503_and_goaway(self) -> None:
        """The first stream gets the 503; a second stream is left to retry; then close."""
        refusal, transport = self.refusal(b"h2")
        client = H2Client(refusal, transport)
        client.h2.initiate_connection()
        first = client.h2.get_next_available_stream_id()
        client.h2.send_headers(first, REQUEST_HEADERS, end_stream=True)
        second = client.h2.get_next_available_stream_id()
        client.h2.send_headers(second, REQUEST_HEADERS, end_stream=True)
        client.send()
        client.receive()
        self.assertEqual(client.headers[first][b":status"], b"503")
        self.assertEqual(client.headers[first][b"retry-after"], b"1")
        self.assertTrue(client.headers[first][b"x-request-id"])
        error = json.loads(client.body[first])["error"]
        self.assertEqual(error["code"], "too_many_connections")
        self.assertIn(first, client.ended)
        self.assertNotIn(second, client.headers)
        (goaway,) = client.terminated
        self.assertEqual(goaway.error_code, _NO_ERROR)
        self.assertEqual(goaway.last_stream_id, first)
        self.assertTrue(transport.disconnecting)

    def test_h2_client_without_request_gets_goaway(self) -> None:
        """
        An h2 client that sends no request gets GOAWAY naming stream 0 (nothing was
        processed) when the refusal's time is up, then the connection is aborted if it stays.
        """
        refusal, transport = self.refusal(b"h2")
        clock = refusal._clock
        assert isinstance(clock, MemoryReactorClock)
        client = H2Client(refusal, transport)
        client.h2.initiate_connection()
        client.send()
        client.receive()
        self.assertEqual(client.terminated, [])
        clock.advance(5)
        client.receive()
        (goaway,) = client.terminated
        self.assertEqual((goaway.error_code, goaway.last_stream_id), (_NO_ERROR, 0))
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected)
        clock.advance(1)
        self.assertTrue(transport.disconnected)

    def test_http11_over_tls_gets_http11_503(self) -> None:
        """ALPN http/1.1 (or none): the HTTP/1.1 503, after the handshake."""
        for negotiated in (b"http/1.1", None):
            _, transport = self.refusal(negotiated)
            self.assertTrue(transport.value().startswith(b"HTTP/1.1 503 "))
            self.assertTrue(transport.disconnecting)
