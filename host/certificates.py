"""Values passed through the certificate-decryption hook.

The store keeps certificates encrypted at rest; the host decrypts the ones attached to
a connection and hands them to ``decrypt_message`` implementations as
:class:`Certificate` objects. Decrypted content is data, never something to render or
fetch from (EFAIL): a handler must not load remote content or follow links in it.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Certificate", "Decryption"]


@dataclass(frozen=True)
class Certificate:
    """One certificate attached to a connection, with its private key in clear.

    Exists only in memory while a message is decrypted; never logged.
    """

    name: str
    cert_pem: bytes
    key_pem: bytes = b""
    alias: str | None = None

    def __repr__(self) -> str:  # keep the key out of tracebacks and logs
        return f"Certificate(name={self.name!r}, alias={self.alias!r})"


@dataclass(frozen=True)
class Decryption:
    """What a decryption plugin made of a message.

    ``raw`` is the decrypted message, or ``None`` when it could not be decrypted; then
    ``error`` says why (no matching certificate, corrupt, unsupported).
    """

    raw: bytes | None
    certificate: str | None = None
    signed: bool = False
    error: str | None = None
