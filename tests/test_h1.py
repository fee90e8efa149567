"""HTTP/1.1 requests refused before they are forwarded: OpenAI-shaped JSON, then close."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers

from oaiproxy.config import Limits
from oaiproxy.http import h1server
from oaiproxy.http.h1server import H1Channel
from tests.support.fakes import (
    FakeResponse,
    FakeTCP,
    ProxyHarness,
    make_harness,
    parse_response,
    post,
)

_BODY = b'{"model":"m","messages":[]}'


class RefusalTests(SynchronousTestCase):
    """Malformed or oversized heads get a JSON error, a request id and a closed connection."""

    def setUp(self) -> None:
        self.harness = make_harness(limits=Limits(max_headers=10, max_header_bytes=2048))

    def refused(
        self, raw: bytes, status: int, code: str, harness: ProxyHarness | None = None
    ) -> dict[str, Any]:
        """Send C{raw}; assert the answer and that nothing went upstream."""
        harness = harness or self.harness
        _, transport = harness.send(raw)
        return self.assert_refused(transport, status, code, harness)

    def assert_refused(
        self, transport: StringTransport, status: int, code: str, harness: ProxyHarness
    ) -> dict[str, Any]:
        got, headers, body = parse_response(transport.value())
        self.assertEqual(got, status, transport.value()[:300])
        self.assertEqual(headers[b"content-type"], [b"application/json"])
        self.assertEqual(len(headers[b"x-request-id"][0]), 32)
        self.assertEqual(headers[b"connection"], [b"close"])
        error = json.loads(body)["error"]
        self.assertEqual(set(error), {"message", "type", "param", "code"})
        self.assertEqual((error["type"], error["code"]), ("invalid_request_error", code))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(harness.sent(), [])
        return dict(error)

    def test_valid_request_forwarded(self) -> None:
        """The baseline: a valid request goes upstream (so the refusals below mean something)."""
        self.harness.send(post(b"/v1/chat/completions", _BODY))
        self.assertEqual(len(self.harness.sent()), 1)

    def test_malformed_request_line(self) -> None:
        """A request line that is not METHOD TARGET VERSION."""
        self.refused(b"GET /v1/models\r\nHost: x\r\n\r\n", 400, "invalid_request")

    def test_header_without_colon(self) -> None:
        """A header line without a colon."""
        self.refused(b"GET /v1/models HTTP/1.1\r\nHost x\r\n\r\n", 400, "invalid_request")

    def test_nul_in_header_value(self) -> None:
        """NUL in a header value."""
        self.refused(
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400, "invalid_request"
        )

    def test_bare_lf(self) -> None:
        """
        A head with LF line ends (no CR) is refused at once, wherever the LF is, instead of
        waiting for the head deadline.
        """
        for raw in (
            b"GET /v1/models HTTP/1.1\nHost: x\n\n",
            b"GET /v1/models HTTP/1.1\r\nHost: x\n\r\n",
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-A: 1\n",
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-B: a\rb\r\n\r\n",
            # A CR before a CRLF, a LF after one: removing the CRLFs leaves a CRLF behind.
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\r\n\nX-C: 1\r\n\r\n",
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\r\n\r\n",
        ):
            harness = make_harness()
            error = self.refused(raw, 400, "invalid_request", harness)
            self.assertIn("bare", error["message"])

    def test_pipelined_body_with_lf_after_a_local_answer(self) -> None:
        """
        A request the proxy answers itself (400 invalid JSON), then in the same write a valid
        one whose body has LFs (pretty-printed JSON): the second is forwarded, the
        connection stays open. (Its body was read as a head with bare LFs: 400 and close.)
        """
        harness = make_harness()
        pretty = b'{\n "model": "m",\n "messages": []\n}'
        _, transport = harness.send(
            post(b"/v1/chat/completions", b'{"a":1') + post(b"/v1/chat/completions", pretty)
        )
        self.assertEqual(parse_response(transport.value())[0], 400)
        self.assertEqual([s.body for s in harness.sent()], [pretty])
        self.assertFalse(transport.disconnecting)

    def test_pipelined_head_with_bare_lf_refused(self) -> None:
        """A bare LF in the head of a pipelined request is still refused."""
        harness = make_harness()
        _, transport = harness.send(
            post(b"/v1/chat/completions", b'{"a":1') + b"GET /v1/models HTTP/1.1\nHost: x\n\n"
        )
        raw = transport.value()
        self.assertIn(b"bare", raw)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(harness.sent(), [])

    def test_connection_close_among_options(self) -> None:
        """
        C{close} in any Connection field, among comma-separated options and in any case,
        ends the connection after the answer (RFC 9110 section 7.6.1); a pipelined request
        after it is not read.
        """
        for fields in (
            b"Connection: close, te\r\n",
            b"Connection: TE,Close\r\n",
            b"Connection: keep-alive\r\nConnection: close\r\n",
        ):
            with self.subTest(fields=fields):
                harness = make_harness()
                _, transport = harness.send(
                    b"GET /healthz HTTP/1.1\r\nHost: x\r\n%s\r\n" % fields
                    + b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
                )
                status, headers, _ = parse_response(transport.value())
                self.assertEqual((status, headers.get(b"connection")), (200, [b"close"]))
                self.assertTrue(transport.disconnecting)
                self.assertEqual(harness.sent(), [])

    def test_http10_answered_as_http11_then_closed(self) -> None:
        """
        An HTTP/1.0 request gets an HTTP/1.1 status line (RFC 9110 section 6.2), with
        C{Connection: close}, no chunked coding, and the connection closed after it.
        """
        harness = make_harness()
        _, transport = harness.send(b"GET /healthz HTTP/1.0\r\n\r\n")
        raw = transport.value()
        self.assertTrue(raw.startswith(b"HTTP/1.1 200 OK\r\n"), raw[:100])
        status, headers, body = parse_response(raw)
        self.assertEqual((status, headers[b"connection"]), (200, [b"close"]))
        self.assertNotIn(b"transfer-encoding", headers)
        self.assertEqual(json.loads(body), {"status": "ok"})
        self.assertTrue(transport.disconnecting)

    def test_http10_stream_read_to_the_close(self) -> None:
        """A body of unknown length to an HTTP/1.0 client is not chunked: it ends at the close."""
        harness = make_harness()
        _, transport = harness.send(
            b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(_BODY), _BODY)
        )
        [sent] = harness.sent()
        response = FakeResponse(200, {b"content-type": [b"text/event-stream"]})
        sent.deferred.callback(response)
        response.deliver(b"data: 1\n\n")
        response.end()
        raw = transport.value()
        self.assertTrue(raw.startswith(b"HTTP/1.1 200 OK\r\n"), raw[:100])
        head, _, body = raw.partition(b"\r\n\r\n")
        self.assertIn(b"\r\nConnection: close", head)
        self.assertNotIn(b"Transfer-Encoding", head)
        self.assertEqual(body, b"data: 1\n\n")

    def test_keep_alive_options_keep_the_connection(self) -> None:
        """Connection options without close keep an HTTP/1.1 connection open."""
        harness = make_harness()
        _, transport = harness.send(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, te\r\n\r\n"
        )
        self.assertEqual(parse_response(transport.value())[0], 200)
        self.assertFalse(transport.disconnecting)

    def test_obs_fold(self) -> None:
        """Obsolete line folding is refused, not unfolded as Twisted would."""
        error = self.refused(
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-A: a\r\n  continued\r\n\r\n",
            400,
            "invalid_request",
        )
        self.assertIn("folding", error["message"])

    def test_content_length_and_transfer_encoding(self) -> None:
        """Both framings at once (request smuggling's classic)."""
        raw = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        )
        self.refused(raw, 400, "invalid_request")

    def test_transfer_encoding_identity(self) -> None:
        """C{identity} is no transfer coding (RFC 9112); Twisted would ignore it."""
        raw = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(_BODY), _BODY)
        )
        self.refused(raw, 400, "invalid_request")

    def test_transfer_encoding_list(self) -> None:
        """A list of codings, even ending in chunked, is refused."""
        raw = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"
        )
        self.refused(raw, 400, "invalid_request")

    def test_bad_content_lengths(self) -> None:
        """Duplicate, signed, hex or empty Content-Length."""
        for value in [b"5\r\nContent-Length: 5", b"+5", b"0x5", b"-1", b"", b"5, 5"]:
            harness = make_harness()
            raw = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %s\r\n\r\n"
            self.refused(raw % value + b"hello", 400, "invalid_request", harness)

    def test_huge_content_length(self) -> None:
        """A Content-Length of thousands of digits (past int()'s limit) is a 400, not a crash."""
        raw = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %s\r\n\r\n"
        self.refused(raw % (b"9" * 1500), 400, "invalid_request")

    def test_chunked_in_http10(self) -> None:
        """Chunked framing in an HTTP/1.0 request is faulty framing (RFC 9112 section 6.1)."""
        raw = (
            b"POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(_BODY), _BODY)
        )
        self.refused(raw, 400, "invalid_request")

    def test_malformed_chunked_body(self) -> None:
        """A chunked request body with bad framing is a JSON 400, not forwarded."""
        raw = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"\r\n5\r\n{}{}{XX\r\n"
        )
        self.refused(raw, 400, "invalid_request")

    def test_chunked_body_trailers_bounded(self) -> None:
        """Request trailers a byte at a time are counted, not rescanned; 64 KiB is the cap."""
        proto, transport = self.harness.send(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"\r\n1\r\n{\r\n0\r\n"
        )
        for _ in range(70):
            proto.dataReceived(b"t" * 1000)
        self.assert_refused(transport, 400, "invalid_request", self.harness)

    def test_refused_connection_aborted_if_not_closed(self) -> None:
        """A refused connection that does not close (peer not reading) is aborted later."""
        _, transport = self.harness.send(b"GET /v1/models HTTP/1.1\r\nX-A: a\r\n b\r\n\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected)
        self.harness.clock.advance(15)
        self.assertTrue(transport.disconnected)

    def test_expect_continue(self) -> None:
        """
        C{Expect: 100-continue} is answered by the proxy, the body then goes upstream, and
        the Expect header does not.
        """
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(_BODY)
        )
        proto, transport = self.harness.send(head)
        self.assertEqual(transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        proto.dataReceived(_BODY)
        (sent,) = self.harness.sent()
        self.assertEqual(sent.body, _BODY)
        self.assertIsNone(sent.headers.getRawHeaders(b"expect"))

    def test_expect_continue_without_body(self) -> None:
        """No 100 Continue for a request with no body to come (as over HTTP/2)."""
        _, transport = self.harness.send(
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n"
        )
        self.assertEqual(transport.value(), b"")
        self.assertEqual(len(self.harness.sent()), 1)

    def test_expect_continue_over_cap(self) -> None:
        """A body known to be over the cap gets its 413 alone: no 100 Continue after it."""
        harness = make_harness(limits=Limits(max_body_bytes=1024))
        _, transport = harness.send(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        raw = transport.value()
        self.assertTrue(raw.startswith(b"HTTP/1.1 413 "), raw[:40])
        self.assertNotIn(b"100 Continue", raw)
        self.assertTrue(raw.endswith(b"}}"), raw[-40:])

    def test_chunked_body_accepted(self) -> None:
        """Transfer-Encoding: chunked alone is fine (any case)."""
        raw = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n"
            b"\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(_BODY), _BODY)
        )
        self.harness.send(raw)
        self.assertEqual([s.body for s in self.harness.sent()], [_BODY])

    def test_too_many_headers(self) -> None:
        """More header fields than max_headers: 431."""
        extra = b"".join(b"X-H%d: v\r\n" % i for i in range(10))
        self.refused(
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\n%s\r\n" % extra,
            431,
            "request_header_fields_too_large",
        )

    def test_max_headers_allowed(self) -> None:
        """Exactly max_headers header fields is fine."""
        extra = b"".join(b"X-H%d: v\r\n" % i for i in range(9))
        self.harness.send(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n%s\r\n" % extra)
        self.assertEqual(len(self.harness.sent()), 1)

    def test_head_too_large(self) -> None:
        """A head over max_header_bytes in many lines: 431."""
        extra = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 400) for i in range(6))
        self.refused(
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\n%s\r\n" % extra,
            431,
            "request_header_fields_too_large",
        )

    def test_one_line_too_long(self) -> None:
        """One line over max_header_bytes (Twisted would close without a word): 431."""
        self.refused(
            b"GET /v1/models HTTP/1.1\r\nX-Long: %s\r\n\r\n" % (b"v" * 3000),
            431,
            "request_header_fields_too_large",
        )

    def test_one_line_too_long_no_end(self) -> None:
        """A line over the limit is refused before its end arrives."""
        _, transport = self.harness.send(b"GET /v1/models HTTP/1.1\r\nX-Long: " + b"v" * 3000)
        self.assert_refused(transport, 431, "request_header_fields_too_large", self.harness)

    def test_nothing_read_after_refusal(self) -> None:
        """Bytes after a refused head (a smuggled request) are ignored."""
        proto, transport = self.harness.send(
            b"GET /v1/models HTTP/1.1\r\nX-A: a\r\n b\r\n\r\n"
            + post(b"/v1/chat/completions", _BODY)
        )
        proto.dataReceived(post(b"/v1/chat/completions", _BODY))
        self.assert_refused(transport, 400, "invalid_request", self.harness)
        self.assertEqual(transport.value().count(b"HTTP/1.1 "), 1)


