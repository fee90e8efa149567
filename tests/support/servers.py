"""
Real servers on loopback for integration tests: mock upstreams and the proxy, listening on
127.0.0.1 port 0 in trial's reactor.

Every helper registers its cleanups on the test case, so a test leaves the reactor clean:
listening ports stopped, the proxy's upstream connection pool closed, every accepted connection
closed (upstream connections the proxy left open fail the test), threads' clients closed by
the tests themselves.

What the servers saw is recorded for assertions: each mock request's head, the exact bytes of
its response body (length and SHA-256), whether its producer is paused and how it ended; the
proxy's relays (with L{record_relays}), whether they are paused and how much they relayed.

Also here: a raw HTTP/2 client on a real TLS connection (L{connect_h2}), for tests that need
to hold flow-control windows or reset streams, and ways to wait on the reactor without
sleeping (L{wait_for}, L{wait_until_still}, L{within}).
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import h2.config
import h2.connection
import h2.errors
import h2.events
from twisted.internet import reactor as _global_reactor
from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IListeningPort, IPushProducer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site
from typing_extensions import override
from zope.interface import implementer

from oaiproxy.config import (
    Deadlines,
    Limits,
    ListenerConfig,
    PoolConfig,
    ProxyConfig,
    UpstreamConfig,
)
from oaiproxy.http import exchange as exchange_module
from oaiproxy.http.relay import Relay
from oaiproxy.mock import MockConfig, build_mock_site
from oaiproxy.service import build_site
from oaiproxy.tls import listener_endpoint

__all__ = [
    "ConnectionTracker",
    "H2Response",
    "LoopbackH2Client",
    "MockServer",
    "ObservedProducer",
    "ProxyServer",
    "RecordingRelay",
    "SeenRequest",
    "StreamWasReset",
    "connect_h2",
    "dechunk",
    "raw_exchange",
    "reactor",
    "record_relays",
    "refused_port",
    "sse_events",
    "start_mock",
    "start_proxy",
    "wait_for",
    "wait_until_still",
    "within",
]

#: Trial runs the global reactor; integration tests are the one place that uses it directly.
reactor: Any = _global_reactor

#: Seconds the cleanup waits for connections to close by themselves before calling it a leak.
#: A bound on failure only: a clean test never waits for it.
_LEAK_SECONDS = 10.0
#: Seconds after which a wait that should end at once is reported as a failure (not a sleep).
_FAILURE_BOUND = 20.0

_T = TypeVar("_T")


# -- connections -----------------------------------------------------------------------------


class ConnectionTracker:
    """
    Watches the connections a server factory accepts: how many are open, and when they close.

    Installs itself by wrapping the factory's C{buildProtocol} (on the instance), so the
    server's protocols and transports are the real ones, untouched.
    """

    def __init__(self, *factories: Any) -> None:
        self.accepted = 0
        self._open: dict[int, Any] = {}
        self._waiters: list[Deferred[None]] = []
        for factory in factories:
            self._wrap(factory)

    def _wrap(self, factory: Any) -> None:
        build = factory.buildProtocol

        def build_protocol(addr: Any) -> Any:
            protocol = build(addr)
            if protocol is not None:
                self._watch(protocol)
            return protocol

        factory.buildProtocol = build_protocol

    @property
    def open_count(self) -> int:
        """Connections accepted and not yet lost."""
        return len(self._open)

    def _watch(self, protocol: Any) -> None:
        # The connection's end is heard on its transport (TCP, or the TLS layer over it):
        # Twisted's HTTP/1.1-or-HTTP/2 switch forwards its methods to a channel that is
        # replaced mid-connection, so its connectionLost cannot be patched. Its makeConnection
        # can: it is called once, before any switch.
        self.accepted += 1
        make = protocol.makeConnection

        def make_connection(transport: Any) -> None:
            key = id(transport)
            self._open[key] = transport
            lose = transport.connectionLost

            def connection_lost(reason: Failure) -> None:
                try:
                    lose(reason)
                finally:
                    self._lost(key)

            transport.connectionLost = connection_lost
            make(transport)

        protocol.makeConnection = make_connection

    def _lost(self, key: int) -> None:
        self._open.pop(key, None)
        if not self._open:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.called:
                    waiter.callback(None)

    @property
    def transports(self) -> list[Any]:
        """The transports of the open connections, oldest first."""
        return list(self._open.values())

    def when_closed(self) -> Deferred[None]:
        """A Deferred that fires once no connection is open (at once if none is)."""
        if not self._open:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def abort_open(self) -> None:
        """Abort every open connection."""
        for transport in list(self._open.values()):
            transport.abortConnection()


def _close_all(tracker: ConnectionTracker) -> Deferred[None]:
    """Abort whatever is still open and wait for it to be gone."""
    tracker.abort_open()
    return tracker.when_closed()


def _expect_closed(tracker: ConnectionTracker, what: str) -> Deferred[None]:
    """
    Wait for every connection to close by itself; if some stay open, abort them and fail.
    """
    if not tracker.open_count:
        return succeed(None)
    waiting = tracker.when_closed()
    waiting.addTimeout(_LEAK_SECONDS, reactor)

    def leaked(failure: Failure) -> Deferred[None]:
        failure.trap(TimeoutError)
        count = tracker.open_count

        def fail(_: object) -> None:
            raise AssertionError(
                f"{count} {what} connection(s) still open {_LEAK_SECONDS:g}s after the test"
            )

        return _close_all(tracker).addCallback(fail)

    return waiting.addErrback(leaked)


def refused_port(testcase: TestCase) -> int:
    """
    A loopback port where connections are refused: bound by a socket that never listens, and
    held for the whole test so nothing else can take it.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    testcase.addCleanup(sock.close)
    port: int = sock.getsockname()[1]
    return port


