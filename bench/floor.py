"""
Floor proxies: the least a proxy built on Twisted can cost on this machine, measured beside
oaiproxy in the same run so that its numbers can be read against what Twisted itself costs.

None of them is a usable proxy. Each drops something oaiproxy must do:

- C{raw}: a Twisted TCP byte relay. One upstream connection per client connection, bytes
  copied both ways; no HTTP at all. What the reactor, the sockets and the kernel cost.
- C{web}: a twisted.web C{Site} (the server oaiproxy uses) and a minimal upstream client:
  persistent connections, the request written as one string, a response read only by its
  C{Content-Length} (no chunked bodies, no validation, no deadlines, no failover). What
  Twisted's HTTP/1.1 server costs. Non-streaming requests only.
- C{lean}: a minimal HTTP/1.1 server written on Twisted's C{Protocol} (a head read whole,
  a body by its C{Content-Length}, one request at a time, no validation) and the same
  minimal client. What HTTP/1.1 costs on Twisted without twisted.web's server: set beside
  C{web}, what twisted.web's server and request cost. Non-streaming requests only.
- C{agent}: a twisted.web C{Site} and Twisted's C{Agent} on a persistent pool, with the body
  relayed as it arrives (no header filtering, no validation, no deadlines, no failover, no
  backpressure). What Twisted's HTTP server and client cost together.
- C{epoll}: a TCP byte relay in pure Python on C{select.epoll}, without Twisted (its reactor
  is imported with this module but never run). One upstream connection per client
  connection, bytes copied both ways with one C{recv} and one C{send} per event, backpressure
  and half-closes relayed; no HTTP at all. The least any Python proxy can cost.

Run: C{python -m bench.floor MODE LISTEN_PORT UPSTREAM_PORT}; it listens on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import errno
import select
import socket
import sys
from collections.abc import Callable
from typing import Any, ClassVar

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource

__all__ = ["main"]

reactor: Any = _reactor
_HOP = frozenset(
    {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"host", b"te"}
)


# -- raw ---------------------------------------------------------------------------------


class _RawUpstream(Protocol):
    def __init__(self, down: _RawDownstream) -> None:
        self.down = down

    def dataReceived(self, data: bytes) -> None:
        assert self.down.transport is not None
        self.down.transport.write(data)

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        if self.down.transport is not None:
            self.down.transport.loseConnection()


class _RawDownstream(Protocol):
    up: _RawUpstream | None = None
    upstream_port = 0

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.pauseProducing()  # type: ignore[attr-defined]
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.upstream_port)
        d = endpoint.connect(Factory.forProtocol(lambda: _RawUpstream(self)))
        d.addCallbacks(self._connected, lambda _: self.transport.loseConnection())

    def _connected(self, up: _RawUpstream) -> None:
        self.up = up
        assert self.transport is not None
        self.transport.resumeProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        assert self.up is not None and self.up.transport is not None
        self.up.transport.write(data)

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        if self.up is not None and self.up.transport is not None:
            self.up.transport.loseConnection()


# -- web ---------------------------------------------------------------------------------


class _LeanClient(Protocol):
    """One request at a time; the response is read by its Content-Length only."""

    def __init__(self, idle: list[_LeanClient]) -> None:
        self._idle = idle
        self._buffer = b""
        self._done: Callable[[int, list[tuple[bytes, bytes]], bytes], None] | None = None

    def send(
        self, data: bytes, done: Callable[[int, list[tuple[bytes, bytes]], bytes], None]
    ) -> None:
        self._done = done
        self._buffer = b""
        assert self.transport is not None
        self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0 or self._done is None:
            return
        lines = self._buffer[:end].split(b"\r\n")
        code = int(lines[0].split(b" ", 2)[1])
        headers: list[tuple[bytes, bytes]] = []
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip()
            headers.append((name, value))
            if name == b"content-length":
                length = int(value)
        body = self._buffer[end + 4 :]
        if len(body) < length:
            return
        done, self._done = self._done, None
        self._idle.append(self)
        done(code, headers, body[:length])


class _WebResource(Resource):
    isLeaf = True

    def __init__(self, upstream_port: int) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._port = upstream_port
        self._idle: list[_LeanClient] = []

    def render(self, request: server.Request) -> int:
        assert request.content is not None
        body = request.content.read()
        head = b"".join(
            b"%s: %s\r\n" % (name, values[0])
            for name, values in request.requestHeaders.getAllRawHeaders()
            if name.lower() not in _HOP
        )
        data = b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n%s\r\n%s" % (
            request.method,
            request.uri,
            len(body),
            head,
            body,
        )

        def done(code: int, headers: list[tuple[bytes, bytes]], payload: bytes) -> None:
            request.setResponseCode(code)
            for name, value in headers:
                if name not in _HOP and name not in (b"date", b"server"):
                    request.responseHeaders.addRawHeader(name, value)
            request.write(payload)
            request.finish()

        if self._idle:
            self._idle.pop().send(data, done)
        else:
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self._port)
            d = endpoint.connect(Factory.forProtocol(lambda: _LeanClient(self._idle)))

            def connected(client: Any) -> None:
                client.send(data, done)

            d.addCallback(connected)
        return server.NOT_DONE_YET


# -- lean --------------------------------------------------------------------------------


class _LeanServer(Protocol):
    """
    A minimal HTTP/1.1 server: a head read whole, a body by its Content-Length, one request
    at a time; the response written with its Content-Length. No validation at all.
    """

    upstream_port = 0
    idle: ClassVar[list[_LeanClient]] = []

    def __init__(self) -> None:
        self._buffer = b""
        self._busy = False

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if self._busy:
            return
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        lines = self._buffer[:end].split(b"\r\n")
        method, target, _ = lines[0].split(b" ", 2)
        fields: list[bytes] = []
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            lower = name.lower()
            if lower == b"content-length":
                length = int(value)
            elif lower not in _HOP:
                fields.append(line)
        if len(self._buffer) < end + 4 + length:
            return
        body = self._buffer[end + 4 : end + 4 + length]
        self._buffer = self._buffer[end + 4 + length :]
        self._busy = True
        data = b"%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n%s\r\n\r\n%s" % (
            method,
            target,
            len(body),
            b"\r\n".join(fields),
            body,
        )
        if self.idle:
            self.idle.pop().send(data, self._done)
        else:
            endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.upstream_port)
            d = endpoint.connect(Factory.forProtocol(lambda: _LeanClient(self.idle)))

            def connected(client: Any) -> None:
                client.send(data, self._done)

            d.addCallback(connected)

    def _done(self, code: int, headers: list[tuple[bytes, bytes]], payload: bytes) -> None:
        head = b"".join(
            b"%s: %s\r\n" % (name, value)
            for name, value in headers
            if name not in _HOP and name not in (b"date", b"server")
        )
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 %d OK\r\n%sContent-Length: %d\r\n\r\n%s"
            % (code, head, len(payload), payload)
        )
        self._busy = False
        if self._buffer:
            self.dataReceived(b"")


# -- agent -------------------------------------------------------------------------------


class _BodyRelay(Protocol):
    def __init__(self, request: server.Request) -> None:
        self._request = request

    def dataReceived(self, data: bytes) -> None:
        self._request.write(data)

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        self._request.finish()


class _AgentResource(Resource):
    isLeaf = True

    def __init__(self, upstream_port: int) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 256
        self._agent = Agent(reactor, pool=pool)
        self._base = b"http://127.0.0.1:%d" % upstream_port

    def render(self, request: server.Request) -> int:
        assert request.content is not None
        headers = Headers()
        for name, values in request.requestHeaders.getAllRawHeaders():
            if name.lower() not in _HOP:
                headers.setRawHeaders(name, values)
        request.content.seek(0)
        producer = FileBodyProducer(request.content)
        d: Deferred[IResponse] = self._agent.request(
            request.method, self._base + request.uri, headers, producer
        )

        def got(response: IResponse) -> None:
            request.setResponseCode(response.code)
            for name, values in response.headers.getAllRawHeaders():
                if name.lower() not in _HOP:
                    request.responseHeaders.setRawHeaders(name, values)
            response.deliverBody(_BodyRelay(request))

        def failed(reason: Failure) -> None:
            request.setResponseCode(502)
            request.finish()

        d.addCallbacks(got, failed)
        return server.NOT_DONE_YET


# -- epoll -------------------------------------------------------------------------------

# Level-triggered: each readiness event then costs exactly one recv (or one send), since
# whatever a read leaves in the kernel is reported again; edge-triggered would need a read
# until EAGAIN on every event (in Python an extra syscall and a raised BlockingIOError each
# time) and readiness remembered by hand for a socket paused by backpressure. Backpressure is
# taking EPOLLIN out of the interest set, an epoll_ctl only when a buffer fills or drains.
# A socket with nothing to wait for is unregistered: a level-triggered EPOLLHUP or EPOLLERR
# on it would otherwise wake the loop again and again.
_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_READABLE = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_WRITABLE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR


class _Side:
    """One socket of a relayed pair, and the bytes still owed to it."""

    __slots__ = ("closed", "connecting", "eof", "fd", "mask", "out", "peer", "shut", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = self
        self.out = b""  # read from the peer, not yet taken by send
        self.eof = False  # nothing more will be read from it (its end read, or the peer gone)
        self.shut = False  # its write side is shut down: the peer's end was relayed
        self.closed = False
        self.connecting = False
        self.mask = 0  # the registered interest; 0: not registered


class _EpollRelay:
    def __init__(self, listen: int, upstream: int) -> None:
        self._upstream = ("127.0.0.1", upstream)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", listen))
        self._listener.listen(511)
        self._listener.setblocking(False)
        self._epoll = select.epoll()
        self._epoll.register(self._listener.fileno(), _IN)
        self._sides: dict[int, _Side] = {}

    def run(self) -> None:
        listener = self._listener.fileno()
        sides = self._sides
        poll = self._epoll.poll
        while True:
            accept = False
            for fd, events in poll():
                if fd == listener:
                    # After the batch: a descriptor closed in it cannot be reused meanwhile
                    # and take a stale event of the batch.
                    accept = True
                    continue
                side = sides.get(fd)
                if side is None:
                    continue
                if side.connecting:
                    self._connected(side)
                    continue
                if events & _WRITABLE and side.out:
                    self._write(side)
                if events & _READABLE and side.mask & _IN:
                    self._read(side)
            if accept:
                self._accept()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            except OSError:
                return  # out of descriptors: the listener stays readable, retried next time
            try:
                up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            except OSError:
                conn.close()
                return
            for sock in (conn, up):
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = up.connect_ex(self._upstream)
            down, upside = _Side(conn), _Side(up)
            down.peer, upside.peer = upside, down
            self._sides[down.fd] = down
            self._sides[upside.fd] = upside
            if err == errno.EINPROGRESS:
                # The client is not read (nor registered) until the upstream is connected.
                upside.connecting = True
                upside.mask = _OUT
                self._epoll.register(upside.fd, _OUT)
            elif err:
                self._fail(upside)
            else:
                self._update(upside)
                self._update(down)

    def _connected(self, up: _Side) -> None:
        up.connecting = False
        if up.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self._fail(up)
        else:
            self._update(up)
            self._update(up.peer)

    def _read(self, side: _Side) -> None:
        try:
            data = side.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self._fail(side)
            return
        if not data:
            side.eof = True
            self._settle(side)
            return
        peer = side.peer
        try:
            sent = peer.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._fail(peer)
            return
        if sent < len(data):
            # Buffer the rest, and read no more from this side until the peer took it.
            peer.out = data[sent:]
            self._update(side)
            self._update(peer)

    def _write(self, side: _Side) -> None:
        try:
            sent = side.sock.send(side.out)
        except BlockingIOError:
            return
        except OSError:
            self._fail(side)
            return
        side.out = side.out[sent:]
        if not side.out:
            self._settle(side)

    def _fail(self, side: _Side) -> None:
        """C{side}'s socket broke: close it; its peer is closed once what it is owed is sent."""
        side.eof = True
        side.out = b""
        self._close(side)
        self._settle(side.peer)

    def _settle(self, side: _Side) -> None:
        """
        After an end read, a buffer drained or a socket closed: relay an end whose bytes are
        all sent as a half-close, close a socket done both ways, re-arm the others.
        """
        pair = (side, side.peer)
        for s in pair:
            if s.closed:
                continue
            if s.peer.closed:
                s.eof = True  # nowhere to relay its bytes to
            if s.peer.eof and not s.out and not s.shut:
                s.shut = True
                with contextlib.suppress(OSError):
                    s.sock.shutdown(socket.SHUT_WR)
        for s in pair:
            if s.closed:
                continue
            if s.eof and s.shut:
                self._close(s)
            else:
                self._update(s)

    def _update(self, side: _Side) -> None:
        """Register what C{side} waits for: bytes to send, or room in its peer to read into."""
        want = _OUT if side.out else 0
        if not side.eof and not side.peer.out:
            want |= _IN
        if want == side.mask:
            return
        if not side.mask:
            self._epoll.register(side.fd, want)
        elif not want:
            self._epoll.unregister(side.fd)
        else:
            self._epoll.modify(side.fd, want)
        side.mask = want

    def _close(self, side: _Side) -> None:
        # Closing the descriptor takes it out of the epoll set too.
        side.closed = True
        side.mask = 0
        del self._sides[side.fd]
        side.sock.close()


def main(argv: list[str]) -> None:
    """Run the floor proxy C{argv[0]} on port C{argv[1]} in front of port C{argv[2]}."""
    mode, listen, upstream = argv[0], int(argv[1]), int(argv[2])
    if mode == "epoll":
        _EpollRelay(listen, upstream).run()
        return
    factory: Any
    if mode == "raw":
        _RawDownstream.upstream_port = upstream
        factory = Factory.forProtocol(_RawDownstream)
    elif mode == "lean":
        _LeanServer.upstream_port = upstream
        factory = Factory.forProtocol(_LeanServer)
    elif mode in ("web", "agent"):
        resource = _WebResource(upstream) if mode == "web" else _AgentResource(upstream)
        # As oaiproxy's site: request bodies are not parsed as forms.
        site = server.Site(resource, parsePOSTFormSubmission=False)
        site.log = lambda request: None  # type: ignore[method-assign]
        site.noisy = False
        factory = site
    else:
        raise SystemExit(f"unknown floor mode {mode!r}: raw, lean, web, agent or epoll")
    TCP4ServerEndpoint(reactor, listen, backlog=511, interface="127.0.0.1").listen(factory)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
