"""
Frozen configuration values, validated at construction. No I/O happens here.

A L{ProxyConfig} is built either in plain Python (C{proxy.tac}) or from the command line
(L{oaiproxy.tap}); both hand it to L{oaiproxy.service.build_service}.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

from hyperlink import URL

__all__ = [
    "ConfigError",
    "Deadlines",
    "Limits",
    "ListenerConfig",
    "PoolConfig",
    "ProxyConfig",
    "Runtime",
    "UpstreamConfig",
    "parse_listen",
    "parse_upstream",
]

MiB = 1024 * 1024
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which and why."""


@dataclass(frozen=True)
class Deadlines:
    """
    Deadlines of an exchange, in seconds. Each may be C{None} to disable it.

    @ivar connect: to establish the TCP (and TLS) connection to an upstream.
    @ivar first_byte: from sending the request to the first byte of the response body (for
        streams, the time to first token); covers waiting for the response headers too.
    @ivar idle: the longest silent gap between two body chunks of one response.
    @ivar total: the whole exchange, from the request's arrival to the last byte.
    @ivar send: the longest a response may wait on a client that does not read (its socket
        buffers full, or its HTTP/2 window closed); then the response is cut and its
        upstream request cancelled.
    """

    connect: float | None = 5.0
    first_byte: float | None = 600.0
    idle: float | None = 300.0
    total: float | None = 3600.0
    send: float | None = 60.0

    def __post_init__(self) -> None:
        for name in ("connect", "first_byte", "idle", "total", "send"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"deadline {name} must be positive or None, not {value!r}")


@dataclass(frozen=True)
class Limits:
    """
    Per-request and per-connection limits.

    @ivar max_body_bytes: request bodies larger than this get 413 (default 32 MiB: images in
        base64 are large).
    @ivar stream_high_water: bytes of response a single downstream stream may have queued in
        the proxy before the upstream read is paused (resumed below half of it).
    @ivar client_idle_timeout: seconds an idle client connection is kept open; a request
        whose body stops arriving for this long gets 408 (HTTP/1.1).
    @ivar header_timeout: seconds from the first byte of an HTTP/1.1 request head to its end
        (408 after that: slowloris).
    @ivar max_headers: header fields allowed in a request head, HTTP/1.1 or HTTP/2 (431 above).
    @ivar max_header_bytes: bytes allowed in a request head, HTTP/1.1 or HTTP/2 (431 above).
    @ivar max_connections: client connections held at once; past it a new connection gets
        503 and is closed.
    @ivar max_attempts: upstreams tried for one request before giving up (failover bound).
    @ivar upstream_connections: idle persistent connections kept per upstream.
    @ivar upstream_keepalive: seconds an idle persistent upstream connection is kept. Keep
        it below the upstream's own keep-alive timeout (uvicorn's default, behind vLLM and
        LiteLLM, is 5 s): a request sent as the upstream closes the connection is lost with
        it (the proxy sends it again on a new connection when that happens within a second
        of sending it on a reused one, see L{oaiproxy.http.client.RETRY_WINDOW}).
    """

    max_body_bytes: int = 32 * MiB
    stream_high_water: int = 256 * 1024
    client_idle_timeout: float = 60.0
    header_timeout: float = 30.0
    max_headers: int = 100
    max_header_bytes: int = 32 * 1024
    max_connections: int = 10_000
    max_attempts: int = 3
    upstream_connections: int = 256
    upstream_keepalive: float = 4.0

    def __post_init__(self) -> None:
        if self.max_body_bytes < 0:
            raise ConfigError("max_body_bytes must be >= 0")
        if self.stream_high_water < 16 * 1024:
            raise ConfigError("stream_high_water must be at least 16384 bytes")
        if not self.client_idle_timeout > 0:
            raise ConfigError("client_idle_timeout must be positive")
        if not self.header_timeout > 0:
            raise ConfigError("header_timeout must be positive")
        if self.max_headers < 1:
            raise ConfigError("max_headers must be at least 1")
        if self.max_header_bytes < 1024:
            raise ConfigError("max_header_bytes must be at least 1024")
        if self.max_connections < 1:
            raise ConfigError("max_connections must be at least 1")
        if self.max_attempts < 1:
            raise ConfigError("max_attempts must be at least 1")
        if self.upstream_connections < 1:
            raise ConfigError("upstream_connections must be at least 1")
        if not self.upstream_keepalive > 0:
            raise ConfigError("upstream_keepalive must be positive")


