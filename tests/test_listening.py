"""Listeners: refuse to start when an endpoint cannot listen; log each real address."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from oaiproxy.listening import Endpoint, Listeners

_REPO = Path(__file__).resolve().parent.parent


@implementer(IListeningPort)
class _Port:
    def __init__(self, address: IPv4Address | IPv6Address) -> None:
        self.address = address
        self.listening = True

    def startListening(self) -> None:
        self.listening = True

    def stopListening(self) -> None:
        self.listening = False

    def getHost(self) -> IPv4Address | IPv6Address:
        return self.address


@implementer(IStreamServerEndpoint)
class _Endpoint:
    def __init__(self, result: Deferred[Any]) -> None:
        self.result = result

    def listen(self, factory: Any) -> Deferred[Any]:
        return self.result


def _listeners(*results: Deferred[Any]) -> Listeners:
    endpoints = [Endpoint(_Endpoint(r), f"place-{i}", "http") for i, r in enumerate(results)]
    return Listeners("oaiproxy", Factory.forProtocol(Protocol), endpoints)


class ListenersTests(SynchronousTestCase):
    def test_endpoint_factory(self) -> None:
        """An endpoint that names its own factory listens with it; the others, the shared one."""
        heard: list[Any] = []

        @implementer(IStreamServerEndpoint)
        class Recording:
            def listen(self, factory: Any) -> Deferred[Any]:
                heard.append(factory)
                return succeed(_Port(IPv4Address("TCP", "127.0.0.1", 1)))

        shared = Factory.forProtocol(Protocol)
        own = Factory.forProtocol(Protocol)
        service = Listeners(
            "oaiproxy",
            shared,
            [Endpoint(Recording(), "a", "http", own), Endpoint(Recording(), "b", "https")],
        )
        service.startService()
        self.assertEqual(heard, [own, shared])

    def test_real_addresses_logged(self) -> None:
        """Each port's real address is logged (the chosen port for 0; IPv6 in brackets)."""
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]  # annotated for unittest.TestCase
        service = _listeners(
            succeed(_Port(IPv4Address("TCP", "127.0.0.1", 43210))),
            succeed(_Port(IPv6Address("TCP", "::1", 8443))),
        )
        service.startService()
        text = [formatEvent(e) for e in observer]
        self.assertIn("oaiproxy listening on 127.0.0.1:43210: http", text)
        self.assertIn("oaiproxy listening on [::1]:8443: http", text)

    def test_cannot_listen_stops_the_start(self) -> None:
        """
        An endpoint that cannot listen raises SystemExit naming its address and the reason;
        the ports opened before it are closed.
        """
        first = _Port(IPv4Address("TCP", "127.0.0.1", 8080))
        service = _listeners(
            succeed(first), fail(CannotListenError("127.0.0.1", 8443, OSError("in use")))
        )
        with self.assertRaises(SystemExit) as caught:
            service.privilegedStartService()
        message = str(caught.exception.code)
        self.assertTrue(message.startswith("oaiproxy: cannot listen on place-1: "), message)
        self.assertIn("in use", message)
        self.assertFalse(first.listening)
        self.assertIsNone(service.ports)

    def test_no_answer_is_an_error(self) -> None:
        """An endpoint that does not say at once whether it listens stops the start."""
        with self.assertRaises(SystemExit):
            _listeners(Deferred()).startService()

    def test_stop_closes_ports(self) -> None:
        """Stopping the service stops listening on every port."""
        ports = [_Port(IPv4Address("TCP", "127.0.0.1", n)) for n in (1, 2)]
        service = _listeners(*(succeed(p) for p in ports))
        service.privilegedStartService()
        service.startService()
        self.successResultOf(service.stopService())
        self.assertEqual([p.listening for p in ports], [False, False])


class TwistdTests(SynchronousTestCase):
    """twistd itself, in a child process."""

    def test_port_taken_exits_with_a_message(self) -> None:
        """
        With its port taken, `twistd oaiproxy` exits with status 1 and says which address
        (Twisted's own service would log the error and run on, listening nowhere).
        """
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n"]
        argv += ["--pidfile=", "oaiproxy", "--listen", f"tcp:{port}:interface=127.0.0.1"]
        argv += ["--upstream", "http://127.0.0.1:9/v1"]
        env = dict(os.environ, PYTHONPATH=str(_REPO))
        done = subprocess.run(argv, check=False, capture_output=True, timeout=60, env=env)
        output = (done.stdout + done.stderr).decode("utf-8", "replace")
        self.assertEqual(done.returncode, 1, output)
        self.assertIn(f"oaiproxy: cannot listen on 127.0.0.1:{port}", output)
        self.assertNotIn("listening on", output.replace("cannot listen on", ""))
        self.assertNotIn("Traceback", output)

    def test_port_taken_daemon_exits_with_a_message(self) -> None:
        """
        The same without -n: twistd forks before the listeners start, and its parent, which
        waits on the child's word, exits 1 with the message; the pid file is removed.
        """
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        work = Path(self.mktemp())
        work.mkdir()
        pidfile = work / "twistd.pid"
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
        argv += [f"--pidfile={pidfile}", f"--logfile={work / 'twistd.log'}", "oaiproxy"]
        argv += ["--listen", f"tcp:{port}:interface=127.0.0.1"]
        argv += ["--upstream", "http://127.0.0.1:9/v1"]
        env = dict(os.environ, PYTHONPATH=str(_REPO))
        done = subprocess.run(argv, check=False, capture_output=True, timeout=60, env=env)
        output = (done.stdout + done.stderr).decode("utf-8", "replace")
        self.assertEqual(done.returncode, 1, output)
        self.assertIn("cannot listen on 127.0.0.1", output)
        # The parent exits on the child's word; the child removes the pid file as it ends,
        # which may be just after: wait for the child to end (not for some time).
        _wait_for_exit(pidfile)
        self.assertFalse(pidfile.exists())


def _wait_for_exit(pidfile: Path, timeout: float = 30.0) -> None:
    """Wait until the process named in C{pidfile} (if it is still there) has ended."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return  # no pid file (any more), or not written yet by a process already gone
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # ended already
    try:
        select.select([fd], [], [], timeout)  # readable once the process has ended
    finally:
        os.close(fd)
