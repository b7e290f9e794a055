"""The HTTP side of Microsoft Graph: one httpx client per session, behaving well.

- TLS verified with :func:`mailhost.tls.client_context` (the connection's CA file added).
- A bearer token from ``settings.access_token``, fetched again once after a 401.
- ``429``, ``503``, ``502`` and ``504`` are retried after ``Retry-After`` (or a short
  backoff), a bounded number of times; a wait longer than :data:`MAX_WAIT` ends the
  operation with :class:`~mailhost.errors.TemporaryFailure` carrying ``retry_after``.
- At most :data:`CONCURRENCY` requests at once: Outlook serves four concurrent requests
  per app and mailbox and throttles the rest (``MailboxConcurrency``).
- JSON batching (``$batch``, up to 20 requests each), with the throttled requests of a
  batch sent again.
- Links the server returns (``@odata.nextLink``, ``@odata.deltaLink``) are followed only
  on the server they came from, so the token never goes elsewhere.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import email.utils
import json
import random
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import httpx
from mailhost.errors import (
    AuthenticationFailed,
    ConnectFailure,
    MailError,
    MailhostError,
    PermanentFailure,
    TemporaryFailure,
)
from mailhost.protocols import ConnectionSettings
from mailhost.secrets import remember_secret
from mailhost.tls import client_context, tls_error

from .scopes import graph_resource, scope_problem

__all__ = [
    "BATCH_LIMIT",
    "CONCURRENCY",
    "DEFAULT_HOST",
    "GraphClient",
    "SubResponse",
    "token_claims",
]

DEFAULT_HOST = "graph.microsoft.com"
API = "v1.0"
CONCURRENCY = 4  # Outlook: 4 concurrent requests per app and mailbox
BATCH_LIMIT = 20  # requests per $batch
MAX_RETRIES = 8  # tries after a throttled or unavailable answer
MAX_WAIT = 60.0  # seconds waited for one request at most (the download lease lasts 2 minutes);
# a longer Retry-After is left to the next pass or attempt
_RETRY = frozenset({429, 502, 503, 504})
_REFUSED = frozenset({429, 503})  # the server says it did not act on the request
#: Ask for ids that survive moves between folders (Microsoft: "Obtain immutable
#: identifiers for Outlook resources"), so a stored message keeps its key.
PREFER_IMMUTABLE = 'IdType="ImmutableId"'


class SubResponse(dict):  # type: ignore[type-arg]
    """One response of a ``$batch``: ``id``, ``status``, ``headers``, ``body``."""

    @property
    def status(self) -> int:
        return int(self.get("status", 0))


class GraphClient:
    """Requests to one Graph endpoint for one connection; see the module doc.

    ``sleep`` is how the client waits before a retry (tests may count the waits).
    """

    def __init__(self, settings: ConnectionSettings, *, sleep: Callable[[float], None] = time.sleep) -> None:
        if settings.access_token is None:
            raise AuthenticationFailed(
                f"{settings.label} has no OAuth2 credential, which Microsoft Graph needs: "
                "give --oauth-credential NAME"
            )
        self.settings = settings
        host = settings.host or DEFAULT_HOST
        self.host = host
        netloc = f"[{host}]" if ":" in host else host
        if settings.port and settings.port != 443:
            netloc += f":{settings.port}"
        self.origin = f"https://{netloc}"
        self.base = f"{self.origin}/{API}"
        self.where = f"Microsoft Graph at {netloc}"
        self.sleep = sleep
        self._token: str | None = None
        self._token_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self.http = httpx.Client(
            verify=client_context(settings.ca_file),
            timeout=httpx.Timeout(settings.timeout),
            limits=httpx.Limits(max_connections=CONCURRENCY + 1, max_keepalive_connections=CONCURRENCY + 1),
            headers={"Accept": "application/json", "Prefer": PREFER_IMMUTABLE,
                     "User-Agent": "mailhost-graph/0.1"},
            follow_redirects=False,
        )

    # -- tokens ---------------------------------------------------------------------

    def token(self, refused: str | None = None) -> str:
        """The access token from the connection's OAuth2 credential.

        Asked once per session; asked again only when the server refused ``refused``,
        the token in hand (the credential's token source then renews it; several
        threads refused at once ask once).
        """
        with self._token_lock:
            if self._token is None or (refused is not None and refused == self._token):
                assert self.settings.access_token is not None
                if self._token is None:
                    problem = scope_problem(self.settings, self.host)
                    if problem is not None:  # Graph would refuse every token: say why, ask no one
                        raise AuthenticationFailed(f"{self.settings.label}: {problem}")
                token = self.settings.access_token()
                if not token:
                    raise AuthenticationFailed(
                        f"{self.settings.label}: the OAuth2 credential gave no access token: "
                        "authorize it again with `mailhost oauth authorize`"
                    )
                remember_secret(token)  # never in a log, whatever happens
                self._token = token
            return self._token

    # -- requests -------------------------------------------------------------------

    def url(self, target: str) -> str:
        """An absolute URL for a path under ``/v1.0``, or a link the server gave."""
        if not target.startswith(("https://", "http://")):
            return self.base + target
        parts = urlsplit(target)
        if parts.scheme != "https" or parts.netloc.lower() != urlsplit(self.origin).netloc.lower():
            raise PermanentFailure(
                f"{self.where} returned a link to {parts.scheme}://{parts.netloc}, another server: "
                "the connection's host (or host override) does not match the server that answers"
            )
        return target

    def owns(self, link: object) -> bool:
        """Whether ``link`` points at this client's server (a stored cursor may not)."""
        if not isinstance(link, str):
            return False
        parts = urlsplit(link)
        return parts.scheme == "https" and parts.netloc.lower() == urlsplit(self.origin).netloc.lower()

    def request(
        self,
        method: str,
        target: str,
        *,
        doing: str,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        retry: bool = True,
        resend: bool = True,
        pre_authenticated: bool = False,
    ) -> httpx.Response:
        """Send one request; retries throttled and unavailable answers when ``retry``.

        With ``resend`` false, a request that may have been acted on is never sent again
        (no answer, or a gateway's 502/504): only 429 and 503, which say it was not. A
        ``pre_authenticated`` URL (an upload session's, on another host) carries its own
        token: it gets no Authorization header and the transcript shows no query.
        Returns the response whatever its status; :meth:`check` turns an error status
        into the matching exception. A 401 gets one fresh token and one more try.
        """
        url = _pre_authenticated(target) if pre_authenticated else self.url(target)
        statuses = _RETRY if resend else _REFUSED
        refreshed = False
        attempt = 0
        waited = 0.0
        while True:
            token = None if pre_authenticated else self.token()
            auth = {} if token is None else {"Authorization": f"Bearer {token}"}
            try:
                response = self.http.request(
                    method, url, params=params, json=json_body, content=content, headers={**(headers or {}), **auth},
                )
            except httpx.TimeoutException as exc:
                if retry and resend and attempt < 2:
                    attempt += 1
                    continue
                doubt = _unanswered(exc)
                raise TemporaryFailure(f"{self.where} did not answer in {self.settings.timeout:g} s while "
                                       f"{doing} ({type(exc).__name__}){_MAY_HAVE if doubt else ''}",
                                       in_doubt=doubt) from None
            except httpx.TransportError as exc:
                ssl_error = _ssl_cause(exc)
                if ssl_error is not None:
                    raise tls_error(ssl_error, self.where, self.settings.ca_file) from None
                if retry and resend and attempt < 2 and not isinstance(exc, httpx.ConnectError):
                    attempt += 1
                    continue
                if _unanswered(exc):
                    raise ConnectFailure(f"{self.where} dropped the connection while {doing}, before it answered "
                                         f"({exc or type(exc).__name__}){_MAY_HAVE}", in_doubt=True) from None
                raise ConnectFailure(f"cannot reach {self.where} while {doing}: {exc or type(exc).__name__}: "
                                     "check the host and the network") from None
            self._say(f"> {method} {urlsplit(url).path if pre_authenticated else _shown(url, params)}")
            self._say(f"< {response.status_code} {response.reason_phrase}")
            if response.status_code == 401 and token is not None and not refreshed:
                refreshed = True
                self.token(refused=token)
                continue
            if response.status_code in statuses and retry and attempt < MAX_RETRIES:
                wait = retry_after(response.headers)
                if wait is None:
                    wait = min(2.0 ** attempt, 30.0) * (0.5 + random.random() / 2)
                if waited + wait <= MAX_WAIT:
                    attempt += 1
                    waited += wait
                    self.sleep(wait)
                    continue
            return response

    def check(self, response: httpx.Response, doing: str, ok: Sequence[int] = (200,)) -> httpx.Response:
        """``response`` if its status is one of ``ok``, else the matching error."""
        if response.status_code in ok:
            return response
        raise self.error(response.status_code, _error_body(response), response.headers, doing)

    def call(self, method: str, target: str, *, doing: str, ok: Sequence[int] = (200,), **kwargs: Any) -> Any:
        """:meth:`request` + :meth:`check`; the JSON body (None when there is none)."""
        response = self.check(self.request(method, target, doing=doing, **kwargs), doing, ok)
        return response.json() if response.content else None

    def error(self, status: int, body: Any, headers: Mapping[str, str], doing: str) -> MailError:
        """The exception for an error answer: names the server, Graph's code and message, and the fix."""
        code, message = _error_code(body)
        said = f"{status} {code}: {message}".strip().rstrip(":") if code or message else str(status)
        if status == 401:
            base = graph_resource(self.host)
            name = _credential_name(self.settings) or "NAME"
            exc: MailError = AuthenticationFailed(
                f"{self.where} refused the access token while {doing} ({said}): the token must be for "
                f"Microsoft Graph ({base}/Mail.ReadWrite and Mail.Send, or {base}/.default for app-only access) "
                f"and from this cloud; check the OAuth2 credential with `mailhost oauth show {name}`, give it "
                f"Graph's scopes with `mailhost oauth edit {name} --scope ...` or authorize it again with "
                f"`mailhost oauth authorize {name}`")
        elif status == 403:
            exc = PermanentFailure(
                f"{self.where} denied {doing} ({said}): the app needs Mail.ReadWrite and Mail.Send "
                "(for a shared mailbox: Mail.ReadWrite.Shared and Mail.Send.Shared with the mailbox's "
                "Full Access and Send As rights, or application permissions)")
        elif status in _RETRY or status >= 500:
            exc = TemporaryFailure(f"{self.where} is busy or unavailable while {doing} ({said}): it is tried again",
                                   retry_after=retry_after(headers))
        else:
            exc = PermanentFailure(f"{self.where} refused {doing} ({said})")
        exc.status, exc.code = status, code  # type: ignore[attr-defined]
        return exc

    # -- many at once ---------------------------------------------------------------

    def get_many(self, targets: Sequence[str], doing: str) -> Iterator[httpx.Response]:
        """GET each target, :data:`CONCURRENCY` at a time; responses in order (a 404
        is returned, other errors raise)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="graph")
        futures = [self._pool.submit(self.request, "GET", t, doing=doing) for t in targets]
        try:
            for future in futures:
                response = future.result()
                if response.status_code != 404:
                    self.check(response, doing)
                yield response
        finally:
            for future in futures:
                future.cancel()

    def batch(self, requests: Sequence[dict[str, Any]], doing: str) -> dict[str, SubResponse]:
        """Run ``requests`` (each with a unique ``id``) through ``$batch``, 20 at a time.

        Throttled or unavailable requests are sent again after the longest Retry-After
        they asked for, a bounded number of times; the final responses come back by id.
        """
        pending = {str(r["id"]): r for r in requests}
        done: dict[str, SubResponse] = {}
        attempt = 0
        waited = 0.0
        while pending:
            waits: list[float] = []
            todo = list(pending.values())
            for start in range(0, len(todo), BATCH_LIMIT):
                chunk = todo[start:start + BATCH_LIMIT]
                body = self.call("POST", "/$batch", doing=doing, json_body={"requests": chunk},
                                 headers={"Content-Type": "application/json"})
                for item in body.get("responses", []):
                    sub = SubResponse(item)
                    if sub.status in _RETRY:
                        waits.append(retry_after(sub.get("headers") or {}) or 0.0)
                        continue
                    done[str(sub["id"])] = sub
                    pending.pop(str(sub["id"]), None)
            if pending:
                attempt += 1
                wait = max(waits, default=0.0) or min(2.0 ** attempt, 30.0)
                if attempt > MAX_RETRIES or waited + wait > MAX_WAIT:
                    raise TemporaryFailure(
                        f"{self.where} kept throttling {len(pending)} request(s) while {doing}: it is tried again",
                        retry_after=wait)
                waited += wait
                self.sleep(wait)
        return done

    def close(self) -> None:
        """Close the connections; never raises."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        with contextlib.suppress(Exception):  # closing must not raise
            self.http.close()

    def _say(self, line: str) -> None:
        if self.settings.transcript is not None:
            self.settings.transcript(line)


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from a ``Retry-After`` header (seconds or an HTTP date), if any."""
    value = next((str(v) for k, v in headers.items() if k.lower() == "retry-after"), None)
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):  # neither seconds nor a date: back off as without one
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def signed_in(settings: ConnectionSettings) -> GraphClient:
    """A client that already holds a token, so a bad credential fails when the session opens."""
    client = GraphClient(settings)
    try:
        client.token()
    except BaseException:
        client.close()
        raise
    return client


def token_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT-shaped access token, unverified (for reports only); ``{}``
    when the token is opaque. Microsoft warns that clients must not rely on them."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error):
        return {}
    return claims if isinstance(claims, dict) else {}


def _credential_name(settings: ConnectionSettings) -> str | None:
    """The OAuth2 credential's name, when the token source says it."""
    try:
        name = getattr(settings.access_token, "credential", None)
    except MailhostError:  # the source could not say: the sentence does without
        return None
    return str(name) if name else None


