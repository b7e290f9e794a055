"""Certificates for decrypting incoming mail: PKCS#12 in, certificate and key stored.

::

    host.certificates.add("support", "support.p12", password="...", alias="support@example.org")
    host.connections.edit(Direction.INCOMING, "helpdesk", ConnectionSpec(certificates=["support"]))

A certificate is added from a PKCS#12 file (``.p12`` / ``.pfx``) with its password, and
a separate password for the private key where the file has one (OpenSSL's
``-twopass``). The certificate is stored as PEM in clear, with its subject, issuer,
serial and validity for listing; the private key only as ciphertext of the
installation's key (:class:`~mailhost.secrets.Vault`). Certificates are not edited: an
expired one is replaced by adding the new one, attaching it, and removing the old.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from asn1crypto import pkcs12 as asn1_pkcs12
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import padding as block_padding
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
from cryptography.hazmat.primitives.serialization import pkcs12
from sqlalchemy import func, or_, select
from sqlalchemy.orm import selectinload

from .errors import NotFound, ValidationError
from .store import Certificate, IncomingConnection, utcnow

if TYPE_CHECKING:
    from .app import Mailhost

__all__ = ["Certificates", "Pkcs12", "Removal", "certificate_dict", "load_pkcs12"]

_FIX_PASSWORD = "give it with --password-env VAR, --password-file F or --password-stdin"


class Certificates:
    """Add, list and remove the certificates that incoming connections decrypt with."""

    def __init__(self, host: Mailhost) -> None:
        self.host = host

    def add(
        self,
        name: str,
        pkcs12_file: str | os.PathLike[str] | bytes,
        password: str | None = None,
        key_password: str | None = None,
        alias: str | None = None,
    ) -> Certificate:
        """Store the certificate and private key of a PKCS#12 file (a path, or its bytes).

        Nothing is written unless the file opens with the passwords given, holds a
        private key with its certificate, and that certificate has not expired.
        """
        name = _field(name, "name", required=True)
        alias = _field(alias, "alias") or None
        if isinstance(pkcs12_file, bytes):
            data, source = pkcs12_file, "the PKCS#12 data"
        else:
            source = str(pkcs12_file)
            try:
                data = Path(pkcs12_file).expanduser().read_bytes()
            except OSError as exc:
                raise ValidationError(f"cannot read the PKCS#12 file {source}: {exc.strerror}", "file") from None
        loaded = load_pkcs12(data, password, key_password, source)
        cert = loaded.certificate
        if cert.not_valid_after_utc < utcnow():
            raise ValidationError(
                f"the certificate in {source} ({_dn(cert.subject)}) expired on "
                f"{cert.not_valid_after_utc:%Y-%m-%d}: add its current replacement instead", "file")
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        key_pem = loaded.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        with self.host.session() as s:
            if s.scalar(select(Certificate.id).where(Certificate.name == name)) is not None:
                raise ValidationError(
                    f"a certificate named {name!r} already exists: choose another name "
                    "(certificates are not edited; remove the old one once its replacement is attached)", "name")
            for other, other_pem in s.execute(select(Certificate.name, Certificate.cert_pem)):
                if other_pem == cert_pem:
                    raise ValidationError(f"the certificate in {source} is already stored as {other!r}", "file")
            row = Certificate(
                name=name, alias=alias,
                subject=_dn(cert.subject)[:1000], issuer=_dn(cert.issuer)[:1000],
                serial=_hex(cert.serial_number)[:100], not_before=cert.not_valid_before_utc,
                not_after=cert.not_valid_after_utc, cert_pem=cert_pem, key_enc=self.host.vault.encrypt(key_pem),
            )
            row.connections = []
            s.add(row)
            s.flush()
            return row

    def list(self, search: str | None = None) -> list[Certificate]:
        """Certificates by name, with the connections that use them; ``search`` matches
        name and alias (case-insensitive)."""
        with self.host.session() as s:
            query = select(Certificate).options(selectinload(Certificate.connections)).order_by(Certificate.name)
            if search:
                text = search.lower()  # autoescape: a % or _ in it is that character, not a wildcard
                query = query.where(or_(func.lower(Certificate.name).contains(text, autoescape=True),
                                        func.lower(func.coalesce(Certificate.alias, "")).contains(text, autoescape=True)))
            return list(s.scalars(query))

    def get(self, name: str) -> Certificate:
        """The certificate ``name``, or NotFound naming it."""
        with self.host.session() as s:
            row = s.scalar(select(Certificate).options(selectinload(Certificate.connections))
                           .where(Certificate.name == name))
            if row is None:
                raise NotFound(f"no certificate named {name!r}: see `mailhost certs list`")
            return row

    def remove(self, name: str, detach: bool = False) -> Removal:
        """Remove a certificate; returns the connections it was detached from, and what
        becomes of mail encrypted only for it there (:class:`Removal`).

        A certificate still attached to connections is refused unless ``detach`` is
        true: mail encrypted for it would then arrive undecrypted, so the admin says so.
        Mail already decrypted with it keeps its decrypted form.
        """
        with self.host.session() as s:
            row = s.scalar(select(Certificate).options(
                selectinload(Certificate.connections).selectinload(IncomingConnection.certificates))
                .where(Certificate.name == name))
            if row is None:
                raise NotFound(f"no certificate named {name!r}: see `mailhost certs list`")
            users = sorted(row.connections, key=lambda c: c.name)
            if users and not detach:
                raise ValidationError(
                    f"certificate {name!r} is attached to incoming connection(s) {', '.join(c.name for c in users)}: "
                    "attach its replacement there first, then remove it with --detach to detach it as well", "name")
            # Told in the same transaction as the detaching, so it is what the connections are left with.
            keeps_others = {c.name: any(other is not row for other in c.certificates) for c in users}
            row.connections = []
            s.flush()
            s.delete(row)
            return Removal(name, flagging=tuple(c for c, others in keeps_others.items() if others),
                           bare=tuple(c for c, others in keeps_others.items() if not others))


@dataclass(frozen=True)
class Removal:
    """A removed certificate, and the incoming connections it was detached from, by what
    becomes of mail encrypted only for it there from now on: it is stored as downloaded,
    not decrypted, and a connection with other certificates attached (``flagging``)
    flags it with the reason; one left with none (``bare``) does not look at encrypted
    mail, so nothing flags it there. Tell the admin now: nothing will later."""

    name: str
    flagging: tuple[str, ...] = ()
    bare: tuple[str, ...] = ()

    @property
    def detached(self) -> tuple[str, ...]:
        """Every connection it was detached from, by name."""
        return tuple(sorted(self.flagging + self.bare))


def _dn(name: x509.Name) -> str:
    """``name`` as RFC 4514 text, emailAddress (in nearly every S/MIME subject) named as
    openssl names it rather than as its OID, 1.2.840.113549.1.9.1."""
    return name.rfc4514_string({x509.NameOID.EMAIL_ADDRESS: "emailAddress"})


def certificate_dict(row: Certificate, now: dt.datetime | None = None) -> dict[str, Any]:
    """The JSON form of a stored certificate; never the key."""
    now = now or utcnow()
    return {
        "name": row.name,
        "alias": row.alias,
        "subject": row.subject,
        "issuer": row.issuer,
        "serial": row.serial,
        "not_before": row.not_before,
        "not_after": row.not_after,
        "expired": bool(row.not_after and row.not_after < now),
        "connections": sorted(c.name for c in row.connections),
    }


def _field(value: str | None, field: str, required: bool = False) -> str:
    text = (value or "").strip()
    if required and not text:
        raise ValidationError(f"the certificate {field} is empty: give a {field}", field)
    if len(text) > 200:
        raise ValidationError(f"the certificate {field} is longer than 200 characters: shorten it", field)
    if any(ord(c) < 32 or ord(c) == 127 for c in text):  # listings print it: no terminal escapes
        raise ValidationError(f"the certificate {field} {value!r} holds a control character: use printable "
                              "characters", field)
    return text


def _hex(serial: int) -> str:
    text = f"{serial:X}"
    return text if len(text) % 2 == 0 else "0" + text


# ---------------------------------------------------------------------------------------
# Reading PKCS#12
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pkcs12:
    """What a PKCS#12 file holds that mailhost keeps: one certificate and its key."""

    certificate: x509.Certificate
    key: PrivateKeyTypes

    def __repr__(self) -> str:  # keep the key out of tracebacks
        return f"Pkcs12(certificate={_dn(self.certificate.subject)!r})"


