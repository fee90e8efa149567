"""
A pool: the upstreams of one route and the balancer that picks among them.
"""

from __future__ import annotations

from collections.abc import Callable, Container
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
    """
    The upstreams of one route, balanced by smooth weighted round robin; an upstream that
    asked for time (C{Retry-After} on a 429 or 503) is left out until then.
    """

    def __init__(self, config: PoolConfig, upstreams: list[Upstream]) -> None:
        self.name = config.name
        self.upstreams = upstreams
        self._balancer = SmoothWeightedRoundRobin([(u, u.config.weight) for u in upstreams])
        # Upstream name -> the time (clock seconds) until which it is not picked.
        self._cooling: dict[str, float] = {}

    def pick(self, exclude: Container[str] = (), now: float = 0.0) -> Upstream | None:
        """
        The next upstream whose name is not in C{exclude} and that is not cooling down at
        C{now}, or C{None}.
        """
        return self._balancer.pick(self._usable(exclude, now))

    def any_left(self, exclude: Container[str] = (), now: float = 0.0) -> bool:
        """Whether L{pick} would find an upstream (without moving the balancer)."""
        return any(map(self._usable(exclude, now), self.upstreams))

    def _usable(self, exclude: Container[str], now: float) -> Callable[[Upstream], bool]:
        """
        Whether an upstream may be picked: not excluded, not cooling down at C{now} (the
        cool-downs over by then are forgotten here).
        """
        cooling = self._cooling
        for name in [n for n, until in cooling.items() if until <= now]:
            del cooling[name]
        return lambda u: u.name not in exclude and u.name not in cooling

    def cool_down(self, name: str, until: float) -> None:
        """Leave upstream C{name} out of picks until C{until} (clock seconds)."""
        self._cooling[name] = max(until, self._cooling.get(name, until))

    def cooling_left(self, now: float) -> float | None:
        """Seconds until the first cooling upstream is back, or C{None} if none cools."""
        left = [until - now for until in self._cooling.values() if until > now]
        return min(left) if left else None
