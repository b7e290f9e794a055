"""OAuth2 credentials and tokens: providers against a real (local) identity provider,
the token lifecycle, errors for admins, the CLI, and the Microsoft host overrides."""
from __future__ import annotations

import datetime as dt
import json
import re
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

import mailhost.oauth
from mailhost import Mailhost
from mailhost.errors import AuthenticationFailed, NotFound, TemporaryFailure, TLSFailure, UsageError, ValidationError
from mailhost.oauth import CredentialSpec
from mailhost.oauth_providers import Interaction, http_session

from .helpers import run_cli
from .servers.certs import Pki
from .servers.idp import Hold, IdentityProvider


ALICE = "alice@example.org"


class Clock:
    """Moves mailhost's clock and the identity provider's together: no sleeping."""

    def __init__(self, idp: IdentityProvider) -> None:
        self.idp = idp
        self.offset = dt.timedelta(0)

    def advance(self, seconds: float) -> None:
        self.offset += dt.timedelta(seconds=seconds)
        self.idp.advance(seconds)


@pytest.fixture
def clock(idp: IdentityProvider, monkeypatch: pytest.MonkeyPatch) -> Clock:
    """A clock for the whole host (mailhost.oauth reads it, providers too)."""
    clock = Clock(idp)
    real = mailhost.oauth.utcnow
    monkeypatch.setattr(mailhost.oauth, "utcnow", lambda: real() + clock.offset)
    return clock


def microsoft(mh: Mailhost, idp: IdentityProvider, name: str = "m365", secret: str | None = "s3cret",
              **spec: Any) -> Any:
    """A Microsoft credential against the local provider (its authority, tenant and CA)."""
    if spec.pop("register", True):
        idp.add_client(f"client-{name}", secret, public=spec.pop("public", False))
    return mh.oauth.add(CredentialSpec(name=name, provider="microsoft", client_id=f"client-{name}",
                                       client_secret=spec.pop("client_secret", secret), authority=idp.authority,
                                       tenant=idp.tenant, ca_file=spec.pop("ca_file", idp.ca_file), **spec))


def oidc(mh: Mailhost, idp: IdentityProvider, name: str = "o", **spec: Any) -> Any:
    """An OpenID Connect credential found by discovery at the local provider."""
    idp.add_client(f"client-{name}", "osecret")
    return mh.oauth.add(CredentialSpec(name=name, provider="oidc", client_id=f"client-{name}", client_secret="osecret",
                                       authority=idp.issuer(), ca_file=idp.ca_file, **spec))


def authorized_both_ways(mh: Mailhost, idp: IdentityProvider, browser: Callable[[str], bool]) -> tuple[Any, Any]:
    """A Microsoft (msal) and an OpenID Connect (standard flows) credential, authorized for ALICE."""
    idp.add_user(ALICE)
    both = microsoft(mh, idp), oidc(mh, idp)
    for cred in both:
        mh.oauth.authorize(cred.name, ALICE, signed_in(browser))
    return both


def signed_in(browser: Callable[[str], bool], redirect_port: int = 0) -> Interaction:
    """What `oauth authorize` gives a flow, with the test browser in the admin's place."""
    return Interaction(show=lambda line: None, open_url=browser, redirect_port=redirect_port, timeout=30)


def device_user(idp: IdentityProvider, username: str) -> Interaction:
    """An admin who enters the device code as ``username`` when it is shown."""
    def show(line: str) -> None:
        idp.approve_device(re.search(r"code ([A-Z0-9-]+)", line).group(1), username)

    return Interaction(show=show, timeout=30)


def stored_bytes(mh: Mailhost) -> bytes:
    """Everything the store holds, as bytes (for "no secret in clear")."""
    path = Path(mh.engine.url.database)
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))


class Worker:
    """Another worker: its own :class:`Mailhost` on the same store, whose call runs in a
    thread (:meth:`start`); :meth:`result` returns what the call returned or raises what it raised."""

    def __init__(self, mh: Mailhost) -> None:
        self.host = Mailhost.open(mh.config.path, plugins=mh.plugins)
        self._outcome: list[Any] = []
        self._thread: threading.Thread | None = None

    def start(self, call: Callable[[], Any]) -> Worker:
        def run() -> None:
            try:
                self._outcome.append(call())
            except Exception as exc:  # noqa: BLE001 - handed to the test by result()
                self._outcome.append(exc)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def done_within(self, seconds: float) -> bool:
        assert self._thread is not None
        self._thread.join(seconds)
        return not self._thread.is_alive()

    def result(self) -> Any:
        assert self.done_within(30), "the worker's call did not end"
        if isinstance(self._outcome[0], Exception):
            raise self._outcome[0]
        return self._outcome[0]


@pytest.fixture
def workers(mh: Mailhost) -> Iterator[Callable[[], Worker]]:
    """``workers()``: a new :class:`Worker` on ``mh``'s store, closed after the test."""
    opened: list[Worker] = []

    def make() -> Worker:
        opened.append(Worker(mh))
        return opened[-1]

    yield make
    for w in opened:
        if w._thread is not None:
            w._thread.join(30)
        w.host.close()


# ---------------------------------------------------------------------------------------
# Providers are plugins
# ---------------------------------------------------------------------------------------


def test_register_oauth_providers(tmh: Mailhost, clock: Clock) -> None:
    """Providers come from the hook: the built-in ones and a plugin's, attributed to it."""
    providers = tmh.oauth.providers()
    assert {"microsoft", "google", "oidc", "test"} <= set(providers)
    assert providers["microsoft"].plugin == "oauth" and providers["test"].plugin == "testplugin"
    assert "oauth/test" in tmh.plugins.plugins["testplugin"].oauth_providers
    cred = tmh.oauth.add(CredentialSpec(name="t", provider="test", client_id="id"))
    tmh.oauth.authorize("t", ALICE)
    assert tmh.oauth.access_token(cred.id, ALICE) == f"at-{ALICE}-1"
    clock.advance(3600)
    assert tmh.oauth.access_token(cred.id, ALICE) == f"at-{ALICE}-2"


#: A provider plugin that answers with the token response (a dict) instead of a TokenSet;
#: its first tokens (authorize with ANSWER "tokens") are due for renewal at once. Its
#: "fussy" provider's configure answers with a dict instead of a ClientConfig.
TOY_PROVIDER = """
import datetime as dt
from mailhost import hookimpl
from mailhost.oauth_providers import OAuthProvider, TokenSet
from mailhost.store import utcnow

ANSWER = ["dict"]

def answer():
    if ANSWER[0] == "dict":
        return {"access_token": "at", "expires_in": 3600}
    now = utcnow()
    return TokenSet(access_token="at-1", refresh_token="rt-1", obtained_at=now - dt.timedelta(hours=1), expires_at=now)

@hookimpl
def register_oauth_providers(register):
    register(OAuthProvider("toy", authorize=lambda config, interaction, username: answer(),
                           refresh=lambda config, tokens: answer()))
    register(OAuthProvider("fussy", authorize=lambda config, interaction, username: answer(),
                           refresh=lambda config, tokens: answer(), configure=lambda config: {"scopes": "mail"}))
"""


def test_a_provider_that_returns_no_token_set_broke_its_contract(home: Path, tmp_path: Path) -> None:
    """A provider plugin whose authorize or refresh returns something else than a TokenSet
    gets a PluginError naming the plugin, its distribution and what it returned (it was an
    AttributeError from deep in mailhost, naming no plugin), as `oauth authorize` says it
    (exit 1, one line); a renewal records the error and frees its lease for the next try
    (it was held for 90 s)."""
    import types

    from mailhost.errors import PluginError
    from mailhost.plugins import PluginHost

    from .testplugin import make_dist

    site = make_dist(tmp_path / "toy", "mailhost-toy", {"toy": "mailhost_toy"}, {"mailhost_toy": TOY_PROVIDER},
                     version="0.3.0")
    env = {"PYTHONPATH": str(site), "MAILHOST_LOAD_PLUGINS": "toy"}
    assert run_cli("oauth", "add", "t", "--provider", "toy", "--client-id", "id", env=env, cwd=home).returncode == 0
    out = run_cli("oauth", "authorize", "t", "--username", ALICE, env=env, cwd=home)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip() == ("mailhost: plugin toy (mailhost-toy 0.3.0) broke the OAuth2 provider contract: its "
                                  "toy provider's authorize returned dict, not a mailhost.oauth_providers.TokenSet "
                                  "(report it to the plugin's author)"), out.stderr

    toy = types.ModuleType("mailhost_toy")
    exec(TOY_PROVIDER, toy.__dict__)
    host = Mailhost.open(home / "mailhost.toml", plugins=PluginHost(only=[], extra=[("toy", toy)]))
    try:
        toy.ANSWER[0] = "tokens"
        host.oauth.authorize("t", ALICE)
        toy.ANSWER[0] = "dict"
        cred = host.oauth.get("t")
        for _ in range(2):  # the lease is free again: the next caller tries again at once
            with pytest.raises(PluginError, match=re.escape(
                    "plugin toy broke the OAuth2 provider contract: its toy provider's refresh returned dict, not a ")):
                host.oauth.access_token(cred.id, ALICE)
        entry = host.oauth._state(host.oauth.get("t"))[ALICE]
        assert entry["lease"] is None and "broke the OAuth2 provider contract" in entry["last_error"]
        assert entry["access_token"] == "at-1"
    finally:
        host.close()


