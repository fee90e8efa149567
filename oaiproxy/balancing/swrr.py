"""
Smooth weighted round robin, the algorithm of nginx's upstream module.

Deterministic and interleaved: with weights 5, 1, 1 the order is a a b a c a a, never a burst
of five. Pure: no clock, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class SmoothWeightedRoundRobin(Generic[T]):
    """
    Picks among weighted peers, skipping those a predicate rejects.

    Each pick adds every eligible peer's weight to its current score, chooses the highest score
    (first on ties), and subtracts the total eligible weight from the winner.
    """

    def __init__(self, peers: Sequence[tuple[T, int]]) -> None:
        if not peers:
            raise ValueError("at least one peer is needed")
        for _, weight in peers:
            if weight < 1:
                raise ValueError(f"weights must be positive, not {weight}")
        self._peers = [peer for peer, _ in peers]
        self._weights = [weight for _, weight in peers]
        self._current = [0] * len(peers)

    @property
    def peers(self) -> list[T]:
        """The peers, in configuration order."""
        return list(self._peers)

    def pick(self, eligible: Callable[[T], bool] = lambda _: True) -> T | None:
        """
        The next peer among those for which C{eligible} is true, or C{None} if there is none.
        """
        best = -1
        total = 0
        for i, peer in enumerate(self._peers):
            if not eligible(peer):
                continue
            self._current[i] += self._weights[i]
            total += self._weights[i]
            if best < 0 or self._current[i] > self._current[best]:
                best = i
        if best < 0:
            return None
        self._current[best] -= total
        return self._peers[best]
