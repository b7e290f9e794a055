"""End to end over POP3: `mailhost fetch` against a real Dovecot, keep and delete, SIGKILL."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from .helpers import kill_mid_pass
from .helpers import message_id_of as _mid
from .helpers import run_cli
from .helpers import stored_messages as _queue

ENV = {"MAILHOST_LOAD_PLUGINS": "pop3"}




@pytest.fixture
def pop3_conn(home: Path, dovecot, mailbox):
    """A POP3 connection over implicit TLS, verified against the test CA."""
    out = run_cli("incoming", "add", "desk", "--protocol", "pop3", "--host", "localhost",
                  "--port", str(dovecot.pop3s_port), "--encryption", "ssl", "--username", mailbox.user,
                  "--password-env", "PW", "--ca-file", dovecot.ca_file,
                  env={**ENV, "PW": mailbox.password}, cwd=home)
    assert out.returncode == 0, out.stderr
    return "desk"


def _fetch(home: Path) -> dict:
    out = run_cli("fetch", "desk", "--json", env=ENV, cwd=home)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)[0]


def test_pop3_folder_refused(home: Path, dovecot, mailbox) -> None:
    """POP3 has no folders: a Folder attribute is refused with a clear error."""
    out = run_cli("incoming", "add", "p", "--protocol", "pop3", "--host", "localhost", "--username", "u",
                  "--password-env", "PW", "--folder", "Archive", env={**ENV, "PW": "x"}, cwd=home)
    assert out.returncode == 2
    assert "folder does not apply to pop3 connections (it has no folders)" in out.stderr


def test_pop3_keep_is_default_and_resumes_by_uidl(home: Path, dovecot, mailbox, pop3_conn: str) -> None:
    """Messages stay on the server (keep) and a second pass fetches only what is new."""
    sent = [dovecot.generate_message(i) for i in range(30)]
    dovecot.deliver_many(mailbox.user, sent)
    assert _fetch(home)["stored"] == 30
    assert len(dovecot.maildir_messages(mailbox.user)) == 30
    dovecot.deliver_many(mailbox.user, [dovecot.generate_message(99)])
    report = _fetch(home)
    assert (report["listed"], report["stored"]) == (1, 1)
    assert [raw for _, raw in _queue(home)][:30] == sent


def test_pop3_delete_after_download(home: Path, dovecot, mailbox, pop3_conn: str) -> None:
    """With delete, the messages leave the server only after they are stored."""
    assert run_cli("incoming", "edit", "desk", "--after-download", "delete", env=ENV, cwd=home).returncode == 0
    dovecot.deliver_many(mailbox.user, [dovecot.generate_message(i) for i in range(25)])
    assert _fetch(home)["stored"] == 25
    assert dovecot.maildir_messages(mailbox.user) == []
    assert len(_queue(home)) == 25


@pytest.mark.slow
@pytest.mark.parametrize("action", ["keep", "delete"])
def test_pop3_sigkill_mid_download_exactly_once(home: Path, dovecot, mailbox, pop3_conn: str, action: str) -> None:
    """`mailhost fetch` over POP3 killed at random instants: each message stored exactly once."""
    assert run_cli("incoming", "edit", "desk", "--after-download", action, env=ENV, cwd=home).returncode == 0
    rng = random.Random(4 if action == "keep" else 5)
    sent = [dovecot.generate_message(i, size=rng.randint(2000, 4000)) for i in range(3000)]
    dovecot.deliver_many(mailbox.user, sent)
    kills = 0
    for _ in range(10):
        proc = subprocess.Popen([sys.executable, "-m", "mailhost", "fetch", "desk"], cwd=home,
                                env={**os.environ, **ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kills += kill_mid_pass(proc, home, rng)
        proc.wait()
    _fetch(home)
    assert kills >= 3
    ids = Counter(m for m, _ in _queue(home))
    assert set(ids) == {_mid(m) for m in sent}
    assert max(ids.values()) == 1
    left = len(dovecot.maildir_messages(mailbox.user))
    assert left == (3000 if action == "keep" else 0)


def test_pop3_uidl_change_does_not_duplicate(home: Path, dovecot, mailbox, pop3_conn: str) -> None:
    """A server that changes its UIDLs (renumbered mailbox) causes no duplicates."""
    dovecot.deliver_many(mailbox.user, [dovecot.generate_message(i) for i in range(10)])
    assert _fetch(home)["stored"] == 10
    dovecot.reset_uidvalidity(mailbox.user)  # Dovecot's POP3 UIDLs derive from UIDVALIDITY and UID
    report = _fetch(home)
    assert (report["listed"], report["stored"], report["duplicates"]) == (10, 0, 10)  # new UIDLs, same content
    assert len(_queue(home)) == 10


def test_imap_and_pop3_tests_name_their_steps_alike(home: Path, dovecot, mailbox) -> None:
    """`incoming test --json` names the shared steps the same for every protocol (dns, tcp,
    tls, authentication, as the host's own connect and plugin steps), so that a script
    can look for "tls" without knowing which plugin answered."""
    env = {"MAILHOST_LOAD_PLUGINS": "imap,pop3", "PW": mailbox.password}
    steps = {}
    for protocol, port in (("imap", dovecot.imaps_port), ("pop3", dovecot.pop3s_port)):
        out = run_cli("incoming", "test", "--protocol", protocol, "--host", "localhost", "--port", str(port),
                      "--encryption", "ssl", "--username", mailbox.user, "--password-env", "PW",
                      "--ca-file", dovecot.ca_file, "--json", env=env, cwd=home)
        assert out.returncode == 0, out.stderr
        steps[protocol] = [step["step"] for step in json.loads(out.stdout)]
    assert steps["imap"][:4] == steps["pop3"][:4] == ["dns", "tcp", "tls", "authentication"], steps
