"""
The upstream HTTP/1.1 client (L{oaiproxy.http.client}): the request it writes, the
responses it parses and refuses, its idle pool, its one retry, body delivery with flow
control, cancellation and shutdown. Connections are made by a fake endpoint over
L{StringTransport}s; the test plays the upstream.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, DeferredList, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web._newclient import ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IResponse
from zope.interface import implementer
from zope.interface.verify import verifyObject

from oaiproxy.errors import InvalidRequest, UpstreamConnectFailed, UpstreamProtocolError
from oaiproxy.http.client import MAX_HEAD_BYTES, RETRY_WINDOW, UpstreamClient, _Connection
from oaiproxy.http.forwarder import BytesProducer, HandshakeEndpoint
from oaiproxy.http.headers import downstream_response_headers
from tests.support.fakes import FakeTCP, RecordingTransport

ORIGIN = b"http://upstream.test:8080"
URL = ORIGIN + b"/v1/models"
GET = b"GET /v1/models HTTP/1.1\r\n\r\n"
_DONE = Failure(ConnectionDone())
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Attempt:
    """One connection attempt made through L{FakeEndpoint}, completed by the test."""

    def __init__(self, factory: IProtocolFactory) -> None:
        self.factory = factory
        self.cancelled = False
        self.deferred: Deferred[IProtocol] = Deferred(self._cancel)
        self.protocol: _Connection | None = None
        self.transport: RecordingTransport | None = None

    def _cancel(self, d: Deferred[IProtocol]) -> None:
        self.cancelled = True

    def succeed(self, transport: RecordingTransport | None = None) -> _Connection:
        """Build the protocol, connect it to C{transport}, fire the attempt with it."""
        protocol = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8080))
        assert isinstance(protocol, _Connection)
        self.transport = transport if transport is not None else RecordingTransport()
        protocol.makeConnection(self.transport)
        self.protocol = protocol
        self.deferred.callback(protocol)
        return protocol


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """An endpoint whose connection attempts the test completes (or fails) by hand."""

    def __init__(self) -> None:
        self.attempts: list[Attempt] = []

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        attempt = Attempt(protocolFactory)
        self.attempts.append(attempt)
        return attempt.deferred


class Collector(Protocol):
    """A response body's protocol: keeps what it gets; may act on its transport."""

    def __init__(self, on_data: str | None = None, on_connect: str | None = None) -> None:
        self.data: list[bytes] = []
        self.reason: Failure | None = None
        # The transport method to call on each dataReceived / in connectionMade.
        self._on_data = on_data
        self._on_connect = on_connect

    def connectionMade(self) -> None:
        if self._on_connect is not None:
            getattr(self.transport, self._on_connect)()

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)
        if self._on_data is not None:
            getattr(self.transport, self._on_data)()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.reason = reason

    @property
    def body(self) -> bytes:
        """All the data received, joined."""
        return b"".join(self.data)


class ClientCase(SynchronousTestCase):
    """A client of one upstream over a fake endpoint; helpers to play the upstream."""

    idle_connections = 2
    keepalive = 10.0

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.endpoint = FakeEndpoint()
        self.client = UpstreamClient(
            self.clock,
            ORIGIN,
            self.endpoint,
            idle_connections=self.idle_connections,
            keepalive=self.keepalive,
        )

    def get(self, url: bytes = URL, method: bytes = b"GET") -> Deferred[IResponse]:
        """Send a request without headers or body."""
        return self.client.request(method, url)

    def connect(self) -> tuple[_Connection, RecordingTransport]:
        """Complete the latest connection attempt."""
        attempt = self.endpoint.attempts[-1]
        protocol = attempt.succeed()
        assert attempt.transport is not None
        return protocol, attempt.transport

    def response(self, d: Deferred[IResponse]) -> IResponse:
        """The response C{d} fired with."""
        return self.successResultOf(d)

    def read(self, response: IResponse) -> Collector:
        """Deliver C{response}'s body to a new L{Collector}."""
        collector = Collector()
        response.deliverBody(collector)
        return collector

    def assert_done(self, collector: Collector, body: bytes) -> None:
        """C{collector} got C{body} and a clean end."""
        self.assertEqual(collector.body, body)
        assert collector.reason is not None
        self.assertTrue(collector.reason.check(ResponseDone), collector.reason)

    def exchange(
        self, raw: bytes = OK, method: bytes = b"GET"
    ) -> tuple[_Connection, RecordingTransport]:
        """One request on a new connection answered with C{raw}; the body is read."""
        d = self.get(method=method)
        protocol, transport = self.connect()
        protocol.dataReceived(raw)
        self.read(self.response(d))
        return protocol, transport

    def refused(self, raw: bytes) -> Failure:
        """
        Answer a request with C{raw} on a new connection: the request must fail with
        L{UpstreamProtocolError} and the connection be aborted.
        """
        self.drop_idle()
        attempts = len(self.endpoint.attempts)
        d = self.get()
        self.assertEqual(len(self.endpoint.attempts), attempts + 1, "not a new connection")
        protocol, transport = self.connect()
        protocol.dataReceived(raw)
        failure: Failure = self.failureResultOf(d)
        self.assertTrue(failure.check(UpstreamProtocolError), f"{raw!r}: {failure}")
        self.assertTrue(transport.disconnected, f"{raw!r}: the connection was not aborted")
        protocol.connectionLost(Failure(ConnectionLost()))
        return failure

    def accepted(self, raw: bytes) -> IResponse:
        """Answer a request with C{raw} on a new connection: the response head is taken."""
        self.drop_idle()
        d = self.get()
        protocol, _ = self.connect()
        protocol.dataReceived(raw)
        return self.response(d)

    def drop_idle(self) -> None:
        """The upstream closes every idle connection (so that the next request connects)."""
        for connection in list(self.client._idle):
            connection.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.client._idle, [])

    def assert_reused(self, transport: StringTransport) -> None:
        """The next request goes out on C{transport}, without a new connection."""
        attempts = len(self.endpoint.attempts)
        transport.clear()
        self.get()
        self.assertEqual(len(self.endpoint.attempts), attempts, "a new connection was made")
        self.assertEqual(transport.value(), GET)

    def assert_retired(self, transport: StringTransport) -> None:
        """C{transport} was closed gracefully (a healthy idle connection), not aborted."""
        self.assertTrue(transport.disconnecting, "not closed")
        self.assertFalse(transport.disconnected, "aborted, not closed gracefully")

    def assert_not_reused(self, transport: StringTransport) -> None:
        """The next request makes a new connection and is not written on C{transport}."""
        attempts = len(self.endpoint.attempts)
        transport.clear()
        self.get()
        self.assertEqual(len(self.endpoint.attempts), attempts + 1, "no new connection")
        self.assertEqual(transport.value(), b"")


