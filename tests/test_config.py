"""Config values: validation and the parsers of --listen and --upstream."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.config import (
    ConfigError,
    Deadlines,
    Limits,
    ListenerConfig,
    PoolConfig,
    ProxyConfig,
    UpstreamConfig,
    parse_listen,
    parse_upstream,
)


class UpstreamConfigTests(SynchronousTestCase):
    """UpstreamConfig validation and derived values."""

    def test_derived_values(self) -> None:
        """Host, port, base path, Host header and default name come from the URL."""
        u = UpstreamConfig("http://127.0.0.1:9001/v1/")
        self.assertEqual((u.host, u.port, u.base_path), ("127.0.0.1", 9001, b"/v1"))
        self.assertEqual(u.host_header, b"127.0.0.1:9001")
        self.assertEqual(u.name, "127.0.0.1:9001")
        self.assertFalse(u.is_tls)

    def test_default_port_omitted_from_host(self) -> None:
        """The Host header carries no port when it is the scheme's default."""
        u = UpstreamConfig("https://api.openai.com/v1")
        self.assertEqual((u.port, u.host_header, u.is_tls), (443, b"api.openai.com", True))

    def test_ipv6_host_header(self) -> None:
        """An IPv6 literal is bracketed in the Host header."""
        self.assertEqual(UpstreamConfig("http://[::1]:9001/v1").host_header, b"[::1]:9001")

    def test_root_base_path(self) -> None:
        """A URL without a path forwards at the root."""
        self.assertEqual(UpstreamConfig("http://h:1").base_path, b"")

    def test_rejects(self) -> None:
        """Bad scheme, query, weight, key variable name, ca on http are refused."""
        for kwargs in (
            {"url": "ftp://h/v1"},
            {"url": "http://h/v1?x=1"},
            {"url": "http://h/v1", "weight": 0},
            {"url": "http://h/v1", "key_env": "NOT-A-NAME"},
            {"url": "http://h/v1", "ca_bundle": "/x.pem"},
            {"url": "http:///v1"},
            {"url": "http://127.0.0.1:99999/v1"},
        ):
            with self.assertRaises(ConfigError, msg=str(kwargs)):
                UpstreamConfig(**kwargs)


class ParseTests(SynchronousTestCase):
    """The command-line parsers."""

    def test_parse_upstream(self) -> None:
        """URL with weight, key_env, ca and name."""
        u = parse_upstream("https://h/v1,weight=3,key_env=OPENAI_API_KEY,ca=/c.pem,name=x")
        self.assertEqual(
            (u.url, u.weight, u.key_env, u.ca_bundle, u.name),
            ("https://h/v1", 3, "OPENAI_API_KEY", "/c.pem", "x"),
        )

    def test_parse_upstream_rejects_unknown(self) -> None:
        """Unknown options and non-integer weights are errors."""
        self.assertRaises(ConfigError, parse_upstream, "http://h/v1,colour=red")
        self.assertRaises(ConfigError, parse_upstream, "http://h/v1,weight=x")

    def test_parse_listen_tcp(self) -> None:
        """tcp:PORT:interface=ADDR."""
        self.assertEqual(
            parse_listen("tcp:8080:interface=127.0.0.1"),
            ListenerConfig("tcp", 8080, interface="127.0.0.1"),
        )

    def test_parse_listen_ipv6_interface(self) -> None:
        """Escaped colons in an IPv6 interface."""
        self.assertEqual(parse_listen("tcp:80:interface=\\:\\:1").interface, "::1")

    def test_parse_listen_ssl(self) -> None:
        """ssl with key files (certKey defaults to privateKey) and selfsigned."""
        c = parse_listen("ssl:8443:privateKey=k.pem")
        self.assertEqual((c.kind, c.private_key, c.cert_key), ("tls", "k.pem", "k.pem"))
        self.assertTrue(parse_listen("ssl:8443:selfsigned").self_signed)

    def test_parse_listen_rejects(self) -> None:
        """Unknown kinds, bad ports, ssl without a certificate, unknown options."""
        for spec in (
            "udp:53",
            "tcp:x",
            "ssl:443",
            "tcp:80:privateKey=k",
            "tcp:1:foo=bar",
            "tcp",
            "tcp:1:backlog=abc",
        ):
            with self.assertRaises(ConfigError, msg=spec):
                parse_listen(spec)


class ProxyConfigTests(SynchronousTestCase):
    """Whole-config validation."""

    def test_needs_upstream_unless_demo(self) -> None:
        """No pool is an error unless demo mode brings its own."""
        listeners = (ListenerConfig("tcp", 1),)
        self.assertRaises(ConfigError, ProxyConfig, listeners=listeners)
        ProxyConfig(listeners=listeners, demo=True)

    def test_limits_and_deadlines_validated(self) -> None:
        """Non-positive deadlines and tiny high-water marks are refused."""
        self.assertRaises(ConfigError, Deadlines, idle=0)
        self.assertRaises(ConfigError, Limits, stream_high_water=10)
        self.assertRaises(ConfigError, Limits, max_attempts=0)
        self.assertRaises(ConfigError, Limits, upstream_keepalive=0)
        self.assertRaises(ConfigError, Limits, upstream_keepalive=float("nan"))

    def test_pool_names_unique(self) -> None:
        """Two upstreams with the same name in a pool are refused."""
        u = UpstreamConfig("http://h:1/v1")
        self.assertRaises(ConfigError, PoolConfig, upstreams=(u, u))
