"""The epoll loop without the legacy log context: installed where it can be, dispatching alike."""

from __future__ import annotations

import errno
import socket
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableDescriptor, IReadDescriptor
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python import log as legacy_log
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from oaiproxy.reactortune import install_quiet_dispatch


@implementer(IReadDescriptor)
class _Reader:
    """A read descriptor over one end of a socket pair; records what it read."""

    def __init__(self, sock: socket.socket, fail: bool = False) -> None:
        self.sock = sock
        self.read: list[bytes] = []
        self.fail = fail

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> None:
        self.read.append(self.sock.recv(100))
        if self.fail:
            raise RuntimeError("broken handler")

    def connectionLost(self, reason: object) -> None:
        """Not used."""

    def logPrefix(self) -> str:
        return "reader"


class _Scripted(_Reader):
    """A reader whose doRead, after reading, returns or raises what it is told to."""

    def __init__(self, sock: socket.socket, outcome: object) -> None:
        super().__init__(sock)
        self.outcome = outcome
        self.lost: list[object] = []

    def doRead(self) -> Any:
        super().doRead()
        if isinstance(self.outcome, RuntimeError):
            raise self.outcome
        return self.outcome

    def connectionLost(self, reason: Any) -> None:
        self.lost.append(type(reason.value))


@implementer(IHalfCloseableDescriptor)
class _HalfCloseable(_Scripted):
    """A scripted reader that can have its read side closed alone."""

    def readConnectionLost(self, reason: Any) -> None:
        self.lost.append(("read half", type(reason.value)))

    def writeConnectionLost(self, reason: Any) -> None:
        """Not used."""


