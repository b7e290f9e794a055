"""Certificates: PKCS#12 in, listed with the connections that use them, the key never in clear."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from mailhost import Mailhost
from mailhost.certs import Certificates, Removal, certificate_dict
from mailhost.connections import ConnectionSpec
from mailhost.errors import NotFound, ValidationError
from mailhost.protocols import Direction
from mailhost.store import Certificate
from sqlalchemy import select

from .helpers import run_cli
from .test_smime import PASSWORD, Person, ec_person, expired_pkcs12, make_person, openssl


@pytest.fixture(scope="module")
def people(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Person]:
    d = tmp_path_factory.mktemp("people")
    return {name: make_person(d, name) for name in ("alice", "bob")}


def _one_sentence(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("mailhost: ")
    return lines[0]


def _twopass(directory: Path, person: Person, mac_password: str, key_password: str) -> Path:
    """`openssl pkcs12 -export -twopass`: one password for the file, another for its key.

    OpenSSL asks for both on the terminal; without one it reads them from stdin."""
    out = directory / f"{person.name}-twopass.p12"
    done = subprocess.run(
        ["openssl", "pkcs12", "-export", "-twopass", "-in", str(person.cert_file), "-inkey", str(person.key_file),
         "-out", str(out)],
        input=f"{mac_password}\n{mac_password}\n{key_password}\n{key_password}\n".encode(),
        capture_output=True, start_new_session=True, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return out


# ---------------------------------------------------------------------------------------
# The Python API
# ---------------------------------------------------------------------------------------


def test_add_reads_the_certificate_and_lists_it(mh: Mailhost, people: dict[str, Person]) -> None:
    """Subject, issuer, serial and validity come from the certificate; search matches
    name and alias; no key in the listing."""
    certs = Certificates(mh)
    row = certs.add("alice", people["alice"].p12, password=PASSWORD, alias="Support@Example.com")
    certs.add("bob", people["bob"].p12, password=PASSWORD)
    record = certificate_dict(row)
    cert = x509.load_pem_x509_certificate(people["alice"].cert_pem)
    assert record == {
        "name": "alice", "alias": "Support@Example.com", "subject": "CN=alice,O=mailhost tests",
        "issuer": "CN=mailhost S/MIME CA for alice,O=mailhost tests", "serial": record["serial"],
        "not_before": cert.not_valid_before_utc, "not_after": cert.not_valid_after_utc,
        "expired": False, "connections": [],
    }
    assert int(record["serial"], 16) == cert.serial_number and record["serial"] == record["serial"].upper()
    assert [c.name for c in certs.list()] == ["alice", "bob"]
    assert [c.name for c in certs.list("BO")] == ["bob"]
    assert [c.name for c in certs.list("support@")] == ["alice"]
    assert certs.list("nobody") == []
    with mh.session() as s:
        stored = s.scalar(select(Certificate).where(Certificate.name == "alice"))
        assert stored.cert_pem == people["alice"].cert_pem
        assert mh.vault.decrypt_bytes(stored.key_enc) == people["alice"].key_pem


def test_add_list_remove_on_each_store(mh_any: Mailhost, people: dict[str, Person]) -> None:
    """The same on SQLite and PostgreSQL: the key round-trips through the vault, search
    is case-insensitive, remove removes."""
    certs = Certificates(mh_any)
    certs.add("Alice", people["alice"].p12, password=PASSWORD, alias="Desk")
    assert [c.name for c in certs.list("aLi")] == [c.name for c in certs.list("desk")] == ["Alice"]
    assert certs.list("%") == certs.list("_") == certs.list("a_ice") == []  # literal, not LIKE wildcards
    with mh_any.session() as s:
        assert mh_any.vault.decrypt_bytes(s.scalar(select(Certificate.key_enc))) == people["alice"].key_pem
    assert certs.remove("Alice") == Removal("Alice") and certs.list() == []


def test_names_are_unique_and_a_certificate_is_stored_once(mh: Mailhost, people: dict[str, Person]) -> None:
    """A second certificate under a taken name, or the same certificate twice, is refused."""
    certs = Certificates(mh)
    certs.add("alice", people["alice"].p12, password=PASSWORD)
    with pytest.raises(ValidationError, match="a certificate named 'alice' already exists"):
        certs.add("alice", people["bob"].p12, password=PASSWORD)
    with pytest.raises(ValidationError, match="is already stored as 'alice'"):
        certs.add("alice-again", people["alice"].p12, password=PASSWORD)
    with pytest.raises(ValidationError, match="name is empty"):
        certs.add("  ", people["bob"].p12, password=PASSWORD)
    assert [c.name for c in certs.list()] == ["alice"]


def test_ec_certificate_from_bytes(mh: Mailhost, tmp_path: Path) -> None:
    """An EC (P-256) certificate is taken too, here from the file's bytes (as an upload gives them)."""
    carmen = ec_person(tmp_path, "carmen")
    row = Certificates(mh).add("carmen", carmen.p12.read_bytes(), password=PASSWORD)
    assert row.subject == "CN=carmen" and mh.vault.decrypt_bytes(row.key_enc) == carmen.key_pem


