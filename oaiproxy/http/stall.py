"""
The send deadline's clock: watching a number that moves only while a client reads (bytes
waiting for it), and acting when it has not moved for the whole deadline.

Used by the relay while a client holds it paused, and by the HTTP/2 connection for a finished
response still queued for its client.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["StallWatch"]


class StallWatch:
    """
    Calls C{on_stall} once C{measure()} has not changed for C{timeout} seconds. It checks
    every quarter of the timeout, so the call comes 1 to 1.25 times the timeout after the last
    change. A C{measure()} of C{None} (unknown) counts as no change.
    """

    def __init__(
        self,
        clock: IReactorTime,
        timeout: float,
        measure: Callable[[], int | None],
        on_stall: Callable[[], None],
    ) -> None:
        self._clock = clock
        self._timeout = timeout
        self._measure = measure
        self._on_stall = on_stall
        self._seen = measure()
        self._progress_at = clock.seconds()
        self._call: IDelayedCall | None = clock.callLater(timeout / 4, self._check)

    def cancel(self) -> None:
        """Stop watching."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _check(self) -> None:
        self._call = None
        now = self._clock.seconds()
        value = self._measure()
        if value is not None and value != self._seen:
            self._seen = value
            self._progress_at = now
        remaining = self._progress_at + self._timeout - now
        if remaining > 0:
            self._call = self._clock.callLater(min(self._timeout / 4, remaining), self._check)
            return
        self._on_stall()
