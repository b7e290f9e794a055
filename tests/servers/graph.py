"""A local stand-in for Microsoft Graph v1.0 mail: HTTPS on 127.0.0.1, a free port.

No real Graph is reachable from the tests, so this server plays the part of the mail
endpoints, following Microsoft's documentation (Microsoft Learn, /graph/...):

* message delta, and "Get incremental changes to messages in a folder"
  (``/graph/api/message-delta``, ``/graph/delta-query-messages``):
  ``GET /users/{id}/mailFolders/{id}/messages/delta``; ``Prefer: odata.maxpagesize=N``
  (default 10 per page); ``@odata.nextLink`` with a ``$skiptoken`` until the last page,
  which carries ``@odata.deltaLink`` with a ``$deltatoken``; query options of the first
  request (``$select``, ``$expand``, ``changeType=created|updated|deleted``) are encoded
  into the tokens; removed messages come as ``{"id": ..., "@removed": {"reason":
  "deleted"}}``; a page never carries both links.
* delta token expiry (``/graph/delta-query-overview``, "Synchronization reset"):
  ``410 Gone`` with a ``Location`` header holding the initial request, error code
  ``SyncStateNotFound``; :meth:`GraphServer.expire_delta_tokens` injects it.
* get MIME content (``/graph/outlook-get-mime-message``, ``/graph/api/message-get``):
  ``GET /users/{id}/messages/{id}/$value`` returns the MIME bytes.
* list messages (``/graph/api/user-list-messages``): ``GET /users/{id}/messages`` (every
  folder but the hidden ones) or ``.../mailFolders/{id}/messages``, ``$top``/``$skip``;
  ``$filter`` takes only the documented filter on a string extended property
  (``/graph/api/singlevaluelegacyextendedproperty-get``):
  ``singleValueExtendedProperties/Any(ep: ep/id eq '{id}' and ep/value eq '{value}')``,
  the Name in the id compared case-sensitively, the value case-insensitively; the
  properties it knows are the custom ``X-`` headers of a message's MIME, which a MIME
  reader keeps in PS_INTERNET_HEADERS (``String {00020386-0000-0000-C000-000000000046}
  Name X-...``, [MS-OXCMAIL] 2.2.3.2.29). Request kind ``list``.
* update message (``/graph/api/message-update``): ``PATCH`` with ``{"isRead": true}``,
  ``200`` and the message; ``{"singleValueExtendedProperties": [{"id": ..., "value":
  ...}]}`` sets extended properties ("Create single-value extended property" in an
  existing message), which ``$filter`` finds and
  ``$expand=singleValueExtendedProperties($filter=id eq '{id}')`` shows, on the
  messages that have it.
* delete message (``/graph/api/message-delete``): ``DELETE``, ``204``; like Exchange the
  item goes to the hidden Recoverable Items "Deletions" folder, not to Deleted Items.
* move message (``/graph/api/message-move``): ``POST .../move {"destinationId": ...}``
  (a folder id or a well-known name), ``201`` and the moved message, which has a new id
  unless the client asked for immutable ids (``Prefer: IdType="ImmutableId"``,
  ``/graph/outlook-immutable-id``).
* mail folders (``/graph/api/mailfolder-get``, ``user-list-mailfolders``,
  ``mailfolder-list-childfolders``, ``user-post-mailfolders``,
  ``mailfolder-post-childfolders``): well-known names (``inbox``, ``deleteditems``, ...),
  ``$filter=displayName eq '...'``, ``totalItemCount`` / ``unreadItemCount``; creating
  an existing name is ``409 ErrorFolderExists``.
* send mail in MIME format (``/graph/api/user-sendmail``, "Example 4: Send a new message
  using MIME format"): ``POST /users/{id}/sendMail`` with ``Content-Type: text/plain`` and
  the base64 MIME as body; ``202 Accepted``; malformed base64 is ``400
  ErrorMimeContentInvalidBase64String``; a copy lands in Sent Items. What was sent is kept
  in :attr:`GraphServer.sent`.
* drafts, attachments and upload sessions (``/graph/api/user-post-messages``,
  ``message-post-attachments``, ``attachment-createuploadsession``, ``message-send``,
  ``/graph/outlook-large-attachments``): ``POST /users/{id}/messages`` with base64 MIME
  creates a draft in Drafts (``201``, ``isDraft``); ``POST .../messages/{id}/attachments``
  with a ``#microsoft.graph.fileAttachment`` (``contentBytes``) adds one (``201``);
  ``POST .../attachments/createUploadSession`` with an ``AttachmentItem`` (``file``, name,
  size, ``isInline``, ``contentId``) is ``201`` and an uploadSession (``uploadUrl``,
  ``expirationDateTime``, ``nextExpectedRanges: ["0-"]``); files under 3 MB are ``400
  ErrorAttachmentSizeShouldNotBeLessThanMinimumSize``. The upload URL is pre-authenticated
  (``/api/v2.0/Users('...')/Messages('...')/AttachmentSessions('...')?authtoken=...``, on
  this server where Graph's is on outlook.office.com): ``PUT`` with ``Content-Range: bytes
  {start}-{end}/{total}`` in order, ``200`` with ``nextExpectedRanges: ["{next}"]``, the last
  range ``201`` with a ``Location``; a range that is not the next one is ``416
  invalidRange``; ``DELETE`` cancels (``204``); the stand-in refuses an ``Authorization``
  header there (Microsoft: do not send one), so a client that would hand its token on is
  caught. ``POST .../messages/{id}/send`` is ``202``: the draft with its attachments goes
  out (kept in :attr:`GraphServer.sent`, whose :attr:`SentMail.attachments` decode what the
  recipients find) and moves to Sent Items. A message over ``max_message_bytes`` (Exchange
  Online's default 35 MB) is ``400 ErrorMessageSizeExceeded`` ("The message exceeds the
  maximum supported size.", as reported in microsoftgraph/microsoft-graph-docs#15579).
  Upload ``PUT``s are the request kind ``upload`` for :meth:`GraphServer.throttle`,
  :meth:`~GraphServer.fail` and :meth:`~GraphServer.drop`.
* request size (``/graph/use-the-api``, ``/graph/errors``; the body as Graph sends it is
  reported in microsoftgraph/microsoft-graph-docs#85 and #11805): any request whose body
  is over ``max_request_bytes`` (4 MB) is ``413`` with ``{"error": {"code": "BadRequest",
  "message": "The maximum request length supported is 4MB."}}``, whatever it asks.
* JSON batching (``/graph/json-batching``): ``POST /$batch`` with up to 20 requests, ids
  unique, ``dependsOn`` (a failed dependency is ``424``); each response has ``id``,
  ``status``, ``headers``, ``body`` (a JSON body as JSON, other content such as the MIME
  of ``$value`` base64-encoded); requests are throttled individually; each request has its
  own headers.
* throttling (``/graph/throttling``, ``/graph/throttling-limits`` "Outlook service
  limits"): ``429 TooManyRequests`` with ``Retry-After``; at most 4 concurrent requests
  per app and mailbox (``429 ApplicationThrottled``, "Application is over its
  MailboxConcurrency limit."). :meth:`GraphServer.throttle` injects 429 or 503 on every
  Nth request or as a burst. Retry-After is sent in (possibly fractional) seconds so that
  tests stay fast. :meth:`GraphServer.drop` serves the next requests of a kind and closes
  the connection instead of answering (the client cannot know they were served).
* errors (``/graph/errors``): ``{"error": {"code": ..., "message": ...}}``; a missing,
  malformed or expired token is ``401 InvalidAuthenticationToken`` with
  ``WWW-Authenticate: Bearer``; missing rights are ``403 ErrorAccessDenied`` (sending as
  another mailbox without the right: ``403 ErrorSendAsDenied``).
* shared mailboxes (``/graph/outlook-share-messages-folders``, permissions reference):
  a delegated token reaches another mailbox only with ``Mail.*.Shared`` scopes and the
  mailbox permission (:meth:`GraphServer.grant`); app-only tokens (``roles``) reach every
  mailbox.
* sending from another user, a shared mailbox or a group ("Send Outlook messages from
  another user", ``/graph/outlook-send-mail-from-other-user``): with a delegated token,
  the ``From`` of the message may name another mailbox when the signed-in user has Send
  As or Send on Behalf on it (:meth:`GraphServer.grant`) and the token ``Mail.Send.Shared``;
  else ``403 ErrorSendAsDenied``. Sent through ``/users/{that mailbox}`` rather than the
  user's own, the user needs Full Access on it "in addition to either the Send on Behalf
  or Send As permission" (the stand-in answers ``403 ErrorAccessDenied`` without it), and
  the copy goes to that mailbox's Sent Items, else to the user's. ``/users/{id |
  userPrincipalName}`` takes a mailbox's id or address only: another of its addresses (a
  proxy address, :meth:`GraphServer.add_user`'s ``aliases``) is ``404 ErrorInvalidUser``,
  while a ``From`` naming it is the owner's own address (the stand-in keeps it as written,
  as Exchange does with the organization's SendFromAliasEnabled on; with it off, Exchange
  rewrites it to the primary address).

Tokens: by default the server issues its own JWT-shaped access tokens
(:meth:`GraphServer.issue_token`, HMAC-signed, with ``aud``, ``exp``, ``scp`` or
``roles``, ``upn``) and checks them. Give ``verify=`` to check tokens another way, for
example by RFC 7662 introspection against the test identity provider
(:func:`introspection_verifier`).

Fault injection and instruments: :meth:`GraphServer.throttle`, :meth:`~GraphServer.fail`
(the next requests of a kind get an error), :meth:`~GraphServer.expire_delta_tokens`,
:meth:`~GraphServer.purge_message`; ``latency`` and ``service_time`` for benchmarks;
:attr:`~GraphServer.stats` (requests served by kind) and
:attr:`~GraphServer.max_inflight`. :func:`wire_access_token` and
:func:`add_oauth_credential` let the host's pipelines sign in with these tokens, without
an identity provider; the host's own path (a credential authorized at
:mod:`tests.servers.idp`, its tokens checked here by :func:`introspection_verifier`) is
what ``tests/test_e2e_graph_cli.py`` drives through the command line.

Usage::

    with GraphServer(pki) as graph:
        graph.add_user("alice@contoso.com")
        graph.deliver("alice@contoso.com", raw)
        token = graph.issue_token("alice@contoso.com", scopes=("Mail.ReadWrite", "Mail.Send"))
        # https://127.0.0.1:{graph.port}/v1.0/users/alice@contoso.com/mailFolders/inbox/messages/delta
"""
from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import dataclasses
import datetime as dt
import email
import email.message
import email.parser
import email.policy
import email.utils
import hashlib
import hmac
import itertools
import json
import re
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from .certs import Pki, server_ssl_context

