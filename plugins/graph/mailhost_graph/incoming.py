"""The Graph incoming session: what is new by delta query, raw MIME, acknowledgements.

The cursor is ``{"delta_link": URL, "folder_id": ID}``: the ``@odata.deltaLink`` that
closed the last delta round of the folder. A pass follows it (``@odata.nextLink`` pages,
then a new ``@odata.deltaLink``), so it costs what changed, not what the folder holds.
The round asks for ``changeType=created`` (Microsoft: "Get incremental changes to
messages in a folder", example 2): a message marked read by the after-download action
is an update and does not come back.

Keys are immutable message ids (``Prefer: IdType="ImmutableId"``), so a message keeps its
key when it is moved. A repeated round is harmless: keys already stored are left out of
the listing before anything is downloaded.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import quote

from mailhost.errors import PermanentFailure, TemporaryFailure
from mailhost.protocols import (
    ConnectionSettings,
    Estimate,
    IncomingSession,
    Listing,
    MessageRef,
)

from .client import PREFER_IMMUTABLE, GraphClient, SubResponse, signed_in
from .folders import FolderInfo, Folders

__all__ = ["PAGE_SIZE", "GraphIncomingSession", "open_incoming"]

#: Messages per delta page (``Prefer: odata.maxpagesize``). A page lists ids, dates and
#: sizes only (about 250 bytes a message), so big pages save round trips; the server may
#: always send fewer. See the README for the measurements.
PAGE_SIZE = 500
#: PidTagMessageSize, so that the host can bound its batches by bytes.
SIZE_PROPERTY = "Integer 0x0E08"
_RESET_CODES = frozenset({"syncstatenotfound", "syncstateinvalid", "resyncrequired", "errorinvalidsyncstatedata"})


class DeltaExpired(Exception):
    """The server no longer knows the delta or skip token: sync again from scratch."""


def open_incoming(settings: ConnectionSettings) -> GraphIncomingSession:
    """The provider's ``open``: gets a token at once, so a bad credential fails early."""
    return GraphIncomingSession(settings, signed_in(settings))


