"""
TCP_NODELAY on the proxy's upstream connections, TLS included.

Requests and streamed events are small writes; with Nagle's algorithm on, a small write waits
for the peer to acknowledge the previous one, which a delayed ACK can hold for up to 40 ms.
Twisted's HTTP server turns Nagle off on accepted connections (TLS included), but its HTTP
client never does: the proxy does it on its upstream connections.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import ITCPTransport

__all__ = ["set_no_delay"]


def set_no_delay(transport: Any) -> bool:
    """
    Turn Nagle's algorithm off on C{transport}, or on the TCP transport under its TLS
    wrapper(s). Returns whether a TCP transport was found.
    """
    seen = 0
    while transport is not None and seen < 4:
        if ITCPTransport.providedBy(transport):
            transport.setTcpNoDelay(True)
            return True
        transport = getattr(transport, "transport", None)
        seen += 1
    return False