def _error_body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text[:200]


def _error_code(body: Any) -> tuple[str, str]:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        return str(error.get("code") or ""), str(error.get("message") or "")
    return "", str(body or "")[:200]


def _pre_authenticated(url: str) -> str:
    """An upload URL the server returned: any host (Outlook's), but HTTPS only."""
    if urlsplit(url).scheme != "https":
        raise PermanentFailure(f"Microsoft Graph returned an upload URL that is not HTTPS ({urlsplit(url).scheme}:): "
                               "the connection's host (or host override) does not match the server that answers")
    return url


def _shown(url: str, params: Mapping[str, str] | None) -> str:
    path = urlsplit(url)
    shown = path.path + (f"?{path.query}" if path.query else "")
    if params:
        shown += ("&" if path.query else "?") + "&".join(f"{k}={v}" for k, v in params.items())
    return shown


_MAY_HAVE = ": the request went out whole, so the server may have acted on it"


def _unanswered(exc: httpx.TransportError) -> bool:
    """Whether the request went out whole and the answer did not come (read timeout, a
    link dropped while waiting): the server may have acted on it (sendMail: sent it)."""
    return isinstance(exc, (httpx.ReadTimeout, httpx.ReadError, httpx.RemoteProtocolError))


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLError):
            return current
        for arg in getattr(current, "args", ()):
            if isinstance(arg, ssl.SSLError):
                return arg
        current = current.__cause__ or current.__context__
    return None
