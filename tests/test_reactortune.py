"""The epoll loop without the legacy log context: installed where it can be, dispatching alike."""

from __future__ import annotations

import errno
import socket
import threading
import time
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

from oaiproxy.reactortune import (
    _loop_as_written_for,
    _main_loop,
    install_quiet_dispatch,
    wait_for_events,
)


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
        """Twisted's epoll reactor gets the loop; installing again replaces it, never wraps it."""
        self.assertTrue(install_quiet_dispatch(self.reactor))
        loop = self.reactor.doIteration
        self.assertIs(self.reactor.doPoll, loop)
        self.assertEqual(loop.args[1:], (0.0, time.perf_counter))
        self.assertTrue(install_quiet_dispatch(self.reactor, busy_poll=0.0002))
        again = self.reactor.doIteration
        self.assertIs(self.reactor.doPoll, again)
        self.assertIs(again.func, loop.func)
        self.assertEqual(again.args[1], 0.0002)

    def test_negative_busy_poll_refused(self) -> None:
        """A negative polling time is a programming error, said at once."""
        self.assertRaises(ValueError, install_quiet_dispatch, self.reactor, -1.0)

    def test_busy_poll_elsewhere_warned(self) -> None:
        """Busy polling asked of a reactor that cannot have it is said in the log."""
        events = self.observe()
        self.assertFalse(install_quiet_dispatch(MemoryReactorClock(), busy_poll=0.001))
        self.assertEqual(len(events), 1)
        self.assertIn("busy polling is off", events[0]["log_format"])
        self.assertEqual(events[0]["reactor"], "MemoryReactorClock")
        self.assertFalse(install_quiet_dispatch(MemoryReactorClock()))
        self.assertEqual(len(events), 1)

    def test_busy_poll_iteration_reads_what_arrives_while_polling(self) -> None:
        """
        With busy polling on, a real epoll iteration reads bytes that arrive while it polls,
        without a poll that waits: the clock sends them on its third reading.
        """
        reader, theirs = self.pair()
        readings: list[float] = []

        def clock() -> float:
            readings.append(0.0)
            if len(readings) == 3:
                theirs.send(b"ping")
            return len(readings) * 1e-6

        install_quiet_dispatch(self.reactor, busy_poll=60.0, clock=clock)
        timeouts: list[float] = []
        real = self.reactor._poller

        class Recording:
            def poll(self, timeout: float, maxevents: int) -> list[tuple[int, int]]:
                timeouts.append(timeout)
                return real.poll(timeout, maxevents)  # type: ignore[no-any-return]

        self.reactor._poller = Recording()
        self.addCleanup(setattr, self.reactor, "_poller", real)
        self.reactor.doIteration(5)
        self.assertEqual(reader.read, [b"ping"])
        self.assertEqual(set(timeouts), {0})
        self.assertEqual(len(readings), 3)

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


class _Poller:
    """
    A scripted C{epoll.poll}: records each call's timeout; answers C{ready} on the call
    numbered C{ready_on} (from 0), nothing on the others. Each call moves C{clock} on by
    C{step} seconds, as a real poll takes time.
    """

    def __init__(self, clock: list[float], step: float, ready_on: int | None = None) -> None:
        self.clock = clock
        self.step = step
        self.ready_on = ready_on
        self.timeouts: list[float] = []

    def poll(self, timeout: float, maxevents: int) -> list[tuple[int, int]]:
        self.timeouts.append(timeout)
        self.clock[0] += self.step
        if len(self.timeouts) - 1 == self.ready_on:
            return [(7, 1)]
        return []


