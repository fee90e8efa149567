# oaiproxy, configured in plain Python. Run with:  twistd -ny proxy.tac
#
# This file builds the same typed ProxyConfig as `twistd oaiproxy --...` and hands it to the
# same build_service(). Edit the values below; every knob is documented in
# docs/configuration.md. Invalid values fail at start-up with a ConfigError saying which.
import os

from twisted.application.service import Application
from twisted.internet import reactor

from oaiproxy import (
    Deadlines,
    Limits,
    ListenerConfig,
    PoolConfig,
    ProxyConfig,
    Runtime,
    UpstreamConfig,
    build_service,
    install_quiet_dispatch,
    tune_collector,
)

config = ProxyConfig(
    listeners=(
        # Plain HTTP/1.1 on loopback. Use interface="" (or "0.0.0.0") for all interfaces.
        # backlog=N (default 511) sets the listen queue. A port that cannot be had (taken,
        # or an address the machine lacks) stops the start with a message saying which.
        ListenerConfig("tcp", 8080, interface="127.0.0.1"),
        # TLS with ALPN (HTTP/2 and HTTP/1.1). self_signed=True generates a certificate for
        # localhost once (kept in state_dir, path printed at start-up); in production give
        # private_key="/path/key.pem", cert_key="/path/fullchain.pem" instead.
        ListenerConfig("tls", 8443, interface="127.0.0.1", self_signed=True),
    ),
    pools=(
        PoolConfig(
            upstreams=(
                # An OpenAI-style base URL: a client's /v1/<rest> goes to <url>/<rest>.
                # weight: share of requests (smooth weighted round robin, like nginx).
                # key_env: the proxy sends "Authorization: Bearer $VAR" instead of the
                #   client's header (the client never needs the real key).
                # ca_bundle: PEM CA file to verify an https:// upstream (system store if None).
                # name: a label for logs and error messages (default "host:port").
                UpstreamConfig("http://127.0.0.1:9001/v1", weight=1),
                UpstreamConfig("http://127.0.0.1:9002/v1", weight=3),
                # UpstreamConfig("https://api.openai.com/v1", key_env="OPENAI_API_KEY"),
            ),
        ),
    ),
    # demo=True ignores `pools` and starts two built-in mock upstreams (answers are fake).
    demo=os.environ.get("OAIPROXY_DEMO") == "1",
    deadlines=Deadlines(
        connect=5.0,  # seconds to establish a TCP/TLS connection to an upstream
        first_byte=600.0,  # seconds until the first body byte (time to first token)
        idle=300.0,  # longest silence between two body chunks
        total=3600.0,  # the whole request
        send=60.0,  # longest wait on a client that reads nothing; None disables any of these
    ),
    limits=Limits(
        max_body_bytes=32 * 1024 * 1024,  # request bodies over this get 413
        stream_high_water=256 * 1024,  # bytes queued per client stream before pausing upstream
        client_idle_timeout=60.0,  # seconds an idle client connection stays open
        header_timeout=30.0,  # seconds to send a request head, from its first byte (408)
        max_headers=100,  # header fields allowed in a request head (431 above)
        max_header_bytes=32 * 1024,  # bytes allowed in a request head (431 above)
        max_connections=10_000,  # client connections held at once (503 past it)
        max_attempts=3,  # upstreams tried per request, only before the first byte; then 502,
        #   or the last upstream's own answer when it answered (a 5xx passes through)
        upstream_connections=256,  # idle keep-alive connections kept per upstream
        upstream_keepalive=4.0,  # seconds one is kept idle: below the upstream's own keep-alive
        #   timeout (uvicorn's, behind vLLM and LiteLLM, is 5 s); longer for upstreams that keep
        #   theirs longer (nginx 75 s, Twisted 60 s), so that bursts find warm connections
    ),
    state_dir=".oaiproxy",  # generated files (the self-signed certificate)
    runtime=Runtime(
        gc_threshold=10_000,  # net new objects between young garbage collections (Python's
        #   default is 700); None leaves the interpreter's setting
        gc_freeze=True,  # once running, hide what start-up built from the collector: no full
        #   collection rescans it (they stopped the proxy for 47-63 ms during bursts)
        busy_poll_us=0,  # microseconds to keep polling for events before sleeping: less
        #   latency at low load on VMs where waking an idle CPU is slow, for up to one core
        #   of CPU while traffic flows (0: sleep at once, as Twisted does)
    ),
)

application = Application("oaiproxy")
build_service(config, reactor).setServiceParent(application)
# Socket events dispatched without Twisted's legacy log context: a quarter fewer instructions
# per relayed event; Twisted's own legacy log lines then say "-" for the connection. Also
# applies config.runtime.busy_poll_us.
install_quiet_dispatch(reactor, busy_poll=config.runtime.busy_poll_us / 1e6)
# The garbage collector set from config.runtime (see oaiproxy/gctune.py).
tune_collector(
    reactor, threshold=config.runtime.gc_threshold, freeze=config.runtime.gc_freeze
)
