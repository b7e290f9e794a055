"""Leases between workers on several machines, which share one PostgreSQL store but
not one clock, and perhaps a hostname: lease times go by the database's clock, so a
worker whose own clock is minutes off neither takes a lease that is still held nor
writes one that has already run out; and a worker on another machine of the same name
is never taken for a dead process of this one."""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest

from mailhost import Mailhost
from mailhost.connections import ConnectionSpec
from mailhost.plugins import PluginHost
from mailhost.protocols import Direction

from .helpers import machine_clock_off

OFF = dt.timedelta(minutes=15)  # more than any lease: an incoming lease is 2 minutes, an outgoing one 10

pytestmark = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)  # SQLite has one machine


@pytest.fixture
def workers(mh_any: Mailhost) -> Iterator[Any]:
    """``open()``: one more worker (a Mailhost of its own) on a PostgreSQL store."""
    opened: list[Mailhost] = []

    def open_() -> Mailhost:
        host = Mailhost.open(mh_any.config.path, plugins=PluginHost(only=["imap", "smtp"]))
        opened.append(host)
        return host

    yield open_
    for host in opened:
        host.close()


@pytest.mark.parametrize("off", ["taker-ahead", "holder-behind"])
def test_a_worker_with_a_wrong_clock_never_takes_a_mailbox_that_is_being_downloaded(
        workers: Any, dovecot: Any, mailbox: Any, off: str) -> None:
    """Worker A's pass holds the lease on a Dovecot mailbox; worker B, whose clock runs
    15 minutes ahead (or A's, 15 minutes behind), wants to download it too. B leaves
    it alone, and says who has it (it downloaded the whole mailbox while A's pass was
    under way: A's lease looked expired by B's clock, or was written expired by A's)."""
    dovecot.deliver_many(mailbox.user, [dovecot.generate_message(i) for i in range(5)])
    admin = workers()
    admin.connections.add(Direction.INCOMING, ConnectionSpec(
        name="desk", protocol="imap", host="localhost", port=dovecot.imap_port, encryption="starttls",
        username=mailbox.user, password=mailbox.password, ca_file=dovecot.ca_file))
    admin.connections.set_enabled("desk", True)
    with machine_clock_off(-OFF if off == "holder-behind" else dt.timedelta(0)):
        a = workers()
        held, _ = a.incoming._claim("desk")  # what A's pass does first; it goes on downloading
    assert held is not None
    with machine_clock_off(OFF if off == "taker-ahead" else dt.timedelta(0)):
        b = workers()
        assert "desk" not in b.incoming.due()
        report = b.incoming.fetch_one("desk")
    assert report.skipped and a.incoming.worker in report.skipped, report
    assert report.stored == 0 and admin.incoming.items() == []


def _one_stored(workers: Any, dovecot: Any, mailbox: Any) -> tuple[Any, Any]:
    """A worker that downloaded one message through connection "desk"; and that message's item."""
    dovecot.deliver_many(mailbox.user, [dovecot.generate_message(0)])
    admin = workers()
    admin.connections.add(Direction.INCOMING, ConnectionSpec(
        name="desk", protocol="imap", host="localhost", port=dovecot.imap_port, encryption="starttls",
        username=mailbox.user, password=mailbox.password, ca_file=dovecot.ca_file))
    assert admin.incoming.fetch_one("desk").stored == 1
    (item,) = admin.incoming.items()
    return admin, item


def test_a_handler_with_a_clock_behind_keeps_the_item_it_processes(workers: Any, dovecot: Any,
                                                                    mailbox: Any) -> None:
    """A handler on a machine whose clock runs 15 minutes behind takes an item
    (processing); `serve` on another machine releases items processing for more than 10
    minutes. The item stays with its handler (it went back to new at once, for a
    second handler to process it too)."""
    admin, item = _one_stored(workers, dovecot, mailbox)
    with machine_clock_off(-OFF):
        workers().incoming.set_status(item.id, "processing")
    assert admin.incoming.release(dt.timedelta(minutes=10)) == 0
    assert admin.incoming.item(item.id).status == "processing"