class BusyPollTests(SynchronousTestCase):
    """wait_for_events: polling without waiting, bounded, before waiting."""

    def wait(
        self, timeout: float, busy_poll: float, ready_on: int | None
    ) -> tuple[list[tuple[int, int]], list[float]]:
        clock = [100.0]
        poller = _Poller(clock, 0.00001, ready_on)
        events = wait_for_events(poller.poll, 4, timeout, busy_poll, lambda: clock[0])
        return events, poller.timeouts

    def test_off_waits_at_once(self) -> None:
        """Without busy polling: one poll with the loop's own timeout, as Twisted's."""
        self.assertEqual(self.wait(2.5, 0.0, None), ([], [2.5]))
        self.assertEqual(self.wait(-1, 0.0, None), ([], [-1]))

    def test_zero_timeout_polls_once(self) -> None:
        """An iteration that must not wait polls once, whatever the busy polling."""
        self.assertEqual(self.wait(0, 0.001, None), ([], [0]))

    def test_ready_while_polling_returned_without_waiting(self) -> None:
        """Events found while polling are returned at once: no poll ever waits."""
        events, timeouts = self.wait(2.5, 0.001, ready_on=5)
        self.assertEqual(events, [(7, 1)])
        self.assertEqual(timeouts, [0] * 6)

    def test_ready_at_first_poll(self) -> None:
        """Events already ready are returned by the first poll."""
        self.assertEqual(self.wait(-1, 0.001, ready_on=0), ([(7, 1)], [0]))

    def test_polling_bounded_then_waits_for_the_rest(self) -> None:
        """Polling stops once its time is spent; the wait is the timeout less that time."""
        events, timeouts = self.wait(2.5, 0.0001, ready_on=None)
        self.assertEqual(events, [])
        spins = timeouts[:-1]
        self.assertEqual(set(spins), {0})
        # 0.1 ms of polling at 10 us a poll: the first poll, then ten more.
        self.assertEqual(len(spins), 11)
        # 2.4999 s left, waited in whole milliseconds rounded down (epoll rounds up).
        self.assertEqual(timeouts[-1], 2.499)

    def test_wait_rounded_down_to_whole_milliseconds(self) -> None:
        """The wait after polling never ends after the timer: whole milliseconds, rounded down."""
        for timeout in (0.0057, 0.0123456, 1.0):
            _events, timeouts = self.wait(timeout, 0.0001, ready_on=None)
            left = timeouts[-1]
            self.assertEqual(round(left * 1000), left * 1000)
            self.assertLessEqual(left, timeout - 0.0001)
            self.assertGreater(left, timeout - 0.0001 - 0.001)

    def test_clock_going_backwards_ends_the_polling(self) -> None:
        """A clock that goes backwards cannot keep the loop polling: it waits at once."""
        times = iter([100.0, 99.0])
        poller = _Poller([0.0], 0.0, None)
        events = wait_for_events(poller.poll, 4, 2.0, 0.001, lambda: next(times))
        self.assertEqual(events, [])
        self.assertEqual(poller.timeouts, [0, 0, 0.0])

    def test_polling_never_past_the_timeout(self) -> None:
        """A timer due before the polling would end bounds it: the last poll waits for nothing."""
        events, timeouts = self.wait(0.00003, 0.001, ready_on=None)
        self.assertEqual(events, [])
        self.assertEqual(len(timeouts), 5)  # the first poll, three while polling, the last
        self.assertEqual(timeouts[-1], 0.0)

    def test_no_timeout_waits_forever_after_polling(self) -> None:
        """With no timer due, the wait after polling has no timeout either."""
        events, timeouts = self.wait(-1, 0.00005, ready_on=None)
        self.assertEqual(events, [])
        self.assertEqual(timeouts[-1], -1)
        self.assertEqual(set(timeouts[:-1]), {0})

    def test_ready_at_the_wait(self) -> None:
        """What becomes ready after the polling is returned by the wait."""
        events, timeouts = self.wait(1.0, 0.00005, ready_on=6)
        self.assertEqual(events, [(7, 1)])
        self.assertGreater(timeouts[-1], 0)


