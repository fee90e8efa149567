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
from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame
from twisted.internet.testing import StringTransport

from oaiproxy.http.h2fix import MAX_EMPTY_DATA_FRAMES, ProxyH2Connection
from tests.support.fakes import FakeResponse
from tests.support.h2client import H2Client
from tests.test_h2_relay import H2ProxyTestCase

_NO_ERROR = h2.errors.ErrorCodes.NO_ERROR
_PROTOCOL_ERROR = h2.errors.ErrorCodes.PROTOCOL_ERROR
_INITIAL_WINDOW_SIZE = h2.settings.SettingCodes.INITIAL_WINDOW_SIZE


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