class HandshakeTests(ClientCase):
    """
    Behind L{HandshakeEndpoint} (a TLS upstream), a connection counts as made once its
    handshake is done: the request waits for it, and a loss before it fails the request
    with a reason.
    """

    def setUp(self) -> None:
        super().setUp()
        self.client = UpstreamClient(
            self.clock, ORIGIN, HandshakeEndpoint(self.endpoint), idle_connections=2, keepalive=10
        )

    def test_request_waits_for_the_handshake(self) -> None:
        """Nothing is written before the handshake; the request goes out once it is done."""
        d = self.get()
        protocol, transport = self.connect()
        self.assertEqual(transport.value(), b"")
        protocol.handshakeCompleted()
        self.assertEqual(transport.value(), GET)
        protocol.dataReceived(OK)
        self.assertEqual(self.response(d).code, 200)

    def test_handshake_done_before_asked(self) -> None:
        """A handshake done before anyone waits for it is not waited for again."""
        protocol = _Connection(self.client)
        protocol.handshakeCompleted()
        self.assertIs(self.successResultOf(protocol.when_handshaken()), protocol)

    def test_handshake_asked_after_the_loss(self) -> None:
        """Waiting for the handshake of a connection already lost fails at once."""
        protocol = _Connection(self.client)
        protocol.makeConnection(RecordingTransport())
        protocol.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(protocol.when_handshaken(), UpstreamConnectFailed)

    def test_lost_during_handshake(self) -> None:
        """A connection lost before its handshake fails the request, retryably."""
        d = self.get()
        protocol, _ = self.connect()
        protocol.connectionLost(Failure(ConnectionLost()))
        failure = self.failureResultOf(d, UpstreamConnectFailed)
        self.assertEqual(
            failure.value.message, "upstream TLS handshake failed: the connection was closed"
        )

    def test_tls_error_during_handshake(self) -> None:
        """A TLS error says what OpenSSL said."""
        d = self.get()
        protocol, _ = self.connect()
        error = SSL.Error([("SSL routines", "", "tlsv1 alert protocol version")])
        protocol.connectionLost(Failure(error))
        failure = self.failureResultOf(d, UpstreamConnectFailed)
        self.assertIn("protocol version", failure.value.message)

    def test_cancel_during_handshake_aborts(self) -> None:
        """Cancelling the request during the handshake aborts the connection."""
        d = self.get()
        _, transport = self.connect()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(transport.disconnected)


class InterfaceTests(ClientCase):
    """The objects given out provide the Twisted interfaces they claim."""

    def test_interfaces(self) -> None:
        """The client is an IAgent, the response an IResponse, its body transport a producer."""
        self.assertTrue(verifyObject(IAgent, self.client))
        d = self.get()
        protocol, _ = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n")
        response = self.response(d)
        self.assertTrue(verifyObject(IResponse, response))
        collector = self.read(response)
        self.assertTrue(verifyObject(IPushProducer, collector.transport))


class RequestTests(ClientCase):
    """The bytes of a request, and the requests refused before anything is sent."""

    def test_request_bytes_in_one_write(self) -> None:
        """Request line, Content-Length, the given headers and the body go in one write."""
        headers = Headers()
        headers.addRawHeader(b"Host", b"upstream.test:8080")
        headers.addRawHeader(b"X-Many", b"1")
        headers.addRawHeader(b"X-Many", b"2")
        self.client.request(
            b"POST",
            ORIGIN + b"/v1/chat/completions?stream=true#frag",
            headers,
            BytesProducer(b'{"a":1}'),
        )
        _, transport = self.connect()
        self.assertEqual(
            transport.writes,
            [
                b"POST /v1/chat/completions?stream=true HTTP/1.1\r\n"
                b"Content-Length: 7\r\n"
                b"Host: upstream.test:8080\r\n"
                b"X-Many: 1\r\n"
                b"X-Many: 2\r\n"
                b"\r\n"
                b'{"a":1}'
            ],
        )

    def test_large_body_not_copied(self) -> None:
        """A body over 64 KiB is written after the head, the very bytes object given."""
        body = b"x" * (64 * 1024 + 1)
        self.client.request(
            b"POST", ORIGIN + b"/v1/files", Headers({b"host": [b"h"]}), BytesProducer(body)
        )
        _, transport = self.connect()
        head, written = transport.writes
        self.assertEqual(
            head, b"POST /v1/files HTTP/1.1\r\nContent-Length: 65537\r\nHost: h\r\n\r\n"
        )
        self.assertIs(written, body)

    def test_no_body_no_content_length(self) -> None:
        """Without a body producer, no Content-Length is written."""
        self.get(ORIGIN + b"/v1/models#x")
        _, transport = self.connect()
        self.assertEqual(transport.writes, [GET])

    def test_empty_body_content_length_zero(self) -> None:
        """An empty body producer is written as Content-Length: 0."""
        self.client.request(b"POST", URL, None, BytesProducer(b""))
        _, transport = self.connect()
        self.assertEqual(
            transport.value(), b"POST /v1/models HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
        )

    def test_invalid_target(self) -> None:
        """A target with a space, a control or a non-ASCII byte is an InvalidRequest."""
        for target in (b"/a b", b"/a\x01", b"/a\r\nX: 1", b"/a\x7f", b"/caf\xc3\xa9", b"/\t"):
            self.assertRaises(InvalidRequest, self.get, ORIGIN + target)
        self.assertEqual(self.endpoint.attempts, [])

    def test_invalid_method(self) -> None:
        """A method that is not a token (or has a line break) is an InvalidRequest."""
        for method in (b"", b"GE T", b"GET\r\n", b"GET\n", b"G(T", b"GET\x00", b"G\xc3\xa9T"):
            self.assertRaises(InvalidRequest, self.get, URL, method)
        self.assertEqual(self.endpoint.attempts, [])

    def test_other_origin(self) -> None:
        """A URL of another origin (or not followed by a path) is a ValueError."""
        for url in (
            b"http://other.test:8080/v1/models",
            b"https://upstream.test:8080/v1/models",
            b"http://upstream.test:80801/v1/models",
            b"http://upstream.test:8080",
            b"http://upstream.test:8080?x=1",
            b"/v1/models",
        ):
            self.assertRaises(ValueError, self.get, url)
        self.assertEqual(self.endpoint.attempts, [])

    def test_body_not_in_memory(self) -> None:
        """A body producer without take() is refused."""

        class Streaming:
            length = 3

        self.assertRaises(ValueError, self.client.request, b"POST", URL, None, Streaming())

    def test_connect_failure(self) -> None:
        """A failed connection attempt fails the request with the attempt's failure."""
        d = self.get()
        self.endpoint.attempts[0].deferred.errback(ConnectionRefusedError())
        self.failureResultOf(d, ConnectionRefusedError)


