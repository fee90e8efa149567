"""
Tests for L{oaiproxy.tls}: certificates on disk, and real TLS handshakes run in memory.
"""

# trial's assertions, mktemp, IOPump and MemoryReactor are unannotated.
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
)
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    optionsForClientTLS,
)
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactor
from twisted.logger import LogLevel, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from oaiproxy.config import ConfigError, ListenerConfig
from oaiproxy.tls import (
    ensure_self_signed,
    listener_endpoint,
    server_context_factory,
    upstream_tls_options,
)
from tests.support.fakes import Recorder

_DAY = 24 * 60 * 60.0


class _Greeter(Recorder):
    """A server that speaks first, so a client sees bytes only after a successful handshake."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"hello")


class _Handshake:
    """Both ends of one in-memory TLS connection, after pumping it to quiescence."""

    def __init__(
        self,
        server_options: CertificateOptions,
        client_options: IOpenSSLClientConnectionCreator | CertificateOptions,
    ) -> None:
        self.server_app = _Greeter()
        self.client_app = Recorder()
        # TLS coalesces small writes with callLater(0): one fake clock, advanced by the pump.
        clock = Clock()
        server_factory = TLSMemoryBIOFactory(
            server_options, False, Factory.forProtocol(lambda: self.server_app), clock
        )
        client_factory = TLSMemoryBIOFactory(
            client_options, True, Factory.forProtocol(lambda: self.client_app), clock
        )

        def server() -> TLSMemoryBIOProtocol:
            proto = server_factory.buildProtocol(None)
            assert isinstance(proto, TLSMemoryBIOProtocol)
            return proto

        def client() -> TLSMemoryBIOProtocol:
            proto = client_factory.buildProtocol(None)
            assert isinstance(proto, TLSMemoryBIOProtocol)
            return proto

        self.client, self.server, pump = connectedServerAndClient(server, client, clock=clock)
        pump.flush()

    @property
    def succeeded(self) -> bool:
        """Whether the client got the server's greeting through the TLS layer."""
        return self.client_app.received == b"hello" and self.client_app.lost is None


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def _client(cert_path: str, protocols: list[bytes]) -> IOpenSSLClientConnectionCreator:
    """A client trusting the certificate in C{cert_path}, offering C{protocols} over ALPN."""
    return optionsForClientTLS(
        "localhost",
        trustRoot=Certificate.loadPEM(_read(cert_path)),
        acceptableProtocols=protocols,
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _issue(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
) -> x509.Certificate:
    """A certificate for C{name}: a CA, or a localhost server certificate."""
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if issuer is None else issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


class EnsureSelfSignedTests(SynchronousTestCase):
    """L{ensure_self_signed} makes a trust-anchor certificate once and reuses it."""

    def test_creates_key_and_cert_in_private_directory(self) -> None:
        """The files land in the state directory (created 0700); the key is mode 0600."""
        state = os.path.join(self.mktemp(), "state")
        key_path, cert_path = ensure_self_signed(state)
        self.assertEqual(key_path, os.path.join(state, "selfsigned-key.pem"))
        self.assertEqual(cert_path, os.path.join(state, "selfsigned-cert.pem"))
        self.assertEqual(stat.S_IMODE(os.stat(state).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(key_path).st_mode), 0o600)
        key = serialization.load_pem_private_key(_read(key_path), password=None)
        cert = x509.load_pem_x509_certificate(_read(cert_path))
        self.assertEqual(
            key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            cert.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )
        self.assertEqual(sorted(os.listdir(state)), ["selfsigned-cert.pem", "selfsigned-key.pem"])

    def test_certificate_is_a_trust_anchor_for_local_names(self) -> None:
        """The cert names localhost, 127.0.0.1 and ::1, is CA:TRUE, and lasts about a year."""
        _, cert_path = ensure_self_signed(self.mktemp())
        cert = x509.load_pem_x509_certificate(_read(cert_path))
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(sans.get_values_for_type(x509.DNSName), ["localhost"])
        self.assertEqual(
            sans.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        )
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(constraints.critical)
        self.assertTrue(constraints.value.ca)
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        self.assertTrue(usage.digital_signature)
        self.assertTrue(usage.key_cert_sign)
        extended = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertIn(ExtendedKeyUsageOID.SERVER_AUTH, extended)
        self.assertEqual(cert.issuer, cert.subject)
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        self.assertEqual(lifetime, datetime.timedelta(days=365))
        self.assertLess(cert.not_valid_before_utc, datetime.datetime.now(datetime.UTC))

    def test_second_call_reuses_files(self) -> None:
        """A second call returns the same paths and leaves both files untouched."""
        state = self.mktemp()
        key_path, cert_path = ensure_self_signed(state)
        before = {p: (_read(p), os.stat(p).st_mtime_ns) for p in (key_path, cert_path)}
        self.assertEqual(ensure_self_signed(state), (key_path, cert_path))
        after = {p: (_read(p), os.stat(p).st_mtime_ns) for p in (key_path, cert_path)}
        self.assertEqual(before, after)

    def test_reused_until_a_day_before_expiry(self) -> None:
        """The pair is kept with more than a day left and replaced with less."""
        state = self.mktemp()
        start = time.time()
        key_path, cert_path = ensure_self_signed(state, now=start)
        first = _read(cert_path), _read(key_path)
        ensure_self_signed(state, now=start + 360 * _DAY)
        self.assertEqual((_read(cert_path), _read(key_path)), first)
        ensure_self_signed(state, now=start + 364.5 * _DAY)
        self.assertNotEqual(_read(cert_path), first[0])
        self.assertNotEqual(_read(key_path), first[1])

    def test_regenerated_when_hostnames_change(self) -> None:
        """Asking for a name the existing certificate lacks makes a new one that has it."""
        state = self.mktemp()
        _, cert_path = ensure_self_signed(state)
        ensure_self_signed(state, ("localhost", "proxy.test"))
        cert = x509.load_pem_x509_certificate(_read(cert_path))
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(sans.get_values_for_type(x509.DNSName), ["localhost", "proxy.test"])

    def test_regenerated_when_key_does_not_match(self) -> None:
        """A key file that does not belong to the certificate makes a fresh, matching pair."""
        state = self.mktemp()
        key_path, cert_path = ensure_self_signed(state)
        old_cert = _read(cert_path)
        _write(key_path, _key_pem(ec.generate_private_key(ec.SECP256R1())))
        ensure_self_signed(state)
        self.assertNotEqual(_read(cert_path), old_cert)
        server_context_factory(key_path, cert_path)  # raises if they do not match


class ServerContextFactoryTests(SynchronousTestCase):
    """L{server_context_factory} serves TLS 1.2+ with ALPN h2 and http/1.1."""

    def setUp(self) -> None:
        self.key_path, self.cert_path = ensure_self_signed(self.mktemp())
        self.options = server_context_factory(self.key_path, self.cert_path)

    def test_alpn_negotiates_h2(self) -> None:
        """A client offering h2 and http/1.1 gets h2."""
        handshake = _Handshake(self.options, _client(self.cert_path, [b"h2", b"http/1.1"]))
        self.assertTrue(handshake.succeeded)
        self.assertEqual(handshake.client.negotiatedProtocol, b"h2")
        self.assertEqual(handshake.server.negotiatedProtocol, b"h2")

    def test_alpn_server_prefers_h2(self) -> None:
        """The server's preference wins: a client listing http/1.1 first still gets h2."""
        handshake = _Handshake(self.options, _client(self.cert_path, [b"http/1.1", b"h2"]))
        self.assertEqual(handshake.client.negotiatedProtocol, b"h2")

    def test_alpn_negotiates_http11(self) -> None:
        """A client offering only http/1.1 gets http/1.1."""
        handshake = _Handshake(self.options, _client(self.cert_path, [b"http/1.1"]))
        self.assertTrue(handshake.succeeded)
        self.assertEqual(handshake.client.negotiatedProtocol, b"http/1.1")

    def test_tls12_accepted(self) -> None:
        """A client limited to TLS 1.2 connects, over TLS 1.2."""
        client = CertificateOptions(
            trustRoot=Certificate.loadPEM(_read(self.cert_path)),
            lowerMaximumSecurityTo=TLSVersion.TLSv1_2,
        )
        handshake = _Handshake(self.options, client)
        self.assertTrue(handshake.succeeded)
        self.assertEqual(handshake.server.getHandle().get_protocol_version_name(), "TLSv1.2")

    def test_tls11_disabled(self) -> None:
        """The server's context refuses TLS 1.0 and 1.1 (the system OpenSSL may too)."""
        # A real handshake cannot tell: this OpenSSL refuses TLS 1.1 whatever Twisted asks.
        # So read the context's options: a fresh context, as used ones refuse set_options,
        # which with 0 changes nothing and returns the options in force.
        options = self.options._makeContext(skipCiphers=True).set_options(0)
        self.assertTrue(options & SSL.OP_NO_TLSv1)
        self.assertTrue(options & SSL.OP_NO_TLSv1_1)
        self.assertFalse(options & SSL.OP_NO_TLSv1_2)

    def test_chain_is_sent(self) -> None:
        """Intermediates after the leaf in the certificate file reach clients trusting the root."""
        directory = self.mktemp()
        os.mkdir(directory)
        root_key, mid_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in "123")
        root = _issue("root", root_key, None, root_key, ca=True)
        mid = _issue("intermediate", mid_key, root, root_key, ca=True)
        leaf = _issue("localhost", leaf_key, mid, mid_key, ca=False)
        pem = serialization.Encoding.PEM
        key_path = _write(os.path.join(directory, "key.pem"), _key_pem(leaf_key))
        chain_path = _write(
            os.path.join(directory, "chain.pem"), leaf.public_bytes(pem) + mid.public_bytes(pem)
        )
        root_path = _write(os.path.join(directory, "root.pem"), root.public_bytes(pem))
        handshake = _Handshake(
            server_context_factory(key_path, chain_path), _client(root_path, [b"h2"])
        )
        self.assertTrue(handshake.succeeded)

    def test_key_and_cert_in_one_file(self) -> None:
        """One PEM file holding both the key and the certificate is accepted for both."""
        both = _write(self.mktemp(), _read(self.key_path) + _read(self.cert_path))
        handshake = _Handshake(
            server_context_factory(both, both), _client(self.cert_path, [b"http/1.1"])
        )
        self.assertTrue(handshake.succeeded)

    def test_missing_key_file(self) -> None:
        """A key file that does not exist is a ConfigError naming it."""
        missing = os.path.join(self.mktemp(), "nope.pem")
        error = self.assertRaises(ConfigError, server_context_factory, missing, self.cert_path)
        self.assertIn(missing, str(error))

    def test_missing_cert_file(self) -> None:
        """A certificate file that does not exist is a ConfigError naming it."""
        missing = os.path.join(self.mktemp(), "nope.pem")
        error = self.assertRaises(ConfigError, server_context_factory, self.key_path, missing)
        self.assertIn(missing, str(error))

    def test_key_file_without_key(self) -> None:
        """A key file holding only a certificate is a ConfigError naming it."""
        error = self.assertRaises(
            ConfigError, server_context_factory, self.cert_path, self.cert_path
        )
        self.assertIn(self.cert_path, str(error))

    def test_cert_file_without_cert(self) -> None:
        """A certificate file holding no certificate is a ConfigError naming it."""
        error = self.assertRaises(
            ConfigError, server_context_factory, self.key_path, self.key_path
        )
        self.assertIn("holds no PEM certificate", str(error))

    def test_mismatched_key_and_cert(self) -> None:
        """A certificate for another key is a ConfigError naming both files."""
        other_key = _write(self.mktemp(), _key_pem(ec.generate_private_key(ec.SECP256R1())))
        error = self.assertRaises(ConfigError, server_context_factory, other_key, self.cert_path)
        self.assertIn(other_key, str(error))
        self.assertIn(self.cert_path, str(error))

    def test_expired_certificate_warns(self) -> None:
        """An expired certificate is still loaded, with a warning naming it."""
        events = EventLoggingObserver()
        globalLogPublisher.addObserver(events)
        self.addCleanup(globalLogPublisher.removeObserver, events)
        key_path, cert_path = ensure_self_signed(self.mktemp(), now=time.time() - 400 * _DAY)
        server_context_factory(key_path, cert_path)
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["path"], cert_path)


