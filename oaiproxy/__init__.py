"""oaiproxy: a reverse proxy and gateway for the OpenAI API, on Twisted."""

from oaiproxy.config import (
    ConfigError,
    Deadlines,
    Limits,
    ListenerConfig,
    PoolConfig,
    ProxyConfig,
    UpstreamConfig,
)
from oaiproxy.service import build_service

__all__ = [
    "ConfigError",
    "Deadlines",
    "Limits",
    "ListenerConfig",
    "PoolConfig",
    "ProxyConfig",
    "UpstreamConfig",
    "build_service",
]
