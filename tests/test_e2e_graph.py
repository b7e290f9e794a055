"""End to end over Microsoft Graph: the host's pipelines against the Graph stand-in.

Store, then acknowledge, with Graph's own hazards: thousands of messages over many
delta pages, mail arriving between passes, throttling (429, 503) in the middle of a
pass, a lost delta token (410 Gone), a shared mailbox, and `fetch` killed with SIGKILL
again and again. Every message ends up in the incoming queue exactly once, byte for byte.
Outgoing, a message over Graph's 4 MB request limit (a draft, its attachment uploaded)
survives a failed upload and a lost answer to its send without going out twice.

These tests isolate the pipeline from OAuth2: :func:`tests.servers.graph.wire_access_token`
hands the connections a token the stand-in issued, and the SIGKILL test drives the
host's Python API (what ``mailhost fetch`` calls) in a subprocess. The real admin path
(`mailhost oauth add`, a token from the identity provider, the CLI) is covered by
tests/test_e2e_graph_cli.py.
"""
from __future__ import annotations

import json
import os
import random
import sqlite3
import ssl
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mailhost import Mailhost
from mailhost.connections import ConnectionSpec
from mailhost.protocols import Direction

from tests.servers.certs import Pki
from tests.servers.graph import (
    GraphServer,
    add_oauth_credential,
    introspection_verifier,
    wire_access_token,
)
from tests.servers.idp import IdentityProvider

from .helpers import kill_mid_pass
from .helpers import message_id_of as _mid

ALICE = "alice@contoso.com"
SUPPORT = "support@contoso.com"
ROOT = Path(__file__).resolve().parent.parent

DRIVER = """\
import json, os, sys
from mailhost import Mailhost
from tests.servers.graph import wire_access_token

host = Mailhost.open(sys.argv[1])
token = os.environ["GRAPH_TOKEN"]
wire_access_token(host, lambda: token)
print(json.dumps([r.as_dict() for r in host.incoming.fetch([sys.argv[2]])]))
"""


def message(i: int, size: int = 1500) -> bytes:
    """A MIME message with a unique Message-ID, about ``size`` bytes, some of them 8-bit."""
    head = (f"From: Sender {i} <s{i}@example.org>\r\nTo: {ALICE}\r\nSubject: message {i}\r\n"
            f"Message-ID: <g{i}@example.org>\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n").encode()
    body = f"Grüße {i}\r\n".encode()
    while len(head) + len(body) < size:
        body += b"-" * 70 + b"\r\n"
    return head + body



@pytest.fixture
def graph(pki: Pki) -> Iterator[GraphServer]:
    """The stand-in (50 messages per delta page at most), alice and the shared mailbox support."""
    server = GraphServer(pki, max_page_size=50)
    server.start()
    server.add_user(ALICE)
    server.add_shared_mailbox(SUPPORT)
    server.grant(SUPPORT, ALICE, full_access=True, send_as=True)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def token(graph: GraphServer) -> str:
    return graph.issue_token(ALICE, scopes=("Mail.ReadWrite", "Mail.Send", "Mail.ReadWrite.Shared",
                                            "Mail.Send.Shared"))


@pytest.fixture
def host(mh: Mailhost, token: str) -> Mailhost:
    """The installation, its OAuth2 connections signed in with ``token``."""
    add_oauth_credential(mh, "ms")
    wire_access_token(mh, lambda: token)
    return mh


def add_incoming(host: Mailhost, graph: GraphServer, name: str = "desk", **given: Any) -> str:
    host.connections.add(Direction.INCOMING, ConnectionSpec(
        name=name, protocol="graph", host="127.0.0.1", port=graph.port, username=ALICE,
        oauth_credential="ms", ca_file=graph.ca_file, **given))
    return name


def queue(host: Mailhost) -> list[bytes]:
    """The raw bytes in the incoming queue, oldest first."""
    from mailhost.store import IncomingItem
    from sqlalchemy import select

    with host.session() as s:
        return [bytes(raw) for raw in s.scalars(select(IncomingItem.raw).order_by(IncomingItem.id))]


