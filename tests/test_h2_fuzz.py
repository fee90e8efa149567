"""
Random sequences of HTTP/2 frames from a client, with upstream answers arriving in between:
nothing may raise out of the connection or be logged as a failure (a traceback), whatever the
order of HEADERS, DATA, RST_STREAM, WINDOW_UPDATE, PRIORITY, PING, GOAWAY and SETTINGS.
"""

from __future__ import annotations

import random

from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher

from tests.support.fakes import FakeResponse
from tests.support.h2client import H2Client
from tests.test_h2_relay import H2ProxyTestCase

_SSE = {b"content-type": [b"text/event-stream"]}
_STREAMS = [1, 3, 5, 7]


def _frame(rnd: random.Random, client: H2Client) -> Frame | None:
    """A random client frame on a random stream, or None (an upstream answer instead)."""
    stream = rnd.choice(_STREAMS)
    kind = rnd.random()
    frame: Frame
    if kind < 0.3:
        frame = HeadersFrame(stream)
        frame.flags.add("END_HEADERS")
        if rnd.random() < 0.5:
            frame.flags.add("END_STREAM")
        method = rnd.choice([b"GET", b"POST", b"CONNECT"])
        head = [(b":method", method), (b":path", b"/v1/models"), (b":scheme", b"https")]
        head.append((b":authority", b"proxy.test"))
        if rnd.random() < 0.3:
            head.append((b"content-length", b"%d" % rnd.randint(0, 20)))
        frame.data = client.h2.encoder.encode(head)
    elif kind < 0.5:
        frame = DataFrame(stream)
        frame.data = b"x" * rnd.randint(0, 30)
        if rnd.random() < 0.5:
            frame.flags.add("END_STREAM")
    elif kind < 0.6:
        frame = RstStreamFrame(stream)
        frame.error_code = rnd.choice([0, 1, 8])
    elif kind < 0.7:
        frame = WindowUpdateFrame(rnd.choice([0, stream]))
        frame.window_increment = rnd.randint(1, 100_000)
    elif kind < 0.75:
        frame = PriorityFrame(stream)
        frame.depends_on = rnd.choice([*_STREAMS, 0, 9])
        frame.stream_weight = 16
    elif kind < 0.8:
        frame = PingFrame(0)
        frame.opaque_data = b"12345678"
    elif kind < 0.83:
        frame = GoAwayFrame(0)
    elif kind < 0.88:
        frame = SettingsFrame(0)
        frame.settings = {SettingsFrame.INITIAL_WINDOW_SIZE: rnd.choice([0, 10, 65535])}
    else:
        return None
    return frame


class FrameFuzzTests(H2ProxyTestCase):
    def test_random_frame_sequences(self) -> None:
        """500 random sequences of up to 25 frames: no exception, no logged failure."""
        log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]  # annotated for unittest.TestCase
        for seed in range(500):
            rnd = random.Random(seed)
            connection, _, client = self.connect()
            for _ in range(rnd.randint(3, 25)):
                frame = _frame(rnd, client)
                if frame is not None:
                    connection.dataReceived(frame.serialize())
                else:
                    pending = [s for s in self.h.sent() if not s.deferred.called]
                    if pending:
                        response = FakeResponse(200, _SSE)
                        pending[0].deferred.callback(response)
                        response.deliver(b"data: 1\n\n")
                        if rnd.random() < 0.5:
                            response.end()
                self.turn()
                if rnd.random() < 0.1:
                    self.h.clock.advance(rnd.choice([1, 30, 61]))
            self.h.clock.advance(200)
            self.turn()
        failures = [e for e in log if "log_failure" in e]
        self.assertEqual(failures, [], failures[:1])
        # The sequences did reach the resource and the upstream.
        self.assertGreater(len(self.h.sent()), 50)
