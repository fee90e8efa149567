"""
The measurements: what runs against what, in which order, with which settings, and the rows
and notes they leave for the report.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import shlex
import statistics
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from bench import loadgen
from bench.h2stall import StallResult, h2_stall
from bench.loadgen import H2loadResult, WrkResult
from bench.procs import (
    Child,
    cpu_seconds,
    free_port,
    machine_jiffies,
    nginx_worker_pid,
    source_version,
    start_floor,
    start_mock,
    start_nginx,
    start_oaiproxy,
    tcp_listen_drops,
    wait_for_port,
)
from bench.pyspy import Profile, Recording, py_spy_argv, read_profile
from bench.slowread import SlowReadResult, slow_read
from bench.streams import StreamRun, run_streams

__all__ = ["Bench", "ProfileRun", "Row", "Settings"]

T = TypeVar("T")
MiB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    """Durations and sizes of one run."""

    mode: str
    wrk_seconds: float
    wrk_connections: int
    wrk_threads: int
    single_seconds: float
    single_rounds: int
    warmup_seconds: float
    h2_requests: int
    h2_clients: int
    h2_streams: int
    chunk_seconds: float
    chunk_connections: int
    chunk_count: int
    chunk_size: int
    ttft_streams: int
    ttft_chunks: int
    ttft_delay_ms: int
    ttft_single: int
    ttft_rounds: int
    slow_total_bytes: int
    slow_chunk_size: int
    slow_seconds: float
    slow_pause: float
    stall_window: int
    stall_settle: float
    stall_measure: float
    profile_seconds: float

    @classmethod
    def full(cls) -> Settings:
        return cls(
            mode="full",
            wrk_seconds=10,
            wrk_connections=32,
            wrk_threads=2,
            single_seconds=4,
            single_rounds=3,
            warmup_seconds=2,
            h2_requests=20_000,
            h2_clients=8,
            h2_streams=8,
            chunk_seconds=10,
            chunk_connections=16,
            chunk_count=1000,
            chunk_size=16,
            ttft_streams=200,
            ttft_chunks=200,
            ttft_delay_ms=10,
            ttft_single=30,
            ttft_rounds=5,
            slow_total_bytes=50 * MiB,
            slow_chunk_size=16 * 1024,
            slow_seconds=10,
            slow_pause=3,
            stall_window=1024,
            stall_settle=2,
            stall_measure=3,
            profile_seconds=10,
        )

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            mode="quick",
            wrk_seconds=3,
            wrk_connections=32,
            wrk_threads=2,
            single_seconds=2,
            single_rounds=1,
            warmup_seconds=1,
            h2_requests=2_000,
            h2_clients=8,
            h2_streams=8,
            chunk_seconds=3,
            chunk_connections=16,
            chunk_count=1000,
            chunk_size=16,
            ttft_streams=200,
            ttft_chunks=50,
            ttft_delay_ms=10,
            ttft_single=10,
            ttft_rounds=1,
            slow_total_bytes=50 * MiB,
            slow_chunk_size=16 * 1024,
            slow_seconds=3,
            slow_pause=1,
            stall_window=1024,
            stall_settle=1,
            stall_measure=3,
            profile_seconds=3,
        )


@dataclass(frozen=True)
class Row:
    """One line of the results table."""

    key: str
    name: str
    direct: str
    nginx: str
    oaiproxy: str
    compare: str
    target: str
    status: str


@dataclass(frozen=True)
class ProfileRun:
    """One py-spy profile of oaiproxy under one kind of load."""

    name: str
    load: str
    path: Path
    profile: Profile
    load_summary: str


@dataclass
class _Targets:
    mock: int = 0
    http: int = 0
    tls: int = 0
    nginx_http: int = 0
    nginx_tls: int = 0
    http_4s: int = 0
    http_busy: int = 0
    floors: dict[str, int] = field(default_factory=dict)


#: The floor proxies of L{bench.floor}, by target name, and what each is.
FLOORS = {
    "floor-raw": "Twisted TCP byte relay",
    "floor-web": "twisted.web + minimal client",
    "floor-lean": "minimal HTTP/1.1 server + minimal client on Twisted",
    "floor-agent": "twisted.web + Agent",
    "floor-epoll": "pure-Python epoll byte relay (no Twisted)",
}

#: The busy-polling oaiproxy of measurement 2: microseconds it polls before sleeping
#: (C{--busy-poll-us}; the default is 0). A millisecond covers the mock's answer at one
#: connection, so the proxy never sleeps there (see bench/FINDINGS.md).
BUSY_POLL_US = 1000

#: The floor proxies that can relay a stream (the minimal client reads by Content-Length).
_STREAMING_FLOORS = ("floor-raw", "floor-agent", "floor-epoll")


def _set_affinity(pid: int, cores: set[int]) -> None:
    """Let every thread of process C{pid} run on C{cores} only (a thread gone is skipped)."""
    try:
        tasks = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
    except OSError:
        return
    for task in tasks:
        with contextlib.suppress(ProcessLookupError):  # the thread has ended
            os.sched_setaffinity(task, cores)


def _burst_medians(
    rounds: dict[str, list[StreamRun]],
) -> tuple[dict[str, float], dict[str, float], dict[str, int], dict[str, int]]:
    """Per target: the median round's TTFT p50 and p99, streams complete and started."""
    p50 = {t: statistics.median(r.ttft(50) for r in runs) for t, runs in rounds.items()}
    p99 = {t: statistics.median(r.ttft(99) for r in runs) for t, runs in rounds.items()}
    done = {t: sum(r.completed for r in runs) for t, runs in rounds.items()}
    total = {t: sum(r.streams for r in runs) for t, runs in rounds.items()}
    return p50, p99, done, total


