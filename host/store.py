"""The durable store: SQLAlchemy models, the engine, and schema migrations.

SQLite (WAL, ``synchronous=FULL``: a commit survives a power cut, because the
after-download action that follows it may delete the server's copy) is the embedded
default; PostgreSQL runs the same code for many workers. The schema is owned by the
Alembic migrations in ``mailhost/migrations``; :func:`upgrade` brings any store to the
newest schema without losing data.

Secrets live in ``*_secret`` / ``*_enc`` columns, always Fernet ciphertext
(see :mod:`mailhost.secrets`).
"""
from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    ForeignKey,
    Index,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    mapped_column,
    relationship,
    sessionmaker,
)

from .errors import ConfigError

__all__ = [
    "BUSY_TIMEOUT",
    "Base",
    "Certificate",
    "ENCRYPTED_COLUMNS",
    "FolderCursor",
    "IncomingConnection",
    "IncomingItem",
    "IncomingLog",
    "IncomingLogEntry",
    "MAX_INT",
    "MAX_ROWS",
    "OAuthCredential",
    "OutgoingAttempt",
    "OutgoingConnection",
    "OutgoingItem",
    "SECRET_COLUMNS",
    "SeenMessage",
    "json_value",
    "make_engine",
    "text_value",
    "upgrade",
    "utcnow",
]

#: The largest value an INTEGER column holds on every store (PostgreSQL's is 32-bit):
#: the bound of ids and of numbers such as a size limit, checked before they are stored.
MAX_INT = 2**31 - 1
#: The most rows a listing may ask for (the CLI's ``--limit``, the REST API's ``?limit``):
#: more than any store holds, and a LIMIT every database takes.
MAX_ROWS = 2**31

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    """Now, in UTC, timezone-aware."""
    return dt.datetime.now(dt.timezone.utc)


def json_value(value: Any) -> Any:
    """A stored value JSON has no type for, as the CLI's ``--json`` and the REST API
    both write it (``json.dumps(default=...)``): a time in ISO 8601, bytes as text."""
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    raise TypeError(f"cannot serialise {type(value).__name__}")


def text_value(value: Any, width: int | None = None) -> str:
    """A stored value as the CLI's tables and records and the web admin's pages both show
    it: ``-`` for none, ``yes``/``no`` for a bool, a time to the second, a list or a
    mapping (a connection's options) on one line; cut to ``width`` characters if given."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, (list, tuple)):
        return ", ".join(text_value(v, width) for v in value) or "-"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={text_value(v, width)}" for k, v in value.items()) or "-"
    text = str(value).replace("\n", " ")
    return text if width is None or len(text) <= width else text[: width - 1] + "…"


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Stores UTC; returns timezone-aware datetimes on SQLite and PostgreSQL alike."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use mailhost.store.utcnow()")
        if value is not None and dialect.name == "sqlite":
            return value.astimezone(dt.timezone.utc).replace(tzinfo=None)
        return value

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=dt.timezone.utc)
        return value


class Base(DeclarativeBase):
    """The models' base, with constraint names that migrations can refer to."""

    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dt.datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


# ---------------------------------------------------------------------------------------
# Connections, credentials, certificates
# ---------------------------------------------------------------------------------------

incoming_connection_certificates = Table(
    "incoming_connection_certificates",
    Base.metadata,
    Column("connection_id", ForeignKey("incoming_connections.id", ondelete="CASCADE"), primary_key=True),
    Column("certificate_id", ForeignKey("certificates.id", ondelete="RESTRICT"), primary_key=True),
)


