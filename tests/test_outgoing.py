"""The outgoing pipeline against real SMTP servers (aiosmtpd): queue, deliver, retry,
fall back, record. Time never passes in these tests: the pipeline's clock is moved."""
from __future__ import annotations

import contextlib
import datetime as dt
import email
import email.policy
import json
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mailhost import Direction, Mailhost, NotFound, ValidationError, hookimpl
from mailhost.connections import ConnectionSpec
from mailhost.outgoing import Outgoing, Policy, item_dict, personalize
from mailhost.plugins import PluginHost
from mailhost.store import OutgoingItem, utcnow

from tests.helpers import as_installed, outbox_subjects
from tests.servers.certs import Pki
from tests.servers.scripted_smtp import scripted_server
from tests.servers.smtpd import ReceivedMessage, SmtpServer

BODY = "Hello,\nthis is a test.\n"


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def add(mh: Mailhost, name: str, server: SmtpServer | None, *, encryption: str = "none", port: int | None = None,
        **kw: Any) -> None:
    """Add an outgoing SMTP connection to ``server`` (or to ``port`` on 127.0.0.1)."""
    spec = ConnectionSpec(name=name, protocol="smtp", host="127.0.0.1", port=port or (server.port if server else None),
                          encryption=encryption, **kw)
    if server is not None and encryption != "none" and spec.ca_file is None:
        spec.ca_file = server.ca_file
    mh.connections.add(Direction.OUTGOING, spec)


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port on 127.0.0.1 that takes connections and never says a word."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield int(s.getsockname()[1])


def later(mh: Mailhost, **delta: float) -> None:
    """Move the pipeline's clock forward (instead of waiting)."""
    mh.outgoing.clock = lambda: utcnow() + dt.timedelta(**delta)


def policy(mh: Mailhost, **kw: Any) -> None:
    """Replace the ``[outgoing]`` policy of ``mh``."""
    mh.outgoing.__dict__["_policy"] = Policy(**kw)


def item(mh: Mailhost, item_id: int) -> dict[str, Any]:
    """A queue item as JSON, with its attempts."""
    return item_dict(mh.outgoing.item(item_id), with_attempts=True)


def parsed(m: ReceivedMessage) -> email.message.EmailMessage:
    return email.message_from_bytes(m.data, policy=email.policy.default)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------
# delivery
# ---------------------------------------------------------------------------------------


def test_delivers_with_prefix_and_from(mh: Mailhost, smtp_server: Callable[..., SmtpServer]) -> None:
    """The connection's prefix goes in front of each subject; its From is used unless the
    message has its own; the envelope sender is the connection's address."""
    server = smtp_server("plain")
    add(mh, "main", server, from_address="Helpdesk <help@example.org>", prefix="[HELP]", default=True)
    a = mh.outgoing.send(["bob@example.org"], subject="Grüße aus Köln", body=BODY)
    b = mh.outgoing.send(["carol@example.org"], subject="own   sender", body=BODY,
                         from_address="Alice <alice@example.org>")
    report = mh.outgoing.deliver()
    assert report.connections["main"].sent == 2
    got = {m.rcpt_tos[0]: m for m in server.messages}
    first, second = parsed(got["bob@example.org"]), parsed(got["carol@example.org"])
    assert first["Subject"] == "[HELP] Grüße aus Köln" and first["From"] == "Helpdesk <help@example.org>"
    assert second["Subject"] == "[HELP] own   sender" and second["From"] == "Alice <alice@example.org>"
    assert {m.mail_from for m in server.messages} == {"help@example.org"}
    for queued in (a, b):
        record = item(mh, queued.id)
        assert record["status"] == "sent" and record["sent_via"] == "main" and record["attempts"] == 1
        assert [x["result"] for x in record["attempts_log"]] == ["sent"]
        assert record["attempts_log"][0]["detail"].startswith("250")
    assert first["Message-ID"] == mh.outgoing.item(a.id).message_id  # stable from queue to wire


def test_renamed_connection_keeps_its_queue(mh: Mailhost, smtp_server: Callable[..., SmtpServer]) -> None:
    """Queued mail is routed by connection name: renamed, the connection still sends it,
    and its history is listed under the new name."""
    server = smtp_server("plain")
    add(mh, "main", server, from_address="help@example.org")
    sent = mh.outgoing.send(["bob@example.org"], connection="main", subject="before", body=BODY)
    assert mh.outgoing.deliver().connections["main"].sent == 1
    queued = mh.outgoing.send(["carol@example.org"], connection="main", subject="queued", body=BODY)
    mh.connections.edit(Direction.OUTGOING, "main", ConnectionSpec(name="desk"))
    assert mh.outgoing.deliver().connections["desk"].sent == 1
    assert {i.id for i in mh.outgoing.items(connection="desk")} == {sent.id, queued.id}
    assert item(mh, queued.id)["sent_via"] == "desk" and len(server.messages) == 2


def test_one_session_carries_many_messages(mh: Mailhost, smtp_server: Callable[..., SmtpServer]) -> None:
    """A pass reuses one SMTP session for every message of a connection."""
    server = smtp_server("plain")
    add(mh, "main", server, from_address="a@example.org", default=True)
    for n in range(30):
        mh.outgoing.send([f"r{n}@example.org"], subject=f"n{n}", body=BODY)
    report = mh.outgoing.deliver(sessions=1)
    assert report.connections["main"].sent == 30 and report.connections["main"].sessions == 1
    assert len(server.messages) == 30 and server.sessions_opened == 1


def test_long_queue_gets_parallel_sessions(mh: Mailhost, smtp_server: Callable[..., SmtpServer]) -> None:
    """More sessions when the queue is long (one per 20 due messages here, at most 4);
    still every message exactly once."""
    server = smtp_server("plain", slow_data_seconds=0.02)  # so that every worker finds work
    add(mh, "main", server, from_address="a@example.org", default=True)
    policy(mh, per_session=20, batch=5)
    ids = [mh.outgoing.send([f"r{n}@example.org"], subject=f"n{n}", body=BODY).id for n in range(100)]
    report = mh.outgoing.deliver(sessions=4)
    assert report.connections["main"].sessions == 4 and server.sessions_opened == 4
    counts = Counter(parsed(m)["Message-ID"] for m in server.messages)
    assert len(counts) == 100 and set(counts.values()) == {1}
    assert {mh.outgoing.item(i).status for i in ids} == {"sent"}
    mh.outgoing.send(["one@example.org"], subject="alone", body=BODY)
    assert mh.outgoing.deliver(sessions=4).connections["main"].sessions == 1  # a short queue: one