@dataclass(frozen=True)
class UpstreamConfig:
    """
    One OpenAI-style upstream: a base URL such as C{http://127.0.0.1:9001/v1}.

    A client's C{/v1/<rest>?<query>} goes to C{<base>/<rest>?<query>}.

    @ivar key_env: name of an environment variable holding the upstream API key; when set,
        the proxy sends C{Authorization: Bearer $NAME} in place of the client's.
    @ivar ca_bundle: a PEM file of CA certificates to verify this upstream with (HTTPS only);
        the system trust store otherwise.
    @ivar name: a short label for logs and error messages; defaults to
        C{host:port}.
    """

    # Derived values (parsed URL, host, port, ...) are cached properties: they are read on every
    # request, and parsing the URL each time cost 10% of the proxy's CPU.
    url: str
    weight: int = 1
    key_env: str | None = None
    ca_bundle: str | None = None
    name: str = ""

    def __post_init__(self) -> None:
        try:
            parsed = URL.from_text(self.url)
        except Exception as e:
            raise ConfigError(f"upstream URL {self.url!r} does not parse: {e}") from None
        if parsed.scheme not in ("http", "https"):
            raise ConfigError(f"upstream URL {self.url!r} must be http:// or https://")
        if not parsed.host:
            raise ConfigError(f"upstream URL {self.url!r} has no host")
        if parsed.query or parsed.fragment:
            raise ConfigError(f"upstream URL {self.url!r} must not have a query or fragment")
        if parsed.port is not None and parsed.port > 65535:
            raise ConfigError(f"upstream URL {self.url!r}: the port must be at most 65535")
        if not 1 <= self.weight <= 1000:
            raise ConfigError(f"upstream weight must be 1..1000, not {self.weight}")
        if self.key_env is not None and not _ENV_NAME.match(self.key_env):
            raise ConfigError(f"key_env {self.key_env!r} is not an environment variable name")
        if self.ca_bundle is not None and parsed.scheme != "https":
            raise ConfigError("ca_bundle only applies to https:// upstreams")
        if any(not 0x21 <= ord(c) <= 0x7E for c in "/".join(parsed.path)):
            # The base path is written into every request line as it is.
            raise ConfigError(
                f"the path of upstream URL {self.url!r} must be printable ASCII without "
                "spaces (percent-encode the rest)"
            )
        try:
            str(parsed.host).encode("idna")
        except UnicodeError:
            raise ConfigError(f"upstream URL {self.url!r} has an invalid host name") from None
        if not self.name:
            object.__setattr__(self, "name", f"{parsed.host}:{parsed.port}")

    @cached_property
    def parsed(self) -> URL:
        """The base URL as a hyperlink value."""
        return URL.from_text(self.url)

    @cached_property
    def host(self) -> str:
        """The upstream's host name or address."""
        return str(self.parsed.host)

    @cached_property
    def port(self) -> int:
        """The upstream's TCP port (scheme default when absent)."""
        port = self.parsed.port
        assert port is not None  # hyperlink fills in 80/443 for http/https
        return int(port)

    @cached_property
    def is_tls(self) -> bool:
        """Whether the upstream is reached over HTTPS."""
        return self.parsed.scheme == "https"

    @cached_property
    def base_path(self) -> bytes:
        """The base path without a trailing slash, e.g. C{b"/v1"}, or C{b""} for the root."""
        path = "/".join(seg for seg in self.parsed.path if seg)
        return ("/" + path).encode("ascii") if path else b""

    @cached_property
    def host_header(self) -> bytes:
        """The C{Host} header value for this upstream: port only when not the default."""
        parsed = self.parsed
        default = 443 if parsed.scheme == "https" else 80
        host = parsed.host
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        if parsed.port is None or parsed.port == default:
            return host.encode("idna")
        return f"{host}:{parsed.port}".encode("idna")


