"""End to end over IMAP: `mailhost fetch` against a real Dovecot, crashes included.

Store, then acknowledge: whatever happens (SIGKILL at random instants, the server
restarting mid-pass, the folder renumbered), every message ends up in the incoming
queue exactly once, byte for byte.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from .helpers import kill_mid_pass
from .helpers import message_id_of as _mid
from .helpers import run_cli
from .helpers import stored_messages as _queue
from .servers.dovecot import ACL_CONFIG

ENV = {"MAILHOST_LOAD_PLUGINS": "imap"}



@pytest.fixture
def imap_conn(home: Path, dovecot, mailbox):
    """An IMAP connection (STARTTLS, verified against the test CA) to a fresh mailbox."""
    out = run_cli("incoming", "add", "desk", "--protocol", "imap", "--host", "localhost",
                  "--port", str(dovecot.imap_port), "--encryption", "starttls", "--username", mailbox.user,
                  "--password-env", "PW", "--ca-file", dovecot.ca_file,
                  env={**ENV, "PW": mailbox.password}, cwd=home)
    assert out.returncode == 0, out.stderr
    return "desk"



def _fetch(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("fetch", "desk", "--json", *args, env=ENV, cwd=home)


def test_fetch_byte_exact_then_nothing_new(home: Path, dovecot, mailbox, imap_conn: str) -> None:
    """Messages arrive byte for byte, are marked seen, and a second pass finds nothing."""
    sent = [dovecot.generate_message(i, size=2000 + 37 * i) for i in range(50)]
    dovecot.deliver_many(mailbox.user, sent)
    out = _fetch(home)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[0]["stored"] == 50
    assert [raw for _, raw in _queue(home)] == sent
    assert all("S" in f for f in dovecot.flags(mailbox.user))
    again = json.loads(_fetch(home).stdout)[0]
    assert (again["listed"], again["stored"]) == (0, 0)


def test_uidvalidity_reset_resyncs_without_duplicates(home: Path, dovecot, mailbox, imap_conn: str) -> None:
    """The server renumbers the folder: nothing is stored twice and new mail still comes."""
    dovecot.deliver_many(mailbox.user, [dovecot.generate_message(i) for i in range(20)])
    assert json.loads(_fetch(home).stdout)[0]["stored"] == 20
    dovecot.reset_uidvalidity(mailbox.user)
    dovecot.deliver_many(mailbox.user, [dovecot.generate_message(100 + i) for i in range(3)])
    report = json.loads(_fetch(home).stdout)[0]
    assert (report["stored"], report["duplicates"]) == (3, 20)
    ids = [m for m, _ in _queue(home)]
    assert len(ids) == 23 == len(set(ids))
    report = json.loads(_fetch(home).stdout)[0]
    assert report["listed"] == 0


@pytest.mark.parametrize("arriving", [2, 4], ids=["uidnext-below-the-cursor", "uidnext-past-the-cursor"])
def test_mailbox_restored_from_a_backup_loses_no_new_mail(home: Path, dovecot, mailbox, imap_conn: str,
                                                          arriving: int) -> None:
    """A restored backup keeps the folder's UIDVALIDITY but takes UIDNEXT back, so new
    mail gets UIDs already stored: all of it is still downloaded, nothing twice; also
    when so much came that UIDNEXT is past the cursor again (the message at the UID
    stored last has another INTERNALDATE)."""
    day = 86400
    for i in range(2):
        dovecot.deliver(mailbox.user, dovecot.generate_message(i), internaldate=time.time() - 3 * day)
    assert json.loads(_fetch(home).stdout)[0]["stored"] == 2
    backup = dovecot.backup(mailbox.user)  # with the dovecot-uidlist of UIDs 1-2
    for i in range(2, 5):
        dovecot.deliver(mailbox.user, dovecot.generate_message(i), internaldate=time.time() - 2 * day)
    assert json.loads(_fetch(home).stdout)[0]["stored"] == 3
    dovecot.restore(mailbox.user, backup)
    arrived = [dovecot.generate_message(100 + i) for i in range(arriving)]
    for raw in arrived:  # UIDs 3 and up, as before the restore
        dovecot.deliver(mailbox.user, raw, internaldate=time.time() - day)
    report = json.loads(_fetch(home).stdout)[0]
    assert (report["stored"], report["duplicates"]) == (arriving, 2), report
    assert [raw for _, raw in _queue(home)][-arriving:] == arrived
    assert json.loads(_fetch(home).stdout)[0]["listed"] == 0


def test_a_message_the_server_cannot_send_holds_up_only_what_follows_it(
        home: Path, dovecot, mailbox, imap_conn: str) -> None:
    """Dovecot drops the link on a message file that grew behind its back: the pass
    stores the mail before it and names it; the next pass starts there, storing nothing twice."""
    sent = [dovecot.generate_message(i) for i in range(5)]
    paths = [dovecot.deliver(mailbox.user, raw) for raw in sent]
    with open(paths[3], "ab") as grown:
        grown.write(b"appended in place\r\n")
    first = json.loads(_fetch(home).stdout)[0]
    assert (first["ok"], first["stored"]) == (False, 3) and "message UID 4" in first["error"]
    again = json.loads(_fetch(home).stdout)[0]
    assert (again["listed"], again["stored"], again["duplicates"]) == (2, 0, 0)
    assert [raw for _, raw in _queue(home)] == sent[:3]


def test_a_folder_the_user_may_only_read_is_downloaded_and_says_why_it_stays_unseen(
        home: Path, dovecot_factory) -> None:
    """SELECT answers [READ-ONLY] (an ACL of lookup and read): every pass downloads what
    is new and says that mark-seen cannot be done; with keep, the passes are clean."""
    server = dovecot_factory(extra_config=ACL_CONFIG)
    user, password = server.new_user("ro")
    sent = [server.generate_message(i) for i in range(3)]
    server.deliver_many(user, sent)
    (server.maildir(user) / "dovecot-acl").write_text("owner lr\n")
    assert run_cli("incoming", "add", "desk", "--protocol", "imap", "--host", "localhost", "--port",
                   str(server.imaps_port), "--encryption", "ssl", "--username", user, "--password-env", "PW",
                   "--ca-file", server.ca_file, env={**ENV, "PW": password}, cwd=home).returncode == 0
    first = json.loads(_fetch(home).stdout)[0]
    assert (first["ok"], first["stored"], first["acknowledged"]) == (False, 3, 0)
    assert "lets this user only read folder INBOX (READ-ONLY): the messages are stored" in first["error"]
    assert run_cli("incoming", "edit", "desk", "--after-download", "keep", env=ENV, cwd=home).returncode == 0
    again = json.loads(_fetch(home).stdout)[0]
    assert (again["ok"], again["listed"], again["stored"]) == (True, 0, 0)
    assert [raw for _, raw in _queue(home)] == sent and server.flags(user) == ["", "", ""]


def test_enable_after_pointing_at_another_server_says_why_it_refetches(
        home: Path, dovecot, mailbox, imap_conn: str) -> None:
    """Another host name for the same mailbox: enable estimates every message again and
    says the mailbox changed (not that the server renumbered the folder); the pass then
    stores nothing twice."""
    dovecot.deliver_many(mailbox.user, [dovecot.generate_message(i) for i in range(4)])
    assert json.loads(_fetch(home).stdout)[0]["stored"] == 4
    assert run_cli("incoming", "edit", "desk", "--host", "127.0.0.1", env=ENV, cwd=home).returncode == 0
    out = run_cli("incoming", "enable", "desk", "--yes", env=ENV, cwd=home)
    assert out.returncode == 0, out.stderr
    assert ("the next download of desk would fetch about 4 message(s) (confidence: low); "
            "at most 4: the connection now reads another mailbox") in out.stderr
    assert "renumbered" not in out.stderr
    report = json.loads(_fetch(home).stdout)[0]
    assert (report["stored"], report["duplicates"]) == (0, 4)


def test_delete_after_download(home: Path, dovecot, mailbox, imap_conn: str) -> None:
    """With --after-download delete the folder is empty after the pass, and all is stored."""
    assert run_cli("incoming", "edit", "desk", "--after-download", "delete", env=ENV, cwd=home).returncode == 0
    dovecot.deliver_many(mailbox.user, [dovecot.generate_message(i) for i in range(30)])
    assert json.loads(_fetch(home).stdout)[0]["stored"] == 30
    assert dovecot.maildir_messages(mailbox.user) == []
    assert len(_queue(home)) == 30


def test_inbox_in_any_case_is_the_same_folder(home: Path, dovecot, mailbox, imap_conn: str) -> None:
    """INBOX is case-insensitive (RFC 3501): retyped as "inbox" it keeps its cursor and
    stored keys, so nothing is downloaded twice; moving into it is refused."""
    dovecot.deliver_many(mailbox.user, [dovecot.generate_message(i) for i in range(4)])
    assert json.loads(_fetch(home).stdout)[0]["stored"] == 4
    assert run_cli("incoming", "edit", "desk", "--folder", "inbox", env=ENV, cwd=home).returncode == 0
    assert json.loads(run_cli("incoming", "show", "desk", "--json", env=ENV, cwd=home).stdout)["folder"] == "INBOX"
    again = json.loads(_fetch(home).stdout)[0]
    assert (again["listed"], again["stored"]) == (0, 0) and len(_queue(home)) == 4
    out = run_cli("incoming", "edit", "desk", "--after-download", "move", "--move-to", "Inbox", env=ENV, cwd=home)
    assert out.returncode == 2 and "--move-to Inbox is the folder it downloads from: choose another" in out.stderr


def test_a_folder_holding_copies_of_stored_mail_brings_nothing_twice(
        home: Path, dovecot, mailbox, imap_conn: str) -> None:
    """Pointed at the folder its move action filled, the connection recognises every
    message by its content: logged as duplicates and acknowledged, stored once. New
    mail there still comes. Enable says that some of what it downloads may be stored
    already (the IMAP plugin counts downloads exactly, and knows nothing of the store)."""
    dovecot.deliver_many(mailbox.user, [dovecot.generate_message(i) for i in range(10)])
    assert run_cli("incoming", "edit", "desk", "--after-download", "move", "--move-to", "Done",
                   env=ENV, cwd=home).returncode == 0
    assert json.loads(_fetch(home).stdout)[0]["stored"] == 10
    assert len(dovecot.maildir_messages(mailbox.user, "Done")) == 10
    dovecot.deliver_many(mailbox.user, [dovecot.generate_message(100 + i) for i in range(2)], folder="Done")
    out = run_cli("incoming", "edit", "desk", "--folder", "Done", "--after-download", "mark-seen", env=ENV, cwd=home)
    assert out.returncode == 0, out.stderr
    out = run_cli("incoming", "enable", "desk", "--yes", env=ENV, cwd=home)
    assert ("would fetch about 12 message(s) (confidence: exact); some of them may be stored already: desk "
            "stored mail from another folder or mailbox before") in out.stderr, out.stderr
    report = json.loads(_fetch(home).stdout)[0]
    assert (report["listed"], report["stored"], report["duplicates"], report["acknowledged"]) == (12, 2, 10, 12)
    ids = Counter(m for m, _ in _queue(home))
    assert len(ids) == 12 and max(ids.values()) == 1


def test_a_folder_stored_in_an_older_spelling_keeps_its_keys(home: Path, dovecot, mailbox, imap_conn: str) -> None:
    """A store from before INBOX had one spelling holds "inbox": the next edit writes
    INBOX and the folder's keys and cursor follow it, so nothing is downloaded again."""
    import sqlite3

    dovecot.deliver_many(mailbox.user, [dovecot.generate_message(i) for i in range(4)])
    assert json.loads(_fetch(home).stdout)[0]["stored"] == 4
    db = sqlite3.connect(home / "mailhost.db")
    with db:
        for table in ("incoming_connections", "incoming_seen", "folder_cursors"):
            db.execute(f"UPDATE {table} SET folder = 'inbox' WHERE folder = 'INBOX'")
    db.close()
    assert run_cli("incoming", "edit", "desk", "--interval", "7", env=ENV, cwd=home).returncode == 0
    assert json.loads(run_cli("incoming", "show", "desk", "--json", env=ENV, cwd=home).stdout)["folder"] == "INBOX"
    dovecot.deliver(mailbox.user, dovecot.generate_message(50))
    again = json.loads(_fetch(home).stdout)[0]
    assert (again["listed"], again["stored"], again["duplicates"]) == (1, 1, 0)


