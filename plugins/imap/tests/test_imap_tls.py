"""TLS: always verified, STARTTLS never downgraded, nothing from before the handshake kept."""
from __future__ import annotations

import re

import pytest
from mailhost.errors import TLSFailure
from mailhost.protocols import Encryption

from mailhost_imap import PROVIDER


@pytest.mark.parametrize("encryption", [Encryption.SSL, Encryption.STARTTLS])
def test_untrusted_certificate_is_refused(settings, dovecot_factory, encryption):
    """A certificate from an unknown CA fails with the reason and the fix."""
    server = dovecot_factory(untrusted=True)
    conn = settings(server, encryption=encryption, username="alice", password="alice-pw")
    with pytest.raises(TLSFailure, match=r"is not trusted \(unable to get local issuer certificate\): the CA file") as failed:
        PROVIDER.open(conn)
    assert "helpdesk on 127.0.0.1" in str(failed.value)
    with pytest.raises(TLSFailure, match="give its certificate with --ca-file"):
        PROVIDER.open(settings(server, encryption=encryption, ca_file=None))


@pytest.mark.parametrize("encryption", [Encryption.SSL, Encryption.STARTTLS])
def test_ca_file_gone_since_it_was_saved(settings, tmp_path, encryption):
    """A CA file moved or spoiled after the connection was saved fails the TLS step,
    naming the file and the fix (it was an unexpected FileNotFoundError)."""
    from mailhost_imap.diagnose import test as report

    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    for path, reason in ((tmp_path / "gone.pem", "No such file or directory"), (bad, "no certificate")):
        conn = settings(encryption=encryption, ca_file=str(path))
        with pytest.raises(TLSFailure, match=rf"the CA file {path} cannot be used \(.*{reason}.*: put the PEM file"):
            PROVIDER.open(conn)
        steps = list(report(conn))
        assert steps[-1].name == "tls" and not steps[-1].ok and str(path) in steps[-1].detail


def test_starttls_required_but_not_offered(settings, dovecot_factory):
    """A server without STARTTLS is refused before any credential is sent."""
    server = dovecot_factory(starttls=False)
    lines: list[str] = []
    conn = settings(server, encryption=Encryption.STARTTLS, username="alice", password="alice-pw",
                    transcript=lines.append)
    with pytest.raises(TLSFailure, match="does not offer STARTTLS, and mailhost never falls back"):
        PROVIDER.open(conn)
    assert not re.search(r"> b'\w+ (LOGIN|AUTHENTICATE)", "\n".join(lines))


def test_preauth_greeting_refused_under_starttls(fake_imap):
    """A PREAUTH greeting (signed in before TLS) is refused when TLS is required."""
    from mailhost.protocols import ConnectionSettings

    def script(peer):
        peer.send(b"* PREAUTH IMAP4rev1 you are signed in already\r\n")
        peer.serve({b"CAPABILITY": b"* CAPABILITY IMAP4rev1 STARTTLS\r\n"})

    conn = ConnectionSettings(name="helpdesk", protocol="imap", host="127.0.0.1", port=fake_imap(script),
                              encryption=Encryption.STARTTLS, username="u", password="p", timeout=5)
    with pytest.raises(TLSFailure, match=r"PREAUTH greeting\), so STARTTLS cannot protect it"):
        PROVIDER.open(conn)


def test_starttls_response_injection_is_discarded(fake_imap, pki):
    """Responses sent in plain text around the STARTTLS OK never reach the TLS session."""
    from mailhost.protocols import ConnectionSettings

    peers: list = []  # the server's end, kept at once: what it received is read after the client is done

    def script(peer):
        peers.append(peer)
        peer.send(b"* OK fake IMAP ready\r\n")
        tag, _ = peer.command()  # CAPABILITY
        peer.send(b"* CAPABILITY IMAP4rev1 STARTTLS\r\n" + tag + b" OK done\r\n")
        tag, rest = peer.command()
        assert rest == b"STARTTLS"
        following = tag[:4] + str(int(tag[4:]) + 1).encode()  # imaplib's next tag
        peer.send(  # one write: it all lands in the client's read buffer at once
            b'* LIST () "/" Injected\r\n'
            b"* CAPABILITY IMAP4rev1 INJECTED-BEFORE\r\n"
            + tag + b" OK begin TLS\r\n"
            b"* CAPABILITY IMAP4rev1 INJECTED-AFTER\r\n"
            + following + b" OK [CAPABILITY IMAP4rev1 INJECTED-AFTER] done\r\n"
        )
        peer.starttls()
        peer.serve({
            b"CAPABILITY": b"* CAPABILITY IMAP4rev1 AUTH=PLAIN IDLE\r\n",
            b"LIST": b'* LIST () "/" INBOX\r\n',
        })

    conn = ConnectionSettings(name="helpdesk", protocol="imap", host="127.0.0.1", port=fake_imap(script),
                              encryption=Encryption.STARTTLS, username="u", password="p",
                              ca_file=pki.ca_file, timeout=5)
    with PROVIDER.open(conn) as session:
        caps = session.client.capabilities()
        folders = [name for _, _, name in session.client.list_folders()]
    assert b"IDLE" in caps and not [cap for cap in caps if b"INJECTED" in cap]
    assert folders == ["INBOX"]
    # Each of these was recorded before the server answered it, so before the client went on.
    commands = [line.split(b" ")[1].strip() for line in peers[0].received]
    assert commands[:4] == [b"CAPABILITY", b"STARTTLS", b"CAPABILITY", b"LOGIN"]
