"""Signing in with OAuth2 for real: IMAP, POP3 (Dovecot's oauth2 passdb) and SMTP servers
that validate each token by RFC 7662 introspection at the local identity provider."""
from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import mailhost.oauth
from mailhost import Mailhost
from mailhost.connections import ConnectionSpec
from mailhost.errors import AuthenticationFailed
from mailhost.oauth import CredentialSpec
from mailhost.oauth_providers import Interaction
from mailhost.protocols import Direction

from .helpers import run_cli
from .servers.dovecot import Dovecot, generate_message
from .servers.idp import IdentityProvider
from .servers.idp_fixtures import OAuthSmtpServer

ALICE, BOB, SHARED = "alice@example.org", "bob@example.org", "shared@example.org"


@pytest.fixture
def clock(idp: IdentityProvider, monkeypatch: pytest.MonkeyPatch) -> Callable[[float], None]:
    """``advance(seconds)``: mailhost's clock and the provider's move together."""
    offset = [dt.timedelta(0)]
    real = mailhost.oauth.utcnow
    monkeypatch.setattr(mailhost.oauth, "utcnow", lambda: real() + offset[0])

    def advance(seconds: float) -> None:
        offset[0] += dt.timedelta(seconds=seconds)
        idp.advance(seconds)

    return advance


@pytest.fixture
def m365(mh: Mailhost, idp: IdentityProvider, browser: Callable[[str], bool]) -> Any:
    """A Microsoft credential at the local provider, authorized for alice (and bob)."""
    idp.add_client("client-m365", "s3cret")
    idp.add_user(ALICE, {SHARED})
    idp.add_user(BOB)
    cred = mh.oauth.add(CredentialSpec(name="m365", provider="microsoft", client_id="client-m365",
                                       client_secret="s3cret", authority=idp.authority, tenant=idp.tenant,
                                       ca_file=idp.ca_file))
    for user in (ALICE, BOB):
        mh.oauth.authorize("m365", user, Interaction(show=lambda line: None, open_url=browser, timeout=30))
    return cred


def mailboxes(dc: Dovecot, *users: str) -> None:
    """Users in Dovecot; their passwords are never used: the tokens decide."""
    for user in users:
        dc.add_user(user, "unused-password-" + user.split("@")[0])


def incoming(mh: Mailhost, dc: Dovecot, protocol: str = "imap", name: str = "in", username: str = ALICE,
             **spec: Any) -> Any:
    port = dc.imaps_port if protocol == "imap" else dc.pop3s_port
    return mh.connections.add(Direction.INCOMING, ConnectionSpec(
        name=name, protocol=protocol, host="127.0.0.1", port=port, encryption="ssl", username=username,
        oauth_credential="m365", ca_file=dc.ca_file, **spec))


def fetch(mh: Mailhost, name: str = "in") -> Any:
    [report] = mh.incoming.fetch([name])
    return report


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
def test_sign_in_with_a_token(mh: Mailhost, idp: IdentityProvider, m365: Any, oauth_dovecot: Callable[..., Dovecot],
                              protocol: str, mechanism: str) -> None:
    """XOAUTH2 (preferred when offered) and OAUTHBEARER, over IMAP and POP3: Dovecot asks
    the provider about the token and lets alice in."""
    dc = oauth_dovecot(idp, mechanisms=[mechanism] if mechanism == "oauthbearer" else ["xoauth2", "oauthbearer"])
    mailboxes(dc, ALICE)
    dc.deliver_many(ALICE, [generate_message(i) for i in range(3)])
    incoming(mh, dc, protocol)
    report = fetch(mh)
    assert report.ok and report.stored == 3, report.error
    assert [i["username"] for i in idp.introspections] == [ALICE]
    assert f"method={mechanism.upper()}" in dc.log_text()


