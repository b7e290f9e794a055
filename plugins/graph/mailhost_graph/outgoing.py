"""The Graph outgoing session: the queued MIME message, sent as it is, whatever its size.

Up to 4 MB of request (the message in base64, so about 3 MB of MIME): one
``POST /users/{mailbox}/sendMail`` with ``Content-Type: text/plain`` and the message in
base64 (Microsoft: "user: sendMail", MIME format); ``202 Accepted`` is success.

Larger, since Graph refuses any request over 4 MB (``413``): the message is saved as a
draft without its largest attachments and those after them (``POST
/users/{mailbox}/messages``, MIME), each of those is added to the draft in order (from
3 MB with an upload session, ``createUploadSession`` and ``PUT`` ranges to its
pre-authenticated URL, which gets no token; smaller ones with ``POST .../attachments``),
then the draft is sent (``POST .../messages/{id}/send``, ``202``). This needs
Mail.ReadWrite besides Mail.Send. Exchange limits the whole message to the mailbox's
maximum size (35 MB by default, up to 150 MB) and each attachment to 150 MB.

The draft carries a tag (:data:`TAG_HEADER`) for the queued message, which Graph filters
on, so that nothing is left behind or sent twice: a failure before the last request
deletes the draft; a lost answer to saving it finds it by its tag; a failure of the last
request itself is in doubt, as an unanswered sendMail is, and the next attempt settles
it: the tagged message sent (no longer a draft: Graph's send moves it to Sent Items)
means done; a tagged draft means not sent: sent as it is if it was marked complete
(:data:`READY_PROPERTY`) for the very message this attempt sends, else deleted and made
again. The mark names the message by a hash of its bytes, because the host personalizes
each attempt anew from the connection (its From address, its subject prefix): after an
admin's edit, the message goes as the connection now says, as a small message does, never
as a draft an earlier attempt left.

The mailbox is the connection's From address (a shared mailbox) or else its username;
Exchange saves a copy in that mailbox's Sent Items. Microsoft ("Send Outlook messages from
another user") lets a signed-in user send with another ``From`` through either URL: the
From's own needs the user's Full Access on it besides Send As or Send on Behalf, the
user's own needs only the latter. So when Graph will not take the From address's mailbox
by its URL (``404 ErrorInvalidUser``: no mailbox has that id or user principal name, as
for an alias or a group; ``403 ErrorAccessDenied``: no Full Access), which says nothing
was sent, the message goes through the username's mailbox, its From unchanged, and the
copy is in the user's Sent Items. A refusal to send as another address is one sentence
naming the rights and the scope to grant.

Graph takes the recipients from the MIME headers (To, Cc, Bcc), not from an envelope.
Envelope recipients missing from the headers (the Bcc of a composed message) are added
as a ``Bcc`` header, which Exchange delivers to and strips. A message whose headers name
someone the envelope leaves out is refused rather than sent to them.
"""
from __future__ import annotations

import base64
import email.parser
import email.policy
import hashlib
import mimetypes
import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from email.utils import getaddresses, parseaddr
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx
from mailhost.errors import MailError, MailhostError, PermanentFailure, TemporaryFailure
from mailhost.protocols import ConnectionSettings, OutgoingSession, SendResult
from mailhost.secrets import remember_secret

from .client import GraphClient, signed_in

__all__ = [
    "READY_PROPERTY",
    "REQUEST_LIMIT",
    "TAG_PROPERTY",
    "FilePart",
    "GraphOutgoingSession",
    "draft_key",
    "open_outgoing",
    "sending_mailbox",
    "split_message",
    "with_envelope",
]

_HEADERS = email.parser.BytesHeaderParser(policy=email.policy.compat32)
_END = re.compile(rb"\r?\n\r?\n")

