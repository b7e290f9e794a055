"""The store: migrations from empty on SQLite and PostgreSQL, models matching them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import Connection, inspect, text

from mailhost import Mailhost, store
from mailhost.errors import ConfigError, StoreError
from mailhost.protocols import Direction

from .helpers import run_cli

TABLES = {
    "incoming_connections", "outgoing_connections", "oauth_credentials", "certificates",
    "incoming_connection_certificates", "incoming_queue", "incoming_seen", "folder_cursors",
    "incoming_log", "incoming_log_entries", "outgoing_queue", "outgoing_attempts",
}


def test_migrations_from_empty(mh_any: Mailhost) -> None:
    """`init` migrates an empty store to the newest schema, with every table."""
    assert store.current_revision(mh_any.engine) == store.head_revision()
    assert TABLES <= set(inspect(mh_any.engine).get_table_names())


def test_models_match_migrations(mh_any: Mailhost) -> None:
    """Alembic finds nothing to add: the migrations build exactly what the models say."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    with mh_any.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": False, "include_object": store.include_object})
        diff = compare_metadata(context, store.Base.metadata)
    assert diff == []
    # The partial unique index the models leave out is there all the same.
    indexes = {i["name"]: i for i in inspect(mh_any.engine).get_indexes("outgoing_connections")}
    assert set(store.MIGRATION_ONLY_INDEXES) <= set(indexes)
    assert indexes["uq_outgoing_connections_default"]["unique"]


def test_upgrade_keeps_data(mh_any: Mailhost, tmh_factory) -> None:
    """Upgrading again (as every `init` does) keeps what the store holds."""
    host = tmh_factory(mh_any)
    from mailhost.connections import ConnectionSpec

    host.connections.add(Direction.OUTGOING, ConnectionSpec(name="out", protocol="dir", host="outbox"))
    host.migrate()
    assert [c.name for c in host.connections.list(Direction.OUTGOING)] == ["out"]


def test_sqlite_runs_in_wal_mode(mh: Mailhost) -> None:
    """SQLite uses WAL with full sync, so a commit survives a crash."""
    with mh.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 2
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1


def test_store_older_than_code_is_refused(tmp_path: Path) -> None:
    """A store not migrated to the code's schema gives a clear error naming `init`."""
    config = tmp_path / "mailhost.toml"
    Mailhost.init(config).close()
    host = Mailhost.open(config)
    with host.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'old'"))
    with pytest.raises(ConfigError, match="mailhost init"):
        host.connections.list(Direction.INCOMING)


def test_init_with_postgresql(tmp_path: Path, postgres_url: str) -> None:
    """`mailhost init --database postgresql+psycopg://...` creates the schema there."""
    out = run_cli("--config", str(tmp_path / "m.toml"), "init", "--database", postgres_url)
    assert out.returncode == 0, out.stderr
    assert f'url = "{postgres_url}"' in (tmp_path / "m.toml").read_text()
    out = run_cli("--config", str(tmp_path / "m.toml"), "incoming", "list", "--json")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_init_with_bad_database_url(tmp_path: Path) -> None:
    """A database URL of an unsupported kind is refused before anything is written."""
    out = run_cli("--config", str(tmp_path / "m.toml"), "init", "--database", "mysql://x@y/z")
    assert out.returncode == 2
    assert "supports sqlite and postgresql" in out.stderr
    assert not (tmp_path / "m.toml").exists()


@pytest.mark.parametrize("url, expect", [
    ("postgresql+psycopg://mailhost:s3cret@db.example.org:abc/mailhost", "is not valid: use sqlite:///FILE"),
    ("mysql://mailhost:s3cret@db.example.org/mailhost", "supports sqlite and postgresql"),
    ("postgresql+psycopg2://mailhost:s3cret@127.0.0.1:1/mailhost", "mailhost uses psycopg 3, so write postgresql+psycopg://"),
])
def test_a_malformed_database_url_is_bad_input_and_keeps_its_password(tmp_path: Path, url: str, expect: str) -> None:
    """A store URL with a typo (a port that is no number, another database or driver) is
    one sentence, exit 2, that never shows the password in it; nothing is written."""
    for args in (("init", "--database", url), ("incoming", "list")):
        if args[0] != "init":
            (tmp_path / "m.toml").write_text(f'[store]\nurl = "{url}"\n')
        out = run_cli("--config", str(tmp_path / "m.toml"), *args)
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        assert expect in out.stderr and "s3cret" not in out.stderr and "mailhost:***@" in out.stderr, out.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == (["m.toml"] if args[0] != "init" else []), out.stderr


