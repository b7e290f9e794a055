"""The outgoing pipeline: a durable queue that sends each message once. Protocol-agnostic.

A message's life::

    send/enqueue ──> queued ──claim──> sending ──250──> sent
                       ▲                  │
                       └── 4xx, timeout ──┤  (backoff + jitter, up to a limit of
                                          │   attempts and age, then failed)
                                          └── 5xx ──> failed

1. ``enqueue`` checks the message against the connection's size limit and the server's
   SIZE (when a session has told it) and commits it as ``queued``.
2. A delivery pass claims due messages in small batches with a row lease (PostgreSQL:
   ``SELECT ... FOR UPDATE SKIP LOCKED`` inside the claiming ``UPDATE``; SQLite: one
   atomic ``UPDATE ... WHERE status = 'queued'``, SQLite admitting one writer at a
   time). A claimed row is ``sending``, owned by this worker until its lease ends, so
   two workers, in one process or many, never send one message.
3. Each worker thread keeps one session per connection open for many messages; a long
   queue gets several sessions in parallel (``[outgoing] messages_per_session``).
4. The outcome of each message is committed right after the server's reply, and every
   attempt is recorded. The commit of message k overlaps the envelope (MAIL, RCPT,
   DATA) of message k + 1, but k + 1's content waits until k is durable; the records
   of parallel sessions share one transaction (group commit).

Crash safety. A worker that dies leaves its claimed rows ``sending``; once their lease
has expired, or at once when the owner was a process on this host that no longer runs,
the next pass puts them back in the queue and records the interrupted attempt. A worker
that stops on an error gives back at once the rows it never tried; while the store is
away, the end of its pass or the next pass of this process does (``serve``: the next
tick that delivers). A row whose content may have gone out keeps its lease. A worker
stalled for most of its lease (stopped, swapping, cut off from the store) sends no
message's content once it runs again: its leases may have run out and been taken over
(each is checked, by this process's monotonic clock, at the gate). One
duplicate cannot be avoided by any SMTP client: the server accepted a message (it
committed it and was about to say 250) and the worker died before recording that. The
window is at most one message per open session: a session never sends the content of a
message while the previous one's outcome is unrecorded. The same doubt arises when the
server's answer to a sent message never comes (an SMTP session waits 10 minutes for it, as
RFC 5321 asks, then gives up, or the link drops): that attempt is recorded as
``interrupted`` too, and the message waits for a retry through its own connection
rather than going to the default one at once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import email.policy
import functools
import hashlib
import inspect
import itertools
import logging
import math
import mimetypes
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.header import Header, decode_header, make_header
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.utils import formataddr, formatdate, getaddresses, make_msgid, parseaddr
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import (
    ColumnElement,
    Table,
    and_,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)

from .config import Policy  # [outgoing] is read with the rest of the config file
from .connections import _on_the_wire, check_address, check_lengths  # one check for each, everywhere
from .errors import (
    ConfigError,
    ConnectFailure,
    MailhostError,
    NotFound,
    PermanentFailure,
    StoreError,
    TemporaryFailure,
    ValidationError,
)
from .leases import holder_is_gone, worker_id
from .plugins import broke_contract
from .protocols import ConnectionSettings, Direction, OutgoingSession, SendResult, crlf
from .secrets import redact
from .store import MAX_INT, OutgoingAttempt, OutgoingConnection, OutgoingItem

if TYPE_CHECKING:
    from .app import Mailhost

__all__ = [
    "OUTGOING_STATUSES",
    "ConnectionReport",
    "DeliveryReport",
    "Draft",
    "Outgoing",
    "Policy",
    "TestEmail",
    "item_dict",
    "personalize",
]

log = logging.getLogger(__name__)

OUTGOING_STATUSES = ("queued", "sending", "sent", "failed")

_T = cast(Table, OutgoingItem.__table__)
_A = cast(Table, OutgoingAttempt.__table__)
_POLICY_7BIT = email.policy.SMTP.clone(cte_type="7bit")  # portable: no 8BITMIME needed
_COUNT_LOCK = threading.Lock()


# ---------------------------------------------------------------------------------------
# Composing messages
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Draft:
    """A message ready to queue: the raw bytes (CRLF) and its envelope recipients."""

    raw: bytes
    recipients: tuple[str, ...]
    message_id: str | None
    subject: str | None
    from_addr: str | None  # None: the connection's From address is added at delivery
    source: str = "the message"  # what errors call it: the .eml file it came from


def _delivery_key(item: _Claimed) -> str:
    """What names ``item`` to its session on every attempt, and nothing else, even in
    another store: its row id and creation time, hashed (the session learns nothing of the store)."""
    return hashlib.sha256(f"{item.id}\0{item.created_at.isoformat()}".encode("ascii")).hexdigest()[:32]


def _addr_spec(value: str) -> str:
    return parseaddr(value)[1]


def _header_text(value: str | None) -> str | None:
    if value is None:
        return None
    return _decoded(" ".join(str(value).split()))


def _decoded(text: str) -> str:
    """``text`` with its RFC 2047 encoded words decoded; its spacing is kept."""
    if "=?" in text:
        try:
            return str(make_header(decode_header(text)))
        except Exception:  # malformed encoded words: show them as they are
            return text
    return text


def _split(raw: bytes) -> tuple[bytes, bytes]:
    """(header block incl. its last CRLF, the rest incl. the blank line)."""
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        return (raw if raw.endswith(b"\r\n") else raw + b"\r\n"), b"\r\n"
    return raw[: end + 2], raw[end + 2:]


def _header_re(name: str) -> re.Pattern[bytes]:
    return re.compile(rb"(?im)^" + re.escape(name.encode()) + rb"[ \t]*:.*\r\n(?:[ \t].*\r\n)*")


_SUBJECT = _header_re("Subject")
_FROM = _header_re("From")
_BCC = _header_re("Bcc")
_RESENT_BCC = _header_re("Resent-Bcc")
_FIELD = re.compile(rb"[!-9;-~]+[ \t]*:")  # a header line: a field name (RFC 5322 3.6.8), then ":"


def _has_from(raw: bytes) -> bool:
    """Whether message ``raw`` has its own From (else its connection's is added when sent)."""
    end = raw.find(b"\r\n\r\n")  # the header only: a body line may start with "From:"
    return _FROM.search(raw, 0, end + 2 if end >= 0 else len(raw)) is not None


#: Fields every email message has at least one of; a file with none is something else.
_MESSAGE_FIELDS = {"from", "to", "cc", "bcc", "subject", "date", "message-id", "mime-version", "sender"}


def _fold(name: str, value: str) -> bytes:
    """``Name: value`` folded, non-ASCII as RFC 2047 encoded words (policy.fold would
    leave a short value unencoded)."""
    header = _POLICY_7BIT.header_factory(name, value)
    folded: str = header.fold(policy=_POLICY_7BIT)
    return folded.encode("ascii")


def address_header(name: str, addresses: Sequence[str]) -> bytes:
    """A ``From:``, ``To:`` or ``Cc:`` line for ``addresses`` (each ``Name <addr>``), one
    address per folded line. Display names are RFC 2047 encoded; an internationalized
    address (SMTPUTF8) travels as UTF-8 (RFC 6532), as an encoded word is no address."""
    parts = []
    for address in addresses:
        display, addr = parseaddr(address)
        if addr.isascii():
            parts.append(formataddr((display, addr)))
        elif display:  # formataddr refuses the address: it writes the name, the address is put back
            shown = formataddr((display, "x@x"))
            parts.append(f"{shown[: shown.rindex('<')]}<{addr}>")
        else:
            parts.append(addr)
    return (f"{name}: " + ",\r\n ".join(parts) + "\r\n").encode("utf-8")


def personalize(raw: bytes, from_line: bytes | None, prefix: str | None) -> bytes:
    """``raw`` with a From header added (when ``from_line``) and the subject prefixed.

    Works on the bytes: the body, and every header not touched, stay exactly as queued.
    """
    if not from_line and not prefix:
        return raw
    head, rest = _split(raw)
    top = from_line or b""
    if prefix:
        m = _SUBJECT.search(head)
        if m:
            head = head[: m.start()] + _prefixed(m.group(0).split(b":", 1)[1], prefix) + head[m.end():]
        else:
            top += _fold("Subject", prefix)
    return top + head + rest


_LEADING_WSP = re.compile(rb"(?:[ \t]|\r\n[ \t])*")
_FOLD = re.compile(r"\r\n(?=[ \t])")


def _prefixed(value: bytes, prefix: str) -> bytes:
    """The ``Subject:`` line for field body ``value`` (from the colon to its last CRLF)
    with ``prefix`` in front: the subject's own bytes, spacing and folding stay as they
    are; only a raw 8-bit subject that is not UTF-8 is decoded and encoded again."""
    old = value[_LEADING_WSP.match(value).end():-2]  # type: ignore[union-attr]  # matches always
    if not old:
        return _fold("Subject", prefix)
    try:
        old.decode("utf-8")
    except UnicodeDecodeError:  # raw 8-bit from an old mailer: Latin-1 keeps every byte a letter
        text = _FOLD.sub("", old.decode("latin-1"))  # unfolded (RFC 5322 2.2.3), not squeezed
        return _fold("Subject", f"{prefix} {_decoded(text)}")
    if prefix.isascii() or not old.isascii():  # an RFC 6532 subject takes a UTF-8 prefix as it is
        first = b"Subject: " + prefix.encode("utf-8")
    elif old.startswith(b"=?"):  # space between encoded words vanishes (RFC 2047 6.2): put it inside
        first = b"Subject: " + Header(prefix + " ", "utf-8", header_name="Subject").encode(linesep="\r\n").encode()
    else:
        first = _fold("Subject", prefix)[:-2]
    line = first.rsplit(b"\n", 1)[-1] + b" " + old.split(b"\r\n", 1)[0]
    # Folded before the subject when the line would be too long: unfolding gives back the space.
    return first + (b"\r\n " if len(line) > 78 else b" ") + old + b"\r\n"


# ---------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------


@dataclass
class ConnectionReport:
    """What one delivery pass did through one connection."""

    connection: str
    due: int = 0
    sessions: int = 0
    sent: int = 0
    partial: int = 0
    retrying: int = 0
    failed: int = 0
    fell_back: int = 0
    error: str | None = None

    def add(self, counter: str) -> None:
        """Count one message; the workers of a pass share the report."""
        with _COUNT_LOCK:
            setattr(self, counter, getattr(self, counter) + 1)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return dataclasses.asdict(self)

    def counts(self) -> str:
        """The outcomes in words, as the CLI and serve's log say them: "2 sent, 1 to retry"."""
        return ", ".join(f"{n} {label}" for n, label in (
            (self.sent, "sent"), (self.partial, "partly delivered"), (self.retrying, "to retry"),
            (self.failed, "failed"), (self.fell_back, "via the default")) if n) or "nothing sent"


@dataclass
class DeliveryReport:
    """What one delivery pass did."""

    connections: dict[str, ConnectionReport] = field(default_factory=dict)
    recovered: int = 0
    seconds: float = 0.0
    error: str | None = None
    #: Why purging the sent messages past ``keep_sent_days`` failed (also logged); the
    #: pass went on without it.
    purge_error: str | None = None

    @property
    def sent(self) -> int:
        """Messages the servers accepted in this pass (partly accepted ones included)."""
        return sum(r.sent + r.partial for r in self.connections.values())

    def as_dicts(self) -> list[dict[str, Any]]:
        """The JSON form: one object per connection."""
        return [{**r.as_dict(), "seconds": round(self.seconds, 3)} for r in self.connections.values()]


@dataclass(frozen=True)
class TestEmail:
    """The outcome of ``outgoing test-email``: the transcript and what the server said."""

    __test__ = False  # not a pytest test class

    ok: bool
    connection: str
    to: str
    response: str = ""
    refused: Mapping[str, str] = field(default_factory=dict)
    error: str | None = None
    transcript: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------
# Delivery internals
# ---------------------------------------------------------------------------------------


@dataclass
class _Claimed:
    """A claimed queue row, as the claiming UPDATE returned it."""

    id: int
    connection_name: str | None
    raw: bytes
    recipients: list[str]
    accepted: list[str]
    refused: dict[str, str]
    from_addr: str | None
    message_id: str | None
    attempts: int
    created_at: dt.datetime
    queued_at: dt.datetime | None
    sent_at: dt.datetime | None
    sent_via: str | None = None
    fell_back: bool = False
    #: Its content may have reached a server (the gate let it through): never given
    #: back to the queue before its outcome is recorded or its lease ends.
    tried: bool = False

    @functools.cached_property
    def own_from(self) -> bool:
        """Whether the message has its own From; ``from_addr`` may be a connection's otherwise."""
        return _has_from(self.raw)

    def pending(self) -> list[str]:
        """Recipients still to deliver: not accepted, not refused for good (5xx)."""
        done = set(self.accepted)
        return [r for r in self.recipients
                if r not in done and not self.refused.get(r, "").startswith("5")]


_CLAIM_COLUMNS = (_T.c.id, _T.c.connection_name, _T.c.raw, _T.c.recipients, _T.c.accepted, _T.c.refused,
                  _T.c.from_addr, _T.c.message_id, _T.c.attempts, _T.c.created_at, _T.c.queued_at, _T.c.sent_at,
                  _T.c.sent_via, _T.c.fell_back, _T.c.next_attempt_at)


@dataclass
class _Try:
    """One attempt through one connection."""

    connection: str
    kind: str  # sent, partial, connection, temporary, permanent, interrupted (sent, not confirmed)
    detail: str
    result: SendResult | None = None
    refused: dict[str, str] = field(default_factory=dict)
    retry_after: float | None = None
    ms: int = 0

    @property
    def delivered(self) -> bool:
        return self.kind in ("sent", "partial")


@dataclass
class _Record:
    """What to commit for one message: the row's new state and its attempt rows."""

    item_id: int
    owner: str  # the session's lease owner
    values: dict[str, Any]
    attempts: list[dict[str, Any]]
    #: Whether the message's content may have reached a server (an attempt got past the
    #: gate); one that never did is not in doubt when this record is lost.
    tried: bool = True
    #: (connection, message id, recipients) for the message_sent hook, once committed.
    announce: tuple[str, str | None, tuple[str, ...]] | None = None
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def wait(self) -> None:
        """Block until committed; raise if the commit failed."""
        self.done.wait()
        if self.error is not None:
            raise self.error


class _GateFailed(Exception):
    """The previous message's outcome could not be committed, or this worker's lease
    on the message ran out: stop sending."""


def _gate(prev: _Record | None, item_id: int, recorder: _Recorder) -> Callable[[], None]:
    """What a session calls before a message's content goes out: wait for the
    previous outcome to be durable, then check that the lease on the message still
    holds long enough for the recorder to renew it. A worker that was stalled longer
    than its lease (stopped, swapping, cut off from the store) may find the message
    taken over by another worker, which sends it too."""

    def wait() -> None:
        if prev is not None:
            try:
                prev.wait()
            except BaseException as exc:
                raise _GateFailed(f"the outcome of outgoing item {prev.item_id} could not be recorded: {exc}") from exc
        if not recorder.holds(item_id):
            raise _GateFailed(
                f"this worker's lease on outgoing item {item_id} ran out before the message went out (the worker was "
                f"stalled, or could not renew it in the store, for about [outgoing] lease_seconds, {recorder.lease:g} "
                "s): another worker may take it over, so this one leaves it and the rest of its batch; raise "
                "lease_seconds if stalls this long are expected")

    return wait


class _Recorder:
    """One thread that commits outcomes: the sessions' results share transactions.

    A worker hands over the outcome of a message and goes on with the next one's
    envelope; that message's content waits until the outcome is committed (the gate),
    so at most one message per session is ever accepted and unrecorded. The outcomes of
    parallel sessions land in one transaction (group commit). The recorder also renews
    the leases of this process's sessions while a pass runs.
    """

    _STOP = object()
    #: How long a commit waits for the other sessions' outcomes to join it. A commit
    #: costs an fsync (SQLite synchronous=FULL, PostgreSQL's WAL flush) of about a
    #: millisecond; sharing it is what lets parallel sessions scale.
    GATHER = 0.001
    #: How long outcomes are tried again while the store is away (at most half a lease).
    RETRY_FOR = 60.0

    def __init__(self, outgoing: Outgoing, prefix: str) -> None:
        self.out = outgoing
        self.prefix = prefix  # the lease owners of this pass's sessions start with it
        self.q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        #: Workers between two messages of a batch; each will hand in an outcome soon.
        self.sending = 0
        self._update: _Prepared | None = None
        self._insert: _Prepared | None = None
        self._renewed = time.monotonic()
        self.lease = self.out.policy.lease.total_seconds()
        #: Seconds between two renewals of the leases of this pass's messages.
        self.every = max(1.0, self.lease / 3)
        #: Until when (time.monotonic()) this pass surely holds the lease on each row it
        #: claimed: one lease after the claim or the last renewal that covered the row
        #: began. Kept here, not read back from the store: after a stall the store may
        #: say the lease was taken, or nothing at all.
        self._held: dict[int, float] = {}
        self._held_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="outgoing-recorder", daemon=True)
        self._thread.start()

    def busy(self, delta: int) -> None:
        """A worker starts (+1) or stops (-1) sending a batch of messages."""
        with _COUNT_LOCK:
            self.sending += delta

    def submit(self, rec: _Record) -> None:
        """Hand ``rec`` over for the next commit; ``rec.wait()`` waits for it."""
        self.q.put(rec)

    def stop(self) -> None:
        """Commit what is pending and end the thread."""
        self.q.put(self._STOP)
        self._thread.join()

    def leased(self, ids: Collection[int], since: float) -> None:
        """The pass holds the leases on ``ids``, taken or renewed by a statement begun at
        ``since`` (time.monotonic()) for one lease."""
        with self._held_lock:
            for item_id in ids:
                self._held[item_id] = since + self.lease

    def holds(self, item_id: int) -> bool:
        """Whether the pass holds the lease on ``item_id`` for longer than the recorder
        takes to renew it: its content may go out, and its outcome be recorded, before
        any other worker can take it over. A lease running short (the recorder was busy
        recording) is renewed here first; one that ran out is not (see _safe_renew)."""
        if self._left(item_id) > self.every:
            return True
        self._safe_renew()
        return self._left(item_id) > self.every

    def _left(self, item_id: int) -> float:
        with self._held_lock:
            return self._held.get(item_id, 0.0) - time.monotonic()

    def _run(self) -> None:
        every = self.every
        stopping = False
        while not stopping:
            try:
                first = self.q.get(timeout=every)
            except queue.Empty:
                self._safe_renew()
                continue
            batch: list[_Record] = []
            if first is self._STOP:
                stopping = True
            else:
                batch.append(first)
            deadline = time.monotonic() + self.GATHER
            while len(batch) < 500:
                wait = deadline - time.monotonic() if len(batch) < self.sending else 0
                try:
                    more = self.q.get(timeout=wait) if wait > 0 else self.q.get_nowait()
                except queue.Empty:
                    break
                if more is self._STOP:
                    stopping = True
                else:
                    batch.append(more)
            if batch:
                self._commit(batch)
            if time.monotonic() - self._renewed > every:
                self._safe_renew()

    def _commit(self, batch: list[_Record]) -> None:
        rows = [self._row(r) for r in batch]
        attempts = [a for r in batch for a in r.attempts]
        try:
            try:
                with self.out._writing() as conn:
                    self._prepare(rows[0])
                    assert self._update is not None and self._insert is not None
                    changed: int | None = self._update.run(conn, rows)
                    if attempts:
                        self._insert.run(conn, attempts)
            except StoreError as exc:
                self._commit_again(batch, exc)
                changed = None
            if changed is not None and 0 <= changed < len(rows):
                # Another worker took these over after their lease ran out (this one
                # stalled longer than the lease): the message may go out twice.
                log.warning("%d outgoing message(s) were taken over by another worker after their lease "
                            "expired; raise [outgoing] lease_seconds if sessions stall this long",
                            len(rows) - changed)
        except BaseException as exc:  # the workers must hear of it, whatever it is
            for r in batch:
                r.error = exc
        for r in batch:
            r.done.set()

    @staticmethod
    def _row(r: _Record) -> dict[str, Any]:
        return {"b_id": r.item_id, "b_owner": r.owner, **{f"b_{k}": v for k, v in r.values.items()}}

    def _prepare(self, sample: Mapping[str, Any]) -> None:
        if self._update is None:
            dialect = self.out.host.engine.dialect
            self._update = _Prepared(_RECORD_STMT, dialect, sample)
            self._insert = _Prepared(_ATTEMPT_STMT, dialect, {c: None for c in _ATTEMPT_COLUMNS})

    def _commit_again(self, batch: list[_Record], error: StoreError) -> None:
        """Record ``batch`` once the store answers again (a dropped link, a restarted
        database), trying for a while before giving up: an outcome never recorded sends
        its message again when the lease ends, and the sessions wait at their gates
        meanwhile. One message at a time, each attempt row only with its message's row:
        the failed commit may have reached the database all the same (a link lost
        during COMMIT), and then nothing of it is written twice."""
        give_up = time.monotonic() + min(self.RETRY_FOR, self.out.policy.lease.total_seconds() / 2)
        log.warning("could not record the outcome of %d outgoing message(s), trying again: %s", len(batch), error)
        delay = 0.1
        while True:
            time.sleep(delay)
            try:
                with self.out._writing() as conn:
                    self._prepare(self._row(batch[0]))
                    assert self._update is not None and self._insert is not None
                    for r in batch:
                        if self._update.run(conn, [self._row(r)]) and r.attempts:
                            self._insert.run(conn, r.attempts)
            except StoreError:
                if time.monotonic() + delay > give_up:
                    raise
                delay = min(delay * 2, 5.0)
                continue
            log.warning("recorded the outcome of %d outgoing message(s) after all", len(batch))
            return

    def _safe_renew(self) -> None:
        self._renewed = since = time.monotonic()
        try:
            with self.out._writing() as conn:
                now = self.out.clock()
                # Only leases that still hold: one that ran out (this process was stalled)
                # may have been taken over, and a recovery that read it as expired goes on
                # to take it; the messages under it are not sent by this pass any more.
                renewed = conn.execute(
                    update(_T).where(_T.c.lease_owner.startswith(self.prefix, autoescape=True),
                                     _T.c.status == "sending", _T.c.lease_until > now)
                    .values(lease_until=now + self.out.policy.lease).returning(_T.c.id)).scalars().all()
            self.leased(renewed, since)
        except Exception as exc:
            log.error("could not renew the leases of outgoing messages under way: %s", exc,
                      exc_info=not isinstance(exc, StoreError))


