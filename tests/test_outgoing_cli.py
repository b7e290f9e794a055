"""``mailhost send``, ``deliver``, ``queue outgoing``, ``outgoing test``/``test-email``,
run as an admin runs them (subprocesses), against a real SMTP server."""
from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from mailhost import Direction, Mailhost
from mailhost.connections import ConnectionSpec

from tests.helpers import run_cli
from tests.servers.smtpd import SmtpServer

USER = "app@example.org"
PASSWORD = "Tr0ub4dor&3-ünïcode"


def add(mh: Mailhost, name: str, server: SmtpServer, **kw: object) -> None:
    mh.connections.add(Direction.OUTGOING, ConnectionSpec(name=name, protocol="smtp", host="127.0.0.1",
                                                          port=server.port, encryption="none", **kw))  # type: ignore[arg-type]


def test_send_deliver_and_the_queue(mh: Mailhost, smtp_server: Callable[..., SmtpServer], tmp_path: Path) -> None:
    """send prints the id; deliver sends; the queue lists, shows and refuses to retry a
    sent message; delete removes one."""
    server = smtp_server("plain")
    add(mh, "main", server, from_address="a@example.org", prefix="[T]", default=True)
    (tmp_path / "body.txt").write_text("from a file\n")
    first = run_cli("send", "--to", "bob@example.org", "--subject", "one", "--body", "hi")
    assert first.returncode == 0, first.stderr
    item_id = int(first.stdout.strip())
    second = run_cli("send", "--to", "carol@example.org", "--cc", "dave@example.org", "--subject", "two",
                     "--body-file", str(tmp_path / "body.txt"), "--json")
    assert second.returncode == 0, second.stderr
    queued = json.loads(second.stdout)
    assert queued["status"] == "queued" and queued["to"] == "carol@example.org, dave@example.org"

    done = run_cli("deliver", "--json")
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout)
    assert row["connection"] == "main" and row["sent"] == 2 and row["sessions"] == 1
    assert [m.rcpt_tos for m in server.messages] == [["bob@example.org"], ["carol@example.org", "dave@example.org"]]

    listing = json.loads(run_cli("queue", "outgoing", "--json").stdout)
    assert [r["id"] for r in listing] == [queued["id"], item_id] and {r["status"] for r in listing} == {"sent"}
    assert len(json.loads(run_cli("queue", "outgoing", "--json", "--limit", "1").stdout)) == 1
    assert json.loads(run_cli("queue", "outgoing", "--status", "failed", "--json").stdout) == []

    shown = json.loads(run_cli("queue", "outgoing", "show", str(item_id), "--json").stdout)
    assert shown["sent_via"] == "main" and [a["result"] for a in shown["attempts_log"]] == ["sent"]
    raw = run_cli("queue", "outgoing", "show", str(item_id), "--raw")
    assert "Subject: one" in raw.stdout  # as queued: the prefix is added on the way out
    text = run_cli("queue", "outgoing", "show", str(item_id))
    assert "bob@example.org: accepted" in text.stdout and "attempts:" in text.stdout

    again = run_cli("queue", "outgoing", "retry", str(item_id))
    assert again.returncode == 2 and "delivered to every recipient" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    gone = run_cli("queue", "outgoing", "delete", str(item_id))
    assert gone.returncode == 0
    missing = run_cli("queue", "outgoing", "show", str(item_id))
    assert missing.returncode == 2 and f"no outgoing queue item {item_id}" in missing.stderr


def test_one_address_per_option(mh: Mailhost, smtp_server: Callable[..., SmtpServer]) -> None:
    """An option holding several addresses (a list, a name that is an address, a group)
    would send to the first and name them all in the header: refused, exit 2, nothing
    queued or stored."""
    add(mh, "main", smtp_server("plain"), from_address="a@example.org", default=True)
    mail = ["--subject", "x", "--body", "y"]
    for args, option in ((["send", "--to", "a@y.org, c@y.org", *mail], "--to"),
                         (["send", "--to", "a@y.org <c@y.org>", *mail], "--to"),
                         (["send", "--to", "b@y.org", "--cc", "a@y.org;c@y.org", *mail], "--cc"),
                         (["send", "--to", "G: a@y.org, c@y.org;", *mail], "--to"),
                         (["outgoing", "test-email", "main", "--to", "a@y.org, c@y.org"], "--to"),
                         (["outgoing", "add", "two", "--protocol", "smtp", "--host", "h.example.org",
                           "--from", "a@b.c, d@e.f"], "--from"),
                         (["outgoing", "edit", "main", "--from", "a@b.c <d@e.f>"], "--from")):
        done = run_cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert f"holds 2 addresses: give one address per {option}" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert mh.outgoing.items() == []
    assert [(c.name, c.from_address) for c in mh.connections.list(Direction.OUTGOING)] == [("main", "a@example.org")]


