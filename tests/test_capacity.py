"""The cap on client connections: 503 past it, slots given back as connections close."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.config import ConfigError, Limits
from oaiproxy.http.capacity import REFUSAL_ABORT, Refusal
from oaiproxy.http.h2fix import ProxyHTTPChannelSwitch
from tests.support.fakes import make_harness, parse_response

_CLIENT = IPv4Address("TCP", "10.0.0.7", 50000)


class ConnectionCapTests(SynchronousTestCase):
    """max_connections: what is held, what is refused, and how."""

    def setUp(self) -> None:
        self.harness = make_harness(limits=Limits(max_connections=2))
        self.site = self.harness.site

    def connect(self) -> tuple[Any, StringTransport]:
        protocol = self.site.buildProtocol(_CLIENT)
        transport = StringTransport(peerAddress=_CLIENT)
        protocol.makeConnection(transport)
        return protocol, transport

    def test_refused_past_the_cap(self) -> None:
        """The third connection gets 503 too_many_connections with Retry-After, and closes."""
        first, _ = self.connect()
        second, _ = self.connect()
        self.assertIsInstance(first, ProxyHTTPChannelSwitch)
        self.assertIsInstance(second, ProxyHTTPChannelSwitch)
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
        self.assertIsInstance(fourth, ProxyHTTPChannelSwitch)
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

    def test_limit_validated(self) -> None:
        """max_connections must be at least 1."""
        with self.assertRaises(ConfigError):
            Limits(max_connections=0)