class _Prepared:
    """A statement compiled once for one database driver and run as a plain
    ``executemany``: the per-message records are the hot path of a pass, and this
    skips SQLAlchemy's per-call work while keeping its SQL and type conversions."""

    def __init__(self, stmt: Any, dialect: Any, sample: Mapping[str, Any]) -> None:
        compiled = stmt.compile(dialect=dialect)
        self.sql: str = compiled.string
        self.order: list[str] | None = list(compiled.positiontup) if compiled.positiontup is not None else None
        self.defaults = {k: v for k, v in compiled.construct_params(dict(sample)).items() if k not in sample}
        self.convert: dict[str, Callable[[Any], Any]] = {}
        for bind, name in compiled.bind_names.items():
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if process is not None:
                self.convert[name] = process

    def run(self, conn: Any, rows: Sequence[Mapping[str, Any]]) -> int:
        """Execute for every row; the number of rows changed, where the driver says."""
        params: list[Any] = []
        for row in rows:
            values = {**self.defaults, **row}
            for name, process in self.convert.items():
                values[name] = process(values[name])
            params.append(tuple(values[n] for n in self.order) if self.order is not None else values)
        return int(conn.exec_driver_sql(self.sql, params).rowcount)


_RECORD_COLUMNS = ("status", "attempts", "next_attempt_at", "last_error", "accepted", "refused", "sent_at",
                   "sent_via", "fell_back", "from_addr", "updated_at")