@pytest.mark.parametrize("url, expect", [
    ("sqlite:///nowhere/at/all.db", "in a folder that does not exist"),
    ("sqlite:////tmp", "a folder: give the path of a file"),
    ("sqlite:///", "in-memory SQLite store, which keeps nothing"),
    ("sqlite:///:memory:", "in-memory SQLite store"),
    ("postgresql+psycopg://nobody@127.0.0.1:1/x", "cannot open the store"),
])
def test_a_failed_init_leaves_nothing(tmp_path: Path, url: str, expect: str) -> None:
    """Whatever stops `init` (a store it cannot make or reach, a key it cannot use), it
    leaves no config, key or database behind, so the corrected command just works."""
    out = run_cli("--config", str(tmp_path / "mailhost.toml"), "init", "--database", url, cwd=tmp_path)
    assert out.returncode == 2 and expect in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert list(tmp_path.iterdir()) == []
    out = run_cli("--config", str(tmp_path / "mailhost.toml"), "init", env={"MAILHOST_SECRET_KEY": "garbage"})
    assert out.returncode == 2 and "not a valid Fernet key" in out.stderr and list(tmp_path.iterdir()) == []
    assert run_cli("--config", str(tmp_path / "mailhost.toml"), "init").returncode == 0


@pytest.mark.parametrize("where", ["config", "database", "new folder"])
def test_init_where_this_user_cannot_write_is_one_sentence(tmp_path: Path, where: str) -> None:
    """`init` as a user who may not write the folder of the config, of the store or of a
    folder to create: one sentence naming that folder and the fix (exit 2, not an
    unexpected PermissionError to report), and nothing left behind."""
    locked, free = tmp_path / "locked", tmp_path / "free"
    locked.mkdir()
    free.mkdir()
    args = {"config": ["--config", str(locked / "mailhost.toml"), "init"],
            "database": ["--config", str(free / "mailhost.toml"), "init", "--database",
                         f"sqlite:///{locked / 'mailhost.db'}"],
            "new folder": ["--config", str(locked / "etc" / "mailhost.toml"), "init"]}[where]
    locked.chmod(0o555)
    try:
        out = run_cli(*args, cwd=tmp_path, obey_permissions=True)
    finally:
        locked.chmod(0o755)
    assert out.returncode == 2, out.stderr
    assert f"cannot create files in {locked} (Permission denied): make that folder writable" in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    assert list(locked.iterdir()) == [] and list(free.iterdir()) == []


def test_init_in_a_new_folder(tmp_path: Path) -> None:
    """`--config DIR/mailhost.toml init` with DIR not there yet creates DIR (as a config
    file's folder is created for it); a failed init removes the folders it made."""
    config = tmp_path / "etc" / "mailhost" / "mailhost.toml"
    out = run_cli("--config", str(config), "init", "--database", "postgresql+psycopg://nobody@127.0.0.1:1/x")
    assert out.returncode == 2 and list(tmp_path.iterdir()) == [], out.stderr
    out = run_cli("--config", str(config), "init")
    assert out.returncode == 0, out.stderr
    assert {"mailhost.toml", "mailhost.key", "mailhost.db"} <= {p.name for p in config.parent.iterdir()}


def test_a_failed_init_names_the_option_to_fix(tmp_path: Path) -> None:
    """The store of `init --database URL` cannot be opened: the sentence names --database,
    not the config file that the failed init did not leave behind."""
    config = tmp_path / "mailhost.toml"
    out = run_cli("--config", str(config), "init", "--database", "postgresql+psycopg://nobody@127.0.0.1:1/x")
    assert out.returncode == 2 and "cannot open the store" in out.stderr, out.stderr
    assert "check --database" in out.stderr and str(config) not in out.stderr, out.stderr


def test_a_missing_store_file_is_not_created(tmp_path: Path) -> None:
    """A command on a config whose SQLite file is gone says so, and creates no empty store."""
    cfg = tmp_path / "mailhost.toml"
    assert run_cli("--config", str(cfg), "init").returncode == 0
    cfg.write_text(cfg.read_text().replace("sqlite:///mailhost.db", "sqlite:///missing.db"))
    out = run_cli("--config", str(cfg), "incoming", "list")
    assert out.returncode == 2 and "missing.db does not exist: run `mailhost init`" in out.stderr
    assert not (tmp_path / "missing.db").exists()


