"""
The exchange and the relay, in memory: forwarding, failover, deadlines on a fake clock,
backpressure, cancellation in every window, and upstream drops.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import ResponseFailed

from oaiproxy.config import Deadlines, Limits
from oaiproxy.http.chunked import MalformedChunkedData
from oaiproxy.http.exchange import Exchange
from oaiproxy.http.forwarder import BytesProducer
from oaiproxy.http.relay import downstream_backlog
from tests.support.fakes import (
    FakeResponse,
    ProxyHarness,
    make_harness,
    parse_response,
    post,
    upstream_config,
)


def client_buffer_full(transport: StringTransport) -> None:
    """What the TCP transport does when its send buffer fills: pause its producer."""
    assert transport.producer is not None
    transport.producer.pauseProducing()


def client_buffer_drained(transport: StringTransport) -> None:
    """What the TCP transport does when its send buffer drains."""
    assert transport.producer is not None
    transport.producer.resumeProducing()


CHAT = json.dumps({"model": "m", "messages": [], "stream": True}).encode()
SSE = {b"content-type": [b"text/event-stream"]}
JSON = {b"content-type": [b"application/json"]}


def logged(testcase: SynchronousTestCase) -> Any:
    """The log lines emitted from now on in C{testcase}, formatted: a function to call."""
    events = EventLoggingObserver.createWithCleanup(testcase, globalLogPublisher)  # type: ignore[arg-type]  # annotated for unittest.TestCase
    return lambda: [formatEvent(event) for event in events]


def answered_stream(h: ProxyHarness) -> tuple[Any, StringTransport, FakeResponse]:
    """A streamed chat request through the proxy, its upstream answering 200 event-stream."""
    proto, transport = h.send(post(b"/v1/chat/completions", CHAT))
    response = FakeResponse(200, SSE)
    h.sent()[-1].deferred.callback(response)
    return proto, transport, response


class ForwardingTests(SynchronousTestCase):
    """What goes upstream and what comes back."""

    def test_request_translated_upstream(self) -> None:
        """Path and query map onto the base URL; Host is the upstream's; body is relayed."""
        h = make_harness()
        h.send(post(b"/v1/chat/completions?x=1", CHAT, b"Connection: keep-alive, X-Hop\r\n"))
        (sent,) = h.sent()
        self.assertEqual(sent.method, b"POST")
        self.assertEqual(sent.uri, b"http://a.invalid:9000/v1/chat/completions?x=1")
        self.assertEqual(sent.headers.getRawHeaders(b"host"), [b"a.invalid:9000"])
        self.assertEqual(sent.body, CHAT)
        self.assertIsNone(sent.headers.getRawHeaders(b"connection"))
        self.assertEqual(sent.headers.getRawHeaders(b"x-forwarded-for"), [b"10.0.0.7"])
        self.assertEqual(sent.headers.getRawHeaders(b"x-forwarded-proto"), [b"http"])
        self.assertEqual(sent.headers.getRawHeaders(b"accept-encoding"), [b"identity"])

    def test_non_streamed_response_relayed_with_length(self) -> None:
        """A JSON answer comes back byte for byte with a recomputed Content-Length."""
        h = make_harness()
        _, transport = h.send(post(b"/v1/embeddings", b'{"input": "x"}'))
        response = FakeResponse(
            200,
            {b"content-type": [b"application/json"], b"connection": [b"close"]},
            length=11,
        )
        h.sent()[0].deferred.callback(response)
        response.deliver(b'{"ok": true')
        response.deliver(b"}")
        response.end()
        status, headers, body = parse_response(transport.value())
        self.assertEqual((status, body), (200, b'{"ok": true}'))
        self.assertEqual(headers[b"content-length"], [b"11"])
        self.assertNotIn(b"connection", headers)
        self.assertNotIn(b"server", headers)
        self.assertEqual(len(headers[b"x-request-id"][0]), 32)
        # The harness clock is at 0: the Date header is the site clock's, once.
        self.assertEqual(headers[b"date"], [b"Thu, 01 Jan 1970 00:00:00 GMT"])

    def test_whole_body_written_at_once(self) -> None:
        """A body that came whole with its head is written and finished with no producer."""
        h = make_harness()
        proto, transport = h.send(post(b"/v1/embeddings", b'{"input": "x"}'))
        response = FakeResponse(200, {b"content-type": [b"application/json"]}, length=12)
        response.whole_body = b'{"ok": true}'  # type: ignore[attr-defined]
        h.sent()[0].deferred.callback(response)
        # deliverBody was not needed: the relay was never a protocol, nor a producer.
        self.assertIsNone(response.protocol)
        status, headers, body = parse_response(transport.value())
        self.assertEqual((status, body), (200, b'{"ok": true}'))
        self.assertEqual(headers[b"content-length"], [b"12"])
        pending = [repr(c) for c in h.clock.getDelayedCalls() if c.active()]
        self.assertEqual([c for c in pending if "Exchange" in c or "Relay" in c], [])
        # The connection serves the next request.
        transport.clear()
        proto.dataReceived(post(b"/v1/embeddings", b'{"input": "y"}'))
        self.assertEqual(len(h.sent()), 2)

    def test_reason_phrase_relayed_only_if_clean(self) -> None:
        """
        An upstream reason phrase goes back as it is; one with a bare CR or another control
        (which Twisted's client parser keeps) is replaced by the standard phrase, so nothing
        after it can pass for a header.
        """
        for phrase, expected in [
            (b"All Good", b"HTTP/1.1 200 All Good\r\n"),
            (b"OK\rSet-Cookie: session=evil", b"HTTP/1.1 200 OK\r\n"),
            (b"OK\x00x", b"HTTP/1.1 200 OK\r\n"),
            (b"Caf\xc3\xa9\tok", b"HTTP/1.1 200 Caf\xc3\xa9\tok\r\n"),
        ]:
            h = make_harness()
            _, transport = h.send(post(b"/v1/embeddings", b'{"input": "x"}'))
            response = FakeResponse(200, {}, length=2)
            response.phrase = phrase
            h.sent()[0].deferred.callback(response)
            response.deliver(b"{}")
            response.end()
            self.assertTrue(transport.value().startswith(expected), phrase)
            self.assertNotIn(b"evil", transport.value())

    def test_date_header_follows_the_clock(self) -> None:
        """The Date header is formatted from the site's clock, anew each second."""
        h = make_harness()
        h.clock.advance(86_400 * 365 + 61.5)
        _, transport = h.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        h.clock.advance(1)
        _, later = h.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        first = parse_response(transport.value())[1][b"date"]
        second = parse_response(later.value())[1][b"date"]
        self.assertEqual(first, [b"Fri, 01 Jan 1971 00:01:01 GMT"])
        self.assertEqual(second, [b"Fri, 01 Jan 1971 00:01:02 GMT"])

    def test_no_content_has_no_length(self) -> None:
        """A 204 from upstream goes back as 204 without a body or Content-Length."""
        h = make_harness()
        _, transport = h.send(b"DELETE /v1/files/f HTTP/1.1\r\nHost: x\r\n\r\n")
        response = FakeResponse(204, {}, length=0)
        h.sent()[0].deferred.callback(response)
        response.end()
        status, headers, body = parse_response(transport.value())
        self.assertEqual((status, body), (204, b""))
        self.assertNotIn(b"content-length", headers)

    def test_head_written_only_with_first_byte(self) -> None:
        """Nothing goes downstream until the first body byte, so errors can still replace it."""
        h = make_harness()
        _, transport, response = answered_stream(h)
        self.assertEqual(transport.value(), b"")
        response.deliver(b"data: 1\n\n")
        h.clock.advance(0)
        self.assertIn(b"HTTP/1.1 200", transport.value())

    def test_sse_relayed_unbuffered(self) -> None:
        """Each SSE chunk is written in the reactor turn it arrives, with no-buffering headers."""
        h = make_harness()
        _, transport, response = answered_stream(h)
        response.deliver(b"data: one\n\n")
        h.clock.advance(0)
        first = transport.value()
        self.assertIn(b"data: one\n\n", first)
        response.deliver(b"data: two\n\n")
        h.clock.advance(0)
        self.assertIn(b"data: two\n\n", transport.value()[len(first) :])
        response.deliver(b"data: [DONE]\n\n")
        response.end()
        _status, headers, body = parse_response(transport.value())
        self.assertEqual(body, b"data: one\n\ndata: two\n\ndata: [DONE]\n\n")
        self.assertEqual(headers[b"x-accel-buffering"], [b"no"])
        self.assertNotIn(b"content-length", headers)

    def test_http11_writes_at_once(self) -> None:
        """Over HTTP/1.1 each upstream read is written in the same turn (the socket joins them)."""
        h = make_harness()
        _, transport, response = answered_stream(h)
        response.deliver(b"data: 1\n\n")
        self.assertIn(b"data: 1\n\n", transport.value())

    def test_request_id_passed_through(self) -> None:
        """A client's x-request-id goes upstream and comes back."""
        h = make_harness()
        _, transport = h.send(post(b"/v1/embeddings", b"{}", b"X-Request-Id: abc-123\r\n"))
        self.assertEqual(h.sent()[0].headers.getRawHeaders(b"x-request-id"), [b"abc-123"])
        response = FakeResponse(200, {}, length=0)
        h.sent()[0].deferred.callback(response)
        response.end()
        _, headers, _ = parse_response(transport.value())
        self.assertEqual(headers[b"x-request-id"], [b"abc-123"])

    def test_upstreams_own_request_id_passed_through(self) -> None:
        """
        An upstream that answers with its own x-request-id (api.openai.com does) has it
        passed to the client untouched (shared/BAD-INPUTS.md), after the proxy's went up.
        """
        h = make_harness()
        _, transport = h.send(post(b"/v1/embeddings", b"{}"))
        [sent] = h.sent()[0].headers.getRawHeaders(b"x-request-id", [])
        response = FakeResponse(200, {b"x-request-id": [b"req_upstream"]}, length=0)
        h.sent()[0].deferred.callback(response)
        response.end()
        _, headers, _ = parse_response(transport.value())
        self.assertNotEqual(sent, b"req_upstream")
        self.assertEqual(headers[b"x-request-id"], [b"req_upstream"])

    def test_upstream_key_injected(self) -> None:
        """With an upstream key, the client's Authorization is replaced, never passed on."""
        h = make_harness([upstream_config("a", key_env="K")], keys={"a": b"sk-upstream"})
        h.send(post(b"/v1/embeddings", b"{}", b"Authorization: Bearer sk-client\r\n"))
        self.assertEqual(
            h.sent()[0].headers.getRawHeaders(b"authorization"), [b"Bearer sk-upstream"]
        )


