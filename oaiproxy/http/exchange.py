"""
One request's upstream phases: pick an upstream, forward, fail over while nothing was sent
downstream, enforce the first-byte and total deadlines, and hand the response to the relay.

A client that goes away cancels whatever is under way: the connection attempt, the wait for
headers (cancelling the client's Deferred), or the body (stopping its transport).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse
from twisted.web.server import Request
from typing_extensions import override

from oaiproxy.balancing.pool import Pool, Upstream
from oaiproxy.config import Deadlines, Limits
from oaiproxy.context import RequestContext
from oaiproxy.errors import (
    NoUpstreamAvailable,
    ProxyError,
    UpstreamAnswer,
    UpstreamBadStatus,
    UpstreamConnectFailed,
    UpstreamTimeout,
)
from oaiproxy.http.forwarder import Forwarder, map_failure
from oaiproxy.http.headers import for_log, retry_after
from oaiproxy.http.relay import Relay

__all__ = ["Exchange"]

log = Logger()

#: Statuses after which another upstream is tried, if nothing was sent downstream yet: every
#: 5xx, and 429 (that upstream is rate limited, another may not be; shared/BAD-INPUTS.md).
#: Other 4xx are the client's own mistakes and are passed through.
FAILOVER_STATUSES = frozenset({429, *range(500, 600)})

#: Statuses whose C{Retry-After} leaves their upstream out of picks for that long.
COOLDOWN_STATUSES = frozenset({429, 503})


class _Discard(Protocol):
    """Throws a response body away by closing its connection (it will not be reused)."""

    @override
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.stopProducing()  # type: ignore[attr-defined]


# How close (in seconds) a timer's time must be to a deadline to stand for it: the clock
# moves on between computing a deadline and the reactor timing its call.
_EPSILON = 0.001


def _is_json(response: IResponse) -> bool:
    """Whether C{response}'s body says it is JSON (C{application/json}, C{...+json})."""
    types: list[bytes] | None = response.headers.getRawHeaders(b"content-type")
    if not types:
        return False
    media = types[0].partition(b";")[0].strip().lower()
    return media == b"application/json" or media.endswith(b"+json")


def _answer_error(response: IResponse) -> UpstreamAnswer:
    """The upstream's non-JSON C{5xx} or C{429}, as an OpenAI-shaped error (L{UpstreamAnswer})."""
    passed = [
        (name.lower(), value)
        for name, values in response.headers.getAllRawHeaders()
        if name.lower() in _PASSED or name.lower().startswith(b"x-ratelimit-")
        for value in values[:1]
    ]
    # Both the upstream's words: escaped, for the log line the error makes.
    phrase = for_log(response.phrase.decode("ascii", "replace"), 64)
    status = f"{response.code} {phrase}" if phrase else str(response.code)
    types = response.headers.getRawHeaders(b"content-type")
    what = "an empty body" if response.length == 0 else "a body that is not JSON"
    if types and response.length != 0:
        media = for_log(types[0].partition(b";")[0].strip().decode("ascii", "replace"), 64)
        what = f"a body of type {media}"
    return UpstreamAnswer(response.code, f"upstream answered {status} with {what}", passed)


#: The upstream's headers an L{UpstreamAnswer} passes on, beside C{x-ratelimit-*}: when to
#: come back, and those passed untouched on any answer (shared/BAD-INPUTS.md).
_PASSED = frozenset(
    {
        b"retry-after",
        b"retry-after-ms",
        b"x-request-id",
        b"openai-processing-ms",
        b"openai-organization",
        b"openai-version",
    }
)


