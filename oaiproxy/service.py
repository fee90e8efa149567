"""
build_service(config, reactor): the listeners, the upstream pool and its agents, the demo's
mock upstreams, all as one Twisted service. Shared by C{proxy.tac} and the twistd plugin.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from typing_extensions import override

from oaiproxy.balancing.pool import Pool, Upstream
from oaiproxy.config import ConfigError, PoolConfig, ProxyConfig, UpstreamConfig
from oaiproxy.http.forwarder import Forwarder, build_agents
from oaiproxy.http.h2fix import ProxySite
from oaiproxy.http.resource import ProxyResource, request_factory
from oaiproxy.listening import Endpoint, Listeners
from oaiproxy.tls import listener_endpoint

__all__ = ["build_service", "build_site"]

log = Logger()

DEMO_BANNER = """
==========================================================================
  oaiproxy DEMO MODE: the upstreams are built-in MOCK servers.
  Every answer is FAKE (model "mock-gpt"). No key needed, no network used.
  Mock upstreams: {mocks}
==========================================================================
"""


class _PortsService(Service):
    """Closes listening ports opened at build time (the demo's mock upstreams) on stop."""

    def __init__(self, ports: list[IListeningPort]) -> None:
        self._ports = ports

    @override
    def stopService(self) -> Any:
        super().stopService()  # type: ignore[no-untyped-call]
        for port in self._ports:
            port.stopListening()


class _CloseOnStop(Service):
    """Closes the proxy's idle upstream connections when the service stops."""

    def __init__(self, resource: ProxyResource) -> None:
        self._resource = resource

    @override
    def stopService(self) -> Any:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted is unannotated
        return self._resource.close()


class _BannerService(Service):
    """Logs a message when the service starts (after twistd has set up logging)."""

    def __init__(self, lines: list[str]) -> None:
        self._lines = lines

    @override
    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        for line in self._lines:
            log.warn("{line}", line=line)


def resolve_keys(pool: PoolConfig, environ: Mapping[str, str]) -> list[Upstream]:
    """
    The pool's upstreams with their API keys read from C{environ}.

    @raise ConfigError: if a named variable is unset or empty (say which, never the value).
    """
    upstreams = []
    for config in pool.upstreams:
        key: bytes | None = None
        if config.key_env is not None:
            value = environ.get(config.key_env)
            if not value:
                state = "is not set" if value is None else "is empty"
                raise ConfigError(
                    f"upstream {config.name}: environment variable {config.key_env} {state}"
                )
            key = value.encode("latin-1")
        upstreams.append(Upstream(config, key))
    return upstreams


def build_site(
    config: ProxyConfig,
    reactor: Any,
    pool_config: PoolConfig,
    environ: Mapping[str, str],
) -> ProxySite:
    """The proxy's HTTP site for one pool: resource, forwarder, agents, HTTP/2 fixes."""
    upstreams = resolve_keys(pool_config, environ)
    agents, pool = build_agents(
        reactor,
        upstreams,
        connect_timeout=config.deadlines.connect,
        idle_connections=config.limits.upstream_connections,
        keepalive=config.limits.upstream_keepalive,
    )
    resource = ProxyResource(
        pool=Pool(pool_config, upstreams),
        forwarder=Forwarder(agents, pool),
        clock=reactor,
        deadlines=config.deadlines,
        limits=config.limits,
    )
    return ProxySite(
        resource,
        reactor,
        stream_high_water=config.limits.stream_high_water,
        idle_timeout=config.limits.client_idle_timeout,
        max_headers=config.limits.max_headers,
        max_header_bytes=config.limits.max_header_bytes,
        header_timeout=config.limits.header_timeout,
        max_connections=config.limits.max_connections,
        send_timeout=config.deadlines.send,
        requestFactory=request_factory(config.limits.max_body_bytes),
    )


def _start_demo_mocks(reactor: Any) -> tuple[PoolConfig, list[IListeningPort]]:
    """Two mock upstreams on loopback ports chosen by the OS, weights 1 and 3."""
    # Imported here: only the demo needs the mock, and `python -m oaiproxy.mock` must not
    # find it already imported through the package.
    from oaiproxy.mock import MockConfig, build_mock_site  # noqa: PLC0415

    ports: list[IListeningPort] = []
    upstreams = []
    for name, weight in (("mock-a", 1), ("mock-b", 3)):
        site = build_mock_site(MockConfig(name=name, delay=0.05), reactor)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        ports.append(port)
        address = port.getHost()
        upstreams.append(
            UpstreamConfig(url=f"http://127.0.0.1:{address.port}/v1", weight=weight, name=name)
        )
    return PoolConfig(upstreams=tuple(upstreams)), ports


def build_service(
    config: ProxyConfig, reactor: Any, environ: Mapping[str, str] | None = None
) -> IService:
    """
    The whole proxy as one service: start it (twistd does) and it listens.

    @param reactor: the reactor to run on (IReactorTCP, IReactorSSL, IReactorTime, name
        resolution); only the entry points pass the global one.
    @param environ: where upstream keys (C{key_env}) are read; C{os.environ} by default.
    @raise ConfigError: for anything wrong in C{config} that only shows at build time
        (missing key variable, unreadable certificate).
    """
    environ = os.environ if environ is None else environ
    top = MultiService()
    banner: list[str] = []
    if config.demo:
        pool_config, ports = _start_demo_mocks(reactor)
        _PortsService(ports).setServiceParent(top)  # type: ignore[no-untyped-call]
        config = replace(config, pools=(pool_config,))
        mocks = ", ".join(u.url for u in pool_config.upstreams)
        banner.extend(DEMO_BANNER.format(mocks=mocks).strip("\n").splitlines())
    site = build_site(config, reactor, config.pools[0], environ)
    _CloseOnStop(site.resource).setServiceParent(top)  # type: ignore[no-untyped-call]
    endpoints = []
    for listener in config.listeners:
        endpoint, cert_path = listener_endpoint(reactor, listener, config.state_dir)
        what = "https (h2, http/1.1)" if listener.kind == "tls" else "http (http/1.1)"
        interface = listener.interface or "0.0.0.0"
        if ":" in interface:
            interface = f"[{interface}]"
        where = f"{interface}:{listener.port}"
        # No TLS, so no ALPN: HTTP/1.1 only, served without the switch to HTTP/2.
        factory = site.plain_factory() if listener.kind == "tcp" else None
        endpoints.append(Endpoint(endpoint, where, what, factory))
        if cert_path is not None:
            banner.append(
                f"self-signed certificate for localhost: {cert_path} "
                f"(trust it with: curl --cacert {cert_path})"
            )
    for upstream in config.pools[0].upstreams:
        banner.append(f"upstream {upstream.name}: {upstream.url} weight={upstream.weight}")
    _BannerService(banner).setServiceParent(top)  # type: ignore[no-untyped-call]
    Listeners("oaiproxy", site, endpoints).setServiceParent(top)  # type: ignore[no-untyped-call]
    return top
