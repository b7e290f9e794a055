"""The IMAP incoming session: what is new by UID, raw downloads, acknowledgements."""
from __future__ import annotations

import imaplib
import itertools
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cached_property
from typing import Any

from imapclient import DELETED, SEEN, IMAPClient
from mailhost.errors import MailError, PermanentFailure, TemporaryFailure
from mailhost.protocols import (
    ConnectionSettings,
    Estimate,
    IncomingSession,
    Listing,
    MessageRef,
)

from .link import GuardedIMAP4, connect, logout, translated, with_defaults

__all__ = ["ImapSession", "open_session"]

_UID = re.compile(rb"[( ]UID (\d+)", re.I)
_SIZE = re.compile(rb"[( ]RFC822\.SIZE (\d+)", re.I)
_QUOTED_BODY = re.compile(rb'[( ]BODY\[\] "((?:[^"\\]|\\.)*)"', re.I)
_UNQUOTE = re.compile(rb"\\(.)")
#: Listing lines as Dovecot (and most servers) write them, read in bulk; any other
#: shape goes through the line-by-line reader.
_LISTING = re.compile(rb"(?:\* \d+ FETCH \(UID \d+ RFC822\.SIZE \d+\)\r\n)+")
_LISTED = re.compile(rb"(\* \d+ FETCH \(UID (\d+) RFC822\.SIZE \d+\)\r\n)")
_MAX_SET = 4000  # bytes of UID set per command: far below servers' line limits (Dovecot: 64 KiB)


def open_session(settings: ConnectionSettings) -> ImapSession:
    """Connect and sign in (the provider's ``open``)."""
    settings = with_defaults(settings)
    return ImapSession(settings, connect(settings))


