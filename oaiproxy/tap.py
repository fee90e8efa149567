"""
The command line of C{twistd oaiproxy}: options to a L{ProxyConfig}, then to the service.

This is an entry point: the only module besides C{proxy.tac} that touches the global reactor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from twisted.application.service import IService
from twisted.python import usage

from oaiproxy.config import (
    ConfigError,
    Deadlines,
    Limits,
    PoolConfig,
    ProxyConfig,
    Runtime,
    UpstreamConfig,
    parse_listen,
    parse_upstream,
)
from oaiproxy.gctune import tune_collector
from oaiproxy.reactortune import install_quiet_dispatch
from oaiproxy.service import build_service

__all__ = ["Options", "config_from_options", "makeService"]

_N = TypeVar("_N", int, float)

_DEMO_LISTEN = ("tcp:8080:interface=127.0.0.1", "ssl:8443:selfsigned:interface=127.0.0.1")


def _seconds_or_none(options: Any, name: str) -> float | None:
    """A deadline from the command line: seconds, or 0/none/off to disable it."""
    text = str(options[name])
    if text.lower() in ("0", "none", "off"):
        return None
    return _seconds(options, name)


def _seconds(options: Any, name: str) -> float:
    """Option C{name} as seconds; L{ConfigError} naming the option otherwise."""
    return _number(options, name, float, "a number of seconds")


def _whole(options: Any, name: str) -> int:
    """Option C{name} as a whole number; L{ConfigError} naming the option otherwise."""
    return _number(options, name, int, "a whole number")


def _number(options: Any, name: str, kind: Callable[[str], _N], what: str) -> _N:
    text = str(options[name])
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"--{name}: {text!r} is not {what}") from None


class Options(usage.Options):
    """Options of C{twistd oaiproxy}."""

    synopsis = "[options]"
    longdesc = (
        "oaiproxy: a reverse proxy for the OpenAI API and OpenAI-compatible servers. "
        "Listens on HTTP/1.1 and TLS (HTTP/2 + HTTP/1.1 via ALPN) and forwards /v1/... to "
        "weighted HTTP/1.1 upstreams, streaming answers with backpressure."
    )
    optFlags: ClassVar[list[list[str | None]]] = [
        ["demo", None, "Run two built-in MOCK upstreams (weights 1 and 3): answers are fake."],
        [
            "no-gc-freeze",
            None,
            "Do not freeze the objects built at start-up out of the garbage collector's sight.",
        ],
    ]
    optParameters: ClassVar[list[list[str | None]]] = [
        ["state-dir", None, ".oaiproxy", "Where generated files (self-signed cert) are kept."],
        ["max-body", None, str(Limits().max_body_bytes), "Request body cap in bytes (413)."],
        ["high-water", None, str(Limits().stream_high_water),
         "Bytes queued per downstream stream before the upstream read is paused."],
        ["client-idle", None, str(Limits().client_idle_timeout),
         "Seconds an idle client connection is kept open."],
        ["header-timeout", None, str(Limits().header_timeout),
         "Seconds to receive an HTTP/1.1 request head, from its first byte (408)."],
        ["max-headers", None, str(Limits().max_headers),
         "Header fields allowed in a request head (431)."],
        ["max-header-bytes", None, str(Limits().max_header_bytes),
         "Bytes allowed in a request head (431)."],
        ["max-connections", None, str(Limits().max_connections),
         "Client connections held at once; past it, 503 and close."],
        ["attempts", None, str(Limits().max_attempts),
         "Upstreams tried per request before giving up."],
        ["upstream-connections", None, str(Limits().upstream_connections),
         "Idle persistent connections kept per upstream."],
        ["upstream-keepalive", None, str(Limits().upstream_keepalive),
         "Seconds an idle upstream connection is kept (below the upstream's own timeout)."],
        ["connect-timeout", None, str(Deadlines().connect),
         "Seconds to connect to an upstream (0 disables)."],
        ["first-byte-timeout", None, str(Deadlines().first_byte),
         "Seconds from request to first response body byte (0 disables)."],
        ["idle-timeout", None, str(Deadlines().idle),
         "Seconds of silence allowed between body chunks (0 disables)."],
        ["total-timeout", None, str(Deadlines().total),
         "Seconds for the whole request (0 disables)."],
        ["send-timeout", None, str(Deadlines().send),
         "Seconds a response may wait on a client that reads nothing (0 disables)."],
        ["gc-threshold", None, str(Runtime().gc_threshold),
         "Garbage collector's young threshold (Python's default 700; 0 leaves it as is)."],
        ["busy-poll-us", None, str(Runtime().busy_poll_us),
         "Microseconds to poll for events before sleeping (0: sleep at once). Lower latency "
         "at low load, for CPU."],
    ]  # fmt: skip

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self["listen"] = []
        self["upstream"] = []

    def opt_listen(self, spec: str) -> None:
        """Listen on ENDPOINT: tcp:PORT[:interface=ADDR], ssl:PORT:privateKey=KEY[:certKey=CERT],
        or ssl:PORT:selfsigned (generated certificate). Repeatable."""
        self["listen"].append(spec)

    def opt_upstream(self, spec: str) -> None:
        """Forward to URL[,weight=N][,key_env=NAME][,ca=FILE][,name=LABEL], e.g.
        http://127.0.0.1:9001/v1,weight=3. Repeatable."""
        self["upstream"].append(spec)

    def postOptions(self) -> None:
        try:
            self.config = config_from_options(self)
        except (ConfigError, ValueError) as e:
            raise usage.UsageError(str(e)) from None


