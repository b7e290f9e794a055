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
fingerprint, SHA-256 of the raw bytes, which the connection recognises in whatever
folder it stored it from).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from email.header import decode_header, make_header
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from sqlalchemy import JSON, String, Table, and_, cast, delete, func, literal, or_, select, update
from sqlalchemy.orm import Session

from .certificates import Certificate, Decryption
from .errors import (
    MailError,
    MailhostError,
    NotFound,
    PermanentFailure,
    PluginError,
    StoreError,
    TemporaryFailure,
    ValidationError,
)
from .leases import holder_is_gone, worker_id
from .plugins import broke_contract
from .protocols import Direction, Estimate, IncomingSession, Listing, MessageRef
from .secrets import redact
from .store import (
    FolderCursor,
    IncomingConnection,
    IncomingItem,
    IncomingLog,
    IncomingLogEntry,
    SeenMessage,
)

if TYPE_CHECKING:
    from .app import Mailhost

__all__ = ["BATCH_BYTES", "BATCH_COUNT", "Incoming", "LogEntry", "PassReport", "item_dict", "summarize"]

log = logging.getLogger(__name__)

BATCH_COUNT = 2000  # messages per transaction
BATCH_BYTES = 32 * 1024 * 1024  # and at most this many bytes
FIRST_BATCH = 250  # messages in the first batch; the next ones double up to BATCH_COUNT
LEASE = dt.timedelta(minutes=2)  # renewed every quarter of it while a pass runs

# The columns the download pass writes, in the order of its value tuples.
_ITEM_COLUMNS = ("connection_id", "connection_name", "folder", "status", "size", "fingerprint", "raw",
                 "message_id", "subject", "from_addr", "to_addr", "decrypted", "decryption", "log_id")
_STAMPS = ("created_at", "updated_at")
_SEEN_COLUMNS = ("connection_id", "folder", "key", "fingerprint", "item_id")
_ENTRY_COLUMNS = ("log_id", "item_id", "result", "detail", "message_id", "from_addr", "subject")
_MAX_PARAMS = 32766  # bound parameters per statement: SQLite's default limit (PostgreSQL: 65,535)
_NOT_ENCRYPTED: dict[str, Any] = {"decrypted": None, "decryption": None}
_INTERRUPTED = "the pass was interrupted (crash or kill)"
#: The key of a seen message of a mailbox the connection no longer reads, before its id:
#: the space keeps it from ever equalling a protocol's key (UIDs, UIDLs, Graph ids).
RETIRED = "retired "

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
    #: The pass ended early, after a whole batch, because its caller is stopping
    #: (``serve`` on SIGTERM): what it listed beyond ``stored`` waits for the next pass.
    stopped: bool = False

    @property
    def stop_note(self) -> str | None:
        """Why a pass that ``stopped`` stored fewer messages than it listed, in the incoming
        log and in ``serve``'s output; None for a pass that was not stopped."""
        if not self.stopped:
            return None
        return (f"stopped after {self.stored + self.duplicates} of {self.listed} new message(s) as the service "
                "shut down; the next pass goes on from there")

    def as_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "connection": self.connection, "ok": self.ok, "listed": self.listed, "stored": self.stored,
            "duplicates": self.duplicates, "acknowledged": self.acknowledged, "bytes": self.bytes,
            "seconds": round(self.seconds, 3), "error": self.error, "skipped": self.skipped,
        }


T = TypeVar("T")
#: A plugin as contract errors name it (:meth:`PluginHost.named`), worked out only when
#: one is raised: finding its distribution reads the installed ones' metadata.
Blame = Callable[[], str]
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class LogEntry:
    """One message a download pass saw, and what became of it."""

    at: dt.datetime
    message_id: str | None
    from_addr: str | None
    subject: str | None
    result: str  # stored | duplicate
    detail: str | None
    item_id: int | None  # the queue item: the one stored, or the one a duplicate matched