def test_temporary_failure_is_retried_then_delivered(mh: Mailhost, smtp_server: Callable[..., SmtpServer]) -> None:
    """A 4xx: queued again with attempts, next_attempt_at and last_error; not before
    it is due; delivered on a later pass."""
    server = smtp_server("plain")
    add(mh, "main", server, from_address="a@example.org", default=True)
    queued = mh.outgoing.send(["bob@example.org"], subject="retry me", body=BODY)
    server.fail_next_data(1, 451)
    report = mh.outgoing.deliver()
    assert report.connections["main"].retrying == 1
    record = item(mh, queued.id)
    assert record["status"] == "queued" and record["attempts"] == 1
    assert "451" in record["last_error"] and record["next_attempt_at"] > utcnow()
    assert mh.outgoing.deliver().connections == {}  # not due yet
    later(mh, hours=2)
    assert mh.outgoing.deliver().connections["main"].sent == 1
    record = item(mh, queued.id)
    assert record["status"] == "sent" and record["attempts"] == 2 and record["last_error"] is None
    assert [a["result"] for a in record["attempts_log"]] == ["temporary", "sent"]
    assert len(server.messages) == 1


def test_backoff_is_exponential_with_jitter_and_capped() -> None:
    """Delays double from the base, stay within [half, full], stop at the cap, and
    respect a delay the server asked for."""
    p = Policy(retry_base=60, retry_max=3600)
    for n in range(1, 12):
        full = min(3600, 60 * 2 ** (n - 1))
        for _ in range(20):
            assert full / 2 <= p.backoff(n) <= full
    assert p.backoff(1, retry_after=900) == 900


def test_policy_from_config() -> None:
    """[outgoing] in the config file; a wrong value names the key."""
    p = Policy.from_config({"outgoing": {"max_attempts": 3, "retry_base_seconds": 5, "keep_sent_days": 0}})
    assert p.max_attempts == 3 and p.retry_base == 5 and p.keep_sent is None
    from mailhost import ConfigError

    with pytest.raises(ConfigError, match="max_attempts"):
        Policy.from_config({"outgoing": {"max_attempts": 0}})
    with pytest.raises(ConfigError, match="unknown keys"):
        Policy.from_config({"outgoing": {"retries": 3}})


def test_gives_up_after_the_attempt_limit(mh: Mailhost, smtp_server: Callable[..., SmtpServer]) -> None:
    """After max_attempts temporary failures the message is failed, and says why."""
    server = smtp_server("plain")
    add(mh, "main", server, from_address="a@example.org", default=True)
    policy(mh, max_attempts=2)
    queued = mh.outgoing.send(["tempfail@example.org"], subject="never", body=BODY)
    mh.outgoing.deliver()
    later(mh, hours=3)
    mh.outgoing.deliver()
    record = item(mh, queued.id)
    assert record["status"] == "failed" and record["attempts"] == 2
    assert record["last_error"].startswith("gave up after 2 attempt(s)") and "451" in record["last_error"]


def test_gives_up_after_the_age_limit(mh: Mailhost, smtp_server: Callable[..., SmtpServer]) -> None:
    """A message older than max_age fails at its next temporary failure."""
    server = smtp_server("plain")
    add(mh, "main", server, from_address="a@example.org", default=True)
    policy(mh, max_age=dt.timedelta(hours=1))
    queued = mh.outgoing.send(["tempfail@example.org"], subject="old", body=BODY)
    later(mh, hours=2)
    mh.outgoing.deliver()
    record = item(mh, queued.id)
    assert record["status"] == "failed" and "gave up after 1 attempt(s) over" in record["last_error"]


def test_permanent_failure_fails_at_once(mh: Mailhost, smtp_server: Callable[..., SmtpServer]) -> None:
    """A 5xx: failed after one attempt, with the server's words."""
    server = smtp_server("plain")
    add(mh, "main", server, from_address="a@example.org", default=True)
    queued = mh.outgoing.send(["bob@example.org"], subject="spam?", body=BODY)
    server.fail_next_data(1, 554, "message looks like spam (test)")
    assert mh.outgoing.deliver().connections["main"].failed == 1
    record = item(mh, queued.id)
    assert record["status"] == "failed" and record["attempts"] == 1
    assert "554" in record["last_error"] and "message looks like spam (test)" in record["last_error"]
    later(mh, days=1)
    assert mh.outgoing.deliver().connections == {}
    assert server.messages == []


def test_partial_acceptance_is_recorded_per_recipient(mh: Mailhost, smtp_server: Callable[..., SmtpServer]) -> None:
    """Accepted, refused for good (5xx) and refused for now (4xx) recipients are kept
    apart; only the 4xx ones are tried again, and nobody gets the message twice."""
    server = smtp_server("plain")
    add(mh, "main", server, from_address="a@example.org", default=True)
    policy(mh, max_attempts=2)
    queued = mh.outgoing.send(["ok@example.org", "reject@example.org", "tempfail@example.org"],
                              subject="partial", body=BODY)
    assert mh.outgoing.deliver().connections["main"].partial == 1
    record = item(mh, queued.id)
    assert record["status"] == "queued"
    assert {r["address"]: r["status"] for r in record["recipients"]} == {
        "ok@example.org": "accepted", "reject@example.org": "refused", "tempfail@example.org": "pending"}
    later(mh, hours=3)
    mh.outgoing.deliver()
    record = item(mh, queued.id)
    assert record["status"] == "sent" and record["attempts"] == 2  # delivered to some: sent, with refusals
    assert {r["address"]: (r["status"], r["reply"]) for r in record["recipients"]} == {
        "ok@example.org": ("accepted", None),
        "reject@example.org": ("refused", "550 5.1.1 no such user"),
        "tempfail@example.org": ("refused", "451 4.3.0 try again later"),
    }
    assert [m.rcpt_tos for m in server.messages] == [["ok@example.org"]]
    assert [a["result"] for a in record["attempts_log"]] == ["partial", "temporary"]
    assert record["attempts_log"][1]["refused"] == {"tempfail@example.org": "451 4.3.0 try again later"}


def test_too_many_recipients_are_tried_again(mh: Mailhost, smtp_server: Callable[..., SmtpServer]) -> None:
    """A server that takes two recipients per transaction answers the third RCPT with
    552: the message goes to the first two, waits, and then goes to the third; no
    recipient is refused for good, and nobody gets it twice."""
    server = smtp_server("plain", max_recipients=2)
    add(mh, "main", server, from_address="a@example.org", default=True)
    queued = mh.outgoing.send(["r1@example.org", "r2@example.org", "r3@example.org"], subject="many", body=BODY)
    mh.outgoing.deliver()
    record = item(mh, queued.id)
    assert record["status"] == "queued"
    assert [r["status"] for r in record["recipients"]] == ["accepted", "accepted", "pending"]
    later(mh, hours=3)
    mh.outgoing.deliver()
    record = item(mh, queued.id)
    assert record["status"] == "sent" and [r["status"] for r in record["recipients"]] == ["accepted"] * 3
    assert [m.rcpt_tos for m in server.messages] == [["r1@example.org", "r2@example.org"], ["r3@example.org"]]
    # The queue records the connection's From once sent to some: the rest get it too.
    assert [parsed(m).get_all("From") for m in server.messages] == [["a@example.org"]] * 2


