"""
An OpenAI-compatible fake upstream on C{twisted.web}, for tests, benchmarks and demos.

L{build_mock_site} serves C{GET /v1/models}, C{POST /v1/chat/completions},
C{POST /v1/completions} and C{POST /v1/embeddings} with filler content, streamed as
server-sent events when asked. Everything is paced by an injected clock and written through an
L{IPushProducer}, so the mock honours backpressure even for streams of tens of megabytes.

Each request may override the configuration with headers:

  - C{x-mock-chunks: N}: content chunks (streamed events, or pieces of a non-streamed answer);
  - C{x-mock-chunk-size: N}: characters of content per chunk;
  - C{x-mock-delay-ms: N}: milliseconds between streamed content chunks;
  - C{x-mock-first-token-ms: N}: milliseconds before the first chunk or the non-streamed answer;
  - C{x-mock-fault: F}: C{429} (with C{Retry-After: 1}), C{500}, C{502}, C{503} (OpenAI-shaped
    errors, answered at once); C{disconnect-after=N} (chat and text completions: send the head
    and N content chunks, then close the connection cleanly before the response is complete);
    C{reset-after=N} (the same, but abort the connection: a TCP reset, which may also discard
    what the client had not read yet);
    C{garbage} (write bytes that are not HTTP, then close); C{hang} (never answer).

Every HTTP response carries C{x-mock-upstream: <name>} and echoes what the mock received in
C{x-mock-saw-authorization}, C{x-mock-saw-host} and C{x-mock-saw-request-id}.

Run one with C{python -m oaiproxy.mock --listen tcp:9001}. Both entry points (that and
C{twistd oaiproxy-mock}) set Python's garbage collector as the proxy's do
(L{tune_mock_collector}).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import itertools
import json
import struct
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import IO, Any, ClassVar, Literal, Protocol, cast

from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IDelayedCall,
    IPushProducer,
    IReactorCore,
    IReactorTime,
    ITransport,
)
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from typing_extensions import override
from zope.interface import implementer

from oaiproxy.config import Runtime
from oaiproxy.gctune import tune_collector
from oaiproxy.listening import Endpoint, Listeners

__all__ = [
    "MockConfig",
    "MockOptions",
    "build_mock_site",
    "main",
    "make_mock_service",
    "tune_mock_collector",
]

_log = Logger(namespace="oaiproxy.mock")  # not "__main__" under python -m

#: Content is cut from this text, repeated: ASCII letters and spaces only, so it can be spliced
#: into JSON without escaping.
_FILLER = (
    b"lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
    b"incididunt ut labore et dolore magna aliqua "
)
#: A placeholder that JSON-encodes to a unique byte string, replaced by filler content.
_MARKER = "\x00oaiproxy-mock-content\x00"
_MARKER_JSON = json.dumps(_MARKER)[1:-1].encode("ascii")
#: Bytes written per reactor turn when nothing paces the stream.
_BATCH_BYTES = 64 * 1024
_MAX_CHUNKS = 10**9
_MAX_CHUNK_SIZE = 64 * 1024 * 1024
_MAX_DIMENSIONS = 4096
_GARBAGE = b"this is not http\r\n\r\n"

_Json = dict[str, Any]


class _Request(Protocol):
    """The parts of C{twisted.web}'s L{Request} the mock uses, typed (Twisted's are not all)."""

    method: bytes
    path: bytes

    @property
    def content(self) -> IO[bytes] | None: ...

    @property
    def transport(self) -> ITransport | None: ...

    def getHeader(self, key: bytes) -> bytes | None: ...

    def setHeader(self, name: bytes, value: bytes) -> None: ...

    def setResponseCode(self, code: int, message: bytes | None = None) -> None: ...

    def write(self, data: bytes) -> None: ...

    def finish(self) -> None: ...

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...

    def notifyFinish(self) -> Deferred[None]: ...


class _RawTransport(Protocol):
    """A connection's own transport: every stream transport has C{abortConnection}."""

    def write(self, data: bytes) -> None: ...

    def loseConnection(self) -> None: ...

    def abortConnection(self) -> None: ...