# -- mock upstreams --------------------------------------------------------------------------


@implementer(IPushProducer)
class ObservedProducer:
    """Stands between a mock response's producer and its consumer, keeping track of pauses."""

    def __init__(self, wrapped: IPushProducer) -> None:
        self._wrapped = wrapped
        self.paused = False
        self.pauses = 0
        self.stopped = False

    def pauseProducing(self) -> None:
        """Note the pause and pass it on."""
        self.paused = True
        self.pauses += 1
        self._wrapped.pauseProducing()

    def resumeProducing(self) -> None:
        """Note the resumption and pass it on."""
        self.paused = False
        self._wrapped.resumeProducing()

    def stopProducing(self) -> None:
        """Note the stop and pass it on."""
        self.stopped = True
        self._wrapped.stopProducing()


@dataclass
class SeenRequest:
    """
    One request as a mock upstream saw it, and the response body it wrote.

    @ivar ended: fires with C{True} when the response finished, C{False} when the connection
        was lost first.
    """

    method: bytes
    path: bytes
    headers: Headers
    body_bytes: int = 0
    digest: Any = field(default_factory=hashlib.sha256)
    producer: ObservedProducer | None = None
    ended: Deferred[bool] = field(default_factory=Deferred)

    def header(self, name: bytes) -> bytes | None:
        """The last value the request had for header C{name}, or C{None}."""
        values = self.headers.getRawHeaders(name)
        return values[-1] if values else None

    @property
    def producer_paused(self) -> bool:
        """Whether the response's producer is paused right now."""
        return self.producer is not None and self.producer.paused


class _ObservingResource(Resource):
    """Wraps the mock's resource, recording each request and what it writes back."""

    isLeaf = True

    def __init__(self, wrapped: IResource, seen: list[SeenRequest], fault: bytes | None) -> None:
        super().__init__()
        self._wrapped = wrapped
        self._seen = seen
        self._fault = fault

    @override
    def render(self, request: Request) -> bytes | int:
        if self._fault is not None:
            request.requestHeaders.setRawHeaders(b"x-mock-fault", [self._fault])
        seen = SeenRequest(
            method=request.method, path=request.path, headers=request.requestHeaders.copy()
        )
        self._seen.append(seen)
        write, register = request.write, request.registerProducer

        def observed_write(data: bytes) -> None:
            seen.body_bytes += len(data)
            seen.digest.update(data)
            write(data)

        def observed_register(producer: IPushProducer, streaming: bool) -> None:
            seen.producer = ObservedProducer(producer)
            register(seen.producer, streaming)

        request.write = observed_write  # type: ignore[method-assign]
        request.registerProducer = observed_register  # type: ignore[method-assign]
        request.notifyFinish().addCallbacks(
            lambda _: seen.ended.callback(True), lambda _: seen.ended.callback(False)
        )
        result: bytes | int = self._wrapped.render(request)
        return result


