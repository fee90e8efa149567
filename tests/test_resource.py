"""The HTTP edge in memory: routes, local answers, body checks, the error shape."""

from __future__ import annotations

import ctypes
import itertools
import json
import sys
from typing import Any

from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.http import Request as HTTPRequest

from oaiproxy.config import Limits
from oaiproxy.http.early import reason_phrase
from oaiproxy.http.h1server import H1Channel
from oaiproxy.http.h2fix import ProxyH2Connection
from oaiproxy.http.relay import _writable
from oaiproxy.http.resource import ProxyRequest, _Body
from tests.support.fakes import forbid_temporary_files, make_harness, parse_response, post
from tests.support.servers import connect_h2, raw_exchange, start_mock, start_proxy, within


def error_of(raw: bytes) -> tuple[int, dict[str, object], dict[bytes, list[bytes]]]:
    status, headers, body = parse_response(raw)
    error = json.loads(body)["error"]
    return status, error, headers


class RouteTests(SynchronousTestCase):
    """What is answered locally."""

    def test_dot_segments_refused(self) -> None:
        """
        A path with a '.' or '..' segment, plain, percent-encoded or behind an encoded slash
        or a backslash, is a 400 and never forwarded: it would leave the upstream's base path.
        """
        for path in [
            b"/v1/../admin",
            b"/v1/files/..",
            b"/v1/./models",
            b"/v1/%2e%2e/admin",
            b"/v1/%2E./admin",
            b"/v1/..%2fadmin",
            b"/v1/..%5Cadmin",
            b"/v1/..\\admin",
        ]:
            with self.subTest(path=path):
                h = make_harness()
                _, transport = h.send(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
                status, error, _ = error_of(transport.value())
                self.assertEqual((status, error["type"]), (400, "invalid_request_error"))
                self.assertEqual(h.sent(), [])

    def test_dots_inside_segments_forwarded(self) -> None:
        """Dots inside a segment (a model or file name) are no dot segments."""
        for path in [b"/v1/models/gpt-4.1", b"/v1/files/data..jsonl", b"/v1/files/.hidden"]:
            with self.subTest(path=path):
                h = make_harness()
                h.send(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
                self.assertEqual(len(h.sent()), 1)

    def test_http11_needs_one_host(self) -> None:
        """RFC 9112 3.2: an HTTP/1.1 request with no Host, or two, is a 400, not forwarded."""
        for head in [
            b"GET /v1/models HTTP/1.1\r\n\r\n",
            b"GET /v1/models HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        ]:
            with self.subTest(head=head):
                h = make_harness()
                _, transport = h.send(head)
                status, error, _ = error_of(transport.value())
                self.assertEqual((status, error["code"]), (400, "invalid_request"))
                self.assertEqual(h.sent(), [])

    def test_http10_without_host_forwarded(self) -> None:
        """HTTP/1.0 has no Host requirement."""
        h = make_harness()
        h.send(b"GET /v1/models HTTP/1.0\r\n\r\n")
        self.assertEqual(len(h.sent()), 1)

    def test_healthz(self) -> None:
        """GET /healthz answers 200 JSON without touching an upstream."""
        h = make_harness()
        _, transport = h.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _headers, body = parse_response(transport.value())
        self.assertEqual((status, json.loads(body)), (200, {"status": "ok"}))
        self.assertEqual(h.sent(), [])

    def test_healthz_post_405(self) -> None:
        """POST /healthz is 405 JSON, with the methods it takes."""
        h = make_harness()
        _, transport = h.send(post(b"/healthz", b"{}"))
        status, error, headers = error_of(transport.value())
        self.assertEqual((status, error["code"]), (405, "method_not_allowed"))
        self.assertEqual(headers[b"allow"], [b"GET, HEAD"])

    def test_other_methods_405(self) -> None:
        """
        Methods outside GET, HEAD, POST, PUT, PATCH, DELETE and OPTIONS are not forwarded:
        405 JSON with Allow. TRACE would echo credentials; methods are case-sensitive.
        """
        for method in (b"TRACE", b"CONNECT", b"FOO", b"get", b"PROPFIND"):
            h = make_harness()
            _, transport = h.send(method + b" /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            status, error, headers = error_of(transport.value())
            self.assertEqual((status, error["code"]), (405, "method_not_allowed"), method)
            self.assertEqual(headers[b"allow"], [b"DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"])
            self.assertEqual(h.sent(), [])

    def test_unknown_path_404(self) -> None:
        """Paths outside /v1 get an OpenAI-shaped 404 with all four keys and a request id."""
        h = make_harness()
        _, transport = h.send(b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n")
        status, error, headers = error_of(transport.value())
        self.assertEqual(status, 404)
        self.assertEqual(set(error), {"message", "type", "param", "code"})
        self.assertEqual(error["type"], "invalid_request_error")
        self.assertIn(b"x-request-id", headers)
        self.assertEqual(h.sent(), [])

    def test_prefix_lookalike_404(self) -> None:
        """/v10/... is not /v1/..."""
        h = make_harness()
        _, transport = h.send(b"GET /v10/models HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(parse_response(transport.value())[0], 404)

    def test_any_v1_path_forwarded(self) -> None:
        """Endpoints the proxy does not know are forwarded all the same, method and all."""
        h = make_harness()
        h.send(b"DELETE /v1/files/file-abc HTTP/1.1\r\nHost: x\r\n\r\n")
        (sent,) = h.sent()
        self.assertEqual(
            (sent.method, sent.uri), (b"DELETE", b"http://a.invalid:9000/v1/files/file-abc")
        )


class BodyTests(SynchronousTestCase):
    """JSON checks and the body cap."""

    def test_malformed_json_400_not_forwarded(self) -> None:
        """Bad JSON on a JSON endpoint is 400 invalid_request_error and never forwarded."""
        h = make_harness()
        _, transport = h.send(post(b"/v1/chat/completions", b'{"model": '))
        status, error, _ = error_of(transport.value())
        self.assertEqual((status, error["type"]), (400, "invalid_request_error"))
        self.assertEqual(h.sent(), [])

    def test_json_endpoint_whatever_content_type(self) -> None:
        """A JSON endpoint is checked even when the client claims another content type."""
        h = make_harness()
        raw = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 4\r\n\r\nnope"
        )
        _, transport = h.send(raw)
        self.assertEqual(parse_response(transport.value())[0], 400)

    def test_not_quite_json_400(self) -> None:
        """
        What Python's parser takes but JSON is not (NaN, Infinity), and nesting deeper than
        the parser goes, are 400 invalid_json and never forwarded (not a 500).
        """
        deep = b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}"
        for body in (b'{"x": NaN}', b'{"x": -Infinity}', b'{"x": [Infinity]}', deep):
            h = make_harness()
            _, transport = h.send(post(b"/v1/embeddings", body))
            status, error, _ = error_of(transport.value())
            self.assertEqual((status, error["code"]), (400, "invalid_json"), body[:20])
            self.assertEqual(h.sent(), [])

    def test_non_object_json_400(self) -> None:
        """A JSON array is not a request."""
        h = make_harness()
        _, transport = h.send(post(b"/v1/embeddings", b"[1, 2]"))
        self.assertEqual(parse_response(transport.value())[0], 400)

    def test_multipart_not_parsed(self) -> None:
        """A multipart upload (audio, files) is forwarded as it is."""
        h = make_harness()
        raw = (
            b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 5\r\n\r\n--b--"
        )
        h.send(raw)
        self.assertEqual(h.sent()[0].body, b"--b--")

    def test_stream_flag_and_model_read(self) -> None:
        """The JSON body's stream flag reaches the upstream request (identity encoding)."""
        h = make_harness()
        h.send(post(b"/v1/chat/completions", b'{"model": "m", "stream": true}'))
        self.assertEqual(h.sent()[0].headers.getRawHeaders(b"accept-encoding"), [b"identity"])

    def test_default_cap_is_32_mib(self) -> None:
        """
        With the default limits a body of 32 MiB is taken and one byte more gets 413 before
        any of it is read (images in base64 are large).
        """
        h = make_harness()
        proto, transport = h.connect()
        head = b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
        proto.dataReceived(head % (32 * 1024 * 1024 + 1))
        status, error, _ = error_of(transport.value())
        self.assertEqual((status, error["code"]), (413, "request_too_large"))
        proto, transport = h.connect()
        proto.dataReceived(head % (32 * 1024 * 1024))
        self.assertEqual(transport.value(), b"")  # waiting for the body
        self.assertFalse(transport.disconnecting)

    def test_known_length_over_cap_413_at_once(self) -> None:
        """
        A Content-Length over the cap gets 413 and a close before the body is read; it is
        logged with its request id.
        """
        h = make_harness(limits=Limits(max_body_bytes=100))
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]  # annotated for unittest.TestCase
        proto, transport = h.connect()
        proto.dataReceived(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
        )
        status, error, headers = error_of(transport.value())
        self.assertEqual((status, error["code"]), (413, "request_too_large"))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(h.sent(), [])
        [request_id] = headers[b"x-request-id"]
        lines = [formatEvent(e) for e in events]
        self.assertTrue(
            any("413 request_too_large" in x and request_id.decode() in x for x in lines), lines
        )

    def test_chunked_over_cap_413(self) -> None:
        """A chunked body that grows past the cap gets 413 and a close."""
        h = make_harness(limits=Limits(max_body_bytes=100))
        proto, transport = h.connect()
        proto.dataReceived(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        proto.dataReceived(b"80\r\n" + b"x" * 128 + b"\r\n")
        self.assertEqual(parse_response(transport.value())[0], 413)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(h.sent(), [])

    def test_chunked_over_cap_answered_once(self) -> None:
        """A chunked body over the cap that ends in the same read still gets one answer only."""
        h = make_harness(limits=Limits(max_body_bytes=100))
        proto, transport = h.connect()
        proto.dataReceived(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"80\r\n"
            + b"x" * 128
            + b"\r\n0\r\n\r\n"
        )
        self.assertEqual(transport.value().count(b"HTTP/1.1 "), 1)
        self.assertEqual(h.sent(), [])

    def test_under_cap_forwarded(self) -> None:
        """A body at the cap is fine."""
        h = make_harness(limits=Limits(max_body_bytes=16 * 1024 * 1024))
        body = json.dumps({"input": "x" * 200_000}).encode()
        h.send(post(b"/v1/embeddings", body))
        self.assertEqual(h.sent()[0].body, body)

    def test_bodies_never_on_disk(self) -> None:
        """
        Bodies are held in memory whatever their framing and size: Twisted's request would put
        one of unknown length (chunked), or of 100,000 bytes or more, in a temporary file.
        """
        forbid_temporary_files(self)
        large = json.dumps({"input": "x" * 150_000}).encode()
        h = make_harness()
        h.send(post(b"/v1/embeddings", large))
        chunked = (
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: application/json\r\n\r\n"
            b'5\r\n{"a":\r\n'
            b"3\r\n 1}\r\n0\r\n\r\n"
        )
        h.send(chunked)
        self.assertEqual([sent.body for sent in h.sent()], [large, b'{"a": 1}'])

    def test_bad_request_id_replaced(self) -> None:
        """A client request id with spaces or too long is replaced by a generated one."""
        for given in [b"a" * 300, b"a b", b"caf\xc3\xa9", b"a\x7f"]:
            h = make_harness()
            h.send(post(b"/v1/embeddings", b"{}", b"X-Request-Id: " + given + b"\r\n"))
            sent = h.sent()[0].headers.getRawHeaders(b"x-request-id", [b""])[0]
            self.assertEqual(len(sent), 32, given)
        h = make_harness()
        h.send(post(b"/v1/embeddings", b"{}", b"X-Request-Id: req-~!42\r\n"))
        self.assertEqual(h.sent()[0].headers.getRawHeaders(b"x-request-id"), [b"req-~!42"])

    def test_unprintable_target_400(self) -> None:
        """
        A request target with bytes outside printable ASCII is refused (by Twisted's parser,
        or by the resource's own check behind it), never forwarded.
        """
        for target in [b"/v1/models\x7f", b"/v1/mod\xc3\xa9ls", b"/v1/models?q=\x80"]:
            h = make_harness()
            _, transport = h.send(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % target)
            status, _, body = parse_response(transport.value())
            self.assertEqual(status, 400, target)
            self.assertEqual(json.loads(body)["error"]["code"], "invalid_request")
            self.assertEqual(h.sent(), [])


class BodyBufferTests(SynchronousTestCase):
    """The in-memory body behaves as the file Twisted's request expects."""

    def test_file_semantics(self) -> None:
        """Written pieces read back whole; tell, seek and sized reads as for a file."""
        body = _Body()
        for piece in (b"abc", b"", b"defg"):
            body.write(piece)
        self.assertEqual(body.tell(), 7)
        self.assertEqual(body.seek(0, 0), 0)
        self.assertEqual(body.read(), b"abcdefg")
        self.assertEqual(body.read(), b"")
        body.seek(2)
        self.assertEqual((body.read(3), body.tell()), (b"cde", 5))
        self.assertEqual(body.seek(-1, 2), 6)
        self.assertEqual(body.read(10), b"g")
        body.close()
        self.assertEqual((body.tell(), body.read()), (0, b""))


class ReasonPhraseTests(SynchronousTestCase):
    """Reason phrases for every status the proxy answers with."""

    def test_phrases(self) -> None:
        """Twisted's table where it has one; the standard one for 429 and 431."""
        self.assertEqual(reason_phrase(404), b"Not Found")
        self.assertEqual(reason_phrase(429), b"Too Many Requests")
        self.assertEqual(reason_phrase(431), b"Request Header Fields Too Large")
        self.assertEqual(reason_phrase(599), b"Error")


class _RecordingChannel:
    """What a request writes through its channel, in order."""

    site = None
    factory = None

    def __init__(self) -> None:
        self.transport = StringTransport()
        self.calls: list[tuple[str, Any]] = []

    def getPeer(self) -> Any:
        return self.transport.getPeer()

    def getHost(self) -> Any:
        return self.transport.getHost()

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        self.calls.append(("head", (version, code, reason, list(headers.getAllRawHeaders()))))

    def write(self, data: bytes) -> None:
        self.calls.append(("write", data))

    def writeSequence(self, data: Any) -> None:
        self.calls.append(("writeSequence", list(data)))


class WriteTests(SynchronousTestCase):
    """ProxyRequest's write does what Twisted's http.Request.write does, head included."""

    def outcome(
        self, lean: bool, version: bytes, method: bytes, code: int, length: list[bytes] | None
    ) -> Any:
        channel = _RecordingChannel()
        request: Any = ProxyRequest(channel, parsePOSTFormSubmission=False)
        request.clientproto, request.method = version, method
        request.setResponseCode(code)
        request.responseHeaders.setRawHeaders(b"x-a", [b"1"])
        if length is not None:  # [] as a Content-Length with no value: none, for Twisted
            request.responseHeaders.setRawHeaders(b"content-length", length)
        for data in (b"hello", b"", b"more"):
            # As callers do: the request's write each time (an instance's own, once Twisted
            # or ProxyRequest put one there for a response without a body).
            if lean or "write" in vars(request):
                request.write(data)
            else:
                HTTPRequest.write(request, data)
        return channel.calls, request.chunked, request.sentLength, "write" in vars(request)

    def test_as_twisted(self) -> None:
        for version, method, code, length in itertools.product(
            (b"HTTP/1.1", b"HTTP/1.0"),
            (b"GET", b"HEAD", b"POST"),
            (200, 204, 304, 500),
            ([b"5"], [], None),
        ):
            with self.subTest(version=version, method=method, code=code, length=length):
                self.assertEqual(
                    self.outcome(True, version, method, code, length),
                    self.outcome(False, version, method, code, length),
                )

    def test_relay_writable_as_twisteds_swap(self) -> None:
        """
        Once the head is out, the relay writes past the request exactly when neither Twisted's
        write nor ProxyRequest's swapped in one that drops (HEAD, 204, 304).
        """
        for lean, method, code in itertools.product(
            (True, False), (b"GET", b"HEAD", b"POST"), (200, 204, 304, 500)
        ):
            channel = _RecordingChannel()
            request: Any = ProxyRequest(channel, parsePOSTFormSubmission=False)
            request.clientproto, request.method = b"HTTP/1.1", method
            request.setResponseCode(code)
            if lean:
                request.write(b"")
            else:
                HTTPRequest.write(request, b"")
            with self.subTest(lean=lean, method=method, code=code):
                self.assertEqual(_writable(request), "write" not in vars(request))

    def test_constructor_sets_what_twisteds_do(self) -> None:
        """ProxyRequest's constructor leaves the state Twisted's constructors leave."""
        from twisted.web import server

        channel: Any = _RecordingChannel()
        ours = vars(ProxyRequest(channel))
        twisted = vars(server.Request(channel, False, parsePOSTFormSubmission=False))
        # What no request changes is set once, on the class: equal values, read-only.
        on_class = {"queued", "_parsePOSTFormSubmission", "received_cookies", "cookies"}
        self.assertEqual(sorted(ours), sorted(set(twisted) - on_class))
        for name in ("channel", "transport", "client", "host"):
            self.assertEqual(ours[name], twisted[name], name)
        request: Any = ProxyRequest(channel)
        for name in on_class:
            self.assertEqual(type(twisted[name])(getattr(request, name)), twisted[name], name)
        with self.assertRaises(TypeError):
            request.received_cookies[b"a"] = b"b"  # shared: never written

    def test_cookie_added(self) -> None:
        """A cookie added goes on a list of the request's own; the class's stays empty."""
        channel: Any = _RecordingChannel()
        request: Any = ProxyRequest(channel)
        request.addCookie(b"a", b"b")
        self.assertEqual(request.cookies, [b"a=b"])
        self.assertEqual(ProxyRequest(channel).cookies, ())
        self.assertEqual(ProxyRequest.cookies, ())


class RequestLayoutTests(TestCase):
    """A request object keeps few attributes of its own, whatever its answer."""

    async def test_few_names(self) -> None:
        """
        Whole and streamed answers set at most 29 attribute names on their requests, all
        told: past that, CPython 3.11 turns each request's attributes into a dictionary
        when it sets one more (slower to read for the rest of its life).
        """
        mock = start_mock(self, "a")
        proxy = start_proxy(self, [mock.upstream()])
        names: list[set[str]] = []
        channels: list[Any] = []
        finish = ProxyRequest.finish

        def recording(request: ProxyRequest) -> None:
            channels.append(request.channel)
            finish(request)
            names.append(set(vars(request)))  # at the end: vars() makes the dictionary

        self.patch(ProxyRequest, "finish", recording)
        for stream in (False, True):
            body = json.dumps({"model": "m", "stream": stream, "messages": []}).encode()
            raw = await raw_exchange(
                proxy.http_port,
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body),
            )
            self.assertTrue(raw.startswith(b"HTTP/1.1 200 "), raw[:100])
        self.assertEqual(len(names), 2)
        every = set().union(*names) | {"channel", "content"}  # set, then deleted by finish
        self.assertLessEqual(len(every), 29, sorted(every))
        self.assertIn("chunked", names[1])  # the streamed answer's request set its names
        on_class = {"queued", "_parsePOSTFormSubmission", "received_cookies", "cookies"}
        on_class |= {"args", "prepath", "postpath"}
        self.assertEqual([n & on_class for n in names], [set(), set()])
        # Their HTTP/1.1 channels too (their own state is in slots).
        for channel in channels:
            self.assertIsInstance(channel, H1Channel)
            self.assertLessEqual(len(vars(channel)), 29, sorted(vars(channel)))

    async def test_compact_after_a_burst(self) -> None:
        """
        Requests started together before any finished leave those after them with their
        attributes in CPython 3.11's compact array (not a dictionary).
        """
        if sys.implementation.name != "cpython" or sys.version_info[:2] != (3, 11):
            raise SkipTest("reads CPython 3.11's object layout")
        mock = start_mock(self, "a")
        proxy = start_proxy(self, [mock.upstream()])
        compact: list[bool] = []
        finish = ProxyRequest.finish

        def recording(request: ProxyRequest) -> None:
            finish(request)
            compact.append(_compact(request))

        self.patch(ProxyRequest, "finish", recording)

        def raw(stream: bool) -> bytes:
            body = json.dumps({"model": "m", "stream": stream, "messages": []}).encode()
            return (
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )

        burst = [ensureDeferred(raw_exchange(proxy.http_port, raw(True))) for _ in range(12)]
        await gatherResults(burst)
        for stream in (False, True):
            await raw_exchange(proxy.http_port, raw(stream))
        self.assertEqual(len(compact), 14)
        self.assertEqual(compact[-2:], [True, True])

    async def test_few_names_http2(self) -> None:
        """And an HTTP/2 connection, whose state is Twisted's and the proxy's."""
        mock = start_mock(self, "a")
        proxy = start_proxy(self, [mock.upstream()])
        streams: list[Any] = []
        finish = ProxyRequest.finish

        def recording(request: ProxyRequest) -> None:
            streams.append(request.channel)
            finish(request)

        self.patch(ProxyRequest, "finish", recording)
        client = await connect_h2(self, proxy)
        for stream in (False, True):
            body = json.dumps({"model": "m", "stream": stream, "messages": []}).encode()
            response = client.request(b"/v1/chat/completions", body)
            await within(response.done, "the answer")
            self.assertEqual(response.status, 200)
        [connection] = {id(s._conn): s._conn for s in streams}.values()
        self.assertIsInstance(connection, ProxyH2Connection)
        self.assertLessEqual(len(vars(connection)), 29, sorted(vars(connection)))


def _compact(obj: object) -> bool:
    """
    Whether C{obj} keeps its attributes in CPython 3.11's compact array: the pointer to it,
    two words before the object's garbage collector header, is set (a dictionary made for
    the object takes the array and clears it).
    """
    word = ctypes.sizeof(ctypes.c_void_p)
    return bool(ctypes.c_void_p.from_address(id(obj) - 4 * word).value)