def test_thousands_over_many_pages_then_only_new(host: Mailhost, graph: GraphServer) -> None:
    """3000 messages over 60 delta pages arrive byte for byte and are marked read; the
    next pass is one delta request; new mail between passes is all that is downloaded."""
    sent = [message(i, 1000 + i % 700) for i in range(3000)]
    graph.deliver_many(ALICE, sent)
    name = add_incoming(host, graph)
    report = host.incoming.fetch([name])[0]
    assert (report.ok, report.listed, report.stored, report.acknowledged) == (True, 3000, 3000, 3000), report.error
    assert queue(host) == sent
    assert graph.stats["delta"] == 60 and graph.stats["value"] == 3000
    assert all(m.is_read for m in graph.messages(ALICE))

    before = dict(graph.stats)
    again = host.incoming.fetch([name])[0]
    assert (again.ok, again.listed, again.stored) == (True, 0, 0)
    assert graph.stats["delta"] - before["delta"] == 1 and graph.stats["value"] == before["value"]

    graph.deliver_many(ALICE, [message(5000 + i) for i in range(7)])
    third = host.incoming.fetch([name])[0]
    assert (third.listed, third.stored) == (7, 7)
    assert graph.stats["value"] == before["value"] + 7
    assert len(queue(host)) == 3007


def test_throttling_mid_pass_stores_each_once(host: Mailhost, graph: GraphServer) -> None:
    """Every 7th request answers 429, then a burst of 503s: the pass completes, each message once."""
    sent = [message(i) for i in range(600)]
    graph.deliver_many(ALICE, sent)
    name = add_incoming(host, graph)
    graph.throttle(every=7)
    report = host.incoming.fetch([name])[0]
    assert (report.ok, report.stored) == (True, 600), report.error
    graph.deliver_many(ALICE, [message(900 + i) for i in range(40)])
    graph.throttle(burst=6, status=503)
    report = host.incoming.fetch([name])[0]
    assert (report.ok, report.stored) == (True, 40), report.error
    assert graph.stats["throttled"] > 90
    ids = Counter(_mid(raw) for raw in queue(host))
    assert len(ids) == 640 and max(ids.values()) == 1
    assert all(m.is_read for m in graph.messages(ALICE))


def test_a_throttled_pass_polls_again_after_retry_after(host: Mailhost, graph: GraphServer) -> None:
    """Graph throttles the listing with a Retry-After longer than the client waits
    in a pass (900 s): the pass fails, temporary, and the next poll is not due before the
    server's Retry-After (polling sooner prolongs the throttling); the interval still
    holds for shorter ones."""
    graph.deliver_many(ALICE, [message(i) for i in range(5)])
    name = add_incoming(host, graph)
    graph.throttle(burst=50, retry_after=900, kinds=["delta"])
    [report] = host.incoming.fetch([name])
    assert not report.ok and "429 TooManyRequests" in (report.error or "")
    conn = host.connections.get(Direction.INCOMING, name)
    assert (conn.next_poll_at - conn.last_poll_at).total_seconds() == 900
    graph.throttle(burst=1, retry_after=0.01, kinds=["delta"])
    [report] = host.incoming.fetch([name])
    assert report.ok and report.stored == 5
    conn = host.connections.get(Direction.INCOMING, name)
    assert (conn.next_poll_at - conn.last_poll_at).total_seconds() == 60 * (conn.interval or 1)


def test_stale_delta_token_resyncs_without_duplicates(host: Mailhost, graph: GraphServer) -> None:
    """410 Gone: the folder is listed again, the stored messages are skipped, the new one comes."""
    graph.deliver_many(ALICE, [message(i) for i in range(120)])
    name = add_incoming(host, graph, after_download="move", after_download_argument="Done")
    assert host.incoming.fetch([name])[0].stored == 120
    graph.deliver_many(ALICE, [message(i) for i in range(200, 205)], "Done")  # outside our folder
    for m in graph.messages(ALICE, "Done")[:30]:  # someone puts stored ones back
        graph.move_message(ALICE, m.immutable_id, "inbox")
    graph.expire_delta_tokens()
    graph.deliver(ALICE, message(999))
    report = host.incoming.fetch([name])[0]
    assert (report.ok, report.listed, report.stored) == (True, 1, 1), report.error
    ids = Counter(_mid(raw) for raw in queue(host))
    assert len(ids) == 121 and max(ids.values()) == 1


def test_delete_after_download(host: Mailhost, graph: GraphServer) -> None:
    """Delete empties the folder (into Recoverable Items); everything is stored."""
    sent = [message(i) for i in range(45)]
    graph.deliver_many(ALICE, sent)
    name = add_incoming(host, graph, after_download="delete")
    assert host.incoming.fetch([name])[0].acknowledged == 45
    assert graph.messages(ALICE) == [] and len(graph.messages(ALICE, "recoverableitemsdeletions")) == 45
    assert queue(host) == sent