#: Graph refuses a request body over 4 MB (413); up to this, a message goes in one sendMail.
REQUEST_LIMIT = 4 * 1024 * 1024
#: The base64 of a draft whose large attachments go on their own: well under the limit.
DRAFT_TARGET = 3 * 1024 * 1024
#: Upload sessions take files "between 3 MB and 150 MB"; smaller ones are POSTed (in
#: base64 JSON, under 4 MB).
UPLOAD_MIN = 3_000_000
UPLOAD_MAX = 150 * 1024 * 1024
#: Bytes per PUT of an upload session: under 4 MB, a multiple of 320 KiB.
CHUNK = 10 * 320 * 1024
#: The header that tags a draft with its message (:func:`draft_key`). Exchange keeps a
#: custom header of a MIME message it reads as a string property of that name in the
#: PS_INTERNET_HEADERS set ([MS-OXCMAIL] 2.2.3.2.29), which Graph filters on; written in
#: lower case because Graph compares the name case-sensitively.
TAG_HEADER = "x-mailhost-draft"
TAG_PROPERTY = f"String {{00020386-0000-0000-C000-000000000046}} Name {TAG_HEADER}"
#: Set on the draft once it holds every attachment (a named property in PS_PUBLIC_STRINGS),
#: to :func:`_ready_mark`: only such a draft, of the same message, may be sent by a later
#: attempt, as it is.
READY_PROPERTY = "String {00020329-0000-0000-C000-000000000046} Name mailhost-ready"


def open_outgoing(settings: ConnectionSettings) -> GraphOutgoingSession:
    """The provider's ``open``: gets a token at once, so a bad credential fails early."""
    return GraphOutgoingSession(settings, signed_in(settings))


def sending_mailbox(settings: ConnectionSettings) -> str:
    """The mailbox that sends: the From address (shared mailbox) or the username."""
    address = parseaddr(settings.from_address or "")[1]
    return address or settings.username or ""