class UpstreamTLSOptionsTests(SynchronousTestCase):
    """L{upstream_tls_options} verifies the upstream's certificate and host name."""

    def setUp(self) -> None:
        self.key_path, self.cert_path = ensure_self_signed(self.mktemp())
        self.server = server_context_factory(self.key_path, self.cert_path)

    def test_right_hostname_accepted(self) -> None:
        """With the certificate as CA bundle, "localhost" verifies and ALPN gives http/1.1."""
        handshake = _Handshake(self.server, upstream_tls_options("localhost", self.cert_path))
        self.assertTrue(handshake.succeeded)
        self.assertEqual(handshake.client.negotiatedProtocol, b"http/1.1")

    def test_ip_address_accepted(self) -> None:
        """An upstream addressed by IP verifies against the certificate's IP SAN."""
        handshake = _Handshake(self.server, upstream_tls_options("127.0.0.1", self.cert_path))
        self.assertTrue(handshake.succeeded)

    def test_wrong_hostname_rejected(self) -> None:
        """A certificate for localhost does not pass for example.com, even from a trusted CA."""
        handshake = _Handshake(self.server, upstream_tls_options("example.com", self.cert_path))
        self.assertFalse(handshake.succeeded)
        reason = handshake.client_app.lost
        assert reason is not None
        self.assertIn("example.com", str(reason.value))
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_untrusted_certificate_rejected(self) -> None:
        """A server certificate not issued by the bundle's CAs fails verification."""
        other = ensure_self_signed(self.mktemp())[1]
        handshake = _Handshake(self.server, upstream_tls_options("localhost", other))
        self.assertFalse(handshake.succeeded)
        reason = handshake.client_app.lost
        assert reason is not None
        self.assertIn("certificate verify failed", str(reason.value))

    def test_bundle_with_several_certificates(self) -> None:
        """Every certificate in the bundle is trusted, not just the first."""
        other = ensure_self_signed(self.mktemp())[1]
        bundle = _write(self.mktemp(), _read(other) + b"\n" + _read(self.cert_path))
        handshake = _Handshake(self.server, upstream_tls_options("localhost", bundle))
        self.assertTrue(handshake.succeeded)

    def test_missing_bundle(self) -> None:
        """A CA bundle that does not exist is a ConfigError naming it."""
        missing = os.path.join(self.mktemp(), "ca.pem")
        error = self.assertRaises(ConfigError, upstream_tls_options, "localhost", missing)
        self.assertIn(missing, str(error))

    def test_bundle_without_certificates(self) -> None:
        """A CA bundle holding no certificate is a ConfigError naming it."""
        error = self.assertRaises(ConfigError, upstream_tls_options, "localhost", self.key_path)
        self.assertIn(self.key_path, str(error))

    def test_platform_trust_by_default(self) -> None:
        """Without a bundle, the system trust store is used: our self-signed cert fails."""
        handshake = _Handshake(self.server, upstream_tls_options("localhost", None))
        self.assertFalse(handshake.succeeded)


