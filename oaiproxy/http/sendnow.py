"""
Sending what a connection has buffered at once, instead of on the reactor's next turn.

Twisted's TCP transports only buffer in C{write}: the bytes go out when the reactor next
finds the socket writable, after everything else the current turn does. Its TLS transport
(C{BufferingTLSTransport}) holds small writes one turn more, to encrypt them together. When
the proxy has just written a whole upstream request, a relayed chunk or the end of a
response, the rest of the turn is bookkeeping: timers, the response
parser's teardown, the connection's return to the pool, the request's cleanup. Sending first
takes that bookkeeping off the path the peer waits on, and the upstream starts working while
the proxy finishes it.

Written against Twisted 26.10.0: it reads C{FileDescriptor}'s private buffers
(C{dataBuffer}, C{_tempDataBuffer}) and calls the public C{doWrite} (L{IWriteDescriptor}); for
TLS it flushes C{BufferingTLSTransport}'s private C{_aggregator}, as Twisted's own
C{loseConnection} does.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from twisted.internet import tcp
from twisted.logger import Logger
from twisted.protocols.tls import BufferingTLSTransport

__all__ = ["Cork", "SendTools", "corker", "send_tools", "sender", "writer"]


def sender(transport: Any) -> Callable[[], None] | None:
    """
    A function that sends at once what C{transport} has buffered, as much as the socket
    takes (the rest stays buffered for the reactor as usual): for a plain TCP connection, or
    Twisted's buffering TLS transport over one. C{None} for any other transport (in-memory
    ones, HTTP/2 streams), which are left as they are.
    """
    if _plain_tcp(transport):
        return partial(_send, transport)
    below: Any = getattr(transport, "transport", None)
    if isinstance(transport, BufferingTLSTransport) and _plain_tcp(below):
        return partial(_send_tls, transport, below)
    return None


def writer(transport: Any) -> Callable[[bytes], None] | None:
    """
    A function that writes bytes to C{transport} and sends them at once: straight to the
    socket when nothing is buffered before them (Twisted's C{write} would register the
    socket for writing, and its C{doWrite} unregister it once sent: two C{epoll_ctl} per
    write); what the socket does not take is buffered by Twisted as usual. For a plain TCP
    connection only; C{None} for any other transport.
    """
    return partial(_write, transport) if _plain_tcp(transport) else None


class Cork:
    """
    Holds what is written to a plain TCP connection between L{start} and L{send}, then sends
    it with one C{send}: a whole small response (head and body, written by Twisted's request
    in two writes) leaves in one segment, without the C{epoll_ctl} pair Twisted's C{write}
    and C{doWrite} put around it. What the socket does not take is buffered by Twisted as
    usual. Twisted 26.10.0: the connection's C{write} and C{writeSequence} are shadowed on
    the instance while corked (both only append to its buffer), and its private buffers read.
    """

    def __init__(self, connection: tcp.Connection) -> None:
        self._connection = connection
        self._pieces: list[bytes] = []
        self._corked = False
        self._depth = 0

    def start(self) -> None:
        """
        Hold the writes from here, if nothing waits in the connection's buffer already.
        Calls nest: only the L{send} matching the outermost L{start} sends.
        """
        self._depth += 1
        c: Any = self._connection
        if self._corked or c.dataBuffer or c._tempDataBuffer or not c.connected:
            return
        if id(c) in _sending:
            return
        self._corked = True
        c.write = self._pieces.append
        c.writeSequence = self._pieces.extend

    def send(self) -> None:
        """Stop holding writes; send what was held (the rest buffered for the reactor)."""
        self._depth -= 1
        if not self._corked or self._depth > 0:
            return
        self._corked = False
        connection: Any = self._connection
        del connection.write, connection.writeSequence
        data = b"".join(self._pieces)
        self._pieces = []
        if not data or not connection.connected or connection._writeDisconnected:
            return  # nothing, or a connection that takes nothing more (as write would do)
        # Being closed (a response with Connection: close) is no reason to wait: the reactor
        # closes the connection once its buffer is empty, which it may be at once.
        _send_or_buffer(connection, data, connection.dataBuffer or connection._tempDataBuffer)

    def __enter__(self) -> Cork:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.send()


def corker(transport: Any) -> Cork | None:
    """A L{Cork} for C{transport} if it is a plain TCP connection; else C{None}."""
    return Cork(transport) if _plain_tcp(transport) else None


#: A connection's L{sender}, L{writer} and L{corker} (the last two only for plain TCP).
SendTools = tuple[Callable[[], None] | None, Callable[[bytes], None] | None, "Cork | None"]


def send_tools(transport: Any) -> SendTools:
    """C{transport}'s L{sender}, L{writer} and L{corker}: made once per connection."""
    write_now = writer(transport)
    return sender(transport), write_now, corker(transport) if write_now is not None else None


def _plain_tcp(transport: Any) -> bool:
    """A TCP connection of Twisted's (TLS started on it with startTLS is not handled)."""
    return isinstance(transport, tcp.Connection) and not transport.TLS


log = Logger()

# The connections being sent on now: a producer resumed inside a send started here may write
# and send again; that send is left to the reactor.
# (Inside a send the reactor started, one such send still runs, one level deep: doWrite
# resumes its producer as its very last step.)
_sending: set[int] = set()


def _sendable(connection: tcp.Connection) -> bool:
    """
    Whether a connection may be sent on here: open, not being closed (only the reactor can
    close it once its buffer is empty), and not being sent on already.
    """
    return bool(
        connection.connected
        and not connection.disconnecting
        and not connection._writeDisconnecting
        and id(connection) not in _sending
    )


def _write(connection: tcp.Connection, data: bytes) -> None:
    # _send_or_buffer's body, written out: this runs once per relayed event, and the call
    # cost 1% of the instructions per event (bench/ab.py chunk-instructions).
    if _sendable(connection) and not (connection.dataBuffer or connection._tempDataBuffer):
        try:
            sent = connection.socket.send(data)
        except OSError:
            sent = 0  # would block, or broken: buffered, left to the reactor
        if sent == len(data):
            return
        data = data[sent:]
    connection.write(data)


def _send_or_buffer(connection: tcp.Connection, data: bytes, behind: object) -> None:
    """
    Send C{data} straight to the socket, unless C{behind} (something must go first, or the
    connection may not be sent on here); what is not sent is Twisted's to buffer and send.
    """
    if not behind:
        try:
            sent = connection.socket.send(data)
        except OSError:
            # Would block, or the connection is broken: buffer it, and let the reactor send
            # it or find the error, as for any write.
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    connection.write(data)


def _send(connection: tcp.Connection) -> None:
    """
    Send what C{connection} has buffered.

    A connection being closed is left to the reactor: its C{doWrite} would close it once the
    buffer is empty, and only the reactor can act on that. An error from the socket is left
    for the reactor to find again (the connection still waits for writability). An exception
    from a producer resumed inside the send is logged and the connection aborted, as the
    reactor does, instead of reaching the caller.
    """
    if not _sendable(connection) or not (connection.dataBuffer or connection._tempDataBuffer):
        return
    key = id(connection)
    _sending.add(key)
    try:
        connection.doWrite()
    except Exception:
        log.failure("sending at once failed; aborting the connection")
        connection.abortConnection()
    finally:
        _sending.discard(key)


def _send_tls(tls: BufferingTLSTransport, connection: tcp.Connection) -> None:
    """Encrypt what the TLS transport holds for the next turn now, then send it."""
    # What its callLater(0) would do next turn (and loseConnection does at once); after the
    # connection is lost the aggregator is a no-op one.
    tls._aggregator.flush()
    _send(connection)
