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

Written against Twisted 26.10.0 (C{EPollReactor.doPoll}, its private C{_poller},
C{_selectables}, C{_doReadOrWrite} and C{_disconnectSelectable}): installed only on that
reactor class, unchanged.
"""

from __future__ import annotations

import errno
import sys
from functools import partial
from select import EPOLLIN
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger
from twisted.python import log as legacy_log

__all__ = ["install_quiet_dispatch"]

log = Logger()

# An event that is only "readable": handled here as Twisted's _doReadOrWrite handles it.
_READABLE = EPOLLIN

# What the loop replaces, to check that it is still Twisted's own.
_TWISTEDS_DO_POLL = EPollReactor.doPoll


def install_quiet_dispatch(reactor: Any) -> bool:
    """
    Make C{reactor} dispatch socket events without the legacy log context, if it is
    Twisted's epoll reactor with its own C{doPoll}. Returns whether it was installed.
    """
    if type(reactor) is not EPollReactor or type(reactor).doPoll is not _TWISTEDS_DO_POLL:
        return False
    tuned: Any = reactor  # instance attributes shadow the class's loop
    if getattr(tuned, "_oaiproxy_quiet_dispatch", False):
        return True
    tuned.doIteration = tuned.doPoll = partial(_do_poll, reactor)
    tuned._oaiproxy_quiet_dispatch = True
    return True


def _do_poll(reactor: Any, timeout: float | None) -> None:
    """
    Twisted 26.10.0's C{EPollReactor.doPoll}, without C{log.callWithLogger}, plain read
    events handled inline.
    """
    if timeout is None:
        timeout = -1  # wait indefinitely
    try:
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