class MemoryTests(SynchronousTestCase):
    """A finished exchange does not keep its request body alive."""

    def test_body_released(self) -> None:
        """
        The request's content file is let go once read, the upstream body producer keeps no
        copy, and the exchange drops the body when it ends (after a failover, too).
        """
        h = make_harness([upstream_config("a"), upstream_config("b")])
        requests: list[Any] = []
        exchanges: list[Exchange] = []
        factory = h.site.requestFactory

        def recording(*args: Any, **kwargs: Any) -> Any:
            request = factory(*args, **kwargs)
            requests.append(request)
            return request

        h.site.requestFactory = recording  # type: ignore[assignment]
        start = Exchange.start

        def recording_start(exchange: Exchange) -> None:
            exchanges.append(exchange)
            start(exchange)

        self.patch(Exchange, "start", recording_start)
        body = json.dumps({"input": "x" * 100_000}).encode()
        _, transport = h.send(post(b"/v1/embeddings", body))
        (request,) = requests
        (exchange,) = exchanges
        request.content.seek(0)
        self.assertEqual(request.content.read(), b"")
        self.assertEqual(len(exchange.ctx.body), len(body))  # kept for a failover
        h.sent("a")[0].deferred.callback(FakeResponse(503, {}, length=0))
        self.assertEqual(h.sent("b")[0].body, body)  # the failover sent it whole
        response = FakeResponse(200, {}, length=2)
        h.sent("b")[0].deferred.callback(response)
        response.deliver(b"{}")
        response.end()
        self.assertEqual(parse_response(transport.value())[0], 200)
        self.assertEqual(exchange.ctx.body, b"")

    def test_body_producer_keeps_no_copy(self) -> None:
        """The upstream body producer writes its body once and lets go of it."""
        producer = BytesProducer(b"x" * 1000)
        written: list[bytes] = []
        consumer: Any = type("_Consumer", (), {"write": lambda self, data: written.append(data)})()
        producer.startProducing(consumer)
        self.assertEqual((written, producer.length), ([b"x" * 1000], 1000))
        self.assertEqual(producer._body, b"")


