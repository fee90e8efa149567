"""
The test reference: how the proxy read client request heads on Twisted's HTTP/1.1 server
channel before L{oaiproxy.http.h1server} (kept to compare the two, see
C{tests/test_h1_reference.py}).

A faster reading of client request heads for Twisted's HTTP/1.1 server channel.

Twisted's L{HTTPChannel} is a C{LineReceiver}: it splits a request head line by line (copying
what is left of its buffer for each line) and handles each line through three layers of
methods (the proxy's checks, Twisted's line handling, its header handling). A request head
almost always arrives whole in one read. L{parse_head} then checks the whole head first and,
only when it is plainly valid, does in one loop what the line-by-line path would do:

- the request line read as Twisted's own parser reads it (that parser itself for uncommon methods);
- header names canonicalised and checked by Twisted's own name encoder, values stripped as
  Twisted strips them, stored as C{Headers.addRawHeader} stores them;
- the body framed by Content-Length through Twisted's identity decoder;
- the head's end handled by the channel's own C{allHeadersReceived} and
  C{allContentReceived}, which the proxy overrides.

Anything unusual is left to the line-by-line path, with nothing changed, so every refusal
(and its status) stays that path's:

- heads split across reads, or arriving on a connection being closed;
- heads over the channel's limits;
- a bare CR or LF, or a NUL;
- obs-fold continuation lines;
- a malformed request line or header;
- any Transfer-Encoding;
- a Content-Length that is not a plain number, or is given twice;
- an empty line before the request line.

Written against Twisted 26.10.0: it reads and sets the channel's private state
(C{_HTTPChannel__first_line}, C{_HTTPChannel__header}, C{_command}, C{_path}, C{_version},
C{_receivedHeaderCount}, C{_receivedHeaderSize}, C{_transferDecoder}, C{_handlingRequest}, and
C{LineReceiver}'s C{_buffer} and C{_busyReceiving}).
"""

from __future__ import annotations

from typing import Any

from twisted.protocols.basic import LineReceiver
from twisted.web.http import _IdentityTransferDecoder
from twisted.web.http_headers import InvalidHeaderName, _nameEncoder
from twisted.web.iweb import INonQueuedRequestFactory

from oaiproxy.http.h1server import request_line

__all__ = ["parse_head"]

# The longest Content-Length taken here; longer ones go to the line-by-line path (and its
# refusal).
_MAX_LENGTH_DIGITS = 18

# NUL as an int: CPython 3.11 looks for a bytes needle in bytes (C{b"\\x00" in head}) only
# after trying it as an int and clearing the TypeError, about ten times slower.
_NUL = 0


def _check(channel: Any, data: bytes) -> tuple[int, int, list[bytes]] | None:
    """Where C{data}'s head ends, its size as counted by Twisted, and its lines; or C{None}."""
    if (
        channel.transport is None
        # A closing connection (an idle timeout, say; over TLS the client's bytes still come
        # until its close_notify): the line-by-line path stops after the request line.
        or channel.transport.disconnecting
        or not channel.line_mode
        or channel._busyReceiving
        or channel._buffer
        or channel.paused
        or channel._handlingRequest
        or not channel.persistent
        or channel._HTTPChannel__first_line != 1
        or channel._HTTPChannel__header
        or channel._transferDecoder is not None
    ):
        return None
    end = data.find(b"\r\n\r\n")
    if end <= 0 or end >= channel.MAX_LENGTH:
        return None
    head = data[:end]
    lines = head.split(b"\r\n")
    fields = len(lines) - 1
    if (
        fields > channel.maxHeaders
        or head.count(b"\n") != fields
        or head.count(b"\r") != fields
        or b"\n " in head
        or b"\n\t" in head
        or _NUL in head
    ):
        return None
    # Twisted counts the bytes of each line, without line ends.
    size = end - 2 * fields
    if size > channel.totalHeadersSize:
        return None
    return end, size, lines


def parse_head(channel: Any, data: bytes) -> bool:
    """
    Feed C{data} to Twisted's C{HTTPChannel} C{channel} with a request head that arrived whole
    read at once. Returns C{False}, having changed nothing, when C{data} is not a case for it:
    the caller then feeds it through the channel's usual C{dataReceived}.
    """
    checked = _check(channel, data)
    if checked is None:
        return False
    end, size, lines = checked
    parsed = request_line(lines[0])
    if parsed is None:
        return False
    method, target, version = parsed
    fields: list[tuple[bytes, bytes]] = []
    length: int | None = None
    for line in lines[1:]:
        raw_name, colon, value = line.partition(b":")
        if not colon:
            return False
        try:
            name = _nameEncoder.encode(raw_name)
        except InvalidHeaderName:
            return False
        value = value.strip(b" \t")
        if name == b"Transfer-Encoding":
            return False
        if name == b"Content-Length":
            if length is not None or not value.isdigit() or len(value) > _MAX_LENGTH_DIGITS:
                return False
            length = int(value)
        fields.append((name, value))

    # From here on, what the line-by-line path does for this head, in its order.
    channel.resetTimeout()
    factory = channel.requestFactory
    if INonQueuedRequestFactory.providedBy(factory):
        request = factory(channel)
    else:
        request = factory(channel, len(channel.requests))
    channel.requests.append(request)
    channel._HTTPChannel__first_line = 0
    channel._command = method
    channel._path = target
    channel._version = version
    # The names are canonical already (_nameEncoder.encode above), the values free of CR,
    # LF and NUL (_check): stored as add_checked would store them, without encoding again.
    raw = request.requestHeaders._rawHeaders
    for name, value in fields:
        raw.setdefault(name, []).append(value)
    if length is not None:
        channel.length = length
        channel._transferDecoder = _IdentityTransferDecoder(
            length, request.handleContentChunk, channel._finishRequestBody
        )
    channel._receivedHeaderCount = len(fields)
    channel._receivedHeaderSize = size
    # What follows the head waits in the line buffer while the head is handled, as on the
    # line-by-line path.
    channel._buffer = data[end + 4 :]
    channel._busyReceiving = True
    try:
        channel.allHeadersReceived()
        if channel.length == 0:
            channel.allContentReceived()
        else:
            channel.setRawMode()
    finally:
        channel._busyReceiving = False
    transport = channel.transport
    if transport is None or transport.disconnecting:
        return True
    rest = channel.clearLineBuffer()
    if rest:
        LineReceiver.dataReceived(channel, rest)
    return True