class MainLoopTests(SynchronousTestCase):
    """The main loop with runUntilCurrent's and timeout's idle work inline, on a real reactor."""

    def setUp(self) -> None:
        reactor: Any = EPollReactor()
        self.addCleanup(reactor._poller.close)
        self.addCleanup(reactor.waker.connectionLost, None)
        self.assertTrue(install_quiet_dispatch(reactor))
        self.reactor = reactor
        # What each turn asked of the poll, and how often Twisted's runUntilCurrent ran.
        self.timeouts: list[float | None] = []
        self.runs = 0
        loop, run_until_current = reactor.doIteration, reactor.runUntilCurrent

        def iteration(timeout: float | None) -> None:
            self.timeouts.append(timeout)
            loop(timeout)

        def counted() -> None:
            self.runs += 1
            run_until_current()

        reactor.doIteration = iteration
        reactor.runUntilCurrent = counted

    def run_reactor(self) -> None:
        """Run the reactor until something stops it (a test bug fails at 10 s)."""
        guard = self.reactor.callLater(10, self.reactor.stop)
        self.reactor.run(installSignalHandlers=False)
        self.assertTrue(guard.active(), "the reactor ran until the guard stopped it")
        guard.cancel()

    def test_installed(self) -> None:
        """install_quiet_dispatch gives the reactor this loop."""
        self.assertIs(self.reactor.mainLoop.func, _main_loop)

    def test_timed_calls_run_in_order(self) -> None:
        """Timed calls, and calls they make, run in their order; stop ends the loop."""
        seen: list[str] = []
        self.reactor.callLater(0.002, seen.append, "second")
        self.reactor.callLater(0, lambda: self.reactor.callLater(0, seen.append, "made"))
        self.reactor.callLater(0, seen.append, "first")
        self.reactor.callLater(0.004, self.reactor.stop)
        self.run_reactor()
        self.assertEqual(seen, ["first", "made", "second"])

    def test_wait_is_the_next_timer(self) -> None:
        """A turn waits until the next timer is due: 5 s here, cut short by a socket."""
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        reactor = self.reactor

        class Stopper(_Reader):
            def doRead(self) -> None:
                super().doRead()
                reactor.stop()

        stopper = Stopper(ours)
        reactor.addReader(stopper)
        self.addCleanup(reactor.removeReader, stopper)

        def later() -> None:
            reactor.callLater(5, len, "")
            theirs.send(b"x")

        reactor.callLater(0, later)
        self.run_reactor()
        self.assertEqual(stopper.read, [b"x"])
        waits = [t for t in self.timeouts if t is not None and t > 1]
        self.assertEqual(len(waits), 1, self.timeouts)
        self.assertTrue(4.9 < waits[0] <= 5, waits)

    def test_idle_turns_skip_run_until_current(self) -> None:
        """Turns with nothing due, queued or new do not call runUntilCurrent."""
        reader_ours, theirs = socket.socketpair()
        self.addCleanup(reader_ours.close)
        self.addCleanup(theirs.close)
        reader = _Reader(reader_ours)
        self.reactor.addReader(reader)
        self.addCleanup(self.reactor.removeReader, reader)
        pokes = 20

        def poke() -> None:
            # Bytes for the next turns to read, with no timer made or due.
            for _ in range(pokes):
                theirs.send(b"x")
            self.reactor.callLater(0.05, self.reactor.stop)

        self.reactor.callLater(0, poke)
        self.run_reactor()
        self.assertGreaterEqual(len(self.timeouts), 2)
        # A few turns (the start, the timers) ran it; not every turn.
        self.assertLess(self.runs, len(self.timeouts))
        self.assertEqual(b"".join(reader.read), b"x" * pokes)

    def test_calls_from_threads_run(self) -> None:
        """A call from another thread wakes the loop and runs."""
        seen: list[str] = []

        def from_thread() -> None:
            self.reactor.callFromThread(seen.append, "thread")
            self.reactor.callFromThread(self.reactor.stop)

        self.reactor.callLater(0, lambda: threading.Thread(target=from_thread).start())
        self.run_reactor()
        self.assertEqual(seen, ["thread"])

    def test_cancelled_calls_swept(self) -> None:
        """Over 50 cancelled calls, more than half the heap, are swept from it."""
        self.reactor.callLater(
            0, lambda: [self.reactor.callLater(60, len).cancel() for _ in range(80)]
        )
        self.reactor.callLater(0.01, self.reactor.stop)
        self.run_reactor()
        self.assertLessEqual(len(self.reactor._pendingTimedCalls), 2)

    def test_error_in_a_turn_logged_and_loop_goes_on(self) -> None:
        """An error out of a turn is logged as Twisted's loop logs it; the loop goes on."""
        events = EventLoggingObserver()
        globalLogPublisher.addObserver(events)
        self.addCleanup(globalLogPublisher.removeObserver, events)
        iteration = self.reactor.doIteration
        failures = [RuntimeError("broken turn")]

        def failing(timeout: float | None) -> None:
            if failures:
                raise failures.pop()
            iteration(timeout)

        self.reactor.doIteration = failing
        seen: list[str] = []
        self.reactor.callLater(0.002, seen.append, "after")
        self.reactor.callLater(0.004, self.reactor.stop)
        self.run_reactor()
        self.assertEqual(seen, ["after"])
        logged = [e for e in events if "Unexpected error in main loop" in e["log_format"]]
        self.assertEqual(len(logged), 1)
        # Where Twisted's own loop logs it, for observers filtering by namespace.
        self.assertEqual(logged[0]["log_namespace"], "twisted.internet.base")
        self.assertIsInstance(logged[0]["log_failure"].value, RuntimeError)
        self.flushLoggedErrors(RuntimeError)

    def test_other_loops_kept(self) -> None:
        """
        A reactor whose loop differs from Twisted 26.10.0's (an override, or a Twisted whose
        runUntilCurrent looks at other state) keeps its own main loop.
        """

        class Overridden(EPollReactor):
            def runUntilCurrent(self) -> None:
                super().runUntilCurrent()

        class NewState(EPollReactor):
            def timeout(self) -> float | None:
                return None if self._somethingNew else super().timeout()  # type: ignore[attr-defined]

        class NewCap(EPollReactor):
            def timeout(self) -> float | None:
                # Twisted 26.10.0's names, another cap.
                self._insertNewDelayedCalls()
                if not self._pendingTimedCalls:
                    return None
                return max(0, min(1000, self._pendingTimedCalls[0].time - self.seconds()))

        for cls in (Overridden, NewState, NewCap):
            self.assertFalse(_loop_as_written_for(cls), cls)
        self.assertTrue(_loop_as_written_for(EPollReactor))
        # An instance that shadows one of the methods keeps Twisted's loop too.
        shadowed: Any = EPollReactor()
        self.addCleanup(shadowed._poller.close)
        self.addCleanup(shadowed.waker.connectionLost, None)
        shadowed.timeout = lambda: None
        self.assertTrue(install_quiet_dispatch(shadowed))
        self.assertNotIn("mainLoop", vars(shadowed))
        import oaiproxy.reactortune

        self.patch(oaiproxy.reactortune, "_loop_as_written_for", lambda cls: False)
        reactor: Any = EPollReactor()
        self.addCleanup(reactor._poller.close)
        self.addCleanup(reactor.waker.connectionLost, None)
        self.assertTrue(install_quiet_dispatch(reactor))
        self.assertNotIn("mainLoop", vars(reactor))
        self.assertIn("doIteration", vars(reactor))