class Incoming:
    """Download passes, the incoming queue and the incoming log."""

    def __init__(self, host: Mailhost) -> None:
        self.host = host
        self.worker = worker_id()
        #: Leases and schedules go by the store's clock, which every worker shares.
        self.clock: Callable[[], dt.datetime] = host.clock

    # -- download passes --------------------------------------------------------------

    def fetch(self, names: Sequence[str] | None = None, progress: Progress | None = None) -> list[PassReport]:
        """One pass over each named connection, or over every enabled one."""
        self.host.check_key()
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

    def fetch_one(self, name: str, progress: Progress | None = None,
                  stop: threading.Event | None = None) -> PassReport:
        """One download pass over connection ``name``; failures land in the report and log.

        ``stop`` set: the pass ends after the batch under way is stored and acknowledged
        (``report.stopped``), as after a crash there, which loses and repeats nothing; the
        next pass goes on from that batch."""
        report = PassReport(name)
        started = time.monotonic()
        conn, holder = self._claim(name)
        if conn is None:
            report.skipped = f"another worker ({holder}) is downloading it"
            return report
        with self.host.session() as s:
            # By the clock that stamps its end and that purge compares it with.
            log_row = IncomingLog(connection_id=conn.id, connection_name=conn.name, started_at=self.clock())
            s.add(log_row)
            s.flush()
            log_id = log_row.id
        wait: float | None = None
        try:
            with self._lease_kept(conn.id):
                self._run(conn, log_id, report, progress, stop)
        except MailhostError as exc:
            report.ok, report.error = False, _sentence(conn.name, exc)
            wait = getattr(exc, "retry_after", None)
        except Exception as exc:  # a plugin bug must not stop the other connections
            log.exception("download pass of %s failed", conn.name)
            report.ok, report.error = False, f"{conn.name}: {redact(self.host.plugins.unexpected(exc))}"
        report.seconds = time.monotonic() - started
        self._finish(conn, log_id, report, wait)
        return report

    def _run(self, conn: IncomingConnection, log_id: int, report: PassReport, progress: Progress | None,
             stop: threading.Event | None = None) -> None:
        provider = self.host.connections.provider(Direction.INCOMING, conn)
        action = self.host.plugins.action(conn.after_download)
        settings = self.host.connections.settings(Direction.INCOMING, conn)
        folder = conn.folder or ""
        blame = self._blame(provider.plugin)
        session = _checked_session(provider.open(settings), blame, conn.protocol)
        acks = _Acks(on_close=session.acknowledges_on_close)
        try:
            with self.host.session() as s:
                state = s.get(FolderCursor, (conn.id, folder))
                cursor = dict(state.state) if state is not None and state.state else None
                acks.recorded = acks.through = (state.acknowledged_through or 0) if state is not None else 0
            listing = _checked_listing(session.list_new(cursor, lambda keys: self._known(conn.id, folder, keys)),
                                       blame, conn.protocol)
            report.listed = len(listing.refs)
            self._finish_pending(session, conn, folder, action, report, acks)
            with _Link(session) as link:
                self._download(link, conn, folder, log_id, action, listing.refs, report, acks, progress, stop)
            with self.host.session() as s:
                self._hold(s, conn)
                # The listing's cursor says "all of it is stored": not after a pass that stopped
                # early, whose batches each committed the cursor that they reached.
                if listing.cursor is not None and not report.stopped:
                    self._put_cursor(s, conn.id, folder, dict(listing.cursor))
                self._record_acknowledged(s, conn.id, folder, acks)
        finally:
            try:
                session.close()
                closed_cleanly = session.closed_cleanly
            except Exception as exc:  # close() must not raise; everything stored stays stored
                log.warning("%s: the session's close() raised %s", conn.name, self.host.plugins.unexpected(exc),
                            exc_info=True)
                closed_cleanly = False
            unconfirmed = acks.on_close and not closed_cleanly and report.acknowledged
            if unconfirmed:  # the server applies them at a clean close only (POP3's DELE at QUIT)
                report.acknowledged = 0
            if acks.through > acks.recorded and (not acks.on_close or closed_cleanly):
                try:
                    with self.host.session() as s:
                        self._hold(s, conn)  # an edit that took the lease moved this folder's marks
                        self._record_acknowledged(s, conn.id, folder, acks, closed=True)
                except Exception as exc:  # the next pass acknowledges them again
                    log.warning("%s: could not record acknowledgements: %s", conn.name, exc,
                                exc_info=not isinstance(exc, StoreError))
        if unconfirmed and conn.after_download != "keep":  # keep had nothing to apply
            raise TemporaryFailure(
                f"{conn.name}: the server did not confirm the end of the session, so the after-download action "
                f"{conn.after_download} did not take effect on {unconfirmed} message(s): they are stored, and the "
                "next pass applies it again"
            )
        if isinstance(acks.refused, PluginError):
            raise PluginError(
                f"{conn.name}: the after-download action {conn.after_download} failed with an {acks.refused}: the "
                "messages are stored, and the next pass tries the action again; until the plugin is fixed, choose "
                f"another action (mailhost incoming edit {conn.name} --after-download ...)"
            ) from acks.refused.__cause__
        if acks.refused is not None:  # everything is stored; say what was not acknowledged
            raise (TemporaryFailure if acks.refused.temporary else PermanentFailure)(
                f"{acks.refused}: the messages are stored, and the next pass tries the after-download action "
                f"{conn.after_download} again; if the server keeps refusing it, allow it there or choose "
                f"another action (mailhost incoming edit {conn.name} --after-download ...)"
            ) from acks.refused

    def _download(
        self, link: _Link, conn: IncomingConnection, folder: str, log_id: int, action: Any,
        refs: Sequence[MessageRef], report: PassReport, acks: _Acks, progress: Progress | None,
        stop: threading.Event | None = None,
    ) -> None:
        """Fetch, commit and acknowledge batch after batch, the server and the store
        working at once: while batch N is committed, the session thread already
        downloads batch N+1, and it acknowledges N only after that commit (its queue
        runs in order: fetch N+1, then acknowledge N, then fetch N+2, ...)."""
        batches = list(_batches(refs))
        total, done = len(refs), 0
        if progress and total:
            progress(0, total)
        pending: list[tuple[Future[None], int, int]] = []  # (acknowledgement, messages, seen id it reaches)

        def settle(wait: bool) -> None:
            """Take in finished acknowledgements (all of them with ``wait``), in order.
            A refusal stops the acknowledgements, not the downloads: the mark stays below
            the refused batch, and the next pass acknowledges from there."""
            while pending and (wait or pending[0][0].done()):
                future, count, through = pending.pop(0)
                try:
                    future.result()
                except MailError as exc:
                    acks.refuse(exc)
                    continue
                except Exception as exc:  # a plugin's bug: like a refusal, it stops acknowledgements, not downloads
                    acks.refuse(self._action_failed(conn, exc))
                    continue
                report.acknowledged += count
                if acks.refused is None:
                    acks.through = max(acks.through, through)

        plugin = self._blame(self.host.plugins.protocol(Direction.INCOMING, conn.protocol).plugin)
        ahead = link.submit(_download, link.session, batches[0], plugin) if batches else None
        for i, batch in enumerate(batches):
            assert ahead is not None
            try:
                fetched = ahead.result()
            except _Broken as broken:  # store what came whole (up to the last of it), then fail
                upto = [r.key for r in batch].index(broken.fetched[-1].ref.key) + 1
                self._store_batch(conn, folder, log_id, batch[:upto], broken.fetched, report, acks)
                raise broken.error from None
            # Stopping: store and acknowledge what came, fetch no more.
            report.stopped = stop is not None and stop.is_set() and i + 1 < len(batches)
            ahead = link.submit(_download, link.session, batches[i + 1], plugin) if i + 1 < len(batches) \
                and not report.stopped else None
            settle(wait=False)
            stored, through = self._store_batch(conn, folder, log_id, batch, fetched, report, acks)
            done += len(batch)
            if stored and acks.refused is None:
                future = link.submit(action.apply, link.session, stored, conn.after_download_argument)
                pending.append((future, len(stored), through))
            if progress:
                progress(done, total)
            if report.stopped:
                break
        settle(wait=True)

    def _store_batch(
        self, conn: IncomingConnection, folder: str, log_id: int, batch: Sequence[MessageRef],
        fetched: list[_Fetched], report: PassReport, acks: _Acks,
    ) -> tuple[list[MessageRef], int]:
        """Commit one fetched batch with its cursor (and the acknowledgements made so
        far); returns the refs to acknowledge and the seen id that acknowledging them reaches."""
        if not fetched:
            return [], 0
        certificates = self._certificates(conn)
        # Decrypted before the transaction opens: a decryption plugin may be slow (a remote
        # key store), and a transaction left idle that long holds its locks and is ended by
        # PostgreSQL (idle_in_transaction_session_timeout). A message found below to be
        # stored already was decrypted for nothing: rare (a pass repeated after a crash).
        decryptions = [self._decrypt(conn.name, f.raw, certificates) if certificates else _NOT_ENCRYPTED
                       for f in fetched]
        with self.host.session() as s:
            self._hold(s, conn)
            already = self._known_in(s, conn.id, folder, [f.ref.key for f in fetched])
            dup_prints = self._fingerprints_in(s, conn.id, [f.fingerprint for f in fetched])
            items: list[tuple[Any, ...]] = []
            keys: list[tuple[str, str]] = []  # (key, fingerprint) of every message new here
            duplicates: list[tuple[str, dict[str, str | None]]] = []  # (fingerprint, summary)
            to_ack: list[MessageRef] = []
            stored: list[_Fetched] = []
            size = 0
            for f, decrypted in zip(fetched, decryptions):
                ref, raw, fp, meta = f
                if ref.key in already:
                    continue  # stored by an earlier pass: it needs no second copy
                to_ack.append(ref)
                keys.append((ref.key, fp))
                if fp in dup_prints:
                    duplicates.append((fp, meta))
                    continue
                dup_prints[fp] = None  # the same content twice in one batch: stored once
                size += len(raw)
                items.append((conn.id, conn.name, folder, "new", len(raw), fp, raw, meta["message_id"],
                              meta["subject"], meta["from_addr"], meta["to_addr"],
                              decrypted["decrypted"], decrypted["decryption"], log_id))
                stored.append(f)
            dup_prints.update(
                _insert_rows(s, IncomingItem.__table__, _ITEM_COLUMNS, items, now=_STAMPS, key="fingerprint"))
            ids = [dup_prints[f.fingerprint] for f in stored]
            _insert_rows(s, SeenMessage.__table__, _SEEN_COLUMNS,
                         [(conn.id, folder, key, fp, dup_prints[fp]) for key, fp in keys], now=("seen_at",))
            _insert_rows(s, IncomingLogEntry.__table__, _ENTRY_COLUMNS, [
                (log_id, dup_prints[fp], "duplicate", "same content already stored",
                 meta["message_id"], meta["from_addr"], meta["subject"]) for fp, meta in duplicates], now=("at",))
            through = s.execute(select(func.max(SeenMessage.id)).where(
                SeenMessage.connection_id == conn.id, SeenMessage.folder == folder)).scalar() or 0
            last_cursor = next((r.cursor for r in reversed(batch) if r.cursor is not None), None)
            if last_cursor is not None:
                self._put_cursor(s, conn.id, folder, dict(last_cursor))
            self._record_acknowledged(s, conn.id, folder, acks)
            s.execute(update(IncomingLog).where(IncomingLog.id == log_id).values(
                listed=report.listed, stored=report.stored + len(stored),
                duplicates=report.duplicates + len(duplicates), bytes=report.bytes + size))
        # Committed: the messages are safe, and the report counts them (not before: a
        # failed commit stored nothing). Now others may look at them.
        report.stored += len(stored)
        report.duplicates += len(duplicates)
        report.bytes += size
        report.item_ids.extend(ids)
        if ids and self.host.plugins.hook.message_stored.get_hookimpls():
            for f, item_id in zip(stored, ids):
                self._announce(conn.name, item_id, f.meta["message_id"], f.raw)
        return to_ack, through

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
            if result is None:
                return {"decrypted": None, "decryption": None}
            # Checked here: a value the store cannot take would fail the whole batch, every
            # pass, and block the mailbox instead of flagging this one message.
            if not (isinstance(result, Decryption) and isinstance(result.raw, (bytes, type(None)))
                    and all(isinstance(v, (str, type(None))) for v in (result.certificate, result.error))):
                raise TypeError(f"it returned a {type(result).__name__} that is not a Decryption of bytes")
            # The plaintext is kept encrypted at rest, as S/MIME meant it to be.
            decrypted = self.host.vault.encrypt(result.raw) if result.raw is not None else None
        except Exception as exc:  # stored and flagged, never dropped
            log.exception("decryption of a message of %s failed", connection)
            return {"decrypted": None, "decryption": {"error": f"decryption plugin failed: {exc}"}}
        return {"decrypted": decrypted, "decryption": {
            "certificate": result.certificate, "signed": bool(result.signed), "error": result.error}}

    def _announce(self, connection: str, item_id: int, message_id: str | None, raw: bytes) -> None:
        try:
            self.host.plugins.hook.message_stored(connection=connection, item_id=item_id, message_id=message_id, raw=raw)
        except Exception:
            log.exception("a message_stored hook failed for item %s of %s", item_id, connection)

    def _finish_pending(
        self, session: IncomingSession, conn: IncomingConnection, folder: str, action: Any,
        report: PassReport, acks: _Acks,
    ) -> None:
        """Run the after-download action for messages stored before a crash cut it short:
        the keys stored above the folder's acknowledgement mark."""
        with self.host.session() as s:
            pending = s.execute(select(SeenMessage.key, SeenMessage.id).where(
                SeenMessage.connection_id == conn.id, SeenMessage.folder == folder,
                SeenMessage.id > acks.through).order_by(SeenMessage.id)).all()
        if not pending:
            return
        log.info("%s: finishing %d acknowledgement(s) an earlier pass left", conn.name, len(pending))
        for chunk in _chunks(pending, BATCH_COUNT):
            try:
                refs = session.resolve([key for key, _ in chunk])
                if refs:
                    action.apply(session, refs, conn.after_download_argument)
            except MailError as exc:  # what is new is still downloaded, see _download
                acks.refuse(exc)
                return
            except Exception as exc:
                acks.refuse(self._action_failed(conn, exc))
                return
            report.acknowledged += len(refs)
            acks.through = chunk[-1][1]  # keys no longer on the server need nothing more

    def _action_failed(self, conn: IncomingConnection, exc: Exception) -> PluginError:
        """An after-download action's unexpected exception, logged with its traceback, as
        the refusal that stops the pass's acknowledgements (not its downloads: a plugin's
        bug in acknowledging must not keep new mail from being stored)."""
        log.error("%s: the after-download action %s failed", conn.name, conn.after_download, exc_info=exc)
        failure = PluginError(redact(self.host.plugins.unexpected(exc)))
        failure.__cause__ = exc
        return failure

    @staticmethod
    def _record_acknowledged(s: Session, connection_id: int, folder: str, acks: _Acks, closed: bool = False) -> None:
        """Write the folder's acknowledgement mark in the open transaction, if it moved
        (for sessions that acknowledge at their close, only once ``closed``)."""
        if acks.through <= acks.recorded or (acks.on_close and not closed):
            return
        row = s.get(FolderCursor, (connection_id, folder))
        if row is None:
            s.add(FolderCursor(connection_id=connection_id, folder=folder, state={},
                               acknowledged_through=acks.through))
        else:
            row.acknowledged_through = max(row.acknowledged_through or 0, acks.through)
        s.flush()
        acks.recorded = acks.through

    # -- cursors and keys -------------------------------------------------------------

    @staticmethod
    def forget_mailbox(s: Session, connection_id: int) -> None:
        """The connection now reads another mailbox (another server, user, ...): what
        its keys and cursors said holds nothing there, in the open transaction.

        Two mailboxes can share every key (Dovecot's UIDVALIDITY is the second the
        folder was made, and its UIDLs derive from it), so the keys are retired: none
        matches a message of the new mailbox, which would otherwise be skipped as
        stored, and no acknowledgement an earlier pass left pending is replayed on it
        (a delete would remove mail never downloaded). The fingerprints stay: what was
        stored before (the same mailbox under another host name) is recognised by its
        content and not stored twice.
        """
        Incoming.revoke_lease(s, connection_id)  # first: a pass under way must not store after the retirement
        marks = s.execute(select(SeenMessage.folder, func.max(SeenMessage.id))
                          .where(SeenMessage.connection_id == connection_id).group_by(SeenMessage.folder)).all()
        s.execute(update(SeenMessage).where(
            SeenMessage.connection_id == connection_id, SeenMessage.key.not_like(f"{RETIRED}%"),
        ).values(key=literal(RETIRED) + cast(SeenMessage.id, String)))
        s.execute(delete(FolderCursor).where(FolderCursor.connection_id == connection_id))
        s.add_all(FolderCursor(connection_id=connection_id, folder=folder, state={}, acknowledged_through=top)
                  for folder, top in marks)

    @staticmethod
    def respell_folder(s: Session, connection_id: int, old: str, new: str) -> None:
        """``old`` is now spelled ``new`` (the protocol's one spelling of that folder):
        its stored keys and cursor move to the new spelling, in the open transaction,
        unless the new spelling already has its own."""
        Incoming.revoke_lease(s, connection_id)  # a pass under way would go on writing the old spelling
        if s.get(FolderCursor, (connection_id, new)) is not None or s.scalar(select(SeenMessage.id).where(
                SeenMessage.connection_id == connection_id, SeenMessage.folder == new).limit(1)) is not None:
            return
        for model in (SeenMessage, FolderCursor):
            s.execute(update(model).where(model.connection_id == connection_id, model.folder == old)
                      .values(folder=new).execution_options(synchronize_session=False))

    def _blame(self, plugin: str) -> Blame:
        """How a contract error names ``plugin``: with its distribution, as the OAuth2 checks do."""
        return functools.partial(self.host.plugins.named, plugin)

    def _known(self, connection_id: int, folder: str, keys: Sequence[str]) -> set[str]:
        with self.host.session() as s:
            return self._known_in(s, connection_id, folder, keys)

    @staticmethod
    def _known_in(s: Session, connection_id: int, folder: str, keys: Sequence[str]) -> set[str]:
        """Those of ``keys`` already stored for the folder."""
        return {key for (key,) in _select_in(
            s, "SELECT key FROM incoming_seen WHERE connection_id = {} AND folder = {} AND key IN",
            (connection_id, folder), keys)}

    @staticmethod
    def _fingerprints_in(s: Session, connection_id: int, prints: Sequence[str]) -> dict[str, int | None]:
        """The queue item of each of ``prints`` the connection already stored, from any
        folder: the same folder under another spelling (Graph's ``inbox`` and ``Inbox``)
        or a folder holding copies of stored mail (the move action's target) brings
        nothing twice."""
        found: dict[str, int | None] = {}
        for fp, item_id in _select_in(
                s, "SELECT fingerprint, item_id FROM incoming_seen WHERE connection_id = {} AND fingerprint IN",
                (connection_id,), list(set(prints))):
            found.setdefault(fp, item_id)
        return found

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
        now = self.clock()
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
                      .values(status="interrupted", finished_at=now, error=_INTERRUPTED))
            return conn, None

    @staticmethod
    def _abandoned(s: Session, now: dt.datetime) -> set[int]:
        """The passes that still say running but whose worker is gone: a pass runs only
        while its worker holds the connection's lease, so one whose lease expired or whose
        holder died (or whose connection was removed) will never finish. :meth:`_claim`
        settles them for the connection it takes; these include those of connections that
        no pass takes again (disabled, removed)."""
        running = s.execute(
            select(IncomingLog.id, IncomingLog.connection_id, IncomingConnection.lease_owner,
                   IncomingConnection.lease_until)
            .outerjoin(IncomingConnection, IncomingConnection.id == IncomingLog.connection_id)
            .where(IncomingLog.status == "running")).all()
        return {log_id for log_id, connection_id, owner, until in running
                if connection_id is None or until is None or until < now or (owner and holder_is_gone(owner))}

    @staticmethod
    def _settle_abandoned(s: Session, now: dt.datetime) -> None:
        """Mark the :meth:`_abandoned` passes interrupted, in the open transaction."""
        gone = Incoming._abandoned(s, now)
        if gone:
            s.execute(update(IncomingLog).where(IncomingLog.id.in_(gone), IncomingLog.status == "running")
                      .values(status="interrupted", finished_at=now, error=_INTERRUPTED)
                      .execution_options(synchronize_session=False))

    @contextlib.contextmanager
    def _lease_kept(self, connection_id: int) -> Iterator[None]:
        """Renew the connection's lease every quarter lease while the block runs: a
        listing, a batch of big messages on a slow link or a throttled server can each
        outlast a lease, and a second worker would then take the mailbox too."""
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(LEASE.total_seconds() / 4):
                try:
                    with self.host.session() as s:
                        self._renew_lease(s, connection_id)
                except Exception as exc:  # a store that is briefly away: the next round tries again
                    log.warning("could not renew the lease of connection %s: %s", connection_id, exc,
                                exc_info=not isinstance(exc, StoreError))

        keeper = threading.Thread(target=renew, name="mailhost-lease", daemon=True)
        keeper.start()
        try:
            yield
        finally:
            stop.set()
            keeper.join()

    def _renew_lease(self, s: Session, connection_id: int) -> None:
        s.execute(update(IncomingConnection).where(IncomingConnection.id == connection_id,
                                                   IncomingConnection.lease_owner == self.worker)
                  .values(lease_until=self.clock() + LEASE).execution_options(synchronize_session=False))

    def _hold(self, s: Session, conn: IncomingConnection) -> None:
        """Check, as the first write of a pass's transaction, that the lease is still
        ours, or stop the pass: an edit pointed the connection at another mailbox (see
        :meth:`revoke_lease`), the connection was removed, or another worker took over after
        the lease ran out. Its keys and cursors would otherwise pass for the new
        mailbox's, whose messages would then never be downloaded. A write (that changes
        nothing: the keeper renews the lease), so that it locks the connection's row
        (PostgreSQL) or the store (SQLite) until the commit: an edit waits for the
        batch, or the batch sees the edit."""
        held = s.execute(update(IncomingConnection).where(IncomingConnection.id == conn.id,
                                                          IncomingConnection.lease_owner == self.worker)
                         .values(lease_owner=self.worker).execution_options(synchronize_session=False)).rowcount
        if not held:
            raise MailhostError(
                f"{conn.name}: the connection was edited, removed or taken over by another worker during this pass, "
                "which stops here; what it stored is kept, and the next pass reads the connection afresh")

    @staticmethod
    def revoke_lease(s: Session, connection_id: int) -> None:
        """Take the connection's lease from whoever holds it, in the open transaction: a
        pass under way stores nothing more (see :meth:`_hold`)."""
        s.execute(update(IncomingConnection).where(IncomingConnection.id == connection_id)
                  .values(lease_owner=None, lease_until=None).execution_options(synchronize_session=False))

    def _finish(self, conn: IncomingConnection, log_id: int, report: PassReport, wait: float | None = None) -> None:
        """Log the pass and set the next poll: after the connection's interval, or after
        ``wait``, a throttling server's Retry-After, when that is longer (polling sooner
        only prolongs the throttling, and Microsoft Graph asks to wait it out)."""
        now = self.clock()
        # A day at most: a Retry-After date far off is a server's mistake, not a reason to stop.
        after = max(dt.timedelta(minutes=conn.interval or 1), dt.timedelta(seconds=min(wait or 0, 86400)))
        # A stopped pass says so: it read like a whole one that stored less than it listed.
        status = "failed" if not report.ok else "stopped" if report.stopped else "ok"
        said = "; ".join(t for t in (report.error, report.stop_note) if t) or None
        with self.host.session() as s:
            s.execute(update(IncomingLog).where(IncomingLog.id == log_id).values(
                finished_at=now, status=status, listed=report.listed,
                stored=report.stored, duplicates=report.duplicates, acknowledged=report.acknowledged,
                bytes=report.bytes, error=said))
            # Only while the lease is ours: if it ran out and another worker took over, that
            # worker's pass is the one that says how the connection stands.
            s.execute(update(IncomingConnection).where(
                IncomingConnection.id == conn.id, IncomingConnection.lease_owner == self.worker).values(
                last_poll_at=now, last_error=report.error,
                next_poll_at=now + after,
                lease_owner=None, lease_until=None).execution_options(synchronize_session=False))

    def due(self) -> list[str]:
        """Enabled connections whose interval has passed and whose lease is free (as
        :meth:`_claim` sees it: expired, ours, or held by a process that is gone), soonest
        first. Ours counts: a pass that lost the store before it could release its lease
        is tried again as soon as the store answers, not when the lease runs out (the
        caller knows which of its passes still run)."""
        now = self.clock()
        free = or_(IncomingConnection.lease_until.is_(None), IncomingConnection.lease_until < now)
        with self.host.session() as s:
            rows = s.execute(
                select(IncomingConnection.name, free, IncomingConnection.lease_owner).where(
                    IncomingConnection.enabled.is_(True),
                    or_(IncomingConnection.next_poll_at.is_(None), IncomingConnection.next_poll_at <= now),
                ).order_by(IncomingConnection.next_poll_at)
            ).all()
        # A serve restarted after a kill must not wait out the dead process's lease.
        return [name for name, is_free, owner in rows
                if is_free or owner == self.worker or (owner and holder_is_gone(owner))]

    # -- estimate ---------------------------------------------------------------------

    def estimate(self, name: str) -> Estimate:
        """How many messages the next pass of ``name`` would download (for ``enable``).

        The plugin counts downloads; only the store knows that some of them may be
        copies of mail the connection stored from another folder or mailbox, which the
        pass recognises by content and does not store again. An exact count says so.
        """
        conn = self.host.connections.get(Direction.INCOMING, name)
        provider = self.host.connections.provider(Direction.INCOMING, conn)
        folder = conn.folder or ""
        with self.host.session() as s:
            state = s.get(FolderCursor, (conn.id, folder))
            cursor = dict(state.state) if state is not None else None
            stored_elsewhere = s.scalar(select(SeenMessage.id).where(
                SeenMessage.connection_id == conn.id,
                or_(SeenMessage.folder != folder, SeenMessage.key.startswith(RETIRED, autoescape=True))).limit(1))
        blame = self._blame(provider.plugin)
        session = _checked_session(provider.open(self.host.connections.settings(Direction.INCOMING, conn)),
                                   blame, conn.protocol)
        try:
            estimate = session.estimate(cursor, lambda keys: self._known(conn.id, folder, keys))
        finally:
            try:
                session.close()
            except Exception as exc:  # close() must not raise; the estimate stands
                log.warning("%s: the session's close() raised %s", conn.name, self.host.plugins.unexpected(exc),
                            exc_info=True)
        if not (isinstance(estimate, Estimate) and type(estimate.count) is int and estimate.count >= 0
                and estimate.confidence in ("exact", "high", "low") and isinstance(estimate.note, str)):
            raise _contract(blame, conn.protocol, f"estimate returned {estimate!r:.80}, not an "
                            "Estimate(count, confidence) of a whole number and exact, high or low")
        # Other confidences hedge already, in the plugin's own words.
        if estimate.count and estimate.confidence == "exact" and stored_elsewhere is not None:
            note = (f"some of them may be stored already: {conn.name} stored mail from another folder or mailbox "
                    "before, and a message it recognises by content is logged as a duplicate, not stored again")
            estimate = dataclasses.replace(estimate, note=f"{estimate.note}; {note}" if estimate.note else note)
        return estimate

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
            found = list(s.scalars(q))
            if connection and not found:
                self.host.connections.check_filter(Direction.INCOMING, connection, IncomingItem.connection_name, s)
            return found

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
        """Move a queue item on (for handlers: processing, processed, filtered, failed).

        Setting ``processing`` again renews it: an item whose status is older than
        ``[incoming] processing_timeout_minutes`` is released back to ``new`` (see
        :meth:`release`).
        """
        _check_status(status)
        with self.host.session() as s:
            item = s.get(IncomingItem, item_id)
            if item is None:
                raise NotFound(f"no incoming queue item {item_id}")
            # Stamped even when nothing else changes: that is how a handler renews its claim.
            item.status, item.error, item.updated_at = status, error, self.clock()

    def release(self, processing_for: dt.timedelta) -> int:
        """Put items whose status has been ``processing`` for longer than
        ``processing_for`` back to ``new``, noting why; returns how many.

        A handler that takes an item and dies leaves it ``processing``, where nothing
        else would take it: like a message whose visibility timeout ran out, it goes
        back for another handler (which may then repeat what the dead one did).
        """
        minutes = round(processing_for.total_seconds() / 60, 2)
        now = self.clock()
        stale = and_(IncomingItem.status == "processing", IncomingItem.updated_at <= now - processing_for)
        with self.host.session() as s:
            # Look before writing: `serve` asks every minute, and most minutes there is
            # nothing to release, so a store that reads but cannot write stays quiet.
            if s.scalar(select(IncomingItem.id).where(stale).limit(1)) is None:
                return 0
            return s.execute(update(IncomingItem).where(stale).values(status="new", updated_at=now, error=(
                f"released back to new after more than {minutes:g} minute(s) in processing: its handler "
                "presumably died")).execution_options(synchronize_session=False)).rowcount

    def logs(self, connection: str | None = None, limit: int | None = None) -> list[IncomingLog]:
        """Download passes, newest first (a pass whose worker is gone says interrupted)."""
        with self.host.session() as s:
            gone = self._abandoned(s, self.clock())
            q = select(IncomingLog).order_by(IncomingLog.id.desc())
            if connection:
                q = q.where(IncomingLog.connection_name == connection)
            if limit:
                q = q.limit(limit)
            found = list(s.scalars(q))
            if connection and not found:
                self.host.connections.check_filter(Direction.INCOMING, connection, IncomingLog.connection_name, s)
        # Shown as what they are, not written: a listing must work on a read-only store, and
        # never wait for a batch's commit. The rows are detached now, so nothing is flushed.
        for entry in found:
            if entry.id in gone and entry.status == "running":
                entry.status, entry.error = "interrupted", _INTERRUPTED
        return found

    def log_entries(self, log_id: int) -> list[LogEntry]:
        """The messages one pass saw: those it stored (queue items naming the pass) and
        the other outcomes it logged (duplicates), in the order it saw them."""
        with self.host.session() as s:
            stored = s.execute(select(
                IncomingItem.id, IncomingItem.created_at, IncomingItem.message_id, IncomingItem.from_addr,
                IncomingItem.subject).where(IncomingItem.log_id == log_id).order_by(IncomingItem.id)).all()
            other = s.scalars(select(IncomingLogEntry).where(IncomingLogEntry.log_id == log_id)
                              .order_by(IncomingLogEntry.id)).all()
        entries = [LogEntry(at, message_id, from_addr, subject, "stored", None, item_id)
                   for item_id, at, message_id, from_addr, subject in stored]
        entries += [LogEntry(e.at, e.message_id, e.from_addr, e.subject, e.result, e.detail, e.item_id) for e in other]
        return sorted(entries, key=lambda e: e.at)

    def purge(self, older_than: dt.timedelta, statuses: Iterable[str] = ("processed", "filtered")) -> tuple[int, int]:
        """Delete queue items in ``statuses`` and log passes older than ``older_than``.

        The keys of purged messages stay recorded, so they are not downloaded again.
        Passes still running are kept, unless their worker is gone (see
        :meth:`_settle_abandoned`). Items being processed are never purged (release them first, see :meth:`release`).
        Returns (items deleted, passes deleted).
        """
        statuses = list(statuses)
        for status in statuses:
            _check_status(status)
        if "processing" in statuses:
            raise ValidationError(
                "items in status processing are not purged, since a handler may be working on them: put those "
                "whose handler died back to new with `mailhost queue incoming release`, then purge them", "status")
        now = self.clock()  # the items' times are the database's
        cutoff = now - older_than
        with self.host.session() as s:
            self._settle_abandoned(s, now)  # a pass whose worker died is over, and as old as it started
            items = s.execute(delete(IncomingItem).where(
                IncomingItem.created_at < cutoff, IncomingItem.status.in_(statuses))).rowcount
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
    """Batches bounded by count and bytes. The first ones are small and each doubles,
    so that the store starts working while the server sends the rest."""
    batch: list[MessageRef] = []
    size, limit = 0, min(FIRST_BATCH, BATCH_COUNT)
    for ref in refs:
        ref_size = ref.size or 0
        if batch and (len(batch) >= limit or size + ref_size > BATCH_BYTES):
            yield batch
            batch, size, limit = [], 0, min(limit * 2, BATCH_COUNT)
        batch.append(ref)
        size += ref_size
    if batch:
        yield batch


