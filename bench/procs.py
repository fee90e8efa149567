"""
The processes under test: the mock upstream, oaiproxy (twistd) and nginx, each a child process
on loopback with free ports, plus what the kernel says about them (RSS, CPU time).

Every process started here is stopped by its own PID; nothing else is ever signalled.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

__all__ = [
    "REPO",
    "UPSTREAM_IDLE",
    "UPSTREAM_KEEPALIVE",
    "Child",
    "cpu_seconds",
    "free_port",
    "machine_jiffies",
    "nginx_config",
    "nginx_worker_pid",
    "rss_kib",
    "source_version",
    "start_floor",
    "start_mock",
    "start_nginx",
    "start_oaiproxy",
    "tcp_listen_drops",
    "wait_for_port",
]

REPO = Path(__file__).resolve().parent.parent
"""The repository root: put on C{PYTHONPATH} so the children run the current source."""

_VENV_BIN = Path(sys.executable).parent
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(
    port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """
    Wait until something accepts connections on 127.0.0.1:C{port}.

    @raise RuntimeError: if C{proc} exits first or nothing listens within C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout:g}s")


@dataclass
class Child:
    """A child process we started, with its command line and log file."""

    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes] = field(repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM this process (by PID), then SIGKILL it if it lingers."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
        self._log.close()


def _spawn(name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None) -> Child:
    log_path = workdir / f"{name}.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=workdir,
        env=env,
    )
    return Child(name, argv, proc, log_path, log)


def _python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    return env


def start_mock(workdir: Path, port: int) -> Child:
    """The mock upstream with its default configuration (knobs come per request)."""
    argv = [
        sys.executable,
        "-m",
        "oaiproxy.mock",
        "--listen",
        # Twisted's default backlog is 50: 200 simultaneous connects would then wait for SYN
        # retransmits (1 s), through any proxy. 511 is nginx's default (and oaiproxy's).
        f"tcp:{port}:interface=127.0.0.1:backlog=511",
        "--name",
        "bench",
    ]
    child = _spawn("mock", argv, workdir, _python_env())
    wait_for_port(port, proc=child.proc)
    return child


#: Seconds both proxies keep an idle upstream connection in the bench (nginx's
#: C{keepalive_timeout} in its upstream block, oaiproxy's C{--upstream-keepalive}): below the
#: mock's own 60 s (Twisted's web server), as an operator sets it for a known upstream.
UPSTREAM_KEEPALIVE = 50

#: Idle upstream connections both proxies keep (oaiproxy's default; nginx's C{keepalive}).
UPSTREAM_IDLE = 256


def start_oaiproxy(
    workdir: Path,
    http_port: int,
    tls_port: int | None,
    upstream_port: int,
    state_dir: Path,
    *,
    name: str = "oaiproxy",
    keepalive: float | None = UPSTREAM_KEEPALIVE,
    extra: tuple[str, ...] = (),
) -> Child:
    """
    oaiproxy under twistd: a plain HTTP/1.1 listener, a TLS one (h2, http/1.1) unless
    C{tls_port} is None, one upstream; C{keepalive} None keeps the proxy's default;
    C{extra} options added at the end.
    """
    argv = [
        str(_VENV_BIN / "twistd"),
        "-n",
        "--pidfile=",
        "oaiproxy",
        "--listen",
        f"tcp:{http_port}:interface=127.0.0.1",
        "--upstream",
        f"http://127.0.0.1:{upstream_port}/v1",
        "--upstream-connections",
        str(UPSTREAM_IDLE),
        "--state-dir",
        str(state_dir),
    ]
    if tls_port is not None:
        argv += ["--listen", f"ssl:{tls_port}:selfsigned:interface=127.0.0.1"]
    if keepalive is not None:
        argv += ["--upstream-keepalive", f"{keepalive:g}"]
    argv += extra
    child = _spawn(name, argv, workdir, _python_env())
    wait_for_port(http_port, proc=child.proc)
    if tls_port is not None:
        wait_for_port(tls_port, proc=child.proc)
    return child


def start_floor(workdir: Path, mode: str, port: int, upstream_port: int) -> Child:
    """A floor proxy of L{bench.floor} (C{raw}, C{web}, C{agent} or C{epoll}) before the mock."""
    argv = [sys.executable, "-m", "bench.floor", mode, str(port), str(upstream_port)]
    child = _spawn(f"floor-{mode}", argv, workdir, _python_env())
    wait_for_port(port, proc=child.proc)
    return child


def nginx_config(
    prefix: Path, *, http_port: int, tls_port: int, upstream_port: int, cert: Path, key: Path
) -> str:
    """
    One worker, HTTP/1.1 to a keep-alive upstream pool (kept as oaiproxy's is:
    L{UPSTREAM_IDLE} connections, L{UPSTREAM_KEEPALIVE} seconds), no response buffering, h2
    over TLS.

    Limits on requests per connection are raised so that the load generators' connections
    are not recycled during a run (wrk and h2load keep theirs open).
    """
    return f"""\
worker_processes 1;
user root;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy_temp;
    fastcgi_temp_path {prefix}/fastcgi_temp;
    uwsgi_temp_path {prefix}/uwsgi_temp;
    scgi_temp_path {prefix}/scgi_temp;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    upstream mock {{
        server 127.0.0.1:{upstream_port};
        keepalive {UPSTREAM_IDLE};
        keepalive_timeout {UPSTREAM_KEEPALIVE}s;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{http_port};
        listen 127.0.0.1:{tls_port} ssl http2;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        client_max_body_size 32m;
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


def start_nginx(
    workdir: Path, *, http_port: int, tls_port: int, upstream_port: int, cert: Path, key: Path
) -> tuple[Child, Path]:
    """nginx (master + one worker) with L{nginx_config}; returns the child and its config."""
    prefix = workdir / "nginx"
    prefix.mkdir(exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(
        nginx_config(
            prefix,
            http_port=http_port,
            tls_port=tls_port,
            upstream_port=upstream_port,
            cert=cert,
            key=key,
        )
    )
    argv = ["nginx", "-c", str(conf), "-p", str(prefix), "-g", "daemon off;"]
    child = _spawn("nginx", argv, workdir)
    wait_for_port(http_port, proc=child.proc)
    wait_for_port(tls_port, proc=child.proc)
    return child, conf


def nginx_worker_pid(master: int) -> int | None:
    """The PID of the (single) worker process of the nginx master C{master}."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces: split after it.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == master:
            return int(entry.name)
    return None


def rss_kib(pid: int) -> int:
    """The resident set size of C{pid} in KiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def machine_jiffies() -> tuple[int, int]:
    """Busy and total CPU time of the whole machine so far, in clock ticks (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user time
    return total - idle, total


def tcp_listen_drops() -> dict[str, int]:
    """The kernel's TcpExt ListenOverflows and ListenDrops counters (/proc/net/netstat)."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=True))
            return {k: int(table.get(k, 0)) for k in ("ListenOverflows", "ListenDrops")}
    return {}


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time consumed so far by C{pid}, in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    # After the command name: state is field 3 of stat(5); utime and stime are 14 and 15.
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _CLK_TCK


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except OSError:
        return "?"
    return done.stdout.strip()


def source_version() -> str:
    """The commit of the oaiproxy source, and whether oaiproxy/ has uncommitted changes."""
    dirty = _git("status", "--porcelain", "--", "oaiproxy")
    return _git("rev-parse", "--short", "HEAD") + (
        " + uncommitted changes in oaiproxy/" if dirty else ""
    )
