"""Log lines a client can cause: at most one per period, with the count of those held."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.http.throttle import Throttle


class ThrottleTests(SynchronousTestCase):
    def test_one_per_period_with_the_count(self) -> None:
        """The first passes; the next ones in the period are held, then counted in."""
        clock = MemoryReactorClock()
        throttle = Throttle(clock, 10.0)
        self.assertEqual(throttle.passes(), 1)
        clock.advance(9.9)
        self.assertEqual([throttle.passes() for _ in range(3)], [None, None, None])
        clock.advance(0.1)
        self.assertEqual(throttle.passes(), 4)
        clock.advance(10)
        self.assertEqual(throttle.passes(), 1)