@dataclass
class MockServer:
    """A mock upstream listening on loopback, and what it saw."""

    name: str
    port: int
    site: Site
    listening: IListeningPort
    requests: list[SeenRequest]
    connections: ConnectionTracker

    @property
    def url(self) -> str:
        """Its base URL, as an upstream is configured."""
        return f"http://127.0.0.1:{self.port}/v1"

    def upstream(self, weight: int = 1, key_env: str | None = None) -> UpstreamConfig:
        """The upstream configuration pointing at this mock, named as the mock."""
        return UpstreamConfig(url=self.url, weight=weight, key_env=key_env, name=self.name)


def start_mock(testcase: TestCase, name: str, *, fault: bytes | None = None) -> MockServer:
    """
    Start a mock upstream on 127.0.0.1, port chosen by the OS.

    @param fault: an C{x-mock-fault} value forced onto every request (an upstream that always
        fails), whatever the client sent.
    """
    site = build_mock_site(MockConfig(name=name), reactor)
    seen: list[SeenRequest] = []
    site.resource = _ObservingResource(site.resource, seen, fault)
    tracker = ConnectionTracker(site)
    listening = reactor.listenTCP(0, site, interface="127.0.0.1")
    testcase.addCleanup(listening.stopListening)
    # Runs before stopListening: the proxy's cleanup (registered later, run earlier) has
    # closed its pool, so every upstream connection should close by itself now.
    testcase.addCleanup(_expect_closed, tracker, f"mock {name}")
    return MockServer(name, listening.getHost().port, site, listening, seen, tracker)


class _RawAnswer(Protocol):
    """Reads one request (head and Content-Length body), then writes fixed bytes and closes."""

    def __init__(self, answer: bytes) -> None:
        self._answer = answer
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        head_end = self._buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return
        length = 0
        for line in self._buffer[:head_end].split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(self._buffer) >= head_end + 4 + length:
            assert self.transport is not None
            self.transport.write(self._answer)
            self.transport.loseConnection()


def start_raw_upstream(testcase: TestCase, answer: bytes) -> UpstreamConfig:
    """
    An upstream on 127.0.0.1 that answers every request with the bytes C{answer}, as they are
    (a broken or unusual server), and closes the connection.
    """
    factory = Factory.forProtocol(lambda: _RawAnswer(answer))
    listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
    testcase.addCleanup(listening.stopListening)
    return UpstreamConfig(url=f"http://127.0.0.1:{listening.getHost().port}/v1", name="raw")


# -- the proxy -------------------------------------------------------------------------------


