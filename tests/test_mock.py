"""
Tests for L{oaiproxy.mock}: real HTTP/1.1 exchanges with the mock site, run in memory.
"""

# trial's inherited assertions escape untyped_calls_exclude, which matches the callee's class.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import base64
import json
import struct
from dataclasses import FrozenInstanceError, dataclass
from typing import Any, cast

from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http import HTTPChannel, Request
from twisted.web.server import Site
from zope.interface.verify import verifyObject

from oaiproxy.listening import Listeners
from oaiproxy.mock import MockConfig, MockOptions, _parse_args, build_mock_site, make_mock_service

_CHAT = b"/v1/chat/completions"
_MESSAGES = [{"role": "user", "content": "say something nice please"}]


@dataclass(frozen=True)
class _Response:
    """One HTTP response as the client saw it; C{complete} if its body ended properly."""

    status: int
    headers: dict[bytes, list[bytes]]
    body: bytes
    complete: bool

    def header(self, name: bytes) -> bytes | None:
        """The last value of header C{name} (case-insensitive), or C{None}."""
        values = self.headers.get(name.lower())
        return values[-1] if values else None

    def json(self) -> Any:
        """The body, decoded as JSON."""
        return json.loads(self.body)


def _dechunk(data: bytes) -> tuple[bytes, bool]:
    """Decode a chunked body; also say whether its terminating chunk arrived."""
    body: list[bytes] = []
    position = 0
    while True:
        end_of_size = data.find(b"\r\n", position)
        if end_of_size < 0:
            return b"".join(body), False
        size = int(data[position:end_of_size], 16)
        start = end_of_size + 2
        if size == 0:
            return b"".join(body), data[start : start + 2] == b"\r\n"
        body.append(data[start : start + size])
        if len(data) < start + size + 2:
            return b"".join(body), False
        position = start + size + 2


def _parse(data: bytes) -> _Response:
    """Parse one HTTP/1.1 response, possibly cut short."""
    head, separator, rest = data.partition(b"\r\n\r\n")
    if not separator:
        raise AssertionError(f"no complete response head in {data[:200]!r}")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    if headers.get(b"transfer-encoding") == [b"chunked"]:
        body, complete = _dechunk(rest)
    else:
        length = int(headers[b"content-length"][0])
        body, complete = rest[:length], len(rest) >= length
    return _Response(status, headers, body, complete)


def _events(body: bytes) -> list[Any]:
    """The server-sent events of a stream: decoded JSON objects, and C{"[DONE]"} as text."""
    events: list[Any] = []
    for block in body.split(b"\n\n"):
        if not block:
            continue
        if not block.startswith(b"data: "):
            raise AssertionError(f"not a data event: {block[:100]!r}")
        payload = block[len(b"data: ") :]
        events.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return events


def _content(events: list[Any]) -> str:
    """The chat content carried by the deltas of a stream."""
    return "".join(
        choice["delta"].get("content", "")
        for event in events
        if event != "[DONE]"
        for choice in event["choices"]
    )


class _Exchange:
    """A mock site on a fake clock with one client connection over a L{StringTransport}."""

    def __init__(self, config: MockConfig | None = None) -> None:
        self.clock = MemoryReactorClock()
        self.site = build_mock_site(config or MockConfig(), self.clock)
        self.transport = StringTransport()
        protocol = self.site.buildProtocol(None)
        assert protocol is not None
        self.protocol = protocol
        protocol.makeConnection(self.transport)
        # The HTTP channel registers itself with the transport, as with a real socket.
        self.channel = cast(HTTPChannel, self.transport.producer)

    def send(
        self,
        method: bytes,
        path: bytes,
        body: object = None,
        headers: dict[bytes, bytes] | None = None,
    ) -> None:
        """Send one request; a C{body} that is not bytes is sent as JSON."""
        if isinstance(body, bytes):
            raw = body
        else:
            raw = b"" if body is None else json.dumps(body).encode()
        lines = [method + b" " + path + b" HTTP/1.1", b"Host: mock.test"]
        lines += [name + b": " + value for name, value in (headers or {}).items()]
        lines.append(b"Content-Length: %d" % (len(raw),))
        self.protocol.dataReceived(b"\r\n".join(lines) + b"\r\n\r\n" + raw)

    def request(self) -> Request:
        """The request the channel is handling."""
        requests: list[Request] = self.channel.requests
        return requests[0]

    def due_calls(self) -> list[DelayedCall]:
        """The delayed calls due now (the channel's idle timeout is not)."""
        now = self.clock.seconds()
        return [call for call in self.clock.calls if call.getTime() <= now]

    def turn(self) -> None:
        """
        Run the calls due now, like one reactor iteration.

        Unlike C{clock.advance(0)}, calls scheduled while these run wait for the next turn, as
        they do in a real reactor; so batches written per turn can be observed.
        """
        for call in self.due_calls():
            if call.active():  # an earlier call may have cancelled it
                self.clock.calls.remove(call)
                call.called = 1
                call.func(*call.args, **call.kw)

    def drain(self) -> int:
        """Run reactor turns until nothing is due; return how many turns it took."""
        turns = 0
        while self.due_calls():
            self.turn()
            turns += 1
        return turns

    def response(self) -> _Response:
        """The response written so far."""
        return _parse(self.transport.value())

    def disconnect(self) -> None:
        """The client goes away."""
        self.protocol.connectionLost(Failure(ConnectionDone("client left")))


