"""oaiproxy: a reverse proxy and gateway for the OpenAI API, on Twisted."""

from twisted.web import http as _http

if not _http.H2_ENABLED:
    # Twisted's HTTP/2 needs h2 and priority; the proxy's HTTP/2 code imports them as it loads,
    # so say what is missing here rather than with a traceback from deep inside.
    raise ImportError(
        "oaiproxy needs HTTP/2 support: install twisted[http2] (the h2 and priority packages)"
    )

from oaiproxy.config import (
    ConfigError,
    Deadlines,
    Limits,
    ListenerConfig,
    PoolConfig,
    ProxyConfig,
    Runtime,
    UpstreamConfig,
)
from oaiproxy.gctune import tune_collector
from oaiproxy.reactortune import install_quiet_dispatch
from oaiproxy.service import build_service

__all__ = [
    "ConfigError",
    "Deadlines",
    "Limits",
    "ListenerConfig",
    "PoolConfig",
    "ProxyConfig",
    "Runtime",
    "UpstreamConfig",
    "build_service",
    "install_quiet_dispatch",
    "tune_collector",
]
