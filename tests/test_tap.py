"""The command line of twistd oaiproxy, and the service it builds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.application.service import IServiceMaker
from twisted.internet.address import IPv4Address
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.plugin import IPlugin, getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from oaiproxy.config import (
    ConfigError,
    ListenerConfig,
    PoolConfig,
    ProxyConfig,
    Runtime,
    UpstreamConfig,
)
from oaiproxy.service import build_service, build_site
from oaiproxy.tap import Options, makeService


def parse(*argv: str) -> ProxyConfig:
    options = Options()
    options.parseOptions(list(argv))
    config: ProxyConfig = options.config
    return config


class OptionsTests(SynchronousTestCase):
    """Options to ProxyConfig."""

    def test_full(self) -> None:
        """Listeners, upstreams, deadlines and limits all reach the config."""
        config = parse(
            "--listen",
            "tcp:8080",
            "--listen",
            "ssl:8443:selfsigned",
            "--upstream",
            "http://127.0.0.1:9001/v1,weight=3",
            "--upstream",
            "http://127.0.0.1:9002/v1",
            "--first-byte-timeout",
            "0",
            "--idle-timeout",
            "7",
            "--max-body",
            "1000",
            "--attempts",
            "2",
        )
        self.assertEqual([c.kind for c in config.listeners], ["tcp", "tls"])
        self.assertEqual([u.weight for u in config.pools[0].upstreams], [3, 1])
        self.assertIsNone(config.deadlines.first_byte)
        self.assertEqual(config.deadlines.idle, 7.0)
        self.assertEqual((config.limits.max_body_bytes, config.limits.max_attempts), (1000, 2))

    def test_demo_defaults(self) -> None:
        """--demo alone listens on loopback 8080 (http) and 8443 (self-signed TLS)."""
        config = parse("--demo")
        self.assertTrue(config.demo)
        self.assertEqual(
            [(c.kind, c.port, c.interface, c.self_signed) for c in config.listeners],
            [("tcp", 8080, "127.0.0.1", False), ("tls", 8443, "127.0.0.1", True)],
        )

    def test_usage_errors(self) -> None:
        """Missing upstreams, bad specs and demo with upstreams are usage errors."""
        for argv in (
            ["--listen", "tcp:1"],
            ["--upstream", "http://h/v1"],
            ["--listen", "tcp:1", "--upstream", "gopher://h"],
            ["--demo", "--upstream", "http://h/v1"],
            ["--listen", "tcp:1", "--upstream", "http://h/v1", "--idle-timeout", "-1"],
        ):
            with self.assertRaises(usage.UsageError, msg=str(argv)):
                parse(*argv)

    def test_bad_numbers_name_their_option(self) -> None:
        """A value that is not a number is a usage error naming the option and the value."""
        base = ["--listen", "tcp:1", "--upstream", "http://h/v1"]
        for option, value in (
            ("--attempts", "abc"),
            ("--max-body", "32MiB"),
            ("--high-water", "1e6"),
            ("--attempts", "1.5"),
            ("--client-idle", "abc"),
            ("--connect-timeout", "soon"),
            ("--upstream-keepalive", "long"),
        ):
            with self.assertRaises(usage.UsageError) as caught:
                parse(*base, option, value)
            self.assertIn(option, str(caught.exception))
            self.assertIn(repr(value), str(caught.exception))

    def test_upstream_keepalive_reaches_the_clients(self) -> None:
        """
        --upstream-keepalive is how long the upstream clients keep an idle connection; 4 s
        (below uvicorn's 5 s) without it.
        """
        import oaiproxy.service
        from oaiproxy.http.forwarder import build_agents as real

        seen: list[float] = []

        def spy(reactor: object, upstreams: object, **kwargs: Any) -> Any:
            seen.append(kwargs["keepalive"])
            return real(reactor, upstreams, **kwargs)  # type: ignore[arg-type]

        self.patch(oaiproxy.service, "build_agents", spy)
        base = ["--listen", "tcp:1", "--upstream", "http://127.0.0.1:9/v1"]
        for extra in ([], ["--upstream-keepalive", "60"]):
            config = parse(*base, *extra)
            build_site(config, MemoryReactorClock(), config.pools[0], {}).resource.close()
        self.assertEqual(seen, [4.0, 60.0])

    def test_quiet_dispatch_installed(self) -> None:
        """
        makeService installs the epoll loop without the legacy log context, and sets the
        garbage collector from the config's runtime settings.
        """
        import oaiproxy.tap

        installed: list[tuple[object, float]] = []
        self.patch(
            oaiproxy.tap,
            "install_quiet_dispatch",
            lambda reactor, *, busy_poll: installed.append((reactor, busy_poll)),
        )
        tuned: list[tuple[object, int | None, bool]] = []
        self.patch(
            oaiproxy.tap,
            "tune_collector",
            lambda reactor, *, threshold, freeze: tuned.append((reactor, threshold, freeze)),
        )
        options = Options()
        base = ["--listen", "tcp:0", "--upstream", "http://127.0.0.1:9/v1"]
        options.parseOptions(base)
        makeService(options)
        from twisted.internet import reactor

        self.assertEqual(installed, [(reactor, 0.0)])
        options = Options()
        options.parseOptions([*base, "--busy-poll-us", "250"])
        makeService(options)
        self.assertEqual(installed[1], (reactor, 0.00025))
        self.assertEqual(tuned[0], (reactor, 10_000, True))  # config.runtime's defaults

    def test_gc_options(self) -> None:
        """--gc-threshold and --no-gc-freeze reach the config; 0 leaves the threshold be."""
        base = ["--listen", "tcp:1", "--upstream", "http://127.0.0.1:9/v1"]
        self.assertEqual(parse(*base).runtime, Runtime(gc_threshold=10_000, gc_freeze=True))
        config = parse(*base, "--gc-threshold", "50000", "--no-gc-freeze")
        self.assertEqual(config.runtime, Runtime(gc_threshold=50_000, gc_freeze=False))
        self.assertIsNone(parse(*base, "--gc-threshold", "0").runtime.gc_threshold)
        for bad in ("12", "lots"):
            with self.assertRaises(usage.UsageError):
                parse(*base, "--gc-threshold", bad)

    def test_busy_poll_option(self) -> None:
        """--busy-poll-us reaches the config: 0 by default, bounded to a second."""
        base = ["--listen", "tcp:1", "--upstream", "http://127.0.0.1:9/v1"]
        self.assertEqual(parse(*base).runtime.busy_poll_us, 0)
        self.assertEqual(parse(*base, "--busy-poll-us", "300").runtime.busy_poll_us, 300)
        for bad in ("-1", "1000001", "lots"):
            with self.assertRaises(usage.UsageError):
                parse(*base, "--busy-poll-us", bad)

    def test_build_errors_end_the_start_with_a_message(self) -> None:
        """
        What only shows when building the service (here an unset key variable) ends
        makeService with a one-line message (SystemExit), not a traceback.
        """
        self.patch(os, "environ", {})
        options = Options()
        options.parseOptions(
            ["--listen", "tcp:1", "--upstream", "http://h/v1,key_env=OAIPROXY_TEST_UNSET"]
        )
        with self.assertRaises(SystemExit) as caught:
            makeService(options)
        self.assertEqual(
            caught.exception.code,
            "oaiproxy: upstream h:80: environment variable OAIPROXY_TEST_UNSET is not set",
        )

    def test_plugins_discoverable(self) -> None:
        """Both service makers are twistd plugins providing IServiceMaker."""
        import twisted.plugins

        makers = {p.tapname: p for p in getPlugins(IServiceMaker, twisted.plugins)}
        for name in ("oaiproxy", "oaiproxy-mock"):
            self.assertIn(name, makers)
            verifyObject(IServiceMaker, makers[name])
            verifyObject(IPlugin, makers[name])


class BuildServiceTests(SynchronousTestCase):
    """build_service on a memory reactor."""

    def config(self, **kw: object) -> ProxyConfig:
        upstream = UpstreamConfig("http://127.0.0.1:9001/v1", **kw)  # type: ignore[arg-type]
        return ProxyConfig(
            listeners=(ListenerConfig("tcp", 8080, interface="127.0.0.1"),),
            pools=(PoolConfig(upstreams=(upstream,)),),
        )

    def test_listens(self) -> None:
        """Starting the service listens where the config says."""
        reactor = MemoryReactorClock()
        service = build_service(self.config(), reactor, environ={})
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual([(p, i) for p, _, _, i in reactor.tcpServers], [(8080, "127.0.0.1")])

    def test_listener_factories(self) -> None:
        """
        A plain listener is served by the site's plain factory (HTTP/1.1 alone, no switch to
        HTTP/2); a TLS listener by the site itself (ALPN picks HTTP/2 or HTTP/1.1).
        """
        from oaiproxy.http.h1server import H1Channel
        from oaiproxy.http.h2fix import ProxyHTTPChannelSwitch
        from oaiproxy.listening import Listeners

        reactor = MemoryReactorClock()
        config = ProxyConfig(
            listeners=(
                ListenerConfig("tcp", 8080, interface="127.0.0.1"),
                ListenerConfig("tls", 8443, interface="127.0.0.1", self_signed=True),
            ),
            pools=self.config().pools,
            state_dir=self.mktemp(),
        )
        service = build_service(config, reactor, environ={})
        service.startService()
        self.addCleanup(service.stopService)
        [(_, plain, _, _)] = reactor.tcpServers
        [(_, secure, _, _, _)] = reactor.sslServers
        client = IPv4Address("TCP", "127.0.0.1", 5000)
        self.assertIsInstance(plain.buildProtocol(client), H1Channel)
        self.assertIsInstance(secure.buildProtocol(client), ProxyHTTPChannelSwitch)
        (listeners,) = [s for s in service if isinstance(s, Listeners)]  # type: ignore[attr-defined]
        self.assertIs(secure, listeners._factory)

    def test_missing_key_env(self) -> None:
        """A key_env variable that is unset fails at build time, naming the variable."""
        reactor = MemoryReactorClock()
        with self.assertRaises(ConfigError) as caught:
            build_service(self.config(key_env="SECRET_KEY_VAR"), reactor, environ={})
        self.assertIn("SECRET_KEY_VAR", str(caught.exception))

    def test_no_h2_support_fails_clearly(self) -> None:
        """
        Without Twisted's HTTP/2 support (the priority package missing), importing oaiproxy
        fails with a message saying what to install, not a traceback from deep inside.
        """
        code = "import sys; sys.modules['priority'] = None; import oaiproxy"
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
        done = subprocess.run(
            [sys.executable, "-c", code], check=False, capture_output=True, env=env, timeout=60
        )
        self.assertNotEqual(done.returncode, 0)
        last = done.stderr.decode().strip().splitlines()[-1]
        self.assertEqual(
            last,
            "ImportError: oaiproxy needs HTTP/2 support: install twisted[http2] "
            "(the h2 and priority packages)",
        )

    def test_demo_starts_mocks(self) -> None:
        """Demo mode binds two mock upstreams on loopback and logs the fake-answers banner."""
        reactor = MemoryReactorClock()
        config = ProxyConfig(listeners=(ListenerConfig("tcp", 8080),), demo=True)
        service = build_service(config, reactor, environ={})
        mocks = [(p, i) for p, _, _, i in reactor.tcpServers]
        self.assertEqual(mocks, [(0, "127.0.0.1"), (0, "127.0.0.1")])
        observer = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]  # annotated for unittest.TestCase; trial cases work
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(len(reactor.tcpServers), 3)
        text = "\n".join(formatEvent(e) for e in observer)
        self.assertIn("FAKE", text)
        self.assertIn("DEMO MODE", text)


class ProxyTacTests(SynchronousTestCase):
    """proxy.tac, the operator's file, builds the service that `twistd -ny` runs."""

    def test_tac_builds_the_service(self) -> None:
        """Loading proxy.tac gives an application with its listeners and upstreams."""
        import os
        from pathlib import Path

        from twisted.application.service import IServiceCollection, loadApplication

        import oaiproxy
        from oaiproxy.listening import Listeners

        installed: list[tuple[object, float]] = []
        self.patch(
            oaiproxy,
            "install_quiet_dispatch",
            lambda reactor, *, busy_poll: installed.append((reactor, busy_poll)),
        )
        tuned: list[tuple[object, int | None, bool]] = []
        self.patch(
            oaiproxy,
            "tune_collector",
            lambda reactor, *, threshold, freeze: tuned.append((reactor, threshold, freeze)),
        )
        tac = Path(__file__).resolve().parent.parent / "proxy.tac"
        workdir = Path(self.mktemp())
        workdir.mkdir()
        cwd = os.getcwd()
        os.chdir(workdir)  # the self-signed certificate goes into ./.oaiproxy
        try:
            application = loadApplication(str(tac), "python")
        finally:
            os.chdir(cwd)
        services = list(IServiceCollection(application))
        self.assertEqual(len(services), 1)
        top = list(IServiceCollection(services[0]))
        (listeners,) = [s for s in top if isinstance(s, Listeners)]
        self.assertEqual(
            [e.where for e in listeners.endpoints], ["127.0.0.1:8080", "127.0.0.1:8443"]
        )
        self.assertTrue((workdir / ".oaiproxy" / "selfsigned-cert.pem").exists())
        from twisted.internet import reactor

        # The epoll loop without the log context, with the tac's busy polling (none).
        self.assertEqual(installed, [(reactor, 0.0)])
        self.assertEqual(tuned, [(reactor, 10_000, True)])  # the garbage collector set