class GraphOutgoingSession(OutgoingSession):
    """Sends through one mailbox with ``sendMail``, or a draft for large messages (see the module doc)."""

    def __init__(self, settings: ConnectionSettings, client: GraphClient) -> None:
        self.settings = settings
        self.client = client
        self.sender = parseaddr(settings.from_address or "")[1]
        self.user = (settings.username or "").strip()
        mailbox = sending_mailbox(settings)
        if not mailbox:
            raise PermanentFailure(f"{settings.label} has no mailbox to send from: give --username")
        self._use(mailbox)

    def _use(self, mailbox: str) -> None:
        self.mailbox = mailbox
        self.path = f"/users/{quote(mailbox, safe='@')}"

    def __repr__(self) -> str:
        return f"<GraphOutgoingSession {self.mailbox} on {self.client.host}>"

    def send(self, raw: bytes, sender: str, recipients: Sequence[str],
             before_data: Callable[[], None] | None = None, delivery_key: str | None = None) -> SendResult:
        """One ``sendMail``, or a draft with its attachments then ``send``; 429, 503 and
        5xx raise TemporaryFailure (with the server's Retry-After), 400, 403 and 413
        PermanentFailure with Graph's code and message, a refused token TemporaryFailure
        (as a failed sign-in does). ``before_data`` runs once, right before the request
        that sends. The message is never sent twice here: the outgoing queue retries.
        ``delivery_key`` (the same on each attempt at one queued message) tags the draft,
        so that the next attempt finds what this one left: a draft, or the message sent."""
        message = with_envelope(raw, recipients)
        gate = _once(before_data)
        try:
            return self._send(message, len(recipients), gate, delivery_key)
        except PermanentFailure as exc:
            if not self._not_by_its_url(exc):
                raise self._refused_as(exc) from None
        self._use(self.user)  # for the rest of the session: the answer would be the same
        try:
            return self._send(message, len(recipients), gate, delivery_key)
        except PermanentFailure as exc:
            raise self._refused_as(exc) from None

    def _send(self, message: bytes, recipients: int, gate: Callable[[], None],
              delivery_key: str | None) -> SendResult:
        """:meth:`send` through :attr:`mailbox`."""
        if _b64(len(message)) <= REQUEST_LIMIT:
            doing = f"send a message as {self.mailbox}"
            gate()
            response = self.client.request("POST", f"{self.path}/sendMail", doing=doing, retry=False,
                                           content=base64.b64encode(message), headers={"Content-Type": "text/plain"})
            if response.status_code != 413:  # 413: Graph's limit is lower than ours; nothing was sent
                self._doubt(response, doing)
                self._check(response, doing, (202,), len(message))
                return self._sent(recipients)
        if not self._send_draft(message, gate, delivery_key):
            return SendResult(f"sent already: {self.client.where} holds the message for {recipients} "
                              f"recipient(s) in mailbox {self.mailbox}'s Sent Items, sent by an earlier attempt "
                              "whose answer was lost; not sent again")
        return self._sent(recipients)

    def _not_by_its_url(self, exc: PermanentFailure) -> bool:
        """Whether Graph refused the From address's mailbox by its URL in a way that says
        nothing was sent and the user's own mailbox may do: no such mailbox (an alias, a
        group), or no Full Access on it."""
        said = (getattr(exc, "status", None), str(getattr(exc, "code", "") or "").lower())
        return bool(self.user) and self.mailbox.lower() != self.user.lower() and \
            said in ((404, "errorinvaliduser"), (403, "erroraccessdenied"))

    def _refused_as(self, exc: PermanentFailure) -> PermanentFailure:
        """A 403 to sending as another address than the signed-in user's: one sentence
        naming the rights and the scope to grant; any other refusal as it is."""
        if getattr(exc, "status", None) != 403 or not self.sender or self.sender.lower() == self.user.lower():
            return exc
        who = self.user or "the signed-in user"
        said = f"403 {getattr(exc, 'code', '') or 'Forbidden'}"
        return PermanentFailure(
            f"{self.client.where} refused to let {who} send as {self.sender} ({said}): an Exchange admin must give "
            f"{who} Send As or Send on Behalf on {self.sender}, and the connection's OAuth2 credential needs the "
            "scope Mail.Send.Shared (or, app-only, the application permission Mail.Send)")

    def close(self) -> None:
        """Close the HTTP connections; never raises."""
        self.client.close()

    # -- a draft, its attachments, send ---------------------------------------------------

    def _send_draft(self, message: bytes, gate: Callable[[], None], delivery_key: str | None) -> bool:
        """Send ``message`` through a draft; False when an earlier attempt is found to have sent it."""
        draft, files = split_message(message, DRAFT_TARGET)
        if _b64(len(draft)) > REQUEST_LIMIT:
            signed = b"multipart/signed" in draft[:4096].lower() or b"pkcs7-mime" in draft[:4096].lower()
            raise PermanentFailure(
                f"the message is {_mb(len(message))}, more than Microsoft Graph takes in one request (4 MB in "
                f"base64), {'and an S/MIME message must go whole' if signed else 'even without its attachments'}: "
                "send it through an SMTP connection")
        for f in files:
            if len(f.content) > UPLOAD_MAX:
                raise PermanentFailure(f"the attachment {f.name} is {_mb(len(f.content))}, more than the 150 MB "
                                       "Microsoft Graph attaches: send it as a link, or through an SMTP connection")
        # Without the queue's key no earlier attempt can be told apart: the tag only finds
        # this attempt's own draft when the answer that names it is lost.
        key = draft_key(self.mailbox, delivery_key or secrets.token_hex(16))
        earlier = self._find_tagged(key) if delivery_key else []
        drafts = [m for m in earlier if m.get("isDraft", True)]
        if len(drafts) < len(earlier):
            # An earlier attempt's send went through, its answer lost: the draft left Drafts
            # for Sent Items. Sending again would send it twice.
            gate()
            for m in drafts:
                self._discard(self._target(m))
            return False
        # A draft still in Drafts was not sent. One that got all its attachments (marked
        # so before its send) is sent as it is, if it is this message: the connection's
        # From address or prefix may have changed since. Any other is deleted and made again.
        mark = _ready_mark(key, message)
        ready = next((m for m in drafts if _is_ready(m, mark)), None)
        stale = [m for m in drafts if m is not ready]
        for m in stale:
            self._discard(self._target(m))
        target = self._target(ready) if ready is not None else \
            self._create(_with_tag(draft, key), key, len(message), {str(m["id"]) for m in stale})
        try:
            if ready is None:
                for f in files:
                    self._attach(target, f, len(message))
                if delivery_key:
                    self._mark_ready(target, mark)
            gate()
        except BaseException:
            self._discard(target)
            raise
        doing = f"send the draft of a large message as {self.mailbox}"
        try:
            response = self.client.request("POST", f"{target}/send", doing=doing, resend=False)
        except TemporaryFailure as exc:
            if not exc.in_doubt:  # it never reached the server
                self._discard(target)
            raise
        self._doubt(response, doing)
        try:
            self._check(response, doing, (202,), len(message))
        except BaseException:
            self._discard(target)
            raise
        return True

    def _create(self, draft: bytes, key: str, size: int, stale: set[str]) -> str:
        """Save ``draft`` (tagged with ``key``) in Drafts; its path. When the answer is
        lost, the draft the server may have saved is found by its tag (not one of the
        ``stale`` drafts of earlier attempts) rather than saved twice."""
        doing = f"save a large message ({_mb(size)}) as a draft in mailbox {self.mailbox}"
        try:
            response = self.client.request("POST", f"{self.path}/messages", doing=doing, resend=False,
                                           content=base64.b64encode(draft), headers={"Content-Type": "text/plain"})
        except TemporaryFailure as exc:
            if not exc.in_doubt:
                raise
        else:
            if response.status_code not in (502, 504):  # a gateway's: the server behind it may have saved it
                return self._target(self._check(response, doing, (201,), size).json())
        found = [m for m in self._find_tagged(key) if m.get("isDraft", True) and str(m["id"]) not in stale]
        if not found:
            raise TemporaryFailure(f"{self.client.where} did not answer while {doing}, and saved no draft: "
                                   "it is tried again")
        for extra in found[1:]:
            self._discard(self._target(extra))
        return self._target(found[0])

    def _find_tagged(self, key: str) -> list[dict[str, Any]]:
        """The messages of the mailbox tagged with ``key`` (Graph's filter on a string
        extended property): an earlier attempt's draft, or its sent copy; each with its
        mark of readiness, if it has one."""
        doing = f"look for the draft of a large message in mailbox {self.mailbox}"
        where = f"singleValueExtendedProperties/Any(ep: ep/id eq '{TAG_PROPERTY}' and ep/value eq '{key}')"
        expand = f"singleValueExtendedProperties($filter=id eq '{READY_PROPERTY}')"
        # Spaces, colons and slashes percent-encoded, as Graph's documentation asks.
        found = self.client.call("GET", f"{self.path}/messages?$filter={_q(where)}&$expand={_q(expand)}"
                                 "&$select=id,isDraft&$top=50", doing=doing)
        return [m for m in (found or {}).get("value", []) if isinstance(m, dict) and m.get("id")]

    def _mark_ready(self, target: str, mark: str) -> None:
        """Mark the draft as holding every attachment of the message ``mark`` names, so
        that a later attempt at that same message may send it."""
        doing = f"mark the draft of a large message complete in mailbox {self.mailbox}"
        self.client.call("PATCH", target, doing=doing, json_body={
            "singleValueExtendedProperties": [{"id": READY_PROPERTY, "value": mark}]})

    def _target(self, message: dict[str, Any]) -> str:
        return f"{self.path}/messages/{quote(str(message['id']), safe='')}"

    def _attach(self, target: str, f: FilePart, size: int) -> None:
        """Add one attachment to the draft: POSTed whole, or uploaded in ranges."""
        doing = f"attach {f.name} ({_mb(len(f.content))}) to the draft of a large message in mailbox {self.mailbox}"
        item: dict[str, Any] = {"name": f.name, "contentType": f.content_type, "isInline": f.is_inline}
        if f.content_id:
            item["contentId"] = f.content_id
        if len(f.content) < UPLOAD_MIN:
            body = {"@odata.type": "#microsoft.graph.fileAttachment", **item,
                    "contentBytes": base64.b64encode(f.content).decode("ascii")}
            self._check(self.client.request("POST", f"{target}/attachments", doing=doing, json_body=body),
                        doing, (201,), size)
            return
        session = self._check(self.client.request(
            "POST", f"{target}/attachments/createUploadSession", doing=doing,
            json_body={"AttachmentItem": {"attachmentType": "file", **item, "size": len(f.content)}}),
            doing, (201,), size).json()
        url, start, total = str(session["uploadUrl"]), 0, len(f.content)
        for token in parse_qs(urlsplit(url).query).get("authtoken", []):
            remember_secret(token)  # the URL's own credential: never in a log
        while start < total:
            end = min(start + CHUNK, total) - 1
            response = self.client.request(
                "PUT", url, doing=doing, content=f.content[start:end + 1], pre_authenticated=True,
                headers={"Content-Type": "application/octet-stream", "Content-Range": f"bytes {start}-{end}/{total}"})
            if response.status_code == 201:
                return
            if response.status_code == 416:  # a range sent again after a lost answer: start over later
                raise TemporaryFailure(f"{self.client.where} lost its place in the upload while {doing} "
                                       f"({response.status_code}): it is tried again")
            following = _next_range(self._check(response, doing, (200,), size))
            if following is None or following <= start:
                raise TemporaryFailure(f"{self.client.where} did not take bytes {start}-{end} while {doing}: "
                                       "it is tried again")
            start = following
        raise TemporaryFailure(f"{self.client.where} took every byte but did not attach the file while {doing}: "
                               "it is tried again")

    def _discard(self, target: str) -> None:
        """Delete an unsent draft, best effort: a retry makes a new one."""
        try:
            self.client.request("DELETE", target, doing=f"delete an unsent draft in mailbox {self.mailbox}")
        except MailhostError:
            pass  # it stays in Drafts, unsent; the failure that brought us here is what matters

    # -- answers --------------------------------------------------------------------------

    def _doubt(self, response: httpx.Response, doing: str) -> None:
        """A gateway's 502 or 504 to the request that sends: the server behind it may have sent it."""
        if response.status_code in (502, 504):
            raise TemporaryFailure(f"{self.client.where} answered {response.status_code} {response.reason_phrase} "
                                   f"while {doing}: the request went out whole, so the server may have acted on it",
                                   in_doubt=True)

    def _check(self, response: httpx.Response, doing: str, ok: Sequence[int], size: int) -> httpx.Response:
        """``response`` if its status is one of ``ok``; else the error, with a refused token
        a TemporaryFailure and a message over the mailbox's limit said as such."""
        try:
            return self.client.check(response, doing, ok)
        except MailError as exc:
            if getattr(exc, "status", None) == 401:
                # The credential, not the message: like a failed sign-in, try again later.
                raise TemporaryFailure(str(exc)) from None
            if getattr(exc, "code", None) == "ErrorMessageSizeExceeded":
                raise PermanentFailure(
                    f"{self.client.where} refused the message ({_mb(size)} with its attachments) as larger than "
                    f"mailbox {self.mailbox} may send (ErrorMessageSizeExceeded; Exchange Online allows 35 MB by "
                    "default, up to 150 MB if an admin raises the mailbox's MaxSendSize): send fewer or smaller "
                    "attachments") from None
            raise

    def _sent(self, recipients: int) -> SendResult:
        sending_as = f" as {self.sender}" if self.sender and self.sender.lower() != self.mailbox.lower() else ""
        return SendResult(f"202 Accepted: {self.client.where} took the message for {recipients} "
                          f"recipient(s) from mailbox {self.mailbox}{sending_as}")


