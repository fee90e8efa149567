"""TCP_NODELAY on upstream connections (Twisted sets it on accepted ones itself)."""

from __future__ import annotations

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.http.nodelay import set_no_delay
from tests.support.fakes import FakeTCP


class Wrapper:
    """A TLS-like wrapper exposing the transport beneath."""

    def __init__(self, transport: object) -> None:
        self.transport = transport


class SetNoDelayTests(SynchronousTestCase):
    """The helper finds the TCP transport."""

    def test_direct(self) -> None:
        """A TCP transport gets TCP_NODELAY."""
        tcp = FakeTCP()
        self.assertTrue(set_no_delay(tcp))
        self.assertTrue(tcp.no_delay)

    def test_under_wrappers(self) -> None:
        """The TCP transport under TLS wrappers gets it."""
        tcp = FakeTCP()
        self.assertTrue(set_no_delay(Wrapper(Wrapper(tcp))))
        self.assertTrue(tcp.no_delay)

    def test_no_tcp(self) -> None:
        """Without a TCP transport beneath, nothing happens."""
        self.assertFalse(set_no_delay(StringTransport()))


class UpstreamConnectionTests(SynchronousTestCase):
    """Twisted's protocols leave Nagle on for clients; the proxy's upstream connections don't."""

    def test_upstream_protocol_sets_no_delay(self) -> None:
        """A new upstream connection gets TCP_NODELAY (through a TLS wrapper too)."""
        from twisted.internet.testing import MemoryReactorClock

        from oaiproxy.http.client import UpstreamClient, _Connection
        from tests.support.fakes import HangingEndpoint

        client = UpstreamClient(
            MemoryReactorClock(), b"http://u", HangingEndpoint(), idle_connections=1, keepalive=1
        )
        for wrap in (False, True):
            tcp = FakeTCP()
            protocol = _Connection(client)
            protocol.makeConnection(Wrapper(tcp) if wrap else tcp)
            self.assertTrue(tcp.no_delay, f"wrapped={wrap}")
