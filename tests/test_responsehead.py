"""Upstream response heads read at once: the same outcome as Twisted's line-by-line parser."""

from __future__ import annotations

import random
from typing import Any

from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import HTTPClientParser, Request
from twisted.web.http_headers import Headers

from oaiproxy.http.responsehead import parse_head
from tests.support.fuzz import mutated


class _Body(Protocol):
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.reason: str | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        self.reason = type(reason.value).__name__


def _outcome(pieces: list[bytes], fast: bool, method: bytes = b"GET") -> tuple[Any, ...]:
    """What a client parser makes of C{pieces}, fed with or without L{parse_head}."""
    finished: list[bytes] = []
    request = Request(method, b"/v1/x", Headers({b"host": [b"h"]}), None)
    parser = HTTPClientParser(request, finished.append)
    transport = StringTransport()
    parser.makeConnection(transport)
    responses: list[Any] = []
    parser._responseDeferred.addBoth(responses.append)
    error = None
    taken = 0
    try:
        for piece in pieces:
            if fast and parse_head(parser, piece):
                taken += 1
            else:
                parser.dataReceived(piece)
    except Exception as e:
        error = (type(e).__name__, str(e))
    response: Any = responses[0] if responses else None
    described: tuple[Any, ...] = ()
    if response is not None and not isinstance(response, Failure):
        body = _Body()
        response.deliverBody(body)
        described = (
            response.version,
            response.code,
            response.phrase,
            list(response.headers.getAllRawHeaders()),
            list(parser.connHeaders.getAllRawHeaders()),
            response.length,
            b"".join(body.data),
            body.reason,
        )
    return (
        error,
        parser.state,
        described,
        finished,
        transport.producerState,
        transport.disconnecting,
        taken if fast else None,
    )


_STATUS = [
    b"HTTP/1.1 200 OK",
    b"HTTP/1.1 200",
    b"HTTP/1.0 201 Created here",
    b"HTTP/1.1 204 No Content",
    b"HTTP/1.1 304 Not Modified",
    b"HTTP/1.1 100 Continue",
    b"HTTP/1.1 abc OK",
    b"HTTP/2 200 OK",
    b"HTTP/x.y 200 OK",
    b"garbage",
    b"",
]
_HEADERS = [
    b"Content-Type: application/json",
    b"content-length: 5",
    b"Content-Length: 0",
    b"Content-Length: 12",
    b"Content-Length: abc",
    b"Content-Length: 5, 5",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: gzip",
    b"Connection: keep-alive",
    b"X-Space :  padded  ",
    b"X-Empty:",
    b"X-Colons: a:b:c",
    b"no colon here",
    b" folded continuation",
    b"\tfolded tab",
    b"X-CR: a\rb",
    b"X-Long: " + b"x" * 17_000,
]


def _random_response(rng: random.Random) -> bytes:
    status = rng.choice(_STATUS)
    headers = rng.sample(_HEADERS, rng.randint(0, 5))
    ending = [b"\r\n", b"\n"]
    head = status
    for header in headers:
        head += rng.choice(ending if rng.random() < 0.1 else [b"\r\n"]) + header
    head += b"\r\n\r\n" if rng.random() < 0.9 else b"\n\n"
    body = rng.choice([b"", b"hello", b"hello world!", b"5\r\nhello\r\n0\r\n\r\n", b"x" * 40])
    if rng.random() < 0.2:
        body += b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    return head + body


class ParseHeadTests(SynchronousTestCase):
    def assert_same(self, pieces: list[bytes], method: bytes = b"GET") -> tuple[Any, ...]:
        fast = _outcome(pieces, True, method)
        slow = _outcome(pieces, False, method)
        self.assertEqual(fast[:-1], slow[:-1], pieces)
        return fast

    def test_ordinary_response_read_at_once(self) -> None:
        """A whole head in one read takes the fast path, and reads exactly as Twisted does."""
        data = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-A: 1\r\nx-a: 2\r\n"
            b"Content-Length: 5\r\nConnection: keep-alive\r\n\r\nhello"
        )
        outcome = self.assert_same([data])
        self.assertEqual(outcome[-1], 1)
        self.assertEqual(outcome[2][1], 200)
        self.assertEqual(outcome[2][6], b"hello")

    def test_chunked_and_no_body(self) -> None:
        """Chunked bodies; 204, 304 and HEAD answers end with their head."""
        self.assertEqual(
            self.assert_same([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"])[
                -1
            ],
            1,
        )
        for data in [b"HTTP/1.1 204 No Content\r\n\r\n", b"HTTP/1.1 304 X\r\nA: b\r\n\r\nrest"]:
            self.assert_same([data])
        self.assert_same([b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n"], method=b"HEAD")

    def test_informational_then_final(self) -> None:
        """A 100 Continue before the answer is skipped, then the answer read."""
        outcome = self.assert_same(
            [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]
        )
        self.assertEqual(outcome[2][1], 200)

    def test_unusual_heads_left_to_twisted(self) -> None:
        """Bare LF, folded lines, heads split across reads or over the line limit."""
        for pieces in [
            [b"HTTP/1.1 200 OK\nContent-Length: 0\n\n"],
            [b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n"],
            [b"HTTP/1.1 200 OK\r\nX: a\r\n\tb\r\nContent-Length: 0\r\n\r\n"],
            [b"HTTP/1.1 200 OK\r\nContent-", b"Length: 0\r\n\r\n"],
            [b"HTTP/1.1 200 OK\r\nX: " + b"y" * 16_380 + b"\r\nContent-Length: 0\r\n\r\n"],
        ]:
            self.assertEqual(self.assert_same(pieces)[-1], 0, pieces)

    def test_errors_as_twisted(self) -> None:
        """A bad status line or a header without a colon raises what Twisted raises."""
        for data in [
            b"garbage\r\n\r\n",
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
        ]:
            outcome = self.assert_same([data])
            self.assertIsNotNone(outcome[0], data)

    def test_random_responses_and_splits(self) -> None:
        """Random heads (good and bad), whole or split at random points, as Twisted reads them."""
        rng = random.Random(20261123)
        taken = 0
        for _ in range(3000):
            data = _random_response(rng)
            if rng.random() < 0.5:
                pieces = [data]
            else:
                cuts = sorted(rng.sample(range(1, len(data)), min(3, len(data) - 1)))
                pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
            taken += self.assert_same(pieces)[-1]
        # The fast path is exercised, not only the fallbacks.
        self.assertGreater(taken, 200)

    def test_mutated_responses(self) -> None:
        """Valid responses with random bytes changed: the same outcome on both paths."""
        rng = random.Random(7)
        alphabet = b"\r\n\x00\t :;,-0123456789aAzZ\x7f\x80\xff"
        base = [
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            b"HTTP/1.1 429 Too Many\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n",
        ]
        for _ in range(3000):
            self.assert_same([mutated(rng, rng.choice(base), alphabet)])
