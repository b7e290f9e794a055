"""TLS for every protocol: verified always, a private CA per connection when asked.

The stdlib's mail clients (imaplib, poplib, smtplib) do not verify certificates unless
they are given a verifying context; every plugin gets its context here, so there is one
place that decides, and no switch to turn verification off.
"""
from __future__ import annotations

import datetime as dt
import ssl
from dataclasses import dataclass
from typing import Any

from .errors import TLSFailure

__all__ = ["PeerCertificate", "client_context", "describe_peer", "tls_error"]


def client_context(ca_file: str | None = None) -> ssl.SSLContext:
    """A client context that verifies the server's certificate and host name.

    Trusts the system store, plus ``ca_file`` (PEM) when the connection has one: a
    TLSFailure names it when it cannot be read. TLS 1.2 is the floor.
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_file:
        try:
            ctx.load_verify_locations(cafile=ca_file)
        except (OSError, ValueError) as exc:  # checked when saved, but moved or changed since
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise TLSFailure(
                f"the CA file {ca_file} cannot be used ({reason}): put the PEM file of the "
                "server's CA back there, or give another with --ca-file"
            ) from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


@dataclass(frozen=True)
class PeerCertificate:
    """What a connection test reports about the server's certificate."""

    protocol: str
    cipher: str
    subject: str
    issuer: str
    not_after: dt.datetime | None

    def describe(self) -> str:
        """One line: protocol, subject, expiry."""
        expiry = self.not_after.date().isoformat() if self.not_after else "unknown"
        return f"{self.protocol}, {self.cipher}; certificate {self.subject} (issued by {self.issuer}), valid until {expiry}"


def describe_peer(sock: ssl.SSLSocket) -> PeerCertificate:
    """The negotiated protocol and the verified peer certificate of ``sock``."""
    cert: dict[str, Any] = sock.getpeercert() or {}

    def name(field: str) -> str:
        parts = [f"{k}={v}" for rdn in cert.get(field, ()) for k, v in rdn]
        return ", ".join(parts) or "?"

    not_after = None
    if cert.get("notAfter"):
        not_after = dt.datetime.fromtimestamp(ssl.cert_time_to_seconds(cert["notAfter"]), dt.timezone.utc)
    cipher = sock.cipher()
    return PeerCertificate(
        protocol=sock.version() or "?",
        cipher=cipher[0] if cipher else "?",
        subject=name("subject"),
        issuer=name("issuer"),
        not_after=not_after,
    )


def tls_error(exc: BaseException, where: str, ca_file: str | None = None) -> TLSFailure:
    """A TLSFailure that says what went wrong with ``where``'s certificate and the fix."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or str(exc)
        fix = (
            "check that the host name matches the server's certificate"
            if "hostname" in reason.lower() or "ip address mismatch" in reason.lower()
            else "if the server uses a private CA, give its certificate with --ca-file"
            if not ca_file
            else f"the CA file {ca_file} does not sign this server's certificate"
        )
        return TLSFailure(f"the TLS certificate of {where} is not trusted ({reason}): {fix}")
    return TLSFailure(f"TLS with {where} failed ({exc}): check the encryption setting and the port")