def test_a_provider_whose_configure_returns_no_client_config_broke_its_contract(home: Path, tmp_path: Path) -> None:
    """A provider plugin whose configure returns something else than a ClientConfig gets
    a PluginError naming the plugin, its distribution and what it returned, as the
    TokenSet check words it, and `oauth add` says so (exit 1, one line): nothing is added."""
    from .testplugin import make_dist

    site = make_dist(tmp_path / "toy", "mailhost-toy", {"toy": "mailhost_toy"}, {"mailhost_toy": TOY_PROVIDER},
                     version="0.3.0")
    env = {"PYTHONPATH": str(site), "MAILHOST_LOAD_PLUGINS": "toy"}
    out = run_cli("oauth", "add", "t", "--provider", "fussy", "--client-id", "id", env=env, cwd=home)
    assert out.returncode == 1 and out.stderr.strip() == (
        "mailhost: plugin toy (mailhost-toy 0.3.0) broke the OAuth2 provider contract: its fussy provider's "
        "configure returned dict, not a mailhost.oauth_providers.ClientConfig (report it to the plugin's author)"
    ), out.stderr
    listed = run_cli("oauth", "list", "--json", env=env, cwd=home)
    assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stdout


def test_unknown_provider_lists_the_choices(mh: Mailhost) -> None:
    """A misspelt provider is refused with the installed ones named."""
    with pytest.raises(ValidationError, match=r"no OAuth2 provider named 'microsfot'.*google, microsoft, oidc"):
        mh.oauth.add(CredentialSpec(name="x", provider="microsfot", client_id="id"))


# ---------------------------------------------------------------------------------------
# Microsoft (msal) against the local provider: the three flows
# ---------------------------------------------------------------------------------------


def test_microsoft_authorization_code_with_a_loopback_redirect(mh: Mailhost, idp: IdentityProvider,
                                                               browser: Callable[[str], bool]) -> None:
    """msal signs the admin in through a browser and a redirect to 127.0.0.1."""
    idp.add_user(ALICE)
    cred = microsoft(mh, idp)
    result = mh.oauth.authorize("m365", ALICE, signed_in(browser))
    assert result["username"] == result["identity"] == ALICE and result["refresh_token"]
    assert [g["grant_type"] for g in idp.grants()] == ["authorization_code"]
    token = mh.oauth.access_token(cred.id, ALICE)
    assert idp.introspect(token)["username"] == ALICE
    assert mh.oauth.access_token(cred.id, "Alice@Example.ORG") == token  # user names compare without case
    assert "IMAP.AccessAsUser.All" in idp.introspect(token)["scope"]
    assert token.encode() not in stored_bytes(mh) and b"s3cret" not in stored_bytes(mh)  # encrypted at rest


def test_an_idle_connection_does_not_block_the_redirect(mh: Mailhost, idp: IdentityProvider,
                                                         browser: Callable[[str], bool]) -> None:
    """A connection to the loopback listener that sends nothing (a browser's spare one, or
    another program) does not keep the browser's redirect from arriving."""
    idp.add_user(ALICE)
    cred = microsoft(mh, idp)
    delivered: list[bool] = []

    def open_with_an_idle_connection(url: str) -> bool:
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
        with socket.create_connection(("127.0.0.1", urllib.parse.urlsplit(query["redirect_uri"]).port)):
            try:
                delivered.append(browser(url))
            except OSError:  # the listener never answered the browser
                delivered.append(False)
        return True

    mh.oauth.authorize("m365", ALICE, Interaction(show=lambda line: None, open_url=open_with_an_idle_connection,
                                                  timeout=30))
    assert delivered == [True] and idp.is_active(mh.oauth.access_token(cred.id, ALICE))


@pytest.mark.parametrize("provider", ["microsoft", "oidc"])
def test_a_stray_answer_to_the_listener_does_not_end_the_sign_in(mh: Mailhost, idp: IdentityProvider,
                                                                  browser: Callable[[str], bool], provider: str) -> None:
    """Any local program can reach the loopback listener; an answer without the request's
    state (``?error=access_denied``) gets 400 and the admin's sign-in completes."""
    idp.add_user(ALICE)
    cred = microsoft(mh, idp) if provider == "microsoft" else oidc(mh, idp)
    strays: list[int] = []

    def open_after_a_stray(url: str) -> bool:
        redirect_uri = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))["redirect_uri"]
        try:
            urllib.request.urlopen(redirect_uri + "?error=access_denied", timeout=10)
        except urllib.error.HTTPError as exc:
            strays.append(exc.code)
        return browser(url)

    mh.oauth.authorize(cred.name, ALICE, Interaction(show=lambda line: None, open_url=open_after_a_stray, timeout=30))
    assert strays == [400] and idp.is_active(mh.oauth.access_token(cred.id, ALICE))


def test_microsoft_device_code(mh: Mailhost, idp: IdentityProvider) -> None:
    """The device flow shows a code for another device; no secret is sent (a public client)."""
    idp.add_user(ALICE)
    cred = microsoft(mh, idp, flow="device-code", public=True)
    mh.oauth.authorize("m365", ALICE, device_user(idp, ALICE))
    assert idp.introspect(mh.oauth.access_token(cred.id, ALICE))["username"] == ALICE


def test_microsoft_client_credentials_for_app_only_access(mh: Mailhost, idp: IdentityProvider) -> None:
    """App-only access needs no user: one token for every mailbox, the .default scope."""
    cred = microsoft(mh, idp, flow="client-credentials")
    assert cred.scopes == ["https://outlook.office365.com/.default"]
    token = mh.oauth.access_token(cred.id, "any@example.org")
    assert mh.oauth.access_token(cred.id, "other@example.org") == token
    assert idp.introspect(token)["client_id"] == "client-m365"
    with pytest.raises(ValidationError, match="needs your directory: give --tenant"):
        mh.oauth.add(CredentialSpec(name="x", provider="microsoft", client_id="c", client_secret="s",
                                    flow="client-credentials"))


@pytest.mark.parametrize("spec, words", [
    ({"provider": "microsoft", "tenant": "bad tenant"}, "tenant 'bad tenant' is not a directory"),
    ({"provider": "microsoft", "tenant": "contoso.com/../evil?x=1"}, "is not a directory"),
    ({"provider": "microsoft", "tenant": "", "authority": "https://login.microsoftonline.com/a/b"},
     "tenant 'a/b' is not a directory"),
    ({"provider": "google"}, "--tenant applies to Microsoft credentials only"),
    ({"provider": "oidc", "authority": "https://id.example.org"}, "--tenant applies to Microsoft"),
])
def test_a_tenant_is_a_microsoft_directory_name(home: Path, spec: dict[str, str], words: str) -> None:
    """--tenant is a Microsoft directory's ID or domain, which becomes a path of the
    sign-in URL: text with blanks, slashes or a query is refused, and so is a tenant on
    a provider that has none (exit 2, nothing stored)."""
    args = [f"--{k}={v}" for k, v in {"tenant": "contoso.onmicrosoft.com", **spec}.items()]
    out = run_cli("oauth", "add", "c", "--client-id", "id", *args, cwd=home)
    assert out.returncode == 2 and words in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert json.loads(run_cli("oauth", "list", "--json", cwd=home).stdout) == []
    for tenant in ("contoso.onmicrosoft.com", "9188040d-6c67-4c5b-b112-36a304b66dad", "organizations"):
        out = run_cli("oauth", "add", "ok", "--provider", "microsoft", "--client-id", "id", "--tenant", tenant, cwd=home)
        assert out.returncode == 0, out.stderr
        assert run_cli("oauth", "remove", "ok", cwd=home).returncode == 0


