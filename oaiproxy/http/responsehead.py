"""
A faster reading of upstream response heads for Twisted's HTTP/1.1 client parser.

Twisted's L{HTTPClientParser} is a C{LineReceiver}: it splits the head line by line, copying
what is left of its buffer for each line, and makes a method call per line through its state
machine. An upstream's response head almost always arrives whole in one read. L{parse_head}
then reads it with one C{split}, calls the parser's own C{statusReceived},
C{headerReceived} and C{allHeadersReceived} as the line-by-line path would, and hands what
follows the head back to the parser. Anything unusual (a head split across reads, bare LF line
ends, obs-fold continuation lines, a head over the parser's line limit) is left to Twisted's
path, so what is accepted and what is refused stays Twisted's.

Written against Twisted 26.10.0: it uses the parser's private state (C{state}, C{_buffer},
C{_busyReceiving}, C{_everReceivedData}), and stores header values as
C{HTTPParser.headerReceived} does, through L{add_checked}.
"""

from __future__ import annotations

from typing import Any

from twisted.web._newclient import HEADER, STATUS, HTTPParser

from oaiproxy.http.headers import add_checked

__all__ = ["parse_head"]


def parse_head(parser: Any, data: bytes) -> bool:
    """
    Feed C{data}, the first bytes of a response, to Twisted's C{HTTPClientParser} C{parser}
    with the whole head read at once. Returns C{False}, having done nothing, when the data
    is not a case for it: the caller then feeds it through the parser's C{dataReceived}.
    Parse errors are raised as Twisted's path raises them.
    """
    if (
        parser.state != STATUS
        or parser._buffer
        or parser._busyReceiving
        or parser.paused
        or not parser.line_mode
    ):
        return False
    end = data.find(b"\r\n\r\n")
    if end < 0 or end >= parser.MAX_LENGTH:
        return False
    head = data[:end]
    lines = head.split(b"\r\n")
    # Every CR and every LF must be part of a CRLF line end, and no line may continue the one
    # before (obs-fold).
    breaks = len(lines) - 1
    if (
        head.count(b"\n") != breaks
        or head.count(b"\r") != breaks
        or b"\n " in head
        or b"\n\t" in head
    ):
        return False
    parser._everReceivedData = True
    parser._busyReceiving = True
    try:
        parser.statusReceived(lines[0])
        parser.state = HEADER
        if type(parser).headerReceived is HTTPParser.headerReceived:
            # Twisted's HTTPParser.headerReceived, for values free of CR and LF.
            is_control = parser.isConnectionControlHeader
            headers, control = parser.headers, parser.connHeaders
            for line in lines[1:]:
                name, value = line.split(b":", 1)
                name = name.lower()
                add_checked(control if is_control(name) else headers, name, value.strip())
        else:
            for line in lines[1:]:
                name, value = line.split(b":", 1)
                parser.headerReceived(name, value.strip())
        # What follows the head is in the buffer while the head is handled, as on the
        # line-by-line path (a response without a body takes it from there).
        parser._buffer = data[end + 4 :]
        parser.allHeadersReceived()
    finally:
        parser._busyReceiving = False
    rest = parser.clearLineBuffer()
    if rest:
        parser.dataReceived(rest)
    return True