@dataclass
class _Acks:
    """How far a pass acknowledged the folder's stored keys (incoming_seen ids, which
    are acknowledged in order), and how far the store knows it.

    The mark is written with the next batch's commit (one transaction per batch, not
    two); for sessions whose acknowledgements hold only at a clean close (POP3: DELE
    takes effect at QUIT), only after that close. A mark not written means the next
    pass acknowledges those keys again, which is harmless.
    """

    on_close: bool
    through: int = 0
    recorded: int = 0
    #: The server's first refusal of an acknowledgement in this pass, or a plugin's
    #: unexpected exception in one (a PluginError): no more are tried.
    refused: MailError | PluginError | None = None

    def refuse(self, exc: MailError | PluginError) -> None:
        if self.refused is None:
            self.refused = exc


class _Link:
    """The thread that talks to the server during a pass, one call after another.

    Network reads (and the server's own work) then overlap with the store's commits,
    which release the GIL while SQLite or PostgreSQL writes. Calls run in the order
    they were submitted, so the session is never used by two threads at once. Leaving
    the block early (an error) cancels what was not started yet: an acknowledgement
    that never ran is finished by the next pass.
    """

    def __init__(self, session: IncomingSession) -> None:
        self.session = session
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mailhost-session")

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        return self._pool.submit(fn, *args)

    def __enter__(self) -> _Link:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self._pool.shutdown(wait=True, cancel_futures=exc_type is not None)


