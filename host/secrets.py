"""Secrets at rest and in logs: the installation's keys, one cipher, one redaction helper.

Passwords, client secrets, tokens and private keys are encrypted with Fernet
(AES-128-CBC + HMAC-SHA256) under a key that ``mailhost init`` writes to a 0600 file, or
that ``$MAILHOST_SECRET_KEY`` supplies. Either may hold several keys (one per line, or
comma-separated): the first encrypts, all decrypt, which is how ``mailhost secrets
rotate`` (:mod:`mailhost.rotation`) replaces a key without a moment when a stored secret
has no key. Every secret the process decrypts is remembered
so that :func:`redact` (used by every transcript and by the logging filter) can replace
it, and its base64 forms, wherever it appears.
"""
from __future__ import annotations

import base64
import logging
import os
import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from .errors import ConfigError

__all__ = [
    "KEY_ENV",
    "KeySource",
    "REDACTED",
    "RedactingFilter",
    "Vault",
    "create_key_file",
    "create_private_file",
    "forget_secrets",
    "parse_keys",
    "redact",
    "remember_secret",
    "write_key_file",
]

REDACTED = "********"
KEY_ENV = "MAILHOST_SECRET_KEY"
log = logging.getLogger(__name__)

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


def write_key_file(path: Path, keys: Sequence[bytes]) -> None:
    """Replace the key file ``path`` with ``keys``, one per line, atomically and durably.

    A crash leaves the old file or the new one, never a part of either: the keys go to a
    0600 temporary file beside it, which is synced and renamed over ``path``, and the
    folder is synced so that the rename itself survives a power cut before the store is
    changed. A symlink's target is replaced, not the link. Raises ``OSError``.
    """
    path = path.resolve()
    temp = path.with_name(f".{path.name}.new")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a stale temporary file keeps its mode through O_TRUNC
        os.write(fd, b"".join(k + b"\n" for k in keys))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def parse_keys(text: str, where: str) -> list[bytes]:
    """The Fernet keys of ``text``: one per line or comma-separated, the first encrypts.
    ``where`` names their source in the error (never the key)."""
    raw = [k.strip() for k in re.split(r"[,\n]", text) if k.strip()]
    if not raw:
        raise ConfigError(f"{where} holds no key: restore the key, or run `mailhost init` for a new installation")
    for n, key in enumerate(raw, 1):
        try:
            Fernet(key.encode())
        except (ValueError, TypeError):
            which = f"the key in {where}" if len(raw) == 1 else f"key {n} of the {len(raw)} in {where}"
            raise ConfigError(
                f"{which} is not a valid Fernet key (32 url-safe base64 bytes): restore the right key"
            ) from None
    return [k.encode() for k in raw]


class KeySource:
    """Where the installation's keys come from: ``$MAILHOST_SECRET_KEY`` (comma-separated)
    if it is set, else the key file (one key per line). The first key encrypts, all decrypt."""

    def __init__(self, key_file: Path) -> None:
        self.env = os.environ.get(KEY_ENV) or None
        self.key_file = key_file

    @property
    def where(self) -> str:
        """The source, in words for errors."""
        return f"${KEY_ENV}" if self.env else f"the secret key file {self.key_file}"

    def stamp(self) -> tuple[int, int, int] | None:
        """What changes when the key file is replaced; ``None`` for the environment."""
        if self.env:
            return None
        try:
            st = os.stat(self.key_file)
        except OSError:
            return (0, 0, 0)  # read() says what is wrong
        return st.st_mtime_ns, st.st_size, st.st_ino

    def read(self) -> list[bytes]:
        """The keys, first the one that encrypts; ConfigError if there are none usable."""
        if self.env:
            return parse_keys(self.env, self.where)
        try:
            text = self.key_file.read_bytes().decode("ascii", "replace")
        except FileNotFoundError:
            raise ConfigError(
                f"the secret key file {self.key_file} is missing: restore it, set {KEY_ENV}, "
                "or run `mailhost init` for a new installation"
            ) from None
        except OSError as exc:  # a folder, or a file of another user
            raise ConfigError(
                f"the secret key file {self.key_file} cannot be read ({exc.strerror or exc}): check "
                f"[secrets] key_file and the file's owner and mode, or set {KEY_ENV}"
            ) from None
        return parse_keys(text, self.where)