_RECORD_STMT = (
    update(_T)
    .where(_T.c.id == bindparam("b_id"), _T.c.lease_owner == bindparam("b_owner"), _T.c.status == "sending")
    .values(lease_owner=None, lease_until=None, **{c: bindparam(f"b_{c}") for c in _RECORD_COLUMNS})
)
_ATTEMPT_COLUMNS = ("item_id", "at", "connection_name", "result", "detail", "refused", "duration_ms")
_ATTEMPT_STMT = insert(_A).values({c: bindparam(c) for c in _ATTEMPT_COLUMNS})


class _Lane:
    """One connection as one worker thread uses it: a session opened lazily, reused for
    every message, reopened after a dropped link."""

    def __init__(self, out: Outgoing, group: _Group, report: ConnectionReport) -> None:
        self.out = out
        self.name = group.name or "(default)"
        self.conn = group.conn
        self.report = report
        self.down: MailhostError | None = group.error
        self.session: OutgoingSession | None = None
        self.settings: ConnectionSettings | None = None
        self.gated = False  # the session's send() takes before_data
        self.keyed = False  # ... and delivery_key
        address = _connection_address(self.conn) if self.conn else None
        self.address = address  # the From it gives a message that has none
        self.from_line = address_header("From", [address]) if address else None
        self.sender = _addr_spec(address) if address else ""

    def open(self) -> OutgoingSession:
        if self.session is not None:
            return self.session
        if self.down is not None:
            raise self.down
        assert self.conn is not None
        try:
            if self.settings is None:
                self.settings = self.out.host.connections.settings(Direction.OUTGOING, self.conn)
            provider = self.out.host.connections.provider(Direction.OUTGOING, self.conn)
            session = provider.open(self.settings)
        except MailhostError as exc:
            self.down = exc
            self.report.error = _sentence(self.name, exc)
            raise
        if not isinstance(session, OutgoingSession):
            session.close()
            self.down = ConfigError(f"protocol {self.conn.protocol} opened a {type(session).__name__}, "
                                    "not an OutgoingSession: report it to the plugin's authors")
            raise self.down
        self.session = session
        takes = inspect.signature(session.send).parameters
        self.gated, self.keyed = "before_data" in takes, "delivery_key" in takes
        self.report.add("sessions")
        self.out._learn_size(self.conn, session.max_size)
        return session

    def drop(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            with contextlib.suppress(Exception):
                session.close()

    def close(self) -> None:
        self.drop()


@dataclass
class _Group:
    """The messages one connection delivers in a pass."""

    name: str | None  # None: unnamed mail when no default connection exists
    conn: OutgoingConnection | None
    with_default_items: bool = False  # also the messages queued for "the default"
    error: MailhostError | None = None
    due: int = 0


# ---------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------


class Outgoing:
    """The outgoing queue: compose, enqueue, deliver, retry, delete, purge."""

    def __init__(self, host: Mailhost) -> None:
        self.host = host
        self.worker = worker_id()
        self._passes = itertools.count(1)
        #: The pipeline's clock: the store's, which every worker shares, for leases and
        #: schedules (tests move it forward instead of waiting).
        self.clock: Callable[[], dt.datetime] = host.clock
        self._lock = threading.Lock() if host.engine.dialect.name == "sqlite" else None
        self._purged_at = 0.0
        #: (lease owner, ids in doubt) of stopped workers whose untried messages could
        #: not be given back yet (the store was away); each pass tries again first.
        self._untried: list[tuple[str, frozenset[int]]] = []
        self._untried_lock = threading.Lock()

    @property
    def policy(self) -> Policy:
        """Retry and sharing rules from ``[outgoing]`` in the config file."""
        cached = self.__dict__.get("_policy")
        if cached is None:
            cached = self.__dict__["_policy"] = self.host.config.outgoing
        return cached

    @contextlib.contextmanager
    def _writing(self) -> Iterator[Any]:
        """A write transaction; on SQLite one writer per process at a time, so the
        threads of a pass queue on a lock instead of SQLite's sleeping busy handler."""
        self.host.check_schema()
        with self._lock or contextlib.nullcontext(), self.host.store_errors(), self.host.engine.begin() as conn:
            yield conn

    # -- composing and queueing -------------------------------------------------------

    def compose(
        self,
        to: Sequence[str] = (),
        cc: Sequence[str] = (),
        bcc: Sequence[str] = (),
        subject: str | None = None,
        body: str | None = None,
        body_file: str | os.PathLike[str] | None = None,
        eml: str | os.PathLike[str] | bytes | None = None,
        attachments: Sequence[str | os.PathLike[str]] = (),
        from_address: str | None = None,
        connection: str | None = None,
    ) -> Draft:
        """Build a MIME message (text body, attachments, Message-ID, Date), or take a
        ready one (``eml``: a path or bytes). Nothing is queued."""
        sources = [x for x in (body, body_file, eml) if x is not None]
        if len(sources) != 1:
            raise ValidationError("give the message one way: --body TEXT, --body-file FILE or --eml FILE",
                                  field="body")
        to_list = [check_address(a, "--to") for a in to]
        cc_list = [check_address(a, "--cc") for a in cc]
        bcc_list = [check_address(a, "--bcc") for a in bcc]
        sender = check_address(from_address, "--from") if from_address else None
        if eml is not None:
            if subject is not None or attachments or sender:
                raise ValidationError("--eml takes the message as it is: give its subject, sender and "
                                      "attachments in the file, not as options", field="eml")
            return self._take_eml(eml, to_list + cc_list + bcc_list, connection)
        if not to_list and not cc_list and not bcc_list:
            raise ValidationError("the message has no recipient: give --to ADDRESS", field="to")
        if subject is None:
            raise ValidationError("the message has no subject: give --subject TEXT", field="subject")
        _on_the_wire(subject, "subject")
        if body_file is not None:
            text = _read_text(body_file, "body file")
        else:
            text = str(body)
        if "\0" in text:  # no text part can carry it (RFC 2045 2.7, 2.8): the file is not text
            what = f"body file {body_file}" if body_file is not None else "body"
            raise ValidationError(f"the {what} contains NUL characters, which mail text cannot carry: "
                                  "send it as an attachment with --attach", field="body")
        msg = EmailMessage(policy=_POLICY_7BIT)
        msg["Subject"] = subject
        msg["Date"] = formatdate(localtime=True)
        msg["Message-ID"] = make_msgid(domain=self._msgid_domain(sender, connection))
        msg.set_content(text.replace("\r\n", "\n"))
        for path in attachments:
            p = Path(path).expanduser()
            _on_the_wire(p.name, "file name", f"cannot attach {str(path)!r}")  # it goes into a header
            try:
                p.name.encode("utf-8")  # undecodable bytes of the name arrive as lone surrogates
            except UnicodeEncodeError:
                raise ValidationError(f"cannot attach {str(path)!r}: its name is not UTF-8: rename the file",
                                      field="attach") from None
            try:
                data = p.read_bytes()
            except OSError as exc:
                raise ValidationError(f"cannot attach {path}: {exc.strerror or exc}: give an existing file",
                                      field="attach") from None
            ctype, encoding = mimetypes.guess_type(p.name)
            if ctype is None or encoding is not None:
                ctype = "application/octet-stream"  # compressed or unknown: sent as it is
            maintype, subtype = ctype.split("/", 1)
            msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=p.name)
        try:
            raw = msg.as_bytes()
        except (ValueError, TypeError, UnicodeError) as exc:
            raise ValidationError(f"the message cannot be built: {exc}", field="body") from None
        # Addresses are written by hand: the 7-bit policy would encode an SMTPUTF8 one.
        raw = b"".join(address_header(name, values) for name, values in
                       (("From", [sender] if sender else []), ("To", to_list), ("Cc", cc_list)) if values) + raw
        envelope = tuple(dict.fromkeys(_addr_spec(a) for a in to_list + cc_list + bcc_list))
        return Draft(raw=raw, recipients=envelope, message_id=str(msg["Message-ID"]), subject=subject,
                     from_addr=sender)

    def _take_eml(self, eml: str | os.PathLike[str] | bytes, envelope: list[str], connection: str | None) -> Draft:
        if isinstance(eml, bytes):
            raw, label = eml, "the message"
        else:
            label = str(eml)
            try:
                raw = Path(eml).expanduser().read_bytes()
            except OSError as exc:
                raise ValidationError(f"cannot read the message {eml}: {exc.strerror or exc}", field="eml") from None
        raw = crlf(raw)
        head, rest = _split(raw)
        lines = head[:-2].split(b"\r\n")
        headers = BytesHeaderParser(policy=email.policy.compat32).parsebytes(head + b"\r\n")
        if (lines[0][:1] in (b" ", b"\t") or not all(_FIELD.match(line) or line[:1] in (b" ", b"\t") for line in lines)
                or not _MESSAGE_FIELDS & {name.lower() for name in headers.keys()}):
            raise ValidationError(f"{label} is not an email message: it must start with headers such as From, "
                                  "To and Subject (an .eml file)", field="eml")
        if not envelope:
            found = getaddresses([str(v) for k in ("To", "Cc", "Bcc") for v in headers.get_all(k, [])])
            envelope = [check_address(a, "recipient") for _, a in found if a]
        if not envelope:
            raise ValidationError(f"{label} has no To, Cc or Bcc: give --to ADDRESS", field="to")
        sender = headers.get("From")
        if sender is not None:
            sender = check_address(_header_text(str(sender)) or "", "From", field="from")
        # Bcc recipients get the message; nobody gets to read who they were.
        head = _RESENT_BCC.sub(b"", _BCC.sub(b"", head))
        add = b""
        message_id = headers.get("Message-ID")
        if not message_id:
            message_id = make_msgid(domain=self._msgid_domain(sender, connection))
            add += f"Message-ID: {message_id}\r\n".encode("ascii")
        if not headers.get("Date"):
            add += f"Date: {formatdate(localtime=True)}\r\n".encode("ascii")
        envelope_t = tuple(dict.fromkeys(_addr_spec(a) for a in envelope))
        return Draft(raw=add + head + rest, recipients=envelope_t, message_id=str(message_id).strip(),
                     subject=_header_text(headers.get("Subject")), from_addr=sender, source=label)

    def _msgid_domain(self, sender: str | None, connection: str | None) -> str:
        address = _addr_spec(sender) if sender else ""
        if not address:
            with contextlib.suppress(MailhostError):
                with self.host.session() as s:
                    conn = (self.host.connections.get(Direction.OUTGOING, connection, s) if connection
                            else self.host.connections.default_outgoing(s))
                    address = _addr_spec(conn.from_address or conn.username or "") if conn else ""
        domain = address.rpartition("@")[2]
        return domain if domain and domain.isascii() else socket.gethostname() or "mailhost.invalid"

    def enqueue(self, draft: Draft, connection: str | None = None) -> OutgoingItem:
        """Queue ``draft`` for ``connection`` (None: the default one at delivery time).

        Refused with a ValidationError, and nothing written, when the message is larger
        than the connection's size limit or its server's SIZE, or has no sender.
        """
        if not draft.recipients:
            raise ValidationError("the message has no recipient: give --to ADDRESS", field="to")
        now = self.clock()
        with self.host.session() as s:
            if connection:
                conn = self.host.connections.get(Direction.OUTGOING, connection, s)
            else:
                conn = self.host.connections.default_outgoing(s)
                if conn is None:
                    raise ValidationError(
                        "there is no default outgoing connection: give --connection NAME, or choose one "
                        "with `mailhost outgoing set-default NAME`", field="connection")
            self._check_fits(draft, conn)
            to_addr = ", ".join(draft.recipients)
            check_lengths(OutgoingItem, {"message_id": draft.message_id, "subject": draft.subject,
                                         "from_addr": draft.from_addr, "to_addr": to_addr}, draft.source)
            _check_line_lengths(draft)
            item = OutgoingItem(
                connection_id=conn.id if connection else None,
                connection_name=conn.name if connection else None,
                status="queued",
                message_id=draft.message_id,
                subject=draft.subject,
                # Without its own From, the one it will get as things stand (delivery
                # records the one it got: another, after an edit or a fallback).
                from_addr=draft.from_addr or _connection_address(conn),
                to_addr=to_addr,
                recipients=list(draft.recipients),
                accepted=[],
                size=len(draft.raw),
                raw=draft.raw,
                attempts=0,
                next_attempt_at=now,
                queued_at=now,
                created_at=now,
                updated_at=now,
            )
            s.add(item)
            s.flush()
            return item

    def send(self, to: Sequence[str] = (), *, connection: str | None = None, **compose: Any) -> OutgoingItem:
        """Compose and enqueue in one call (what ``mailhost send`` does)."""
        return self.enqueue(self.compose(to, connection=connection, **compose), connection)

    @staticmethod
    def _check_fits(draft: Draft, conn: OutgoingConnection) -> None:
        address = _connection_address(conn)
        if draft.from_addr is None and not address:
            raise ValidationError(
                f"the message has no From and outgoing connection {conn.name} has no from address: give --from "
                f"ADDRESS, or set one with `mailhost outgoing edit {conn.name} --from ADDRESS`", field="from_address")
        from_line = address_header("From", [address]) if draft.from_addr is None and address else None
        final = personalize(draft.raw, from_line, conn.prefix)
        size = len(final)
        if conn.size_limit and size > conn.size_limit:
            raise ValidationError(
                f"the message is {size} bytes, more than the size limit of {conn.size_limit} bytes of outgoing "
                f"connection {conn.name}: send fewer or smaller attachments, or raise the limit with "
                f"`mailhost outgoing edit {conn.name} --size-limit BYTES`", field="size_limit")
        server = conn.server_size_limit
        if server and size > server:
            raise ValidationError(
                f"the message is {size} bytes, more than the {server} bytes that the server of outgoing connection "
                f"{conn.name} ({conn.host}) accepts (its SIZE): send fewer or smaller attachments", field="size_limit")

    # -- delivery ---------------------------------------------------------------------

    def deliver(self, sessions: int = 1, *, connection: str | None = None) -> DeliveryReport:
        """One delivery pass: every message due now, ``sessions`` sessions at most.

        Failures of single messages are recorded on them, not raised; the report says
        per connection what happened.
        """
        if sessions < 1:
            raise ValidationError(f"sessions must be at least 1, not {sessions}", field="sessions")
        self.host.check_key()  # before any attempt: a missing key is not the message's failure
        started = time.monotonic()
        report = DeliveryReport()
        self._give_back_untried()  # before recover(): what it gives back was not interrupted
        report.purge_error = self._maybe_purge()
        report.recovered = self.recover()
        now = self.clock()
        groups = self._plan(now, connection)
        if not groups:
            report.seconds = time.monotonic() - started
            return report
        default = next((g for g in groups.values() if g.with_default_items), None)
        if default is None:
            default = self._default_group()
        for g in groups.values():
            report.connections[g.name or "(default)"] = ConnectionReport(g.name or "(default)", due=g.due)
        tasks: list[_Group] = []
        shares = {name: min(sessions, max(1, math.ceil(g.due / self.policy.per_session))) for name, g in groups.items()}
        # Round-robin, so that every connection gets a session before any gets a second.
        for round_ in range(sessions):
            tasks.extend(g for name, g in groups.items() if shares[name] > round_)
        prefix = f"{self.worker}/{next(self._passes)}."
        recorder = _Recorder(self, prefix)
        hooks = bool(self.host.plugins.hook.message_sent.get_hookimpls())
        try:
            with ThreadPoolExecutor(max_workers=min(sessions, len(tasks)), thread_name_prefix="deliver") as pool:
                futures = [pool.submit(self._work, g, default, now, report, recorder, hooks, f"{prefix}{n}")
                           for n, g in enumerate(tasks)]
                for f in futures:
                    try:
                        f.result()
                    except Exception as exc:
                        log.error("a delivery worker stopped: %s", redact(str(exc)))
                        report.error = report.error or f"a delivery worker stopped: {redact(str(exc))}"
        finally:
            recorder.stop()
        if self._untried:  # a worker stopped while the store was away: it may answer again by now
            try:
                self._give_back_untried()
            except StoreError as exc:
                log.warning("outgoing messages a stopped worker never tried stay leased until the next delivery "
                            "pass gives them back: %s", exc)
        report.seconds = time.monotonic() - started
        return report

    def _plan(self, now: dt.datetime, only: str | None) -> dict[str | None, _Group]:
        """The connections with due messages, and how many each has."""
        with self.host.session() as s:
            if only:
                self.host.connections.get(Direction.OUTGOING, only, s)  # NotFound before any work
            counts: dict[str | None, int] = dict(s.execute(
                select(_T.c.connection_name, func.count()).where(_T.c.status == "queued", _T.c.next_attempt_at <= now)
                .group_by(_T.c.connection_name)).all())
            if not counts:
                return {}
            conns = {c.name: c for c in s.scalars(select(OutgoingConnection))}
            default = next((c for c in conns.values() if c.is_default), None)
        groups: dict[str | None, _Group] = {}
        for name, n in counts.items():
            if name is None:
                if default is None:
                    groups[None] = _Group(None, None, error=ConfigError(
                        "there is no default outgoing connection for mail queued without one: choose one with "
                        "`mailhost outgoing set-default NAME`"), due=n)
                    continue
                name = default.name
            group = groups.get(name)
            if group is None:
                conn = conns.get(name)
                group = groups[name] = _Group(name, conn, error=None if conn else ConfigError(
                    f"outgoing connection {name} no longer exists: add it again, or delete or re-send its messages "
                    "(`mailhost queue outgoing`)"))
            group.due += n
            if default is not None and name == default.name:
                group.with_default_items = True
        if only:
            groups = {k: g for k, g in groups.items() if k == only}
        return groups

    def _default_group(self) -> _Group | None:
        with self.host.session() as s:
            conn = self.host.connections.default_outgoing(s)
        return _Group(conn.name, conn, with_default_items=True) if conn else None

    def _claim(self, group: _Group, now: dt.datetime, limit: int, owner: str) -> list[_Claimed]:
        """Take up to ``limit`` due messages of ``group``: ``sending``, leased to us."""
        which: ColumnElement[bool]
        if group.name is None:
            which = _T.c.connection_name.is_(None)
        elif group.with_default_items:
            which = or_(_T.c.connection_name == group.name, _T.c.connection_name.is_(None))
        else:
            which = _T.c.connection_name == group.name
        due = and_(_T.c.status == "queued", _T.c.next_attempt_at <= now, which)
        pick = select(_T.c.id).where(due).order_by(_T.c.next_attempt_at, _T.c.id).limit(limit)
        if self.host.engine.dialect.name == "postgresql":
            pick = pick.with_for_update(skip_locked=True)
        stmt = (update(_T).where(_T.c.id.in_(pick.scalar_subquery()), _T.c.status == "queued")
                .values(status="sending", lease_owner=owner, lease_until=self.clock() + self.policy.lease,
                        updated_at=self.clock())
                .returning(*_CLAIM_COLUMNS))
        with self._writing() as conn:
            rows = conn.execute(stmt).all()
        items = [_Claimed(id=r.id, connection_name=r.connection_name, raw=r.raw, recipients=list(r.recipients or []),
                          accepted=list(r.accepted or []), refused=dict(r.refused or {}), from_addr=r.from_addr,
                          message_id=r.message_id, attempts=r.attempts, created_at=r.created_at,
                          queued_at=r.queued_at, sent_at=r.sent_at, sent_via=r.sent_via,
                          fell_back=bool(r.fell_back)) for r in rows]
        # Sent in the order claimed; recovery relies on it to tell which one was on the wire.
        order = {r.id: (r.next_attempt_at, r.id) for r in rows}
        items.sort(key=lambda i: order[i.id])
        return items

    def _give_back(self, owner: str, in_doubt: Collection[int]) -> None:
        """Queue again, untouched, the messages a stopped worker ``owner`` holds except
        ``in_doubt`` (tried, their outcome unrecorded): the others never went out, so
        they need not wait out the lease. Rows ``owner`` claimed in a commit whose answer
        was lost are among them. While the store is away this is left for the next pass."""
        try:
            self._requeue_untried(owner, in_doubt)
        except StoreError as exc:
            with self._untried_lock:
                self._untried.append((owner, frozenset(in_doubt)))
            log.warning("could not give back the outgoing messages a stopped worker never tried; trying again "
                        "when the store answers: %s", exc)
        except Exception:  # the worker's own failure is the one to report: they wait for the lease
            log.exception("could not give back the outgoing messages that %s never tried", owner)

    def _give_back_untried(self) -> None:
        """Retry what :meth:`_give_back` could not do; StoreError if the store is still away."""
        with self._untried_lock:
            pending, self._untried = self._untried, []
        for n, (owner, in_doubt) in enumerate(pending):
            try:
                self._requeue_untried(owner, in_doubt)
            except BaseException:
                with self._untried_lock:
                    self._untried.extend(pending[n:])
                raise

    def _requeue_untried(self, owner: str, in_doubt: Collection[int]) -> None:
        held = [_T.c.lease_owner == owner, _T.c.status == "sending"]
        if in_doubt:
            held.append(_T.c.id.not_in(list(in_doubt)))
        with self._writing() as conn:
            n = conn.execute(update(_T).where(*held)
                             .values(status="queued", lease_owner=None, lease_until=None,
                                     updated_at=self.clock())).rowcount
        if n:
            log.info("queued again %d outgoing message(s) that %s claimed and never tried", n, owner)

    def _work(self, group: _Group, default: _Group | None, now: dt.datetime, report: DeliveryReport,
              recorder: _Recorder, hooks: bool, owner: str) -> None:
        """One worker: claim batches of ``group`` as ``owner`` and send them, in the
        order claimed, through one session.

        The outcome of message k is committed while message k + 1's envelope goes out;
        k + 1's content waits at the gate until k is durable (see ``_Record.wait``), so
        no more than one message per session is ever accepted and not yet recorded.
        """
        rep = report.connections[group.name or "(default)"]
        lane = _Lane(self, group, rep)
        fallback: _Lane | None = None
        prev: _Record | None = None
        batch: list[_Claimed] = []
        try:
            while True:
                since = time.monotonic()
                batch = self._claim(group, now, self.policy.batch, owner)
                if not batch:
                    break
                recorder.leased([item.id for item in batch], since)
                recorder.busy(+1)
                try:
                    for item in batch:
                        if fallback is None and default is not None and self._may_fall_back(lane, default):
                            fallback = _Lane(self, default, report.connections.setdefault(
                                default.name or "(default)", ConnectionReport(default.name or "(default)")))
                        rec = self._deliver_one(item, lane, fallback, rep, _gate(prev, item.id, recorder), owner)
                        if prev is not None:
                            self._settle(prev, hooks)
                        recorder.submit(rec)
                        prev = rec
                finally:
                    recorder.busy(-1)
            if prev is not None:
                self._settle(prev, hooks)
        except BaseException:
            in_doubt = [x.id for x in batch if x.tried]
            if prev is not None:
                with contextlib.suppress(BaseException):  # the first failure is the one to report
                    self._settle(prev, hooks)
                # Only the last message handed to the recorder and one tried meanwhile can
                # be unrecorded after going out; every earlier outcome was settled. One whose
                # attempts never got its content out (a server out of reach) is not in doubt.
                if prev.tried and prev.error is not None:
                    in_doubt.append(prev.item_id)
            self._give_back(owner, in_doubt)
            raise
        finally:
            lane.close()
            if fallback is not None:
                fallback.close()

    def _settle(self, rec: _Record, hooks: bool) -> None:
        """Wait until ``rec`` is committed, then tell the plugins what was sent."""
        rec.wait()
        if hooks and rec.announce is not None:
            connection, message_id, recipients = rec.announce
            rec.announce = None
            try:
                self.host.plugins.hook.message_sent(connection=connection, item_id=rec.item_id,
                                                    message_id=message_id, recipients=list(recipients))
            except Exception:
                log.exception("a message_sent hook failed for outgoing item %s", rec.item_id)

    @staticmethod
    def _may_fall_back(lane: _Lane, default: _Group) -> bool:
        return bool(lane.conn is not None and lane.conn.fallback_to_default and default.conn is not None
                    and default.name != lane.conn.name)

    def _deliver_one(self, item: _Claimed, lane: _Lane, fallback: _Lane | None, rep: ConnectionReport,
                     gate: Callable[[], None], owner: str) -> _Record:
        """Attempt ``item`` (and its fallback) and return what to record."""
        tries = [self._try(item, lane, gate)]
        # Fall back on what the default connection may get through: a connection that
        # cannot be reached or signed in to, a timeout, a 4xx; never on a 5xx refusal, nor
        # on an interrupted attempt (the server may hold the message: it waits for a retry).
        if fallback is not None and tries[0].kind in ("connection", "temporary"):
            tries.append(self._try(item, fallback, gate))
        # A fallback decides only when it delivered: its refusals (a size limit, a 5xx)
        # rule out that route for this attempt, not the message, nor any recipient; the
        # message's fate follows its own connection.
        last = tries[-1] if tries[-1].delivered else tries[0]
        now = self.clock()
        fell_back = len(tries) > 1 and last is tries[-1]
        attempts = item.attempts + 1
        accepted = list(item.accepted)
        refused = {**item.refused, **tries[0].refused}
        newly: list[str] = []
        if last.delivered:
            newly = [r for r in item.pending() if r not in last.refused and r not in accepted]
            accepted.extend(newly)
            for r in newly:
                refused.pop(r, None)
        done = set(accepted)
        left = [r for r in item.recipients if r not in done and not refused.get(r, "").startswith("5")]
        age = now - (item.queued_at or item.created_at)
        max_age = self.policy.max_age
        give_up = attempts >= self.policy.max_attempts or (max_age is not None and age >= max_age)
        # The From it went out with: its own, or the delivering connection's.
        via = fallback if fell_back and fallback is not None else lane
        from_addr = via.address if last.delivered and not item.own_from else item.from_addr
        values: dict[str, Any] = {
            "attempts": attempts, "accepted": accepted, "refused": refused or None, "updated_at": now,
            # Which connection delivered it, and whether that was the fallback.
            "sent_via": last.connection if last.delivered else item.sent_via,
            "from_addr": from_addr,
            "fell_back": fell_back if last.delivered else item.fell_back,
            "sent_at": now if last.delivered else item.sent_at,
            "next_attempt_at": None, "last_error": None,
        }
        if last.delivered and not left:
            values["status"] = "sent"
            if refused:
                values["last_error"] = "refused: " + "; ".join(f"{r}: {w}" for r, w in refused.items())
            rep.add("partial" if refused else "sent")
        elif left and last.kind != "permanent" and not give_up:
            values["status"] = "queued"
            values["next_attempt_at"] = now + dt.timedelta(seconds=self.policy.backoff(attempts, last.retry_after))
            values["last_error"] = last.detail
            rep.add("partial" if last.delivered else "retrying")
        else:
            values["status"] = "sent" if accepted else "failed"
            why = last.detail
            if give_up and last.kind != "permanent" and left:
                why = (f"gave up after {attempts} attempt(s) over {_duration(age)} "
                       f"(limits: [outgoing] max_attempts, max_age_hours): {last.detail}")
            values["last_error"] = why
            rep.add("partial" if accepted else "failed")
        if fell_back:
            rep.add("fell_back")
        rows = [{"item_id": item.id, "at": now, "connection_name": t.connection, "result": _RESULT[t.kind],
                 "detail": t.detail[:4000], "refused": t.refused or None, "duration_ms": t.ms} for t in tries]
        announce = (last.connection, item.message_id, tuple(newly)) if newly else None
        return _Record(item.id, owner, values, rows, tried=item.tried, announce=announce)

    def _try(self, item: _Claimed, lane: _Lane, gate: Callable[[], None]) -> _Try:
        """One attempt of ``item`` through ``lane``; never raises for mail errors."""
        name = lane.name
        if lane.down is not None:
            return _Try(name, "connection", _sentence(name, lane.down))
        conn = lane.conn
        assert conn is not None
        raw = personalize(item.raw, None if item.own_from else lane.from_line, conn.prefix)
        if conn.size_limit and len(raw) > conn.size_limit:
            return _Try(name, "permanent", f"the message is {len(raw)} bytes, more than the size limit of "
                        f"{conn.size_limit} bytes of outgoing connection {name}")
        sender = lane.sender or (_addr_spec(item.from_addr or "") if item.own_from else "")
        if not sender:
            return _Try(name, "connection", f"outgoing connection {name} has no from address for a message without "
                        f"From: set one with `mailhost outgoing edit {name} --from ADDRESS`")
        started = time.perf_counter()
        try:
            session = lane.open()
        except MailhostError as exc:
            return _Try(name, "connection", _sentence(name, exc), ms=_ms(started),
                        retry_after=getattr(exc, "retry_after", None))
        except Exception as exc:  # a plugin bug must not stop the pass
            log.exception("opening outgoing connection %s failed", name)
            lane.down = ConfigError(f"{name}: {redact(self.host.plugins.unexpected(exc))}")
            return _Try(name, "connection", str(lane.down), ms=_ms(started))

        def through() -> None:
            gate()
            item.tried = True  # from here on the content may reach the server

        try:
            if lane.gated:
                more: dict[str, Any] = {"before_data": through}
                if lane.keyed:
                    more["delivery_key"] = _delivery_key(item)
                result = session.send(raw, sender, item.pending(), **more)
            else:
                through()
                result = session.send(raw, sender, item.pending())
        except _GateFailed:
            lane.drop()
            raise
        except TemporaryFailure as exc:
            if isinstance(exc, ConnectFailure):
                lane.drop()
            # In doubt (the server may hold it): recorded as interrupted, like a crash mid-send.
            return _Try(name, "interrupted" if exc.in_doubt else "temporary", _sentence(name, exc),
                        refused=dict(getattr(exc, "refused", {}) or {}), ms=_ms(started), retry_after=exc.retry_after)
        except PermanentFailure as exc:
            return _Try(name, "permanent", _sentence(name, exc), refused=dict(getattr(exc, "refused", {}) or {}),
                        ms=_ms(started))
        except MailhostError as exc:
            lane.drop()
            return _Try(name, "temporary", _sentence(name, exc), ms=_ms(started))
        except Exception as exc:
            log.exception("sending through outgoing connection %s failed", name)
            lane.drop()
            return _Try(name, "temporary", f"{name}: {redact(self.host.plugins.unexpected(exc))}",
                        ms=_ms(started))
        if not isinstance(result, SendResult):
            # send() returned: the server took the message. Recorded as sent, or the next
            # pass would deliver it again; the plugin is told what it broke.
            plugin = self.host.plugins.named(self.host.connections.provider(Direction.OUTGOING, conn).plugin)
            broke = broke_contract(plugin, "session", f"its {conn.protocol} session's send returned {result!r:.80}, "
                                                      "not a mailhost.SendResult")
            log.warning("%s: %s; the message counts as accepted by every recipient", name, broke)
            result = SendResult("accepted (the plugin's send returned no SendResult)")
        refused = {str(k): str(v) for k, v in (result.refused or {}).items()}
        kind = "partial" if refused else "sent"
        return _Try(name, kind, redact(result.response or "accepted"), result=result, refused=refused, ms=_ms(started))

    def _learn_size(self, conn: OutgoingConnection, size: int | None) -> None:
        """Remember the server's SIZE so that ``enqueue`` can refuse what it would."""
        if size is not None:  # a SIZE beyond the column is no limit for any message we hold
            size = min(size, MAX_INT)
        if size == conn.server_size_limit:
            return
        conn.server_size_limit = size
        try:
            with self._writing() as c:
                table = cast(Table, OutgoingConnection.__table__)
                c.execute(update(table).where(table.c.id == conn.id).values(server_size_limit=size))
        except Exception as exc:
            log.error("could not record the SIZE of outgoing connection %s: %s", conn.name, exc,
                      exc_info=not isinstance(exc, StoreError))

    # -- crash recovery ---------------------------------------------------------------

    def recover(self) -> int:
        """Requeue messages left ``sending`` by a session that is gone: its lease expired,
        or its process ran on this host and no longer does. Returns how many.

        A session sends its claimed messages one at a time, in the order claimed, and
        records each before the next one's content goes out; so of the rows a dead
        session left, only the first can have reached the server. That one gets an
        ``interrupted`` attempt (it may arrive twice); the others go back untouched.
        """
        now = self.clock()
        with self.host.session() as s:
            rows = s.execute(select(_T.c.id, _T.c.lease_owner, _T.c.lease_until, _T.c.next_attempt_at)
                             .where(_T.c.status == "sending")).all()
        held: dict[str | None, list[Any]] = {}
        for row in rows:
            held.setdefault(row.lease_owner, []).append(row)
        total = 0
        for owner, group in held.items():
            # This process's own sessions are alive and renew their leases; what a
            # crashed one of them left is taken back once its lease has run out.
            gone = owner is not None and holder_is_gone(owner)
            stale = [r for r in group if gone or r.lease_until is None or r.lease_until < now]
            if not stale:
                continue
            stale.sort(key=lambda r: (r.next_attempt_at or now, r.id))
            how = "its process is gone" if gone else "its lease expired"
            why = (f"the delivery by {owner} was interrupted ({how}) while this message was being sent; if the "
                   "server had already accepted it, it arrives twice")
            in_doubt, untouched = stale[0].id, [r.id for r in stale[1:]]
            with self._writing() as conn:
                doubt = conn.execute(
                    update(_T).where(_T.c.id == in_doubt, _T.c.status == "sending",
                                     _T.c.lease_owner.is_(None) if owner is None else _T.c.lease_owner == owner)
                    .values(status="queued", attempts=_T.c.attempts + 1, next_attempt_at=now, last_error=why,
                            lease_owner=None, lease_until=None, updated_at=now)).rowcount
                if doubt:
                    conn.execute(insert(_A), [{"item_id": in_doubt, "at": now, "connection_name": None,
                                               "result": "interrupted", "detail": why, "refused": None,
                                               "duration_ms": None}])
                back = 0
                if untouched:
                    back = conn.execute(
                        update(_T).where(_T.c.id.in_(untouched), _T.c.status == "sending",
                                         _T.c.lease_owner.is_(None) if owner is None else _T.c.lease_owner == owner)
                        .values(status="queued", lease_owner=None, lease_until=None, updated_at=now)).rowcount
            if doubt or back:
                log.warning("requeued %d outgoing message(s) that %s held (%s); item %s was being sent and may "
                            "arrive twice", (doubt or 0) + (back or 0), owner, how, in_doubt)
            total += (doubt or 0) + (back or 0)
        return total

    # -- test email -------------------------------------------------------------------

    def test_email(self, name: str, to: str) -> TestEmail:
        """Send one test message through ``name`` at once (not queued) and return the
        session transcript, every line redacted."""
        to = check_address(to, "--to")
        with self.host.session() as s:
            conn = self.host.connections.get(Direction.OUTGOING, name, s)
        lines: list[str] = []
        base = self.host.connections.settings(Direction.OUTGOING, conn)
        logged = base.transcript

        def transcript(line: str) -> None:
            clean = redact(line)
            lines.append(clean)
            if logged is not None:
                logged(clean)

        settings = dataclasses.replace(base, transcript=transcript)
        address = _connection_address(conn)
        sender = _addr_spec(address or "")
        if not sender:
            raise ValidationError(f"outgoing connection {name} has no from address: set one with "
                                  f"`mailhost outgoing edit {name} --from ADDRESS`", field="from_address")
        draft = self.compose([to], subject=f"mailhost test message through {name}", body=(
            f"This is a test message sent by mailhost through the outgoing connection {name} "
            f"({conn.protocol}, {conn.host or '-'}).\nSent at {formatdate(localtime=True)}.\n"), connection=name)
        raw = personalize(draft.raw, address_header("From", [address or sender]), conn.prefix)
        provider = self.host.connections.provider(Direction.OUTGOING, conn)
        try:
            session = provider.open(settings)
        except MailhostError as exc:
            return TestEmail(False, name, to, error=_sentence(name, exc), transcript=tuple(lines))
        try:
            if isinstance(session, OutgoingSession):
                self._learn_size(conn, session.max_size)
                result = session.send(raw, sender, [_addr_spec(to)])
            else:
                raise ConfigError(f"protocol {conn.protocol} did not open an outgoing session")
        except MailhostError as exc:
            return TestEmail(False, name, to, error=_sentence(name, exc), transcript=tuple(lines),
                             refused=dict(getattr(exc, "refused", {}) or {}))
        finally:
            session.close()
        return TestEmail(True, name, to, response=redact(result.response), refused=dict(result.refused),
                         transcript=tuple(lines))

    # -- the queue --------------------------------------------------------------------

    def items(self, status: str | None = None, connection: str | None = None,
              limit: int | None = None) -> list[OutgoingItem]:
        """Queue items, newest first (raw bytes not loaded)."""
        from sqlalchemy.orm import defer

        if status is not None and status not in OUTGOING_STATUSES:
            raise ValidationError(f"status {status!r} is not valid: choose one of {', '.join(OUTGOING_STATUSES)}",
                                  field="status")
        with self.host.session() as s:
            q = select(OutgoingItem).options(defer(OutgoingItem.raw)).order_by(OutgoingItem.id.desc())
            if status:
                q = q.where(OutgoingItem.status == status)
            if connection:
                q = q.where(OutgoingItem.connection_name == connection)
            if limit:
                q = q.limit(limit)
            found = list(s.scalars(q))
            if connection and not found:
                self.host.connections.check_filter(Direction.OUTGOING, connection, OutgoingItem.connection_name, s)
            return found

    def item(self, item_id: int) -> OutgoingItem:
        """One queue item with its raw bytes and attempts."""
        with self.host.session() as s:
            item = s.get(OutgoingItem, item_id)
            if item is None:
                raise NotFound(f"no outgoing queue item {item_id}: see `mailhost queue outgoing`")
            _ = item.raw, item.attempts_log
            return item

    def retry(self, item_id: int) -> OutgoingItem:
        """Queue a message again now, with a fresh budget of attempts.

        A failed message is tried for every recipient that has not accepted it; a
        message that is being delivered, or was delivered to everyone, is refused.
        """
        now = self.clock()
        with self._writing() as conn:
            row = conn.execute(select(_T.c.status, _T.c.lease_owner, _T.c.lease_until, _T.c.recipients,
                                      _T.c.accepted).where(_T.c.id == item_id)).first()
            if row is None:
                raise NotFound(f"no outgoing queue item {item_id}: see `mailhost queue outgoing`")
            left = [r for r in row.recipients or [] if r not in set(row.accepted or [])]
            if row.status == "sent" and not left:
                raise ValidationError(f"outgoing item {item_id} was delivered to every recipient: to send it "
                                      f"again, queue it anew (`mailhost queue outgoing show {item_id} --raw` gives "
                                      "the message)", field="id")
            # The lease is checked in the UPDATE itself: a worker may claim the row
            # between the SELECT above and here.
            changed = conn.execute(update(_T).where(_T.c.id == item_id, _not_leased(now)).values(
                status="queued", attempts=0, next_attempt_at=now, queued_at=now, refused=None,
                lease_owner=None, lease_until=None, updated_at=now)).rowcount
            if not changed:
                raise ValidationError(f"outgoing item {item_id} is being delivered now: wait for that attempt "
                                      "to finish", field="id")
        return self.item(item_id)

    def delete(self, item_id: int) -> None:
        """Remove a message and its attempts from the queue (not while it is being sent)."""
        now = self.clock()
        with self._writing() as conn:
            row = conn.execute(select(_T.c.status, _T.c.lease_owner, _T.c.lease_until)
                               .where(_T.c.id == item_id)).first()
            if row is None:
                raise NotFound(f"no outgoing queue item {item_id}: see `mailhost queue outgoing`")
            if not conn.execute(delete(_T).where(_T.c.id == item_id, _not_leased(now))).rowcount:
                raise ValidationError(f"outgoing item {item_id} is being delivered now (by {row.lease_owner}): "
                                      "delete it once that attempt is over", field="id")
            conn.execute(delete(_A).where(_A.c.item_id == item_id))

    def purge(self, older_than: dt.timedelta, statuses: Sequence[str] = ("sent",)) -> int:
        """Delete messages in ``statuses`` last changed before ``older_than`` ago; how many."""
        bad = set(statuses) - {"sent", "failed"}
        if bad:
            raise ValidationError(f"only sent and failed messages can be purged, not {sorted(bad)}", field="status")
        cutoff = self.clock() - older_than
        # created_at first: it is indexed, and a message last changed before the cutoff
        # was created before it too.
        old = and_(_T.c.created_at < cutoff, _T.c.updated_at < cutoff, _T.c.status.in_(list(statuses)))
        with self._writing() as conn:
            conn.execute(delete(_A).where(_A.c.item_id.in_(select(_T.c.id).where(old).scalar_subquery())))
            return int(conn.execute(delete(_T).where(old)).rowcount or 0)

    def _maybe_purge(self) -> str | None:
        """Purge the sent messages past ``keep_sent_days``, once an hour at most; why it
        failed, if it did."""
        keep = self.policy.keep_sent
        if keep is None or time.monotonic() - self._purged_at < 3600 and self._purged_at:
            return None
        self._purged_at = time.monotonic()
        try:
            n = self.purge(keep)
            if n:
                log.info("purged %d sent message(s) older than %s", n, keep)
        except Exception as exc:
            log.error("purging sent outgoing messages failed: %s", exc, exc_info=not isinstance(exc, StoreError))
            return f"purging sent outgoing messages failed: {exc}"
        return None


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------