def _worker_on_a_clone(monkeypatch: pytest.MonkeyPatch) -> str:
    """The worker id that a worker on another machine with this one's name writes (a VM
    cloned from one image): the same hostname, the same PID namespace id (the initial
    namespace's is the same on every Linux machine), a PID that runs there and not here,
    another kernel."""
    import subprocess
    import sys

    import mailhost.leases

    gone_here = subprocess.Popen([sys.executable, "-c", "pass"])
    gone_here.wait()
    with monkeypatch.context() as m:
        m.setattr(mailhost.leases.os, "getpid", lambda: gone_here.pid)
        m.setattr(mailhost.leases, "_boot_id", lambda: "0123456789abcdef", raising=False)  # its kernel
        return mailhost.leases.worker_id()


def test_a_worker_on_a_clone_of_this_machine_is_not_taken_for_a_dead_one(
        workers: Any, dovecot: Any, mailbox: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker on a machine of the same name holds a mailbox and is sending two
    messages. This machine's workers wait for its leases: it was taken for a process
    of this machine that had died, so its mailbox was downloaded here too and its
    messages were queued again and sent a second time, at every delivery pass."""
    from mailhost.store import IncomingConnection, OutgoingItem
    from sqlalchemy import update

    admin = workers()
    admin.connections.add(Direction.INCOMING, ConnectionSpec(
        name="desk", protocol="imap", host="localhost", port=dovecot.imap_port, encryption="starttls",
        username=mailbox.user, password=mailbox.password, ca_file=dovecot.ca_file))
    admin.connections.add(Direction.OUTGOING, ConnectionSpec(
        name="out", protocol="smtp", host="127.0.0.1", port=25, encryption="none", from_address="a@example.org",
        default=True))
    ids = [admin.outgoing.send(["b@example.org"], subject=f"m{n}", body="hi\n").id for n in range(2)]
    clone = _worker_on_a_clone(monkeypatch)
    soon = admin.clock() + dt.timedelta(minutes=1)
    with admin.session() as s:
        s.execute(update(IncomingConnection).values(lease_owner=clone, lease_until=soon))
        s.execute(update(OutgoingItem).where(OutgoingItem.id.in_(ids)).values(
            status="sending", lease_owner=f"{clone}/1.0", lease_until=soon))
    assert admin.outgoing.recover() == 0
    assert [admin.outgoing.item(i).status for i in ids] == ["sending", "sending"]
    report = admin.incoming.fetch_one("desk")
    assert report.skipped and clone in report.skipped, report


def test_a_worker_with_a_clock_behind_keeps_the_token_renewal_it_holds(workers: Any, idp: Any) -> None:
    """Worker A, whose clock runs 15 minutes behind, renews an app-only token (its
    request held at the provider); worker B needs the token meanwhile. B waits for A's
    renewal and uses its token: A's lease had looked 13 minutes expired by the store's
    time, so B renewed the token too (spending a refresh token twice, for a user's)."""
    import concurrent.futures

    from .test_oauth import microsoft

    admin = workers()
    cred = microsoft(admin, idp, flow="client-credentials")
    first = admin.oauth.access_token(cred.id, None)
    held = idp.hold_next("token")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        with machine_clock_off(-OFF):
            a = workers()
            a.oauth.invalidate(cred.id, None, first)  # its server refused the token: A renews it
            renewal = pool.submit(a.oauth.access_token, cred.id, None)
            assert held.arrived.wait(10)  # A holds the lease
        b = workers()
        waiting = pool.submit(b.oauth.access_token, cred.id, None)
        done, _ = concurrent.futures.wait([waiting], timeout=1)
        held.release()
        assert not done, "B renewed the token that A was renewing"
        assert waiting.result(timeout=30) == renewal.result(timeout=30) != first
    assert len(idp.grants("client_credentials")) == 2  # the first token, and A's renewal


def test_purge_goes_by_the_stores_clock(workers: Any, dovecot: Any, mailbox: Any) -> None:
    """`queue incoming purge --older-than 1` on a machine whose clock runs two days ahead
    keeps the mail and the log pass downloaded a moment ago: it deleted both, comparing
    its own clock with the database's time stamps."""
    admin, item = _one_stored(workers, dovecot, mailbox)
    admin.incoming.set_status(item.id, "processed")
    with machine_clock_off(dt.timedelta(days=2)):
        assert workers().incoming.purge(dt.timedelta(days=1)) == (0, 0)
    assert [i.id for i in admin.incoming.items()] == [item.id] and len(admin.incoming.logs()) == 1
    assert admin.incoming.purge(dt.timedelta(0)) == (1, 1)  # what is older than the store's now goes