def _raw_transport(request: _Request) -> _RawTransport:
    """The transport under C{request}, bypassing HTTP framing (to inject faults)."""
    # ITransport does not declare abortConnection, but TCP, TLS and test transports have it.
    return cast(_RawTransport, request.transport)


@dataclass(frozen=True)
class MockConfig:
    """
    How a mock upstream answers unless a request's C{x-mock-*} headers say otherwise.

    @ivar name: sent back in the C{x-mock-upstream} header of every response.
    @ivar chunks: content chunks per answer (streamed events, or pieces of a plain answer).
    @ivar chunk_size: characters of filler content per chunk.
    @ivar delay: seconds between streamed content chunks.
    @ivar first_token_delay: seconds before the first chunk, or before a non-streamed answer.
    @ivar model: the model answered when a request names none; listed by C{/v1/models}.
    @raise ValueError: if a value is out of range.
    """

    name: str = "mock"
    chunks: int = 8
    chunk_size: int = 4
    delay: float = 0.0
    first_token_delay: float = 0.0
    model: str = "mock-gpt"

    def __post_init__(self) -> None:
        if not (self.name and self.name.isascii() and self.name.isprintable()):
            raise ValueError(f"mock name must be printable ASCII, not {self.name!r}")
        if not 0 <= self.chunks <= _MAX_CHUNKS:
            raise ValueError(f"chunks must be between 0 and {_MAX_CHUNKS}, not {self.chunks}")
        if not 1 <= self.chunk_size <= _MAX_CHUNK_SIZE:
            raise ValueError(
                f"chunk_size must be between 1 and {_MAX_CHUNK_SIZE}, not {self.chunk_size}"
            )
        if not self.delay >= 0:
            raise ValueError(f"delay must be >= 0 seconds, not {self.delay}")
        if not self.first_token_delay >= 0:
            raise ValueError(
                f"first_token_delay must be >= 0 seconds, not {self.first_token_delay}"
            )
        if not self.model:
            raise ValueError("model must not be empty")


@dataclass(frozen=True)
class _Fault:
    """A failure injected by C{x-mock-fault}; C{after} counts chunks before a cut."""

    kind: Literal["429", "500", "502", "503", "disconnect", "reset", "garbage", "hang"]
    after: int = 0


@dataclass(frozen=True)
class _Knobs:
    """The effective settings of one request: the config overridden by its headers."""

    chunks: int
    chunk_size: int
    delay: float
    first_token_delay: float
    fault: _Fault | None


