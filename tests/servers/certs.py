"""Throwaway PKI for the test servers, built with ``cryptography``.

``make_pki(directory)`` writes two independent CAs, each with a server
certificate for ``localhost`` (SAN ``DNS:localhost``, ``IP:127.0.0.1``,
``IP:::1``):

* the *trusted* CA (``ca_file``) -- clients in tests load it as their only
  trust anchor (``ssl.create_default_context(cafile=pki.ca_file)``);
* the *untrusted* CA (``untrusted_ca_file``) -- a server presenting
  ``untrusted_cert_file`` must FAIL verification against ``ca_file``.

``make_pkcs12(directory, name, password)`` builds a PKCS#12 bundle (an S/MIME
style end-entity certificate plus its key) for signing/encryption tests.

All keys are RSA-2048 (widest compatibility: Dovecot, OpenSSL, S/MIME key
transport). Private keys are written unencrypted, mode 0600 (the servers load
them as root before dropping privileges).
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "Pki",
    "make_pki",
    "make_pkcs12",
    "server_ssl_context",
    "client_ssl_context",
]

_KEY_SIZE = 2048


@dataclass(frozen=True)
class Pki:
    """Paths (as ``str``) of the PEM files written by :func:`make_pki`."""

    directory: str
    ca_file: str
    ca_key_file: str
    cert_file: str
    key_file: str
    untrusted_ca_file: str
    untrusted_ca_key_file: str
    untrusted_cert_file: str
    untrusted_key_file: str

    def server_context(self, untrusted: bool = False) -> ssl.SSLContext:
        """A server-side ``SSLContext`` loaded with the (un)trusted server cert."""
        if untrusted:
            return server_ssl_context(self.untrusted_cert_file, self.untrusted_key_file)
        return server_ssl_context(self.cert_file, self.key_file)

    def client_context(self) -> ssl.SSLContext:
        """A verifying client ``SSLContext`` trusting only the trusted test CA."""
        return client_ssl_context(self.ca_file)


def server_ssl_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """Server-side TLS context (TLS >= 1.2, no client certificates)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


def client_ssl_context(ca_file: str) -> ssl.SSLContext:
    """Verifying client context (hostname check on) trusting only ``ca_file``."""
    return ssl.create_default_context(cafile=ca_file)


# --------------------------------------------------------------------------
# internals


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=_KEY_SIZE)


def _name(common_name: str, org: str = "mailhost tests") -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _make_ca(common_name: str) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = _new_key()
    name = _name(common_name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - _dt.timedelta(days=1))
        .not_valid_after(_now() + _dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _make_leaf(
    ca_cert: x509.Certificate,
    ca_key: rsa.RSAPrivateKey,
    common_name: str,
    san: list[x509.GeneralName],
    eku: list[x509.ObjectIdentifier],
) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = _new_key()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - _dt.timedelta(days=1))
        .not_valid_after(_now() + _dt.timedelta(days=825))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int = 0o644) -> str:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return str(path)


_SERVER_SAN: list[x509.GeneralName] = [
    x509.DNSName("localhost"),
    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    x509.IPAddress(ipaddress.ip_address("::1")),
]


def make_pki(directory: str | os.PathLike[str]) -> Pki:
    """Create both CAs and their ``localhost`` server certs as PEM files in
    ``directory`` (created if missing) and return their paths."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    for prefix, label in (("", "trusted"), ("untrusted_", "UNTRUSTED")):
        ca_cert, ca_key = _make_ca(f"mailhost test CA ({label})")
        srv_cert, srv_key = _make_leaf(
            ca_cert, ca_key, "localhost", _SERVER_SAN, [ExtendedKeyUsageOID.SERVER_AUTH]
        )
        stem = prefix.rstrip("_") or "trusted"
        files[f"{prefix}ca_file"] = _write(d / f"{stem}-ca.pem", _cert_pem(ca_cert))
        files[f"{prefix}ca_key_file"] = _write(
            d / f"{stem}-ca.key", _key_pem(ca_key), 0o600
        )
        files[f"{prefix}cert_file"] = _write(d / f"{stem}-server.pem", _cert_pem(srv_cert))
        files[f"{prefix}key_file"] = _write(
            d / f"{stem}-server.key", _key_pem(srv_key), 0o600
        )
    return Pki(directory=str(d), **files)


def _load_ca(pki: Pki) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    cert = x509.load_pem_x509_certificate(Path(pki.ca_file).read_bytes())
    key = serialization.load_pem_private_key(Path(pki.ca_key_file).read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return cert, key


def make_pkcs12(
    directory: str | os.PathLike[str],
    name: str,
    password: str | bytes | None,
    *,
    email: str | None = None,
    pki: Pki | None = None,
) -> tuple[str, bytes, bytes]:
    """Build ``<directory>/<name>.p12``: an S/MIME end-entity certificate
    (SAN ``email`` -- default ``<name>@example.com``; EKU emailProtection and
    clientAuth) with its RSA key, plus the issuing CA cert in the bundle.

    Issued by ``pki``'s trusted CA if given, else by a fresh private CA whose
    certificate is also written as ``<name>-ca.pem``. Empty/None password =
    unencrypted bundle. Returns ``(p12_path, cert_pem, key_pem)`` (key PEM is
    unencrypted PKCS#8)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if pki is not None:
        ca_cert, ca_key = _load_ca(pki)
    else:
        ca_cert, ca_key = _make_ca(f"mailhost S/MIME CA for {name}")
        _write(d / f"{name}-ca.pem", _cert_pem(ca_cert))
    email = email or f"{name}@example.com"
    cert, key = _make_leaf(
        ca_cert,
        ca_key,
        name,
        [x509.RFC822Name(email)],
        [ExtendedKeyUsageOID.EMAIL_PROTECTION, ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    if isinstance(password, str):
        password = password.encode()
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    blob = pkcs12.serialize_key_and_certificates(
        name.encode(), key, cert, [ca_cert], enc
    )
    path = _write(d / f"{name}.p12", blob, 0o600)
    return path, _cert_pem(cert), _key_pem(key)
