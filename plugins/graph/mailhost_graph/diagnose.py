"""``mailhost incoming test`` / ``outgoing test`` for Graph: each step ok, or the failure and the fix.

Incoming: token, mailbox, folder, permissions (read the MIME, write the read flag,
send). Outgoing: token, mailbox, permission to send. Nothing is changed: the write
probe sets a message's read flag to the value it already has.
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

from mailhost.errors import MailError, MailhostError
from mailhost.protocols import ConnectionSettings, TestStep

from .client import PREFER_IMMUTABLE, GraphClient, token_claims
from .folders import Folders
from .outgoing import sending_mailbox

__all__ = ["test_incoming", "test_outgoing"]


def test_incoming(settings: ConnectionSettings) -> Iterator[TestStep]:
    """Token, mailbox, folder, permissions; stops at the first failure."""
    mailbox = settings.shared_mailbox or settings.username or ""
    folder_path = settings.folder or "Inbox"
    step = "token"
    client = None
    try:
        client = GraphClient(settings)
        claims = token_claims(client.token())
        yield TestStep(step, True, _describe_token(claims, settings))

        step = "mailbox"
        prefix = f"/users/{quote(mailbox, safe='@')}"
        client.call("GET", f"{prefix}/mailFolders/inbox", doing=f"open mailbox {mailbox}", params={"$select": "id"})
        shared = f" (shared mailbox, signed in as {settings.username})" if settings.shared_mailbox else ""
        yield TestStep(step, True, f"mailbox {mailbox}{shared} answers on {client.where}")

        step = "folder"
        folder = Folders(client, mailbox).get(folder_path)
        yield TestStep(step, True, f"folder {folder_path} found: {folder.total} messages, {folder.unread} unread")

        step = "permissions"
        notes = [f"read: {_probe_read_write(client, prefix, folder.id, folder_path)}",
                 f"send: {_send_right(claims, bool(settings.shared_mailbox), settings)}"]
        yield TestStep(step, True, "; ".join(notes))
    except MailError as exc:
        yield TestStep(step, False, str(exc))
    finally:
        if client is not None:
            client.close()


def test_outgoing(settings: ConnectionSettings) -> Iterator[TestStep]:
    """Token, mailbox, permission to send; stops at the first failure."""
    mailbox = sending_mailbox(settings)
    step = "token"
    client = None
    try:
        client = GraphClient(settings)
        claims = token_claims(client.token())
        yield TestStep(step, True, _describe_token(claims, settings))

        step = "mailbox"
        doing = f"open mailbox {mailbox}"
        response = client.request("GET", f"/users/{quote(mailbox, safe='@')}/mailFolders/sentitems",
                                  params={"$select": "id"}, doing=doing)
        user = settings.username or ""
        alias = False
        if response.status_code == 403:
            yield TestStep(step, True, f"mailbox {mailbox} exists on {client.where}; this token may not read it, "
                                       "which sending does not need")
        elif response.status_code == 404 and user and user.lower() != mailbox.lower():
            # Not a mailbox's id or user principal name (an alias, a group): sending goes
            # through the user's own mailbox with this From (see mailhost_graph.outgoing).
            alias = True
            yield TestStep(step, True, f"{mailbox} is no mailbox's own address on {client.where} (an alias or a "
                                       f"group): messages go through {user}'s mailbox with From {mailbox}")
        else:
            client.check(response, doing)
            yield TestStep(step, True, f"mailbox {mailbox} answers on {client.where}")

        step = "permissions"
        # An alias is the user's own address; a group's needs Send As, checked when sending.
        shared = not alias and mailbox.lower() != user.lower()
        right = _send_right(claims, shared, settings)
        ok = not right.startswith("no")
        large = _send_right(claims, shared, settings, "Mail.ReadWrite")
        yield TestStep(step, ok, f"send: {right}" + ("" if ok else ": grant the app Mail.Send "
                                                      "(Mail.Send.Shared and Send As for a shared mailbox)")
                       + f"; over 4 MB (saved as a draft first): {large}")
    except MailError as exc:
        yield TestStep(step, False, str(exc))
    finally:
        if client is not None:
            client.close()


def _probe_read_write(client: GraphClient, prefix: str, folder_id: str, folder_path: str) -> str:
    """Read one message's MIME, then set its read flag to what it is: both rights, no change."""
    page = client.call("GET", f"{prefix}/mailFolders/{quote(folder_id, safe='')}/messages",
                       doing=f"list folder {folder_path}", params={"$top": "1", "$select": "id,isRead"})
    first = (page or {}).get("value") or []
    if not first:
        return "not checked, the folder is empty; write flags: not checked"
    message = first[0]
    target = f"{prefix}/messages/{quote(str(message['id']), safe='=-_')}"
    client.check(client.request("GET", f"{target}/$value", doing="read a message's MIME content"),
                 "read a message's MIME content")
    client.call("PATCH", target, doing="set a message's read flag", json_body={"isRead": bool(message.get("isRead"))},
                headers={"Content-Type": "application/json", "Prefer": PREFER_IMMUTABLE})
    return "yes; write flags: yes"