@pytest.mark.parametrize("code", [554, 451])
def test_recipients_refused_before_a_failed_message_are_kept(mh: Mailhost, smtp_server: Callable[..., SmtpServer],
                                                            code: int) -> None:
    """RCPT refused one recipient for good and took the other, then the server refused the
    message itself (a 5xx, or a 4xx to the final dot): the record keeps which recipient was
    refused and the server's words for it, and a retry does not ask for it again."""
    server = smtp_server("plain")
    add(mh, "main", server, from_address="a@example.org", default=True)
    queued = mh.outgoing.send(["ok@example.org", "reject@example.org"], subject="refused", body=BODY)
    server.fail_next_data(1, code)
    mh.outgoing.deliver()
    record = item(mh, queued.id)
    assert record["status"] == ("failed" if code == 554 else "queued") and str(code) in record["last_error"]
    assert {r["address"]: (r["status"], r["reply"]) for r in record["recipients"]} == {
        "ok@example.org": ("refused" if code == 554 else "pending", None),
        "reject@example.org": ("refused", "550 5.1.1 no such user")}
    assert record["attempts_log"][0]["refused"] == {"reject@example.org": "550 5.1.1 no such user"}
    if code == 451:
        later(mh, hours=3)
        mh.outgoing.deliver()
        record = item(mh, queued.id)
        assert record["status"] == "sent" and [m.rcpt_tos for m in server.messages] == [["ok@example.org"]]
        assert {r["address"]: r["status"] for r in record["recipients"]} == {
            "ok@example.org": "accepted", "reject@example.org": "refused"}
        assert record["attempts_log"][1]["refused"] is None  # not asked again


def test_an_unreadable_ehlo_on_a_reopened_session_is_retried(mh: Mailhost) -> None:
    """The server closes an idle session (421 to the next MAIL) and, opened again, answers
    EHLO with a line longer than smtplib reads: the message waits for a retry, with an
    error naming the connection and its server; it was failed for good ('refused the
    session (500 Line too long)', smtplib's words, not the server's)."""
    links: list[bytes] = []
    mails: list[bytes] = []

    def answer(line: bytes) -> bytes | None:
        verb = line.split()[0].upper()
        if verb == b"EHLO":
            links.append(line)
            return b"250 scripted\r\n" if len(links) == 1 else b"250-" + b"x" * 9000 + b"\r\n250 SIZE 1000\r\n"
        if verb == b"MAIL":
            mails.append(line)
            return b"250 ok\r\n" if len(mails) == 1 else b"421 4.3.2 closing idle sessions\r\n"
        return {b"DATA": b"354 go\r\n", b"<MESSAGE>": b"250 kept\r\n"}.get(verb, b"250 ok\r\n")

    port, thread, _ = scripted_server(answer, connections=2)
    add(mh, "main", None, port=port, from_address="a@example.org", default=True)
    first = mh.outgoing.send(["b@example.org"], subject="first", body=BODY)
    second = mh.outgoing.send(["b@example.org"], subject="second", body=BODY)
    mh.outgoing.deliver(sessions=1)
    thread.join(10)
    assert item(mh, first.id)["status"] == "sent"
    record = item(mh, second.id)
    assert record["status"] == "queued" and record["attempts_log"][0]["result"] == "temporary", record
    assert f"main (127.0.0.1:{port})" in record["last_error"] and "could not be read" in record["last_error"]
    assert "500" not in record["last_error"] and len(links) == 2


def test_falls_back_to_the_default_connection(mh: Mailhost, smtp_server: Callable[..., SmtpServer]) -> None:
    """A connection that cannot be reached hands its mail to the default one, and the
    record says so; the default's From is used, as its server signs for it."""
    default = smtp_server("plain")
    add(mh, "main", default, from_address="main@example.org", default=True)
    add(mh, "branch", None, port=closed_port(), from_address="branch@example.org", fallback_to_default=True)
    queued = mh.outgoing.send(["bob@example.org"], subject="via branch", body=BODY, connection="branch")
    report = mh.outgoing.deliver()
    assert report.connections["branch"].fell_back == 1 and report.connections["branch"].sent == 1
    assert "connection refused" in (report.connections["branch"].error or "")
    record = item(mh, queued.id)
    assert record["status"] == "sent" and record["sent_via"] == "main" and record["fell_back"] is True
    assert [(a["connection"], a["result"]) for a in record["attempts_log"]] == [("branch", "temporary"),
                                                                               ("main", "sent")]
    assert "connection refused" in record["attempts_log"][0]["detail"]
    assert [m.mail_from for m in default.messages] == ["main@example.org"]


def test_falls_back_on_4xx_but_not_on_5xx(mh: Mailhost, smtp_server: Callable[..., SmtpServer]) -> None:
    """A temporary refusal falls back; a permanent one fails the message where it is."""
    default, own = smtp_server("plain"), smtp_server("plain")
    add(mh, "main", default, from_address="main@example.org", default=True)
    add(mh, "branch", own, from_address="branch@example.org", fallback_to_default=True)
    temp = mh.outgoing.send(["bob@example.org"], subject="4xx", body=BODY, connection="branch")
    own.fail_next_data(1, 451)
    mh.outgoing.deliver()
    assert item(mh, temp.id)["sent_via"] == "main" and len(default.messages) == 1
    perm = mh.outgoing.send(["bob@example.org"], subject="5xx", body=BODY, connection="branch")
    own.fail_next_data(1, 550)
    mh.outgoing.deliver()
    record = item(mh, perm.id)
    assert record["status"] == "failed" and record["fell_back"] is False and len(default.messages) == 1


def test_a_fallback_refusal_leaves_the_message_to_its_own_connection(
        mh: Mailhost, smtp_server: Callable[..., SmtpServer]) -> None:
    """The default connection refuses the fallback for good (its size limit): the
    message still waits for its own connection, no recipient is marked refused, and it
    is sent once that connection is back."""
    default = smtp_server("plain")
    port = closed_port()
    add(mh, "main", default, from_address="main@example.org", default=True, size_limit=400)
    add(mh, "branch", None, port=port, from_address="branch@example.org", fallback_to_default=True)
    queued = mh.outgoing.send(["bob@example.org"], subject="big", body="x" * 300, connection="branch")
    report = mh.outgoing.deliver()
    assert report.connections["branch"].retrying == 1 and report.connections["branch"].fell_back == 0
    record = item(mh, queued.id)
    assert [(a["connection"], a["result"]) for a in record["attempts_log"]] == [("branch", "temporary"),
                                                                               ("main", "permanent")]
    assert record["status"] == "queued" and "connection refused" in record["last_error"]
    assert record["recipients"] == [{"address": "bob@example.org", "status": "pending", "reply": None}]
    back = smtp_server("plain", port=port)
    later(mh, hours=2)
    mh.outgoing.deliver()
    record = item(mh, queued.id)
    assert record["status"] == "sent" and record["sent_via"] == "branch" and record["fell_back"] is False
    assert len(back.messages) == 1 and default.messages == []


