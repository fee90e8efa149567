"""
A decoder for upstream bodies in HTTP/1.1 I{chunked} transfer coding that parses a whole read
in one loop and delivers its data in one callback.

Upstreams send each SSE event as its own HTTP chunk. Twisted's C{_ChunkedTransferDecoder}
walks a state machine per chunk (a C{getattr} dispatch per state, a C{bytearray} delete and
a per-byte hex check), which was about 70% of the proxy's CPU when relaying small events;
this loop does the same checks with C{bytes.find} and C{bytes.translate}, and takes runs of
plain chunks (what SSE events are) with one C{split} per read, and a read of exactly one
chunk (most reads of a stream) with a few comparisons. Its limits are
Twisted's (26.10.0): a chunk-size line under 1,024 bytes, 64 KiB of trailers (counted and
discarded, never buffered), hex digits only in a chunk size, no control characters in chunk
extensions. Two differences, on purpose, where RFC 9112 (section 7.1.1) allows what Twisted
refuses: a backslash in an extension (a quoted-pair), which Twisted's list of extension
characters leaves out; and whitespace between a chunk size and its extension's C{;}.

It is plugged into Twisted's C{HTTPClientParser} (see L{oaiproxy.http.forwarder}), so it
keeps that parser's decoder interface: C{dataReceived}, C{noMoreData} raising Twisted's
private C{_DataLoss} when the body was cut short.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.web.http import _DataLoss

__all__ = ["MAX_SIZE_LINE", "MAX_TRAILERS", "ChunkedDecoder", "MalformedChunkedData"]

#: A chunk-size line (size and extensions, without its CRLF) must be shorter than this.
MAX_SIZE_LINE = 1024
#: Trailer fields (with their CRLFs) are discarded, up to this many bytes in all.
MAX_TRAILERS = 64 * 1024

_HEX_DIGITS = b"0123456789abcdefABCDEF"
# HTAB, SP, VCHAR and obs-text: what a chunk extension may hold (RFC 9112 section 7.1.1).
_EXT_OK = b"\t" + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))

_SIZE, _DATA, _CRLF, _TRAILER, _DONE = range(5)


class MalformedChunkedData(ValueError):
    """The chunked framing is invalid: the response cannot be trusted past this point."""


def _discard(data: bytes) -> None:
    """Where a finished decoder's callbacks point."""


