"""
Compare two versions of oaiproxy's source on this machine, where run-to-run noise (±20%)
hides changes of a few percent.

    /work/venv/bin/python bench/ab.py latency A_TREE B_TREE [--requests N] [--rounds R]
        [--protocol http1|http1-tls|h2]
    /work/venv/bin/python bench/ab.py instructions TREE [--requests N]
        [--protocol http1|http1-new|http1-tls|h2]
    /work/venv/bin/python bench/ab.py chunk-instructions TREE
    /work/venv/bin/python bench/ab.py bursts A_TREE B_TREE [--rounds R]

C{latency}: one mock upstream and two proxies, one from each source tree (e.g. a
C{git worktree} of an older commit, and this checkout). Both proxies are pinned to the same
core (the mock and the client to the other) and one client alternates its requests between
direct, A and B, one at a time over one keep-alive connection each: a slow spell of the
machine hits all three alike. Swapping A and B gives the same numbers within a few
microseconds (checked with A = B). C{--protocol} picks how the client talks to the proxies:
plain HTTP/1.1 (the default), HTTP/1.1 over TLS, or HTTP/2 over TLS (one stream at a time);
"direct" is always plain HTTP/1.1 to the mock.

C{instructions}: the instructions oaiproxy executes per proxied request, counted by
valgrind (C{cachegrind}, no cache simulation) over real loopback sockets: deterministic to
a few instructions per request (a few hundred over TLS). It is the difference of a run with
C{--requests} requests and a run without, after the same warm-up, divided by C{--requests}.
The proxy runs with C{--gc-threshold 1000000000}: no young collection falls inside the
count (with the default threshold, where collections fell moved the counts between
builds: see bench/FINDINGS.md). C{--protocol} as for C{latency}, or C{http1-new}: plain
HTTP/1.1, a new connection for each request (closed by the client once answered), as each
stream of a burst comes. Needs C{valgrind}.

C{chunk-instructions}: the instructions oaiproxy executes per relayed streamed event, each
arriving in a read of its own (the mock sends one every 20 ms, over plain HTTP/1.1): the
difference between runs of 60 streams of 60 events and 60 streams of 10 events, divided by
the 3,000 extra events. The per-stream cost cancels out. Run it alone on the machine: beside
other load the proxy (slowed by valgrind) reads and polls in other batches, and the count
moves by up to 3% either way (the same event path: 39,192 alone; 40,274 and 39,180 beside
other runs).

C{bursts}: measurement 5 of C{bench/run.py} (200 streams of 200 events 10 ms apart, all
started at once) for two source trees, one burst to each in turn (and one direct to the mock
first), for C{--rounds} rounds, alternating which goes first: the median time to first token
and the proxy's CPU per burst, each. Bursts vary by ±50% from one to the next here; the
interleaving makes a slow spell hit both.

Every process started here is stopped by its own PID.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import ssl
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import h2.config
import h2.connection
import h2.events

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.procs import REPO, Child, _spawn, cpu_seconds, free_port, wait_for_port
from bench.streams import run_streams

_BODY = json.dumps(
    {"model": "mock-gpt", "messages": [{"role": "user", "content": "Say hello."}]}
).encode()
_REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
    b"Authorization: Bearer sk-bench\r\nContent-Length: %d\r\n\r\n%s" % (len(_BODY), _BODY)
)
_TWISTD = "from twisted.scripts.twistd import run; run()"


def _env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree)
    env["PYTHONHASHSEED"] = "0"
    return env


def _mock(workdir: Path, port: int, cpu: str) -> Child:
    argv = ["taskset", "-c", cpu, sys.executable, "-m", "oaiproxy.mock"]
    # Backlog 511, as bench/procs.py gives it: 200 connects at once overflow Twisted's 50.
    argv += ["--listen", f"tcp:{port}:interface=127.0.0.1:backlog=511", "--name", "ab"]
    child = _spawn("mock", argv, workdir, _env(REPO))
    wait_for_port(port, proc=child.proc)
    return child


def _proxy_argv(port: int, upstream: int, state: Path, tls: bool = False) -> list[str]:
    listen = f"ssl:{port}:selfsigned" if tls else f"tcp:{port}"
    return [
        "-n",
        "--pidfile=",
        "oaiproxy",
        "--listen",
        f"{listen}:interface=127.0.0.1",
        "--upstream",
        f"http://127.0.0.1:{upstream}/v1",
        "--state-dir",
        str(state),
    ]


def _proxy(
    name: str, tree: Path, workdir: Path, *, port: int, upstream: int, cpu: str, tls: bool
) -> Child:
    argv = ["taskset", "-c", cpu, sys.executable, "-c", _TWISTD]
    argv += _proxy_argv(port, upstream, workdir / f"state-{name}", tls)
    child = _spawn(name, argv, workdir, _env(tree))
    wait_for_port(port, proc=child.proc)
    return child


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _exchange(s: socket.socket) -> None:
    """One request and its whole response (by Content-Length) on a kept-alive socket."""
    s.sendall(_REQUEST)
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed")
        data += chunk
        end = data.find(b"\r\n\r\n")
        if end < 0:
            continue
        head = data[: end + 2].lower()
        if not head.startswith(b"http/1.1 200"):
            raise RuntimeError(f"unexpected response {head[:100]!r}")
        at = head.index(b"content-length:") + 15
        length = int(head[at : head.index(b"\r\n", at)])
        if len(data) >= end + 4 + length:
            return


def _stream_request(chunks: int) -> bytes:
    body = _BODY[:-1] + b', "stream": true}'
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        b"x-mock-chunks: %d\r\nx-mock-delay-ms: 20\r\nContent-Length: %d\r\n\r\n%s"
        % (chunks, len(body), body)
    )


class _Stream:
    """Streamed completions one at a time over one kept-alive HTTP/1.1 connection."""

    def __init__(self, sock: socket.socket, chunks: int) -> None:
        self.sock = sock
        self.request = _stream_request(chunks)

    def exchange(self) -> None:
        """One streamed request, read to the end of its chunked body."""
        self.sock.sendall(self.request)
        data = b""
        while not data.endswith(b"\r\n0\r\n\r\n"):
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("connection closed")
            data += chunk
        if not data.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"unexpected response {data[:100]!r}")


def _tls(sock: socket.socket, alpn: str) -> ssl.SSLSocket:
    """C{sock} under TLS with C{alpn}, trusting any certificate (the proxies' self-signed)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols([alpn])
    return context.wrap_socket(sock, server_hostname="localhost")


class _Http1:
    """Requests one at a time over one kept-alive HTTP/1.1 connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def exchange(self) -> None:
        _exchange(self.sock)


class _H2:
    """Requests one at a time, each on a new stream of one HTTP/2 connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(2**30)
        self.sock.sendall(self.conn.data_to_send())

    def exchange(self) -> None:
        conn = self.conn
        stream_id = conn.get_next_available_stream_id()
        head = [
            (b":method", b"POST"),
            (b":path", b"/v1/chat/completions"),
            (b":scheme", b"https"),
            (b":authority", b"bench"),
            (b"content-type", b"application/json"),
        ]
        conn.send_headers(stream_id, head)
        conn.send_data(stream_id, _BODY, end_stream=True)
        self.sock.sendall(conn.data_to_send())
        while True:
            data = self.sock.recv(65536)
            if not data:
                raise RuntimeError("connection closed")
            ended = False
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.ResponseReceived):
                    status = dict(event.headers).get(b":status")
                    if status != b"200":
                        raise RuntimeError(f"unexpected status {status!r}")
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id:
                    ended = True
            out = conn.data_to_send()
            if out:
                self.sock.sendall(out)
            if ended:
                return


