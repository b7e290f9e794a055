"""The CMS half of the built-in S/MIME decryption (:mod:`mailhost.smime`).

:mod:`mailhost.smime` recognises an S/MIME encrypted message and imports this module
only then: asn1crypto reads the CMS structure, and ``cryptography`` unwraps the key and
decrypts the content. See :mod:`mailhost.smime` for what is supported and why.
"""
from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import quopri
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from asn1crypto import cms, core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import padding as block_padding
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.x963kdf import X963KDF
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

from .certificates import Certificate

if TYPE_CHECKING:
    from .smime import _Envelope

__all__ = ["Failed", "content_info", "decrypt", "is_signed_data"]

_CMS_ENCRYPTED = ("enveloped_data", "authenticated_enveloped_data")

# Content-encryption algorithms -> key bytes.
_CBC = {"aes128_cbc": 16, "aes192_cbc": 24, "aes256_cbc": 32, "tripledes_3key": 24}
_GCM = {"aes128_gcm": 16, "aes192_gcm": 24, "aes256_gcm": 32}
_OAEP_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {"sha1": hashes.SHA1, "sha224": hashes.SHA224, "sha256": hashes.SHA256,
                "sha384": hashes.SHA384, "sha512": hashes.SHA512}
# RFC 5753 ECDH key agreement schemes (standard and cofactor; the same on prime curves)
# -> the hash of their ANSI X9.63 KDF; and the AES key wraps -> key bytes.
_ECDH_SCHEMES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "1.3.133.16.840.63.0.2": hashes.SHA1, "1.3.132.1.11.0": hashes.SHA224, "1.3.132.1.11.1": hashes.SHA256,
    "1.3.132.1.11.2": hashes.SHA384, "1.3.132.1.11.3": hashes.SHA512,
    "1.3.133.16.840.63.0.3": hashes.SHA1, "1.3.132.1.14.0": hashes.SHA224, "1.3.132.1.14.1": hashes.SHA256,
    "1.3.132.1.14.2": hashes.SHA384, "1.3.132.1.14.3": hashes.SHA512,
}
_KEY_WRAPS = {"2.16.840.1.101.3.4.1.5": 16, "2.16.840.1.101.3.4.1.25": 24, "2.16.840.1.101.3.4.1.45": 32}


class Failed(Exception):
    """This message cannot be decrypted; the text is the reason, one sentence."""


class _GCMParameters(core.Sequence):
    """RFC 5084: the nonce and the tag length of AES-GCM."""

    _fields = [("aes_nonce", core.OctetString), ("aes_icvlen", core.Integer, {"default": 12})]


class _AlgorithmIdentifier(core.Sequence):
    _fields = [("algorithm", core.ObjectIdentifier), ("parameters", core.Any, {"optional": True})]


class _SharedInfo(core.Sequence):
    """RFC 5753 ECC-CMS-SharedInfo: the X9.63 KDF's input besides the shared secret."""

    _fields = [
        ("key_info", _AlgorithmIdentifier),
        ("entity_u_info", core.OctetString, {"explicit": 0, "optional": True}),
        ("supp_pub_info", core.OctetString, {"explicit": 2}),
    ]


