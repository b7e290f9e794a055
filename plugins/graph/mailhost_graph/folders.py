"""Mail folders by the name an admin writes: a well-known name, a display name, or a
path ``Parent/Child``; created on demand for the move action.

Light to import (the plugin's registration uses :func:`canonical_folder`): the HTTP
client is only a type here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote

from mailhost.errors import PermanentFailure

if TYPE_CHECKING:
    from .client import GraphClient

__all__ = ["WELL_KNOWN", "FolderInfo", "Folders", "canonical_folder"]

#: Well-known folder names (Microsoft: mailFolder resource type); they work in every
#: mailbox language, so they win over display names for the first part of a path.
WELL_KNOWN = frozenset({
    "inbox", "archive", "clutter", "conflicts", "conversationhistory", "deleteditems", "drafts",
    "junkemail", "localfailures", "msgfolderroot", "outbox", "recoverableitemsdeletions",
    "scheduled", "searchfolders", "sentitems", "serverfailures", "syncissues",
})
_SELECT = "id,displayName,parentFolderId,totalItemCount,unreadItemCount"


def canonical_folder(path: str) -> str:
    """The one spelling of the names :class:`Folders` finds the same folder by: parts
    trimmed, and a well-known first part in any case as ``Inbox`` (the default folder)
    or its lower-case name (``Drafts`` -> ``drafts``). Display names keep the admin's
    case: which spelling the mailbox has is known only to the server."""
    parts = _split(path)
    if not parts:
        return path  # not a folder name: the pass says so (see _parts)
    first = parts[0].lower()
    if first in WELL_KNOWN:
        parts[0] = "Inbox" if first == "inbox" else first
    return "/".join(parts)


@dataclass(frozen=True)
class FolderInfo:
    """A folder found in the mailbox, with its counts when it was looked up."""

    id: str
    path: str
    total: int = 0
    unread: int = 0


class Folders:
    """Finds (and creates) folders of one mailbox; remembers what it found."""

    def __init__(self, client: GraphClient, mailbox: str) -> None:
        self.client = client
        self.mailbox = mailbox
        self.prefix = f"/users/{quote(mailbox, safe='@')}"
        self._found: dict[str, FolderInfo] = {}

    def get(self, path: str, *, refresh: bool = False) -> FolderInfo:
        """The folder at ``path``, or a PermanentFailure that names it and the fix."""
        found = self.find(path, refresh=refresh)
        if found is None:
            raise PermanentFailure(
                f"folder {path} does not exist in mailbox {self.mailbox} on {self.client.where}: "
                f"check the Folder setting (top-level folders: {self._top_names()})"
            )
        return found

    def find(self, path: str, *, refresh: bool = False) -> FolderInfo | None:
        """The folder at ``path`` (``Inbox``, ``Inbox/Support``, ``Projects/2026``), or None."""
        key = path.lower()
        if not refresh and key in self._found:
            return self._found[key]
        parts = _parts(path)
        first = self._first(parts[0])
        if first is None:
            return None
        current = first
        for i, part in enumerate(parts[1:], start=1):
            child = self._child(current.id, part, "/".join(parts[: i + 1]))
            if child is None:
                return None
            current = child
        self._found[key] = current
        return current

    def ensure(self, path: str) -> FolderInfo:
        """The folder at ``path``, creating the missing parts (the move action's target)."""
        found = self.find(path)
        if found is not None:
            return found
        parts = _parts(path)
        current = self._first(parts[0])
        if current is None:
            current = self._create(None, parts[0], parts[0])
        for i, part in enumerate(parts[1:], start=1):
            sub = "/".join(parts[: i + 1])
            child = self._child(current.id, part, sub)
            current = child if child is not None else self._create(current.id, part, sub)
        self._found[path.lower()] = current
        return current

    # -- the steps ----------------------------------------------------------------------

    def _first(self, name: str) -> FolderInfo | None:
        if name.lower() in WELL_KNOWN:
            found = self._get(f"{self.prefix}/mailFolders/{name.lower()}", name)
            if found is not None:
                return found
        return self._child(None, name, name) or (self._get(f"{self.prefix}/mailFolders/{quote(name, safe='')}", name)
                                                 if _looks_like_id(name) else None)

    def _get(self, target: str, path: str) -> FolderInfo | None:
        response = self.client.request("GET", target, params={"$select": _SELECT}, doing=f"open folder {path}")
        if response.status_code in (400, 404):
            return None
        body = self.client.check(response, f"open folder {path}").json()
        return _info(body, path)

    def _child(self, parent: str | None, name: str, path: str) -> FolderInfo | None:
        where = f"{self.prefix}/mailFolders" + (f"/{quote(parent, safe='')}/childFolders" if parent else "")
        literal = name.replace("'", "''")
        body = self.client.call("GET", where, doing=f"look for folder {path}",
                                params={"$filter": f"displayName eq '{literal}'", "$select": _SELECT})
        for item in body.get("value", []):
            if str(item.get("displayName", "")).lower() == name.lower():
                return _info(item, path)
        return None

    def _create(self, parent: str | None, name: str, path: str) -> FolderInfo:
        where = f"{self.prefix}/mailFolders" + (f"/{quote(parent, safe='')}/childFolders" if parent else "")
        doing = f"create folder {path}"
        response = self.client.request("POST", where, doing=doing, json_body={"displayName": name, "isHidden": False})
        if response.status_code == 409:  # created meanwhile by someone else
            found = self._child(parent, name, path)
            if found is not None:
                return found
        return _info(self.client.check(response, doing, ok=(200, 201)).json(), path)

    def _top_names(self) -> str:
        try:
            body = self.client.call("GET", f"{self.prefix}/mailFolders", doing="list the folders",
                                    params={"$top": "50", "$select": "displayName"})
        except Exception:  # noqa: BLE001 - only for the error message
            return "unknown"
        names = sorted(str(f.get("displayName")) for f in body.get("value", []))
        return ", ".join(names) or "none"


def _split(path: str) -> list[str]:
    """The names of a path ``Parent/Child``, trimmed; empty ones (``//``) left out."""
    return [p.strip() for p in path.strip().strip("/").split("/") if p.strip()]


def _parts(path: str) -> list[str]:
    parts = _split(path)
    if not parts:
        raise PermanentFailure(f"folder {path!r} is not a folder name: give a name like Inbox or Inbox/Support")
    return parts


def _info(body: dict, path: str) -> FolderInfo:  # type: ignore[type-arg]
    return FolderInfo(str(body["id"]), path, int(body.get("totalItemCount") or 0), int(body.get("unreadItemCount") or 0))


def _looks_like_id(name: str) -> bool:
    return len(name) >= 40 and " " not in name