def test_shared_mailbox(host: Mailhost, graph: GraphServer) -> None:
    """alice's token reads the shared mailbox support, its folder by path."""
    graph.create_folder(SUPPORT, "Queues/Level 1")
    sent = [message(i) for i in range(25)]
    graph.deliver_many(SUPPORT, sent, "Queues/Level 1")
    graph.deliver(ALICE, message(77))  # alice's own inbox stays out of it
    name = add_incoming(host, graph, shared_mailbox=SUPPORT, folder="Queues/Level 1")
    report = host.incoming.fetch([name])[0]
    assert (report.ok, report.stored) == (True, 25), report.error
    assert queue(host) == sent
    assert all(m.is_read for m in graph.messages(SUPPORT, "Queues/Level 1"))
    assert not graph.messages(ALICE)[0].is_read


def test_enable_estimate_and_connection_test(host: Mailhost, graph: GraphServer) -> None:
    """The estimate for enable comes from the folder's counts; the test reports each step."""
    graph.deliver_many(ALICE, [message(i) for i in range(12)])
    name = add_incoming(host, graph)
    estimate = host.incoming.estimate(name)
    assert (estimate.count, estimate.confidence) == (12, "high")
    conn = host.connections.get(Direction.INCOMING, name)
    provider = host.connections.provider(Direction.INCOMING, conn)
    # What `mailhost incoming test` runs (Connections.test itself refuses protocols
    # without an encryption attribute for now; see the report).
    steps = list(provider.test(host.connections.settings(Direction.INCOMING, conn)))
    assert [(s.name, s.ok) for s in steps] == [("token", True), ("mailbox", True), ("folder", True),
                                               ("permissions", True)], steps
    assert "read: yes; write flags: yes; send: yes" in steps[-1].detail
    assert not any(m.is_read for m in graph.messages(ALICE))  # the write probe changed nothing
    conn.folder = "Nowhere"
    bad = list(provider.test(host.connections.settings(Direction.INCOMING, conn)))
    assert (bad[-1].name, bad[-1].ok) == ("folder", False) and "Nowhere" in bad[-1].detail


def test_send_202_and_send_refused(host: Mailhost, graph: GraphServer, token: str) -> None:
    """Through the outgoing queue: 202 is sent; a 403 fails the message with Graph's code."""
    host.connections.add(Direction.OUTGOING, ConnectionSpec(
        name="out", protocol="graph", host="127.0.0.1", port=graph.port, username=ALICE, oauth_credential="ms",
        ca_file=graph.ca_file, from_address=f"Support desk <{SUPPORT}>"))
    item = host.outgoing.send(["carol@example.org"], bcc=["erin@example.org"], connection="out",
                              subject="Ticket 1", body="Hello")
    report = host.outgoing.deliver()
    assert report.sent == 1, report.as_dicts()
    assert host.outgoing.item(item.id).status == "sent"
    [sent] = graph.sent
    assert sent.mailbox == SUPPORT and set(sent.recipients) == {"carol@example.org", "erin@example.org"}
    assert sent.raw.startswith(b"Bcc: erin@example.org\r\n")  # the envelope-only recipient
    assert b"Subject: Ticket 1\r\n" in sent.raw and b"support@contoso.com" in sent.raw

    # Refused through support's URL, then through alice's own (which a From of another
    # mailbox is tried through next): the right to send as support is missing.
    graph.fail("sendmail", 403, "ErrorAccessDenied", "Access is denied. Check credentials and try again.", count=2)
    refused = host.outgoing.send(["carol@example.org"], connection="out", subject="Ticket 2", body="Hello")
    host.outgoing.deliver()
    failed = host.outgoing.item(refused.id)
    assert failed.status == "failed" and "403 ErrorAccessDenied" in (failed.last_error or "")
    assert f"must give {ALICE} Send As or Send on Behalf on {SUPPORT}" in (failed.last_error or "")
    assert len(graph.sent) == 1


