"""Secrets at rest and in logs: one key, one cipher, one redaction helper.

Passwords, client secrets, tokens and private keys are encrypted with Fernet
(AES-128-CBC + HMAC-SHA256) under a key that ``mailhost init`` writes to a 0600 file, or
that ``$MAILHOST_SECRET_KEY`` supplies. Every secret the process decrypts is remembered
so that :func:`redact` (used by every transcript and by the logging filter) can replace
it, and its base64 forms, wherever it appears.
"""
from __future__ import annotations

import base64
import logging
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from .errors import ConfigError

__all__ = [
    "REDACTED",
    "RedactingFilter",
    "Vault",
    "create_key_file",
    "create_private_file",
    "forget_secrets",
    "redact",
    "remember_secret",
]

REDACTED = "********"
_KEY_ENV = "MAILHOST_SECRET_KEY"

_lock = threading.Lock()
_known: set[str] = set()
_pattern: re.Pattern[str] | None = None

# Lines that carry credentials whatever their value: SASL exchanges and bearer tokens.
_AUTH_LINE = re.compile(
    r"(?i)(\bAUTH(?:ENTICATE)?\s+(?:PLAIN|LOGIN|XOAUTH2|OAUTHBEARER|CRAM-MD5)\b)\s+"
    r"(?!(?:PLAIN|LOGIN|XOAUTH2|OAUTHBEARER|CRAM-MD5|GSSAPI|NTLM)\b)\S+"  # not an EHLO list
    r"|(\bBearer\s+)[A-Za-z0-9._~+/=-]+"
    r"|(\bauth=Bearer\s+)[^\x01\s]+"
)


def _forms(secret: str) -> set[str]:
    """The secret and the encodings it travels in on the wire (base64, SASL PLAIN)."""
    raw = secret.encode("utf-8")
    forms = {secret, base64.b64encode(raw).decode()}
    # SASL PLAIN and XOAUTH2 carry the secret inside a larger base64 blob; the blob
    # is caught by _AUTH_LINE, and a bare blob on a continuation line by the three
    # alignments of the secret's base64.
    for pad in (b"\0", b"\0\0"):
        enc = base64.b64encode(pad + raw).decode()
        forms.add(enc[4:-4] if len(enc) > 12 else enc)
    return {f for f in forms if len(f) >= 4}


def remember_secret(secret: str | None) -> None:
    """Make :func:`redact` hide ``secret`` (and its base64 forms) from now on."""
    global _pattern
    if not secret:
        return
    with _lock:
        new = _forms(secret) - _known
        if not new:
            return
        _known.update(new)
        ordered = sorted(_known, key=len, reverse=True)
        _pattern = re.compile("|".join(re.escape(s) for s in ordered))


def forget_secrets() -> None:
    """Forget every remembered secret (for tests)."""
    global _pattern
    with _lock:
        _known.clear()
        _pattern = None


def redact(text: str, *extra: str | None) -> str:
    """``text`` with every known secret, the ``extra`` ones and SASL payloads hidden."""
    for secret in extra:
        remember_secret(secret)
    pattern = _pattern
    if pattern is not None:
        text = pattern.sub(REDACTED, text)
    return _AUTH_LINE.sub(lambda m: (m.group(1) or m.group(2) or m.group(3)) + " " + REDACTED, text)


class RedactingFilter(logging.Filter):
    """A logging filter that redacts every record's message, arguments included."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def create_private_file(path: Path, data: bytes = b"") -> None:
    """Create ``path`` holding ``data``, readable by its owner only (0600); never
    overwrites one. For what holds secrets or mail: the key, the config, the store."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def create_key_file(path: Path) -> None:
    """Write a new random key to ``path`` with mode 0600; never overwrites one."""
    create_private_file(path, Fernet.generate_key() + b"\n")


class Vault:
    """Encrypts and decrypts secrets with the installation's key."""

    def __init__(self, key: bytes, stored: Callable[[], bytes | None] | None = None) -> None:
        #: A secret already in the store, if any: checked against the key before the first
        #: new secret is written, so that a wrong key never leaves a store of two keys.
        self._stored = stored
        try:
            self._fernet = Fernet(key)
        except (ValueError, TypeError) as exc:
            raise ConfigError(
                "the secret key is not a valid Fernet key (32 url-safe base64 bytes): "
                f"restore the right key or set {_KEY_ENV}"
            ) from exc

    @classmethod
    def from_env_or_file(cls, key_file: Path, stored: Callable[[], bytes | None] | None = None) -> Vault:
        """The key from ``$MAILHOST_SECRET_KEY``, else from ``key_file``."""
        env = os.environ.get(_KEY_ENV)
        if env:
            return cls(env.strip().encode(), stored)
        try:
            return cls(key_file.read_bytes().strip(), stored)
        except FileNotFoundError:
            raise ConfigError(
                f"the secret key file {key_file} is missing: restore it, set {_KEY_ENV}, "
                "or run `mailhost init` for a new installation"
            ) from None
        except OSError as exc:  # a folder, or a file of another user
            raise ConfigError(
                f"the secret key file {key_file} cannot be read ({exc.strerror or exc}): check "
                f"[secrets] key_file and the file's owner and mode, or set {_KEY_ENV}"
            ) from None

    def encrypt(self, secret: str | bytes | None) -> bytes | None:
        """The ciphertext of ``secret`` (``None`` stays ``None``)."""
        if secret is None:
            return None
        self.check()  # a wrong key stops here, before anything is written
        data = secret.encode("utf-8") if isinstance(secret, str) else secret
        return self._fernet.encrypt(data)

    def check(self) -> None:
        """Raise ConfigError unless this key opens the secrets already in the store."""
        if self._stored is not None:
            self.decrypt_bytes(self._stored())
            self._stored = None  # checked once per process

    def decrypt_bytes(self, token: bytes | None) -> bytes | None:
        """The plaintext bytes of ``token`` (private keys, token sets)."""
        if token is None:
            return None
        try:
            return self._fernet.decrypt(token)
        except InvalidToken:
            raise ConfigError(
                "a stored secret cannot be decrypted with this key: the key differs from "
                f"the one that encrypted it; restore the original key file or {_KEY_ENV}"
            ) from None

    def decrypt(self, token: bytes | None) -> str | None:
        """The plaintext of ``token``; the secret is remembered for redaction."""
        data = self.decrypt_bytes(token)
        if data is None:
            return None
        secret = data.decode("utf-8")
        remember_secret(secret)
        return secret
