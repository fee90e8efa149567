"""
C{bench/RESULTS.md}: the results table, the machine, the details of every measurement, the
exact commands, and where oaiproxy's time goes according to py-spy.
"""

from __future__ import annotations

import datetime
import itertools
import os
import platform
import subprocess
import sys
from pathlib import Path

import h2
import twisted

from bench.procs import REPO, UPSTREAM_IDLE, UPSTREAM_KEEPALIVE
from bench.suite import Bench

__all__ = ["machine_info", "write_report"]

_SECTIONS = {
    "1": "1. Non-streaming throughput (HTTP/1.1, keep-alive)",
    "2": "2. Latency at one connection",
    "3": "3. HTTP/2 over TLS",
    "4": "4. Streamed chunks relayed per second",
    "5": "5. Time to first token under 200 concurrent streams",
    "6": "6. RSS behind a slow reader",
    "7": "7. CPU while an h2 client holds its window at zero",
    "logs": "Process logs",
}


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError as e:
        return f"unavailable ({e})"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0] if text else "?"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def machine_info(bench: Bench) -> list[tuple[str, str]]:
    """What the numbers were measured on."""
    return [
        ("nproc", str(os.cpu_count())),
        ("CPU", _cpu_model()),
        ("kernel", platform.release()),
        ("python", sys.version.split()[0] + f" ({sys.executable})"),
        ("twisted", twisted.__version__),
        ("h2", h2.__version__),
        ("nginx", _version(["nginx", "-v"])),
        ("wrk", _version(["wrk", "-v"])),
        ("h2load", _version(["h2load", "--version"])),
        ("py-spy", _version([str(Path(sys.executable).parent / "py-spy"), "--version"])),
        ("oaiproxy source", f"{bench.source} (when the servers started)"),
        ("background load", f"load average {bench.load_average:.2f} before the run; machine "
         f"CPU busy {bench.background_cpu:.0f}% in the 2 s before starting the servers and "
         f"{bench.background_cpu_after:.0f}% in the 2 s after stopping them (other tenants' "
         "work shows here)"),
    ]  # fmt: skip


