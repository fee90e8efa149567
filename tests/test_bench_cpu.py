"""The in-memory CPU harness of C{bench/cpu.py} drives whole exchanges through the proxy."""

from __future__ import annotations

import gc

from twisted.trial.unittest import SynchronousTestCase

from bench.cpu import Harness


class HarnessTests(SynchronousTestCase):
    """Each call of C{one} is one complete request and response, over kept-alive connections."""

    def test_non_streaming(self) -> None:
        harness = Harness(stream=False, chunks=4)
        for _ in range(3):
            harness.one()
        self.assertEqual(harness.client.responses, 3)
        self.assertEqual(harness.client.buffer, b"")
        # One upstream connection, reused: no other connection attempt is pending.
        self.assertEqual(harness.reactor.tcpClients, [])

    def test_streaming(self) -> None:
        harness = Harness(stream=True, chunks=20)
        harness.one()
        harness.one()
        self.assertEqual(harness.client.responses, 2)
        self.assertEqual(harness.reactor.tcpClients, [])


class NoCyclesTests(SynchronousTestCase):
    """
    A finished exchange is freed by reference counting: it leaves nothing for the cycle
    collector, whose full passes took 28-39 ms during bursts of streams.
    """

    def assert_no_cycles(self, stream: bool) -> None:
        harness = Harness(stream=stream, chunks=8)
        for _ in range(5):  # warm up: the pooled connection and caches
            harness.one()
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        for _ in range(20):
            harness.one()
        self.assertEqual(gc.collect(), 0)

    def test_non_streaming(self) -> None:
        self.assert_no_cycles(stream=False)

    def test_streaming(self) -> None:
        self.assert_no_cycles(stream=True)