@dataclass
class ProxyServer:
    """The proxy listening on loopback: plain HTTP/1.1 and TLS (ALPN h2, http/1.1)."""

    http_port: int
    tls_port: int
    cert_path: str
    site: Site
    tracker: ConnectionTracker | None

    @property
    def connections(self) -> ConnectionTracker:
        """The tracker of its client connections (a proxy started with C{track=True})."""
        if self.tracker is None:
            raise AssertionError("this proxy's client connections are not tracked")
        return self.tracker

    @property
    def http_url(self) -> str:
        """Base URL of the plain HTTP/1.1 listener."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def https_url(self) -> str:
        """Base URL of the TLS listener (the certificate names C{localhost})."""
        return f"https://localhost:{self.tls_port}"


def _listening(endpoint: Any, factory: Any) -> Any:
    """The port C{endpoint} listens on with C{factory} (TCP and TLS endpoints say at once)."""
    outcome: list[Any] = []
    endpoint.listen(factory).addBoth(outcome.append)
    [port] = outcome
    if isinstance(port, Failure):
        port.raiseException()
    return port


def start_proxy(
    testcase: TestCase,
    upstreams: list[UpstreamConfig],
    *,
    limits: Limits | None = None,
    deadlines: Deadlines | None = None,
    environ: Mapping[str, str] | None = None,
    track: bool = True,
) -> ProxyServer:
    """
    Build the proxy's site for C{upstreams} and listen on 127.0.0.1 twice: plain and TLS,
    with a fresh self-signed certificate whose path is returned for clients to trust.

    @param track: watch the client connections (L{ConnectionTracker}), aborted when the test
        ends. Untracked, the cleanup waits for the clients to have closed them: the tracker
        patches closures onto each connection's protocol and transport, which are reference
        cycles of their own (see C{tests/test_cycles.py}).
    """
    config = ProxyConfig(
        # build_site does not listen; the listener only satisfies validation.
        listeners=(ListenerConfig("tcp", 0),),
        pools=(PoolConfig(upstreams=tuple(upstreams)),),
        limits=limits or Limits(),
        deadlines=deadlines or Deadlines(),
    )
    site: Any = build_site(config, reactor, config.pools[0], environ or {})
    # Served as build_service serves them: the plain listener by the site's plain factory,
    # both on the endpoints listener_endpoint gives (porttune's tuned port).
    plain_factory = site.plain_factory()
    tracker = ConnectionTracker(site, plain_factory) if track else None
    state = testcase.mktemp()
    plain = _listening(
        listener_endpoint(reactor, ListenerConfig("tcp", 0, interface="127.0.0.1"), state)[0],
        plain_factory,
    )
    endpoint, shown = listener_endpoint(
        reactor, ListenerConfig("tls", 0, interface="127.0.0.1", self_signed=True), state
    )
    assert shown is not None
    cert_path = shown
    secure = _listening(endpoint, site)

    # Cleanups run last first: stop listening, close client connections, close the pool.
    testcase.addCleanup(site.resource.close)
    if tracker is not None:
        testcase.addCleanup(_close_all, tracker)
    else:
        testcase.addCleanup(
            wait_for, lambda: site.connections.open == 0, "the client connections to close"
        )
    testcase.addCleanup(secure.stopListening)
    testcase.addCleanup(plain.stopListening)
    return ProxyServer(
        http_port=plain.getHost().port,
        tls_port=secure.getHost().port,
        cert_path=cert_path,
        site=site,
        tracker=tracker,
    )


class RecordingRelay(Relay):
    """A relay that keeps track of being paused: the tests' window into backpressure."""

    paused = False
    pauses = 0

    @override
    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1
        super().pauseProducing()

    @override
    def resumeProducing(self) -> None:
        self.paused = False
        super().resumeProducing()


def record_relays(testcase: TestCase) -> list[RecordingRelay]:
    """Make the proxy build L{RecordingRelay}s for this test; they are listed as made."""
    relays: list[RecordingRelay] = []

    class _Listed(RecordingRelay):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            relays.append(self)

    testcase.patch(exchange_module, "Relay", _Listed)
    return relays


# -- waiting -----------------------------------------------------------------------------------


def wait_for(condition: Callable[[], bool], what: str, *, turns: int = 200_000) -> Deferred[None]:
    """
    Fire once C{condition()} holds, checking it once per reactor turn; fail, saying C{what}
    was awaited, if it still does not hold after C{turns} turns.
    """
    result: Deferred[None] = Deferred()

    def check(left: int) -> None:
        if condition():
            result.callback(None)
        elif left <= 0:
            result.errback(AssertionError(f"gave up waiting for {what} after {turns} turns"))
        else:
            deferLater(reactor, 0, check, left - 1)

    check(turns)
    return result


# -- raw clients -------------------------------------------------------------------------------


async def raw_exchange(port: int, data: bytes) -> bytes:
    """
    Send C{data} on a new socket to 127.0.0.1:C{port}, and read until the server closes it
    (a blocking client, run off the reactor thread).
    """

    def call() -> bytes:
        with socket.create_connection(("127.0.0.1", port), 30) as sock:
            sock.sendall(data)
            parts = [sock.recv(65536)]
            while parts[-1]:
                parts.append(sock.recv(65536))
            return b"".join(parts)

    return await deferToThread(call)


