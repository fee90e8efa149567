"""
The burst client of C{bench/streams.py}, against a small threaded server on 127.0.0.1 that
answers each connection with a canned HTTP/1.1 response: it counts a stream complete only
when every event and C{[DONE]} came, and reports what went wrong otherwise.
"""

from __future__ import annotations

import socket
import threading

from twisted.trial.unittest import SynchronousTestCase

from bench.streams import dechunk, run_streams


def _chunked(events: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"


def _answer(events: int, *, status: bytes = b"200 OK", cut: bool = False) -> bytes:
    """A streamed answer of C{events} content events, then the finish event and [DONE]."""
    payload = [b"data: {}\n\n" for _ in range(events + 1)] + [b"data: [DONE]\n\n"]
    body = _chunked(payload)
    if cut:
        body = body[: len(body) // 2]
    return (
        b"HTTP/1.1 %s\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n%s" % (status, body)
    )


class _Server:
    """Accepts connections on a thread; each reads the request's head, gets C{answer}, closes."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port: int = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed by stop
            with conn:
                conn.settimeout(10)
                data = b""
                while b"\r\n\r\n" not in data:
                    piece = conn.recv(65536)
                    if not piece:
                        break
                    data += piece
                self.requests.append(data)
                conn.sendall(self.answer)

    def stop(self) -> None:
        # Shutting the listener down wakes the thread's accept (closing it would not).
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(10)


class RunStreamsTests(SynchronousTestCase):
    def serve(self, answer: bytes) -> _Server:
        server = _Server(answer)
        self.addCleanup(server.stop)
        return server

    def test_complete(self) -> None:
        """Streams whose every event came are complete, with a time to first token each."""
        server = self.serve(_answer(3))
        run = run_streams(server.port, streams=5, chunks=3, chunk_size=8, delay_ms=0, timeout=20)
        self.assertEqual((run.completed, run.errors), (5, []))
        self.assertEqual(len(run.ttft_ms), 5)
        self.assertTrue(
            all(0 < t <= total for t, total in zip(run.ttft_ms, run.total_ms, strict=True))
        )
        self.assertEqual(len(server.requests), 5)
        self.assertIn(b"x-mock-chunks: 3\r\n", server.requests[0])

    def test_read_in_batches(self) -> None:
        """Reading a stream in batches after its first event still reads all of it."""
        server = self.serve(_answer(40))
        run = run_streams(
            server.port,
            streams=3,
            chunks=40,
            chunk_size=8,
            delay_ms=0,
            timeout=20,
            read_every=0.01,
        )
        self.assertEqual((run.completed, run.errors), (3, []))

    def test_missing_events(self) -> None:
        """A stream with fewer events than asked for is not complete, and says why."""
        server = self.serve(_answer(2))
        run = run_streams(server.port, streams=2, chunks=3, chunk_size=8, delay_ms=0, timeout=20)
        self.assertEqual(run.completed, 0)
        self.assertEqual(run.errors, ["incomplete: 4 events"] * 2)

    def test_cut_short(self) -> None:
        """A chunked body cut short is an error, not a complete stream."""
        server = self.serve(_answer(3, cut=True))
        run = run_streams(server.port, streams=1, chunks=3, chunk_size=8, delay_ms=0, timeout=20)
        self.assertEqual(run.completed, 0)
        self.assertEqual(len(run.errors), 1)
        self.assertIn("cut short", run.errors[0])

    def test_not_200(self) -> None:
        """A stream answered with an error status is reported with its status line."""
        server = self.serve(_answer(3, status=b"503 Service Unavailable"))
        run = run_streams(server.port, streams=1, chunks=3, chunk_size=8, delay_ms=0, timeout=20)
        self.assertEqual(run.errors, ["http/1.1 503 service unavailable"])

    def test_refused(self) -> None:
        """A connection refused is an error of that stream; the run still ends."""
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        listener.close()
        run = run_streams(port, streams=2, chunks=3, chunk_size=8, delay_ms=0, timeout=20)
        self.assertEqual(run.completed, 0)
        self.assertEqual(len(run.errors), 2)
        self.assertTrue(all("connect" in e for e in run.errors), run.errors)

    def test_timeout(self) -> None:
        """A stream that never ends is cut by the run's timeout and reported."""
        # A listener that never accepts: the connection is made, nothing is ever answered.
        silent = socket.create_server(("127.0.0.1", 0), backlog=8)
        self.addCleanup(silent.close)
        run = run_streams(
            silent.getsockname()[1], streams=1, chunks=3, chunk_size=8, delay_ms=0, timeout=0.2
        )
        self.assertEqual(run.completed, 0)
        self.assertEqual(run.errors, ["1 streams timed out"])

    def test_never_started(self) -> None:
        """Streams the timeout leaves unstarted are reported, not forgotten."""
        server = self.serve(_answer(3))
        run = run_streams(
            server.port, streams=5, chunks=3, chunk_size=8, delay_ms=0, timeout=0.5, stagger=60
        )
        self.assertEqual(run.completed, 1)
        self.assertEqual(run.errors, ["4 streams never started"])

    def test_first_event_split(self) -> None:
        """
        A complete stream whose events are each split across chunks (so none is ever seen
        whole in what was read) is reported, rather than counted with no time to first token.
        """
        whole = [b"data: {}\n\n"] * 4 + [b"data: [DONE]\n\n"]
        events = [piece for event in whole for piece in (event[:2], event[2:])]
        server = self.serve(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            + _chunked(events)
        )
        run = run_streams(server.port, streams=1, chunks=3, chunk_size=8, delay_ms=0, timeout=20)
        self.assertEqual((run.completed, run.errors), (0, ["first event not timed"]))

    def test_dechunk(self) -> None:
        self.assertEqual(dechunk(_chunked([b"ab", b"cde"])), b"abcde")
        self.assertRaises(ValueError, dechunk, b"5\r\nab")