def test_microsoft_clouds_by_name(mh: Mailhost) -> None:
    """--authority takes a cloud's name and brings that cloud's authority and scopes."""
    dod = mh.oauth.add(CredentialSpec(name="dod", provider="microsoft", client_id="c", authority="dod"))
    assert dod.authority == "https://login.microsoftonline.us"
    assert "https://outlook-dod.office365.us/IMAP.AccessAsUser.All" in dod.scopes
    china = mh.oauth.add(CredentialSpec(name="cn", provider="microsoft", client_id="c",
                                        authority="https://login.partner.microsoftonline.cn/contoso.partner.onmschina.cn"))
    assert china.authority == "https://login.partner.microsoftonline.cn"
    assert china.tenant == "contoso.partner.onmschina.cn"
    assert "https://partner.outlook.cn/SMTP.Send" in china.scopes


# ---------------------------------------------------------------------------------------
# Google and any OpenID Connect provider
# ---------------------------------------------------------------------------------------


def test_google_authorization_code_and_refresh(mh: Mailhost, idp: IdentityProvider, clock: Clock,
                                               browser: Callable[[str], bool]) -> None:
    """Google's flow (PKCE, offline access) against the local endpoints, then a renewal."""
    idp.add_client("gclient", "gsecret")
    idp.add_user(ALICE)
    cred = mh.oauth.add(CredentialSpec(
        name="g", provider="google", client_id="gclient", client_secret="gsecret", ca_file=idp.ca_file,
        authorization_endpoint=idp.endpoint("authorize"), token_endpoint=idp.endpoint("token"),
        scopes=["https://mail.google.com/", "openid", "email", "offline_access"]))
    assert mh.oauth.authorize("g", None, signed_in(browser))["username"] == ALICE  # who signed in
    first = mh.oauth.access_token(cred.id, ALICE)
    clock.advance(3600)
    assert mh.oauth.access_token(cred.id, ALICE) != first
    assert [g["grant_type"] for g in idp.grants()] == ["authorization_code", "refresh_token"]


def test_oidc_by_discovery(mh: Mailhost, idp: IdentityProvider, browser: Callable[[str], bool]) -> None:
    """Any standards-following provider: endpoints found from the issuer."""
    idp.add_client("oclient", "osecret")
    idp.add_user(ALICE)
    cred = mh.oauth.add(CredentialSpec(name="o", provider="oidc", client_id="oclient", client_secret="osecret",
                                       authority=idp.issuer(), ca_file=idp.ca_file))
    mh.oauth.authorize("o", ALICE, signed_in(browser))
    assert idp.introspect(mh.oauth.access_token(cred.id, ALICE))["username"] == ALICE
    device = mh.oauth.add(CredentialSpec(name="od", provider="oidc", client_id="oclient", authority=idp.issuer(),
                                         ca_file=idp.ca_file, flow="device-code"))
    idp.clients["oclient"].public = True
    mh.oauth.authorize("od", ALICE, device_user(idp, ALICE))
    assert idp.introspect(mh.oauth.access_token(device.id, ALICE))["active"]


def test_oidc_discovery_of_another_issuer_is_refused(mh: Mailhost, idp: IdentityProvider, pki: Pki) -> None:
    """A discovery document whose issuer is another server than the --authority (OpenID
    Connect Discovery §4.3) is not used: the client secret never reaches the token
    endpoint it names. The same server under another path (Microsoft names the tenant's
    id where the authority names a domain) is the same issuer."""
    oidc(mh, idp, flow="client-credentials")
    with IdentityProvider(pki) as other:
        other.add_client("client-o", "osecret")
        document = {**idp._discovery(idp.tenant), "issuer": other.issuer(), "token_endpoint": other.endpoint("token")}
        idp.answer_next("openid-configuration", 200, document)
        with pytest.raises(AuthenticationFailed, match=r"is the configuration of issuer 'https://127\.0\.0\.1:\d+/"
                                                        r"mailhost-test/v2\.0', not of .*: check --authority"):
            mh.oauth.authorize("o")
        assert other.posts == []
    tenant_id = {**idp._discovery(idp.tenant), "issuer": idp.issuer().replace(idp.tenant, "9188040d-6c67-4c5b")}
    idp.answer_next("openid-configuration", 200, tenant_id)
    assert mh.oauth.authorize("o")["app_only"]


# ---------------------------------------------------------------------------------------
# The token lifecycle
# ---------------------------------------------------------------------------------------


def test_token_is_renewed_shortly_before_expiry_not_per_poll(mh: Mailhost, idp: IdentityProvider, clock: Clock,
                                                            browser: Callable[[str], bool]) -> None:
    """Polls reuse the stored token; one renewal comes in the last minutes of its life."""
    idp.add_user(ALICE)
    cred = microsoft(mh, idp)
    mh.oauth.authorize("m365", ALICE, signed_in(browser))
    first = mh.oauth.access_token(cred.id, ALICE)
    for _ in range(5):
        clock.advance(600)  # five polls over 50 minutes
        assert mh.oauth.access_token(cred.id, ALICE) == first
    assert idp.grants("refresh_token") == []
    clock.advance(360)  # 56 minutes in: within the last five
    renewed = mh.oauth.access_token(cred.id, ALICE)
    assert renewed != first and idp.is_active(renewed)
    assert len(idp.grants("refresh_token")) == 1
    status = mh.oauth.status(cred.id, ALICE)
    assert status["refreshes"] == 1 and status["last_refresh_at"] and status["last_error"] is None
    assert mh.oauth.get("m365").token_expires_at is not None


def test_rotated_refresh_token_is_always_persisted(mh: Mailhost, idp: IdentityProvider, clock: Clock,
                                                  browser: Callable[[str], bool]) -> None:
    """Renewal after renewal works: each uses the refresh token the last one returned (the
    provider refuses a replayed one and revokes the grant)."""
    idp.add_user(ALICE)
    cred = microsoft(mh, idp)
    mh.oauth.authorize("m365", ALICE, signed_in(browser))
    for _ in range(3):
        clock.advance(3600)
        mh.oauth.access_token(cred.id, ALICE)
    assert [g["ok"] for g in idp.grants("refresh_token")] == [True, True, True]
    stored = mh.oauth._state(mh.oauth.get("m365"))[ALICE]["refresh_token"]
    assert stored in idp._refresh  # the newest one, still valid