@pytest.mark.parametrize("args, words", [
    (["--to", "bob", "--subject", "x", "--body", "y"], "is not an email address"),
    (["--to", "bob@example.org", "--subject", "x", "--body", "y", "--eml", "/etc/hostname"], "one way"),
    (["--to", "bob@example.org", "--body", "y"], "no subject"),
    (["--to", "bob@example.org", "--subject", "x", "--body", "y", "--attach", "/nonexistent/f.pdf"], "cannot attach"),
    (["--to", "bob@example.org", "--subject", "x", "--body", "y", "--connection", "nope"], "no outgoing connection"),
    (["--to", "bob@example.org", "--subject", "x", "--body-file", "/nonexistent/body.txt"], "cannot read"),
])
def test_send_refuses_bad_input(mh: Mailhost, smtp_server: Callable[..., SmtpServer], args: list[str],
                                words: str) -> None:
    """Bad input: one sentence on stderr, exit status 2, nothing queued."""
    add(mh, "main", smtp_server("plain"), from_address="a@example.org", default=True)
    done = run_cli("send", *args)
    assert done.returncode == 2, done.stderr
    assert words in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert done.stdout == "" and mh.outgoing.items() == []


def test_queue_outgoing_unknown_connection_is_bad_input(mh: Mailhost, smtp_server: Callable[..., SmtpServer]) -> None:
    """`queue outgoing --connection` with a name that is neither a connection nor in the
    queue exits 2 naming it; a connection with nothing queued lists nothing."""
    add(mh, "main", smtp_server("plain"), from_address="a@example.org", default=True)
    assert run_cli("send", "--to", "bob@example.org", "--subject", "x", "--body", "y",
                   "--connection", "main").returncode == 0
    for extra in ((), ("--json",)):
        done = run_cli("queue", "outgoing", "--connection", "mian", *extra)
        assert done.returncode == 2 and done.stdout == "", done.stderr
        assert "no outgoing connection named 'mian'" in done.stderr and done.stderr.count("\n") == 1
    done = run_cli("queue", "outgoing", "--connection", "main", "--json")
    assert done.returncode == 0 and len(json.loads(done.stdout)) == 1
    mh.connections.remove(Direction.OUTGOING, "main")
    done = run_cli("queue", "outgoing", "--connection", "main", "--json")  # its queued mail, still listed
    assert done.returncode == 0 and len(json.loads(done.stdout)) == 1, done.stderr


def test_send_too_large_is_refused(mh: Mailhost, smtp_server: Callable[..., SmtpServer], tmp_path: Path) -> None:
    """Larger than the connection's size limit: exit 2 naming the limit and the fix; nothing queued."""
    add(mh, "main", smtp_server("plain"), from_address="a@example.org", size_limit=1000, default=True)
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8" + b"\x00" * 2000)
    done = run_cli("send", "--to", "bob@example.org", "--subject", "photo", "--body", "see",
                   "--attach", str(tmp_path / "photo.jpg"))
    assert done.returncode == 2
    assert "size limit of 1000 bytes of outgoing connection main" in done.stderr and "--size-limit" in done.stderr
    assert mh.outgoing.items() == []


def test_send_without_a_default_connection(mh: Mailhost) -> None:
    """No --connection and no default: exit 2 saying how to choose one."""
    done = run_cli("send", "--to", "bob@example.org", "--subject", "x", "--body", "y")
    assert done.returncode == 2 and "set-default" in done.stderr


def test_the_queue_shows_the_from_a_connection_gives(mh: Mailhost, smtp_server: Callable[..., SmtpServer]) -> None:
    """A message sent without --from gets its connection's From: the queue shows that one
    while it waits, not null, and once sent the one it went out with: the default
    connection's when that delivered it as a fallback."""
    default, own = smtp_server("plain"), smtp_server("plain")
    add(mh, "main", default, from_address="Desk <desk@example.org>", default=True)
    add(mh, "branch", own, from_address="branch@example.org", fallback_to_default=True)
    send = ("send", "--to", "bob@example.org", "--subject", "s", "--body", "b", "--json")
    first = run_cli(*send)
    assert first.returncode == 0 and json.loads(first.stdout)["from"] == "Desk <desk@example.org>", first.stderr
    assert run_cli(*send, "--connection", "branch").returncode == 0
    waiting = json.loads(run_cli("queue", "outgoing", "--json").stdout)
    assert [r["from"] for r in waiting] == ["branch@example.org", "Desk <desk@example.org>"], waiting
    own.fail_next_data(1, 451)
    assert run_cli("deliver").returncode == 0
    done = json.loads(run_cli("queue", "outgoing", "--json").stdout)
    assert [(r["from"], r["sent_via"], r["fell_back"]) for r in done] == [
        ("Desk <desk@example.org>", "main", True), ("Desk <desk@example.org>", "main", False)], done
    assert [m.data.count(b"From: ") for m in default.messages] == [1, 1]
    assert all(b"From: Desk <desk@example.org>\r\n" in m.data for m in default.messages)
    assert "from             Desk <desk@example.org>" in run_cli("queue", "outgoing", "show", str(done[0]["id"])).stdout