class ListenerEndpointTests(SynchronousTestCase):
    """L{listener_endpoint} builds the right endpoint for each listener kind."""

    def setUp(self) -> None:
        self.reactor = MemoryReactor()
        self.state = self.mktemp()

    def test_tcp(self) -> None:
        """A tcp listener listens with TCP on its port, interface and backlog."""
        listener = ListenerConfig("tcp", 8080, interface="127.0.0.1", backlog=7)
        endpoint, cert = listener_endpoint(self.reactor, listener, self.state)
        self.assertIsInstance(endpoint, TCP4ServerEndpoint)
        self.assertIsNone(cert)
        factory = Factory()
        self.successResultOf(endpoint.listen(factory))
        self.assertEqual(self.reactor.tcpServers, [(8080, factory, 7, "127.0.0.1")])
        self.assertFalse(os.path.exists(self.state))

    def test_tcp_ipv6(self) -> None:
        """An IPv6 interface gets a TCP6 endpoint."""
        listener = ListenerConfig("tcp", 8080, interface="::1")
        endpoint, _ = listener_endpoint(self.reactor, listener, self.state)
        self.assertIsInstance(endpoint, TCP6ServerEndpoint)
        self.successResultOf(endpoint.listen(Factory()))
        self.assertEqual(self.reactor.tcpServers[0][3], "::1")

    def test_tls_self_signed(self) -> None:
        """A selfsigned tls listener listens with SSL and reports the generated certificate."""
        listener = ListenerConfig("tls", 8443, interface="0.0.0.0", self_signed=True)
        endpoint, cert = listener_endpoint(self.reactor, listener, self.state)
        self.assertIsInstance(endpoint, SSL4ServerEndpoint)
        self.assertEqual(cert, os.path.join(self.state, "selfsigned-cert.pem"))
        assert cert is not None
        factory = Factory()
        self.successResultOf(endpoint.listen(factory))
        [(port, got_factory, options, backlog, interface)] = self.reactor.sslServers
        self.assertEqual((port, got_factory, backlog, interface), (8443, factory, 511, "0.0.0.0"))
        assert isinstance(options, CertificateOptions)
        handshake = _Handshake(options, _client(cert, [b"h2", b"http/1.1"]))
        self.assertEqual(handshake.client.negotiatedProtocol, b"h2")

    def test_unusable_state_dir(self) -> None:
        """A state directory that cannot be made is a ConfigError naming it, not an OSError."""
        blocker = self.mktemp()
        with open(blocker, "w"):
            pass  # a file where the directory should be
        listener = ListenerConfig("tls", 8443, self_signed=True)
        for state in (blocker, os.path.join(blocker, "below")):
            with self.assertRaises(ConfigError) as caught:
                listener_endpoint(self.reactor, listener, state)
            self.assertIn(repr(state), str(caught.exception))

    def test_tls_key_files(self) -> None:
        """A tls listener with files uses them, and reports no generated certificate."""
        key_path, cert_path = ensure_self_signed(self.mktemp())
        both = _write(self.mktemp(), _read(key_path) + _read(cert_path))
        listener = ListenerConfig("tls", 443, private_key=both)
        endpoint, cert = listener_endpoint(self.reactor, listener, self.state)
        self.assertIsInstance(endpoint, SSL4ServerEndpoint)
        self.assertIsNone(cert)
        self.successResultOf(endpoint.listen(Factory()))
        [(port, _, options, _, interface)] = self.reactor.sslServers
        self.assertEqual((port, interface), (443, ""))
        assert isinstance(options, CertificateOptions)
        handshake = _Handshake(options, _client(cert_path, [b"http/1.1"]))
        self.assertTrue(handshake.succeeded)
        self.assertFalse(os.path.exists(self.state))

    def test_tls_bad_files(self) -> None:
        """A tls listener whose key file is missing raises ConfigError before listening."""
        missing = os.path.join(self.mktemp(), "key.pem")
        listener = ListenerConfig("tls", 443, private_key=missing, cert_key=missing)
        error = self.assertRaises(
            ConfigError, listener_endpoint, self.reactor, listener, self.state
        )
        self.assertIn(missing, str(error))
        self.assertEqual(self.reactor.sslServers, [])
