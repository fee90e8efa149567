"""
Many concurrent streamed chat completions over raw HTTP/1.1 sockets, timing each one's first
token and checking that it completes.

One connection per stream, C{Connection: close}; the time to first token (TTFT) of a stream
runs from the start of its TCP connect to the first byte of its first SSE event. All streams
are started together and the whole run is bounded by a timeout.

The client is one loop on C{select.epoll} with non-blocking sockets and nothing else: a few
microseconds of Python per socket event. It was an C{asyncio} client (streams and a task per
connection) until 2026-12-07, which used 6.5 ms of CPU per stream of 200 events (4.5 user,
2 system), about half a core during a burst, on the same two cores as the servers it
measured: it read every event as it came, although it meant to read in batches (asyncio's
transports read a readable socket whatever the task awaits), and each read went through a
task, a future and a stream. This one uses about 1.6 ms per such stream. A stream's first
token is timed right after the read that holds it, and in each poll's batch the streams
still waiting for theirs are handled before the others; after it, a stream is read in
batches (its socket left out of the poll meanwhile, so the kernel buffers its events), until
its body or its connection ends.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import os
import select
import socket
import statistics
import time
from dataclasses import dataclass

from bench.loadgen import stream_body

__all__ = ["StreamRun", "dechunk", "percentile", "run_streams"]


def percentile(values: list[float], pct: float) -> float:
    """The C{pct} percentile of C{values} (nearest rank); NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, round(pct / 100 * len(ordered) + 0.5 - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]


def dechunk(body: bytes) -> bytes:
    """Decode an HTTP/1.1 chunked body (trailers ignored); L{ValueError} if it is cut short."""
    out = bytearray()
    pos = 0
    while True:
        end = body.find(b"\r\n", pos)
        if end < 0:
            raise ValueError("chunked body cut short in a chunk size line")
        size = int(body[pos:end].split(b";", 1)[0], 16)
        pos = end + 2
        if size == 0:
            return bytes(out)
        if pos + size + 2 > len(body):
            raise ValueError("chunked body cut short in a chunk")
        out += body[pos : pos + size]
        pos += size + 2


@dataclass(frozen=True)
class _One:
    ok: bool
    connect_ms: float
    ttft_ms: float
    total_ms: float
    events: int
    error: str


@dataclass(frozen=True)
class StreamRun:
    """The outcome of one run of concurrent streams."""

    streams: int
    completed: int
    errors: list[str]
    ttft_ms: list[float]
    total_ms: list[float]
    connect_ms: list[float]
    wall_s: float

    def ttft(self, pct: float) -> float:
        return percentile(self.ttft_ms, pct)

    def total(self, pct: float) -> float:
        return percentile(self.total_ms, pct)

    def connect(self, pct: float) -> float:
        return percentile(self.connect_ms, pct)

    @property
    def ttft_mean(self) -> float:
        return statistics.fmean(self.ttft_ms) if self.ttft_ms else float("nan")


def _request(host: str, port: int, chunks: int, chunk_size: int, delay_ms: int) -> bytes:
    body = stream_body().encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\n"
        b"Host: %s:%d\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n"
        b"x-mock-chunks: %d\r\n"
        b"x-mock-chunk-size: %d\r\n"
        b"x-mock-delay-ms: %d\r\n"
        b"Connection: close\r\n\r\n%s"
    ) % (host.encode(), port, len(body), chunks, chunk_size, delay_ms, body)


class _Conn:
    """One stream's socket and what was read from it."""

    __slots__ = ("connected", "data", "first", "head_end", "pending", "sock", "started")

    def __init__(self, sock: socket.socket, request: bytes, started: float) -> None:
        self.sock = sock
        self.started = started
        self.connected = float("nan")
        self.first: float | None = None
        self.data = bytearray()
        self.head_end = -1
        self.pending = request  # what is still to be sent


def _outcome(conn: _Conn, finished: float, expected_events: int, error: str) -> _One:
    """What became of one stream, from what it read."""
    connect_ms = (conn.connected - conn.started) * 1000
    ttft = float("nan") if conn.first is None else (conn.first - conn.started) * 1000
    total_ms = (finished - conn.started) * 1000
    if error:
        return _One(False, connect_ms, ttft, total_ms, 0, error)
    data = conn.data
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0:
        return _One(False, connect_ms, ttft, total_ms, 0, "no response head")
    head = bytes(data[:head_end]).lower()
    if not head.startswith((b"http/1.1 200", b"http/1.0 200")):
        status = head.split(b"\r\n", 1)[0].decode("latin-1")
        return _One(False, connect_ms, ttft, total_ms, 0, status)
    body = bytes(data[head_end + 4 :])
    if b"\r\ntransfer-encoding: chunked" in head:
        try:
            body = dechunk(body)
        except ValueError as e:
            return _One(False, connect_ms, ttft, total_ms, 0, str(e))
    events = body.count(b"data: ")
    if not body.endswith(b"data: [DONE]\n\n") or events != expected_events:
        return _One(False, connect_ms, ttft, total_ms, events, f"incomplete: {events} events")
    if conn.first is None:
        # Looked for in the bytes as read: an event split across chunks is not seen there.
        return _One(False, connect_ms, ttft, total_ms, events, "first event not timed")
    return _One(True, connect_ms, ttft, total_ms, events, "")


