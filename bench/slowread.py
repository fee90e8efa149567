"""
Memory behind a slow client: one HTTP/1.1 reader of a large stream that reads a little at a
time, then not at all for a while, then drains the rest, while a thread samples the proxy's
resident set size.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

from bench.loadgen import stream_body
from bench.procs import rss_kib

__all__ = ["RssSampler", "SlowReadResult", "slow_read"]


class RssSampler:
    """Samples the VmRSS of one process every C{interval} seconds in a daemon thread."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self._pid = pid
        self._interval = interval
        self._stop = threading.Event()
        self.samples: list[int] = []
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append(rss_kib(self._pid))
            self._stop.wait(self._interval)

    @property
    def max_kib(self) -> int:
        return max(self.samples) if self.samples else 0


@dataclass(frozen=True)
class SlowReadResult:
    """What the slow reader read, and the proxy's RSS before and at most during the read."""

    expected_bytes: int
    body_bytes: int
    complete: bool
    slow_phase_bytes: int
    seconds: float
    rss_before_kib: int
    rss_max_kib: int
    rss_after_kib: int

    @property
    def growth_kib(self) -> int:
        return self.rss_max_kib - self.rss_before_kib


def slow_read(
    port: int,
    proxy_pid: int,
    *,
    chunks: int,
    chunk_size: int,
    read_size: int,
    read_every: float,
    slow_seconds: float,
    pause_seconds: float,
    drain_timeout: float,
) -> SlowReadResult:
    """
    Stream C{chunks} x C{chunk_size} characters (no delay) through C{port}: read C{read_size}
    bytes every C{read_every} seconds for C{slow_seconds}, read nothing for C{pause_seconds},
    then read the rest as fast as possible (for at most C{drain_timeout} seconds).
    """
    body = stream_body().encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n"
        b"x-mock-chunks: %d\r\nx-mock-chunk-size: %d\r\nx-mock-delay-ms: 0\r\n"
        b"Connection: close\r\n\r\n%s"
    ) % (port, len(body), chunks, chunk_size, body)
    rss_before = rss_kib(proxy_pid)
    started = time.monotonic()
    received = 0
    tail = b""
    with RssSampler(proxy_pid) as sampler, socket.socket() as sock:
        # A small receive buffer, so the kernel does not absorb what the proxy should hold back.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        sock.sendall(request)
        slow_until = time.monotonic() + slow_seconds
        while time.monotonic() < slow_until:
            data = sock.recv(read_size)
            if not data:
                break
            received += len(data)
            tail = (tail + data)[-64:]
            time.sleep(read_every)
        slow_phase = received
        time.sleep(pause_seconds)
        drain_until = time.monotonic() + drain_timeout
        sock.settimeout(drain_timeout)
        while time.monotonic() < drain_until:
            data = sock.recv(1024 * 1024)
            if not data:
                break
            received += len(data)
            tail = (tail + data)[-64:]
        seconds = time.monotonic() - started
    time.sleep(0.5)
    # Content only: each SSE event also carries about 200 bytes of JSON around it.
    expected = chunks * chunk_size
    return SlowReadResult(
        expected_bytes=expected,
        body_bytes=received,
        complete=b"data: [DONE]" in tail,
        slow_phase_bytes=slow_phase,
        seconds=seconds,
        rss_before_kib=rss_before,
        rss_max_kib=max(sampler.max_kib, rss_before),
        rss_after_kib=rss_kib(proxy_pid),
    )
