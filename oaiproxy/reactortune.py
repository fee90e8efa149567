"""
The epoll reactor's event loop without Twisted's legacy log context per event.

For every socket event, Twisted's C{EPollReactor.doPoll} runs the handler inside
C{twisted.python.log.callWithLogger}: it asks the protocol for its log prefix and pushes a
context dictionary, only so that a legacy C{log.msg} made while the event is handled can say
which connection it came from. That is about 10 of the 57 Python calls the proxy makes per
relayed streamed event. The proxy's own log lines do not use that context (they are
C{twisted.logger} events, named by their module), so the entry points (C{proxy.tac} and the
plugin) install this loop, which calls the handler directly; what a handler raises is still
logged, by Twisted's own C{_doReadOrWrite} or here. The one difference: Twisted's own legacy
log lines (its "Unhandled Error" reports) say C{-} where they said the connection's prefix.

An event that is only "readable" (most events: a socket with data) does not go through
C{_doReadOrWrite} either: the loop does what that method does for it (the handler's C{doRead},
an exception logged, a connection lost or ended handed to C{_disconnectSelectable} exactly
as Twisted hands it), without the branches for other events and the call itself: 4.3% of
the instructions per relayed event (C{bench/ab.py chunk-instructions}: 40,933 to 39,192).
Every other event goes through C{_doReadOrWrite}.

The main loop around it (C{mainLoop}) calls C{runUntilCurrent} and C{timeout} only when
they have work: a thread call queued, a timed call new or due, cancelled calls to sweep, a
stop asked for. Otherwise it computes the wait itself, from the heap's first call, as
C{timeout} does. Twisted's loop made five Python calls per turn (its error handler's
C{__enter__} and C{__exit__}, C{runUntilCurrent}, C{timeout}, and C{_insertNewDelayedCalls}
twice): 7% of the instructions per relayed event (C{bench/ab.py chunk-instructions}:
37,390 to 34,791). It is installed only where C{mainLoop}, C{runUntilCurrent} and
C{timeout} use exactly the names Twisted 26.10.0's do; another Twisted keeps its own loop.

Optionally (C{busy_poll}, off by default), the loop polls before it sleeps: when no socket is
ready, it asks epoll again without waiting, for up to that many seconds, and only then
waits. A proxy at low load sleeps between every two events, and on a virtual machine whose
guest kernel does not poll before halting an idle CPU (no C{haltpoll} cpuidle driver: this
one's C{/sys/devices/system/cpu/cpuidle/current_driver} says C{none}), waking a halted CPU
costs tens to hundreds of microseconds per event. Polling keeps the proxy's CPU awake for the
answer it is about to get, for CPU it would otherwise leave idle: at one connection, up to
one core. Under load there is always a socket ready and the loop never spins. See
C{docs/configuration.md} (C{Runtime.busy_poll_us}) and C{bench/FINDINGS.md}.

Written against Twisted 26.10.0 (C{EPollReactor.doPoll}, its private C{_poller},
C{_selectables}, C{_doReadOrWrite} and C{_disconnectSelectable}): installed only on that
reactor class, unchanged.
"""

from __future__ import annotations

import errno
import math
import sys
import time
from collections.abc import Callable
from functools import partial
from select import EPOLLIN
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger
from twisted.python import log as legacy_log

__all__ = ["install_quiet_dispatch", "wait_for_events"]

log = Logger()

# The main loop's own lines, in the namespace Twisted's loop logs them under.
_twisted_log = Logger(namespace="twisted.internet.base")

# An event that is only "readable": handled here as Twisted's _doReadOrWrite handles it.
_READABLE = EPOLLIN

# What the loop replaces, to check that it is still Twisted's own.
_TWISTEDS_DO_POLL = EPollReactor.doPoll


