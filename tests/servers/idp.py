"""A local HTTPS identity provider for the OAuth2 tests.

:class:`IdentityProvider` listens on 127.0.0.1 (a free port) with a certificate from
:func:`tests.servers.certs.make_pki`, in a background thread, and keeps everything in
memory. It follows:

- RFC 6749 (OAuth 2.0): the authorization code, refresh token and client credentials
  grants (§4.1, §6, §4.4), client authentication by ``client_secret_basic`` and
  ``client_secret_post`` (§2.3.1), error responses (§5.2: 400, or 401 for
  ``invalid_client``);
- RFC 7636 (PKCE, ``S256`` and ``plain``), RFC 8628 (device authorization grant, with
  ``authorization_pending``), RFC 7662 (token introspection, the caller authenticated
  with HTTP Basic), RFC 7009 (token revocation);
- OpenID Connect Discovery 1.0 (``.well-known/openid-configuration``) and Core 1.0 (an
  RS256 ID token with ``preferred_username``, ``nonce``; keys at ``jwks_uri``), and OAuth
  2.0 Form Post Response Mode (``response_mode=form_post``, what msal asks for);
- the Microsoft identity platform v2.0 shapes, so msal works against it with
  ``instance_discovery=False``: ``/{tenant}/v2.0/.well-known/openid-configuration``,
  ``/{tenant}/oauth2/v2.0/{authorize,token,devicecode}``, ``client_info`` (msal sends
  ``client_info=1``), and error bodies with ``error_codes`` and AADSTS descriptions:
  7000215 (wrong secret), 7000222 (expired secret), 700016 (unknown app), 70008
  (expired grant), 50173 (revoked grant), 70000 (refresh token used twice).

Behaviour tests drive from Python: :meth:`add_client` (``secret_expired=True`` to
simulate AADSTS7000222), :meth:`add_user` (with mailboxes the user may open as a
delegate), :meth:`revoke_user` (an admin's "revoke sessions"), :meth:`advance` (move
the provider's clock: no sleeping), :meth:`approve_device`, :meth:`answer_next` (a
provider that misbehaves: garbage, a redirect, odd values), :meth:`hold_next` (a slow
provider: a request waits until the test releases it), and records of what was
asked (:meth:`grants`, :attr:`introspections`, :attr:`posts`: every POST body as received).

Refresh tokens rotate by default: each refresh issues a new one and a replayed old one
is refused (as strict providers do). ``GET ...authorize`` signs in without a page: as
``login_hint`` when that user exists, else as :attr:`default_user`, answering with a 302
to the ``redirect_uri`` carrying the code (or, for ``form_post``, the auto-submitting
form a browser would post there).

An extension for the shared-mailbox tests: ``POST .../introspect?as=MAILBOX`` says the
token is active, with ``username`` MAILBOX, only if the token's user may open MAILBOX
(Exchange checks the delegate's rights this way when the SASL user is a shared
mailbox); a Dovecot ``oauth2`` passdb per shared mailbox points there.
"""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import html
import http.server
import json
import secrets
import ssl
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from .certs import Pki

__all__ = ["Client", "Hold", "IdentityProvider", "User"]

DEFAULT_TENANT = "mailhost-test"


@dataclass
class Client:
    """An app registration."""

    client_id: str
    secret: str | None = None
    secret_expired: bool = False
    public: bool = False  # allows public client flows (device code, PKCE without a secret)


@dataclass
class User:
    """A user who can sign in, and the mailboxes they may open as a delegate."""

    username: str
    mailboxes: set[str] = field(default_factory=set)
    oid: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass
class Hold:
    """Requests held back by :meth:`IdentityProvider.hold_next`."""

    #: Set when a held request has reached the provider (the client is waiting for it).
    arrived: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)
    timeout: float = 30.0

    def release(self) -> None:
        """Let the held requests be processed and answered as usual."""
        self.released.set()


@dataclass
class _Grant:
    """What a token stands for."""

    user: str | None  # None: app-only
    client_id: str
    scope: str
    public: bool = False
    family: str = field(default_factory=lambda: uuid.uuid4().hex)


class _OAuthError(Exception):
    def __init__(self, status: int, error: str, description: str, code: int | None = None) -> None:
        super().__init__(description)
        self.status, self.error, self.description, self.code = status, error, description, code