@dataclass
class H2Response:
    """
    One stream's response as a raw HTTP/2 client received it.

    @ivar head: fires when the response headers arrive.
    @ivar done: fires with this response when the stream ends, or fails with
        L{StreamWasReset} (or the connection's loss).
    """

    stream_id: int
    held: bool = False
    status: int = 0
    headers: dict[bytes, bytes] = field(default_factory=dict)
    received: int = 0
    unacknowledged: int = 0
    chunks: list[bytes] = field(default_factory=list)
    head: Deferred[None] = field(default_factory=Deferred)
    done: Deferred[H2Response] = field(default_factory=Deferred)

    @property
    def body(self) -> bytes:
        """The body received so far."""
        return b"".join(self.chunks)


class StreamWasReset(Exception):
    """The server reset a stream; C{args[0]} is the error code."""


class LoopbackH2Client(Protocol):
    """
    A raw HTTP/2 client (the C{h2} library) for tests that need control of flow control.

    Received data is acknowledged (reopening the windows) only while C{reading} is true: a
    client that sets it false holds the server to the initial 65,535-byte windows. A response
    marked C{held} has only its stream's window held shut: the connection's is reopened, so
    other streams can go on.
    """

    def __init__(self, authority: bytes) -> None:
        self._authority = authority
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.responses: dict[int, H2Response] = {}
        self.reading = True
        self.lost: Deferred[None] = Deferred()

    @override
    def connectionMade(self) -> None:
        self.conn.initiate_connection()
        self._flush()

    @property
    def negotiated(self) -> bytes | None:
        """The ALPN protocol of the connection (known once the handshake is done)."""
        return getattr(self.transport, "negotiatedProtocol", None)

    def request(
        self,
        path: bytes,
        body: bytes,
        headers: list[tuple[bytes, bytes]] | None = None,
        *,
        content_length: bool = True,
        held: bool = False,
    ) -> H2Response:
        """
        Send a POST of C{body} (small: within one frame and the initial window), with a
        C{content-length} unless told otherwise; C{held}: see the class docstring.
        """
        stream_id: int = self.conn.get_next_available_stream_id()
        head = [
            (b":method", b"POST"),
            (b":path", path),
            (b":scheme", b"https"),
            (b":authority", self._authority),
            (b"content-type", b"application/json"),
            *([(b"content-length", b"%d" % len(body))] if content_length else []),
            *(headers or []),
        ]
        self.conn.send_headers(stream_id, head)
        self.conn.send_data(stream_id, body, end_stream=True)
        response = H2Response(stream_id, held=held)
        self.responses[stream_id] = response
        self._flush()
        return response

    def reset(self, stream_id: int) -> None:
        """Cancel a stream (RST_STREAM CANCEL)."""
        self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        self._flush()

    def release(self, response: H2Response, increment: int = 2**24) -> None:
        """Stop holding a C{held} response: reopen and widen its stream's window."""
        response.held = False
        self.conn.increment_flow_control_window(
            response.unacknowledged + increment, response.stream_id
        )
        response.unacknowledged = 0
        self._flush()

    def close(self) -> None:
        """Close the connection (TLS close, then TCP)."""
        if self.transport is not None:
            self.transport.loseConnection()

    def open_windows(self, increment: int = 2**24) -> None:
        """Start reading: acknowledge what was held back and widen every window."""
        self.reading = True
        self.conn.increment_flow_control_window(increment)
        for response in self.responses.values():
            if self.conn.streams.get(response.stream_id) is None:
                continue
            if response.unacknowledged:
                self.conn.acknowledge_received_data(response.unacknowledged, response.stream_id)
                response.unacknowledged = 0
            self.conn.increment_flow_control_window(increment, response.stream_id)
        self._flush()

    @override
    def dataReceived(self, data: bytes) -> None:
        for event in self.conn.receive_data(data):
            self._handle(event)
        self._flush()

    def _handle(self, event: object) -> None:
        response = self.responses.get(getattr(event, "stream_id", 0) or 0)
        if response is None:
            return
        if isinstance(event, h2.events.ResponseReceived):
            response.headers = dict(event.headers)
            response.status = int(response.headers[b":status"])
            response.head.callback(None)
        elif isinstance(event, h2.events.DataReceived):
            response.chunks.append(event.data)
            response.received += len(event.data)
            if response.held:
                self.conn.increment_flow_control_window(event.flow_controlled_length)
                response.unacknowledged += event.flow_controlled_length
            elif self.reading:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            else:
                response.unacknowledged += event.flow_controlled_length
        elif isinstance(event, h2.events.StreamEnded):
            response.done.callback(response)
        elif isinstance(event, h2.events.StreamReset) and not response.done.called:
            response.done.errback(StreamWasReset(event.error_code))

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)

    @override
    def connectionLost(self, reason: Failure = connectionDone) -> None:
        for response in self.responses.values():
            if not response.done.called:
                response.done.errback(reason)
        self.lost.callback(None)