def test_throttled_send_waits_for_retry_after(host: Mailhost, graph: GraphServer) -> None:
    """A 429 on sendMail queues the message again, not before the server's Retry-After."""
    host.connections.add(Direction.OUTGOING, ConnectionSpec(
        name="out", protocol="graph", host="127.0.0.1", port=graph.port, username=ALICE, oauth_credential="ms",
        ca_file=graph.ca_file))
    graph.throttle(burst=1, retry_after=3600, kinds=["sendmail"])
    item = host.outgoing.send(["carol@example.org"], connection="out", subject="Later", body="Hello",
                              from_address=ALICE)
    host.outgoing.deliver()
    queued = host.outgoing.item(item.id)
    assert queued.status == "queued" and "429 TooManyRequests" in (queued.last_error or "")
    assert queued.next_attempt_at is not None
    assert (queued.next_attempt_at - queued.created_at).total_seconds() >= 3600 - 5
    assert graph.sent == []


def test_large_attachment_through_the_queue_once(host: Mailhost, graph: GraphServer, home: Path) -> None:
    """A 6 MB attachment through the outgoing queue: a 500 mid-upload queues the message
    again with no draft left; the retry sends it once, complete. A lost answer to the
    final send is an interrupted attempt: queued again, not failed; the next attempt
    finds the message in Sent Items by the tag of its item, and records it sent without
    sending it again."""
    from mailhost.outgoing import item_dict

    host.connections.add(Direction.OUTGOING, ConnectionSpec(
        name="out", protocol="graph", host="127.0.0.1", port=graph.port, username=ALICE, oauth_credential="ms",
        ca_file=graph.ca_file))
    scan = home / "scan.pdf"
    scan.write_bytes(random.Random(6).randbytes(6_000_000))
    graph.fail("upload", 500, "InternalServerError", "Something went wrong.")
    item = host.outgoing.send(["carol@example.org"], connection="out", subject="Scan", body="Attached.",
                              attachments=[scan], from_address=ALICE)
    host.outgoing.deliver()
    queued = host.outgoing.item(item.id)
    assert queued.status == "queued" and "500 InternalServerError" in (queued.last_error or "")
    assert graph.sent == [] and graph.messages(ALICE, "drafts") == []
    host.outgoing.retry(item.id)
    assert host.outgoing.deliver().sent == 1
    assert host.outgoing.item(item.id).status == "sent"
    [sent] = graph.sent
    assert [(a.name, a.content) for a in sent.attachments] == [("scan.pdf", scan.read_bytes())]
    assert graph.messages(ALICE, "drafts") == [] and len(graph.messages(ALICE, "sentitems")) == 1

    graph.drop("send")
    again = host.outgoing.send(["carol@example.org"], connection="out", subject="Scan 2", body="Attached.",
                               attachments=[scan], from_address=ALICE)
    host.outgoing.deliver()
    doubt = item_dict(host.outgoing.item(again.id), with_attempts=True)
    assert doubt["status"] == "queued" and [a["result"] for a in doubt["attempts_log"]] == ["interrupted"]
    assert len(graph.sent) == 2
    host.outgoing.retry(again.id)
    assert host.outgoing.deliver().sent == 1
    done = item_dict(host.outgoing.item(again.id), with_attempts=True)
    assert done["status"] == "sent" and [a["result"] for a in done["attempts_log"]] == ["interrupted", "sent"]
    assert len(graph.sent) == 2 and graph.messages(ALICE, "drafts") == []


def test_a_large_message_retried_after_an_edit_goes_as_the_connection_now_says(
        host: Mailhost, graph: GraphServer, home: Path) -> None:
    """A gateway's 504 to the send of a large message leaves its complete draft in Drafts
    and the item queued (interrupted); the admin then edits the connection's subject prefix
    and From name. The retry sends the message once, as the connection now says, as it
    does a small message, and leaves no draft behind."""
    host.connections.add(Direction.OUTGOING, ConnectionSpec(
        name="out", protocol="graph", host="127.0.0.1", port=graph.port, username=ALICE, oauth_credential="ms",
        ca_file=graph.ca_file, from_address=f"Alice <{ALICE}>", prefix="[Old]"))
    scan = home / "scan.pdf"
    scan.write_bytes(random.Random(7).randbytes(6_000_000))
    graph.fail("send", 504, "GatewayTimeout", "The gateway did not receive a response in time.")
    item = host.outgoing.send(["carol@example.org"], connection="out", subject="Scan", body="Attached.",
                              attachments=[scan])
    host.outgoing.deliver()
    assert host.outgoing.item(item.id).status == "queued" and graph.sent == []
    assert len(graph.messages(ALICE, "drafts")) == 1
    host.connections.edit(Direction.OUTGOING, "out", ConnectionSpec(prefix="[New]",
                                                                    from_address=f"Alice Desk <{ALICE}>"))
    host.outgoing.retry(item.id)
    assert host.outgoing.deliver().sent == 1
    [sent] = graph.sent
    head = sent.raw.split(b"\r\n\r\n", 1)[0]
    assert b"Subject: [New] Scan" in head and b"From: Alice Desk <" in head and b"[Old]" not in sent.raw
    assert [(a.name, a.content) for a in sent.attachments] == [("scan.pdf", scan.read_bytes())]
    assert graph.messages(ALICE, "drafts") == [] and host.outgoing.item(item.id).status == "sent"


