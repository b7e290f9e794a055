"""The plugin in the host: what it registers, the connection rules, the endpoint, the tests."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from graph_helpers import ALICE, Settings, message
from mailhost import Mailhost, hookimpl
from mailhost.connections import ConnectionSpec
from mailhost.errors import ValidationError
from mailhost.plugins import PluginHost
from mailhost.protocols import Direction, HostOverride
from mailhost_graph import INCOMING, OUTGOING
from mailhost_graph.client import GraphClient
from mailhost_graph.diagnose import test_incoming as incoming_test
from mailhost_graph.diagnose import test_outgoing as outgoing_test

from tests.servers.graph import GraphServer, add_oauth_credential, wire_access_token


class Clouds:
    """A plugin with one Graph host override, as the Microsoft OAuth2 provider registers them."""

    @hookimpl
    def register_host_overrides(self, register):  # type: ignore[no-untyped-def]
        register(HostOverride(provider="microsoft", protocol="graph", name="gcc-high", host="graph.microsoft.us",
                              title="Microsoft 365 GCC High", authority="https://login.microsoftonline.us"))


@pytest.fixture
def host(home: Path) -> Mailhost:
    mh = Mailhost.open(home / "mailhost.toml", plugins=PluginHost(only=["graph"], extra=[("clouds", Clouds())]))
    add_oauth_credential(mh, "ms")
    wire_access_token(mh, lambda: "token")
    yield mh
    mh.close()


def test_registers_graph_in_both_directions(host: Mailhost) -> None:
    """One plugin, the protocol ``graph`` incoming and outgoing, OAuth2 only."""
    incoming = host.plugins.protocol(Direction.INCOMING, "graph")
    outgoing = host.plugins.protocol(Direction.OUTGOING, "graph")
    assert (incoming.open, incoming.plugin) == (INCOMING.open, "graph")
    assert (outgoing.open, outgoing.plugin) == (OUTGOING.open, "graph")
    assert INCOMING.connect_modes == OUTGOING.connect_modes == frozenset({"oauth2"})
    assert INCOMING.after_download == ("mark-seen", "delete", "move", "keep")


def test_connection_rules(host: Mailhost) -> None:
    """OAuth2 only, no encryption, a username; Inbox and mark-seen by default, graph.microsoft.com."""
    with pytest.raises(ValidationError, match="does not support password sign-in"):
        host.connections.add(Direction.INCOMING, ConnectionSpec(name="a", protocol="graph", username=ALICE,
                                                                password="x"))
    with pytest.raises(ValidationError, match="encryption does not apply to graph"):
        host.connections.add(Direction.INCOMING, ConnectionSpec(name="a", protocol="graph", username=ALICE,
                                                                oauth_credential="ms", encryption="ssl"))
    with pytest.raises(ValidationError, match="needs the mailbox's username"):
        host.connections.add(Direction.INCOMING, ConnectionSpec(name="a", protocol="graph", oauth_credential="ms"))
    conn = host.connections.add(Direction.INCOMING, ConnectionSpec(name="a", protocol="graph", username=ALICE,
                                                                   oauth_credential="ms"))
    assert (conn.folder, conn.after_download, conn.host) == ("Inbox", "mark-seen", None)
    client = GraphClient(host.connections.settings(Direction.INCOMING, conn))
    assert client.base == "https://graph.microsoft.com/v1.0"
    client.close()
    # Outgoing: the seeds' From address and Prefix, which apply to OAuth2 connections.
    out = host.connections.add(Direction.OUTGOING, ConnectionSpec(
        name="o", protocol="graph", username=ALICE, oauth_credential="ms", from_address=ALICE, prefix="[Desk]"))
    assert (out.from_address, out.prefix) == (ALICE, "[Desk]")


def test_one_spelling_per_folder() -> None:
    """Exchange ignores case in folder names: a well-known first part in any case has
    one spelling (Inbox, the default, or the lower-case well-known name), the parts are
    trimmed, and display names keep the admin's case."""
    names = ["inbox", "INBOX/Support", "/Inbox/ Support /", "Drafts", "deletedItems/Old", "Projects/2026"]
    assert [INCOMING.canonical_folder(n) for n in names] == [
        "Inbox", "Inbox/Support", "Inbox/Support", "drafts", "deleteditems/Old", "Projects/2026"]


def test_host_override_picks_the_cloud(host: Mailhost) -> None:
    """--host-override gcc-high: the Graph endpoint of that cloud, in both directions."""
    for direction in Direction:
        conn = host.connections.add(direction, ConnectionSpec(name="c", protocol="graph", username=ALICE,
                                                              oauth_credential="ms", host_override="gcc-high"))
        client = GraphClient(host.connections.settings(direction, conn))
        assert client.base == "https://graph.microsoft.us/v1.0"
        client.close()


def test_incoming_test_on_an_empty_folder(graph: GraphServer, settings: Settings) -> None:
    """Each step reported; with nothing in the folder the write probe says it could not check."""
    steps = list(incoming_test(settings()))
    assert [(s.name, s.ok) for s in steps] == [("token", True), ("mailbox", True), ("folder", True),
                                               ("permissions", True)]
    assert "delegated for alice@contoso.com" in steps[0].detail
    assert "not checked, the folder is empty" in steps[-1].detail


def test_incoming_test_reports_missing_write_permission(graph: GraphServer, settings: Settings) -> None:
    """Mail.Read only: reading works, setting the read flag is denied, and the step says so."""
    graph.deliver(ALICE, message(1))
    steps = list(incoming_test(settings(scopes=("Mail.Read",))))
    assert (steps[-1].name, steps[-1].ok) == ("permissions", False)
    assert "403 ErrorAccessDenied" in steps[-1].detail and "Mail.ReadWrite" in steps[-1].detail