def test_one_renewal_for_concurrent_callers(mh_any: Mailhost, idp: IdentityProvider, clock: Clock,
                                            browser: Callable[[str], bool]) -> None:
    """Workers that need a renewal at once spend the refresh token once (SQLite and PostgreSQL)."""
    mh = mh_any
    idp.add_user(ALICE)
    cred = microsoft(mh, idp)
    mh.oauth.authorize("m365", ALICE, signed_in(browser))
    clock.advance(3600)
    workers = [Mailhost.open(mh.config.path, plugins=mh.plugins) for _ in range(4)]  # one OAuth2 each
    tokens: list[str] = []
    barrier = threading.Barrier(len(workers))

    def work(host: Mailhost) -> None:
        barrier.wait()
        tokens.append(host.oauth.access_token(cred.id, ALICE))

    threads = [threading.Thread(target=work, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for w in workers:
        w.close()
    assert len(tokens) == 4 and len(set(tokens)) == 1 and idp.is_active(tokens[0])
    assert len(idp.grants("refresh_token")) == 1


@pytest.mark.parametrize("revoked", [False, True], ids=["renewed", "refused"])
def test_a_renewal_does_not_undo_an_authorization_made_meanwhile(mh: Mailhost, idp: IdentityProvider,
                                                                 clock: Clock, workers: Callable[[], Worker],
                                                                 browser: Callable[[str], bool],
                                                                 revoked: bool) -> None:
    """A renewal that ends after `oauth authorize` replaced the grant keeps nothing of the
    old grant, neither its tokens nor its error: the new authorization stays as it was
    stored, and the renewal's caller gets its token."""
    renewal, held = held_renewal(mh, idp, clock, workers(), browser)
    if revoked:  # why the admin signs in again: the old grant's renewal gets AADSTS50173
        idp.revoke_user(ALICE)
    mh.oauth.authorize("m365", ALICE, signed_in(browser))  # the admin signs in again meanwhile
    new = mh.oauth._state(mh.oauth.get("m365"))[ALICE]
    held.release()
    assert renewal.result() == new["access_token"]
    assert mh.oauth._state(mh.oauth.get("m365"))[ALICE] == new and mh.oauth.get("m365").last_error is None
    assert [g["ok"] for g in idp.grants("refresh_token")] == [not revoked]  # the old grant's renewal, discarded


def test_a_renewal_does_not_bring_back_tokens_an_edit_dropped(mh: Mailhost, idp: IdentityProvider, clock: Clock,
                                                              workers: Callable[[], Worker],
                                                              browser: Callable[[str], bool]) -> None:
    """`oauth edit --scope` during a renewal drops the tokens for good: the renewal's
    caller is told to sign in again, and nothing of the old grant is stored."""
    renewal, held = held_renewal(mh, idp, clock, workers(), browser)
    _, dropped = mh.oauth.edit("m365", CredentialSpec(scopes=["https://graph.microsoft.com/Mail.Read"]))
    assert dropped
    held.release()
    with pytest.raises(AuthenticationFailed, match=r"'m365' is not authorized for alice@example\.org \(its tokens "
                                                  r"were dropped when the credential changed\): run `mailhost oauth "
                                                  r"authorize m365 --username alice@example\.org`"):
        renewal.result()
    edited = mh.oauth.get("m365")
    assert mh.oauth._state(edited) == {} and edited.token_expires_at is None and edited.last_error is None


def test_an_app_only_renewal_during_an_edit_gets_a_token_for_the_new_scopes(
        mh: Mailhost, idp: IdentityProvider, clock: Clock, workers: Callable[[], Worker]) -> None:
    """An app-only token being renewed when `oauth edit --scope` drops it is not stored:
    its caller, and a worker that waited for that renewal since before the edit, get a
    token for the scopes the credential has now, and the store keeps that one."""
    cred = microsoft(mh, idp, flow="client-credentials")
    mh.oauth.access_token(cred.id, None)
    clock.advance(3600)  # expired: the waiting worker cannot use it meanwhile
    held = idp.hold_next("token")
    renewal, waiting = workers(), workers()
    renewal.start(lambda: renewal.host.oauth.access_token(cred.id, None))
    assert held.arrived.wait(10)
    waiting.start(lambda: waiting.host.oauth.access_token(cred.id, None))
    assert not waiting.done_within(1)
    mh.oauth.edit("m365", CredentialSpec(scopes=["https://graph.microsoft.com/.default"]))
    assert waiting.done_within(10)  # the edit freed the lease: it renewed
    held.release()
    tokens = {renewal.result(), waiting.result()}
    assert {idp.introspect(t)["scope"] for t in tokens} == {"https://graph.microsoft.com/.default"}
    assert mh.oauth._state(mh.oauth.get("m365"))[""]["access_token"] in tokens


# ---------------------------------------------------------------------------------------
# A sign-in while the credential changes
# ---------------------------------------------------------------------------------------


def held_renewal(mh: Mailhost, idp: IdentityProvider, clock: Clock, worker: Worker,
                 browser: Callable[[str], bool]) -> tuple[Worker, Hold]:
    """ALICE signed in to m365 an hour ago, and ``worker`` renewing her token, its request
    held at the provider: the moment an admin's change meets a renewal under way."""
    idp.add_user(ALICE)
    cred = microsoft(mh, idp)
    mh.oauth.authorize("m365", ALICE, signed_in(browser))
    clock.advance(3600)
    held = idp.hold_next("token")
    worker.start(lambda: worker.host.oauth.access_token(cred.id, ALICE))
    assert held.arrived.wait(10)
    return worker, held


def held_sign_in(mh: Mailhost, idp: IdentityProvider, worker: Worker, browser: Callable[[str], bool]) -> Hold:
    """`oauth authorize m365` started in ``worker`` (for ALICE unless app-only), its token
    request held at the provider: the minutes an admin takes to sign in."""
    flow = mh.oauth.get("m365").flow
    interaction = device_user(idp, ALICE) if flow == "device-code" else signed_in(browser)
    held = idp.hold_next("token")
    worker.start(lambda: worker.host.oauth.authorize("m365", None if flow == "client-credentials" else ALICE,
                                                     interaction))
    assert held.arrived.wait(10)
    return held


@pytest.mark.parametrize("flow", ["authorization-code", "device-code", "client-credentials"])
def test_a_sign_in_keeps_nothing_when_the_scopes_were_edited_meanwhile(
        mh: Mailhost, idp: IdentityProvider, workers: Callable[[], Worker], browser: Callable[[str], bool],
        flow: str) -> None:
    """`oauth edit --scope` while `oauth authorize` waits for its tokens: the tokens, for
    the old scopes, are not stored under the new ones; the sign-in says why and what to run."""
    idp.add_user(ALICE)
    app_only = flow == "client-credentials"
    cred = microsoft(mh, idp, flow=flow, public=flow == "device-code")
    signing_in = workers()
    held = held_sign_in(mh, idp, signing_in, browser)
    scopes = ["https://graph.microsoft.com/.default"] if app_only else ["https://graph.microsoft.com/Mail.Read"]
    mh.oauth.edit("m365", CredentialSpec(scopes=scopes))
    held.release()
    again = "`mailhost oauth authorize m365`" if app_only else f"`mailhost oauth authorize m365 --username {ALICE}`"
    with pytest.raises(UsageError, match=re.escape(
            f"OAuth2 credential 'm365' changed while signing in (its scopes were edited), so the tokens were not "
            f"stored: run {again} again")):
        signing_in.result()
    assert [g["ok"] for g in idp.grants() if g.get("ok")] == [True]  # issued for the old scopes, and discarded
    edited = mh.oauth.get("m365")
    assert mh.oauth._state(edited) == {} and edited.token_expires_at is None and edited.last_error is None
    if app_only:  # the next token is for the new scopes
        assert idp.introspect(mh.oauth.access_token(cred.id, None))["scope"] == scopes[0]
    else:
        with pytest.raises(AuthenticationFailed, match="is not authorized for alice@example.org"):
            mh.oauth.access_token(cred.id, ALICE)


@pytest.mark.parametrize("edit, what", [
    ({"client_id": "client-other"}, "its client ID was edited"),
    ({"tenant": "other.onmicrosoft.com"}, "its tenant was edited"),
    ({"authority": "https://login.microsoftonline.us"}, "its authority was edited"),
    ({"flow": "device-code"}, "its flow was edited"),
    ({"client_id": "client-other", "tenant": "other.onmicrosoft.com"}, "its client ID and tenant were edited"),
])
def test_a_sign_in_keeps_nothing_when_the_app_was_edited_meanwhile(
        mh: Mailhost, idp: IdentityProvider, workers: Callable[[], Worker], browser: Callable[[str], bool],
        edit: dict[str, Any], what: str) -> None:
    """Another client ID, tenant, authority or flow set while an admin signs in: the
    tokens are another app's, and are not stored for this one."""
    idp.add_user(ALICE)
    microsoft(mh, idp)
    signing_in = workers()
    held = held_sign_in(mh, idp, signing_in, browser)
    mh.oauth.edit("m365", CredentialSpec(**edit))
    held.release()
    with pytest.raises(UsageError, match=re.escape(f"OAuth2 credential 'm365' changed while signing in ({what}), ")):
        signing_in.result()
    assert mh.oauth._state(mh.oauth.get("m365")) == {}


def test_a_sign_in_keeps_nothing_when_the_credential_was_removed_meanwhile(
        mh: Mailhost, idp: IdentityProvider, workers: Callable[[], Worker], browser: Callable[[str], bool]) -> None:
    """`oauth remove` while an admin signs in: the sign-in says the credential is gone, and
    one added again as it was (SQLite gives it the old one's id) does not get its tokens."""
    idp.add_user(ALICE)
    microsoft(mh, idp)
    signing_in = workers()
    held = held_sign_in(mh, idp, signing_in, browser)
    mh.oauth.remove("m365")
    again = microsoft(mh, idp, register=False)
    held.release()
    with pytest.raises(NotFound, match=re.escape(
            "OAuth2 credential 'm365' was removed while signing in, so the tokens were not stored: add it again "
            "with `mailhost oauth add` and authorize it")):
        signing_in.result()
    assert mh.oauth._state(mh.oauth.get("m365")) == {} and mh.oauth.get("m365").id == again.id


def test_a_sign_in_survives_an_edit_that_keeps_the_tokens(
        mh: Mailhost, idp: IdentityProvider, workers: Callable[[], Worker], browser: Callable[[str], bool]) -> None:
    """A new client secret, a new name, the same scopes in another order: the app and what
    it asks for are the same, so the sign-in is stored."""
    idp.add_user(ALICE)
    cred = microsoft(mh, idp)
    signing_in = workers()
    held = held_sign_in(mh, idp, signing_in, browser)
    mh.oauth.edit("m365", CredentialSpec(name="mail", client_secret="n3w", scopes=list(reversed(cred.scopes))))
    held.release()
    assert signing_in.result()["username"] == ALICE
    assert idp.introspect(mh.oauth.access_token(cred.id, ALICE))["username"] == ALICE


def run_first(host: Mailhost, statement: str, call: Callable[[], Any]) -> list[Any]:
    """Make ``host``'s next ``statement`` (an SQL prefix) wait until ``call`` has run to its
    end (on another store connection): another worker or admin at the worst moment."""
    done: list[Any] = []

    def before(conn: Any, cursor: Any, sql: str, *args: Any) -> None:
        if sql.startswith(statement) and not done:
            done.append(call())

    event.listen(host.engine, "before_cursor_execute", before)
    return done


def test_an_edit_between_the_last_look_and_the_write_counts(mh_any: Mailhost, idp: IdentityProvider) -> None:
    """`oauth edit --scope` committed after authorize last read the credential, before it
    writes (no tokens stored yet, so the tokens column did not change): still refused
    (SQLite and PostgreSQL)."""
    microsoft(mh_any, idp, flow="client-credentials")
    admin = Mailhost.open(mh_any.config.path, plugins=mh_any.plugins)
    try:
        edited = run_first(mh_any, "UPDATE oauth_credentials", lambda: admin.oauth.edit(
            "m365", CredentialSpec(scopes=["https://graph.microsoft.com/.default"])))
        with pytest.raises(UsageError, match=r"'m365' changed while signing in \(its scopes were edited\)"):
            mh_any.oauth.authorize("m365")
        assert edited
    finally:
        admin.close()
    assert mh_any.oauth._state(mh_any.oauth.get("m365")) == {}


@pytest.mark.parametrize("by", ["authorize", "poll"])
def test_an_edit_drops_tokens_stored_after_it_read_the_credential(mh_any: Mailhost, idp: IdentityProvider,
                                                                  by: str) -> None:
    """App-only tokens stored between `oauth edit --scope` reading the credential and
    writing it, by `oauth authorize` or a poll's first token, are for the old scopes: the
    edit drops them too, and says so (SQLite and PostgreSQL)."""
    cred = microsoft(mh_any, idp, flow="client-credentials")
    other = Mailhost.open(mh_any.config.path, plugins=mh_any.plugins)
    try:
        authorized = run_first(mh_any, "UPDATE oauth_credentials", lambda: other.oauth.authorize("m365")
                               if by == "authorize" else other.oauth.access_token(cred.id, None))
        _, dropped = mh_any.oauth.edit("m365", CredentialSpec(scopes=["https://graph.microsoft.com/.default"]))
        assert authorized
    finally:
        other.close()
    assert dropped, "the edit dropped the tokens stored meanwhile: it must say so"
    edited = mh_any.oauth.get("m365")
    assert mh_any.oauth._state(edited) == {} and edited.token_expires_at is None
    assert idp.introspect(mh_any.oauth.access_token(cred.id, None))["scope"] == "https://graph.microsoft.com/.default"


def test_an_edit_does_not_claim_tokens_another_edit_dropped_meanwhile(mh_any: Mailhost, idp: IdentityProvider) -> None:
    """Two admins change the scopes at once: the tokens the second read were dropped by
    the first before the second wrote, so the second says it dropped nothing (SQLite and
    PostgreSQL)."""
    cred = microsoft(mh_any, idp, flow="client-credentials")
    mh_any.oauth.access_token(cred.id, None)
    other = Mailhost.open(mh_any.config.path, plugins=mh_any.plugins)
    try:
        first = run_first(mh_any, "UPDATE oauth_credentials", lambda: other.oauth.edit(
            "m365", CredentialSpec(scopes=["https://graph.microsoft.com/.default"]))[1])
        _, dropped = mh_any.oauth.edit("m365", CredentialSpec(scopes=["https://outlook.office.com/.default"]))
    finally:
        other.close()
    assert len(first) == 1 and first[0] and not dropped
    assert mh_any.oauth.get("m365").scopes == ["https://outlook.office.com/.default"]


def test_a_source_asked_again_renews_the_token(mh: Mailhost, idp: IdentityProvider,
                                              browser: Callable[[str], bool]) -> None:
    """A connection's token source renews on its second call: the server refused the first."""
    idp.add_user(ALICE)
    cred = microsoft(mh, idp)
    mh.oauth.authorize("m365", ALICE, signed_in(browser))
    source = mh.oauth.access_token_for(cred.id, ALICE)
    first = source()
    assert mh.oauth.access_token_for(cred.id, ALICE)() == first  # another source, another pass: no renewal
    second = source()  # e.g. after a 401 for a revoked token
    assert second != first and idp.is_active(second) and len(idp.grants("refresh_token")) == 1
    assert mh.oauth.access_token_for(cred.id, ALICE)() == second


def test_a_worker_waiting_for_a_renewal_is_not_handed_the_refused_token(
        mh: Mailhost, idp: IdentityProvider, workers: Callable[[], Worker], browser: Callable[[str], bool]) -> None:
    """Two workers whose servers refused the same token: one renews it, the other waits
    for the renewed token instead of getting the refused one back."""
    idp.add_user(ALICE)
    cred = microsoft(mh, idp)
    mh.oauth.authorize("m365", ALICE, signed_in(browser))
    one, two = workers(), workers()
    sources = [w.host.oauth.access_token_for(cred.id, ALICE) for w in (one, two)]
    refused = {source() for source in sources}
    held = idp.hold_next("token")
    one.start(sources[0])  # asked again: its server refused the token
    assert held.arrived.wait(10)
    two.start(sources[1])  # the same, while the first renewal runs
    assert not two.done_within(1), "the waiting worker was handed a token while the renewal ran"
    held.release()
    assert two.result() == one.result() and {one.result()} != refused
    assert len(idp.grants("refresh_token")) == 1


def test_a_refused_token_is_not_handed_out_while_the_provider_is_down(mh: Mailhost, idp: IdentityProvider,
                                                                      browser: Callable[[str], bool]) -> None:
    """A token the server refused is not "the current token until it expires" when the
    renewal cannot reach the provider: the caller is told to retry later."""
    idp.add_user(ALICE)
    cred = microsoft(mh, idp)
    mh.oauth.authorize("m365", ALICE, signed_in(browser))
    source = mh.oauth.access_token_for(cred.id, ALICE)
    source()
    idp.stop()
    with pytest.raises(TemporaryFailure, match="could not issue a token now"):
        source()


def test_a_source_says_which_credential_and_scopes(mh: Mailhost, idp: IdentityProvider,
                                                  browser: Callable[[str], bool]) -> None:
    """A connection's token source names its credential, flow and scopes (what a plugin
    needs to tell an admin which credential to fix), never a token."""
    idp.add_user(ALICE)
    scopes = ["https://graph.microsoft.com/Mail.ReadWrite", "https://graph.microsoft.com/Mail.Send", "offline_access"]
    cred = microsoft(mh, idp, scopes=scopes)
    mh.oauth.authorize("m365", ALICE, signed_in(browser))
    source = mh.oauth.access_token_for(cred.id, ALICE)
    assert (source.credential, source.provider, source.flow, source.app_only) == (
        "m365", "microsoft", "authorization-code", False)
    assert source.scopes == tuple(scopes)
    assert source.granted() == ("https://graph.microsoft.com/Mail.ReadWrite", "https://graph.microsoft.com/Mail.Send")
    token = source()
    assert idp.is_active(token) and token not in repr(source)
    app = microsoft(mh, idp, name="app", flow="client-credentials")
    assert mh.oauth.access_token_for(app.id, ALICE).app_only is True


def test_other_scopes_drop_the_tokens(mh: Mailhost, idp: IdentityProvider) -> None:
    """Tokens are for the scopes they were issued for: `oauth edit --scope` drops them,
    and an app-only credential fetches the next one for the new scopes."""
    cred = microsoft(mh, idp, flow="client-credentials")
    old = mh.oauth.access_token(cred.id, None)
    _, dropped = mh.oauth.edit("m365", CredentialSpec(scopes=["https://outlook.office365.com/.default"]))
    assert not dropped and mh.oauth.access_token(cred.id, None) == old
    edited, dropped = mh.oauth.edit("m365", CredentialSpec(scopes=["https://graph.microsoft.com/.default"]))
    assert dropped and edited.scopes == ["https://graph.microsoft.com/.default"]
    assert mh.oauth.as_dict(edited)["authorizations"] == []
    new = mh.oauth.access_token(cred.id, None)
    assert new != old and idp.introspect(new)["scope"] == "https://graph.microsoft.com/.default"


def test_the_same_scopes_in_another_order_keep_the_tokens(mh: Mailhost, idp: IdentityProvider,
                                                          browser: Callable[[str], bool]) -> None:
    """Retyping the scopes in another order asks for nothing else: the tokens stay."""
    idp.add_user(ALICE)
    scopes = ["https://outlook.office365.com/IMAP.AccessAsUser.All", "https://outlook.office365.com/SMTP.Send"]
    cred = microsoft(mh, idp, scopes=scopes)
    mh.oauth.authorize("m365", ALICE, signed_in(browser))
    old = mh.oauth.access_token(cred.id, ALICE)
    edited, dropped = mh.oauth.edit("m365", CredentialSpec(scopes=list(reversed(scopes))))
    assert not dropped and edited.scopes == list(reversed(scopes))
    assert mh.oauth.access_token(cred.id, ALICE) == old


# ---------------------------------------------------------------------------------------
# Errors an admin can act on
# ---------------------------------------------------------------------------------------


def test_wrong_secret_is_one_clear_error(mh: Mailhost, idp: IdentityProvider) -> None:
    """The provider's AADSTS7000215 becomes a sentence naming the credential and the fix."""
    microsoft(mh, idp, flow="client-credentials", client_secret="not-the-secret")
    with pytest.raises(AuthenticationFailed) as info:
        mh.oauth.authorize("m365")
    message = str(info.value)
    assert message.startswith("OAuth2 credential 'm365': microsoft refused the client ID or secret (AADSTS7000215")
    assert "mailhost oauth edit m365 --client-secret-stdin" in message and "\n" not in message
    assert "not-the-secret" not in message and "Trace ID" not in message


def test_expired_secret_aadsts7000222(mh: Mailhost, idp: IdentityProvider, clock: Clock,
                                      browser: Callable[[str], bool]) -> None:
    """An expired client secret stops renewals with one clear error, kept for `oauth show`;
    a new secret (`oauth edit`) clears it and renewals work again."""
    idp.add_user(ALICE)
    cred = microsoft(mh, idp)
    mh.oauth.authorize("m365", ALICE, signed_in(browser))
    idp.expire_secret("client-m365")
    clock.advance(3600)
    with pytest.raises(AuthenticationFailed, match=r"the client secret has expired \(AADSTS7000222 The provided "
                                                  r"client secret keys for app 'client-m365' are expired\)"):
        mh.oauth.access_token(cred.id, ALICE)
    shown = mh.oauth.as_dict(mh.oauth.get("m365"))
    assert "AADSTS7000222" in shown["last_error"] and "AADSTS7000222" in shown["authorizations"][0]["last_error"]
    idp.set_secret("client-m365", "new-secret")
    mh.oauth.edit("m365", CredentialSpec(client_secret="new-secret"))
    assert mh.oauth.as_dict(mh.oauth.get("m365"))["last_error"] is None
    assert idp.is_active(mh.oauth.access_token(cred.id, ALICE))  # the refresh token survived


def test_revoked_authorization_asks_to_authorize_again(mh: Mailhost, idp: IdentityProvider, clock: Clock,
                                                      browser: Callable[[str], bool]) -> None:
    """A revoked grant (AADSTS50173) names `oauth authorize` with the user."""
    idp.add_user(ALICE)
    cred = microsoft(mh, idp)
    mh.oauth.authorize("m365", ALICE, signed_in(browser))
    idp.revoke_user(ALICE)
    clock.advance(3600)
    with pytest.raises(AuthenticationFailed, match=r"revoked or has expired \(AADSTS50173.*authorize again with "
                                                  r"`mailhost oauth authorize m365 --username alice@example.org`"):
        mh.oauth.access_token(cred.id, ALICE)
    mh.oauth.authorize("m365", ALICE, signed_in(browser))
    assert idp.is_active(mh.oauth.access_token(cred.id, ALICE))


def test_unreachable_provider_keeps_the_current_token(mh: Mailhost, idp: IdentityProvider, clock: Clock,
                                                      browser: Callable[[str], bool]) -> None:
    """A renewal that cannot reach the provider is temporary: the old token serves while valid."""
    idp.add_user(ALICE)
    cred = microsoft(mh, idp)
    mh.oauth.authorize("m365", ALICE, signed_in(browser))
    first = mh.oauth.access_token(cred.id, ALICE)
    clock.advance(3300)  # due for renewal, still valid
    idp.stop()
    assert mh.oauth.access_token(cred.id, ALICE) == first
    assert "could not issue a token now" in mh.oauth.status(cred.id, ALICE)["last_error"]
    clock.advance(600)  # now expired
    with pytest.raises(TemporaryFailure, match="it will be retried"):
        mh.oauth.access_token(cred.id, ALICE)


def test_odd_values_in_a_token_response_are_not_a_crash(mh: Mailhost, idp: IdentityProvider,
                                                       browser: Callable[[str], bool]) -> None:
    """A lifetime beyond any date, a refresh token that is not a string, an ID token whose
    claims are not an object: the token is stored and used, nothing raises."""
    app = microsoft(mh, idp, flow="client-credentials")
    idp.answer_next("token", 200, {"token_type": "Bearer", "access_token": "at-odd", "expires_in": 10**12,
                                   "refresh_in": 10**15, "refresh_token": 42})
    assert mh.oauth.authorize("m365")["expires_at"] <= mailhost.oauth.utcnow() + dt.timedelta(days=366)
    assert mh.oauth.access_token(app.id, None) == "at-odd"
    idp.add_user(ALICE)
    cred = oidc(mh, idp)
    idp.answer_next("token", 200, {"token_type": "Bearer", "access_token": "at-odd-2", "id_token": "e30.WzFd.e30"})
    assert mh.oauth.authorize("o", ALICE, signed_in(browser))["identity"] is None
    assert mh.oauth.access_token(cred.id, ALICE) == "at-odd-2"


def test_a_page_instead_of_a_token_response_keeps_the_current_token(mh: Mailhost, idp: IdentityProvider,
                                                                    clock: Clock,
                                                                    browser: Callable[[str], bool]) -> None:
    """A renewal answered with an HTML page (a proxy's, an error page) is temporary, as an
    unreachable provider is: the old token serves while valid (msal and the standard flows)."""
    m365, o = authorized_both_ways(mh, idp, browser)
    first = {cred.id: mh.oauth.access_token(cred.id, ALICE) for cred in (m365, o)}
    clock.advance(3300)  # due for renewal, still valid
    for cred in (m365, o):
        idp.answer_next("token", 200, b"<html><body>Sign in to the proxy</body></html>")
        assert mh.oauth.access_token(cred.id, ALICE) == first[cred.id]
        assert "without JSON" in mh.oauth.status(cred.id, ALICE)["last_error"]
    renewed = mh.oauth.access_token(m365.id, ALICE)  # the provider is back: the refresh token still works
    assert renewed != first[m365.id] and idp.is_active(renewed)


def test_a_provider_echoing_a_secret_in_its_error_does_not_reveal_it(mh: Mailhost, idp: IdentityProvider,
                                                                     clock: Clock,
                                                                     browser: Callable[[str], bool]) -> None:
    """Provider words that repeat the refresh token or the client secret are redacted in
    the error and in what is kept in clear for `oauth show`."""
    idp.add_user(ALICE)
    cred = microsoft(mh, idp)
    mh.oauth.authorize("m365", ALICE, signed_in(browser))
    refresh_token = mh.oauth._state(mh.oauth.get("m365"))[ALICE]["refresh_token"]
    clock.advance(3600)
    idp.answer_next("token", 400, {"error": "invalid_grant", "error_description":
                                   f"refresh token {refresh_token} is not valid with secret s3cret"})
    with pytest.raises(AuthenticationFailed, match=r"refresh token \*+ is not valid with secret \*+") as info:
        mh.oauth.access_token(cred.id, ALICE)
    for text in (str(info.value), mh.oauth.get("m365").last_error, json.dumps(mh.oauth.as_dict(mh.oauth.get("m365")),
                                                                                default=str)):
        assert refresh_token not in text and "s3cret" not in text
    assert refresh_token.encode() not in stored_bytes(mh) and b"s3cret" not in stored_bytes(mh)


def test_not_authorized_names_the_command(mh: Mailhost, idp: IdentityProvider) -> None:
    """A connection's user without tokens gets the exact `oauth authorize` to run."""
    cred = microsoft(mh, idp)
    with pytest.raises(AuthenticationFailed, match=r"run `mailhost oauth authorize m365 --username bob@example\.org`"):
        mh.oauth.access_token_for(cred.id, "bob@example.org")()


# ---------------------------------------------------------------------------------------
# TLS: the credential's CA file, whatever REQUESTS_CA_BUNDLE says
# ---------------------------------------------------------------------------------------


def test_requests_ca_bundle_overrides_msal_verify(idp: IdentityProvider, pki: Pki,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The pitfall itself: msal's own session loses ``verify=`` to $REQUESTS_CA_BUNDLE."""
    import msal
    import requests

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", pki.untrusted_ca_file)
    idp.add_client("app", "secret")
    with pytest.raises(requests.exceptions.SSLError):
        msal.ConfidentialClientApplication("app", client_credential="secret", verify=pki.ca_file,
                                           authority=f"{idp.authority}/{idp.tenant}", instance_discovery=False)


def test_credential_ca_file_wins_over_requests_ca_bundle(mh: Mailhost, idp: IdentityProvider, pki: Pki,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The credential's CA file is trusted even when $REQUESTS_CA_BUNDLE names another CA;
    and the environment adds no trust of its own: without --ca-file the test CA is refused."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", pki.untrusted_ca_file)
    monkeypatch.setenv("CURL_CA_BUNDLE", pki.untrusted_ca_file)
    cred = microsoft(mh, idp, flow="client-credentials")
    assert idp.introspect(mh.oauth.access_token(cred.id, None))["active"]
    assert http_session(pki.ca_file).get(f"{idp.issuer()}/.well-known/openid-configuration").status_code == 200

    monkeypatch.setenv("REQUESTS_CA_BUNDLE", pki.ca_file)
    plain = microsoft(mh, idp, name="plain", flow="client-credentials", ca_file=None)
    with pytest.raises(TLSFailure, match=r"not trusted.*`mailhost oauth edit plain --ca-file PATH`"):
        mh.oauth.access_token(plain.id, None)


def test_a_redirect_from_the_token_endpoint_is_not_followed(mh: Mailhost, idp: IdentityProvider, pki: Pki,
                                                            clock: Clock, browser: Callable[[str], bool]) -> None:
    """A token endpoint that answers 307 elsewhere gets one clear error: the refresh token
    and the client secret are not posted again to the other host (msal and the standard flows)."""
    m365, o = authorized_both_ways(mh, idp, browser)
    clock.advance(3600)
    with IdentityProvider(pki) as elsewhere:
        for cred in (m365, o):
            idp.answer_next("token", 307, headers={"Location": elsewhere.endpoint("token")})
            with pytest.raises(AuthenticationFailed, match=r"answered with a redirect \(HTTP 307\) to "
                                                            r"https://127\.0\.0\.1:\d+/.*which is not followed"):
                mh.oauth.access_token(cred.id, ALICE)
        assert elsewhere.posts == []
    assert idp.is_active(mh.oauth.access_token(m365.id, ALICE))  # the refresh token is still good


# ---------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------


@pytest.fixture
def cli_env(home: Path, idp: IdentityProvider) -> Iterator[dict[str, str]]:
    """Environment for `mailhost` subprocesses in ``home``: a client secret to read."""
    yield {"M365_SECRET": "s3cret"}


def test_cli_add_list_show_never_print_a_secret(home: Path, idp: IdentityProvider, cli_env: dict[str, str]) -> None:
    """add, list --json, show --json: settings and token state, never the secret or a token."""
    idp.add_client("client-app", "s3cret")
    added = run_cli("oauth", "add", "app", "--provider", "microsoft", "--client-id", "client-app",
                    "--client-secret-env", "M365_SECRET", "--authority", idp.authority, "--tenant", idp.tenant,
                    "--flow", "client-credentials", "--ca-file", idp.ca_file, env=cli_env)
    assert added.returncode == 0, added.stderr
    authorized = run_cli("oauth", "authorize", "app", "--json")
    assert authorized.returncode == 0, authorized.stderr
    assert json.loads(authorized.stdout)["app_only"] is True
    listed = run_cli("oauth", "list", "--json")
    [row] = json.loads(listed.stdout)
    assert row["name"] == "app" and row["client_secret_set"] is True and row["token_expires_at"]
    shown = run_cli("oauth", "show", "app", "--json")
    record = json.loads(shown.stdout)
    assert record["authorizations"][0]["expires_at"] and record["last_error"] is None
    tokens = list(idp._access)
    assert tokens
    for output in (added, authorized, listed, shown, run_cli("oauth", "show", "app"), run_cli("oauth", "list")):
        text = output.stdout + output.stderr
        assert "s3cret" not in text and not any(token in text for token in tokens)


def test_cli_errors_are_one_sentence(home: Path, idp: IdentityProvider, cli_env: dict[str, str]) -> None:
    """Bad input exits 2, a refused secret exits 1; each a single line naming the fix."""
    missing = run_cli("oauth", "add", "x", "--provider", "nope", "--client-id", "c")
    assert missing.returncode == 2 and "choose one of: google, microsoft, oidc" in missing.stderr
    idp.add_client("client-bad", "right")
    run_cli("oauth", "add", "bad", "--provider", "microsoft", "--client-id", "client-bad", "--client-secret-env",
            "M365_SECRET", "--authority", idp.authority, "--tenant", idp.tenant, "--flow", "client-credentials",
            "--ca-file", idp.ca_file, env=cli_env)
    refused = run_cli("oauth", "authorize", "bad")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1
    assert "AADSTS7000215" in refused.stderr and "mailhost oauth edit bad --client-secret-stdin" in refused.stderr


def test_cli_authorize_refuses_tokens_for_settings_edited_meanwhile(home: Path, idp: IdentityProvider,
                                                                     cli_env: dict[str, str]) -> None:
    """`oauth authorize` (app-only, held at the provider), `oauth edit --scope` meanwhile:
    authorize exits 2 with one sentence, and `oauth show` holds no token."""
    idp.add_client("client-app", "s3cret")
    added = run_cli("oauth", "add", "app", "--provider", "microsoft", "--client-id", "client-app",
                    "--client-secret-env", "M365_SECRET", "--authority", idp.authority, "--tenant", idp.tenant,
                    "--flow", "client-credentials", "--ca-file", idp.ca_file, env=cli_env)
    assert added.returncode == 0, added.stderr
    held = idp.hold_next("token")
    with subprocess.Popen([sys.executable, "-m", "mailhost", "oauth", "authorize", "app"], text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as authorizing:
        assert held.arrived.wait(30)
        edited = run_cli("oauth", "edit", "app", "--scope", "https://graph.microsoft.com/.default")
        assert edited.returncode == 0, edited.stderr
        held.release()
        out, err = authorizing.communicate(timeout=60)
    assert authorizing.returncode == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert ("OAuth2 credential 'app' changed while signing in (its scopes were edited), so the tokens were not "
            "stored: run `mailhost oauth authorize app` again") in err
    assert json.loads(run_cli("oauth", "show", "app", "--json").stdout)["authorizations"] == []


def test_cli_remove_refuses_while_connections_use_it(home: Path, idp: IdentityProvider) -> None:
    """`oauth remove` names the connections that still sign in with the credential."""
    assert run_cli("oauth", "add", "m365", "--provider", "microsoft", "--client-id", "c").returncode == 0
    added = run_cli("incoming", "add", "helpdesk", "--protocol", "imap", "--host", "outlook.office365.com",
                    "--username", ALICE, "--oauth-credential", "m365")
    assert added.returncode == 0, added.stderr
    refused = run_cli("oauth", "remove", "m365")
    assert refused.returncode == 2 and "used by incoming connection helpdesk" in refused.stderr
    shown = json.loads(run_cli("incoming", "show", "helpdesk", "--json").stdout)
    assert shown["oauth_authorized"] is False and "mailhost oauth authorize" in shown["oauth_last_error"]
    switched = run_cli("oauth", "edit", "m365", "--provider", "google")
    assert switched.returncode == 2 and "used by incoming connection helpdesk: it cannot change provider" in switched.stderr
    assert run_cli("incoming", "remove", "helpdesk").returncode == 0
    assert run_cli("oauth", "remove", "m365").returncode == 0
    assert json.loads(run_cli("oauth", "list", "--json").stdout) == []


def test_cli_edit_names_the_tokens_it_dropped_in_text_and_json(mh: Mailhost, idp: IdentityProvider,
                                                                browser: Callable[[str], bool]) -> None:
    """`oauth edit` that changes the scopes says whose tokens it dropped: on stderr, and
    with --json as `dropped_authorizations` (the authorizations as they were; empty when
    it kept the tokens), so that a script knows whom to authorize again."""
    idp.add_user(ALICE)
    microsoft(mh, idp)
    mh.oauth.authorize("m365", ALICE, signed_in(browser))
    edited = run_cli("oauth", "edit", "m365", "--scope", "https://graph.microsoft.com/Mail.Read", "--json")
    assert edited.returncode == 0 and edited.stderr == "", edited.stderr
    shown = json.loads(edited.stdout)
    assert shown["authorizations"] == []
    assert [(a["username"], a["app_only"], a["refresh_token"]) for a in shown["dropped_authorizations"]] == [
        (ALICE, False, True)]
    mh.oauth.authorize("m365", ALICE, signed_in(browser))
    kept = run_cli("oauth", "edit", "m365", "--name", "mail", "--json")  # the same app and scopes
    assert kept.returncode == 0, kept.stderr
    assert [a["username"] for a in json.loads(kept.stdout)["authorizations"]] == [ALICE]
    assert json.loads(kept.stdout)["dropped_authorizations"] == []

    microsoft(mh, idp, name="app", flow="client-credentials")
    mh.oauth.authorize("app")
    text = run_cli("oauth", "edit", "app", "--scope", "https://graph.microsoft.com/.default")
    assert text.returncode == 0, text.stderr
    assert text.stderr == ("changed OAuth2 credential app: its app-only token was for another app or other scopes, "
                           "so it was dropped; the next one is fetched when a connection needs it\n"), text.stderr
    mh.oauth.authorize("mail", ALICE, signed_in(browser))
    text = run_cli("oauth", "edit", "mail", "--scope", "https://graph.microsoft.com/.default")
    assert text.stderr == (f"changed OAuth2 credential mail: the tokens of {ALICE} were for another app or other "
                           "scopes, so they were dropped; authorize it again with `mailhost oauth authorize mail "
                           "--username USER`\n"), text.stderr


def test_cli_another_provider_keeps_nothing_of_the_old_one(home: Path) -> None:
    """Switched to another provider and back, a credential holds only what its provider
    says: no endpoint of the other one (where its secret would go), no tenant, no scopes.
    A client ID with a line break is refused."""
    assert run_cli("oauth", "add", "app", "--provider", "microsoft", "--tenant", "contoso.onmicrosoft.com",
                   "--client-id", "c").returncode == 0
    assert run_cli("oauth", "edit", "app", "--provider", "google").returncode == 0
    google = json.loads(run_cli("oauth", "show", "app", "--json").stdout)
    assert google["tenant"] is None and not any("outlook" in s or "microsoft" in s for s in google["scopes"])
    assert run_cli("oauth", "edit", "app", "--provider", "microsoft").returncode == 0
    back = json.loads(run_cli("oauth", "show", "app", "--json").stdout)
    assert "google" not in json.dumps(back)
    bad = run_cli("oauth", "edit", "app", "--client-id", "c\r\nx")
    assert bad.returncode == 2 and "the client ID contains a line break" in bad.stderr
    empty = run_cli("oauth", "edit", "app", "--name", "")
    assert empty.returncode == 2 and "the new name is empty" in empty.stderr


def test_cli_an_endpoint_that_is_not_a_usable_https_url_is_refused(home: Path) -> None:
    """Plain http, no host, a port out of range: exit 2 naming the option, nothing stored
    (for Google's endpoints too)."""
    for provider, option, url in (("google", "--token-endpoint", "http://tokens.example.org/token"),
                                  ("oidc", "--authority", "https://"),
                                  ("oidc", "--token-endpoint", "https://idp.example.org:99999/token"),
                                  ("microsoft", "--authority", "https://login.microsoftonline.com:99999"),
                                  ("microsoft", "--authority", "https://[::1")):
        refused = run_cli("oauth", "add", "x", "--provider", provider, "--client-id", "c", option, url)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
        assert f"{option} {url} is not an https:// URL" in refused.stderr and "Traceback" not in refused.stderr
    assert json.loads(run_cli("oauth", "list", "--json").stdout) == []


# ---------------------------------------------------------------------------------------
# Microsoft 365's predefined hosts
# ---------------------------------------------------------------------------------------


def test_microsoft_host_overrides(home: Path) -> None:
    """Worldwide, GCC High, DoD and 21Vianet, with their sign-in authorities and scopes."""
    result = run_cli("host-overrides", "--provider", "microsoft", "--json")
    rows = {(r["protocol"], r["name"]): r for r in json.loads(result.stdout)}
    assert {name for _, name in rows} == {"global", "gcc-high", "dod", "china"}
    expected = {
        ("imap", "global"): ("outlook.office365.com", "https://login.microsoftonline.com", "https://outlook.office.com/IMAP.AccessAsUser.All"),
        ("pop3", "global"): ("outlook.office365.com", "https://login.microsoftonline.com", "https://outlook.office.com/POP.AccessAsUser.All"),
        ("smtp", "global"): ("smtp.office365.com", "https://login.microsoftonline.com", "https://outlook.office.com/SMTP.Send"),
        ("graph", "global"): ("graph.microsoft.com", "https://login.microsoftonline.com", "https://graph.microsoft.com/Mail.ReadWrite"),
        ("imap", "gcc-high"): ("outlook.office365.us", "https://login.microsoftonline.us", "https://outlook.office365.us/IMAP.AccessAsUser.All"),
        ("graph", "gcc-high"): ("graph.microsoft.us", "https://login.microsoftonline.us", "https://graph.microsoft.us/Mail.ReadWrite"),
        ("smtp", "dod"): ("outlook-dod.office365.us", "https://login.microsoftonline.us", "https://outlook-dod.office365.us/SMTP.Send"),
        ("graph", "dod"): ("dod-graph.microsoft.us", "https://login.microsoftonline.us", "https://dod-graph.microsoft.us/Mail.ReadWrite"),
        ("imap", "china"): ("partner.outlook.cn", "https://login.partner.microsoftonline.cn", "https://partner.outlook.cn/IMAP.AccessAsUser.All"),
        ("smtp", "china"): ("smtp.partner.outlook.cn", "https://login.partner.microsoftonline.cn", "https://partner.outlook.cn/SMTP.Send"),
    }
    for key, (host, authority, scope) in expected.items():
        assert (rows[key]["host"], rows[key]["authority"], rows[key]["scopes"][0]) == (host, authority, scope), key
    assert rows[("smtp", "global")]["port"] == 587
    plugins = {p["name"]: p for p in json.loads(run_cli("plugins", "list", "--json").stdout)}
    assert "oauth/microsoft" in plugins["oauth"]["oauth_providers"]
    typo = run_cli("host-overrides", "--provider", "microsfot")
    assert typo.returncode == 2 and "no host overrides for provider 'microsfot': choose one of microsoft" in typo.stderr


def test_connection_picks_a_cloud_host(mh: Mailhost) -> None:
    """--host-override gcc-high with a Microsoft credential connects to outlook.office365.us."""
    from mailhost.connections import ConnectionSpec
    from mailhost.protocols import Direction

    mh.oauth.add(CredentialSpec(name="gov", provider="microsoft", client_id="c", authority="gcc-high"))
    conn = mh.connections.add(Direction.INCOMING, ConnectionSpec(
        name="gov-in", protocol="imap", username=ALICE, oauth_credential="gov", host_override="gcc-high"))
    assert conn.host == "outlook.office365.us"
    settings = mh.connections.settings(Direction.INCOMING, conn)
    assert settings.oauth2 and settings.password is None
    with pytest.raises(ValidationError, match="give either --host or --host-override gcc-high, not both"):
        mh.connections.add(Direction.INCOMING, ConnectionSpec(
            name="gov-2", protocol="imap", username=ALICE, oauth_credential="gov", host_override="gcc-high",
            host="imap.example.org"))
    with pytest.raises(ValidationError, match="not both"):  # an edit of the host alone would be lost later
        mh.connections.edit(Direction.INCOMING, "gov-in", ConnectionSpec(host="imap.example.org"))
    mh.connections.edit(Direction.INCOMING, "gov-in", ConnectionSpec(host="imap.example.org", host_override=""))
    assert mh.connections.get(Direction.INCOMING, "gov-in").host == "imap.example.org"
    mh.connections.edit(Direction.INCOMING, "gov-in", ConnectionSpec(host_override="gcc-high"))  # and back
    assert mh.connections.get(Direction.INCOMING, "gov-in").host == "outlook.office365.us"


def test_cli_edit_without_options_changes_nothing(home: Path) -> None:
    """`oauth edit NAME` with nothing to change is bad input saying so, like a connection's
    edit, not "changed OAuth2 credential NAME"; an unknown name is still said as such."""
    added = run_cli("oauth", "add", "m365", "--provider", "microsoft", "--client-id", "app")
    assert added.returncode == 0, added.stderr
    before = json.loads(run_cli("oauth", "show", "m365", "--json").stdout)
    out = run_cli("oauth", "edit", "m365")
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "nothing to change in OAuth2 credential m365: give the options to change" in out.stderr, out.stderr
    assert json.loads(run_cli("oauth", "show", "m365", "--json").stdout) == before
    missing = run_cli("oauth", "edit", "nosuch")
    assert missing.returncode == 2 and "no OAuth2 credential named 'nosuch'" in missing.stderr, missing.stderr
