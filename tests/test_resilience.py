"""What a long-running service meets in production: the store going away mid-pass, a
busy SQLite store, connections edited while a pass runs, a full disk."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from mailhost import Mailhost, hookimpl
from mailhost.connections import ConnectionSpec
from mailhost.plugins import PluginHost
from mailhost.protocols import Direction

from .helpers import message_id_of


@pytest.fixture
def store_home(tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh installation on each store backend; its config file."""
    monkeypatch.delenv("MAILHOST_SECRET_KEY", raising=False)
    config = tmp_path / "inst" / "mailhost.toml"
    Mailhost.init(config, database_url).close()
    return config


def _open(config: Path, *plugins: tuple[str, object]) -> Mailhost:
    return Mailhost.open(config, plugins=PluginHost(only=["imap"], extra=list(plugins)))


def _same_uidvalidity(dovecot: Any, *users: str) -> None:
    """Give the users' INBOXes one UIDVALIDITY, as Dovecot does for mailboxes made in
    the same second (it takes the time of creation): their keys are then the same."""
    for user in users:
        root = dovecot.maildir(user)
        root.mkdir(parents=True, exist_ok=True)
        uidlist = root / "dovecot-uidlist"
        uidlist.write_text(f"3 V1700000000 N1 G{uuid.uuid4().hex}\n")
        os.chown(uidlist, dovecot.mail_uid, dovecot.mail_gid)


class _EditMidPass:
    """A plugin that, once the first batch of a pass is stored, points the connection at
    another mailbox, as an admin running `mailhost incoming edit` at that moment."""

    def __init__(self, config: Path, name: str, username: str, password: str) -> None:
        self.config, self.name, self.username, self.password = config, name, username, password
        self.done = False

    @hookimpl
    def message_stored(self, connection: str, item_id: int, message_id: str | None, raw: bytes) -> None:
        if self.done:
            return
        self.done = True
        admin = _open(self.config)
        try:
            admin.connections.edit(Direction.INCOMING, self.name,
                                   ConnectionSpec(username=self.username, password=self.password))
        finally:
            admin.close()


def test_editing_the_mailbox_mid_pass_loses_nothing_of_the_new_one(store_home: Path, dovecot: Any) -> None:
    """`incoming edit` moving a connection to another mailbox while a pass of the old one
    runs: the old pass stores nothing more, so none of its keys or cursors pass for the
    new mailbox's, and the next pass stores every message of the new mailbox."""
    old, old_pw = dovecot.new_user("old")
    new, new_pw = dovecot.new_user("new")
    _same_uidvalidity(dovecot, old, new)
    dovecot.deliver_many(old, [dovecot.generate_message(i, subject=f"old {i}") for i in range(1000)])
    fresh = [dovecot.generate_message(i, subject=f"new {i}") for i in range(1000)]
    dovecot.deliver_many(new, fresh)
    editor = _EditMidPass(store_home, "desk", new, new_pw)
    host = _open(store_home, ("editor", editor))
    try:
        host.connections.add(Direction.INCOMING, ConnectionSpec(
            name="desk", protocol="imap", host="localhost", port=dovecot.imap_port, encryption="starttls",
            username=old, password=old_pw, ca_file=dovecot.ca_file))
        first = host.incoming.fetch_one("desk")
        assert editor.done
        assert first.error and "desk" in first.error, first
        again = host.incoming.fetch_one("desk")
        assert again.error is None, again.error
        stored = {message_id_of(host.incoming.item(i.id).raw) for i in host.incoming.items(connection="desk")}
    finally:
        host.close()
    missing = {message_id_of(raw) for raw in fresh} - stored
    assert not missing, f"{len(missing)} message(s) of the new mailbox were never stored"
