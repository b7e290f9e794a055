"""The flows of the built-in OAuth2 providers of :mod:`mailhost.oauth_providers`.

``microsoft`` runs on msal; ``google`` and ``oidc`` on the standard flows here
(authorization code with PKCE and a loopback redirect, device code, client credentials,
refresh). Every request goes through :func:`http_session`. The providers registered at
start-up import this module when they are first asked for tokens, so that requests, msal
and http.server do not load with every ``mailhost`` command.
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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from .oauth_providers import (  # the checks of a credential, shared with the plugin
    ClientConfig,
    Interaction,
    OAuthError,
    TokenSet,
    _google_configure,
    _identity,
    _microsoft_configure,
    _oidc_configure,
)
from .tls import client_context

if TYPE_CHECKING:
    import requests

__all__ = [
    "LoopbackRedirect",
    "google_authorize",
    "google_refresh",
    "http_session",
    "microsoft_authorize",
    "microsoft_refresh",
    "oidc_authorize",
    "oidc_refresh",
]

_RESERVED_SCOPES: Final = frozenset({"openid", "profile", "offline_access", "email"})


# ---------------------------------------------------------------------------------------
# HTTPS that verifies like every other mailhost link
# ---------------------------------------------------------------------------------------


def http_session(ca_file: str | None = None, timeout: float = 30.0) -> requests.Session:
    """A requests session that trusts the system store plus ``ca_file``, and nothing else.

    requests replaces a session's ``verify`` with ``$REQUESTS_CA_BUNDLE`` (or
    ``$CURL_CA_BUNDLE``) on every request when the environment sets it, so msal's
    ``verify=`` would silently lose the credential's CA file. This session verifies with
    :func:`mailhost.tls.client_context` on every request instead, refuses plain
    ``http://``, follows no redirect and gives every request a timeout.
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

    def refuse_redirect(response: requests.Response, *args: Any, **kwargs: Any) -> None:
        # requests would POST the body again to the new place (307/308), refresh token and
        # client secret included: an endpoint answers itself or not at all.
        if response.is_redirect:
            raise OAuthError("redirected", f"{response.url} answered with a redirect (HTTP "
                             f"{response.status_code}) to {response.headers.get('Location')}, which is not "
                             "followed so that no secret goes elsewhere: give the endpoint itself")

    session_timeout = timeout
    session = requests.Session()
    session.mount("https://", VerifyingAdapter())
    session.mount("http://", RefusingAdapter())
    session.hooks["response"].append(refuse_redirect)
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
        self._lock = threading.Lock()
        #: The ``state`` of the request under way (:meth:`expect`): answers without it are
        #: not this sign-in's, and do not end it.
        self.state: str | None = None
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = 10  # a connection that sends nothing (a browser's spare one) ends

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                self._answer(dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query)))

            def do_POST(self) -> None:  # noqa: N802 - response_mode=form_post
                length = int(self.headers.get("Content-Length") or 0)
                self._answer(dict(urllib.parse.parse_qsl(self.rfile.read(min(length, 1 << 16)).decode("utf-8"))))

            def _answer(self, params: dict[str, str]) -> None:
                if not params:
                    self.send_error(404)
                    return
                if owner.state is not None and params.get("state") != owner.state:
                    # Any local program can reach the port: its "?error=..." must not end
                    # the sign-in the admin is completing in the browser.
                    body = b"mailhost: this is not the answer to the sign-in it is waiting for; ignored"
                    self.send_response(400)
                    self.send_header("Content-Type", "text/plain; charset=utf-8")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
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
                with owner._lock:  # the first answer counts, whichever thread brings it
                    if owner._params is None:
                        owner._params = params
                        owner._done.set()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # the request holds the authorization code: never log it

        try:
            # One thread per connection: an idle connection to the port must not keep the
            # browser's redirect waiting, nor shutdown() from ending the listener.
            self._server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
            self._server.daemon_threads = True
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

    def expect(self, state: str) -> None:
        """Take only answers that carry ``state`` (the one in the authorization request)."""
        self.state = state

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
            redirect.expect(state)
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


# -- google ---------------------------------------------------------------------------