async def connect_h2(testcase: TestCase, proxy: ProxyServer) -> LoopbackH2Client:
    """
    A raw HTTP/2 client connected to the proxy's TLS listener with ALPN C{h2}, closed when the
    test ends.
    """
    with open(proxy.cert_path, "rb") as f:
        trust = Certificate.loadPEM(f.read())
    options = optionsForClientTLS("localhost", trustRoot=trust, acceptableProtocols=[b"h2"])
    endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.tls_port))
    client = LoopbackH2Client(b"localhost:%d" % proxy.tls_port)
    await connectProtocol(endpoint, client)

    def close() -> Deferred[None]:
        # The test is over: a response it did not wait for fails here unseen, rather than as
        # an "unhandled error in Deferred" logged (and blamed on whichever test is running)
        # when the garbage collector gets to it.
        for response in client.responses.values():
            response.done.addErrback(lambda _: None)
        if not client.lost.called and client.transport is not None:
            client.transport.abortConnection()  # type: ignore[attr-defined]
        return client.lost

    testcase.addCleanup(close)
    return client


def dechunk(data: bytes) -> bytes:
    """
    Decode a complete HTTP/1.1 chunked body.

    @raise ValueError: if it is malformed or lacks its last chunk.
    """
    out: list[bytes] = []
    position = 0
    while True:
        end = data.index(b"\r\n", position)
        size = int(data[position:end].split(b";", 1)[0], 16)
        start = end + 2
        if size == 0:
            if data[start:] != b"\r\n":
                raise ValueError("trailing bytes after the last chunk")
            return b"".join(out)
        out.append(data[start : start + size])
        if data[start + size : start + size + 2] != b"\r\n":
            raise ValueError(f"chunk at {position} is not followed by CRLF")
        position = start + size + 2


def sse_events(body: bytes) -> list[bytes]:
    """The C{data:} payloads of a server-sent event stream, in order."""
    events = []
    for block in body.split(b"\n\n"):
        if block.startswith(b"data: "):
            events.append(block[len(b"data: ") :])
        elif block.strip():
            raise ValueError(f"not an SSE data event: {block[:80]!r}")
    return events


def wait_until_still(
    condition: Callable[[], bool],
    progress: Callable[[], object],
    what: str,
    *,
    still_turns: int = 200,
    turns: int = 500_000,
) -> Deferred[None]:
    """
    Fire once C{condition()} has held and C{progress()} has not changed for C{still_turns}
    reactor turns in a row: the system has settled in that state, not merely passed through
    it. Fail, saying C{what} was awaited, after C{turns} turns without that.
    """
    result: Deferred[None] = Deferred()
    state: dict[str, Any] = {"last": progress(), "still": 0}

    def check(left: int) -> None:
        now = progress()
        if condition() and now == state["last"]:
            state["still"] += 1
        else:
            state["still"] = 0
        state["last"] = now
        if state["still"] >= still_turns:
            result.callback(None)
        elif left <= 0:
            result.errback(AssertionError(f"gave up waiting for {what} after {turns} turns"))
        else:
            deferLater(reactor, 0, check, left - 1)

    check(turns)
    return result


async def within(d: Deferred[_T], what: str) -> _T:
    """
    Await C{d}; if it has not fired after a generous bound, cancel it and fail saying C{what}
    was awaited. For events that should happen at once: a bound on failure, not a sleep.
    """

    def late(*_: object) -> _T:
        raise AssertionError(f"{what}: still waiting after {_FAILURE_BOUND:g}s")

    return await d.addTimeout(_FAILURE_BOUND, reactor, onTimeoutCancel=late)
