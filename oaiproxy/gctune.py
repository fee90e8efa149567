"""
Python's garbage collector set for a proxy's heap, by the entry points.

A request's objects (its request, exchange, relay, the upstream connection's response) are
freed by reference counting when the request ends: the proxy's own objects are left in no
reference cycle on the paths C{tests/test_cycles.py} covers. The cyclic collector then
mostly finds garbage on rarer paths (a failure with its traceback, Twisted's own objects),
yet with Python's defaults it runs often and long under load:

- A young collection every 700 net new objects. A burst of streams keeps tens of thousands of
  objects alive at once, so young collections run every few requests, and what they scan is
  alive and gets promoted; the middle generation then runs every ten of them.
- A full collection when enough has been promoted, and a full collection scans the whole
  heap, start-up included: Twisted, h2, OpenSSL's bindings, the modules (about 56,000
  objects). It stopped the proxy for 47-63 ms during bursts of 200 streams
  (C{bench/gcpauses.py}; C{bench/FINDINGS.md}, "The garbage collector").

So the entry points (C{proxy.tac} and the plugin) call L{tune_collector}: the young threshold
is raised (10,000 by default: a burst's live objects mostly die before a collection sees
them), and once the reactor runs, what start-up built is moved out of the collector's sight
(C{gc.freeze}), never to be scanned again. Both are process-wide, hence done by the entry
points only, and each can be turned off in the configuration (L{oaiproxy.config.Runtime}).
"""

from __future__ import annotations

import gc

from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger

__all__ = ["freeze_startup", "tune_collector"]

log = Logger()


def tune_collector(reactor: IReactorCore, *, threshold: int | None, freeze: bool) -> None:
    """
    Set the collector's young threshold to C{threshold} (C{None}: leave it as it is; the
    older generations' thresholds are kept), and, if C{freeze}, call L{freeze_startup} once
    C{reactor} runs (after the services started: listeners, certificates, the demo's mocks).
    """
    if threshold is not None:
        _, middle, old = gc.get_threshold()
        gc.set_threshold(threshold, middle, old)
    if freeze:
        reactor.callWhenRunning(freeze_startup)


def freeze_startup() -> int:
    """
    Collect what start-up left as garbage, then move every object the collector tracks to
    its permanent generation (C{gc.freeze}): later collections, full ones included, do not
    scan them. Returns how many objects are frozen, and logs it.
    """
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info(
        "garbage collector: {frozen} objects of start-up frozen; thresholds {thresholds}",
        frozen=frozen,
        thresholds=gc.get_threshold(),
    )
    return frozen