class SlowClientTests(SynchronousTestCase):
    """Heads and bodies that arrive too slowly get 408; idle connections just close."""

    def setUp(self) -> None:
        self.harness = make_harness(limits=Limits(header_timeout=10.0, client_idle_timeout=60.0))
        self.clock = self.harness.clock

    def status(self, transport: StringTransport) -> tuple[int, dict[str, Any]]:
        status, _, body = parse_response(transport.value())
        return status, json.loads(body)["error"]

    def test_slowloris(self) -> None:
        """A head trickled a byte at a time (never idle) is cut at header_timeout with 408."""
        proto, transport = self.harness.connect()
        raw = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
        for byte in raw[:25]:
            proto.dataReceived(bytes([byte]))
            self.clock.advance(0.39)
        self.assertEqual(transport.value(), b"")
        for byte in raw[25:]:
            proto.dataReceived(bytes([byte]))
            self.clock.advance(0.39)
            if transport.value():
                break
        status, error = self.status(transport)
        self.assertEqual((status, error["code"]), (408, "request_timeout"))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.harness.sent(), [])
        # Only the abort timer is left, and the connection closing cancels it.
        self.assertEqual([c.func.__name__ for c in self.clock.getDelayedCalls()], ["_abort"])  # type: ignore[attr-defined]
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_trickled_head_checked_per_line(self) -> None:
        """
        A head sent a byte at a time is checked when a line ends, not on every byte (which
        rescanned all the head so far each time: quadratic in its size).
        """
        proto, _ = self.harness.connect()
        channel: Any = proto._channel
        checks: list[None] = []
        real = channel._check_partial_head

        def counting(buffer: bytes) -> None:
            checks.append(None)
            real(buffer)

        channel._check_partial_head = counting
        fields = b"".join(b"X-Field-%02d: %s\r\n" % (i, b"v" * 30) for i in range(20))
        raw = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n"
        for byte in raw:
            proto.dataReceived(bytes([byte]))
        self.assertEqual(len(self.harness.sent()), 1)
        # One check per CR and per LF at most, out of some 900 reads.
        self.assertLessEqual(len(checks), 2 * raw.count(b"\n"))

    def test_head_in_time(self) -> None:
        """A head completed just inside header_timeout is served."""
        proto, _ = self.harness.connect()
        raw = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
        proto.dataReceived(raw[:5])
        self.clock.advance(9.9)
        proto.dataReceived(raw[5:])
        self.clock.advance(1)
        self.assertEqual(len(self.harness.sent()), 1)

    def test_deadline_per_request_head(self) -> None:
        """Time on a keep-alive connection between requests does not count against a head."""
        proto, transport = self.harness.connect()
        proto.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        self.clock.advance(50)
        proto.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 "), 2)
        self.assertFalse(transport.disconnecting)

    def test_blank_line_between_requests(self) -> None:
        """An empty line after a request is ignored: no 408 later, just the idle close."""
        proto, transport = self.harness.connect()
        proto.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        proto.dataReceived(b"\r\n")
        transport.clear()
        self.clock.advance(11)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(50)
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)

    def test_partial_head_after_answered_request(self) -> None:
        """A partial head read together with a request answered at once has its deadline."""
        proto, transport = self.harness.connect()
        proto.dataReceived(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nX-Slow: a"
        )
        transport.clear()
        self.clock.advance(11)
        status, error = self.status(transport)
        self.assertEqual((status, error["code"]), (408, "request_timeout"))

    def test_partial_request_line(self) -> None:
        """A request line that never ends gets 408 at header_timeout."""
        proto, transport = self.harness.connect()
        proto.dataReceived(b"GET /v1/mod")
        self.clock.advance(5)
        proto.dataReceived(b"els")
        self.clock.advance(5.1)
        status, error = self.status(transport)
        self.assertEqual((status, error["code"]), (408, "request_timeout"))

    def test_slow_body(self) -> None:
        """A body that stops arriving for the idle timeout gets 408."""
        proto, transport = self.harness.connect()
        raw = post(b"/v1/chat/completions", _BODY)
        proto.dataReceived(raw[:-5])
        self.clock.advance(59)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(2)
        status, error = self.status(transport)
        self.assertEqual((status, error["code"]), (408, "request_timeout"))
        self.assertEqual(self.harness.sent(), [])

    def test_idle_keepalive_closed_silently(self) -> None:
        """
        An idle keep-alive connection is closed without an answer, then aborted if it is
        not gone; routine, so logged at debug level only.
        """
        proto, transport = self.harness.connect()
        proto.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        transport.clear()
        log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]  # annotated for unittest.TestCase
        self.clock.advance(61)
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)
        self.assertEqual([e for e in log if e["log_level"] > LogLevel.debug], [])
        self.clock.advance(15)  # Twisted's abortTimeout
        self.assertTrue(transport.disconnected)

    def test_waiting_on_upstream_not_timed_out(self) -> None:
        """A request waiting on its upstream is not cut by the idle or head deadlines."""
        proto, transport = self.harness.connect()
        proto.dataReceived(post(b"/v1/chat/completions", _BODY))
        self.assertEqual(len(self.harness.sent()), 1)
        self.clock.advance(120)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(transport.value(), b"")