class _Fetched(NamedTuple):
    """A downloaded message with what the store needs of it."""

    ref: MessageRef
    raw: bytes
    fingerprint: str  # SHA-256 of the raw bytes, hex
    meta: dict[str, str | None]  # summarize()


class _Broken(Exception):
    """A batch whose download failed after some of its messages had arrived whole."""

    def __init__(self, fetched: list[_Fetched], error: Exception) -> None:
        super().__init__(str(error))
        self.fetched, self.error = fetched, error


def _download(session: IncomingSession, refs: Sequence[MessageRef], plugin: Blame) -> list[_Fetched]:
    """Fetch a batch, fingerprint and summarize it (on the link's thread, so this
    Python work overlaps with the previous batch's commit). A failure after whole
    messages arrived (a server's, or a plugin's bug) raises :class:`_Broken` with them,
    so that they are stored."""
    fetched: list[_Fetched] = []
    asked = {ref.key for ref in refs}
    try:
        for item in session.fetch(refs):
            ref, raw = _checked_fetched(item, asked, plugin)
            asked.discard(ref.key)  # once: a key yielded twice would be stored twice
            fetched.append(_Fetched(ref, raw, hashlib.sha256(raw).hexdigest(), summarize(raw)))
    except Exception as exc:
        if fetched:
            raise _Broken(fetched, exc) from exc
        raise
    return fetched


