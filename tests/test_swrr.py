"""Smooth weighted round robin: the pure balancing core."""

from __future__ import annotations

from collections import Counter

from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.balancing.swrr import SmoothWeightedRoundRobin


class SmoothWeightedRoundRobinTests(SynchronousTestCase):
    """Picks follow nginx's algorithm."""

    def test_nginx_sequence(self) -> None:
        """Weights 5,1,1 give nginx's documented order a a b a c a a."""
        b = SmoothWeightedRoundRobin([("a", 5), ("b", 1), ("c", 1)])
        self.assertEqual("".join(b.pick() or "" for _ in range(7)), "aabacaa")

    def test_shares_exact_per_cycle(self) -> None:
        """Over a cycle of total weight, each peer is picked exactly its weight."""
        b = SmoothWeightedRoundRobin([("a", 1), ("b", 3)])
        self.assertEqual(Counter(b.pick() for _ in range(40)), {"a": 10, "b": 30})

    def test_interleaved_no_burst(self) -> None:
        """Weights 1 and 3 never give the light peer twice in a row."""
        b = SmoothWeightedRoundRobin([("a", 1), ("b", 3)])
        seq = "".join(b.pick() or "" for _ in range(16))
        self.assertNotIn("aa", seq)
        self.assertNotIn("bbbb", seq)

    def test_skips_ineligible(self) -> None:
        """A rejected peer is never picked; the others share the load."""
        b = SmoothWeightedRoundRobin([("a", 1), ("b", 1), ("c", 1)])
        picks = {b.pick(lambda p: p != "b") for _ in range(10)}
        self.assertEqual(picks, {"a", "c"})

    def test_none_eligible(self) -> None:
        """No eligible peer gives None."""
        b = SmoothWeightedRoundRobin([("a", 1)])
        self.assertIsNone(b.pick(lambda p: False))

    def test_rejects_bad_weights(self) -> None:
        """Empty peer lists and non-positive weights are errors."""
        self.assertRaises(ValueError, SmoothWeightedRoundRobin, [])
        self.assertRaises(ValueError, SmoothWeightedRoundRobin, [("a", 0)])