class OAuthCredential(Base):
    """An OAuth2 client registration and, once authorized, its tokens (encrypted)."""

    __tablename__ = "oauth_credentials"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    provider: Mapped[str] = mapped_column(String(100))
    client_id: Mapped[str] = mapped_column(String(500))
    client_secret_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    tenant: Mapped[str | None] = mapped_column(String(200))
    authority: Mapped[str | None] = mapped_column(String(1000))
    authorization_endpoint: Mapped[str | None] = mapped_column(String(1000))
    token_endpoint: Mapped[str | None] = mapped_column(String(1000))
    scopes: Mapped[list[Any]] = mapped_column(default=list)
    flow: Mapped[str] = mapped_column(String(50), default="authorization-code")
    ca_file: Mapped[str | None] = mapped_column(String(1000))
    tokens_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    token_expires_at: Mapped[dt.datetime | None]
    last_refresh_at: Mapped[dt.datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Certificate(Base):
    """A PKCS#12 certificate for decrypting incoming mail; the private key encrypted."""

    __tablename__ = "certificates"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    alias: Mapped[str | None] = mapped_column(String(200))
    subject: Mapped[str] = mapped_column(String(1000), default="")
    issuer: Mapped[str] = mapped_column(String(1000), default="")
    serial: Mapped[str] = mapped_column(String(100), default="")
    not_before: Mapped[dt.datetime | None]
    not_after: Mapped[dt.datetime | None]
    cert_pem: Mapped[bytes] = mapped_column(LargeBinary)
    key_enc: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    connections: Mapped[list[IncomingConnection]] = relationship(
        secondary=incoming_connection_certificates, back_populates="certificates"
    )


class IncomingConnection(Base):
    """A named mailbox to download from (the seeds' Incoming Mail Connection)."""

    __tablename__ = "incoming_connections"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    protocol: Mapped[str] = mapped_column(String(100))
    host: Mapped[str | None] = mapped_column(String(255))
    port: Mapped[int | None]
    encryption: Mapped[str] = mapped_column(String(20), default="ssl")
    username: Mapped[str | None] = mapped_column(String(500))
    password_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    folder: Mapped[str | None] = mapped_column(String(1000))
    interval: Mapped[int] = mapped_column(default=5)  # minutes
    timeout: Mapped[int] = mapped_column(default=30000)  # milliseconds
    after_download: Mapped[str] = mapped_column(String(100), default="mark-seen")
    after_download_argument: Mapped[str | None] = mapped_column(String(1000))
    shared_mailbox: Mapped[str | None] = mapped_column(String(500))
    oauth_credential_id: Mapped[int | None] = mapped_column(
        ForeignKey("oauth_credentials.id", ondelete="RESTRICT")
    )
    host_override: Mapped[str | None] = mapped_column(String(100))
    ca_file: Mapped[str | None] = mapped_column(String(1000))
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    enabled: Mapped[bool] = mapped_column(default=False)
    # Scheduling and the lease that keeps two workers off one mailbox.
    next_poll_at: Mapped[dt.datetime | None]
    last_poll_at: Mapped[dt.datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_until: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    oauth_credential: Mapped[OAuthCredential | None] = relationship()
    certificates: Mapped[list[Certificate]] = relationship(
        secondary=incoming_connection_certificates, back_populates="connections", order_by="Certificate.name"
    )


#: Indexes the migrations create and the models leave out, because declaring them would
#: cost every start-up a dialect import (see OutgoingConnection).
MIGRATION_ONLY_INDEXES = frozenset({"uq_outgoing_connections_default"})


def include_object(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    """Alembic's ``include_object`` filter for comparing the models with a database:
    leaves MIGRATION_ONLY_INDEXES out, so that autogenerate does not drop them."""
    return not (type_ == "index" and name in MIGRATION_ONLY_INDEXES)


class OutgoingConnection(Base):
    """A named server to deliver through (the seeds' Outgoing Mail Connection)."""

    __tablename__ = "outgoing_connections"
    # At most one default connection, enforced by the database itself: the partial
    # unique index uq_outgoing_connections_default (is_default) WHERE is_default, which
    # migration 0001 creates. It is not declared here: its sqlite_where= and
    # postgresql_where= would make SQLAlchemy import both dialects (the PostgreSQL one
    # with its asyncpg module) on every start-up. See MIGRATION_ONLY_INDEXES.

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    protocol: Mapped[str] = mapped_column(String(100))
    host: Mapped[str | None] = mapped_column(String(255))
    port: Mapped[int | None]
    encryption: Mapped[str] = mapped_column(String(20), default="starttls")
    from_address: Mapped[str | None] = mapped_column(String(500))
    prefix: Mapped[str | None] = mapped_column(String(500))
    username: Mapped[str | None] = mapped_column(String(500))
    password_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    timeout: Mapped[int] = mapped_column(default=30000)  # milliseconds
    size_limit: Mapped[int] = mapped_column(default=0)  # bytes, 0 = unlimited
    debug: Mapped[bool] = mapped_column(default=False)
    fallback_to_default: Mapped[bool] = mapped_column(default=False)
    is_default: Mapped[bool] = mapped_column(default=False)
    oauth_credential_id: Mapped[int | None] = mapped_column(
        ForeignKey("oauth_credentials.id", ondelete="RESTRICT")
    )
    host_override: Mapped[str | None] = mapped_column(String(100))
    ca_file: Mapped[str | None] = mapped_column(String(1000))
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    enabled: Mapped[bool] = mapped_column(default=True)
    # The largest message the server said it takes (SMTP SIZE), learned by a session.
    server_size_limit: Mapped[int | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    oauth_credential: Mapped[OAuthCredential | None] = relationship()


# ---------------------------------------------------------------------------------------
# The incoming side: queue, what was seen, cursors, log
# ---------------------------------------------------------------------------------------


class IncomingItem(Base):
    """A downloaded message in the incoming queue, its raw bytes exactly as received."""

    __tablename__ = "incoming_queue"
    __table_args__ = (
        Index("ix_incoming_queue_connection_status", "connection_id", "status"),
        Index("ix_incoming_queue_created_at", "created_at"),
        {"sqlite_autoincrement": True},  # ids never reused (migration 0005)
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    connection_id: Mapped[int | None] = mapped_column(
        ForeignKey("incoming_connections.id", ondelete="SET NULL")
    )
    connection_name: Mapped[str] = mapped_column(String(200))
    folder: Mapped[str] = mapped_column(String(1000), default="")
    status: Mapped[str] = mapped_column(String(20), default="new")
    message_id: Mapped[str | None] = mapped_column(String(1000))
    subject: Mapped[str | None] = mapped_column(Text)
    from_addr: Mapped[str | None] = mapped_column(Text)
    to_addr: Mapped[str | None] = mapped_column(Text)
    size: Mapped[int] = mapped_column(default=0)
    fingerprint: Mapped[str] = mapped_column(String(64))
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    decrypted: Mapped[bytes | None] = mapped_column(LargeBinary)
    decryption: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(Text)
    #: The download pass that stored it: its entry in that pass's log (other outcomes,
    #: such as duplicates, are IncomingLogEntry rows).
    log_id: Mapped[int | None] = mapped_column(ForeignKey("incoming_log.id", ondelete="SET NULL"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class SeenMessage(Base):
    """A message key already stored for a connection and folder; outlives queue purges.

    Rows are acknowledged in the order of their ids, so one number per folder says
    which ones are: :attr:`FolderCursor.acknowledged_through`. A pass first finishes the
    acknowledgements a crash interrupted (the rows above it).
    """

    __tablename__ = "incoming_seen"
    __table_args__ = (
        UniqueConstraint("connection_id", "folder", "key"),
        Index("ix_incoming_seen_fingerprint", "connection_id", "fingerprint"),  # content, in any folder
        Index("ix_incoming_seen_order", "connection_id", "folder", "id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    connection_id: Mapped[int] = mapped_column(ForeignKey("incoming_connections.id", ondelete="CASCADE"))
    folder: Mapped[str] = mapped_column(String(1000), default="")
    key: Mapped[str] = mapped_column(String(500))
    fingerprint: Mapped[str] = mapped_column(String(64))
    item_id: Mapped[int | None] = mapped_column(ForeignKey("incoming_queue.id", ondelete="SET NULL"))
    seen_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class FolderCursor(Base):
    """Where the last download pass of a connection's folder stopped (protocol-owned)."""

    __tablename__ = "folder_cursors"

    connection_id: Mapped[int] = mapped_column(
        ForeignKey("incoming_connections.id", ondelete="CASCADE"), primary_key=True
    )
    folder: Mapped[str] = mapped_column(String(1000), primary_key=True, default="")
    #: The protocol's cursor; empty for protocols without one (POP3).
    state: Mapped[dict[str, Any]] = mapped_column(default=dict)
    #: Every incoming_seen row of this folder up to this id is acknowledged on the server.
    acknowledged_through: Mapped[int | None]
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class IncomingLog(Base):
    """One download pass of one connection: counts, bytes, duration, error."""

    __tablename__ = "incoming_log"
    __table_args__ = (Index("ix_incoming_log_started_at", "started_at"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(primary_key=True)
    connection_id: Mapped[int | None] = mapped_column(
        ForeignKey("incoming_connections.id", ondelete="SET NULL")
    )
    connection_name: Mapped[str] = mapped_column(String(200))
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[dt.datetime | None]
    status: Mapped[str] = mapped_column(String(20), default="running")  # running, ok, stopped, failed, interrupted
    listed: Mapped[int] = mapped_column(default=0)
    stored: Mapped[int] = mapped_column(default=0)
    duplicates: Mapped[int] = mapped_column(default=0)
    acknowledged: Mapped[int] = mapped_column(default=0)
    bytes: Mapped[int] = mapped_column(default=0)
    error: Mapped[str | None] = mapped_column(Text)

    entries: Mapped[list[IncomingLogEntry]] = relationship(
        back_populates="log", cascade="all, delete-orphan", passive_deletes=True
    )


class IncomingLogEntry(Base):
    """One message seen by a pass: stored, duplicate, or failed, and why."""

    __tablename__ = "incoming_log_entries"

    id: Mapped[int] = mapped_column(primary_key=True)
    log_id: Mapped[int] = mapped_column(ForeignKey("incoming_log.id", ondelete="CASCADE"), index=True)
    item_id: Mapped[int | None] = mapped_column(ForeignKey("incoming_queue.id", ondelete="SET NULL"))
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    message_id: Mapped[str | None] = mapped_column(String(1000))
    from_addr: Mapped[str | None] = mapped_column(Text)
    subject: Mapped[str | None] = mapped_column(Text)
    result: Mapped[str] = mapped_column(String(20))
    detail: Mapped[str | None] = mapped_column(Text)

    log: Mapped[IncomingLog] = relationship(back_populates="entries")


# ---------------------------------------------------------------------------------------
# The outgoing side
# ---------------------------------------------------------------------------------------


class OutgoingItem(Base):
    """A message waiting for (or done with) delivery."""

    __tablename__ = "outgoing_queue"
    __table_args__ = (
        Index("ix_outgoing_queue_due", "status", "next_attempt_at"),
        Index("ix_outgoing_queue_created_at", "created_at"),
        {"sqlite_autoincrement": True},  # ids never reused (migration 0005)
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    connection_id: Mapped[int | None] = mapped_column(
        ForeignKey("outgoing_connections.id", ondelete="SET NULL")
    )
    connection_name: Mapped[str | None] = mapped_column(String(200))  # None: the default one
    status: Mapped[str] = mapped_column(String(20), default="queued")
    message_id: Mapped[str | None] = mapped_column(String(1000))
    subject: Mapped[str | None] = mapped_column(Text)
    from_addr: Mapped[str | None] = mapped_column(Text)  # its own From, else its connection's (see Outgoing.enqueue)
    to_addr: Mapped[str | None] = mapped_column(Text)
    recipients: Mapped[list[Any]] = mapped_column(default=list)  # the envelope
    accepted: Mapped[list[Any] | None]  # recipients the server has taken
    size: Mapped[int] = mapped_column(default=0)
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[dt.datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_until: Mapped[dt.datetime | None]
    sent_via: Mapped[str | None] = mapped_column(String(200))
    fell_back: Mapped[bool] = mapped_column(default=False)
    refused: Mapped[dict[str, Any] | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    sent_at: Mapped[dt.datetime | None]
    # When it was queued, or queued again by an admin: the age limit counts from here.
    queued_at: Mapped[dt.datetime | None]

    attempts_log: Mapped[list[OutgoingAttempt]] = relationship(
        back_populates="item", cascade="all, delete-orphan", passive_deletes=True,
        order_by="OutgoingAttempt.id",
    )


class OutgoingAttempt(Base):
    """One delivery attempt of an outgoing message, and what the server said."""

    __tablename__ = "outgoing_attempts"

    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("outgoing_queue.id", ondelete="CASCADE"), index=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    connection_name: Mapped[str | None] = mapped_column(String(200))
    result: Mapped[str] = mapped_column(String(20))  # sent, partial, temporary, permanent, interrupted
    detail: Mapped[str | None] = mapped_column(Text)
    refused: Mapped[dict[str, Any] | None]
    duration_ms: Mapped[int | None]

    item: Mapped[OutgoingItem] = relationship(back_populates="attempts_log")


# ---------------------------------------------------------------------------------------
# Engine and migrations
# ---------------------------------------------------------------------------------------


#: Every column that holds Fernet ciphertext under the installation's key, by what it
#: holds: what ``mailhost secrets rotate`` re-encrypts. A new encrypted column goes here.
ENCRYPTED_COLUMNS: dict[str, Any] = {
    "incoming_passwords": IncomingConnection.password_enc,
    "outgoing_passwords": OutgoingConnection.password_enc,
    "oauth_client_secrets": OAuthCredential.client_secret_enc,
    "oauth_tokens": OAuthCredential.tokens_enc,
    "certificate_keys": Certificate.key_enc,
    "decrypted_messages": IncomingItem.decrypted,  # S/MIME mail decrypted at ingest
}

#: The secrets a key is checked against (see :class:`mailhost.secrets.Vault`): all but the
#: incoming queue's, where finding one would scan the whole queue at every pass.
SECRET_COLUMNS = tuple(c for kind, c in ENCRYPTED_COLUMNS.items() if kind != "decrypted_messages")


#: Seconds a statement waits for another process's lock before it fails as busy: on
#: SQLite its busy wait, on PostgreSQL its ``lock_timeout``.
BUSY_TIMEOUT = 30
#: Seconds a PostgreSQL session of mailhost may sit in an open transaction without a
#: statement before the server ends it (``idle_in_transaction_session_timeout``). No
#: code path waits on the network or a person inside a transaction (the gaps are Python
#: work between statements, well under a second), so only a process that hangs or is
#: stopped there reaches it; ending its session frees the rows it locked, which would
#: otherwise fail every other worker's statements as busy until it is killed. Twice
#: BUSY_TIMEOUT, and less than a mailbox lease (2 min): a worker that takes over the
#: mailbox of a hung pass finds its rows free.
IDLE_IN_TRANSACTION_TIMEOUT = 60


#: libpq settings of every PostgreSQL connection unless the store's URL gives its own
#: (``?connect_timeout=30``): give up connecting after 10 s, and let TCP keepalives find
#: a link that died silently within about a minute (libpq's defaults: never, 2 hours).
PG_CONNECT_DEFAULTS: dict[str, int] = {
    "connect_timeout": 10, "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3,
}


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, full sync, foreign keys and a busy wait."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            # 16 KiB pages for a new store (an existing one keeps its own): stored mail
            # is mostly 2-100 KB blobs, and WAL commits of big batches ran 1.7x faster
            # than with 4 KiB pages (fewer pages to log and checkpoint).
            cur.execute("PRAGMA page_size=16384")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    try:
        parsed = make_url(url)
        # libpq waits for ever by default: a hung server, or a firewall that drops packets,
        # would hang a command or a pass for good. The URL's own settings win.
        connect_args = {k: v for k, v in PG_CONNECT_DEFAULTS.items() if k not in parsed.query}
        engine = create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)
    except ModuleNotFoundError as exc:  # the driver is an extra
        raise ConfigError(f"the PostgreSQL driver ({exc.name}) is not installed: "
                          "pip install 'mailhost[postgresql]'") from None

    @event.listens_for(engine, "connect")
    def _timeouts(dbapi_conn: Any, _record: Any) -> None:
        # PostgreSQL waits for a lock for ever by default: a session left open in a
        # transaction (an admin's `BEGIN; SELECT ... FOR UPDATE` in psql) would block a
        # pass or a command for good, silently, and a migration's table lock queued
        # behind it would block every other session too. A statement that waits
        # BUSY_TIMEOUT seconds for a lock fails instead, as busy, like SQLite's. It
        # bounds waiting only, never how long a statement works (a long purge is fine).
        # The other side of it: a mailhost session that hangs inside a transaction is
        # ended after IDLE_IN_TRANSACTION_TIMEOUT, so that its locks do not stay.
        # A value the admin set (for the role or the database, or
        # `?options=-c lock_timeout=...` in the URL) is kept. Set once per connection
        # and committed: a SET in a transaction that rolls back is undone.
        cursor = dbapi_conn.cursor()
        cursor.execute(
            "SELECT CASE WHEN current_setting('lock_timeout') = '0' THEN set_config('lock_timeout', %s, false) END, "
            "CASE WHEN current_setting('idle_in_transaction_session_timeout') = '0' "
            "THEN set_config('idle_in_transaction_session_timeout', %s, false) END",
            (f"{max(1, round(BUSY_TIMEOUT * 1000))}ms", f"{max(1, round(IDLE_IN_TRANSACTION_TIMEOUT * 1000))}ms"))
        cursor.close()
        dbapi_conn.commit()

    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Any]:
    """Sessions that keep loaded objects usable after commit."""
    return sessionmaker(engine, expire_on_commit=False)


def _alembic_config(engine: Engine) -> Any:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.attributes["connection"] = None
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the store to ``revision`` (the newest by default); safe to repeat."""
    from alembic import command

    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as conn:
        if sqlite:
            # A migration that changes an SQLite table copies it and drops the old one, and
            # with foreign keys on the drop runs their ON DELETE actions on every row (CASCADE
            # deletes the children, SET NULL cuts their links). The pragma takes effect only
            # outside a transaction, so it is set before the migration's begins.
            conn.exec_driver_sql("PRAGMA foreign_keys = OFF")
            conn.commit()
        try:
            with conn.begin():
                cfg = _alembic_config(engine)
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, revision)
                if sqlite and conn.exec_driver_sql("PRAGMA foreign_key_check").first() is not None:
                    raise RuntimeError("the migration left rows whose foreign keys point nowhere; nothing was changed")
        finally:
            if sqlite:
                conn.exec_driver_sql("PRAGMA foreign_keys = ON")
                conn.commit()


def current_revision(engine: Engine) -> str | None:
    """The store's schema revision, or ``None`` for an empty store.

    Read with one query rather than through Alembic, whose import costs every
    command a fifth of a second; Alembic runs only to migrate.
    """
    from sqlalchemy import inspect

    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


_REVISION = re.compile(r"^(down_revision|revision)\s*=\s*['\"]?([\w-]+|None)['\"]?", re.M)


@functools.lru_cache(maxsize=1)
def head_revision() -> str:
    """The newest schema revision this version of mailhost knows (the migration that
    no other migration revises), read from the migration files without Alembic."""
    revisions: set[str] = set()
    revised: set[str] = set()
    for path in (Path(__file__).parent / "migrations" / "versions").glob("*.py"):
        found = dict(m.groups() for m in _REVISION.finditer(path.read_text(encoding="utf-8")))
        if "revision" in found:
            revisions.add(found["revision"])
            if found.get("down_revision") not in (None, "None"):
                revised.add(found["down_revision"])
    heads = revisions - revised
    if len(heads) != 1:
        raise RuntimeError(f"the migrations have {len(heads)} heads ({sorted(heads)}); they must form one line")
    return heads.pop()