class ChunkedDecoder:
    """
    Decodes one chunked body.

    @param dataCallback: called with the data of all the chunks (or parts of chunks) found in
        one C{dataReceived} call, joined; never with empty bytes.
    @param finishCallback: called once, after the last data, with the bytes that followed
        the end of the body.
    @ivar chunkCallback: when set, called instead of C{dataCallback} for a read that holds
        exactly one whole chunk of data, checked (bare hex size, its CRLF): with the read as
        it came and where the chunk's data starts and ends in it, so that a reader that frames
        its output in chunks too can pass the chunk on as it is.
    """

    chunkCallback: Callable[[bytes, int, int], None] | None = None

    def __init__(
        self, dataCallback: Callable[[bytes], None], finishCallback: Callable[[bytes], None]
    ) -> None:
        self.dataCallback = dataCallback
        self.finishCallback = finishCallback
        self._state = _SIZE
        # Bytes of a size line, CRLF or trailer line that arrived without their end.
        self._partial = b""
        # Data bytes still to come in the current chunk.
        self._remaining = 0
        self._trailer_bytes = 0
        # Bytes of the current trailer line seen so far (not kept).
        self._trailer_line = 0
        self._extra = b""

    def dataReceived(self, data: bytes) -> None:
        """
        Decode C{data}. The data of every complete or partial chunk in it is delivered before
        this returns, and before it raises L{MalformedChunkedData} at bad framing.
        """
        if self._state == _SIZE and not self._partial:
            # The commonest read of a streamed answer: one whole chunk of data (an SSE
            # event), from its size line to its CRLF. Anything else, or anything off (a
            # size that is not bare hex, no CRLF after the data), takes the general path.
            eol = data.find(b"\r\n")
            if 0 < eol <= 8 and data[-2:] == b"\r\n":
                size = data[:eol]
                if (
                    not size.translate(None, _HEX_DIGITS)
                    and len(data) == eol + 4 + int(size, 16)
                    and eol + 4 < len(data)  # not the last chunk (size 0)
                ):
                    if self.chunkCallback is not None:
                        self.chunkCallback(data, eol + 2, len(data) - 2)
                    else:
                        self.dataCallback(data[eol + 2 : -2])
                    return
        if self._state == _DONE:
            raise RuntimeError("chunked body data after its last chunk")
        if self._partial:
            data = self._partial + data
            self._partial = b""
        out: list[bytes] = []
        try:
            self._decode(data, out)
        finally:
            if out:
                self.dataCallback(out[0] if len(out) == 1 else b"".join(out))
        if self._state == _DONE:
            extra, self._extra = self._extra, b""
            finish = self.finishCallback
            # The callbacks are methods of the parser that holds this decoder: let go of them
            # (as Twisted's decoders do), so that neither waits for a full garbage collection.
            self.dataCallback = self.finishCallback = _discard
            self.chunkCallback = None
            finish(extra)

    def _decode(self, data: bytes, out: list[bytes]) -> None:
        pos = 0
        end = len(data)
        state = self._state
        fast = True
        try:
            while pos < end:
                if state == _DATA:
                    take = min(self._remaining, end - pos)
                    out.append(data[pos : pos + take])
                    pos += take
                    self._remaining -= take
                    if not self._remaining:
                        state = _CRLF
                elif state == _SIZE:
                    if fast:
                        # Once per read, so that data the fast path declines is split once
                        # and not again at every chunk (which would be quadratic).
                        fast = False
                        pos = self._whole_chunks(data, pos, out)
                        if pos >= end:
                            break
                    eol = data.find(b"\r\n", pos)
                    if eol < 0:
                        if end - pos > MAX_SIZE_LINE:
                            raise MalformedChunkedData("chunk-size line too long")
                        self._partial = data[pos:]
                        return
                    if eol - pos >= MAX_SIZE_LINE:
                        raise MalformedChunkedData("chunk-size line too long")
                    size, semicolon, ext = data[pos:eol].partition(b";")
                    if semicolon:
                        # Whitespace may come before an extension's ";" (BWS, RFC 9112
                        # section 7.1.1), not after a bare size.
                        size = size.rstrip(b" \t")
                    if not size or size.translate(None, _HEX_DIGITS):
                        raise MalformedChunkedData("chunk size is not a hexadecimal number")
                    if ext and ext.translate(None, _EXT_OK):
                        raise MalformedChunkedData("invalid characters in a chunk extension")
                    pos = eol + 2
                    self._remaining = int(size, 16)
                    state = _DATA if self._remaining else _TRAILER
                elif state == _CRLF:
                    if end - pos < 2:
                        if data[pos:] != b"\r":
                            raise MalformedChunkedData("chunk data not followed by CRLF")
                        self._partial = b"\r"
                        return
                    if data[pos : pos + 2] != b"\r\n":
                        raise MalformedChunkedData("chunk data not followed by CRLF")
                    pos += 2
                    state = _SIZE
                else:  # _TRAILER: fields are counted and dropped, never buffered
                    eol = data.find(b"\r\n", pos)
                    if eol < 0:
                        # Keep only a CR that may start the line's CRLF.
                        seen = end - pos
                        if data.endswith(b"\r"):
                            self._partial = b"\r"
                            seen -= 1
                        self._trailer_line += seen
                        self._trailer_bytes += seen
                        if self._trailer_bytes > MAX_TRAILERS:
                            raise MalformedChunkedData("trailer fields too long")
                        return
                    if eol == pos and not self._trailer_line:
                        self._extra = data[eol + 2 :]
                        state = _DONE
                        return
                    self._trailer_bytes += eol + 2 - pos
                    self._trailer_line = 0
                    if self._trailer_bytes > MAX_TRAILERS:
                        raise MalformedChunkedData("trailer fields too long")
                    pos = eol + 2
        finally:
            self._state = state

    @staticmethod
    def _whole_chunks(data: bytes, pos: int, out: list[bytes]) -> int:
        """
        The fast path: from C{pos} (the start of a chunk-size line), take every complete
        chunk whose size line is bare hex digits and whose data holds no CRLF, which is what
        SSE events look like, with one C{split}; return where the general loop must go on.
        Anything else (an extension, the last chunk, a chunk cut short, a bad size) is left
        to the general loop, which applies every check.
        """
        parts = data[pos:].split(b"\r\n") if pos else data.split(b"\r\n")
        last = len(parts) - 2
        i = 0
        while i < last:
            size_line = parts[i]
            chunk = parts[i + 1]
            if (
                not size_line
                or len(size_line) > 8
                or size_line.translate(None, _HEX_DIGITS)
                or int(size_line, 16) != len(chunk)
                or not chunk
            ):
                break
            out.append(chunk)
            pos += len(size_line) + len(chunk) + 4
            i += 2
        return pos

    def noMoreData(self) -> None:
        """
        The connection ended: fine after the last chunk, else raise Twisted's C{_DataLoss}
        (its response parser then fails the response with C{ResponseFailed}).
        """
        if self._state != _DONE:
            raise _DataLoss("the chunked body ended before its last chunk")
