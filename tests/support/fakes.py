"""
Fakes for unit tests: an upstream agent whose requests and responses the test drives by hand,
and a proxy site served in memory over a StringTransport.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import Any, NoReturn

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IProtocol,
    IPushProducer,
    IStreamClientEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import TransportProxyProducer
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from oaiproxy.balancing.pool import Pool, Upstream
from oaiproxy.config import Deadlines, Limits, PoolConfig, UpstreamConfig
from oaiproxy.http.forwarder import Forwarder
from oaiproxy.http.h2fix import ProxySite
from oaiproxy.http.resource import ProxyResource, request_factory


class Recorder(Protocol):
    """An application protocol that keeps what it receives and why its connection ended."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason


@implementer(IStreamClientEndpoint)
class HangingEndpoint:
    """An endpoint whose connection attempt never completes until cancelled."""

    def __init__(self) -> None:
        self.cancelled = False
        self.attempt: Deferred[IProtocol] | None = None

    def connect(self, protocolFactory: Any) -> Deferred[IProtocol]:
        def cancel(d: Deferred[IProtocol]) -> None:
            self.cancelled = True

        self.attempt = Deferred(cancel)
        return self.attempt


class RecordingTransport(StringTransport):
    """A StringTransport that also keeps each write apart."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


@implementer(ITCPTransport)
class FakeTCP(RecordingTransport):
    """A TCP transport that records TCP_NODELAY."""

    no_delay = False
    keep_alive = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled

    def getTcpNoDelay(self) -> bool:
        return self.no_delay

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.keep_alive = enabled

    def getTcpKeepAlive(self) -> bool:
        return self.keep_alive

    def loseWriteConnection(self) -> None:
        """Not used."""


@implementer(IStreamClientEndpoint)
class InstantEndpoint:
    """An endpoint that connects at once, each protocol over a new L{StringTransport}."""

    def __init__(self) -> None:
        self.connections: list[tuple[Any, StringTransport]] = []

    def connect(self, protocolFactory: Any) -> Deferred[IProtocol]:
        protocol = protocolFactory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return succeed(protocol)


@implementer(IPushProducer)
class FakeBodyTransport:
    """The upstream socket under a response body: records pause/resume/stop."""

    def __init__(self) -> None:
        self.state = "producing"
        self.stopped = False

    def pauseProducing(self) -> None:
        self.state = "paused"

    def resumeProducing(self) -> None:
        self.state = "producing"

    def stopProducing(self) -> None:
        self.state = "stopped"
        self.stopped = True


@implementer(IResponse)
class FakeResponse:
    """An upstream response whose body the test feeds with L{deliver} and L{end}."""

    version = (b"HTTP", 1, 1)
    request = None
    previousResponse = None

    def __init__(
        self, code: int = 200, headers: dict[bytes, list[bytes]] | None = None, length: Any = None
    ) -> None:
        self.code = code
        self.phrase = b"OK" if code == 200 else b"Error"
        self.headers = Headers(headers or {})
        self.length = UNKNOWN_LENGTH if length is None else length
        self.protocol: Any = None
        self.socket = FakeBodyTransport()

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(TransportProxyProducer(self.socket))

    def deliver(self, data: bytes) -> None:
        """The upstream sends body bytes."""
        self.protocol.dataReceived(data)

    def end(self, reason: Failure | None = None) -> None:
        """The upstream body ends (cleanly, or with C{reason})."""
        self.protocol.connectionLost(reason or Failure(ResponseDone()))

    def setPreviousResponse(self, response: IResponse) -> None:
        raise NotImplementedError


@dataclass
class SentRequest:
    """One request the proxy sent upstream, and the Deferred the test fires."""

    method: bytes
    uri: bytes
    headers: Headers
    body: bytes | None
    deferred: Deferred[IResponse]
    cancelled: bool = False


@implementer(IAgent)
@dataclass
class FakeAgent:
    """An agent that records requests; the test answers them through C{sent}."""

    sent: list[SentRequest] = field(default_factory=list)

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        body = None
        if bodyProducer is not None:
            chunks: list[bytes] = []

            class _Consumer:
                def write(self, data: bytes) -> None:
                    chunks.append(data)

            bodyProducer.startProducing(_Consumer())
            body = b"".join(chunks)

        def cancel(d: Deferred[IResponse]) -> None:
            entry.cancelled = True

        d: Deferred[IResponse] = Deferred(cancel)
        entry = SentRequest(method, uri, headers or Headers(), body, d)
        self.sent.append(entry)
        return d


def upstream_config(name: str, weight: int = 1, **kw: Any) -> UpstreamConfig:
    """An upstream config with a distinct fake address per name."""
    return UpstreamConfig(url=f"http://{name}.invalid:9000/v1", weight=weight, name=name, **kw)


@dataclass
class ProxyHarness:
    """A proxy site in memory: fake agents upstream, StringTransports downstream."""

    clock: MemoryReactorClock
    agents: dict[str, FakeAgent]
    site: ProxySite

    def connect(self) -> tuple[Any, StringTransport]:
        """A new client connection: the server protocol and its transport."""
        proto = self.site.buildProtocol(IPv4Address("TCP", "10.0.0.7", 50000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.7", 50000))
        assert proto is not None
        proto.makeConnection(transport)
        return proto, transport

    def send(self, raw: bytes) -> tuple[Any, StringTransport]:
        """Connect and send C{raw} request bytes."""
        proto, transport = self.connect()
        proto.dataReceived(raw)
        return proto, transport

    def sent(self, name: str | None = None) -> list[SentRequest]:
        """Requests sent upstream (to one upstream, or all in order of upstream)."""
        if name is not None:
            return self.agents[name].sent
        return [s for agent in self.agents.values() for s in agent.sent]


def make_harness(
    upstreams: list[UpstreamConfig] | None = None,
    *,
    deadlines: Deadlines | None = None,
    limits: Limits | None = None,
    keys: dict[str, bytes] | None = None,
) -> ProxyHarness:
    """Build a proxy in memory over fake agents."""
    configs = upstreams or [upstream_config("a")]
    keys = keys or {}
    clock = MemoryReactorClock()
    pool_config = PoolConfig(upstreams=tuple(configs))
    ups = [Upstream(c, keys.get(c.name)) for c in configs]
    agents = {c.name: FakeAgent() for c in configs}
    limits = limits or Limits()
    resource = ProxyResource(
        pool=Pool(pool_config, ups),
        forwarder=Forwarder(agents),
        clock=clock,
        deadlines=deadlines or Deadlines(),
        limits=limits,
    )
    site = ProxySite(
        resource,
        clock,
        stream_high_water=limits.stream_high_water,
        idle_timeout=limits.client_idle_timeout,
        max_headers=limits.max_headers,
        max_header_bytes=limits.max_header_bytes,
        header_timeout=limits.header_timeout,
        max_connections=limits.max_connections,
        send_timeout=(deadlines or Deadlines()).send,
        requestFactory=request_factory(limits.max_body_bytes),
    )
    return ProxyHarness(clock, agents, site)


def post(path: bytes, body: bytes, extra: bytes = b"") -> bytes:
    """Raw HTTP/1.1 POST request bytes with a JSON body."""
    return (
        b"POST %s HTTP/1.1\r\nHost: proxy.example\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n%s\r\n%s" % (path, len(body), extra, body)
    )


def parse_response(raw: bytes) -> tuple[int, dict[bytes, list[bytes]], bytes]:
    """Status, lower-cased headers and de-chunked body of one HTTP/1.1 response."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    if headers.get(b"transfer-encoding") == [b"chunked"]:
        body = b""
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            body += rest[:size]
            rest = rest[size + 2 :]
        return status, headers, body
    return status, headers, rest


def forbid_temporary_files(case: SynchronousTestCase) -> None:
    """Make C{tempfile.TemporaryFile} fail for the rest of C{case}'s test."""

    def refuse(*args: object, **kwargs: object) -> NoReturn:
        raise AssertionError("a temporary file was opened")

    case.patch(tempfile, "TemporaryFile", refuse)