def _chat(stream: bool = False, **more: object) -> dict[str, object]:
    """A chat completion request body."""
    return {"model": "gpt-test", "messages": _MESSAGES, "stream": stream, **more}


class MockConfigTests(SynchronousTestCase):
    """L{MockConfig} is a validated frozen value."""

    def test_rejects_negative_chunks(self) -> None:
        """A negative chunk count is refused at construction."""
        self.assertRaises(ValueError, MockConfig, chunks=-1)

    def test_rejects_zero_chunk_size_and_negative_delays(self) -> None:
        """A chunk size below 1 or a negative delay is refused at construction."""
        self.assertRaises(ValueError, MockConfig, chunk_size=0)
        self.assertRaises(ValueError, MockConfig, delay=-0.1)
        self.assertRaises(ValueError, MockConfig, first_token_delay=-1)

    def test_frozen(self) -> None:
        """A config cannot be changed after construction."""
        config = MockConfig()
        with self.assertRaises(FrozenInstanceError):
            config.chunks = 3  # type: ignore[misc]  # the point: frozen fields refuse this


class ChatCompletionTests(SynchronousTestCase):
    """C{POST /v1/chat/completions}, plain and streamed."""

    def test_non_streaming_answer_and_usage(self) -> None:
        """A plain answer is a chat.completion with chunks * chunk_size of content and usage."""
        exchange = _Exchange(MockConfig(chunks=5, chunk_size=3))
        exchange.send(b"POST", _CHAT, _chat())
        exchange.drain()
        response = exchange.response()
        self.assertEqual(response.status, 200)
        self.assertTrue(response.complete)
        self.assertEqual(response.header(b"content-type"), b"application/json")
        answer = response.json()
        self.assertEqual(answer["object"], "chat.completion")
        self.assertEqual(answer["model"], "gpt-test")
        message = answer["choices"][0]["message"]
        self.assertEqual(message["role"], "assistant")
        self.assertEqual(len(message["content"]), 15)
        self.assertEqual(answer["choices"][0]["finish_reason"], "stop")
        self.assertEqual(
            answer["usage"], {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}
        )

    def test_streaming_chunks_and_done(self) -> None:
        """A stream has N content chunks, role first, a stop chunk, then [DONE], and ends."""
        exchange = _Exchange(MockConfig(chunks=6))
        exchange.send(b"POST", _CHAT, _chat(stream=True))
        exchange.drain()
        response = exchange.response()
        self.assertEqual(response.header(b"content-type"), b"text/event-stream")
        self.assertTrue(response.complete)
        events = _events(response.body)
        self.assertEqual(events[-1], "[DONE]")
        chunks = events[:-1]
        content = [e for e in chunks if e["choices"] and "content" in e["choices"][0]["delta"]]
        self.assertEqual(len(content), 6)
        self.assertEqual(chunks[0]["choices"][0]["delta"]["role"], "assistant")
        self.assertNotIn("role", chunks[1]["choices"][0]["delta"])
        self.assertEqual({e["object"] for e in chunks}, {"chat.completion.chunk"})
        self.assertEqual(chunks[-1]["choices"][0]["finish_reason"], "stop")
        self.assertEqual(len({e["id"] for e in chunks}), 1)
        for event in chunks:
            self.assertNotIn("usage", event)

    def test_stream_include_usage(self) -> None:
        """With include_usage, a chunk with no choices carries usage just before [DONE]."""
        exchange = _Exchange(MockConfig(chunks=3))
        options = {"include_usage": True}
        exchange.send(b"POST", _CHAT, _chat(stream=True, stream_options=options))
        exchange.drain()
        events = _events(exchange.response().body)
        self.assertEqual(events[-1], "[DONE]")
        usage_chunk = events[-2]
        self.assertEqual(usage_chunk["choices"], [])
        self.assertEqual(
            usage_chunk["usage"], {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
        )
        for event in events[:-2]:
            self.assertIsNone(event["usage"])

    def test_streamed_content_equals_plain_content(self) -> None:
        """The deltas of a stream add up to the content of the plain answer."""
        plain = _Exchange(MockConfig(chunks=7, chunk_size=5))
        plain.send(b"POST", _CHAT, _chat())
        plain.drain()
        streamed = _Exchange(MockConfig(chunks=7, chunk_size=5))
        streamed.send(b"POST", _CHAT, _chat(stream=True))
        streamed.drain()
        content = plain.response().json()["choices"][0]["message"]["content"]
        self.assertEqual(_content(_events(streamed.response().body)), content)

    def test_header_knobs_override_config(self) -> None:
        """x-mock-chunks and x-mock-chunk-size override the configured sizes."""
        exchange = _Exchange(MockConfig(chunks=8, chunk_size=4))
        knobs = {b"x-mock-chunks": b"3", b"x-mock-chunk-size": b"10"}
        exchange.send(b"POST", _CHAT, _chat(), knobs)
        exchange.drain()
        answer = exchange.response().json()
        self.assertEqual(len(answer["choices"][0]["message"]["content"]), 30)
        self.assertEqual(answer["usage"]["completion_tokens"], 3)

    def test_keep_alive_serves_a_second_request(self) -> None:
        """After a streamed response ends, the same connection answers another request."""
        exchange = _Exchange(MockConfig(chunks=2))
        exchange.send(b"POST", _CHAT, _chat(stream=True))
        exchange.drain()
        exchange.send(b"GET", b"/v1/models")
        exchange.drain()
        self.assertEqual(exchange.transport.value().count(b"HTTP/1.1 200 OK\r\n"), 2)


class PacingTests(SynchronousTestCase):
    """Delays come from the injected clock, and a departed client stops everything."""

    def test_first_token_delay_streamed(self) -> None:
        """Nothing is written before the first-token delay has passed on the clock."""
        exchange = _Exchange(MockConfig(first_token_delay=2.0, chunks=2))
        exchange.send(b"POST", _CHAT, _chat(stream=True))
        exchange.clock.advance(1.999)
        self.assertEqual(exchange.transport.value(), b"")
        exchange.clock.advance(0.001)
        self.assertEqual(exchange.response().status, 200)
        exchange.drain()
        self.assertTrue(exchange.response().complete)

    def test_first_token_header_delays_plain_answer(self) -> None:
        """x-mock-first-token-ms delays a plain answer by that many milliseconds."""
        exchange = _Exchange()
        exchange.send(b"POST", _CHAT, _chat(), {b"x-mock-first-token-ms": b"1500"})
        exchange.clock.advance(1.4)
        self.assertEqual(exchange.transport.value(), b"")
        exchange.clock.advance(0.1)
        exchange.drain()
        self.assertTrue(exchange.response().complete)

    def test_delay_between_chunks(self) -> None:
        """With a delay, one content chunk is written per delay period."""
        exchange = _Exchange(MockConfig(chunks=3, delay=0.5))
        exchange.send(b"POST", _CHAT, _chat(stream=True))
        exchange.drain()
        self.assertEqual(len(_events(exchange.response().body)), 1)
        exchange.clock.advance(0.5)
        self.assertEqual(len(_events(exchange.response().body)), 2)
        self.assertFalse(exchange.response().complete)
        exchange.clock.advance(0.5)
        response = exchange.response()
        self.assertTrue(response.complete)
        self.assertEqual(_events(response.body)[-1], "[DONE]")

    def test_delay_header_overrides_config(self) -> None:
        """x-mock-delay-ms paces the chunks instead of the configured delay."""
        exchange = _Exchange(MockConfig(chunks=2))
        exchange.send(b"POST", _CHAT, _chat(stream=True), {b"x-mock-delay-ms": b"250"})
        exchange.drain()
        self.assertFalse(exchange.response().complete)
        exchange.clock.advance(0.25)
        self.assertTrue(exchange.response().complete)

    def test_client_disconnect_cancels_pending_chunks(self) -> None:
        """When the client leaves mid-stream, no call stays scheduled and nothing more is sent."""
        exchange = _Exchange(MockConfig(chunks=5, delay=1.0))
        exchange.send(b"POST", _CHAT, _chat(stream=True))
        exchange.drain()
        self.assertNotEqual(exchange.clock.getDelayedCalls(), [])
        written = exchange.transport.value()
        exchange.disconnect()
        self.assertEqual(list(exchange.clock.getDelayedCalls()), [])
        exchange.clock.advance(10)
        self.assertEqual(exchange.transport.value(), written)

    def test_client_disconnect_during_first_token_delay(self) -> None:
        """A client leaving before the first token cancels the first-token call."""
        exchange = _Exchange(MockConfig(first_token_delay=30.0))
        exchange.send(b"POST", _CHAT, _chat())
        self.assertEqual(len(exchange.clock.getDelayedCalls()), 1)
        exchange.disconnect()
        self.assertEqual(list(exchange.clock.getDelayedCalls()), [])


class BackpressureTests(SynchronousTestCase):
    """Bulk streams go through a push producer that the transport can pause."""

    def test_registers_push_producer(self) -> None:
        """A stream registers a streaming IPushProducer on its request, unregistered at the end."""
        exchange = _Exchange(MockConfig(chunks=2))
        exchange.send(b"POST", _CHAT, _chat(stream=True))
        request = exchange.request()
        self.assertTrue(verifyObject(IPushProducer, request.producer))
        self.assertTrue(request.streamingProducer)
        exchange.drain()
        self.assertTrue(exchange.response().complete)
        self.assertIsNone(request.producer)

    def test_paused_before_start_writes_nothing_until_resumed(self) -> None:
        """A paused transport gets no bytes; resuming delivers the stream in batches."""
        exchange = _Exchange(MockConfig(chunks=200, chunk_size=4096))
        exchange.send(b"POST", _CHAT, _chat(stream=True))
        exchange.channel.pauseProducing()
        for _ in range(5):
            exchange.turn()
        self.assertEqual(exchange.transport.value(), b"")
        exchange.channel.resumeProducing()
        exchange.turn()
        first_batch = len(exchange.transport.value())
        self.assertGreater(first_batch, 0)
        self.assertLess(first_batch, 200 * 4096 // 4)
        exchange.drain()
        self.assertEqual(len(_content(_events(exchange.response().body))), 200 * 4096)

    def test_pause_mid_stream_stops_writes(self) -> None:
        """Pausing mid-stream freezes the output until the transport resumes the producer."""
        exchange = _Exchange(MockConfig(chunks=100, chunk_size=8192))
        exchange.send(b"POST", _CHAT, _chat(stream=True))
        exchange.turn()
        exchange.turn()
        exchange.channel.pauseProducing()
        paused_at = len(exchange.transport.value())
        self.assertGreater(paused_at, 0)
        for _ in range(10):
            exchange.turn()
        self.assertEqual(len(exchange.transport.value()), paused_at)
        self.assertFalse(exchange.response().complete)
        exchange.channel.resumeProducing()
        exchange.drain()
        response = exchange.response()
        self.assertTrue(response.complete)
        self.assertEqual(len(_content(_events(response.body))), 100 * 8192)

    def test_bulk_stream_spreads_over_reactor_turns(self) -> None:
        """Megabytes with no delay are written over many reactor turns, not in one go."""
        exchange = _Exchange()
        knobs = {b"x-mock-chunks": b"64", b"x-mock-chunk-size": b"65536"}
        exchange.send(b"POST", _CHAT, _chat(stream=True), knobs)
        exchange.turn()
        self.assertLess(len(exchange.transport.value()), 256 * 1024)
        turns = exchange.drain()
        self.assertGreaterEqual(turns, 32)
        response = exchange.response()
        self.assertTrue(response.complete)
        self.assertEqual(len(_content(_events(response.body))), 64 * 65536)

    def test_bulk_plain_answer_spreads_over_reactor_turns(self) -> None:
        """A big plain answer is also written in batches and adds up to its Content-Length."""
        exchange = _Exchange()
        knobs = {b"x-mock-chunks": b"32", b"x-mock-chunk-size": b"65536"}
        exchange.send(b"POST", _CHAT, _chat(), knobs)
        exchange.turn()
        self.assertLess(len(exchange.transport.value()), 256 * 1024)
        exchange.drain()
        response = exchange.response()
        self.assertTrue(response.complete)
        self.assertEqual(len(response.json()["choices"][0]["message"]["content"]), 32 * 65536)


class FaultTests(SynchronousTestCase):
    """x-mock-fault injects errors, broken connections and silence."""

    def test_429_has_retry_after(self) -> None:
        """A 429 fault answers rate_limit_exceeded with Retry-After: 1."""
        exchange = _Exchange()
        exchange.send(b"POST", _CHAT, _chat(), {b"x-mock-fault": b"429"})
        response = exchange.response()
        self.assertEqual(response.status, 429)
        self.assertTrue(
            exchange.transport.value().startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
        )
        self.assertEqual(response.header(b"retry-after"), b"1")
        error = response.json()["error"]
        self.assertEqual(error["code"], "rate_limit_exceeded")
        self.assertEqual(set(error), {"message", "type", "param", "code"})

    def test_server_errors(self) -> None:
        """500, 502 and 503 faults answer their status with an OpenAI server_error."""
        for status in (500, 502, 503):
            exchange = _Exchange()
            exchange.send(b"POST", _CHAT, _chat(), {b"x-mock-fault": b"%d" % (status,)})
            response = exchange.response()
            self.assertEqual(response.status, status)
            self.assertEqual(response.json()["error"]["type"], "server_error")
            self.assertEqual(response.header(b"x-mock-upstream"), b"mock")

    def test_fault_is_logged(self) -> None:
        """An injected fault is logged with the upstream name and the fault as fields."""
        events = EventLoggingObserver()
        globalLogPublisher.addObserver(events)
        self.addCleanup(globalLogPublisher.removeObserver, events)
        exchange = _Exchange(MockConfig(name="u1"))
        exchange.send(b"POST", _CHAT, _chat(), {b"x-mock-fault": b"503"})
        logged = [e for e in events if e.get("fault") == "503"]
        self.assertEqual(len(logged), 1)
        self.assertEqual(logged[0]["upstream"], "u1")

    def test_disconnect_after_streamed_chunks(self) -> None:
        """disconnect-after=N writes N content chunks then closes, the body left unfinished."""
        exchange = _Exchange(MockConfig(chunks=5))
        exchange.send(b"POST", _CHAT, _chat(stream=True), {b"x-mock-fault": b"disconnect-after=2"})
        exchange.drain()
        self.assertTrue(exchange.transport.disconnecting)
        response = exchange.response()
        self.assertFalse(response.complete)
        events = _events(response.body)
        self.assertEqual(len(events), 2)
        self.assertNotIn("[DONE]", events)
        self.assertIsNone(exchange.request().producer)
        exchange.disconnect()
        self.assertEqual(list(exchange.clock.getDelayedCalls()), [])

    def test_disconnect_after_closes_cleanly_and_reset_after_aborts(self) -> None:
        """disconnect-after ends the connection cleanly; reset-after aborts it."""
        clean = _Exchange(MockConfig(chunks=3))
        clean.send(b"POST", _CHAT, _chat(stream=True), {b"x-mock-fault": b"disconnect-after=1"})
        clean.drain()
        self.assertEqual(
            (clean.transport.disconnecting, clean.transport.disconnected), (True, False)
        )
        reset = _Exchange(MockConfig(chunks=3))
        reset.send(b"POST", _CHAT, _chat(stream=True), {b"x-mock-fault": b"reset-after=1"})
        reset.drain()
        self.assertTrue(reset.transport.disconnected)
        self.assertEqual(len(_events(reset.response().body)), 1)
        self.assertFalse(reset.response().complete)

    def test_disconnect_after_more_than_all_chunks_skips_the_end(self) -> None:
        """disconnect-after beyond the chunk count sends all content but never the end."""
        exchange = _Exchange(MockConfig(chunks=2))
        exchange.send(b"POST", _CHAT, _chat(stream=True), {b"x-mock-fault": b"disconnect-after=9"})
        exchange.drain()
        self.assertTrue(exchange.transport.disconnecting)
        events = _events(exchange.response().body)
        self.assertEqual(len(events), 2)
        self.assertIsNone(events[-1]["choices"][0]["finish_reason"])

    def test_disconnect_after_zero_sends_only_the_head(self) -> None:
        """disconnect-after=0 sends the response head and closes before any content."""
        exchange = _Exchange()
        exchange.send(b"POST", _CHAT, _chat(stream=True), {b"x-mock-fault": b"disconnect-after=0"})
        exchange.drain()
        self.assertTrue(exchange.transport.disconnecting)
        response = exchange.response()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, b"")
        self.assertFalse(response.complete)

    def test_disconnect_after_truncates_plain_answer(self) -> None:
        """For a plain answer, disconnect-after leaves the body short of its Content-Length."""
        exchange = _Exchange(MockConfig(chunks=4, chunk_size=10))
        exchange.send(b"POST", _CHAT, _chat(), {b"x-mock-fault": b"disconnect-after=2"})
        exchange.drain()
        self.assertTrue(exchange.transport.disconnecting)
        response = exchange.response()
        self.assertFalse(response.complete)
        self.assertIn(b'"content":"lorem ipsum dolor ', response.body)

    def test_garbage(self) -> None:
        """garbage writes bytes that are not HTTP and closes the connection."""
        exchange = _Exchange()
        exchange.send(b"POST", _CHAT, _chat(), {b"x-mock-fault": b"garbage"})
        self.assertEqual(exchange.transport.value(), b"this is not http\r\n\r\n")
        self.assertTrue(exchange.transport.disconnecting)

    def test_hang_then_client_disconnect(self) -> None:
        """hang never answers; when the client leaves nothing is scheduled or logged as error."""
        exchange = _Exchange()
        exchange.send(b"POST", _CHAT, _chat(stream=True), {b"x-mock-fault": b"hang"})
        exchange.clock.advance(3600)
        self.assertEqual(exchange.transport.value(), b"")
        self.assertFalse(exchange.transport.disconnecting)
        exchange.disconnect()
        self.assertEqual(list(exchange.clock.getDelayedCalls()), [])
        self.assertEqual(exchange.transport.value(), b"")

    def test_unknown_fault_is_400(self) -> None:
        """An unknown x-mock-fault value is an invalid request naming the header."""
        exchange = _Exchange()
        exchange.send(b"POST", _CHAT, _chat(), {b"x-mock-fault": b"explode"})
        response = exchange.response()
        self.assertEqual(response.status, 400)
        self.assertEqual(response.json()["error"]["param"], "x-mock-fault")


class ErrorTests(SynchronousTestCase):
    """Bad requests and unknown routes get OpenAI-shaped errors."""

    def test_bad_json_is_400(self) -> None:
        """A body that is not JSON is a 400 invalid_request_error with all four keys."""
        exchange = _Exchange()
        exchange.send(b"POST", _CHAT, b"{not json")
        response = exchange.response()
        self.assertEqual(response.status, 400)
        error = response.json()["error"]
        self.assertEqual(error["type"], "invalid_request_error")
        self.assertEqual(set(error), {"message", "type", "param", "code"})

    def test_json_array_body_is_400(self) -> None:
        """A JSON body that is not an object is refused."""
        exchange = _Exchange()
        exchange.send(b"POST", _CHAT, [1, 2])
        self.assertEqual(exchange.response().status, 400)

    def test_missing_messages_is_400(self) -> None:
        """A chat request without messages names the missing parameter."""
        exchange = _Exchange()
        exchange.send(b"POST", _CHAT, {"model": "m"})
        response = exchange.response()
        self.assertEqual(response.status, 400)
        self.assertEqual(response.json()["error"]["param"], "messages")

    def test_bad_knob_is_400(self) -> None:
        """A knob header that is not a number in range names the header."""
        for value in (b"lots", b"-1"):
            exchange = _Exchange()
            exchange.send(b"POST", _CHAT, _chat(), {b"x-mock-chunks": value})
            response = exchange.response()
            self.assertEqual(response.status, 400)
            self.assertEqual(response.json()["error"]["param"], "x-mock-chunks")

    def test_unknown_route_is_404(self) -> None:
        """Unknown paths and wrong methods get a 404 OpenAI error carrying x-mock-upstream."""
        for method, path in ((b"GET", b"/nope"), (b"GET", _CHAT), (b"POST", b"/v1/models")):
            exchange = _Exchange(MockConfig(name="up-a"))
            exchange.send(method, path)
            response = exchange.response()
            self.assertEqual(response.status, 404)
            self.assertEqual(response.header(b"x-mock-upstream"), b"up-a")
            error = response.json()["error"]
            self.assertEqual(set(error), {"message", "type", "param", "code"})
            target = f"{method.decode()} {path.decode()}"
            self.assertEqual(error["message"], f"Invalid URL ({target})")


class OtherEndpointTests(SynchronousTestCase):
    """Models, text completions, embeddings and the echo headers."""

    def test_models_lists_configured_model(self) -> None:
        """GET /v1/models is a list object that includes the configured model."""
        exchange = _Exchange(MockConfig(model="custom-model"))
        exchange.send(b"GET", b"/v1/models")
        response = exchange.response()
        self.assertEqual(response.status, 200)
        listing = response.json()
        self.assertEqual(listing["object"], "list")
        ids = [model["id"] for model in listing["data"]]
        self.assertIn("custom-model", ids)
        self.assertEqual(len(ids), len(set(ids)))
        self.assertEqual({model["object"] for model in listing["data"]}, {"model"})

    def test_models_head_says_the_length(self) -> None:
        """HEAD /v1/models is a 200 with the Content-Length of the GET's body and no body."""
        exchange = _Exchange()
        exchange.send(b"GET", b"/v1/models")
        length = len(exchange.response().body)
        exchange = _Exchange()
        exchange.send(b"HEAD", b"/v1/models")
        head, _, rest = exchange.transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertIn(b"\r\nContent-Length: %d" % (length,), head)
        self.assertEqual(rest, b"")

    def test_echoes_received_headers(self) -> None:
        """The upstream name and the received Authorization, Host and x-request-id come back."""
        exchange = _Exchange(MockConfig(name="east"))
        headers = {b"Authorization": b"Bearer sk-test", b"x-request-id": b"req-42"}
        exchange.send(b"GET", b"/v1/models", headers=headers)
        response = exchange.response()
        self.assertEqual(response.header(b"x-mock-upstream"), b"east")
        self.assertEqual(response.header(b"x-mock-saw-authorization"), b"Bearer sk-test")
        self.assertEqual(response.header(b"x-mock-saw-host"), b"mock.test")
        self.assertEqual(response.header(b"x-mock-saw-request-id"), b"req-42")

    def test_no_authorization_no_echo(self) -> None:
        """Without an Authorization header, none is echoed."""
        exchange = _Exchange()
        exchange.send(b"GET", b"/v1/models")
        self.assertIsNone(exchange.response().header(b"x-mock-saw-authorization"))

    def test_text_completion_plain(self) -> None:
        """POST /v1/completions answers a text_completion with text and usage."""
        exchange = _Exchange(MockConfig(chunks=3, chunk_size=4))
        exchange.send(b"POST", b"/v1/completions", {"model": "m", "prompt": "once upon a time"})
        exchange.drain()
        answer = exchange.response().json()
        self.assertEqual(answer["object"], "text_completion")
        self.assertEqual(len(answer["choices"][0]["text"]), 12)
        self.assertEqual(answer["choices"][0]["finish_reason"], "stop")
        self.assertEqual(answer["usage"]["prompt_tokens"], 4)
        self.assertEqual(answer["usage"]["total_tokens"], 7)

    def test_text_completion_streamed(self) -> None:
        """A streamed text completion sends text_completion chunks, a stop and [DONE]."""
        exchange = _Exchange(MockConfig(chunks=3, chunk_size=4))
        body = {"prompt": "hi", "stream": True, "stream_options": {"include_usage": True}}
        exchange.send(b"POST", b"/v1/completions", body)
        exchange.drain()
        response = exchange.response()
        self.assertTrue(response.complete)
        events = _events(response.body)
        self.assertEqual(events[-1], "[DONE]")
        self.assertEqual({e["object"] for e in events[:-1]}, {"text_completion"})
        self.assertEqual("".join(e["choices"][0]["text"] for e in events[:3]), "lorem ipsum ")
        self.assertEqual(events[3]["choices"][0]["finish_reason"], "stop")
        self.assertEqual(events[4]["choices"], [])
        self.assertEqual(events[4]["usage"]["completion_tokens"], 3)

    def test_embeddings_shape_and_determinism(self) -> None:
        """Embeddings give one deterministic 8-float vector per input, with usage."""
        exchange = _Exchange()
        exchange.send(b"POST", b"/v1/embeddings", {"model": "e", "input": ["a b", "c", "a b"]})
        exchange.drain()
        answer = exchange.response().json()
        self.assertEqual(answer["object"], "list")
        self.assertEqual(answer["model"], "e")
        self.assertEqual(answer["usage"], {"prompt_tokens": 5, "total_tokens": 5})
        data = answer["data"]
        self.assertEqual([item["index"] for item in data], [0, 1, 2])
        self.assertEqual({item["object"] for item in data}, {"embedding"})
        vectors = [item["embedding"] for item in data]
        self.assertEqual([len(v) for v in vectors], [8, 8, 8])
        self.assertEqual(vectors[0], vectors[2])
        self.assertNotEqual(vectors[0], vectors[1])
        self.assertTrue(all(-1 <= x <= 1 for v in vectors for x in v))

    def test_embeddings_single_string_and_base64(self) -> None:
        """A single string input works, and base64 encoding packs the same float32 values."""
        plain = _Exchange()
        plain.send(b"POST", b"/v1/embeddings", {"input": "hello"})
        plain.drain()
        packed = _Exchange()
        packed.send(b"POST", b"/v1/embeddings", {"input": "hello", "encoding_format": "base64"})
        packed.drain()
        vector = plain.response().json()["data"][0]["embedding"]
        raw = base64.b64decode(packed.response().json()["data"][0]["embedding"])
        decoded = struct.unpack("<8f", raw)
        for expected, got in zip(vector, decoded, strict=True):
            self.assertAlmostEqual(expected, got, places=5)

    def test_embeddings_bad_input_is_400(self) -> None:
        """An embeddings request without usable input names the parameter."""
        exchange = _Exchange()
        exchange.send(b"POST", b"/v1/embeddings", {"input": 3})
        response = exchange.response()
        self.assertEqual(response.status, 400)
        self.assertEqual(response.json()["error"]["param"], "input")


class CommandLineTests(SynchronousTestCase):
    """The twistd options, the service they build, and the argparse entry point."""

    def test_options_to_config(self) -> None:
        """MockOptions turns milliseconds into seconds and collects repeated --listen."""
        options = MockOptions()
        options.parseOptions(
            ["--listen", "tcp:0", "--listen", "tcp:8080", "--chunks", "3", "--delay-ms", "250"]
        )
        self.assertEqual(options["listen"], ["tcp:0", "tcp:8080"])
        config = options.config()
        self.assertEqual((config.chunks, config.delay), (3, 0.25))

    def test_options_default_listen_and_validation(self) -> None:
        """Without --listen the mock listens on tcp:9001; out-of-range values are usage errors."""
        options = MockOptions()
        options.parseOptions([])
        self.assertEqual(options["listen"], ["tcp:9001"])
        self.assertRaises(usage.UsageError, MockOptions().parseOptions, ["--chunk-size", "0"])

    def test_make_mock_service_listens_on_each_endpoint(self) -> None:
        """The service listens with a mock Site on every --listen endpoint."""
        options = MockOptions()
        options.parseOptions(["--listen", "tcp:0", "--listen", "tcp:8080", "--name", "svc"])
        reactor = MemoryReactorClock()
        service = make_mock_service(options, reactor)
        self.assertIsInstance(service, Listeners)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual([port for port, *_ in reactor.tcpServers], [0, 8080])
        factory = reactor.tcpServers[0][1]
        self.assertIsInstance(factory, Site)

    def test_parse_args(self) -> None:
        """The argparse entry point builds the config and defaults to tcp:9001."""
        config, listens = _parse_args(["--name", "b", "--first-token-ms", "1500"])
        self.assertEqual((config.name, config.first_token_delay), ("b", 1.5))
        self.assertEqual(listens, ["tcp:9001"])
        _, listens = _parse_args(["--listen", "tcp:1", "--listen", "unix:/tmp/m.sock"])
        self.assertEqual(listens, ["tcp:1", "unix:/tmp/m.sock"])


class CollectorTests(SynchronousTestCase):
    """Both entry points set the collector as the proxy's do (tune_mock_collector)."""

    def test_plugin_tunes_the_collector(self) -> None:
        """C{twistd oaiproxy-mock} tunes the collector with the proxy's defaults."""
        import twisted.plugins
        from twisted.application.service import IServiceMaker
        from twisted.internet import reactor
        from twisted.plugin import getPlugins

        import oaiproxy.mock

        tuned: list[tuple[object, int | None, bool]] = []
        self.patch(
            oaiproxy.mock,
            "tune_collector",
            lambda reactor, *, threshold, freeze: tuned.append((reactor, threshold, freeze)),
        )
        [maker] = [
            p for p in getPlugins(IServiceMaker, twisted.plugins) if p.tapname == "oaiproxy-mock"
        ]
        options = maker.options()
        options.parseOptions(["--listen", "tcp:0"])
        maker.makeService(options)
        self.assertEqual(tuned, [(reactor, 10_000, True)])


class CollectorProcessTests(TestCase):
    """C{python -m oaiproxy.mock}, as a process: it freezes its start-up heap once running."""

    timeout = 60

    async def test_main_freezes_start_up(self) -> None:
        """The log of a mock started from the command line says its start-up was frozen."""
        import sys

        from twisted.internet import reactor
        from twisted.internet.protocol import ProcessProtocol

        frozen: Deferred[None] = Deferred()
        ended: Deferred[None] = Deferred()

        class Watch(ProcessProtocol):
            seen = b""

            def errReceived(self, data: bytes) -> None:
                self.seen += data
                if b"objects of start-up frozen" in self.seen and not frozen.called:
                    frozen.callback(None)

            def processEnded(self, reason: Failure) -> None:
                ended.callback(None)
                if not frozen.called:
                    frozen.errback(AssertionError(self.seen.decode("utf-8", "replace")))

        import os
        from pathlib import Path

        import oaiproxy

        # This checkout's package, not one installed elsewhere.
        env = dict(os.environ, PYTHONPATH=str(Path(oaiproxy.__file__).parent.parent))
        argv = [sys.executable, "-m", "oaiproxy.mock", "--listen", "tcp:0:interface=127.0.0.1"]
        process = reactor.spawnProcess(Watch(), sys.executable, argv, env=env)

        def stop() -> Deferred[None]:
            # A cleanup: it runs even when the test fails or times out.
            if not ended.called:
                process.signalProcess("KILL")
            return ended

        self.addCleanup(stop)
        await frozen