def test_deliver_with_nothing_due(mh: Mailhost) -> None:
    """An empty queue: nothing to do, exit 0, an empty JSON list."""
    done = run_cli("deliver", "--json")
    assert done.returncode == 0 and json.loads(done.stdout) == []


def _secret_forms() -> list[bytes]:
    raw = PASSWORD.encode()
    forms = [raw, base64.b64encode(raw), base64.b64encode(b"\0" + USER.encode() + b"\0" + raw)]
    # The password's base64 inside SASL PLAIN at each alignment.
    for pad in (b"\0", b"\0\0"):
        forms.append(base64.b64encode(pad + raw)[4:-4])
    return forms


def test_secrets_never_leak(home: Path, mh: Mailhost, smtp_server: Callable[..., SmtpServer]) -> None:
    """Debug on, AUTH PLAIN over STARTTLS: the connection test, the test email's
    transcript, the delivery log and the store hold neither the password nor its base64."""
    server = smtp_server("starttls", users={USER: PASSWORD})
    env = {"SMTP_PW": PASSWORD}
    added = run_cli("outgoing", "add", "main", "--protocol", "smtp", "--host", "127.0.0.1", "--port", str(server.port),
                    "--encryption", "starttls", "--ca-file", str(server.ca_file), "--username", USER,
                    "--password-env", "SMTP_PW", "--from", f"App <{USER}>", "--debug", "--default", env=env)
    assert added.returncode == 0, added.stderr
    outputs = []
    tested = run_cli("outgoing", "test", "main")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert [line.split()[1] for line in tested.stdout.splitlines()] == ["connect", "tls", "ehlo", "auth", "mail",
                                                                        "rcpt", "rset"]
    outputs.append(tested.stdout + tested.stderr)
    mail = run_cli("outgoing", "test-email", "main", "--to", "bob@example.org")
    assert mail.returncode == 0, mail.stderr
    assert "C: AUTH PLAIN ********" in mail.stdout and "S: 235" in mail.stdout and "S: 250" in mail.stdout
    outputs.append(mail.stdout + mail.stderr)
    run_cli("send", "--to", "carol@example.org", "--subject", "logged", "--body", "x")
    delivered = run_cli("-vv", "deliver")
    assert delivered.returncode == 0, delivered.stderr
    assert "mailhost.transcript.main" in delivered.stderr and "AUTH PLAIN ********" in delivered.stderr
    outputs.append(delivered.stdout + delivered.stderr)
    assert len(server.messages) == 2 and all(m.auth_login == USER for m in server.messages)
    store = b"".join(p.read_bytes() for p in home.iterdir() if p.name.startswith("mailhost.db"))
    for form in _secret_forms():
        for text in outputs:
            assert form.decode() not in text
        assert form not in store


def test_test_email_failure_exits_1(mh: Mailhost, smtp_server: Callable[..., SmtpServer]) -> None:
    """A refused test message: the transcript, then one sentence and exit status 1."""
    add(mh, "main", smtp_server("plain"), from_address="a@example.org")
    done = run_cli("outgoing", "test-email", "main", "--to", "reject@example.org")
    assert done.returncode == 1
    assert "S: 550" in done.stdout and "was not delivered" in done.stderr