def test_falls_back_when_sign_in_fails_or_the_server_is_silent(mh: Mailhost, smtp_server: Callable[..., SmtpServer],
                                                                silent_port: int) -> None:
    """Refused credentials and a timeout before the message went out are delivery
    problems of the connection too."""
    default = smtp_server("plain")
    locked = smtp_server("starttls", users={"user@example.org": "right"})
    add(mh, "main", default, from_address="main@example.org", default=True)
    add(mh, "locked", locked, encryption="starttls", username="user@example.org", password="wrong",
        fallback_to_default=True)
    add(mh, "silent", None, port=silent_port, from_address="s@example.org", timeout=200, fallback_to_default=True)
    a = mh.outgoing.send(["bob@example.org"], subject="auth", body=BODY, connection="locked")
    b = mh.outgoing.send(["bob@example.org"], subject="timeout", body=BODY, connection="silent")
    mh.outgoing.deliver(sessions=2)
    for queued, why in ((a, "refused to sign in"), (b, "no answer within 0.2 s")):
        record = item(mh, queued.id)
        assert record["status"] == "sent" and record["sent_via"] == "main" and record["fell_back"] is True
        assert why in record["attempts_log"][0]["detail"]
    assert len(default.messages) == 2


def test_timeout_is_retried(mh: Mailhost, silent_port: int) -> None:
    """A server that does not answer in time: the message waits for a retry."""
    add(mh, "main", None, port=silent_port, from_address="a@example.org", timeout=200, default=True)
    queued = mh.outgoing.send(["bob@example.org"], subject="slow", body=BODY)
    mh.outgoing.deliver()
    record = item(mh, queued.id)
    assert record["status"] == "queued" and "no answer within 0.2 s" in record["last_error"]
    assert [a["result"] for a in record["attempts_log"]] == ["temporary"]


def test_a_slow_final_reply_is_waited_for(mh: Mailhost, smtp_server: Callable[..., SmtpServer]) -> None:
    """The reply to the final dot may come long after the connection's timeout (RFC 5321
    asks for 10 minutes): the message is sent once, not retried or handed to the default."""
    default, slow = smtp_server("plain"), smtp_server("plain", slow_data_seconds=1.0)
    add(mh, "main", default, from_address="main@example.org", default=True)
    add(mh, "slow", slow, from_address="s@example.org", timeout=200, fallback_to_default=True)
    queued = mh.outgoing.send(["bob@example.org"], subject="slow", body=BODY, connection="slow")
    mh.outgoing.deliver()
    record = item(mh, queued.id)
    assert record["status"] == "sent" and record["sent_via"] == "slow" and record["fell_back"] is False
    assert len(slow.messages) == 1 and default.messages == []