def _table(bench: Bench) -> list[str]:
    lines = [
        "| # | measurement | direct to mock | nginx | oaiproxy | comparison | target | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(bench.rows, key=lambda row: row.key):
        lines.append(
            f"| {r.key} | {r.name} | {r.direct} | {r.nginx} | {r.oaiproxy} | {r.compare} "
            f"| {r.target} | {r.status} |"
        )
    return lines


def _cells(entry: tuple[str, float] | None) -> str:
    """Two table cells: a name in code style and its percentage (empty when absent)."""
    if entry is None:
        return " | "
    return f"`{entry[0]}` | {entry[1]:.1f}%"


def _profiles(bench: Bench) -> list[str]:
    if not bench.profiles:
        return ["No profile was taken.", ""]
    lines = [
        "Sampled with py-spy at 200 Hz, main (reactor) thread only; samples where the reactor "
        "sat in `epoll` are idle and left out, and percentages are of the busy samples. "
        "*Self* counts the function (or module) executing; *inclusive* counts it anywhere on "
        "the stack. The speedscope files open at https://www.speedscope.app.",
        "",
    ]
    for run in bench.profiles:
        p = run.profile
        busy = 100 * p.samples / max(1, p.samples + p.idle_samples)
        rel = os.path.relpath(run.path, REPO)
        lines += [
            f"### Profile `{run.name}`",
            "",
            f"Load: {run.load}; {run.load_summary}. {p.samples} busy samples "
            f"(the reactor was busy {busy:.0f}% of the time). File: `{rel}`.",
            "",
            "| module (self) | % | function (self) | % |",
            "|---|---|---|---|",
        ]
        modules = p.top_modules(12)
        functions = p.top_self(12)
        for module, function in itertools.zip_longest(modules, functions):
            lines.append(f"| {_cells(module)} | {_cells(function)} |")
        lines += ["", "| function (inclusive) | % |", "|---|---|"]
        lines += [f"| `{name}` | {pct:.1f}% |" for name, pct in p.top_total(20)]
        own = p.own_code(1.0)
        if own:
            lines += ["", "oaiproxy's own functions (inclusive, >= 1%):", ""]
            lines += ["| function | % |", "|---|---|"]
            lines += [f"| `{name}` | {pct:.1f}% |" for name, pct in own]
        lines.append("")
    return lines


def write_report(path: Path, bench: Bench, *, started: float, elapsed: float) -> None:
    """Write the whole report to C{path}."""
    when = datetime.datetime.fromtimestamp(started, datetime.UTC)
    mode = bench.settings.mode
    lines = [
        "# oaiproxy benchmark results",
        "",
        f"Measured {when:%Y-%m-%d %H:%M} UTC in {elapsed:.0f} s, mode `{mode}`, with "
        f"`/work/venv/bin/python bench/run.py{' --quick' if mode == 'quick' else ''}`. "
        "Generated by `bench/run.py`: do not edit by hand. What misses its target and why, "
        "and what to change in oaiproxy, is written by hand in "
        "[`FINDINGS.md`](FINDINGS.md) from these profiles.",
        "",
        "Setup: the mock upstream (`python -m oaiproxy.mock`, Twisted, one process, its garbage "
        "collector set as the proxy's), oaiproxy "
        "(twistd, one process) and nginx (one worker, `proxy_buffering off`, `listen ... ssl "
        "http2` with oaiproxy's self-signed certificate) run side by side on loopback. Both "
        f"proxies keep up to {UPSTREAM_IDLE} idle HTTP/1.1 connections to the mock for "
        f"{UPSTREAM_KEEPALIVE} s (below the mock's own 60 s; oaiproxy's default is 4 s, for "
        "uvicorn's 5 s); a second oaiproxy with that default runs in measurement 5. "
        "Everything, load generators included, shares the same cores, so "
        "the mock (a Python process) caps what 'direct' and 'nginx' can reach; the ratios "
        "compare oaiproxy with nginx in front of that same mock. Measurement 5's bursts run "
        "twice in alternating rounds: pinned (the mock and the burst client, one epoll loop in "
        "`bench/streams.py`, on the first core; the proxy under test on the last, as when "
        "the upstream is another machine), which its target row reports, and unpinned (the "
        "scheduler's choice), reported on the next row. Four floor proxies "
        "(`bench/floor.py`: a Twisted TCP byte relay, twisted.web with a minimal client, "
        "twisted.web with `Agent`, a pure-Python epoll byte relay without Twisted; none of "
        "them a usable proxy) run beside them in "
        "measurements 2 and 5, to show what Twisted itself costs on this machine.",
        "",
        "## Results",
        "",
        *_table(bench),
        "",
    ]
    if bench.failures:
        lines += ["**Problems during the run:**", ""]
        lines += [f"- {f}" for f in bench.failures]
        lines.append("")
    lines += ["## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in machine_info(bench)]
    lines += ["", "## Details", ""]
    for key, title in _SECTIONS.items():
        notes = bench.notes.get(key)
        if notes:
            lines += [f"### {title}", ""]
            lines += [f"- {n}" for n in notes]
            lines.append("")
    lines += ["## Where oaiproxy's time goes", "", *_profiles(bench)]
    lines += [
        "## Commands",
        "",
        "Ports are free ones chosen at run time; `$TMP` is the run's temporary directory, "
        "`<repo>` this repository.",
        "",
        "```",
    ]
    for label, command in bench.commands:
        lines.append(f"# {label}")
        lines.append(command)
    lines += ["```", "", "nginx configuration (`$TMP/nginx/nginx.conf`):", "", "```nginx"]
    lines.append(bench.nginx_conf.replace(str(bench.workdir), "$TMP").rstrip())
    lines += ["```", ""]
    for name, text in bench.files.items():
        lang = "lua" if name.endswith(".lua") else "json"
        lines += [f"`$TMP/{name}`:", "", f"```{lang}", text.rstrip(), "```", ""]
    path.write_text("\n".join(lines))
