"""
TLS for both sides of the proxy: the listener's server options and the upstreams' client options.

The listener speaks TLS 1.2+ with ALPN C{h2} and C{http/1.1}; upstream connections verify the
server's certificate and host name (via C{service-identity}) and offer only C{http/1.1}. For
local use, L{ensure_self_signed} makes a certificate that clients can trust directly.

Everything here that touches files runs once, at start-up.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import tempfile
import time
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import crypto
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IReactorSSL,
    IReactorTCP,
    IStreamServerEndpoint,
)
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.logger import Logger

from oaiproxy.config import ConfigError, ListenerConfig
from oaiproxy.porttune import SSL4ServerEndpoint, TCP4ServerEndpoint, TCP6ServerEndpoint

__all__ = [
    "SELF_SIGNED_CERT",
    "SELF_SIGNED_KEY",
    "ensure_self_signed",
    "listener_endpoint",
    "openssl_reasons",
    "server_context_factory",
    "upstream_tls_options",
]

_log = Logger()

SELF_SIGNED_KEY = "selfsigned-key.pem"
"""File name of the generated private key inside the state directory."""
SELF_SIGNED_CERT = "selfsigned-cert.pem"
"""File name of the generated certificate inside the state directory."""

_SERVER_ALPN = [b"h2", b"http/1.1"]
_UPSTREAM_ALPN = [b"http/1.1"]
_VALIDITY = datetime.timedelta(days=365)
_MIN_REMAINING = datetime.timedelta(days=1)
# Allow for clients whose clocks run a little behind ours.
_BACKDATE = datetime.timedelta(minutes=5)
# The key types OpenSSL can serve TLS with (and pyOpenSSL can take from cryptography).
_TLSKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | dsa.DSAPrivateKey
)
_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


def _read(path: str, what: str) -> bytes:
    """Read a whole file, turning any OS error into a L{ConfigError} naming C{path}."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path!r}: {e.strerror or e}") from None


def _spki(key: _TLSKey | x509.Certificate) -> bytes:
    """The DER SubjectPublicKeyInfo of a private key or a certificate, for comparing them."""
    public = key.public_key()
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _load_key(path: str) -> _TLSKey:
    """Load an unencrypted PEM private key (the file may also hold certificates)."""
    data = _read(path, "private key file")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        # TypeError: the key is encrypted; we have no way to ask for a passphrase.
        raise ConfigError(
            f"private key file {path!r} holds no usable unencrypted PEM private key: {e}"
        ) from None
    if not isinstance(key, _TLSKey):
        raise ConfigError(
            f"private key file {path!r} holds a {type(key).__name__}, which TLS cannot use"
        )
    return key


def _load_certs(path: str) -> list[x509.Certificate]:
    """Load every PEM certificate in a file, in order; at least one must be there."""
    data = _read(path, "certificate file")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise ConfigError(f"certificate file {path!r} holds no PEM certificate: {e}") from None


def server_context_factory(private_key: str, cert_key: str) -> CertificateOptions:
    """
    Build the listener's TLS options: TLS 1.2 or newer, ALPN C{h2} then C{http/1.1}.

    @param private_key: path of a PEM file with the unencrypted private key.
    @param cert_key: path of a PEM file with the certificate, leaf first, then any
        intermediates (sent along as the chain). May be the same file as C{private_key}.
    @raise ConfigError: when a file is missing or unreadable, holds no key or certificate, or
        the leaf certificate does not belong to the key; the message names the file.
    """
    key = _load_key(private_key)
    leaf, *chain = _load_certs(cert_key)
    if _spki(key) != _spki(leaf):
        raise ConfigError(
            f"the first certificate in {cert_key!r} does not match the private key in "
            f"{private_key!r} (the server's own certificate must come first)"
        )
    if leaf.not_valid_after_utc < datetime.datetime.now(datetime.UTC):
        # Serving it is the operator's call; clients will refuse it, so say so loudly.
        _log.warn(
            "TLS certificate {path} expired on {expiry}",
            path=cert_key,
            expiry=leaf.not_valid_after_utc.isoformat(),
        )
    try:
        return CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(key),
            certificate=crypto.X509.from_cryptography(leaf),
            extraCertChain=[crypto.X509.from_cryptography(c) for c in chain],
            raiseMinimumTo=TLSVersion.TLSv1_2,
            acceptableProtocols=_SERVER_ALPN,
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot use the key {private_key!r} for TLS: {e}") from None