def test_values_beyond_their_columns_are_refused(mh_any: Mailhost, tmp_path: Path) -> None:
    """A size limit larger than its column holds, or an .eml whose Message-ID is longer
    than its column: one sentence and exit 2 on either store, nothing written; a long
    subject fits its column and is queued."""
    big = ["--protocol", "smtp", "--host", "h.example.org", "--from", "a@example.org"]
    for value in ("3000000000", "9223372036854775808", "-1"):
        done = run_cli("outgoing", "add", "big", *big, "--size-limit", value)
        assert done.returncode == 2, done.stderr
        assert f"size limit {value} is not valid: use 0-2147483647 bytes" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert run_cli("outgoing", "add", "main", *big, "--size-limit", "2147483647", "--default").returncode == 0
    edit = run_cli("outgoing", "edit", "main", "--size-limit", "3000000000")
    assert edit.returncode == 2 and "size limit 3000000000 is not valid" in edit.stderr
    assert [c.size_limit for c in mh_any.connections.list(Direction.OUTGOING)] == [2147483647]

    eml = tmp_path / "long.eml"
    eml.write_bytes(b"From: a@example.org\r\nTo: b@example.org\r\nSubject: long\r\nMessage-ID: <"
                    + b"x" * 1200 + b"@example.org>\r\n\r\nbody\r\n")
    done = run_cli("send", "--eml", str(eml))
    assert done.returncode == 2, done.stderr
    assert f"{eml}: the message id is 1214 characters long: use at most 1000" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and mh_any.outgoing.items() == []
    subject = "s" * 5000
    done = run_cli("send", "--to", "b@example.org", "--subject", subject, "--body", "y", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["subject"] == subject


def test_lines_longer_than_smtp_allows_are_refused(mh: Mailhost, smtp_server: Callable[..., SmtpServer],
                                                   tmp_path: Path) -> None:
    """A line over 998 octets (RFC 5321 4.5.3.1.6), in an .eml or in a header an option
    makes, would be refused or broken by the server after queueing: exit 2 naming it,
    nothing queued. A composed message's long body is encoded, and goes."""
    server = smtp_server("plain")
    add(mh, "main", server, from_address="a@example.org", default=True)
    eml = tmp_path / "wide.eml"
    eml.write_bytes(b"From: a@example.org\nTo: b@example.org\nSubject: wide\n\nshort\n" + b"y" * 999 + b"\n")
    for args, words in ((["--eml", str(eml)], f"{eml} has a line of 999 octets ('yyyyyyyy"),
                        (["--to", "N" * 1000 + " <b@example.org>", "--subject", "x", "--body", "y"],
                         "the message has a line of 1020 octets ('To: NNNNN")):
        done = run_cli("send", *args)
        assert done.returncode == 2, done.stderr
        assert words in done.stderr and "more than the 998 octets SMTP allows" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert mh.outgoing.items() == []
    done = run_cli("send", "--to", "b@example.org", "--subject", "x", "--body", "z" * 5000)
    assert done.returncode == 0, done.stderr
    assert run_cli("deliver").returncode == 0
    (got,) = server.messages
    assert max(len(line) for line in got.data.split(b"\r\n")) <= 998


def test_line_breaks_in_a_subject_or_file_name_are_refused(mh: Mailhost, smtp_server: Callable[..., SmtpServer],
                                                           tmp_path: Path) -> None:
    """Any line break or control character Python's email package would split a header on
    (VT, FF, NEL, U+2028...) in --subject, or in an attached file's name: one sentence and
    exit 2, not an unexpected error; so is a file name that is not UTF-8. Nothing queued.
    A non-ASCII name goes (RFC 2231)."""
    add(mh, "main", smtp_server("plain"), from_address="a@example.org", default=True)
    mail = ["--to", "b@example.org", "--body", "y"]
    for bad in ("\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\x1b"):
        done = run_cli("send", *mail, "--subject", f"x{bad}Bcc: evil@example.org")
        assert done.returncode == 2, (repr(bad), done.stderr)
        assert "the subject contains a line break or control character" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    odd = tmp_path / "a\nBcc: evil@example.org.txt"
    odd.write_bytes(b"x")
    done = run_cli("send", *mail, "--subject", "x", "--attach", str(odd))
    assert done.returncode == 2, done.stderr
    assert "cannot attach" in done.stderr and "the file name contains a line break" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    latin1 = tmp_path / os.fsdecode(b"\xe9t\xe9.txt")  # a name from a Latin-1 system: not UTF-8
    latin1.write_bytes(b"x")
    done = run_cli("send", *mail, "--subject", "x", "--attach", str(latin1))
    assert done.returncode == 2, done.stderr
    assert "cannot attach" in done.stderr and "name is not UTF-8: rename the file" in done.stderr
    assert mh.outgoing.items() == []
    fine = tmp_path / "Résumé 2026.pdf"
    fine.write_bytes(b"%PDF")
    done = run_cli("send", *mail, "--subject", "x", "--attach", str(fine))
    assert done.returncode == 0, done.stderr
    assert b"filename*=utf-8''R%C3%A9sum%C3%A9%202026.pdf" in mh.outgoing.item(int(done.stdout)).raw