def config_from_options(options: Any) -> ProxyConfig:
    """
    The L{ProxyConfig} that parsed options describe.

    @raise ConfigError: on an invalid value.
    """
    listen = list(options["listen"]) or (list(_DEMO_LISTEN) if options["demo"] else [])
    if not listen:
        raise ConfigError("give at least one --listen (or --demo)")
    upstreams: tuple[UpstreamConfig, ...] = tuple(parse_upstream(u) for u in options["upstream"])
    if options["demo"] and upstreams:
        raise ConfigError("--demo brings its own upstreams: drop --upstream")
    if not options["demo"] and not upstreams:
        raise ConfigError("give at least one --upstream (or --demo)")
    return ProxyConfig(
        listeners=tuple(parse_listen(spec) for spec in listen),
        pools=(PoolConfig(upstreams=upstreams),) if upstreams else (),
        deadlines=Deadlines(
            connect=_seconds_or_none(options, "connect-timeout"),
            first_byte=_seconds_or_none(options, "first-byte-timeout"),
            idle=_seconds_or_none(options, "idle-timeout"),
            total=_seconds_or_none(options, "total-timeout"),
            send=_seconds_or_none(options, "send-timeout"),
        ),
        limits=Limits(
            max_body_bytes=_whole(options, "max-body"),
            stream_high_water=_whole(options, "high-water"),
            client_idle_timeout=_seconds(options, "client-idle"),
            header_timeout=_seconds(options, "header-timeout"),
            max_headers=_whole(options, "max-headers"),
            max_header_bytes=_whole(options, "max-header-bytes"),
            max_connections=_whole(options, "max-connections"),
            max_attempts=_whole(options, "attempts"),
            upstream_connections=_whole(options, "upstream-connections"),
            upstream_keepalive=_seconds(options, "upstream-keepalive"),
        ),
        demo=bool(options["demo"]),
        state_dir=options["state-dir"],
        runtime=Runtime(
            gc_threshold=_whole(options, "gc-threshold") or None,
            gc_freeze=not options["no-gc-freeze"],
            busy_poll_us=_whole(options, "busy-poll-us"),
        ),
    )


def makeService(options: Options) -> IService:
    """
    Build the service for twistd, on the global reactor (this is an entry point).

    What only shows when building (an unset key variable, an unusable certificate or state
    directory) ends the start with a one-line message and status 1, as a bad option does.
    """
    from twisted.internet import reactor

    try:
        service = build_service(options.config, reactor)
    except ConfigError as e:
        raise SystemExit(f"oaiproxy: {e}") from None
    runtime = options.config.runtime
    # A quarter fewer instructions per relayed event, and the optional polling before
    # sleeping (see oaiproxy/reactortune.py).
    install_quiet_dispatch(reactor, busy_poll=runtime.busy_poll_us / 1e6)
    # No full collection scanning the start-up heap under load (see oaiproxy/gctune.py).
    tune_collector(reactor, threshold=runtime.gc_threshold, freeze=runtime.gc_freeze)
    return service