def test_polls_reuse_the_token_until_it_is_due(mh: Mailhost, idp: IdentityProvider, m365: Any,
                                               oauth_dovecot: Callable[..., Dovecot],
                                               clock: Callable[[float], None]) -> None:
    """Many polls, no renewal; near expiry one renewal, which the server accepts; the rotated
    refresh token is stored, so the next renewal works too."""
    dc = oauth_dovecot(idp)
    mailboxes(dc, ALICE)
    incoming(mh, dc)
    for i in range(5):
        dc.deliver(ALICE, generate_message(i))
        clock(600)
        assert fetch(mh).stored == 1
    assert idp.grants("refresh_token") == []
    for _ in range(2):
        clock(3500)  # into the last minutes of the token's life
        dc.deliver(ALICE, generate_message(9))
        report = fetch(mh)
        assert report.ok and report.stored == 1, report.error
    assert [g["ok"] for g in idp.grants("refresh_token")] == [True, True]
    assert len(idp.introspections) == 7 and all(i["active"] for i in idp.introspections)


def test_shared_mailbox_uses_the_delegates_token(mh: Mailhost, idp: IdentityProvider, m365: Any,
                                                 oauth_dovecot: Callable[..., Dovecot]) -> None:
    """The shared mailbox goes into the SASL user, the token is the delegate's (alice's);
    bob, who may not open it, is refused with his own valid token."""
    dc = oauth_dovecot(idp, shared=[SHARED])
    mailboxes(dc, ALICE, BOB, SHARED)
    dc.deliver(SHARED, generate_message(1, subject="for the team"))
    incoming(mh, dc, username=ALICE, shared_mailbox=SHARED)
    report = fetch(mh)
    assert report.ok and report.stored == 1, report.error
    [item] = mh.incoming.items("in")
    assert item.subject == "for the team"
    assert idp.introspections[-1] == {"caller": idp.introspections[-1]["caller"], "as": SHARED, "active": True,
                                      "username": SHARED}
    assert f"user=<{SHARED}>, method=XOAUTH2" in dc.log_text()

    incoming(mh, dc, name="bob-shared", username=BOB, shared_mailbox=SHARED)
    refused = fetch(mh, "bob-shared")
    assert not refused.ok and "authentication failed for bob-shared" in refused.error


def test_expired_client_secret_is_one_clear_error_on_the_connection(
        mh: Mailhost, idp: IdentityProvider, m365: Any, oauth_dovecot: Callable[..., Dovecot],
        clock: Callable[[float], None]) -> None:
    """AADSTS7000222 surfaces once, as a sentence naming the connection, the credential and
    the fix, in the pass, on the connection (`incoming show`) and on the credential."""
    dc = oauth_dovecot(idp)
    mailboxes(dc, ALICE)
    incoming(mh, dc, name="helpdesk")
    assert fetch(mh, "helpdesk").ok
    idp.expire_secret("client-m365")
    clock(3600)
    report = fetch(mh, "helpdesk")
    assert not report.ok
    assert report.error.startswith("helpdesk: OAuth2 credential 'm365' for alice@example.org: the client secret "
                                   "has expired (AADSTS7000222 ")
    assert report.error.endswith("store it with `mailhost oauth edit m365 --client-secret-stdin`")
    assert report.error.count("AADSTS7000222") == 1 and "\n" not in report.error
    assert mh.connections.get(Direction.INCOMING, "helpdesk").last_error == report.error
    shown = json.loads(run_cli("incoming", "show", "helpdesk", "--json").stdout)
    assert shown["last_error"] == report.error and "AADSTS7000222" in shown["oauth_last_error"]
    credential = json.loads(run_cli("oauth", "show", "m365", "--json").stdout)
    assert "AADSTS7000222" in credential["last_error"]


