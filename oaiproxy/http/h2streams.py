"""
The h2 connection state machine, with what one stream does wrong answered on that stream.

Twisted answers any h2 protocol error by tearing down the whole connection (GOAWAY), every
stream on it included. RFC 9113 allows a stream error instead in two cases, and here the
stream is reset, the application never hears of its request, and the connection and its
other streams carry on:

 - B{Streams over the concurrency limit} (section 5.1.2). The server advertises
   C{SETTINGS_MAX_CONCURRENT_STREAMS} (100, h2's default); a client that opens more anyway
   made h2 raise C{TooManyStreamsError}. The excess stream is reset with C{REFUSED_STREAM},
   which tells the client it was not processed and may be retried.
 - B{Malformed requests} (section 8.1.1): a request head that h2's validation refuses
   (connection-specific fields such as C{connection} or C{transfer-encoding}, duplicate or
   missing pseudo-headers, upper-case names, a bad C{content-length}, trailers without
   END_STREAM, ...), a body longer or shorter than its C{content-length}, or a C{content-length}
   other than 0 on a request that ends with its headers. The stream is reset with
   C{PROTOCOL_ERROR}; DATA it carried is still acknowledged on the connection window.

Only errors of one stream's request are turned into stream errors: the header block has been
decoded (HPACK state is shared by the whole connection, so a block that fails to decode still
ends the connection) and the connection and stream state machines have accepted the frame.
Framing, HPACK and flow-control errors stay connection errors.

Each stream ended here is reported to the application as a L{StreamRejected} event, so that
it can log it and forget the stream.

Written against h2 4.4.1: it overrides the private C{H2Connection._receive_headers_frame},
C{_receive_data_frame} and C{_get_or_create_stream} and the C{open_inbound_streams} property,
and resets streams through C{H2Stream.reset_stream}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

__all__ = ["RefusingH2Connection", "StreamRejected"]


@dataclass
class StreamRejected(h2.events.Event):
    """
    A stream this connection reset on its own (RST_STREAM already queued): the request on
    it is not to be processed.

    @ivar stream_id: the stream.
    @ivar error_code: the RST_STREAM error code sent.
    @ivar reason: why, for a log event.
    """

    stream_id: int
    error_code: h2.errors.ErrorCodes
    reason: str


class RefusingH2Connection(h2.connection.H2Connection):
    """An h2 connection that resets excess and malformed streams instead of failing."""

    def __init__(
        self, config: h2.config.H2Configuration, max_header_list_size: int | None = None
    ) -> None:
        """
        @param config: h2's configuration.
        @param max_header_list_size: the C{SETTINGS_MAX_HEADER_LIST_SIZE} to advertise
            (h2's default, 64 KiB, if C{None}). Header blocks are still decoded up to twice
            that (at least 64 KiB), so that the application can answer one a little over it
            on its stream (431); past that, h2 ends the connection.
        """
        super().__init__(config=config)
        if max_header_list_size is not None:
            self.local_settings = h2.settings.Settings(
                client=config.client_side,
                initial_values={
                    h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100,
                    h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: max_header_list_size,
                },
            )
            self.decoder.max_header_list_size = max(
                self.DEFAULT_MAX_HEADER_LIST_SIZE, 2 * max_header_list_size
            )

    _admitting_over_limit = False
    # The stream whose header block is decoded and whose frame both state machines took.
    _headers_accepted_for: int | None = None
    refused_streams = 0

    @property
    def open_inbound_streams(self) -> int:
        """h2's count of open client streams; -1 while an excess stream is let in."""
        count: int = super().open_inbound_streams
        # h2 checks count + 1 > limit: -1 lets a stream in even under a limit of 0.
        return -1 if self._admitting_over_limit else count

    def _get_or_create_stream(self, stream_id: int, allowed_ids: Any) -> Any:
        stream = super()._get_or_create_stream(stream_id, allowed_ids)
        # For HEADERS, h2 gets the stream once the block is decoded and the connection state
        # machine took the frame: what fails after this is the stream's own.
        self._headers_accepted_for = stream_id
        return stream

    def _receive_headers_frame(self, frame: Any) -> tuple[list[Any], list[Any]]:
        stream_id: int = frame.stream_id
        over_limit = stream_id not in self.streams and (
            super().open_inbound_streams >= self.local_settings.max_concurrent_streams
        )
        # Take an excess stream in as h2 would (decoding its headers), then reset it.
        self._admitting_over_limit = over_limit
        self._headers_accepted_for = None
        # h2 re-reads the content-length from trailers (finding none): keep the request's.
        declared = self._declared_length(stream_id)
        try:
            frames, events = super()._receive_headers_frame(frame)
        except h2.exceptions.StreamClosedError:
            raise  # h2 turns it into RST_STREAM itself, or it is a connection error
        except h2.exceptions.ProtocolError as error:
            # A stream its own state machine closed on a transition it refused is left to
            # end the connection.
            if self._headers_accepted_for != stream_id or self.streams[stream_id].closed:
                raise
            return self._reject(stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR, str(error))
        finally:
            self._admitting_over_limit = False
        protocol_error = h2.errors.ErrorCodes.PROTOCOL_ERROR
        if over_limit:
            self.refused_streams += 1
            why = (h2.errors.ErrorCodes.REFUSED_STREAM, "over SETTINGS_MAX_CONCURRENT_STREAMS")
        elif _ends_short(events):
            why = (protocol_error, "a content-length other than 0 on a request without a body")
        elif (
            _ends_with_trailers(events)
            and declared is not None
            and declared != self._body_length(stream_id)
        ):
            why = (protocol_error, "the body ended (by trailers) short of its content-length")
        else:
            return frames, events
        reset, rejected = self._reject(stream_id, *why)
        return [*frames, *reset], [*_other_streams(events, stream_id), *rejected]

    def _declared_length(self, stream_id: int) -> int | None:
        """
        The content-length a stream's request declared, if any. h2 compares it with the
        body only at a DATA frame that ends the stream, not when trailers end it (and it
        re-reads the length from the trailers). h2 4.4.1's private C{_expected_content_length}.
        """
        declared: int | None = getattr(
            self.streams.get(stream_id), "_expected_content_length", None
        )
        return declared

    def _body_length(self, stream_id: int) -> int:
        """The body bytes a stream has received (h2 4.4.1's C{_actual_content_length})."""
        received: int = getattr(self.streams.get(stream_id), "_actual_content_length", 0)
        return received

    def _receive_data_frame(self, frame: Any) -> tuple[list[Any], list[Any]]:
        try:
            result: tuple[list[Any], list[Any]] = super()._receive_data_frame(frame)
        except h2.exceptions.InvalidBodyLengthError as error:
            # Raised by the stream once its window and the connection's took the frame.
            frames, events = self._reject(
                frame.stream_id, h2.errors.ErrorCodes.PROTOCOL_ERROR, str(error)
            )
            # The stream is closed now: this acknowledges the connection window only.
            self.acknowledge_received_data(frame.flow_controlled_length, frame.stream_id)
            return frames, events
        return result

    def _reject(
        self, stream_id: int, error_code: h2.errors.ErrorCodes, reason: str
    ) -> tuple[list[Any], list[Any]]:
        """Reset a stream: the RST_STREAM frame to send, and the L{StreamRejected} event."""
        frames = self.streams[stream_id].reset_stream(error_code)
        return frames, [StreamRejected(stream_id=stream_id, error_code=error_code, reason=reason)]


def _other_streams(events: list[Any], stream_id: int) -> list[Any]:
    """The events not about C{stream_id}."""
    return [e for e in events if getattr(e, "stream_id", None) != stream_id]


def _ends_with_trailers(events: list[Any]) -> bool:
    """Whether a header block is trailers that end their stream."""
    return any(
        isinstance(event, h2.events.TrailersReceived) and event.stream_ended is not None
        for event in events
    )


def _ends_short(events: list[Any]) -> bool:
    """
    Whether a request ends with its headers while declaring a body (h2 checks the length
    only against DATA frames).
    """
    for event in events:
        if isinstance(event, h2.events.RequestReceived) and event.stream_ended is not None:
            lengths = [v for n, v in event.headers or () if n == b"content-length"]
            return any(int(v) != 0 for v in lengths)
    return False
