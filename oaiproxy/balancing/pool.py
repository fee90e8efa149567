"""
A pool: the upstreams of one route and the balancer that picks among them.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass, field

from oaiproxy.balancing.swrr import SmoothWeightedRoundRobin
from oaiproxy.config import PoolConfig, UpstreamConfig


@dataclass(frozen=True)
class Upstream:
    """
    A configured upstream, ready to use: its config and its resolved API key.

    @ivar api_key: the key sent as C{Authorization: Bearer ...}, or C{None} to pass the
        client's through. Never logged (excluded from C{repr}).
    """

    config: UpstreamConfig
    api_key: bytes | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        """The upstream's label."""
        return self.config.name


class Pool:
    """The upstreams of one route, balanced by smooth weighted round robin."""

    def __init__(self, config: PoolConfig, upstreams: list[Upstream]) -> None:
        self.name = config.name
        self.upstreams = upstreams
        self._balancer = SmoothWeightedRoundRobin([(u, u.config.weight) for u in upstreams])

    def pick(self, exclude: Container[str] = ()) -> Upstream | None:
        """The next upstream whose name is not in C{exclude}, or C{None}."""
        return self._balancer.pick(lambda u: u.name not in exclude)
