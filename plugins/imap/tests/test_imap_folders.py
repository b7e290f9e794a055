"""Folders as admins write them: Main/Sub, localized names, clear errors."""
from __future__ import annotations

import pytest
from mailhost.errors import PermanentFailure
from tests.servers.dovecot import generate_message

from mailhost_imap import PROVIDER


def listed(session):
    return session.list_new(None, lambda keys: set()).refs


def test_subfolder_main_sub(settings, dovecot, mailbox):
    """Folder Main/Sub is read from the server's Main/Sub, not from INBOX."""
    dovecot.deliver(mailbox.user, generate_message(1))
    dovecot.deliver(mailbox.user, generate_message(2, subject="in the subfolder"), folder="Main/Sub")
    with PROVIDER.open(settings(folder="Main/Sub")) as session:
        (_, raw), = session.fetch(listed(session))
    assert b"Subject: in the subfolder" in raw


def test_subfolder_with_another_delimiter(settings, dovecot_factory):
    """On a server whose delimiter is ".", Main/Sub is asked for as Main.Sub."""
    server = dovecot_factory(extra_config="namespace inbox {\n  separator = .\n}\n")
    user, password = server.new_user("dot")
    server.deliver(user, generate_message(1, subject="dotted"), folder="Main/Sub")
    lines: list[str] = []
    with PROVIDER.open(settings(server, username=user, password=password, folder="Main/Sub",
                                transcript=lines.append)) as session:
        (_, raw), = session.fetch(listed(session))
        session.move(listed(session), "Main/Done")
    assert b"Subject: dotted" in raw
    assert any('SELECT "Main.Sub"' in line for line in lines)
    assert len(server.maildir_messages(user, "Main/Done")) == 1


def test_localized_folder_name(settings, dovecot, mailbox):
    """Non-ASCII names (modified UTF-7 on the wire) are found and read."""
    dovecot.deliver(mailbox.user, generate_message(1, subject="localized"), folder="Eingänge/Größere Ämter")
    with PROVIDER.open(settings(folder="Eingänge/Größere Ämter")) as session:
        (_, raw), = session.fetch(listed(session))
        assert session.estimate(None, lambda keys: set()).count == 1
    assert b"Subject: localized" in raw


def test_missing_folder_names_folder_connection_and_fix(settings, dovecot, mailbox):
    """A missing folder fails permanently, naming it, the connection and what exists."""
    dovecot.create_folder(mailbox.user, "Main/Sub")
    with PROVIDER.open(settings(folder="Main/Nope")) as session:
        with pytest.raises(PermanentFailure) as failed:
            session.list_new(None, lambda keys: set())
        with pytest.raises(PermanentFailure, match="folder Main/Nope does not exist"):
            session.estimate(None, lambda keys: set())
    message = str(failed.value)
    assert "folder Main/Nope does not exist in the mailbox of helpdesk on 127.0.0.1" in message
    assert "check the Folder setting" in message and "Main/Sub" in message