__all__ = [
    "AUDIENCE",
    "Attachment",
    "GraphServer",
    "Principal",
    "SentMail",
    "StoredMessage",
    "add_oauth_credential",
    "graph_server",
    "introspection_verifier",
    "received_attachments",
    "wire_access_token",
]

AUDIENCE = "https://graph.microsoft.com"
GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"
WELL_KNOWN = ("inbox", "drafts", "sentitems", "deleteditems", "junkemail", "archive", "outbox")
_DISPLAY = {
    "inbox": "Inbox", "drafts": "Drafts", "sentitems": "Sent Items", "deleteditems": "Deleted Items",
    "junkemail": "Junk Email", "archive": "Archive", "outbox": "Outbox",
}
_MAX_BATCH = 20
_SIZE_PROPERTY = "Integer 0xe08"  # PidTagMessageSize, as Graph echoes it
_MIN_UPLOAD = 3_000_000  # "between 3 MB and 150 MB": smaller files are POSTed (decimal MB: an assumption)
_MAX_ATTACHMENT = 150 * 1024 * 1024
_TENANT = "test-tenant"
_HEADERS = email.parser.BytesHeaderParser(policy=email.policy.compat32)
#: PS_INTERNET_HEADERS: a MIME reader keeps each custom header as a string property named
#: after it in this set ([MS-OXCMAIL] 2.2.3.2.29), which Graph reaches as
#: ``String {00020386-0000-0000-C000-000000000046} Name X-Header``.
_INTERNET_HEADERS = "{00020386-0000-0000-c000-000000000046}"
#: ``$expand=singleValueExtendedProperties($filter=id eq '...')`` and ``$filter=
#: singleValueExtendedProperties/Any(ep: ep/id eq '...' and ep/value eq '...')``, as
#: documented for string properties (``/graph/api/singlevaluelegacyextendedproperty-get``).
_EXPAND_PROPERTY = re.compile(r"\s*singleValueExtendedProperties\(\$filter=id\s+eq\s+'((?:[^']|'')*)'\)\s*")
_PROPERTY_FILTER = re.compile(r"\s*singleValueExtendedProperties/Any\((\w+):\s*\1/id\s+eq\s+'((?:[^']|'')*)'\s+and\s+"
                              r"\1/value\s+eq\s+'((?:[^']|'')*)'\)\s*")


# ---------------------------------------------------------------------------------------
# The directory: who calls, which mailboxes exist
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Principal:
    """Who a token speaks for: a signed-in user (delegated ``scp``) or an app (``roles``)."""

    user: str | None  # the user's address (lower case); None for an app-only token
    scopes: frozenset[str]
    app_id: str = "test-app"

    @property
    def app_only(self) -> bool:
        return self.user is None

    @classmethod
    def from_claims(cls, claims: Mapping[str, Any],
                    default_roles: Iterable[str] = ("Mail.ReadWrite", "Mail.Send")) -> Principal:
        """From Microsoft-shaped access-token claims, or RFC 7662 introspection claims.

        ``roles``, or a ``.default`` scope (the client-credentials grant, standing for
        the application permissions ``default_roles`` an admin consented to), make an
        app-only token; otherwise ``scp`` (or ``scope``) with the user's name
        (``upn``, ``preferred_username``, ``username``) a delegated one. Scopes may carry
        their resource (``https://graph.microsoft.com/Mail.Send``).
        """
        app = str(claims.get("appid") or claims.get("azp") or claims.get("client_id") or "test-app")
        roles = claims.get("roles")
        if roles:
            return cls(None, frozenset(roles.split() if isinstance(roles, str) else roles), app)
        raw = str(claims.get("scp") or claims.get("scope") or "").split()
        if any(s.endswith("/.default") or s == ".default" for s in raw):
            return cls(None, frozenset(default_roles), app)
        scopes = frozenset(s.rsplit("/", 1)[-1] for s in raw)
        user = claims.get("upn") or claims.get("preferred_username") or claims.get("unique_name") \
            or claims.get("username")
        if user is not None and str(user) == app:  # introspection names an app-only token by its client
            return cls(None, scopes, app)
        return cls(str(user).lower() if user else None, scopes, app)


@dataclass
class Folder:
    id: str
    display_name: str
    parent_id: str | None
    well_known: str | None = None
    hidden: bool = False
    removed: list[tuple[int, int, str, str]] = field(default_factory=list)  # (seq, added_seq, immutable, rest)


@dataclass
class StoredMessage:
    """A message in a mailbox of the stand-in."""

    immutable_id: str
    rest_id: str
    raw: bytes
    folder_id: str
    is_read: bool
    received: dt.datetime
    added_seq: int  # when it came into its current folder
    updated_seq: int
    version: int = 1
    subject: str = ""
    sender: str = ""
    to: tuple[str, ...] = ()
    internet_message_id: str = ""
    is_draft: bool = False
    attachments: list[Attachment] = field(default_factory=list)  # added with the API, not in ``raw``
    properties: dict[str, str] = field(default_factory=dict)  # extended properties set with the API, by id

    @property
    def size(self) -> int:
        return len(self.raw) + sum(len(a.content) for a in self.attachments)


@dataclass(frozen=True)
class Attachment:
    """A file attachment: one added to a draft with the API, or one a sent message carries."""

    id: str
    name: str
    content_type: str
    content: bytes
    is_inline: bool = False
    content_id: str | None = None


@dataclass
class _Upload:
    """An attachment upload session (``createUploadSession``) and the bytes it has so far."""

    id: str
    token: str
    mailbox: str
    message: str  # the draft's immutable id
    item: Attachment  # what the AttachmentItem announced (content empty)
    size: int
    expires: dt.datetime
    received: bytearray = field(default_factory=bytearray)


@dataclass
class Mailbox:
    id: str
    address: str
    display_name: str
    shared: bool
    folders: dict[str, Folder] = field(default_factory=dict)
    messages: dict[str, StoredMessage] = field(default_factory=dict)  # by immutable id
    rest: dict[str, str] = field(default_factory=dict)  # rest id -> immutable id (also old ids)
    full_access: set[str] = field(default_factory=set)  # users with FullAccess
    send_as: set[str] = field(default_factory=set)  # users with SendAs
    send_on_behalf: set[str] = field(default_factory=set)  # users with Send on Behalf
    aliases: set[str] = field(default_factory=set)  # its other (proxy) addresses, lower case

    def well_known(self, name: str) -> Folder:
        return next(f for f in self.folders.values() if f.well_known == name)


@dataclass(frozen=True)
class SentMail:
    """One sendMail the server accepted."""

    mailbox: str  # the mailbox in the URL
    caller: str  # the user of a delegated token, or "app:<id>"
    raw: bytes | None  # the MIME as sent (with its Bcc); None for a JSON send
    recipients: tuple[str, ...]  # To, Cc and Bcc of the MIME, lower case
    json: Mapping[str, Any] | None = None

    @property
    def attachments(self) -> list[Attachment]:
        """What the recipients find attached: every part with a file name or a Content-ID,
        decoded (ids are empty)."""
        return received_attachments(self.raw or b"")


@dataclass
class _Round:
    """A delta round in progress: a snapshot of changes paged out by skip tokens."""

    mailbox: str
    folder_id: str
    items: list[tuple[str, StoredMessage | tuple[str, str]]]  # ("msg", m) or ("removed", (imm, rest))
    end_seq: int
    options: dict[str, str]


@dataclass
class _DeltaState:
    mailbox: str
    folder_id: str
    seq: int
    options: dict[str, str]
    generation: int


class GraphError(Exception):
    """An error response: status, Graph error code, message, extra headers."""

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = dict(headers or {})


@dataclass
class _Request:
    method: str
    path: str
    query: dict[str, str]
    headers: Mapping[str, str]  # lower-case names
    body: bytes
    principal: Principal | None = None

    def prefer(self) -> dict[str, str]:
        """Prefer header preferences, lower-case names, quotes stripped."""
        out: dict[str, str] = {}
        for part in self.headers.get("prefer", "").split(","):
            name, _, value = part.strip().partition("=")
            if name:
                out[name.strip().lower()] = value.strip().strip('"')
        return out

    @property
    def immutable(self) -> bool:
        return self.prefer().get("idtype", "").lower() == "immutableid"


@dataclass
class _Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False  # close the connection instead of sending it

    @classmethod
    def json(cls, status: int, obj: Any, headers: Mapping[str, str] | None = None) -> _Response:
        return cls(status, json.dumps(obj).encode(), "application/json; odata.metadata=minimal", dict(headers or {}))


# ---------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------