# ---------------------------------------------------------------------------------------
# The envelope
# ---------------------------------------------------------------------------------------


def with_envelope(raw: bytes, recipients: Sequence[str]) -> bytes:
    """``raw`` as Graph must get it so that exactly ``recipients`` receive it."""
    end = _END.search(raw)
    head = raw[: end.start()] if end else raw
    parsed = _HEADERS.parsebytes(head + b"\n\n")
    named = {a.lower() for _, a in getaddresses([str(v) for k in ("To", "Cc", "Bcc") for v in parsed.get_all(k, [])])
             if "@" in a}
    wanted = {r.strip().lower(): r.strip() for r in recipients if r.strip()}
    if not wanted:
        raise PermanentFailure("the message has no recipient")
    extra = [wanted[a] for a in wanted if a not in named]
    left_out = sorted(named - set(wanted))
    if left_out:
        raise PermanentFailure(
            f"Microsoft Graph sends to every To, Cc and Bcc of a MIME message, and this one names "
            f"{', '.join(left_out)}, whom it is not for (already delivered, or not asked): "
            "send it through an SMTP connection, or make its headers name only its recipients"
        )
    if not extra:
        return raw
    newline = b"\r\n" if b"\r\n" in head else b"\n"
    return b"Bcc: " + ", ".join(extra).encode("utf-8") + newline + raw


