"""OAuth2 providers: what a provider plugin gives the host, and the built-in ones.

A provider knows one identity platform: how to run an authorization flow with an admin
(``authorize``) and how to renew tokens without one (``refresh``). Like a protocol plugin
it knows nothing of the store or the CLI: it is given a :class:`ClientConfig` and returns
a :class:`TokenSet`, or raises :class:`OAuthError`. The host (:mod:`mailhost.oauth`)
encrypts and stores the tokens, decides when to renew them and turns errors into
sentences for admins.

Providers are registered through the ``register_oauth_providers`` hook. Built in:

- ``microsoft`` (msal): authorization code with a loopback redirect, device code, and
  client credentials for app-only access;
- ``google``: authorization code (with PKCE) and refresh;
- ``oidc``: any provider that follows the standards, found by OpenID Connect discovery
  from ``--authority`` or given by its endpoints.

and, through ``register_host_overrides``, Microsoft 365's hosts per cloud.

Every HTTPS request goes through :func:`http_session`, which verifies exactly like the
mail connections do (:func:`mailhost.tls.client_context`): the system trust store plus
the credential's CA file, whatever ``$REQUESTS_CA_BUNDLE`` says.
"""
from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import http.server
import json
import secrets
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from .hookspecs import hookimpl
from .protocols import HostOverride
from .tls import client_context

if TYPE_CHECKING:
    import requests

__all__ = [
    "FLOWS",
    "ClientConfig",
    "Interaction",
    "LoopbackRedirect",
    "OAuthError",
    "OAuthProvider",
    "TokenSet",
    "http_session",
    "register_host_overrides",
    "register_oauth_providers",
]

#: The flows a credential may use, as ``--flow`` names them.
FLOWS: Final = ("authorization-code", "device-code", "client-credentials")

_RESERVED_SCOPES: Final = frozenset({"openid", "profile", "offline_access", "email"})


# ---------------------------------------------------------------------------------------
# What a provider is given and returns
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientConfig:
    """A client registration at a provider, as stored, with the secret decrypted.

    ``client_secret`` is a secret: a provider must never log it. ``authority`` is the
    provider's base URL (Microsoft: ``https://login.microsoftonline.com``; OpenID
    Connect: the issuer); the endpoints, when given, override what discovery finds.
    """

    name: str
    provider: str
    client_id: str
    client_secret: str | None = field(default=None, repr=False)
    tenant: str | None = None
    authority: str | None = None
    authorization_endpoint: str | None = None
    token_endpoint: str | None = None
    scopes: tuple[str, ...] = ()
    flow: str = "authorization-code"
    ca_file: str | None = None
    timeout: float = 30.0