def _fmt_ms(ms: float) -> str:
    return f"{ms:.2f} ms"


def _machine_busy(seconds: float) -> float:
    """Percent of all cores busy over the next C{seconds} (whoever uses them)."""
    busy0, total0 = machine_jiffies()
    time.sleep(seconds)
    busy1, total1 = machine_jiffies()
    return 100 * (busy1 - busy0) / max(1, total1 - total0)


def _own_cpu() -> float:
    """CPU seconds used by this process (the benchmark's own Python clients)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _children_cpu() -> float:
    """CPU seconds used by this process's finished children (wrk, h2load)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _cpu_text(cpu: dict[str, float]) -> str:
    # The other proxies (floors, the 4 s oaiproxy) are named only while they work.
    procs = ", ".join(
        f"{k} {v:.0f}%"
        for k, v in cpu.items()
        if k != "machine" and (k in ("mock", "oaiproxy", "nginx") or v >= 0.5)
    )
    return f"CPU (% of one core): {procs}; whole machine {cpu['machine']:.0f}% of all cores"


def _status(ok: bool) -> str:
    return "PASS" if ok else "MISS"


@dataclass
class Bench:
    """Runs every measurement once; what they found is kept for L{bench.report}."""

    settings: Settings
    workdir: Path
    profile_dir: Path
    rows: list[Row] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)
    commands: list[tuple[str, str]] = field(default_factory=list)
    profiles: list[ProfileRun] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    children: list[Child] = field(default_factory=list)
    nginx_conf: str = ""
    background_cpu: float = 0.0
    source: str = "?"
    background_cpu_after: float = 0.0
    load_average: float = 0.0
    files: dict[str, str] = field(default_factory=dict)
    ports: _Targets = field(default_factory=_Targets)
    mock: Child | None = None
    proxy: Child | None = None
    nginx: Child | None = None
    #: The other proxies of measurement 5 (the 4 s oaiproxy, the floors), by target name.
    others: dict[str, Child] = field(default_factory=dict)

    # -- processes ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the mock, oaiproxy (which makes the self-signed certificate), then nginx."""
        self.background_cpu = _machine_busy(2.0)
        self.load_average = os.getloadavg()[0]
        self.source = source_version()
        p = self.ports
        p.mock, p.http, p.tls, p.nginx_http, p.nginx_tls, p.http_4s, p.http_busy = (
            free_port() for _ in range(7)
        )
        self.mock = start_mock(self.workdir, p.mock)
        self.children.append(self.mock)
        self._command("mock upstream", self.mock.argv, "PYTHONPATH=<repo> ")
        state = self.workdir / "state"
        self.proxy = start_oaiproxy(self.workdir, p.http, p.tls, p.mock, state)
        self.children.append(self.proxy)
        self._command("oaiproxy", self.proxy.argv, "PYTHONPATH=<repo> ")
        # A second oaiproxy with the default upstream keep-alive (4 s, for uvicorn's 5 s), for
        # measurement 5 only: bursts 10 s apart each find its upstream pool empty.
        proxy_4s = start_oaiproxy(
            self.workdir, p.http_4s, None, p.mock, state, name="oaiproxy-4s", keepalive=None
        )
        self.children.append(proxy_4s)
        self.others["oaiproxy-4s"] = proxy_4s
        self._command("oaiproxy-4s", proxy_4s.argv, "PYTHONPATH=<repo> ")
        # A third, polling before it sleeps, for measurement 2 only (idle otherwise: it polls
        # only after an event, for a millisecond at most).
        busy = start_oaiproxy(
            self.workdir,
            p.http_busy,
            None,
            p.mock,
            state,
            name="oaiproxy-busy",
            extra=("--busy-poll-us", str(BUSY_POLL_US)),
        )
        self.children.append(busy)
        self.others["oaiproxy-busy"] = busy
        self._command("oaiproxy-busy", busy.argv, "PYTHONPATH=<repo> ")
        cert, key = state / "selfsigned-cert.pem", state / "selfsigned-key.pem"
        self.nginx, conf = start_nginx(
            self.workdir,
            http_port=p.nginx_http,
            tls_port=p.nginx_tls,
            upstream_port=p.mock,
            cert=cert,
            key=key,
        )
        self.children.append(self.nginx)
        self._command("nginx", self.nginx.argv)
        for target in FLOORS:
            port = p.floors[target] = free_port()
            floor = start_floor(self.workdir, target.removeprefix("floor-"), port, p.mock)
            self.children.append(floor)
            self.others[target] = floor
            self._command(target, floor.argv, "PYTHONPATH=<repo> ")
        self.nginx_conf = conf.read_text()
        for port in (p.mock, p.http, p.tls, p.nginx_http, p.nginx_tls):
            wait_for_port(port)
        print(
            f"started mock pid {self.mock.pid} :{p.mock}, oaiproxy pid {self.proxy.pid} "
            f":{p.http} tls :{p.tls}, nginx pid {self.nginx.pid} :{p.nginx_http} "
            f"tls :{p.nginx_tls}",
            flush=True,
        )

    def stop(self) -> None:
        """Stop every child we started, by its PID, newest first."""
        for child in reversed(self.children):
            try:
                child.stop()
            except OSError as e:
                self.failures.append(f"stopping {child.name}: {e}")
        self.background_cpu_after = _machine_busy(2.0)
        for child in self.children:
            log = child.log_path.read_text(errors="replace")
            self.notes.setdefault("logs", []).append(
                f"{child.name}: {log.count('Traceback')} tracebacks, "
                f"{log.count('Unhandled')} 'Unhandled' lines, {len(log.splitlines())} log lines"
            )

    @property
    def _nginx_worker(self) -> int | None:
        return nginx_worker_pid(self.nginx.pid) if self.nginx is not None else None

    def _pids(self) -> dict[str, int]:
        pids: dict[str, int] = {}
        if self.mock is not None:
            pids["mock"] = self.mock.pid
        if self.proxy is not None:
            pids["oaiproxy"] = self.proxy.pid
        worker = self._nginx_worker
        if worker is not None:
            pids["nginx"] = worker
        for name, child in self.others.items():
            pids[name] = child.pid
        return pids

    def _cpu_during(self, fn: Callable[[], T]) -> tuple[T, dict[str, float]]:
        """
        Run C{fn}; also return each server process's CPU use during it, in percent of one
        core, and the whole machine's (C{machine}, in percent of all cores: load generators
        and anything else running count there).
        """
        pids = self._pids()
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        own0 = _own_cpu()
        kids0 = _children_cpu()
        busy0, total0 = machine_jiffies()
        t0 = time.monotonic()
        result = fn()
        elapsed = time.monotonic() - t0
        busy1, total1 = machine_jiffies()
        used = {
            name: 100 * (cpu_seconds(pid) - before[name]) / elapsed for name, pid in pids.items()
        }
        kids = _children_cpu() - kids0
        if kids > 0.01 * elapsed:
            used["load generator"] = 100 * kids / elapsed
        own = _own_cpu() - own0
        if own > 0.05 * elapsed:
            used["python client"] = 100 * own / elapsed
        used["machine"] = 100 * (busy1 - busy0) / max(1, total1 - total0)
        return result, used

    # -- bookkeeping ----------------------------------------------------------------------

    def _command(self, label: str, argv: list[str], prefix: str = "") -> None:
        text = prefix + shlex.join(argv)
        text = text.replace(str(self.workdir), "$TMP")
        if (label, text) not in self.commands:
            self.commands.append((label, text))

    def _in_process(self, label: str, call: str) -> None:
        """Record a step run inside this process (a load client in bench/), as a Python call."""
        self._command(label, [], prefix=f"# in bench/run.py's process: {call}")

    def _note(self, section: str, line: str) -> None:
        print(f"  {line}", flush=True)
        self.notes.setdefault(section, []).append(line)

    def _row(self, row: Row) -> None:
        self.rows.append(row)
        print(
            f"[{row.key}] {row.name}: direct={row.direct} nginx={row.nginx} "
            f"oaiproxy={row.oaiproxy} | {row.compare} (target {row.target}) {row.status}",
            flush=True,
        )

    def _url(self, target: str, tls: bool = False) -> str:
        p = self.ports
        if tls:
            port = p.tls if target == "oaiproxy" else p.nginx_tls
            return f"https://127.0.0.1:{port}/v1/chat/completions"
        return f"http://127.0.0.1:{self._port(target)}/v1/chat/completions"

    def _port(self, target: str) -> int:
        p = self.ports
        if target in p.floors:
            return p.floors[target]
        return {
            "direct": p.mock,
            "nginx": p.nginx_http,
            "oaiproxy": p.http,
            "oaiproxy-4s": p.http_4s,
            "oaiproxy-busy": p.http_busy,
        }[target]

    # -- the run --------------------------------------------------------------------------

    def run_all(self, only: frozenset[str] | None = None) -> None:
        """
        Every measurement (or those whose number is in C{only}), memory-sensitive ones first,
        on a barely warmed-up proxy.
        """
        steps: list[tuple[str, Callable[[], None]]] = [
            ("warm-up", self.warm_up),
            ("6 slow reader RSS", self.measure_slow_reader),
            ("7 h2 zero window CPU", self.measure_h2_stall),
            ("1 non-streaming throughput", self.measure_throughput),
            ("2 single-connection latency", self.measure_single),
            ("3 h2 over TLS", self.measure_h2),
            ("4 streamed chunks/s", self.measure_chunks),
            ("5 TTFT under 200 streams", self.measure_ttft),
            ("profiles", self.measure_profiles),
        ]
        for name, step in steps:
            key = name.split()[0]
            if only is not None and key != "warm-up" and key not in only:
                continue
            print(f"== {name}", flush=True)
            try:
                step()
            except Exception as e:
                self.failures.append(f"{name}: {type(e).__name__}: {e}")
                print(traceback.format_exc(), flush=True)

    def warm_up(self) -> None:
        """A few requests down every path, so imports and first connections are done."""
        for target in ("direct", "nginx", "oaiproxy", "oaiproxy-4s", *_STREAMING_FLOORS):
            run = run_streams(
                self._port(target), streams=4, chunks=20, chunk_size=8, delay_ms=0, timeout=20
            )
            if run.completed != 4:
                raise RuntimeError(f"warm-up streams via {target} failed: {run.errors[:3]}")
        self._h2load("oaiproxy", requests=64, record_command=False)
        self._h2load("nginx", requests=64, record_command=False)

    # 1 and 2 ------------------------------------------------------------------------------

    def _wrk(
        self,
        target: str,
        script: Path,
        *,
        connections: int,
        threads: int,
        seconds: float,
        record_command: bool = True,
    ) -> tuple[WrkResult, dict[str, float]]:
        argv = loadgen.wrk_argv(
            self._url(target), script, connections=connections, threads=threads, seconds=seconds
        )
        if record_command:
            self._command(f"wrk ({target})", argv)
        return self._cpu_during(lambda: loadgen.run_wrk(argv, seconds))

    def _keep(self, path: Path) -> Path:
        """Remember a file the load generators read, for the report."""
        self.files[path.name] = path.read_text()
        return path

    def _warm_and_wrk(
        self, target: str, script: Path, *, connections: int, seconds: float
    ) -> tuple[WrkResult, dict[str, float]]:
        """A warm-up run of wrk (not recorded), then the measured run."""
        threads = self.settings.wrk_threads
        warmup = self.settings.warmup_seconds
        self._wrk(
            target,
            script,
            connections=connections,
            threads=threads,
            seconds=warmup,
            record_command=False,
        )
        return self._wrk(target, script, connections=connections, threads=threads, seconds=seconds)

    def _chat_script(self) -> Path:
        return self._keep(loadgen.write_chat_script(self.workdir / "chat.lua"))

    def _stream_script(self) -> Path:
        s = self.settings
        return self._keep(
            loadgen.write_stream_script(self.workdir / "stream.lua", s.chunk_count, s.chunk_size)
        )

    def measure_throughput(self) -> None:
        s = self.settings
        script = self._chat_script()
        results: dict[str, WrkResult] = {}
        for target in ("direct", "nginx", "oaiproxy"):
            result, cpu = self._warm_and_wrk(
                target, script, connections=s.wrk_connections, seconds=s.wrk_seconds
            )
            results[target] = result
            self._note(
                "1",
                f"{target}: {result.rps:.0f} req/s, p50 {_fmt_ms(result.p50_ms)}, "
                f"p99 {_fmt_ms(result.p99_ms)}, {result.requests} requests, "
                f"{result.errors} socket errors, {result.non_2xx} non-2xx; " + _cpu_text(cpu),
            )
        d, n, o = results["direct"], results["nginx"], results["oaiproxy"]
        ratio = o.rps / n.rps
        clean = all(r.errors == 0 and r.non_2xx == 0 for r in results.values())
        self._row(
            Row(
                "1",
                f"non-streaming req/s (wrk, {s.wrk_connections} conns, {s.wrk_seconds:g} s)",
                f"{d.rps:.0f}",
                f"{n.rps:.0f}",
                f"{o.rps:.0f}",
                f"oaiproxy/nginx = {ratio:.2f}",
                ">= 0.10",
                _status(ratio >= 0.10 and clean),
            )
        )
        self._row(
            Row(
                "1",
                "non-streaming latency p50 / p99",
                f"{d.p50_ms:.2f} / {d.p99_ms:.2f} ms",
                f"{n.p50_ms:.2f} / {n.p99_ms:.2f} ms",
                f"{o.p50_ms:.2f} / {o.p99_ms:.2f} ms",
                "",
                "",
                "info",
            )
        )

    def measure_single(self) -> None:
        """
        p50 at one connection, in rounds of direct, nginx, oaiproxy and the floor proxies: a
        noisy neighbour then hits all of them alike, and the median round of each is kept.
        """
        s = self.settings
        script = self._chat_script()
        targets = ("direct", "nginx", "oaiproxy", "oaiproxy-busy", *FLOORS)
        rounds: dict[str, list[WrkResult]] = {t: [] for t in targets}
        # Each proxy's CPU in its own runs, in percent of one core.
        cpu: dict[str, list[float]] = {"oaiproxy": [], "oaiproxy-busy": []}
        for target in targets:
            self._wrk(target, script, connections=1, threads=1, seconds=1, record_command=False)
        for _ in range(s.single_rounds):
            for target in targets:
                result, used = self._wrk(
                    target, script, connections=1, threads=1, seconds=s.single_seconds
                )
                rounds[target].append(result)
                if target in cpu:
                    cpu[target].append(used.get(target, 0.0))
        p50: dict[str, float] = {}
        for target in targets:
            runs = rounds[target]
            # A round with no request answered (wrk then says p50 0) is no latency: an error.
            answered = [r.p50_ms for r in runs if r.requests] or [math.nan]
            p50[target] = statistics.median(answered)
            errors = sum(r.errors + r.non_2xx + (r.requests == 0) for r in runs)
            self._note(
                "2",
                f"{target}: p50 per round "
                + ", ".join(f"{r.p50_ms * 1000:.0f}" for r in runs)
                + f" us (median {p50[target] * 1000:.0f} us); p99 per round "
                + ", ".join(f"{r.p99_ms * 1000:.0f}" for r in runs)
                + f" us; {statistics.median(r.rps for r in runs):.0f} req/s; {errors} errors",
            )
            if errors:
                self.failures.append(f"2: {target} had {errors} errors")
        d, n, o = p50["direct"], p50["nginx"], p50["oaiproxy"]
        self._row(
            Row(
                "2",
                f"p50 latency, 1 connection (wrk -c1 -t1, median of {s.single_rounds} x "
                f"{s.single_seconds:g} s)",
                _fmt_ms(d),
                f"{_fmt_ms(n)} ({n - d:+.2f})",
                f"{_fmt_ms(o)} ({o - d:+.2f})",
                f"oaiproxy adds {o - d:.2f} ms",
                "<= 0.30 ms",
                _status(o - d <= 0.30),
            )
        )
        self._row(
            Row(
                "2",
                "p50 latency added at 1 connection by floor proxies (bench/floor.py, same rounds)",
                "-",
                "-",
                f"+{o - d:.2f} ms",
                "; ".join(f"{FLOORS[f]} +{p50[f] - d:.2f} ms" for f in FLOORS),
                "",
                "info",
            )
        )
        b = p50["oaiproxy-busy"]
        self._row(
            Row(
                "2",
                f"p50 latency, 1 connection, oaiproxy with --busy-poll-us {BUSY_POLL_US} (not the "
                "default: it polls for events before sleeping; same rounds)",
                "-",
                "-",
                f"{_fmt_ms(b)} ({b - d:+.2f})",
                f"oaiproxy --busy-poll-us {BUSY_POLL_US} adds {b - d:.2f} ms; its CPU "
                f"{statistics.median(cpu['oaiproxy-busy']):.0f}% of one core against the "
                f"default's {statistics.median(cpu['oaiproxy']):.0f}%",
                "<= 0.30 ms",
                f"{_status(b - d <= 0.30)} (option)",
            )
        )

    # 3 ------------------------------------------------------------------------------------

    def _h2load(
        self, target: str, *, requests: int, record_command: bool = True
    ) -> tuple[H2loadResult, dict[str, float]]:
        s = self.settings
        body = self.workdir / "body.json"
        body.write_text(loadgen.CHAT_BODY)
        self._keep(body)
        argv = loadgen.h2load_argv(
            self._url(target, tls=True),
            body,
            requests=requests,
            clients=s.h2_clients,
            streams=s.h2_streams,
        )
        if record_command:
            self._command(f"h2load ({target})", argv)
        return self._cpu_during(lambda: loadgen.run_h2load(argv, timeout=300))

    def measure_h2(self) -> None:
        s = self.settings
        results: dict[str, H2loadResult] = {}
        for target in ("nginx", "oaiproxy"):
            self._h2load(target, requests=max(200, s.h2_requests // 20), record_command=False)
            result, cpu = self._h2load(target, requests=s.h2_requests)
            results[target] = result
            self._note(
                "3",
                f"{target}: {result.rps:.0f} req/s in {result.seconds:.1f} s, "
                f"{result.succeeded} ok, {result.failed} failed, {result.errored} errored, "
                f"mean {result.mean_ms:.1f} ms; " + _cpu_text(cpu),
            )
        n, o = results["nginx"], results["oaiproxy"]
        ratio = o.rps / n.rps
        clean = all(r.failed == 0 and r.errored == 0 for r in results.values())
        self._row(
            Row(
                "3",
                f"h2 over TLS req/s (h2load -n{s.h2_requests} -c{s.h2_clients} -m{s.h2_streams})",
                "-",
                f"{n.rps:.0f}",
                f"{o.rps:.0f}",
                f"oaiproxy/nginx = {ratio:.2f}",
                ">= 0.05",
                _status(ratio >= 0.05 and clean),
            )
        )

    # 4 ------------------------------------------------------------------------------------

    def measure_chunks(self) -> None:
        s = self.settings
        script = self._stream_script()
        rates: dict[str, float] = {}
        for target in ("direct", "nginx", "oaiproxy"):
            result, cpu = self._warm_and_wrk(
                target, script, connections=s.chunk_connections, seconds=s.chunk_seconds
            )
            events = result.events or 0
            # Content chunks only: each stream also carries a finish event and [DONE].
            per_stream = s.chunk_count + 2
            chunks = events * s.chunk_count / per_stream
            rates[target] = chunks / result.seconds
            self._note(
                "4",
                f"{target}: {rates[target]:.0f} chunks/s, {result.streams_ok} streams complete, "
                f"{result.streams_bad} bad, {result.errors} socket errors, "
                f"{result.rps:.1f} streams/s, p50 {_fmt_ms(result.p50_ms)} per stream; "
                + _cpu_text(cpu),
            )
            if result.streams_bad or result.errors:
                self.failures.append(f"4: {target} had bad streams or socket errors")
        ratio = rates["oaiproxy"] / rates["nginx"]
        self._row(
            Row(
                "4",
                f"streamed chunks/s ({s.chunk_connections} conns, {s.chunk_count} chunks of "
                f"{s.chunk_size} chars, no delay)",
                f"{rates['direct']:.0f}",
                f"{rates['nginx']:.0f}",
                f"{rates['oaiproxy']:.0f}",
                f"oaiproxy/nginx = {ratio:.2f}",
                "(none)",
                "info",
            )
        )

    # 5 ------------------------------------------------------------------------------------

    def _pin(self, mode: str, cores: list[int]) -> None:
        """
        Set which cores the processes of measurement 5 may run on. C{pinned}: the mock and
        this process (the client) on the first core, every proxy on the last, so that the
        proxy under test takes no CPU from the mock and the client, as when the upstream is
        another machine; C{unpinned}: every process on every core, the scheduler's choice.
        """
        every = set(cores)
        load = every if mode == "unpinned" else {cores[0]}
        proxies = every if mode == "unpinned" else {cores[-1]}
        _set_affinity(os.getpid(), load)
        for name, pid in self._pids().items():
            _set_affinity(pid, load if name == "mock" else proxies)

    def _burst_round(
        self,
        i: int,
        mode: str,
        cores: list[int],
        targets: tuple[str, ...],
        rounds: dict[str, list[StreamRun]],
    ) -> None:
        s = self.settings
        ideal = s.ttft_chunks * s.ttft_delay_ms / 1000
        self._pin(mode, cores)
        for target in targets:
            port = self._port(target)

            def streams(port: int = port) -> StreamRun:
                return run_streams(
                    port,
                    streams=s.ttft_streams,
                    chunks=s.ttft_chunks,
                    chunk_size=8,
                    delay_ms=s.ttft_delay_ms,
                    timeout=ideal + 60,
                )

            self._in_process(
                f"burst ({target}, {mode})",
                f"bench.streams.run_streams({port}, streams={s.ttft_streams}, "
                f"chunks={s.ttft_chunks}, chunk_size=8, delay_ms={s.ttft_delay_ms}, "
                f"timeout={ideal + 60:g})",
            )

            run, cpu = self._cpu_during(streams)
            rounds[target].append(run)
            self._note(
                "5",
                f"round {i + 1} ({mode}), {target}: {run.completed}/{run.streams} complete in "
                f"{run.wall_s:.2f} s (ideal {ideal:.2f} s); TTFT p50 {_fmt_ms(run.ttft(50))}, "
                f"p99 {_fmt_ms(run.ttft(99))}, max {_fmt_ms(run.ttft(100))}; connect p99 "
                f"{_fmt_ms(run.connect(99))}; stream duration p50 "
                f"{run.total(50) / 1000:.2f} s, p99 {run.total(99) / 1000:.2f} s; "
                + _cpu_text(cpu)
                + (f"; errors: {sorted(set(run.errors))[:3]}" if run.errors else ""),
            )

    def measure_ttft(self) -> None:
        s = self.settings
        targets = ("direct", "nginx", "oaiproxy", "oaiproxy-4s", *_STREAMING_FLOORS)
        cores = sorted(os.sched_getaffinity(0))
        modes = ("pinned", "unpinned") if len(cores) >= 2 else ("unpinned",)
        by_mode: dict[str, dict[str, list[StreamRun]]] = {
            m: {t: [] for t in targets} for m in modes
        }
        drops_before = tcp_listen_drops()
        # Bursts vary a lot from one to the next on two shared cores: rounds of every target
        # in turn, pinned then not, and the median round of each.
        try:
            for i in range(s.ttft_rounds):
                for mode in modes:
                    self._burst_round(i, mode, cores, targets, by_mode[mode])
        finally:
            self._pin("unpinned", cores)
        medians = {m: _burst_medians(by_mode[m]) for m in modes}
        p50, p99, done, total = medians[modes[0]]
        single: dict[str, StreamRun] = {}
        for target in ("direct", "nginx", "oaiproxy"):
            self._in_process(
                f"one stream at a time ({target})",
                f"bench.streams.run_streams({self._port(target)}, streams={s.ttft_single}, "
                f"chunks=5, chunk_size=8, delay_ms={s.ttft_delay_ms}, "
                f"timeout={s.ttft_single * 0.1 + 30:g}, stagger=0.1)",
            )
            single[target] = run_streams(
                self._port(target),
                streams=s.ttft_single,
                chunks=5,
                chunk_size=8,
                delay_ms=s.ttft_delay_ms,
                timeout=s.ttft_single * 0.1 + 30,
                stagger=0.1,
            )
            r = single[target]
            self._note(
                "5",
                f"{target}, one stream at a time ({r.streams} streams of 5 chunks, started "
                f"100 ms apart): {r.completed} complete, TTFT p50 {_fmt_ms(r.ttft(50))}, "
                f"p99 {_fmt_ms(r.ttft(99))}",
            )
        sd, sn, so = single["direct"], single["nginx"], single["oaiproxy"]
        self._row(
            Row(
                "5",
                "TTFT p50, one stream at a time (no burst)",
                _fmt_ms(sd.ttft(50)),
                _fmt_ms(sn.ttft(50)),
                _fmt_ms(so.ttft(50)),
                f"overhead p50 {so.ttft(50) - sd.ttft(50):+.2f} ms",
                "",
                "info",
            )
        )
        drops = {k: v - drops_before.get(k, 0) for k, v in tcp_listen_drops().items()}
        self._note(
            "5",
            "kernel listen queue overflows during the bursts (any listener on the "
            f"machine): {drops}",
        )
        over50 = p50["oaiproxy"] - p50["direct"]
        over99 = p99["oaiproxy"] - p99["direct"]
        all_done = done["oaiproxy"] == total["oaiproxy"]

        def cell(t: str) -> str:
            return f"{p50[t]:.1f} / {p99[t]:.1f} ms ({done[t]}/{total[t]} done)"

        self._row(
            Row(
                "5",
                f"TTFT p50 / p99, {s.ttft_streams} streams x {s.ttft_chunks} chunks @ "
                f"{s.ttft_delay_ms} ms (median of {s.ttft_rounds} bursts; "
                + (
                    f"the mock and the client on core {cores[0]}, the proxy on core "
                    f"{cores[-1]}, of {len(cores)})"
                    if modes[0] == "pinned"
                    else "one core only: nothing pinned)"
                ),
                cell("direct"),
                cell("nginx"),
                cell("oaiproxy"),
                f"overhead p50 {over50:+.1f} ms, p99 {over99:+.1f} ms",
                "<= 20 ms, all complete",
                _status(all_done and over50 <= 20 and over99 <= 20),
            )
        )
        if "unpinned" in medians and modes[0] != "unpinned":
            u50, u99, udone, utotal = medians["unpinned"]

            def overheads(t: str) -> str:
                return (
                    f"{u50[t] - u50['direct']:+.1f} / {u99[t] - u99['direct']:+.1f} ms "
                    f"({udone[t]}/{utotal[t]} done)"
                )

            self._row(
                Row(
                    "5",
                    "TTFT p50 / p99 in the same rounds with nothing pinned (the mock, the "
                    f"client and the proxy share all {len(cores)} cores)",
                    f"{u50['direct']:.1f} / {u99['direct']:.1f} ms",
                    f"{u50['nginx']:.1f} / {u99['nginx']:.1f} ms",
                    f"{u50['oaiproxy']:.1f} / {u99['oaiproxy']:.1f} ms",
                    f"overhead p50 / p99: oaiproxy {overheads('oaiproxy')}; nginx "
                    f"{overheads('nginx')}; {FLOORS['floor-epoll']} {overheads('floor-epoll')}",
                    "",
                    "info",
                )
            )
        self._row(
            Row(
                "5",
                f"TTFT p50 overhead in the same ({modes[0]}) bursts, floor proxies "
                "(bench/floor.py)",
                "-",
                "-",
                f"{over50:+.1f} ms",
                "; ".join(
                    f"{FLOORS[f]} {p50[f] - p50['direct']:+.1f} ms ({done[f]}/{total[f]} done)"
                    for f in _STREAMING_FLOORS
                ),
                "",
                "info",
            )
        )
        over_4s = p50["oaiproxy-4s"] - p50["direct"]
        self._row(
            Row(
                "5",
                f"TTFT p50 overhead in the same ({modes[0]}) bursts, oaiproxy with its "
                "default upstream keep-alive (4 s: each burst on a cold upstream pool)",
                "-",
                "-",
                f"{over50:+.1f} ms",
                f"oaiproxy --upstream-keepalive 4 (default): {over_4s:+.1f} ms "
                f"(p99 {p99['oaiproxy-4s'] - p99['direct']:+.1f} ms; "
                f"{done['oaiproxy-4s']}/{total['oaiproxy-4s']} done)",
                "",
                "info",
            )
        )

    # 6 ------------------------------------------------------------------------------------

    def measure_slow_reader(self) -> None:
        s = self.settings
        assert self.proxy is not None
        chunks = s.slow_total_bytes // s.slow_chunk_size
        self._in_process(
            "slow reader (oaiproxy)",
            f"bench.slowread.slow_read({self.ports.http}, <oaiproxy pid>, chunks={chunks}, "
            f"chunk_size={s.slow_chunk_size}, read_size={64 * 1024}, read_every=0.05, "
            f"slow_seconds={s.slow_seconds:g}, pause_seconds={s.slow_pause:g}, "
            "drain_timeout=120)",
        )
        result: SlowReadResult = slow_read(
            self.ports.http,
            self.proxy.pid,
            chunks=chunks,
            chunk_size=s.slow_chunk_size,
            read_size=64 * 1024,
            read_every=0.05,
            slow_seconds=s.slow_seconds,
            pause_seconds=s.slow_pause,
            drain_timeout=120,
        )
        growth_mib = result.growth_kib / 1024
        self._note(
            "6",
            f"{chunks} chunks x {s.slow_chunk_size} chars = {result.expected_bytes / MiB:.0f} MiB "
            f"of content; read {result.body_bytes / MiB:.1f} MiB in {result.seconds:.1f} s "
            f"(slow phase: 64 KiB every 50 ms for {s.slow_seconds:g} s = "
            f"{result.slow_phase_bytes / MiB:.1f} MiB, then {s.slow_pause:g} s without reading, "
            f"then drained); complete: {result.complete}; oaiproxy RSS before "
            f"{result.rss_before_kib / 1024:.1f} MiB, max {result.rss_max_kib / 1024:.1f} MiB, "
            f"after {result.rss_after_kib / 1024:.1f} MiB",
        )
        self._row(
            Row(
                "6",
                f"RSS growth behind one slow reader of a {s.slow_total_bytes // MiB} MB stream",
                "-",
                "-",
                f"+{growth_mib:.2f} MiB" + ("" if result.complete else " (stream incomplete)"),
                f"{result.rss_before_kib / 1024:.1f} -> {result.rss_max_kib / 1024:.1f} MiB",
                "<= 2 MB",
                _status(result.complete and result.growth_kib <= 2 * 1024),
            )
        )

    # 7 ------------------------------------------------------------------------------------

    def measure_h2_stall(self) -> None:
        s = self.settings
        assert self.proxy is not None and self.mock is not None
        mock_cpu = cpu_seconds(self.mock.pid)
        self._in_process(
            "h2 zero window (oaiproxy)",
            f"bench.h2stall.h2_stall({self.ports.tls}, <oaiproxy pid>, "
            f"chunks={s.slow_total_bytes // s.slow_chunk_size}, "
            f"chunk_size={s.slow_chunk_size}, window={s.stall_window}, "
            f"settle_seconds={s.stall_settle:g}, measure_seconds={s.stall_measure:g})",
        )
        result: StallResult = h2_stall(
            self.ports.tls,
            self.proxy.pid,
            chunks=s.slow_total_bytes // s.slow_chunk_size,
            chunk_size=s.slow_chunk_size,
            window=s.stall_window,
            settle_seconds=s.stall_settle,
            measure_seconds=s.stall_measure,
        )
        mock_used = cpu_seconds(self.mock.pid) - mock_cpu
        self._note(
            "7",
            f"h2 stream of {s.slow_total_bytes // MiB} MB requested with a {s.stall_window}-byte "
            f"stream window, never updated: status {result.status}, {result.data_bytes} bytes "
            f"received; oaiproxy CPU {result.cpu_seconds * 1000:.0f} ms over "
            f"{result.measure_seconds:.1f} s = {result.cpu_percent:.2f}%; oaiproxy RSS "
            f"{result.rss_before_kib / 1024:.1f} -> {result.rss_after_kib / 1024:.1f} MiB; mock "
            f"CPU during the whole test {mock_used * 1000:.0f} ms",
        )
        self._row(
            Row(
                "7",
                f"proxy CPU while an h2 client holds its window at 0 ({s.stall_measure:g} s)",
                "-",
                "-",
                f"{result.cpu_percent:.2f}%",
                f"RSS {result.rss_before_kib / 1024:.1f} -> {result.rss_after_kib / 1024:.1f} MiB",
                "~0%",
                _status(result.status == "200" and result.cpu_percent < 1.0),
            )
        )

    # profiles ---------------------------------------------------------------------------

    def _profile(self, name: str, load: str, run_load: Callable[[Recording], str]) -> None:
        """Record oaiproxy with py-spy while C{run_load} loads it (until py-spy is done)."""
        assert self.proxy is not None
        s = self.settings
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        out = self.profile_dir / f"{name}.speedscope.json"
        spy = py_spy_argv(self.proxy.pid, s.profile_seconds, out)
        self._command(f"py-spy ({name})", spy)
        recording = Recording(spy, s.profile_seconds)
        try:
            summary = run_load(recording)
        finally:
            recording.wait()
        profile = read_profile(out)
        self.profiles.append(ProfileRun(name, load, out, profile, summary))
        top = ", ".join(f"{n} {p:.0f}%" for n, p in profile.top_self(4))
        print(f"  profile {name}: {profile.samples} busy samples; {summary}; top self: {top}")

    def _subprocess_load(self, name: str, argv: list[str]) -> Callable[[Recording], str]:
        """A load that runs C{argv} (wrk or h2load, lasting longer than the recording)."""
        self._command(f"load during py-spy ({name})", argv)
        seconds = self.settings.profile_seconds + 2

        def run(recording: Recording) -> str:
            del recording  # the load outlasts it by construction
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=seconds + 30, check=False
            )
            if argv[0] == "wrk":
                r = loadgen.parse_wrk(done.stdout)
                return f"{r.rps:.0f} req/s while profiled, p50 {_fmt_ms(r.p50_ms)}"
            h = loadgen.parse_h2load(done.stdout)
            return f"{h.rps:.0f} req/s while profiled"

        return run

    def measure_profiles(self) -> None:
        s = self.settings
        seconds = s.profile_seconds + 2
        wrk = loadgen.wrk_argv(
            self._url("oaiproxy"),
            self._chat_script(),
            connections=s.wrk_connections,
            threads=s.wrk_threads,
            seconds=seconds,
        )
        self._profile(
            "http1-nonstreaming",
            f"wrk, {s.wrk_connections} keep-alive connections, small chat completion POSTs",
            self._subprocess_load("http1-nonstreaming", wrk),
        )
        wrk_stream = loadgen.wrk_argv(
            self._url("oaiproxy"),
            self._stream_script(),
            connections=s.chunk_connections,
            threads=s.wrk_threads,
            seconds=seconds,
        )
        self._profile(
            "http1-streaming",
            f"wrk, {s.chunk_connections} connections, streams of {s.chunk_count} small chunks",
            self._subprocess_load("http1-streaming", wrk_stream),
        )
        body = self._keep(self.workdir / "body.json")
        h2 = [
            "h2load",
            f"-D{seconds:g}",
            f"-c{s.h2_clients}",
            f"-m{s.h2_streams}",
            "-d",
            str(body),
            "-H",
            "content-type: application/json",
            self._url("oaiproxy", tls=True),
        ]
        self._profile(
            "h2-tls-nonstreaming",
            f"h2load, {s.h2_clients} TLS connections x {s.h2_streams} streams, small POSTs",
            self._subprocess_load("h2-tls-nonstreaming", h2),
        )

        def bursts(recording: Recording) -> str:
            runs: list[StreamRun] = []
            # Bounded: at most 20 bursts, and only while py-spy records.
            while recording.running and len(runs) < 20:
                runs.append(
                    run_streams(
                        self.ports.http,
                        streams=s.ttft_streams,
                        chunks=s.ttft_chunks,
                        chunk_size=8,
                        delay_ms=s.ttft_delay_ms,
                        timeout=60,
                    )
                )
            ttft = ", ".join(f"{r.ttft(50):.0f}" for r in runs)
            done = sum(r.completed for r in runs)
            return f"{len(runs)} bursts, {done} streams complete, TTFT p50 per burst (ms): {ttft}"

        self._profile(
            "http1-stream-burst",
            f"bursts of {s.ttft_streams} concurrent streams x {s.ttft_chunks} chunks @ "
            f"{s.ttft_delay_ms} ms (the TTFT test of 5), one after another",
            bursts,
        )
