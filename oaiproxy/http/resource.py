"""
The HTTP edge: the request class (with its body cap), the one resource that takes every
request, and the one place where a L{ProxyError} becomes an OpenAI-shaped JSON response.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache
from types import MappingProxyType
from typing import Any, ClassVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http import NO_BODY_CODES, datetimeToString, toChunk
from twisted.web.http import Request as _HTTPRequest
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from typing_extensions import override

from oaiproxy.balancing.pool import Pool
from oaiproxy.config import Deadlines, Limits
from oaiproxy.context import RequestContext
from oaiproxy.errors import (
    BodyTooLarge,
    InvalidJSON,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    ProxyError,
)
from oaiproxy.http.early import early_error_response, reason_phrase, request_id_for
from oaiproxy.http.exchange import Exchange
from oaiproxy.http.forwarder import Forwarder
from oaiproxy.http.headers import (
    FORWARDED_ALLOW,
    FORWARDED_METHODS,
    for_log,
    is_printable,
    is_valid_value,
    raw_values,
    set_checked,
)

__all__ = ["ProxyRequest", "ProxyResource", "request_factory", "write_error"]

log = Logger()


class _Body:
    """
    A request body held in memory, as a file-like object for Twisted's request.

    Twisted's request puts a body of unknown length (HTTP/2 without C{content-length}, a
    chunked upload) or of 100,000 bytes or more in a temporary file on disk. The proxy reads
    every body whole before forwarding it, so the file bought nothing: it cost an open, an
    unlink and a close per request, needed a writable temporary directory, and put clients'
    prompts on disk. The cap on body size bounds what is held here. The pieces are joined
    once, when the body is first read.
    """

    def __init__(self) -> None:
        self._pieces: list[bytes] = []
        self._size = 0
        self._position = 0

    def write(self, data: bytes) -> None:
        """Add C{data} at the end (Twisted only appends)."""
        self._pieces.append(data)
        self._size += len(data)
        self._position = self._size

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._position, self._size)[whence]
        self._position = min(max(base + offset, 0), self._size)
        return self._position

    def tell(self) -> int:
        return self._position

    def read(self, size: int = -1) -> bytes:
        if len(self._pieces) > 1:
            self._pieces = [b"".join(self._pieces)]
        whole = self._pieces[0] if self._pieces else b""
        start = self._position
        end = self._size if size < 0 else min(start + size, self._size)
        self._position = end
        return whole if (start, end) == (0, self._size) else whole[start:end]

    def close(self) -> None:
        self._pieces = []
        self._size = self._position = 0


class _Sink:
    """A content file that forgets what it is given (bodies over the cap)."""

    def write(self, data: bytes) -> None:
        """Drop C{data}."""

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    def tell(self) -> int:
        return 0

    def read(self, size: int = -1) -> bytes:
        return b""

    def close(self) -> None:
        """Nothing to close."""


def _drop(data: bytes) -> None:
    """The write of a response that has no body (HEAD, 204, 304)."""


@lru_cache(maxsize=1)
def _http_date(second: int) -> bytes:
    """The HTTP C{Date} value for C{second}, formatted once per second."""
    value: bytes = datetimeToString(second)
    return value


class ProxyRequest(server.Request):
    """
    A request whose body is capped at C{max_body_bytes}.

    Over HTTP/1.1 a body known (or found) to be over the cap is answered with 413 at once and
    the connection is closed, before more of it is read; over HTTP/2 the connection answers
    the stream with 413 at once and resets it (L{oaiproxy.http.h2fix.ProxyH2Connection}),
    reading C{max_body_bytes} and C{body_too_large} here.
    """

    max_body_bytes: ClassVar[int] = 32 * 1024 * 1024
    defaultContentType = None
    body_too_large = False
    # Set when the 413 went straight to the HTTP/1.1 transport: nothing more may be written.
    answered_early = False
    _received = 0

    #: Called once with the reason if the client goes away before the answer is finished:
    #: what an errback on C{notifyFinish()} would get, without a Deferred per request
    #: (about 2.6% of a request's instructions). The exchange's.
    on_client_lost: Callable[[Failure], object] | None = None

    # What Twisted's constructors, requestReceived and process set on every request, and no
    # request here changes: set once here, read-only. In CPython 3.11 a class's instances
    # keep their attributes in a compact array, read by specialized instructions, only up
    # to 29 names (across all its instances); past that each instance turns them into a
    # dictionary when it sets one more, and every later access is slower. A streamed
    # request set 33, a whole answer's 30: 7,000 instructions more per request.
    queued = False
    _parsePOSTFormSubmission = False
    received_cookies: dict[bytes, bytes] = MappingProxyType({})  # type: ignore[assignment]  # never parsed
    # Read-only stand-ins for Twisted's lists and dictionaries, typed as Twisted types those.
    cookies: list[bytes] = ()  # type: ignore[assignment]  # the proxy sets none (see addCookie)
    args: dict[Any, Any] = MappingProxyType({})  # type: ignore[assignment]  # query never parsed
    prepath: list[bytes] = ()  # type: ignore[assignment]  # no traversal: one leaf takes all
    postpath: list[bytes] = ()  # type: ignore[assignment]

    @override
    def connectionLost(self, reason: Failure) -> None:
        callback, self.on_client_lost = self.on_client_lost, None
        super().connectionLost(reason)  # type: ignore[no-untyped-call]
        if callback is not None and not self.finished:
            try:
                callback(reason)
            except Exception:
                # Contained, as a Deferred's errback would be: an HTTP/2 connection tells
                # its other streams next.
                log.failure("while handling a client going away")

    def __init__(
        self, channel: Any, queued: object = False, parsePOSTFormSubmission: bool | None = None
    ) -> None:
        """
        What the constructors of Twisted's C{server.Request}, C{http.Request} and
        C{Componentized} set (Twisted 26.10.0), without their look-ups: the request is never
        queued, and never parses form bodies.
        """
        self.notifications: list[Deferred[None]] = []
        self.channel = channel
        self.client = channel.getPeer()
        self.host = channel.getHost()
        self.requestHeaders = Headers()
        self.responseHeaders = Headers()
        self.transport = channel.transport
        self._adapterCache: dict[Any, Any] = {}

    @override
    def process(self) -> None:
        """
        Twisted's C{Request.process} for a site whose root resource is the one leaf that
        takes every request: no C{Server} header (the proxy names no server), a C{Date}
        header formatted once per second on the site's clock, and no path traversal.
        """
        channel: Any = self.channel
        site: Any = channel.site
        self.site = site
        set_checked(self.responseHeaders, b"date", _http_date(int(site.reactor.seconds())))
        self.sitepath: list[bytes] = []
        try:
            self.render(site.resource)  # type: ignore[no-untyped-call]
        except BaseException:
            self.processingFailed(Failure())  # type: ignore[no-untyped-call]

    @override
    def addCookie(self, *args: Any, **kwargs: Any) -> Any:
        """Twisted's, on a list of this request's own (the class holds an empty tuple)."""
        if not isinstance(self.cookies, list):
            self.cookies = []
        return super().addCookie(*args, **kwargs)  # type: ignore[no-untyped-call]

    @override
    def parseCookies(self) -> None:
        """Nothing: the proxy passes C{Cookie} on as it came, and reads no cookie itself."""

    @override
    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """
        Twisted's, without what a proxy has no use for: the query string parsed into
        C{args}, and a header look-up for a form body (never parsed: the site turns
        C{parsePOSTFormSubmission} off).
        """
        content: Any = self.content
        content.seek(0, 0)
        self.method, self.uri = command, path
        self.clientproto = version
        self.path = path.split(b"?", 1)[0]
        self.process()

    @override
    def write(self, data: bytes) -> None:
        """
        Twisted's C{http.Request.write}, its first write (the head) made with direct look-ups
        in the response headers. C{server.Request}'s own write first looks for a default
        C{Content-Type} to add (this request has none: C{defaultContentType} is C{None}) and
        for an encoder (the resource has none): two header look-ups per response. (Twisted's
        named at import: C{twisted.web.http} is a deprecation proxy, slow to look
        attributes up in.) Twisted 26.10.0: C{Headers._rawHeaders} is private.
        """
        if (
            self.startedWriting
            or self.finished
            or self._disconnected
            or self.lastModified is not None
            or self.etag is not None
            or self.cookies
        ):
            _HTTPRequest.write(self, data)
            return
        self.startedWriting = 1
        version: bytes = self.clientproto
        method: bytes = self.method
        code: int = self.code
        headers = self.responseHeaders
        if (
            version == b"HTTP/1.1"
            and not headers._rawHeaders.get(b"Content-Length")
            and method != b"HEAD"
            and code not in NO_BODY_CODES
        ):
            headers._rawHeaders[b"Transfer-Encoding"] = [b"chunked"]
            self.chunked = 1
        channel: Any = self.channel
        channel.writeHeaders(version, b"%d" % (code,), self.code_message, headers)
        if method == b"HEAD" or code in NO_BODY_CODES:
            # As Twisted: no body goes out, whatever is written (the relay looks for this).
            self.write = _drop  # type: ignore[method-assign]
            return
        self.sentLength = self.sentLength + len(data)
        if data:
            if self.chunked:
                channel.writeSequence(toChunk(data))
            else:
                channel.write(data)

    @override
    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body_bytes:
            self._too_large()
            return
        self.content = _Body()

    @override
    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        self._received += len(data)
        if self._received > self.max_body_bytes:
            self._too_large()
            return
        super().handleContentChunk(data)  # type: ignore[no-untyped-call]

    def _too_large(self) -> None:
        self.body_too_large = True
        old = getattr(self, "content", None)
        if old is not None and not isinstance(old, _Sink):
            old.close()
        self.content = _Sink()
        channel: Any = self.channel
        transport = getattr(channel, "transport", None)
        if transport is not None and hasattr(channel, "_networkProducer"):
            # HTTP/1.1: answer now and close, rather than read a body we will not use.
            error = BodyTooLarge.over(self.max_body_bytes)
            request_id = _request_id(self)
            # Before its body the request has no method or path yet: the channel's.
            _log_answer(
                error,
                getattr(channel, "_command", None) or b"-",
                getattr(channel, "_path", None) or b"-",
                request_id,
            )
            transport.write(early_error_response(error, request_id))
            transport.loseConnection()
            self.answered_early = True


def request_factory(max_body_bytes: int) -> type[ProxyRequest]:
    """A L{ProxyRequest} class with the given body cap, for C{Site.requestFactory}."""
    cls = type("ProxyRequest", (ProxyRequest,), {"max_body_bytes": max_body_bytes})
    _prime(cls)
    return cls


#: The attribute names a request sets on itself (Twisted's code and the proxy's), for a whole
#: and a streamed answer over HTTP/1.1 and HTTP/2, a client that goes away, and a body-less
#: answer (Twisted swaps in a C{write} of its own). Rarer ones (a body over the cap) may come
#: on top.
_REQUEST_NAMES = (
    "notifications",
    "channel",
    "client",
    "host",
    "requestHeaders",
    "responseHeaders",
    "transport",
    "_adapterCache",
    "content",
    "_received",
    "method",
    "uri",
    "clientproto",
    "path",
    "site",
    "sitepath",
    "_oaiproxy_request_id",
    "on_client_lost",
    "streamingProducer",
    "producer",
    "code",
    "code_message",
    "startedWriting",
    "chunked",
    "sentLength",
    "finished",
    "_disconnected",
    "write",
)


def _prime(cls: type[ProxyRequest]) -> None:
    """
    Put every name of L{_REQUEST_NAMES} in C{cls}'s table of its instances' attribute names,
    by setting them on an instance made for that and dropped.

    In CPython 3.11 the table holds at most 29 names, and each instance made while it has
    room takes one of those places for good: a burst of requests started before the first
    one finished (a client opening many streams at once after a restart) would fill it
    before the names set late in a request (its answer's) are in, and every request after
    would keep its attributes in a dictionary, slower to read (see L{ProxyRequest}).
    """
    probe = cls.__new__(cls)
    for name in _REQUEST_NAMES:
        object.__setattr__(probe, name, None)


_prime(ProxyRequest)


def _request_id(request: server.Request) -> bytes:
    """The client's C{x-request-id} if it is sane, else a new one (stored for reuse)."""
    existing: bytes | None = getattr(request, "_oaiproxy_request_id", None)
    if existing is not None:
        return existing
    given = raw_values(request.requestHeaders, b"X-Request-Id")
    request_id = request_id_for(given[0] if given else None)
    request._oaiproxy_request_id = request_id  # type: ignore[attr-defined]
    return request_id


def _log_answer(error: ProxyError, method: bytes, path: bytes, request_id: bytes) -> None:
    """The log line of an error answered to a client."""
    log.info(
        "{status} {code} for {method} {path} ({request_id}): {message}",
        status=error.status,
        code=error.code,
        method=method.decode("latin-1"),
        path=for_log(path.decode("latin-1")),
        request_id=request_id.decode("ascii"),
        message=error.message,
    )


def write_error(request: server.Request, error: ProxyError) -> None:
    """
    Answer C{request} with C{error} as OpenAI-shaped JSON: its status, C{Retry-After} when it
    has one, and the request id. Logs it. Does nothing if the client has gone.
    """
    request_id = _request_id(request)
    _log_answer(error, request.method, request.path, request_id)
    if getattr(request, "_disconnected", False) or request.finished:
        return
    body = error.to_json()
    request.setResponseCode(error.status, reason_phrase(error.status))
    headers = request.responseHeaders
    headers.setRawHeaders(b"content-type", [b"application/json"])
    headers.setRawHeaders(b"content-length", [b"%d" % len(body)])
    headers.setRawHeaders(b"x-request-id", [request_id])
    for name, value in error.headers():
        headers.setRawHeaders(name, [value])
    request.write(body)
    request.finish()


def _shown(method: bytes) -> str:
    """A method for a message: printable, and short."""
    return method[:32].decode("ascii", "replace")


def _not_json(constant: str) -> Any:
    """C{NaN}, C{Infinity} and C{-Infinity} are Python's JSON, not JSON (RFC 8259)."""
    raise ValueError(f"{constant} is not JSON")


# One decoder for every request (json.loads with an argument builds a decoder per call), fed
# as json.loads feeds its own.
_JSON = json.JSONDecoder(parse_constant=_not_json)


#: Endpoints whose POST body is JSON whatever Content-Type the client claims (under /v1).
JSON_ENDPOINTS = frozenset(
    {
        b"/chat/completions",
        b"/completions",
        b"/embeddings",
        b"/responses",
        b"/moderations",
        b"/images/generations",
        b"/audio/speech",
        b"/batches",
        b"/rerank",
        b"/score",
        b"/tokenize",
        b"/detokenize",
    }
)


def _is_json_body(request: server.Request, rest: bytes) -> bool:
    """Whether the request body must be a JSON object: a JSON endpoint or a JSON media type."""
    if rest in JSON_ENDPOINTS:
        return True
    content_type = request.requestHeaders.getRawHeaders(b"content-type")
    if not content_type:
        return False
    media = content_type[0].split(b";", 1)[0].strip().lower()
    return media == b"application/json" or media.endswith(b"+json")


class ProxyResource(Resource):
    """
    Takes every request: C{/healthz} answers locally, C{/v1/...} is forwarded, anything else
    is an OpenAI-shaped 404.
    """

    isLeaf = True

    def __init__(
        self,
        *,
        pool: Pool,
        forwarder: Forwarder,
        clock: IReactorTime,
        deadlines: Deadlines,
        limits: Limits,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._pool = pool
        self._forwarder = forwarder
        self._clock = clock
        self._deadlines = deadlines
        self._limits = limits

    @override
    def render(self, request: server.Request) -> bytes | int:
        try:
            return self._render(request)
        except ProxyError as error:
            write_error(request, error)
        except Exception:
            log.failure("unexpected error handling {path}", path=request.path[:200])
            write_error(request, ProxyError("internal proxy error"))
        return server.NOT_DONE_YET

    def close(self) -> Deferred[None]:
        """Release what the resource holds open (idle upstream connections)."""
        return self._forwarder.close()

    def _render(self, request: server.Request) -> int:
        request_id = _request_id(request)
        if getattr(request, "answered_early", False):
            return server.NOT_DONE_YET  # the connection is closing after its 413
        if getattr(request, "body_too_large", False):
            raise BodyTooLarge.over(self._limits.max_body_bytes)
        path = request.path
        if not path.startswith(b"/") or not is_printable(request.uri):
            raise InvalidRequest("invalid request target")
        method = request.method
        if path == b"/healthz":
            if method not in (b"GET", b"HEAD"):
                raise MethodNotAllowed(
                    f"{_shown(method)} is not allowed on /healthz", allow=b"GET, HEAD"
                )
            self._write_json(request, 200, {"status": "ok"})
            return server.NOT_DONE_YET
        if path != b"/v1" and not path.startswith(b"/v1/"):
            raise NotFound(f"Invalid URL ({_shown(method)} {path.decode('latin-1')[:200]})")
        if (_DOT in path or _PERCENT in path or _BACKSLASH in path) and _has_dot_segment(path):
            # /v1/../admin leaves the upstream's base path once the upstream (or anything in
            # front of it) resolves the dots; no OpenAI path has such a segment.
            raise InvalidRequest("the request path has a '.' or '..' segment")
        if (
            request.clientproto == b"HTTP/1.1"
            and len(raw_values(request.requestHeaders, b"Host")) != 1
        ):
            # RFC 9112 3.2: an HTTP/1.1 request with no Host, or more than one, is refused.
            raise InvalidRequest("an HTTP/1.1 request needs exactly one Host header")
        if method not in FORWARDED_METHODS:
            # TRACE would echo the client's credentials back; CONNECT is no proxy request
            # here; methods are case-sensitive, so "get" is not GET.
            raise MethodNotAllowed(
                f"{_shown(method)} is not allowed on {path.decode('latin-1')[:200]}",
                allow=FORWARDED_ALLOW,
            )
        if not getattr(request.channel, "values_checked", False):
            # HTTP/2 (H2Stream): values as h2 let them through. H1Channel checks them all
            # as it reads a head.
            for _, values in request.requestHeaders.getAllRawHeaders():
                for value in values:
                    if not is_valid_value(value):
                        raise InvalidRequest("invalid header value")
        assert request.content is not None
        request.content.seek(0)
        body = request.content.read()
        # The body now lives in the request context only. Twisted's request keeps its content
        # file until the request is garbage (often a cycle, so a full collection away): let
        # go of it now, or every finished request could hold up to max_body_bytes.
        request.content.close()
        request.content = _Sink()
        model, stream = None, False
        rest = path[3:]
        if method in (b"POST", b"PUT", b"PATCH") and _is_json_body(request, rest):
            try:
                parsed = _JSON.decode(body.decode(json.detect_encoding(body), "surrogatepass"))
            except (ValueError, UnicodeDecodeError, RecursionError):
                # RecursionError: nested deeper than the parser goes (about 1,000 levels).
                raise InvalidJSON(
                    "We could not parse the JSON body of your request. (HINT: This likely "
                    "means you aren't using your HTTP library correctly.)"
                ) from None
            if not isinstance(parsed, dict):
                raise InvalidJSON("the JSON body must be an object")
            if isinstance(parsed.get("model"), str):
                model = parsed["model"]
            stream = parsed.get("stream") is True
        query = request.uri.partition(b"?")[2]
        client = request.getClientAddress()
        ctx = RequestContext(
            request_id=request_id,
            method=method,
            rest=rest,
            query=query,
            headers=request.requestHeaders,
            body=body,
            client_ip=getattr(client, "host", "unknown"),
            secure=request.isSecure(),
            started=self._clock.seconds(),
            model=model,
            stream=stream,
        )
        Exchange(
            ctx,
            request,
            pool=self._pool,
            forwarder=self._forwarder,
            clock=self._clock,
            deadlines=self._deadlines,
            limits=self._limits,
            on_error=lambda error: write_error(request, error),
        ).start()
        return server.NOT_DONE_YET

    def _write_json(self, request: server.Request, status: int, obj: object) -> None:
        body = json.dumps(obj).encode("utf-8")
        request.setResponseCode(status)
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
        request.responseHeaders.setRawHeaders(b"x-request-id", [_request_id(request)])
        request.write(body)
        request.finish()


# The bytes a path with a dot segment must hold, as ints: CPython 3.11 looks for a bytes
# needle in bytes (C{b"." in path}) only after trying it as an int and clearing the
# TypeError, about ten times slower (0.4 against 0.04 us).
_DOT, _PERCENT, _BACKSLASH = b".%\\"


def _has_dot_segment(path: bytes) -> bool:
    """
    Whether C{path} has a C{.} or C{..} segment, also percent-encoded (C{%2e}) or behind an
    encoded slash or a backslash (C{..%2f}, C{..\\}), as a server that decodes them would see.
    """
    decoded = path.lower().replace(b"%2e", b".").replace(b"%2f", b"/").replace(b"%5c", b"/")
    return any(segment in (b".", b"..") for segment in decoded.replace(b"\\", b"/").split(b"/"))