# ---------------------------------------------------------------------------------------
# The tag that finds a draft again
# ---------------------------------------------------------------------------------------


def draft_key(mailbox: str, delivery_key: str) -> str:
    """The tag of a draft in ``mailbox`` for the queued message ``delivery_key`` names
    (hashed: the tag goes out with the message)."""
    return hashlib.sha256(f"{mailbox.lower()}\0{delivery_key}".encode()).hexdigest()[:32]


def _ready_mark(key: str, message: bytes) -> str:
    """The mark of a complete draft tagged ``key`` that holds exactly ``message`` (the
    bytes the attempt sends: From, subject prefix and Bcc as the connection says now)."""
    return hashlib.sha256(key.encode("ascii") + b"\0" + message).hexdigest()[:32]


def _is_ready(message: dict[str, Any], mark: str) -> bool:
    """Whether a draft found by its tag bears the mark that it got every attachment of
    the message ``mark`` names."""
    return any(isinstance(p, dict) and str(p.get("id", "")).lower() == READY_PROPERTY.lower()
               and p.get("value") == mark for p in message.get("singleValueExtendedProperties") or [])


def _with_tag(draft: bytes, key: str) -> bytes:
    """``draft`` with the header that carries its tag on top."""
    newline = b"\r\n" if b"\r\n" in draft[:2000] else b"\n"
    return TAG_HEADER.encode("ascii") + b": " + key.encode("ascii") + newline + draft


