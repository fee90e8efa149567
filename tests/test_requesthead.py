"""Client request heads read at once: the same outcome as the line-by-line path, refusals too."""

from __future__ import annotations

import random
import re
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.config import Limits
from oaiproxy.http import requesthead
from oaiproxy.http.h1 import ProxyHTTPChannel
from tests.support.fakes import FakeResponse, make_harness
from tests.support.fuzz import mutated

_ID = re.compile(rb"[0-9a-f]{32}")


def _outcome(pieces: list[bytes], fast: bool) -> tuple[Any, ...]:
    """
    What a proxy makes of a connection sending C{pieces}: what went upstream, what the client
    got (each upstream request answered in turn), and whether the connection was closed.
    """
    taken: list[bool] = []
    real = requesthead.parse_head

    def counting(channel: Any, data: bytes) -> bool:
        result = real(channel, data)
        taken.append(result)
        return result

    ProxyHTTPChannel.fast_heads = fast
    requesthead.parse_head = counting
    try:
        harness = make_harness(limits=Limits(max_headers=6, max_header_bytes=1024))
        proto, transport = harness.connect()
        answered = 0
        for piece in pieces:
            proto.dataReceived(piece)
            # Answer what has reached the upstream, so that pipelined requests go on.
            while answered < len(harness.sent()):
                response = FakeResponse(200, {b"content-type": [b"text/plain"]}, length=2)
                harness.sent()[answered].deferred.callback(response)
                response.deliver(b"ok")
                response.end()
                answered += 1
        sent = [
            (
                s.method,
                s.uri,
                sorted(
                    (k, v)
                    for k, v in s.headers.getAllRawHeaders()
                    if k.lower() not in (b"x-request-id", b"date")
                ),
                s.body,
            )
            for s in harness.sent()
        ]
        output = _ID.sub(b"<id>", transport.value())
        output = re.sub(rb"Date: [^\r]*", b"Date: <date>", output)
        return sent, output, bool(transport.disconnecting), any(taken)
    finally:
        ProxyHTTPChannel.fast_heads = True
        requesthead.parse_head = real


_BODY = b'{"model":"m","messages":[]}'
_LINES = [
    b"POST /v1/chat/completions HTTP/1.1",
    b"GET /v1/models HTTP/1.1",
    b"POST /v1/embeddings HTTP/1.0",
    b"GET /healthz HTTP/1.1",
    b"GET /nowhere HTTP/1.1",
    b"BAD LINE",
    b"GET /v1/models HTTP/2.0",
    b"G\x00T /v1/models HTTP/1.1",
    b"",
]
_FIELDS = [
    b"Host: proxy.example",
    b"host: other.example",
    b"Content-Type: application/json",
    b"Content-Length: %d" % len(_BODY),
    b"content-length: %d" % len(_BODY),
    b"Content-Length: 5",
    b"Content-Length: 0",
    b"Content-Length: +27",
    b"Content-Length: 1" + b"0" * 20,
    b"Content-Length: 99999999999",
    b"Transfer-Encoding: chunked",
    b"Connection: close",
    b"Expect: 100-continue",
    b"X-Request-Id: abc",
    b"Authorization: Bearer sk-test",
    b"X-Spaces:   padded value \t",
    b"X-Empty:",
    b"Bad Name: x",
    b"no colon",
    b" folded",
    b"X-CR: a\rb",
    b"X-LF: a\nb",
    b"X-NUL: a\x00b",
    b"X-Long: " + b"y" * 1100,
]


def _random_request(rng: random.Random) -> bytes:
    fields = rng.sample(_FIELDS, rng.randint(0, 7))
    head = b"\r\n".join([rng.choice(_LINES), *fields]) + b"\r\n\r\n"
    if rng.random() < 0.1:
        head = b"\r\n" + head
    body = rng.choice([b"", _BODY, _BODY[:5], b"5\r\nhello\r\n0\r\n\r\n"])
    return head + body