@dataclass(frozen=True)
class TokenSet:
    """Tokens from one grant. ``identity`` is who signed in (from the ID token), when
    the provider says; ``refresh_at`` is the provider's hint to renew before expiry;
    ``public`` records that the tokens were issued to a public client (no secret), so
    renewals must not send one."""

    access_token: str = field(repr=False)
    expires_at: dt.datetime
    obtained_at: dt.datetime
    refresh_token: str | None = field(default=None, repr=False)
    scope: str = ""
    identity: str | None = None
    refresh_at: dt.datetime | None = None
    public: bool = False

    @classmethod
    def from_response(cls, body: Mapping[str, Any], now: dt.datetime, public: bool = False,
                      identity: str | None = None) -> TokenSet:
        """Read an RFC 6749 §5.1 token response."""
        token = body.get("access_token")
        if not isinstance(token, str) or not token:
            raise OAuthError("invalid_response", "the token response holds no access_token")
        try:
            lifetime = int(body.get("expires_in", 3600))
        except (TypeError, ValueError):
            lifetime = 3600
        refresh_in = body.get("refresh_in")
        refresh_at = now + dt.timedelta(seconds=int(refresh_in)) if isinstance(refresh_in, int) else None
        if identity is None and isinstance(body.get("id_token"), str):
            identity = _identity(_jwt_claims(body["id_token"]))
        return cls(
            access_token=token,
            expires_at=now + dt.timedelta(seconds=max(lifetime, 0)),
            obtained_at=now,
            refresh_token=body.get("refresh_token") or None,
            scope=str(body.get("scope") or ""),
            identity=identity,
            refresh_at=refresh_at,
            public=public,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (secrets included: encrypt it)."""
        out = dataclasses.asdict(self)
        for key in ("expires_at", "obtained_at", "refresh_at"):
            out[key] = out[key].isoformat() if out[key] else None
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TokenSet:
        """Inverse of :meth:`to_dict`."""
        values: dict[str, Any] = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}
        for key in ("expires_at", "obtained_at", "refresh_at"):
            if values.get(key):
                values[key] = dt.datetime.fromisoformat(values[key])
        return cls(**values)


class OAuthError(Exception):
    """The provider refused, or could not be asked.

    ``kind`` is what the host acts on:

    - ``client_secret_expired``: the client secret expired (Microsoft AADSTS7000222);
    - ``invalid_client``: the client ID or secret is wrong;
    - ``invalid_grant``: the refresh token or code was revoked or expired: authorize again;
    - ``interaction_required``: consent or MFA is needed: authorize again;
    - ``unavailable``: the provider did not answer, or answered 5xx/429: try again later;
    - ``tls``: its certificate is not trusted;
    - anything else: refused for another reason (``invalid_scope``, ``access_denied``, ...).

    ``code`` is the provider's own code when it has one (``AADSTS7000222``) and
    ``description`` its words, first sentence only.
    """

    TEMPORARY: Final = frozenset({"unavailable", "temporarily_unavailable", "server_error", "slow_down"})

    def __init__(self, kind: str, description: str = "", code: str | None = None) -> None:
        self.kind = kind
        self.description = description
        self.code = code
        super().__init__(f"{kind}: {description}" if description else kind)

    @property
    def temporary(self) -> bool:
        """Whether asking again later may work."""
        return self.kind in self.TEMPORARY


@dataclass
class Interaction:
    """How a flow reaches the admin who runs ``mailhost oauth authorize``.

    ``show`` prints one line for the admin (a URL to open, a device code to enter);
    ``open_url`` opens a browser on a URL and returns whether it could (``None``: no
    browser, the admin opens the URL shown). ``redirect_port`` is the loopback port of
    the authorization code flow (0: any free port).
    """

    show: Callable[[str], None]
    open_url: Callable[[str], object] | None = None
    redirect_port: int = 0
    timeout: float = 300.0


@dataclass(frozen=True)
class OAuthProvider:
    """An identity platform a plugin offers, registered through ``register_oauth_providers``.

    ``authorize(config, interaction, username)`` runs ``config.flow`` once with an admin
    (``username`` is a login hint; client credentials need no admin) and returns the
    tokens. ``refresh(config, tokens)`` renews them without an admin: with the refresh
    token, or for client credentials by asking again. ``configure(config)`` checks a new
    or changed credential and fills in defaults (scopes, endpoints); it raises
    ``ValueError`` with a sentence naming the option to fix. ``flows`` lists the flows
    the provider supports, the default first.
    """

    name: str
    authorize: Callable[[ClientConfig, Interaction, str | None], TokenSet]
    refresh: Callable[[ClientConfig, TokenSet], TokenSet]
    title: str = ""
    flows: tuple[str, ...] = ("authorization-code",)
    configure: Callable[[ClientConfig], ClientConfig] | None = None
    #: The plugin that registered it; filled in by the host.
    plugin: str = ""

    def __post_init__(self) -> None:
        unknown = set(self.flows) - set(FLOWS)
        if unknown or not self.flows:
            raise ValueError(
                f"OAuth2 provider {self.name!r} declares flows {sorted(self.flows)}; choose from {list(FLOWS)}"
            )


# ---------------------------------------------------------------------------------------
# HTTPS that verifies like every other mailhost link
# ---------------------------------------------------------------------------------------


def http_session(ca_file: str | None = None, timeout: float = 30.0) -> requests.Session:
    """A requests session that trusts the system store plus ``ca_file``, and nothing else.

    requests replaces a session's ``verify`` with ``$REQUESTS_CA_BUNDLE`` (or
    ``$CURL_CA_BUNDLE``) on every request when the environment sets it, so msal's
    ``verify=`` would silently lose the credential's CA file. This session verifies with
    :func:`mailhost.tls.client_context` on every request instead, refuses plain
    ``http://`` and gives every request a timeout.
    """
    import requests
    from requests.adapters import BaseAdapter, HTTPAdapter

    context = client_context(ca_file)

    class VerifyingAdapter(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            kwargs["ssl_context"] = context
            super().init_poolmanager(*args, **kwargs)

        def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
            kwargs["ssl_context"] = context
            return super().proxy_manager_for(proxy, **kwargs)

        def send(self, request: Any, stream: bool = False, timeout: Any = None, verify: Any = True,
                 cert: Any = None, proxies: Any = None) -> Any:
            # verify=True whatever requests merged in: a path would be loaded into the context.
            return super().send(request, stream=stream, timeout=timeout or session_timeout,
                                verify=True, cert=cert, proxies=proxies)

    class RefusingAdapter(BaseAdapter):
        def send(self, request: Any, *args: Any, **kwargs: Any) -> Any:
            raise OAuthError("insecure", f"{request.url} is not https://: OAuth2 endpoints must use TLS")

        def close(self) -> None:
            pass

    session_timeout = timeout
    session = requests.Session()
    session.mount("https://", VerifyingAdapter())
    session.mount("http://", RefusingAdapter())
    return session


def _call(what: str, url: str, send: Callable[[], requests.Response]) -> requests.Response:
    """Run one HTTP exchange; transport failures become :class:`OAuthError`."""
    import requests

    try:
        return send()
    except requests.exceptions.SSLError as exc:
        raise OAuthError("tls", _tls_reason(exc, url)) from None
    except requests.exceptions.Timeout:
        raise OAuthError("unavailable", f"{what} at {url} did not answer in time") from None
    except requests.exceptions.ConnectionError as exc:
        raise OAuthError("unavailable", f"cannot reach {what} at {url} ({_root_cause(exc)})") from None
    except requests.exceptions.RequestException as exc:
        raise OAuthError("unavailable", f"{what} at {url} failed ({_root_cause(exc)})") from None


def _chain(exc: BaseException) -> Iterable[BaseException]:
    """``exc`` and what it wraps (causes, contexts, urllib3's wrapped reasons), once each."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        wrapped = (current.__cause__, current.__context__, getattr(current, "reason", None), *current.args)
        todo += [e for e in wrapped if isinstance(e, BaseException)]


def _tls_reason(exc: BaseException, url: str) -> str:
    import ssl

    for cause in _chain(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"the TLS certificate of {url} is not trusted ({cause.verify_message})"
    return f"TLS with {url} failed ({_root_cause(exc)})"


def _root_cause(exc: BaseException) -> str:
    cause = list(_chain(exc))[-1]
    reason = getattr(cause, "strerror", None) or str(cause)
    return str(reason).strip() or type(cause).__name__


def _json(response: requests.Response, what: str) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        if response.status_code >= 500 or response.status_code == 429:
            raise OAuthError("unavailable", f"{what} answered HTTP {response.status_code}")
        raise OAuthError("invalid_response", f"{what} answered HTTP {response.status_code} without JSON")
    return body


def _now() -> dt.datetime:
    # Through the store's clock, so that tests can move time for the whole host.
    from . import oauth

    return oauth.utcnow()


# ---------------------------------------------------------------------------------------
# The loopback redirect of the authorization code flow (RFC 8252 §7.3)
# ---------------------------------------------------------------------------------------


class LoopbackRedirect:
    """A one-shot HTTP listener on 127.0.0.1 that receives the authorization response.

    ::

        with LoopbackRedirect(port) as redirect:
            url = build_url(redirect_uri=redirect.uri)
            params = redirect.wait(timeout)
    """

    def __init__(self, port: int = 0) -> None:
        self._params: dict[str, str] | None = None
        self._done = threading.Event()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                self._answer(dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query)))

            def do_POST(self) -> None:  # noqa: N802 - response_mode=form_post
                length = int(self.headers.get("Content-Length") or 0)
                self._answer(dict(urllib.parse.parse_qsl(self.rfile.read(min(length, 1 << 16)).decode("utf-8"))))

            def _answer(self, params: dict[str, str]) -> None:
                if not params:
                    self.send_error(404)
                    return
                ok = "code" in params
                body = (b"<html><body><p>mailhost: the authorization is complete; "
                        b"you can close this window.</p></body></html>" if ok else
                        b"<html><body><p>mailhost: the authorization failed; see the terminal.</p></body></html>")
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                if owner._params is None:
                    owner._params = params
                    owner._done.set()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # the request holds the authorization code: never log it

        try:
            self._server = http.server.HTTPServer(("127.0.0.1", port), Handler)
        except OSError as exc:
            raise OAuthError("redirect", f"cannot listen on 127.0.0.1:{port} for the redirect "
                                         f"({exc.strerror}): give another --redirect-port") from None
        self.port = self._server.server_address[1]
        self.uri = f"http://127.0.0.1:{self.port}/"
        self._thread = threading.Thread(target=self._server.serve_forever, name="oauth-redirect", daemon=True)

    def __enter__(self) -> LoopbackRedirect:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def wait(self, timeout: float) -> dict[str, str]:
        """The query of the redirect; OAuthError if none came within ``timeout`` s."""
        if not self._done.wait(timeout):
            raise OAuthError("timeout", f"no authorization response reached {self.uri} within {timeout:g} s")
        assert self._params is not None
        if "error" in self._params:
            raise OAuthError(self._params["error"], self._params.get("error_description", ""))
        return self._params