def load_pkcs12(data: bytes, password: str | None, key_password: str | None = None,
                source: str = "the PKCS#12 file") -> Pkcs12:
    """The certificate and private key in ``data``; a ValidationError in one sentence
    when it is not PKCS#12, a password is wrong, or it holds no key with its certificate.

    With one password the ``cryptography`` package reads it. With a separate
    ``key_password`` (OpenSSL ``-twopass`` files, Java keystores with a key password)
    the file is taken apart here: the integrity MAC must check out under one of the two
    passwords, and each encrypted part must open with one of them.
    """
    pfx = _pfx(data, source)
    if key_password is None:
        key, cert, extra = _load_one_password(data, password, source)
    else:
        key, certs = _load_two_passwords(pfx, password, key_password, source)
        cert, extra = None, certs
    if key is None:
        raise ValidationError(
            f"{source} holds no private key: export the certificate together with its private key", "file")
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    for candidate in [c for c in (cert, *extra) if c is not None]:
        if candidate.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == public:
            return Pkcs12(candidate, key)
    raise ValidationError(f"{source} holds no certificate for its private key: export both together", "file")


def _pfx(data: bytes, source: str) -> asn1_pkcs12.Pfx:
    if data.lstrip()[:11] == b"-----BEGIN ":
        raise ValidationError(
            f"{source} is a PEM file, not PKCS#12: bundle the certificate and its key with "
            "`openssl pkcs12 -export -in CERT -inkey KEY -out FILE.p12`", "file")
    try:
        pfx = asn1_pkcs12.Pfx.load(data)
        if pfx["version"].native != "v3" or pfx["auth_safe"]["content_type"].native not in ("data", "signed_data"):
            raise ValueError("not a PFX")
        pfx["auth_safe"]["content"].native  # noqa: B018  (parses it now)
    except (ValueError, TypeError, KeyError, IndexError, OverflowError):
        raise ValidationError(
            f"{source} is not a PKCS#12 file: export the certificate with its private key as .p12 or .pfx", "file",
        ) from None
    return pfx