_RESULT = {"sent": "sent", "partial": "partial", "connection": "temporary", "temporary": "temporary",
           "permanent": "permanent", "interrupted": "interrupted"}


def item_dict(item: OutgoingItem, with_attempts: bool = False) -> dict[str, Any]:
    """The JSON form of a queue item (never the raw bytes)."""
    accepted = list(item.accepted or [])
    refused = dict(item.refused or {})
    out: dict[str, Any] = {
        "id": item.id,
        "connection": item.connection_name,
        "status": item.status,
        "message_id": item.message_id,
        "subject": item.subject,
        "from": item.from_addr,
        "to": item.to_addr,
        "size": item.size,
        "attempts": item.attempts,
        "next_attempt_at": item.next_attempt_at if item.status == "queued" else None,
        "last_error": item.last_error,
        "created_at": item.created_at,
        "updated_at": item.updated_at,
        "sent_at": item.sent_at,
        "sent_via": item.sent_via,
        "fell_back": item.fell_back,
        "recipients": [{"address": r, "status": _recipient_status(item.status, r, accepted, refused),
                        "reply": refused.get(r)} for r in item.recipients or []],
    }
    if with_attempts:
        out["attempts_log"] = [
            {"at": a.at, "connection": a.connection_name, "result": a.result, "detail": a.detail,
             "refused": a.refused, "duration_ms": a.duration_ms}
            for a in item.attempts_log
        ]
    return out