@pytest.mark.parametrize("locked", ["folder", "file"])
def test_a_store_this_user_may_not_write_says_so_not_check_the_url(tmp_path: Path, plugin_env: dict[str, str],
                                                                   locked: str) -> None:
    """An installation made by root and run by a service account: SQLite refuses even a
    read when it cannot create the store's -wal and -shm files beside it ("attempt to
    write a readonly database"); a file it may only read fails the first write. The
    sentence names the folder (or the file) and the fix, instead of sending the admin to
    check a [store] url that is right, or calling the store read-only."""
    import sqlite3

    config = tmp_path / "mailhost.toml"
    assert run_cli("--config", str(config), "init").returncode == 0
    db = sqlite3.connect(tmp_path / "mailhost.db")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()  # the last connection to close removes -wal and -shm
    assert not (tmp_path / "mailhost.db-wal").exists()
    target = tmp_path if locked == "folder" else tmp_path / "mailhost.db"
    target.chmod(0o555 if locked == "folder" else 0o400)
    add = ("--config", str(config), "outgoing", "add", "o", "--protocol", "dir", "--host", "box")
    env = {**plugin_env, "MAILHOST_LOAD_PLUGINS": "testplugin"}
    try:
        out = run_cli(*add, env=env, obey_permissions=True)
    finally:
        target.chmod(0o755 if locked == "folder" else 0o600)
    assert out.returncode == 1, out.stderr
    # SQLite gave the -wal and -shm files it made meanwhile the store's mode: named too
    expect = (f"its folder {tmp_path} is not writable for this user" if locked == "folder" else
              "mailhost.db, mailhost.db-wal and mailhost.db-shm are not readable and writable for this user")
    assert f"the store {tmp_path / 'mailhost.db'} cannot be used: {expect}" in out.stderr, out.stderr
    assert "check [store] url" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
    for made in tmp_path.glob("mailhost.db-*"):
        made.chmod(0o600)
    assert run_cli(*add, env=env, obey_permissions=True).returncode == 0


def test_init_twice_keeps_config(tmp_path: Path) -> None:
    """A second `init` keeps the config and key, and only upgrades the store."""
    cfg = tmp_path / "mailhost.toml"
    assert run_cli("--config", str(cfg), "init").returncode == 0
    key = (tmp_path / "mailhost.key").read_bytes()
    assert run_cli("--config", str(cfg), "init").returncode == 0
    assert (tmp_path / "mailhost.key").read_bytes() == key