_READ = select.EPOLLIN | select.EPOLLRDHUP
_WRITE = select.EPOLLOUT
_ENDED = select.EPOLLRDHUP | select.EPOLLHUP


def run_streams(
    port: int,
    *,
    streams: int,
    chunks: int,
    chunk_size: int,
    delay_ms: int,
    timeout: float,
    read_every: float = 0.05,
    stagger: float = 0.0,
    host: str = "127.0.0.1",
) -> StreamRun:
    """
    C{streams} concurrent streamed completions to C{host:port}, bounded by C{timeout}: all
    started at once, or one every C{stagger} seconds. After its first event a stream is read
    every C{read_every} seconds.
    """
    request = _request(host, port, chunks, chunk_size, delay_ms)
    # Content events, then the finish event and [DONE].
    expected = chunks + 2
    poller = select.epoll()
    conns: dict[int, _Conn] = {}
    done: list[_One] = []
    # Streams read in batches wait here, out of the poll, until their time comes.
    resting: list[tuple[float, int]] = []
    errors: list[str] = []
    started = now = time.perf_counter()
    deadline = started + timeout
    next_start = started
    to_start = streams

    def finish(fd: int, when: float, error: str = "") -> None:
        conn = conns.pop(fd)
        with contextlib.suppress(OSError, ValueError):
            poller.unregister(fd)  # not registered while resting
        conn.sock.close()
        done.append(_outcome(conn, when, expected, error))

    def handle(fd: int, mask: int) -> None:
        conn = conns[fd]
        if conn.pending:
            err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                finish(fd, time.perf_counter(), f"connect: {os.strerror(err)}")
                return
            if conn.connected != conn.connected:  # NaN: the first write event
                conn.connected = time.perf_counter()
            try:
                sent = conn.sock.send(conn.pending)
            except BlockingIOError:
                return
            except OSError as e:
                finish(fd, time.perf_counter(), f"send: {e}")
                return
            conn.pending = conn.pending[sent:]
            if not conn.pending:
                poller.modify(fd, _READ)
            return
        try:
            piece = conn.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError as e:
            finish(fd, time.perf_counter(), f"recv: {e}")
            return
        if not piece:
            finish(fd, time.perf_counter())
            return
        data = conn.data
        data += piece
        if conn.first is None:
            if conn.head_end < 0:
                conn.head_end = data.find(b"\r\n\r\n")
            if conn.head_end >= 0 and data.find(b"data: ", conn.head_end) >= 0:
                # Timed once read: a later bound than the poll's return, since the event
                # may have come after it (after the head that woke the poll).
                conn.first = time.perf_counter()
        elif read_every > 0 and not mask & _ENDED and not data.endswith(b"0\r\n\r\n"):
            # Left out of the poll for a while: the kernel keeps its events. (Not once the
            # body or the connection has ended: its end would then be seen late.)
            poller.unregister(fd)
            heapq.heappush(resting, (time.perf_counter() + read_every, fd))

    try:
        while (to_start or conns) and now < deadline:
            while to_start and next_start <= now:
                to_start -= 1
                next_start += stagger
                sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn = _Conn(sock, request, time.perf_counter())
                conns[sock.fileno()] = conn
                try:
                    err = sock.connect_ex((host, port))
                except OSError as e:  # an address connect_ex cannot even try
                    err = e.errno or errno.EINVAL
                if err not in (0, errno.EINPROGRESS):
                    finish(sock.fileno(), time.perf_counter(), f"connect: {os.strerror(err)}")
                    continue
                poller.register(sock.fileno(), _WRITE)
                if stagger > 0:
                    break
            while resting and resting[0][0] <= now:
                _, fd = heapq.heappop(resting)
                poller.register(fd, _READ)
            wake = deadline
            if to_start:
                wake = min(wake, next_start)
            if resting:
                wake = min(wake, resting[0][0])
            events = poller.poll(max(0.0, wake - now))
            # Streams still waiting for their first token (or to send their request) first,
            # so that the reading of other streams' events does not delay their timing.
            later = []
            for fd, mask in events:
                found = conns.get(fd)
                if found is None:
                    continue
                if found.first is None:
                    handle(fd, mask)
                else:
                    later.append((fd, mask))
            for fd, mask in later:
                if fd in conns:
                    handle(fd, mask)
            now = time.perf_counter()
    finally:
        if to_start:
            errors.append(f"{to_start} streams never started")
        if conns:
            errors.append(f"{len(conns)} streams timed out")
            for conn in conns.values():
                conn.sock.close()
        poller.close()
    wall = time.perf_counter() - started
    errors += [r.error for r in done if not r.ok]
    good = [r for r in done if r.ok]
    return StreamRun(
        streams=streams,
        completed=len(good),
        errors=errors,
        ttft_ms=[r.ttft_ms for r in good],
        total_ms=[r.total_ms for r in good],
        connect_ms=[r.connect_ms for r in good],
        wall_s=wall,
    )