def test_refused_files_write_nothing(mh: Mailhost, tmp_path: Path, people: dict[str, Person]) -> None:
    """Wrong or missing password, PEM instead of PKCS#12, no private key, expired, missing file."""
    certs = Certificates(mh)
    nokey = tmp_path / "nokey.p12"
    openssl("pkcs12", "-export", "-nokeys", "-in", people["alice"].cert_file, "-passout", f"pass:{PASSWORD}",
            "-out", nokey)
    cases = [
        (people["alice"].p12, "wrong", "the password for .* is wrong"),
        (people["alice"].p12, None, "is protected by a password"),
        (people["alice"].cert_file, PASSWORD, "is a PEM file, not PKCS#12"),
        (nokey, PASSWORD, "holds no private key"),
        (expired_pkcs12(tmp_path, "old").p12, PASSWORD, "expired on"),
        (tmp_path / "missing.p12", PASSWORD, "cannot read the PKCS#12 file"),
    ]
    for path, password, message in cases:
        with pytest.raises(ValidationError, match=message):
            certs.add("x", path, password=password)
    with pytest.raises(ValidationError, match="is not a PKCS#12 file"):
        certs.add("x", b"\x30\x03\x02\x01\x03 definitely not a PFX", password=PASSWORD)
    assert certs.list() == []


def test_separate_private_key_password(mh: Mailhost, tmp_path: Path, people: dict[str, Person]) -> None:
    """A file whose key has its own password (OpenSSL -twopass) opens with both; with the
    file's password alone it is refused, saying which password to give."""
    p12 = _twopass(tmp_path, people["bob"], "file-pw", "key-pw")
    certs = Certificates(mh)
    with pytest.raises(ValidationError, match="the password for .* is wrong.*--key-password"):
        certs.add("bob", p12, password="file-pw")
    with pytest.raises(ValidationError):
        certs.add("bob", p12, password="file-pw", key_password="not-it")
    with pytest.raises(ValidationError, match="the password for .* is wrong"):
        certs.add("bob", p12, password="not-it", key_password="not-either")
    row = certs.add("bob", p12, password="file-pw", key_password="key-pw")
    assert row.subject == "CN=bob,O=mailhost tests"
    with mh.session() as s:
        assert mh.vault.decrypt_bytes(s.get(Certificate, row.id).key_enc) == people["bob"].key_pem