def install_quiet_dispatch(
    reactor: Any, busy_poll: float = 0.0, clock: Callable[[], float] = time.perf_counter
) -> bool:
    """
    Make C{reactor} dispatch socket events without the legacy log context, if it is
    Twisted's epoll reactor with its own C{doPoll}. Returns whether it was installed.

    @param busy_poll: seconds to poll without waiting, when no socket is ready, before
        waiting (0: wait at once, as Twisted does).
    @param clock: monotonic seconds, bounding that polling (the loop's own, not a timer).
    """
    if busy_poll < 0:
        raise ValueError(f"busy_poll must be 0 or more seconds, not {busy_poll!r}")
    if type(reactor) is not EPollReactor or type(reactor).doPoll is not _TWISTEDS_DO_POLL:
        if busy_poll:
            log.warn(
                "busy polling is off: it needs Twisted's epoll reactor, not {reactor}",
                reactor=type(reactor).__name__,
            )
        return False
    tuned: Any = reactor  # instance attributes shadow the class's loop
    tuned.doIteration = tuned.doPoll = partial(_do_poll, reactor, busy_poll, clock)
    if _loop_as_written_for(type(reactor)) and not _shadowed(reactor):
        tuned.mainLoop = partial(_main_loop, reactor)
    return True


#: The longest wait epoll takes (2 ** 31 milliseconds), as Twisted's C{timeout} bounds it.
_LONGEST_WAIT = 2147483

#: The names Twisted 26.10.0's C{mainLoop}, C{runUntilCurrent} and C{timeout} use: a
#: Twisted whose loop uses others (new state to look at) keeps its own loop.
_LOOP_NAMES = {
    "mainLoop": frozenset(
        [
            "_log",
            "_started",
            "_topHandler",
            "doIteration",
            "info",
            "runUntilCurrent",
            "running",
            "timeout",
        ]
    ),
    "runUntilCurrent": frozenset(
        [
            "_DEFAULT_DELAYED_CALL_LOGGING_HANDLER",
            "_cancellations",
            "_insertNewDelayedCalls",
            "_justStopped",
            "_log",
            "_pendingTimedCalls",
            "_threadCallHandler",
            "activate_delay",
            "args",
            "called",
            "cancelled",
            "creator",
            "delayed_time",
            "failuresHandled",
            "fireSystemEvent",
            "func",
            "heapify",
            "heappop",
            "heappush",
            "kw",
            "len",
            "seconds",
            "threadCallQueue",
            "time",
            "wakeUp",
        ]
    ),
    "timeout": frozenset(
        ["_insertNewDelayedCalls", "_pendingTimedCalls", "max", "min", "seconds", "time"]
    ),
}


#: Constants of theirs the loop copies: C{timeout}'s longest wait, C{runUntilCurrent}'s
#: threshold for sweeping cancelled calls.
_LOOP_CONSTANTS = {"timeout": _LONGEST_WAIT, "runUntilCurrent": 50}


def _shadowed(reactor: Any) -> bool:
    """
    Whether C{reactor} has a loop method of its own, over its class's. (Asked without
    C{vars}: in CPython 3.11 that makes the instance a real dictionary, and every attribute
    look-up on it slower for good: 5% more instructions per relayed event.)
    """
    for name in _LOOP_NAMES:
        method = getattr(reactor, name, None)
        if getattr(method, "__func__", None) is not getattr(type(reactor), name, None):
            return True
    return False


def _loop_as_written_for(cls: type) -> bool:
    """Whether C{cls}'s main loop is Twisted's own and uses what 26.10.0's does."""
    for name, names in _LOOP_NAMES.items():
        method = getattr(cls, name, None)
        code = getattr(method, "__code__", None)
        if code is None or frozenset(code.co_names) != names:
            return False
        constant = _LOOP_CONSTANTS.get(name)
        if constant is not None and constant not in code.co_consts:
            return False
    return True


