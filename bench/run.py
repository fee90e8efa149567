"""
The oaiproxy benchmark: one command that starts the mock upstream, oaiproxy (twistd) and nginx
on loopback, measures them against each other, profiles oaiproxy under load, and writes
C{bench/RESULTS.md}.

    /work/venv/bin/python bench/run.py [--quick]

Every load loop is bounded in count and time; every process started is stopped by its PID.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: import "bench" and "oaiproxy" from the repository, not from bench/.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.report import write_report
from bench.suite import Bench, Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs: a smoke test")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).resolve().parent / "RESULTS.md",
        help="where to write the report (default: bench/RESULTS.md)",
    )
    parser.add_argument(
        "--profiles",
        type=Path,
        default=Path(__file__).resolve().parent / "profiles",
        help="where py-spy's speedscope profiles go (default: bench/profiles)",
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated measurement numbers to run (1-7, profiles); default: all",
    )
    args = parser.parse_args(argv)
    missing = [tool for tool in ("nginx", "wrk", "h2load") if shutil.which(tool) is None]
    if not (Path(sys.executable).parent / "py-spy").exists():
        missing.append("py-spy")
    if missing:
        print(
            f"missing: {', '.join(missing)}. Install them with: apt-get install -y nginx wrk "
            f"nghttp2-client && {sys.executable} -m pip install py-spy",
            file=sys.stderr,
        )
        return 2
    only = frozenset(k.strip() for k in args.only.split(",") if k.strip()) or None
    settings = Settings.quick() if args.quick else Settings.full()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="oaiproxy-bench-") as tmp:
        bench = Bench(settings, Path(tmp), args.profiles)
        try:
            bench.start()
            bench.run_all(only)
        finally:
            bench.stop()
    write_report(args.output, bench, started=started, elapsed=time.time() - started)
    print(f"wrote {args.output}", flush=True)
    return 0 if not bench.failures else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