class QuietDispatchTests(SynchronousTestCase):
    """Socket events reach their handlers without log.callWithLogger."""

    def setUp(self) -> None:
        self.reactor: Any = self.new_reactor()

    def new_reactor(self) -> Any:
        """An epoll reactor (never run), closed when the test ends: its poller, its waker."""
        reactor: Any = EPollReactor()
        self.addCleanup(reactor._poller.close)
        self.addCleanup(reactor.waker.connectionLost, None)
        return reactor

    def observe(self) -> EventLoggingObserver:
        """Log events from here to the end of the test."""
        events = EventLoggingObserver()
        globalLogPublisher.addObserver(events)
        self.addCleanup(globalLogPublisher.removeObserver, events)
        return events

    def pair(self, fail: bool = False) -> tuple[_Reader, socket.socket]:
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        reader = _Reader(ours, fail)
        self.reactor.addReader(reader)
        self.addCleanup(self.reactor.removeReader, reader)
        return reader, theirs

    def test_installed_on_epoll(self) -> None:
        """Twisted's epoll reactor gets the loop; installing twice changes nothing."""
        self.assertTrue(install_quiet_dispatch(self.reactor))
        loop = self.reactor.doIteration
        self.assertTrue(install_quiet_dispatch(self.reactor))
        self.assertIs(self.reactor.doIteration, loop)
        self.assertIs(self.reactor.doPoll, loop)

    def test_not_installed_elsewhere(self) -> None:
        """Any other reactor is left as it is."""
        clock = MemoryReactorClock()
        self.assertFalse(install_quiet_dispatch(clock))
        self.assertNotIn("doIteration", vars(clock))

    def test_events_dispatched_without_log_context(self) -> None:
        """A readable socket is read by its handler; callWithLogger is not called."""
        install_quiet_dispatch(self.reactor)
        reader, theirs = self.pair()

        def refuse(*args: object, **kwargs: object) -> None:
            raise AssertionError("callWithLogger was called")

        self.patch(legacy_log, "callWithLogger", refuse)
        theirs.send(b"ping")
        self.reactor.doIteration(1.0)
        self.assertEqual(reader.read, [b"ping"])

    def test_stock_loop_uses_log_context(self) -> None:
        """Without it, Twisted's loop does call callWithLogger (what this test suite saves)."""
        reader, theirs = self.pair()
        calls: list[object] = []
        real = legacy_log.callWithLogger

        def counting(logger: object, func: Any, *args: object, **kwargs: object) -> Any:
            calls.append(logger)
            return real(logger, func, *args, **kwargs)

        self.patch(legacy_log, "callWithLogger", counting)
        theirs.send(b"ping")
        self.reactor.doIteration(1.0)
        self.assertEqual((reader.read, calls), ([b"ping"], [reader]))

    def test_handler_error_logged_and_loop_goes_on(self) -> None:
        """A handler that raises is logged (as Twisted logs it); other events still run."""
        install_quiet_dispatch(self.reactor)
        broken, theirs_broken = self.pair(fail=True)
        fine, theirs_fine = self.pair()
        events = self.observe()
        theirs_broken.send(b"a")
        theirs_fine.send(b"b")
        self.reactor.doIteration(1.0)
        self.assertEqual((broken.read, fine.read), ([b"a"], [b"b"]))
        # Twisted's handler logs it the legacy way ("failure"), this loop the new ("log_failure").
        found = [e.get("log_failure") or e.get("failure") for e in events]
        failures = [f for f in found if f is not None]
        self.assertEqual(len(failures), 1)
        self.assertTrue(failures[0].check(RuntimeError))
        self.flushLoggedErrors(RuntimeError)

    def test_plain_reads_handled_inline(self) -> None:
        """A socket that is only readable is read without Twisted's _doReadOrWrite."""
        install_quiet_dispatch(self.reactor)
        reader, theirs = self.pair()

        def refuse(*args: object) -> None:
            raise AssertionError("_doReadOrWrite was called")

        self.reactor._doReadOrWrite = refuse
        theirs.send(b"ping")
        self.reactor.doIteration(1.0)
        self.assertEqual(reader.read, [b"ping"])

    def test_read_outcomes_as_twisted(self) -> None:
        """
        What a read handler returns or raises ends its connection as Twisted's loop ends it:
        the same connectionLost, the reader removed; an exception logged.
        """
        seen: dict[str, list[list[object]]] = {}
        for tuned in (False, True):
            reactor = self.new_reactor()
            if tuned:
                install_quiet_dispatch(reactor)
            outcomes: list[list[object]] = []
            for kind in (_Scripted, _HalfCloseable):
                for outcome in (None, CONNECTION_DONE, CONNECTION_LOST, RuntimeError("broken")):
                    ours, theirs = socket.socketpair()
                    self.addCleanup(ours.close)
                    self.addCleanup(theirs.close)
                    reader = kind(ours, outcome)
                    reactor.addReader(reader)
                    theirs.send(b"x")
                    reactor.doIteration(1.0)
                    outcomes.append([*reader.lost, reader in reactor.getReaders()])
                    reactor.removeReader(reader)
            self.flushLoggedErrors(RuntimeError)
            seen["tuned" if tuned else "stock"] = outcomes
        self.assertEqual(seen["tuned"], seen["stock"])
        ended = [[ConnectionDone, False], [ConnectionLost, False], [RuntimeError, False]]
        self.assertEqual(
            seen["stock"],
            [
                [True],
                *ended,
                [True],
                # A half-closeable reader's clean end of input is only a read half-close.
                [("read half", ConnectionDone), False],
                *ended[1:],
            ],
        )

    def test_error_out_of_the_handler_logged(self) -> None:
        """What escapes Twisted's own handler is logged here, and the next event still runs."""
        install_quiet_dispatch(self.reactor)
        _, theirs_first = self.pair()
        _, theirs_second = self.pair()
        real = self.reactor._doReadOrWrite
        seen: list[object] = []

        def broken(selectable: object, fd: int, event: int) -> None:
            seen.append(selectable)
            if len(seen) == 1:
                raise RuntimeError("escaped")
            real(selectable, fd, event)

        self.reactor._doReadOrWrite = broken
        events = self.observe()
        # Readable and hung up: events that go through _doReadOrWrite.
        theirs_first.send(b"a")
        theirs_first.close()
        theirs_second.send(b"b")
        theirs_second.close()
        self.reactor.doIteration(1.0)
        self.assertEqual(len(seen), 2)
        failures = [e["log_failure"] for e in events if "log_failure" in e]
        self.assertEqual(len(failures), 1)
        self.assertTrue(failures[0].check(RuntimeError))
        self.flushLoggedErrors(RuntimeError)

    def test_interrupted_poll_returns(self) -> None:
        """An EINTR from epoll_wait ends the iteration quietly, as in Twisted's loop."""
        install_quiet_dispatch(self.reactor)

        class Interrupted:
            def poll(self, timeout: float, maxevents: int) -> list[tuple[int, int]]:
                raise OSError(errno.EINTR, "interrupted")

            def close(self) -> None:
                """Nothing to close."""

        real = self.reactor._poller
        self.addCleanup(setattr, self.reactor, "_poller", real)
        self.reactor._poller = Interrupted()
        self.reactor.doIteration(0)