def _main_loop(reactor: Any) -> None:
    """
    Twisted 26.10.0's C{ReactorBase.mainLoop}, with what C{runUntilCurrent} and C{timeout}
    do when there is nothing for them to do taken inline: no thread call queued, no timed
    call new or due, no heap of cancelled calls to sweep, no stop asked for. Then a turn of
    the loop makes no Python call but the poll's: 7% fewer instructions per relayed event.
    An error escaping a turn is logged as Twisted's loop logs it, and the loop goes on.
    """
    seconds = reactor.seconds  # the reactor's clock, as the loop starts
    while reactor._started:
        try:
            while reactor._started:
                pending = reactor._pendingTimedCalls
                cancelled = reactor._cancellations
                if (
                    reactor.threadCallQueue
                    or reactor._newTimedCalls
                    or (pending and pending[0].time <= seconds())
                    or (cancelled > 50 and cancelled > len(pending) >> 1)
                    or reactor._justStopped
                ):
                    reactor.runUntilCurrent()
                    if reactor._newTimedCalls:  # made by the calls just run
                        reactor._insertNewDelayedCalls()
                    pending = reactor._pendingTimedCalls  # the sweep makes a new list
                if not reactor.running:
                    timeout: float | None = 0  # Twisted's passes False: the same poll
                elif pending:
                    timeout = max(0, min(_LONGEST_WAIT, pending[0].time - seconds()))
                else:
                    timeout = None
                reactor.doIteration(timeout)
        except BaseException:
            _twisted_log.failure("Unexpected error in main loop")
    _twisted_log.info("Main loop terminated.")


def wait_for_events(
    poll: Callable[[float, int], list[tuple[int, int]]],
    maxevents: int,
    timeout: float,
    busy_poll: float,
    clock: Callable[[], float],
) -> list[tuple[int, int]]:
    """
    The ready events, as C{poll(timeout, maxevents)} (epoll's; C{timeout} -1 for none)
    returns them; with C{busy_poll}, polled for without waiting for up to that many seconds
    (never past C{timeout}) before waiting for the rest of C{timeout}, in whole milliseconds
    rounded down (epoll rounds up: the loop spins what is left of a timer's due time on its
    next turn, instead of waking up to a millisecond late).

    A public, pure function of C{poll} and C{clock}, so that it can be tested with scripted
    ones. A clock that goes backwards ends the polling.
    """
    if busy_poll <= 0 or timeout == 0:
        return poll(timeout, maxevents)
    events = poll(0, maxevents)
    if events:
        return events
    spin = busy_poll if timeout < 0 else min(busy_poll, timeout)
    start = clock()
    end = start + spin
    now = start
    while start <= now < end:
        events = poll(0, maxevents)
        if events:
            return events
        now = clock()
    if timeout < 0:
        return poll(-1, maxevents)
    left = timeout - (now - start) if now >= start else 0.0
    return poll(max(0.0, math.floor(left * 1000) / 1000), maxevents)


def _do_poll(
    reactor: Any, busy_poll: float, clock: Callable[[], float], timeout: float | None
) -> None:
    """
    Twisted 26.10.0's C{EPollReactor.doPoll}, without C{log.callWithLogger}, plain read
    events handled inline; optionally polling before waiting (L{wait_for_events}).
    """
    if timeout is None:
        timeout = -1  # wait indefinitely
    try:
        if busy_poll and timeout != 0:
            events = wait_for_events(
                reactor._poller.poll, len(reactor._selectables), timeout, busy_poll, clock
            )
        else:
            events = reactor._poller.poll(timeout, len(reactor._selectables))
    except OSError as err:
        if err.errno == errno.EINTR:
            return
        raise
    selectables = reactor._selectables
    handle = reactor._doReadOrWrite
    for fd, event in events:
        selectable = selectables.get(fd)
        if selectable is None:
            continue
        try:
            if event == _READABLE and selectable.fileno() != -1:
                # Twisted's _doReadOrWrite for a plain read event (most events), without
                # the branches for the others and without the call.
                try:
                    why = selectable.doRead()
                    read = True
                except BaseException:
                    why = sys.exc_info()[1]
                    read = False  # as Twisted's: its flag is set after doRead returns
                    legacy_log.err()
                if why:
                    reactor._disconnectSelectable(selectable, why, read)
                continue
            handle(selectable, fd, event)
        except KeyboardInterrupt:
            raise
        except BaseException:
            # What callWithLogger did with it (Twisted's handler catches its own first).
            log.failure("error handling an event on {selectable!r}", selectable=selectable)
