"""
Many concurrent streamed chat completions over raw HTTP/1.1 sockets (asyncio), timing each
one's first token and checking that it completes.

One connection per stream, C{Connection: close}; the time to first token (TTFT) of a stream
runs from the start of its TCP connect to the first byte of its first SSE event. All streams
are started together and the whole run is bounded by a timeout.
"""

from __future__ import annotations

import asyncio
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


async def _one(
    host: str, port: int, request: bytes, expected_events: int, read_every: float
) -> _One:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    connected = time.perf_counter()
    first: float | None = None
    try:
        writer.write(request)
        data = bytearray()
        head_end = -1
        while True:
            piece = await reader.read(65536)
            if not piece:
                break
            data += piece
            if head_end < 0:
                head_end = data.find(b"\r\n\r\n")
            if first is None:
                if head_end >= 0 and data.find(b"data: ", head_end) >= 0:
                    first = time.perf_counter()
            elif read_every > 0:
                # After the first token, read in batches: the client's CPU then stays small
                # next to the servers' (the kernel buffers the events meanwhile).
                await asyncio.sleep(read_every)
        finished = time.perf_counter()
    finally:
        writer.close()
    connect_ms = (connected - started) * 1000
    ttft = float("nan") if first is None else (first - started) * 1000
    total_ms = (finished - started) * 1000
    if head_end < 0:
        return _One(False, connect_ms, ttft, total_ms, 0, "no response head")
    head = bytes(data[:head_end]).lower()
    if not head.startswith((b"http/1.1 200", b"http/1.0 200")):
        return _One(False, connect_ms, ttft, total_ms, 0, head.split(b"\r\n", 1)[0].decode())
    body = bytes(data[head_end + 4 :])
    if b"\r\ntransfer-encoding: chunked" in head:
        try:
            body = dechunk(body)
        except ValueError as e:
            return _One(False, connect_ms, ttft, total_ms, 0, str(e))
    events = body.count(b"data: ")
    if not body.endswith(b"data: [DONE]\n\n") or events != expected_events:
        return _One(False, connect_ms, ttft, total_ms, events, f"incomplete: {events} events")
    return _One(True, connect_ms, ttft, total_ms, events, "")


async def _run(
    host: str,
    port: int,
    n: int,
    *,
    chunks: int,
    chunk_size: int,
    delay_ms: int,
    timeout: float,
    read_every: float,
    stagger: float,
) -> StreamRun:
    request = _request(host, port, chunks, chunk_size, delay_ms)
    # Content events, then the finish event and [DONE].
    expected = chunks + 2
    started = time.perf_counter()
    tasks = []
    for _ in range(n):
        tasks.append(asyncio.create_task(_one(host, port, request, expected, read_every)))
        if stagger > 0:
            await asyncio.sleep(stagger)
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)
    wall = time.perf_counter() - started
    results: list[_One] = []
    errors: list[str] = [f"{len(pending)} streams timed out"] if pending else []
    for task in done:
        exc = task.exception()
        if exc is not None:
            errors.append(f"{type(exc).__name__}: {exc}")
        else:
            results.append(task.result())
    errors += [r.error for r in results if not r.ok]
    good = [r for r in results if r.ok]
    return StreamRun(
        streams=n,
        completed=len(good),
        errors=errors,
        ttft_ms=[r.ttft_ms for r in good],
        total_ms=[r.total_ms for r in good],
        connect_ms=[r.connect_ms for r in good],
        wall_s=wall,
    )


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
    return asyncio.run(
        _run(
            host,
            port,
            streams,
            chunks=chunks,
            chunk_size=chunk_size,
            delay_ms=delay_ms,
            timeout=timeout,
            read_every=read_every,
            stagger=stagger,
        )
    )