# ---------------------------------------------------------------------------------------
# Taking the large attachments out of a MIME message
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FilePart:
    """An attachment taken out of a message, decoded, to be attached to its draft."""

    name: str
    content_type: str
    content: bytes
    is_inline: bool = False
    content_id: str | None = None


@dataclass(frozen=True)
class _Span:
    """A leaf part of a multipart: what removing it cuts out (its delimiter line
    included), the part itself, the multipart it is in and how many parts that has, and
    whether it shows in the body (inline) rather than in the list of attachments."""

    cut: tuple[int, int]
    part: tuple[int, int]
    parent: int
    siblings: int
    inline: bool


def split_message(raw: bytes, target: int) -> tuple[bytes, list[FilePart]]:
    """``raw`` without its largest attachments, taken out until the rest is at most
    ``target`` bytes in base64, and those attachments.

    Everything else stays byte for byte. Only leaf parts with a file name or a
    Content-ID are taken, never the last part of a multipart, nothing inside S/MIME
    (``multipart/signed``, ``application/pkcs7-mime``: the signature covers it whole).
    Exchange lists the attachments added to a draft after those of its MIME, so every
    attachment after the first one taken is taken too (in order): recipients find them
    in the original order.
    """
    spans = sorted(_attachments(raw), key=lambda s: s.cut[0] - s.cut[1])  # largest first
    left = {s.parent: s.siblings for s in spans}
    size, taken = len(raw), []
    for s in spans:
        if _b64(size) <= target:
            break
        if left[s.parent] > 1:  # a multipart keeps at least one part
            taken.append(s)
            left[s.parent] -= 1
            size -= s.cut[1] - s.cut[0]
    if taken:
        first = min(s.cut[0] for s in taken)
        for s in sorted(spans, key=lambda s: s.cut[0]):
            # Inline parts show where the body refers to them: their place in the list is no matter.
            if s.cut[0] > first and s not in taken and not s.inline and left[s.parent] > 1:
                taken.append(s)
                left[s.parent] -= 1
    rest, at = [], 0
    for s in sorted(taken, key=lambda s: s.cut[0]):
        rest.append(raw[at:s.cut[0]])
        at = s.cut[1]
    rest.append(raw[at:])
    return b"".join(rest), [_decoded(raw[s.part[0]:s.part[1]]) for s in sorted(taken, key=lambda s: s.cut[0])]


