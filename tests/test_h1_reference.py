"""
L{H1Channel} against the channel it replaced (Twisted's C{HTTPChannel}, read line by line,
with the proxy's checks): the same requests forwarded, the same answers and refusals, on
random and mutated requests whole, split and pipelined.
"""

from __future__ import annotations

import random
import re
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.config import Limits
from oaiproxy.http import h1server
from tests.support.fakes import FakeResponse, make_harness
from tests.support.fuzz import mutated
from tests.support.twisted_h1 import ProxyHTTPChannel

_ID = re.compile(rb"[0-9a-f]{32}")


def _outcome(pieces: list[bytes], reference: bool) -> tuple[Any, ...]:
    """
    What a proxy makes of a connection sending C{pieces}: what went upstream, what the client
    got (each upstream request answered in turn), and whether the connection was closed. With
    C{reference}, on the previous channel (Twisted's C{HTTPChannel} and its line-by-line
    path, with the proxy's checks), else on L{H1Channel}.
    """
    harness = make_harness(limits=Limits(max_headers=6, max_header_bytes=1024))
    if reference:
        harness.site.h1_channel = ProxyHTTPChannel  # type: ignore[misc,method-assign]
    ProxyHTTPChannel.fast_heads = False
    try:
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
        # Refusals are compared as refusals: the new channel words some of them more
        # precisely, and a head both malformed and too large may be refused for either (400
        # or 431: the old one read it line by line, the new one checks sizes first). Each
        # refusal's own status is tested in test_h1.
        output = re.sub(rb'"message":"[^"]*"', b'"message":"-"', output)
        output = output.replace(b"431 Request Header Fields Too Large", b"400 Bad Request")
        output = output.replace(b'"request_header_fields_too_large"', b'"invalid_request"')
        output = re.sub(
            rb"(?i)content-length: \d+(\r\n(?:[^\r]+\r\n)*?\r\n\{)",
            rb"content-length: -\1",
            output,
        )
        return sent, output, bool(transport.disconnecting)
    finally:
        ProxyHTTPChannel.fast_heads = True


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
    if rng.random() < 0.6:
        fields.insert(0, b"Host: proxy.example")
    head = b"\r\n".join([rng.choice(_LINES), *fields]) + b"\r\n\r\n"
    if rng.random() < 0.1:
        head = b"\r\n" + head
    body = rng.choice([b"", _BODY, _BODY[:5], b"5\r\nhello\r\n0\r\n\r\n"])
    return head + body


class ReferenceTests(SynchronousTestCase):
    def assert_same(self, pieces: list[bytes]) -> tuple[Any, ...]:
        """Both channels give the same outcome; returns it."""
        new = _outcome(pieces, False)
        self.assertEqual(new, _outcome(pieces, True), pieces)
        return new

    def test_ordinary_request_read_at_once(self) -> None:
        """A whole head in one read is forwarded as before."""
        raw = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy.example\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(_BODY), _BODY)
        )
        sent, output, closed = self.assert_same([raw])
        self.assertEqual(sent[0][3], _BODY)
        self.assertTrue(output.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertFalse(closed)

    def test_body_in_later_reads_and_pipelining(self) -> None:
        """A body that follows in later reads; two requests in one read."""
        head = b"POST /v1/embeddings HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(
            _BODY
        )
        self.assertEqual(len(self.assert_same([head, _BODY[:10], _BODY[10:]])[0]), 1)
        get = b"GET /v1/models HTTP/1.1\r\nHost: a\r\n\r\n"
        self.assertEqual(len(self.assert_same([get + get])[0]), 2)
        # A body over the cap is answered (413) and the connection closed at once: what
        # follows in the same read is not read.
        huge = b"POST /v1/embeddings HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n"
        sent, output, closed = self.assert_same([huge + get])
        self.assertEqual((sent, output.count(b"HTTP/1.1 "), closed), ([], 1, True))

    def test_closing_connection(self) -> None:
        """
        A request arriving on a connection the proxy is closing (an idle timeout; over TLS
        the client's bytes still come until its close_notify) is not forwarded.
        """
        harness = make_harness()
        proto, transport = harness.connect()
        transport.loseConnection()
        proto.dataReceived(b"GET /v1/models HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(harness.sent(), [])

    def test_refusals(self) -> None:
        """Each refusal, with its status and message, as before."""
        for raw in [
            b"GET /v1/models HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
            b"POST /v1/embeddings HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"POST /v1/embeddings HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
            b"GET /v1/models HTTP/1.1\r\n" + b"X-A: b\r\n" * 7 + b"\r\n",
            b"GET /v1/models HTTP/1.1\r\nX-Long: " + b"z" * 1100 + b"\r\n\r\n",
            b"GET /v1/models HTTP/1.1\r\nBad Name: x\r\n\r\n",
            b"GET /v1/models HTTP/1.1\r\nX: a\nb\r\n\r\n",
        ]:
            _, output, closed = self.assert_same([raw])
            self.assertIn(b'"invalid_request_error"', output, raw)
            self.assertTrue(closed, raw)

    def test_random_requests_and_splits(self) -> None:
        """Random heads (good and bad), whole or split, pipelined."""
        rng = random.Random(20261123)
        forwarded = 0
        for _ in range(1500):
            data = b"".join(_random_request(rng) for _ in range(rng.randint(1, 2)))
            if rng.random() < 0.6:
                pieces = [data]
            else:
                cuts = sorted(rng.sample(range(1, len(data)), min(2, len(data) - 1)))
                pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
            forwarded += len(self.assert_same(pieces)[0])
        # Most random heads carry a fault; enough are valid that forwarding is compared too.
        self.assertGreater(forwarded, 20)

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
            self.assertEqual(h1server.request_line(line), expected, line)
        self.assertGreater(refused, 500)