class _BadRequestError(Exception):
    """The request cannot be answered; becomes a 400 OpenAI-shaped error."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _header_number(request: _Request, name: bytes, low: int, high: int) -> int | None:
    """The integer in header C{name}, or C{None} if absent; L{_BadRequestError} if invalid."""
    raw = request.getHeader(name)
    if raw is None:
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        raise _BadRequestError(f"{name.decode()} must be an integer", name.decode()) from None
    if not low <= value <= high:
        raise _BadRequestError(f"{name.decode()} must be between {low} and {high}", name.decode())
    return value


def _parse_fault(raw: bytes) -> _Fault:
    """Parse an C{x-mock-fault} value; L{_BadRequestError} if unknown."""
    text = raw.decode("ascii", "replace").strip().lower()
    if text in ("429", "500", "502", "503", "garbage", "hang"):
        return _Fault(cast(Literal["429", "500", "502", "503", "garbage", "hang"], text))
    key, sep, count = text.partition("=")
    if key == "disconnect-after" and sep and count.isdigit():
        return _Fault("disconnect", int(count))
    if key == "reset-after" and sep and count.isdigit():
        return _Fault("reset", int(count))
    raise _BadRequestError(f"unknown x-mock-fault {text!r}", "x-mock-fault")


def _knobs(request: _Request, config: MockConfig) -> _Knobs:
    """The C{x-mock-*} headers of C{request} over C{config}; L{_BadRequestError} if invalid."""
    chunks = _header_number(request, b"x-mock-chunks", 0, _MAX_CHUNKS)
    chunk_size = _header_number(request, b"x-mock-chunk-size", 1, _MAX_CHUNK_SIZE)
    delay_ms = _header_number(request, b"x-mock-delay-ms", 0, 86_400_000)
    first_ms = _header_number(request, b"x-mock-first-token-ms", 0, 86_400_000)
    raw_fault = request.getHeader(b"x-mock-fault")
    return _Knobs(
        chunks=config.chunks if chunks is None else chunks,
        chunk_size=config.chunk_size if chunk_size is None else chunk_size,
        delay=config.delay if delay_ms is None else delay_ms / 1000,
        first_token_delay=config.first_token_delay if first_ms is None else first_ms / 1000,
        fault=None if raw_fault is None else _parse_fault(raw_fault),
    )


def _dumps(value: object) -> bytes:
    """Compact JSON bytes."""
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def _split(encoded: bytes) -> tuple[bytes, bytes]:
    """Split JSON bytes holding L{_MARKER} once into what comes before and after it."""
    before, after = encoded.split(_MARKER_JSON, 1)
    return before, after


def _filler(offset: int, size: int) -> bytes:
    """C{size} bytes of filler text starting C{offset} bytes into the endless filler."""
    start = offset % len(_FILLER)
    repeats = (start + size) // len(_FILLER) + 1
    return (_FILLER * repeats)[start : start + size]


def _error_body(message: str, error_type: str, param: str | None, code: str | None) -> _Json:
    """An OpenAI-shaped error object, all four keys present."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def _count_words(value: object) -> int:
    """A rough token count: the words of the strings in a prompt, messages or inputs."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        if value and all(isinstance(item, int) for item in value):
            return len(value)  # a pre-tokenized prompt
        return sum(_count_words(item) for item in value)
    if isinstance(value, dict):
        return _count_words(value.get("content")) + _count_words(value.get("text"))
    return 0


def _embedding(item: object, dimensions: int) -> list[float]:
    """A deterministic vector in [-1, 1] for one input, derived from SHA-256."""
    seed = json.dumps(item, sort_keys=True).encode("utf-8")
    values: list[float] = []
    for counter in itertools.count():
        digest = hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
        for i in range(0, len(digest), 4):
            number = int.from_bytes(digest[i : i + 4], "big")
            values.append(round(number / 0xFFFFFFFF * 2 - 1, 6))
        if len(values) >= dimensions:
            break
    return values[:dimensions]


@dataclass(frozen=True)
class _Piece:
    """Bytes to write; C{chunk} marks a content chunk, which delays and faults count."""

    data: bytes
    chunk: bool


@implementer(IPushProducer)
class _Streamer:
    """
    Writes pieces to one request, paced by a clock and paused by its consumer.

    Without a delay, up to L{_BATCH_BYTES} are written per reactor turn. After C{cut_after}
    content chunks (if not C{None}), the connection is closed, or aborted if C{reset}, instead
    of finishing the response.
    """

    def __init__(
        self,
        request: _Request,
        clock: IReactorTime,
        pieces: Iterator[_Piece],
        *,
        delay: float,
        cut_after: int | None = None,
        reset: bool = False,
    ) -> None:
        self._request = request
        self._clock = clock
        self._pieces = pieces
        self._delay = delay
        self._cut_after = cut_after
        self._reset = reset
        self._next: _Piece | None = next(pieces, None)
        self._chunks_written = 0
        self._head_sent = False
        self._paused = False
        self._stopped = False
        self._call: IDelayedCall | None = None

    def start(self, first_delay: float) -> None:
        """Register with the request and write the first piece after C{first_delay} seconds."""
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addErrback(self._client_gone)
        self._schedule(first_delay)

    def pauseProducing(self) -> None:
        """The consumer is full: write nothing until resumed."""
        self._paused = True

    def resumeProducing(self) -> None:
        """The consumer has room again: carry on at the next reactor turn."""
        self._paused = False
        if not self._stopped and self._call is None:
            self._schedule(0)

    def stopProducing(self) -> None:
        """Stop for good and cancel whatever was scheduled; safe to call more than once."""
        self._stopped = True
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None

    def _client_gone(self, reason: Failure) -> None:
        """The connection went away before the response ended."""
        if not self._stopped:
            _log.debug("mock client went away: {reason}", reason=reason.getErrorMessage())
        self.stopProducing()

    def _schedule(self, delay: float) -> None:
        self._call = self._clock.callLater(delay, self._tick)

    def _cut_due(self) -> bool:
        return self._cut_after is not None and self._chunks_written >= self._cut_after

    def _tick(self) -> None:
        """Write pieces until paused, a delay is due, the batch is full or the end."""
        self._call = None
        if self._paused or self._stopped:
            return
        if not self._head_sent:
            self._head_sent = True
            self._request.write(b"")  # the response head alone
        budget = _BATCH_BYTES
        while not self._paused and not self._stopped:
            if self._cut_due():
                self._cut()
                return
            piece = self._next
            if piece is None:
                self._end()
                return
            self._request.write(piece.data)
            if piece.chunk:
                self._chunks_written += 1
            budget -= len(piece.data)
            self._next = next(self._pieces, None)
            if self._cut_due():
                self._cut()
                return
            if self._next is not None and self._next.chunk and self._delay > 0:
                self._schedule(self._delay)
                return
            if budget <= 0:
                self._schedule(0)
                return

    def _end(self) -> None:
        self._stopped = True
        self._request.unregisterProducer()
        self._request.finish()

    def _cut(self) -> None:
        self._stopped = True
        transport = _raw_transport(self._request)
        self._request.unregisterProducer()
        _log.info(
            "mock cutting the connection after {chunks} chunks (reset: {reset})",
            chunks=self._chunks_written,
            reset=self._reset,
        )
        if self._reset:
            transport.abortConnection()
        else:
            # The client gets what was written, then a clean end of the connection.
            transport.loseConnection()


_ChoiceMaker = Callable[[str | None, str | None, bool], _Json]


def _chat_choice(content: str | None, finish: str | None, first: bool) -> _Json:
    """One C{chat.completion.chunk} choice; C{content=None} makes an empty delta."""
    delta: _Json = {"role": "assistant"} if first else {}
    if content is not None:
        delta["content"] = content
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


def _text_choice(content: str | None, finish: str | None, first: bool) -> _Json:
    """One streamed C{text_completion} choice."""
    del first  # text completions have no role
    return {"text": content or "", "index": 0, "logprobs": None, "finish_reason": finish}


def _stream_pieces(
    base: _Json,
    choice: _ChoiceMaker,
    knobs: _Knobs,
    include_usage: bool,
    usage: _Json,
) -> Iterator[_Piece]:
    """The server-sent events of one streamed answer, content generated lazily."""
    extra: _Json = {"usage": None} if include_usage else {}

    def event(choices: list[_Json], **more: object) -> bytes:
        return b"data: " + _dumps({**base, "choices": choices, **extra, **more}) + b"\n\n"

    first = _split(event([choice(_MARKER, None, True)]))
    later = _split(event([choice(_MARKER, None, False)]))
    for i in range(knobs.chunks):
        before, after = first if i == 0 else later
        content = _filler(i * knobs.chunk_size, knobs.chunk_size)
        yield _Piece(before + content + after, chunk=True)
    yield _Piece(event([choice(None, "stop", knobs.chunks == 0)]), chunk=False)
    if include_usage:
        yield _Piece(event([], usage=usage), chunk=False)
    yield _Piece(b"data: [DONE]\n\n", chunk=False)


def _body_pieces(before: bytes, after: bytes, knobs: _Knobs) -> Iterator[_Piece]:
    """A JSON body whose content is spliced in chunk by chunk, generated lazily."""
    yield _Piece(before, chunk=False)
    for i in range(knobs.chunks):
        yield _Piece(_filler(i * knobs.chunk_size, knobs.chunk_size), chunk=True)
    yield _Piece(after, chunk=False)


class _MockResource(Resource):
    """The whole mock API as one leaf resource, dispatching on method and path."""

    isLeaf = True
    _MODELS: ClassVar[tuple[str, ...]] = ("mock-gpt", "mock-gpt-mini", "mock-embedding")

    def __init__(self, config: MockConfig, clock: IReactorTime) -> None:
        # untyped_calls_exclude does not reach super() calls into Twisted's untyped Resource.
        super().__init__()  # type: ignore[no-untyped-call]
        self._config = config
        self._clock = clock
        self._ids = itertools.count(1)

    @override
    def render(self, request: Request) -> bytes | int:
        """Answer one request; C{NOT_DONE_YET} when a producer or fault answers later."""
        self._stamp(request)
        method = request.method
        path = request.path
        _log.debug(
            "mock upstream {upstream} got {method} {path}",
            upstream=self._config.name,
            method=method.decode("ascii", "replace"),
            path=path.decode("ascii", "replace"),
        )
        try:
            knobs = _knobs(request, self._config)
            if knobs.fault is not None and knobs.fault.kind not in ("disconnect", "reset"):
                return self._fault(request, knobs.fault)
            if method in (b"GET", b"HEAD") and path == b"/v1/models":
                return self._models(request)
            if method == b"POST" and path == b"/v1/chat/completions":
                return self._completion(request, knobs, _read_json(request), chat=True)
            if method == b"POST" and path == b"/v1/completions":
                return self._completion(request, knobs, _read_json(request), chat=False)
            if method == b"POST" and path == b"/v1/embeddings":
                return self._embeddings(request, knobs, _read_json(request))
        except _BadRequestError as error:
            body = _error_body(error.message, "invalid_request_error", error.param, None)
            return _json_response(request, 400, body)
        # OpenAI's own wording; the path as text, not as a Python bytes literal.
        target = f"{method.decode('ascii', 'replace')} {path.decode('ascii', 'replace')[:200]}"
        message = f"Invalid URL ({target})"
        return _json_response(
            request, 404, _error_body(message, "invalid_request_error", None, "unknown_url")
        )

    def _stamp(self, request: _Request) -> None:
        """Set the headers every response carries."""
        request.setHeader(b"x-mock-upstream", self._config.name.encode("ascii"))
        # Echoing the credential is for tests of key injection only: never do this for real.
        for received, echoed in (
            (b"authorization", b"x-mock-saw-authorization"),
            (b"host", b"x-mock-saw-host"),
            (b"x-request-id", b"x-mock-saw-request-id"),
        ):
            value = request.getHeader(received)
            if value is not None:
                request.setHeader(echoed, value)

    def _fault(self, request: _Request, fault: _Fault) -> bytes | int:
        """Answer with the injected fault instead of the API."""
        _log.info(
            "mock upstream {upstream} injecting fault {fault}",
            upstream=self._config.name,
            fault=fault.kind,
        )
        if fault.kind == "429":
            request.setHeader(b"retry-after", b"1")
            message = "Rate limit reached for requests (mock upstream)"
            body = _error_body(message, "requests", None, "rate_limit_exceeded")
            return _json_response(request, 429, body)
        if fault.kind in ("500", "502", "503"):
            messages = {
                "500": "The server had an error while processing your request (mock upstream)",
                "502": "Bad gateway (mock upstream)",
                "503": "The engine is currently overloaded (mock upstream)",
            }
            body = _error_body(messages[fault.kind], "server_error", None, None)
            return _json_response(request, int(fault.kind), body)
        if fault.kind == "garbage":
            transport = _raw_transport(request)
            transport.write(_GARBAGE)
            transport.loseConnection()
            return NOT_DONE_YET
        # hang: answer nothing; the request ends when the client goes away.
        request.notifyFinish().addErrback(lambda _: None)
        return NOT_DONE_YET

    def _models(self, request: _Request) -> bytes:
        ids = dict.fromkeys((self._config.model, *self._MODELS))
        data = [
            {"id": i, "object": "model", "created": 0, "owned_by": "oaiproxy-mock"} for i in ids
        ]
        body = _json_response(request, 200, {"object": "list", "data": data})
        if request.method == b"HEAD":
            # As GET, without the body: its length is said (Twisted would log eating it).
            request.setHeader(b"content-length", b"%d" % (len(body),))
            return b""
        return body

    def _model(self, body: _Json) -> str:
        """The model a request named, echoed as OpenAI does, else the configured one."""
        model = body.get("model")
        return model if isinstance(model, str) and model else self._config.model

    def _completion(self, request: _Request, knobs: _Knobs, body: _Json, *, chat: bool) -> int:
        """Answer a chat or text completion, streamed or not."""
        if chat:
            if not isinstance(body.get("messages"), list):
                raise _BadRequestError("'messages' is a required array", "messages")
            prompt_tokens = _count_words(body["messages"])
        else:
            if "prompt" not in body:
                raise _BadRequestError("'prompt' is required", "prompt")
            prompt_tokens = _count_words(body["prompt"])
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": knobs.chunks,
            "total_tokens": prompt_tokens + knobs.chunks,
        }
        stream = body.get("stream") is True
        if chat:
            kind = "chat.completion.chunk" if stream else "chat.completion"
        else:
            kind = "text_completion"
        base: _Json = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-mock-{next(self._ids)}",
            "object": kind,
            "created": int(self._clock.seconds()),
            "model": self._model(body),
        }
        if chat:
            base["system_fingerprint"] = None
        fault = knobs.fault
        cut_after = None if fault is None else min(fault.after, knobs.chunks)
        reset = fault is not None and fault.kind == "reset"
        pieces: Iterator[_Piece]
        delay = 0.0
        if stream:
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            choice = _chat_choice if chat else _text_choice
            pieces = _stream_pieces(base, choice, knobs, include_usage, usage)
            delay = knobs.delay
            request.setHeader(b"content-type", b"text/event-stream")
            request.setHeader(b"cache-control", b"no-cache")
        else:
            answer: _Json
            if chat:
                message = {"role": "assistant", "content": _MARKER, "refusal": None}
                answer = {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            else:
                answer = {"text": _MARKER, "index": 0, "logprobs": None, "finish_reason": "stop"}
            before, after = _split(_dumps({**base, "choices": [answer], "usage": usage}))
            length = len(before) + knobs.chunks * knobs.chunk_size + len(after)
            pieces = _body_pieces(before, after, knobs)
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-length", b"%d" % (length,))
        streamer = _Streamer(
            request, self._clock, pieces, delay=delay, cut_after=cut_after, reset=reset
        )
        streamer.start(knobs.first_token_delay)
        return NOT_DONE_YET

    def _embeddings(self, request: _Request, knobs: _Knobs, body: _Json) -> int:
        """Answer an embeddings request with deterministic vectors."""
        raw = body.get("input")
        inputs: list[object]
        if isinstance(raw, str):
            inputs = [raw]
        elif isinstance(raw, list) and raw and all(isinstance(i, int) for i in raw):
            inputs = [raw]  # one pre-tokenized input
        elif isinstance(raw, list) and raw and all(isinstance(i, str | list) for i in raw):
            inputs = list(raw)
        else:
            raise _BadRequestError("'input' must be a string or a non-empty array", "input")
        dimensions = body.get("dimensions", 8)
        if not isinstance(dimensions, int) or not 1 <= dimensions <= _MAX_DIMENSIONS:
            raise _BadRequestError(f"'dimensions' must be 1 to {_MAX_DIMENSIONS}", "dimensions")
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise _BadRequestError(
                "'encoding_format' must be 'float' or 'base64'", "encoding_format"
            )
        data: list[_Json] = []
        for index, item in enumerate(inputs):
            vector = _embedding(item, dimensions)
            embedding: object = vector
            if encoding == "base64":
                packed = struct.pack(f"<{dimensions}f", *vector)
                embedding = base64.b64encode(packed).decode("ascii")
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = _count_words(inputs)
        answer = {
            "object": "list",
            "data": data,
            "model": self._model(body),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        encoded = _dumps(answer)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"%d" % (len(encoded),))
        pieces = iter([_Piece(encoded, chunk=False)])
        streamer = _Streamer(request, self._clock, pieces, delay=0.0)
        streamer.start(knobs.first_token_delay)
        return NOT_DONE_YET


def _read_json(request: _Request) -> _Json:
    """The request body as a JSON object; L{_BadRequestError} if it is not one."""
    raw = request.content.read() if request.content is not None else b""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise _BadRequestError(
            f"We could not parse the JSON body of your request: {error}"
        ) from None
    if not isinstance(body, dict):
        raise _BadRequestError("The JSON body of your request must be an object")
    return body


def _json_response(request: _Request, status: int, body: _Json) -> bytes:
    """Set status and JSON headers on C{request}; return the body for C{render}."""
    # The standard phrase: Twisted's table lacks 429 (it would write "Unknown Status").
    request.setResponseCode(status, HTTPStatus(status).phrase.encode("ascii"))
    request.setHeader(b"content-type", b"application/json")
    return _dumps(body)


def build_mock_site(config: MockConfig, clock: IReactorTime) -> Site:
    """
    A L{Site} serving the mock OpenAI API described in this module's docstring.

    @param clock: paces streams and faults, and times out idle HTTP connections.
    """
    resource = _MockResource(config, clock)
    # The clock also times out idle connections.
    site = Site(resource, reactor=clock, parsePOSTFormSubmission=False)
    site.displayTracebacks = False
    return site


class MockOptions(usage.Options):
    """Command-line options of a mock upstream, for a C{twistd} plugin."""

    optParameters: ClassVar[list[list[Any]]] = [
        ["name", None, "mock", "Name sent back in the x-mock-upstream header."],
        ["chunks", None, 8, "Content chunks per answer.", int],
        ["chunk-size", None, 4, "Characters of content per chunk.", int],
        ["delay-ms", None, 0.0, "Milliseconds between streamed chunks.", float],
        ["first-token-ms", None, 0.0, "Milliseconds before the first chunk.", float],
        ["model", None, "mock-gpt", "Model answered when a request names none."],
    ]

    def __init__(self) -> None:
        # untyped_calls_exclude does not reach super() calls into Twisted's untyped Options.
        super().__init__()  # type: ignore[no-untyped-call]
        self["listen"] = []

    def opt_listen(self, description: str) -> None:
        """Listen on this endpoint description (repeatable; default tcp:9001)."""
        self["listen"].append(description)

    @override
    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = ["tcp:9001"]
        try:
            self.config()
        except ValueError as error:
            raise usage.UsageError(str(error)) from None

    def config(self) -> MockConfig:
        """The L{MockConfig} these options describe; C{ValueError} if out of range."""
        return MockConfig(
            name=self["name"],
            chunks=self["chunks"],
            chunk_size=self["chunk-size"],
            delay=self["delay-ms"] / 1000,
            first_token_delay=self["first-token-ms"] / 1000,
            model=self["model"],
        )


def make_mock_service(options: MockOptions, reactor: IReactorTime) -> IService:
    """
    A service listening with one mock site on every C{--listen} endpoint of C{options}.

    @param reactor: paces the mock and, being a real reactor, is where endpoints listen.
    """
    config = options.config()
    site = build_mock_site(config, reactor)
    return Listeners("oaiproxy-mock", site, _endpoints(reactor, options["listen"], config))


def tune_mock_collector(reactor: IReactorCore) -> None:
    """
    Set the collector as the proxy's entry points do by default (L{oaiproxy.gctune}): a
    young threshold of 10,000 and the start-up heap frozen once C{reactor} runs. With
    Python's defaults the mock's full collections scanned its whole start-up heap (Twisted,
    its modules) for 25-33 ms, at moments that fell at random into benchmark bursts, the
    direct ones and the proxied ones alike (bench/FINDINGS.md). For the entry points only:
    the settings are the process's.
    """
    runtime = Runtime()
    tune_collector(reactor, threshold=runtime.gc_threshold, freeze=runtime.gc_freeze)


def _endpoints(reactor: Any, descriptions: Sequence[str], config: MockConfig) -> list[Endpoint]:
    """The server endpoints of C{--listen} values; L{SystemExit} naming a bad one."""
    endpoints = []
    for description in descriptions:
        try:
            endpoint = serverFromString(reactor, description)
        except (ValueError, TypeError, KeyError) as error:
            raise SystemExit(f"oaiproxy-mock: bad --listen {description!r}: {error}") from None
        endpoints.append(Endpoint(endpoint, description, f"mock upstream {config.name!r}"))
    return endpoints


def _parse_args(argv: Sequence[str]) -> tuple[MockConfig, list[str]]:
    """The configuration and listen endpoints of the command line C{argv} (without argv[0])."""
    parser = argparse.ArgumentParser(
        prog="python -m oaiproxy.mock",
        description="An OpenAI-compatible fake upstream. Requests may override the defaults "
        "below with x-mock-* headers (chunks, chunk size, delays, faults): see docs/mock.md.",
    )
    parser.add_argument(
        "--listen",
        action="append",
        default=[],
        metavar="ENDPOINT",
        help="Twisted endpoint to listen on, e.g. tcp:9001:interface=127.0.0.1 "
        "(repeatable; default tcp:9001)",
    )
    parser.add_argument("--name", default="mock", help="sent back in x-mock-upstream")
    parser.add_argument("--chunks", type=int, default=8, help="content chunks per answer")
    parser.add_argument(
        "--chunk-size", type=int, default=4, help="characters of content per chunk"
    )
    parser.add_argument(
        "--delay-ms", type=float, default=0.0, help="milliseconds between streamed chunks"
    )
    parser.add_argument(
        "--first-token-ms",
        type=float,
        default=0.0,
        help="milliseconds before the first chunk (or the whole non-streamed answer)",
    )
    parser.add_argument(
        "--model", default="mock-gpt", help="model answered when a request names none"
    )
    args = parser.parse_args(list(argv))
    try:
        config = MockConfig(
            name=args.name,
            chunks=args.chunks,
            chunk_size=args.chunk_size,
            delay=args.delay_ms / 1000,
            first_token_delay=args.first_token_ms / 1000,
            model=args.model,
        )
    except ValueError as error:
        parser.error(str(error))
    return config, list(args.listen) or ["tcp:9001"]


def main(argv: list[str] | None = None) -> None:
    """Run a mock upstream until interrupted: C{python -m oaiproxy.mock --listen tcp:9001}."""
    config, listens = _parse_args(sys.argv[1:] if argv is None else argv)
    # An entry point, the one place allowed to use the global reactor: import it late.
    from twisted.internet import reactor as _reactor

    reactor = cast(IReactorCore, _reactor)
    # Info and up only: a debug line per request would slow benchmarks down.
    observer = FilteringLogObserver(
        textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(LogLevel.info)]
    )
    globalLogBeginner.beginLoggingTo([observer])
    site = build_mock_site(config, cast(IReactorTime, reactor))
    # Raises SystemExit, naming the address, when one cannot listen.
    Listeners("oaiproxy-mock", site, _endpoints(reactor, listens, config)).startService()
    tune_mock_collector(reactor)
    reactor.run()


if __name__ == "__main__":
    main()
