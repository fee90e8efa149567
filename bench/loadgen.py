"""
wrk and h2load: their Lua scripts and body files, how they are run, and what their output says.

Every run is bounded: wrk by its duration, h2load by its request count, and both by a
subprocess timeout on top.
"""

from __future__ import annotations

import re
import resource
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

__all__ = [
    "CHAT_BODY",
    "H2loadResult",
    "WrkResult",
    "parse_h2load",
    "parse_latency",
    "parse_wrk",
    "run_h2load",
    "run_wrk",
    "stream_body",
    "write_chat_script",
    "write_stream_script",
]

CHAT_BODY = (
    '{"model":"mock-gpt","messages":[{"role":"system","content":"You are terse."},'
    '{"role":"user","content":"Say hello in five words."}],"max_tokens":16}'
)
"""A small chat completion request (non-streaming)."""


def stream_body() -> str:
    """A small streamed chat completion request."""
    return CHAT_BODY[:-1] + ',"stream":true}'


def _lua_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def write_chat_script(path: Path) -> Path:
    """A wrk script POSTing L{CHAT_BODY} to whatever URL wrk is given."""
    path.write_text(
        f"""\
wrk.method = "POST"
wrk.body = {_lua_string(CHAT_BODY)}
wrk.headers["Content-Type"] = "application/json"
"""
    )
    return path


def write_stream_script(path: Path, chunks: int, chunk_size: int) -> Path:
    """
    A wrk script POSTing a streamed request for C{chunks} events of C{chunk_size} characters
    with no delay, checking every response: status 200, C{data: [DONE]} at the end, and the
    number of SSE events. C{done} prints one C{STREAMS ok=N bad=N events=N} line.
    """
    path.write_text(
        f"""\
wrk.method = "POST"
wrk.body = {_lua_string(stream_body())}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["x-mock-chunks"] = "{chunks}"
wrk.headers["x-mock-chunk-size"] = "{chunk_size}"
wrk.headers["x-mock-delay-ms"] = "0"

local threads = {{}}
function setup(thread)
    table.insert(threads, thread)
end
function init(args)
    ok = 0
    bad = 0
    events = 0
end
function response(status, headers, body)
    if status == 200 and string.find(body, "data: [DONE]", 1, true) then
        ok = ok + 1
        local _, n = string.gsub(body, "data: ", "")
        events = events + n
    else
        bad = bad + 1
    end
end
function done(summary, latency, requests)
    local o, b, e = 0, 0, 0
    for _, t in ipairs(threads) do
        o = o + t:get("ok")
        b = b + t:get("bad")
        e = e + t:get("events")
    end
    io.write(string.format("STREAMS ok=%d bad=%d events=%d\\n", o, b, e))
end
"""
    )
    return path


@dataclass(frozen=True)
class WrkResult:
    """What one wrk run measured."""

    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    non_2xx: int
    streams_ok: int | None
    streams_bad: int | None
    events: int | None
    output: str
    cpu_seconds: float = 0.0


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def parse_latency(text: str) -> float:
    """A wrk duration such as C{812.00us}, C{1.20ms} or C{2.01s}, in milliseconds."""
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if match is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk(output: str) -> WrkResult:
    """Parse C{wrk --latency} output (and the stream script's C{STREAMS} line if present)."""
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", output)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.MULTILINE)
    if done is None or rps is None or p50 is None or p99 is None:
        raise ValueError(f"cannot parse wrk output:\n{output}")
    errors = 0
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if socket_errors is not None:
        errors = sum(int(g) for g in socket_errors.groups())
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    streams = re.search(r"STREAMS ok=(\d+) bad=(\d+) events=(\d+)", output)
    return WrkResult(
        requests=int(done.group(1)),
        seconds=parse_latency(done.group(2) + done.group(3)) / 1000,
        rps=float(rps.group(1)),
        p50_ms=parse_latency(p50.group(1)),
        p99_ms=parse_latency(p99.group(1)),
        errors=errors,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        streams_ok=int(streams.group(1)) if streams else None,
        streams_bad=int(streams.group(2)) if streams else None,
        events=int(streams.group(3)) if streams else None,
        output=output,
    )


def wrk_argv(
    url: str, script: Path, *, connections: int, threads: int, seconds: float
) -> list[str]:
    """The wrk command line: keep-alive connections, latency distribution, a Lua script."""
    return [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(script),
        url,
    ]


def _run(argv: list[str], timeout: float) -> tuple[str, float]:
    """Run a load generator; its output and the CPU time it used (user + system seconds)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{argv!r} failed ({done.returncode}): {done.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return done.stdout, cpu


def run_wrk(argv: list[str], seconds: float) -> WrkResult:
    """Run wrk (killed if it outlives its duration by far) and parse what it printed."""
    output, cpu = _run(argv, seconds + 30)
    return replace(parse_wrk(output), cpu_seconds=cpu)


@dataclass(frozen=True)
class H2loadResult:
    """What one h2load run measured."""

    rps: float
    seconds: float
    succeeded: int
    failed: int
    errored: int
    mean_ms: float
    output: str
    cpu_seconds: float = 0.0


def parse_h2load(output: str) -> H2loadResult:
    """Parse h2load's summary."""
    finished = re.search(r"finished in ([\d.]+)(us|ms|s|m), ([\d.]+) req/s", output)
    counts = re.search(
        r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored",
        output,
    )
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", output)
    if finished is None or counts is None or mean is None:
        raise ValueError(f"cannot parse h2load output:\n{output}")
    return H2loadResult(
        rps=float(finished.group(3)),
        seconds=parse_latency(finished.group(1) + finished.group(2)) / 1000,
        succeeded=int(counts.group(1)),
        failed=int(counts.group(2)),
        errored=int(counts.group(3)),
        mean_ms=parse_latency(mean.group(1)),
        output=output,
    )


def h2load_argv(url: str, body: Path, *, requests: int, clients: int, streams: int) -> list[str]:
    """The h2load command line: POST C{body} over h2 (ALPN), C{streams} in flight per client."""
    return [
        "h2load",
        f"-n{requests}",
        f"-c{clients}",
        f"-m{streams}",
        "-d",
        str(body),
        "-H",
        "content-type: application/json",
        url,
    ]


def run_h2load(argv: list[str], timeout: float) -> H2loadResult:
    """Run h2load (killed after C{timeout} seconds) and parse what it printed."""
    output, cpu = _run(argv, timeout)
    return replace(parse_h2load(output), cpu_seconds=cpu)