def test_remove_refuses_while_attached_unless_detached(tmh: Mailhost, tmp_path: Path, people: dict[str, Person]) -> None:
    """Removing a certificate that connections use is refused, naming them; --detach
    detaches it from them and removes it, and says which of them flag mail encrypted
    only for it from now on (those with other certificates) and which do not."""
    certs = Certificates(tmh)
    certs.add("alice", people["alice"].p12, password=PASSWORD)
    certs.add("bob", people["bob"].p12, password=PASSWORD)
    for name in ("desk", "sales"):
        tmh.connections.add(Direction.INCOMING, ConnectionSpec(
            name=name, protocol="dir", folder=str(tmp_path), certificates=["alice", "bob"]))
    tmh.connections.add(Direction.INCOMING, ConnectionSpec(name="info", protocol="dir", folder=str(tmp_path),
                                                           certificates=["alice"]))
    assert certificate_dict(certs.get("alice"))["connections"] == ["desk", "info", "sales"]
    with pytest.raises(ValidationError, match=r"attached to incoming connection\(s\) desk, info, sales: .*--detach"):
        certs.remove("alice")
    assert [c.name for c in certs.list()] == ["alice", "bob"]
    removal = certs.remove("alice", detach=True)
    assert removal == Removal("alice", flagging=("desk", "sales"), bare=("info",))
    assert removal.detached == ("desk", "info", "sales")
    assert [c.name for c in certs.list()] == ["bob"]
    assert [c.name for c in tmh.connections.get(Direction.INCOMING, "desk").certificates] == ["bob"]
    with pytest.raises(NotFound, match="no certificate named 'alice'"):
        certs.remove("alice")
    tmh.connections.edit(Direction.INCOMING, "desk", ConnectionSpec(certificates=[]))
    tmh.connections.edit(Direction.INCOMING, "sales", ConnectionSpec(certificates=[]))
    assert certs.remove("bob") == Removal("bob")


# ---------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------


def test_cli_add_and_list_json_with_connections(home: Path, plugin_env: dict[str, str], tmp_path: Path,
                                                people: dict[str, Person]) -> None:
    """`certs add` from --password-env and --password-file, attached with `incoming add
    --certificate`, listed with the connections using each; --search and --limit."""
    env = {**plugin_env, "MAILHOST_LOAD_PLUGINS": "testplugin", "P12_PASSWORD": PASSWORD}
    secret = tmp_path / "password.txt"
    secret.write_text(PASSWORD + "\n")
    out = run_cli("certs", "add", "alice", "--file", str(people["alice"].p12), "--password-env", "P12_PASSWORD",
                  "--alias", "support@example.com", env=env, cwd=home)
    assert out.returncode == 0, out.stderr
    assert "added certificate alice (CN=alice,O=mailhost tests" in out.stderr
    out = run_cli("certs", "add", "bob", "--file", str(people["bob"].p12), "--password-file", str(secret), "--json",
                  env=env, cwd=home)
    assert out.returncode == 0 and json.loads(out.stdout)["subject"] == "CN=bob,O=mailhost tests"
    for name, attach in (("desk", ["alice", "bob"]), ("sales", ["bob"])):
        args = [a for c in attach for a in ("--certificate", c)]
        out = run_cli("incoming", "add", name, "--protocol", "dir", "--folder", str(tmp_path), *args, env=env, cwd=home)
        assert out.returncode == 0, out.stderr
    rows = json.loads(run_cli("certs", "list", "--json", env=env, cwd=home).stdout)
    assert [(r["name"], r["alias"], r["connections"], r["expired"]) for r in rows] == [
        ("alice", "support@example.com", ["desk"], False), ("bob", None, ["desk", "sales"], False)]
    assert set(rows[0]) == {"name", "alias", "subject", "issuer", "serial", "not_before", "not_after", "expired",
                            "connections"}
    assert [r["name"] for r in json.loads(run_cli("certs", "list", "--search", "SUPPORT", "--json",
                                                  env=env, cwd=home).stdout)] == ["alice"]
    assert len(json.loads(run_cli("certs", "list", "--json", "--limit", "1", env=env, cwd=home).stdout)) == 1
    table = run_cli("certs", "list", env=env, cwd=home).stdout
    assert table.splitlines()[0].split() == ["NAME", "ALIAS", "SUBJECT", "SERIAL", "NOT_AFTER", "EXPIRED", "CONNECTIONS"]
    assert PASSWORD not in out.stdout + table

    out = run_cli("certs", "remove", "bob", env=env, cwd=home)
    assert out.returncode == 2 and "desk, sales" in _one_sentence(out.stderr)
    out = run_cli("certs", "remove", "bob", "--detach", env=env, cwd=home)
    assert out.returncode == 0 and "detached from desk, sales" in out.stderr
    show = json.loads(run_cli("incoming", "show", "desk", "--json", env=env, cwd=home).stdout)
    assert show["certificates"] == ["alice"]


