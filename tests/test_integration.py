"""
The proxy end to end over real loopback sockets, with real clients: the openai SDK, httpx
(HTTP/1.1 and HTTP/2 over TLS), curl, and a raw C{h2} client, against mock upstreams.

The blocking clients run in threads (C{deferToThread}) so the reactor keeps serving; each
closes its connections before its thread returns.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import socket
import ssl
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import httpx
import httpx2
import openai
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageParam
from twisted.internet.defer import Deferred
from twisted.internet.testing import EventLoggingObserver
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, TestCase

from oaiproxy.config import Deadlines, Limits, UpstreamConfig
from tests.support.servers import (
    MockServer,
    ProxyServer,
    StreamWasReset,
    connect_h2,
    raw_exchange,
    reactor,
    refused_port,
    sse_events,
    start_mock,
    start_proxy,
    start_raw_upstream,
    wait_for,
    within,
)

_T = TypeVar("_T")

_MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "say hello"}]
#: What a mock answers by default: 8 chunks of 4 characters cut from its filler text.
_PIECES = ["lore", "m ip", "sum ", "dolo", "r si", "t am", "et c", "onse"]
_CONTENT = "".join(_PIECES)
#: Two words of prompt, one completion token per chunk.
_USAGE = (2, 8, 10)
_CHAT = json.dumps({"model": "mock-gpt", "messages": _MESSAGES}).encode()
_STREAM_CHAT = json.dumps({"model": "mock-gpt", "messages": _MESSAGES, "stream": True}).encode()
_ERROR_KEYS = {"message", "type", "param", "code"}
_SECRET = "sk-upstream-secret"


def _in_thread(call: Callable[[], _T]) -> Deferred[_T]:
    """Run a blocking client off the reactor thread."""
    return deferToThread(call)


def _http1() -> httpx.Client:
    return httpx.Client(timeout=30.0)


def _http2(proxy: ProxyServer) -> httpx.Client:
    """An HTTP/2 client that trusts the proxy's self-signed certificate."""
    context = ssl.create_default_context(cafile=proxy.cert_path)
    return httpx.Client(http2=True, verify=context, timeout=30.0)


def _sdk_http2(proxy: ProxyServer) -> httpx2.Client:
    """An HTTP/2 client for the SDK (whose own HTTP library is httpx2, httpx's successor)."""
    context = ssl.create_default_context(cafile=proxy.cert_path)
    return httpx2.Client(http2=True, verify=context, timeout=30.0)


def _sdk(base_url: str, http_client: httpx2.Client | None = None) -> openai.OpenAI:
    """The official SDK, without its own retries (they would hide what the proxy did)."""
    return openai.OpenAI(
        base_url=base_url, api_key="sk-test", max_retries=0, timeout=30.0, http_client=http_client
    )


def _post(
    url: str,
    body: bytes,
    headers: dict[str, str] | None = None,
    *,
    client: Callable[[], httpx.Client] = _http1,
) -> Deferred[httpx.Response]:
    """POST C{body} (JSON) in a thread; the response is read in full."""

    def call() -> httpx.Response:
        with client() as http:
            return http.post(
                url, content=body, headers={"content-type": "application/json", **(headers or {})}
            )

    return _in_thread(call)


def _get(url: str) -> Deferred[httpx.Response]:
    def call() -> httpx.Response:
        with _http1() as http:
            return http.get(url)

    return _in_thread(call)


def _assert_openai_error(
    test: TestCase, response: httpx.Response, status: int, error_type: str, code: str | None
) -> dict[str, Any]:
    """The response is an OpenAI-shaped JSON error with all four keys; returns the error."""
    test.assertEqual(response.status_code, status, response.text)
    test.assertEqual(response.headers.get("content-type"), "application/json")
    test.assertTrue(response.headers.get("x-request-id"))
    error: dict[str, Any] = response.json()["error"]
    test.assertEqual(set(error), _ERROR_KEYS)
    test.assertEqual(error["type"], error_type)
    test.assertEqual(error["code"], code)
    test.assertIsInstance(error["message"], str)
    return error


def _check_completion(test: TestCase, completion: ChatCompletion) -> None:
    test.assertEqual(completion.object, "chat.completion")
    test.assertEqual(completion.model, "mock-gpt")
    test.assertEqual(completion.choices[0].message.content, _CONTENT)
    test.assertEqual(completion.choices[0].finish_reason, "stop")
    usage = completion.usage
    assert usage is not None
    test.assertEqual((usage.prompt_tokens, usage.completion_tokens, usage.total_tokens), _USAGE)


def _check_stream(test: TestCase, chunks: list[ChatCompletionChunk]) -> None:
    """Eight content chunks, the finishing chunk, then the usage chunk, and nothing else."""
    test.assertEqual(len(chunks), len(_PIECES) + 2)
    contents = [chunk.choices[0].delta.content for chunk in chunks[: len(_PIECES)]]
    test.assertEqual(contents, _PIECES)
    test.assertEqual(chunks[len(_PIECES)].choices[0].finish_reason, "stop")
    test.assertEqual([chunk.usage for chunk in chunks[:-1]], [None] * (len(chunks) - 1))
    last = chunks[-1]
    test.assertEqual(last.choices, [])
    assert last.usage is not None
    usage = last.usage
    test.assertEqual((usage.prompt_tokens, usage.completion_tokens, usage.total_tokens), _USAGE)