def _show_url(interaction: Interaction, url: str) -> None:
    opened = False
    if interaction.open_url is not None:
        try:
            opened = bool(interaction.open_url(url))
        except Exception:  # a missing browser is not an error: the URL is shown
            opened = False
    interaction.show(("A browser window was opened; if it was not, open this URL to sign in: " if opened
                      else "Open this URL in a browser to sign in: ") + url)


# ---------------------------------------------------------------------------------------
# Standard OAuth2 (RFC 6749, 7636, 8628): Google and any OpenID Connect provider
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Endpoints:
    authorization: str | None
    token: str
    device_authorization: str | None = None


class _StandardClient:
    """The flows of RFC 6749 with PKCE (RFC 7636) and the device grant (RFC 8628)."""

    def __init__(self, config: ClientConfig, endpoints: _Endpoints, what: str,
                 extra_authorize: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.endpoints = endpoints
        self.what = what
        self.extra_authorize = dict(extra_authorize or {})
        self.http = http_session(config.ca_file, config.timeout)

    # -- grants ---------------------------------------------------------------------

    def authorization_code(self, interaction: Interaction, username: str | None) -> TokenSet:
        if not self.endpoints.authorization:
            raise OAuthError("unsupported", f"{self.what} has no authorization endpoint: give --authorization-endpoint")
        verifier = secrets.token_urlsafe(48)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        state = secrets.token_urlsafe(16)
        with LoopbackRedirect(interaction.redirect_port) as redirect:
            query = {
                "response_type": "code",
                "client_id": self.config.client_id,
                "redirect_uri": redirect.uri,
                "scope": " ".join(self.config.scopes),
                "state": state,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
                **self.extra_authorize,
            }
            if username:
                query["login_hint"] = username
            _show_url(interaction, _with_query(self.endpoints.authorization, query))
            params = redirect.wait(interaction.timeout)
        if params.get("state") != state:
            raise OAuthError("invalid_state", "the authorization response does not belong to this request")
        return self._token({
            "grant_type": "authorization_code",
            "code": params.get("code", ""),
            "redirect_uri": redirect.uri,
            "code_verifier": verifier,
        }, public=not self.config.client_secret)

    def device_code(self, interaction: Interaction) -> TokenSet:
        url = self.endpoints.device_authorization
        if not url:
            raise OAuthError("unsupported", f"{self.what} offers no device authorization endpoint: "
                                            "use --flow authorization-code")
        body = self._post(url, {"scope": " ".join(self.config.scopes)}, authenticate=True)
        if "error" in body:
            raise _standard_error(body)
        interaction.show(body.get("message") or (
            f"Open {body.get('verification_uri_complete') or body.get('verification_uri')} "
            f"and enter the code {body.get('user_code')}"))
        interval = max(int(body.get("interval", 5)), 1)
        deadline = time.monotonic() + min(float(body.get("expires_in", 900)), interaction.timeout)
        while True:
            try:
                return self._token({
                    "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
                    "device_code": body.get("device_code", ""),
                }, public=not self.config.client_secret)
            except OAuthError as exc:
                if exc.kind == "slow_down":
                    interval += 5
                elif exc.kind != "authorization_pending":
                    raise
            if time.monotonic() + interval > deadline:
                raise OAuthError("expired_token", "the device code expired before it was entered")
            time.sleep(interval)

    def client_credentials(self) -> TokenSet:
        return self._token({"grant_type": "client_credentials", "scope": " ".join(self.config.scopes)})

    def refresh(self, tokens: TokenSet) -> TokenSet:
        if self.config.flow == "client-credentials" or not tokens.refresh_token:
            if self.config.flow == "client-credentials":
                return self.client_credentials()
            raise OAuthError("invalid_grant", "no refresh token was issued (the offline_access scope may be missing)")
        data = {"grant_type": "refresh_token", "refresh_token": tokens.refresh_token}
        fresh = self._token(data, public=tokens.public, identity=tokens.identity)
        # RFC 6749 §6: the provider MAY issue a new refresh token; keep the old one if not.
        return fresh if fresh.refresh_token else dataclasses.replace(fresh, refresh_token=tokens.refresh_token)

    # -- plumbing -------------------------------------------------------------------

    def _token(self, data: dict[str, str], public: bool = False, identity: str | None = None) -> TokenSet:
        """Ask the token endpoint; a public client (no secret, or tokens issued to one) sends
        only its client_id."""
        body = self._post(self.endpoints.token, data, authenticate=not public)
        if "error" in body:
            raise _standard_error(body)
        return TokenSet.from_response(body, _now(), public=public, identity=identity)

    def _post(self, url: str, data: dict[str, str], authenticate: bool) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        auth = None
        if authenticate and self.config.client_secret:
            # client_secret_basic (RFC 6749 §2.3.1), which every provider must support
            auth = (urllib.parse.quote(self.config.client_id, safe=""),
                    urllib.parse.quote(self.config.client_secret, safe=""))
        elif "client_id" not in data:
            data = {**data, "client_id": self.config.client_id}
        response = _call(self.what, url, lambda: self.http.post(url, data=data, headers=headers, auth=auth))
        return _json(response, f"{self.what} at {url}")


def _standard_error(body: Mapping[str, Any]) -> OAuthError:
    error = str(body.get("error") or "error")
    return OAuthError(error, _first_sentence(str(body.get("error_description") or "")))


def _with_query(url: str, query: Mapping[str, str]) -> str:
    return url + ("&" if urllib.parse.urlsplit(url).query else "?") + urllib.parse.urlencode(query)


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    for stop in (". ", "\r", "\n"):
        if stop in text:
            text = text.split(stop, 1)[0]
    return text.rstrip(".")[:300]


def _jwt_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT, unverified: only for display (who signed in)."""
    try:
        payload = token.split(".")[1]
        return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return {}


def _identity(claims: Mapping[str, Any]) -> str | None:
    for key in ("preferred_username", "email", "upn", "unique_name"):
        if isinstance(claims.get(key), str) and claims[key]:
            return str(claims[key])
    return None


# -- google ---------------------------------------------------------------------------

# https://developers.google.com/identity/protocols/oauth2/native-app (loopback redirect,
# PKCE, access_type=offline) and https://developers.google.com/gmail/imap/xoauth2-protocol
# (the scope for IMAP, POP and SMTP is https://mail.google.com/).
GOOGLE_AUTHORIZATION: Final = "https://accounts.google.com/o/oauth2/v2/auth"
GOOGLE_TOKEN: Final = "https://oauth2.googleapis.com/token"
GOOGLE_SCOPES: Final = ("https://mail.google.com/", "openid", "email")


def _google_configure(config: ClientConfig) -> ClientConfig:
    if config.flow != "authorization-code":
        raise ValueError(
            "Google signs mailboxes in with --flow authorization-code only (Gmail's scope is not "
            "offered to the device flow, and service accounts use another grant)"
        )
    return dataclasses.replace(
        config,
        authorization_endpoint=config.authorization_endpoint or GOOGLE_AUTHORIZATION,
        token_endpoint=config.token_endpoint or GOOGLE_TOKEN,
        scopes=config.scopes or GOOGLE_SCOPES,
    )


def _google_client(config: ClientConfig) -> _StandardClient:
    config = _google_configure(config)
    assert config.token_endpoint
    # prompt=consent: Google issues a refresh token only on a consent screen.
    return _StandardClient(config, _Endpoints(config.authorization_endpoint, config.token_endpoint),
                           "Google's token service", {"access_type": "offline", "prompt": "consent"})


def _google_authorize(config: ClientConfig, interaction: Interaction, username: str | None) -> TokenSet:
    return _google_client(config).authorization_code(interaction, username)


def _google_refresh(config: ClientConfig, tokens: TokenSet) -> TokenSet:
    return _google_client(config).refresh(tokens)


# -- oidc -----------------------------------------------------------------------------


def _oidc_configure(config: ClientConfig) -> ClientConfig:
    if not config.authority and not config.token_endpoint:
        raise ValueError(
            "an OpenID Connect credential needs --authority URL (the issuer, for discovery) "
            "or --token-endpoint URL (and --authorization-endpoint URL for the authorization code flow)"
        )
    for label, url in (("--authority", config.authority), ("--token-endpoint", config.token_endpoint),
                       ("--authorization-endpoint", config.authorization_endpoint)):
        if url and urllib.parse.urlsplit(url).scheme != "https":
            raise ValueError(f"{label} {url} is not an https:// URL: OAuth2 endpoints must use TLS")
    scopes = config.scopes
    if not scopes and config.flow != "client-credentials":
        scopes = ("openid", "email", "offline_access")
    return dataclasses.replace(config, scopes=scopes)


def _oidc_endpoints(config: ClientConfig, http: requests.Session) -> _Endpoints:
    """Endpoints given, else found by OpenID Connect Discovery 1.0 §4 from the issuer."""
    found: dict[str, Any] = {}
    if config.authority and not (config.token_endpoint and config.authorization_endpoint):
        url = config.authority.rstrip("/") + "/.well-known/openid-configuration"
        response = _call("OpenID Connect discovery", url, lambda: http.get(url, headers={"Accept": "application/json"}))
        if response.status_code != 200:
            raise OAuthError("discovery", f"{url} answered HTTP {response.status_code}: check --authority")
        found = _json(response, f"OpenID Connect discovery at {url}")
    token = config.token_endpoint or found.get("token_endpoint")
    if not token:
        raise OAuthError("discovery", f"no token endpoint for {config.authority}: give --token-endpoint")
    return _Endpoints(config.authorization_endpoint or found.get("authorization_endpoint"), token,
                      found.get("device_authorization_endpoint"))


def _oidc_client(config: ClientConfig) -> _StandardClient:
    config = _oidc_configure(config)
    client = _StandardClient(config, _Endpoints(None, ""), "the OpenID Connect provider")
    client.endpoints = _oidc_endpoints(config, client.http)
    return client


def _oidc_authorize(config: ClientConfig, interaction: Interaction, username: str | None) -> TokenSet:
    client = _oidc_client(config)
    if config.flow == "client-credentials":
        return client.client_credentials()
    if config.flow == "device-code":
        return client.device_code(interaction)
    return client.authorization_code(interaction, username)


def _oidc_refresh(config: ClientConfig, tokens: TokenSet) -> TokenSet:
    return _oidc_client(config).refresh(tokens)


# ---------------------------------------------------------------------------------------
# Microsoft: msal, and the clouds of Microsoft 365
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Cloud:
    name: str
    title: str
    authority: str
    exchange: str  # the resource of Exchange Online's IMAP/POP/SMTP scopes
    exchange_app: str  # the resource of its app-only ".default" scope
    imap: str
    smtp: str
    graph: str

    def scopes(self, protocol: str) -> tuple[str, ...]:
        return {
            "imap": (f"{self.exchange}/IMAP.AccessAsUser.All", "offline_access"),
            "pop3": (f"{self.exchange}/POP.AccessAsUser.All", "offline_access"),
            "smtp": (f"{self.exchange}/SMTP.Send", "offline_access"),
            "graph": (f"https://{self.graph}/Mail.ReadWrite", f"https://{self.graph}/Mail.Send", "offline_access"),
        }[protocol]

    @property
    def mail_scopes(self) -> tuple[str, ...]:
        """IMAP, POP and SMTP at once: one resource, so one token serves all three."""
        return (*(self.scopes(p)[0] for p in ("imap", "pop3", "smtp")), "offline_access")


# Where these come from (Microsoft's documentation):
# - Sign-in authorities per cloud: "Microsoft Graph national cloud deployments", App
#   registration and token service root endpoints (https://learn.microsoft.com/graph/deployments):
#   login.microsoftonline.com (global), login.microsoftonline.us (US Government, both GCC
#   High and DoD), China: login.chinacloudapi.cn, whose preferred name in Microsoft's
#   instance discovery metadata is login.partner.microsoftonline.cn (also listed, ID 17, in
#   "Microsoft 365 operated by 21Vianet endpoints").
# - Graph hosts, same page: graph.microsoft.com; GCC High graph.microsoft.us; DoD
#   dod-graph.microsoft.us; China microsoftgraph.chinacloudapi.cn. GCC (moderate) uses the
#   worldwide endpoints.
# - Exchange Online hosts and ports per cloud: "Microsoft 365 URLs and IP address ranges"
#   (worldwide: outlook.office365.com), "Microsoft 365 U.S. Government GCC High endpoints"
#   (ID 5: outlook.office365.us, TCP 143, 25, 587, 993, 995), "... DoD endpoints" (ID 4:
#   outlook-dod.office365.us, the same ports), "Microsoft 365 operated by 21Vianet
#   endpoints" (ID 1: *.partner.outlook.cn; IMAP/POP at partner.outlook.cn, SMTP submission
#   at smtp.partner.outlook.cn:587). Worldwide SMTP AUTH submission is smtp.office365.com:587
#   ("How to set up a multifunction device or application to send email using Microsoft 365").
# - Scopes: "Authenticate an IMAP, POP or SMTP connection using OAuth"
#   (https://learn.microsoft.com/exchange/client-developer/legacy-protocols/how-to-authenticate-an-imap-pop-smtp-application-by-using-oauth):
#   https://outlook.office.com/IMAP.AccessAsUser.All, .../POP.AccessAsUser.All,
#   .../SMTP.Send, offline_access; app-only: https://outlook.office365.com/.default. In a
#   national cloud a scope's resource is that cloud's own host ("Access national cloud
#   deployments with the Microsoft Graph SDKs": scopes MUST use the national cloud's domain):
#   outlook.office365.us, outlook-dod.office365.us, partner.outlook.cn.
_CLOUDS: Final = (
    _Cloud("global", "Microsoft 365 (worldwide, including GCC)", "https://login.microsoftonline.com",
           "https://outlook.office.com", "https://outlook.office365.com",
           "outlook.office365.com", "smtp.office365.com", "graph.microsoft.com"),
    _Cloud("gcc-high", "Microsoft 365 GCC High (US Government)", "https://login.microsoftonline.us",
           "https://outlook.office365.us", "https://outlook.office365.us",
           "outlook.office365.us", "outlook.office365.us", "graph.microsoft.us"),
    _Cloud("dod", "Microsoft 365 DoD (US Government)", "https://login.microsoftonline.us",
           "https://outlook-dod.office365.us", "https://outlook-dod.office365.us",
           "outlook-dod.office365.us", "outlook-dod.office365.us", "dod-graph.microsoft.us"),
    _Cloud("china", "Microsoft 365 operated by 21Vianet (China)", "https://login.partner.microsoftonline.cn",
           "https://partner.outlook.cn", "https://partner.outlook.cn",
           "partner.outlook.cn", "smtp.partner.outlook.cn", "microsoftgraph.chinacloudapi.cn"),
)


def _cloud_of(authority: str) -> _Cloud | None:
    host = (urllib.parse.urlsplit(authority).hostname or "").lower()
    aliases = {"login.chinacloudapi.cn": "login.partner.microsoftonline.cn",
               "login.windows.net": "login.microsoftonline.com", "login.microsoft.com": "login.microsoftonline.com"}
    host = aliases.get(host, host)
    return next((c for c in _CLOUDS if urllib.parse.urlsplit(c.authority).hostname == host), None)


def _microsoft_configure(config: ClientConfig) -> ClientConfig:
    authority = (config.authority or "").strip()
    cloud = next((c for c in _CLOUDS if c.name == authority.lower()), None)
    if cloud is not None:  # --authority gcc-high: a cloud by its host override name
        authority = cloud.authority
    authority = authority or _CLOUDS[0].authority
    parts = urllib.parse.urlsplit(authority)
    if parts.scheme != "https" or not parts.hostname:
        names = ", ".join(c.name for c in _CLOUDS)
        raise ValueError(f"--authority {authority} is not an https:// URL nor a Microsoft cloud ({names})")
    tenant = config.tenant
    path = parts.path.strip("/")
    if path:  # https://login.microsoftonline.com/contoso.onmicrosoft.com
        if tenant and tenant != path:
            raise ValueError(f"--authority {authority} names tenant {path}, --tenant says {tenant}: give one")
        tenant, authority = path, f"{parts.scheme}://{parts.netloc}"
    authority = authority.rstrip("/")
    if config.flow == "client-credentials":
        if not config.client_secret:
            raise ValueError("the client credentials flow needs the client secret: give --client-secret-env VAR, "
                             "--client-secret-file F or --client-secret-stdin")
        if not tenant or tenant.lower() in ("common", "organizations", "consumers"):
            raise ValueError("app-only access (--flow client-credentials) needs your directory: give --tenant "
                             "with the tenant ID or domain (contoso.onmicrosoft.com)")
    tenant = tenant or "organizations"
    cloud = cloud or _cloud_of(authority) or _CLOUDS[0]
    scopes = config.scopes
    if not scopes:
        scopes = (f"{cloud.exchange_app}/.default",) if config.flow == "client-credentials" else cloud.mail_scopes
    if config.flow == "client-credentials" and not all(s.endswith("/.default") for s in scopes):
        raise ValueError("app-only access asks for a resource's .default scope, like "
                         f"{cloud.exchange_app}/.default: fix --scope")
    return dataclasses.replace(config, authority=authority, tenant=tenant, scopes=tuple(scopes))


def _msal_app(config: ClientConfig, public: bool) -> Any:
    """An msal application on :func:`http_session`; creating it fetches the authority's
    discovery document."""
    import msal

    config = _microsoft_configure(config)
    assert config.authority
    host = urllib.parse.urlsplit(config.authority).hostname or ""
    kwargs: dict[str, Any] = {
        "authority": f"{config.authority}/{config.tenant}",
        "http_client": http_session(config.ca_file, config.timeout),
        # An authority Microsoft does not know (a private test authority, Azure Stack)
        # must not be looked up at login.microsoftonline.com.
        "instance_discovery": None if host in msal.authority.WELL_KNOWN_AUTHORITY_HOSTS else False,
    }
    if public or not config.client_secret:
        return _msal_run(config.authority, lambda: msal.PublicClientApplication(config.client_id, **kwargs))
    return _msal_run(config.authority, lambda: msal.ConfidentialClientApplication(
        config.client_id, client_credential=config.client_secret, **kwargs))


def _msal_run(what: str, call: Callable[[], Any]) -> Any:
    """Call msal; network failures and error responses become OAuthError."""
    import requests

    try:
        result = call()
    except OAuthError:
        raise
    except requests.exceptions.SSLError as exc:
        raise OAuthError("tls", _tls_reason(exc, what)) from None
    except requests.exceptions.RequestException as exc:
        raise OAuthError("unavailable", f"cannot reach {what} ({_root_cause(exc)})") from None
    except ValueError as exc:  # msal: a discovery document it cannot use, an argument it refuses
        raise OAuthError("discovery", _first_sentence(str(exc))) from None
    if isinstance(result, dict) and "error" in result:
        raise _microsoft_error(result)
    if result is None:
        raise OAuthError("invalid_response", f"{what} gave no answer")
    return result


def _microsoft_error(result: Mapping[str, Any]) -> OAuthError:
    """Microsoft's error body: ``error``, ``error_description`` ("AADSTS7000222: ..."),
    ``error_codes`` ([7000222]). Reference: "Microsoft Entra authentication and
    authorization error codes" (https://learn.microsoft.com/entra/identity-platform/reference-error-codes)."""
    error = str(result.get("error") or "error")
    description = str(result.get("error_description") or "")
    codes = [int(c) for c in result.get("error_codes") or [] if str(c).isdigit()]
    if not codes and description.startswith("AADSTS"):
        head = description[6:].split(":", 1)[0]
        codes = [int(head)] if head.isdigit() else []
    code = f"AADSTS{codes[0]}" if codes else None
    if 7000222 in codes:
        kind = "client_secret_expired"
    elif error == "invalid_client" or 7000215 in codes or 7000218 in codes:
        kind = "invalid_client"
    elif error in ("interaction_required", "consent_required", "login_required"):
        kind = "interaction_required"
    elif error in ("temporarily_unavailable", "server_error"):
        kind = "unavailable"
    else:
        kind = error
    text = description.split(":", 1)[1] if code and description.startswith(code) else description
    return OAuthError(kind, _first_sentence(text), code)


def _microsoft_tokens(result: Mapping[str, Any], public: bool, identity: str | None = None) -> TokenSet:
    claims = result.get("id_token_claims")
    if identity is None and isinstance(claims, Mapping):
        identity = _identity(claims)
    return TokenSet.from_response(result, _now(), public=public, identity=identity)


def _user_scopes(config: ClientConfig) -> list[str]:
    # msal adds openid, profile and offline_access itself and refuses them as input.
    return [s for s in config.scopes if s not in _RESERVED_SCOPES]


def _microsoft_authorize(config: ClientConfig, interaction: Interaction, username: str | None) -> TokenSet:
    config = _microsoft_configure(config)
    what = f"Microsoft's token service at {config.authority}"
    if config.flow == "client-credentials":
        app = _msal_app(config, public=False)
        result = _msal_run(what, lambda: app.acquire_token_for_client(scopes=list(config.scopes)))
        return _microsoft_tokens(result, False)
    if config.flow == "device-code":
        # The device flow is a public client flow: the app registration must allow public
        # client flows, and the secret is not sent.
        app = _msal_app(config, public=True)
        flow = _msal_run(what, lambda: app.initiate_device_flow(scopes=_user_scopes(config)))
        interaction.show(flow.get("message")
                         or f"Open {flow.get('verification_uri')} and enter the code {flow.get('user_code')}")
        flow["expires_at"] = min(float(flow.get("expires_at", 0)), time.time() + interaction.timeout)
        return _microsoft_tokens(_msal_run(what, lambda: app.acquire_token_by_device_flow(flow)), True)
    public = not config.client_secret
    app = _msal_app(config, public=public)
    with LoopbackRedirect(interaction.redirect_port) as redirect:
        # form_post keeps the code out of the browser's history (RFC 9700 §4.3.1).
        flow = _msal_run(what, lambda: app.initiate_auth_code_flow(
            _user_scopes(config), redirect_uri=redirect.uri, login_hint=username, response_mode="form_post"))
        _show_url(interaction, flow["auth_uri"])
        params = redirect.wait(interaction.timeout)
    return _microsoft_tokens(_msal_run(what, lambda: app.acquire_token_by_auth_code_flow(flow, params)), public)


def _microsoft_refresh(config: ClientConfig, tokens: TokenSet) -> TokenSet:
    config = _microsoft_configure(config)
    what = f"Microsoft's token service at {config.authority}"
    if config.flow == "client-credentials":
        app = _msal_app(config, public=False)
        result = _msal_run(what, lambda: app.acquire_token_for_client(scopes=list(config.scopes)))
        return _microsoft_tokens(result, False)
    if not tokens.refresh_token:
        raise OAuthError("invalid_grant", "no refresh token was issued (the offline_access scope may be missing)")
    app = _msal_app(config, public=tokens.public)
    result = _msal_run(what, lambda: app.acquire_token_by_refresh_token(tokens.refresh_token, _user_scopes(config)))
    fresh = _microsoft_tokens(result, tokens.public, identity=tokens.identity)
    return fresh if fresh.refresh_token else dataclasses.replace(fresh, refresh_token=tokens.refresh_token)


# ---------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------

BUILTIN_PROVIDERS: Final = (
    OAuthProvider("microsoft", _microsoft_authorize, _microsoft_refresh,
                  title="Microsoft identity platform (Microsoft 365, Outlook.com)", flows=FLOWS,
                  configure=_microsoft_configure),
    OAuthProvider("google", _google_authorize, _google_refresh, title="Google (Gmail, Google Workspace)",
                  flows=("authorization-code",), configure=_google_configure),
    OAuthProvider("oidc", _oidc_authorize, _oidc_refresh, title="Any OpenID Connect provider", flows=FLOWS,
                  configure=_oidc_configure),
)


@hookimpl
def register_oauth_providers(register: Callable[[OAuthProvider], None]) -> None:
    """Register ``microsoft``, ``google`` and ``oidc``."""
    for provider in BUILTIN_PROVIDERS:
        register(provider)


def _overrides() -> Iterable[HostOverride]:
    for cloud in _CLOUDS:
        for protocol, host, port in (("imap", cloud.imap, None), ("pop3", cloud.imap, None),
                                     ("smtp", cloud.smtp, 587), ("graph", cloud.graph, None)):
            yield HostOverride(provider="microsoft", protocol=protocol, name=cloud.name, host=host,
                               title=cloud.title, port=port, authority=cloud.authority,
                               scopes=cloud.scopes(protocol))


@hookimpl
def register_host_overrides(register: Callable[[HostOverride], None]) -> None:
    """Register Microsoft 365's hosts: worldwide, GCC High, DoD and 21Vianet."""
    for override in _overrides():
        register(override)