class ImapSession(IncomingSession):
    """A signed-in link to one folder, downloading by UID.

    The cursor is ``{"uidvalidity": V, "last_uid": U}``: every message with a UID up
    to ``U`` under UIDVALIDITY ``V`` is stored. Keys are ``"V:UID"``. A server that
    gives UIDs out again under the same UIDVALIDITY (a mailbox restored from a backup)
    starts an era ``E`` (``"era": E`` in the cursor, keys ``"V.E:UID"``): seen when
    UIDNEXT went back to ``U`` or below, or, once it grew past ``U`` again, when the
    witness, ``"witness": [W, T]`` in the cursor of a pass that ended (the highest UID
    it listed, and its INTERNALDATE in seconds since the epoch), is there with another
    date (see :meth:`list_new`). The folder is selected read-write by :meth:`list_new`
    (and on demand by the other methods), so the acknowledgements run on the same link.
    """

    def __init__(self, settings: ConnectionSettings, client: IMAPClient) -> None:
        self.settings = settings
        self.client = client
        self._imap: GuardedIMAP4 = client._imap
        self._uidvalidity: int | None = None  # of the selected folder
        self._era = 0  # of its UIDs, from the cursor (see the class)
        self._read_only = False  # the folder, as the server opened it
        self._permanent: tuple[bytes, ...] | None = None  # the flags it keeps; None: all (RFC 3501 7.1)
        self._closed = False
        self._targets: set[str] = set()  # move targets known to be another folder

    def __repr__(self) -> str:
        return f"<ImapSession {self.settings.describe()} folder={self.settings.folder!r}>"

    # -- what is new ----------------------------------------------------------------

    def list_new(
        self, cursor: Mapping[str, Any] | None, known: Callable[[Sequence[str]], set[str]]
    ) -> Listing:
        """Messages with a UID above the cursor; everything when UIDVALIDITY changed or
        the server gives UIDs out again (a restored backup, see the class).

        Costs one SELECT when nothing is new, however big the folder: UIDNEXT says so.
        When something is new, one more command reads the INTERNALDATE of the witness
        and of the highest new UID, the next witness: a restored folder whose UIDNEXT
        grew past the cursor gave the witness's UID to other mail, so, unless that mail
        is gone again, the witness is there with another date.
        """
        selected = self._select()
        uidnext = selected.get(b"UIDNEXT")
        last, reset, self._era, witness = 0, False, 0, []
        if cursor is not None:
            stored = int(cursor.get("last_uid", 0))
            if cursor.get("uidvalidity") != self._uidvalidity:
                reset = True  # renumbered: list from 1; the host dedups by content
            elif uidnext is not None and uidnext <= stored and self._highest(selected.get(b"EXISTS")) < uidnext:
                # UIDNEXT went back: the server gives stored UIDs to new mail. Keys of a
                # new era, so that none passes for a stored one; listed from 1 as above.
                reset, self._era = True, int(cursor.get("era", 0)) + 1
            else:
                last, self._era, witness = stored, int(cursor.get("era", 0)), list(cursor.get("witness") or [])
                if uidnext is not None and uidnext <= last:
                    uidnext = None  # below UIDs the folder holds: wrong, so listed as if unknown
        if selected.get(b"EXISTS") == 0 or (uidnext is not None and uidnext <= last + 1):
            refs: list[MessageRef] = []
        else:
            # "last+1:*" always includes the highest UID, even when it is <= last.
            refs = [ref for ref in self._refs(f"{last + 1}:*".encode()) if ref.handle > last]
            dates = self._dates([*witness[:1], refs[-1].handle]) if refs else {}
            if _given_again(witness, dates):
                # A restored backup, and new mail took the stored UIDs: a new era, as above.
                reset, self._era, last = True, self._era + 1, 0
                refs = self._refs(b"1:*")
                dates = self._dates([refs[-1].handle]) if refs else {}
            if refs:
                witness = [refs[-1].handle, dates[refs[-1].handle]] if refs[-1].handle in dates else []
        # UIDs below UIDNEXT are all listed (or gone), so the cursor may move up to it:
        # the next "nothing new?" then stays one SELECT even after expunges.
        top = max([last, (uidnext or 1) - 1, *(ref.handle for ref in refs)])
        cursor = self._cursor(top)
        return Listing(refs, {**cursor, "witness": witness} if witness else cursor, reset)

    def _highest(self, exists: int | None) -> int:
        """The highest UID in the selected folder (``UID FETCH *``), 0 when it is empty
        (holds ``exists`` messages, 0)."""
        if exists == 0:
            return 0
        self._ensure_selected()
        return max((ref.handle for ref in self._refs(b"*")), default=0)

    def estimate(
        self, cursor: Mapping[str, Any] | None, known: Callable[[Sequence[str]], set[str]]
    ) -> Estimate:
        """From STATUS; the UIDs above the cursor are counted exactly by UID FETCH. Says
        what :meth:`list_new` would do: a new era when the server gives UIDs out again, a
        count of the UIDs above the cursor when only its UIDNEXT lags behind them."""
        messages, uidnext, validity = self._status()
        if cursor is None:
            return Estimate(messages, "exact")
        last, folder = int(cursor.get("last_uid", 0)), self.settings.folder
        if not cursor:  # the host's "another mailbox now": saying "renumbered" would mislead
            why = "the connection now reads another mailbox (its server or user changed)"
        elif cursor.get("uidvalidity") != validity:
            why = f"the server renumbered folder {folder} (UIDVALIDITY changed)"
        elif uidnext == last + 1:
            return Estimate(0, "exact")
        elif uidnext <= last and self._highest(messages) < uidnext:
            why = (f"the server gives new mail in folder {folder} UIDs it gave before (UIDNEXT went back, as after "
                   "restoring a backup)")
        else:
            # Listed, not counted by UID SEARCH, whose answer is one line of every UID: past
            # about 150,000 of them longer than imaplib reads (1,000,000 bytes). Up to "*", as
            # list_new lists, not to UIDNEXT - 1: a UIDNEXT that lags would hide UIDs above it.
            self._ensure_selected()
            refs = [ref for ref in self._refs(f"{last + 1}:*".encode()) if ref.handle > last]
            witness = list(cursor.get("witness") or [])
            if not (refs and witness and _given_again(witness, self._dates(witness[:1]))):
                highest = max([last, *(ref.handle for ref in refs)])
                return Estimate(len(refs), "exact", (
                    f"the server says the next UID in folder {folder} is {uidnext}, not above UIDs it holds (up to "
                    f"{highest}), a server fault that gives no UID out again: the messages above UID {last}, the "
                    "last stored, are counted, and downloaded, as listed") if uidnext <= highest else "")
            why = (f"the server gives new mail in folder {folder} UIDs it gave before (UID {witness[0]}, stored "
                   "before, now holds another message, as after restoring a backup)")
        return Estimate(
            messages,
            "low",
            f"at most {messages}: {why}, so every message is downloaded again and the ones "
            "already stored are recognised by content and skipped",
        )

    def _status(self) -> tuple[int, int, int]:
        """MESSAGES, UIDNEXT, UIDVALIDITY: by STATUS, or by SELECT once the folder is
        selected (STATUS on the selected folder is discouraged, RFC 3501 6.3.10)."""
        if self._uidvalidity is not None:
            selected = self._select()
            return selected[b"EXISTS"], selected.get(b"UIDNEXT") or 2**32, self._uidvalidity
        with self._in_folder("read the status of folder"):
            status = self.client.folder_status(self._folder(), ("MESSAGES", "UIDNEXT", "UIDVALIDITY"))
        return int(status[b"MESSAGES"]), int(status[b"UIDNEXT"]), int(status[b"UIDVALIDITY"])

    def resolve(self, keys: Sequence[str]) -> list[MessageRef]:
        """Refs for keys of the current UIDVALIDITY (and era) that are still there."""
        self._ensure_selected()
        current, uids = self._key(0).partition(":")[0], set()
        for key in keys:
            prefix, _, uid = key.partition(":")
            if prefix == current and uid.isdigit():
                uids.add(int(uid))
        return [ref for uid_set in _uid_sets(uids) for ref in self._refs(uid_set)]

    # -- download -------------------------------------------------------------------

    def fetch(self, refs: Sequence[MessageRef]) -> Iterator[tuple[MessageRef, bytes]]:
        """``UID FETCH <set> (BODY.PEEK[])``: the raw bytes, never marking anything seen.

        Read straight off imaplib's socket buffer (see :meth:`_uid_fetch`); yields in
        the order of ``refs``, skipping those that vanished. When the download fails,
        first yields the refs up to the first one that did not come whole, so that the
        host stores them: a message the server cannot read then stops the folder there,
        not at the start of its batch.
        """
        self._ensure_selected()
        wanted = {ref.handle for ref in refs}
        bodies: dict[int, bytes] = {}
        try:
            with translated(self.settings, f"download messages from folder {self.settings.folder}"):
                for uid_set in _uid_sets(wanted):
                    got: list[tuple[int, bytes, bytes | None]] = []
                    try:
                        self._uid_fetch(uid_set, b"(BODY.PEEK[])", got)
                    finally:
                        bodies.update((uid, body) for uid, _, body in got if body is not None and uid in wanted)
                missing = wanted - bodies.keys()
                if missing:  # gone (expunged by another client), or the server sent no content
                    self._check_gone(missing)
        except MailError:
            for ref in itertools.takewhile(lambda ref: ref.handle in bodies, refs):
                yield ref, bodies[ref.handle]
            raise
        for ref in refs:
            body = bodies.pop(ref.handle, None)
            if body is not None:
                yield ref, body

    def _check_gone(self, uids: set[int]) -> None:
        """Raise unless every one of ``uids`` has left the folder: the host moves the
        cursor past what :meth:`fetch` does not return, so a message the server still
        lists but sent without content (``BODY[] NIL``) must fail the batch, not vanish."""
        still = self._present(uids)
        if still:
            raise TemporaryFailure(
                f"{self.settings.describe()} sent no content for {len(still)} message(s) it still has in "
                f"folder {self.settings.folder} (UID {_shown(still)}): the next pass tries again; if this persists, "
                "look at those messages on the server"
            )

    # -- after download: all idempotent, so a crash may repeat them ---------------

    def mark_seen(self, refs: Sequence[MessageRef]) -> None:
        """``UID STORE +FLAGS.SILENT (\\Seen)``."""
        self._check_keeps(SEEN, "mark messages seen")
        with translated(self.settings, "mark messages seen"):
            for uid_set in _uid_sets(ref.handle for ref in refs):
                self.client.add_flags(uid_set, [SEEN], silent=True)

    def delete(self, refs: Sequence[MessageRef]) -> None:
        """``\\Deleted``, then ``UID EXPUNGE`` of exactly these messages (UIDPLUS).

        Without UIDPLUS the only expunge is a plain EXPUNGE, which removes every message
        flagged \\Deleted, by anyone. It runs only when no flagged message has a UID
        above our highest: the host stores in UID order, so those below are stored and
        this action deletes them anyway. Otherwise ours stay flagged (never listed
        again) until a later delete may expunge. A flag set by someone else between
        that check and the EXPUNGE is the one remaining risk.
        """
        if not refs:
            return
        self._check_keeps(DELETED, "delete messages")
        uids = {ref.handle for ref in refs}
        with translated(self.settings, f"delete messages from folder {self.settings.folder}"):
            for uid_set in _uid_sets(uids):
                self.client.add_flags(uid_set, [DELETED], silent=True)
            if self._has("UIDPLUS"):
                for uid_set in _uid_sets(uids):
                    self.client.uid_expunge(uid_set)
            elif max(self.client.search(["DELETED"]), default=0) <= max(uids):
                self.client.expunge()
            else:
                return  # flagged; a later delete expunges them
            # Dovecot answers "OK Expunge ignored: Permission denied" to a user without
            # the expunge right: only a look says whether they went.
            kept = self._present(uids)
        if kept:
            raise PermanentFailure(
                f"{self.settings.describe()} cannot delete messages: it kept {len(kept)} of them in folder "
                f"{self.settings.folder} after EXPUNGE (UID {_shown(kept)}); the user may not have the right to expunge there"
            )

    def move(self, refs: Sequence[MessageRef], folder: str) -> None:
        """``UID MOVE`` to ``folder`` (created if missing), else ``UID COPY`` + :meth:`delete`.

        Without MOVE, a crash between the copy and the \\Deleted flag leaves a second
        copy in ``folder`` when the action is repeated; nothing is lost.
        """
        self._ensure_selected()
        target = self._server_name(folder)
        if target not in self._targets:
            # Only INBOX itself is case-insensitive by the RFC; Dovecot takes inbox/Sub
            # for INBOX/Sub too. Moved into itself, mail comes back every pass.
            spelled = self._listed_as(target)
            if spelled and spelled == self._listed_as(self._folder()):
                raise PermanentFailure(
                    f"{self.settings.describe()} cannot move messages to folder {folder}: it takes that for folder "
                    f"{self.settings.folder}, which this connection downloads from"
                )
            self._targets.add(target)
        atomic = self._has("MOVE")
        if not atomic:  # a copy the delete then cannot follow would be made again every pass
            self._check_keeps(DELETED, f"move messages to folder {folder}")
        command = self.client.move if atomic else self.client.copy
        with translated(self.settings, f"move messages to folder {folder}"):
            for uid_set in _uid_sets(ref.handle for ref in refs):
                # Without MOVE, one flagged \Deleted was copied by a try whose expunge failed.
                parts = [uid_set] if atomic else _uid_sets(self.client.search(["UID", uid_set.decode(), "UNDELETED"]))
                for part in parts:
                    self._move_set(command, part, target)
        if not atomic:
            self.delete(refs)

    def _move_set(self, command: Callable[[bytes, str], Any], uid_set: bytes, target: str, again: bool = False,
                  created: bool = False) -> None:
        """``command`` (MOVE or COPY) ``uid_set`` to ``target``, creating the folder if
        missing. Refused with ``[EXPUNGEISSUED]`` (RFC 5530: another client expunged
        some of them meanwhile; Dovecot then moves none), it moves those still there;
        also after creating the folder, since Dovecot says ``[TRYCREATE]`` first."""
        try:
            command(uid_set, target)
        except imaplib.IMAP4.error as exc:
            if "[EXPUNGEISSUED]" in str(exc).upper() and not again:
                for left in _uid_sets(ref.handle for ref in self._refs(uid_set)):
                    self._move_set(command, left, target, again=True, created=created)
                return
            if created or self._exists(target):
                raise
            self.client.create_folder(target)
            self.client.subscribe_folder(target)  # so that mail clients show it
            self._move_set(command, uid_set, target, again=again, created=True)

    def _check_keeps(self, flag: bytes, doing: str) -> None:
        """Refuse an acknowledgement the server would answer OK and ignore (Dovecot: "Store
        ignored with read-only mailbox"): in a folder it opened read-only, or with a flag
        it does not keep there. The host reports the refusal and tries again next pass."""
        self._ensure_selected()
        where = f"{self.settings.describe()} cannot {doing}: it"
        if self._read_only:
            raise PermanentFailure(f"{where} lets this user only read folder {self.settings.folder} (READ-ONLY)")
        if self._permanent is not None and flag.upper() not in {kept.upper() for kept in self._permanent}:
            raise PermanentFailure(
                f"{where} does not let this user set the flag {flag.decode()} in folder {self.settings.folder} "
                f"(it keeps only {b' '.join(self._permanent).decode() or 'none'})"
            )

    def close(self) -> None:
        """LOGOUT; never raises."""
        if not self._closed:
            self._closed = True
            logout(self.client)

    # -- folders --------------------------------------------------------------------

    def _folder(self) -> str:
        return self._server_name(self.settings.folder or "INBOX")

    def _server_name(self, folder: str) -> str:
        """The server's name for ``folder`` as an admin writes it: ``Main/Sub`` with the
        server's hierarchy delimiter (from ``LIST "" ""``). Names stay str: imapclient
        encodes them in modified UTF-7."""
        if folder.upper() == "INBOX":
            return "INBOX"
        if "/" not in folder:
            return folder
        return folder.replace("/", self._delimiter) if self._delimiter else folder

    @cached_property
    def _delimiter(self) -> str | None:
        """The server's hierarchy delimiter; None in a flat namespace."""
        with translated(self.settings, "list the folders"):
            root = self.client.list_folders("", "")
        delimiter = root[0][1] if root else None
        return delimiter.decode() if isinstance(delimiter, bytes) else delimiter

    def _exists(self, name: str) -> bool:
        return name in self._listed_as(name)  # LIST takes a pattern: % and * match others

    def _listed_as(self, name: str) -> set[str]:
        """The names ``LIST "" name`` gives: the server's own spelling of ``name``."""
        with translated(self.settings, "list the folders"):
            return {found for _, _, found in self.client.list_folders("", name)}

    def _select(self) -> dict[bytes, Any]:
        """SELECT the folder (read-write, for the acknowledgements); EXAMINE it when
        the server says this user may only read it, so that it is still downloaded."""
        with self._in_folder("open folder"):
            try:
                selected: dict[bytes, Any] = self.client.select_folder(self._folder())
            except imaplib.IMAP4.readonly:  # imaplib's answer to "OK [READ-ONLY]" (it is no dropped link)
                selected = self.client.select_folder(self._folder(), readonly=True)
        self._uidvalidity = int(selected[b"UIDVALIDITY"])
        self._read_only = b"READ-ONLY" in selected
        self._permanent = selected.get(b"PERMANENTFLAGS")
        return selected

    def _ensure_selected(self) -> None:
        if self._uidvalidity is None:
            self._select()

    @contextmanager
    def _in_folder(self, doing: str) -> Iterator[None]:
        """Like ``translated()``; a refusal because the folder is missing says so."""
        folder = self.settings.folder or "INBOX"
        try:
            with translated(self.settings, f"{doing} {folder}"):
                yield
        except PermanentFailure:
            if self._exists(self._folder()):
                raise
            with translated(self.settings, "list the folders"):
                names = [
                    name.replace(delim.decode(), "/") if delim else name
                    for _, delim, name in self.client.list_folders()
                ]
            shown = ", ".join(sorted(names)[:20]) + (", ..." if len(names) > 20 else "")
            raise PermanentFailure(
                f"folder {folder} does not exist in the mailbox of {self.settings.describe()}: "
                f"check the Folder setting (the server has {shown})"
            ) from None

    def _has(self, capability: str) -> bool:
        return bool(self.client.has_capability(capability))

    # -- the lean FETCH reader ------------------------------------------------------

    def _present(self, uids: Iterable[int]) -> list[int]:
        """Those of ``uids`` the folder still holds, in UID order."""
        return [ref.handle for uid_set in _uid_sets(uids) for ref in self._refs(uid_set)]

    def _refs(self, uid_set: bytes) -> list[MessageRef]:
        """Refs with sizes for the messages in ``uid_set``, in UID order."""
        sizes: dict[int, int] = {}
        with translated(self.settings, f"list the messages of folder {self.settings.folder}"):
            for uid, text, _ in self._uid_fetch(uid_set, b"(UID RFC822.SIZE)"):
                size = _SIZE.search(text)
                if size:  # not an unsolicited FETCH (a flag change by another client)
                    sizes[uid] = int(size[1])
        return [
            MessageRef(key=self._key(uid), size=size, handle=uid, cursor=self._cursor(uid))
            for uid, size in sorted(sizes.items())
        ]

    def _key(self, uid: int) -> str:
        return f"{self._uidvalidity}.{self._era}:{uid}" if self._era else f"{self._uidvalidity}:{uid}"

    def _cursor(self, last_uid: int) -> dict[str, int | None]:
        cursor = {"uidvalidity": self._uidvalidity, "last_uid": last_uid}
        return {**cursor, "era": self._era} if self._era else cursor

    def _dates(self, uids: Iterable[int]) -> dict[int, float]:
        """The INTERNALDATE, in seconds since the epoch, of those of ``uids`` the folder holds."""
        dates: dict[int, float] = {}
        with translated(self.settings, f"list the messages of folder {self.settings.folder}"):
            for uid_set in _uid_sets(uids):
                for uid, text, _ in self._uid_fetch(uid_set, b"(UID INTERNALDATE)"):
                    parsed = imaplib.Internaldate2tuple(text)
                    if parsed is not None:  # not an unsolicited FETCH
                        dates[uid] = time.mktime(parsed)
        return dates

    def _uid_fetch(
        self, uid_set: bytes, items: bytes, got: list[tuple[int, bytes, bytes | None]] | None = None
    ) -> list[tuple[int, bytes, bytes | None]]:
        """Run ``UID FETCH`` and return ``(uid, response text, BODY[] literal or None)``,
        appended to ``got`` as they arrive (what came before a failure stays there).

        imapclient parses every FETCH response in pure Python (about 18,000 messages/s
        here); these two response shapes need no parser, so they are read straight
        from imaplib's buffered socket reader with ``readline``/``read``, keeping
        imaplib's tag and state bookkeeping intact. The whole response is read before
        returning, so the link is always ready for the next command. A server that
        drips the answer is cut off by the command's :class:`StallGuard` (see
        :class:`GuardedIMAP4`), stepped once a message body came whole (and for every
        piece of the bytes read): listing lines, and ``* OK`` lines, are no step.
        """
        imap = self._imap
        readline, read, take = imap.readline, imap.read, imap.take
        listing = items == b"(UID RFC822.SIZE)"
        tag = imap._new_tag()
        command = b"%s UID FETCH %s %s" % (tag, uid_set, items)
        self._say(f"> {command.decode()}")
        imap.send(command + b"\r\n")  # starts the command's guard
        guard = imap.guard
        assert guard is not None
        done, got, text = tag + b" ", [] if got is None else got, b""
        try:
            step = guard.step
            while True:
                if listing:  # 20,000 lines: 0.02 s a buffer at a time, 0.1 s a line at a time
                    run = take(_LISTING)
                    if run:
                        got.extend((int(uid), text, None) for text, uid in _LISTED.findall(run))
                        continue
                line = readline()
                if not line.startswith(b"* "):
                    if line.startswith(done):
                        break
                    if not line:
                        raise imap.abort("the server closed the link")
                    continue  # a stray continuation: nothing to answer
                text, body = line, None
                while line.endswith(b"}\r\n"):  # a literal follows
                    start = line.rfind(b"{")
                    digits = line[start + 1 : -3]
                    if start < 0 or not digits.isdigit():
                        break  # a line that merely ends in "}"
                    size = int(digits)
                    data = read(size)  # in steps of STALL_PIECE bytes
                    if len(data) != size:
                        uid = _UID.search(text)
                        raise imap.abort(
                            f"the server closed the link after {len(data)} of the {size} bytes of message "
                            f"UID {uid[1].decode() if uid else '?'}; if that repeats, the server's log says "
                            "why it cannot send that message"
                        )
                    # "BODY[] {n}", in any case, or a literal8 "BODY[] ~{n}" (RFC 3516)
                    if line[start - 7 : start] == b"BODY[] " or line[:start].rstrip(b"~").upper().endswith(b"BODY[] "):
                        body = data
                    line = readline()
                    text += line
                if body is None and b'[] "' in text:  # a quoted string (a tiny message)
                    quoted = _QUOTED_BODY.search(text)
                    if quoted:
                        body = _UNQUOTE.sub(rb"\1", quoted[1])
                uid = _UID.search(text)
                if uid and (b" FETCH (" in text[:40] or b" FETCH (" in text[:40].upper()):  # any case
                    got.append((int(uid[1]), text, body))
                    if body is not None:
                        step()
                elif text.startswith(b"* BYE"):
                    raise imap.abort(text.decode("utf-8", "replace").strip())
                # other untagged responses (EXISTS, EXPUNGE, OK, ...) change nothing for us
                text = b""  # a stall from here on is in no message's response
        except (OSError, imaplib.IMAP4.error):
            if guard.fired:
                uid = _UID.search(text)
                reading = f"message UID {uid[1].decode()}" if uid else "its answer to UID FETCH"
                raise guard.failure(self.settings.describe(), f"{reading} from folder {self.settings.folder}",
                                    download=b"BODY" in items) from None
            raise
        finally:
            imap.unwatch()
            imap.tagged_commands.pop(tag, None)
        result = line[len(done) :].strip()
        self._say(f"< {line.decode('utf-8', 'replace').strip()} ({len(got)} messages)")
        if not result.startswith(b"OK") and b"[EXPUNGEISSUED]" not in result:
            raise imap.error(result.decode("utf-8", "replace"))  # NO/BAD
        return got

    def _say(self, line: str) -> None:
        if self.settings.transcript is not None:
            self.settings.transcript(line)


