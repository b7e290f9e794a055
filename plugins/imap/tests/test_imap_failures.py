"""Links that break: every failure is a mailhost error naming the connection."""
from __future__ import annotations

import pytest
from mailhost.errors import ConnectFailure, PermanentFailure, TemporaryFailure
from mailhost.protocols import ConnectionSettings, Encryption
from tests.servers.dovecot import generate_message

from mailhost_imap import PROVIDER


def test_server_restart_mid_pass_is_temporary(settings, dovecot_factory):
    """A link dropped between listing and download fails as temporary; close still works."""
    server = dovecot_factory()
    server.deliver_many("alice", (generate_message(i) for i in range(3)))
    session = PROVIDER.open(settings(server, username="alice", password="alice-pw"))
    refs = session.list_new(None, lambda keys: set()).refs
    server.restart()
    with pytest.raises(TemporaryFailure, match="helpdesk on 127.0.0.1") as failed:
        list(session.fetch(refs))
    assert isinstance(failed.value, ConnectFailure)
    session.close()
    session.close()
    with PROVIDER.open(settings(server, username="alice", password="alice-pw")) as again:
        assert len(list(again.fetch(refs))) == 3


def test_silent_server_times_out(fake_imap):
    """A server that never greets fails after the connection's timeout, with the fix."""

    def script(peer):
        peer.file.read()  # say nothing until the client gives up

    conn = ConnectionSettings(name="helpdesk", protocol="imap", host="127.0.0.1", port=fake_imap(script),
                              encryption=Encryption.NONE, username="u", password="p", timeout=0.3)
    with pytest.raises(ConnectFailure, match="did not answer within 0.3 s .* encryption setting matches the port"):
        PROVIDER.open(conn)


def test_not_an_imap_server(fake_imap):
    """A server greeting like SMTP is refused with a hint at the host and port."""

    def script(peer):
        peer.send(b"220 smtp.example.org ESMTP ready\r\n")
        peer.file.read()

    conn = ConnectionSettings(name="helpdesk", protocol="imap", host="127.0.0.1", port=fake_imap(script),
                              encryption=Encryption.NONE, username="u", password="p", timeout=5)
    with pytest.raises(PermanentFailure, match="does not greet like an IMAP server .* check the host and the port"):
        PROVIDER.open(conn)