def _assert_raw_openai_error(test: TestCase, raw: bytes, status: int, code: str) -> bytes:
    """C{raw} is one HTTP/1.1 response: C{status}, an OpenAI error with C{code}; its head."""
    head, _, body = raw.partition(b"\r\n\r\n")
    test.assertTrue(head.startswith(b"HTTP/1.1 %d " % status), head)
    error = json.loads(body)["error"]
    test.assertEqual(set(error), _ERROR_KEYS)
    test.assertEqual(error["code"], code)
    return head


class OpenAISDKTests(TestCase):
    """The official openai SDK through the proxy, over HTTP/1.1 and over HTTP/2 with TLS."""

    timeout = 60

    def setUp(self) -> None:
        self.mock = start_mock(self, "a")
        self.proxy = start_proxy(self, [self.mock.upstream()])

    async def test_chat_completion_http11(self) -> None:
        """A non-streamed chat completion over HTTP/1.1 has the mock's content and usage."""

        def call() -> ChatCompletion:
            with _sdk(f"{self.proxy.http_url}/v1") as client:
                return client.chat.completions.create(model="mock-gpt", messages=_MESSAGES)

        _check_completion(self, await _in_thread(call))

    async def test_streamed_chat_completion_http11(self) -> None:
        """A streamed chat completion over HTTP/1.1 yields every chunk, usage last."""

        def call() -> list[ChatCompletionChunk]:
            with _sdk(f"{self.proxy.http_url}/v1") as client:
                stream = client.chat.completions.create(
                    model="mock-gpt",
                    messages=_MESSAGES,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                return list(stream)

        _check_stream(self, await _in_thread(call))

    async def test_paced_stream_byte_for_byte_http11(self) -> None:
        """
        Events arriving one by one (10 ms apart, so each is relayed on its own, straight to
        the client's socket) reach an HTTP/1.1 client exactly as the upstream wrote them.
        """

        def call() -> bytes:
            with _http1() as http:
                response = http.post(
                    f"{self.proxy.http_url}/v1/chat/completions",
                    content=_STREAM_CHAT,
                    headers={
                        "content-type": "application/json",
                        "x-mock-chunks": "12",
                        "x-mock-delay-ms": "10",
                    },
                )
                return response.content

        body = await _in_thread(call)
        (seen,) = self.mock.requests
        self.assertEqual(body.count(b"data: "), 14)  # 12 pieces, the finish, [DONE]
        self.assertTrue(body.endswith(b"data: [DONE]\n\n"))
        self.assertEqual(hashlib.sha256(body).hexdigest(), seen.digest.hexdigest())

    async def test_chat_completion_http2(self) -> None:
        """A non-streamed chat completion over HTTP/2 with TLS: really h2, same answer."""

        def call() -> tuple[str, ChatCompletion]:
            with _sdk(f"{self.proxy.https_url}/v1", _sdk_http2(self.proxy)) as client:
                raw = client.chat.completions.with_raw_response.create(
                    model="mock-gpt", messages=_MESSAGES
                )
                return raw.http_response.http_version, raw.parse()

        version, completion = await _in_thread(call)
        self.assertEqual(version, "HTTP/2")
        _check_completion(self, completion)

    async def test_streamed_chat_completion_http2(self) -> None:
        """A streamed chat completion over HTTP/2 with TLS: really h2, every chunk, usage last."""

        def call() -> tuple[str, list[ChatCompletionChunk]]:
            with (
                _sdk(f"{self.proxy.https_url}/v1", _sdk_http2(self.proxy)) as client,
                client.chat.completions.with_streaming_response.create(
                    model="mock-gpt",
                    messages=_MESSAGES,
                    stream=True,
                    stream_options={"include_usage": True},
                ) as response,
            ):
                return response.http_version, list(response.parse())

        version, chunks = await _in_thread(call)
        self.assertEqual(version, "HTTP/2")
        _check_stream(self, chunks)

    async def test_models_and_embeddings(self) -> None:
        """GET /v1/models and an embeddings request (base64, the SDK's default) pass through."""

        def call() -> tuple[list[str], list[list[float]]]:
            with _sdk(f"{self.proxy.http_url}/v1") as client:
                models = [model.id for model in client.models.list()]
                embeddings = client.embeddings.create(
                    model="mock-embedding", input=["hello", "world"]
                )
                return models, [item.embedding for item in embeddings.data]

        models, vectors = await _in_thread(call)
        self.assertIn("mock-gpt", models)
        self.assertEqual([len(vector) for vector in vectors], [8, 8])
        self.assertNotEqual(vectors[0], vectors[1])
        self.assertEqual([seen.path for seen in self.mock.requests][:1], [b"/v1/models"])


class CurlTests(TestCase):
    """curl, a client with its own HTTP/2 stack (nghttp2), against the TLS listener."""

    timeout = 60

    async def test_curl_http2_stream(self) -> None:
        """curl --http2 streams a chat completion to [DONE], and reports HTTP version 2."""
        curl = shutil.which("curl")
        if curl is None:
            raise SkipTest("curl is not installed")
        mock = start_mock(self, "a")
        proxy = start_proxy(self, [mock.upstream()])
        out, err, code = await getProcessOutputAndValue(
            curl,
            [
                "--silent",
                "--show-error",
                "--no-buffer",
                "--http2",
                "--max-time",
                "30",
                "--cacert",
                proxy.cert_path,
                "--header",
                "content-type: application/json",
                "--data-binary",
                _STREAM_CHAT.decode(),
                "--write-out",
                "\n%{http_version} %{response_code}",
                f"{proxy.https_url}/v1/chat/completions",
            ],
            env=dict(os.environ),
        )
        self.assertEqual(code, 0, err)
        body, _, summary = out.rpartition(b"\n")
        self.assertEqual(summary, b"2 200")
        events = sse_events(body)
        self.assertEqual(events[-1], b"[DONE]")
        contents = [
            json.loads(event)["choices"][0]["delta"].get("content") for event in events[:8]
        ]
        self.assertEqual(contents, _PIECES)


class BalancingTests(TestCase):
    """Smooth weighted round robin, seen from a client."""

    timeout = 60

    async def test_weights_one_and_three(self) -> None:
        """Eight requests over upstreams weighted 1 and 3 go 2 and 6 ways, in SWRR order."""
        a = start_mock(self, "a")
        b = start_mock(self, "b")
        proxy = start_proxy(self, [a.upstream(weight=1), b.upstream(weight=3)])

        served = [upstream for _, upstream in await _served_by(proxy.http_url, 8)]
        self.assertEqual((served.count("a"), served.count("b")), (2, 6))
        self.assertEqual((len(a.requests), len(b.requests)), (2, 6))
        # Smooth: the light upstream is never picked twice in a row.
        self.assertNotIn(("a", "a"), list(itertools.pairwise(served)))


class HeaderTests(TestCase):
    """Credentials, Host and request ids on the way up and down."""

    timeout = 60

    async def test_upstream_key_replaces_client_key(self) -> None:
        """With key_env the upstream sees its own key, never the client's; no leak downstream."""
        mock = start_mock(self, "a")
        proxy = start_proxy(
            self,
            [mock.upstream(key_env="UPSTREAM_KEY")],
            environ={"UPSTREAM_KEY": _SECRET},
        )
        response = await _post(
            f"{proxy.http_url}/v1/chat/completions",
            _CHAT,
            {"authorization": "Bearer sk-client"},
        )
        self.assertEqual(response.status_code, 200)
        self.assertEqual(mock.requests[0].header(b"authorization"), f"Bearer {_SECRET}".encode())
        # The mock echoes what it saw (for this very check); nothing else may carry the key.
        self.assertEqual(response.headers["x-mock-saw-authorization"], f"Bearer {_SECRET}")
        self.assertNotIn(_SECRET.encode(), response.content)
        others = [
            (name, value)
            for name, value in response.headers.multi_items()
            if name != "x-mock-saw-authorization" and _SECRET in value
        ]
        self.assertEqual(others, [])

    async def test_upstream_key_not_in_error_answers(self) -> None:
        """When a keyed upstream cannot be reached, the error answer does not hold the key."""
        dead = UpstreamConfig(
            url=f"http://127.0.0.1:{refused_port(self)}/v1", key_env="UPSTREAM_KEY", name="dead"
        )
        proxy = start_proxy(self, [dead], environ={"UPSTREAM_KEY": _SECRET})
        response = await _post(
            f"{proxy.http_url}/v1/chat/completions",
            _CHAT,
            {"authorization": "Bearer sk-client"},
        )
        self.assertEqual(response.status_code, 502)
        self.assertNotIn(_SECRET.encode(), response.content)
        self.assertNotIn(_SECRET, str(response.headers))

    async def test_head_keeps_upstream_content_length(self) -> None:
        """
        A HEAD answer carries the upstream's Content-Length (that of the body a GET would
        get), over HTTP/1.1 and HTTP/2, and no body.
        """
        mock = start_mock(self, "a")
        proxy = start_proxy(self, [mock.upstream()])
        get = await _get(f"{proxy.http_url}/v1/models")
        self.assertEqual(get.status_code, 200)
        for url, client in (
            (proxy.http_url, _http1),
            (proxy.https_url, lambda: _http2(proxy)),
        ):

            def head(url: str = url, client: Callable[[], httpx.Client] = client) -> Any:
                with client() as http:
                    return http.head(f"{url}/v1/models")

            response = await _in_thread(head)
            self.assertEqual(response.status_code, 200, url)
            self.assertEqual(response.headers["content-length"], str(len(get.content)), url)
            self.assertEqual(response.content, b"", url)
        self.assertEqual(response.http_version, "HTTP/2")

    async def test_not_modified_keeps_content_length(self) -> None:
        """A 304 keeps the upstream's Content-Length; a 204 gets none."""
        for status, expected in ((b"304 Not Modified", "7"), (b"204 No Content", None)):
            raw = start_raw_upstream(self, b"HTTP/1.1 %s\r\nContent-Length: 7\r\n\r\n" % status)
            proxy = start_proxy(self, [raw])
            response = await _get(f"{proxy.http_url}/v1/files/f")
            self.assertEqual(response.status_code, int(status[:3]))
            self.assertEqual(response.headers.get("content-length"), expected, status)
            self.assertEqual(response.content, b"")

    async def test_upstream_hop_by_hop_headers_dropped(self) -> None:
        """
        Headers the upstream's Connection names, and Proxy-* headers, do not reach the client
        (Twisted's client keeps Connection apart, so the names it lists were relayed).
        """
        raw = start_raw_upstream(
            self,
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: secret\r\n"
            b"Proxy-Status: up; error=x\r\nX-Kept: yes\r\nContent-Type: application/json\r\n"
            b"Content-Length: 2\r\n\r\n{}",
        )
        proxy = start_proxy(self, [raw])
        response = await _post(f"{proxy.http_url}/v1/embeddings", b"{}")
        self.assertEqual((response.status_code, response.content), (200, b"{}"))
        self.assertEqual(response.headers.get("x-kept"), "yes")
        self.assertNotIn("x-hop", response.headers)
        self.assertNotIn("proxy-status", response.headers)

    async def test_invalid_upstream_status_502(self) -> None:
        """A status code that is not three digits from 100 to 599 is not HTTP: 502."""
        for status in (b"2000", b"099", b"000", b"600"):
            raw = start_raw_upstream(
                self, b"HTTP/1.1 %s OK\r\nContent-Length: 2\r\n\r\n{}" % status
            )
            proxy = start_proxy(self, [raw])
            response = await _post(f"{proxy.http_url}/v1/embeddings", b"{}")
            self.assertEqual(response.status_code, 502, status)
            self.assertEqual(set(response.json()["error"]), _ERROR_KEYS)

    async def test_connection_naming_no_header_ignored(self) -> None:
        """A Connection value that is not a header name names nothing: the answer is relayed."""
        raw = start_raw_upstream(
            self,
            b'HTTP/1.1 200 OK\r\nConnection: "x-hop", x y\r\nContent-Type: application/json'
            b"\r\nContent-Length: 2\r\n\r\n{}",
        )
        proxy = start_proxy(self, [raw])
        response = await _post(f"{proxy.http_url}/v1/embeddings", b"{}")
        self.assertEqual((response.status_code, response.content), (200, b"{}"))

    async def test_client_key_passes_without_key_env(self) -> None:
        """Without key_env the client's Authorization reaches the upstream unchanged."""
        mock = start_mock(self, "a")
        proxy = start_proxy(self, [mock.upstream()])
        response = await _post(
            f"{proxy.http_url}/v1/chat/completions",
            _CHAT,
            {"authorization": "Bearer sk-client"},
        )
        self.assertEqual(response.status_code, 200)
        self.assertEqual(response.headers["x-mock-saw-authorization"], "Bearer sk-client")
        self.assertEqual(mock.requests[0].header(b"authorization"), b"Bearer sk-client")

    async def test_host_from_upstream_url(self) -> None:
        """The upstream gets the Host of its URL, not the one the client sent."""
        mock = start_mock(self, "a")
        proxy = start_proxy(self, [mock.upstream()])
        response = await _post(
            f"{proxy.http_url}/v1/chat/completions", _CHAT, {"host": "evil.example"}
        )
        self.assertEqual(response.status_code, 200)
        expected = f"127.0.0.1:{mock.port}"
        self.assertEqual(response.headers["x-mock-saw-host"], expected)
        (seen,) = mock.requests
        self.assertEqual(seen.header(b"host"), expected.encode())
        self.assertEqual(seen.header(b"x-forwarded-for"), b"127.0.0.1")
        self.assertEqual(seen.header(b"x-forwarded-proto"), b"http")

    async def test_host_from_upstream_url_http2(self) -> None:
        """Over HTTP/2 too, the upstream's Host comes from its URL, not from :authority."""
        mock = start_mock(self, "a")
        proxy = start_proxy(self, [mock.upstream()])
        response = await _post(
            f"{proxy.https_url}/v1/chat/completions", _CHAT, client=lambda: _http2(proxy)
        )
        self.assertEqual(response.http_version, "HTTP/2")
        self.assertEqual(response.status_code, 200)
        self.assertEqual(response.headers["x-mock-saw-host"], f"127.0.0.1:{mock.port}")
        self.assertEqual(mock.requests[0].header(b"x-forwarded-proto"), b"https")

    async def test_hop_by_hop_headers_not_forwarded(self) -> None:
        """Hop-by-hop headers, and those the client's Connection names, stay at the proxy."""
        mock = start_mock(self, "a")
        proxy = start_proxy(self, [mock.upstream()])
        response = await _post(
            f"{proxy.http_url}/v1/chat/completions",
            _CHAT,
            {
                "connection": "keep-alive, x-private-hop",
                "x-private-hop": "secret",
                "keep-alive": "timeout=5",
                "proxy-authorization": "Basic c2VjcmV0",
                "x-end-to-end": "kept",
            },
        )
        self.assertEqual(response.status_code, 200)
        (seen,) = mock.requests
        for name in (b"x-private-hop", b"keep-alive", b"proxy-authorization"):
            self.assertIsNone(seen.header(name), name)
        self.assertEqual(seen.header(b"x-end-to-end"), b"kept")

    async def test_request_id_generated(self) -> None:
        """Without x-request-id, one is made, sent upstream and returned to the client."""
        mock = start_mock(self, "a")
        proxy = start_proxy(self, [mock.upstream()])
        response = await _post(f"{proxy.http_url}/v1/chat/completions", _CHAT)
        self.assertEqual(response.status_code, 200)
        request_id = response.headers.get("x-request-id")
        self.assertTrue(request_id)
        self.assertEqual(response.headers["x-mock-saw-request-id"], request_id)
        self.assertEqual(response.headers.get_list("x-request-id"), [request_id])

    async def test_request_id_passed_through(self) -> None:
        """A client's x-request-id goes upstream and comes back unchanged."""
        mock = start_mock(self, "a")
        proxy = start_proxy(self, [mock.upstream()])
        response = await _post(
            f"{proxy.http_url}/v1/chat/completions", _CHAT, {"x-request-id": "req-abc-123"}
        )
        self.assertEqual(response.status_code, 200)
        self.assertEqual(response.headers.get_list("x-request-id"), ["req-abc-123"])
        self.assertEqual(mock.requests[0].header(b"x-request-id"), b"req-abc-123")


def _dead(testcase: TestCase, name: str) -> UpstreamConfig:
    """An upstream on a port that refuses connections."""
    return UpstreamConfig(url=f"http://127.0.0.1:{refused_port(testcase)}/v1", name=name)


def _served_by(base: str, count: int) -> Deferred[list[tuple[int, str | None]]]:
    """Send C{count} chat requests in turn to the proxy at C{base}; the status and serving
    mock of each."""

    def call() -> list[tuple[int, str | None]]:
        with _http1() as client:
            answers = []
            for _ in range(count):
                response = client.post(
                    f"{base}/v1/chat/completions",
                    content=_CHAT,
                    headers={"content-type": "application/json"},
                )
                answers.append((response.status_code, response.headers.get("x-mock-upstream")))
            return answers

    return _in_thread(call)


class FailoverTests(TestCase):
    """Refused upstreams and upstream errors before anything went downstream."""

    timeout = 60

    async def test_refused_upstream_fails_over(self) -> None:
        """With one upstream refusing connections, every request is served by the other."""
        mock = start_mock(self, "b")
        proxy = start_proxy(self, [_dead(self, "dead"), mock.upstream()])

        self.assertEqual(await _served_by(proxy.http_url, 4), [(200, "b")] * 4)
        self.assertEqual(len(mock.requests), 4)

    async def test_all_refused_is_502(self) -> None:
        """With every upstream refusing, the client gets a 502 OpenAI error with Retry-After."""
        proxy = start_proxy(self, [_dead(self, "dead1"), _dead(self, "dead2")])
        response = await _post(f"{proxy.http_url}/v1/chat/completions", _CHAT)
        _assert_openai_error(self, response, 502, "api_error", "upstream_connect_failed")
        retry_after = response.headers.get("retry-after")
        assert retry_after is not None
        self.assertGreaterEqual(int(retry_after), 0)

    async def test_failing_upstream_5xx_fails_over(self) -> None:
        """
        An upstream that always answers 503 (or 500) is skipped: every request succeeds
        elsewhere.
        """
        for fault in (b"503", b"500"):
            failing = start_mock(self, "failing", fault=fault)
            healthy = start_mock(self, "healthy")
            proxy = start_proxy(self, [failing.upstream(), healthy.upstream()])

            self.assertEqual(await _served_by(proxy.http_url, 4), [(200, "healthy")] * 4, fault)
            self.assertEqual(len(healthy.requests), 4)
            # The failing upstream was really tried (else this test would prove nothing).
            self.assertGreaterEqual(len(failing.requests), 1)

    async def test_only_upstream_503_passes_through(self) -> None:
        """The only upstream's 503 reaches the client as it was, after one attempt."""
        mock = start_mock(self, "a")
        proxy = start_proxy(self, [mock.upstream()])
        response = await _post(
            f"{proxy.http_url}/v1/chat/completions", _CHAT, {"x-mock-fault": "503"}
        )
        self.assertEqual(response.status_code, 503)
        self.assertEqual(response.headers["x-mock-upstream"], "a")
        self.assertEqual(
            response.json()["error"]["message"],
            "The engine is currently overloaded (mock upstream)",
        )
        self.assertEqual(len(mock.requests), 1)

    async def test_all_upstreams_503_last_answer_passes_through(self) -> None:
        """When every upstream answers 503, each is tried once and the last 503 is relayed."""
        a = start_mock(self, "a")
        b = start_mock(self, "b")
        proxy = start_proxy(self, [a.upstream(), b.upstream()])
        response = await _post(
            f"{proxy.http_url}/v1/chat/completions", _CHAT, {"x-mock-fault": "503"}
        )
        self.assertEqual(response.status_code, 503)
        self.assertEqual((len(a.requests), len(b.requests)), (1, 1))
        self.assertEqual(response.json()["error"]["type"], "server_error")

    async def test_upstream_429_passes_through_with_retry_after(self) -> None:
        """The only upstream's 429 reaches the client with its Retry-After header."""
        mock = start_mock(self, "a")
        proxy = start_proxy(self, [mock.upstream()])
        response = await _post(
            f"{proxy.http_url}/v1/chat/completions", _CHAT, {"x-mock-fault": "429"}
        )
        self.assertEqual(response.status_code, 429)
        self.assertEqual(response.headers.get("retry-after"), "1")
        self.assertEqual(response.json()["error"]["code"], "rate_limit_exceeded")

    async def test_garbage_upstream_502(self) -> None:
        """An upstream that answers with bytes that are not HTTP gives the client a JSON 502."""
        mock = start_mock(self, "a")
        proxy = start_proxy(self, [mock.upstream()])
        response = await _post(
            f"{proxy.http_url}/v1/chat/completions", _CHAT, {"x-mock-fault": "garbage"}
        )
        _assert_openai_error(self, response, 502, "api_error", "upstream_protocol_error")

    async def test_garbage_upstream_fails_over(self) -> None:
        """An upstream that always answers garbage is skipped: every request succeeds."""
        garbage = start_mock(self, "garbage", fault=b"garbage")
        healthy = start_mock(self, "healthy")
        proxy = start_proxy(self, [garbage.upstream(), healthy.upstream()])

        def call() -> list[int]:
            with _http1() as client:
                return [
                    client.post(
                        f"{proxy.http_url}/v1/chat/completions",
                        content=_CHAT,
                        headers={"content-type": "application/json"},
                    ).status_code
                    for _ in range(4)
                ]

        self.assertEqual(await _in_thread(call), [200] * 4)
        self.assertGreaterEqual(len(garbage.requests), 1)

    async def test_hanging_upstream_504(self) -> None:
        """An upstream that never answers: 504 after the first-byte deadline, request cancelled."""
        mock = start_mock(self, "a")
        proxy = start_proxy(self, [mock.upstream()], deadlines=Deadlines(first_byte=0.2))
        response = await _post(
            f"{proxy.http_url}/v1/chat/completions", _CHAT, {"x-mock-fault": "hang"}
        )
        _assert_openai_error(self, response, 504, "api_error", "upstream_timeout")
        (seen,) = mock.requests
        self.assertFalse(await within(seen.ended, "the hanging upstream request to end"))


class MidStreamFailureTests(TestCase):
    """An upstream that drops mid-stream: an SSE error event and a clean end, never a hang."""

    timeout = 60

    def setUp(self) -> None:
        self.mock = start_mock(self, "a")
        self.proxy = start_proxy(self, [self.mock.upstream()])

    def check_events(self, body: bytes) -> None:
        events = sse_events(body)
        self.assertEqual(len(events), 4, events)
        contents = [json.loads(event)["choices"][0]["delta"]["content"] for event in events[:3]]
        self.assertEqual(contents, _PIECES[:3])
        error = json.loads(events[3])["error"]
        self.assertEqual(set(error), _ERROR_KEYS)
        self.assertEqual(error["code"], "upstream_disconnected")
        self.assertNotIn(b"[DONE]", body)

    async def test_sdk_sees_three_chunks_then_error(self) -> None:
        """The SDK yields the three chunks sent, then raises the proxy's upstream_disconnected."""

        def call() -> tuple[list[ChatCompletionChunk], openai.APIError | None]:
            chunks: list[ChatCompletionChunk] = []
            with _sdk(f"{self.proxy.http_url}/v1") as client:
                stream = client.chat.completions.create(
                    model="mock-gpt",
                    messages=_MESSAGES,
                    stream=True,
                    extra_headers={"x-mock-fault": "disconnect-after=3"},
                )
                try:
                    chunks.extend(stream)
                except openai.APIError as e:
                    return chunks, e
                return chunks, None

        chunks, error = await _in_thread(call)
        self.assertEqual([c.choices[0].delta.content for c in chunks], _PIECES[:3])
        assert error is not None, "the stream ended without an error"
        self.assertIsInstance(error.body, dict)
        assert isinstance(error.body, dict)
        self.assertEqual(error.body.get("code"), "upstream_disconnected")

    async def test_http11_error_event_and_clean_end(self) -> None:
        """Over HTTP/1.1: three events, the error event, then a complete chunked body."""
        # httpx raises if the chunked body ends without its last chunk: reading it all is the
        # check that the end was clean.
        response = await _post(
            f"{self.proxy.http_url}/v1/chat/completions",
            _STREAM_CHAT,
            {"x-mock-fault": "disconnect-after=3"},
        )
        self.assertEqual(response.status_code, 200)
        self.assertEqual(response.headers["content-type"], "text/event-stream")
        self.check_events(response.content)

    async def test_http2_error_event_and_clean_end(self) -> None:
        """Over HTTP/2: three events, the error event, then END_STREAM (no reset)."""
        response = await _post(
            f"{self.proxy.https_url}/v1/chat/completions",
            _STREAM_CHAT,
            {"x-mock-fault": "disconnect-after=3"},
            client=lambda: _http2(self.proxy),
        )
        self.assertEqual(response.http_version, "HTTP/2")
        self.assertEqual(response.status_code, 200)
        self.check_events(response.content)


class UpstreamConnectionTests(TestCase):
    """The proxy's persistent upstream connections."""

    timeout = 60

    async def test_sequential_requests_share_one_connection(self) -> None:
        """Sequential requests, plain and streamed, reuse one upstream connection."""
        mock = start_mock(self, "a")
        proxy = start_proxy(self, [mock.upstream()])

        def call() -> list[int]:
            with _http1() as client:
                return [
                    client.post(
                        f"{proxy.http_url}/v1/chat/completions",
                        content=body,
                        headers={"content-type": "application/json"},
                    ).status_code
                    for body in (_CHAT, _STREAM_CHAT) * 3
                ]

        self.assertEqual(await _in_thread(call), [200] * 6)
        self.assertEqual(len(mock.requests), 6)
        self.assertEqual(mock.connections.accepted, 1)

    async def test_dropped_connection_not_reused(self) -> None:
        """After an upstream drops mid-stream, the next request gets a fresh connection."""
        mock = start_mock(self, "a")
        proxy = start_proxy(self, [mock.upstream()])
        dropped = await _post(
            f"{proxy.http_url}/v1/chat/completions",
            _STREAM_CHAT,
            {"x-mock-fault": "disconnect-after=1"},
        )
        self.assertIn(b"upstream_disconnected", dropped.content)
        response = await _post(f"{proxy.http_url}/v1/chat/completions", _CHAT)
        self.assertEqual(response.status_code, 200)
        self.assertEqual(response.json()["choices"][0]["message"]["content"], _CONTENT)
        self.assertEqual(mock.connections.accepted, 2)


class LocalAnswerTests(TestCase):
    """Requests the proxy answers itself, never forwarding them."""

    timeout = 60

    def setUp(self) -> None:
        self.mock = start_mock(self, "a")

    def assert_not_forwarded(self) -> None:
        self.assertEqual(self.mock.requests, [])
        self.assertEqual(self.mock.connections.accepted, 0)

    async def test_malformed_json_400(self) -> None:
        """Malformed JSON on /v1/chat/completions is a 400 invalid_request_error, not forwarded."""
        proxy = start_proxy(self, [self.mock.upstream()])
        response = await _post(
            f"{proxy.http_url}/v1/chat/completions", b'{"model": "mock-gpt", "messages": ['
        )
        _assert_openai_error(self, response, 400, "invalid_request_error", "invalid_json")
        self.assert_not_forwarded()

    async def test_unknown_path_404(self) -> None:
        """An unknown path is an OpenAI-shaped 404, not Twisted's HTML page."""
        proxy = start_proxy(self, [self.mock.upstream()])
        response = await _get(f"{proxy.http_url}/foo")
        _assert_openai_error(self, response, 404, "invalid_request_error", "not_found")
        self.assert_not_forwarded()

    async def test_plain_http_on_the_tls_port(self) -> None:
        """
        Plain HTTP on the TLS port is closed at once, with one info line saying why (and no
        traceback), and nothing forwarded.
        """
        proxy = start_proxy(self, [self.mock.upstream()])
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

        def call() -> bytes:
            with socket.create_connection(("127.0.0.1", proxy.tls_port), timeout=30) as s:
                s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = b""
                while chunk := s.recv(4096):
                    answer += chunk
                return answer

        await _in_thread(call)

        def logged() -> list[str]:
            return [
                formatEvent(e) for e in observer if "TLS handshake" in (e.get("log_format") or "")
            ]

        await wait_for(lambda: bool(logged()), "the log line")
        (line,) = logged()
        self.assertTrue(line.startswith("TLS handshake with 127.0.0.1 failed: "), line)
        self.assertEqual([e for e in observer if e.get("log_failure")], [])
        self.assert_not_forwarded()

    async def test_healthz(self) -> None:
        """GET /healthz is answered 200 by the proxy itself."""
        proxy = start_proxy(self, [self.mock.upstream()])
        response = await _get(f"{proxy.http_url}/healthz")
        self.assertEqual(response.status_code, 200)
        self.assertEqual(response.json(), {"status": "ok"})
        self.assert_not_forwarded()

    async def test_smuggling_refused_as_json(self) -> None:
        """
        Content-Length with Transfer-Encoding, over a real socket: a JSON 400 with a request
        id, the connection closed, and neither request reaches the upstream.
        """
        proxy = start_proxy(self, [self.mock.upstream()])

        raw = await raw_exchange(
            proxy.http_port,
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"
            b"Content-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\n\r\n",
        )
        head = _assert_raw_openai_error(self, raw, 400, "invalid_request")
        self.assertIn(b"x-request-id: ", head.lower())
        self.assert_not_forwarded()


class ConnectionCapTests(TestCase):
    """max_connections over real sockets, plain and TLS."""

    timeout = 60

    async def test_past_the_cap_503_then_served_again(self) -> None:
        """
        With one connection held open and max_connections=1, a client gets a JSON 503
        (plain HTTP and HTTP/1.1 over TLS); once the held one closes, it is served again.
        """
        mock = start_mock(self, "a")
        proxy = start_proxy(self, [mock.upstream()], limits=Limits(max_connections=1))
        held = socket.create_connection(("127.0.0.1", proxy.http_port), 30)
        try:
            await wait_for(lambda: proxy.connections.open_count == 1, "the held connection")
            response = await _get(f"{proxy.http_url}/healthz")
            _assert_openai_error(self, response, 503, "server_error", "too_many_connections")
            self.assertEqual(response.headers.get("retry-after"), "1")

            def tls_get() -> httpx.Response:
                context = ssl.create_default_context(cafile=proxy.cert_path)
                with httpx.Client(verify=context, timeout=30.0) as client:
                    return client.get(f"{proxy.https_url}/healthz")

            response = await _in_thread(tls_get)
            _assert_openai_error(self, response, 503, "server_error", "too_many_connections")
        finally:
            held.close()
        await wait_for(lambda: proxy.connections.open_count == 0, "the held one to close")
        response = await _get(f"{proxy.http_url}/healthz")
        self.assertEqual(response.status_code, 200)
        self.assertEqual(mock.requests, [])


class BodyCapTests(TestCase):
    """Request bodies over max_body_bytes, however they are framed, are answered 413."""

    timeout = 60

    def setUp(self) -> None:
        self.mock = start_mock(self, "a")
        self.proxy = start_proxy(self, [self.mock.upstream()], limits=Limits(max_body_bytes=1024))

    def assert_not_forwarded(self) -> None:
        self.assertEqual(self.mock.requests, [])
        self.assertEqual(self.mock.connections.accepted, 0)

    async def test_body_over_cap_413_http11(self) -> None:
        """A body over max_body_bytes with a Content-Length is a 413 over HTTP/1.1."""
        body = json.dumps({"model": "mock-gpt", "messages": _MESSAGES, "pad": "x" * 2000})
        response = await _post(f"{self.proxy.http_url}/v1/chat/completions", body.encode())
        _assert_openai_error(self, response, 413, "invalid_request_error", "request_too_large")
        self.assert_not_forwarded()

    async def test_body_over_cap_413_http2(self) -> None:
        """A body over max_body_bytes is a 413 over HTTP/2."""
        body = json.dumps({"model": "mock-gpt", "messages": _MESSAGES, "pad": "x" * 2000})
        response = await _post(
            f"{self.proxy.https_url}/v1/chat/completions",
            body.encode(),
            client=lambda: _http2(self.proxy),
        )
        self.assertEqual(response.http_version, "HTTP/2")
        _assert_openai_error(self, response, 413, "invalid_request_error", "request_too_large")
        self.assert_not_forwarded()

    async def test_sdk_gets_413_error(self) -> None:
        """The SDK, sending a large body over the cap, gets the 413 error (not a reset)."""
        big: list[ChatCompletionMessageParam] = [{"role": "user", "content": "x " * 500_000}]

        def call() -> openai.APIStatusError:
            with _sdk(f"{self.proxy.http_url}/v1") as client:
                try:
                    client.chat.completions.create(model="mock-gpt", messages=big)
                except openai.APIStatusError as e:
                    return e
            raise AssertionError("the request over the cap succeeded")

        error = await _in_thread(call)
        self.assertEqual(error.status_code, 413)
        self.assertEqual(error.code, "request_too_large")
        self.assert_not_forwarded()

    async def test_http11_413_before_body(self) -> None:
        """A Content-Length over the cap is answered 413 (and closed) before any body is sent."""

        # Read to the end: the proxy answers without waiting for a body, and closes.
        raw = await raw_exchange(
            self.proxy.http_port,
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"
            b"Content-Type: application/json\r\nContent-Length: 2000\r\n\r\n",
        )
        head = _assert_raw_openai_error(self, raw, 413, "request_too_large")
        self.assertIn(b"connection: close", head.lower())
        self.assert_not_forwarded()

    async def test_http11_chunked_413(self) -> None:
        """A chunked HTTP/1.1 body that grows over the cap is answered 413."""

        def body() -> Iterator[bytes]:
            yield b'{"model": "mock-gpt", "pad": "'
            yield b"x" * 2000
            yield b'"}'

        def call() -> httpx.Response:
            with _http1() as client:
                return client.post(
                    f"{self.proxy.http_url}/v1/chat/completions",
                    content=body(),
                    headers={"content-type": "application/json"},
                )

        response = await _in_thread(call)
        _assert_openai_error(self, response, 413, "invalid_request_error", "request_too_large")
        self.assert_not_forwarded()

    async def test_http2_data_without_length_413(self) -> None:
        """An h2 body without content-length that grows over the cap: 413 or RST_STREAM."""
        client = await connect_h2(self, self.proxy)
        body = json.dumps({"model": "mock-gpt", "messages": _MESSAGES, "pad": "x" * 2000})
        response = client.request(b"/v1/chat/completions", body.encode(), content_length=False)
        try:
            await within(response.done, "the answer to an over-long body")
        except StreamWasReset:
            pass
        else:
            self.assertEqual(response.status, 413)
            self.assertEqual(json.loads(response.body)["error"]["code"], "request_too_large")
        self.assert_not_forwarded()


class CancellationTests(TestCase):
    """A client that goes away cancels the upstream request at once."""

    timeout = 60

    def setUp(self) -> None:
        self.mock = start_mock(self, "a")
        self.proxy = start_proxy(self, [self.mock.upstream()])

    async def assert_upstream_cancelled(self, mock: MockServer) -> None:
        """The mock's request ended by losing its connection, and that connection is closed."""
        (seen,) = mock.requests
        finished = await within(seen.ended, "the upstream request to end")
        self.assertFalse(finished, "the upstream response ran to its end")
        await within(mock.connections.when_closed(), "the upstream connection to close")

    async def test_http11_client_disconnect(self) -> None:
        """An HTTP/1.1 client closing mid-stream closes the upstream connection."""

        def call() -> str:
            with (
                _http1() as client,
                client.stream(
                    "POST",
                    f"{self.proxy.http_url}/v1/chat/completions",
                    content=_STREAM_CHAT,
                    # One chunk now, the next in ten minutes: only a cancel ends it early.
                    headers={"content-type": "application/json", "x-mock-delay-ms": "600000"},
                ) as response,
            ):
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        return line
            raise AssertionError("no event received")

        first = await _in_thread(call)
        self.assertIn('"content":"lore"', first)
        await self.assert_upstream_cancelled(self.mock)

    async def test_http2_stream_reset(self) -> None:
        """An HTTP/2 RST_STREAM mid-stream closes the upstream; the connection lives on."""
        client = await connect_h2(self, self.proxy)
        response = client.request(
            b"/v1/chat/completions", _STREAM_CHAT, [(b"x-mock-delay-ms", b"600000")]
        )
        await within(response.head, "the response head")
        self.assertEqual(response.status, 200)
        await wait_for(lambda: response.received > 0, "the first event")
        self.assertEqual(client.negotiated, b"h2")
        client.reset(response.stream_id)
        await self.assert_upstream_cancelled(self.mock)
        # The connection is still usable for another request.
        again = client.request(b"/v1/chat/completions", _CHAT)
        await within(again.done, "a second request on the same connection")
        self.assertEqual(again.status, 200)
        self.assertEqual(json.loads(again.body)["choices"][0]["message"]["content"], _CONTENT)


class DemoTests(TestCase):
    """C{--demo} as a new user meets it: two mock upstreams behind the proxy, really served."""

    timeout = 60

    async def test_demo_serves_from_both_mocks(self) -> None:
        """
        The demo's proxy answers the SDK with a fake completion, and eight requests go to its
        mocks (weights 1 and 3) 2 and 6 ways; the banner says the answers are fake.
        """
        from oaiproxy.config import ListenerConfig, ProxyConfig
        from oaiproxy.listening import Listeners
        from oaiproxy.service import build_service

        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        config = ProxyConfig(
            listeners=(ListenerConfig("tcp", 0, interface="127.0.0.1"),),
            demo=True,
            state_dir=self.mktemp(),
        )
        service: Any = build_service(config, reactor, environ={})
        service.startService()
        self.addCleanup(service.stopService)
        [listeners] = [s for s in service if isinstance(s, Listeners)]
        assert listeners.ports is not None
        address: Any = listeners.ports[0].getHost()
        base = f"http://127.0.0.1:{address.port}"

        def call() -> ChatCompletion:
            with _sdk(f"{base}/v1") as client:
                return client.chat.completions.create(model="mock-gpt", messages=_MESSAGES)

        completion = await _in_thread(call)
        served = [upstream for _, upstream in await _served_by(base, 8)]
        self.assertEqual(completion.object, "chat.completion")
        self.assertTrue(completion.choices[0].message.content)
        self.assertEqual((served.count("mock-a"), served.count("mock-b")), (2, 6))
        text = "\n".join(formatEvent(e) for e in events)
        self.assertIn("FAKE", text)