class Vault:
    """Encrypts and decrypts secrets with the installation's keys: the first key encrypts,
    every key decrypts (:class:`~cryptography.fernet.MultiFernet`), so that a rotated key
    (``mailhost secrets rotate``) keeps opening what it encrypted.

    A vault read from the key file reads it again when the file changes: a running
    ``mailhost serve`` follows a rotation by another process without a restart.
    """

    def __init__(
        self, key: bytes | Sequence[bytes] | None = None, stored: Callable[[], bytes | None] | None = None,
        source: KeySource | None = None,
    ) -> None:
        """``key``: one key or several, the first encrypts; else the keys of ``source``."""
        #: A secret already in the store, if any: checked against the key before the first
        #: new secret is written, so that a wrong key never leaves a store of two keys.
        self._stored = stored
        self._checked = stored is None
        self._source = source
        self._stamp = source.stamp() if source is not None else None
        self._reload_lock = threading.Lock()
        if key is None:
            if source is None:
                raise TypeError("Vault needs a key or a KeySource")
            self._use(source.read())
        else:
            keys = [key] if isinstance(key, bytes) else list(key)
            self._use(parse_keys(",".join(k.decode("ascii", "replace") for k in keys), f"${KEY_ENV}"))

    def _use(self, keys: list[bytes]) -> None:
        self._count = len(keys)
        self._fernet = Fernet(keys[0])
        self._all = MultiFernet([Fernet(k) for k in keys])

    @classmethod
    def from_env_or_file(cls, key_file: Path, stored: Callable[[], bytes | None] | None = None) -> Vault:
        """The keys from ``$MAILHOST_SECRET_KEY``, else from ``key_file`` (followed when it changes)."""
        return cls(None, stored, KeySource(key_file))

    def _follow(self) -> None:
        """Read the key file again if it was replaced since it was read (a rotation)."""
        if self._source is None or self._source.stamp() == self._stamp:
            return
        with self._reload_lock:
            stamp = self._source.stamp()
            if stamp == self._stamp:
                return
            self._use(self._source.read())
            self._stamp = stamp
            self._checked = self._stored is None  # the new keys must open the store too
            log.warning("%s changed: using its %d key(s) from now on", self._source.where, self._count)

    def encrypt(self, secret: str | bytes | None) -> bytes | None:
        """The ciphertext of ``secret`` under the first key (``None`` stays ``None``)."""
        if secret is None:
            return None
        self.check()  # a wrong key stops here, before anything is written
        data = secret.encode("utf-8") if isinstance(secret, str) else secret
        return self._fernet.encrypt(data)

    def check(self) -> None:
        """Raise ConfigError unless these keys open the secrets already in the store."""
        self._follow()
        if not self._checked and self._stored is not None:
            self.decrypt_bytes(self._stored())
            self._checked = True  # checked once per process (and per key file)

    def decrypt_bytes(self, token: bytes | None) -> bytes | None:
        """The plaintext bytes of ``token`` (private keys, token sets)."""
        if token is None:
            return None
        self._follow()
        try:
            return self._all.decrypt(token)
        except InvalidToken:
            raise ConfigError(self._wrong_key()) from None

    def _wrong_key(self) -> str:
        keys = "this key" if self._count == 1 else f"these {self._count} keys"
        where = self._source.where if self._source is not None else "the key given"
        if self._source is not None and self._source.env:
            also = (f"if another process rotated it (`mailhost secrets rotate`), restart this one with the new "
                    f"{KEY_ENV}")
        else:
            also = "if it was rotated on another machine (`mailhost secrets rotate`), copy that machine's key file here"
        return (f"a stored secret cannot be decrypted with {keys} ({where}): the key differs from the one that "
                f"encrypted it; restore the original key file or {KEY_ENV}, or, {also}")

    def decrypt(self, token: bytes | None) -> str | None:
        """The plaintext of ``token``; the secret is remembered for redaction."""
        data = self.decrypt_bytes(token)
        if data is None:
            return None
        secret = data.decode("utf-8")
        remember_secret(secret)
        return secret
