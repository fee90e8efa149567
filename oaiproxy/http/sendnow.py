"""
Sending what a TCP transport has buffered at once, instead of on the reactor's next turn.

Twisted's TCP transports only buffer in C{write}: the bytes go out when the reactor next
finds the socket writable, after everything else the current turn does. When the proxy has
just written a whole upstream request, or a client's whole response (or a streamed event),
the rest of the turn is bookkeeping: timers, the response parser's teardown, the connection's
return to the pool, the request's cleanup. Sending first takes that bookkeeping off the path
the peer waits on, and the upstream starts working while the proxy finishes it.

Written against Twisted 26.10.0: it reads C{FileDescriptor}'s private buffers
(C{dataBuffer}, C{_tempDataBuffer}) and calls the public C{doWrite} (L{IWriteDescriptor}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

__all__ = ["plain_tcp", "send_now"]


def plain_tcp(transport: Any) -> tcp.Connection | None:
    """C{transport} if it is a plain (not TLS) Twisted TCP connection, else C{None}."""
    if isinstance(transport, tcp.Connection) and not transport.TLS:
        return transport
    return None


def send_now(transport: tcp.Connection | None) -> None:
    """
    Send what C{transport} (from L{plain_tcp}) has buffered, as much as the socket takes;
    the rest stays buffered for the reactor as usual.

    A connection being closed is left to the reactor: its C{doWrite} would close it once the
    buffer is empty, and only the reactor can act on that. An error from the socket is left
    for the reactor to find again (the transport still waits for writability).
    """
    if (
        transport is None
        or not transport.connected
        or transport.disconnecting
        or transport._writeDisconnecting
        or not (transport.dataBuffer or transport._tempDataBuffer)
    ):
        return
    transport.doWrite()