@dataclass(frozen=True)
class PoolConfig:
    """
    A named group of upstreams served by one balancer.

    Today there is one pool, C{default}; routing by model (pools, aliases, fallbacks) builds on
    this type.
    """

    upstreams: tuple[UpstreamConfig, ...]
    name: str = "default"
    balancer: Literal["swrr"] = "swrr"

    def __post_init__(self) -> None:
        if not self.upstreams:
            raise ConfigError(f"pool {self.name!r} has no upstreams")
        names = [u.name for u in self.upstreams]
        if len(set(names)) != len(names):
            raise ConfigError(f"pool {self.name!r} has upstreams with the same name: {names}")


@dataclass(frozen=True)
class ListenerConfig:
    """
    One listening socket.

    C{tcp} serves plain HTTP/1.1; C{tls} serves TLS with ALPN C{h2} and C{http/1.1}, with
    either a key and certificate from files or a generated self-signed certificate.
    """

    kind: Literal["tcp", "tls"]
    port: int
    interface: str = ""
    private_key: str | None = None
    cert_key: str | None = None
    self_signed: bool = False
    backlog: int = 511

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"listen port {self.port} out of range")
        if self.kind == "tcp" and (self.private_key or self.cert_key or self.self_signed):
            raise ConfigError("a tcp listener takes no certificate")
        if self.kind == "tls":
            if self.self_signed and (self.private_key or self.cert_key):
                raise ConfigError("a tls listener is either selfsigned or has key files, not both")
            if not self.self_signed and not self.private_key:
                raise ConfigError(
                    "a tls listener needs privateKey=FILE (and certKey=FILE), or selfsigned"
                )


@dataclass(frozen=True)
class Runtime:
    """
    Settings of the whole Python process, applied by the entry points (C{proxy.tac} and the
    plugin; see L{oaiproxy.gctune}).

    @ivar gc_threshold: the garbage collector's young-generation threshold: net new objects
        between young collections (Python's default is 700). C{None} leaves the
        interpreter's setting as it is.
    @ivar gc_freeze: once the reactor runs, move everything start-up built out of the
        collector's sight (C{gc.freeze}), so that no collection scans it again.
    @ivar busy_poll_us: microseconds the event loop keeps polling, without waiting, when no
        socket is ready, before it waits (see L{oaiproxy.reactortune}): less latency at low
        load on machines where waking an idle CPU is slow, for up to one core of CPU while
        traffic flows. 0 (the default) waits at once, as Twisted does.
    """

    gc_threshold: int | None = 10_000
    gc_freeze: bool = True
    busy_poll_us: int = 0

    def __post_init__(self) -> None:
        if self.gc_threshold is not None and self.gc_threshold < 100:
            raise ConfigError(
                "gc_threshold (--gc-threshold) must be at least 100; None (0 on the command "
                "line) leaves Python's setting"
            )
        if not 0 <= self.busy_poll_us <= 1_000_000:
            raise ConfigError("busy_poll_us (--busy-poll-us) must be from 0 to 1000000")


