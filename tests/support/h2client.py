"""
An C{h2} client wired by hand to a server protocol over a StringTransport, for unit tests of
the HTTP/2 side (no sockets, no TLS).
"""

from __future__ import annotations

from collections import defaultdict

import h2.config
import h2.connection
import h2.events
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IProtocol
from twisted.internet.testing import MemoryReactorClock, StringTransport

from oaiproxy.http.h2fix import DEFAULT_STREAM_HIGH_WATER, ProxyH2Connection, ProxySite

CLIENT_ADDRESS = IPv4Address("TCP", "192.0.2.7", 40000)
REQUEST_HEADERS = [
    (b":method", b"GET"),
    (b":path", b"/"),
    (b":scheme", b"https"),
    (b":authority", b"proxy.test"),
]


class H2Client:
    """An C{h2} client connection wired by hand to a server protocol and its transport."""

    def __init__(self, server: IProtocol, transport: StringTransport) -> None:
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config=config)
        self._server = server
        self._transport = transport
        self.headers: dict[int, dict[bytes, bytes]] = {}
        # The informational (1xx) statuses each stream got, in order.
        self.informational: defaultdict[int, list[bytes]] = defaultdict(list)
        self.body: defaultdict[int, bytes] = defaultdict(bytes)
        self.ended: set[int] = set()
        self.reset: set[int] = set()
        self.reset_codes: dict[int, int] = {}
        self.terminated: list[h2.events.ConnectionTerminated] = []

    def connect(self, settings: dict[int, int] | None = None, connection_window: int = 0) -> None:
        """Send the preface, our settings and optionally a connection WINDOW_UPDATE."""
        self.h2.initiate_connection()
        if settings:
            self.h2.update_settings(settings)
        if connection_window:
            self.h2.increment_flow_control_window(connection_window)
        self.send()

    def send(self) -> None:
        """Deliver what the client has to send to the server."""
        data = self.h2.data_to_send()
        if data:
            self._server.dataReceived(data)

    def request(
        self,
        method: bytes = b"GET",
        *,
        path: bytes = b"/",
        headers: list[tuple[bytes, bytes]] | None = None,
        body: bytes | None = None,
        end_stream: bool = True,
    ) -> int:
        """Send a request's headers (and body) on a new stream; return its id."""
        stream_id: int = self.h2.get_next_available_stream_id()
        head = [(b":method", method), (b":path", path), *REQUEST_HEADERS[2:], *(headers or [])]
        self.h2.send_headers(stream_id, head, end_stream=end_stream and body is None)
        if body is not None:
            self.h2.send_data(stream_id, body, end_stream=end_stream)
        self.send()
        return stream_id

    def reset_stream(self, stream_id: int) -> None:
        """Send RST_STREAM (CANCEL) for a stream."""
        self.h2.reset_stream(stream_id, error_code=8)
        self.send()

    def open_window(self, increment: int, stream_id: int | None = None) -> None:
        """Send a WINDOW_UPDATE for a stream, or for the connection."""
        self.h2.increment_flow_control_window(increment, stream_id=stream_id)
        self.send()

    def receive(self) -> None:
        """Parse what the server wrote since the last call, and answer (SETTINGS ACK)."""
        data = self._transport.value()
        self._transport.clear()
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                self.headers[event.stream_id] = dict(event.headers)
            elif isinstance(event, h2.events.InformationalResponseReceived):
                self.informational[event.stream_id].append(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                self.body[event.stream_id] += event.data
            elif isinstance(event, h2.events.StreamEnded):
                self.ended.add(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.reset.add(event.stream_id)
                self.reset_codes[event.stream_id] = event.error_code
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.terminated.append(event)
        self.send()


def h2_server(
    clock: MemoryReactorClock,
    site: ProxySite,
    high_water: int = DEFAULT_STREAM_HIGH_WATER,
    timeout: int = 60,
    send_timeout: float | None = None,
) -> tuple[ProxyH2Connection, StringTransport]:
    """A connected L{ProxyH2Connection}, set up as the channel switch does."""
    connection = ProxyH2Connection(
        clock,
        stream_high_water=high_water,
        send_timeout=send_timeout,
        max_headers=site.max_headers,
        max_header_bytes=site.max_header_bytes,
    )
    connection.requestFactory = site.requestFactory
    connection.site = site
    connection.factory = site
    connection.timeOut = timeout
    transport = StringTransport(peerAddress=CLIENT_ADDRESS)
    connection.makeConnection(transport)
    # A TCP transport has its protocol as producer (the channel switch registers it).
    transport.registerProducer(connection, True)
    return connection, transport
