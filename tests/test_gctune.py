"""The garbage collector's settings, applied by the entry points (oaiproxy.gctune)."""

from __future__ import annotations

import gc

from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.config import ConfigError, Runtime
from oaiproxy.gctune import freeze_startup, tune_collector


class TuneCollectorTests(SynchronousTestCase):
    """tune_collector and freeze_startup, with the process's collector restored after."""

    def setUp(self) -> None:
        thresholds = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *thresholds)
        self.addCleanup(gc.unfreeze)

    def test_threshold(self) -> None:
        """The young threshold is set; the older generations' thresholds are kept."""
        gc.set_threshold(700, 11, 12)
        tune_collector(MemoryReactorClock(), threshold=10_000, freeze=False)
        self.assertEqual(gc.get_threshold(), (10_000, 11, 12))

    def test_threshold_none(self) -> None:
        """C{None} leaves the interpreter's thresholds as they are."""
        gc.set_threshold(700, 11, 12)
        tune_collector(MemoryReactorClock(), threshold=None, freeze=False)
        self.assertEqual(gc.get_threshold(), (700, 11, 12))

    def test_freeze_once_running(self) -> None:
        """
        The freeze waits for the reactor to run (the services started), then happens once;
        without C{freeze}, nothing is scheduled.
        """
        reactor = MemoryReactorClock()
        tune_collector(reactor, threshold=None, freeze=False)
        self.assertEqual(reactor.whenRunningHooks, [])
        tune_collector(reactor, threshold=None, freeze=True)
        self.assertEqual(gc.get_freeze_count(), 0)
        [(hook, args, kwargs)] = reactor.whenRunningHooks
        hook(*args, **kwargs)
        self.assertGreater(gc.get_freeze_count(), 0)

    def test_freeze_startup(self) -> None:
        """
        What start-up left in reference cycles is collected first, not frozen for ever;
        what is alive is frozen, and the count is logged.
        """
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]  # annotated for unittest.TestCase; trial cases work

        class Node:
            other: object = None

        alive, garbage = Node(), Node()
        alive.other = alive
        garbage.other = garbage
        del garbage
        frozen = freeze_startup()
        self.assertEqual(frozen, gc.get_freeze_count())
        self.assertNotIn(alive, gc.get_objects())  # out of the collector's sight
        self.assertEqual(sum(isinstance(o, Node) for o in gc.get_objects()), 0)
        gc.unfreeze()
        self.assertEqual([o for o in gc.get_objects() if isinstance(o, Node)], [alive])
        self.assertIn(f"{frozen} objects of start-up frozen", formatEvent(observer[-1]))

    def test_runtime_validated(self) -> None:
        """A threshold under 100 (0 would turn the collector off) is a ConfigError."""
        for bad in (0, 99, -1):
            with self.assertRaises(ConfigError):
                Runtime(gc_threshold=bad)
        self.assertEqual(Runtime(gc_threshold=100).gc_threshold, 100)