class GraphIncomingSession(IncomingSession):
    """One mailbox folder over Microsoft Graph (see the module doc)."""

    def __init__(self, settings: ConnectionSettings, client: GraphClient) -> None:
        self.settings = settings
        self.client = client
        self.mailbox = settings.shared_mailbox or settings.username or ""
        if not self.mailbox:
            raise PermanentFailure(f"{settings.label} has no mailbox: give --username")
        self.prefix = f"/users/{quote(self.mailbox, safe='@')}"
        self.folders = Folders(client, self.mailbox)
        self.folder_path = settings.folder or "Inbox"
        self._folder: FolderInfo | None = None

    def __repr__(self) -> str:
        return f"<GraphIncomingSession {self.mailbox} folder={self.folder_path!r} on {self.client.host}>"

    # -- what is new ------------------------------------------------------------------

    def list_new(self, cursor: Mapping[str, Any] | None, known: Callable[[Sequence[str]], set[str]]) -> Listing:
        """The messages created in the folder since the cursor's delta link, oldest
        first, less those already stored; a lost delta token lists the folder again."""
        folder = self.folder()
        link, reset = self._link(cursor, folder)
        try:
            found, delta_link = self._round(link) if link else self._first_round(folder)
        except DeltaExpired:
            reset = True
            try:
                found, delta_link = self._first_round(folder)
            except DeltaExpired as again:  # a skip token of the new round expired too
                raise TemporaryFailure(
                    f"{self.client.where} forgot its place twice in one listing of folder {self.folder_path} "
                    f"({again}): the next pass lists the folder again; nothing stored is downloaded twice") from None
        stored = known(list(found)) if found else set()
        refs = [MessageRef(key=key, size=size, handle=key) for key, (_, size) in
                sorted(found.items(), key=lambda item: item[1][0]) if key not in stored]
        return Listing(refs, {"delta_link": delta_link, "folder_id": folder.id}, reset)

    def estimate(self, cursor: Mapping[str, Any] | None, known: Callable[[Sequence[str]], set[str]]) -> Estimate:
        """Without a cursor, from the folder's counts (every message of the folder comes
        on a first pass); with one, by following the delta link (only the changes)."""
        folder = self.folders.get(self.folder_path, refresh=True)
        self._folder = folder
        counts = f"folder {self.folder_path} holds {folder.total} messages, {folder.unread} unread"
        link, _ = self._link(cursor, folder)
        if link is None:
            return Estimate(folder.total, "high",
                            f"{counts}; a first pass downloads them all, skipping any stored before")
        try:
            found, _ = self._round(link)
        except DeltaExpired:
            return Estimate(folder.total, "low",
                            f"{counts}; the server forgot where the last pass stopped, so the folder is listed "
                            "again and the messages stored before are skipped: at most this many")
        new = len(set(found) - known(list(found))) if found else 0
        return Estimate(new, "exact", f"{new} new since the last pass ({counts})")

    def resolve(self, keys: Sequence[str]) -> list[MessageRef]:
        """Refs for keys still in the folder (one ``$batch`` GET per 20 keys)."""
        folder = self.folder()
        requests = [{"id": str(i), "method": "GET", "headers": {"Prefer": PREFER_IMMUTABLE},
                     "url": f"{self.prefix}/messages/{_quote_id(key)}?$select=id,parentFolderId"}
                    for i, key in enumerate(keys)]
        answers = self.client.batch(requests, f"look up messages in folder {self.folder_path}")
        refs = []
        for i, key in enumerate(keys):
            sub = answers.get(str(i))
            if sub is None or sub.status == 404:
                continue
            self._check(sub, "look up a message")
            if (sub.get("body") or {}).get("parentFolderId") == folder.id:
                refs.append(MessageRef(key=key, handle=key))
        return refs

    # -- download ---------------------------------------------------------------------

    def fetch(self, refs: Sequence[MessageRef]) -> Iterator[tuple[MessageRef, bytes]]:
        """``GET .../messages/{id}/$value``, four at a time; yields in the order of
        ``refs``, skipping messages that left the folder meanwhile.

        The host moves the cursor past what this does not return, so a 404 for a message
        the folder still holds (Exchange answers 404 now and then, as replicas catch up)
        fails the batch instead of losing the message.
        """
        targets = [f"{self.prefix}/messages/{_quote_id(ref.handle)}/$value" for ref in refs]
        doing = f"download messages from folder {self.folder_path}"
        got: list[tuple[MessageRef, bytes]] = []
        missing: list[str] = []
        for ref, response in zip(refs, self.client.get_many(targets, doing)):
            if response.status_code == 200:
                got.append((ref, response.content))
            else:
                missing.append(str(ref.handle))
        if missing:
            still = [ref.key for ref in self.resolve(missing)]
            if still:
                shown = ", ".join(still[:3]) + (", ..." if len(still) > 3 else "")
                raise TemporaryFailure(
                    f"{self.client.where} answered 404 for {len(still)} message(s) still in folder "
                    f"{self.folder_path} of {self.mailbox} ({shown}): the next pass tries again; if this persists, "
                    "look at those messages in the mailbox")
        yield from got

    # -- after download: idempotent, so a crash may repeat them -----------------------

    def mark_seen(self, refs: Sequence[MessageRef]) -> None:
        """``PATCH {"isRead": true}``, 20 per ``$batch``."""
        self._each(refs, "PATCH", "", {"isRead": True}, "mark messages read")

    def delete(self, refs: Sequence[MessageRef]) -> None:
        """``DELETE``, 20 per ``$batch``, of the messages still in the folder (see
        :meth:`_still_here`): Exchange keeps the message in the mailbox's Recoverable Items
        (retention applies), not in Deleted Items."""
        self._each(self._still_here(refs), "DELETE", "", None, f"delete messages from folder {self.folder_path}")

    def move(self, refs: Sequence[MessageRef], folder: str) -> None:
        """``POST .../move`` to ``folder`` (a path or well-known name, created if
        missing), 20 per ``$batch``, of the messages still in the folder (see :meth:`_still_here`)."""
        target = self.folders.ensure(folder)
        self._each(self._still_here(refs), "POST", "/move", {"destinationId": target.id},
                   f"move messages to folder {folder}")

    def close(self) -> None:
        """Close the HTTP connections; never raises."""
        self.client.close()

    # -- helpers ----------------------------------------------------------------------

    def _still_here(self, refs: Sequence[MessageRef]) -> list[MessageRef]:
        """``refs`` less the messages no longer in the folder. An immutable id opens a
        message wherever it is, so one a user or a rule moved or deleted (to Deleted
        Items) after the listing is downloaded and stored all the same; deleting or moving
        it would take it from where they put it, or bring a deleted one back. Marking it
        read harms nothing there, so the default action spares the lookup."""
        if not refs:
            return []
        here = {ref.key for ref in self.resolve([str(ref.handle) for ref in refs])}
        return [ref for ref in refs if str(ref.handle) in here]

    def folder(self) -> FolderInfo:
        """The connection's folder (looked up once per session)."""
        if self._folder is None:
            self._folder = self.folders.get(self.folder_path)
        return self._folder

    def _link(self, cursor: Mapping[str, Any] | None, folder: FolderInfo) -> tuple[str | None, bool]:
        """The stored delta link if it still applies; else None and whether that is a reset."""
        if not cursor:
            return None, False
        link = cursor.get("delta_link")
        if cursor.get("folder_id") != folder.id or not self.client.owns(link):
            return None, True  # the folder was recreated, or the endpoint changed
        return str(link), False

    def _initial(self, folder: FolderInfo, sizes: bool = True) -> str:
        query = "changeType=created&$select=id,receivedDateTime"
        if sizes:
            query += f"&$expand=singleValueExtendedProperties($filter=id%20eq%20'{quote(SIZE_PROPERTY)}')"
        return f"{self.prefix}/mailFolders/{quote(folder.id, safe='')}/messages/delta?{query}"

    def _first_round(self, folder: FolderInfo) -> tuple[dict[str, tuple[str, int | None]], str]:
        """A round from scratch; without the sizes if the server will not expand them
        (the host then bounds its batches by count only)."""
        try:
            return self._round(self._initial(folder))
        except PermanentFailure as exc:
            if getattr(exc, "status", None) != 400:
                raise
            return self._round(self._initial(folder, sizes=False))

    def _round(self, url: str) -> tuple[dict[str, tuple[str, int | None]], str]:
        """Follow one delta round to its end: ``{id: (receivedDateTime, size)}`` and the delta link."""
        found: dict[str, tuple[str, int | None]] = {}
        doing = f"list the new messages of folder {self.folder_path}"
        while True:
            response = self.client.request("GET", url, doing=doing,
                                           headers={"Prefer": f"odata.maxpagesize={PAGE_SIZE}, {PREFER_IMMUTABLE}"})
            if response.status_code in (400, 404, 410):
                code = _code(response)
                if response.status_code == 410 or code.lower() in _RESET_CODES:
                    raise DeltaExpired(code)
            page = self.client.check(response, doing).json()
            for item in page.get("value", []):
                if "@removed" in item or "id" not in item:
                    continue
                found[str(item["id"])] = (str(item.get("receivedDateTime") or ""), _size(item))
            if page.get("@odata.nextLink"):
                url = str(page["@odata.nextLink"])
                continue
            if page.get("@odata.deltaLink"):
                return found, str(page["@odata.deltaLink"])
            raise PermanentFailure(f"{self.client.where} ended a delta page with neither a next link nor a delta "
                                   f"link while {doing}")

    def _each(self, refs: Sequence[MessageRef], method: str, suffix: str, body: Any, doing: str) -> None:
        if not refs:
            return
        requests: list[dict[str, Any]] = []
        for i, ref in enumerate(refs):
            request: dict[str, Any] = {"id": str(i), "method": method, "headers": {"Prefer": PREFER_IMMUTABLE},
                                       "url": f"{self.prefix}/messages/{_quote_id(ref.handle)}{suffix}"}
            if body is not None:
                request.update(body=body, headers={"Prefer": PREFER_IMMUTABLE, "Content-Type": "application/json"})
            requests.append(request)
        for sub in self.client.batch(requests, doing).values():
            if sub.status != 404:  # gone already: nothing left to do
                self._check(sub, doing)

    def _check(self, sub: SubResponse, doing: str) -> None:
        if 200 <= sub.status < 300:
            return
        raise self.client.error(sub.status, sub.get("body"), sub.get("headers") or {}, doing)


def _quote_id(message_id: Any) -> str:
    return quote(str(message_id), safe="=-_")


def _size(item: Mapping[str, Any]) -> int | None:
    for prop in item.get("singleValueExtendedProperties") or []:
        if str(prop.get("id", "")).lower().replace("0x0e08", "0xe08") == "integer 0xe08":
            try:
                return int(prop.get("value"))
            except (TypeError, ValueError):
                return None
    return None


def _code(response: Any) -> str:
    try:
        return str(response.json().get("error", {}).get("code") or "")
    except (ValueError, AttributeError):
        return ""