def _not_leased(now: dt.datetime) -> Any:
    """Rows no live worker holds: not ``sending``, or their lease has run out."""
    return or_(_T.c.status != "sending", _T.c.lease_until.is_(None), _T.c.lease_until < now)


#: The longest line SMTP carries, without its CRLF (RFC 5321 4.5.3.1.6).
_MAX_LINE = 998


def _check_line_lengths(draft: Draft) -> None:
    """Refuse a line SMTP cannot carry: a server would refuse the message, or break the
    line and with it any signature, only once it is queued."""
    longest = max(draft.raw.split(b"\r\n"), key=len)  # C speed; a regex takes seconds on 30 MB
    if len(longest) > _MAX_LINE:
        start = longest[:20].decode("utf-8", "replace")
        raise ValidationError(
            f"{draft.source} has a line of {len(longest)} octets ({start!r}...), more than the {_MAX_LINE} octets "
            "SMTP allows: wrap it, shorten the header, or encode the part quoted-printable or base64",
            field="eml" if draft.source != "the message" else "body")


def _recipient_status(status: str, address: str, accepted: Sequence[str], refused: Mapping[str, str]) -> str:
    """accepted, pending (will be tried again) or refused (for good, or given up)."""
    if address in accepted:
        return "accepted"
    if status in ("queued", "sending") and not refused.get(address, "").startswith("5"):
        return "pending"
    return "refused"


def _connection_address(conn: OutgoingConnection) -> str | None:
    """The connection's From: its from address, else its username when that is one."""
    if conn.from_address and _addr_spec(conn.from_address):
        return conn.from_address
    if conn.username and "@" in conn.username:
        return conn.username
    return None


def _read_text(path: str | os.PathLike[str], what: str) -> str:
    try:
        return Path(path).expanduser().read_bytes().decode("utf-8")
    except OSError as exc:
        raise ValidationError(f"cannot read the {what} {path}: {exc.strerror or exc}", field="body") from None
    except UnicodeDecodeError:
        raise ValidationError(f"the {what} {path} is not UTF-8 text: convert it, or attach it with --attach",
                              field="body") from None


def _sentence(name: str, exc: BaseException) -> str:
    text = redact(str(exc))
    return text if name in text else f"{name}: {text}"


def _ms(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)


def _duration(delta: dt.timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds / 3600:.1f} h"
