"""
The h2 connection state machine, with streams over the concurrency limit refused one by one.

The server advertises C{SETTINGS_MAX_CONCURRENT_STREAMS} (100, h2's default). A client that
opens more anyway makes h2 raise C{TooManyStreamsError}, and Twisted answers any h2 protocol
error by tearing down the whole connection (GOAWAY), every stream on it included. RFC 9113
section 5.1.2 allows a stream error instead: here the excess stream is reset with
C{REFUSED_STREAM} (which tells the client it was not processed and may be retried), the
application never hears of it, and the connection and its other streams carry on.

The refused stream's header block is still decoded (HPACK state is shared by the whole
connection) and still validated. Written against h2 4.4.1: it overrides the private
C{H2Connection._receive_headers_frame} and the C{open_inbound_streams} property.
"""

from __future__ import annotations

from typing import Any

import h2.connection
import h2.errors

__all__ = ["RefusingH2Connection"]


class RefusingH2Connection(h2.connection.H2Connection):
    """An h2 connection that refuses streams over its concurrency limit with REFUSED_STREAM."""

    _admitting_over_limit = False
    refused_streams = 0

    @property
    def open_inbound_streams(self) -> int:
        """h2's count of open client streams; -1 while an excess stream is let in."""
        count: int = super().open_inbound_streams
        # h2 checks count + 1 > limit: -1 lets a stream in even under a limit of 0.
        return -1 if self._admitting_over_limit else count

    def _receive_headers_frame(self, frame: Any) -> tuple[list[Any], list[Any]]:
        stream_id: int = frame.stream_id
        if stream_id in self.streams or (
            super().open_inbound_streams < self.local_settings.max_concurrent_streams
        ):
            result: tuple[list[Any], list[Any]] = super()._receive_headers_frame(frame)
            return result
        # Take the stream in as h2 would (decoding its headers), then reset it at once.
        self._admitting_over_limit = True
        try:
            frames, events = super()._receive_headers_frame(frame)
        finally:
            self._admitting_over_limit = False
        self.refused_streams += 1
        reset = self.streams[stream_id].reset_stream(h2.errors.ErrorCodes.REFUSED_STREAM)
        kept = [e for e in events if getattr(e, "stream_id", None) != stream_id]
        return [*frames, *reset], kept