def _google_client(config: ClientConfig) -> _StandardClient:
    config = _google_configure(config)
    assert config.token_endpoint
    # prompt=consent: Google issues a refresh token only on a consent screen.
    return _StandardClient(config, _Endpoints(config.authorization_endpoint, config.token_endpoint),
                           "Google's token service", {"access_type": "offline", "prompt": "consent"})


def google_authorize(config: ClientConfig, interaction: Interaction, username: str | None) -> TokenSet:
    return _google_client(config).authorization_code(interaction, username)


def google_refresh(config: ClientConfig, tokens: TokenSet) -> TokenSet:
    return _google_client(config).refresh(tokens)


# -- oidc -----------------------------------------------------------------------------


def _origin(url: str) -> tuple[str, str, int | None]:
    """Scheme, host and port of ``url`` (https's 443 spelled out or not)."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else None)
    except ValueError:  # a port that is no number: it matches nothing
        port = -1
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


def _oidc_endpoints(config: ClientConfig, http: requests.Session) -> _Endpoints:
    """Endpoints given, else found by OpenID Connect Discovery 1.0 §4 from the issuer."""
    found: dict[str, Any] = {}
    if config.authority and not (config.token_endpoint and config.authorization_endpoint):
        url = config.authority.rstrip("/") + "/.well-known/openid-configuration"
        response = _call("OpenID Connect discovery", url, lambda: http.get(url, headers={"Accept": "application/json"}))
        if response.status_code != 200:
            raise OAuthError("discovery", f"{url} answered HTTP {response.status_code}: check --authority")
        found = _json(response, f"OpenID Connect discovery at {url}")
        # §4.3: a document of another server must not be used (its token endpoint would get
        # the client secret and the refresh token). The server, not the path: Microsoft's
        # issuer names the tenant's id where the authority may name "common" or a domain.
        if _origin(str(found.get("issuer") or "")) != _origin(config.authority):
            raise OAuthError("discovery", f"{url} is the configuration of issuer {found.get('issuer')!r}, not of "
                                          f"{config.authority}: check --authority")
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


def oidc_authorize(config: ClientConfig, interaction: Interaction, username: str | None) -> TokenSet:
    client = _oidc_client(config)
    if config.flow == "client-credentials":
        return client.client_credentials()
    if config.flow == "device-code":
        return client.device_code(interaction)
    return client.authorization_code(interaction, username)


def oidc_refresh(config: ClientConfig, tokens: TokenSet) -> TokenSet:
    return _oidc_client(config).refresh(tokens)


# -- microsoft (msal) -----------------------------------------------------------------


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
    except json.JSONDecodeError:  # msal: an answer that is not JSON (an error page, a proxy's)
        raise OAuthError("invalid_response", f"{what} answered without JSON") from None
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


def _microsoft_app_only(config: ClientConfig, what: str) -> TokenSet:
    """A token for the app itself (client credentials): no user, no refresh token;
    authorizing and renewing are the same request."""
    app = _msal_app(config, public=False)
    return _microsoft_tokens(_msal_run(what, lambda: app.acquire_token_for_client(scopes=list(config.scopes))), False)


def microsoft_authorize(config: ClientConfig, interaction: Interaction, username: str | None) -> TokenSet:
    config = _microsoft_configure(config)
    what = f"Microsoft's token service at {config.authority}"
    if config.flow == "client-credentials":
        return _microsoft_app_only(config, what)
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
        redirect.expect(str(flow["state"]))
        _show_url(interaction, flow["auth_uri"])
        params = redirect.wait(interaction.timeout)
    return _microsoft_tokens(_msal_run(what, lambda: app.acquire_token_by_auth_code_flow(flow, params)), public)


def microsoft_refresh(config: ClientConfig, tokens: TokenSet) -> TokenSet:
    config = _microsoft_configure(config)
    what = f"Microsoft's token service at {config.authority}"
    if config.flow == "client-credentials":
        return _microsoft_app_only(config, what)
    if not tokens.refresh_token:
        raise OAuthError("invalid_grant", "no refresh token was issued (the offline_access scope may be missing)")
    app = _msal_app(config, public=tokens.public)
    result = _msal_run(what, lambda: app.acquire_token_by_refresh_token(tokens.refresh_token, _user_scopes(config)))
    fresh = _microsoft_tokens(result, tokens.public, identity=tokens.identity)
    return fresh if fresh.refresh_token else dataclasses.replace(fresh, refresh_token=tokens.refresh_token)