#: The longest key a session may give a message (the store's column).
MAX_KEY = 500


def _contract(plugin: Blame, protocol: str, what: str) -> PluginError:
    """A session's answer that breaks the contract of docs/plugin_hooks.md."""
    return broke_contract(plugin(), "session", f"its {protocol} session's {what}")


def _checked_session(session: Any, plugin: Blame, protocol: str) -> IncomingSession:
    """What a provider's ``open`` returned, checked: an IncomingSession."""
    if not isinstance(session, IncomingSession):
        raise broke_contract(plugin(), "session", f"its {protocol} open returned {type(session).__name__}, not a "
                                                  "mailhost.IncomingSession")
    return session


def _checked_listing(listing: Any, plugin: Blame, protocol: str) -> Listing:
    """``list_new``'s answer, checked: a Listing of MessageRefs whose keys are text of
    at most :data:`MAX_KEY` characters, each listed once. A key that is not text never
    matches the stored one (it comes back as text), and one listed twice would fail the
    batch's commit at every pass, blocking the mailbox."""
    if not isinstance(listing, Listing):
        raise _contract(plugin, protocol, f"list_new returned {type(listing).__name__}, not a mailhost.Listing")
    seen: set[str] = set()
    for ref in listing.refs:
        if not isinstance(ref, MessageRef):
            raise _contract(plugin, protocol, f"list_new listed {type(ref).__name__} {ref!r:.80}, not a MessageRef")
        if not isinstance(ref.key, str) or not ref.key or len(ref.key) > MAX_KEY:
            raise _contract(plugin, protocol, f"list_new listed the key {ref.key!r:.80}; a key is text of 1 to "
                                              f"{MAX_KEY} characters")
        if ref.key in seen:
            raise _contract(plugin, protocol, f"list_new listed the key {ref.key!r:.80} twice; a key names one "
                                              "message, listed once")
        seen.add(ref.key)
    return listing