def _add_0002_connection(conn: Connection) -> None:
    """Incoming connection 1, desk, as a store at schema 0002 holds it."""
    conn.execute(text(
        "INSERT INTO incoming_connections (id, name, description, protocol, encryption, interval, timeout, "
        "after_download, options, enabled, created_at, updated_at) VALUES (1, 'desk', '', 'imap', 'ssl', "
        "1, 30000, 'mark-seen', '{}', false, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))


def test_0003_turns_acknowledged_flags_into_one_mark_per_folder(database_url: str) -> None:
    """Upgrading a 0002 store: each folder is acknowledged up to just below its first
    unacknowledged key (the next pass repeats the rest), also folders without a cursor
    row (POP3); stored items keep their pass in the log through log_id."""
    engine = store.make_engine(database_url)
    try:
        store.upgrade(engine, "0002")
        with engine.begin() as conn:
            _add_0002_connection(conn)
            conn.execute(text("INSERT INTO folder_cursors (connection_id, folder, state, updated_at) "
                              "VALUES (1, 'INBOX', '{\"last_uid\": 3}', CURRENT_TIMESTAMP)"))
            for i, (folder, acked) in enumerate([("INBOX", True), ("INBOX", True), ("INBOX", False),
                                                 ("INBOX", True), ("", True), ("", True)], start=1):
                conn.execute(text(
                    "INSERT INTO incoming_seen (id, connection_id, folder, key, fingerprint, acknowledged, seen_at) "
                    "VALUES (:id, 1, :folder, :key, 'f', :acked, CURRENT_TIMESTAMP)"),
                    {"id": i, "folder": folder, "key": f"k{i}", "acked": acked})
        store.upgrade(engine)
        with engine.connect() as conn:
            marks = dict(conn.execute(text("SELECT folder, acknowledged_through FROM folder_cursors")).all())
            state = conn.execute(text("SELECT state FROM folder_cursors WHERE folder = 'INBOX'")).scalar()
        assert marks == {"INBOX": 2, "": 6}
        assert (json.loads(state) if isinstance(state, str) else state) == {"last_uid": 3}
        assert "acknowledged" not in {c["name"] for c in inspect(engine).get_columns("incoming_seen")}
        assert "log_id" in {c["name"] for c in inspect(engine).get_columns("incoming_queue")}
    finally:
        engine.dispose()


def test_a_migration_that_copies_a_table_keeps_the_links_to_it(database_url: str) -> None:
    """0003 copies incoming_queue on SQLite; the copy must not run the ON DELETE action
    of incoming_seen.item_id (SET NULL), which cut every stored key from its item."""
    engine = store.make_engine(database_url)
    try:
        store.upgrade(engine, "0002")
        with engine.begin() as conn:
            _add_0002_connection(conn)
            conn.execute(text(
                "INSERT INTO incoming_queue (id, connection_id, connection_name, folder, status, size, fingerprint, "
                "raw, created_at, updated_at) VALUES (7, 1, 'desk', 'INBOX', 'new', 1, 'f', 'x', CURRENT_TIMESTAMP, "
                "CURRENT_TIMESTAMP)"))
            conn.execute(text(
                "INSERT INTO incoming_seen (id, connection_id, folder, key, fingerprint, acknowledged, item_id, "
                "seen_at) VALUES (1, 1, 'INBOX', 'k', 'f', true, 7, CURRENT_TIMESTAMP)"))
        store.upgrade(engine)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT item_id FROM incoming_seen")).all() == [(7,)]
            if engine.dialect.name == "sqlite":  # and the store's connections check foreign keys again
                assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    finally:
        engine.dispose()


def test_ids_are_never_reused(mh_any: Mailhost, tmh_factory, tmp_path: Path) -> None:
    """A queue item or log pass id, once given out (printed by `send`, passed to the
    message_stored and message_sent hooks), never names another message, also after the
    newest ones are deleted or purged: on SQLite as on PostgreSQL."""
    import datetime as dt

    from mailhost.connections import ConnectionSpec

    host = tmh_factory(mh_any)
    host.connections.add(Direction.OUTGOING, ConnectionSpec(name="out", protocol="dir", host="outbox",
                                                            from_address="a@example.org", default=True))
    sent = [host.outgoing.send(["b@example.org"], subject=f"s{i}", body="hi").id for i in range(2)]
    host.outgoing.delete(sent[-1])
    assert host.outgoing.send(["b@example.org"], subject="again", body="hi").id > max(sent)

    box = tmp_path / "box"
    box.mkdir()
    host.connections.add(Direction.INCOMING, ConnectionSpec(name="in", protocol="dir", folder=str(box)))
    for name in ("a", "b"):
        (box / name).write_bytes(f"Subject: {name}\r\n\r\n{name}\r\n".encode())
    [first] = host.incoming.fetch(["in"])
    items, passes = [i.id for i in host.incoming.items()], [p.id for p in host.incoming.logs()]
    assert len(items) == 2 and host.incoming.purge(dt.timedelta(0), ("new",)) == (2, 1)
    (box / "c").write_bytes(b"Subject: c\r\n\r\nc\r\n")
    host.incoming.fetch(["in"])
    [item] = host.incoming.items()
    assert item.id > max(items) and min(p.id for p in host.incoming.logs()) > max(passes)


def test_0005_keeps_every_row_and_link(database_url: str) -> None:
    """Upgrading a 0004 store to ids that are never reused keeps every queue item, pass,
    attempt and the links between them (no foreign key action fires on the way)."""
    engine = store.make_engine(database_url)
    try:
        store.upgrade(engine, "0004")
        now = "CURRENT_TIMESTAMP"
        with engine.begin() as conn:
            run = lambda sql: conn.execute(text(sql))  # noqa: E731
            run("INSERT INTO incoming_connections (id, name, description, protocol, encryption, interval, timeout, "
                f"after_download, options, enabled, created_at, updated_at) VALUES (1, 'desk', '', 'imap', 'ssl', "
                f"1, 30000, 'mark-seen', '{{}}', false, {now}, {now})")
            run("INSERT INTO incoming_log (connection_id, connection_name, started_at, status, listed, stored, "
                f"duplicates, acknowledged, bytes) VALUES (1, 'desk', {now}, 'ok', 1, 1, 1, 1, 1)")
            log_id = run("SELECT max(id) FROM incoming_log").scalar()
            run("INSERT INTO incoming_queue (connection_id, connection_name, folder, status, size, fingerprint, raw, "
                f"created_at, updated_at, log_id) VALUES (1, 'desk', 'INBOX', 'new', 1, 'f', 'x', {now}, {now}, {log_id})")
            item_id = run("SELECT max(id) FROM incoming_queue").scalar()
            run("INSERT INTO incoming_seen (connection_id, folder, key, fingerprint, item_id, seen_at) "
                f"VALUES (1, 'INBOX', 'k', 'f', {item_id}, {now})")
            run("INSERT INTO incoming_log_entries (log_id, item_id, at, result) "
                f"VALUES ({log_id}, {item_id}, {now}, 'duplicate')")
            run("INSERT INTO outgoing_queue (connection_name, status, recipients, size, raw, attempts, fell_back, "
                f"created_at, updated_at) VALUES ('out', 'sent', '[]', 1, 'x', 1, false, {now}, {now})")
            out_id = run("SELECT max(id) FROM outgoing_queue").scalar()
            run(f"INSERT INTO outgoing_attempts (item_id, at, result) VALUES ({out_id}, {now}, 'sent')")
        store.upgrade(engine)
        with engine.begin() as conn:
            run = lambda sql: conn.execute(text(sql))  # noqa: E731
            assert run("SELECT item_id FROM incoming_seen").all() == [(item_id,)]
            assert run("SELECT log_id, item_id FROM incoming_log_entries").all() == [(log_id, item_id)]
            assert run("SELECT id, log_id FROM incoming_queue").all() == [(item_id, log_id)]
            assert run("SELECT item_id FROM outgoing_attempts").all() == [(out_id,)]
            # The newest rows deleted, the next ones get new ids.
            run(f"DELETE FROM outgoing_queue WHERE id = {out_id}")
            run("INSERT INTO outgoing_queue (connection_name, status, recipients, size, raw, attempts, fell_back, "
                f"created_at, updated_at) VALUES ('out', 'sent', '[]', 1, 'x', 1, false, {now}, {now})")
            assert run("SELECT max(id) FROM outgoing_queue").scalar() > out_id
            run(f"DELETE FROM incoming_queue WHERE id = {item_id}")
            run("INSERT INTO incoming_queue (connection_id, connection_name, folder, status, size, fingerprint, raw, "
                f"created_at, updated_at) VALUES (1, 'desk', 'INBOX', 'new', 1, 'g', 'x', {now}, {now})")
            assert run("SELECT max(id) FROM incoming_queue").scalar() > item_id
        assert "incoming_seen" in inspect(engine).get_table_names()
    finally:
        engine.dispose()


def test_a_postgresql_server_that_never_answers_is_a_clear_error(tmp_path: Path) -> None:
    """A PostgreSQL address that takes the connection but never answers (a hung server,
    a firewall that swallows packets) fails after the default connect timeout with one
    sentence, instead of hanging the command for good."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel completes the handshake; nobody ever reads or answers
    try:
        url = f"postgresql+psycopg://postgres@127.0.0.1:{silent.getsockname()[1]}/test"
        out = run_cli("--config", str(tmp_path / "m.toml"), "init", "--database", url, timeout=60)
    finally:
        silent.close()
    assert out.returncode == 2, out.stderr
    assert "cannot open the store" in out.stderr and "timeout" in out.stderr and "--database" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "m.toml").exists()


def test_a_database_url_option_the_driver_refuses_is_a_clear_error(tmp_path: Path, postgres_url: str) -> None:
    """An option in the URL that libpq refuses is the admin's to fix: exit 2, one
    sentence naming it, nothing written (it was an "unexpected error" to report)."""
    out = run_cli("--config", str(tmp_path / "m.toml"), "init", "--database", f"{postgres_url}?connect_timeout=abc")
    assert out.returncode == 2, out.stderr
    assert "cannot open the store" in out.stderr and "connect_timeout" in out.stderr and "--database" in out.stderr
    assert not (tmp_path / "m.toml").exists()


@pytest.mark.parametrize("setting, ours", [("lock_timeout", "30s"), ("idle_in_transaction_session_timeout", "1min")])
def test_postgresql_timeouts_are_set_unless_the_admin_chose(postgres_url: str, setting: str, ours: str) -> None:
    """Every PostgreSQL connection gets lock_timeout = the busy timeout (30 s), like
    SQLite's busy wait, and idle_in_transaction_session_timeout = 60 s, so that a
    mailhost process hung in a transaction does not hold its locks for ever; a value the
    admin set for the database (or in the URL) is kept."""
    name = postgres_url.rsplit("/", 1)[1]

    def shown(url: str) -> str:
        engine = store.make_engine(url)
        try:
            with engine.connect() as conn:
                return str(conn.exec_driver_sql(f"SHOW {setting}").scalar())
        finally:
            engine.dispose()

    assert shown(postgres_url) == ours
    assert shown(f"{postgres_url}?options=-c%20{setting}%3D7s") == "7s"
    admin = store.make_engine(postgres_url)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'ALTER DATABASE "{name}" SET {setting} = \'5min\'')
            conn.commit()
    finally:
        admin.dispose()
    assert shown(postgres_url) == "5min"


def test_a_store_a_migration_holds_is_busy_not_a_config_error(tmp_path: Path, postgres_url: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process migrating the schema (its transaction holds alembic_version):
    opening the store waits the busy timeout, then says it is busy (StoreError, exit 1),
    not that the [store] url is wrong (ConfigError, exit 2)."""
    import threading

    import psycopg

    monkeypatch.delenv("MAILHOST_SECRET_KEY", raising=False)
    config = tmp_path / "m.toml"
    Mailhost.init(config, postgres_url).close()
    monkeypatch.setattr(store, "BUSY_TIMEOUT", 0.2)
    holder = psycopg.connect(f"host=127.0.0.1 port=5432 user=postgres dbname={postgres_url.rsplit('/', 1)[1]}")
    holder.execute("LOCK TABLE alembic_version IN ACCESS EXCLUSIVE MODE")
    net = threading.Timer(60, holder.rollback)  # a safety net: without a lock timeout the command would hang
    net.start()
    host = Mailhost.open(config)
    try:
        with pytest.raises(StoreError, match=r" is busy: a table stayed locked by another session for 0\.2 s "):
            host.check_schema()
    finally:
        host.close()
        net.cancel()
        holder.rollback()
        holder.close()


def test_a_session_ended_for_sitting_in_its_transaction_is_one_sentence(tmp_path: Path, postgres_url: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL ends a mailhost session that sat in its transaction past
    idle_in_transaction_session_timeout (the process was stalled): its next statement
    fails as a StoreError that says so, not as an unexpected error, and the store
    works for the next transaction."""
    import time

    monkeypatch.delenv("MAILHOST_SECRET_KEY", raising=False)
    monkeypatch.setattr(store, "IDLE_IN_TRANSACTION_TIMEOUT", 0.2)
    host = Mailhost.init(tmp_path / "m.toml", postgres_url)
    watcher = store.make_engine(postgres_url)

    def ended(pid: int) -> None:
        deadline = time.monotonic() + 60  # a safety net, not an assertion on speed
        while True:
            with watcher.connect() as conn:
                if not conn.execute(text("SELECT 1 FROM pg_stat_activity WHERE pid = :p"), {"p": pid}).first():
                    return
            assert time.monotonic() < deadline, "the server never ended the idle session"
            time.sleep(0.05)

    try:
        for raw in (False, True):  # through SQLAlchemy, and the DB-API cursor of the download's hot path
            with pytest.raises(StoreError, match=r"ended this session because it sat in a transaction without a "
                                                 r"statement for longer than idle_in_transaction_session_timeout"):
                with host.session() as s:
                    ended(s.execute(text("SELECT pg_backend_pid()")).scalar())
                    if raw:
                        s.connection().connection.cursor().execute("SELECT 1")
                    else:
                        s.execute(text("SELECT 1"))
            assert host.connections.list(Direction.INCOMING) == []
    finally:
        watcher.dispose()
        host.close()
