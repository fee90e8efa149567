"""The cap on client connections: 503 past it, slots given back as connections close."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import HTTPChannel

from oaiproxy.config import ConfigError, Limits
from oaiproxy.http.capacity import REFUSAL_ABORT, Refusal
from oaiproxy.http.h1server import H1Channel
from oaiproxy.http.h2fix import ProxyHTTPChannelSwitch
from tests.support.fakes import make_harness, parse_response

_CLIENT = IPv4Address("TCP", "10.0.0.7", 50000)


class ConnectionCapTests(SynchronousTestCase):
    """max_connections: what is held, what is refused, and how (a TLS listener's factory)."""

    #: What a held connection is served by.
    held: type = ProxyHTTPChannelSwitch

    def setUp(self) -> None:
        self.harness = make_harness(limits=Limits(max_connections=2))
        self.site = self.harness.site
        self.factory: Any = self.site

    def connect(self) -> tuple[Any, StringTransport]:
        protocol = self.factory.buildProtocol(_CLIENT)
        transport = StringTransport(peerAddress=_CLIENT)
        protocol.makeConnection(transport)
        return protocol, transport

    def test_refused_past_the_cap(self) -> None:
        """The third connection gets 503 too_many_connections with Retry-After, and closes."""
        first, _ = self.connect()
        second, _ = self.connect()
        self.assertIsInstance(first, self.held)
        self.assertIsInstance(second, self.held)
        third, transport = self.connect()
        self.assertIsInstance(third, Refusal)
        status, headers, body = parse_response(transport.value())
        self.assertEqual(status, 503)
        self.assertEqual(headers[b"retry-after"], [b"1"])
        self.assertEqual(len(headers[b"x-request-id"][0]), 32)
        error = json.loads(body)["error"]
        self.assertEqual((error["type"], error["code"]), ("server_error", "too_many_connections"))
        self.assertTrue(transport.disconnecting)
        third.dataReceived(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(self.harness.sent(), [])

    def test_slot_given_back_on_close(self) -> None:
        """When a held connection closes, a new one is served again."""
        first, _ = self.connect()
        self.connect()
        first.connectionLost(Failure(ConnectionDone()))
        fourth, transport = self.connect()
        self.assertIsInstance(fourth, self.held)
        fourth.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(parse_response(transport.value())[0], 200)
        self.assertEqual(self.site.connections.open, 2)

    def test_refused_connection_aborted_if_it_lingers(self) -> None:
        """A refused connection that does not close is aborted; one that does leaves no timer."""
        self.connect()
        self.connect()
        _, transport = self.connect()
        self.assertFalse(transport.disconnected)
        self.harness.clock.advance(REFUSAL_ABORT)
        self.assertTrue(transport.disconnected)
        closing, closing_transport = self.connect()
        self.assertIsInstance(closing, Refusal)
        closing.connectionLost(Failure(ConnectionDone()))
        self.harness.clock.advance(REFUSAL_ABORT)
        self.assertFalse(closing_transport.disconnected)

    def test_refusals_not_counted(self) -> None:
        """Refused connections take no slot: closing them frees nothing that was not taken."""
        a, _ = self.connect()
        self.connect()
        refused, _ = self.connect()
        refused.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.site.connections.open, 2)
        a.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.site.connections.open, 1)

    def test_idle_connection_closed(self) -> None:
        """A held connection with nothing to do is closed after the site's idle timeout."""
        _, transport = self.connect()
        timeout = self.site.timeOut
        assert timeout is not None
        self.harness.clock.advance(timeout - 0.5)
        self.assertFalse(transport.disconnecting)
        self.harness.clock.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_limit_validated(self) -> None:
        """max_connections must be at least 1."""
        with self.assertRaises(ConfigError):
            Limits(max_connections=0)


class PlainConnectionCapTests(ConnectionCapTests):
    """The same, through a plain listener's factory: each connection its L{H1Channel} alone."""

    held = H1Channel

    def setUp(self) -> None:
        super().setUp()
        self.factory = self.site.plain_factory()

    def test_slot_given_back_if_the_request_fails(self) -> None:
        """A request that fails to hear of the connection's loss still gives the slot back."""
        first, _ = self.connect()
        first.dataReceived(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
        request = first._request
        self.assertIsNotNone(request)

        def broken(reason: Failure) -> None:
            raise RuntimeError("broken request")

        request.connectionLost = broken
        self.assertRaises(RuntimeError, first.connectionLost, Failure(ConnectionDone()))
        self.assertEqual(self.site.connections.open, 0)

    def test_started_and_stopped_with_the_site(self) -> None:
        """Listening with it starts and stops the site, as listening with the site does."""
        self.assertEqual(self.site.numPorts, 0)
        self.factory.doStart()
        self.assertEqual(self.site.numPorts, 1)
        self.factory.doStop()
        self.assertEqual(self.site.numPorts, 0)
        self.assertEqual(self.factory.logPrefix(), self.site.logPrefix())

    def test_another_channel_behind_the_switch(self) -> None:
        """A site whose channel is not L{H1Channel} (a test's Twisted one) keeps the switch."""
        site: Any = self.site
        site.h1_channel = lambda reactor, **kwargs: HTTPChannel()
        protocol, _ = self.connect()
        self.assertIsInstance(protocol, ProxyHTTPChannelSwitch)