def test_an_unconfirmed_message_is_in_doubt_and_waits(mh: Mailhost, smtp_server: Callable[..., SmtpServer],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The server kept the message and dropped the link (or never answered the final
    dot): the attempt is interrupted, the message may have arrived, so it is neither
    handed to the default connection at once nor lost; it waits for a retry."""
    import mailhost_smtp._session

    default, own = smtp_server("plain"), smtp_server("plain")
    add(mh, "main", default, from_address="main@example.org", default=True)
    add(mh, "branch", own, from_address="branch@example.org", timeout=200, fallback_to_default=True)
    dropped = mh.outgoing.send(["bob@example.org"], subject="dropped", body=BODY, connection="branch")
    own.drop_next_data(1)
    mh.outgoing.deliver()
    # No reply within the wait (lowered here from RFC 5321's 10 minutes).
    monkeypatch.setattr(mailhost_smtp._session, "FINAL_REPLY_TIMEOUT", 0.2)
    own.slow_data_seconds = 1.0
    silent = mh.outgoing.send(["bob@example.org"], subject="silent", body=BODY, connection="branch")
    mh.outgoing.deliver()
    for queued, why in ((dropped, "connection broke"), (silent, "no reply within 0.2 s")):
        record = item(mh, queued.id)
        assert record["status"] == "queued" and record["fell_back"] is False, record
        assert [(a["connection"], a["result"]) for a in record["attempts_log"]] == [("branch", "interrupted")]
        assert why in record["last_error"] and "may have been delivered" in record["last_error"]
        assert record["next_attempt_at"] > record["attempts_log"][0]["at"]  # backoff, not at once
    assert default.messages == [] and own.messages[0].data.count(b"Subject: dropped") == 1  # kept, unconfirmed


def test_no_fallback_unless_asked(mh: Mailhost, smtp_server: Callable[..., SmtpServer]) -> None:
    """Without fall back to default, an unreachable connection's mail waits for a retry."""
    default = smtp_server("plain")
    add(mh, "main", default, from_address="main@example.org", default=True)
    add(mh, "branch", None, port=closed_port(), from_address="branch@example.org")
    queued = mh.outgoing.send(["bob@example.org"], subject="x", body=BODY, connection="branch")
    mh.outgoing.deliver()
    record = item(mh, queued.id)
    assert record["status"] == "queued" and "connection refused" in record["last_error"]
    assert default.messages == []


def test_size_limit_refuses_before_queueing(mh: Mailhost, smtp_server: Callable[..., SmtpServer],
                                            tmp_path: Path) -> None:
    """Larger than the connection's size limit: a ValidationError naming it; nothing queued."""
    server = smtp_server("plain")
    add(mh, "main", server, from_address="a@example.org", size_limit=2000, default=True)
    big = tmp_path / "big.bin"
    big.write_bytes(b"\x00" * 3000)
    with pytest.raises(ValidationError, match="size limit of 2000 bytes of outgoing connection main"):
        mh.outgoing.send(["bob@example.org"], subject="big", body=BODY, attachments=[big])
    assert mh.outgoing.items() == []


def test_server_size_is_learned_and_enforced(mh: Mailhost, smtp_server: Callable[..., SmtpServer],
                                             tmp_path: Path) -> None:
    """After a session told the server's SIZE, a larger message is refused at once."""
    server = smtp_server("plain", size_limit=3000)
    add(mh, "main", server, from_address="a@example.org", default=True)
    mh.outgoing.send(["bob@example.org"], subject="small", body=BODY)
    mh.outgoing.deliver()
    assert mh.connections.get(Direction.OUTGOING, "main").server_size_limit == 3000
    big = tmp_path / "big.bin"
    big.write_bytes(b"\x01" * 4000)
    with pytest.raises(ValidationError, match="accepts \\(its SIZE\\)"):
        mh.outgoing.send(["bob@example.org"], subject="big", body=BODY, attachments=[big])


def test_a_server_size_beyond_the_column_is_recorded_as_the_largest(
        mh_any: Mailhost, smtp_server: Callable[..., SmtpServer]) -> None:
    """A server announcing SIZE 5 GB (more than an INTEGER column holds on PostgreSQL)
    is recorded as the largest size the store holds, on every store."""
    server = smtp_server("plain", size_limit=5_000_000_000)
    add(mh_any, "main", server, from_address="a@example.org", default=True)
    mh_any.outgoing.send(["bob@example.org"], subject="small", body=BODY)
    mh_any.outgoing.deliver()
    assert len(server.messages) == 1
    assert mh_any.connections.get(Direction.OUTGOING, "main").server_size_limit == 2**31 - 1


def test_untrusted_certificate_is_refused(mh: Mailhost, smtp_server: Callable[..., SmtpServer], pki: Pki) -> None:
    """A server whose certificate no trusted CA signed gets nothing; the error says why."""
    server = smtp_server("tls", untrusted=True)
    add(mh, "main", server, encryption="ssl", ca_file=pki.ca_file, from_address="a@example.org", default=True)
    queued = mh.outgoing.send(["bob@example.org"], subject="x", body=BODY)
    report = mh.outgoing.deliver()
    assert "not trusted" in (report.connections["main"].error or "")
    record = item(mh, queued.id)
    assert record["status"] == "queued" and "not trusted" in record["last_error"]
    assert server.messages == []


def test_starttls_required_but_not_offered(mh: Mailhost, smtp_server: Callable[..., SmtpServer]) -> None:
    """STARTTLS chosen, the server does not offer it: nothing goes out in plain text."""
    server = smtp_server("plain")
    add(mh, "main", server, encryption="starttls", from_address="a@example.org", default=True)
    queued = mh.outgoing.send(["bob@example.org"], subject="x", body=BODY)
    mh.outgoing.deliver()
    assert "does not offer STARTTLS" in item(mh, queued.id)["last_error"]
    assert server.messages == []


def test_message_sent(home: Path, smtp_server: Callable[..., SmtpServer], tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    """message_sent is called once per accepted message, with the accepted recipients."""
    from tests.testplugin import mailhost_testplugin

    events = tmp_path / "events.jsonl"
    monkeypatch.setenv("MAILHOST_TESTPLUGIN_EVENTS", str(events))
    mh = Mailhost.open(home / "mailhost.toml",
                       plugins=PluginHost(only=["smtp"], extra=[("testplugin", mailhost_testplugin)]))
    try:
        server = smtp_server("plain")
        add(mh, "main", server, from_address="a@example.org", default=True)
        queued = mh.outgoing.send(["ok@example.org", "reject@example.org"], subject="hooked", body=BODY)
        mh.outgoing.deliver()
    finally:
        mh.close()
    sent = [json.loads(line) for line in events.read_text().splitlines()]
    assert sent == [{"event": "sent", "connection": "main", "item_id": queued.id,
                     "message_id": queued.message_id, "recipients": ["ok@example.org"]}]


# ---------------------------------------------------------------------------------------
# claiming, leases, recovery
# ---------------------------------------------------------------------------------------


def test_concurrent_passes_never_send_a_message_twice(mh_any: Mailhost,
                                                       smtp_server: Callable[..., SmtpServer]) -> None:
    """Two installations on one store deliver at the same time: each message goes once
    (PostgreSQL: FOR UPDATE SKIP LOCKED; SQLite: the atomic claiming UPDATE)."""
    server = smtp_server("plain")
    add(mh_any, "main", server, from_address="a@example.org", default=True)
    ids = [mh_any.outgoing.send([f"r{n}@example.org"], subject=f"n{n}", body=BODY).id for n in range(120)]
    hosts = [Mailhost.open(mh_any.config.path) for _ in range(2)]
    for h in hosts:
        h.outgoing.__dict__["_policy"] = Policy(batch=5, per_session=10)
    barrier = threading.Barrier(2)

    def run(h: Mailhost) -> None:
        barrier.wait()
        h.outgoing.deliver(sessions=3)

    threads = [threading.Thread(target=run, args=(h,)) for h in hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for h in hosts:
        h.close()
    counts = Counter(parsed(m)["Message-ID"] for m in server.messages)
    assert len(counts) == 120 and set(counts.values()) == {1}
    assert {mh_any.outgoing.item(i).status for i in ids} == {"sent"}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _stick(mh: Mailhost, item_id: int, owner: str, until: dt.datetime) -> None:
    with mh.session() as s:
        row = s.get(OutgoingItem, item_id)
        assert row is not None
        row.status, row.lease_owner, row.lease_until = "sending", owner, until


def test_recover_requeues_what_a_dead_worker_left(mh_any: Mailhost) -> None:
    """Rows left ``sending`` by a session whose process (on this host) is gone are
    requeued at once; only the first, the one that was on the wire, counts as an
    interrupted attempt. A session that may live waits for its lease; an expired
    lease is requeued."""
    from mailhost.leases import worker_id

    draft = mh_any.outgoing.compose(["bob@example.org"], subject="x", body=BODY, from_address="a@example.org")
    fix = ConnectionSpec(name="main", protocol="smtp", host="127.0.0.1", encryption="none", default=True)
    mh_any.connections.add(Direction.OUTGOING, fix)
    on_wire, claimed, alive, expired = (mh_any.outgoing.enqueue(draft).id for _ in range(4))
    me = worker_id().rsplit(":", 2)[0]  # host:namespace of this process
    soon = utcnow() + dt.timedelta(minutes=5)
    dead_session = f"{me}:{_dead_pid()}:deadbeef/0"
    _stick(mh_any, on_wire, dead_session, soon)
    _stick(mh_any, claimed, dead_session, soon)
    _stick(mh_any, alive, worker_id() + "/0", soon)  # this process: alive
    _stick(mh_any, expired, "elsewhere:1:2:cafe/3", utcnow() - dt.timedelta(seconds=1))
    assert mh_any.outgoing.recover() == 3
    states = {i: item(mh_any, i) for i in (on_wire, claimed, alive, expired)}
    assert states[alive]["status"] == "sending"
    for i in (on_wire, expired):
        assert states[i]["status"] == "queued" and states[i]["attempts"] == 1
        assert states[i]["attempts_log"][0]["result"] == "interrupted"
        assert "arrives twice" in states[i]["last_error"]
    assert states[claimed]["status"] == "queued" and states[claimed]["attempts"] == 0
    assert states[claimed]["attempts_log"] == []


class _Stop(BaseException):
    """What ends a thread without being an Exception (a plugin's sys.exit, gevent's Timeout)."""


class _StopsAfterSending:
    """A protocol whose session writes its first message (as the test plugin's ``dir``
    does) and then stops the worker with :class:`_Stop`: that message went out."""

    @hookimpl
    def register_protocols(self, register: Callable[[Any], None]) -> None:
        from mailhost.protocols import ProtocolProvider, ProviderOption
        from tests.testplugin.mailhost_testplugin import DirOutgoing

        class Session(DirOutgoing):
            stopped = False

            def send(self, raw: bytes, sender: str, recipients: Any) -> Any:
                result = super().send(raw, sender, recipients)
                if not Session.stopped:
                    Session.stopped = True
                    raise _Stop()
                return result

        register(ProtocolProvider(name="stops", direction=Direction.OUTGOING, open=Session, title="Stops (tests)",
                                  attributes=frozenset({"host", "from_address"}), required=frozenset({"host"}),
                                  options=(ProviderOption("suffix", "the file name ending", str, default=""),)))


@contextlib.contextmanager
def _toy_outbox(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str,
                plugin: object) -> Iterator[Mailhost]:
    """A host with only the toy plugin ``plugin``, its protocol ``name`` writing to
    tmp_path/outbox, and the default outgoing connection "out" on it."""
    monkeypatch.setenv("MAILHOST_TESTPLUGIN_OUTBOX", str(tmp_path / "outbox"))
    mh = Mailhost.open(home / "mailhost.toml", plugins=PluginHost(only=[], extra=[(name, plugin)]))
    try:
        mh.connections.add(Direction.OUTGOING, ConnectionSpec(name="out", protocol=name, host="box",
                                                              from_address="a@example.org", default=True))
        yield mh
    finally:
        mh.close()


def test_a_stopped_worker_gives_back_only_what_it_never_tried(home: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker stopped right after a message went out: the messages after it go back to
    the queue at once, untouched; the one sent stays leased (its outcome was never
    recorded), so the next pass does not send it a second time."""
    with _toy_outbox(home, tmp_path, monkeypatch, "stops", _StopsAfterSending()) as mh:
        ids = [mh.outgoing.send([f"r{n}@example.org"], subject=f"m{n}", body=BODY).id for n in range(4)]
        with pytest.raises(_Stop):
            mh.outgoing.deliver()
        assert [mh.outgoing.item(i).status for i in ids] == ["sending", "queued", "queued", "queued"]
        assert mh.outgoing.deliver().sent == 3
        assert outbox_subjects(tmp_path / "outbox" / "box") == [b"m0", b"m1", b"m2", b"m3"]
        assert [(item(mh, i)["status"], item(mh, i)["attempts"]) for i in ids] == [("sending", 0)] + [("sent", 1)] * 3


class _RecordsKeys:
    """A protocol whose send takes ``delivery_key``: it records the key of each attempt
    and fails the first attempt at each message for a while (TemporaryFailure)."""

    keys: list[tuple[bytes, str]] = []

    @hookimpl
    def register_protocols(self, register: Callable[[Any], None]) -> None:
        from mailhost.errors import TemporaryFailure
        from mailhost.protocols import ProtocolProvider, ProviderOption, SendResult
        from tests.testplugin.mailhost_testplugin import DirOutgoing

        keys = self.keys

        class Session(DirOutgoing):
            def send(self, raw: bytes, sender: str, recipients: Any, before_data: Any = None,
                     delivery_key: str | None = None) -> SendResult:
                subject = email.message_from_bytes(raw)["Subject"].encode()
                keys.append((subject, str(delivery_key)))
                if sum(1 for s, _ in keys if s == subject) == 1:
                    raise TemporaryFailure("421 try again later")
                before_data()
                return super().send(raw, sender, recipients)

        register(ProtocolProvider(name="keys", direction=Direction.OUTGOING, open=Session, title="Keys (tests)",
                                  attributes=frozenset({"host", "from_address"}), required=frozenset({"host"}),
                                  options=(ProviderOption("suffix", "the file name ending", str, default=""),)))


def test_a_session_gets_one_delivery_key_per_message(home: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A send that takes ``delivery_key`` gets the same one on every attempt at a message,
    and another for each other message, with nothing of the store in it."""
    monkeypatch.setenv("MAILHOST_TESTPLUGIN_OUTBOX", str(tmp_path / "outbox"))
    _RecordsKeys.keys = []
    mh = Mailhost.open(home / "mailhost.toml", plugins=PluginHost(only=[], extra=[("keys", _RecordsKeys())]))
    try:
        mh.connections.add(Direction.OUTGOING, ConnectionSpec(name="out", protocol="keys", host="box",
                                                              from_address="a@example.org", default=True))
        ids = [mh.outgoing.send(["r@example.org"], subject=f"m{n}", body=BODY).id for n in range(2)]
        mh.outgoing.deliver()
        for i in ids:
            mh.outgoing.retry(i)
        assert mh.outgoing.deliver().sent == 2
    finally:
        mh.close()
    by_subject: dict[bytes, set[str]] = {}
    for subject, key in _RecordsKeys.keys:
        by_subject.setdefault(subject, set()).add(key)
    assert sorted(by_subject) == [b"m0", b"m1"] and [len(k) for k in by_subject.values()] == [1, 1]
    keys = set.union(*by_subject.values())
    assert len(keys) == 2 and all(len(k) == 32 and int(k, 16) >= 0 for k in keys)  # opaque: a hash


def test_retry_delete_and_purge(mh: Mailhost, smtp_server: Callable[..., SmtpServer]) -> None:
    """retry gives a failed message a fresh start; delete removes one; purge drops old
    sent mail; a sent or unknown message is refused with a clear error."""
    server = smtp_server("plain")
    add(mh, "main", server, from_address="a@example.org", default=True)
    failed = mh.outgoing.send(["bob@example.org"], subject="again", body=BODY)
    server.fail_next_data(1, 550)
    mh.outgoing.deliver()
    assert mh.outgoing.item(failed.id).status == "failed"
    retried = mh.outgoing.retry(failed.id)
    assert retried.status == "queued" and retried.attempts == 0
    mh.outgoing.deliver()
    record = item(mh, failed.id)
    assert record["status"] == "sent" and [a["result"] for a in record["attempts_log"]] == ["permanent", "sent"]
    with pytest.raises(ValidationError, match="delivered to every recipient"):
        mh.outgoing.retry(failed.id)
    other = mh.outgoing.send(["bob@example.org"], subject="drop me", body=BODY)
    mh.outgoing.delete(other.id)
    with pytest.raises(NotFound):
        mh.outgoing.delete(other.id)
    assert mh.outgoing.purge(dt.timedelta(days=1)) == 0
    later(mh, days=2)
    assert mh.outgoing.purge(dt.timedelta(days=1)) == 1
    assert mh.outgoing.items() == []


# ---------------------------------------------------------------------------------------
# composing
# ---------------------------------------------------------------------------------------


def test_internationalized_addresses_are_utf8_in_the_headers(mh: Mailhost,
                                                             smtp_server: Callable[..., SmtpServer]) -> None:
    """A non-ASCII address goes into To, Cc and From as UTF-8 (SMTPUTF8), never as an
    encoded word, which is no address; a non-ASCII display name is still encoded."""
    server = smtp_server("plain")
    add(mh, "main", server, from_address="main@example.org", default=True)
    mh.outgoing.send(["bób@y.org", "Zoë <zoe@y.org>"], cc=["Çé <çé@y.org>"], from_address="Jörg <jörg@example.org>",
                     subject="Grüße", body=BODY)
    mh.outgoing.deliver()
    [m] = server.messages
    assert m.rcpt_tos == ["bób@y.org", "zoe@y.org", "çé@y.org"] and "SMTPUTF8" in m.mail_options
    head = m.data.split(b"\r\n\r\n")[0]
    assert b"b\xc3\xb3b@y.org" in head and b"<\xc3\xa7\xc3\xa9@y.org>" in head and b"@y.org?=" not in head
    msg = email.message_from_string(head.decode("utf-8") + "\r\n\r\n", policy=email.policy.default)
    assert [a.addr_spec for a in msg["To"].addresses] == ["bób@y.org", "zoe@y.org"]
    assert [(a.display_name, a.addr_spec) for a in msg["Cc"].addresses] == [("Çé", "çé@y.org")]
    assert [(a.display_name, a.addr_spec) for a in msg["From"].addresses] == [("Jörg", "jörg@example.org")]
    assert b"=?utf-8?q?Zo=C3=AB?= <zoe@y.org>" in head  # display names stay RFC 2047 encoded


def test_a_utf8_from_with_an_ascii_envelope_goes_with_smtputf8(mh: Mailhost,
                                                               smtp_server: Callable[..., SmtpServer]) -> None:
    """``send --from`` with a non-ASCII address, through a connection whose own address
    (the envelope sender) is ASCII, to ASCII recipients: the From header is raw UTF-8, so
    the message goes with SMTPUTF8, and a server without it fails it for good, saying so.
    A non-ASCII subject or display name alone is encoded: the message is 7-bit."""
    modern, old = smtp_server("plain"), smtp_server("plain", hide={"SMTPUTF8"})
    add(mh, "modern", modern, from_address="main@example.org", default=True)
    add(mh, "old", old, from_address="main@example.org")
    for name in ("modern", "old"):
        mh.outgoing.send(["bob@example.org"], from_address="Jörg <jörg@example.org>", subject="Grüße", body=BODY,
                         connection=name)
    seven = mh.outgoing.send(["bob@example.org"], from_address="Jörg Müller <joerg@example.org>",
                             subject="Grüße  aus Köln", body="Grüße\n", connection="old")
    mh.outgoing.deliver()
    [m] = modern.messages
    assert m.mail_from == "main@example.org" and m.rcpt_tos == ["bob@example.org"] and "SMTPUTF8" in m.mail_options
    [refused] = mh.outgoing.items(status="failed")
    assert refused.connection_name == "old" and refused.attempts == 1
    assert "raw UTF-8 in its From header" in refused.last_error and refused.message_id in refused.last_error
    assert "does not support SMTPUTF8" in refused.last_error
    [plain] = old.messages
    assert plain.data.isascii() and plain.mail_options == [f"SIZE={len(plain.data)}"]
    assert parsed(plain)["Subject"] == "Grüße  aus Köln" and mh.outgoing.item(seven.id).status == "sent"


def test_compose_builds_a_mime_message(mh: Mailhost, tmp_path: Path) -> None:
    """Text body, attachments with guessed types, Message-ID, Date; envelope = to+cc+bcc."""
    (tmp_path / "report.pdf").write_bytes(b"%PDF-1.4 fake")
    (tmp_path / "notes.txt").write_text("plain notes\n")
    (tmp_path / "blob.weird").write_bytes(b"\x00\x01")
    draft = mh.outgoing.compose(["Bob <bob@example.org>"], cc=["carol@example.org"], bcc=["dave@example.org"],
                                subject="Report", body="See attached.\n", from_address="a@example.org",
                                attachments=[tmp_path / "report.pdf", tmp_path / "notes.txt", tmp_path / "blob.weird"])
    assert draft.recipients == ("bob@example.org", "carol@example.org", "dave@example.org")
    msg = email.message_from_bytes(draft.raw, policy=email.policy.default)
    assert msg["To"] == "Bob <bob@example.org>" and msg["Cc"] == "carol@example.org" and msg["Bcc"] is None
    assert msg["Message-ID"] == draft.message_id and msg["Message-ID"].endswith("@example.org>")
    assert msg["Date"] and b"\r\n" in draft.raw and b"\n" not in draft.raw.replace(b"\r\n", b"")
    parts = {p.get_filename(): p.get_content_type() for p in msg.iter_attachments()}
    assert parts == {"report.pdf": "application/pdf", "notes.txt": "text/plain",
                     "blob.weird": "application/octet-stream"}
    assert msg.get_body(("plain",)).get_content().replace("\r\n", "\n") == "See attached.\n"


def test_eml_is_taken_as_it_is(mh: Mailhost, tmp_path: Path) -> None:
    """A ready message: its recipients from To/Cc/Bcc, Bcc removed, line ends fixed,
    a Message-ID and Date added only when missing."""
    eml = tmp_path / "ready.eml"
    eml.write_bytes(b"From: Alice <alice@example.org>\nTo: bob@example.org\nBcc: secret@example.org\n"
                    b"Subject: ready\n\nbody line\n")
    draft = mh.outgoing.compose(eml=eml)
    assert draft.recipients == ("bob@example.org", "secret@example.org")
    assert draft.from_addr == "Alice <alice@example.org>" and draft.subject == "ready"
    assert b"Bcc" not in draft.raw and b"secret" not in draft.raw
    assert draft.raw.startswith(b"Message-ID: <") and b"\r\nDate: " in draft.raw
    assert draft.raw.endswith(b"\r\n\r\nbody line\r\n")
    bad = tmp_path / "bad.eml"
    for content in (b"just text\n", b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/:/bin/sh\n",
                    b"key: value\n\xff\x00 binary\x01: junk\n", b" folded: first\nTo: b@example.org\n"):
        bad.write_bytes(content)  # text, /etc/passwd, a binary file, a header block starting mid-field
        with pytest.raises(ValidationError, match="not an email message: it must start with headers such as From"):
            mh.outgoing.compose(eml=bad, to=["a@example.org"])


@pytest.mark.parametrize("kwargs, match", [
    ({"to": ["not-an-address"], "subject": "x", "body": "y"}, "is not an email address"),
    ({"to": ["a@example.org"], "subject": "x", "body": "y", "eml": b"To: b@example.org\r\n\r\nz"}, "one way"),
    ({"to": ["a@example.org"], "body": "y"}, "no subject"),
    ({"to": [], "subject": "x", "body": "y"}, "no recipient"),
    ({"to": ["a@example.org"], "subject": "x\r\nBcc: evil@example.org", "body": "y"}, "line break"),
    ({"to": ["a@example.org"], "subject": "x", "body": "y", "attachments": ["/nonexistent/file"]}, "cannot attach"),
    ({"to": ["a@example.org"], "subject": "x", "body": "text\x00then binary"}, "body contains NUL.*--attach"),
])
def test_compose_refuses_bad_input(mh: Mailhost, kwargs: dict[str, Any], match: str) -> None:
    """Bad input is one ValidationError sentence."""
    with pytest.raises(ValidationError, match=match):
        mh.outgoing.compose(**kwargs)


def test_personalize_only_touches_from_and_subject() -> None:
    """From is added on top; the subject is prefixed (encoded when needed); the rest of
    the bytes are unchanged."""
    raw = b"To: b@example.org\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n  folded\r\nX-Keep: 1\r\n\r\nbody\r\n"
    out = personalize(raw, b"From: a@example.org\r\n", "[P]")
    msg = email.message_from_bytes(out, policy=email.policy.default)
    assert msg["Subject"] == "[P] Grüße  folded" and msg["From"] == "a@example.org" and msg["X-Keep"] == "1"
    assert out.endswith(b"X-Keep: 1\r\n\r\nbody\r\n")
    assert personalize(raw, None, None) is raw


def test_enqueue_needs_a_connection(mh: Mailhost) -> None:
    """Without --connection and without a default connection: a clear error, nothing queued."""
    with pytest.raises(ValidationError, match="no default outgoing connection"):
        mh.outgoing.send(["bob@example.org"], subject="x", body=BODY)
    with pytest.raises(NotFound):
        mh.outgoing.send(["bob@example.org"], subject="x", body=BODY, connection="nope")
    assert mh.outgoing.items() == []


def test_outgoing_is_the_host_pipeline(mh: Mailhost) -> None:
    """The host's outgoing attribute is this pipeline."""
    assert isinstance(mh.outgoing, Outgoing)


@pytest.fixture
def _no_leftover_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    assert not [t for t in set(threading.enumerate()) - before if t.name.startswith(("deliver", "outgoing"))]


@pytest.mark.usefixtures("_no_leftover_threads")
def test_a_pass_leaves_no_threads(mh: Mailhost, smtp_server: Callable[..., SmtpServer]) -> None:
    """The pass's worker and recorder threads end with it (the service calls it forever)."""
    server = smtp_server("plain")
    add(mh, "main", server, from_address="a@example.org", default=True)
    mh.outgoing.send(["bob@example.org"], subject="x", body=BODY)
    mh.outgoing.deliver(sessions=4)


@pytest.mark.parametrize(("subject", "prefix", "shown"), [
    (b"a   b  c\t d ", "[P]", "[P] a   b  c\t d "),
    (b"=?utf-8?q?Gr=C3=BC=C3=9Fe?=   aus  =?utf-8?q?K=C3=B6ln?=", "[P]", "[P] Grüße   aus  Köln"),
    (b"=?utf-8?q?Gr=C3=BC=C3=9Fe?=  x", "[Prä]", "[Prä] Grüße  x"),
    (b"plain  x", "[Prä]", "[Prä] plain  x"),
    ("Grüße   aus  Köln".encode(), "[Prä]", "[Prä] Grüße   aus  Köln"),
    (b"Caf\xe9   cr\xe8me", "[P]", "[P] Café   crème"),
    (b"long  " + b"x" * 76, "[P]", "[P] long  " + "x" * 76),
])
def test_personalize_keeps_the_subjects_spacing(subject: bytes, prefix: str, shown: str) -> None:
    """Only the prefix and one space go in front of the subject: its runs of spaces and
    tabs stay as they are (they were squeezed to one), and an ASCII or UTF-8 subject keeps
    its very bytes; no line grows past 78 characters for the prefix."""
    raw = b"To: b@example.org\r\nSubject: " + subject + b"\r\nX-Keep: 1\r\n\r\nbody\r\n"
    out = personalize(raw, None, prefix)
    assert email.message_from_bytes(out, policy=email.policy.default)["Subject"] == shown
    if subject.isascii() or b"\xc3" in subject:
        assert subject + b"\r\nX-Keep: 1\r\n" in out
    assert max(len(line) for line in out.split(b"\r\n")) <= max(78, len(b"Subject: " + subject))


def test_personalize_keeps_an_8bit_subject_in_another_charset() -> None:
    """A raw 8-bit subject that is not UTF-8 (Latin-1, from an old mailer) keeps its
    letters when the prefix is added, instead of turning them into U+FFFD."""
    for raw_subject, shown in ((b"Caf\xe9 cr\xe8me", "Café crème"), ("Grüße".encode(), "Grüße")):
        out = personalize(b"To: b@example.org\r\nSubject: " + raw_subject + b"\r\n\r\nbody\r\n", None, "[P]")
        assert email.message_from_bytes(out, policy=email.policy.default)["Subject"] == f"[P] {shown}"


class _ReturnsNothing:
    """A protocol whose send delivers and forgets to return its SendResult."""

    @hookimpl
    def register_protocols(self, register: Callable[[Any], None]) -> None:
        from mailhost.protocols import ProtocolProvider, ProviderOption
        from tests.testplugin.mailhost_testplugin import DirOutgoing

        class Session(DirOutgoing):
            def send(self, raw: bytes, sender: str, recipients: Any) -> Any:
                super().send(raw, sender, recipients)  # no return

        register(ProtocolProvider(name="mute", direction=Direction.OUTGOING, open=Session, title="Mute (tests)",
                                  attributes=frozenset({"host", "from_address"}), required=frozenset({"host"}),
                                  options=(ProviderOption("suffix", "the file name ending", str, default=""),)))


def test_a_send_that_returns_no_result_counts_as_sent_once(home: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """A plugin's send that returns (the server took the message) but not a SendResult:
    each message is recorded sent, once, and the log names the plugin and its
    distribution, whom to tell. Each pass used to
    send one message and stop its worker on an AttributeError, leaving the messages in
    sending, to be sent again when their lease ran out."""
    with _toy_outbox(home, tmp_path, monkeypatch, "mute", _ReturnsNothing()) as mh:
        plugin = as_installed(mh, monkeypatch, "mute")
        ids = [mh.outgoing.send([f"r{n}@example.org"], subject=f"m{n}", body=BODY).id for n in range(3)]
        report = mh.outgoing.deliver()
        assert report.sent == 3 and report.error is None, report.error
        assert [mh.outgoing.item(i).status for i in ids] == ["sent"] * 3
        assert mh.outgoing.deliver().sent == 0
        assert outbox_subjects(tmp_path / "outbox" / "box") == [b"m0", b"m1", b"m2"]
        assert (f"out: {plugin} broke the session contract: its mute session's send returned None, not a "
                "mailhost.SendResult (report it to the plugin's author); the message counts as accepted by every "
                "recipient") in caplog.text

