"""
The upstream HTTP/1.1 client: one Agent per upstream over a shared persistent connection pool,
plain or TLS with verified certificates, with a connect deadline; and the mapping of client
failures onto the proxy's error tree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from twisted.internet import error as ierror
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.python.failure import Failure
from twisted.web._newclient import (
    HTTP11ClientProtocol,
    HTTPClientParser,
    ParseError,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
    _ensureValidMethod,
)
from twisted.web._newclient import Request as ClientRequest
from twisted.web.client import URI, Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from typing_extensions import override
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
from oaiproxy.http.chunked import ChunkedDecoder
from oaiproxy.http.headers import connection_named, is_valid_name, upstream_request_headers
from oaiproxy.http.nodelay import set_no_delay
from oaiproxy.http.responsehead import parse_head
from oaiproxy.http.sendnow import sender
from oaiproxy.tls import openssl_reasons, upstream_tls_options

__all__ = ["BytesProducer", "DeadlineEndpoint", "Forwarder", "build_agents", "map_failure"]


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


@implementer(IAgentEndpointFactory)
class _UpstreamEndpointFactory:
    """Endpoints for one upstream: TCP (and TLS with hostname verification), under a deadline."""

    def __init__(self, reactor: Any, upstream: Upstream, connect_timeout: float | None) -> None:
        self._reactor = reactor
        self._config = upstream.config
        self._timeout = connect_timeout
        self._tls = (
            upstream_tls_options(self._config.host, self._config.ca_bundle)
            if self._config.is_tls
            else None
        )

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        config = self._config
        endpoint: IStreamClientEndpoint
        # An address needs no name resolution: Twisted's resolver would still send it through
        # getaddrinfo on its thread pool, a thread hop (and a queue) per new connection.
        if isIPAddress(config.host):
            endpoint = TCP4ClientEndpoint(self._reactor, config.host, config.port)
        elif isIPv6Address(config.host):
            endpoint = TCP6ClientEndpoint(self._reactor, config.host, config.port)
        else:
            endpoint = HostnameEndpoint(self._reactor, config.host, config.port)
        if self._tls is not None:
            endpoint = wrapClientTLS(self._tls, endpoint)
        if self._timeout is not None:
            endpoint = DeadlineEndpoint(endpoint, self._timeout, self._reactor)
        return endpoint


class _ProxyClientProtocol(HTTP11ClientProtocol):
    """
    Twisted's upstream HTTP/1.1 client protocol, with L{ChunkedDecoder} for chunked bodies and
    response heads read at once (L{parse_head}).
    """

    @override
    def dataReceived(self, data: bytes) -> None:
        # Twisted 26.10.0's, with parse_head in front of the parser's line-by-line path.
        try:
            parser: Any = self._parser
            if not parse_head(parser, data):
                parser.dataReceived(data)
        except BaseException:
            self._giveUp(Failure())  # type: ignore[no-untyped-call]

    _send_now: Callable[[], None] | None = None

    @override
    def connectionMade(self) -> None:
        set_no_delay(self.transport)
        self._send_now = sender(self.transport)
        super().connectionMade()

    @override
    def request(self, request: Any) -> Deferred[IResponse]:
        d: Deferred[IResponse] = super().request(request)
        # Written whole already (a body in memory): the upstream can start on it now.
        if self._send_now is not None:
            self._send_now()
        parser = getattr(self, "_parser", None)
        if type(parser) is HTTPClientParser:
            # Twisted builds its parser inside request(); it has read nothing yet (the
            # response can only arrive after this call returns), and the subclass adds no
            # state, so it can take over from here.
            parser.__class__ = _ProxyClientParser
        return d


class _UpstreamRequest(ClientRequest):
    """
    Twisted's client request, writing a body already in memory (L{BytesProducer}) with its
    head at once, in the same send. Twisted's general path registers the producer with the
    transport and joins three Deferreds through a length-enforcing consumer, about 7% of the
    proxy's CPU per request, for a body that is written in one call anyway.
    """

    @override
    def writeTo(self, transport: Any) -> Deferred[None]:
        producer = self.bodyProducer
        if type(producer) is not BytesProducer:
            d: Deferred[None] = super().writeTo(transport)  # type: ignore[no-untyped-call]
            return d
        body = producer.take()
        self._writeHeaders(transport, b"Content-Length: %d\r\n" % len(body))  # type: ignore[no-untyped-call]
        transport.write(body)
        return succeed(None)


class _ProxyClientParser(HTTPClientParser):
    """
    Twisted's response parser, stricter on what it relays and with L{ChunkedDecoder}.

    Written against Twisted 26.10.0: C{_transferDecoders} is private; C{connHeaders} holds
    the connection control headers (C{Connection} among them) apart from the response's.
    """

    # ChunkedDecoder does the job of Twisted's _ChunkedTransferDecoder, without being one.
    _transferDecoders = {b"chunked": ChunkedDecoder}  # type: ignore[dict-item]  # noqa: RUF012

    @override
    def statusReceived(self, status: bytes) -> None:
        """A status code is three digits, 100 to 599 (RFC 9110 15); else it is no HTTP (502)."""
        parts = status.split(b" ", 2)
        code = parts[1] if len(parts) >= 2 else b""
        if len(code) != 3 or not code.isdigit() or not b"100" <= code <= b"599":
            raise ParseError("invalid status code", status)
        super().statusReceived(status)  # type: ignore[no-untyped-call]

    @override
    def allHeadersReceived(self) -> None:
        """Twisted's, once the headers the upstream's C{Connection} names are dropped."""
        if self.connHeaders.hasHeader(b"connection"):
            for name in connection_named(self.connHeaders):
                if is_valid_name(name):  # a name that is no token names no header
                    self.headers.removeHeader(name)
        super().allHeadersReceived()  # type: ignore[no-untyped-call]


class _QuietClientFactory(_HTTP11ClientFactory):
    """
    Twisted's per-connection client factory, without a log line per upstream connection, and
    building L{_ProxyClientProtocol}.
    """

    noisy = False

    @override
    def buildProtocol(self, addr: Any) -> HTTP11ClientProtocol:
        return _ProxyClientProtocol(self._quiescentCallback)  # type: ignore[no-untyped-call]  # Twisted's __init__


class _ProxyConnectionPool(HTTPConnectionPool):
    """The upstream connection pool: quiet connection factories."""

    _factory = _QuietClientFactory


# Printable ASCII but space, "#" and ";": request targets taken as they are, unparsed.
_PLAIN_TARGET = bytes(c for c in range(0x21, 0x7F) if c not in b"#;")


class _UpstreamAgent(Agent):
    """
    An L{Agent} for one upstream, whose URLs all start with the same origin: it builds their
    L{URI} from the known scheme, host and port instead of parsing each one (C{urlparse} and
    C{urlunparse} were about 8% of the proxy's CPU per request), and reuses one endpoint.
    Any other URL goes through L{Agent.request} unchanged.
    """

    _origin = b""
    _scheme = b"http"
    _host = b""
    _port = 0
    _endpoint: IStreamClientEndpoint | None = None

    def set_upstream(self, config: UpstreamConfig) -> None:
        """Take the upstream's origin (as L{Forwarder.send} writes it) and address."""
        self._scheme = b"https" if config.is_tls else b"http"
        self._origin = b"%s://%s" % (self._scheme, config.host_header)
        self._host = config.host.encode("idna")
        self._port = config.port

    @override
    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        origin = self._origin
        target = uri[len(origin) :]
        if (
            not origin
            or not uri.startswith(origin)
            or target[:1] != b"/"
            # Twisted normalises fragments and path parameters (urlparse/urlunparse), and
            # rejects anything but printable ASCII: leave those URLs to it.
            or target.translate(None, _PLAIN_TARGET)
        ):
            d: Deferred[IResponse] = super().request(method, uri, headers, bodyProducer)
            return d
        path, _, query = target.partition(b"?")
        netloc = origin[len(self._scheme) + 3 :]
        parsed = URI(self._scheme, netloc, self._host, self._port, path, b"", query, b"")
        if self._endpoint is None:
            self._endpoint = self._getEndpoint(parsed)  # type: ignore[no-untyped-call]
        key = (self._scheme, self._host, self._port)
        return self._requestWithEndpoint(
            key, self._endpoint, method, parsed, headers, bodyProducer, target
        )

    @override
    def _requestWithEndpoint(
        self,
        key: tuple[bytes, bytes, int],
        endpoint: IStreamClientEndpoint,
        method: bytes,
        parsedURI: URI,
        headers: Headers | None,
        bodyProducer: IBodyProducer | None,
        requestPath: bytes,
    ) -> Deferred[IResponse]:
        # Twisted 26.10.0's Agent._requestWithEndpoint (private), building an _UpstreamRequest.
        method = _ensureValidMethod(method)
        if headers is None:
            headers = Headers()
        if not headers.hasHeader(b"host"):
            headers = headers.copy()
            headers.addRawHeader(
                b"host",
                self._computeHostValue(parsedURI.scheme, parsedURI.host, parsedURI.port),  # type: ignore[no-untyped-call]
            )
        persistent = self._pool.persistent

        def connected(protocol: HTTP11ClientProtocol) -> Deferred[IResponse]:
            request = _UpstreamRequest._construct(  # type: ignore[no-untyped-call]
                method, requestPath, headers, bodyProducer, persistent, parsedURI
            )
            return protocol.request(request)

        d: Deferred[IResponse] = self._pool.getConnection(key, endpoint).addCallback(connected)
        return d


def build_agents(
    reactor: Any,
    upstreams: list[Upstream],
    *,
    connect_timeout: float | None,
    idle_connections: int,
    keepalive: float,
) -> tuple[dict[str, IAgent], HTTPConnectionPool]:
    """
    One L{Agent} per upstream, sharing one persistent L{HTTPConnectionPool} (returned too,
    so that its idle connections can be closed on shutdown).

    @param reactor: provides IReactorTCP, IReactorTime and name resolution.
    @param idle_connections: idle connections kept per upstream (busy ones are not capped).
    @param keepalive: seconds an idle pooled connection is kept; keep it below the upstream's
        own keep-alive timeout (uvicorn's default is 5 s) to avoid racing its close.
    """
    pool = _ProxyConnectionPool(reactor, persistent=True)  # type: ignore[no-untyped-call]  # Twisted's __init__
    pool.maxPersistentPerHost = idle_connections
    pool.cachedConnectionTimeout = keepalive  # type: ignore[assignment]  # Twisted annotates int; it is a callLater delay
    agents: dict[str, IAgent] = {}
    for u in upstreams:
        agent = _UpstreamAgent.usingEndpointFactory(  # type: ignore[no-untyped-call]
            reactor, _UpstreamEndpointFactory(reactor, u, connect_timeout), pool
        )
        agent.set_upstream(u.config)
        agents[u.name] = agent
    return agents, pool


def _tls_failure(exc: BaseException) -> str | None:
    """Why a TLS handshake with an upstream failed, if C{exc} is such a failure."""
    if isinstance(exc, VerificationError | CertificateError):
        return "the certificate does not name the upstream's host"
    if isinstance(exc, SSL.Error):
        details = openssl_reasons(exc)
        if any("certificate verify failed" in d for d in details):
            return "the certificate could not be verified (an unknown CA? see ca= in the docs)"
        return ", ".join(details) or "TLS error"
    return None


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
    if isinstance(exc, ConnectDeadlineExpired):
        return UpstreamConnectTimeout(f"upstream connection timed out: {exc}")
    if isinstance(exc, ierror.ConnectError):
        return UpstreamConnectFailed(f"upstream connection failed: {exc.__class__.__name__}")
    if isinstance(exc, ResponseFailed | RequestTransmissionFailed):
        reasons = getattr(exc, "reasons", [])
        for reason in reasons:
            if isinstance(reason.value, ParseError):
                return UpstreamProtocolError("upstream sent an invalid response")
            why = _tls_failure(reason.value)
            if why is not None:
                return UpstreamConnectFailed(f"upstream TLS handshake failed: {why}")
        if isinstance(exc, ResponseNeverReceived | RequestTransmissionFailed):
            return UpstreamConnectFailed("upstream closed the connection before answering")
        return UpstreamProtocolError("upstream response failed")
    return UpstreamError(f"upstream request failed: {exc.__class__.__name__}")


class Forwarder:
    """Sends a client's request to a chosen upstream."""

    def __init__(
        self, agents: Mapping[str, IAgent], pool: HTTPConnectionPool | None = None
    ) -> None:
        self._agents = agents
        self._pool = pool

    def close(self) -> Deferred[None]:
        """Close the idle upstream connections (on shutdown); fires when they are closed."""
        if self._pool is None:
            return succeed(None)
        d: Deferred[None] = self._pool.closeCachedConnections()
        return d

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