def test_cli_wrong_password_is_refused_and_writes_nothing(home: Path, people: dict[str, Person]) -> None:
    """A wrong PKCS#12 password: exit 2, one sentence naming the file, nothing stored."""
    out = run_cli("certs", "add", "alice", "--file", str(people["alice"].p12), "--password-stdin",
                  input="not the password\n", cwd=home)
    assert out.returncode == 2
    sentence = _one_sentence(out.stderr)
    assert f"the password for {people['alice'].p12} is wrong" in sentence
    assert json.loads(run_cli("certs", "list", "--json", cwd=home).stdout) == []


def test_cli_file_that_is_not_pkcs12_is_refused(home: Path, tmp_path: Path, people: dict[str, Person]) -> None:
    """A PEM certificate or any other file: exit 2, one sentence saying what to export."""
    other = tmp_path / "notes.txt"
    other.write_text("just some text\n")
    for path, message in ((people["alice"].cert_file, "is a PEM file, not PKCS#12"),
                          (other, "is not a PKCS#12 file")):
        out = run_cli("certs", "add", "alice", "--file", str(path), "--password-stdin", input=PASSWORD + "\n", cwd=home)
        assert out.returncode == 2 and message in _one_sentence(out.stderr)
    out = run_cli("certs", "add", "alice", "--file", str(people["alice"].p12), cwd=home)
    assert out.returncode == 2 and "is protected by a password: give it with --password-env" in out.stderr
    assert json.loads(run_cli("certs", "list", "--json", cwd=home).stdout) == []


def test_cli_a_password_for_a_file_without_one_and_a_control_character_are_named(
        home: Path, tmp_path: Path) -> None:
    """A password given for a PKCS#12 file that has none is not called wrong: the
    sentence says to leave it out. A name with a control character (listings print it)
    is refused. Exit 2, nothing stored."""
    from tests.servers.certs import make_pkcs12

    plain, _, _ = make_pkcs12(tmp_path, "nopw", None)
    out = run_cli("certs", "add", "nopw", "--file", plain, "--password-stdin", input="anything\n", cwd=home)
    assert out.returncode == 2 and f"{plain} has no password: leave out --password-env" in _one_sentence(out.stderr)
    out = run_cli("certs", "add", "n\x1b[2Jx", "--file", plain, cwd=home)
    assert out.returncode == 2 and "holds a control character: use printable characters" in _one_sentence(out.stderr)
    assert json.loads(run_cli("certs", "list", "--json", cwd=home).stdout) == []
    assert run_cli("certs", "add", "nopw", "--file", plain, cwd=home).returncode == 0


def test_cli_both_passwords_from_stdin(home: Path, tmp_path: Path, people: dict[str, Person]) -> None:
    """--password-stdin and --key-password-stdin read one line each, in that order."""
    p12 = _twopass(tmp_path, people["alice"], "file-pw", "key-pw")
    out = run_cli("certs", "add", "alice", "--file", str(p12), "--password-stdin", "--key-password-stdin",
                  input="file-pw\nkey-pw\n", cwd=home)
    assert out.returncode == 0, out.stderr


def test_private_key_is_not_in_the_store_in_clear(home: Path, people: dict[str, Person]) -> None:
    """Neither the key's PEM body, nor its DER (PKCS#8 or PKCS#1), nor the PKCS#12 password
    is anywhere in the SQLite files; the certificate itself is, in clear."""
    out = run_cli("certs", "add", "alice", "--file", str(people["alice"].p12), "--password-stdin",
                  input=PASSWORD + "\n", cwd=home)
    assert out.returncode == 0, out.stderr
    stored = b"".join(p.read_bytes() for p in home.iterdir() if p.name.startswith("mailhost.db"))
    key = serialization.load_pem_private_key(people["alice"].key_pem, None)
    body = [line for line in people["alice"].key_pem.splitlines() if line and not line.startswith(b"-----")]
    assert len(body) > 20
    assert not any(line in stored for line in body)
    for der in (key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()),
                key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL,
                                  serialization.NoEncryption())):
        assert der[:64] not in stored and der[-64:] not in stored
    d = key.private_numbers().d.to_bytes(256, "big")
    assert d[:32] not in stored
    assert PASSWORD.encode() not in stored
    cert_body = [line for line in people["alice"].cert_pem.splitlines() if not line.startswith(b"-----")]
    assert cert_body[1] in stored  # the certificate is kept in clear; the test looks in the right place