def test_outgoing_test(graph: GraphServer, settings: Settings) -> None:
    """Send-only tokens pass (the mailbox need not be readable); no Mail.Send fails."""
    steps = list(outgoing_test(settings(scopes=("Mail.Send",))))
    assert [(s.name, s.ok) for s in steps] == [("token", True), ("mailbox", True), ("permissions", True)]
    assert "may not read it" in steps[1].detail
    assert steps[-1].detail == "send: yes; over 4 MB (saved as a draft first): no (Mail.ReadWrite missing)"
    both = list(outgoing_test(settings()))
    assert both[-1].detail == "send: yes; over 4 MB (saved as a draft first): yes"
    refused = list(outgoing_test(settings(scopes=("Mail.Read",))))
    assert (refused[-1].name, refused[-1].ok) == ("permissions", False)
    assert "Mail.Send" in refused[-1].detail
    unknown = list(outgoing_test(settings(host="127.0.0.1", port=graph.port, access_token=lambda: "opaque")))
    assert (unknown[0].name, unknown[0].ok) == ("token", True)
    assert not unknown[1].ok and "refused the access token" in unknown[1].detail


class Source:
    """A token source that says what it stands for, as the host's (mailhost.oauth.TokenSource) does."""

    def __init__(self, scopes: tuple[str, ...], flow: str = "client-credentials", token: str = "token") -> None:
        self.credential, self.provider, self.flow, self.scopes = "m365", "microsoft", flow, scopes
        self.app_only = flow == "client-credentials"
        self.asked = 0
        self.token = token

    def __call__(self) -> str:
        self.asked += 1
        return self.token

    def granted(self) -> tuple[str, ...]:
        return self.scopes


@pytest.mark.parametrize(("host", "scopes", "problem"), [
    ("127.0.0.1", ("https://graph.microsoft.com/.default",), None),
    ("127.0.0.1", ("Mail.ReadWrite", "Mail.Send", "offline_access"), None),  # Graph's to Microsoft's v2.0
    ("127.0.0.1", ("00000003-0000-0000-c000-000000000000/.default",), None),
    ("127.0.0.1", ("https://api.contoso.com/.default",), None),  # a private endpoint's own resource
    ("127.0.0.1", ("https://outlook.office365.com/.default",), "Exchange Online's"),
    (None, ("https://outlook.office.com/IMAP.AccessAsUser.All", "offline_access"), "Exchange Online's"),
    ("graph.microsoft.us", ("https://graph.microsoft.us/.default",), None),
    ("graph.microsoft.us", ("https://graph.microsoft.com/.default",), "another cloud"),
    ("graph.microsoft.com", ("https://api.contoso.com/.default",), "another resource"),
])
def test_scope_problem(host: str | None, scopes: tuple[str, ...], problem: str | None) -> None:
    """Graph takes tokens for Graph of its own cloud; what is surely something else is named."""
    from mailhost.protocols import ConnectionSettings
    from mailhost_graph.scopes import scope_problem

    settings = ConnectionSettings(name="desk", protocol="graph", host=host, username=ALICE,
                                  access_token=Source(scopes))
    found = scope_problem(settings, host or "graph.microsoft.com")
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found and "'m365'" in found
    assert scope_problem(ConnectionSettings(name="d", protocol="graph", access_token=lambda: "t"), host) is None


def test_a_credential_for_exchange_fails_before_any_request(graph: GraphServer, settings: Settings) -> None:
    """The token step names the credential and the scopes to give it; no token is asked for
    or sent. Delegated: the .Shared scopes for a shared mailbox, then authorize again."""
    source = Source(("https://outlook.office.com/IMAP.AccessAsUser.All", "offline_access"), flow="authorization-code")
    steps = list(incoming_test(settings(access_token=source, shared_mailbox="support@contoso.com")))
    assert [(s.name, s.ok) for s in steps] == [("token", False)]
    assert ("`mailhost oauth edit m365 --scope https://graph.microsoft.com/Mail.ReadWrite "
            "--scope https://graph.microsoft.com/Mail.Send --scope https://graph.microsoft.com/Mail.ReadWrite.Shared "
            "--scope https://graph.microsoft.com/Mail.Send.Shared --scope offline_access` then "
            f"`mailhost oauth authorize m365 --username {ALICE}`") in steps[0].detail
    assert source.asked == 0 and sum(graph.stats.values()) == 0


def test_opaque_token_permissions_from_the_source(pki: Any) -> None:
    """A token the plugin cannot read (not a JWT) is described by its credential: which one,
    app-only or delegated, and the scopes granted (which say whether it may send)."""
    from mailhost.protocols import ConnectionSettings

    from tests.servers.graph import Principal

    def verify(token: str) -> Principal | None:
        return Principal(ALICE, frozenset({"Mail.ReadWrite", "Mail.Send"})) if token == "opaque" else None

    with GraphServer(pki, verify=verify) as graph:
        graph.add_user(ALICE)
        graph.deliver(ALICE, message(1))
        source = Source(("https://graph.microsoft.com/Mail.ReadWrite", "https://graph.microsoft.com/Mail.Send"),
                        flow="authorization-code", token="opaque")
        steps = list(incoming_test(ConnectionSettings(
            name="desk", protocol="graph", host="127.0.0.1", port=graph.port, username=ALICE,
            ca_file=graph.ca_file, timeout=10.0, access_token=source)))
    assert all(s.ok for s in steps), steps
    assert steps[0].detail == ("acquired an access token from OAuth2 credential 'm365' (delegated for "
                               f"{ALICE}, scopes https://graph.microsoft.com/Mail.ReadWrite "
                               "https://graph.microsoft.com/Mail.Send)")
    assert "send: yes" in steps[-1].detail
