"""Which tokens Microsoft Graph takes, and the sentence for an admin whose credential asks
for something else.

A Microsoft access token is for one resource. Graph accepts only tokens for Graph of its
own cloud; the Microsoft provider's default scopes are Exchange Online's (IMAP, POP,
SMTP), which Graph refuses with ``401 InvalidAuthenticationToken``. The credential's
scopes are where this is decided: the consent an admin gives when authorizing covers
those scopes, and msal asks for one resource per token. So a Graph connection needs a
credential with Graph's scopes:

- app-only (``--flow client-credentials``): ``https://graph.microsoft.com/.default``
  (the application permissions Mail.ReadWrite and Mail.Send granted in Entra ID);
- delegated: ``https://graph.microsoft.com/Mail.ReadWrite``, ``.../Mail.Send`` and
  ``offline_access``; for a shared mailbox ``Mail.ReadWrite.Shared`` and
  ``Mail.Send.Shared`` as well. A scope without a resource (``Mail.Send``) is Graph's to
  Microsoft's v2.0 endpoint.

In a national cloud the scopes carry that cloud's Graph host (Microsoft: "Microsoft Graph
national cloud deployments", https://learn.microsoft.com/graph/deployments, and "Access
national cloud deployments with the Microsoft Graph SDKs": graph.microsoft.us for GCC High,
dod-graph.microsoft.us for DoD, microsoftgraph.chinacloudapi.cn for 21Vianet). Exchange
Online's resources, for telling an admin what the credential asks for instead: "Authenticate
an IMAP, POP or SMTP connection using OAuth" (outlook.office.com, outlook.office365.com) and
the national cloud endpoint lists (outlook.office365.us, outlook-dod.office365.us,
partner.outlook.cn), as in :mod:`mailhost.oauth_providers`.

:func:`scope_problem` reads what the connection's token source says about its
credential (:class:`mailhost.oauth.TokenSource`); a plain callable says nothing and is
never judged.
"""
from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from mailhost.errors import MailhostError
from mailhost.protocols import ConnectionSettings

__all__ = ["EXCHANGE_HOSTS", "GRAPH_APP_ID", "GRAPH_HOSTS", "graph_resource", "resource", "scope_problem",
           "suggested_scopes"]

#: Microsoft Graph per cloud: worldwide, US Government L4 (GCC High), L5 (DoD), 21Vianet.
GRAPH_HOSTS = frozenset({"graph.microsoft.com", "graph.microsoft.us", "dod-graph.microsoft.us",
                         "microsoftgraph.chinacloudapi.cn"})
#: Microsoft Graph's application ID, the same in every cloud; a scope may name it instead of the host.
GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"
#: Exchange Online's resources (IMAP, POP, SMTP, EWS tokens) per cloud.
EXCHANGE_HOSTS = frozenset({"outlook.office.com", "outlook.office365.com", "outlook.office365.us",
                            "outlook-dod.office365.us", "partner.outlook.cn"})
_DEFAULT = "graph.microsoft.com"


def resource(scope: str) -> str | None:
    """The resource a scope is for, lower case: ``graph.microsoft.com`` for
    ``https://graph.microsoft.com/Mail.Send``, the app ID for ``{app id}/Mail.Send``;
    None for a scope without one (``Mail.Send``, ``offline_access``)."""
    if "://" in scope:
        return (urlsplit(scope).hostname or "").lower() or None
    if "/" in scope:
        return scope.split("/", 1)[0].lower() or None
    return None


def graph_resource(host: str | None) -> str:
    """The resource URL of Graph for a connection's host: its own cloud's Graph when the
    host is one, else the worldwide one (a private endpoint, such as the tests' stand-in,
    plays worldwide Graph)."""
    host = (host or "").lower()
    return f"https://{host if host in GRAPH_HOSTS else _DEFAULT}"


def suggested_scopes(host: str | None, *, app_only: bool, shared: bool) -> list[str]:
    """The scopes a credential for a Graph connection should ask for."""
    base = graph_resource(host)
    if app_only:
        return [f"{base}/.default"]
    scopes = [f"{base}/Mail.ReadWrite", f"{base}/Mail.Send"]
    if shared:
        scopes += [f"{base}/Mail.ReadWrite.Shared", f"{base}/Mail.Send.Shared"]
    return [*scopes, "offline_access"]


def fix_command(settings: ConnectionSettings, host: str | None) -> str:
    """`mailhost oauth edit NAME --scope ...` (and authorize, for a delegated credential)."""
    source = settings.access_token
    name = getattr(source, "credential", None) or "NAME"
    app_only = bool(getattr(source, "app_only", False))
    shared = bool(settings.shared_mailbox) or _sends_as_another(settings)
    scopes = " ".join(f"--scope {s}" for s in suggested_scopes(host, app_only=app_only, shared=shared))
    command = f"`mailhost oauth edit {name} {scopes}`"
    if not app_only:
        command += f" then `mailhost oauth authorize {name} --username {settings.username or 'USER'}`"
    return command


def scope_problem(settings: ConnectionSettings, host: str | None) -> str | None:
    """A sentence for the admin when the connection's credential asks for tokens Graph at
    ``host`` will refuse; None when its scopes are Graph's, or when that cannot be told
    (a plain token source, scopes without a resource, a private resource)."""
    source = settings.access_token
    try:
        scopes: Iterable[str] = getattr(source, "scopes", None) or ()
        name = getattr(source, "credential", None)
    except MailhostError:  # the source could not say (its credential is gone): the token request will tell
        return None
    resources = {r for r in map(resource, scopes) if r}
    if not resources or not name:
        return None
    own = (host or "").lower()
    wanted = ({own} if own in GRAPH_HOSTS else GRAPH_HOSTS | {own}) | {GRAPH_APP_ID}
    if resources & wanted:
        return None
    if own not in GRAPH_HOSTS and not resources & (GRAPH_HOSTS | EXCHANGE_HOSTS):
        return None  # a private endpoint with a resource of its own: the server decides
    if resources <= EXCHANGE_HOSTS:
        what = "Exchange Online's IMAP, POP and SMTP, the Microsoft provider's default scopes"
    elif resources <= GRAPH_HOSTS:
        what = "Microsoft Graph of another cloud"
    else:
        what = "another resource"
    asked = ", ".join(sorted(f"https://{r}" if "." in r else r for r in resources))
    return (f"OAuth2 credential {name!r} asks for tokens for {asked} ({what}), which Microsoft Graph refuses: "
            f"give it Graph's scopes with {fix_command(settings, host)}")


def _sends_as_another(settings: ConnectionSettings) -> bool:
    from email.utils import parseaddr

    sender = parseaddr(settings.from_address or "")[1].lower()
    return bool(sender) and sender != (settings.username or "").lower()