class FailoverTests(SynchronousTestCase):
    """Retries only while nothing was sent downstream."""

    def test_refused_tries_next(self) -> None:
        """A refused connection moves on to the next upstream."""
        h = make_harness([upstream_config("a"), upstream_config("b")])
        _, transport = h.send(post(b"/v1/embeddings", b"{}"))
        h.sent("a")[0].deferred.errback(Failure(ConnectionRefusedError()))
        self.assertEqual(len(h.sent("b")), 1)
        response = FakeResponse(200, {}, length=2)
        h.sent("b")[0].deferred.callback(response)
        response.deliver(b"{}")
        response.end()
        self.assertEqual(parse_response(transport.value())[0], 200)

    def test_503_tries_next(self) -> None:
        """A 503 before any byte went downstream fails over; its body is discarded."""
        h = make_harness([upstream_config("a"), upstream_config("b")])
        _, transport = h.send(post(b"/v1/embeddings", b"{}"))
        bad = FakeResponse(503, {}, length=5)
        h.sent("a")[0].deferred.callback(bad)
        self.assertTrue(bad.socket.stopped)
        self.assertEqual(len(h.sent("b")), 1)
        self.assertEqual(transport.value(), b"")

    def test_5xx_failover_and_pass_through_logged(self) -> None:
        """A 5xx that fails over is logged, and so is one passed through to the client."""
        h = make_harness([upstream_config("a"), upstream_config("b")])
        log = logged(self)
        h.send(post(b"/v1/embeddings", b"{}"))
        h.sent("a")[0].deferred.callback(FakeResponse(500, {}, length=0))
        h.sent("b")[0].deferred.callback(FakeResponse(502, JSON, length=0))
        lines = log()
        self.assertTrue(
            any("upstream a answered 500" in x and "trying another" in x for x in lines)
        )
        self.assertTrue(
            any("upstream b answered 502" in x and "passed through" in x for x in lines)
        )

    def test_every_5xx_tries_next(self) -> None:
        """
        Any 5xx or 429 (rate limited) before the first byte fails over; another 4xx (the
        client's mistake) does not.
        """
        for status, fails_over in [
            (500, True),
            (504, True),
            (599, True),
            (429, True),
            (404, False),
            (400, False),
        ]:
            h = make_harness([upstream_config("a"), upstream_config("b")])
            h.send(post(b"/v1/embeddings", b"{}"))
            h.sent("a")[0].deferred.callback(FakeResponse(status, {}, length=0))
            self.assertEqual(len(h.sent("b")), int(fails_over), status)

    def test_last_503_passed_through(self) -> None:
        """When no upstream is left, the last upstream's JSON answer is relayed as it is."""
        h = make_harness([upstream_config("a")])
        _, transport = h.send(post(b"/v1/embeddings", b"{}"))
        headers = {b"retry-after": [b"7"], b"content-type": [b"application/json; charset=utf-8"]}
        bad = FakeResponse(503, headers, length=4)
        h.sent("a")[0].deferred.callback(bad)
        bad.deliver(b"nope")
        bad.end()
        status, headers, body = parse_response(transport.value())
        self.assertEqual((status, body, headers[b"retry-after"]), (503, b"nope", [b"7"]))

    def test_last_5xx_not_json_made_openai_shaped(self) -> None:
        """
        The last upstream's 5xx with a body that is not JSON (a gateway's HTML page) reaches
        the client with its status and Retry-After, and an OpenAI-shaped body saying what
        came; the rest of the page is not read (its connection closed), and the answer logged.
        """
        log = logged(self)
        said = {
            b"text/html; charset=utf-8": "with a body of type text/html",
            b"application/jsonx": "with a body of type application/jsonx",
            None: "with a body that is not JSON",
        }
        for media, what in said.items():
            h = make_harness([upstream_config("a")])
            _, transport = h.send(post(b"/v1/embeddings", b"{}"))
            headers = {b"retry-after": [b"7"], b"server": [b"gw"]}
            if media is not None:
                headers[b"content-type"] = [media]
            page = FakeResponse(503, headers, length=9)
            h.sent("a")[0].deferred.callback(page)
            self.assertTrue(page.socket.stopped)
            status, got, body = parse_response(transport.value())
            self.assertEqual(status, 503, media)
            self.assertEqual(got[b"retry-after"], [b"7"])
            self.assertEqual(got[b"content-type"], [b"application/json"])
            self.assertNotIn(b"server", got)
            error = json.loads(body)["error"]
            self.assertEqual(set(error), {"message", "type", "param", "code"})
            self.assertEqual((error["type"], error["code"]), ("api_error", "upstream_error"))
            self.assertEqual(error["message"], f"upstream answered 503 Error {what}")
        self.assertTrue(any("not JSON: passed on as an OpenAI-shaped error" in x for x in log()))

    def test_json_media_types_passed_through(self) -> None:
        """Any JSON media type, in any case, with parameters, is passed through as it is."""
        for media in [b"Application/JSON", b"application/problem+json; charset=utf-8"]:
            h = make_harness([upstream_config("a")])
            _, transport = h.send(post(b"/v1/embeddings", b"{}"))
            busy = FakeResponse(503, {b"content-type": [media]}, length=2)
            h.sent("a")[0].deferred.callback(busy)
            busy.deliver(b"{}")
            busy.end()
            status, got, body = parse_response(transport.value())
            self.assertEqual((status, got[b"content-type"], body), (503, [media], b"{}"))

    def test_not_json_answer_keeps_upstream_ids_and_escapes_its_words(self) -> None:
        """
        The upstream's x-request-id and openai-* headers pass on (shared/BAD-INPUTS.md); its
        reason phrase and content type reach the message (and so the log) escaped and cut.
        """
        h = make_harness([upstream_config("a")])
        _, transport = h.send(post(b"/v1/embeddings", b"{}"))
        headers = {
            b"content-type": [b"text/\x1b[31mhtml"],
            b"x-request-id": [b"req_up"],
            b"openai-processing-ms": [b"12"],
            b"openai-version": [b"2020-10-01"],
        }
        page = FakeResponse(500, headers, length=9)
        page.phrase = b"\x1b[2J" + b"w" * 100
        h.sent("a")[0].deferred.callback(page)
        status, got, body = parse_response(transport.value())
        self.assertEqual(status, 500)
        self.assertEqual(got[b"x-request-id"], [b"req_up"])
        self.assertEqual(got[b"openai-processing-ms"], [b"12"])
        self.assertEqual(got[b"openai-version"], [b"2020-10-01"])
        message = json.loads(body)["error"]["message"]
        self.assertNotIn("\x1b", message)
        phrase = message.removeprefix("upstream answered 500 ").partition(" with ")[0]
        self.assertEqual(phrase, "\\x1b[2J" + "w" * 60)  # 64 characters, escaped
        self.assertTrue(message.endswith("with a body of type text/\\x1b[31mhtml"), message)

    def test_not_json_answer_without_phrase(self) -> None:
        """No reason phrase: the status alone, without a double space."""
        h = make_harness([upstream_config("a")])
        _, transport = h.send(post(b"/v1/embeddings", b"{}"))
        page = FakeResponse(502, {}, length=0)
        page.phrase = b""
        h.sent("a")[0].deferred.callback(page)
        message = json.loads(parse_response(transport.value())[2])["error"]["message"]
        self.assertEqual(message, "upstream answered 502 with an empty body")

    def test_last_429_not_json_keeps_rate_limit_headers(self) -> None:
        """A plain-text 429 keeps its status and its rate-limit headers."""
        h = make_harness([upstream_config("a")])
        _, transport = h.send(post(b"/v1/embeddings", b"{}"))
        headers = {
            b"content-type": [b"text/plain"],
            b"retry-after-ms": [b"1500"],
            b"x-ratelimit-remaining-requests": [b"0"],
        }
        h.sent("a")[0].deferred.callback(FakeResponse(429, headers, length=4))
        status, got, body = parse_response(transport.value())
        self.assertEqual(status, 429)
        self.assertEqual(got[b"retry-after-ms"], [b"1500"])
        self.assertEqual(got[b"x-ratelimit-remaining-requests"], [b"0"])
        error = json.loads(body)["error"]
        self.assertEqual(error["type"], "rate_limit_error")
        self.assertEqual(
            error["message"], "upstream answered 429 Error with a body of type text/plain"
        )

    def test_last_5xx_to_head_passed_through(self) -> None:
        """A HEAD gets no body either way: the upstream's answer is passed as it is."""
        h = make_harness([upstream_config("a")])
        _, transport = h.send(b"HEAD /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        busy = FakeResponse(503, {b"retry-after": [b"3"]}, length=0)
        h.sent("a")[0].deferred.callback(busy)
        busy.end()
        status, got, body = parse_response(transport.value())
        self.assertEqual((status, got[b"retry-after"], body), (503, [b"3"], b""))
        self.assertNotIn(b"content-type", got)

    def test_last_5xx_empty_body_made_openai_shaped(self) -> None:
        """An empty 5xx body is no more use to an OpenAI client than a page."""
        h = make_harness([upstream_config("a")])
        _, transport = h.send(post(b"/v1/embeddings", b"{}"))
        h.sent("a")[0].deferred.callback(FakeResponse(502, {}, length=0))
        status, _, body = parse_response(transport.value())
        self.assertEqual(status, 502)
        message = json.loads(body)["error"]["message"]
        self.assertEqual(message, "upstream answered 502 Error with an empty body")

    def test_429_cools_the_upstream_down(self) -> None:
        """
        A 429 with Retry-After fails over, and leaves that upstream out of the picks for
        that long (then it is back).
        """
        h = make_harness([upstream_config("a"), upstream_config("b")])
        h.send(post(b"/v1/embeddings", b"{}"))
        limited = FakeResponse(429, {b"retry-after": [b"2"]}, length=0)
        h.sent("a")[0].deferred.callback(limited)
        self.assertEqual(len(h.sent("b")), 1)
        for _ in range(3):  # round robin would have picked a for one of these
            h.send(post(b"/v1/embeddings", b"{}"))
        self.assertEqual((len(h.sent("a")), len(h.sent("b"))), (1, 4))
        h.clock.advance(2)
        for _ in range(2):
            h.send(post(b"/v1/embeddings", b"{}"))
        self.assertEqual(len(h.sent("a")), 2)

    def test_429_passed_through_when_none_is_left(self) -> None:
        """
        With no other upstream to try, the 429 reaches the client with its headers; while the
        only upstream cools down, requests get 503 with the time left, without trying it.
        """
        h = make_harness([upstream_config("a")])
        _, transport = h.send(post(b"/v1/embeddings", b"{}"))
        headers = {
            b"retry-after-ms": [b"1500"],
            b"x-ratelimit-remaining-requests": [b"0"],
            **JSON,
        }
        limited = FakeResponse(429, headers, length=4)
        h.sent("a")[0].deferred.callback(limited)
        limited.deliver(b"slow")
        limited.end()
        status, got, body = parse_response(transport.value())
        self.assertEqual((status, body), (429, b"slow"))
        self.assertEqual(got[b"x-ratelimit-remaining-requests"], [b"0"])
        h.clock.advance(1)
        _, transport = h.send(post(b"/v1/embeddings", b"{}"))
        status, got, body = parse_response(transport.value())
        self.assertEqual(status, 503)
        self.assertEqual(got[b"retry-after"], [b"1"])
        self.assertEqual(json.loads(body)["error"]["code"], "no_upstream_available")
        self.assertEqual(len(h.sent("a")), 1)
        h.clock.advance(0.5)
        h.send(post(b"/v1/embeddings", b"{}"))
        self.assertEqual(len(h.sent("a")), 2)

    def test_503_with_others_cooling_passed_through(self) -> None:
        """A 503 is passed through when the only other upstream is cooling down."""
        h = make_harness([upstream_config("a"), upstream_config("b")])
        h.send(post(b"/v1/embeddings", b"{}"))
        h.sent("a")[0].deferred.callback(FakeResponse(429, {b"retry-after": [b"30"]}, length=0))
        _, transport = h.send(post(b"/v1/embeddings", b"{}"))  # b, the only one left
        busy = FakeResponse(503, JSON, length=4)
        h.sent("b")[1].deferred.callback(busy)
        busy.deliver(b"busy")
        busy.end()
        self.assertEqual(parse_response(transport.value())[:1], (503,))
        self.assertEqual(parse_response(transport.value())[2], b"busy")

    def test_all_refused_502(self) -> None:
        """Every upstream refused: 502 OpenAI-shaped JSON with Retry-After."""
        h = make_harness([upstream_config("a"), upstream_config("b")])
        _, transport = h.send(post(b"/v1/embeddings", b"{}"))
        h.sent("a")[0].deferred.errback(Failure(ConnectionRefusedError()))
        h.sent("b")[0].deferred.errback(Failure(ConnectionRefusedError()))
        status, headers, body = parse_response(transport.value())
        self.assertEqual(status, 502)
        self.assertEqual(headers[b"retry-after"], [b"1"])
        error = json.loads(body)["error"]
        self.assertEqual(set(error), {"message", "type", "param", "code"})
        self.assertEqual(error["code"], "upstream_connect_failed")

    def test_attempts_bounded(self) -> None:
        """No more upstreams are tried than max_attempts."""
        ups = [upstream_config(n) for n in "abcd"]
        h = make_harness(ups, limits=Limits(max_attempts=2))
        _, transport = h.send(post(b"/v1/embeddings", b"{}"))
        for name in "ab":
            h.sent(name)[0].deferred.errback(Failure(ConnectionRefusedError()))
        self.assertEqual(len(h.sent()), 2)
        self.assertEqual(parse_response(transport.value())[0], 502)

    def test_no_retry_after_first_byte(self) -> None:
        """An upstream dropping after bytes went downstream ends the stream; no retry."""
        h = make_harness([upstream_config("a"), upstream_config("b")])
        _, transport = h.send(post(b"/v1/chat/completions", CHAT))
        response = FakeResponse(200, SSE)
        h.sent("a")[0].deferred.callback(response)
        response.deliver(b"data: 1\n\n")
        h.clock.advance(0)
        response.end(Failure(ResponseFailed([Failure(ConnectionLost())])))
        self.assertEqual(h.sent("b"), [])
        status, _, body = parse_response(transport.value())
        self.assertEqual(status, 200)
        events = body.split(b"\n\n")
        self.assertEqual(events[0], b"data: 1")
        error = json.loads(events[1].removeprefix(b"data: "))["error"]
        self.assertEqual(error["code"], "upstream_disconnected")
        self.assertNotIn(b"[DONE]", body)
        self.assertTrue(transport.value().endswith(b"0\r\n\r\n"), "clean end of stream")

    def test_malformed_first_chunk_tries_next(self) -> None:
        """
        A malformed chunked body before any byte went downstream is a broken response: the
        next upstream is tried (and it is logged), and the client gets that one's answer.
        """
        h = make_harness([upstream_config("a"), upstream_config("b")])
        log = logged(self)
        _, transport = h.send(post(b"/v1/chat/completions", CHAT))
        broken = FakeResponse(200, SSE)
        h.sent("a")[0].deferred.callback(broken)
        broken.end(Failure(ResponseFailed([Failure(MalformedChunkedData("bad chunk size"))])))
        self.assertEqual(transport.value(), b"")
        [retry] = h.sent("b")
        good = FakeResponse(200, SSE)
        retry.deferred.callback(good)
        good.deliver(b"data: 1\n\n")
        good.end()
        status, _, body = parse_response(transport.value())
        self.assertEqual((status, body), (200, b"data: 1\n\n"))
        self.assertTrue(
            any("upstream a failed" in line and "bad chunk size" in line for line in log())
        )
        h.clock.advance(3600)  # the first attempt's deadlines are gone with it
        self.assertEqual(parse_response(transport.value())[2], b"data: 1\n\n")

    def test_malformed_first_chunk_last_upstream_502(self) -> None:
        """Alone, a malformed body before any byte is a 502 upstream_protocol_error."""
        h = make_harness()
        _, transport = h.send(post(b"/v1/chat/completions", CHAT))
        broken = FakeResponse(200, SSE)
        h.sent()[0].deferred.callback(broken)
        broken.end(Failure(ResponseFailed([Failure(MalformedChunkedData("bad chunk size"))])))
        status, _, body = parse_response(transport.value())
        self.assertEqual(status, 502)
        self.assertEqual(json.loads(body)["error"]["code"], "upstream_protocol_error")

    def test_close_after_head_not_retried(self) -> None:
        """
        An upstream that answered a head and then closed has seen the request: it is not sent
        to another one (502 upstream_disconnected).
        """
        h = make_harness([upstream_config("a"), upstream_config("b")])
        _, transport = h.send(post(b"/v1/chat/completions", CHAT))
        dropped = FakeResponse(200, SSE)
        h.sent("a")[0].deferred.callback(dropped)
        dropped.end(Failure(ResponseFailed([Failure(ConnectionLost())])))
        self.assertEqual(h.sent("b"), [])
        status, _, body = parse_response(transport.value())
        self.assertEqual(status, 502)
        self.assertEqual(json.loads(body)["error"]["code"], "upstream_disconnected")

    def test_malformed_mid_stream_named_so(self) -> None:
        """
        A malformed chunk after bytes went downstream ends the stream with an SSE error that
        says so (not a disconnect), and the log says what was wrong, in words.
        """
        h = make_harness([upstream_config("a"), upstream_config("b")])
        log = logged(self)
        _, transport = h.send(post(b"/v1/chat/completions", CHAT))
        response = FakeResponse(200, SSE)
        h.sent("a")[0].deferred.callback(response)
        response.deliver(b"data: 1\n\n")
        response.end(Failure(ResponseFailed([Failure(MalformedChunkedData("bad chunk size"))])))
        self.assertEqual(h.sent("b"), [])
        _, _, body = parse_response(transport.value())
        error = json.loads(body.split(b"\n\n")[1].removeprefix(b"data: "))["error"]
        self.assertEqual(error["code"], "upstream_protocol_error")
        self.assertIn("sent a malformed body mid-response", " ".join(log()))
        self.assertIn("bad chunk size", " ".join(log()))

    def test_drop_logged_in_words(self) -> None:
        """A drop mid-response is logged with its reason in words, not a list of Failures."""
        h = make_harness()
        log = logged(self)
        _, _, response = answered_stream(h)
        response.deliver(b"data: 1\n\n")
        response.end(Failure(ResponseFailed([Failure(ConnectionLost("reset by peer"))])))
        [line] = [line for line in log() if "dropped mid-response" in line]
        self.assertIn("reset by peer", line)
        self.assertNotIn("Failure", line)

    def test_non_sse_drop_aborts_client(self) -> None:
        """A non-streamed body cut short is cut short for the client too (connection aborted)."""
        h = make_harness()
        _, transport = h.send(post(b"/v1/embeddings", b"{}"))
        response = FakeResponse(200, {}, length=100)
        h.sent()[0].deferred.callback(response)
        response.deliver(b"x" * 10)
        h.clock.advance(0)
        response.end(Failure(ResponseFailed([Failure(ConnectionLost())])))
        self.assertTrue(transport.disconnecting or transport.disconnected)


class DeadlineTests(SynchronousTestCase):
    """Connect is covered by DeadlineEndpoint; first byte, idle and total here."""

    def test_first_byte_before_headers_504(self) -> None:
        """No response headers within first_byte: 504 and the upstream request is cancelled."""
        h = make_harness(deadlines=Deadlines(first_byte=5.0))
        _, transport = h.send(post(b"/v1/embeddings", b"{}"))
        h.clock.advance(4.9)
        self.assertEqual(transport.value(), b"")
        h.clock.advance(0.2)
        self.assertTrue(h.sent()[0].cancelled)
        status, _, body = parse_response(transport.value())
        self.assertEqual(status, 504)
        self.assertEqual(json.loads(body)["error"]["code"], "upstream_timeout")

    def test_first_byte_after_headers_504(self) -> None:
        """Headers but no first token within first_byte: still a clean 504."""
        h = make_harness(deadlines=Deadlines(first_byte=5.0))
        _, transport, response = answered_stream(h)
        h.clock.advance(5.1)
        self.assertTrue(response.socket.stopped)
        self.assertEqual(parse_response(transport.value())[0], 504)

    def test_first_byte_met(self) -> None:
        """A first byte in time disarms the first-byte deadline."""
        h = make_harness(deadlines=Deadlines(first_byte=5.0, idle=None))
        _, _transport, response = answered_stream(h)
        response.deliver(b"data: 1\n\n")
        h.clock.advance(100)
        self.assertFalse(response.socket.stopped)

    def test_idle_gap_ends_stream(self) -> None:
        """
        A silent gap past idle mid-stream ends it with an SSE error and stops the upstream;
        it is logged.
        """
        h = make_harness(deadlines=Deadlines(idle=3.0))
        log = logged(self)
        _, transport, response = answered_stream(h)
        response.deliver(b"data: 1\n\n")
        h.clock.advance(2.9)
        response.deliver(b"data: 2\n\n")
        h.clock.advance(2.9)
        self.assertFalse(response.socket.stopped)
        h.clock.advance(0.2)
        self.assertTrue(response.socket.stopped)
        _, _, body = parse_response(transport.value())
        self.assertIn(b'"code":"upstream_timeout"', body)
        self.assertTrue(body.startswith(b"data: 1\n\ndata: 2\n\n"))
        self.assertTrue(any("upstream sent nothing for 3s" in line for line in log()))

    def test_idle_paused_by_client_not_counted(self) -> None:
        """While the client holds the stream paused, the idle deadline does not run."""
        h = make_harness(deadlines=Deadlines(idle=3.0))
        _proto, transport, response = answered_stream(h)
        response.deliver(b"data: 1\n\n")
        h.clock.advance(0)
        client_buffer_full(transport)
        h.clock.advance(10)
        self.assertEqual(response.socket.state, "paused")
        client_buffer_drained(transport)
        self.assertEqual(response.socket.state, "producing")

    def test_total_deadline(self) -> None:
        """The total deadline ends a stream that keeps trickling."""
        h = make_harness(deadlines=Deadlines(total=10.0, idle=None))
        _, transport, response = answered_stream(h)
        for _ in range(9):
            response.deliver(b"data: x\n\n")
            h.clock.advance(1)
        self.assertFalse(response.socket.stopped)
        h.clock.advance(1.1)
        self.assertTrue(response.socket.stopped)
        self.assertIn(b'"code":"upstream_timeout"', transport.value())

    def test_total_deadline_after_first_byte_deadline(self) -> None:
        """
        Past the first-byte deadline with its first byte in, a stream runs on to the total
        deadline: the one timer, due at the first-byte deadline, moves on to the total.
        """
        h = make_harness(deadlines=Deadlines(first_byte=5.0, total=20.0, idle=None))
        _, transport, response = answered_stream(h)
        h.clock.advance(1)
        response.deliver(b"data: x\n\n")
        h.clock.advance(18.8)
        self.assertFalse(response.socket.stopped)
        h.clock.advance(0.3)
        self.assertTrue(response.socket.stopped)
        self.assertIn(b"longer than 20s", transport.value())

    def test_total_deadline_before_first_byte_deadline(self) -> None:
        """A total deadline shorter than the first-byte one ends the wait first."""
        h = make_harness(deadlines=Deadlines(first_byte=30.0, total=10.0))
        _, transport = h.send(post(b"/v1/embeddings", b"{}"))
        h.clock.advance(9.9)
        self.assertEqual(transport.value(), b"")
        h.clock.advance(0.2)
        status, _, body = parse_response(transport.value())
        self.assertEqual(status, 504)
        self.assertIn(b"longer than 10s", body)

    def test_one_timer_per_exchange(self) -> None:
        """Both deadlines share one reactor timer, cancelled when the exchange ends."""
        h = make_harness(deadlines=Deadlines(first_byte=5.0, total=20.0, idle=None))
        _, _transport, response = answered_stream(h)

        def timers() -> list[str]:
            return [
                c.func.__name__  # type: ignore[attr-defined]
                for c in h.clock.getDelayedCalls()
                if c.func.__name__ == "_deadline_reached"  # type: ignore[attr-defined]
            ]

        self.assertEqual(timers(), ["_deadline_reached"])
        response.deliver(b"data: x\n\n")
        response.end()
        self.assertEqual(timers(), [])


class BackpressureTests(SynchronousTestCase):
    """A slow client pauses the upstream read."""

    def test_stalled_client_cut_after_send_deadline(self) -> None:
        """A client that reads nothing for the send deadline: response cut, upstream stopped."""
        h = make_harness(deadlines=Deadlines(send=30.0))
        proto, transport, response = answered_stream(h)
        response.deliver(b"data: 1\n\n")
        client_buffer_full(transport)
        h.clock.advance(29)
        self.assertEqual(response.socket.state, "paused")
        self.assertFalse(transport.disconnected)
        h.clock.advance(2)
        self.assertTrue(response.socket.stopped)
        self.assertTrue(transport.disconnected)
        # The connection's loss, which a real transport reports, ends its idle timer.
        proto.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_slow_but_reading_client_not_cut(self) -> None:
        """Each time the client catches up, the send deadline starts over."""
        h = make_harness(deadlines=Deadlines(send=30.0, idle=None))
        _proto, transport, response = answered_stream(h)
        for _ in range(5):
            response.deliver(b"data: x\n\n")
            client_buffer_full(transport)
            h.clock.advance(20)
            client_buffer_drained(transport)
        self.assertFalse(response.socket.stopped)
        self.assertFalse(transport.disconnected)

    def test_send_deadline_disabled(self) -> None:
        """With send=None a stalled client is waited on (memory stays bounded by the pause)."""
        h = make_harness(deadlines=Deadlines(send=None, total=None))
        _proto, transport, response = answered_stream(h)
        response.deliver(b"data: 1\n\n")
        client_buffer_full(transport)
        h.clock.advance(3600)
        self.assertEqual(response.socket.state, "paused")
        self.assertFalse(transport.disconnected)

    def test_downstream_backlog_http11(self) -> None:
        """
        The bytes an HTTP/1.1 client has not taken yet: the TCP transport's write buffer,
        found under TLS wrappers too; they go down as the socket accepts them.
        """

        class _Socket(FileDescriptor):
            accept = 0

            def writeSomeData(self, data: bytes) -> int:
                return min(self.accept, len(data))

        tcp = _Socket(MemoryReactorClock())
        tcp.connected = True
        tcp.write(b"x" * 100)

        class _Channel:
            transport: Any = None

        request: Any = type("_Request", (), {})()
        request.channel = _Channel()
        request.channel.transport = tcp
        self.assertEqual(downstream_backlog(request), 100)
        tcp.accept = 40
        tcp.doWrite()
        self.assertEqual(downstream_backlog(request), 60)
        tls: Any = type("_TLS", (), {})()
        tls.transport = tcp
        request.channel.transport = tls
        self.assertEqual(downstream_backlog(request), 60)
        request.channel.transport = StringTransport()
        self.assertIsNone(downstream_backlog(request))

    def test_pause_and_resume_reach_upstream(self) -> None:
        """Downstream pause/resume are relayed to the upstream body transport."""
        h = make_harness()
        _proto, transport, response = answered_stream(h)
        response.deliver(b"data: 1\n\n")
        h.clock.advance(0)
        client_buffer_full(transport)  # what the TCP transport does when its buffer fills
        self.assertEqual(response.socket.state, "paused")
        client_buffer_drained(transport)
        self.assertEqual(response.socket.state, "producing")

    def test_producer_registered_before_first_write(self) -> None:
        """The relay is the request's producer as soon as the body starts, before any write."""
        h = make_harness()
        proto, _transport, response = answered_stream(h)
        self.assertIs(proto._channel._requestProducer, response.protocol)

    def test_producer_unregistered_at_end(self) -> None:
        """After the response ends the relay is no longer the request's producer."""
        h = make_harness()
        proto, _transport, response = answered_stream(h)
        response.end()
        self.assertIsNone(proto._channel._requestProducer)


class CancellationTests(SynchronousTestCase):
    """A client going away cancels the upstream request in every window."""

    def test_gone_while_connecting_or_waiting_headers(self) -> None:
        """Before headers: the upstream client's Deferred is cancelled."""
        h = make_harness()
        proto, _transport = h.send(post(b"/v1/embeddings", b"{}"))
        proto.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(h.sent()[0].cancelled)

    def test_gone_after_headers_before_body(self) -> None:
        """After headers: the body transport is stopped."""
        h = make_harness()
        proto, _transport, response = answered_stream(h)
        proto.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(response.socket.stopped)

    def test_gone_mid_stream(self) -> None:
        """Mid-stream: the body transport is stopped and nothing more is written."""
        h = make_harness()
        proto, _transport, response = answered_stream(h)
        response.deliver(b"data: 1\n\n")
        h.clock.advance(0)
        proto.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(response.socket.stopped)
        response.deliver(b"data: 2\n\n")
        response.end(Failure(ResponseFailed([Failure(ConnectionLost())])))
        h.clock.advance(0)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_gone_with_twisteds_own_request(self) -> None:
        """
        A request without ProxyRequest's hook (Twisted's own) is watched through
        notifyFinish: its client going away cancels the upstream request too.
        """
        from twisted.web import server

        h = make_harness()

        def plain(channel: Any, queued: object = False) -> server.Request:
            request: server.Request = server.Request(
                channel, queued, parsePOSTFormSubmission=False
            )
            return request

        h.site.requestFactory = plain  # type: ignore[assignment]
        proto, _transport = h.send(post(b"/v1/embeddings", b"{}"))
        self.assertEqual(len(h.sent()), 1)
        proto.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(h.sent()[0].cancelled)

    def test_hook_let_go_when_done(self) -> None:
        """The request stops holding the exchange once it is done (no reference cycle)."""
        h = make_harness()
        proto, _transport, response = answered_stream(h)
        request: Any = proto._channel._request
        self.assertIsNotNone(request.on_client_lost)
        response.deliver(b"data: 1\n\n")
        response.end()
        self.assertIsNone(request.on_client_lost)

    def test_hook_kept_through_failover_and_let_go(self) -> None:
        """The hook outlives a failover (the client going away then cancels the second
        upstream), and is let go once an answer is given up on."""
        h = make_harness([upstream_config("a"), upstream_config("b")])
        proto, _transport = h.send(post(b"/v1/embeddings", b"{}"))
        request: Any = proto._channel._request
        h.sent("a")[0].deferred.callback(FakeResponse(503, {}, length=5))
        self.assertIsNotNone(request.on_client_lost)
        proto.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(h.sent("b")[0].cancelled)
        self.assertIsNone(request.on_client_lost)

    def test_hook_that_raises_is_contained(self) -> None:
        """A client-gone callback that raises is logged; the loss goes on to others."""
        h = make_harness()
        proto, _transport = h.send(post(b"/v1/embeddings", b"{}"))
        request: Any = proto._channel._request

        def broken(reason: Failure) -> None:
            raise RuntimeError("broken")

        request.on_client_lost = broken
        request.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(request._disconnected)

    def test_gone_cancels_timers(self) -> None:
        """No deadline timer outlives a cancelled exchange."""
        h = make_harness()
        proto, _transport = h.send(post(b"/v1/embeddings", b"{}"))
        proto.connectionLost(Failure(ConnectionLost()))
        pending = [c for c in h.clock.getDelayedCalls() if c.active()]
        self.assertEqual([c for c in pending if "Exchange" in repr(c)], [])


class RealClientCancellationTests(SynchronousTestCase):
    """With the real upstream client: a client gone while connecting cancels the connect."""

    def test_gone_while_connecting(self) -> None:
        """The upstream connection attempt itself is cancelled, not just abandoned."""
        from oaiproxy.http.client import UpstreamClient
        from oaiproxy.http.forwarder import Forwarder
        from tests.support.fakes import HangingEndpoint

        endpoint = HangingEndpoint()
        h = make_harness()
        client = UpstreamClient(
            h.clock, b"http://a.invalid:9000", endpoint, idle_connections=4, keepalive=4.0
        )
        h.site.resource._forwarder = Forwarder({"a": client})
        proto, _ = h.send(post(b"/v1/embeddings", b"{}"))
        self.assertIsNotNone(endpoint.attempt)
        self.assertFalse(endpoint.cancelled)
        proto.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(endpoint.cancelled)


class ConnectDeadlineTests(SynchronousTestCase):
    """With the real upstream client: the connect deadline, as the client sees it."""

    def harness(self, names: str) -> tuple[ProxyHarness, dict[str, Any]]:
        from oaiproxy.http.client import UpstreamClient
        from oaiproxy.http.forwarder import DeadlineEndpoint, Forwarder
        from tests.support.fakes import HangingEndpoint

        h = make_harness([upstream_config(n) for n in names])
        endpoints = {n: HangingEndpoint() for n in names}
        clients = {
            n: UpstreamClient(
                h.clock,
                b"http://%s.invalid:9000" % n.encode(),
                DeadlineEndpoint(endpoints[n], 5.0, h.clock),
                idle_connections=4,
                keepalive=4.0,
            )
            for n in names
        }
        h.site.resource._forwarder = Forwarder(clients)
        return h, endpoints

    def test_connect_timeout_504(self) -> None:
        """No connection within the deadline: the attempt is cancelled and the client gets a
        504 C{upstream_connect_timeout}, as OpenAI-shaped JSON."""
        h, endpoints = self.harness("a")
        _, transport = h.send(post(b"/v1/embeddings", b"{}"))
        h.clock.advance(4.9)
        self.assertEqual(transport.value(), b"")
        h.clock.advance(0.2)
        self.assertTrue(endpoints["a"].cancelled)
        status, _, body = parse_response(transport.value())
        self.assertEqual(status, 504)
        error = json.loads(body)["error"]
        self.assertEqual(set(error), {"message", "type", "param", "code"})
        self.assertEqual(error["code"], "upstream_connect_timeout")

    def test_connect_timeout_tries_next(self) -> None:
        """A connect timeout fails over to the next upstream, whose deadline starts then."""
        h, endpoints = self.harness("ab")
        _, transport = h.send(post(b"/v1/embeddings", b"{}"))
        self.assertIsNone(endpoints["b"].attempt)
        h.clock.advance(5.1)
        self.assertTrue(endpoints["a"].cancelled)
        self.assertIsNotNone(endpoints["b"].attempt)
        self.assertEqual(transport.value(), b"")
        h.clock.advance(5.0)
        self.assertEqual(parse_response(transport.value())[0], 504)
