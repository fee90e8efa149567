"""
Sampling profiles of the proxy with py-spy (speedscope format), and where their time goes:
the functions with the most samples on the stack (inclusive) and at its top (self).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import REPO

__all__ = ["Profile", "Recording", "py_spy_argv", "read_profile"]

_PY_SPY = Path(sys.executable).parent / "py-spy"
#: Where file paths are cut, to name modules as they are imported.
_PATH_MARKERS = (
    "site-packages/",
    f"{REPO}/",
    f"/lib/python{sys.version_info.major}.{sys.version_info.minor}/",
)

#: Frames of the reactor loop and twistd start-up, on every stack: not worth listing.
_FRAMEWORK_ROOTS = (
    "<module>",
    "run",
    "runApp",
    "ApplicationRunner.run",
    "UnixApplicationRunner.postApplication",
    "ApplicationRunner.startReactor",
    "runReactorWithLogging",
    "ReactorBase.run",
    "ReactorBase.mainLoop",
    "callWithLogger",
    "callWithContext",
    "ThreadedContextTracker.callWithContext",
    "ContextTracker.callWithContext",
    "EPollReactor.doPoll",
    "_PollLikeMixin._doReadOrWrite",
)


def py_spy_argv(pid: int, seconds: float, out: Path) -> list[str]:
    """The py-spy command line recording C{pid} for C{seconds} into a speedscope file."""
    return [
        str(_PY_SPY),
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        "200",
        "--format",
        "speedscope",
        "--output",
        str(out),
    ]


class Recording:
    """py-spy recording in the background; it stops by itself after its duration."""

    def __init__(self, argv: list[str], seconds: float) -> None:
        self._seconds = seconds
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )

    @property
    def running(self) -> bool:
        return self._proc.poll() is None

    def wait(self) -> None:
        """Wait for py-spy to finish (killing it if it overruns by far)."""
        try:
            output, _ = self._proc.communicate(timeout=self._seconds + 30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.communicate()
            raise RuntimeError("py-spy did not finish in time") from None
        if self._proc.returncode != 0:
            raise RuntimeError(f"py-spy failed ({self._proc.returncode}): {output.decode()}")


def _path(frame: dict[str, Any]) -> str:
    """The frame's file, shortened to what follows site-packages (or the repository)."""
    path = str(frame.get("file") or "?")
    for marker in _PATH_MARKERS:
        if marker in path:
            return path.split(marker, 1)[1]
    return path


@dataclass(frozen=True)
class Profile:
    """Busy samples of the main thread, counted per function and per module."""

    samples: int
    idle_samples: int
    self_counts: Counter[str]
    total_counts: Counter[str]
    module_self: Counter[str]

    def _pct(self, count: int) -> float:
        return 100 * count / self.samples if self.samples else 0.0

    def top_self(self, n: int) -> list[tuple[str, float]]:
        """The C{n} functions most often at the top of the stack."""
        return [(name, self._pct(c)) for name, c in self.self_counts.most_common(n)]

    def top_total(self, n: int) -> list[tuple[str, float]]:
        """The C{n} functions most often on the stack, the reactor loop's frames left out."""
        rows = [
            (name, self._pct(c))
            for name, c in self.total_counts.most_common()
            if name.split(" (", 1)[0] not in _FRAMEWORK_ROOTS
        ]
        return rows[:n]

    def top_modules(self, n: int) -> list[tuple[str, float]]:
        """The C{n} modules (files) most often executing, by self time."""
        return [(name, self._pct(c)) for name, c in self.module_self.most_common(n)]

    def own_code(self, minimum: float) -> list[tuple[str, float]]:
        """oaiproxy's own functions on the stack in at least C{minimum} percent of samples."""
        rows = [
            (name, self._pct(c))
            for name, c in self.total_counts.most_common()
            if "(oaiproxy/" in name and self._pct(c) >= minimum
        ]
        return rows

    def inclusive(self, function: str) -> float:
        """Percent of samples with a function of this name (any module) on the stack."""
        count = max(
            (c for name, c in self.total_counts.items() if name.split(" (", 1)[0] == function),
            default=0,
        )
        return self._pct(count)


def read_profile(path: Path) -> Profile:
    """Read a py-spy speedscope file; only the main (reactor) thread is counted."""
    data = json.loads(path.read_text())
    raw = data["shared"]["frames"]
    paths = [_path(f) for f in raw]
    frames = [f"{f['name']} ({p})" for f, p in zip(raw, paths, strict=True)]
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    module_self: Counter[str] = Counter()
    samples = idle = 0
    for profile in data["profiles"]:
        if "MainThread" not in profile["name"]:
            continue
        for stack in profile["samples"]:
            if not stack:
                continue
            leaf = frames[stack[-1]]
            # The reactor waiting in epoll is idle time, whatever py-spy thought.
            if leaf.startswith("EPollReactor.doPoll"):
                idle += 1
                continue
            samples += 1
            self_counts[leaf] += 1
            module_self[paths[stack[-1]]] += 1
            for name in {frames[i] for i in stack}:
                total_counts[name] += 1
    return Profile(samples, idle, self_counts, total_counts, module_self)