def test_server_restart_mid_pass(home: Path, dovecot, mailbox, imap_conn: str) -> None:
    """Dovecot restarting during a pass fails the pass cleanly; the next one completes it."""
    sent = [dovecot.generate_message(i) for i in range(4000)]
    dovecot.deliver_many(mailbox.user, sent)
    proc = subprocess.Popen([sys.executable, "-m", "mailhost", "fetch", "desk", "--json"], cwd=home,
                            env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    dovecot.restart()
    proc.communicate(timeout=120)
    for _ in range(3):
        if _fetch(home).returncode == 0:
            break
    ids = Counter(m for m, _ in _queue(home))
    assert set(ids) == {_mid(m) for m in sent}
    assert max(ids.values()) == 1


@pytest.mark.slow
def test_sigkill_at_random_points_stores_each_message_once(home: Path, dovecot, mailbox, imap_conn: str) -> None:
    """`mailhost fetch` killed with SIGKILL at random instants, again and again: each message once."""
    rng = random.Random(int(os.environ.get("MAILHOST_TEST_SEED", "20261121")))
    sent = [dovecot.generate_message(i, size=rng.randint(2000, 4000)) for i in range(3000)]
    dovecot.deliver_many(mailbox.user, sent)
    kills = 0
    for _ in range(12):
        proc = subprocess.Popen([sys.executable, "-m", "mailhost", "fetch", "desk"], cwd=home,
                                env={**os.environ, **ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kills += kill_mid_pass(proc, home, rng)
        proc.wait()
    final = _fetch(home)
    assert final.returncode == 0, final.stderr
    assert kills >= 3  # the test proved something only if it really killed passes
    stored = _queue(home)
    ids = Counter(m for m, _ in stored)
    assert set(ids) == {_mid(m) for m in sent}
    assert max(ids.values()) == 1
    by_id = {_mid(m): m for m in sent}
    assert all(raw == by_id[m] for m, raw in stored)
    assert all("S" in f for f in dovecot.flags(mailbox.user))  # every acknowledgement finished


def test_a_pass_told_to_stop_ends_after_its_batch_and_the_next_goes_on(home: Path, dovecot, mailbox,
                                                                      imap_conn: str, mh) -> None:
    """`serve` stopping (SIGTERM) ends a download pass after the batch under way, not
    after the whole mailbox: that batch is stored and marked seen, the rest stays for the
    next pass, which finds all of it (the folder's cursor only moves with what was
    stored), nothing twice."""
    import threading

    sent = [dovecot.generate_message(i, size=600) for i in range(1000)]  # batches of 250, 500, 250
    dovecot.deliver_many(mailbox.user, sent)
    stop = threading.Event()
    first = mh.incoming.fetch_one(imap_conn, lambda done, total: done and stop.set(), stop)  # after one batch
    assert first.ok and first.stopped, first
    assert (first.listed, first.stored, first.acknowledged) == (1000, 750, 750)  # the batch fetched meanwhile too
    assert sum("S" in f for f in dovecot.flags(mailbox.user)) == 750
    second = mh.incoming.fetch_one(imap_conn)
    assert second.ok and not second.stopped and (second.listed, second.stored, second.duplicates) == (250, 250, 0)
    assert [raw for _, raw in _queue(home)] == sent
    assert all("S" in f for f in dovecot.flags(mailbox.user))