def _send_right(claims: dict[str, Any], shared: bool, settings: ConnectionSettings, right: str = "Mail.Send") -> str:
    """From the token's scopes or roles when it shows them (a JWT), else from the scopes
    the provider granted with it (an opaque token); ``right`` is Mail.Send, or
    Mail.ReadWrite for the drafts that messages over 4 MB are sent as."""
    delegated = bool(claims.get("scp"))
    scopes = set(str(claims.get("scp") or "").split()) | set(claims.get("roles") or [])
    if not claims:
        source = _source_info(settings)
        if source.get("app_only"):
            return ("unknown (app-only: the application permissions granted to the app decide, "
                    f"{right} for sending): send a test email")
        delegated = True
        scopes = {s.rsplit("/", 1)[-1] for s in source.get("granted") or source.get("scopes") or ()}
    if not scopes:
        return "unknown (the token does not show its permissions): send a test email"
    wanted = {f"{right}.Shared"} if shared and delegated else {right}
    if scopes & wanted:
        return "yes" + (" (the mailbox's Send As right is checked when sending)" if shared and right == "Mail.Send"
                        else "")
    return f"no ({' or '.join(sorted(wanted))} missing)"


def _source_info(settings: ConnectionSettings) -> dict[str, Any]:
    """What the token source (:class:`mailhost.oauth.TokenSource`) says of its credential;
    ``{}`` for a plain callable."""
    source = settings.access_token
    try:
        name = getattr(source, "credential", None)
        if not name:
            return {}
        granted = getattr(source, "granted", None)
        return {"credential": name, "app_only": bool(getattr(source, "app_only", False)),
                "scopes": tuple(getattr(source, "scopes", ()) or ()),
                "granted": tuple(granted() if callable(granted) else ())}
    except MailhostError:  # a report, not a reason to fail the step
        return {}


def _describe_token(claims: dict[str, Any], settings: ConnectionSettings) -> str:
    source = _source_info(settings)
    origin = f" from OAuth2 credential {source['credential']!r}" if source else ""
    if not claims:
        if not source:
            return "acquired an access token"
        scopes = " ".join(source["granted"] or source["scopes"]) or "the provider's default"
        kind = "app-only" if source["app_only"] else f"delegated for {settings.username}"
        return f"acquired an access token{origin} ({kind}, scopes {scopes})"
    if claims.get("scp"):
        who = claims.get("upn") or claims.get("preferred_username") or "a user"
        kind = f"delegated for {who}, scopes {claims['scp']}"
    else:
        kind = f"app-only, roles {' '.join(claims.get('roles') or []) or 'none'}"
    expires = claims.get("exp")
    until = ""
    if isinstance(expires, (int, float)):
        until = f", valid until {dt.datetime.fromtimestamp(expires, dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}"
    return f"acquired an access token{origin} ({kind}{until})"