class IdentityProvider:
    """The provider (see the module docstring). ``with IdentityProvider(pki) as idp: ...``"""

    host = "127.0.0.1"

    def __init__(self, pki: Pki, *, tenant: str = DEFAULT_TENANT, access_token_lifetime: int = 3600,
                 rotate_refresh_tokens: bool = True) -> None:
        self.pki = pki
        self.tenant = tenant
        self.access_token_lifetime = access_token_lifetime
        self.rotate_refresh_tokens = rotate_refresh_tokens
        self.clients: dict[str, Client] = {}
        self.users: dict[str, User] = {}
        self.resource_servers: dict[str, str] = {}
        self.default_user: str | None = None
        self.requests: list[dict[str, Any]] = []
        self.introspections: list[dict[str, Any]] = []
        #: Every POST as received (path, form, HTTP Basic user and password): what reached this host.
        self.posts: list[dict[str, Any]] = []
        self._canned: dict[str, list[tuple[int, bytes, dict[str, str]]]] = {}
        self._holds: dict[str, list[Hold]] = {}
        self._offset = 0.0
        self._lock = threading.RLock()
        self._access: dict[str, tuple[_Grant, float]] = {}  # token -> grant, expiry
        self._refresh: dict[str, _Grant] = {}
        self._used_refresh: dict[str, _Grant] = {}
        self._revoked_families: set[str] = set()
        self._codes: dict[str, dict[str, Any]] = {}
        self._devices: dict[str, dict[str, Any]] = {}  # device_code -> state
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._kid = uuid.uuid4().hex[:8]
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> IdentityProvider:
        """Listen on 127.0.0.1 and a free port (HTTPS)."""
        if self._server is not None:
            return self
        owner = self

        class Handler(_Handler):
            idp = owner

        server = http.server.ThreadingHTTPServer((self.host, 0), Handler)
        server.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.pki.cert_file, self.pki.key_file)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="test-idp", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> IdentityProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "the identity provider is not started"
        return self._server.server_address[1]

    @property
    def authority(self) -> str:
        """The base URL, as msal's ``authority`` host part (``https://127.0.0.1:PORT``)."""
        return f"https://{self.host}:{self.port}"

    def issuer(self, tenant: str | None = None) -> str:
        """The OpenID Connect issuer of a tenant (discovery lives below it)."""
        return f"{self.authority}/{tenant or self.tenant}/v2.0"

    def endpoint(self, name: str, tenant: str | None = None) -> str:
        """``authorize``, ``token``, ``devicecode``, ``introspect`` or ``revoke``."""
        return f"{self.authority}/{tenant or self.tenant}/oauth2/v2.0/{name}"

    @property
    def ca_file(self) -> str:
        """The CA that signs the provider's certificate."""
        return self.pki.ca_file

    # -- what tests set up ----------------------------------------------------------------

    def add_client(self, client_id: str | None = None, secret: str | None = None, *, public: bool = False,
                   secret_expired: bool = False) -> Client:
        """Register an app; ``secret=None`` and ``public=True`` for a public client."""
        client = Client(client_id or str(uuid.uuid4()), secret, secret_expired, public or secret is None)
        with self._lock:
            self.clients[client.client_id] = client
        return client

    def expire_secret(self, client_id: str, expired: bool = True) -> None:
        """Make the client's secret expired (the token endpoint answers AADSTS7000222)."""
        with self._lock:
            self.clients[client_id].secret_expired = expired

    def set_secret(self, client_id: str, secret: str) -> None:
        """Give the client a new, valid secret."""
        with self._lock:
            self.clients[client_id].secret, self.clients[client_id].secret_expired = secret, False

    def add_user(self, username: str, mailboxes: set[str] | frozenset[str] = frozenset()) -> User:
        """A user who can sign in; ``mailboxes``: shared mailboxes they may open."""
        user = User(username.lower(), {m.lower() for m in mailboxes})
        with self._lock:
            self.users[user.username] = user
            self.default_user = self.default_user or user.username
        return user

    def add_resource_server(self, name: str, secret: str) -> str:
        """Credentials a mail server uses to call the introspection endpoint; returns the
        introspection URL with them in its userinfo (Dovecot's form)."""
        with self._lock:
            self.resource_servers[name] = secret
        netloc = f"{urllib.parse.quote(name)}:{urllib.parse.quote(secret)}@{self.host}:{self.port}"
        return f"https://{netloc}/{self.tenant}/oauth2/v2.0/introspect"

    def revoke_user(self, username: str) -> None:
        """Revoke every token of a user (an admin's "revoke sessions")."""
        with self._lock:
            for grants in (self._refresh, self._used_refresh):
                for grant in grants.values():
                    if grant.user == username.lower():
                        self._revoked_families.add(grant.family)
            for grant, _ in self._access.values():
                if grant.user == username.lower():
                    self._revoked_families.add(grant.family)

    def advance(self, seconds: float) -> None:
        """Move the provider's clock forward (tokens expire without sleeping)."""
        with self._lock:
            self._offset += seconds

    def now(self) -> float:
        """The provider's clock (epoch seconds)."""
        return time.time() + self._offset

    def approve_device(self, user_code: str, username: str | None = None) -> None:
        """Enter a device flow's user code as ``username`` (default: :attr:`default_user`)."""
        with self._lock:
            for state in self._devices.values():
                if state["user_code"] == user_code:
                    state["user"] = (username or self.default_user or "").lower()
                    return
        raise KeyError(f"no device flow with user code {user_code}")

    def answer_next(self, route: str, status: int, body: Any = b"", headers: dict[str, str] | None = None,
                    times: int = 1) -> None:
        """Make the next ``times`` requests to ``route`` (``token``, ``devicecode``,
        ``authorize`` or ``openid-configuration``) get this answer instead: a provider that
        misbehaves (garbage, a redirect, odd values). ``body``: bytes as is, else JSON."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        content_type = "text/html" if isinstance(body, bytes) else "application/json"
        with self._lock:
            self._canned.setdefault(route, []).extend(
                [(status, data, {"Content-Type": content_type, **(headers or {})})] * times)

    def hold_next(self, route: str, times: int = 1, timeout: float = 30.0) -> Hold:
        """Make the next ``times`` POSTs to ``route`` (``token``, ``devicecode``, ...) wait,
        before anything is done with them, until :meth:`Hold.release` (at most ``timeout``
        seconds): a slow provider. Then each is processed and answered as usual."""
        hold = Hold(timeout=timeout)
        with self._lock:
            self._holds.setdefault(route, []).extend([hold] * times)
        return hold

    def _wait_if_held(self, route: str) -> None:
        name = route.rsplit("/", 1)[-1]
        with self._lock:
            queue = self._holds.get(name)
            hold = queue.pop(0) if queue else None
        if hold is not None:  # outside the lock: the provider keeps answering others meanwhile
            hold.arrived.set()
            hold.released.wait(hold.timeout)

    def _take_canned(self, route: str) -> tuple[int, bytes, dict[str, str]] | None:
        name = route.rsplit("/", 1)[-1]
        with self._lock:
            queue = self._canned.get(name)
            return queue.pop(0) if queue else None

    # -- what tests inspect ---------------------------------------------------------------

    def grants(self, grant_type: str | None = None, client_id: str | None = None) -> list[dict[str, Any]]:
        """Token endpoint requests (successful or not), optionally of one grant type."""
        with self._lock:
            return [r for r in self.requests if r.get("path") == "token"
                    and (grant_type is None or r.get("grant_type") == grant_type)
                    and (client_id is None or r.get("client_id") == client_id)]

    def is_active(self, access_token: str) -> bool:
        """Whether an access token would be accepted now."""
        return self.introspect(access_token)["active"]

    def introspect(self, access_token: str, as_mailbox: str | None = None) -> dict[str, Any]:
        """RFC 7662 §2.2 for an access token (what the endpoint answers)."""
        with self._lock:
            found = self._access.get(access_token)
            if found is None:
                return {"active": False}
            grant, expiry = found
            if grant.family in self._revoked_families or expiry <= self.now():
                return {"active": False}
            username = grant.user or grant.client_id
            if as_mailbox is not None:
                user = self.users.get(grant.user or "")
                mailbox = as_mailbox.lower()
                if user is None or (mailbox != user.username and mailbox not in user.mailboxes):
                    return {"active": False}
                username = mailbox
            return {"active": True, "token_type": "Bearer", "scope": grant.scope, "client_id": grant.client_id,
                    "username": username, "sub": grant.user or grant.client_id, "exp": int(expiry),
                    "iat": int(expiry - self.access_token_lifetime), "iss": self.issuer()}

    # -- the endpoints ----------------------------------------------------------------------

    def _discovery(self, tenant: str) -> dict[str, Any]:
        base = f"{self.authority}/{tenant}"
        return {
            "issuer": f"{base}/v2.0",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "introspection_endpoint": f"{base}/oauth2/v2.0/introspect",
            "revocation_endpoint": f"{base}/oauth2/v2.0/revoke",
            "jwks_uri": f"{base}/discovery/v2.0/keys",
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials",
                                      "urn:ietf:params:oauth:grant-type:device_code"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "code_challenge_methods_supported": ["S256", "plain"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
        }

    def _jwks(self) -> dict[str, Any]:
        numbers = self._key.public_key().public_numbers()
        return {"keys": [{"kty": "RSA", "use": "sig", "alg": "RS256", "kid": self._kid,
                          "n": _b64(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
                          "e": _b64(numbers.e.to_bytes(3, "big"))}]}

    def _authorize(self, tenant: str, query: dict[str, str]) -> str:
        """The redirect URL for a GET of the authorization endpoint."""
        with self._lock:
            client = self.clients.get(query.get("client_id", ""))
            redirect_uri = query.get("redirect_uri", "")
            parsed = urllib.parse.urlsplit(redirect_uri)
            if client is None or parsed.hostname not in ("127.0.0.1", "localhost") or parsed.scheme != "http":
                raise _OAuthError(400, "invalid_request", "AADSTS700016: unknown application or redirect URI", 700016)
            hint = (query.get("login_hint") or "").lower()
            user = hint if hint in self.users else self.default_user
            if user is None:
                return _with_query(redirect_uri, {"error": "access_denied", "error_description": "no user signed in",
                                                  "state": query.get("state", "")})
            code = secrets.token_urlsafe(24)
            self._codes[code] = {
                "client_id": client.client_id, "redirect_uri": redirect_uri, "user": user,
                "scope": query.get("scope", ""), "nonce": query.get("nonce"), "tenant": tenant,
                "challenge": query.get("code_challenge"), "method": query.get("code_challenge_method", "plain"),
            }
        return _with_query(redirect_uri, {"code": code, "state": query.get("state", ""),
                                          "client_info": _client_info(self.users[user].oid, tenant)})

    def _device(self, tenant: str, form: dict[str, str], basic: tuple[str, str] | None) -> dict[str, Any]:
        with self._lock:
            client = self.clients.get(basic[0] if basic else form.get("client_id", ""))
            if client is None:
                raise _OAuthError(400, "unauthorized_client", "AADSTS700016: Application not found", 700016)
            secret = basic[1] if basic else form.get("client_secret")
            if secret is not None:
                self._check_secret(client, secret, basic is not None)
            elif not client.public:
                raise _OAuthError(400, "invalid_client", "AADSTS7000218: The request body must contain "
                                  "'client_assertion' or 'client_secret' (public client flows are off)", 7000218)
            device_code = secrets.token_urlsafe(24)
            user_code = "-".join(secrets.token_hex(2).upper() for _ in range(2))
            self._devices[device_code] = {"client_id": client.client_id, "scope": form.get("scope", ""),
                                          "user_code": user_code, "user": None, "tenant": tenant,
                                          "expires": self.now() + 900}
        uri = f"{self.authority}/{tenant}/oauth2/v2.0/deviceauth"
        return {"device_code": device_code, "user_code": user_code, "verification_uri": uri, "expires_in": 900,
                "interval": 1, "message": f"To sign in, use a web browser to open the page {uri} and enter "
                                          f"the code {user_code} to authenticate."}

    def _token(self, tenant: str, form: dict[str, str], basic: tuple[str, str] | None) -> dict[str, Any]:
        grant_type = form.get("grant_type", "")
        client_id = basic[0] if basic else form.get("client_id", "")
        record = {"path": "token", "grant_type": grant_type, "client_id": client_id, "tenant": tenant,
                  "scope": form.get("scope"), "ok": False}
        with self._lock:
            self.requests.append(record)
            client = self.clients.get(client_id)
            if client is None:
                raise _OAuthError(400, "unauthorized_client",
                                  f"AADSTS700016: Application with identifier '{client_id}' was not found in the "
                                  f"directory '{tenant}'.", 700016)
            secret = basic[1] if basic else form.get("client_secret")
            confidential = secret is not None
            if confidential:
                self._check_secret(client, secret, basic is not None)
            if grant_type == "client_credentials":
                if not confidential:
                    raise _OAuthError(401, "invalid_client", "AADSTS7000218: The request body must contain the "
                                      "following parameter: 'client_assertion' or 'client_secret'.", 7000218)
                answer = self._issue(_Grant(None, client.client_id, _clean(form.get("scope", ""))), refresh=False)
            elif grant_type == "authorization_code":
                answer = self._code_grant(client, form, confidential)
            elif grant_type == "refresh_token":
                answer = self._refresh_grant(client, form, confidential)
            elif grant_type in ("urn:ietf:params:oauth:grant-type:device_code", "device_code"):
                answer = self._device_grant(client, form, confidential)
            else:
                raise _OAuthError(400, "unsupported_grant_type", f"AADSTS70003: grant type {grant_type!r}", 70003)
            record["ok"] = True
            if form.get("client_info") == "1" and answer.get("_user"):
                answer["client_info"] = _client_info(self.users[answer["_user"]].oid, tenant)
            answer.pop("_user", None)
            return answer

    def _check_secret(self, client: Client, secret: str | None, basic: bool) -> None:
        if client.secret is None or secret != client.secret:
            raise _OAuthError(401, "invalid_client",
                              "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the "
                              "request is the client secret value, not the client secret ID, for a secret added to "
                              f"app '{client.client_id}'.", 7000215)
        if client.secret_expired:
            raise _OAuthError(401, "invalid_client",
                              f"AADSTS7000222: The provided client secret keys for app '{client.client_id}' are "
                              "expired. Visit the Azure portal to create new keys for your app: "
                              "https://aka.ms/NewClientSecret, or consider using certificate credentials for added "
                              "security: https://aka.ms/certCreds.", 7000222)

    def _code_grant(self, client: Client, form: dict[str, str], confidential: bool) -> dict[str, Any]:
        code = self._codes.pop(form.get("code", ""), None)
        if code is None or code["client_id"] != client.client_id:
            raise _OAuthError(400, "invalid_grant", "AADSTS70008: The provided authorization code or refresh token "
                              "has expired due to inactivity.", 70008)
        if code["redirect_uri"] != form.get("redirect_uri"):
            raise _OAuthError(400, "invalid_grant", "AADSTS50148: The redirect_uri does not match.", 50148)
        if code["challenge"]:
            verifier = form.get("code_verifier", "")
            expected = (_b64(hashlib.sha256(verifier.encode()).digest()) if code["method"] == "S256" else verifier)
            if expected != code["challenge"]:
                raise _OAuthError(400, "invalid_grant", "AADSTS501481: The Code_Verifier does not match the "
                                  "code_challenge supplied in the authorization request.", 501481)
        elif not confidential:
            raise _OAuthError(401, "invalid_client", "AADSTS7000218: a public client must use PKCE", 7000218)
        grant = _Grant(code["user"], client.client_id, _clean(code["scope"]), public=not confidential)
        return self._issue(grant, refresh="offline_access" in code["scope"].split(),
                           id_token="openid" in code["scope"].split(), nonce=code["nonce"], tenant=code["tenant"])

    def _refresh_grant(self, client: Client, form: dict[str, str], confidential: bool) -> dict[str, Any]:
        token = form.get("refresh_token", "")
        grant = self._refresh.get(token)
        if grant is None and token in self._used_refresh:
            # A rotated refresh token used again: strict providers revoke the whole grant.
            self._revoked_families.add(self._used_refresh[token].family)
            raise _OAuthError(400, "invalid_grant", "AADSTS70000: The provided grant has already been used "
                              "(refresh token reuse).", 70000)
        if grant is None or grant.client_id != client.client_id:
            raise _OAuthError(400, "invalid_grant", "AADSTS70008: The provided authorization code or refresh token "
                              "has expired due to inactivity.", 70008)
        if grant.family in self._revoked_families:
            raise _OAuthError(400, "invalid_grant", "AADSTS50173: The provided grant has expired due to it being "
                              "revoked, a fresh auth token is needed.", 50173)
        if not grant.public and not confidential:
            raise _OAuthError(401, "invalid_client", "AADSTS7000218: The request body must contain the following "
                              "parameter: 'client_assertion' or 'client_secret'.", 7000218)
        if grant.public and confidential:
            raise _OAuthError(401, "invalid_client", "AADSTS700025: Client is public so neither 'client_assertion' "
                              "nor 'client_secret' should be presented.", 700025)
        if self.rotate_refresh_tokens:
            self._used_refresh[token] = self._refresh.pop(token)
        return self._issue(grant, refresh=self.rotate_refresh_tokens, keep_refresh=token,
                           id_token="openid" in (form.get("scope") or "").split())

    def _device_grant(self, client: Client, form: dict[str, str], confidential: bool) -> dict[str, Any]:
        state = self._devices.get(form.get("device_code", ""))
        if state is None or state["client_id"] != client.client_id:
            raise _OAuthError(400, "invalid_grant", "AADSTS70000: unknown device code", 70000)
        if state["expires"] <= self.now():
            raise _OAuthError(400, "expired_token", "AADSTS70020: The provided value for the input parameter "
                              "'device_code' is no longer valid.", 70020)
        if state["user"] is None:
            raise _OAuthError(400, "authorization_pending", "AADSTS70016: OAuth 2.0 device flow error. "
                              "Authorization is pending. Continue polling.", 70016)
        del self._devices[form["device_code"]]
        grant = _Grant(state["user"], client.client_id, _clean(state["scope"]), public=not confidential)
        return self._issue(grant, refresh="offline_access" in state["scope"].split(),
                           id_token="openid" in state["scope"].split(), tenant=state["tenant"])

    def _issue(self, grant: _Grant, refresh: bool, id_token: bool = False, nonce: str | None = None,
               keep_refresh: str | None = None, tenant: str | None = None) -> dict[str, Any]:
        access = "at-" + secrets.token_urlsafe(24)
        expiry = self.now() + self.access_token_lifetime
        self._access[access] = (grant, expiry)
        answer: dict[str, Any] = {"token_type": "Bearer", "access_token": access, "scope": grant.scope,
                                  "expires_in": self.access_token_lifetime,
                                  "ext_expires_in": self.access_token_lifetime, "_user": grant.user}
        if refresh:
            token = "rt-" + secrets.token_urlsafe(32)
            self._refresh[token] = grant
            answer["refresh_token"] = token
        elif keep_refresh is not None:
            answer["refresh_token"] = keep_refresh
        if id_token and grant.user:
            answer["id_token"] = self._id_token(grant, nonce, tenant or self.tenant)
        return answer

    def _id_token(self, grant: _Grant, nonce: str | None, tenant: str) -> str:
        now = int(self.now())
        claims = {"iss": self.issuer(tenant), "aud": grant.client_id, "sub": self.users[grant.user or ""].oid,
                  "oid": self.users[grant.user or ""].oid, "tid": tenant, "iat": now, "nbf": now, "exp": now + 3600,
                  "preferred_username": grant.user, "name": grant.user, "ver": "2.0"}
        if nonce:
            claims["nonce"] = nonce
        header = {"typ": "JWT", "alg": "RS256", "kid": self._kid}
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64(signature)}"

    def _introspect(self, form: dict[str, str], basic: tuple[str, str] | None,
                    as_mailbox: str | None) -> dict[str, Any]:
        with self._lock:
            allowed = basic is not None and (
                self.resource_servers.get(basic[0]) == basic[1]
                or (basic[0] in self.clients and self.clients[basic[0]].secret == basic[1]))
            if not allowed:
                raise _OAuthError(401, "invalid_client", "introspection needs the caller's credentials (HTTP Basic)")
            answer = self.introspect(form.get("token", ""), as_mailbox)
            self.introspections.append({"caller": basic[0], "as": as_mailbox, "active": answer["active"],
                                        "username": answer.get("username")})
            return answer

    def _revoke(self, form: dict[str, str]) -> None:
        with self._lock:
            token = form.get("token", "")
            grant = self._refresh.get(token) or (self._access.get(token) or (None,))[0]
            if grant is not None:
                self._revoked_families.add(grant.family)


class _Handler(http.server.BaseHTTPRequestHandler):
    idp: IdentityProvider
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        parts = urllib.parse.urlsplit(self.path)
        tenant, route = _route(parts.path)
        query = dict(urllib.parse.parse_qsl(parts.query))
        if self._canned(route):
            return
        try:
            if route in ("v2.0/.well-known/openid-configuration", ".well-known/openid-configuration"):
                self._json(200, self.idp._discovery(tenant))
            elif route == "discovery/v2.0/keys":
                self._json(200, self.idp._jwks())
            elif route == "oauth2/v2.0/authorize":
                target = self.idp._authorize(tenant, query)
                if query.get("response_mode") == "form_post":  # OAuth 2.0 Form Post Response Mode
                    action, _, fields = target.partition("?")
                    inputs = "".join(f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}"/>'
                                     for k, v in urllib.parse.parse_qsl(fields))
                    page = (f'<html><body onload="document.forms[0].submit()"><form method="post" '
                            f'action="{html.escape(action)}">{inputs}</form></body></html>').encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(page)))
                    self.end_headers()
                    self.wfile.write(page)
                    return
                self.send_response(302)
                self.send_header("Location", target)
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self._json(404, {"error": "not_found", "error_description": f"no endpoint {parts.path}"})
        except _OAuthError as exc:
            self._error(exc)

    def do_POST(self) -> None:  # noqa: N802
        parts = urllib.parse.urlsplit(self.path)
        tenant, route = _route(parts.path)
        length = int(self.headers.get("Content-Length") or 0)
        form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode("utf-8")))
        basic = _basic(self.headers.get("Authorization"))
        query = dict(urllib.parse.parse_qsl(parts.query))
        with self.idp._lock:
            self.idp.posts.append({"path": parts.path, "form": form, "basic": basic})
        self.idp._wait_if_held(route)
        if self._canned(route):
            return
        try:
            if route == "oauth2/v2.0/token":
                self._json(200, self.idp._token(tenant, form, basic))
            elif route == "oauth2/v2.0/devicecode":
                self._json(200, self.idp._device(tenant, form, basic))
            elif route == "oauth2/v2.0/introspect":
                self._json(200, self.idp._introspect(form, basic, query.get("as")))
            elif route == "oauth2/v2.0/revoke":
                self.idp._revoke(form)
                self._json(200, {})
            else:
                self._json(404, {"error": "not_found", "error_description": f"no endpoint {parts.path}"})
        except _OAuthError as exc:
            self._error(exc)

    def _canned(self, route: str) -> bool:
        """Send the answer a test set with :meth:`IdentityProvider.answer_next`, if any."""
        canned = self.idp._take_canned(route)
        if canned is None:
            return False
        status, data, headers = canned
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
        return True

    def _error(self, exc: _OAuthError) -> None:
        now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
        trace = str(uuid.uuid4())
        body: dict[str, Any] = {
            "error": exc.error,
            "error_description": f"{exc.description}\r\nTrace ID: {trace}\r\nCorrelation ID: {uuid.uuid4()}\r\n"
                                 f"Timestamp: {now}",
            "timestamp": now, "trace_id": trace, "correlation_id": str(uuid.uuid4()),
        }
        if exc.code is not None:
            body["error_codes"] = [exc.code]
            body["error_uri"] = f"{self.idp.authority}/error?code={exc.code}"
        headers = {"WWW-Authenticate": 'Basic realm="token"'} if exc.status == 401 else {}
        self._json(exc.status, body, headers)

    def _json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


def _route(path: str) -> tuple[str, str]:
    """``/{tenant}/rest`` -> (tenant, rest)."""
    parts = path.strip("/").split("/", 1)
    return (parts[0], parts[1]) if len(parts) == 2 else ("", parts[0])


def _basic(header: str | None) -> tuple[str, str] | None:
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        user, _, password = base64.b64decode(header[6:].strip()).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return urllib.parse.unquote(user), urllib.parse.unquote(password)


def _clean(scope: str) -> str:
    """The granted scopes: what was asked, without the OpenID Connect ones."""
    return " ".join(s for s in scope.split() if s not in ("openid", "profile", "email", "offline_access"))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _client_info(oid: str, tenant: str) -> str:
    return _b64(json.dumps({"uid": oid, "utid": tenant}).encode())


def _with_query(url: str, query: dict[str, str]) -> str:
    return url + ("&" if "?" in url else "?") + urllib.parse.urlencode(query)
