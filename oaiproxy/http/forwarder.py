"""
Sending a client's request upstream: one L{UpstreamClient} per upstream (plain or TLS with
verified certificates, with a connect deadline), and the mapping of upstream failures onto
the proxy's error tree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from twisted.internet import error as ierror
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.python.failure import Failure
from twisted.web._newclient import (
    ParseError,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from oaiproxy.balancing.pool import Upstream
from oaiproxy.config import UpstreamConfig
from oaiproxy.context import RequestContext
from oaiproxy.errors import (
    ProxyError,
    UpstreamConnectFailed,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamProtocolError,
)
from oaiproxy.http.client import UpstreamClient, tls_failure
from oaiproxy.http.eagerconnect import EagerTCPEndpoint
from oaiproxy.http.headers import upstream_request_headers
from oaiproxy.tls import upstream_tls_options

__all__ = [
    "BytesProducer",
    "Closeable",
    "DeadlineEndpoint",
    "Forwarder",
    "HandshakeEndpoint",
    "build_agents",
    "map_failure",
]


class Closeable(Protocol):
    """What holds upstream connections open: closes the idle ones (on shutdown)."""

    def close(self) -> Deferred[None]:
        """Fires once they are closed."""
        ...


@implementer(IBodyProducer)
class BytesProducer:
    """A request body already in memory, with a known length (so it goes as Content-Length)."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.take())
        return succeed(None)

    def take(self) -> bytes:
        """The body, handed over once: no copy of it is kept here."""
        body, self._body = self._body, b""
        return body

    def pauseProducing(self) -> None:
        """Nothing to pause: the body is written at once."""

    def resumeProducing(self) -> None:
        """Nothing to resume."""

    def stopProducing(self) -> None:
        """Nothing to stop."""


class ConnectDeadlineExpired(Exception):
    """The connect deadline expired before the connection was made."""


@implementer(IStreamClientEndpoint)
class DeadlineEndpoint:
    """
    Wraps an endpoint so that C{connect} fails with L{ConnectDeadlineExpired} (and the attempt
    is cancelled) if it has not succeeded within C{timeout} seconds on C{clock}.
    """

    def __init__(self, wrapped: IStreamClientEndpoint, timeout: float, clock: IReactorTime):
        self._wrapped = wrapped
        self._timeout = timeout
        self._clock = clock

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        d: Deferred[IProtocol] = self._wrapped.connect(protocolFactory)

        def expired(_: Any, timeout: float) -> Any:
            raise ConnectDeadlineExpired(f"no connection after {timeout:g}s")

        return d.addTimeout(self._timeout, self._clock, onTimeoutCancel=expired)


class _HandshakeAware(Protocol):
    def when_handshaken(self) -> Deferred[Any]: ...


def _handshaken(protocol: _HandshakeAware) -> Deferred[Any]:
    return protocol.when_handshaken()


@implementer(IStreamClientEndpoint)
class HandshakeEndpoint:
    """
    Wraps a TLS endpoint (C{wrapClientTLS}) so that C{connect} fires once the TLS handshake
    is done, not once TCP is connected, as Twisted's does: a L{DeadlineEndpoint} around it
    then covers the handshake too, and an upstream that takes the connection but stalls the
    handshake fails over as one that does not answer the connect. The protocol built must
    have C{when_handshaken()} (the upstream client's connections do).
    """

    def __init__(self, wrapped: IStreamClientEndpoint) -> None:
        self._wrapped = wrapped

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        d: Deferred[Any] = self._wrapped.connect(protocolFactory)
        return d.addCallback(_handshaken)


def _endpoint(
    reactor: Any,
    config: UpstreamConfig,
    connect_timeout: float | None,
    clock: IReactorTime | None = None,
) -> IStreamClientEndpoint:
    """
    Where one upstream's connections are made: TCP, TLS with verification, a deadline (on
    C{clock}, the reactor unless given) that covers the TLS handshake.
    """
    endpoint: IStreamClientEndpoint
    # An address needs no name resolution: Twisted's resolver would still send it through
    # getaddrinfo on its thread pool, a thread hop (and a queue) per new connection. Its
    # connections are made at once where the kernel allows (see eagerconnect).
    if isIPAddress(config.host) or isIPv6Address(config.host):
        endpoint = EagerTCPEndpoint(reactor, config.host, config.port)
    else:
        endpoint = HostnameEndpoint(reactor, config.host, config.port)
    if config.is_tls:
        endpoint = wrapClientTLS(upstream_tls_options(config.host, config.ca_bundle), endpoint)
        endpoint = HandshakeEndpoint(endpoint)
    if connect_timeout is not None:
        endpoint = DeadlineEndpoint(endpoint, connect_timeout, clock or reactor)
    return endpoint