class GraphServer:
    """Microsoft Graph v1.0 mail endpoints over HTTPS on 127.0.0.1 (see the module doc).

    ``max_page_size`` caps ``Prefer: odata.maxpagesize`` (a server may always send fewer);
    ``latency`` delays each HTTP request (a network round trip, for benchmarks) and
    ``service_time`` each request served (the mailbox server's work; the requests of a
    batch four at a time, as Graph dispatches them);
    ``retry_after`` is what 429/503 responses ask for, in seconds; ``max_request_bytes``
    is Graph's request limit (4 MB) and ``max_message_bytes`` the mailbox's maximum
    message size (Exchange Online's default, 35 MB); ``verify(token)`` returns the
    :class:`Principal` of a valid token or ``None``.
    """

    def __init__(
        self,
        pki: Pki,
        *,
        max_page_size: int = 1000,
        default_page_size: int = 10,
        latency: float = 0.0,
        service_time: float = 0.0,
        retry_after: float = 0.05,
        mailbox_concurrency: int = 4,
        max_request_bytes: int = 4 * 1024 * 1024,
        max_message_bytes: int = 35 * 1024 * 1024,
        verify: Callable[[str], Principal | None] | None = None,
    ) -> None:
        self.pki = pki
        self.max_page_size = max_page_size
        self.default_page_size = default_page_size
        self.latency = latency
        self.service_time = service_time
        self.retry_after = retry_after
        self.mailbox_concurrency = mailbox_concurrency
        self.max_request_bytes = max_request_bytes
        self.max_message_bytes = max_message_bytes
        self._uploads: dict[str, _Upload] = {}
        self._verify = verify
        self._secret = secrets.token_bytes(32)
        self._lock = threading.RLock()
        self._seq = itertools.count(1)
        self._last_seq = 0
        self.mailboxes: dict[str, Mailbox] = {}  # by lower-case address
        self._rounds: dict[str, tuple[_Round, int]] = {}  # skip token -> (round, position)
        self._deltas: dict[str, _DeltaState] = {}
        self._generation = 0
        self.sent: list[SentMail] = []
        #: Requests served, by kind: "delta", "value", "patch", "delete", "move", "batch", ...
        self.stats: collections.Counter[str] = collections.Counter()
        self._throttle: dict[str, Any] = {}
        self._failures: dict[str, list[Any]] = {}
        self._drops: collections.Counter[str] = collections.Counter()
        self._requests = 0
        self._inflight: collections.Counter[str] = collections.Counter()
        self._inflight_lock = threading.Lock()
        self.max_inflight: collections.Counter[str] = collections.Counter()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> GraphServer:
        """Listen on 127.0.0.1 and a free port, serving in a background thread."""
        context = server_ssl_context(self.pki.cert_file, self.pki.key_file)
        owner = self

        class Handler(_Handler):
            server_owner = owner
            tls = context

        httpd = _Quiet(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = True
        httpd.block_on_close = False
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="graph-stand-in", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening (open connections die with their threads)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    close = stop

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "the server is not started"
        return self._httpd.server_address[1]

    host = "127.0.0.1"

    @property
    def ca_file(self) -> str:
        return self.pki.ca_file

    @property
    def base_url(self) -> str:
        return f"https://{self.host}:{self.port}/v1.0"

    # -- the directory ------------------------------------------------------------------

    def add_user(self, address: str, display_name: str | None = None, aliases: Iterable[str] = ()) -> Mailbox:
        """A user with a mailbox, and ``aliases``: other addresses of it (proxy addresses),
        which mail may come from but ``/users/{...}`` does not take."""
        box = self._add_mailbox(address, display_name, shared=False)
        box.aliases.update(a.lower() for a in aliases)
        return box

    def add_shared_mailbox(self, address: str, display_name: str | None = None) -> Mailbox:
        """A shared mailbox (no sign-in of its own)."""
        return self._add_mailbox(address, display_name, shared=True)

    def grant(self, mailbox: str, user: str, *, full_access: bool = True, send_as: bool = False,
              send_on_behalf: bool = False) -> None:
        """Give ``user`` FullAccess (read and change its mail), SendAs and/or Send on Behalf on ``mailbox``."""
        with self._lock:
            box = self._mailbox(mailbox)
            if full_access:
                box.full_access.add(user.lower())
            if send_as:
                box.send_as.add(user.lower())
            if send_on_behalf:
                box.send_on_behalf.add(user.lower())

    def _add_mailbox(self, address: str, display_name: str | None, shared: bool) -> Mailbox:
        with self._lock:
            box = Mailbox(str(uuid.uuid4()), address.lower(), display_name or address.split("@")[0], shared)
            root = Folder(_new_id("root"), "Top of Information Store", None, "msgfolderroot")
            box.folders[root.id] = root
            for name in WELL_KNOWN:
                f = Folder(_new_id(name), _DISPLAY[name], root.id, name)
                box.folders[f.id] = f
            rec_root = Folder(_new_id("recroot"), "Recoverable Items", None, "recoverableitemsroot", hidden=True)
            rec = Folder(_new_id("recdel"), "Deletions", rec_root.id, "recoverableitemsdeletions", hidden=True)
            box.folders[rec_root.id] = rec_root
            box.folders[rec.id] = rec
            self.mailboxes[box.address] = box
            return box

    # -- tokens -------------------------------------------------------------------------

    def issue_token(
        self,
        user: str | None,
        *,
        scopes: Iterable[str] = ("Mail.ReadWrite", "Mail.Send"),
        expires_in: float = 3600,
        app_id: str = "test-app",
    ) -> str:
        """A JWT-shaped access token for Graph: delegated for ``user`` (``scp``), or
        app-only when ``user`` is None (``roles``)."""
        now = int(time.time())
        claims: dict[str, Any] = {"aud": AUDIENCE, "iss": "https://sts.windows.net/test-tenant/",
                                  "iat": now, "nbf": now, "exp": now + expires_in, "appid": app_id,
                                  "tid": "test-tenant", "uti": secrets.token_hex(8)}
        if user is None:
            claims["roles"] = list(scopes)
        else:
            claims.update(scp=" ".join(scopes), upn=user, preferred_username=user, oid=str(uuid.uuid4()))
        head = _b64url(json.dumps({"typ": "JWT", "alg": "HS256"}).encode())
        body = _b64url(json.dumps(claims).encode())
        sig = _b64url(hmac.new(self._secret, f"{head}.{body}".encode(), hashlib.sha256).digest())
        return f"{head}.{body}.{sig}"

    def _principal(self, token: str) -> Principal:
        if self._verify is not None:
            found = self._verify(token)
            if found is None:
                raise _unauthorized("Access token validation failure. Invalid audience or token.")
            return found
        try:
            head, body, sig = token.split(".")
            expected = _b64url(hmac.new(self._secret, f"{head}.{body}".encode(), hashlib.sha256).digest())
            claims = json.loads(_unb64url(body))
        except (ValueError, binascii.Error):
            raise _unauthorized("IDX14100: JWT is not well formed.") from None
        if not hmac.compare_digest(sig, expected):
            raise _unauthorized("Access token validation failure. Invalid signature.")
        if claims.get("aud") not in (AUDIENCE, GRAPH_APP_ID):
            raise _unauthorized("Access token validation failure. Invalid audience.")
        if float(claims.get("exp", 0)) <= time.time():
            raise _unauthorized("Lifetime validation failed, the token is expired.")
        return Principal.from_claims(claims)

    # -- mail ---------------------------------------------------------------------------

    def deliver(self, mailbox: str, raw: bytes, folder: str = "inbox", *, is_read: bool = False) -> str:
        """Put a message into a folder (a well-known name or a path); returns its immutable id."""
        return self.deliver_many(mailbox, [raw], folder, is_read=is_read)[0]

    def deliver_many(self, mailbox: str, raws: Iterable[bytes], folder: str = "inbox", *,
                     is_read: bool = False) -> list[str]:
        """Put messages into a folder in this order; returns their immutable ids."""
        with self._lock:
            box = self._mailbox(mailbox)
            target = self._folder_by_path(box, folder)
            ids = []
            for raw in raws:
                seq = self._next_seq()
                head = _HEADERS.parsebytes(raw)
                imm = _new_id("imm")
                m = StoredMessage(
                    immutable_id=imm, rest_id=_new_id("msg"), raw=bytes(raw), folder_id=target.id,
                    is_read=is_read, received=dt.datetime.now(dt.UTC), added_seq=seq, updated_seq=seq,
                    subject=str(head.get("Subject", "")), sender=str(head.get("From", "")),
                    to=tuple(a for _, a in email.utils.getaddresses(head.get_all("To", [])) if a),
                    internet_message_id=str(head.get("Message-ID", "")).strip(),
                )
                box.messages[imm] = m
                box.rest[m.rest_id] = imm
                ids.append(imm)
            return ids

    def messages(self, mailbox: str, folder: str = "inbox") -> list[StoredMessage]:
        """The messages now in a folder (well-known name or path), oldest first."""
        with self._lock:
            box = self._mailbox(mailbox)
            target = self._folder_by_path(box, folder)
            return sorted((m for m in box.messages.values() if m.folder_id == target.id), key=lambda m: m.added_seq)

    def folder_exists(self, mailbox: str, path: str) -> bool:
        with self._lock:
            try:
                self._folder_by_path(self._mailbox(mailbox), path)
                return True
            except GraphError:
                return False

    def create_folder(self, mailbox: str, path: str) -> str:
        """Create ``Parent/Child`` (parents too); returns the folder id."""
        with self._lock:
            box = self._mailbox(mailbox)
            parent = box.well_known("msgfolderroot")
            for part in path.split("/"):
                found = self._child(box, parent.id, part)
                if found is None:
                    found = Folder(_new_id("fld"), part, parent.id)
                    box.folders[found.id] = found
                parent = found
            return parent.id

    def move_message(self, mailbox: str, immutable_id: str, folder: str) -> None:
        """Move a message as a user would (for tests)."""
        with self._lock:
            box = self._mailbox(mailbox)
            self._move(box, box.messages[immutable_id], self._folder_by_path(box, folder))

    def purge_message(self, mailbox: str, immutable_id: str) -> None:
        """Remove a message for good (as ``permanentDelete`` does): no id opens it any more."""
        with self._lock:
            box = self._mailbox(mailbox)
            m = box.messages.pop(immutable_id)
            box.folders[m.folder_id].removed.append((self._next_seq(), m.added_seq, m.immutable_id, m.rest_id))

    # -- faults -------------------------------------------------------------------------

    def throttle(self, *, every: int | None = None, burst: int = 0, status: int = 429,
                 retry_after: float | None = None, kinds: Iterable[str] | None = None) -> None:
        """Answer ``status`` (429 or 503) with Retry-After to every ``every``-th request,
        and/or to the next ``burst`` requests; ``kinds`` limits it to those request kinds
        (see :attr:`stats`). ``throttle()`` with no arguments stops it."""
        with self._lock:
            self._throttle = {"every": every, "burst": burst, "status": status,
                              "retry_after": self.retry_after if retry_after is None else retry_after,
                              "kinds": set(kinds) if kinds else None, "count": 0}

    def fail(self, kind: str, status: int, code: str, message: str, *, count: int = 1,
             headers: Mapping[str, str] | None = None) -> None:
        """The next ``count`` requests of ``kind`` (see :attr:`stats`) get this error."""
        with self._lock:
            self._failures[kind] = [count, GraphError(status, code, message, headers)]

    def drop(self, kind: str, count: int = 1) -> None:
        """Serve the next ``count`` requests of ``kind`` but close the connection instead of answering."""
        with self._lock:
            self._drops[kind] += count

    def expire_delta_tokens(self) -> None:
        """Every delta and skip token issued so far becomes invalid: 410 Gone."""
        with self._lock:
            self._generation += 1
            self._rounds.clear()

    # -- request handling ---------------------------------------------------------------

    def handle(self, req: _Request, *, in_batch: bool = False) -> _Response:
        """Answer one request (a top-level one, or one inside ``$batch``)."""
        try:
            segments = [unquote(s) for s in req.path.split("/") if s]
            if not in_batch and len(req.body) > self.max_request_bytes:
                # Graph's front door refuses any request over 4 MB before it looks further.
                raise GraphError(413, "BadRequest", "The maximum request length supported is "
                                 f"{self.max_request_bytes / 2**20:g}MB.")
            if segments[:2] == ["api", "v2.0"] and not in_batch:
                return self._upload(req, segments[2:])
            if not segments or segments[0] != "v1.0":
                raise GraphError(400, "BadRequest", f"Invalid version: {segments[0] if segments else ''}")
            segments = segments[1:]
            if not in_batch:
                auth = req.headers.get("authorization", "")
                if not auth.lower().startswith("bearer ") or not auth[7:].strip():
                    raise _unauthorized("Access token is empty.")
                req.principal = self._principal(auth[7:].strip())
            if segments == ["$batch"] and req.method == "POST":
                if in_batch:
                    raise GraphError(400, "BadRequest", "A batch cannot contain a batch.")
                with self._lock:
                    self.stats["batch"] += 1
                return self._batch(req)
            kind = _kind(req.method, segments)
            self._maybe_throttle(kind)
            with self._mailbox_slot(req, segments):
                with self._lock:
                    self.stats[kind] += 1
                    response = self._route(req, segments)
                    if self._drops[kind] > 0 and not in_batch:
                        self._drops[kind] -= 1
                        response.drop = True
                if self.service_time and not in_batch:
                    time.sleep(self.service_time)
                return response
        except GraphError as err:
            body = {"error": {"code": err.code, "message": err.message,
                              "innerError": {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S"),
                                             "request-id": str(uuid.uuid4()),
                                             "client-request-id": req.headers.get("client-request-id", str(uuid.uuid4()))}}}
            return _Response.json(err.status, body, err.headers)

    def _maybe_throttle(self, kind: str) -> None:
        with self._lock:
            t = self._throttle
            self._requests += 1
            failure = self._failures.get(kind)
            if failure is not None and failure[0] > 0:
                failure[0] -= 1
                raise failure[1]
            if not t or (t["kinds"] is not None and kind not in t["kinds"]):
                return
            t["count"] += 1
            hit = False
            if t["burst"] > 0:
                t["burst"] -= 1
                hit = True
            elif t["every"] and t["count"] % t["every"] == 0:
                hit = True
            if not hit:
                return
            self.stats["throttled"] += 1
            retry = _seconds(t["retry_after"])
        if t["status"] == 503:
            raise GraphError(503, "ServiceUnavailable", "Service is unavailable. Please retry later.",
                             {"Retry-After": retry})
        raise GraphError(429, "TooManyRequests", "Too many requests. Please retry again later.", {"Retry-After": retry})

    @contextlib.contextmanager
    def _mailbox_slot(self, req: _Request, segments: list[str]) -> Iterator[None]:
        """At most ``mailbox_concurrency`` requests at once per mailbox, as Outlook allows."""
        key = segments[1].lower() if len(segments) > 1 and segments[0].lower() == "users" else \
            (req.principal.user or "") if segments and segments[0].lower() == "me" and req.principal else ""
        if not key:
            yield
            return
        with self._inflight_lock:
            self._inflight[key] += 1
            now = self._inflight[key]
            self.max_inflight[key] = max(self.max_inflight[key], now)
        try:
            if now > self.mailbox_concurrency:
                with self._lock:
                    self.stats["throttled"] += 1
                raise GraphError(429, "ApplicationThrottled", "Application is over its MailboxConcurrency limit.",
                                 {"Retry-After": _seconds(self.retry_after)})
            yield
        finally:
            with self._inflight_lock:
                self._inflight[key] -= 1

    def _upload(self, req: _Request, seg: list[str]) -> _Response:
        """``PUT`` a byte range to (or ``DELETE``) a pre-authenticated upload URL."""
        if req.headers.get("authorization"):
            # Microsoft: "Do not specify an Authorization request header". The stand-in
            # refuses one, so that a client that would hand its token on is caught.
            raise GraphError(400, "BadRequest", "The upload URL is pre-authenticated: send no Authorization header.")
        sid = _seg_key(seg[-1]) if seg and _seg_name(seg[-1]) == "attachmentsessions" else None
        self._maybe_throttle("upload")
        with self._lock:
            self.stats["upload"] += 1
            up = self._uploads.get(sid or "")
            if up is None or not hmac.compare_digest(req.query.get("authtoken", ""), up.token) \
                    or up.expires < dt.datetime.now(dt.UTC):
                raise GraphError(404, "ErrorItemNotFound", "The specified object was not found in the store.")
            response = self._upload_range(req, up)
            if self._drops["upload"] > 0:
                self._drops["upload"] -= 1
                response.drop = True
            return response

    def _upload_range(self, req: _Request, up: _Upload) -> _Response:
        if req.method == "DELETE":
            del self._uploads[up.id]
            return _Response(204)
        if req.method != "PUT":
            raise GraphError(405, "BadRequest", f"{req.method} is not allowed here.")
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", req.headers.get("content-range", "").strip())
        if m is None:
            raise GraphError(400, "invalidRequest", "The Content-Range header is missing or malformed.")
        start, end, total = (int(g) for g in m.groups())
        if total != up.size:
            raise GraphError(400, "invalidRange", "Declared total size for this fragment is different from that "
                                                  "of the upload session.")
        if end < start or end - start + 1 != len(req.body) or end >= up.size:
            raise GraphError(400, "invalidRequest", "The Content-Range header does not match the body.")
        if start != len(up.received):
            raise GraphError(416, "invalidRange", "Uploaded fragment overlaps with existing data."
                             if start < len(up.received) else "Uploaded fragment is out of order.")
        up.received += req.body
        if len(up.received) < up.size:
            return _Response.json(200, {"@odata.context": f"{self.base_url}/$metadata#microsoft.graph.uploadSession",
                                        "expirationDateTime": _iso(up.expires),
                                        "nextExpectedRanges": [str(len(up.received))]})
        del self._uploads[up.id]
        box = self._mailbox(up.mailbox)
        draft = box.messages.get(up.message)
        if draft is None:
            raise GraphError(404, "ErrorItemNotFound", "The specified object was not found in the store.")
        _Ctx(self, req, box, up.mailbox).fits(draft, up.size)
        att = dataclasses.replace(up.item, content=bytes(up.received))
        draft.attachments.append(att)
        draft.version += 1
        return _Response(201, headers={"Location": f"https://{self.host}:{self.port}/api/v2.0/Users('{box.id}@{_TENANT}')"
                                                   f"/Messages('{draft.rest_id}')/Attachments('{att.id}')"})

    def _route(self, req: _Request, seg: list[str]) -> _Response:
        low = [s.lower() for s in seg]
        if low[0] == "me":
            if req.principal is None or req.principal.app_only:
                raise GraphError(400, "BadRequest", "/me request is only valid with delegated authentication flow.")
            box_ref, rest, low_rest = "me", seg[1:], low[1:]
            box = self._mailbox(req.principal.user or "")
        elif low[0] == "users" and len(seg) >= 2:
            box_ref, rest, low_rest = seg[1], seg[2:], low[2:]
            box = self._mailbox(seg[1])
        else:
            raise GraphError(400, "BadRequest", f"Resource not found for the segment '{seg[0]}'.")
        ctx = _Ctx(self, req, box, box_ref)
        if low_rest == ["sendmail"] and req.method == "POST":
            return ctx.send_mail()
        if low_rest == ["messages"] and req.method == "POST":
            return ctx.create_draft()
        if low_rest == ["messages"] and req.method == "GET":
            return ctx.list_messages(None)
        # mailFolders[/{id}[/childFolders | /messages[/delta | /{id}...]]]
        if low_rest and _seg_name(low_rest[0]) == "mailfolders":
            key = _seg_key(rest[0])
            if key is None and len(rest) == 1:
                return ctx.list_folders(None) if req.method == "GET" else ctx.create_folder(None)
            if key is None:
                key, rest, low_rest = rest[1], [rest[0], *rest[2:]], [low_rest[0], *low_rest[2:]]
            folder = ctx.folder(key)
            tail, low_tail = rest[1:], low_rest[1:]
            if not tail:
                return ctx.get_folder(folder)
            if _seg_name(low_tail[0]) == "childfolders" and len(tail) == 1:
                return ctx.list_folders(folder) if req.method == "GET" else ctx.create_folder(folder)
            if _seg_name(low_tail[0]) == "messages":
                if len(tail) == 2 and low_tail[1] in ("delta", "microsoft.graph.delta", "delta()",
                                                      "microsoft.graph.delta()"):
                    return ctx.delta(folder)
                if len(tail) == 1 and req.method == "GET":
                    return ctx.list_messages(folder)
                return self._message_route(ctx, tail, low_tail, folder)
        if low_rest and _seg_name(low_rest[0]) == "messages":
            return self._message_route(ctx, rest, low_rest, None)
        raise GraphError(400, "BadRequest", f"Resource not found for the segment '{rest[0] if rest else box_ref}'.")

    def _message_route(self, ctx: _Ctx, rest: list[str], low: list[str], folder: Folder | None) -> _Response:
        key = _seg_key(rest[0])
        if key is None:
            if len(rest) < 2:
                raise GraphError(405, "BadRequest", "Listing all messages is not supported by the stand-in.")
            key, rest, low = rest[1], [rest[0], *rest[2:]], [low[0], *low[2:]]
        m = ctx.message(key)
        if folder is not None and m.folder_id != folder.id:
            raise GraphError(404, "ErrorItemNotFound", "The specified object was not found in the store.")
        method = ctx.req.method
        tail = low[1:]
        if not tail:
            if method == "GET":
                return ctx.get_message(m)
            if method == "PATCH":
                return ctx.update_message(m)
            if method == "DELETE":
                return ctx.delete_message(m)
        elif tail == ["$value"] and method == "GET":
            return ctx.mime(m)
        elif tail in (["move"], ["microsoft.graph.move"]) and method == "POST":
            return ctx.move_message(m)
        elif tail == ["attachments"] and method == "POST":
            return ctx.add_attachment(m)
        elif tail in (["attachments", "createuploadsession"], ["attachments", "microsoft.graph.createuploadsession"]) \
                and method == "POST":
            return ctx.create_upload_session(m)
        elif tail in (["send"], ["microsoft.graph.send"]) and method == "POST":
            return ctx.send_draft(m)
        raise GraphError(405, "BadRequest", f"{method} is not allowed here.")

    def _batch(self, req: _Request) -> _Response:
        try:
            payload = json.loads(req.body or b"{}")
            requests = payload["requests"]
            assert isinstance(requests, list)
        except (ValueError, KeyError, AssertionError):
            raise GraphError(400, "BadRequest", "Invalid batch payload format.") from None
        if len(requests) > _MAX_BATCH:
            raise GraphError(400, "BadRequest", f"The number of batch requests exceeds the limit of {_MAX_BATCH}.")
        ids = [str(r.get("id", "")).lower() for r in requests]
        if len(set(ids)) != len(ids) or "" in ids:
            raise GraphError(400, "BadRequest", "Batch request ids must be unique and not empty.")
        status: dict[str, int] = {}
        responses = []
        for r in requests:
            rid = str(r["id"])
            deps = [str(d).lower() for d in r.get("dependsOn") or []]
            if any(status.get(d, 424) >= 400 for d in deps):
                resp = _Response.json(424, {"error": {"code": "FailedDependency", "message": "Failed dependency."}})
            else:
                headers = {k.lower(): str(v) for k, v in (r.get("headers") or {}).items()}
                body = r.get("body")
                if body is not None and "content-type" not in headers:
                    resp = _Response.json(400, {"error": {"code": "BadRequest",
                                                          "message": "Content-Type header must be specified with a body."}})
                else:
                    if body is None:
                        raw_body = b""
                    elif headers.get("content-type", "").startswith("application/json"):
                        raw_body = json.dumps(body).encode()
                    else:
                        raw_body = str(body).encode()
                    url = str(r.get("url", ""))
                    split = urlsplit(url if url.startswith("/") else "/" + url)
                    # Each request has its own headers; the batch's own are not passed on.
                    sub = _Request(str(r.get("method", "GET")).upper(), "/v1.0" + split.path,
                                   dict(parse_qsl(split.query, keep_blank_values=True)), headers,
                                   raw_body, req.principal)
                    resp = self.handle(sub, in_batch=True)
            status[rid.lower()] = resp.status
            out: dict[str, Any] = {"id": rid, "status": resp.status,
                                   "headers": {"Content-Type": resp.content_type, **resp.headers} if resp.body
                                   else dict(resp.headers)}
            if resp.body:
                if resp.content_type.startswith("application/json"):
                    out["body"] = json.loads(resp.body)
                else:  # binary or MIME content travels base64-encoded inside JSON
                    out["body"] = base64.b64encode(resp.body).decode("ascii")
            responses.append(out)
        if self.service_time:  # Graph runs the requests of a batch four at a time
            time.sleep(self.service_time * -(-len(requests) // 4))
        return _Response.json(200, {"responses": responses})

    # -- state helpers (under the lock) -------------------------------------------------

    def _next_seq(self) -> int:
        self._last_seq = next(self._seq)
        return self._last_seq

    def _mailbox(self, ref: str) -> Mailbox:
        ref = ref.lower()
        box = self.mailboxes.get(ref) or next((b for b in self.mailboxes.values() if b.id == ref), None)
        if box is None:
            raise GraphError(404, "ErrorInvalidUser", f"The requested user '{ref}' is invalid.")
        return box

    def _child(self, box: Mailbox, parent_id: str, name: str) -> Folder | None:
        return next((f for f in box.folders.values()
                     if f.parent_id == parent_id and f.display_name.lower() == name.lower()), None)

    def _folder_by_path(self, box: Mailbox, path: str) -> Folder:
        parts = path.split("/")
        first = parts[0].lower()
        if first in WELL_KNOWN or first in ("msgfolderroot", "recoverableitemsdeletions"):
            folder = box.well_known(first)
        else:
            found = self._child(box, box.well_known("msgfolderroot").id, parts[0])
            if found is None:
                raise GraphError(404, "ErrorItemNotFound", "The specified object was not found in the store.")
            folder = found
        for part in parts[1:]:
            found = self._child(box, folder.id, part)
            if found is None:
                raise GraphError(404, "ErrorItemNotFound", "The specified object was not found in the store.")
            folder = found
        return folder

    def _move(self, box: Mailbox, m: StoredMessage, target: Folder) -> None:
        if m.folder_id == target.id:
            return
        seq = self._next_seq()
        box.folders[m.folder_id].removed.append((seq, m.added_seq, m.immutable_id, m.rest_id))
        m.folder_id = target.id
        m.added_seq = m.updated_seq = seq
        m.version += 1
        m.rest_id = _new_id("msg")  # a move gives a new (non-immutable) id
        box.rest[m.rest_id] = m.immutable_id


class _Ctx:
    """One request against one mailbox: permission checks and the endpoints."""

    def __init__(self, server: GraphServer, req: _Request, box: Mailbox, box_ref: str) -> None:
        self.s, self.req, self.box, self.box_ref = server, req, box, box_ref

    # -- permissions --------------------------------------------------------------------

    def need(self, right: str) -> None:
        """``read``, ``write`` or ``send`` on this mailbox, or 403."""
        p = self.req.principal
        assert p is not None
        own = p.user == self.box.address
        wanted = {
            "read": ("Mail.Read", "Mail.ReadWrite"),
            "write": ("Mail.ReadWrite",),
            "send": ("Mail.Send",),
        }[right]
        if p.app_only or own:
            ok = bool(p.scopes & set(wanted))
        else:
            # Sending through another mailbox's URL takes Full Access "in addition to either
            # the Send on Behalf or Send As permission" (outlook-send-mail-from-other-user).
            shared = {f"{w}.Shared" for w in wanted}
            ok = bool(p.scopes & shared) and p.user in self.box.full_access
            if ok and right == "send" and p.user not in self.box.send_as | self.box.send_on_behalf:
                raise GraphError(403, "ErrorSendAsDenied",
                                 "The user account which was used to submit this request does not have the right "
                                 "to send mail on behalf of the specified sending account., Cannot submit message.")
        if not ok:
            raise GraphError(403, "ErrorAccessDenied", "Access is denied. Check credentials and try again.")

    def need_send_as(self, address: str) -> None:
        """The From of a MIME message is another mailbox: the caller needs Mail.Send.Shared
        and Send As or Send on Behalf on it (a user's own alias is the user's own)."""
        p = self.req.principal
        assert p is not None
        other = self.s.mailboxes.get(address) or next(
            (b for b in self.s.mailboxes.values() if address in b.aliases), None)
        if p.app_only or (other is not None and p.user == other.address):
            return
        if other is not None and "Mail.Send.Shared" in p.scopes and p.user in other.send_as | other.send_on_behalf:
            return
        raise GraphError(403, "ErrorSendAsDenied",
                         "The user account which was used to submit this request does not have the right "
                         "to send mail on behalf of the specified sending account., Cannot submit message.")

    # -- folders ------------------------------------------------------------------------

    def folder(self, key: str) -> Folder:
        self.need("read")
        low = key.lower()
        if low in WELL_KNOWN or low in ("msgfolderroot", "recoverableitemsdeletions"):
            return self.box.well_known(low)
        found = self.box.folders.get(key)
        if found is None:
            raise GraphError(404, "ErrorItemNotFound", "The specified object was not found in the store.")
        return found

    def folder_json(self, f: Folder) -> dict[str, Any]:
        inside = [m for m in self.box.messages.values() if m.folder_id == f.id]
        return _select({
            "id": f.id, "displayName": f.display_name, "parentFolderId": f.parent_id,
            "childFolderCount": sum(1 for c in self.box.folders.values() if c.parent_id == f.id),
            "unreadItemCount": sum(1 for m in inside if not m.is_read), "totalItemCount": len(inside),
            "sizeInBytes": sum(len(m.raw) for m in inside), "isHidden": f.hidden,
        }, self.req.query.get("$select"))

    def get_folder(self, f: Folder) -> _Response:
        return _Response.json(200, {"@odata.context": f"{self.s.base_url}/$metadata#users('{self.box_ref}')/mailFolders/$entity",
                                    **self.folder_json(f)})

    def list_folders(self, parent: Folder | None) -> _Response:
        self.need("read")
        parent = parent or self.box.well_known("msgfolderroot")
        q = self.req.query
        hidden = q.get("includeHiddenFolders", "").lower() == "true"
        found = [f for f in self.box.folders.values() if f.parent_id == parent.id and (hidden or not f.hidden)]
        flt = q.get("$filter")
        if flt:
            m = re.fullmatch(r"\s*displayName\s+eq\s+'((?:[^']|'')*)'\s*", flt)
            if m is None:
                raise GraphError(400, "ErrorInvalidUrlQueryFilter", "The query filter contains one or more invalid nodes.")
            name = m.group(1).replace("''", "'")
            found = [f for f in found if f.display_name.lower() == name.lower()]
        top = int(q.get("$top", "10"))
        skip = int(q.get("$skip", "0"))
        page = found[skip:skip + top]
        body: dict[str, Any] = {"value": [self.folder_json(f) for f in page]}
        if skip + top < len(found):
            body["@odata.nextLink"] = self.link(self.req.path, {**q, "$skip": str(skip + top)})
        return _Response.json(200, body)

    def create_folder(self, parent: Folder | None) -> _Response:
        self.need("write")
        parent = parent or self.box.well_known("msgfolderroot")
        try:
            name = str(json.loads(self.req.body)["displayName"])
        except (ValueError, KeyError, TypeError):
            raise GraphError(400, "ErrorInvalidRequest", "The displayName property is required.") from None
        if self.s._child(self.box, parent.id, name) is not None:
            raise GraphError(409, "ErrorFolderExists", "A folder with the specified name already exists.")
        f = Folder(_new_id("fld"), name, parent.id)
        self.box.folders[f.id] = f
        return _Response.json(201, self.folder_json(f))

    # -- messages -----------------------------------------------------------------------

    def message(self, key: str) -> StoredMessage:
        self.need("read")
        imm = key if key in self.box.messages else self.box.rest.get(key)
        m = self.box.messages.get(imm or "")
        # A message id from before a move no longer opens it; an immutable id does.
        if m is None or (imm != key and m.rest_id != key):
            raise GraphError(404, "ErrorItemNotFound", "The specified object was not found in the store.")
        return m

    def message_id(self, m: StoredMessage) -> str:
        return m.immutable_id if self.req.immutable else m.rest_id

    def message_json(self, m: StoredMessage, select: str | None = None, expand: str | None = None) -> dict[str, Any]:
        etag = f'W/"CQAAABYAAAA{m.version:08d}"'
        full: dict[str, Any] = {
            "@odata.type": "#microsoft.graph.message",
            "@odata.etag": etag,
            "id": self.message_id(m),
            "createdDateTime": _iso(m.received), "lastModifiedDateTime": _iso(m.received),
            "changeKey": f"CQAAABYAAAA{m.version:08d}",
            "receivedDateTime": _iso(m.received), "sentDateTime": _iso(m.received),
            "hasAttachments": bool(m.attachments) or b"Content-Disposition: attachment" in m.raw,
            "internetMessageId": m.internet_message_id, "subject": m.subject,
            "bodyPreview": "", "importance": "normal", "parentFolderId": m.folder_id,
            "conversationId": "AAQk" + m.immutable_id[-12:], "isRead": m.is_read, "isDraft": m.is_draft,
            "from": {"emailAddress": {"address": email.utils.parseaddr(m.sender)[1]}},
            "sender": {"emailAddress": {"address": email.utils.parseaddr(m.sender)[1]}},
            "toRecipients": [{"emailAddress": {"address": a}} for a in m.to],
        }
        out = _select(full, select, keep=("@odata.type", "@odata.etag", "id"))
        if expand and "singlevalueextendedproperties" in expand.lower() and "0x0e08" in expand.lower():
            out["singleValueExtendedProperties"] = [{"id": _SIZE_PROPERTY, "value": str(len(m.raw))}]
        elif expand and (asked := _EXPAND_PROPERTY.fullmatch(expand)) is not None:
            # Graph expands the property only on the messages that have it.
            wanted = _property_key(asked.group(1).replace("''", "'"))
            found = [{"id": k, "value": v} for k, v in m.properties.items() if _property_key(k) == wanted]
            if found:
                out["singleValueExtendedProperties"] = found
        return out

    def get_message(self, m: StoredMessage) -> _Response:
        return _Response.json(200, self.message_json(m, self.req.query.get("$select"), self.req.query.get("$expand")))

    def mime(self, m: StoredMessage) -> _Response:
        return _Response(200, m.raw, "text/plain")

    def json_object(self) -> dict[str, Any]:
        """The request's JSON object, or Graph's 400 for an empty or malformed payload."""
        try:
            body = json.loads(self.req.body)
            assert isinstance(body, dict)
        except (ValueError, AssertionError):
            raise GraphError(400, "BadRequest", "Empty Payload. JSON content expected.") from None
        return body

    def update_message(self, m: StoredMessage) -> _Response:
        self.need("write")
        changes = self.json_object()
        props = changes.get("singleValueExtendedProperties")
        if props is not None:  # "Create single-value extended property" in an existing message
            if not isinstance(props, list) or not all(isinstance(p, dict) and p.get("id") and "value" in p
                                                      for p in props):
                raise GraphError(400, "BadRequest", "Invalid value for property singleValueExtendedProperties.")
            for prop in props:
                m.properties[str(prop["id"])] = str(prop["value"])
            m.updated_seq = self.s._next_seq()
            m.version += 1
        if "isRead" in changes:
            if not isinstance(changes["isRead"], bool):
                raise GraphError(400, "BadRequest", "Invalid value for property isRead.")
            if m.is_read != changes["isRead"]:
                m.is_read = changes["isRead"]
                m.updated_seq = self.s._next_seq()
                m.version += 1
        return _Response.json(200, self.message_json(m))

    def delete_message(self, m: StoredMessage) -> _Response:
        self.need("write")
        self.s._move(self.box, m, self.box.well_known("recoverableitemsdeletions"))
        return _Response(204)

    def move_message(self, m: StoredMessage) -> _Response:
        self.need("write")
        try:
            dest = str(json.loads(self.req.body)["destinationId"])
        except (ValueError, KeyError, TypeError):
            raise GraphError(400, "ErrorInvalidRequest", "The destinationId property is required.") from None
        try:
            target = self.folder(dest)
        except GraphError:
            raise GraphError(404, "ErrorItemNotFound", "The specified object was not found in the store.") from None
        self.s._move(self.box, m, target)
        return _Response.json(201, self.message_json(m))

    def list_messages(self, f: Folder | None) -> _Response:
        """A folder's messages, or (``f`` None) those of every folder but the hidden ones,
        with the documented ``$filter`` on a string extended property if asked."""
        self.need("read")
        q = self.req.query
        shown = {f.id} if f is not None else {g.id for g in self.box.folders.values() if not g.hidden}
        inside = sorted((m for m in self.box.messages.values() if m.folder_id in shown), key=lambda m: m.added_seq)
        if "$filter" in q:
            match = _PROPERTY_FILTER.fullmatch(q["$filter"])
            if match is None:
                raise GraphError(400, "ErrorInvalidUrlQueryFilter",
                                 "The query filter contains one or more invalid nodes.")
            prop, value = (g.replace("''", "'") for g in match.group(2, 3))
            inside = [m for m in inside if _property_is(m, prop, value)]
        top = min(int(q.get("$top", "10")), 1000)
        skip = int(q.get("$skip", "0"))
        body: dict[str, Any] = {"value": [self.message_json(m, q.get("$select"), q.get("$expand"))
                                          for m in inside[skip:skip + top]]}
        if skip + top < len(inside):
            body["@odata.nextLink"] = self.link(self.req.path, {**q, "$skip": str(skip + top)})
        return _Response.json(200, body)

    # -- delta --------------------------------------------------------------------------

    def delta(self, f: Folder) -> _Response:
        q = self.req.query
        s = self.s
        skip, delta = q.get("$skiptoken"), q.get("$deltatoken")
        if skip:
            found = s._rounds.get(skip)
            if found is None or found[0].folder_id != f.id:
                raise self.gone(f, {})
            rnd, position = found  # a skip token may be used again (a retried request)
        else:
            if delta:
                state = s._deltas.get(delta)
                if state is None or state.folder_id != f.id or state.generation != s._generation:
                    raise self.gone(f, state.options if state else {})
                since, options = state.seq, state.options
            else:
                since = 0
                options = {k: v for k, v in q.items() if k in ("$select", "$expand", "changeType")}
                change = options.get("changeType")
                if change not in (None, "created", "updated", "deleted"):
                    raise GraphError(400, "ErrorInvalidUrlQuery", f"Invalid changeType '{change}'.")
            rnd = _Round(self.box.address, f.id, self.changes(f, since, options.get("changeType")),
                         s._last_seq, options)
            position = 0
        page_size = s.default_page_size
        prefer = self.req.prefer().get("odata.maxpagesize")
        if prefer and prefer.isdigit() and int(prefer) > 0:
            page_size = int(prefer)
        page_size = min(page_size, s.max_page_size)
        chunk = rnd.items[position:position + page_size]
        position += len(chunk)
        value = []
        for kind, item in chunk:
            if kind == "msg":
                assert isinstance(item, StoredMessage)
                value.append(self.message_json(item, rnd.options.get("$select"), rnd.options.get("$expand")))
            else:
                imm, rest = item  # type: ignore[misc]
                value.append({"@odata.type": "#microsoft.graph.message",
                              "id": imm if self.req.immutable else rest, "@removed": {"reason": "deleted"}})
        path = f"/v1.0/users/{quote(self.box_ref, safe='@')}/mailFolders('{f.id}')/messages/delta"
        body: dict[str, Any] = {"@odata.context": f"{s.base_url}/$metadata#Collection(message)"}
        if position < len(rnd.items):
            token = secrets.token_urlsafe(18)
            s._rounds[token] = (rnd, position)
            body["@odata.nextLink"] = self.link(path, {"$skiptoken": token})
        else:
            token = secrets.token_urlsafe(18)
            s._deltas[token] = _DeltaState(self.box.address, f.id, rnd.end_seq, rnd.options, s._generation)
            body["@odata.deltaLink"] = self.link(path, {"$deltatoken": token})
        body["value"] = value
        headers = {"Preference-Applied": f"odata.maxpagesize={page_size}"} if prefer else {}
        return _Response.json(200, body, headers)

    def changes(self, f: Folder, since: int, change: str | None) -> list[tuple[str, Any]]:
        inside = sorted((m for m in self.box.messages.values() if m.folder_id == f.id), key=lambda m: m.added_seq)
        out: list[tuple[str, Any]] = []
        if change in (None, "created"):
            out += [("msg", m) for m in inside if m.added_seq > since]
        if change in (None, "updated") and since:
            out += [("msg", m) for m in inside if m.added_seq <= since < m.updated_seq]
        if change in (None, "deleted") and since:
            present = {m.immutable_id for m in inside}
            out += [("removed", (imm, rest)) for seq, added, imm, rest in f.removed
                    if seq > since and added <= since and imm not in present]
        return out

    def gone(self, f: Folder, options: Mapping[str, str]) -> GraphError:
        path = f"/v1.0/users/{quote(self.box_ref, safe='@')}/mailFolders('{f.id}')/messages/delta"
        return GraphError(410, "SyncStateNotFound",
                          "The sync state generation is not found. The delta token is expired and data must be "
                          "synchronized again.", {"Location": self.link(path, {**options, "$deltatoken": ""})})

    # -- sending ------------------------------------------------------------------------

    def send_mail(self) -> _Response:
        self.need("send")
        ctype = self.content_type()
        if ctype == "text/plain":
            raw = self.mime_body()
            self.accept(raw)
            return _Response(202)
        if ctype == "application/json":
            try:
                payload = json.loads(self.req.body)
                msg = payload["message"]
            except (ValueError, KeyError, TypeError):
                raise GraphError(400, "ErrorInvalidRequest", "The message property is required.") from None
            rcpts = tuple(r["emailAddress"]["address"].lower()
                          for k in ("toRecipients", "ccRecipients", "bccRecipients") for r in msg.get(k) or [])
            self.s.sent.append(SentMail(self.box.address, self.caller(), None, rcpts, payload))
            return _Response(202)
        raise GraphError(415, "UnsupportedMediaType", f"Content-Type {ctype or 'none'} is not supported.")

    def content_type(self) -> str:
        return self.req.headers.get("content-type", "").split(";")[0].strip().lower()

    def caller(self) -> str:
        p = self.req.principal
        return p.user if p and p.user else f"app:{p.app_id if p else '?'}"

    def mime_body(self) -> bytes:
        """The MIME message of a ``text/plain`` body, base64-decoded."""
        try:
            raw = base64.b64decode(self.req.body.strip(), validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if not raw:
            raise GraphError(400, "ErrorMimeContentInvalidBase64String", "Invalid base64 string for MIME content.")
        return raw

    def accept(self, raw: bytes) -> StoredMessage:
        """Submit ``raw``: it goes to its To, Cc and Bcc (kept in :attr:`GraphServer.sent`),
        a copy without Bcc to Sent Items, which is returned."""
        head = _HEADERS.parsebytes(raw)
        rcpts = tuple(a.lower() for _, a in email.utils.getaddresses(
            [str(v) for k in ("To", "Cc", "Bcc") for v in head.get_all(k, [])]) if a)
        if not rcpts:
            raise GraphError(400, "ErrorInvalidRecipients", "At least one recipient isn't valid., A message "
                             "can't be sent because it contains no recipients.")
        sender = email.utils.parseaddr(str(head.get("From", "")))[1].lower()
        if sender and sender != self.box.address and sender not in self.box.aliases:
            self.need_send_as(sender)
        self.s.sent.append(SentMail(self.box.address, self.caller(), raw, rcpts))
        [imm] = self.s.deliver_many(self.box.address, [_without_bcc(raw)], "sentitems", is_read=True)
        return self.box.messages[imm]

    # -- drafts, attachments, upload sessions ---------------------------------------------

    def create_draft(self) -> _Response:
        """``POST /messages`` with MIME (``user-post-messages``): a draft in Drafts, ``201``."""
        self.need("write")
        if self.content_type() != "text/plain":
            raise GraphError(415, "UnsupportedMediaType", "The stand-in creates drafts from MIME (text/plain) only.")
        raw = self.mime_body()
        if len(raw) > self.s.max_message_bytes:
            raise GraphError(400, "ErrorMessageSizeExceeded", "The message exceeds the maximum supported size.")
        [imm] = self.s.deliver_many(self.box.address, [raw], "drafts", is_read=True)
        m = self.box.messages[imm]
        m.is_draft = True
        return _Response.json(201, self.message_json(m))

    def fits(self, m: StoredMessage, more: int) -> None:
        """Whether ``more`` bytes of attachment keep ``m`` within the mailbox's maximum message size."""
        if m.size + more > self.s.max_message_bytes:
            raise GraphError(400, "ErrorMessageSizeExceeded", "The message exceeds the maximum supported size.")

    def add_attachment(self, m: StoredMessage) -> _Response:
        """``POST .../attachments`` with a fileAttachment (``message-post-attachments``), ``201``."""
        self.need("write")
        body = self.json_object()
        if body.get("@odata.type") != "#microsoft.graph.fileAttachment":
            raise GraphError(400, "BadRequest", "The stand-in adds file attachments only.")
        try:
            content = base64.b64decode(str(body["contentBytes"]), validate=True)
            name = str(body["name"])
        except (KeyError, ValueError, binascii.Error):
            raise GraphError(400, "ErrorInvalidProperty", "The name and contentBytes properties are required.") \
                from None
        self.fits(m, len(content))
        att = Attachment(_new_id("att"), name, str(body.get("contentType") or "application/octet-stream"), content,
                         bool(body.get("isInline")), body.get("contentId") or None)
        m.attachments.append(att)
        m.version += 1
        return _Response.json(201, {
            "@odata.context": f"{self.s.base_url}/$metadata#users('{self.box_ref}')/messages('{self.message_id(m)}')"
                              "/attachments/$entity",
            "@odata.type": "#microsoft.graph.fileAttachment", "id": att.id,
            "lastModifiedDateTime": _iso(dt.datetime.now(dt.UTC)), "name": att.name, "contentType": att.content_type,
            "size": len(content), "isInline": att.is_inline, "contentId": att.content_id, "contentLocation": None,
            "contentBytes": body["contentBytes"],
        })

    def create_upload_session(self, m: StoredMessage) -> _Response:
        """``POST .../attachments/createUploadSession`` (``attachment-createuploadsession``):
        ``201`` and an uploadSession whose ``uploadUrl`` takes the bytes (see :meth:`GraphServer._upload`)."""
        self.need("write")
        try:
            item = json.loads(self.req.body)["AttachmentItem"]
            size, name = int(item["size"]), str(item["name"])
        except (ValueError, KeyError, TypeError):
            raise GraphError(400, "BadRequest", "The AttachmentItem parameter, with its name and size, is required.") \
                from None
        if item.get("attachmentType") != "file":
            raise GraphError(400, "BadRequest", "The attachmentType of an AttachmentItem must be file.")
        if size < _MIN_UPLOAD:
            raise GraphError(400, "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize",
                             "Attachment size must be greater than the minimum size.")
        if size > _MAX_ATTACHMENT:
            raise GraphError(400, "ErrorAttachmentSizeLimitExceeded", "The attachment exceeds the maximum size.")
        self.fits(m, size)
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=15)
        announced = Attachment(_new_id("att"), name, str(item.get("contentType") or "application/octet-stream"), b"",
                               bool(item.get("isInline")), item.get("contentId") or None)
        up = _Upload(_new_id("ses"), secrets.token_urlsafe(24), self.box.address, m.immutable_id, announced, size,
                     expires)
        self.s._uploads[up.id] = up
        url = (f"https://{self.s.host}:{self.s.port}/api/v2.0/Users('{self.box.id}@{_TENANT}')"
               f"/Messages('{self.message_id(m)}')/AttachmentSessions('{up.id}')?authtoken={up.token}")
        return _Response.json(201, {"@odata.context": f"{self.s.base_url}/$metadata#microsoft.graph.uploadSession",
                                    "uploadUrl": url, "expirationDateTime": _iso(expires),
                                    "nextExpectedRanges": ["0-"]})

    def send_draft(self, m: StoredMessage) -> _Response:
        """``POST .../send`` (``message-send``): ``202``; the draft, with its attachments,
        goes to its recipients and moves to Sent Items."""
        self.need("send")
        if not m.is_draft:
            raise GraphError(400, "ErrorInvalidOperation", "Only a draft can be sent.")
        if m.size > self.s.max_message_bytes:
            raise GraphError(400, "ErrorMessageSizeExceeded",
                             "The message exceeds the maximum supported size., Cannot submit the message.")
        raw = _with_attachments(m.raw, m.attachments)
        self.accept(raw).properties.update(m.properties)  # the item itself moves, its properties with it
        self.s.purge_message(self.box.address, m.immutable_id)  # its copy is in Sent Items now
        return _Response(202)

    # -- links --------------------------------------------------------------------------

    def link(self, path: str, query: Mapping[str, str]) -> str:
        return f"https://{self.s.host}:{self.s.port}{path}?{urlencode(query, safe='$@(),')}"


# ---------------------------------------------------------------------------------------
# HTTP plumbing
# ---------------------------------------------------------------------------------------


class _Quiet(ThreadingHTTPServer):
    """Clients that hang up or refuse the certificate are expected: no tracebacks."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = -1  # headers and body leave in one write (flushed after each request)
    server_owner: GraphServer
    tls: Any

    def setup(self) -> None:
        self.request.settimeout(30)
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request = self.tls.wrap_socket(self.request, server_side=True)
        super().setup()

    def handle(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            super().handle()

    def finish(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            super().finish()
        with contextlib.suppress(OSError):
            # The server closes the plain socket it accepted, which wrapping detached: close
            # the TLS one now, or a dropped connection lingers until garbage collection.
            self.request.close()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        owner = self.server_owner
        if owner.latency:
            time.sleep(owner.latency)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        split = urlsplit(self.path)
        req = _Request(self.command, split.path, dict(parse_qsl(split.query, keep_blank_values=True)),
                       {k.lower(): v for k, v in self.headers.items()}, body)
        resp = owner.handle(req)
        if resp.drop:
            self.close_connection = True
            return
        self.send_response(resp.status)
        if resp.status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="", authorization_uri="https://login.microsoftonline.com'
                             f'/common/oauth2/authorize", client_id="{GRAPH_APP_ID}"')
        for name, value in resp.headers.items():
            self.send_header(name, value)
        self.send_header("request-id", str(uuid.uuid4()))
        if resp.body:
            self.send_header("Content-Type", resp.content_type)
        self.send_header("Content-Length", str(len(resp.body)))
        self.end_headers()
        if resp.body:
            self.wfile.write(resp.body)

    do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _serve


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def _property_key(prop: str) -> tuple[str, str, str]:
    """An extended property's id as Graph compares it: type and set GUID in any case, the
    Name as written."""
    kind, _, rest = prop.strip().partition(" ")
    guid, _, name = rest.partition(" Name ")
    return kind.lower(), guid.lower(), name


def _property_is(m: StoredMessage, prop: str, value: str) -> bool:
    """Whether ``m`` has the string property ``prop`` with ``value`` (compared
    case-insensitively), as Graph filters them: one set with the API, or one a MIME reader
    made of a custom header (``X-...``)."""
    key = _property_key(prop)
    if any(_property_key(k) == key and v.lower() == value.lower() for k, v in m.properties.items()):
        return True
    kind, guid, name = key
    if kind != "string" or guid != _INTERNET_HEADERS or not name.lower().startswith("x-"):
        return False
    head = _HEADERS.parsebytes(m.raw)
    return any(k == name and str(v).strip().lower() == value.lower() for k, v in head.items())


def _without_bcc(raw: bytes) -> bytes:
    """Bcc travels with the envelope only, as Exchange does."""
    return re.sub(rb"(?im)^bcc:.*\r?\n(?:[ \t].*\r?\n)*", b"", raw)


def _with_attachments(raw: bytes, attachments: Iterable[Attachment]) -> bytes:
    """A draft's MIME with the attachments added through the API, as Exchange submits it."""
    attachments = list(attachments)
    if not attachments:
        return raw
    msg = email.message_from_bytes(raw, policy=email.policy.SMTP)
    assert isinstance(msg, email.message.EmailMessage)
    if msg.get_content_type() != "multipart/mixed":
        msg.make_mixed()
    for a in attachments:
        maintype, _, subtype = a.content_type.partition("/")
        msg.add_attachment(a.content, maintype=maintype or "application", subtype=subtype or "octet-stream",
                           filename=a.name, disposition="inline" if a.is_inline else "attachment",
                           cid=f"<{a.content_id}>" if a.content_id else None)
    return msg.as_bytes()


def received_attachments(raw: bytes) -> list[Attachment]:
    """The attachments of a MIME message as a recipient finds them: every leaf part with
    a file name or a Content-ID, decoded."""
    found = []
    for part in email.message_from_bytes(raw, policy=email.policy.SMTP).walk():
        cid = str(part.get("Content-ID") or "").strip().strip("<>") or None
        if part.is_multipart() or not (part.get_filename() or cid):
            continue
        found.append(Attachment("", part.get_filename() or "", part.get_content_type(),
                                part.get_payload(decode=True) or b"", part.get_content_disposition() == "inline", cid))
    return found


def _kind(method: str, seg: list[str]) -> str:
    low = [s.lower() for s in seg]
    last = low[-1] if low else ""
    if last.startswith(("delta", "microsoft.graph.delta")):
        return "delta"
    if last == "$value":
        return "value"
    if last in ("move", "microsoft.graph.move"):
        return "move"
    if last == "sendmail":
        return "sendmail"
    if last in ("send", "microsoft.graph.send"):
        return "send"
    if last.endswith("createuploadsession"):
        return "uploadsession"
    if last == "attachments":
        return "attach"
    if last == "messages" and method == "POST":
        return "create"
    if _seg_name(last) == "messages" and method == "GET":
        return "list"
    if any(_seg_name(s) == "messages" for s in low):
        return {"PATCH": "patch", "DELETE": "delete"}.get(method, "message")
    return "folder"


def _seg_name(segment: str) -> str:
    """``mailFolders('x')`` -> ``mailfolders``."""
    return segment.split("(", 1)[0].lower()


def _seg_key(segment: str) -> str | None:
    """The key of an OData key segment ``mailFolders('x')``, or None."""
    m = re.fullmatch(r"[^(]+\('(.*)'\)", segment)
    return m.group(1).replace("''", "'") if m else None


def _select(obj: dict[str, Any], select: str | None, keep: Iterable[str] = ("id",)) -> dict[str, Any]:
    if not select:
        return obj
    wanted = {s.strip().lower() for s in select.split(",")} | {k.lower() for k in keep}
    return {k: v for k, v in obj.items() if k.lower() in wanted}


def _unauthorized(message: str) -> GraphError:
    return GraphError(401, "InvalidAuthenticationToken", message)


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _new_id(prefix: str) -> str:
    return "AAMk" + prefix.upper()[:4] + base64.urlsafe_b64encode(secrets.token_bytes(18)).decode().rstrip("=")


def _iso(value: dt.datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def introspection_verifier(url: str, *, ca_file: str | None = None, client_id: str | None = None,
                           client_secret: str | None = None,
                           default_roles: Iterable[str] = ("Mail.ReadWrite", "Mail.Send"),
                           clock: Callable[[], float] | None = None,
                           ) -> Callable[[str], Principal | None]:
    """``verify`` for :class:`GraphServer` that asks an RFC 7662 introspection endpoint
    (the test identity provider) whether a token is active, and for its claims.

    The server authenticates with HTTP Basic: ``client_id``/``client_secret``, or the
    credentials in the URL's userinfo (what
    :meth:`tests.servers.idp.IdentityProvider.add_resource_server` returns).

    With ``clock`` (the provider's, :meth:`~tests.servers.idp.IdentityProvider.now`), an
    active token is remembered until its ``exp`` by that clock, which RFC 7662 §4 allows
    and which is what Graph does: it validates a JWT's signature and lifetime locally and
    asks nobody again until it expires (so a revoked token works until then, unless
    continuous access evaluation is on). Without ``clock``, every request is introspected.
    """
    import ssl
    import urllib.request

    parts = urlsplit(url)
    if parts.username is not None:
        client_id, client_secret = unquote(parts.username), unquote(parts.password or "")
        url = parts._replace(netloc=f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)).geturl()
    context = ssl.create_default_context(cafile=ca_file)
    roles = tuple(default_roles)
    valid: dict[str, tuple[Principal, float]] = {}  # token -> principal, exp
    lock = threading.Lock()

    def verify(token: str) -> Principal | None:
        if clock is not None:
            with lock:
                known = valid.get(token)
            if known is not None and clock() < known[1]:
                return known[0]
        found = introspect(token)
        if found is not None and clock is not None:
            with lock:
                valid[token] = found
        return found[0] if found is not None else None

    def introspect(token: str) -> tuple[Principal, float] | None:
        data = urlencode({"token": token, "token_type_hint": "access_token"}).encode()
        request = urllib.request.Request(url, data=data, method="POST",
                                         headers={"Content-Type": "application/x-www-form-urlencoded",
                                                  "Accept": "application/json"})
        if client_id is not None:
            basic = base64.b64encode(f"{quote(client_id)}:{quote(client_secret or '')}".encode()).decode()
            request.add_header("Authorization", f"Basic {basic}")
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            claims = json.loads(response.read())
        if not claims.get("active"):
            return None
        aud = claims.get("aud")
        auds = aud if isinstance(aud, list) else [aud] if aud else []
        if auds and not any(a in (AUDIENCE, GRAPH_APP_ID) or str(a).startswith(AUDIENCE) for a in auds):
            return None
        scopes = str(claims.get("scope") or claims.get("scp") or "").split()
        if any(s.startswith("https://") and not s.startswith(AUDIENCE + "/") for s in scopes):
            return None  # a token for another resource (Exchange's IMAP scopes, say)
        return Principal.from_claims(claims, roles), float(claims.get("exp") or 0)

    return verify


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for tests that need a closed one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------
# Tokens of the stand-in in the host's connection settings (tests without an identity provider)
# ---------------------------------------------------------------------------------------


def add_oauth_credential(host: Any, name: str = "ms") -> str:
    """Store an OAuth2 credential row named ``name`` (so that a connection may name it
    with ``oauth_credential``); no secret, no token: :func:`wire_access_token` supplies
    the token."""
    from mailhost.store import OAuthCredential

    with host.session() as s:
        s.add(OAuthCredential(name=name, provider="microsoft", client_id="test-client", scopes=[],
                              flow="client-credentials"))
    return name


def wire_access_token(host: Any, access_token: Callable[[], str]) -> None:
    """Give every connection of ``host`` that has an OAuth2 credential this
    ``access_token`` in its :class:`~mailhost.protocols.ConnectionSettings`.

    In place of the host's own OAuth2 wiring (a token source on the stored, authorized
    credential), for tests whose tokens the stand-in issues itself; the rest of the
    settings are the host's.
    """
    import dataclasses

    connections = host.connections
    original = type(connections).settings

    def settings(direction: Any, conn: Any) -> Any:
        credential = conn.oauth_credential_id
        if credential is None:
            return original(connections, direction, conn)
        conn.oauth_credential_id = None  # no token source on the unauthorized credential row
        try:
            base = original(connections, direction, conn)
        finally:
            conn.oauth_credential_id = credential
        return dataclasses.replace(base, access_token=access_token)

    connections.settings = settings


# ---------------------------------------------------------------------------------------
# pytest fixture
# ---------------------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # pragma: no cover - the server works without pytest
    pass
else:

    @pytest.fixture
    def graph_server(pki: Pki) -> Iterator[GraphServer]:
        """A started :class:`GraphServer` (small pages: at most 50 per delta page), stopped after the test."""
        server = GraphServer(pki, max_page_size=50)
        server.start()
        try:
            yield server
        finally:
            server.stop()
