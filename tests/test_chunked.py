"""The chunked body decoder, alone and inside the upstream client."""

from __future__ import annotations

import random
from typing import Any

from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import ResponseDone, ResponseFailed
from twisted.web.http import _ChunkedTransferDecoder, _DataLoss, _MalformedChunkedDataError
from twisted.web.http_headers import Headers

from oaiproxy.http.chunked import (
    MAX_SIZE_LINE,
    MAX_TRAILERS,
    ChunkedDecoder,
    MalformedChunkedData,
)
from oaiproxy.http.client import UpstreamClient
from tests.support.fakes import InstantEndpoint


def _decoder() -> tuple[ChunkedDecoder, list[bytes], list[bytes]]:
    data: list[bytes] = []
    finished: list[bytes] = []
    return ChunkedDecoder(data.append, finished.append), data, finished


def _encode(pieces: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


class ChunkedDecoderTests(SynchronousTestCase):
    """Framing, delivery in one piece per read, limits and errors."""

    def test_one_read_one_delivery(self) -> None:
        """Three chunks in one read are delivered once, joined, in order."""
        decoder, data, finished = _decoder()
        decoder.dataReceived(b"3\r\nabc\r\n2\r\nde\r\n1\r\nf\r\n")
        self.assertEqual(data, [b"abcdef"])
        self.assertEqual(finished, [])

    def test_split_reads(self) -> None:
        """A chunk split across reads is delivered as its parts arrive."""
        decoder, data, _ = _decoder()
        decoder.dataReceived(b"6\r\nabc")
        decoder.dataReceived(b"def\r\n")
        self.assertEqual(data, [b"abc", b"def"])

    def test_every_split_point(self) -> None:
        """
        A body cut into two reads at every possible point decodes to the same data; the
        bytes after the end are those of the read in which the end was found.
        """
        body = _encode([b"hello", b"", b"x" * 20]).replace(b"0\r\n\r\n", b"") + (
            b"a;name=value\r\n0123456789\r\n0\r\nx-t: 1\r\n\r\nEXTRA"
        )
        for cut in range(len(body) + 1):
            decoder, data, finished = _decoder()
            decoder.dataReceived(body[:cut])
            if not finished:
                decoder.dataReceived(body[cut:])
            self.assertEqual(b"".join(data), b"hello" + b"x" * 20 + b"0123456789", cut)
            end = len(body) - len(b"EXTRA")
            self.assertEqual(finished, [body[end:] if cut < end else body[end:cut]], cut)

    def test_same_as_twisted(self) -> None:
        """
        On random bodies cut into random reads, the data delivered and the extra bytes
        reported equal what Twisted's own decoder gives.
        """
        rng = random.Random(1234)
        for _ in range(200):
            pieces = [rng.randbytes(rng.choice([1, 2, 15, 16, 17, 300])) for _ in range(8)]
            ext = rng.choice([b"", b";a=b", b'; q="x y"'])
            body = b"".join(b"%X%s\r\n%s\r\n" % (len(p), ext, p) for p in pieces)
            body += b"0\r\n" + rng.choice([b"", b"t: v\r\n"]) + b"\r\n" + rng.randbytes(3)
            cuts = sorted(rng.sample(range(1, len(body)), 5))
            reads = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
            ours, ours_data, ours_end = _decoder()
            theirs_data: list[bytes] = []
            theirs_end: list[bytes] = []
            theirs = _ChunkedTransferDecoder(theirs_data.append, theirs_end.append)
            for read in reads:
                if not ours_end:
                    ours.dataReceived(read)
                if not theirs_end:
                    theirs.dataReceived(read)
            self.assertEqual(b"".join(ours_data), b"".join(theirs_data))
            self.assertEqual(ours_end, theirs_end)

    def test_fast_path_declines_what_it_cannot_take(self) -> None:
        """
        Chunks whose data holds CRLF, chunks with extensions, zero-padded sizes and chunks
        cut short, mixed with plain ones in one read, decode as Twisted decodes them.
        """
        body = (
            b"3\r\nabc\r\n"
            b"6\r\nab\r\ncd\r\n"  # CRLF inside the data
            b"4;ext=1\r\nwxyz\r\n"
            b"02\r\nhi\r\n"
            b"5\r\n\r\n\r\n\r\r\n"  # data made of line ends
            b"1\r\nq\r\n"
            b"8\r\npart"
        )
        ours, data, _ = _decoder()
        ours.dataReceived(body)
        theirs_data: list[bytes] = []
        theirs = _ChunkedTransferDecoder(theirs_data.append, lambda e: None)
        theirs.dataReceived(body)
        self.assertEqual(b"".join(data), b"".join(theirs_data))
        self.assertEqual(b"".join(data), b"abcab\r\ncdwxyzhi\r\n\r\n\rqpart")

    def test_fast_path_once_per_read(self) -> None:
        """
        The fast path splits a read at most once: a read of many chunks it declines (here,
        each with an extension) is not split again at every chunk, which would be quadratic.
        """
        decoder, data, _ = _decoder()
        splits: list[int] = []
        real = ChunkedDecoder._whole_chunks

        def counting(data: bytes, pos: int, out: list[bytes]) -> int:
            splits.append(pos)
            return real(data, pos, out)

        decoder._whole_chunks = counting  # type: ignore[method-assign]
        decoder.dataReceived(b"".join(b"1;e\r\n%d\r\n" % (i % 10) for i in range(1000)))
        self.assertEqual(len(splits), 1)
        self.assertEqual(b"".join(data), b"".join(b"%d" % (i % 10) for i in range(1000)))

    def test_end_delivers_data_before_finish(self) -> None:
        """Data read with the last chunk is delivered before the end is reported."""
        order: list[str] = []
        decoder = ChunkedDecoder(lambda d: order.append("data"), lambda e: order.append("end"))
        decoder.dataReceived(b"2\r\nhi\r\n0\r\n\r\n")
        self.assertEqual(order, ["data", "end"])

    def test_hex_sizes(self) -> None:
        """Sizes are hexadecimal, either case."""
        decoder, data, finished = _decoder()
        decoder.dataReceived(b"A\r\n0123456789\r\nb\r\n0123456789a\r\n0\r\n\r\n")
        self.assertEqual(b"".join(data), b"01234567890123456789a")
        self.assertEqual(finished, [b""])

    def test_bad_size_rejected(self) -> None:
        """A size that is not plain hex digits (sign, prefix, space, empty) is rejected."""
        for line in [b"zz", b"-1", b"+1", b"0x1", b" 1", b"1 ", b"", b";ext"]:
            decoder, _, _ = _decoder()
            with self.assertRaises(MalformedChunkedData, msg=line):
                decoder.dataReceived(line + b"\r\nx\r\n")

    def test_good_chunks_delivered_before_error(self) -> None:
        """Bad framing raises after delivering the good chunks before it."""
        decoder, data, _ = _decoder()
        with self.assertRaises(MalformedChunkedData):
            decoder.dataReceived(b"2\r\nok\r\nzz\r\n")
        self.assertEqual(data, [b"ok"])

    def test_missing_crlf_after_data(self) -> None:
        """Chunk data must be followed by CRLF, also when it arrives split."""
        for reads in ([b"2\r\nokXX"], [b"2\r\nok\r", b"X"], [b"2\r\nok", b"\n\r"]):
            decoder, _, _ = _decoder()
            with self.assertRaises(MalformedChunkedData):
                for read in reads:
                    decoder.dataReceived(read)

    def test_control_characters_in_extension(self) -> None:
        """A chunk extension may not hold control characters."""
        decoder, _, _ = _decoder()
        with self.assertRaises(MalformedChunkedData):
            decoder.dataReceived(b"1;a=\x00\r\nx\r\n")

    def test_backslash_in_extension(self) -> None:
        """
        A quoted-pair in a chunk extension is accepted (RFC 9112), unlike Twisted, whose
        extension characters leave out the backslash: one of two deliberate differences.
        """
        body = b'1;a="x\\"y"\r\nz\r\n0\r\n\r\n'
        decoder, data, finished = _decoder()
        decoder.dataReceived(body)
        self.assertEqual((data, finished), ([b"z"], [b""]))
        twisted = _ChunkedTransferDecoder(lambda d: None, lambda e: None)
        with self.assertRaises(_MalformedChunkedDataError):
            twisted.dataReceived(body)

    def test_one_chunk_per_read(self) -> None:
        """
        Reads of exactly one chunk each (a stream's events, mostly), data with a CRLF in it
        included, are delivered one by one; the last chunk ends the body.
        """
        decoder, data, finished = _decoder()
        for read in (b"5\r\nhello\r\n", b"4\r\na\r\nb\r\n", b"A\r\n0123456789\r\n"):
            decoder.dataReceived(read)
        self.assertEqual(data, [b"hello", b"a\r\nb", b"0123456789"])
        decoder.dataReceived(b"0\r\n\r\n")
        self.assertEqual(finished, [b""])

    def test_chunk_callback(self) -> None:
        """
        With a chunk callback, a read of exactly one chunk is handed over as it came, with
        where its data lies; any other read still goes to the data callback.
        """
        decoder, data, finished = _decoder()
        chunks: list[tuple[bytes, int, int]] = []
        decoder.chunkCallback = lambda read, start, end: chunks.append((read, start, end))
        decoder.dataReceived(b"5\r\nhello\r\n")
        decoder.dataReceived(b"1A\r\n" + b"z" * 26 + b"\r\n")
        decoder.dataReceived(b"2\r\nok\r\n1\r\n!\r\n")  # two chunks in one read
        decoder.dataReceived(b"3\r\nab")  # part of one
        decoder.dataReceived(b"c\r\n0\r\n\r\n")
        self.assertEqual(
            chunks, [(b"5\r\nhello\r\n", 3, 8), (b"1A\r\n" + b"z" * 26 + b"\r\n", 4, 30)]
        )
        self.assertEqual((data, finished), ([b"ok!", b"ab", b"c"], [b""]))
        self.assertIsNone(decoder.chunkCallback)  # let go of at the end, as the others

    def test_one_chunk_read_checked(self) -> None:
        """A read shaped like one chunk but framed wrong is refused, as any other."""
        for read in (
            b"5\r\nhelloXX",  # no CRLF after the data
            b"5\r\nhell\r\n",  # shorter than its size
            b"5\r\nhello!\r\n",  # longer
            b"x5\r\nhello\r\n",  # not hex
            b" 5\r\nhello\r\n",
        ):
            decoder, _, _ = _decoder()
            with self.assertRaises(MalformedChunkedData, msg=read):
                decoder.dataReceived(read)
                decoder.dataReceived(b"\r\n0\r\n\r\n")

    def test_whitespace_before_extension(self) -> None:
        """
        Whitespace between a size and its extension's ";" is accepted (BWS, RFC 9112),
        unlike Twisted; whitespace after a bare size is not (test_bad_size_rejected).
        """
        body = b"1 ;a=b\r\nz\r\n2\t \t; q\r\nok\r\n0 ;end\r\n\r\n"
        decoder, data, finished = _decoder()
        decoder.dataReceived(body)
        self.assertEqual((b"".join(data), finished), (b"zok", [b""]))
        twisted = _ChunkedTransferDecoder(lambda d: None, lambda e: None)
        with self.assertRaises(_MalformedChunkedDataError):
            twisted.dataReceived(body)
        for line in (b" ;a", b"\t;a", b"1 ", b"1 \t"):  # no size, or no extension
            decoder, _, _ = _decoder()
            with self.assertRaises(MalformedChunkedData, msg=line):
                decoder.dataReceived(line + b"\r\nx\r\n")

    def test_size_line_limit(self) -> None:
        """A chunk-size line of 1,024 bytes or more is rejected, whole or in pieces."""
        decoder, _, _ = _decoder()
        decoder.dataReceived(b"1;" + b"a" * (MAX_SIZE_LINE - 3) + b"\r\nx\r\n")
        decoder, _, _ = _decoder()
        with self.assertRaises(MalformedChunkedData):
            decoder.dataReceived(b"1;" + b"a" * (MAX_SIZE_LINE - 2) + b"\r\nx\r\n")
        decoder, _, _ = _decoder()
        with self.assertRaises(MalformedChunkedData):
            for _ in range(MAX_SIZE_LINE + 1):
                decoder.dataReceived(b"0")

    def test_trailers_dropped_and_bounded(self) -> None:
        """Trailer fields are discarded; more than 64 KiB of them is rejected."""
        decoder, data, finished = _decoder()
        decoder.dataReceived(b"1\r\nx\r\n0\r\nA: b\r\nC: d\r\n\r\n")
        self.assertEqual((data, finished), ([b"x"], [b""]))
        decoder, _, finished = _decoder()
        with self.assertRaises(MalformedChunkedData):
            decoder.dataReceived(b"0\r\n")
            for _ in range(MAX_TRAILERS // 1000 + 1):
                decoder.dataReceived(b"t" * 1000)
        self.assertEqual(finished, [])

    def test_trailer_line_bytes_not_buffered(self) -> None:
        """A trailer line arriving a byte at a time is counted, not kept."""
        decoder, _, finished = _decoder()
        decoder.dataReceived(b"0\r\n")
        for byte in b"name: value\r":
            decoder.dataReceived(bytes([byte]))
        self.assertLessEqual(len(decoder._partial), 1)
        decoder.dataReceived(b"\n\r\n")
        self.assertEqual(finished, [b""])

    def test_no_data_after_end(self) -> None:
        """Data after the last chunk is a programming error, as in Twisted's decoder."""
        decoder, _, _ = _decoder()
        decoder.dataReceived(b"0\r\n\r\n")
        with self.assertRaises(RuntimeError):
            decoder.dataReceived(b"x")

    def test_no_more_data(self) -> None:
        """The connection ending before the last chunk is data loss; after it, fine."""
        decoder, _, _ = _decoder()
        decoder.dataReceived(b"5\r\nab")
        with self.assertRaises(_DataLoss):
            decoder.noMoreData()
        decoder, _, _ = _decoder()
        decoder.dataReceived(b"0\r\n\r\n")
        decoder.noMoreData()

    def test_twisted_rejects_what_we_reject(self) -> None:
        """The inputs rejected above are rejected by Twisted's decoder too (same limits)."""
        for body in [b"zz\r\n", b"-1\r\n", b"1;a=\x00\r\nx\r\n", b"2\r\nokXX"]:
            decoder = _ChunkedTransferDecoder(lambda d: None, lambda e: None)
            with self.assertRaises(_MalformedChunkedDataError, msg=body):
                decoder.dataReceived(body)


class _Collect(Protocol):
    def __init__(self) -> None:
        self.reads: list[bytes] = []
        self.ended: list[Failure] = []

    def dataReceived(self, data: bytes) -> None:
        self.reads.append(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        assert reason is not None
        self.ended.append(reason)


class ClientProtocolTests(SynchronousTestCase):
    """The decoder is the one the upstream client uses for chunked responses."""

    def _response(self, head: bytes) -> tuple[Any, StringTransport, _Collect]:
        endpoint = InstantEndpoint()
        client = UpstreamClient(
            MemoryReactorClock(), b"http://up", endpoint, idle_connections=4, keepalive=4.0
        )
        d = client.request(b"GET", b"http://up/v1/models", Headers({b"host": [b"up"]}))
        protocol, transport = endpoint.connections[0]
        protocol.dataReceived(head)
        responses: list[Any] = []
        d.addCallback(responses.append)
        self.assertEqual(len(responses), 1)
        body = _Collect()
        responses[0].deliverBody(body)
        return protocol, transport, body

    def test_one_delivery_per_read(self) -> None:
        """Every chunk of one upstream read reaches the body protocol as one piece."""
        protocol, _, body = self._response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        protocol.dataReceived(b"6\r\ndata: \r\n2\r\n1\n\r\n1\r\n\n\r\n")
        protocol.dataReceived(b"3\r\nend\r\n0\r\n\r\n")
        self.assertEqual(body.reads, [b"data: 1\n\n", b"end"])
        self.assertTrue(body.ended[0].check(ResponseDone))

    def test_malformed_fails_the_response(self) -> None:
        """Bad framing from the upstream fails the body with ResponseFailed."""
        protocol, transport, body = self._response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        protocol.dataReceived(b"2\r\nok\r\nnot-hex\r\n")
        self.assertEqual(body.reads, [b"ok"])
        self.assertTrue(body.ended[0].check(ResponseFailed))
        self.assertTrue(transport.disconnecting)