def content_info(found: _Envelope) -> cms.ContentInfo | None:
    """The CMS ContentInfo of the body, or ``None`` if it is not encrypted after all."""
    head, body, explicit = found.entity, found.body, found.explicit
    encoding = str(head.get("Content-Transfer-Encoding", "")).strip().lower()
    try:
        if encoding == "base64":
            der = base64.b64decode(re.sub(rb"[^A-Za-z0-9+/=]", b"", body), validate=True)
        elif encoding == "quoted-printable":
            der = quopri.decodestring(body)
        else:
            der = body
        info = cms.ContentInfo.load(der, strict=False)
        kind = info["content_type"].native
        if kind in _CMS_ENCRYPTED:
            info["content"].native  # noqa: B018  (parses the whole structure now)
    except (binascii.Error, ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
        if not explicit:
            return None  # a .p7m of something else: not ours
        raise Failed(f"the S/MIME body is corrupt: its CMS structure cannot be read ({_brief(exc)})") from None
    if kind not in _CMS_ENCRYPTED:
        if not explicit:
            return None
        raise Failed(f"the message says it is S/MIME encrypted but holds CMS {kind}, not enveloped data")
    return info


def _brief(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]


# ---------------------------------------------------------------------------------------
# Certificates and recipients
# ---------------------------------------------------------------------------------------


@dataclass
class _Candidate:
    certificate: Certificate
    issuer: asn1_x509.Name
    serial: int
    key_identifiers: tuple[bytes, ...]
    not_after: dt.datetime

    @property
    def label(self) -> str:
        alias = f" ({self.certificate.alias})" if self.certificate.alias else ""
        return f"{self.certificate.name!r}{alias}"

    def matches(self, rid: Any) -> bool:
        if rid.name == "issuer_and_serial_number":
            value = rid.chosen
            return value["serial_number"].native == self.serial and value["issuer"] == self.issuer
        if rid.name == "subject_key_identifier":
            return rid.chosen.native in self.key_identifiers
        if rid.name == "r_key_id":
            return rid.chosen["subject_key_identifier"].native in self.key_identifiers
        return False


def _candidates(certificates: Sequence[Certificate]) -> list[_Candidate]:
    out = []
    for certificate in certificates:
        try:
            cert = x509.load_pem_x509_certificate(certificate.cert_pem)
            parsed = asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))
            bits = parsed.public_key["public_key"].contents[1:]  # the BIT STRING, minus its pad count
            ids = tuple(i for i in (parsed.key_identifier, hashlib.sha1(bits).digest()) if i)
            out.append(_Candidate(certificate, parsed.issuer, parsed.serial_number, ids, cert.not_valid_after_utc))
        except (ValueError, TypeError):
            continue  # not a certificate this plugin can read; another plugin's business
    return out


_SHORT_NAMES = {"common_name": "CN", "organization_name": "O", "organizational_unit_name": "OU",
                "country_name": "C", "state_or_province_name": "ST", "locality_name": "L",
                "domain_component": "DC", "email_address": "E"}


def _describe_rid(rid: Any) -> str:
    """The recipient as `mailhost certs list` shows certificates: serial in hex, issuer in RFC 4514 order."""
    if rid.name == "issuer_and_serial_number":
        rdns = [f"{_SHORT_NAMES.get(atv['type'].native, atv['type'].dotted)}={atv['value'].native}"
                for rdn in reversed(list(rid.chosen["issuer"].chosen)) for atv in rdn]
        serial = f"{rid.chosen['serial_number'].native:X}"
        return f"serial {serial.zfill(len(serial) + len(serial) % 2)} issued by {','.join(rdns)}"
    value = rid.chosen.native if rid.name == "subject_key_identifier" else rid.chosen["subject_key_identifier"].native
    return f"subject key identifier {value.hex(':')}"


def _recipients(info: cms.ContentInfo) -> list[tuple[Any, Any, bytes]]:
    """(recipient identifier, recipient info, encrypted content key) for each key this
    message was encrypted to (RSA key transport, ECDH key agreement)."""
    out = []
    for choice in info["content"]["recipient_infos"]:
        if choice.name == "ktri":
            out.append((choice.chosen["rid"], choice.chosen, choice.chosen["encrypted_key"].native))
        elif choice.name == "kari":
            for key in choice.chosen["recipient_encrypted_keys"]:
                out.append((key["rid"], choice.chosen, key["encrypted_key"].native))
    return out


# ---------------------------------------------------------------------------------------
# Decryption
# ---------------------------------------------------------------------------------------


def decrypt(info: cms.ContentInfo, certificates: Sequence[Certificate]) -> tuple[str, bytes]:
    """(certificate name, decrypted entity); ``Failed`` says why not."""
    recipients = _recipients(info)
    candidates = _candidates(certificates)
    now = dt.datetime.now(dt.timezone.utc)
    matched = [(c, ri, key) for rid, ri, key in recipients for c in candidates if c.matches(rid)]
    if not matched:
        wanted = "; ".join(_describe_rid(rid) for rid, _, _ in recipients) or "no recipients at all"
        have = ", ".join(c.label for c in candidates) or "none"
        raise Failed(
            f"no attached certificate matches a recipient of this message (it is encrypted for {wanted}; "
            f"attached: {have}): add the recipient's certificate with `mailhost certs add` and attach it to the connection"
        )
    # Expiry ends a certificate's use for encrypting new mail, not its key's use for
    # opening mail already encrypted for it (sent before it expired, downloaded after):
    # mail clients decrypt with expired certificates too. Current ones are tried first.
    matched.sort(key=lambda m: m[0].not_after < now)
    error = ""
    for candidate, recipient, encrypted_key in matched:
        try:
            return candidate.certificate.name, _open(info, candidate, recipient, encrypted_key)
        except Failed as exc:
            error = str(exc)
    raise Failed(error)


