"""POP3 through the host: Folder refused, keep and delete passes, UIDL changes."""
from __future__ import annotations

import random
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from mailhost import Mailhost
from mailhost.connections import ConnectionSpec
from mailhost.errors import ValidationError
from mailhost.protocols import Direction
from tests.servers.dovecot import Dovecot, generate_message
from tests.servers.fixtures import Mailbox


def add(mh: Mailhost, dc: Dovecot, box: Mailbox, after_download: str | None = None, **kw: Any) -> str:
    """Add a STARTTLS pop3 connection for ``box``; returns its name."""
    mh.connections.add(Direction.INCOMING, ConnectionSpec(
        name="pop", protocol="pop3", host="localhost", port=dc.pop3_port, encryption="starttls",
        username=box.user, password=box.password, ca_file=dc.ca_file, after_download=after_download, **kw))
    return "pop"


def stored(mh: Mailhost) -> list[bytes]:
    """The raw bytes in the incoming queue, oldest first."""
    return [mh.incoming.item(item.id).raw for item in reversed(mh.incoming.items())]


def test_folder_is_refused(mh: Mailhost, dovecot: Dovecot, mailbox: Mailbox) -> None:
    """POP3 declares no Folder, so the host refuses one with a clear error."""
    with pytest.raises(ValidationError, match="(?i)folder"):
        add(mh, dovecot, mailbox, folder="INBOX")


def test_keep_downloads_each_message_once(mh: Mailhost, dovecot: Dovecot, mailbox: Mailbox) -> None:
    """Keep is the default; the next pass downloads only what arrived since."""
    dovecot.deliver_many(mailbox.user, [generate_message(i) for i in range(5)])
    name = add(mh, dovecot, mailbox)
    assert mh.connections.get(Direction.INCOMING, name).after_download == "keep"
    assert mh.incoming.fetch([name])[0].stored == 5
    dovecot.deliver(mailbox.user, generate_message(5))
    second = mh.incoming.fetch([name])[0]
    assert (second.ok, second.listed, second.stored) == (True, 1, 1)
    assert stored(mh) == dovecot.maildir_messages(mailbox.user)


def test_delete_empties_the_mailbox(mh: Mailhost, dovecot: Dovecot, mailbox: Mailbox) -> None:
    """With delete, stored messages leave the server at the end of the pass."""
    messages = [generate_message(i) for i in range(5)]
    dovecot.deliver_many(mailbox.user, messages)
    name = add(mh, dovecot, mailbox, "delete")
    report = mh.incoming.fetch([name])[0]
    assert (report.ok, report.stored, report.acknowledged) == (True, 5, 5)
    assert dovecot.maildir_messages(mailbox.user) == []
    assert stored(mh) == messages


def test_changed_uidls_store_nothing_twice(mh: Mailhost, dovecot_factory: Callable[..., Dovecot]) -> None:
    """When the server renumbers its UIDLs, nothing is stored twice."""
    dc = dovecot_factory()
    box = Mailbox(*dc.new_user("u"))
    dc.deliver_many(box.user, [generate_message(i) for i in range(4)])
    name = add(mh, dc, box)
    assert mh.incoming.fetch([name])[0].stored == 4
    dc.reset_uidvalidity(box.user)  # Dovecot's UIDL includes UIDVALIDITY: every UIDL changes
    dc.deliver(box.user, generate_message(4))
    again = mh.incoming.fetch([name])[0]
    assert (again.ok, again.listed, again.stored, again.duplicates) == (True, 5, 1, 4)
    assert sorted(stored(mh)) == sorted(dc.maildir_messages(box.user))


@pytest.mark.slow
def test_sigkill_mid_download_stores_each_message_once(mh: Mailhost, dovecot: Dovecot, mailbox: Mailbox) -> None:
    """`mailhost fetch` killed at random points, then run to the end: each message once, none left."""
    messages = [generate_message(i) for i in range(4000)]
    dovecot.deliver_many(mailbox.user, messages)
    name = add(mh, dovecot, mailbox, "delete")
    rng = random.Random()
    for _ in range(8):
        proc = subprocess.Popen([sys.executable, "-m", "mailhost", "fetch", name],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(rng.uniform(0.3, 2.5))  # before, during and after batches and QUIT
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    final = subprocess.run([sys.executable, "-m", "mailhost", "fetch", name], capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert sorted(stored(mh)) == sorted(messages)
    assert dovecot.maildir_messages(mailbox.user) == []
