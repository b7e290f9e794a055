"""What a long-running service meets in production: the store going away mid-pass, a
busy SQLite store, connections edited while a pass runs, a full disk."""
from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailhost import Mailhost, hookimpl
from mailhost.connections import ConnectionSpec
from mailhost.plugins import PluginHost
from mailhost.protocols import Direction
from mailhost.service import Service

from .helpers import message_id_of, outbox_subjects

LINGER_0 = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # struct linger {on, 0 s}: close with a reset


class _Proxy:
    """A TCP proxy on 127.0.0.1 in front of the test PostgreSQL that drops its links on
    demand: every one at once (:meth:`cut`), new ones too while :meth:`down`, or the one
    that carries a statement (:meth:`cut_on`), which never reaches the database."""

    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 5432)) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.refusing = False
        self.links: list[tuple[socket.socket, socket.socket]] = []
        self.lock = threading.Lock()
        self.trigger: tuple[bytes, int, bool] | None = None
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, database_url: str) -> str:
        return database_url.replace("127.0.0.1:5432", f"127.0.0.1:{self.port}")

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.refusing:
                _reset(client)
                continue
            server = socket.create_connection(self.target)
            with self.lock:
                self.links.append((client, server))
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        try:
            while True:
                ready, _, _ = select.select([client, server], [], [], 0.5)
                for sock in ready:
                    data = sock.recv(1 << 16)
                    if not data:
                        raise OSError("closed")
                    if sock is client and self._triggered(data):
                        if self.refusing:
                            self.cut()
                        raise OSError("cut")
                    (server if sock is client else client).sendall(data)
        except (OSError, ValueError):
            pass
        _reset(client)
        _reset(server)

    def _triggered(self, data: bytes) -> bool:
        with self.lock:
            if self.trigger is None or self.trigger[0] not in data:
                return False
            pattern, skip, down = self.trigger
            self.trigger = (pattern, skip - 1, down) if skip else None
            if skip:
                return False
            self.cuts += 1
            self.refusing = self.refusing or down
            return True

    def cut_on(self, statement: bytes, skip: int = 0, down: bool = False) -> None:
        """Drop the link that sends ``statement`` (after ``skip`` times), instead of sending it;
        ``down``: then every link, and refuse new ones until :meth:`up`."""
        with self.lock:
            self.trigger = (statement, skip, down)

    def cut(self) -> None:
        with self.lock:
            links, self.links = self.links, []
        for client, server in links:
            _reset(client)
            _reset(server)

    def down(self) -> None:
        self.refusing = True
        self.cut()

    def up(self) -> None:
        self.refusing = False

    def close(self) -> None:
        self.listener.close()
        self.cut()


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)
        sock.close()
    except OSError:
        pass


@pytest.fixture
def proxy() -> Iterator[_Proxy]:
    p = _Proxy()
    yield p
    p.close()