class _Http1New:
    """Requests one at a time, each on a new HTTP/1.1 connection, closed once answered."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = _connect(port)  # the warm-up's first; closed by the caller at the end

    def exchange(self) -> None:
        self.sock.close()
        self.sock = _connect(self.port)
        _exchange(self.sock)


def _client(port: int, protocol: str) -> _Http1 | _Http1New | _H2:
    if protocol == "http1":
        return _Http1(_connect(port))
    if protocol == "http1-new":
        return _Http1New(port)
    if protocol == "http1-tls":
        return _Http1(_tls(_connect(port), "http/1.1"))
    return _H2(_tls(_connect(port), "h2"))


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


def latency(a: Path, b: Path, requests: int, rounds: int, protocol: str = "http1") -> int:
    """Interleaved p50 latency of direct, A and B (see the module docstring)."""
    if shutil.which("taskset") is None:
        print("taskset is missing (util-linux)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="oaiproxy-ab-"))
    mock_port, a_port, b_port = free_port(), free_port(), free_port()
    children: list[Child] = []
    try:
        children.append(_mock(workdir, mock_port, "0"))
        tls = protocol != "http1"
        for name, tree, port in (("a", a, a_port), ("b", b, b_port)):
            children.append(
                _proxy(name, tree, workdir, port=port, upstream=mock_port, cpu="1", tls=tls)
            )
        os.sched_setaffinity(0, {0})
        clients = {
            "direct": _client(mock_port, "http1"),
            "A": _client(a_port, protocol),
            "B": _client(b_port, protocol),
        }
        for client in clients.values():
            for _ in range(200):
                client.exchange()
        print(f"A = {a}\nB = {b}\nprotocol: {protocol} (direct: http1)")
        for r in range(rounds):
            times: dict[str, list[float]] = {name: [] for name in clients}
            names = list(clients)
            for i in range(requests):
                for name in names if i % 2 == 0 else names[::-1]:
                    start = time.perf_counter()
                    clients[name].exchange()
                    times[name].append((time.perf_counter() - start) * 1e6)
            p50 = {name: statistics.median(t) for name, t in times.items()}
            print(
                f"round {r + 1}: p50 direct {p50['direct']:.0f} us, "
                f"A {p50['A']:.0f} us (+{p50['A'] - p50['direct']:.0f}), "
                f"B {p50['B']:.0f} us (+{p50['B'] - p50['direct']:.0f}); "
                f"B - A = {p50['B'] - p50['A']:+.0f} us; p90 A {_percentile(times['A'], 90):.0f}"
                f" B {_percentile(times['B'], 90):.0f} us"
            )
        for client in clients.values():
            client.sock.close()
    finally:
        for child in reversed(children):
            child.stop()
    return 0


def bursts(a: Path, b: Path, rounds: int) -> int:
    """Interleaved 200-stream bursts to direct, A and B (see the module docstring)."""
    workdir = Path(tempfile.mkdtemp(prefix="oaiproxy-ab-"))
    mock_port = free_port()
    children: list[Child] = []
    try:
        children.append(_mock(workdir, mock_port, "0-1"))
        proxies: list[tuple[str, int, Child]] = []
        for name, tree in (("A", a), ("B", b)):
            port = free_port()
            child = _proxy(
                name, tree, workdir, port=port, upstream=mock_port, cpu="0-1", tls=False
            )
            children.append(child)
            proxies.append((name, port, child))
        for port in (mock_port, *(port for _, port, _ in proxies)):
            run_streams(port, streams=50, chunks=5, chunk_size=8, delay_ms=10, timeout=30)
        ttft: dict[str, list[float]] = {"direct": [], "A": [], "B": []}
        cpu: dict[str, list[float]] = {"A": [], "B": []}
        print(f"A = {a}\nB = {b}")
        for r in range(rounds):
            burst = partial(
                run_streams, streams=200, chunks=200, chunk_size=8, delay_ms=10, timeout=60
            )
            ttft["direct"].append(burst(mock_port).ttft(50))
            for name, port, child in proxies if r % 2 == 0 else proxies[::-1]:
                before = cpu_seconds(child.pid)
                run = burst(port)
                if run.completed != run.streams:
                    raise RuntimeError(f"{name}: {run.completed}/{run.streams} streams done")
                cpu[name].append(cpu_seconds(child.pid) - before)
                ttft[name].append(run.ttft(50))
        for name, values in ttft.items():
            line = f"{name}: TTFT p50 per burst {[round(v) for v in values]} ms, median "
            line += f"{statistics.median(values):.1f} ms"
            if name in cpu:
                line += f"; CPU per burst, median {statistics.median(cpu[name]):.2f} s"
            print(line)
    finally:
        for child in reversed(children):
            child.stop()
    return 0


_WARM_UP = 50

#: The collector's young threshold for instruction counts: more net new objects than a run
#: makes, so no collection falls inside it.
_NO_COLLECTION = 10**9


def _instructions_of_run(
    tree: Path, workdir: Path, requests: int, protocol: str, stream_chunks: int = 0
) -> int:
    mock_port, port = free_port(), free_port()
    mock = _mock(workdir, mock_port, "0-1")
    log = workdir / "valgrind.log"
    argv = [
        "valgrind",
        "--tool=cachegrind",
        "--cache-sim=no",
        "--cachegrind-out-file=/dev/null",
        f"--log-file={log}",
        sys.executable,
        "-c",
        _TWISTD,
        *_proxy_argv(port, mock_port, workdir / "state", tls=protocol.endswith(("-tls", "h2"))),
        # No young collection during the count: when they fall moves it by up to 2% from one
        # build of the code to the next (see the module docstring).
        "--gc-threshold",
        str(_NO_COLLECTION),
    ]
    proxy = _spawn("proxy-valgrind", argv, workdir, _env(tree))
    try:
        wait_for_port(port, timeout=120, proc=proxy.proc)
        client = (
            _Stream(_connect(port), stream_chunks) if stream_chunks else _client(port, protocol)
        )
        for _ in range(_WARM_UP + requests):
            client.exchange()
        client.sock.close()
    finally:
        proxy.stop(timeout=60)
        mock.stop()
    found = re.search(r"I\s+refs:\s+([\d,]+)", log.read_text())
    if found is None:
        raise RuntimeError(f"no instruction count in {log}")
    return int(found.group(1).replace(",", ""))


def instructions(tree: Path, requests: int, protocol: str = "http1") -> int:
    """Instructions per request (see the module docstring)."""
    if shutil.which("valgrind") is None:
        print("valgrind is missing (apt-get install -y valgrind)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="oaiproxy-ab-"))
    base = _instructions_of_run(tree, workdir, 0, protocol)
    loaded = _instructions_of_run(tree, workdir, requests, protocol)
    print(f"{tree}: {(loaded - base) // requests} instructions per request ({protocol})")
    return 0


def chunk_instructions(tree: Path) -> int:
    """Instructions per relayed streamed event (see the module docstring)."""
    if shutil.which("valgrind") is None:
        print("valgrind is missing (apt-get install -y valgrind)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="oaiproxy-ab-"))
    # Both runs make _WARM_UP + requests streams, all of their length.
    requests, few, many = 10, 10, 60
    short = _instructions_of_run(tree, workdir, requests, "http1", stream_chunks=few)
    long = _instructions_of_run(tree, workdir, requests, "http1", stream_chunks=many)
    per_event = (long - short) // ((_WARM_UP + requests) * (many - few))
    print(f"{tree}: {per_event} instructions per relayed event")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    lat = sub.add_parser("latency", help="interleaved p50 latency of two source trees")
    lat.add_argument("a", type=Path)
    lat.add_argument("b", type=Path)
    lat.add_argument("--requests", type=int, default=3000, help="per target and round")
    lat.add_argument("--rounds", type=int, default=3)
    lat.add_argument(
        "--protocol", choices=("http1", "http1-tls", "h2"), default="http1", help="to A and B"
    )
    ins = sub.add_parser("instructions", help="instructions per request (valgrind)")
    ins.add_argument("tree", type=Path)
    ins.add_argument("--requests", type=int, default=500)
    ins.add_argument(
        "--protocol", choices=("http1", "http1-new", "http1-tls", "h2"), default="http1"
    )
    chunks = sub.add_parser("chunk-instructions", help="instructions per streamed event")
    chunks.add_argument("tree", type=Path)
    burst = sub.add_parser("bursts", help="interleaved 200-stream bursts of two source trees")
    burst.add_argument("a", type=Path)
    burst.add_argument("b", type=Path)
    burst.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args(argv)
    if args.mode == "bursts":
        return bursts(args.a.resolve(), args.b.resolve(), args.rounds)
    if args.mode == "chunk-instructions":
        return chunk_instructions(args.tree.resolve())
    if args.mode == "latency":
        return latency(
            args.a.resolve(), args.b.resolve(), args.requests, args.rounds, args.protocol
        )
    return instructions(args.tree.resolve(), args.requests, args.protocol)


if __name__ == "__main__":
    raise SystemExit(main())