class ParseHeadTests(SynchronousTestCase):
    def assert_same(self, pieces: list[bytes]) -> bool:
        """Both paths give the same outcome; returns whether the fast path was taken."""
        fast = _outcome(pieces, True)
        slow = _outcome(pieces, False)
        self.assertEqual(fast[:-1], slow[:-1], pieces)
        self.assertFalse(slow[-1])
        return bool(fast[-1])

    def test_ordinary_request_read_at_once(self) -> None:
        """A whole head in one read takes the fast path and is forwarded as before."""
        raw = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy.example\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(_BODY), _BODY)
        )
        self.assertTrue(self.assert_same([raw]))
        sent, output, closed, _ = _outcome([raw], True)
        self.assertEqual(sent[0][3], _BODY)
        self.assertTrue(output.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertFalse(closed)

    def test_body_in_later_reads_and_pipelining(self) -> None:
        """A body that follows in later reads; two requests in one read."""
        head = b"POST /v1/embeddings HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(_BODY)
        self.assertTrue(self.assert_same([head, _BODY[:10], _BODY[10:]]))
        get = b"GET /v1/models HTTP/1.1\r\nHost: a\r\n\r\n"
        self.assertTrue(self.assert_same([get + get]))
        # A body over the cap is answered (413) and the connection closed at once: what
        # follows in the same read is not read.
        huge = b"POST /v1/embeddings HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n"
        self.assertTrue(self.assert_same([huge + get]))
        sent, output, closed, _ = _outcome([huge + get], True)
        self.assertEqual((sent, output.count(b"HTTP/1.1 "), closed), ([], 1, True))

    def test_closing_connection(self) -> None:
        """
        A request arriving on a connection the proxy is closing (an idle timeout; over TLS
        the client's bytes still come until its close_notify) is not forwarded, on either path.
        """
        for fast in (True, False):
            ProxyHTTPChannel.fast_heads = fast
            try:
                harness = make_harness()
                proto, transport = harness.connect()
                transport.loseConnection()
                proto.dataReceived(b"GET /v1/models HTTP/1.1\r\nHost: a\r\n\r\n")
                self.assertEqual(harness.sent(), [], fast)
            finally:
                ProxyHTTPChannel.fast_heads = True

    def test_refusals_left_to_line_path(self) -> None:
        """Each refusal comes from the line-by-line path, with its status."""
        for raw in [
            b"GET /v1/models HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
            b"POST /v1/embeddings HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"POST /v1/embeddings HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
            b"GET /v1/models HTTP/1.1\r\n" + b"X-A: b\r\n" * 7 + b"\r\n",
            b"GET /v1/models HTTP/1.1\r\nX-Long: " + b"z" * 1100 + b"\r\n\r\n",
            b"GET /v1/models HTTP/1.1\r\nBad Name: x\r\n\r\n",
            b"GET /v1/models HTTP/1.1\r\nX: a\nb\r\n\r\n",
        ]:
            self.assertFalse(self.assert_same([raw]), raw)
            self.assertIn(b'"invalid_request_error"', _outcome([raw], True)[1], raw)

    def test_random_requests_and_splits(self) -> None:
        """Random heads (good and bad), whole or split, pipelined: as the line path reads them."""
        rng = random.Random(20261123)
        taken = 0
        for _ in range(1500):
            data = b"".join(_random_request(rng) for _ in range(rng.randint(1, 2)))
            if rng.random() < 0.6:
                pieces = [data]
            else:
                cuts = sorted(rng.sample(range(1, len(data)), min(2, len(data) - 1)))
                pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
            taken += self.assert_same(pieces)
        self.assertGreater(taken, 100)

    def test_mutated_requests(self) -> None:
        """Valid requests with random bytes changed: the same outcome on both paths."""
        rng = random.Random(7)
        alphabet = b"\r\n\x00\t :;,-0123456789aAzZ\x7f\x80\xff/?#%"
        base = [
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(_BODY), _BODY),
            b"GET /v1/models HTTP/1.1\r\nHost: a\r\nX-Request-Id: abc\r\n\r\n",
        ]
        for _ in range(1500):
            self.assert_same([mutated(rng, rng.choice(base), alphabet)])

    def test_request_line_as_twisted_reads_it(self) -> None:
        """The request-line reader gives what Twisted's parser gives, and refuses what it does."""
        from twisted.web.http import _parseRequestLine

        rng = random.Random(11)
        alphabet = b" \t\x00\x1f\x20\x21\x7e\x7f\xb0\xb1\xff/?%GHPT1."
        lines = [
            b"POST /v1/chat/completions HTTP/1.1",
            b"GET /v1/models?limit=2 HTTP/1.0",
            b"OPTIONS * HTTP/1.1",
            b"PROPFIND /v1/x HTTP/1.1",
            b"get /v1/models HTTP/1.1",
        ]
        refused = 0
        for _ in range(4000):
            line = (
                mutated(rng, rng.choice(lines), alphabet)
                if rng.random() < 0.8
                else (rng.choice(lines))
            )
            try:
                expected: Any = _parseRequestLine(line)
            except ValueError:
                expected = None
                refused += 1
            self.assertEqual(requesthead._request_line(line), expected, line)
        self.assertGreater(refused, 500)