def _load_one_password(data: bytes, password: str | None, source: str) -> tuple[Any, Any, list[Any]]:
    tries: list[bytes | None] = [password.encode()] if password is not None else [None, b""]
    for attempt in tries:
        try:
            return pkcs12.load_key_and_certificates(data, attempt)
        except ValueError:
            continue
        except UnsupportedAlgorithm as exc:
            raise ValidationError(f"{source} uses encryption that cannot be read here ({exc}): "
                                  "export it again with AES (OpenSSL 3's default)", "file") from None
    if password is None:
        raise ValidationError(f"{source} is protected by a password: {_FIX_PASSWORD}", "password")
    for attempt in (None, b""):  # the password was given to a file that has none
        with contextlib.suppress(ValueError, UnsupportedAlgorithm):
            pkcs12.load_key_and_certificates(data, attempt)
            raise ValidationError(f"{source} has no password: leave out --password-env, --password-file and "
                                  "--password-stdin", "password")
    raise ValidationError(
        f"the password for {source} is wrong: give the right one (and --key-password-* if its private key "
        "has a password of its own)", "password")


# -- two passwords: the PKCS#12 structure taken apart -----------------------------------


def _load_two_passwords(pfx: asn1_pkcs12.Pfx, password: str | None, key_password: str,
                        source: str) -> tuple[Any, list[x509.Certificate]]:
    passwords = [p for p in dict.fromkeys([password, key_password]) if p is not None]
    if pfx["auth_safe"]["content_type"].native != "data":
        raise ValidationError(f"{source} is protected with a public key rather than a password, which is not "
                              "supported: export it with a password", "file")
    signed_bytes = pfx["auth_safe"]["content"].native
    mac = pfx["mac_data"]
    if mac.native is not None:
        hash_name = mac["mac"]["digest_algorithm"]["algorithm"].native
        if hash_name not in _HASHES:
            raise ValidationError(f"{source} is protected by a {hash_name} MAC, which cannot be checked here: "
                                  "export it again with OpenSSL 3's defaults", "file")
        if not any(_mac_ok(mac, signed_bytes, p) for p in passwords):
            raise ValidationError(f"the password for {source} is wrong: give the file's password with "
                                  "--password-* and its private key's with --key-password-*", "password")
    keys: list[Any] = []
    certs: list[x509.Certificate] = []
    locked_keys = 0
    try:
        for info in asn1_pkcs12.AuthenticatedSafe.load(signed_bytes):
            kind = info["content_type"].native
            if kind == "data":
                bags = asn1_pkcs12.SafeContents.load(info["content"].native)
            elif kind == "encrypted_data":
                eci = info["content"]["encrypted_content_info"]
                plain = _pbe_decrypt(eci["content_encryption_algorithm"], eci["encrypted_content"].native,
                                     passwords, source)
                bags = asn1_pkcs12.SafeContents.load(plain)
            else:
                continue  # enveloped_data (public-key privacy mode): not supported, and rare
            for bag in _walk(bags):
                bag_id = bag["bag_id"].native
                if bag_id == "cert_bag" and bag["bag_value"]["cert_id"].native == "x509":
                    certs.append(x509.load_der_x509_certificate(bag["bag_value"]["cert_value"].parsed.dump()))
                elif bag_id == "key_bag":
                    keys.append(serialization.load_der_private_key(bag["bag_value"].untag().dump(), None))
                elif bag_id == "pkcs8_shrouded_key_bag":
                    key = _open_key(bag["bag_value"].untag().dump(), passwords)
                    if key is None:
                        locked_keys += 1
                    else:
                        keys.append(key)
    except (ValueError, TypeError, KeyError, IndexError, OverflowError):
        raise ValidationError(f"{source} is corrupt: its contents cannot be read; export it again", "file") from None
    if locked_keys and not keys:
        raise ValidationError(f"the private key password for {source} is wrong: give the right one with "
                              "--key-password-env VAR, --key-password-file F or --key-password-stdin", "key_password")
    return (keys[0] if keys else None), certs