def _attachments(raw: bytes, start: int = 0, end: int | None = None) -> Iterator[_Span]:
    """The leaf parts with a file name or Content-ID in the entity ``raw[start:end]``."""
    end = len(raw) if end is None else end
    head, body = _head(raw, start, end)
    if head.get_content_maintype() != "multipart" or head.get_content_subtype() in ("signed", "encrypted"):
        return
    boundary = head.get_boundary()
    if not boundary:
        return
    delimiter = re.compile(rb"(?m)^--" + re.escape(boundary.encode("latin-1", "replace")) + rb"(--)?[ \t]*\r?$")
    marks = list(delimiter.finditer(raw, body, end))
    close = next((i for i, m in enumerate(marks) if m.group(1)), None)
    if close is None or close == 0:
        return  # malformed: leave it whole
    for i in range(close):
        part_start = _after_line(raw, marks[i].end())
        part_end = _line_start(raw, marks[i + 1].start())
        child, _ = _head(raw, part_start, part_end)
        if child.get_content_maintype() == "multipart":
            yield from _attachments(raw, part_start, part_end)
        elif child.get_filename() or child.get("Content-ID"):  # get_filename falls back to the name
            yield _Span((_line_start(raw, marks[i].start()), part_end), (part_start, part_end), start, close,
                        _inline(child))


def _head(raw: bytes, start: int, end: int) -> tuple[Any, int]:
    """The headers of the entity ``raw[start:end]`` and where its body starts."""
    if raw.startswith(b"\r\n", start) or raw.startswith(b"\n", start):  # no headers
        return _HEADERS.parsebytes(b"\n\n"), start + (2 if raw.startswith(b"\r\n", start) else 1)
    m = _END.search(raw, start, end)
    stop = m.start() if m else end
    return _HEADERS.parsebytes(raw[start:stop] + b"\n\n"), m.end() if m else end


def _after_line(raw: bytes, at: int) -> int:
    """Past the line break at ``at``."""
    return at + (2 if raw.startswith(b"\r\n", at) else 1 if raw.startswith(b"\n", at) else 0)


def _line_start(raw: bytes, at: int) -> int:
    """Where the line break before ``at`` starts (it belongs to the delimiter that follows)."""
    if raw[at - 2:at] == b"\r\n":
        return at - 2
    return at - 1 if raw[at - 1:at] == b"\n" else at


def _inline(msg: Any) -> bool:
    """Whether a part shows in the body: said inline, or a Content-ID without a disposition."""
    disposition = msg.get_content_disposition()
    return disposition == "inline" or (disposition is None and msg.get("Content-ID") is not None)


def _decoded(part: bytes) -> FilePart:
    msg = email.message_from_bytes(part, policy=email.policy.default)
    ctype = msg.get_content_type()
    cid = str(msg.get("Content-ID") or "").strip().strip("<>") or None
    name = msg.get_filename()
    if not name:
        name = (cid or "attachment").split("@")[0] + (mimetypes.guess_extension(ctype) or "")
    content = msg.get_payload(decode=True)
    return FilePart(name, ctype, content if isinstance(content, bytes) else b"", _inline(msg), cid)


def _next_range(response: httpx.Response) -> int | None:
    """The first byte the upload session expects next (``nextExpectedRanges: ["N"]``)."""
    try:
        return int(str(response.json()["nextExpectedRanges"][0]).split("-")[0])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def _q(text: str) -> str:
    """``text`` for a URL's query, percent-encoded but for quotes and parentheses."""
    return quote(text, safe="'()")


def _b64(size: int) -> int:
    return 4 * -(-size // 3)


def _mb(size: int) -> str:
    return f"{size / 1_000_000:.1f} MB"


def _once(action: Callable[[], None] | None) -> Callable[[], None]:
    """``action`` to be called at most once (a sendMail refused as too large falls back to a draft)."""
    done = False

    def run() -> None:
        nonlocal done
        if action is not None and not done:
            done = True
            action()

    return run
