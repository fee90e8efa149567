"""
The garbage collector's pauses in the proxy during bursts of streams, for two sets of options.

    /work/venv/bin/python bench/gcpauses.py [--bursts N] [--rounds R]

For each round and each configuration (Python's collector as it comes: C{--gc-threshold 0
--no-gc-freeze}; and oaiproxy's defaults), this starts the mock upstream and a proxy whose
process times every collection (C{gc.callbacks}), warms the proxy up with 50 short streams,
then runs C{--bursts} bursts of measurement 5 (200 streams of 200 events 10 ms apart, all
started at once) and prints, for the bursts only: the collections of each generation, the
time spent in them, the longest, and the bursts' time to first token and proxy CPU. The proxy
keeps idle upstream connections for 50 s (C{UPSTREAM_KEEPALIVE}, as the suite's), so every
burst after the first finds them warm.

Every process started here is stopped by its own PID.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.procs import (
    REPO,
    UPSTREAM_KEEPALIVE,
    Child,
    _spawn,
    cpu_seconds,
    free_port,
    start_mock,
    wait_for_port,
)
from bench.streams import run_streams

#: Python run in the proxy's process before twistd: times each collection, writes what it saw
#: to $GCPAUSES_OUT on SIGUSR1 and forgets it on SIGUSR2.
_WRAPPER = """
import gc, json, os, signal, time
_seen = {"started": 0.0, "collections": []}
def _timed(phase, info):
    if phase == "start":
        _seen["started"] = time.perf_counter()
    else:
        _seen["collections"].append((info["generation"], time.perf_counter() - _seen["started"]))
gc.callbacks.append(_timed)
def _dump(*_):
    with open(os.environ["GCPAUSES_OUT"], "w") as f:
        json.dump(_seen["collections"], f)
signal.signal(signal.SIGUSR1, _dump)
signal.signal(signal.SIGUSR2, lambda *_: _seen["collections"].clear())
from twisted.scripts.twistd import run
run()
"""

CONFIGS: dict[str, list[str]] = {
    "Python's defaults": ["--gc-threshold", "0", "--no-gc-freeze"],
    "oaiproxy's defaults": [],
}


def _signal_and_read(proxy: Child, out: Path, signum: int) -> list[tuple[int, float]]:
    """Send C{signum} (a dump) and read the file the proxy then writes."""
    out.unlink(missing_ok=True)
    os.kill(proxy.pid, signum)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            return [(int(g), float(s)) for g, s in json.loads(out.read_text())]
        except (FileNotFoundError, ValueError):
            time.sleep(0.05)  # not written yet, or written part way
    raise RuntimeError("the proxy did not write its collections")


def measure(workdir: Path, name: str, options: list[str], bursts: int) -> None:
    mock_port, proxy_port = free_port(), free_port()
    mock = start_mock(workdir, mock_port)
    out = workdir / "collections.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), GCPAUSES_OUT=str(out))
    argv = [sys.executable, "-c", _WRAPPER, "-n", "--pidfile=", "oaiproxy"]
    argv += ["--listen", f"tcp:{proxy_port}:interface=127.0.0.1:backlog=511"]
    argv += ["--upstream", f"http://127.0.0.1:{mock_port}/v1"]
    argv += ["--state-dir", str(workdir / "state")]
    argv += ["--upstream-keepalive", str(UPSTREAM_KEEPALIVE), *options]
    proxy = _spawn("proxy", argv, workdir, env)
    try:
        wait_for_port(proxy_port, proc=proxy.proc)
        run_streams(proxy_port, streams=50, chunks=5, chunk_size=8, delay_ms=10, timeout=30)
        os.kill(proxy.pid, signal.SIGUSR2)
        p50s, p99s, cpus = [], [], []
        for _ in range(bursts):
            before = cpu_seconds(proxy.pid)
            run = run_streams(
                proxy_port, streams=200, chunks=200, chunk_size=8, delay_ms=10, timeout=60
            )
            cpus.append(cpu_seconds(proxy.pid) - before)
            p50s.append(run.ttft(50))
            p99s.append(run.ttft(99))
        collections = _signal_and_read(proxy, out, signal.SIGUSR1)
    finally:
        proxy.stop(timeout=30)
        mock.stop()
    print(f"{name} ({' '.join(options) or 'no options'}), {bursts} bursts:")
    for generation in (0, 1, 2):
        times = [s * 1000 for g, s in collections if g == generation]
        longest = max(times, default=0.0)
        print(
            f"  generation {generation}: {len(times):4d} collections, "
            f"{sum(times):6.1f} ms, longest {longest:5.1f} ms"
        )
    print(
        f"  bursts: TTFT p50 {statistics.median(p50s):.1f} ms, p99 {statistics.median(p99s):.1f}"
        f" ms (medians), proxy CPU {statistics.median(cpus):.2f} s per burst",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bursts", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gcpauses-") as tmp:
        for round_ in range(args.rounds):
            order = list(CONFIGS.items())
            if round_ % 2:
                order.reverse()
            for name, options in order:
                workdir = Path(tmp) / f"{round_}-{len(options)}"
                workdir.mkdir()
                measure(workdir, name, options, args.bursts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