class WriteHeadersTests(SynchronousTestCase):
    """The response head goes out as one string, byte for byte what Twisted writes."""

    def test_same_bytes_as_twisted(self) -> None:
        headers = Headers(
            {b"content-type": [b"application/json"], b"x-a": [b"1", b"2"], b"x-empty": [b""]}
        )
        written = []
        channels: list[Any] = [H1Channel(MemoryReactorClock()), HTTPChannel()]
        for channel in channels:
            transport = StringTransport()
            channel.makeConnection(transport)
            channel.writeHeaders(b"HTTP/1.1", b"200", b"OK", headers)
            written.append(transport.value())
            channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(written[0], written[1])
        self.assertTrue(written[0].startswith(b"HTTP/1.1 200 OK\r\n"))

    def test_pairs_still_sanitised(self) -> None:
        """The old list-of-pairs form still goes through Twisted's sanitising path."""
        channel = H1Channel(MemoryReactorClock())
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.writeHeaders(b"HTTP/1.1", b"200", b"OK", [(b"x-a", b"b\r\nInjected: 1")])
        self.assertNotIn(b"\r\nInjected", transport.value())
        channel.connectionLost(Failure(ConnectionDone()))


class LocalAddressTests(SynchronousTestCase):
    """The connection's local address is asked of the transport once, not per request."""

    def test_get_host_once(self) -> None:
        """Three keep-alive requests on one connection: one getHost call on the transport."""
        harness = make_harness()
        proto, transport = harness.connect()
        calls: list[object] = []
        real = transport.getHost

        def counting() -> Any:
            calls.append(None)
            return real()

        self.patch(transport, "getHost", counting)
        for _ in range(3):
            proto.dataReceived(post(b"/v1/embeddings", b"{}"))
            harness.sent()[-1].deferred.errback(Failure(ConnectionDone()))
        self.assertEqual(len(harness.sent()), 3)
        self.assertEqual(len(calls), 1)


