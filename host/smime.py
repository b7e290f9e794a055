"""The built-in S/MIME decryption, a plugin on the ``decrypt_message`` hook.

Registered like any third-party plugin (as ``smime``). It claims a message whose
top-level entity is ``application/pkcs7-mime`` (or ``application/x-pkcs7-mime``, or a
``.p7m`` attachment sent as ``application/octet-stream``) holding a CMS
EnvelopedData (RFC 5652: AES-CBC, 3DES-CBC) or AuthEnvelopedData (RFC 5083/5084:
AES-GCM, S/MIME 4.0), also when that entity is the signed part of a top-level
``multipart/signed`` (encrypt-then-sign, the outer layer of a triple wrap). Anything
else, signed-only mail included, is not its business: it returns ``None``.

The CMS structure is read with ``asn1crypto``; the key unwrapping and the content
decryption are ``cryptography`` primitives. (The ``cryptography`` package's own PKCS#7
decryption covers EnvelopedData only; one path for both keeps recipient matching,
checks and error messages the same.)

The recipient is found by issuer and serial number or by subject key identifier; only
an attached certificate that matches a RecipientInfo is tried. A message that cannot
be decrypted comes back as a :class:`~mailhost.certificates.Decryption` with
``raw=None`` and a sentence saying why: the host stores it flagged, once.

The key of a recipient comes by RSA key transport (PKCS#1 v1.5 or OAEP) or by ECDH key
agreement (RFC 5753: ephemeral-static, the X9.63 KDF, AES key wrap).

EFAIL: only a message that *is* the encrypted entity is decrypted, never an encrypted
part mixed with clear parts (the direct-exfiltration variant), and the GCM tag is
checked before any plaintext leaves the plugin. AES-CBC content is not integrity
protected; ``docs/smime.md`` says what a handler must not do with decrypted content.

The CMS and cryptography half is :mod:`mailhost.smime_cms`, imported only for a message
that is S/MIME encrypted: asn1crypto and cryptography's X.509 would otherwise cost every
start-up of the host tens of milliseconds, and most mail is not encrypted.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import collapse_rfc2231_value

from .certificates import Certificate, Decryption
from .hookspecs import hookimpl

__all__ = ["decrypt_message"]

_PKCS7_MIME = ("application/pkcs7-mime", "application/x-pkcs7-mime")
_ENCRYPTED = ("enveloped-data", "authenveloped-data")


@hookimpl
def decrypt_message(raw: bytes, certificates: Sequence[Certificate]) -> Decryption | None:
    """Decrypt an S/MIME enveloped message with the matching attached certificate."""
    found = _envelope(raw)
    if found is None:
        return None
    from . import smime_cms  # asn1crypto and cryptography: only for encrypted mail

    try:
        info = smime_cms.content_info(found)
        if info is None:
            return None
        name, inner = smime_cms.decrypt(info, certificates)
    except smime_cms.Failed as exc:
        return Decryption(raw=None, error=str(exc))
    return Decryption(raw=_compose(found.head, inner), certificate=name,
                      signed=found.signed_around or _is_signed(inner))


# ---------------------------------------------------------------------------------------
# Recognising the message
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Envelope:
    head: bytes  # the message's header block, without the blank line
    entity: Message  # the headers of the encrypted entity (the message's own, or its signed part's)
    body: bytes  # the encrypted entity's body, transfer-encoded
    explicit: bool  # whether the headers say "enveloped" (else only the CMS content can tell)
    signed_around: bool = False  # encrypt-then-sign: a multipart/signed around the entity


def _split(raw: bytes) -> tuple[bytes, bytes]:
    """Header block and body: at the first empty line, whichever line ending it uses."""
    match = re.search(rb"\r?\n\r?\n", raw)
    if match is None:
        return raw, b""
    return raw[: match.start()], raw[match.end():]


def _headers(head: bytes) -> Message:
    return BytesHeaderParser(policy=compat32).parsebytes(head + b"\r\n\r\n")


def _envelope(raw: bytes) -> _Envelope | None:
    """Where the encrypted entity of an S/MIME encrypted message is; ``None`` when it is not one."""
    head, body = _split(raw)
    message = _headers(head)
    kind = _encrypted_kind(message)
    if kind is not None:
        return _Envelope(head, message, body, kind)
    if message.get_content_type() == "multipart/signed":
        part = _signed_part(message, body)
        if part is not None:
            part_head, part_body = _split(part)
            entity = _headers(part_head)
            kind = _encrypted_kind(entity)
            if kind is not None:
                return _Envelope(head, entity, part_body, kind, signed_around=True)
    return None


def _encrypted_kind(headers: Message) -> bool | None:
    """Whether ``headers`` announce an enveloped entity explicitly (True), may hold one
    (False: a pkcs7-mime without smime-type, a .p7m), or cannot (None)."""
    ctype = headers.get_content_type()
    smime_type = str(headers.get_param("smime-type") or "").lower()
    if ctype in _PKCS7_MIME:
        if smime_type and smime_type not in _ENCRYPTED:
            return None  # signed-data, compressed-data, certs-only
        return bool(smime_type)
    filename = collapse_rfc2231_value(headers.get_param("name") or headers.get_filename() or "").lower()
    if ctype == "application/octet-stream" and filename.endswith(".p7m"):
        return False
    return None


def _signed_part(message: Message, body: bytes) -> bytes | None:
    """The first part of a multipart/signed body, exactly as it stands, if the body is
    that part and an S/MIME signature and nothing else (so that no clear part from the
    outside can end up beside the decrypted content)."""
    boundary = message.get_boundary()
    if not boundary:
        return None
    delimiter = re.escape(b"--" + boundary.encode("ascii", "replace"))
    pieces = re.split(rb"(?:^|\r?\n)" + delimiter + rb"(--)?[ \t]*(?:\r?\n|$)", body)
    # preamble, None, part, None, part, "--", epilogue: a captured "--" after each delimiter
    parts = [pieces[i] for i in range(2, len(pieces) - 1, 2)]
    if len(parts) != 2 or pieces[-2] != b"--":
        return None
    signature = _headers(_split(parts[1])[0]).get_content_type()
    if signature not in ("application/pkcs7-signature", "application/x-pkcs7-signature"):
        return None
    return parts[0]


# ---------------------------------------------------------------------------------------
# The decrypted message
# ---------------------------------------------------------------------------------------


def _compose(head: bytes, inner: bytes) -> bytes:
    """The outer header fields (From, To, Subject, Date, ...) without its Content-*
    fields, followed by the decrypted MIME entity exactly as it was encrypted."""
    eol = b"\r\n" if re.match(rb"[^\n]*\r\n", inner) or not inner.strip() else b"\n"
    inner_has_version = re.search(rb"(?im)^mime-version[ \t]*:", _split(inner)[0]) is not None
    fields: list[bytes] = []
    keep = False
    for line in re.split(rb"\r?\n", head):
        if line[:1] in (b" ", b"\t"):
            if keep:
                fields.append(line)
            continue
        name = line.split(b":", 1)[0].strip().lower()
        keep = bool(line.strip()) and not name.startswith(b"content-") and not (
            inner_has_version and name == b"mime-version")
        if keep:
            fields.append(line)
    return b"".join(f + eol for f in fields) + inner


def _is_signed(inner: bytes) -> bool:
    """Whether the decrypted entity is S/MIME signed (multipart/signed or opaque signed-data)."""
    head, body = _split(inner)
    message = _headers(head)
    ctype = message.get_content_type()
    if ctype == "multipart/signed":
        return True
    if ctype not in _PKCS7_MIME:
        return False
    smime_type = str(message.get_param("smime-type") or "").lower()
    if smime_type:
        return smime_type == "signed-data"
    from . import smime_cms

    return smime_cms.is_signed_data(body)