def _given_again(witness: Sequence[float], dates: Mapping[int, float]) -> bool:
    """Whether the witness's UID (``[uid, date]``) holds a message of another date than
    when it was listed: the server gave that UID to new mail (a message's INTERNALDATE
    never changes, and a UID is never given twice under one UIDVALIDITY: RFC 3501 2.3)."""
    return bool(witness) and int(witness[0]) in dates and dates[int(witness[0])] != witness[1]


def _shown(uids: Sequence[int]) -> str:
    """The first ten of ``uids``, for a message."""
    return ", ".join(map(str, uids[:10])) + (", ..." if len(uids) > 10 else "")


def _uid_sets(uids: Iterable[int]) -> list[bytes]:
    """Compact UID sets (``1:500,502``), split so that no command line gets too long."""
    sets: list[str] = []
    numbered = enumerate(sorted(set(uids)))
    for _, run in itertools.groupby(numbered, lambda pair: pair[1] - pair[0]):  # a run keeps uid - index
        first, *rest = (uid for _, uid in run)
        part = f"{first}:{rest[-1]}" if rest else str(first)
        if sets and len(sets[-1]) + len(part) < _MAX_SET:
            sets[-1] += "," + part
        else:
            sets.append(part)
    return [uid_set.encode() for uid_set in sets]