def _wanted_sans(hostnames: Sequence[str]) -> list[x509.GeneralName]:
    """Subject alternative names for C{hostnames}: IP SANs for addresses, DNS SANs otherwise."""
    names: list[x509.GeneralName] = []
    for name in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    return names


def _reusable(key_path: str, cert_path: str, sans: list[x509.GeneralName], now: float) -> bool:
    """Whether an earlier self-signed pair is intact, covers C{sans}, and has a day left."""
    if not (os.path.exists(key_path) and os.path.exists(cert_path)):
        return False
    try:
        key = _load_key(key_path)
        cert = _load_certs(cert_path)[0]
        have = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ConfigError, x509.ExtensionNotFound):
        return False
    remaining = cert.not_valid_after_utc - datetime.datetime.fromtimestamp(now, datetime.UTC)
    return (
        _spki(key) == _spki(cert)
        and remaining > _MIN_REMAINING
        and all(san in have for san in sans)
    )


def _write_private(directory: str, name: str, data: bytes) -> str:
    """Atomically write C{data} to C{directory/name} with mode 0600; return the path."""
    path = os.path.join(directory, name)
    # mkstemp creates the file 0600, so the key is never readable by others, even briefly.
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def _self_signed(
    key: CertificateIssuerPrivateKeyTypes, sans: list[x509.GeneralName], now: float
) -> x509.Certificate:
    """A one-year self-signed certificate that is both a CA and a server certificate."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "oaiproxy self-signed"),
            x509.NameAttribute(NameOID.COMMON_NAME, "oaiproxy local"),
        ]
    )
    start = datetime.datetime.fromtimestamp(now, datetime.UTC) - _BACKDATE
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + _VALIDITY)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        # CA:TRUE so clients can pass this very file as their trust anchor (--cacert, verify=).
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def openssl_reasons(error: BaseException) -> list[str]:
    """
    The reasons in an C{OpenSSL.SSL.Error} (e.g. C{certificate verify failed}, C{wrong
    version number}): pyOpenSSL gives a list of (library, function, reason) triples.
    """
    details = error.args[0] if error.args and isinstance(error.args[0], list) else []
    return [str(e[-1]) for e in details if isinstance(e, tuple) and e]


def ensure_self_signed(
    state_dir: str,
    hostnames: Sequence[str] = ("localhost", "127.0.0.1", "::1"),
    *,
    now: float | None = None,
) -> tuple[str, str]:
    """
    Make (once) a self-signed EC P-256 certificate for C{hostnames} in C{state_dir}.

    The pair is C{selfsigned-key.pem} (mode 0600) and C{selfsigned-cert.pem}; C{state_dir} is
    created with mode 0700 if missing. An existing pair is reused, untouched, while it is
    intact, names every one of C{hostnames}, and stays valid for more than a day; otherwise a
    new one replaces it. The certificate is valid for a year and is its own CA, so clients can
    trust the certificate file directly.

    @param hostnames: DNS names and IP addresses to put in the subject alternative names.
    @param now: the current time in seconds since the epoch; the system clock if L{None}.
    @return: C{(key_path, cert_path)}.
    @raise OSError: when the directory or files cannot be written.
    """
    when = time.time() if now is None else now
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    key_path = os.path.join(state_dir, SELF_SIGNED_KEY)
    cert_path = os.path.join(state_dir, SELF_SIGNED_CERT)
    sans = _wanted_sans(hostnames)
    if _reusable(key_path, cert_path, sans, when):
        return key_path, cert_path

    key = ec.generate_private_key(ec.SECP256R1())
    cert = _self_signed(key, sans, when)
    # Key first: a crash between the two writes leaves a mismatched pair, which is regenerated.
    _write_private(
        state_dir,
        SELF_SIGNED_KEY,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    _write_private(state_dir, SELF_SIGNED_CERT, cert.public_bytes(serialization.Encoding.PEM))
    _log.info(
        "generated self-signed certificate {cert} for {hostnames}",
        cert=cert_path,
        hostnames=list(hostnames),
    )
    return key_path, cert_path


def listener_endpoint(
    reactor: IReactorTCP,
    listener: ListenerConfig,
    state_dir: str,
) -> tuple[IStreamServerEndpoint, str | None]:
    """
    The server endpoint for one listener.

    C{tcp} listeners get a TCP endpoint (IPv6 when the interface contains C{:}); C{tls}
    listeners get an SSL endpoint with L{server_context_factory}, using the configured files or
    a certificate from L{ensure_self_signed} in C{state_dir}. The endpoints are
    L{oaiproxy.porttune}'s: Twisted's, listening with its tuned port where they can.

    @param reactor: must also provide L{IReactorSSL} for C{tls} listeners. (Zope interfaces
        cannot be intersected in a type, so this is checked when adapting.)
    @return: the endpoint, and the self-signed certificate's path when one is used (for the
        caller to show to users), else L{None}.
    @raise ConfigError: when the key or certificate files are unusable.
    """
    if listener.kind == "tcp":
        if ":" in listener.interface:
            # Twisted's endpoint constructors are unannotated.
            tcp6: IStreamServerEndpoint = TCP6ServerEndpoint(
                reactor, listener.port, listener.backlog, listener.interface
            )
            return tcp6, None
        tcp4: IStreamServerEndpoint = TCP4ServerEndpoint(
            reactor, listener.port, listener.backlog, listener.interface
        )
        return tcp4, None

    shown: str | None = None
    if listener.self_signed:
        try:
            key_path, cert_path = ensure_self_signed(state_dir)
        except OSError as e:
            raise ConfigError(
                f"state directory {state_dir!r}: cannot keep the self-signed certificate "
                f"there: {e.strerror or e}"
            ) from None
        shown = cert_path
    else:
        # ListenerConfig guarantees a private key; the certificate may share its file.
        assert listener.private_key is not None
        key_path = listener.private_key
        cert_path = listener.cert_key or listener.private_key
    options = server_context_factory(key_path, cert_path)
    # An IPv6 interface works here too: the SSL port picks its address family from it.
    endpoint: IStreamServerEndpoint = SSL4ServerEndpoint(
        IReactorSSL(reactor), listener.port, options, listener.backlog, listener.interface
    )
    return endpoint, shown


def upstream_tls_options(hostname: str, ca_bundle: str | None) -> IOpenSSLClientConnectionCreator:
    """
    Client TLS options for one upstream: certificate and host name verified, ALPN C{http/1.1}.

    @param hostname: the upstream's DNS name or IP address, as in its URL.
    @param ca_bundle: a PEM file of one or more CA certificates to trust instead of the
        system's trust store, or L{None} for the system's.
    @raise ConfigError: when C{ca_bundle} is unreadable or holds no usable certificate.
    """
    if ca_bundle is None:
        # platformTrust and trustRootFromCertificates are unannotated in Twisted.
        trust = platformTrust()
    else:
        data = _read(ca_bundle, "CA bundle")
        blocks = _PEM_CERT.findall(data)
        if not blocks:
            raise ConfigError(f"CA bundle {ca_bundle!r} holds no PEM certificate")
        try:
            certs = [Certificate.loadPEM(block) for block in blocks]
        except crypto.Error as e:
            raise ConfigError(f"CA bundle {ca_bundle!r} holds a bad certificate: {e}") from None
        trust = trustRootFromCertificates(certs)
    return optionsForClientTLS(hostname, trustRoot=trust, acceptableProtocols=_UPSTREAM_ALPN)