def test_revoked_token_is_refused_then_authorized_again(mh: Mailhost, idp: IdentityProvider, m365: Any,
                                                        oauth_dovecot: Callable[..., Dovecot],
                                                        browser: Callable[[str], bool],
                                                        clock: Callable[[float], None]) -> None:
    """Revoked sessions: the server refuses the token, so the pass asks for a new one at
    once, and the refused renewal names `oauth authorize` (no waiting for the token's
    expiry); after authorizing again mail flows."""
    dc = oauth_dovecot(idp)
    mailboxes(dc, ALICE)
    incoming(mh, dc)
    idp.revoke_user(ALICE)
    refused = fetch(mh)
    assert not refused.ok
    assert "the authorization was revoked or has expired (AADSTS50173" in refused.error
    assert "`mailhost oauth authorize m365 --username alice@example.org`" in refused.error
    assert [g["ok"] for g in idp.grants("refresh_token")] == [False]
    clock(60)
    again = fetch(mh)  # the renewal is not retried in a loop: one per pass
    assert again.error == refused.error and [g["ok"] for g in idp.grants("refresh_token")] == [False, False]
    mh.oauth.authorize("m365", ALICE, Interaction(show=lambda line: None, open_url=browser, timeout=30))
    dc.deliver(ALICE, generate_message(1))
    assert fetch(mh).stored == 1


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_a_refused_token_is_renewed_and_tried_once_more(mh: Mailhost, idp: IdentityProvider, m365: Any,
                                                        oauth_dovecot: Callable[..., Dovecot], protocol: str) -> None:
    """The server judges the token expired before mailhost does (the provider's clock runs
    ahead): the sign-in is refused, the pass renews the token and signs in with the new
    one, and the mail comes in the same pass."""
    dc = oauth_dovecot(idp)
    mailboxes(dc, ALICE)
    dc.deliver(ALICE, generate_message(1))
    incoming(mh, dc, protocol)
    idp.advance(3600 + 60)  # the provider's clock only: mailhost still holds the token for fresh
    report = fetch(mh)
    assert report.ok and report.stored == 1, report.error
    assert [g["ok"] for g in idp.grants("refresh_token")] == [True]
    assert [i["active"] for i in idp.introspections] == [False, True]
    dc.deliver(ALICE, generate_message(2))
    assert fetch(mh).stored == 1 and len(idp.grants("refresh_token")) == 1  # the new token is kept


@pytest.mark.parametrize("offered", [("XOAUTH2", "OAUTHBEARER"), ("OAUTHBEARER",)])
def test_smtp_xoauth2(mh: Mailhost, idp: IdentityProvider, m365: Any,
                      oauth_smtp: Callable[..., OAuthSmtpServer], offered: tuple[str, ...]) -> None:
    """SMTP AUTH XOAUTH2 as the delegate, sending from the shared mailbox's address;
    OAUTHBEARER (RFC 7628) when the server offers only that, as IMAP and POP3 do."""
    server = oauth_smtp(idp, mechanisms=offered)
    conn = mh.connections.add(Direction.OUTGOING, ConnectionSpec(
        name="out", protocol="smtp", host="127.0.0.1", port=server.port, encryption="starttls", username=ALICE,
        oauth_credential="m365", from_address=SHARED, ca_file=server.ca_file))
    steps = list(mh.connections.test(Direction.OUTGOING, "out", ConnectionSpec()))
    assert all(step.ok for step in steps), steps
    provider = mh.connections.provider(Direction.OUTGOING, conn)
    with provider.open(mh.connections.settings(Direction.OUTGOING, conn)) as session:
        session.send(generate_message(1, sender=SHARED), SHARED, ["team@example.net"])
    [message] = server.messages
    assert (message.auth_login, message.mail_from, message.tls) == (ALICE, SHARED, True)
    assert server.auth_attempts == [(ALICE, True), (ALICE, True)]

    idp.advance(3600 + 60)  # the server judges the token expired: renewed, and tried once more
    with provider.open(mh.connections.settings(Direction.OUTGOING, conn)) as session:
        session.send(generate_message(2, sender=SHARED), SHARED, ["team@example.net"])
    assert server.auth_attempts[2:] == [(ALICE, False), (ALICE, True)] and len(server.messages) == 2
    assert set(server.used) == {offered[0]}

    idp.revoke_user(ALICE)
    with pytest.raises(AuthenticationFailed, match=r"the authorization was revoked or has expired \(AADSTS50173"):
        provider.open(mh.connections.settings(Direction.OUTGOING, conn)).close()


def test_cli_test_command_signs_in(home: Path, mh: Mailhost, idp: IdentityProvider, m365: Any,
                                   oauth_dovecot: Callable[..., Dovecot]) -> None:
    """`mailhost incoming test NAME` on an OAuth2 connection signs in with the stored token."""
    dc = oauth_dovecot(idp)
    mailboxes(dc, ALICE)
    incoming(mh, dc)
    result = run_cli("incoming", "test", "in", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(step["ok"] for step in json.loads(result.stdout))
