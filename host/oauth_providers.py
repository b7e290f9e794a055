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

This module is the ``oauth`` plugin and is imported at every start-up, so it holds only
the types, the clouds and the checks of a new credential; the flows themselves (requests,
msal, the loopback listener) are in :mod:`mailhost.oauth_flows`, imported when a provider
is first asked for tokens. Every HTTPS request goes through
:func:`~mailhost.oauth_flows.http_session`, which verifies exactly like the mail
connections do (:func:`mailhost.tls.client_context`): the system trust store plus the
credential's CA file, whatever ``$REQUESTS_CA_BUNDLE`` says.
"""
from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import re
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from .hookspecs import hookimpl
from .protocols import HostOverride

if TYPE_CHECKING:
    from .oauth_flows import LoopbackRedirect, http_session

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
#: The longest token lifetime taken from a provider, in seconds (a year).
_LONGEST: Final = 366 * 24 * 3600


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
        except (TypeError, ValueError, OverflowError):
            lifetime = 3600
        refresh_in = body.get("refresh_in")
        refresh_at = (now + dt.timedelta(seconds=min(max(refresh_in, 0), _LONGEST)) if isinstance(refresh_in, int)
                      and not isinstance(refresh_in, bool) else None)
        if identity is None and isinstance(body.get("id_token"), str):
            identity = _identity(_jwt_claims(body["id_token"]))
        refresh_token = body.get("refresh_token")
        return cls(
            access_token=token,
            # A lifetime beyond any date (garbage) is renewed within a year instead.
            expires_at=now + dt.timedelta(seconds=min(max(lifetime, 0), _LONGEST)),
            obtained_at=now,
            refresh_token=refresh_token if isinstance(refresh_token, str) and refresh_token else None,
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
    - ``invalid_response``: it answered something that is not a token response (an error
      page, a proxy's login page): try again later too;
    - ``tls``: its certificate is not trusted;
    - anything else: refused for another reason (``invalid_scope``, ``access_denied``, ...).

    ``code`` is the provider's own code when it has one (``AADSTS7000222``) and
    ``description`` its words, first sentence only.
    """

    TEMPORARY: Final = frozenset({"unavailable", "invalid_response", "temporarily_unavailable", "server_error",
                                  "slow_down"})

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


# Who signed in, from an ID token (TokenSet.from_response).
def _jwt_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT, unverified: only for display (who signed in)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}


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


def _is_https_url(url: str) -> bool:
    """Whether ``url`` is https:// with a host and a valid port."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        return False
    return parts.scheme == "https" and bool(parts.hostname)


def _check_urls(config: ClientConfig) -> None:
    """Refuse an authority or endpoint that is not an https:// URL one can connect to."""
    for label, url in (("--authority", config.authority), ("--token-endpoint", config.token_endpoint),
                       ("--authorization-endpoint", config.authorization_endpoint)):
        if url and not _is_https_url(url):
            raise ValueError(f"{label} {url} is not an https:// URL with a host and a valid port: OAuth2 "
                             "endpoints must use TLS")


def _google_configure(config: ClientConfig) -> ClientConfig:
    _no_tenant(config)
    if config.flow != "authorization-code":
        raise ValueError(
            "Google signs mailboxes in with --flow authorization-code only (Gmail's scope is not "
            "offered to the device flow, and service accounts use another grant)"
        )
    _check_urls(config)
    return dataclasses.replace(
        config,
        authorization_endpoint=config.authorization_endpoint or GOOGLE_AUTHORIZATION,
        token_endpoint=config.token_endpoint or GOOGLE_TOKEN,
        scopes=config.scopes or GOOGLE_SCOPES,
    )


# -- oidc -----------------------------------------------------------------------------


def _oidc_configure(config: ClientConfig) -> ClientConfig:
    _no_tenant(config)
    if not config.authority and not config.token_endpoint:
        raise ValueError(
            "an OpenID Connect credential needs --authority URL (the issuer, for discovery) "
            "or --token-endpoint URL (and --authorization-endpoint URL for the authorization code flow)"
        )
    _check_urls(config)
    scopes = config.scopes
    if not scopes and config.flow != "client-credentials":
        scopes = ("openid", "email", "offline_access")
    return dataclasses.replace(config, scopes=scopes)


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


#: A directory's ID (a GUID) or one of its domain names; also common, organizations, consumers.
_TENANT = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*$")


def _no_tenant(config: ClientConfig) -> None:
    if config.tenant:
        raise ValueError(f"--tenant applies to Microsoft credentials only ({config.provider} has no tenants): "
                         "leave it out")


def _microsoft_configure(config: ClientConfig) -> ClientConfig:
    authority = (config.authority or "").strip()
    cloud = next((c for c in _CLOUDS if c.name == authority.lower()), None)
    if cloud is not None:  # --authority gcc-high: a cloud by its host override name
        authority = cloud.authority
    authority = authority or _CLOUDS[0].authority
    if not _is_https_url(authority):
        names = ", ".join(c.name for c in _CLOUDS)
        raise ValueError(f"--authority {authority} is not an https:// URL nor a Microsoft cloud ({names})")
    parts = urllib.parse.urlsplit(authority)
    tenant = config.tenant
    path = parts.path.strip("/")
    if path:  # https://login.microsoftonline.com/contoso.onmicrosoft.com
        if tenant and tenant != path:
            raise ValueError(f"--authority {authority} names tenant {path}, --tenant says {tenant}: give one")
        tenant, authority = path, f"{parts.scheme}://{parts.netloc}"
    authority = authority.rstrip("/")
    if tenant and not _TENANT.match(tenant):  # it becomes a path of the sign-in URL
        raise ValueError(f"tenant {tenant!r} is not a directory (tenant) ID or domain: give one like "
                         "contoso.onmicrosoft.com or 9188040d-6c67-4c5b-b112-36a304b66dad")
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


# ---------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------


def _flow(name: str) -> Callable[..., Any]:
    """:mod:`mailhost.oauth_flows`'s function ``name``, imported on the first call."""

    def call(*args: Any, **kwargs: Any) -> Any:
        from . import oauth_flows

        return getattr(oauth_flows, name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


BUILTIN_PROVIDERS: Final = (
    OAuthProvider("microsoft", _flow("microsoft_authorize"), _flow("microsoft_refresh"),
                  title="Microsoft identity platform (Microsoft 365, Outlook.com)", flows=FLOWS,
                  configure=_microsoft_configure),
    OAuthProvider("google", _flow("google_authorize"), _flow("google_refresh"), title="Google (Gmail, Google Workspace)",
                  flows=("authorization-code",), configure=_google_configure),
    OAuthProvider("oidc", _flow("oidc_authorize"), _flow("oidc_refresh"), title="Any OpenID Connect provider", flows=FLOWS,
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


def __getattr__(name: str) -> Any:
    if name in ("LoopbackRedirect", "http_session"):  # exported, loaded on first use
        from . import oauth_flows

        return getattr(oauth_flows, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
