"""Sign-in: passwords, the shared mailbox through Dovecot master users, OAuth2 SASL."""
from __future__ import annotations

import base64
import re

import pytest
from mailhost.errors import AuthenticationFailed
from mailhost.protocols import Encryption
from tests.servers.dovecot import generate_message

from mailhost_imap import PROVIDER


def test_wrong_password_is_a_clear_error(settings, dovecot, mailbox):
    """A refused password names the connection, the server, the fix and the server's words."""
    with pytest.raises(AuthenticationFailed) as failed:
        PROVIDER.open(settings(password="not-the-password"))
    message = str(failed.value)
    assert message.startswith("authentication failed for helpdesk on 127.0.0.1: check the username and password")
    assert "Authentication failed" in message  # Dovecot's own words
    assert "not-the-password" not in message and "b'" not in message


def test_a_sign_in_the_server_cannot_check_now_is_temporary(settings, dovecot, mailbox):
    """Dovecot whose password database fails (here: it cannot read the user's entry)
    answers LOGIN "NO [UNAVAILABLE] Temporary authentication failure": not a wrong
    password, so no AuthenticationFailed telling the admin to check it, but a temporary
    failure with the server's words; the next pass tries again."""
    import os

    from mailhost.errors import TemporaryFailure

    os.chmod(dovecot.users_dir / mailbox.user, 0)
    with pytest.raises(TemporaryFailure) as failed:
        PROVIDER.open(settings())
    message = str(failed.value)
    assert not isinstance(failed.value, AuthenticationFailed), message
    assert message.startswith("helpdesk on 127.0.0.1:") and "[UNAVAILABLE] Temporary authentication failure" in message
    assert "not of the password" in message and "the next pass tries again" in message, message


def test_shared_mailbox_through_a_master_user(settings, dovecot, mailbox):
    """SASL PLAIN with authzid = shared mailbox opens that mailbox with the master's password."""
    dovecot.deliver(mailbox.user, generate_message(1, subject="for the team"))
    with PROVIDER.open(settings(username="master", password="master-pw", shared_mailbox=mailbox.user)) as session:
        (_, raw), = session.fetch(session.list_new(None, lambda keys: set()).refs)
    assert b"Subject: for the team" in raw


def test_shared_mailbox_refused_says_so(settings, dovecot, mailbox):
    """A user who may not open the shared mailbox gets an error naming it."""
    with pytest.raises(AuthenticationFailed, match=f"may open the shared mailbox {mailbox.user}"):
        PROVIDER.open(settings(username="bob", password="bob-pw", shared_mailbox=mailbox.user))


def test_transcript_never_shows_the_password(settings, dovecot, mailbox):
    """With Debug on, the protocol lines pass through the transcript, credentials never."""
    lines: list[str] = []
    for encryption in (Encryption.STARTTLS, Encryption.SSL):
        with PROVIDER.open(settings(encryption=encryption, transcript=lines.append)) as session:
            session.list_new(None, lambda keys: set())
    text = "\n".join(lines)
    assert "SELECT" in text and "STARTTLS" in text
    assert mailbox.password not in text
    assert not re.search(r"> b'\w+ (LOGIN|AUTHENTICATE)", text)
    assert mailbox.password not in repr(session)


def sasl_script(capabilities: bytes, seen: list[bytes]):
    """A fake server offering ``capabilities`` that records the SASL response it gets."""

    def script(peer):
        peer.send(b"* OK fake IMAP ready\r\n")
        tag, _ = peer.command()  # CAPABILITY
        peer.send(b"* CAPABILITY IMAP4rev1 " + capabilities + b"\r\n" + tag + b" OK done\r\n")
        tag, rest = peer.command()  # AUTHENTICATE <mechanism>
        seen.append(rest)
        peer.send(b"+ \r\n")
        seen.append(base64.b64decode(peer.file.readline()))
        peer.send(tag + b" OK signed in\r\n")
        peer.serve({})

    return script


@pytest.mark.parametrize(
    ("offered", "mechanism", "payload"),
    [
        (b"AUTH=XOAUTH2 AUTH=OAUTHBEARER", b"AUTHENTICATE XOAUTH2", b"user=team@example.org\1auth=Bearer T0KEN\1\1"),
        (b"AUTH=OAUTHBEARER", b"AUTHENTICATE OAUTHBEARER", b"n,a=team@example.org,\1auth=Bearer T0KEN\1\1"),
    ],
)
def test_oauth2_sasl(fake_imap, offered, mechanism, payload):
    """OAuth2 signs in with XOAUTH2, or OAUTHBEARER when that is all the server offers."""
    from mailhost.protocols import ConnectionSettings

    seen: list[bytes] = []
    port = fake_imap(sasl_script(offered, seen))
    conn = ConnectionSettings(
        name="team", protocol="imap", host="127.0.0.1", port=port, encryption=Encryption.NONE,
        username="me@example.org", shared_mailbox="team@example.org", access_token=lambda: "T0KEN", timeout=5,
    )
    PROVIDER.open(conn).close()
    assert seen == [mechanism, payload]
