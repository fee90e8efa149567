"""
Log lines a client can cause at will, at most one per period: the rest are counted, and the
count goes out with the next line that is let through.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

__all__ = ["Throttle"]


class Throttle:
    """Lets one event through per C{period} seconds on C{clock}, counting the others."""

    def __init__(self, clock: IReactorTime, period: float = 10.0) -> None:
        self._clock = clock
        self._period = period
        self._last: float | None = None
        self._held = 0

    def passes(self) -> int | None:
        """
        Count one event. C{None} if it is to be held back; else the number of events it
        stands for (itself and those held back since the last one let through).
        """
        self._held += 1
        now = self._clock.seconds()
        if self._last is not None and now - self._last < self._period:
            return None
        count, self._held, self._last = self._held, 0, now
        return count