def test_cli_remove_detach_says_what_becomes_of_mail_for_it(home: Path, plugin_env: dict[str, str], tmp_path: Path,
                                                            people: dict[str, Person]) -> None:
    """`certs remove --detach` leaves the connections enabled (their other mail keeps
    coming; nothing is lost, the original is always stored) and says what happens to
    mail encrypted for the removed certificate from now on: stored as downloaded,
    flagged where other certificates are attached, unflagged where none is left.
    Then it happens as said."""
    from .test_smime import smime_encrypt

    env = {**plugin_env, "MAILHOST_LOAD_PLUGINS": "testplugin", "P12_PASSWORD": PASSWORD}
    for name in ("alice", "bob"):
        assert run_cli("certs", "add", name, "--file", str(people[name].p12), "--password-env", "P12_PASSWORD",
                       env=env, cwd=home).returncode == 0
    for name, attach in (("desk", ["alice", "bob"]), ("sales", ["bob"])):
        (tmp_path / name).mkdir()
        args = [a for c in attach for a in ("--certificate", c)]
        assert run_cli("incoming", "add", name, "--protocol", "dir", "--folder", str(tmp_path / name), *args,
                       env=env, cwd=home).returncode == 0
        assert run_cli("incoming", "enable", name, "--yes", env=env, cwd=home).returncode == 0
    out = run_cli("certs", "remove", "bob", "--detach", env=env, cwd=home)
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines() == [
        "removed certificate bob, detached from desk, sales",
        "from now on, mail encrypted only for bob is stored as downloaded, not decrypted (attaching a certificate "
        "later does not decrypt it): desk flags it with the reason; sales has no certificate left and does not "
        "flag it",
    ]
    for name in ("desk", "sales"):
        assert json.loads(run_cli("incoming", "show", name, "--json", env=env, cwd=home).stdout)["enabled"] is True
        (tmp_path / name / "for-bob.eml").write_bytes(smime_encrypt(people["bob"], subject=f"to {name}"))
    assert run_cli("fetch", env=env, cwd=home).returncode == 0
    items = json.loads(run_cli("queue", "incoming", "--json", env=env, cwd=home).stdout)
    decryption = {i["subject"]: json.loads(run_cli("queue", "incoming", "show", str(i["id"]), "--json", env=env,
                                                   cwd=home).stdout)["decryption"] for i in items}
    assert decryption["to sales"] is None
    assert decryption["to desk"]["error"].startswith("no attached certificate matches a recipient")
    out = run_cli("certs", "remove", "alice", "--detach", env=env, cwd=home)
    assert out.stderr.splitlines()[1].endswith(": desk has no certificate left and does not flag it"), out.stderr


def test_an_email_address_in_the_subject_is_named(mh: Mailhost) -> None:
    """S/MIME certificates carry the mailbox as emailAddress in their subject: the listing
    names it so, as openssl does, not by its OID (1.2.840.113549.1.9.1=...)."""
    import datetime as dt

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import pkcs12
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "helpdesk"),
                         x509.NameAttribute(NameOID.EMAIL_ADDRESS, "helpdesk@example.org")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(7).not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .sign(key, hashes.SHA256()))
    data = pkcs12.serialize_key_and_certificates(b"helpdesk", key, cert, None, serialization.NoEncryption())
    row = Certificates(mh).add("helpdesk", data)
    assert row.subject == row.issuer == "emailAddress=helpdesk@example.org,CN=helpdesk"
    assert certificate_dict(row)["subject"] == "emailAddress=helpdesk@example.org,CN=helpdesk"