@dataclass(frozen=True)
class ProxyConfig:
    """
    The whole proxy: where it listens, where it forwards, and its limits.

    @ivar demo: start two in-process mock upstreams (weights 1 and 3) and use them as the
        default pool; answers are fake.
    @ivar state_dir: where generated files (the self-signed certificate) are kept.
    @ivar runtime: process-wide settings, which the entry points apply.
    """

    listeners: tuple[ListenerConfig, ...]
    pools: tuple[PoolConfig, ...] = ()
    deadlines: Deadlines = field(default_factory=Deadlines)
    limits: Limits = field(default_factory=Limits)
    demo: bool = False
    state_dir: str = ".oaiproxy"
    runtime: Runtime = field(default_factory=Runtime)

    def __post_init__(self) -> None:
        if not self.listeners:
            raise ConfigError("at least one listener is needed")
        if not self.pools and not self.demo:
            raise ConfigError("at least one upstream is needed (or demo mode)")
        if len(self.pools) > 1:
            raise ConfigError("only one pool is supported in this version")


def _split_kv(parts: list[str], spec: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in parts:
        if "=" in part:
            key, _, value = part.partition("=")
        else:
            key, value = part, ""
        if key in out:
            raise ConfigError(f"{key!r} given twice in {spec!r}")
        out[key] = value
    return out


def parse_listen(spec: str) -> ListenerConfig:
    """
    Parse a C{--listen} value.

    C{tcp:PORT[:interface=ADDR]}, C{ssl:PORT:privateKey=KEY[:certKey=CERT][:interface=ADDR]},
    or C{ssl:PORT:selfsigned[:interface=ADDR]}.

    @raise ConfigError: on anything else.
    """
    # IPv6 interfaces are written with escaped colons, as in Twisted endpoint strings.
    parts = [p.replace("\x00", ":") for p in spec.replace("\\:", "\x00").split(":")]
    if len(parts) < 2:
        raise ConfigError(f"listen {spec!r}: expected tcp:PORT or ssl:PORT:...")
    kind_word, port_text, rest = parts[0], parts[1], parts[2:]
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"listen {spec!r}: port {port_text!r} is not a number") from None
    opts = _split_kv(rest, spec)
    interface = opts.pop("interface", "")
    backlog_text = opts.pop("backlog", "511")
    try:
        backlog = int(backlog_text)
    except ValueError:
        raise ConfigError(f"listen {spec!r}: backlog {backlog_text!r} is not a number") from None
    if kind_word == "tcp":
        if opts:
            raise ConfigError(f"listen {spec!r}: unknown options {sorted(opts)}")
        return ListenerConfig("tcp", port, interface=interface, backlog=backlog)
    if kind_word in ("ssl", "tls"):
        self_signed = "selfsigned" in opts
        if self_signed and opts.pop("selfsigned") not in ("", "yes", "true", "1"):
            raise ConfigError(f"listen {spec!r}: selfsigned takes no value")
        private_key = opts.pop("privateKey", None)
        cert_key = opts.pop("certKey", None) or private_key
        if opts:
            raise ConfigError(f"listen {spec!r}: unknown options {sorted(opts)}")
        return ListenerConfig(
            "tls",
            port,
            interface=interface,
            private_key=private_key,
            cert_key=cert_key,
            self_signed=self_signed,
            backlog=backlog,
        )
    raise ConfigError(f"listen {spec!r}: kind must be tcp or ssl, not {kind_word!r}")


def parse_upstream(spec: str) -> UpstreamConfig:
    """
    Parse an C{--upstream} value: C{URL[,weight=N][,key_env=NAME][,ca=FILE][,name=LABEL]}.

    @raise ConfigError: on an unknown option or an invalid value.
    """
    url, *rest = spec.split(",")
    opts = _split_kv(rest, spec)
    try:
        weight = int(opts.pop("weight", "1"))
    except ValueError:
        raise ConfigError(f"upstream {spec!r}: weight must be an integer") from None
    key_env = opts.pop("key_env", None)
    ca_bundle = opts.pop("ca", None)
    name = opts.pop("name", "")
    if opts:
        raise ConfigError(f"upstream {spec!r}: unknown options {sorted(opts)}")
    return UpstreamConfig(url=url, weight=weight, key_env=key_env, ca_bundle=ca_bundle, name=name)
