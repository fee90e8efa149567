"""Upstream selection: balancing algorithms, one file each."""

from oaiproxy.balancing.swrr import SmoothWeightedRoundRobin

__all__ = ["SmoothWeightedRoundRobin"]