def _checked_fetched(item: Any, asked: set[str], plugin: Blame) -> tuple[MessageRef, bytes]:
    """One ``(ref, raw bytes)`` of ``fetch``, checked: a ref it was asked for (and not
    given yet), and bytes."""
    ref, raw = item if isinstance(item, tuple) and len(item) == 2 else (None, None)
    if not isinstance(ref, MessageRef):
        raise broke_contract(plugin(), "session", f"its fetch yielded {item!r:.80}, not a (MessageRef, bytes) pair")
    if ref.key not in asked:
        raise broke_contract(plugin(), "session", f"its fetch yielded the key {ref.key!r:.80}, which it was not "
                                                  "asked for in this batch, or yielded it twice")
    if not isinstance(raw, bytes):
        raise broke_contract(plugin(), "session", f"its fetch yielded {type(raw).__name__}, not bytes, for the "
                                                  f"key {ref.key!r:.80}: give each message as the server sent it")
    return ref, raw


def _chunks(items: list[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _select_in(s: Session, sql: str, params: tuple[Any, ...], values: Sequence[Any]) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` (a SELECT whose ``{}`` take ``params``, ending in ``IN``) for
    ``values``, in as few statements as the parameter limit allows; straight through
    the DB-API for the reason :func:`_insert_rows` gives."""
    if not values:
        return []
    mark = "?" if s.get_bind().dialect.paramstyle == "qmark" else "%s"
    head = sql.format(*[mark] * len(params))
    per = _MAX_PARAMS - len(params)
    found: list[tuple[Any, ...]] = []
    cursor = s.connection().connection.cursor()
    try:
        for start in range(0, len(values), per):
            chunk = list(values[start:start + per])
            cursor.execute(f"{head} ({', '.join([mark] * len(chunk))})", [*params, *chunk])
            found.extend(cursor.fetchall())
    finally:
        cursor.close()
    return found


def _insert_rows(s: Session, table: Table, columns: Sequence[str], rows: list[tuple[Any, ...]],
                 *, now: Sequence[str] = (), key: str | None = None) -> dict[Any, int]:
    """Insert ``rows`` (values of ``columns``, in order) into ``table`` in the session's
    transaction; with ``key`` (a column whose values are unique among ``rows``), the new
    ids by that column's value.

    The hot path of every download, so it talks to the DB-API directly, with a few
    multi-row ``INSERT ... VALUES (...), (...)`` statements. SQLAlchemy's per-row
    parameter processing cost a third of a pass; and ``executemany`` gives up the GIL
    for every row, which, with the session thread busy, costs a thread switch interval
    per row (measured: 40 s instead of 0.1 s for 20,000 rows). The values are plain str,
    int, bool, bytes and None, JSON columns take ``dict``s (serialized here), the
    ``now`` columns take the database clock. On SQLite the ids come from
    ``last_insert_rowid()``: a new row of an AUTOINCREMENT table gets one more than the
    largest id ever given and one writer at a time gets in, so a statement's rows get the
    consecutive run of ids ending there. PostgreSQL returns them (``RETURNING``).
    """
    if not rows:
        return {}
    dialect = s.get_bind().dialect
    sqlite = dialect.name == "sqlite"
    mark = "?" if dialect.paramstyle == "qmark" else "%s"
    json_at = {i for i, c in enumerate(columns) if isinstance(table.c[c].type, JSON)}
    if json_at:  # only rows that carry a JSON value are rebuilt (most carry none)
        rows = [tuple(json.dumps(v) if i in json_at and v is not None else v for i, v in enumerate(row))
                if any(row[i] is not None for i in json_at) else row for row in rows]
    marks = [mark + ("::json" if i in json_at and not sqlite else "") for i in range(len(columns))]
    one = f"({', '.join([*marks, *['CURRENT_TIMESTAMP'] * len(now)])})"
    head = f"INSERT INTO {table.name} ({', '.join([*columns, *now])}) VALUES "
    tail = "" if key is None or sqlite else f" RETURNING id, {key}"
    at = columns.index(key) if key is not None else -1
    per = max(1, _MAX_PARAMS // len(columns))
    ids: dict[Any, int] = {}
    cursor = s.connection().connection.cursor()  # the session's transaction, its DB-API connection
    try:
        for start in range(0, len(rows), per):
            chunk = rows[start:start + per]
            cursor.execute(head + ", ".join([one] * len(chunk)) + tail, [v for row in chunk for v in row])
            if key is None:
                continue
            if sqlite:
                last = cursor.execute("SELECT last_insert_rowid()").fetchone()[0]
                ids.update(zip((row[at] for row in chunk), range(last - len(chunk) + 1, last + 1), strict=True))
            else:
                ids.update((value, item_id) for item_id, value in cursor.fetchall())
    finally:
        cursor.close()
    return ids


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


def _sentence(name: str, exc: BaseException) -> str:
    """The error as one sentence that names the connection (once)."""
    text = redact(str(exc))
    named = re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text)
    return text if named else f"{name}: {text}"