class _Clients:
    """The upstreams' clients, closed together on shutdown."""

    def __init__(self, clients: list[UpstreamClient]) -> None:
        self._clients = clients

    def close(self) -> Deferred[None]:
        done: Deferred[Any] = DeferredList([c.close() for c in self._clients])
        return done.addCallback(lambda _: None)


def build_agents(
    reactor: Any,
    upstreams: list[Upstream],
    *,
    connect_timeout: float | None,
    idle_connections: int,
    keepalive: float,
) -> tuple[dict[str, IAgent], Closeable]:
    """
    One L{UpstreamClient} per upstream, each with its own pool of persistent connections,
    and what closes their idle connections on shutdown.

    @param reactor: provides IReactorTCP, IReactorTime and name resolution.
    @param idle_connections: idle connections kept per upstream (busy ones are not capped).
    @param keepalive: seconds an idle pooled connection is kept; keep it below the upstream's
        own keep-alive timeout (uvicorn's default is 5 s) to avoid racing its close.
    """
    clients: dict[str, UpstreamClient] = {}
    for u in upstreams:
        config = u.config
        scheme = b"https" if config.is_tls else b"http"
        clients[u.name] = UpstreamClient(
            reactor,
            b"%s://%s" % (scheme, config.host_header),
            _endpoint(reactor, config, connect_timeout),
            idle_connections=idle_connections,
            keepalive=keepalive,
        )
    return dict(clients), _Clients(list(clients.values()))


def map_failure(failure: Failure) -> ProxyError:
    """
    The proxy error for a failure of an upstream request before its response headers.

    Connection failures and responses never received (typically a pooled connection the
    upstream had closed) are retryable on another upstream; malformed responses are protocol
    errors, also retryable since nothing was sent to the client yet.
    """
    exc = failure.value
    if isinstance(exc, ProxyError):
        return exc
    why = tls_failure(exc) if exc is not None else None
    if why is not None:
        return UpstreamConnectFailed(f"upstream TLS handshake failed: {why}")
    if isinstance(exc, ConnectDeadlineExpired):
        return UpstreamConnectTimeout(f"upstream connection timed out: {exc}")
    if isinstance(exc, ierror.DNSLookupError):
        # Not a ConnectError in Twisted's tree, but as much the upstream's side (BAD-INPUTS:
        # a DNS failure tries the next upstream).
        return UpstreamConnectFailed(f"upstream name could not be resolved: {exc}")
    if isinstance(exc, ierror.ConnectError):
        return UpstreamConnectFailed(f"upstream connection failed: {exc.__class__.__name__}")
    if isinstance(exc, ResponseFailed | RequestTransmissionFailed):
        reasons = getattr(exc, "reasons", [])
        for reason in reasons:
            if isinstance(reason.value, ParseError):
                return UpstreamProtocolError("upstream sent an invalid response")
            why = tls_failure(reason.value)
            if why is not None:
                return UpstreamConnectFailed(f"upstream TLS handshake failed: {why}")
        if isinstance(exc, ResponseNeverReceived | RequestTransmissionFailed):
            return UpstreamConnectFailed("upstream closed the connection before answering")
        return UpstreamProtocolError("upstream response failed")
    return UpstreamError(f"upstream request failed: {exc.__class__.__name__}")


class Forwarder:
    """Sends a client's request to a chosen upstream."""

    def __init__(self, agents: Mapping[str, IAgent], pool: Closeable | None = None) -> None:
        self._agents = agents
        self._pool = pool

    def close(self) -> Deferred[None]:
        """Close the idle upstream connections (on shutdown); fires when they are closed."""
        if self._pool is None:
            return succeed(None)
        return self._pool.close()

    def send(self, ctx: RequestContext, upstream: Upstream) -> Deferred[IResponse]:
        """
        Start the upstream request; the Deferred fires with the response once its headers
        arrive, and may be cancelled (which closes the upstream connection attempt).

        @raise InvalidRequest: if a client header cannot be written as HTTP/1.1.
        """
        config = upstream.config
        headers = upstream_request_headers(
            ctx.headers,
            host=config.host_header,
            api_key=upstream.api_key,
            client_ip=ctx.client_ip,
            secure=ctx.secure,
            request_id=ctx.request_id,
            stream=ctx.stream,
        )
        scheme = b"https" if config.is_tls else b"http"
        url = b"%s://%s%s%s" % (scheme, config.host_header, config.base_path, ctx.rest)
        if ctx.query:
            url += b"?" + ctx.query
        body = BytesProducer(ctx.body) if ctx.body or ctx.method in (b"POST", b"PUT") else None
        return self._agents[upstream.name].request(ctx.method, url, headers, body)