def test_app_only_tokens_from_the_identity_provider(mh: Mailhost, pki: Pki, idp: IdentityProvider) -> None:
    """Client-credentials tokens of the local identity provider, which Graph checks by
    RFC 7662 introspection; an expired one is refused (401) and replaced, mid-session."""
    import httpx

    idp.add_client("graph-app", "app-secret")
    verify = introspection_verifier(idp.add_resource_server("graph", "rs-secret"), ca_file=idp.ca_file)

    def new_token() -> str:
        answer = httpx.post(idp.endpoint("token"), verify=ssl.create_default_context(cafile=idp.ca_file), data={
            "grant_type": "client_credentials", "client_id": "graph-app", "client_secret": "app-secret",
            "scope": "https://graph.microsoft.com/.default"})
        answer.raise_for_status()
        return answer.json()["access_token"]

    with GraphServer(pki, verify=verify, max_page_size=50) as graph:
        graph.add_user(ALICE)
        graph.deliver_many(ALICE, [message(i) for i in range(30)])
        add_oauth_credential(mh, "ms")
        handed = [new_token()]  # what the credential has stored: about to expire
        wire_access_token(mh, lambda: handed.pop(0) if handed else new_token())
        name = add_incoming(mh, graph)
        idp.advance(idp.access_token_lifetime + 60)
        report = mh.incoming.fetch([name])[0]
        assert (report.ok, report.stored) == (True, 30), report.error
        assert [i["active"] for i in idp.introspections[:2]] == [False, True]
        assert len(idp.grants("client_credentials")) == 2
        assert all(m.is_read for m in graph.messages(ALICE))


# ---------------------------------------------------------------------------------------
# SIGKILL
# ---------------------------------------------------------------------------------------


def _stored(home: Path) -> list[tuple[str, bytes]]:
    db = sqlite3.connect(home / "mailhost.db")
    try:
        return [(m, bytes(r)) for m, r in db.execute("SELECT message_id, raw FROM incoming_queue ORDER BY id")]
    finally:
        db.close()


def _fetch_process(home: Path, token: str, **kwargs: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "MAILHOST_LOAD_PLUGINS": "graph", "GRAPH_TOKEN": token,
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    return subprocess.Popen([sys.executable, str(home / "driver.py"), str(home / "mailhost.toml"), "desk"],
                            cwd=home, env=env, text=True, **kwargs)


@pytest.mark.slow
def test_sigkill_mid_pass_stores_each_message_once(home: Path, host: Mailhost, graph: GraphServer,
                                                   token: str) -> None:
    """The download killed with SIGKILL at random instants, again and again, with 429s
    on the way: each message stored once, byte for byte, all marked read in the end."""
    rng = random.Random(int(os.environ.get("MAILHOST_TEST_SEED", "20261121")))
    sent = [message(i, rng.randint(1500, 6000)) for i in range(1500)]
    graph.deliver_many(ALICE, sent)
    add_incoming(host, graph)
    (home / "driver.py").write_text(DRIVER)
    graph.throttle(every=11)
    kills = 0
    for _ in range(8):
        proc = _fetch_process(home, token, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kills += kill_mid_pass(proc, home, rng, within=(0.6, 1.6))
        proc.wait()
        if len(_stored(home)) == len(sent):
            break
    graph.throttle()
    final = _fetch_process(home, token, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = final.communicate(timeout=300)
    assert final.returncode == 0, err
    assert json.loads(out)[0]["ok"], out
    assert kills >= 3  # the test proved something only if it really killed passes
    stored = _stored(home)
    ids = Counter(m for m, _ in stored)
    assert set(ids) == {_mid(m) for m in sent} and max(ids.values()) == 1
    by_id = {_mid(m): m for m in sent}
    assert all(raw == by_id[m] for m, raw in stored)
    assert all(m.is_read for m in graph.messages(ALICE))  # every acknowledgement finished