class ResponseBodyTests(ClientCase):
    """Framing of response bodies: length, chunked, until close, none."""

    def test_content_length(self) -> None:
        """A Content-Length body in several reads is delivered and ends with ResponseDone."""
        d = self.get()
        protocol, transport = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n")
        self.assertNoResult(d)
        protocol.dataReceived(b"Content-Length: 11\r\n\r\nhello")
        response = self.response(d)
        self.assertEqual(
            (response.version, response.code, response.phrase), ((b"HTTP", 1, 1), 200, b"OK")
        )
        self.assertEqual(response.length, 11)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/plain"])
        collector = self.read(response)
        self.assertEqual(collector.body, b"hello")
        self.assertIsNone(collector.reason)
        protocol.dataReceived(b" world")
        self.assert_done(collector, b"hello world")
        self.assertFalse(transport.disconnecting)

    def test_chunked(self) -> None:
        """A chunked body is decoded, of unknown length, and the connection is kept."""
        d = self.get()
        protocol, transport = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n5\r\nhel")
        response = self.response(d)
        self.assertIs(response.length, UNKNOWN_LENGTH)
        self.assertFalse(response.headers.hasHeader(b"transfer-encoding"))
        collector = self.read(response)
        protocol.dataReceived(b"lo\r\n6\r\n world\r\n0\r\n\r\n")
        self.assert_done(collector, b"hello world")
        self.assert_reused(transport)

    def test_bad_chunked(self) -> None:
        """Bad chunked framing fails the body with ResponseFailed and aborts the connection."""
        d = self.get()
        protocol, transport = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
        collector = self.read(self.response(d))
        assert collector.reason is not None
        self.assertTrue(collector.reason.check(ResponseFailed))
        self.assertTrue(transport.disconnected)
        protocol.connectionLost(Failure(ConnectionLost()))
        self.assert_not_reused(transport)

    def test_until_close(self) -> None:
        """A body without framing is read until the close, which is a PotentialDataLoss."""
        d = self.get()
        protocol, _ = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nsome")
        response = self.response(d)
        self.assertIs(response.length, UNKNOWN_LENGTH)
        collector = self.read(response)
        protocol.dataReceived(b" more")
        self.assertIsNone(collector.reason)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(collector.body, b"some more")
        assert collector.reason is not None
        self.assertTrue(collector.reason.check(PotentialDataLoss), collector.reason)

    def test_until_close_aborted(self) -> None:
        """A body read until the close, cut by a lost connection, fails with ResponseFailed."""
        d = self.get()
        protocol, _ = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nsome")
        collector = self.read(self.response(d))
        protocol.connectionLost(Failure(ConnectionLost()))
        assert collector.reason is not None
        self.assertTrue(collector.reason.check(ResponseFailed), collector.reason)

    def test_content_length_cut(self) -> None:
        """A Content-Length body cut short fails with ResponseFailed, even on a clean close."""
        d = self.get()
        protocol, _ = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")
        collector = self.read(self.response(d))
        protocol.connectionLost(Failure(ConnectionDone()))
        assert collector.reason is not None
        self.assertTrue(collector.reason.check(ResponseFailed), collector.reason)

    def test_no_body(self) -> None:
        """HEAD, 204 and 304 responses have no body (length 0); the connection is reused."""
        for method, raw in (
            (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"),
            (b"HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
            (b"GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
            (b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n"),
        ):
            d = self.get(method=method)
            protocol, transport = self.connect()
            protocol.dataReceived(raw)
            response = self.response(d)
            self.assertEqual(response.length, 0, raw)
            self.assert_done(self.read(response), b"")
            self.assert_reused(transport)
            protocol.connectionLost(Failure(ConnectionDone()))  # out of the way of the next

    def test_informational_skipped(self) -> None:
        """1xx responses (split across reads too) are skipped for the final one."""
        d = self.get()
        protocol, _ = self.connect()
        protocol.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\n")
        self.assertNoResult(d)
        protocol.dataReceived(
            b"Link: </a>\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
        )
        response = self.response(d)
        self.assertEqual(response.code, 201)
        self.assertFalse(response.headers.hasHeader(b"link"))
        self.assert_done(self.read(response), b"ok")

    def test_switching_protocols_fails(self) -> None:
        """A 101 response is refused."""
        self.refused(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")

    def test_connection_headers_removed(self) -> None:
        """Connection-control fields and the fields Connection names are not in the headers."""
        response = self.accepted(
            b"HTTP/1.1 200 OK\r\n"
            b"Connection: keep-alive, X-Hop\r\n"
            b"Connection: X-Other\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"Proxy-Connection: keep-alive\r\n"
            b"Upgrade: h2c\r\n"
            b"Trailer: X-T\r\n"
            b"TE: trailers\r\n"
            b"X-Hop: 1\r\n"
            b"X-Other: 2\r\n"
            b"X-Kept: 3\r\n"
            b"Content-Length: 0\r\n\r\n"
        )
        self.assertEqual(
            [name.lower() for name, _ in response.headers.getAllRawHeaders()], [b"x-kept"]
        )

    def test_connection_non_token_ignored(self) -> None:
        """A Connection value that is no field name names nothing (and breaks nothing)."""
        response = self.accepted(
            b"HTTP/1.1 200 OK\r\nConnection: a b, x(y, , X-Hop\r\nX-Hop: 1\r\nX-A: 2\r\n"
            b"Content-Length: 0\r\n\r\n"
        )
        self.assertEqual(
            [name.lower() for name, _ in response.headers.getAllRawHeaders()], [b"x-a"]
        )

    def test_bare_lf(self) -> None:
        """A head with bare LF line ends is accepted."""
        response = self.accepted(b"HTTP/1.1 200 OK\nContent-Length: 2\nX-A: b\n\nok")
        self.assertEqual(response.headers.getRawHeaders(b"x-a"), [b"b"])
        self.assert_done(self.read(response), b"ok")

    def test_mixed_line_ends(self) -> None:
        """A head ended by LF then CRLF is found, however the body's bytes look or arrive."""
        for raw, body in (
            (b"HTTP/1.1 200 OK\nContent-Length: 6\n\r\nab\r\n\r\n", b"ab\r\n\r\n"),
            (b"HTTP/1.1 200 OK\nContent-Length: 2\n\r\n\r\n", b"\r\n"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 2\n\r\nok", b"ok"),
        ):
            response = self.accepted(raw)
            self.assertEqual(response.length, len(body), raw)
            self.assert_done(self.read(response), body)

    def test_head_split_every_byte(self) -> None:
        """A head and body arriving one byte per read are parsed as in one read."""
        raw = b"HTTP/1.1 200 OK\r\nX-A:  b \r\nContent-Length: 2\r\n\r\nok"
        d = self.get()
        protocol, _ = self.connect()
        for i in range(len(raw) - 2):
            protocol.dataReceived(raw[i : i + 1])
        response = self.response(d)
        self.assertEqual(response.headers.getRawHeaders(b"x-a"), [b"b"])
        collector = self.read(response)
        protocol.dataReceived(b"o")
        protocol.dataReceived(b"k")
        self.assert_done(collector, b"ok")

    def test_head_at_limit(self) -> None:
        """A head of MAX_HEAD_BYTES is taken; one byte more is refused (split in reads too)."""
        line = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Pad: "
        head = line + b"a" * (MAX_HEAD_BYTES - len(line))
        self.assertEqual(self.accepted(head + b"\r\n\r\n").code, 200)
        self.refused(head + b"a\r\n\r\n")
        # Without its end, in two reads.
        d = self.get()
        protocol, transport = self.connect()
        protocol.dataReceived(head)
        self.assertNoResult(d)
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(b"a")
        self.failureResultOf(d, UpstreamProtocolError)
        self.assertTrue(transport.disconnected)


class RefusedResponseTests(ClientCase):
    """Strict parsing: what an upstream may not send, each an UpstreamProtocolError."""

    def test_status_line(self) -> None:
        """A status line that is not HTTP/1.0 or HTTP/1.1 is refused."""
        for line in (b"HTTP/2 200 OK", b"HTTP/1.2 200 OK", b"http/1.1 200 OK", b"ICY 200 OK"):
            self.refused(line + b"\r\nContent-Length: 0\r\n\r\n")
        self.refused(b"HTTP/1.1\r\n\r\n")
        self.refused(b"\r\n\r\n")

    def test_status_code(self) -> None:
        """A status code outside 100-599, or not three digits, is refused."""
        for code in (b"099", b"99", b"600", b"999", b"2000", b"20a", b"+20", b"-20", b" 20", b""):
            self.refused(b"HTTP/1.1 " + code + b" X\r\nContent-Length: 0\r\n\r\n")

    def test_no_reason_phrase(self) -> None:
        """A status line without a reason phrase is fine."""
        self.assertEqual(self.accepted(b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n").phrase, b"")

    def test_header_without_colon(self) -> None:
        """A header line without a colon is refused."""
        self.refused(b"HTTP/1.1 200 OK\r\nNoColon\r\nContent-Length: 0\r\n\r\n")

    def test_header_name_not_token(self) -> None:
        """A header name that is not a token (a space before the colon, say) is refused."""
        for line in (b"X-A : 1", b"X A: 1", b": 1", b"X(A): 1", b"X-\xc3\xa9: 1"):
            self.refused(b"HTTP/1.1 200 OK\r\n" + line + b"\r\nContent-Length: 0\r\n\r\n")

    def test_obs_fold(self) -> None:
        """A folded header line (obs-fold) is refused."""
        for fold in (b" folded", b"\tfolded", b" X-B: 1"):
            self.refused(
                b"HTTP/1.1 200 OK\r\nX-A: 1\r\n" + fold + b"\r\nContent-Length: 0\r\n\r\n"
            )

    def test_bare_cr(self) -> None:
        """A bare CR in a head (CRLF or bare-LF one) is refused."""
        self.refused(b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 0\r\n\r\n")
        self.refused(b"HTTP/1.1 200 OK\nX-A: a\rb\nContent-Length: 0\n\n")
        self.refused(b"HTTP/1.1 200 OK\rX-A: 1\r\nContent-Length: 0\r\n\r\n")
        # A CR before a CRLF: removing the CRLFs leaves a CRLF behind.
        self.refused(b"HTTP/1.1 200 OK\r\nX-A: 1\r\r\nContent-Length: 0\r\n\r\n")

    def test_nul(self) -> None:
        """A NUL in a head is refused."""
        self.refused(b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n")
        self.refused(b"HTTP/1.1 200 O\x00K\r\nContent-Length: 0\r\n\r\n")

    def test_transfer_encoding(self) -> None:
        """A Transfer-Encoding other than exactly one chunked is refused."""
        for value in (
            b"gzip",
            b"identity",
            b"gzip, chunked",
            b"chunked, gzip",
            b"chunked, chunked",
            b"chunked\r\nTransfer-Encoding: chunked",
            b"",
            b"chunkedx",
        ):
            self.refused(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + value + b"\r\n\r\n")

    def test_content_length(self) -> None:
        """A bad Content-Length, or conflicting ones, are refused."""
        for value in (
            b"abc",
            b"-1",
            b"+5",
            b"0x5",
            b"5 6",
            b"5, 6",
            b"5,",
            b"",
            b"5\r\nContent-Length: 6",
        ):
            self.refused(b"HTTP/1.1 200 OK\r\nContent-Length: " + value + b"\r\n\r\n")

    def test_repeated_content_length(self) -> None:
        """The same Content-Length given twice (in a list or two fields) is taken."""
        for value in (b"2, 2", b"2\r\nContent-Length: 2", b" 2 "):
            response = self.accepted(
                b"HTTP/1.1 200 OK\r\nContent-Length: " + value + b"\r\n\r\nok"
            )
            self.assertEqual(response.length, 2, value)

    def test_chunked_and_content_length(self) -> None:
        """With both framings, chunked is used and the connection is not pooled afterwards."""
        d = self.get()
        protocol, transport = self.connect()
        protocol.dataReceived(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nok\r\n0\r\n\r\n"
        )
        response = self.response(d)
        self.assertIs(response.length, UNKNOWN_LENGTH)
        self.assert_done(self.read(response), b"ok")
        self.assertTrue(transport.disconnecting)
        self.assert_not_reused(transport)


class PoolTests(ClientCase):
    """Which connections are kept idle, for how long, and which one is reused."""

    def test_reused(self) -> None:
        """After a complete response the connection serves the next request."""
        _, transport = self.exchange()
        self.assertFalse(transport.disconnecting)
        self.assert_reused(transport)
        self.assertEqual(len(self.endpoint.attempts), 1)

    def test_not_reused_connection_close(self) -> None:
        """After Connection: close the connection is closed, not pooled."""
        _, transport = self.exchange(
            b"HTTP/1.1 200 OK\r\nConnection: Close\r\nContent-Length: 2\r\n\r\nok"
        )
        self.assertTrue(transport.disconnecting)
        self.assert_not_reused(transport)

    def test_not_reused_http10(self) -> None:
        """After an HTTP/1.0 response (even with keep-alive) the connection is not pooled."""
        _, transport = self.exchange(
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok"
        )
        self.assertTrue(transport.disconnecting)
        self.assert_not_reused(transport)

    def test_not_reused_extra_bytes(self) -> None:
        """Bytes after the end of a body (any framing) keep the connection out of the pool."""
        for raw in (
            OK + b"HTTP/1.1 200 OK\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX",
            b"HTTP/1.1 204 No Content\r\n\r\nX",
        ):
            _, transport = self.exchange(raw)
            self.assertTrue(transport.disconnecting, raw)
            self.assert_not_reused(transport)

    def test_keepalive_sweep(self) -> None:
        """An idle connection is closed after keepalive seconds; the next request reconnects."""
        protocol, transport = self.exchange()
        self.clock.advance(self.keepalive - 0.5)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.5)
        self.assert_retired(transport)
        protocol.connectionLost(Failure(ConnectionLost()))
        self.assert_not_reused(transport)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_keepalive_sweep_reschedules(self) -> None:
        """The sweep comes back for a connection that became idle after the first one."""
        d1, d2 = self.get(), self.get()
        a1, a2 = self.endpoint.attempts
        p1, p2 = a1.succeed(), a2.succeed()
        assert a1.transport is not None and a2.transport is not None
        p1.dataReceived(OK)
        self.read(self.response(d1))
        self.clock.advance(4)
        p2.dataReceived(OK)
        self.read(self.response(d2))
        self.clock.advance(self.keepalive - 4)
        self.assert_retired(a1.transport)
        self.assertFalse(a2.transport.disconnecting)
        self.clock.advance(4)
        self.assert_retired(a2.transport)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_keepalive_checked_on_reuse(self) -> None:
        """A connection past its keepalive is not reused even if the sweep has not run yet."""
        _, transport = self.exchange()
        self.clock.rightNow += self.keepalive  # time passes, the timer has not fired
        self.assert_not_reused(transport)
        self.assert_retired(transport)

    def test_at_most_idle_connections(self) -> None:
        """No more than idle_connections are kept idle: the oldest idle one is closed."""
        calls = [self.get() for _ in range(3)]
        protocols = []
        for attempt in self.endpoint.attempts:
            protocols.append(attempt.succeed())
        for protocol, d in zip(protocols, calls, strict=True):
            protocol.dataReceived(OK)
            self.read(self.response(d))
        transports = [a.transport for a in self.endpoint.attempts]
        self.assertEqual(
            [t.disconnecting for t in transports if t is not None], [True, False, False]
        )
        assert transports[0] is not None
        self.assert_retired(transports[0])
        self.assertEqual(len(self.client._idle), self.idle_connections)

    def test_most_recent_first(self) -> None:
        """The connection that became idle last is reused first."""
        d1, d2 = self.get(), self.get()
        a1, a2 = self.endpoint.attempts
        p1, p2 = a1.succeed(), a2.succeed()
        assert a1.transport is not None and a2.transport is not None
        p1.dataReceived(OK)
        self.read(self.response(d1))
        p2.dataReceived(OK)
        self.read(self.response(d2))
        a1.transport.clear()
        self.assert_reused(a2.transport)
        self.assertEqual(a1.transport.value(), b"")
        self.assert_reused(a1.transport)

    def test_idle_lost_forgotten(self) -> None:
        """An idle connection the upstream closes is forgotten."""
        protocol, transport = self.exchange()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.client._idle, [])
        self.assert_not_reused(transport)

    def test_idle_speaking_closed(self) -> None:
        """An idle connection that receives bytes is closed and not reused."""
        protocol, transport = self.exchange()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertTrue(transport.disconnected)
        self.assert_not_reused(transport)


class NoIdleTests(ClientCase):
    """A client that keeps no connection idle."""

    idle_connections = 0

    def test_no_idle_connections(self) -> None:
        """With idle_connections=0 every connection is closed after its response."""
        _, transport = self.exchange()
        self.assert_retired(transport)
        self.assert_not_reused(transport)


class RetryTests(ClientCase):
    """One retry on a new connection, only for a reused one lost before any response byte."""

    def test_reused_lost_retried(self) -> None:
        """
        A reused connection lost before answering: the request goes again on a new one, and
        that is logged (a hint that upstream_keepalive is too long for the upstream).
        """
        log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]  # annotated for unittest.TestCase
        protocol, transport = self.exchange()
        transport.clear()
        d = self.client.request(b"POST", URL, None, BytesProducer(b"body"))
        sent = transport.value()
        self.assertEqual(sent, b"POST /v1/models HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertNoResult(d)
        self.assertEqual(len(self.endpoint.attempts), 2)
        protocol2, transport2 = self.connect()
        self.assertEqual(transport2.value(), sent)
        protocol2.dataReceived(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.response(d).code, 202)
        [line] = [formatEvent(e) for e in log if "sent again" in formatEvent(e)]
        self.assertIn("upstream_keepalive", line)

    def test_reused_lost_late_not_retried(self) -> None:
        """A reused connection lost after holding the request a while: no second send."""
        protocol, _ = self.exchange()
        d = self.client.request(b"POST", URL, None, BytesProducer(b"body"))
        self.clock.advance(RETRY_WINDOW)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, UpstreamConnectFailed)
        self.assertEqual(len(self.endpoint.attempts), 1)

    def test_fresh_lost_fails(self) -> None:
        """A new connection lost before answering fails the request, without a retry."""
        d = self.get()
        protocol, _ = self.connect()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, UpstreamConnectFailed)
        self.assertEqual(len(self.endpoint.attempts), 1)

    def test_no_second_retry(self) -> None:
        """The retry's connection lost too: the request fails, no third attempt."""
        protocol, _ = self.exchange()
        d = self.get()
        protocol.connectionLost(Failure(ConnectionDone()))
        protocol2, _ = self.connect()
        protocol2.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(d, UpstreamConnectFailed)
        self.assertEqual(len(self.endpoint.attempts), 2)

    def test_reused_lost_after_bytes_fails(self) -> None:
        """A reused connection lost after part of a head is not retried."""
        protocol, _ = self.exchange()
        d = self.get()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, UpstreamConnectFailed)
        self.assertEqual(len(self.endpoint.attempts), 1)


class BodyDeliveryTests(ClientCase):
    """deliverBody: early bytes, flow control through the body's transport, stopping."""

    def test_early_bytes_kept(self) -> None:
        """Body bytes before deliverBody are delivered once it is; the read is paused meanwhile."""
        d = self.get()
        protocol, transport = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        response = self.response(d)
        self.assertEqual(transport.producerState, "paused")
        protocol.dataReceived(b"c")  # a read already under way
        collector = self.read(response)
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(collector.body, b"abc")
        self.assertIsNone(collector.reason)
        protocol.dataReceived(b"d")
        self.assert_done(collector, b"abcd")

    def test_early_end_kept(self) -> None:
        """A whole body before deliverBody is delivered with its end; the connection is pooled."""
        d = self.get()
        protocol, transport = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        response = self.response(d)
        protocol.dataReceived(b"cd")
        self.assertEqual(transport.producerState, "producing")  # idle: read, to see a close
        self.assert_done(self.read(response), b"abcd")
        self.assert_reused(transport)

    def test_pause_resume_reach_socket(self) -> None:
        """The body transport's pause and resume pause and resume the upstream socket."""
        d = self.get()
        protocol, transport = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n")
        collector = self.read(self.response(d))
        assert collector.transport is not None
        collector.transport.pauseProducing()  # type: ignore[attr-defined]
        self.assertEqual(transport.producerState, "paused")
        collector.transport.resumeProducing()  # type: ignore[attr-defined]
        self.assertEqual(transport.producerState, "producing")

    def test_pause_in_early_data_kept(self) -> None:
        """A pause asked while early bytes are delivered is not undone by deliverBody."""
        d = self.get()
        protocol, transport = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        collector = Collector(on_data="pauseProducing")
        self.response(d).deliverBody(collector)
        self.assertEqual(collector.body, b"ab")
        self.assertEqual(transport.producerState, "paused")
        assert collector.transport is not None
        collector.transport.resumeProducing()  # type: ignore[attr-defined]
        self.assertEqual(transport.producerState, "producing")

    def test_pause_in_connection_made_kept(self) -> None:
        """A pause asked in the body protocol's connectionMade is not undone by deliverBody."""
        d = self.get()
        protocol, transport = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        collector = Collector(on_connect="pauseProducing")
        self.response(d).deliverBody(collector)
        self.assertEqual(transport.producerState, "paused")

    def test_paused_body_done_resumes_for_pool(self) -> None:
        """A body that ends while its reader paused the read: the idle connection is read."""
        d = self.get()
        protocol, transport = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n")
        collector = Collector(on_data="pauseProducing")
        self.response(d).deliverBody(collector)
        protocol.dataReceived(b"abcd")
        self.assert_done(collector, b"abcd")
        self.assertEqual(transport.producerState, "producing")
        # The reader's resume after the end reaches nothing (the connection may be reused).
        assert collector.transport is not None
        collector.transport.pauseProducing()  # type: ignore[attr-defined]
        self.assertEqual(transport.producerState, "producing")
        self.assert_reused(transport)

    def test_stop_producing_closes(self) -> None:
        """stopProducing on the body's transport aborts the connection; it is not pooled."""
        d = self.get()
        protocol, transport = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        collector = self.read(self.response(d))
        assert collector.transport is not None
        collector.transport.stopProducing()  # type: ignore[attr-defined]
        self.assertTrue(transport.disconnected)
        protocol.connectionLost(Failure(ConnectionLost()))
        assert collector.reason is not None
        self.assertTrue(collector.reason.check(ResponseFailed))
        self.assert_not_reused(transport)

    def test_stop_producing_in_last_data(self) -> None:
        """stopProducing as the body's last bytes are delivered: the connection is not pooled."""
        for raw in (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        ):
            d = self.get()
            protocol, transport = self.connect()
            protocol.dataReceived(raw)
            collector = Collector(on_data="stopProducing")
            self.response(d).deliverBody(collector)
            protocol.dataReceived(b"ok" if b"Length" in raw else b"2\r\nok\r\n0\r\n\r\n")
            self.assertTrue(transport.disconnected, raw)
            self.assertEqual(self.client._idle, [], raw)
            self.assert_not_reused(transport)
            protocol.connectionLost(Failure(ConnectionLost()))

    def test_stop_producing_in_callback(self) -> None:
        """A body stopped in the request's callback gets no more data; the connection is closed."""
        d = self.get()
        collectors: list[Collector] = []

        def discard(response: IResponse) -> None:
            collector = Collector(on_connect="stopProducing")
            collectors.append(collector)
            response.deliverBody(collector)

        d.addCallback(discard)
        protocol, transport = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        protocol.dataReceived(b"cd")
        self.assertEqual(collectors[0].body, b"")
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.client._idle, [])
        protocol.connectionLost(Failure(ConnectionLost()))
        self.assert_not_reused(transport)

    def test_whole_body_stopped_in_callback(self) -> None:
        """A body that came whole and is stopped unread: no data, and the connection is reused."""
        d = self.get()
        collector = Collector(on_connect="stopProducing")
        d.addCallback(lambda response: response.deliverBody(collector))
        protocol, transport = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nabcd")
        self.assertEqual(collector.body, b"")
        assert collector.reason is not None
        self.assertTrue(collector.reason.check(ResponseDone))
        self.assertFalse(transport.disconnecting)
        self.assert_reused(transport)

    def test_whole_body_given_whole(self) -> None:
        """A body that came with its head is the response's whole_body, and is delivered too."""
        d = self.get()
        protocol, _ = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nabcd")
        response = self.response(d)
        self.assertEqual(getattr(response, "whole_body", None), b"abcd")
        self.assertEqual(self.client._idle, [protocol])
        collector = self.read(response)
        self.assert_done(collector, b"abcd")

    def test_whole_body_with_extra_bytes(self) -> None:
        """Bytes after a body that came whole: the body is cut to its length, no reuse."""
        d = self.get()
        protocol, transport = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nabcdEXTRA")
        response = self.response(d)
        self.assertEqual(getattr(response, "whole_body", None), b"abcd")
        self.assertTrue(transport.disconnecting)
        self.assert_not_reused(transport)

    def test_stop_after_end_harmless(self) -> None:
        """Stopping a body's transport after the body ended leaves the pooled connection be."""
        d = self.get()
        protocol, transport = self.connect()
        protocol.dataReceived(OK)
        collector = self.read(self.response(d))
        assert collector.transport is not None
        collector.transport.stopProducing()  # type: ignore[attr-defined]
        self.assertFalse(transport.disconnecting)
        self.assert_reused(transport)

    def test_deliver_twice(self) -> None:
        """deliverBody may be called once."""
        d = self.get()
        protocol, _ = self.connect()
        protocol.dataReceived(OK)
        response = self.response(d)
        self.read(response)
        self.assertRaises(RuntimeError, response.deliverBody, Collector())


class CancelTests(ClientCase):
    """Cancelling a request while it connects or waits for its response head."""

    def test_cancel_connecting(self) -> None:
        """Cancelling while connecting cancels the connection attempt."""
        d = self.get()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(self.endpoint.attempts[0].cancelled)

    def test_cancel_waiting(self) -> None:
        """Cancelling while the head is awaited aborts the connection; it is not pooled."""
        d = self.get()
        protocol, transport = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(transport.disconnected)
        protocol.dataReceived(b"Content-Length: 0\r\n\r\n")  # too late: ignored
        self.assertEqual(self.client._idle, [])
        protocol.connectionLost(Failure(ConnectionLost()))
        self.assert_not_reused(transport)

    def test_cancel_reused_waiting(self) -> None:
        """Cancelling a request on a reused connection aborts it and does not retry."""
        protocol, transport = self.exchange()
        d = self.get()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(transport.disconnected)
        protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(len(self.endpoint.attempts), 1)

    def test_cancel_retrying(self) -> None:
        """Cancelling during the retry's connection attempt cancels that attempt."""
        protocol, _ = self.exchange()
        d = self.get()
        protocol.connectionLost(Failure(ConnectionDone()))
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(self.endpoint.attempts[1].cancelled)

    def test_cancel_after_head_no_effect(self) -> None:
        """Cancelling after the response arrived changes nothing."""
        d = self.get()
        protocol, transport = self.connect()
        protocol.dataReceived(OK)
        d.cancel()
        self.assert_done(self.read(self.response(d)), b"ok")
        self.assertFalse(transport.disconnecting)


class CloseTests(ClientCase):
    """close(): the idle connections are closed, and it says when they are gone."""

    def test_busy_connection_not_pooled_after_close(self) -> None:
        """A response that ends after close() leaves its connection closed, not pooled."""
        d = self.get()
        protocol = self.endpoint.attempts[0].succeed()
        self.successResultOf(self.client.close())
        protocol.dataReceived(OK)
        self.read(self.response(d))
        transport = self.endpoint.attempts[0].transport
        assert transport is not None
        self.assert_retired(transport)
        self.assertEqual(self.client._idle, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_close_idle(self) -> None:
        """close() closes the idle connections (gracefully) and fires once they are lost."""
        calls = [self.get(), self.get()]
        protocols = [a.succeed() for a in self.endpoint.attempts]
        for protocol, d in zip(protocols, calls, strict=True):
            protocol.dataReceived(OK)
            self.read(self.response(d))
        closed = self.client.close()
        for attempt in self.endpoint.attempts:
            assert attempt.transport is not None
            self.assert_retired(attempt.transport)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        protocols[0].connectionLost(Failure(ConnectionLost()))
        self.assertNoResult(closed)
        protocols[1].connectionLost(Failure(ConnectionLost()))
        self.assertIsNone(self.successResultOf(closed))

    def test_close_nothing_idle(self) -> None:
        """close() with no idle connection fires at once."""
        self.assertIsNone(self.successResultOf(self.client.close()))


class NoDelayTests(ClientCase):
    """Nagle's algorithm is off on upstream connections."""

    def test_no_delay(self) -> None:
        """A new connection turns TCP_NODELAY on in connectionMade."""
        self.get()
        tcp = FakeTCP()
        protocol = self.endpoint.attempts[0].succeed(tcp)
        self.assertTrue(tcp.no_delay)
        protocol.dataReceived(OK)


class DownstreamFieldsTests(ClientCase):
    """The fields the client finds for the relay are those downstream_response_headers gives."""

    def test_same_as_downstream_response_headers(self) -> None:
        """For assorted heads, both give the same client headers once stored."""
        heads = [
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nServer: up\r\n"
            b"Date: x\r\nx-ratelimit-remaining-requests: 9\r\nProxy-Foo: 1\r\n"
            b"Keep-Alive: timeout=5\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nConnection: X-Hop, close\r\nX-Hop: 1\r\nx-keep: 2\r\n"
            b"X-Keep: 3\r\nSet-Cookie: a\r\nset-cookie: b\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nConnection: bad name, x-a\r\nX-A: 1\r\nUpgrade: h2c\r\n"
            b"TE: trailers\r\nTrailer: x\r\nopenai-processing-ms: 12\r\nContent-Length: 0\r\n\r\n",
        ]
        for raw in heads:
            response = self.accepted(raw)
            fields = getattr(response, "downstream_fields", None)
            assert fields is not None
            mine, theirs = Headers(), Headers()
            for name, value in fields:
                mine.addRawHeader(name, value)
            for name, value in downstream_response_headers(response.headers):
                theirs.addRawHeader(name, value)
            self.assertEqual(list(mine.getAllRawHeaders()), list(theirs.getAllRawHeaders()), raw)
            self.assertNotEqual(list(mine.getAllRawHeaders()), [], raw)

    def test_name_table_bounded(self) -> None:
        """Distinct field names past the table's size are parsed all the same, not kept."""
        from oaiproxy.http import client

        self.patch(client, "_NAMES", {})
        self.patch(client, "_MAX_NAMES", 3)
        names = [b"X-Name-%d" % i for i in range(10)]
        raw = b"HTTP/1.1 200 OK\r\n%sContent-Length: 0\r\n\r\n" % b"".join(
            b"%s: v\r\n" % n for n in names
        )
        response = self.accepted(raw)
        self.assertEqual(len(client._NAMES), 3)
        self.assertEqual([n for n, _ in getattr(response, "downstream_fields", [])], names)


class _Silent(Protocol):
    """An upstream that accepts a connection and never reads from it (so never sees its
    close either: L{close} ends it)."""

    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.pauseProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = _DONE) -> None:
        self.lost.callback(None)

    def close(self) -> Deferred[None]:
        """Abort the connection; fires once it is lost (its socket closed)."""
        self.transport.abortConnection()  # type: ignore[union-attr]
        return self.lost


class LargeBodyCopyTests(TestCase):
    """A body over 64 KiB is written without a copy of it being made, over real TCP too."""

    @inlineCallbacks
    def test_large_body_not_copied_on_partial_send(self) -> Any:
        """
        Over a real TCP connection whose peer does not read, the part of a 16 MiB body the
        socket did not take is buffered as the body itself (or a view), not as a fresh copy.
        """
        from twisted.internet import reactor

        from oaiproxy.http import client as client_module

        servers: list[_Silent] = []

        def silent() -> _Silent:
            servers.append(_Silent())
            return servers[-1]

        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(silent)
        )
        self.addCleanup(port.stopListening)
        self.addCleanup(lambda: DeferredList([server.close() for server in servers]))
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        origin = b"http://127.0.0.1:%d" % (port.getHost().port,)
        client = UpstreamClient(reactor, origin, endpoint, idle_connections=1, keepalive=5.0)
        body = b"x" * (16 * 1024 * 1024)
        begun: Deferred[Any] = Deferred()
        begin = client_module._Connection.begin

        def spy(connection: Any, call: Any, *, reused: bool) -> None:
            begin(connection, call, reused=reused)
            begun.callback(connection.transport)

        self.patch(client_module._Connection, "begin", spy)
        d = client.request(b"POST", origin + b"/v1/files", Headers(), BytesProducer(body))
        d.addErrback(lambda _: None)
        self.addCleanup(d.cancel)
        transport = yield begun
        pieces = [transport.dataBuffer, *transport._tempDataBuffer]
        big = [p for p in pieces if len(p) > 1024 * 1024]
        self.assertTrue(big, "the whole body was sent at once: the test proves nothing")
        self.assertTrue(
            all(p is body or (isinstance(p, memoryview) and p.obj is body) for p in big),
            f"a copy of {max(len(p) for p in big)} bytes of the body is buffered",
        )


class TrickledHeadTests(SynchronousTestCase):
    """The response head parser, fed a head a byte per read (a broken or hostile upstream)."""

    def test_trickled_head_scanned_linearly(self) -> None:
        """
        A 64 KiB head arriving one byte per read is scanned for its end a bounded number of
        times per byte, not once per read over all that came before (seconds of reactor
        time, for one request, during which no other client would be served).
        """
        from oaiproxy.http import client as client_module

        scanned = [0]
        find = client_module._find_head_end

        def counting(data: bytes | bytearray, start: int = 0) -> tuple[int, int]:
            scanned[0] += len(data) - start
            return find(data, start)

        self.patch(client_module, "_find_head_end", counting)
        endpoint = FakeEndpoint()
        client = UpstreamClient(
            MemoryReactorClock(), ORIGIN, endpoint, idle_connections=1, keepalive=5.0
        )
        d = client.request(b"GET", ORIGIN + b"/v1/models")
        protocol = endpoint.attempts[-1].succeed()
        head = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 60000 + b"\r\nContent-Length: 0\r\n\r\n"
        for i in range(len(head)):
            protocol.dataReceived(head[i : i + 1])
        response = self.successResultOf(d)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"x-big"), [b"a" * 60000])
        self.assertLess(scanned[0], 16 * len(head), f"{scanned[0]} bytes scanned")
