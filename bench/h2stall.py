"""
An HTTP/2 client that stalls a stream: over TLS (ALPN h2) it asks for a large streamed answer
with a tiny stream window and never sends a WINDOW_UPDATE, while the proxy's CPU time and RSS
are measured.
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events
import h2.settings

from bench.loadgen import stream_body
from bench.procs import cpu_seconds, rss_kib

__all__ = ["StallResult", "h2_stall"]


@dataclass(frozen=True)
class StallResult:
    """Proxy CPU use while the client's window is closed, and what the client got before."""

    status: str
    data_bytes: int
    window: int
    measure_seconds: float
    cpu_seconds: float
    rss_before_kib: int
    rss_after_kib: int

    @property
    def cpu_percent(self) -> float:
        return 100 * self.cpu_seconds / self.measure_seconds


def _pump(sock: ssl.SSLSocket, conn: h2.connection.H2Connection, seconds: float) -> list[object]:
    """Read and handle frames for C{seconds}; never acknowledge data (no WINDOW_UPDATE)."""
    events: list[object] = []
    until = time.monotonic() + seconds
    while (left := until - time.monotonic()) > 0:
        # Buffered TLS records first, then the socket.
        if not sock.pending():
            readable, _, _ = select.select([sock], [], [], left)
            if not readable:
                break
        data = sock.recv(65536)
        if not data:
            break
        events.extend(conn.receive_data(data))
        out = conn.data_to_send()
        if out:
            sock.sendall(out)
    return events


def h2_stall(
    port: int,
    proxy_pid: int,
    *,
    chunks: int,
    chunk_size: int,
    window: int,
    settle_seconds: float,
    measure_seconds: float,
) -> StallResult:
    """
    Open one stream for C{chunks} x C{chunk_size} characters with a stream window of C{window}
    bytes; wait C{settle_seconds} for the proxy to fill and stop, then measure its CPU time
    over C{measure_seconds} while the window stays closed.
    """
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    rss_before = rss_kib(proxy_pid)
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with context.wrap_socket(raw, server_hostname="localhost") as sock:
        if sock.selected_alpn_protocol() != "h2":
            raise RuntimeError(f"ALPN chose {sock.selected_alpn_protocol()!r}, not h2")
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window},
        )
        conn.initiate_connection()
        body = stream_body().encode()
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(
            stream_id,
            [
                (":method", "POST"),
                (":scheme", "https"),
                (":authority", f"127.0.0.1:{port}"),
                (":path", "/v1/chat/completions"),
                ("content-type", "application/json"),
                ("content-length", str(len(body))),
                ("x-mock-chunks", str(chunks)),
                ("x-mock-chunk-size", str(chunk_size)),
                ("x-mock-delay-ms", "0"),
            ],
        )
        conn.send_data(stream_id, body, end_stream=True)
        sock.sendall(conn.data_to_send())
        events = _pump(sock, conn, settle_seconds)
        cpu_start = cpu_seconds(proxy_pid)
        t0 = time.monotonic()
        events += _pump(sock, conn, measure_seconds)
        elapsed = time.monotonic() - t0
        cpu_used = cpu_seconds(proxy_pid) - cpu_start
        rss_after = rss_kib(proxy_pid)
        status = "none"
        data_bytes = 0
        for event in events:
            if isinstance(event, h2.events.ResponseReceived):
                status = dict(event.headers).get(b":status", b"?").decode()
            elif isinstance(event, h2.events.DataReceived):
                data_bytes += event.flow_controlled_length
        conn.close_connection()
        sock.sendall(conn.data_to_send())
    return StallResult(
        status=status,
        data_bytes=data_bytes,
        window=window,
        measure_seconds=elapsed,
        cpu_seconds=cpu_used,
        rss_before_kib=rss_before,
        rss_after_kib=rss_after,
    )