def _open(info: cms.ContentInfo, candidate: _Candidate, recipient: Any, encrypted_key: bytes) -> bytes:
    """Unwrap the content key with ``candidate``'s private key, then decrypt the content."""
    if not candidate.certificate.key_pem:
        raise Failed(f"certificate {candidate.label} has no private key: add it again from its PKCS#12 file")
    try:
        key = serialization.load_pem_private_key(candidate.certificate.key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise Failed(f"the private key of certificate {candidate.label} cannot be read: add it again") from None
    content = info["content"]
    authenticated = info["content_type"].native == "authenticated_enveloped_data"
    eci = content["auth_encrypted_content_info" if authenticated else "encrypted_content_info"]
    algorithm = eci["content_encryption_algorithm"]["algorithm"].native
    key_size = (_GCM if authenticated else _CBC).get(algorithm)
    if key_size is None:
        raise Failed(f"this message uses the content cipher {algorithm}, which the built-in S/MIME decryption "
                      "does not support (it reads AES-CBC, AES-GCM and 3DES-CBC)")
    ciphertext = eci["encrypted_content"].native
    if ciphertext is None:
        raise Failed("this message holds no encrypted content (detached content is not supported)")
    # One answer for a failed key unwrap and a failed content decryption: the reason is
    # in the admin's log only, and it must not tell the two apart (no padding oracle).
    corrupt = Failed(
        f"the message cannot be decrypted with certificate {candidate.label}: "
        "it is corrupt, was altered, or was not encrypted for this key"
    )
    if isinstance(recipient, cms.KeyTransRecipientInfo) and isinstance(key, rsa.RSAPrivateKey):
        content_key = _unwrap(key, recipient, encrypted_key, corrupt)
    elif isinstance(recipient, cms.KeyAgreeRecipientInfo) and isinstance(key, ec.EllipticCurvePrivateKey):
        content_key = _agree(key, recipient, encrypted_key, corrupt)
    else:
        needed = "an RSA key" if isinstance(recipient, cms.KeyTransRecipientInfo) else "an EC key"
        raise Failed(f"this message's recipient info for certificate {candidate.label} needs {needed}, "
                      "which that certificate does not have")
    if len(content_key) != key_size:
        raise corrupt
    if authenticated:
        return _open_gcm(content, eci, content_key, corrupt)
    return _open_cbc(eci, algorithm, content_key, ciphertext, corrupt)


def _unwrap(key: rsa.RSAPrivateKey, recipient: cms.KeyTransRecipientInfo, encrypted_key: bytes,
            corrupt: Failed) -> bytes:
    """RSA key transport (RFC 5652 6.2.1): PKCS#1 v1.5 or OAEP (RFC 3560)."""
    algorithm = recipient["key_encryption_algorithm"]
    name = algorithm["algorithm"].native
    if name in ("rsaes_pkcs1v15", "rsa"):
        scheme: padding.AsymmetricPadding = padding.PKCS1v15()
    elif name == "rsaes_oaep":
        params = algorithm["parameters"].native or {}
        digest = _OAEP_HASHES.get((params.get("hash_algorithm") or {}).get("algorithm", "sha1"))
        mgf = (params.get("mask_gen_algorithm") or {}).get("parameters") or {"algorithm": "sha1"}
        mgf_digest = _OAEP_HASHES.get(mgf.get("algorithm", "sha1"))
        label = (params.get("p_source_algorithm") or {}).get("parameters") or None
        if digest is None or mgf_digest is None:
            raise Failed("this message uses RSA-OAEP with a hash the built-in S/MIME decryption does not support")
        scheme = padding.OAEP(padding.MGF1(mgf_digest()), digest(), label)
    else:
        raise Failed(f"this message uses the key transport {name}, which the built-in S/MIME decryption does not support")
    try:
        return key.decrypt(encrypted_key, scheme)
    except ValueError:
        raise corrupt from None


def _agree(key: ec.EllipticCurvePrivateKey, recipient: cms.KeyAgreeRecipientInfo, encrypted_key: bytes,
           corrupt: Failed) -> bytes:
    """ECDH key agreement (RFC 5753): ephemeral-static ECDH, the X9.63 KDF, AES key unwrap."""
    originator = recipient["originator"]
    algorithm = recipient["key_encryption_algorithm"]
    kdf_hash = _ECDH_SCHEMES.get(algorithm["algorithm"].dotted)
    if originator.name != "originator_key" or kdf_hash is None:
        raise Failed(f"this message uses the key agreement {algorithm['algorithm'].native} with a "
                      f"{originator.name.replace('_', ' ')}, which the built-in S/MIME decryption does not support")
    try:
        wrap = _AlgorithmIdentifier.load(algorithm["parameters"].dump())["algorithm"].dotted
        size = _KEY_WRAPS.get(wrap)
        if size is None:
            raise Failed(f"this message wraps its key with {wrap}, which the built-in S/MIME decryption does not support")
        point = originator.chosen["public_key"].contents[1:]  # the BIT STRING, minus its pad count
        secret = key.exchange(ec.ECDH(), ec.EllipticCurvePublicKey.from_encoded_point(key.curve, point))
        info: dict[str, Any] = {"key_info": {"algorithm": wrap}, "supp_pub_info": (size * 8).to_bytes(4, "big")}
        if recipient["ukm"].native is not None:
            info["entity_u_info"] = recipient["ukm"].native
        kek = X963KDF(kdf_hash(), size, _SharedInfo(info).dump()).derive(secret)
        return aes_key_unwrap(kek, encrypted_key)
    except (ValueError, TypeError, InvalidUnwrap):
        raise corrupt from None


def _open_cbc(eci: Any, algorithm: str, content_key: bytes, ciphertext: bytes, corrupt: Failed) -> bytes:
    iv = eci["content_encryption_algorithm"]["parameters"].native
    if algorithm == "tripledes_3key":
        from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES

        cipher: Any = TripleDES(content_key)
    else:
        cipher = algorithms.AES(content_key)
    if not isinstance(iv, bytes) or len(iv) * 8 != cipher.block_size or len(ciphertext) * 8 % cipher.block_size:
        raise corrupt
    decryptor = Cipher(cipher, modes.CBC(iv)).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    unpadder = block_padding.PKCS7(cipher.block_size).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise corrupt from None


def _open_gcm(content: Any, eci: Any, content_key: bytes, corrupt: Failed) -> bytes:
    try:
        params = _GCMParameters.load(eci["content_encryption_algorithm"]["parameters"].dump())
        nonce, tag_length = params["aes_nonce"].native, params["aes_icvlen"].native
    except (ValueError, TypeError):
        raise corrupt from None
    tag = content["mac"].native
    if not 12 <= len(tag) <= 16 or len(tag) != tag_length or not nonce:
        raise corrupt
    # RFC 5083: the authenticated attributes are the AAD, DER-encoded as a SET OF
    # (tag 0x31) rather than with their IMPLICIT [1] tag.
    attrs = content["auth_attrs"]
    aad = b"" if isinstance(attrs, core.Void) else b"\x31" + attrs.dump()[1:]
    try:
        decryptor = Cipher(algorithms.AES(content_key), modes.GCM(nonce, tag, min_tag_length=len(tag))).decryptor()
        decryptor.authenticate_additional_data(aad)
        plaintext = decryptor.update(eci["encrypted_content"].native)
        return plaintext + decryptor.finalize()  # raises before anything is returned if the tag is wrong
    except (InvalidTag, ValueError):
        raise corrupt from None


def is_signed_data(body: bytes) -> bool:
    """Whether the base64 ``body`` of an application/pkcs7-mime entity without
    smime-type is CMS signed-data."""
    try:
        der = base64.b64decode(re.sub(rb"[^A-Za-z0-9+/=]", b"", body))
        return bool(cms.ContentInfo.load(der, strict=False)["content_type"].native == "signed_data")
    except (binascii.Error, ValueError, TypeError, KeyError):
        return False