_BIG = b'{"model":"m","messages":[],"x":"' + b"a" * 9000 + b'"}'


class ConnectionTests(SynchronousTestCase):
    """The channel's hold on its connection: reading, Nagle, closing, its own memory."""

    def answer(self, harness: ProxyHarness, index: int) -> None:
        response = FakeResponse(200, {b"content-type": [b"text/plain"]}, length=2)
        harness.sent()[index].deferred.callback(response)
        response.deliver(b"ok")
        response.end()

    def test_reading_resumed_once_answered(self) -> None:
        """
        Reading stopped behind a request (too much pipelined, or a client not reading its
        answers) starts again once nothing holds it: every pipelined request is read.
        """
        harness = make_harness()
        proto, transport = harness.connect()
        proto.dataReceived(post(b"/v1/chat/completions", _BODY))
        proto.dataReceived(post(b"/v1/chat/completions", _BIG) * 2)
        self.assertEqual(transport.producerState, "paused")
        assert transport.producer is not None
        transport.producer.pauseProducing()  # the client's receive buffer is full
        self.answer(harness, 0)
        transport.producer.resumeProducing()  # ... and drained, while request 2 waits
        self.answer(harness, 1)
        self.answer(harness, 2)
        self.assertEqual(len(harness.sent()), 3)
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 "), 3)

    def test_nagle_off(self) -> None:
        """TCP_NODELAY on every accepted connection, as Twisted's channel set it."""
        harness = make_harness()
        protocol = harness.site.buildProtocol(None)
        assert protocol is not None
        transport = FakeTCP()
        protocol.makeConnection(transport)
        self.assertTrue(transport.no_delay)

    def test_early_413_closes_and_aborts(self) -> None:
        """
        A chunked body over the cap is answered 413 at once; the channel stops being the
        connection's producer and aborts it if it has not gone within abortTimeout.
        """
        harness = make_harness(limits=Limits(max_body_bytes=1000))
        proto, transport = harness.send(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"\r\n7d0\r\n" + b"a" * 2000 + b"\r\n"
        )
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertIsNone(transport.producer)
        harness.clock.advance(15)
        self.assertTrue(transport.disconnected)
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(harness.clock.getDelayedCalls(), [])

    def test_long_names_not_kept(self) -> None:
        """
        No table of header names keeps a long one (clients choose them): the channel's,
        the upstream translation's, nor Twisted's encoder's.
        """
        from twisted.web.http_headers import _nameEncoder

        from oaiproxy.http import headers

        long_name = b"X-" + b"n" * 100
        harness = make_harness()
        harness.send(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n%s: 1\r\n\r\n" % long_name)
        [sent] = harness.sent()
        self.assertNotIn(long_name, h1server._NAMES)
        self.assertIn(b"Host", h1server._NAMES)
        self.assertNotIn(long_name, headers._UP_NAMES)
        self.assertNotIn(long_name, _nameEncoder._canonicalHeaderCache)
        self.assertEqual(sent.headers.getRawHeaders(long_name), [b"1"])  # forwarded

    def test_head_at_its_limit_read_in_pieces(self) -> None:
        """A head of exactly max_header_bytes is taken whether it comes whole or byte by byte."""
        fill = b"X-Fill: "
        start = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
        counted = len(start) - 4 + len(fill)
        raw = start + fill + b"v" * (2048 - counted) + b"\r\n\r\n"
        for pieces in ([raw], [bytes([b]) for b in raw]):
            harness = make_harness(limits=Limits(max_header_bytes=2048))
            proto, _ = harness.connect()
            for piece in pieces:
                proto.dataReceived(piece)
            self.assertEqual(len(harness.sent()), 1, len(pieces))
        harness = make_harness(limits=Limits(max_header_bytes=2048))
        _, transport = harness.send(raw.replace(b"X-Fill: ", b"X-Fill: w"))
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 431 "))

    def test_abort_timer_gone_with_the_connection(self) -> None:
        """A transport that reports its loss at once leaves no abort timer behind."""
        harness = make_harness()
        proto, transport = harness.connect()

        def lose() -> None:
            transport.disconnecting = True
            proto.connectionLost(Failure(ConnectionDone()))

        transport.loseConnection = lose  # type: ignore[method-assign]
        proto.dataReceived(b"GET /v1/models HTTP/1.1\r\nX: a\r\n b\r\n\r\n")
        self.assertIn(b"folding", transport.value())
        self.assertEqual(harness.clock.getDelayedCalls(), [])