@pytest.fixture
def proxied(tmp_path: Path, postgres_url: str, proxy: _Proxy, testplugin: object,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[Mailhost]:
    """An installation on PostgreSQL reached through :class:`_Proxy`, with the test plugin."""
    monkeypatch.delenv("MAILHOST_SECRET_KEY", raising=False)
    config = tmp_path / "inst" / "mailhost.toml"
    Mailhost.init(config, proxy.url(postgres_url)).close()
    host = Mailhost.open(config, plugins=PluginHost(only=[], extra=[("testplugin", testplugin)]))
    yield host
    host.close()


def _wait_for(ready: Any, what: str) -> None:
    """Wait until ``ready()``; the deadline is a safety net, not an assertion on speed."""
    deadline = time.monotonic() + 60
    while not ready():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


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


def test_serve_says_once_that_the_store_is_away_and_goes_on(proxied: Mailhost, proxy: _Proxy, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """PostgreSQL unreachable for many ticks: `serve` logs one line (no traceback), one
    more when it is back, keeps running, and then downloads as before."""
    box = tmp_path / "box"
    box.mkdir()
    (box / "a.eml").write_bytes(b"Subject: a\r\n\r\na\r\n")
    proxied.connections.add(Direction.INCOMING, ConnectionSpec(name="desk", protocol="dir", folder=str(box)))
    proxied.connections.set_enabled("desk", True)
    service = Service(proxied, tick=0.02)
    runner = threading.Thread(target=service.run)
    caplog.set_level(logging.INFO, logger="mailhost")
    runner.start()
    try:
        _wait_for(lambda: len(proxied.incoming.items()) == 1, "a.eml stored")
        proxy.down()
        time.sleep(1.0)  # dozens of ticks
        assert runner.is_alive()
        proxy.up()
        (box / "b.eml").write_bytes(b"Subject: b\r\n\r\nb\r\n")
        proxied.connections.set_enabled("desk", True)  # due at once
        _wait_for(lambda: len(proxied.incoming.items()) == 2, "b.eml stored")
        _wait_for(lambda: any("answers again" in r.getMessage() for r in caplog.records), "the store said back")
    finally:
        service.stop.set()
        runner.join(timeout=60)
    assert sorted(i.subject for i in proxied.incoming.items()) == ["a", "b"]
    trouble = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "mailhost.service"]
    assert len(trouble) == 2, [r.getMessage() for r in trouble]
    assert "the store postgresql+psycopg://postgres@127.0.0.1" in trouble[0].getMessage()
    assert "answers again" in trouble[1].getMessage()
    assert not any(r.exc_info for r in caplog.records), "no tracebacks for a store that is away"


def test_serve_says_once_that_the_store_cannot_be_written_while_it_reads(
        tmh: Mailhost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """SQLite locked by another process past the busy wait: reads work, every pass fails
    to take its lease. `serve` says so once, not "back" and "failing" at every tick nor
    "back" while a pass waits out the busy wait (30 s; here 0.3 s, still many ticks), and
    downloads once the lock is gone."""
    import sqlite3

    from mailhost import store

    monkeypatch.setattr(store, "BUSY_TIMEOUT", 0.3)
    box = tmp_path / "box"
    box.mkdir()
    (box / "a.eml").write_bytes(b"Subject: a\r\n\r\na\r\n")
    tmh.connections.add(Direction.INCOMING, ConnectionSpec(name="desk", protocol="dir", folder=str(box)))
    tmh.connections.set_enabled("desk", True)
    holder = sqlite3.connect(tmh.config.sqlite_file, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    service = Service(tmh, tick=0.02)
    runner = threading.Thread(target=service.run)
    caplog.set_level(logging.INFO, logger="mailhost")
    caplog.set_level(logging.DEBUG, logger="mailhost.service")  # the failures it does not say again
    runner.start()
    try:
        _wait_for(lambda: sum(" is busy: " in r.getMessage() for r in caplog.records) >= 3, "three passes failed")
        holder.execute("ROLLBACK")
        _wait_for(lambda: len(tmh.incoming.items()) == 1, "a.eml stored")
        _wait_for(lambda: any("answers again" in r.getMessage() for r in caplog.records), "the store said back")
    finally:
        holder.close()
        service.stop.set()
        runner.join(timeout=60)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "mailhost.service"]
    assert len(said) == 2 and " is busy: " in said[0] and "answers again" in said[1], said


def test_a_link_lost_mid_pass_stores_nothing_twice_and_counts_true(proxied: Mailhost, proxy: _Proxy,
                                                                   tmp_path: Path) -> None:
    """The store's link drops while a batch is written: the pass fails with one sentence
    naming the store, its log counts what was committed, nothing uncommitted is
    acknowledged, and the next pass stores the rest once."""
    box = tmp_path / "box"
    box.mkdir()
    for i in range(600):  # batches of 250 and 350
        (box / f"{i:04d}.eml").write_bytes(f"Subject: {i}\r\n\r\n{i}\r\n".encode())
    proxied.connections.add(Direction.INCOMING, ConnectionSpec(name="desk", protocol="dir", folder=str(box)))
    proxy.cut_on(b"INSERT INTO incoming_queue", skip=1)  # the second batch
    first = proxied.incoming.fetch_one("desk")
    assert proxy.cuts == 1
    assert first.error and "the store postgresql+psycopg://" in first.error and "desk" in first.error, first.error
    assert first.stored == 250 and proxied.incoming.logs()[0].stored == 250
    acknowledged = {p.name[1:-len(".seen")] for p in box.glob(".*.seen")}
    assert acknowledged <= {f"{int(i.subject):04d}.eml" for i in proxied.incoming.items()}
    again = proxied.incoming.fetch_one("desk")
    assert again.error is None and again.stored == 350, again
    subjects = [i.subject for i in proxied.incoming.items()]
    assert sorted(subjects, key=int) == [str(i) for i in range(600)]


#: The statement that records the outcomes of outgoing messages, as PostgreSQL gets it.
_RECORDER = b"UPDATE outgoing_queue SET status=$1::VARCHAR, from_addr="


def test_an_outcome_whose_record_loses_its_link_is_recorded_once_and_not_sent_again(
        proxied: Mailhost, proxy: _Proxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The link to PostgreSQL drops while the outcome of a sent message is recorded: the
    outcome is recorded once the store answers, so the message is not sent again when
    its lease runs out (it was, once for each session, before)."""
    import datetime as dt

    from mailhost.store import utcnow

    outbox = tmp_path / "outbox"
    monkeypatch.setenv("MAILHOST_TESTPLUGIN_OUTBOX", str(outbox))
    proxied.connections.add(Direction.OUTGOING, ConnectionSpec(name="out", protocol="dir", host="box",
                                                               from_address="a@example.org", default=True))
    for i in range(5):
        proxied.outgoing.send([f"r{i}@example.org"], subject=f"m{i}", body="hi")
    proxy.cut_on(_RECORDER)
    report = proxied.outgoing.deliver()
    assert proxy.cuts == 1
    assert report.sent == 5, report.as_dicts()
    later = utcnow() + dt.timedelta(hours=1)  # every lease has run out
    monkeypatch.setattr(proxied.outgoing, "clock", lambda: later)
    proxied.outgoing.deliver()
    assert outbox_subjects(outbox / "box") == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    items = proxied.outgoing.items()
    assert [(i.status, i.attempts) for i in items] == [("sent", 1)] * 5


def test_messages_a_stopped_worker_never_tried_are_queued_again_once_the_store_answers(
        proxied: Mailhost, proxy: _Proxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL goes away while the outcome of the first message of a batch is
    recorded, for longer than the recorder tries: the worker stops before sending the
    rest. Those were never tried, so they are queued again as soon as the store answers
    (the next pass sends them), not after their lease; the one that was sent stays
    leased, as its outcome is unknown to the store and sending it again now could send
    it twice."""
    from mailhost.outgoing import _Recorder

    outbox = tmp_path / "outbox"
    monkeypatch.setenv("MAILHOST_TESTPLUGIN_OUTBOX", str(outbox))
    monkeypatch.setattr(_Recorder, "RETRY_FOR", 0.5)  # gives up soon, as after a longer outage
    proxied.connections.add(Direction.OUTGOING, ConnectionSpec(name="out", protocol="dir", host="box",
                                                               from_address="a@example.org", default=True))
    for i in range(5):
        proxied.outgoing.send([f"r{i}@example.org"], subject=f"m{i}", body="hi")
    proxy.cut_on(_RECORDER, down=True)
    first = proxied.outgoing.deliver()
    assert proxy.cuts == 1
    assert first.error and "the store postgresql+psycopg://" in first.error, first.error
    assert outbox_subjects(outbox / "box") == [b"m0"]
    proxy.up()
    second = proxied.outgoing.deliver()
    assert second.error is None and second.sent == 4, second.as_dicts()
    assert outbox_subjects(outbox / "box") == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    by_subject = {i.subject: (i.status, i.attempts) for i in proxied.outgoing.items()}
    assert by_subject == {"m0": ("sending", 0), **{f"m{i}": ("sent", 1) for i in range(1, 5)}}


def test_a_message_that_never_reached_a_server_is_not_held_in_doubt_when_its_record_is_lost(
        proxied: Mailhost, proxy: _Proxy, testplugin: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """The outcome of a message whose server could not be reached is lost with the
    store: nothing of it went out, so once the store answers it is queued again at once
    and tried anew, with no "interrupted" attempt (it waited out its lease and then
    counted as sent twice, maybe, before)."""
    from mailhost.outgoing import _Recorder

    from .test_outgoing import closed_port

    monkeypatch.setattr(_Recorder, "RETRY_FOR", 0.5)
    host = Mailhost.open(proxied.config.path, plugins=PluginHost(only=["smtp"]))
    try:
        host.connections.add(Direction.OUTGOING, ConnectionSpec(
            name="out", protocol="smtp", host="127.0.0.1", port=closed_port(), encryption="none",
            from_address="a@example.org", default=True))
        sent = host.outgoing.send(["r@example.org"], subject="m0", body="hi")
        proxy.cut_on(_RECORDER, down=True)
        first = host.outgoing.deliver()
        assert proxy.cuts == 1 and first.error and "the store postgresql+psycopg://" in first.error, first.error
        proxy.up()
        second = host.outgoing.deliver()
        assert second.error is None and second.recovered == 0, second.as_dicts()
        item = host.outgoing.item(sent.id)
        assert item.status == "queued" and "connection refused" in (item.last_error or ""), item.last_error
        assert [a.result for a in item.attempts_log] == ["temporary"]
    finally:
        host.close()


def test_a_deliver_that_ends_while_the_store_is_away_leaves_in_doubt_only_what_it_sent(
        proxied: Mailhost, proxy: _Proxy, plugin_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`mailhost deliver` sends a message, PostgreSQL goes away before its outcome is
    recorded, and the process ends. The next run counts one message interrupted: the
    one that did go out (its outcome was never stored, so it may arrive twice, the one
    duplicate no client can avoid); the others, never tried, go back untouched."""
    from mailhost.store import OutgoingAttempt
    from sqlalchemy import select

    from .helpers import run_cli
    from .test_outgoing_processes import _tune

    outbox = Path(plugin_env["MAILHOST_TESTPLUGIN_OUTBOX"])
    _tune(proxied, lease_seconds=10)  # the recorder tries for half a lease before it gives up
    proxied.connections.add(Direction.OUTGOING, ConnectionSpec(name="out", protocol="dir", host="box",
                                                               from_address="a@example.org", default=True))
    for i in range(5):
        proxied.outgoing.send([f"r{i}@example.org"], subject=f"m{i}", body="hi")
    proxy.cut_on(_RECORDER, down=True)
    first = run_cli("--config", str(proxied.config.path), "deliver",
                    env={**plugin_env, "MAILHOST_LOAD_PLUGINS": "testplugin"})
    assert first.returncode == 1 and "the store postgresql+psycopg://" in first.stderr, first.stderr
    assert outbox_subjects(outbox / "box") == [b"m0"]
    proxy.up()
    monkeypatch.setenv("MAILHOST_TESTPLUGIN_OUTBOX", str(outbox))
    second = proxied.outgoing.deliver()  # the next run: the first one's process is gone
    assert second.recovered == 5 and second.sent == 5, second.as_dicts()
    with proxied.session() as s:
        interrupted = [a.item.subject for a in s.scalars(select(OutgoingAttempt)) if a.result == "interrupted"]
    assert interrupted == ["m0"]
    assert outbox_subjects(outbox / "box") == [b"m0", b"m0", b"m1", b"m2", b"m3", b"m4"]


@pytest.mark.parametrize("command", [
    ["queue", "incoming", "purge", "--older-than", "0"],  # a store session
    ["queue", "outgoing", "purge", "--older-than", "0"],  # the outgoing pipeline's writer
])
def test_a_store_kept_busy_is_one_sentence_from_the_cli(home: Path, command: list[str],
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Another process holds SQLite's write lock past the busy wait: the command says
    the store is busy in one sentence, exit status 1, not an "unexpected error"."""
    import sqlite3

    from mailhost import store
    from mailhost.cli import main

    monkeypatch.setattr(store, "BUSY_TIMEOUT", 0.2)
    holder = sqlite3.connect(home / "mailhost.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        with pytest.raises(SystemExit) as exit_:
            main(command)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        # main() logs to the stderr pytest captured for this test: later tests' logs must not go there
        root.handlers[:], root.level = handlers, level
    err = capsys.readouterr().err
    assert exit_.value.code == 1
    assert err.startswith(f"mailhost: the store sqlite:///{home / 'mailhost.db'} is busy"), err
    assert "try again" in err and "report" not in err and len(err.strip().splitlines()) == 1, err


@contextlib.contextmanager
def _locked_by_another_session(database_url: str, table: str, name: str) -> Iterator[None]:
    """An admin's psql session left open on PostgreSQL: ``BEGIN; SELECT ... FROM table
    WHERE name = ... FOR UPDATE``. Ended after a minute at the latest (a safety net: a
    statement that waits for ever would otherwise hang the test, not fail it)."""
    import psycopg
    from psycopg import sql

    holder = psycopg.connect(f"host=127.0.0.1 port=5432 user=postgres dbname={database_url.rsplit('/', 1)[1]}")
    holder.execute(sql.SQL("SELECT id FROM {} WHERE name = %s FOR UPDATE").format(sql.Identifier(table)), (name,))
    net = threading.Timer(60, holder.rollback)
    net.start()
    try:
        yield
    finally:
        net.cancel()
        holder.rollback()
        holder.close()


def _pg_installation_with_one_message(tmp_path: Path, postgres_url: str,
                                      monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A PostgreSQL installation whose statements wait 0.2 s for a lock, and a folder
    holding one message; the config file and the folder."""
    from mailhost import store

    monkeypatch.delenv("MAILHOST_SECRET_KEY", raising=False)
    monkeypatch.setattr(store, "BUSY_TIMEOUT", 0.2)
    box = tmp_path / "box"
    box.mkdir()
    (box / "a.eml").write_bytes(b"Subject: a\r\n\r\na\r\n")
    config = tmp_path / "pg" / "mailhost.toml"
    Mailhost.init(config, postgres_url).close()
    return config, box


def test_a_row_an_admin_keeps_locked_on_postgresql_is_one_sentence_from_the_cli(
        tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A psql session holds a connection's row (`SELECT ... FOR UPDATE`, never
    committed): `outgoing edit` waits the busy timeout for it, then says in one sentence,
    exit 1, what is locked and what to do, instead of waiting for ever."""
    from mailhost import store
    from mailhost.cli import main

    monkeypatch.delenv("MAILHOST_SECRET_KEY", raising=False)
    monkeypatch.setattr(store, "BUSY_TIMEOUT", 0.2)
    config = tmp_path / "pg" / "mailhost.toml"
    host = Mailhost.init(config, postgres_url)
    host.connections.add(Direction.OUTGOING, ConnectionSpec(name="out", protocol="smtp", host="127.0.0.1"))
    host.close()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        with _locked_by_another_session(postgres_url, "outgoing_connections", "out"), \
                pytest.raises(SystemExit) as exit_:
            main(["--config", str(config), "outgoing", "edit", "out", "--description", "edited"])
    finally:
        root.handlers[:], root.level = handlers, level  # main() logged to this test's captured stderr
    err = capsys.readouterr().err
    assert exit_.value.code == 1, err
    assert err.startswith("mailhost: the store postgresql+psycopg://postgres@127.0.0.1:5432/") and \
        " is busy: a row of outgoing_connections stayed locked by another session for 0.2 s " in err, err
    assert "idle in transaction" in err and "try again" in err and len(err.strip().splitlines()) == 1, err
    host = Mailhost.open(config)
    try:
        assert host.connections.get(Direction.OUTGOING, "out").description != "edited"  # nothing half-done
    finally:
        host.close()


def test_a_pass_on_a_mailbox_an_admin_keeps_locked_on_postgresql_ends_as_busy(
        tmp_path: Path, postgres_url: str, testplugin: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """A download pass whose connection row a psql session holds ends as a busy store
    after the busy timeout (what `serve` logs once and tries again at its next tick),
    and the next pass, once the session is gone, downloads as before."""
    from mailhost.errors import StoreError

    config, box = _pg_installation_with_one_message(tmp_path, postgres_url, monkeypatch)
    host = Mailhost.open(config, plugins=PluginHost(only=[], extra=[("testplugin", testplugin)]))
    try:
        host.connections.add(Direction.INCOMING, ConnectionSpec(name="desk", protocol="dir", folder=str(box)))
        with _locked_by_another_session(postgres_url, "incoming_connections", "desk"), \
                pytest.raises(StoreError, match=r" is busy: a row of incoming_connections stayed locked"):
            host.incoming.fetch_one("desk")
        again = host.incoming.fetch_one("desk")
        assert again.error is None and again.stored == 1, again
    finally:
        host.close()


def test_the_web_admin_answers_503_while_the_store_is_away(proxied: Mailhost, proxy: _Proxy) -> None:
    """A store that cannot be reached is the service being unavailable for a while, not
    a server bug: 503 with Retry-After and the store's sentence; 200 again once it is back."""
    import http.client

    from mailhost.web import start_web

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    web = start_web(proxied, f"127.0.0.1:{port}")

    def get() -> http.client.HTTPResponse:
        name, _, port = web.address.rpartition(":")
        conn = http.client.HTTPConnection(name, int(port), timeout=60)
        conn.request("GET", "/api/queue/incoming", headers={"Host": "localhost"})
        response = conn.getresponse()
        response.read()
        conn.close()
        return response

    try:
        assert get().status == 200
        proxy.down()
        away = get()
        assert away.status == 503 and away.getheader("Retry-After") == "30", (away.status, away.getheaders())
        proxy.up()
        _wait_for(lambda: get().status == 200, "the web admin answers again")
    finally:
        web.stop()


def test_a_pass_hung_inside_its_transaction_on_postgresql_frees_its_rows(
        tmp_path: Path, postgres_url: str, testplugin: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """A download pass hangs (stopped, stuck) in the middle of its batch's transaction,
    its connection's row locked: PostgreSQL ends its session after the idle-in-transaction
    timeout, so an admin's edit gets through instead of failing as busy for as long as
    the process hangs. The hung pass, once it goes on, stores nothing and says so in one
    sentence; the next pass stores the message once."""
    from mailhost import store
    from mailhost.errors import StoreError
    from mailhost.incoming import Incoming

    monkeypatch.setattr(store, "IDLE_IN_TRANSACTION_TIMEOUT", 1)
    config, box = _pg_installation_with_one_message(tmp_path, postgres_url, monkeypatch)
    host = Mailhost.open(config, plugins=PluginHost(only=[], extra=[("testplugin", testplugin)]))
    admin = Mailhost.open(config, plugins=PluginHost(only=[], extra=[("testplugin", testplugin)]))
    hung, going_on = threading.Event(), threading.Event()
    original = Incoming._fingerprints_in

    def hang(*args: Any) -> Any:  # inside the batch's transaction, after it locked the row; once
        found = original(*args)
        if not hung.is_set():
            hung.set()
            going_on.wait(120)
        return found

    monkeypatch.setattr(Incoming, "_fingerprints_in", staticmethod(hang))
    reports: list[Any] = []
    try:
        host.connections.add(Direction.INCOMING, ConnectionSpec(name="desk", protocol="dir", folder=str(box)))
        worker = threading.Thread(target=lambda: reports.append(host.incoming.fetch_one("desk")))
        worker.start()
        _wait_for(hung.is_set, "the pass reaches its batch")

        def edited() -> bool:
            try:
                admin.connections.edit(Direction.INCOMING, "desk", ConnectionSpec(description="edited"))
            except StoreError as exc:  # busy: the hung session still holds the row
                assert " is busy: a row of incoming_connections stayed locked" in str(exc), exc
                return False
            return True

        _wait_for(edited, "the edit gets the row the hung pass locked")
        going_on.set()
        worker.join()
        [hung_report] = reports
        assert hung_report.stored == 0 and hung_report.error, hung_report
        assert "the store postgresql+psycopg://" in hung_report.error and "\n" not in hung_report.error
        again = host.incoming.fetch_one("desk")
        assert again.error is None and again.stored == 1, again
        assert [i.subject for i in host.incoming.items()] == ["a"]
        assert admin.connections.get(Direction.INCOMING, "desk").description == "edited"
    finally:
        going_on.set()
        host.close()
        admin.close()


def test_serve_started_before_postgresql_waits_for_it(tmp_path: Path, postgres_url: str, proxy: _Proxy,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """At boot mailhost may start before PostgreSQL: `serve` says once that the store does
    not answer and waits for it (no exit for a supervisor to catch); a one-shot command
    meanwhile fails with exit 1 (a failure while running, not bad input), naming the
    fix; a server that answers "no" (a database that does not exist) stops serve at once."""
    import signal
    import subprocess
    import sys

    from .helpers import run_cli

    monkeypatch.delenv("MAILHOST_SECRET_KEY", raising=False)
    config = tmp_path / "inst" / "mailhost.toml"
    Mailhost.init(config, proxy.url(postgres_url)).close()
    config.write_text(config.read_text().replace('listen = "127.0.0.1:8025"', 'listen = ""'))  # no web admin
    proxy.down()
    fetch = run_cli("--config", str(config), "fetch")
    assert fetch.returncode == 1, fetch.stderr
    assert fetch.stderr.startswith("mailhost: cannot reach the store postgresql+psycopg://"), fetch.stderr
    assert "start the database server, or check [store] url in" in fetch.stderr and "Traceback" not in fetch.stderr
    serve = subprocess.Popen([sys.executable, "-m", "mailhost", "--config", str(config), "serve"],
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "MAILHOST_LOAD_PLUGINS": "builtin"})
    try:
        assert serve.stderr is not None
        first = serve.stderr.readline()
        assert first.startswith("mailhost: cannot reach the store") and "waiting for it" in first, first
        time.sleep(1.5)  # a few tries while it is away
        assert serve.poll() is None
        proxy.up()
        said = [serve.stderr.readline() for _ in range(2)]
        assert said[0] == "mailhost: the store answers now\n", said
        assert said[1].startswith("mailhost serving from"), said
    finally:
        serve.send_signal(signal.SIGTERM)
        rest = serve.communicate(timeout=60)[1]
    assert serve.returncode == 0 and "Traceback" not in rest, rest
    gone = config.with_name("gone.toml")
    gone.write_text(config.read_text().replace(postgres_url.rsplit("/", 1)[1] + '"', 'no_such_database_here"', 1))
    assert "no_such_database_here" in gone.read_text()
    stopped = run_cli("--config", str(gone), "serve", timeout=60)
    assert stopped.returncode == 2, stopped.stderr
    assert 'database "no_such_database_here" does not exist' in stopped.stderr and "waiting" not in stopped.stderr