class Exchange:
    """
    Drives one client request through the upstream phases until it is answered.

    @param on_error: writes an error response to the client; the resource layer's one error
        mapping. Called at most once, only while nothing else was written downstream.
    """

    def __init__(
        self,
        ctx: RequestContext,
        request: Request,
        *,
        pool: Pool,
        forwarder: Forwarder,
        clock: IReactorTime,
        deadlines: Deadlines,
        limits: Limits,
        on_error: Callable[[ProxyError], None],
    ) -> None:
        self.ctx = ctx
        self._request = request
        self._pool = pool
        self._forwarder = forwarder
        self._clock = clock
        self._deadlines = deadlines
        self._limits = limits
        self._on_error = on_error
        self._tried: list[str] = []
        self._last_error: ProxyError | None = None
        self._pending: Deferred[IResponse] | None = None
        self._relay: Relay | None = None
        self._upstream: Upstream | None = None
        # One timer for both deadlines, due at the earlier one (see _arm_deadline).
        self._deadline_call: IDelayedCall | None = None
        self._first_byte_at: float | None = None
        self._total_at: float | None = None
        self.done = False
        self.client_gone = False
        # Whether the request holds _client_went_away (see start and _finish).
        self._hooked = False

    def start(self) -> None:
        """Begin: try an upstream, watch for the client going away, arm the total deadline."""
        # The first attempt goes first: its request is on its way upstream while the rest is
        # set up (nothing can end the exchange but the attempt itself until this returns).
        self._attempt()
        if self.done:
            return  # answered already (no upstream to try)
        request: Any = self._request
        if hasattr(request, "on_client_lost"):  # a ProxyRequest: a callback, not a Deferred
            request.on_client_lost = self._client_went_away
            self._hooked = True
        else:
            request.notifyFinish().addErrback(self._client_went_away)
        total = self._deadlines.total
        if total is not None:
            self._total_at = self.ctx.started + total
            self._arm_deadline()

    # -- attempts ------------------------------------------------------------------------

    def _attempt(self) -> None:
        now = self._clock.seconds()
        upstream = self._pool.pick(exclude=self._tried, now=now)
        if upstream is None:
            self._give_up(self._last_error or self._none_available(now))
            return
        self._tried.append(upstream.name)
        self._upstream = upstream
        try:
            d = self._forwarder.send(self.ctx, upstream)
        except ProxyError as e:
            self._give_up(e)
            return
        self._pending = d
        first_byte = self._deadlines.first_byte
        if first_byte is not None:
            self._first_byte_at = now + first_byte
            self._arm_deadline()
        d.addCallbacks(self._got_response, self._attempt_failed)

    def _none_available(self, now: float) -> ProxyError:
        """The answer when no upstream may be tried: every one is cooling down."""
        left = self._pool.cooling_left(now)
        wait = 1 if left is None else max(1, math.ceil(left))
        return NoUpstreamAvailable(
            "no upstream is available: every one asked for time (Retry-After)"
            if left is not None
            else "no upstream is available",
            retry_after=wait,
        )

    def _can_retry(self) -> bool:
        return len(self._tried) < min(self._limits.max_attempts, len(self._pool.upstreams))

    def _record(self, outcome: str) -> None:
        name = self._upstream.name if self._upstream is not None else "-"
        self.ctx.attempts.append((name, outcome))

    def _attempt_failed(self, failure: Failure) -> None:
        self._pending = None
        self._cancel_first_byte()
        if self.done:
            return  # cancelled by us: deadline or client gone
        error = map_failure(failure)
        self._record(error.code or "error")
        self._failed(error)

    def _failed(self, error: ProxyError) -> None:
        """This attempt failed with nothing sent downstream: the next upstream, or C{error}."""
        self._log("upstream {upstream} failed for {request_id}: {error}", error=error.message)
        self._last_error = error
        if error.retryable and self._can_retry():
            self._attempt()
        else:
            self._give_up(error)

    def _log(self, text: str, **fields: object) -> None:
        """An info line about this exchange: C{{upstream}} and C{{request_id}} are filled in."""
        log.info(
            text,
            upstream=self._upstream.name if self._upstream else "-",
            request_id=self.ctx.request_id.decode("ascii", "replace"),
            **fields,
        )

    def _got_response(self, response: IResponse) -> None:
        self._pending = None
        if self.done:
            response.deliverBody(_Discard())
            return
        now = self._clock.seconds()
        if response.code in COOLDOWN_STATUSES and self._upstream is not None:
            wait = retry_after(response.headers, now)
            if wait is not None:
                self._pool.cool_down(self._upstream.name, now + wait)
                log.info(
                    "upstream {upstream} answered {status}: left out for {wait:g}s",
                    upstream=self._upstream.name,
                    status=response.code,
                    wait=wait,
                )
        if (
            response.code in FAILOVER_STATUSES
            and self._can_retry()
            and self._pool.any_left(self._tried, now)
        ):
            # Otherwise this answer is passed through: the upstream's own status, body and
            # headers (Retry-After, x-ratelimit-*) say more than a proxy error would.
            self._record(str(response.code))
            self._cancel_first_byte()
            response.deliverBody(_Discard())
            self._last_error = UpstreamBadStatus(f"upstream answered {response.code}")
            self._log(
                "upstream {upstream} answered {status} for {request_id}: trying another",
                status=response.code,
            )
            self._attempt()
            return
        self._record(str(response.code))
        if response.code >= 500 or response.code == 429:
            if not _is_json(response) and self._request.method != b"HEAD":
                # A gateway's HTML page, say: not what an OpenAI client can read.
                self._cancel_first_byte()
                response.deliverBody(_Discard())
                self._log(
                    "upstream {upstream} answered {status} for {request_id} with a body "
                    "that is not JSON: passed on as an OpenAI-shaped error",
                    status=response.code,
                )
                self._give_up(_answer_error(response))
                return
            self._log(
                "upstream {upstream} answered {status} for {request_id}: passed through",
                status=response.code,
            )
        self._relay = Relay(
            self._request,
            response,
            self._clock,
            request_id=self.ctx.request_id,
            idle_timeout=self._deadlines.idle,
            send_timeout=self._deadlines.send,
            on_first_byte=self._cancel_first_byte,
            on_end=self._relay_ended,
        )
        self._relay.start()

    def _relay_ended(self, error: ProxyError | None) -> None:
        if error is None:
            self._finish()
            return
        relay = self._relay
        if relay is None or relay.committed or self.done or self.client_gone:
            self._give_up(error)
            return
        # A broken body before anything went to the client (a malformed first chunk) is a
        # broken response, as a malformed head is: this attempt failed.
        if self.ctx.attempts:  # this upstream's outcome: not its status after all
            self.ctx.attempts[-1] = (self.ctx.attempts[-1][0], error.code or "error")
        self._cancel_first_byte()
        self._relay = None
        self._failed(error)

    # -- endings -------------------------------------------------------------------------

    def _finish(self) -> None:
        """
        Mark the exchange done: cancel its timers, drop the request body, which no
        attempt will need again (the exchange lives as long as its request, and a body can be
        max_body_bytes), and the request's hold on the exchange (a reference cycle).
        """
        self.done = True
        self._cancel_timers()
        self.ctx.body = b""
        if self._hooked:
            self._hooked = False
            request: Any = self._request
            request.on_client_lost = None

    def _give_up(self, error: ProxyError) -> None:
        """Answer the client with C{error}; nothing has been written downstream yet."""
        if self.done:
            return
        self._finish()
        if isinstance(error, UpstreamConnectFailed | UpstreamBadStatus) and not error.retry_after:
            error.retry_after = 1
        if not self.client_gone:
            self._on_error(error)

    def _abandon(self, error: ProxyError | None) -> None:
        """Stop the upstream work under way; with an C{error}, tell the client."""
        if self.done:
            return
        if self._relay is not None:
            self._relay.abort(error)  # ends through _relay_ended
            if not self.done:
                self._finish()
            return
        pending, self._pending = self._pending, None
        if error is not None:
            self._give_up(error)
        else:
            self._finish()
        if pending is not None:
            pending.cancel()

    def _client_went_away(self, reason: Failure) -> None:
        self.client_gone = True
        if self.done:
            return
        log.info(
            "client went away, cancelling upstream for {request_id}",
            request_id=self.ctx.request_id.decode("ascii", "replace"),
        )
        self._abandon(None)

    # -- deadlines -----------------------------------------------------------------------

    def _arm_deadline(self) -> None:
        """
        Have the timer due at the earlier of the deadlines set. Timers are a noticeable part
        of a request's cost (two made and cancelled per request were about 5% of its
        instructions), so there is one, and it is only ever brought forward here: once the
        first byte is in, or another attempt starts, it stays where it was, and fires early
        (once per attempt at most) to be set again (see L{_deadline_reached}).
        """
        first_byte_at, total_at = self._first_byte_at, self._total_at
        if first_byte_at is None:
            due = total_at
        elif total_at is None or first_byte_at < total_at:
            due = first_byte_at
        else:
            due = total_at
        if due is None:
            return
        call = self._deadline_call
        if call is not None and call.active():
            if due >= call.getTime() - _EPSILON:
                return  # due then already, or later: it stays (moving a timer sooner costs
                # a linear search of the reactor's heap)
            call.reset(max(0.0, due - self._clock.seconds()))
            return
        self._deadline_call = self._clock.callLater(
            max(0.0, due - self._clock.seconds()), self._deadline_reached
        )

    def _deadline_reached(self) -> None:
        self._deadline_call = None
        if self.done:
            return
        now = self._clock.seconds() + _EPSILON
        if self._first_byte_at is not None and now >= self._first_byte_at:
            self._first_byte_at = None
            self._abandon(
                UpstreamTimeout(
                    f"no response from the upstream within {self._deadlines.first_byte:g}s"
                )
            )
        elif self._total_at is not None and now >= self._total_at:
            self._total_at = None
            self._abandon(
                UpstreamTimeout(f"the request took longer than {self._deadlines.total:g}s")
            )
        else:
            self._arm_deadline()  # early: the first byte came meanwhile

    def _cancel_first_byte(self) -> None:
        self._first_byte_at = None

    def _cancel_timers(self) -> None:
        self._first_byte_at = self._total_at = None
        call, self._deadline_call = self._deadline_call, None
        if call is not None and call.active():
            call.cancel()
