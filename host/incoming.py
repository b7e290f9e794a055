"""The incoming pipeline: download, store, then acknowledge. Protocol-agnostic.

One pass over one connection:

1. Take the connection's lease (no two workers poll one mailbox), open a session.
2. ``list_new`` after the stored folder cursor; finish acknowledgements that a crash
   interrupted (keys stored but not yet acknowledged).
3. For each batch (bounded by count and bytes): ``fetch`` it, then in ONE transaction
   insert the messages into the incoming queue, record their keys and fingerprints,
   and advance the folder cursor. Only after that commit, run the after-download
   action on the batch and mark it acknowledged.

A crash at any instant therefore at most repeats an acknowledgement: a message is
never lost (nothing is acknowledged before it is committed) and never stored twice
(its key is committed with it; a renumbered folder is caught by the content
fingerprint, SHA-256 of the raw bytes).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from email.header import decode_header, make_header
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, delete, func, insert, or_, select, text, update
from sqlalchemy.orm import Session

from .certificates import Certificate
from .errors import MailhostError, NotFound, ValidationError
from .leases import holder_is_gone, worker_id
from .protocols import Direction, Estimate, IncomingSession, Listing, MessageRef
from .secrets import redact
from .store import (
    FolderCursor,
    IncomingConnection,
    IncomingItem,
    IncomingLog,
    IncomingLogEntry,
    SeenMessage,
    utcnow,
)

if TYPE_CHECKING:
    from .app import Mailhost

__all__ = ["BATCH_BYTES", "BATCH_COUNT", "Incoming", "PassReport", "item_dict", "summarize"]

log = logging.getLogger(__name__)

BATCH_COUNT = 2000  # messages per transaction
BATCH_BYTES = 32 * 1024 * 1024  # and at most this many bytes
LEASE = dt.timedelta(minutes=2)  # renewed with every batch
_CHUNK = 500  # keys per IN (...) query

INCOMING_STATUSES = ("new", "processing", "processed", "filtered", "failed")


@dataclass
class PassReport:
    """What one download pass did."""

    connection: str
    ok: bool = True
    listed: int = 0
    stored: int = 0
    duplicates: int = 0
    acknowledged: int = 0
    bytes: int = 0
    seconds: float = 0.0
    error: str | None = None
    skipped: str | None = None
    item_ids: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "connection": self.connection, "ok": self.ok, "listed": self.listed, "stored": self.stored,
            "duplicates": self.duplicates, "acknowledged": self.acknowledged, "bytes": self.bytes,
            "seconds": round(self.seconds, 3), "error": self.error, "skipped": self.skipped,
        }


Progress = Callable[[int, int], None]  # (messages done, messages listed)


class Incoming:
    """Download passes, the incoming queue and the incoming log."""

    def __init__(self, host: Mailhost) -> None:
        self.host = host
        self.worker = worker_id()

    # -- download passes --------------------------------------------------------------

    def fetch(self, names: Sequence[str] | None = None, progress: Progress | None = None) -> list[PassReport]:
        """One pass over each named connection, or over every enabled one."""
        with self.host.session() as s:
            if names:
                for name in names:
                    self.host.connections.get(Direction.INCOMING, name, s)  # NotFound before any work
                chosen = list(names)
            else:
                chosen = list(s.scalars(
                    select(IncomingConnection.name).where(IncomingConnection.enabled.is_(True))
                    .order_by(IncomingConnection.name)
                ))
        return [self.fetch_one(name, progress) for name in chosen]

    def fetch_one(self, name: str, progress: Progress | None = None) -> PassReport:
        """One download pass over connection ``name``; failures land in the report and log."""
        report = PassReport(name)
        started = time.monotonic()
        conn, holder = self._claim(name)
        if conn is None:
            report.skipped = f"another worker ({holder}) is downloading it"
            return report
        with self.host.session() as s:
            log_row = IncomingLog(connection_id=conn.id, connection_name=conn.name)
            s.add(log_row)
            s.flush()
            log_id = log_row.id
        try:
            self._run(conn, log_id, report, progress)
        except MailhostError as exc:
            report.ok, report.error = False, _sentence(conn.name, exc)
        except Exception as exc:  # a plugin bug must not stop the other connections
            log.exception("download pass of %s failed", conn.name)
            report.ok, report.error = False, f"{conn.name}: unexpected {type(exc).__name__}: {redact(str(exc))}"
        report.seconds = time.monotonic() - started
        self._finish(conn, log_id, report)
        return report

    def _run(self, conn: IncomingConnection, log_id: int, report: PassReport, progress: Progress | None) -> None:
        provider = self.host.connections.provider(Direction.INCOMING, conn)
        action = self.host.plugins.action(conn.after_download)
        settings = self.host.connections.settings(Direction.INCOMING, conn)
        folder = conn.folder or ""
        session = provider.open(settings)
        if not isinstance(session, IncomingSession):
            raise MailhostError(f"protocol {conn.protocol} opened a {type(session).__name__}, not an IncomingSession")
        # Keys acknowledged on the server. They are recorded with the next commit (one
        # transaction per batch, not two); for sessions whose acknowledgements hold
        # only at a clean close (POP3), after that close. Unrecorded ones are simply
        # acknowledged again by the next pass.
        acked: list[str] = []
        try:
            with self.host.session() as s:
                state = s.get(FolderCursor, (conn.id, folder))
                cursor = dict(state.state) if state is not None else None
            listing = session.list_new(cursor, lambda keys: self._known(conn.id, folder, keys))
            report.listed = len(listing.refs)
            self._finish_pending(session, conn, folder, action, report, acked)
            record = None if session.acknowledges_on_close else acked
            total, done = len(listing.refs), 0
            if progress and total:
                progress(0, total)
            for batch in _batches(listing.refs):
                stored = self._store_batch(session, conn, folder, log_id, batch, report, record)
                done += len(batch)
                if stored:
                    action.apply(session, stored, conn.after_download_argument)
                    report.acknowledged += len(stored)
                    acked.extend(r.key for r in stored)
                if progress:
                    progress(done, total)
            self._save_cursor(conn.id, folder, listing, record)
        finally:
            session.close()
            if acked and (not session.acknowledges_on_close or session.closed_cleanly):
                try:
                    self._mark_acknowledged(conn.id, folder, acked)
                except Exception:  # the next pass acknowledges them again
                    log.exception("%s: could not record %d acknowledgement(s)", conn.name, len(acked))

    def _store_batch(
        self, session: IncomingSession, conn: IncomingConnection, folder: str, log_id: int,
        batch: Sequence[MessageRef], report: PassReport, record: list[str] | None,
    ) -> list[MessageRef]:
        """Fetch one batch and commit it with its cursor (and the acknowledgements in
        ``record``, which it empties); returns the refs to acknowledge."""
        fetched = list(session.fetch(batch))
        if not fetched:
            return []
        certificates = self._certificates(conn)
        with self.host.session() as s:
            keys = [ref.key for ref, _ in fetched]
            already = self._known_in(s, conn.id, folder, keys)
            prints = {ref.key: hashlib.sha256(raw).hexdigest() for ref, raw in fetched}
            dup_prints = self._fingerprints_in(s, conn.id, folder, list(prints.values()))
            items, seen, entries, to_ack = [], [], [], []
            stored_keys: list[tuple[str, dict[str, Any]]] = []
            for ref, raw in fetched:
                if ref.key in already:
                    continue  # stored by an earlier pass: it needs no second copy
                fp = prints[ref.key]
                meta = summarize(raw)
                to_ack.append(ref)
                if fp in dup_prints:
                    report.duplicates += 1
                    seen.append({"connection_id": conn.id, "folder": folder, "key": ref.key, "fingerprint": fp,
                                 "item_id": dup_prints[fp], "acknowledged": False})
                    entries.append({"log_id": log_id, "item_id": dup_prints[fp], "result": "duplicate",
                                    "detail": "same content already stored", **_entry_meta(meta)})
                    continue
                dup_prints[fp] = None  # the same content twice in one batch
                report.stored += 1
                report.bytes += len(raw)
                row = {"connection_id": conn.id, "connection_name": conn.name, "folder": folder,
                       "status": "new", "size": len(raw), "fingerprint": fp, "raw": raw, **meta}
                if certificates:
                    row.update(self._decrypt(conn.name, raw, certificates))
                items.append(row)
                stored_keys.append((ref.key, meta))
            ids = _insert_items(s, items)
            for (key, meta), item_id in zip(stored_keys, ids, strict=True):
                fp = prints[key]
                dup_prints[fp] = item_id
                seen.append({"connection_id": conn.id, "folder": folder, "key": key, "fingerprint": fp,
                             "item_id": item_id, "acknowledged": False})
                entries.append({"log_id": log_id, "item_id": item_id, "result": "stored",
                                "detail": None, **_entry_meta(meta)})
            # Duplicates inside this batch point at the copy stored just now.
            for row in seen:
                if row["item_id"] is None:
                    row["item_id"] = dup_prints.get(row["fingerprint"])
            if seen:
                s.execute(insert(SeenMessage.__table__).values(seen_at=func.now()), seen)
            if entries:
                s.execute(insert(IncomingLogEntry.__table__).values(at=func.now()), entries)
            last_cursor = next((r.cursor for r in reversed(batch) if r.cursor is not None), None)
            if last_cursor is not None:
                self._put_cursor(s, conn.id, folder, dict(last_cursor))
            self._renew_lease(s, conn.id)
            if record:
                self._record_acknowledged(s, conn.id, folder, record)
            s.execute(update(IncomingLog).where(IncomingLog.id == log_id).values(
                listed=report.listed, stored=report.stored, duplicates=report.duplicates, bytes=report.bytes))
        # Committed: the messages are safe. Now others may look at them.
        report.item_ids.extend(ids)
        for (key, meta), item_id in zip(stored_keys, ids):
            self._announce(conn.name, item_id, meta.get("message_id"), fetched, key)
        return to_ack

    def _certificates(self, conn: IncomingConnection) -> list[Certificate]:
        """The connection's certificates with their keys, for the decryption hook."""
        return [
            Certificate(c.name, c.cert_pem, self.host.vault.decrypt_bytes(c.key_enc) or b"", c.alias)
            for c in conn.certificates
        ]

    def _decrypt(self, connection: str, raw: bytes, certificates: list[Certificate]) -> dict[str, Any]:
        """Columns for the decrypted form (the raw bytes stay as they are); none when
        the connection has no certificates or no plugin claims the message."""
        if not certificates:
            return {"decrypted": None, "decryption": None}
        try:
            result = self.host.plugins.hook.decrypt_message(raw=raw, certificates=certificates)
        except Exception as exc:  # stored and flagged, never dropped
            log.exception("decryption of a message of %s failed", connection)
            return {"decrypted": None, "decryption": {"error": f"decryption plugin failed: {exc}"}}
        if result is None:
            return {"decrypted": None, "decryption": None}
        # The plaintext is kept encrypted at rest, as S/MIME meant it to be.
        return {"decrypted": self.host.vault.encrypt(result.raw) if result.raw is not None else None, "decryption": {
            "certificate": result.certificate, "signed": result.signed, "error": result.error}}

    def _announce(self, connection: str, item_id: int, message_id: str | None,
                  fetched: list[tuple[MessageRef, bytes]], key: str) -> None:
        impls = self.host.plugins.hook.message_stored.get_hookimpls()
        if not impls:
            return
        raw = next(raw for ref, raw in fetched if ref.key == key)
        try:
            self.host.plugins.hook.message_stored(connection=connection, item_id=item_id, message_id=message_id, raw=raw)
        except Exception:
            log.exception("a message_stored hook failed for item %s of %s", item_id, connection)

    def _finish_pending(
        self, session: IncomingSession, conn: IncomingConnection, folder: str, action: Any,
        report: PassReport, acked: list[str],
    ) -> None:
        """Run the after-download action for messages stored before a crash cut it short."""
        with self.host.session() as s:
            keys = list(s.scalars(select(SeenMessage.key).where(
                SeenMessage.connection_id == conn.id, SeenMessage.folder == folder,
                SeenMessage.acknowledged.is_(False))))
        if not keys:
            return
        log.info("%s: finishing %d acknowledgement(s) an earlier pass left", conn.name, len(keys))
        for chunk in _chunks(keys, BATCH_COUNT):
            refs = session.resolve(chunk)
            if refs:
                action.apply(session, refs, conn.after_download_argument)
                report.acknowledged += len(refs)
            acked.extend(chunk)  # keys no longer on the server need nothing more

    def _mark_acknowledged(self, connection_id: int, folder: str, keys: list[str]) -> None:
        with self.host.session() as s:
            self._record_acknowledged(s, connection_id, folder, keys)

    @staticmethod
    def _record_acknowledged(s: Session, connection_id: int, folder: str, keys: list[str]) -> None:
        """Mark ``keys`` acknowledged in the open transaction, and empty the list."""
        for chunk in _chunks(keys, _CHUNK):
            s.execute(update(SeenMessage).where(
                SeenMessage.connection_id == connection_id, SeenMessage.folder == folder,
                SeenMessage.key.in_(chunk)).values(acknowledged=True))
        keys.clear()

    # -- cursors and keys -------------------------------------------------------------

    def _known(self, connection_id: int, folder: str, keys: Sequence[str]) -> set[str]:
        with self.host.session() as s:
            return self._known_in(s, connection_id, folder, keys)

    @staticmethod
    def _known_in(s: Session, connection_id: int, folder: str, keys: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for chunk in _chunks(list(keys), _CHUNK):
            found.update(s.scalars(select(SeenMessage.key).where(
                SeenMessage.connection_id == connection_id, SeenMessage.folder == folder,
                SeenMessage.key.in_(chunk))))
        return found

    @staticmethod
    def _fingerprints_in(s: Session, connection_id: int, folder: str, prints: Sequence[str]) -> dict[str, int | None]:
        found: dict[str, int | None] = {}
        for chunk in _chunks(list(set(prints)), _CHUNK):
            for fp, item_id in s.execute(select(SeenMessage.fingerprint, SeenMessage.item_id).where(
                    SeenMessage.connection_id == connection_id, SeenMessage.folder == folder,
                    SeenMessage.fingerprint.in_(chunk))):
                found.setdefault(fp, item_id)
        return found

    def _save_cursor(self, connection_id: int, folder: str, listing: Listing, record: list[str] | None) -> None:
        with self.host.session() as s:
            if listing.cursor is not None:
                self._put_cursor(s, connection_id, folder, dict(listing.cursor))
            if record:
                self._record_acknowledged(s, connection_id, folder, record)

    @staticmethod
    def _put_cursor(s: Session, connection_id: int, folder: str, state: dict[str, Any]) -> None:
        row = s.get(FolderCursor, (connection_id, folder))
        if row is None:
            s.add(FolderCursor(connection_id=connection_id, folder=folder, state=state))
        else:
            row.state = state

    # -- leases and scheduling --------------------------------------------------------

    def _claim(self, name: str) -> tuple[IncomingConnection | None, str | None]:
        """Take the connection's lease; ``(None, holder)`` if another live worker has it.

        A lease ends when it expires, or at once when its holder was a process on this
        machine that no longer runs (a crashed ``mailhost fetch`` must not block the
        next one for the rest of its lease).
        """
        now = utcnow()
        with self.host.session() as s:
            conn = self.host.connections.get(Direction.INCOMING, name, s)
            free = [IncomingConnection.lease_until.is_(None), IncomingConnection.lease_until < now,
                    IncomingConnection.lease_owner == self.worker]
            if conn.lease_owner and holder_is_gone(conn.lease_owner):
                free.append(IncomingConnection.lease_owner == conn.lease_owner)
            taken = s.execute(
                update(IncomingConnection)
                .where(IncomingConnection.id == conn.id, or_(*free))
                .values(lease_owner=self.worker, lease_until=now + LEASE)
                .execution_options(synchronize_session=False)
            ).rowcount
            if not taken:
                return None, conn.lease_owner
            s.refresh(conn)
            _ = conn.certificates, conn.oauth_credential  # loaded while the session is open
            # We hold the lease: a pass still marked running died without finishing.
            s.execute(update(IncomingLog).where(IncomingLog.connection_id == conn.id, IncomingLog.status == "running")
                      .values(status="interrupted", finished_at=now, error="the pass was interrupted (crash or kill)"))
            return conn, None

    def _renew_lease(self, s: Session, connection_id: int) -> None:
        s.execute(update(IncomingConnection).where(IncomingConnection.id == connection_id,
                                                   IncomingConnection.lease_owner == self.worker)
                  .values(lease_until=utcnow() + LEASE).execution_options(synchronize_session=False))

    def _finish(self, conn: IncomingConnection, log_id: int, report: PassReport) -> None:
        now = utcnow()
        with self.host.session() as s:
            s.execute(update(IncomingLog).where(IncomingLog.id == log_id).values(
                finished_at=now, status="ok" if report.ok else "failed", listed=report.listed,
                stored=report.stored, duplicates=report.duplicates, acknowledged=report.acknowledged,
                bytes=report.bytes, error=report.error))
            s.execute(update(IncomingConnection).where(IncomingConnection.id == conn.id).values(
                last_poll_at=now, last_error=report.error,
                next_poll_at=now + dt.timedelta(minutes=conn.interval or 1),
                lease_owner=None, lease_until=None).execution_options(synchronize_session=False))

    def due(self) -> list[str]:
        """Enabled connections whose interval has passed, soonest first."""
        now = utcnow()
        with self.host.session() as s:
            return list(s.scalars(
                select(IncomingConnection.name).where(
                    IncomingConnection.enabled.is_(True),
                    or_(IncomingConnection.next_poll_at.is_(None), IncomingConnection.next_poll_at <= now),
                    or_(IncomingConnection.lease_until.is_(None), IncomingConnection.lease_until < now),
                ).order_by(IncomingConnection.next_poll_at)
            ))

    # -- estimate ---------------------------------------------------------------------

    def estimate(self, name: str) -> Estimate:
        """How many messages the next pass of ``name`` would download (for ``enable``)."""
        conn = self.host.connections.get(Direction.INCOMING, name)
        provider = self.host.connections.provider(Direction.INCOMING, conn)
        folder = conn.folder or ""
        with self.host.session() as s:
            state = s.get(FolderCursor, (conn.id, folder))
            cursor = dict(state.state) if state is not None else None
        with provider.open(self.host.connections.settings(Direction.INCOMING, conn)) as session:
            assert isinstance(session, IncomingSession)
            return session.estimate(cursor, lambda keys: self._known(conn.id, folder, keys))

    # -- queue and log ----------------------------------------------------------------

    def items(self, connection: str | None = None, status: str | None = None,
              limit: int | None = None) -> list[IncomingItem]:
        """Queue items, newest first (raw bytes not loaded)."""
        from sqlalchemy.orm import defer

        _check_status(status)
        with self.host.session() as s:
            q = select(IncomingItem).options(defer(IncomingItem.raw), defer(IncomingItem.decrypted)).order_by(IncomingItem.id.desc())
            if connection:
                q = q.where(IncomingItem.connection_name == connection)
            if status:
                q = q.where(IncomingItem.status == status)
            if limit:
                q = q.limit(limit)
            return list(s.scalars(q))

    def item(self, item_id: int) -> IncomingItem:
        """One queue item with its raw bytes and, if it was encrypted, its decrypted form
        (stored encrypted at rest; decrypted here, in a detached copy that is never saved)."""
        with self.host.session() as s:
            item = s.get(IncomingItem, item_id)
            if item is None:
                raise NotFound(f"no incoming queue item {item_id}: see `mailhost queue incoming`")
            _ = item.raw, item.decrypted
            s.expunge(item)
        item.decrypted = self.host.vault.decrypt_bytes(item.decrypted)
        return item

    def set_status(self, item_id: int, status: str, error: str | None = None) -> None:
        """Move a queue item on (for handlers: processing, processed, filtered, failed)."""
        _check_status(status)
        with self.host.session() as s:
            item = s.get(IncomingItem, item_id)
            if item is None:
                raise NotFound(f"no incoming queue item {item_id}")
            item.status, item.error = status, error

    def logs(self, connection: str | None = None, limit: int | None = None) -> list[IncomingLog]:
        """Download passes, newest first."""
        with self.host.session() as s:
            q = select(IncomingLog).order_by(IncomingLog.id.desc())
            if connection:
                q = q.where(IncomingLog.connection_name == connection)
            if limit:
                q = q.limit(limit)
            return list(s.scalars(q))

    def log_entries(self, log_id: int) -> list[IncomingLogEntry]:
        """The messages one pass saw."""
        with self.host.session() as s:
            return list(s.scalars(select(IncomingLogEntry).where(IncomingLogEntry.log_id == log_id)
                                  .order_by(IncomingLogEntry.id)))

    def purge(self, older_than: dt.timedelta, statuses: Iterable[str] = ("processed", "filtered")) -> tuple[int, int]:
        """Delete queue items in ``statuses`` and log passes older than ``older_than``.

        The keys of purged messages stay recorded, so they are not downloaded again.
        Returns (items deleted, passes deleted).
        """
        cutoff = utcnow() - older_than
        with self.host.session() as s:
            items = s.execute(delete(IncomingItem).where(
                IncomingItem.created_at < cutoff, IncomingItem.status.in_(list(statuses)))).rowcount
            passes = s.execute(delete(IncomingLog).where(
                and_(IncomingLog.started_at < cutoff, IncomingLog.status != "running"))).rowcount
        return items, passes


def item_dict(item: IncomingItem) -> dict[str, Any]:
    """The JSON form of an incoming queue item, in the CLI's and the REST API's shape."""
    return {
        "id": item.id, "connection": item.connection_name, "folder": item.folder, "status": item.status,
        "message_id": item.message_id, "subject": item.subject, "from": item.from_addr, "to": item.to_addr,
        "size": item.size, "created_at": item.created_at, "updated_at": item.updated_at, "error": item.error,
    }


def _check_status(status: str | None) -> None:
    if status is not None and status not in INCOMING_STATUSES:
        raise ValidationError(f"status {status!r} is not valid: choose one of {', '.join(INCOMING_STATUSES)}", "status")


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def _batches(refs: Sequence[MessageRef]) -> Iterator[list[MessageRef]]:
    batch: list[MessageRef] = []
    size = 0
    for ref in refs:
        ref_size = ref.size or 0
        if batch and (len(batch) >= BATCH_COUNT or size + ref_size > BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(ref)
        size += ref_size
    if batch:
        yield batch


def _chunks(items: list[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _insert_items(s: Session, rows: list[dict[str, Any]]) -> list[int]:
    """Insert queue items in one executemany; their ids, in order.

    The hot path of every download, so it avoids per-row work: times come from the
    database clock, and on SQLite the ids are read back from ``last_insert_rowid()``:
    SQLite gives each new row of an INTEGER PRIMARY KEY table the largest id plus one
    and lets one writer in at a time, so the batch's ids are the consecutive run that
    ends there. PostgreSQL returns them with ``RETURNING``.
    """
    if not rows:
        return []
    stmt = insert(IncomingItem.__table__).values(created_at=func.now(), updated_at=func.now())
    if s.get_bind().dialect.name == "sqlite":
        s.execute(stmt, rows)
        last = s.execute(text("SELECT last_insert_rowid()")).scalar_one()
        return list(range(last - len(rows) + 1, last + 1))
    result = s.execute(stmt.returning(IncomingItem.__table__.c.id, sort_by_parameter_order=True), rows)
    return [r[0] for r in result]


# A header line and its continuation lines; unfolded only when a value is folded.
_HEADER = re.compile(rb"^(message-id|from|to|subject)[ \t]*:[ \t]*([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)", re.I | re.M)
_FOLD = re.compile(rb"\r?\n[ \t]+")
_NAMES = {b"message-id": "message_id", b"from": "from_addr", b"to": "to_addr", b"subject": "subject"}


def summarize(raw: bytes) -> dict[str, str | None]:
    """Message-ID, From, To and Subject of a raw message, cheaply (headers only)."""
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        end = raw.find(b"\n\n")
    head = raw[: end if end >= 0 else len(raw)]
    found: dict[str, str | None] = {"message_id": None, "from_addr": None, "to_addr": None, "subject": None}
    for m in _HEADER.finditer(head):
        key = _NAMES[m.group(1).lower()]
        if found[key] is None:
            value = m.group(2)
            if b"\n" in value:
                value = _FOLD.sub(b" ", value)
            found[key] = _decode(value.strip())[:1000]
    return found


def _decode(value: bytes) -> str:
    text = value.decode("utf-8", "replace")
    if "=?" in text:
        try:
            return str(make_header(decode_header(text)))
        except Exception:  # malformed encoded words: keep what was there
            return text
    return text


def _entry_meta(meta: dict[str, str | None]) -> dict[str, str | None]:
    return {"message_id": meta["message_id"], "from_addr": meta["from_addr"], "subject": meta["subject"]}


def _sentence(name: str, exc: BaseException) -> str:
    """The error as one sentence that names the connection (once)."""
    text = redact(str(exc))
    named = re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text)
    return text if named else f"{name}: {text}"