def _walk(bags: Any) -> list[Any]:
    out = []
    for bag in bags:
        if bag["bag_id"].native == "safe_contents":
            out.extend(_walk(bag["bag_value"]))
        else:
            out.append(bag)
    return out


def _open_key(der: bytes, passwords: Sequence[str]) -> Any:
    for candidate in passwords:
        try:
            return serialization.load_der_private_key(der, candidate.encode())
        except (ValueError, TypeError):
            continue
    return None


_HASHES = {"sha1": 64, "sha224": 64, "sha256": 64, "sha384": 128, "sha512": 128}  # name -> block size
_PBKDF2_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1, "sha224": hashes.SHA224, "sha256": hashes.SHA256, "sha384": hashes.SHA384,
    "sha512": hashes.SHA512}


def _pkcs12_kdf(password: str, salt: bytes, purpose: int, iterations: int, size: int, hash_name: str) -> bytes:
    """RFC 7292 appendix B.2: the PKCS#12 key derivation (purpose 1 key, 2 IV, 3 MAC key)."""
    v = _HASHES[hash_name]
    pw = password.encode("utf-16-be") + b"\0\0"  # a BMPString with its terminating NUL

    def fill(data: bytes) -> bytes:  # repeated to a multiple of v bytes
        return (data * v)[: v * -(-len(data) // v)]

    i = bytearray(fill(salt) + fill(pw))
    out = b""
    while len(out) < size:
        a = bytes([purpose]) * v + bytes(i)
        for _ in range(iterations):
            a = hashlib.new(hash_name, a).digest()
        out += a
        b = int.from_bytes(fill(a)[:v], "big") + 1
        for j in range(0, len(i), v):
            block = (int.from_bytes(i[j:j + v], "big") + b) % (1 << (v * 8))
            i[j:j + v] = block.to_bytes(v, "big")
    return out[:size]


def _mac_ok(mac: asn1_pkcs12.MacData, data: bytes, password: str) -> bool:
    hash_name = mac["mac"]["digest_algorithm"]["algorithm"].native
    key = _pkcs12_kdf(password, mac["mac_salt"].native, 3, mac["iterations"].native,
                      hashlib.new(hash_name).digest_size, hash_name)
    return hmac.compare_digest(hmac.new(key, data, hash_name).digest(), mac["mac"]["digest"].native)


def _pbe_decrypt(algorithm: Any, ciphertext: bytes, passwords: Sequence[str], source: str) -> bytes:
    """Decrypt a PKCS#12 encrypted part with whichever password opens it."""
    name = algorithm["algorithm"].native
    supported = (name == "pbes2" and algorithm.kdf == "pbkdf2" and algorithm.kdf_hmac in _PBKDF2_HASHES
                 and algorithm.encryption_cipher in ("aes", "tripledes")) or name in (
                 "pkcs12_sha1_tripledes_3key", "pkcs12_sha1_rc2_128")
    if not supported:
        raise ValidationError(f"{source} encrypts its certificates with {name}, which cannot be read here: "
                              "export it again with OpenSSL 3's defaults (AES)", "file")
    for password in passwords:
        if name == "pbes2":
            key = PBKDF2HMAC(_PBKDF2_HASHES[algorithm.kdf_hmac](), algorithm.key_length, algorithm.kdf_salt,
                             algorithm.kdf_iterations).derive(password.encode())
            iv = algorithm.encryption_iv
        else:
            salt, rounds = algorithm.kdf_salt, algorithm.kdf_iterations
            key = _pkcs12_kdf(password, salt, 1, rounds, algorithm.key_length, "sha1")
            iv = _pkcs12_kdf(password, salt, 2, rounds, 8, "sha1")
        try:
            plain = _cbc_decrypt(algorithm.encryption_cipher, key, iv, ciphertext)
        except ValueError:
            continue  # bad padding: not this password
        if plain[:1] == b"\x30":  # a SEQUENCE: padding alone passes by chance 1 in 256
            return plain
    raise ValidationError(f"the passwords given for {source} do not open its certificates: give the file's "
                          "password with --password-* and its private key's with --key-password-*", "password")


def _cbc_decrypt(cipher_name: str, key: bytes, iv: bytes, ciphertext: bytes) -> bytes:
    from cryptography.hazmat.decrepit.ciphers.algorithms import RC2, TripleDES

    ciphers: dict[str, Callable[[bytes], Any]] = {"aes": algorithms.AES, "tripledes": TripleDES, "rc2": RC2}
    cipher = ciphers[cipher_name](key)
    decryptor = Cipher(cipher, modes.CBC(iv)).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    unpadder = block_padding.PKCS7(cipher.block_size).unpadder()
    return unpadder.update(padded) + unpadder.finalize()
